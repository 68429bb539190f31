// Memory the agent maps itself for a memory context (memlock backend): the seam lets the core
// stay free of mmap details and lets tests count allocations.
#ifndef DMAPIN_AGENT_NODE_CONTEXT_MEMORY_H_
#define DMAPIN_AGENT_NODE_CONTEXT_MEMORY_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dmapin::agent {

// The memory behind a context, with the values of dmapin.v1.MemoryBacking (this layer has no
// proto dependency; the gRPC layer converts and checks the values agree). Like the proto's open
// enum it may hold a value it does not name: CreateContext refuses those (IsMemoryBacking).
enum class MemoryBacking : int {
  kUnspecified = 0,  // the backend's default (anonymous memory)
  kAnonymous = 1,
  kMemfd = 2,
  kHugetlbfs = 3,
};

// Whether `backing` is one of the values above.
inline bool IsMemoryBacking(MemoryBacking backing) {
  return static_cast<int>(backing) >= static_cast<int>(MemoryBacking::kUnspecified) &&
         static_cast<int>(backing) <= static_cast<int>(MemoryBacking::kHugetlbfs);
}

class ContextMemory {
 public:
  virtual ~ContextMemory() = default;  // unmaps
  virtual uint64_t ua() const = 0;
  virtual uint64_t size() const = 0;
};

class ContextMemoryProvider {
 public:
  virtual ~ContextMemoryProvider() = default;
  // Maps `size` bytes of `backing` memory for `context`, at `at` when non-zero (a restart puts
  // memory back where registrations expect it; EEXIST if taken).
  virtual absl::StatusOr<std::unique_ptr<ContextMemory>> Allocate(absl::string_view context,
                                                                  MemoryBacking backing,
                                                                  uint64_t size, uint64_t at) = 0;
};

// BackedMemory-based provider: anonymous (default), memfd, or a file in a hugetlbfs mount.
std::unique_ptr<ContextMemoryProvider> NewBackedMemoryProvider(std::string hugetlbfs_dir);

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_NODE_CONTEXT_MEMORY_H_
