#include "agent/registry/fault_injecting_backend.h"

#include "absl/strings/str_format.h"
#include "common/errno_status.h"

namespace dmapin::agent {

void FaultInjectingBackend::FailNthPagePin(uint64_t n, int err) {
  MutexLock lock(&mu_);
  fail_at_count_ = pages_pinned_ + n;
  fail_at_count_errno_ = err;
}

void FaultInjectingBackend::FailPageAt(uint64_t page_ua, int err) {
  MutexLock lock(&mu_);
  fail_page_ua_ = page_ua;
  fail_page_errno_ = err;
}

void FaultInjectingBackend::ClearFaults() {
  MutexLock lock(&mu_);
  fail_at_count_ = 0;
  fail_page_ua_.reset();
}

uint64_t FaultInjectingBackend::pages_pinned() const {
  MutexLock lock(&mu_);
  return pages_pinned_;
}

uint64_t FaultInjectingBackend::injected_failures() const {
  MutexLock lock(&mu_);
  return injected_failures_;
}

std::optional<std::pair<uint64_t, int>> FaultInjectingBackend::FirstFault(uint64_t ua,
                                                                          uint64_t pages) {
  std::optional<std::pair<uint64_t, int>> fault;
  if (fail_at_count_ != 0 && fail_at_count_ > pages_pinned_ &&
      fail_at_count_ - pages_pinned_ <= pages) {
    fault = {{fail_at_count_ - pages_pinned_ - 1, fail_at_count_errno_}};
  }
  if (fail_page_ua_.has_value()) {
    const uint64_t offset = *fail_page_ua_ - ua;
    const uint64_t index = offset / base_->page_size();
    if (offset % base_->page_size() == 0 && index < pages &&
        (!fault.has_value() || index < fault->first)) {
      fault = {{index, fail_page_errno_}};
    }
  }
  return fault;
}

absl::Status FaultInjectingBackend::PinPages(ContextId context, uint64_t ua,
                                             absl::Span<uint64_t> hpas, uint64_t* pinned,
                                             uint32_t* backing_page_shift) {
  std::optional<std::pair<uint64_t, int>> fault;
  {
    MutexLock lock(&mu_);
    fault = FirstFault(ua, hpas.size());
  }
  if (!fault.has_value()) {
    absl::Status status = base_->PinPages(context, ua, hpas, pinned, backing_page_shift);
    MutexLock lock(&mu_);
    pages_pinned_ += *pinned;
    return status;
  }
  // Pin the pages before the fault for real, so the caller's rollback has real work to undo.
  const uint64_t good = fault->first;
  absl::Status status =
      base_->PinPages(context, ua, hpas.subspan(0, good), pinned, backing_page_shift);
  MutexLock lock(&mu_);
  pages_pinned_ += *pinned;
  if (!status.ok()) return status;
  ++injected_failures_;
  if (fail_at_count_ != 0 && fail_at_count_ == pages_pinned_ + 1) fail_at_count_ = 0;
  return ErrnoStatus(fault->second, absl::StrFormat("injected failure pinning page 0x%x",
                                                    ua + good * base_->page_size()));
}

void FaultInjectingBackend::UnpinPages(ContextId context, uint64_t ua,
                                       absl::Span<const uint64_t> hpas) {
  base_->UnpinPages(context, ua, hpas);
}

absl::StatusOr<uint64_t> FaultInjectingBackend::PinCount(ContextId context,
                                                         uint64_t page_ua) const {
  return base_->PinCount(context, page_ua);
}

absl::StatusOr<uint64_t> FaultInjectingBackend::TotalPinnedPages() const {
  return base_->TotalPinnedPages();
}

}  // namespace dmapin::agent
