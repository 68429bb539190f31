#include "agent/registry/sim_backend.h"

#include <cerrno>

#include "absl/numeric/bits.h"
#include "absl/strings/str_format.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

// A bijection on the low `bits` bits: odd multipliers and xor-shifts are invertible mod 2^bits.
uint64_t Permute(uint64_t x, uint32_t bits) {
  const uint64_t mask = bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
  x &= mask;
  x = (x * 0x9E3779B97F4A7C15ull) & mask;
  x ^= x >> (bits / 2);
  x = (x * 0xBF58476D1CE4E5B9ull) & mask;
  x ^= x >> (bits / 3 + 1);
  return x & mask;
}

absl::Status CheckRanges(const std::vector<SimRange>& ranges, uint64_t page_size,
                         const char* what) {
  for (const SimRange& range : ranges) {
    if (range.size == 0 || range.ua % page_size != 0 || range.size % page_size != 0 ||
        range.ua + range.size < range.ua) {
      return ErrnoStatus(EINVAL, absl::StrFormat("%s range ua=0x%x size=0x%x is not page aligned",
                                                 what, range.ua, range.size));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<SimBackend>> SimBackend::Create(SimBackendOptions options) {
  if (options.page_size < 4096 || !absl::has_single_bit(options.page_size)) {
    return ErrnoStatus(
        EINVAL, absl::StrFormat("page size %u is not a power of two >= 4096", options.page_size));
  }
  absl::Status status = CheckRanges(options.holes, options.page_size, "hole");
  if (status.ok()) status = CheckRanges(options.readonly, options.page_size, "read-only");
  if (!status.ok()) return status;
  for (const SimHugeRange& huge : options.huge) {
    if (huge.page_size < options.page_size || !absl::has_single_bit(huge.page_size) ||
        huge.size == 0 || huge.ua % huge.page_size != 0 || huge.size % huge.page_size != 0) {
      return ErrnoStatus(EINVAL, absl::StrFormat("huge range ua=0x%x size=0x%x page=0x%x is "
                                                 "not aligned to its huge page size",
                                                 huge.ua, huge.size, huge.page_size));
    }
  }
  return std::unique_ptr<SimBackend>(new SimBackend(std::move(options)));
}

SimBackend::SimBackend(SimBackendOptions options)
    : options_(std::move(options)),
      page_shift_(static_cast<uint32_t>(absl::countr_zero(options_.page_size))) {}

bool SimBackend::InRanges(const std::vector<SimRange>& ranges, uint64_t page_ua) {
  for (const SimRange& range : ranges) {
    if (page_ua - range.ua < range.size) return true;
  }
  return false;
}

const SimHugeRange* SimBackend::HugeRangeOf(uint64_t page_ua) const {
  for (const SimHugeRange& huge : options_.huge) {
    if (page_ua - huge.ua < huge.size) return &huge;
  }
  return nullptr;
}

uint64_t SimBackend::FakeHpa(ContextId context, uint64_t page_ua) const {
  const uint32_t frame_bits = 64 - page_shift_;
  const SimHugeRange* huge = HugeRangeOf(page_ua);
  if (huge != nullptr) {
    // Frames of one huge page are contiguous, as in real hugetlbfs memory.
    const uint32_t huge_shift = static_cast<uint32_t>(absl::countr_zero(huge->page_size));
    const uint64_t huge_frame =
        Permute((page_ua >> huge_shift) ^ (context * 0x632BE59BD9B4E019ull), 64 - huge_shift);
    return (huge_frame << huge_shift) | (page_ua & (huge->page_size - 1));
  }
  const uint64_t frame =
      Permute((page_ua >> page_shift_) ^ (context * 0x632BE59BD9B4E019ull), frame_bits);
  return frame << page_shift_;
}

absl::Status SimBackend::PinPages(ContextId context, uint64_t ua, absl::Span<uint64_t> hpas,
                                  uint64_t* pinned, uint32_t* backing_page_shift) {
  *pinned = 0;
  uint32_t shift = 63;
  absl::Status status;
  size_t good = 0;
  for (; good < hpas.size(); ++good) {
    const uint64_t page_ua = ua + (good << page_shift_);
    if (InRanges(options_.holes, page_ua)) {
      status =
          ErrnoStatus(EFAULT, absl::StrFormat("page 0x%x is not mapped (simulated hole)", page_ua));
      break;
    }
    if (InRanges(options_.readonly, page_ua)) {
      status = ErrnoStatus(EFAULT, absl::StrFormat("page 0x%x is read-only (simulated)", page_ua));
      break;
    }
    const SimHugeRange* huge = HugeRangeOf(page_ua);
    const uint32_t page_backing_shift =
        huge != nullptr ? static_cast<uint32_t>(absl::countr_zero(huge->page_size)) : page_shift_;
    if (page_backing_shift < shift) shift = page_backing_shift;
    hpas[good] = FakeHpa(context, page_ua);
  }
  // The leading pages that could be pinned are, as a real backend leaves them on a failure.
  if (options_.track_pins && good > 0) {
    MutexLock lock(&mu_);
    pins_[context].Increment(ua >> page_shift_, good);
    total_pinned_ += good;
  }
  *pinned = good;
  if (!status.ok()) return status;
  *backing_page_shift = hpas.empty() ? page_shift_ : shift;
  return absl::OkStatus();
}

void SimBackend::UnpinPages(ContextId context, uint64_t ua, absl::Span<const uint64_t> hpas) {
  if (!options_.track_pins || hpas.empty()) return;
  MutexLock lock(&mu_);
  auto it = pins_.find(context);
  if (it == pins_.end()) return;  // The checker reports the imbalance via PinCount.
  total_pinned_ -= it->second.Decrement(ua >> page_shift_, hpas.size());
  if (it->second.empty()) pins_.erase(it);
}

absl::StatusOr<uint64_t> SimBackend::PinCount(ContextId context, uint64_t page_ua) const {
  if (!options_.track_pins) return absl::UnimplementedError("pin tracking is off");
  MutexLock lock(&mu_);
  auto it = pins_.find(context);
  return it == pins_.end() ? 0 : it->second.Count(page_ua >> page_shift_);
}

absl::StatusOr<uint64_t> SimBackend::TotalPinnedPages() const {
  if (!options_.track_pins) return absl::UnimplementedError("pin tracking is off");
  MutexLock lock(&mu_);
  return total_pinned_;
}

}  // namespace dmapin::agent
