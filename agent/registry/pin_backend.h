// The seam between the registry and the memory it pins (in the spirit of LevelDB's Env).
//
// The registry decides *what* to pin and keeps the counters; a PinBackend does the pinning and
// reports physical addresses. Implementations: SimBackend (no real memory, for tests and the demo),
// MemlockBackend (real mlock + /proc/self/pagemap), FaultInjectingBackend (wraps another to fail on
// demand), and later the VFIO backends of the node agent.
#ifndef DMAPIN_AGENT_REGISTRY_PIN_BACKEND_H_
#define DMAPIN_AGENT_REGISTRY_PIN_BACKEND_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace dmapin::agent {

// Identifies a memory context (one address space whose memory is pinned; spec §1).
using ContextId = uint64_t;
// Identifies a VFIO container (spec §1).
using ContainerId = uint64_t;

class PinBackend {
 public:
  virtual ~PinBackend() = default;

  // The kernel base page size PS of the node, a power of two.
  virtual uint64_t page_size() const = 0;

  // A short name for logs and status ("sim", "memlock", ...).
  virtual std::string name() const = 0;

  // Pins the pages [ua, ua + hpas.size() * PS) of `context` for write, in ascending order, and
  // stores each page's host physical address (page aligned) in `hpas`.
  //
  // On success sets *pinned = hpas.size() and *backing_page_shift to log2 of the smallest page
  // size backing the range (PS for normal memory, larger for huge pages; spec §8).
  // On failure returns an errno status (EFAULT naming the page for a hole or read-only page) and
  // sets *pinned to the number of leading pages that are pinned; the caller unpins exactly those.
  virtual absl::Status PinPages(ContextId context, uint64_t ua, absl::Span<uint64_t> hpas,
                                uint64_t* pinned, uint32_t* backing_page_shift) = 0;

  // Unpins pages pinned by PinPages; `hpas` are the addresses PinPages reported.
  virtual void UnpinPages(ContextId context, uint64_t ua, absl::Span<const uint64_t> hpas) = 0;

  // How many times the page at `page_ua` of `context` is pinned through this backend, for the
  // invariant checker (spec §10.4). Backends that cannot tell return UNIMPLEMENTED.
  virtual absl::StatusOr<uint64_t> PinCount(ContextId context, uint64_t page_ua) const = 0;

  // Total pages pinned through this backend, or UNIMPLEMENTED.
  virtual absl::StatusOr<uint64_t> TotalPinnedPages() const = 0;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_REGISTRY_PIN_BACKEND_H_
