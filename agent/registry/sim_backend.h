// SimBackend: a simulated node's memory. Nothing is really pinned.
//
// Pages get deterministic fake physical frames (a bijection of the context and page number, so
// distinct pages never share a frame); configured holes and read-only ranges cannot be pinned for
// write (EFAULT), and configured huge-page ranges report their page size and contiguous frames.
// It counts pins per page so the invariant checker can prove nothing is pinned twice or leaked, in
// runs of pages (PinRuns), so what a registration costs here does not grow with its size.
#ifndef DMAPIN_AGENT_REGISTRY_SIM_BACKEND_H_
#define DMAPIN_AGENT_REGISTRY_SIM_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "agent/registry/pin_backend.h"
#include "agent/registry/pin_runs.h"
#include "common/mutex.h"

namespace dmapin::agent {

struct SimRange {
  uint64_t ua = 0;
  uint64_t size = 0;
};

struct SimHugeRange {
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t page_size = 0;  // e.g. 16 MiB or 2 MiB; ua and size must be multiples of it
};

struct SimBackendOptions {
  uint64_t page_size = 65536;
  std::vector<SimRange> holes;     // not mapped: pinning fails with EFAULT
  std::vector<SimRange> readonly;  // mapped read-only: pinning for write fails with EFAULT
  std::vector<SimHugeRange> huge;  // backed by huge pages
  // Per-page pin counting (for the invariant checker). Benchmarks may turn it off.
  bool track_pins = true;
};

class SimBackend final : public PinBackend {
 public:
  // page_size must be a power of two >= 4096; Create checks the options.
  static absl::StatusOr<std::unique_ptr<SimBackend>> Create(SimBackendOptions options);

  uint64_t page_size() const override { return options_.page_size; }
  std::string name() const override { return "sim"; }
  absl::Status PinPages(ContextId context, uint64_t ua, absl::Span<uint64_t> hpas, uint64_t* pinned,
                        uint32_t* backing_page_shift) override;
  void UnpinPages(ContextId context, uint64_t ua, absl::Span<const uint64_t> hpas) override;
  absl::StatusOr<uint64_t> PinCount(ContextId context, uint64_t page_ua) const override;
  absl::StatusOr<uint64_t> TotalPinnedPages() const override;

  // The frame the simulation assigns to a page (what PinPages reports).
  uint64_t FakeHpa(ContextId context, uint64_t page_ua) const;

 private:
  explicit SimBackend(SimBackendOptions options);
  static bool InRanges(const std::vector<SimRange>& ranges, uint64_t page_ua);
  const SimHugeRange* HugeRangeOf(uint64_t page_ua) const;

  const SimBackendOptions options_;
  const uint32_t page_shift_;

  mutable Mutex mu_;
  // Pins per page of each context with pinned pages.
  absl::flat_hash_map<ContextId, PinRuns> pins_ ABSL_GUARDED_BY(mu_);
  uint64_t total_pinned_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_REGISTRY_SIM_BACKEND_H_
