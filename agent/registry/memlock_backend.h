// MemlockBackend: real pinning of memory in the agent's own address space, without VFIO
// (spec §11, "Without VFIO"): MADV_POPULATE_WRITE faults every page in for write, mlock keeps it
// resident, and /proc/self/pagemap reports its physical frame.
//
// Limits of this approach, compared with the kernel's pin_user_pages(FOLL_LONGTERM):
//  - mlock keeps pages resident but does not forbid migration: with
//    /proc/sys/vm/compact_unevictable_allowed = 1 (the default) compaction may move a locked page
//    and the recorded frame goes stale. Good enough for tests, benchmarks and demos; real DMA
//    goes through a VFIO backend.
//  - Frame numbers are visible only with CAP_SYS_ADMIN; Create() fails with EPERM without it.
//  - All contexts share this process' address space, so pins are counted per page and a page is
//    munlocked only when its last pin goes. An mlock taken outside this backend on the same pages
//    is dropped by that munlock (mlock does not nest).
//  - mlock on hugetlb mappings succeeds but is not accounted in VmLck (hugetlb pages are never
//    swapped anyway).
#ifndef DMAPIN_AGENT_REGISTRY_MEMLOCK_BACKEND_H_
#define DMAPIN_AGENT_REGISTRY_MEMLOCK_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "agent/registry/pin_backend.h"
#include "agent/registry/pin_runs.h"
#include "common/mutex.h"

namespace dmapin::agent {

// Reads physical addresses of this process' pages from /proc/self/pagemap. The file is opened
// once; reads are pread()s, so one reader may be shared by threads.
class PagemapReader {
 public:
  static absl::StatusOr<PagemapReader> Open();

  PagemapReader(PagemapReader&& other) noexcept;
  PagemapReader& operator=(PagemapReader&& other) noexcept;
  PagemapReader(const PagemapReader&) = delete;
  PagemapReader& operator=(const PagemapReader&) = delete;
  ~PagemapReader();

  uint64_t page_size() const { return page_size_; }

  // The host physical address of the page at `page_ua` (page aligned). EFAULT if the page is not
  // present (never touched, or swapped out); EPERM if the kernel hides frame numbers (no
  // CAP_SYS_ADMIN).
  absl::StatusOr<uint64_t> Hpa(uint64_t page_ua) const;

  // Fills `hpas` with the addresses of the pages [ua, ua + hpas.size() * PS) using one pread.
  // Errors as for Hpa(), naming the first page that failed.
  absl::Status ReadHpas(uint64_t ua, absl::Span<uint64_t> hpas) const;

 private:
  PagemapReader(int fd, uint64_t page_size) : fd_(fd), page_size_(page_size) {}

  int fd_ = -1;
  uint64_t page_size_ = 0;
};

// A memory mapping the agent creates for a memory context (tests, benchmarks, the demo).
// Movable; unmapped (and its file closed) on destruction.
class BackedMemory {
 public:
  // Each factory maps at `at` when it is non-zero (EEXIST if anything is mapped there), so a
  // restarted agent can put a context's memory back at the addresses its registrations name.

  // Private anonymous memory. `size` must be a positive multiple of PS.
  static absl::StatusOr<BackedMemory> Anonymous(uint64_t size, uint64_t at = 0);
  // Shared memory from memfd_create(name); fd() lets a VMM map the same pages.
  static absl::StatusOr<BackedMemory> Memfd(absl::string_view name, uint64_t size, uint64_t at = 0);
  // A shared mapping of an unlinked file in the hugetlbfs mount `dir`. `size` must be a multiple
  // of the mount's huge page size. ENOENT if `dir` does not exist, EINVAL if it is not hugetlbfs,
  // ENOMEM if the pool has too few free huge pages.
  static absl::StatusOr<BackedMemory> HugetlbfsFile(absl::string_view dir, uint64_t size,
                                                    uint64_t at = 0);

  // The first hugetlbfs mount listed in /proc/self/mounts; ENOENT when there is none.
  static absl::StatusOr<std::string> FindHugetlbfsMount();

