// GuestAddressBackend: the registry works in each VMM's own addresses; the memory behind them is
// the agent's shared mapping of the VMM's memory (GuestMemory). This PinBackend translates a
// context's addresses to the agent's before the backend it wraps pins them, and translates for
// the VFIO calls that take a process address (AddressTranslator). A context with no GuestMemory
// (simulated VMM memory the agent allocated itself, or the sim backend) uses its addresses as
// they are.
#ifndef DMAPIN_AGENT_NODE_GUEST_ADDRESS_BACKEND_H_
#define DMAPIN_AGENT_NODE_GUEST_ADDRESS_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "agent/node/guest_memory.h"
#include "agent/registry/pin_backend.h"
#include "common/mutex.h"

namespace dmapin::agent {

// The agent's address of a context's memory, for calls that hand addresses to the kernel.
class AddressTranslator {
 public:
  virtual ~AddressTranslator() = default;
  // The pieces of [ua, ua + size) of `context` in the agent, split where the agent's mapping is
  // not contiguous (one piece, the same addresses, for a context without GuestMemory). EFAULT
  // for a byte no slot covers.
  virtual absl::Status ToAgent(ContextId context, uint64_t ua, uint64_t size,
                               std::vector<GuestPiece>* pieces) const = 0;
};

class GuestAddressBackend final : public PinBackend, public AddressTranslator {
 public:
  // `inner` must outlive this backend.
  explicit GuestAddressBackend(PinBackend* inner) : inner_(inner) {}

  // From now on `context`'s addresses go through `memory` (nullptr: as they are again). Set a
  // context's memory before anything of it is pinned and clear it after everything is unpinned.
  void SetMemory(ContextId context, std::shared_ptr<const GuestMemory> memory);

  absl::Status ToAgent(ContextId context, uint64_t ua, uint64_t size,
                       std::vector<GuestPiece>* pieces) const override;

  uint64_t page_size() const override { return inner_->page_size(); }
  std::string name() const override { return inner_->name(); }
  absl::Status PinPages(ContextId context, uint64_t ua, absl::Span<uint64_t> hpas, uint64_t* pinned,
                        uint32_t* backing_page_shift) override;
  void UnpinPages(ContextId context, uint64_t ua, absl::Span<const uint64_t> hpas) override;
  absl::StatusOr<uint64_t> PinCount(ContextId context, uint64_t page_ua) const override;
  absl::StatusOr<uint64_t> TotalPinnedPages() const override { return inner_->TotalPinnedPages(); }

 private:
  std::shared_ptr<const GuestMemory> MemoryOf(ContextId context) const;

  PinBackend* const inner_;
  mutable Mutex mu_;
  absl::flat_hash_map<ContextId, std::shared_ptr<const GuestMemory>> memory_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_NODE_GUEST_ADDRESS_BACKEND_H_
