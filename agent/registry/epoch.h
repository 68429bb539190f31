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

#include "absl/base/optimization.h"

namespace dmapin::agent {

class EpochDomain {
 public:
  // The process-wide domain (like the kernel's RCU, one for everything).
  static EpochDomain& Global() {
    static EpochDomain* const domain = new EpochDomain();
    return *domain;
  }

  // Waits until every read section that began before this call has ended.
  // Must not be called from inside a read section (it would wait for itself).
  void Synchronize();

  // True when the calling thread is inside a read section.
  static bool InReadSection() { return tls_reader_.depth > 0; }

  // True when readers run fence-free because membarrier(2) is available.
  bool uses_membarrier() const { return use_membarrier_; }

  // Bounded so the writer's scan stays cheap; threads beyond it share an overflow counter.
  static constexpr int kMaxSlots = 1024;

  struct alignas(64) Slot {
    // 0 when the owning thread is outside any read section, else the epoch it entered in.
    std::atomic<uint64_t> epoch{0};
    std::atomic<bool> claimed{false};
  };

  // For EpochReadLock only (on the global domain). Inline: with the calls they were most of the
  // cost of a short read section.
  static inline void Enter();
  static inline void Exit();

 private:
  // The calling thread's reader state. Plain data with a constant initializer, so the inline
  // paths reach it with one thread-pointer-relative access (no TLS init guard or wrapper call).
  struct ThreadReader {
    Slot* slot;           // null until claimed, and when there was none (overflow)
    EpochDomain* domain;  // Global(), once a slot is claimed
    int depth;            // nesting of read sections
    bool overflow;        // no slot was free: this thread uses overflow_readers_
  };
  static inline thread_local ThreadReader tls_reader_ = {nullptr, nullptr, 0, false};

  EpochDomain();
  // Enter of a thread without a slot: claims one, or counts it in overflow_readers_.
  void EnterWithoutSlot();
  Slot* ClaimSlot();
  void ReleaseSlot(Slot* slot);
  friend struct ThreadSlotReleaser;

  std::atomic<uint64_t> global_epoch_{1};
  std::atomic<int> slots_in_use_high_water_{0};
  // Readers without a slot of their own (more than kMaxSlots threads).
  std::atomic<uint64_t> overflow_readers_{0};
  bool use_membarrier_ = false;
  Slot slots_[kMaxSlots];
};

inline void EpochDomain::Enter() {
  ThreadReader& reader = tls_reader_;
  if (reader.depth++ > 0) return;
  if (ABSL_PREDICT_FALSE(reader.slot == nullptr)) {
    Global().EnterWithoutSlot();
    return;
  }
  const EpochDomain& domain = *reader.domain;
  const uint64_t epoch = domain.global_epoch_.load(std::memory_order_acquire);
  if (ABSL_PREDICT_TRUE(domain.use_membarrier_)) {
    // The writer's membarrier() orders this store before our subsequent loads.
    reader.slot->epoch.store(epoch, std::memory_order_relaxed);
    std::atomic_signal_fence(std::memory_order_seq_cst);
  } else {
    // Without membarrier the reader pays a full barrier: a locked exchange.
    reader.slot->epoch.exchange(epoch, std::memory_order_seq_cst);
  }
}

inline void EpochDomain::Exit() {
  ThreadReader& reader = tls_reader_;
  if (--reader.depth > 0) return;
  if (ABSL_PREDICT_FALSE(reader.slot == nullptr)) {
    Global().overflow_readers_.fetch_sub(1, std::memory_order_release);
    return;
  }
  // Release: every load inside the section happens before a writer sees the slot idle.
  reader.slot->epoch.store(0, std::memory_order_release);
}

// RAII read section on the global domain; nestable.
class EpochReadLock {
 public:
  EpochReadLock() { EpochDomain::Enter(); }
  ~EpochReadLock() { EpochDomain::Exit(); }
  EpochReadLock(const EpochReadLock&) = delete;
  EpochReadLock& operator=(const EpochReadLock&) = delete;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_REGISTRY_EPOCH_H_