  BackedMemory(BackedMemory&& other) noexcept;
  BackedMemory& operator=(BackedMemory&& other) noexcept;
  BackedMemory(const BackedMemory&) = delete;
  BackedMemory& operator=(const BackedMemory&) = delete;
  ~BackedMemory();

  uint64_t ua() const { return reinterpret_cast<uintptr_t>(addr_); }
  void* data() const { return addr_; }
  uint64_t size() const { return size_; }
  // The backing file (memfd or hugetlbfs), or -1 for anonymous memory. Owned by this object.
  int fd() const { return fd_; }
  // The page size backing the mapping (PS, or the huge page size).
  uint64_t backing_page_size() const { return backing_page_size_; }

 private:
  BackedMemory(void* addr, uint64_t size, int fd, uint64_t backing_page_size)
      : addr_(addr), size_(size), fd_(fd), backing_page_size_(backing_page_size) {}
  void Reset();

  void* addr_ = nullptr;
  uint64_t size_ = 0;
  int fd_ = -1;
  uint64_t backing_page_size_ = 0;
};

// VmLck of this process (bytes locked by mlock), from /proc/self/status.
absl::StatusOr<uint64_t> ReadVmLckBytes();

class MemlockBackend final : public PinBackend {
 public:
  // Opens /proc/self/pagemap and checks that frame numbers are visible: EPERM when they read as
  // zero (not root / no CAP_SYS_ADMIN), EINVAL when the kernel lacks MADV_POPULATE_WRITE (< 5.14).
  static absl::StatusOr<std::unique_ptr<MemlockBackend>> Create();

  // Munlocks whatever is still pinned (a registry unpins everything before this).
  ~MemlockBackend() override;

  uint64_t page_size() const override { return page_size_; }
  std::string name() const override { return "memlock"; }
  absl::Status PinPages(ContextId context, uint64_t ua, absl::Span<uint64_t> hpas, uint64_t* pinned,
                        uint32_t* backing_page_shift) override;
  void UnpinPages(ContextId context, uint64_t ua, absl::Span<const uint64_t> hpas) override;
  // Pins of this page by `context` (several contexts may pin the same address).
  absl::StatusOr<uint64_t> PinCount(ContextId context, uint64_t page_ua) const override;
  // Pins held through this backend, summed over contexts.
  absl::StatusOr<uint64_t> TotalPinnedPages() const override;

  // Distinct pages currently mlocked by this backend (a page pinned by two contexts counts once).
  uint64_t LockedPages() const;

 private:
  MemlockBackend(PagemapReader pagemap, uint64_t page_size);

  // The index of the first page of [ua, ua + pages * PS) that MADV_POPULATE_WRITE rejects.
  uint64_t FirstUnpopulatablePage(uint64_t ua, uint64_t pages) const;
  // log2 of the smallest KernelPageSize of the VMAs covering [ua, ua + size), from smaps.
  absl::StatusOr<uint32_t> BackingPageShift(uint64_t ua, uint64_t size) const;
  // mlock + count `pages` pages at `ua` for `context`.
  absl::Status LockPages(ContextId context, uint64_t ua, uint64_t pages);
  // Uncount and munlock (where the last pin went) `pages` pages at `ua` of `context`.
  void UnlockPages(ContextId context, uint64_t ua, uint64_t pages);
  // munlock the runs of pages in [ua, ua + pages * PS) whose lock count is zero.
  void MunlockUnlockedRuns(uint64_t ua, uint64_t pages) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const PagemapReader pagemap_;
  const uint64_t page_size_;
  const uint32_t page_shift_;

  // Held across mlock/munlock so a page's count and its lock state change together: otherwise an
  // unpin's munlock could race with another pin's mlock and leave a counted page unlocked.
  mutable Mutex mu_;
  // Pins per page of each context with pinned pages, for PinCount and the invariant checker; in
  // runs of pages, so the bookkeeping of a registration does not grow with its size.
  absl::flat_hash_map<ContextId, PinRuns> pins_ ABSL_GUARDED_BY(mu_);
  // Pins per page over all contexts; a page is mlocked while it has one.
  PinRuns lock_counts_ ABSL_GUARDED_BY(mu_);
  uint64_t total_pins_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_REGISTRY_MEMLOCK_BACKEND_H_
