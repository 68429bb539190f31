// IommuTable<T>: a container's IOMMU entries (one per IOMMU page of its DMA window), each an
// atomic pointer to what it maps.
//
// Like a hardware TCE/IO page table it is sparse and allocated on first use: interior levels and
// leaves are installed with compare-and-swap, so concurrent map/unmap calls need no lock, and
// nothing is freed before the table itself (the owner destroys it after a grace period). The last
// leaf used is remembered, so repeated maps and unmaps in one leaf skip the walk.
#ifndef DMAPIN_AGENT_REGISTRY_IOMMU_TABLE_H_
#define DMAPIN_AGENT_REGISTRY_IOMMU_TABLE_H_

#include <atomic>
#include <cstdint>
#include <functional>

#include "absl/base/attributes.h"

namespace dmapin::agent {

template <typename T>
class IommuTable {
 public:
  static constexpr uint32_t kBitsPerLevel = 9;
  static constexpr uint32_t kFanout = 1u << kBitsPerLevel;

  // A table of `entries` slots (entries >= 1).
  explicit IommuTable(uint64_t entries) : levels_(LevelsFor(entries)), entries_(entries) {}
  ~IommuTable() { FreeSubtree(root_.load(std::memory_order_relaxed), levels_); }

  IommuTable(const IommuTable&) = delete;
  IommuTable& operator=(const IommuTable&) = delete;

  uint64_t entries() const { return entries_; }

  // Atomically replaces entry `index` (< entries()) and returns what it held.
  T* Exchange(uint64_t index, T* value) {
    std::atomic<T*>* slot = Slot(index, /*create=*/value != nullptr);
    if (slot == nullptr) return nullptr;  // Never allocated: nothing installed there.
    return slot->exchange(value, std::memory_order_acq_rel);
  }

  // The current value of entry `index`.
  T* Get(uint64_t index) const {
    std::atomic<T*>* slot = const_cast<IommuTable*>(this)->Slot(index, /*create=*/false);
    return slot == nullptr ? nullptr : slot->load(std::memory_order_acquire);
  }

  // Clears entries [first, first + count) (first + count <= entries()) and calls fn(old) for each
  // that held a value, in index order. Only allocated leaves are visited, so clearing a range of a
  // huge window costs what is installed there, not the range's size.
  template <typename Fn>
  void ClearRange(uint64_t first, uint64_t count, Fn&& fn) {
    if (count == 0) return;
    const uint64_t last = first + (count - 1);
    Leaf* hint = last_leaf_.load(std::memory_order_acquire);
    if (hint != nullptr && hint->key == (first >> kBitsPerLevel) &&
        hint->key == (last >> kBitsPerLevel)) {
      ClearInLeaf(hint, hint->key << kBitsPerLevel, first, last, fn);
      return;
    }
    ClearIn(root_.load(std::memory_order_acquire), levels_, 0, first, last, fn);
  }

  // Calls fn(index, slot) for every allocated slot holding a non-null value, in index order.
  void ForEachInstalled(const std::function<void(uint64_t, std::atomic<T*>&)>& fn) {
    Visit(root_.load(std::memory_order_acquire), levels_, 0, fn);
  }

 private:
  // A level-1 node is a leaf of kFanout entries; a level-n node holds kFanout level-(n-1) nodes.
  struct Leaf {
    explicit Leaf(uint64_t key) : key(key) {}
    const uint64_t key;  // index >> kBitsPerLevel of its entries
    std::atomic<T*> entries[kFanout] = {};
  };
  struct Interior {
    std::atomic<void*> children[kFanout] = {};
  };

  static uint32_t LevelsFor(uint64_t entries) {
    uint32_t levels = 1;
    while (levels * kBitsPerLevel < 64 && ((entries - 1) >> (levels * kBitsPerLevel)) != 0) {
      ++levels;
    }
    return levels;
  }

  // The node at `where`, installing `make()` there first if it is empty.
  template <typename Make>
  static void* InstallOrGet(std::atomic<void*>* where, Make make) {
    void* current = where->load(std::memory_order_acquire);
    if (current != nullptr) return current;
    auto* fresh = make();
    if (where->compare_exchange_strong(current, fresh, std::memory_order_acq_rel)) return fresh;
    delete fresh;  // Another thread won the race; use its node.
    return current;
  }

