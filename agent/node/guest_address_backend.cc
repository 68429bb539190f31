#include "agent/node/guest_address_backend.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"
#include "common/errno_status.h"

namespace dmapin::agent {

void GuestAddressBackend::SetMemory(ContextId context, std::shared_ptr<const GuestMemory> memory) {
  MutexLock lock(&mu_);
  if (memory == nullptr) {
    memory_.erase(context);
  } else {
    memory_[context] = std::move(memory);
  }
}

std::shared_ptr<const GuestMemory> GuestAddressBackend::MemoryOf(ContextId context) const {
  MutexLock lock(&mu_);
  auto it = memory_.find(context);
  return it == memory_.end() ? nullptr : it->second;
}

absl::Status GuestAddressBackend::ToAgent(ContextId context, uint64_t ua, uint64_t size,
                                          std::vector<GuestPiece>* pieces) const {
  std::shared_ptr<const GuestMemory> memory = MemoryOf(context);
  if (memory == nullptr) {
    pieces->assign(1, GuestPiece{.ua = ua, .agent_ua = ua, .size = size});
    return absl::OkStatus();
  }
  return memory->Resolve(ua, size, pieces);
}

absl::Status GuestAddressBackend::PinPages(ContextId context, uint64_t ua,
                                           absl::Span<uint64_t> hpas, uint64_t* pinned,
                                           uint32_t* backing_page_shift) {
  std::shared_ptr<const GuestMemory> memory = MemoryOf(context);
  if (memory == nullptr) return inner_->PinPages(context, ua, hpas, pinned, backing_page_shift);
  *pinned = 0;
  const uint64_t page = inner_->page_size();
  if (hpas.empty()) return inner_->PinPages(context, ua, hpas, pinned, backing_page_shift);
  std::vector<GuestPiece> pieces;
  if (absl::Status status = memory->Resolve(ua, hpas.size() * page, &pieces); !status.ok()) {
    // Pin what lies before the first hole, as the kernel would, so that the caller's EFAULT
    // names the right page: here nothing is pinned and the error names the hole.
    return status;
  }
  uint32_t smallest_shift = 63;
  for (const GuestPiece& piece : pieces) {
    const uint64_t pages = piece.size / page;
    uint64_t done = 0;
    uint32_t shift = 0;
    absl::Status status =
        inner_->PinPages(context, piece.agent_ua, hpas.subspan(*pinned, pages), &done, &shift);
    *pinned += done;
    if (!status.ok()) {
      return AppendToMessage(status, absl::StrFormat(" (VMM address 0x%x, the agent's 0x%x)",
                                                     piece.ua, piece.agent_ua));
    }
    smallest_shift = std::min(smallest_shift, shift);
  }
  *backing_page_shift = smallest_shift;
  return absl::OkStatus();
}

void GuestAddressBackend::UnpinPages(ContextId context, uint64_t ua,
                                     absl::Span<const uint64_t> hpas) {
  std::shared_ptr<const GuestMemory> memory = MemoryOf(context);
  if (memory == nullptr || hpas.empty()) {
    inner_->UnpinPages(context, ua, hpas);
    return;
  }
  const uint64_t page = inner_->page_size();
  std::vector<GuestPiece> pieces;
  // Slots stay mapped while anything of them is pinned, so what was pinned resolves.
  if (!memory->Resolve(ua, hpas.size() * page, &pieces).ok()) return;
  uint64_t offset = 0;
  for (const GuestPiece& piece : pieces) {
    const uint64_t pages = piece.size / page;
    inner_->UnpinPages(context, piece.agent_ua, hpas.subspan(offset, pages));
    offset += pages;
  }
}

absl::StatusOr<uint64_t> GuestAddressBackend::PinCount(ContextId context, uint64_t page_ua) const {
  std::vector<GuestPiece> pieces;
  if (absl::Status status = ToAgent(context, page_ua, inner_->page_size(), &pieces); !status.ok()) {
    return status;
  }
  return inner_->PinCount(context, pieces.front().agent_ua);
}

}  // namespace dmapin::agent
