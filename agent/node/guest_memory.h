// GuestMemory: the memory of one VMM that the agent maps itself, so that the registry can work in
// the VMM's addresses. A VMM shares its guest RAM as memory objects (memfd, hugetlbfs or
// tmpfs/shm files); each slot says which bytes of which object back [ua, ua + size) of the VMM.
// The agent maps each slot MAP_SHARED (the same physical pages as the VMM's) and translates the
// VMM's addresses to its own wherever it touches the memory (pinning, VFIO calls).
//
// Shared by the registry's pinning path and the DMA path: Attach and Resolve may run at once.
#ifndef DMAPIN_AGENT_NODE_GUEST_MEMORY_H_
#define DMAPIN_AGENT_NODE_GUEST_MEMORY_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/mutex.h"
#include "common/unique_fd.h"

namespace dmapin::agent {

// A slot as a VMM (or the agent, from the VMM's /proc) describes it. `fd` is borrowed: Attach maps
// it and keeps no descriptor.
struct SlotSource {
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t offset = 0;
  int fd = -1;
};

// A slot the agent mapped.
struct GuestSlot {
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t offset = 0;
  uint64_t agent_ua = 0;  // where the agent mapped [ua, ua + size)
  // The memory object, to recognise it again (a restart re-opens it through the owner's /proc).
  uint64_t dev = 0;
  uint64_t ino = 0;
  std::string object;  // e.g. "memfd:guest-ram dev 0:1 ino 1042", for status and logs
};

// A stretch of a VMM range inside one slot, at the agent's address.
struct GuestPiece {
  uint64_t ua = 0;  // the VMM's address
  uint64_t agent_ua = 0;
  uint64_t size = 0;
};

class GuestMemory {
 public:
  // `page_size`: slots' ua, size and offset must be multiples of it (the node's page size).
  explicit GuestMemory(uint64_t page_size) : page_size_(page_size) {}
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;
  ~GuestMemory();  // unmaps every slot

  // Maps every source and adds it, all or none. Errors name the slot by index (with its ua and
  // size) and errno:
  //  EINVAL: size 0, not page multiples, ua + size or offset + size wraps (an end of 2^64 counts),
  //    slots overlapping each other or a slot already attached, a descriptor that is not a
  //    regular file (socket, pipe, directory, device), more than kMaxSlots in all;
  //  EBADF: not an open descriptor; EFAULT... never (that is Resolve's);
  //  EACCES (not open read-write), EPERM (e.g. a write-sealed memfd), ENOMEM...: mmap's errno;
  //  ENXIO: [offset, offset + size) reaches past the end of the object.
  // Nothing of a failed call stays mapped. The mmaps run outside mu_; overlap is checked again
  // under it, so of two concurrent overlapping calls one fails.
  absl::Status Attach(absl::Span<const SlotSource> sources);

  // The pieces of [ua, ua + size) in the agent, in ascending order, split at slot boundaries.
  // EFAULT (OUT_OF_RANGE, as translate's) naming the first byte no slot covers (spec §2.6); EINVAL
  // for size 0 or a range that wraps. `pieces` is cleared first and left empty on an error; a
  // success allocates only when `pieces` lacks the capacity.
  absl::Status Resolve(uint64_t ua, uint64_t size, std::vector<GuestPiece>* pieces) const;

  // Unmaps and removes the slot that starts at `ua` (ENOENT if none does). Only for memory
  // nothing pins: the caller undoing an attach it could not make durable.
  absl::Status Detach(uint64_t ua);

  std::vector<GuestSlot> slots() const;
  uint64_t bytes() const;  // the sum of the slots' sizes

  static constexpr size_t kMaxSlots = 512;

 private:
  const uint64_t page_size_;
  mutable Mutex mu_;
  std::vector<GuestSlot> slots_ ABSL_GUARDED_BY(mu_);  // sorted by ua, disjoint
};

// A slot's memory object opened from another process's mappings (the fd-less path).
struct ProcessSlot {
  SlotSource source;  // source.fd is fd.get()
  UniqueFd fd;
};

// Opens, for each [ua, ua + size) of process `pid`, the shared file mapping that covers it
// through /proc/<pid>/maps and /proc/<pid>/map_files (needs CAP_SYS_ADMIN, as the agent has),
// with the file offset of `ua` in it. Errors name the range:
//  EFAULT: no mapping of the process covers the whole range (or two mappings of different
//    objects or non-contiguous offsets do; adjacent mappings of one object at contiguous offsets,
//    a mapping split by mprotect or madvise, are one range, opened through the first);
//  EINVAL: the mapping is private (MAP_PRIVATE, e.g. anonymous memory: it cannot be shared);
//  EINVAL also for a range of size 0 or that wraps;
//  ESRCH: no such process; EACCES/EPERM from the kernel as they come.
// /proc/<pid>/maps is read line by line through a fixed buffer. Nothing stays open on an error.
absl::StatusOr<std::vector<ProcessSlot>> OpenProcessSlots(
    pid_t pid, absl::Span<const std::pair<uint64_t, uint64_t>> ranges);

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_NODE_GUEST_MEMORY_H_