  std::atomic<T*>* Slot(uint64_t index, bool create) {
    // Leaves live as long as the table, so the hint is always safe to dereference; its key says
    // whether it is the right one.
    Leaf* hint = last_leaf_.load(std::memory_order_acquire);
    if (hint != nullptr && hint->key == (index >> kBitsPerLevel)) {
      return &hint->entries[index & (kFanout - 1)];
    }
    return SlotWalk(index, create);
  }

  // Out of line: the hinted path above is the one worth inlining into callers.
  ABSL_ATTRIBUTE_NOINLINE std::atomic<T*>* SlotWalk(uint64_t index, bool create) {
    std::atomic<void*>* where = &root_;
    for (uint32_t level = levels_; level > 1; --level) {
      void* node = create ? InstallOrGet(where, [] { return new Interior; })
                          : where->load(std::memory_order_acquire);
      if (node == nullptr) return nullptr;
      const uint32_t shift = (level - 1) * kBitsPerLevel;
      where = &static_cast<Interior*>(node)->children[(index >> shift) & (kFanout - 1)];
    }
    void* leaf = create ? InstallOrGet(where, [index] { return new Leaf(index >> kBitsPerLevel); })
                        : where->load(std::memory_order_acquire);
    if (leaf == nullptr) return nullptr;
    last_leaf_.store(static_cast<Leaf*>(leaf), std::memory_order_release);
    return &static_cast<Leaf*>(leaf)->entries[index & (kFanout - 1)];
  }

  template <typename Fn>
  static void ClearInLeaf(Leaf* leaf, uint64_t base, uint64_t first, uint64_t last, Fn& fn) {
    const uint64_t from = (first > base ? first : base) - base;
    const uint64_t to = (last - base < kFanout - 1 ? last - base : kFanout - 1);
    for (uint64_t i = from; i <= to; ++i) {
      T* old = leaf->entries[i].exchange(nullptr, std::memory_order_acq_rel);
      if (old != nullptr) fn(old);
    }
  }

  // `node` spans entries from `base`, which is <= last.
  template <typename Fn>
  void ClearIn(void* node, uint32_t level, uint64_t base, uint64_t first, uint64_t last, Fn& fn) {
    if (node == nullptr) return;
    if (level == 1) {
      Leaf* leaf = static_cast<Leaf*>(node);
      last_leaf_.store(leaf, std::memory_order_release);
      ClearInLeaf(leaf, base, first, last, fn);
      return;
    }
    Interior* interior = static_cast<Interior*>(node);
    const uint32_t shift = (level - 1) * kBitsPerLevel;
    const uint64_t first_index = ((first > base ? first : base) - base) >> shift;
    const uint64_t last_index =
        (last - base) >> shift < kFanout - 1 ? (last - base) >> shift : kFanout - 1;
    for (uint64_t i = first_index; i <= last_index; ++i) {
      ClearIn(interior->children[i].load(std::memory_order_acquire), level - 1, base + (i << shift),
              first, last, fn);
    }
  }

  void Visit(void* node, uint32_t level, uint64_t base,
             const std::function<void(uint64_t, std::atomic<T*>&)>& fn) {
    if (node == nullptr) return;
    if (level == 1) {
      Leaf* leaf = static_cast<Leaf*>(node);
      for (uint32_t i = 0; i < kFanout; ++i) {
        if (leaf->entries[i].load(std::memory_order_acquire) != nullptr) {
          fn(base + i, leaf->entries[i]);
        }
      }
      return;
    }
    Interior* interior = static_cast<Interior*>(node);
    const uint32_t shift = (level - 1) * kBitsPerLevel;
    for (uint32_t i = 0; i < kFanout; ++i) {
      Visit(interior->children[i].load(std::memory_order_acquire), level - 1,
            base + (static_cast<uint64_t>(i) << shift), fn);
    }
  }

  static void FreeSubtree(void* node, uint32_t level) {
    if (node == nullptr) return;
    if (level == 1) {
      delete static_cast<Leaf*>(node);
      return;
    }
    Interior* interior = static_cast<Interior*>(node);
    for (auto& child : interior->children) {
      FreeSubtree(child.load(std::memory_order_relaxed), level - 1);
    }
    delete interior;
  }

  const uint32_t levels_;
  const uint64_t entries_;
  std::atomic<void*> root_{nullptr};
  std::atomic<Leaf*> last_leaf_{nullptr};
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_REGISTRY_IOMMU_TABLE_H_
