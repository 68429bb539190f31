// PageIndex<T>: a persistent (copy-on-write) radix tree from page numbers to T*.
//
// Like a CPU page table: a lookup is a fixed number of dependent loads, independent of how many
// values are stored, and a slot whose whole span maps to one value stores it directly (like a
// huge-page entry), so large aligned ranges cost few nodes. Published versions are immutable:
// writers (serialized by the caller) build the next version by copying only the nodes on the
// paths they change, publish it with one atomic store, and free the replaced nodes after a grace
// period. Readers load the root once and walk without locks (inside an epoch read section).
#ifndef DMAPIN_AGENT_REGISTRY_PAGE_INDEX_H_
#define DMAPIN_AGENT_REGISTRY_PAGE_INDEX_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common/raw_check.h"

namespace dmapin::agent {

template <typename T>
class PageIndex {
 private:
  struct Node;  // declared ahead for Garbage (clang wants it before use in a member declaration)

 public:
  static constexpr uint32_t kBitsPerLevel = 8;
  static constexpr uint32_t kFanout = 1u << kBitsPerLevel;

  // Nodes replaced by an update; free them (with Free) once no reader can see the old version.
  class Garbage {
   public:
    Garbage() = default;
    Garbage(Garbage&&) = default;
    Garbage& operator=(Garbage&&) = default;
    ~Garbage() { Free(); }
    void Free() {
      for (Node* node : nodes_) delete node;
      nodes_.clear();
    }
    size_t size() const { return nodes_.size(); }

   private:
    friend class PageIndex;
    std::vector<Node*> nodes_;
  };

  // `page_number_bits`: width of the keys (64 - log2(page size)).
  explicit PageIndex(uint32_t page_number_bits)
      : levels_((page_number_bits + kBitsPerLevel - 1) / kBitsPerLevel) {}

  ~PageIndex() {
    Garbage garbage;
    RetireSubtree(root_.load(std::memory_order_relaxed), &garbage);
  }

  PageIndex(const PageIndex&) = delete;
  PageIndex& operator=(const PageIndex&) = delete;

  // The value covering `page`, or nullptr. Lock-free; call inside a read section.
  T* Lookup(uint64_t page) const {
    uintptr_t slot = root_.load(std::memory_order_acquire);
    uint32_t shift = (levels_ - 1) * kBitsPerLevel;
    for (;;) {
      if (slot == 0 || (slot & kValueTag) != 0) {
        return reinterpret_cast<T*>(slot & ~kValueTag);
      }
      const Node* node = reinterpret_cast<const Node*>(slot);
      slot = node->slots[(page >> shift) & (kFanout - 1)];
      shift -= kBitsPerLevel;  // Wraps only after a leaf-level slot, which is never a node.
    }
  }

  // Maps pages [first, first + count) to `value` (nullptr to unmap) in a new version, publishes
  // it, and adds the replaced nodes to `garbage`. Writers must be serialized by the caller.
  void Assign(uint64_t first, uint64_t count, T* value, Garbage* garbage) {
    if (count == 0) return;
    DMAPIN_RAW_CHECK((reinterpret_cast<uintptr_t>(value) & kValueTag) == 0, "misaligned value");
    const uintptr_t leaf = value == nullptr ? 0 : (reinterpret_cast<uintptr_t>(value) | kValueTag);
    const uint64_t last = first + (count - 1);
    const uintptr_t old_root = root_.load(std::memory_order_relaxed);
    const uintptr_t new_root = AssignSlot(old_root, levels_, 0, first, last, leaf, garbage);
    root_.store(new_root, std::memory_order_release);
  }

  // Number of interior nodes in the current version (for tests and memory accounting).
  size_t NodeCount() const { return CountNodes(root_.load(std::memory_order_acquire)); }

 private:
  static constexpr uintptr_t kValueTag = 1;

  struct Node {
    uintptr_t slots[kFanout];
  };

  // A slot at `level` (levels_ = the root slot) spans 2^(level * kBitsPerLevel) pages starting at
  // `base`; level 0 is a single page.
  uint64_t SpanMinusOne(uint32_t level) const {
    const uint32_t bits = level * kBitsPerLevel;
    return bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
  }

  uintptr_t AssignSlot(uintptr_t slot, uint32_t level, uint64_t base, uint64_t first, uint64_t last,
                       uintptr_t leaf, Garbage* garbage) {
    const uint64_t end = base + SpanMinusOne(level);  // inclusive
    if (first <= base && last >= end) {
      RetireSubtree(slot, garbage);
      return leaf;
    }
    // Partial cover: work on a private copy of the child node (or a new node spreading the old
    // leaf value over all its slots).
    Node* node = new Node;
    if (slot != 0 && (slot & kValueTag) == 0) {
      std::memcpy(node->slots, reinterpret_cast<Node*>(slot)->slots, sizeof(node->slots));
      garbage->nodes_.push_back(reinterpret_cast<Node*>(slot));
    } else {
      for (uintptr_t& child : node->slots) child = slot;
    }
    const uint32_t child_level = level - 1;
    const uint32_t child_bits = child_level * kBitsPerLevel;
    const uint64_t lo = first > base ? first : base;
    const uint64_t hi = last < end ? last : end;
    const uint32_t first_index = static_cast<uint32_t>((lo - base) >> child_bits);
    const uint32_t last_index = static_cast<uint32_t>((hi - base) >> child_bits);
    for (uint32_t i = first_index; i <= last_index; ++i) {
      const uint64_t child_base = base + (static_cast<uint64_t>(i) << child_bits);
      node->slots[i] =
          AssignSlot(node->slots[i], child_level, child_base, first, last, leaf, garbage);
    }
    // Collapse a node whose slots all hold the same leaf (or nothing) back into one slot.
    const uintptr_t first_slot = node->slots[0];
    if (first_slot == 0 || (first_slot & kValueTag) != 0) {
      bool uniform = true;
      for (uintptr_t child : node->slots) {
        if (child != first_slot) {
          uniform = false;
          break;
        }
      }
      if (uniform) {
        delete node;
        return first_slot;
      }
    }
    return reinterpret_cast<uintptr_t>(node);
  }

  static void RetireSubtree(uintptr_t slot, Garbage* garbage) {
    if (slot == 0 || (slot & kValueTag) != 0) return;
    Node* node = reinterpret_cast<Node*>(slot);
    for (uintptr_t child : node->slots) RetireSubtree(child, garbage);
    garbage->nodes_.push_back(node);
  }

  static size_t CountNodes(uintptr_t slot) {
    if (slot == 0 || (slot & kValueTag) != 0) return 0;
    size_t count = 1;
    for (uintptr_t child : reinterpret_cast<const Node*>(slot)->slots) count += CountNodes(child);
    return count;
  }

  const uint32_t levels_;
  std::atomic<uintptr_t> root_{0};
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_REGISTRY_PAGE_INDEX_H_
