// FaultInjectingBackend: wraps another PinBackend and fails pins on demand, so tests can drive
// every rollback path of the registry (spec §2.6) deterministically.
#ifndef DMAPIN_AGENT_REGISTRY_FAULT_INJECTING_BACKEND_H_
#define DMAPIN_AGENT_REGISTRY_FAULT_INJECTING_BACKEND_H_

#include <cstdint>
#include <optional>
#include <string>

#include "agent/registry/pin_backend.h"
#include "common/mutex.h"

namespace dmapin::agent {

class FaultInjectingBackend final : public PinBackend {
 public:
  // `base` must outlive this object.
  explicit FaultInjectingBackend(PinBackend* base) : base_(base) {}

  // The n-th page pinned from now on (1-based, counted across calls) fails with `err`.
  void FailNthPagePin(uint64_t n, int err);
  // Every pin of the page at `page_ua` fails with `err` until ClearFaults().
  void FailPageAt(uint64_t page_ua, int err);
  void ClearFaults();

  uint64_t pages_pinned() const;
  uint64_t injected_failures() const;

  uint64_t page_size() const override { return base_->page_size(); }
  std::string name() const override { return "fault-injecting(" + base_->name() + ")"; }
  absl::Status PinPages(ContextId context, uint64_t ua, absl::Span<uint64_t> hpas, uint64_t* pinned,
                        uint32_t* backing_page_shift) override;
  void UnpinPages(ContextId context, uint64_t ua, absl::Span<const uint64_t> hpas) override;
  absl::StatusOr<uint64_t> PinCount(ContextId context, uint64_t page_ua) const override;
  absl::StatusOr<uint64_t> TotalPinnedPages() const override;

 private:
  // The index of the first page in [ua, ua + pages) that must fail, and its errno.
  std::optional<std::pair<uint64_t, int>> FirstFault(uint64_t ua, uint64_t pages)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  PinBackend* const base_;
  mutable Mutex mu_;
  uint64_t pages_pinned_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t fail_at_count_ ABSL_GUARDED_BY(mu_) = 0;  // 0 = off
  int fail_at_count_errno_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<uint64_t> fail_page_ua_ ABSL_GUARDED_BY(mu_);
  int fail_page_errno_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t injected_failures_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_REGISTRY_FAULT_INJECTING_BACKEND_H_
