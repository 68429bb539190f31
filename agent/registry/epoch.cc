#include "agent/registry/epoch.h"

#include <linux/membarrier.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>

#include "absl/base/internal/raw_logging.h"

namespace dmapin {
namespace {

bool RegisterMembarrier() {
#if defined(__SANITIZE_THREAD__)
  // TSan does not model membarrier; use plain fences so it sees the real ordering.
  return false;
#else
  if (std::getenv("DMAPIN_EPOCH_NO_MEMBARRIER") != nullptr) return false;
  long supported = syscall(__NR_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
  if (supported < 0 || (supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) return false;
  return syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
#endif
}

}  // namespace

// Per-thread state: the claimed slot and the nesting depth. Releasing the slot at thread exit
// lets another thread reuse it.
struct ThreadSlotHolder {
  EpochDomain::Slot* slot = nullptr;
  int depth = 0;
  bool overflow = false;
  ~ThreadSlotHolder() {
    if (slot != nullptr) EpochDomain::Global().ReleaseSlot(slot);
  }
};

namespace {
thread_local ThreadSlotHolder tls_holder;
}  // namespace

EpochDomain::EpochDomain() : use_membarrier_(RegisterMembarrier()) {}

EpochDomain& EpochDomain::Global() {
  static EpochDomain* domain = new EpochDomain();
  return *domain;
}

bool EpochDomain::InReadSection() { return tls_holder.depth > 0; }

EpochDomain::Slot* EpochDomain::ClaimSlot() {
  for (int i = 0; i < kMaxSlots; ++i) {
    bool expected = false;
    if (!slots_[i].claimed.load(std::memory_order_relaxed) &&
        slots_[i].claimed.compare_exchange_strong(expected, true, std::memory_order_acq_rel)) {
      int high = slots_in_use_high_water_.load(std::memory_order_relaxed);
      while (high < i + 1 && !slots_in_use_high_water_.compare_exchange_weak(
                                 high, i + 1, std::memory_order_acq_rel)) {
      }
      return &slots_[i];
    }
  }
  return nullptr;
}

void EpochDomain::ReleaseSlot(Slot* slot) {
  slot->epoch.store(0, std::memory_order_release);
  slot->claimed.store(false, std::memory_order_release);
}

void EpochDomain::Enter() {
  ThreadSlotHolder& holder = tls_holder;
  if (holder.depth++ > 0) return;
  if (holder.slot == nullptr && !holder.overflow) {
    holder.slot = ClaimSlot();
    holder.overflow = holder.slot == nullptr;
  }
  if (holder.slot == nullptr) {
    // Rare: more live reader threads than slots. A shared counter is slower but still correct.
    overflow_readers_.fetch_add(1, std::memory_order_seq_cst);
    return;
  }
  const uint64_t epoch = global_epoch_.load(std::memory_order_acquire);
  if (use_membarrier_) {
    // The writer's membarrier() orders this store before our subsequent loads.
    holder.slot->epoch.store(epoch, std::memory_order_relaxed);
    std::atomic_signal_fence(std::memory_order_seq_cst);
  } else {
    // Without membarrier the reader pays a full barrier: a locked exchange.
    holder.slot->epoch.exchange(epoch, std::memory_order_seq_cst);
  }
}

void EpochDomain::Exit() {
  ThreadSlotHolder& holder = tls_holder;
  if (--holder.depth > 0) return;
  if (holder.slot == nullptr) {
    overflow_readers_.fetch_sub(1, std::memory_order_release);
    return;
  }
  // Release: every load inside the section happens before a writer sees the slot idle.
  holder.slot->epoch.store(0, std::memory_order_release);
}

void EpochDomain::Synchronize() {
  ABSL_RAW_CHECK(!InReadSection(), "EpochDomain::Synchronize called inside a read section");
  // Readers entering from now on see the epoch after `retired` and anything published before.
  // (A seq_cst read-modify-write: the full barrier of the fallback path.)
  const uint64_t retired = global_epoch_.fetch_add(1, std::memory_order_seq_cst);
  if (use_membarrier_) syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
  const int slots = slots_in_use_high_water_.load(std::memory_order_acquire);
  for (int i = 0; i < slots; ++i) {
    int spins = 0;
    for (;;) {
      const uint64_t epoch = slots_[i].epoch.load(std::memory_order_seq_cst);
      if (epoch == 0 || epoch > retired) break;
      if (++spins > 64) sched_yield();
    }
  }
  int spins = 0;
  while (overflow_readers_.load(std::memory_order_acquire) != 0) {
    if (++spins > 64) sched_yield();
  }
}

}  // namespace dmapin
