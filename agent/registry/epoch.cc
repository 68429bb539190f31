#include "agent/registry/epoch.h"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>

#include "common/raw_check.h"

namespace dmapin::agent {
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

// One round of a grace-period wait. A reader that is still in an old section either is about to
// leave it (the first spins catch that) or was preempted inside it, and then only gets a CPU back
// if the writer gives its own up: sleeping does that, where sched_yield spun a whole core on a
// machine with more busy threads than CPUs.
void WaitForReader(int* spins) {
  if (++*spins <= 64) return;
  timespec pause{0, 20'000};
  nanosleep(&pause, nullptr);
}

}  // namespace

// Releases the thread's slot at thread exit so another thread can reuse it. Touched only when a
// slot is claimed, which registers its destructor.
struct ThreadSlotReleaser {
  bool armed = false;
  ~ThreadSlotReleaser() {
    EpochDomain::ThreadReader& reader = EpochDomain::tls_reader_;
    if (reader.slot == nullptr) return;
    EpochDomain::Global().ReleaseSlot(reader.slot);
    // A read section later in this thread's exit counts as overflow rather than reclaiming.
    reader.slot = nullptr;
    reader.overflow = true;
  }
};

namespace {
thread_local ThreadSlotReleaser tls_releaser;
}  // namespace

EpochDomain::EpochDomain() : use_membarrier_(RegisterMembarrier()) {}

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

void EpochDomain::EnterWithoutSlot() {
  ThreadReader& reader = tls_reader_;
  if (!reader.overflow) {
    reader.slot = ClaimSlot();
    reader.overflow = reader.slot == nullptr;
    if (reader.slot != nullptr) {
      reader.domain = this;
      tls_releaser.armed = true;
      // Now the ordinary entry (depth is already counted).
      --reader.depth;
      Enter();
      return;
    }
  }
  // Rare: more live reader threads than slots. A shared counter is slower but still correct.
  overflow_readers_.fetch_add(1, std::memory_order_seq_cst);
}

void EpochDomain::Synchronize() {
  DMAPIN_RAW_CHECK(!InReadSection(), "EpochDomain::Synchronize called inside a read section");
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
      WaitForReader(&spins);
    }
  }
  int spins = 0;
  while (overflow_readers_.load(std::memory_order_acquire) != 0) WaitForReader(&spins);
}

}  // namespace dmapin::agent
