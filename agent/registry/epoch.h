// Epoch-based reclamation: readers that never block writers and never see freed memory.
//
// Readers bracket their accesses with an EpochReadLock (a per-thread slot store, no atomic
// read-modify-write and, where the kernel offers membarrier(2), no memory fence either). A writer
// that has unpublished an object calls EpochDomain::Synchronize(), which returns once every reader
// that could still hold a reference has left its read section; then the object may be freed.
// This is the userspace-RCU "memb" flavour: the expensive fence is paid by the rare writer.
#ifndef DMAPIN_AGENT_REGISTRY_EPOCH_H_
#define DMAPIN_AGENT_REGISTRY_EPOCH_H_

#include <atomic>
#include <cstdint>

namespace dmapin {

class EpochDomain {
 public:
  // The process-wide domain (like the kernel's RCU, one for everything).
  static EpochDomain& Global();

  // Waits until every read section that began before this call has ended.
  // Must not be called from inside a read section (it would wait for itself).
  void Synchronize();

  // True when the calling thread is inside a read section.
  static bool InReadSection();

  // True when readers run fence-free because membarrier(2) is available.
  bool uses_membarrier() const { return use_membarrier_; }

  // Bounded so the writer's scan stays cheap; threads beyond it share an overflow counter.
  static constexpr int kMaxSlots = 1024;

  struct alignas(64) Slot {
    // 0 when the owning thread is outside any read section, else the epoch it entered in.
    std::atomic<uint64_t> epoch{0};
    std::atomic<bool> claimed{false};
  };

  // For EpochReadLock only.
  void Enter();
  void Exit();

 private:
  EpochDomain();
  Slot* ClaimSlot();
  void ReleaseSlot(Slot* slot);
  friend struct ThreadSlotHolder;

  std::atomic<uint64_t> global_epoch_{1};
  std::atomic<int> slots_in_use_high_water_{0};
  // Readers without a slot of their own (more than kMaxSlots threads).
  std::atomic<uint64_t> overflow_readers_{0};
  bool use_membarrier_ = false;
  Slot slots_[kMaxSlots];
};

// RAII read section on the global domain; nestable.
class EpochReadLock {
 public:
  EpochReadLock() { EpochDomain::Global().Enter(); }
  ~EpochReadLock() { EpochDomain::Global().Exit(); }
  EpochReadLock(const EpochReadLock&) = delete;
  EpochReadLock& operator=(const EpochReadLock&) = delete;
};

}  // namespace dmapin

#endif  // DMAPIN_AGENT_REGISTRY_EPOCH_H_
