#include "agent/node/vfio_container_dma.h"

#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

class VfioContainerDma final : public ContainerDma {
 public:
  VfioContainerDma(Registry& registry, ContainerId id, const ContainerOptions& options,
                   std::unique_ptr<VfioContainerDriver> driver,
                   std::atomic<uint64_t>* kernel_inconsistencies,
                   const AddressTranslator* translator)
      : ContainerDma(registry, id, options),
        driver_(std::move(driver)),
        kernel_inconsistencies_(kernel_inconsistencies),
        translator_(translator) {}

  absl::Status Register(ContextId context, uint64_t ua, uint64_t size) override {
    // Only a request the registry would take reaches the kernel, e.g. not a region over the
    // node's limits.
    if (absl::Status status = registry_.CheckRegister(id_, context, ua, size); !status.ok()) {
      return status;
    }
    if (absl::Status status = KernelRegister(context, ua, size); !status.ok()) return status;
    if (absl::Status status = registry_.Register(id_, context, ua, size); !status.ok()) {
      if (!KernelUnregister(context, ua, size).ok()) Inconsistent();
      return status;
    }
    return absl::OkStatus();
  }

  absl::Status Unregister(ContextId context, uint64_t ua, uint64_t size) override {
    if (absl::Status status = registry_.Unregister(id_, ua, size); !status.ok()) return status;
    if (absl::Status status = KernelUnregister(context, ua, size); !status.ok()) {
      // Give the container its hold back, so registry and kernel still agree.
      if (!registry_.Register(id_, context, ua, size).ok()) Inconsistent();
      return status;
    }
    return absl::OkStatus();
  }

  absl::Status Map(uint64_t iova, uint64_t ua, uint64_t size, uint64_t* cleared_bytes,
                   bool* replaced) override {
    uint64_t cleared_pages = 0;
    absl::Status status = registry_.Map(id_, iova, ua, size, &cleared_pages, replaced);
    if (!status.ok()) {
      *cleared_bytes = cleared_pages * options_.iommu_page_size;
      // What the registry cleared goes from the kernel too.
      if (*cleared_bytes > 0 && !driver_->UnmapDma(iova, *cleared_bytes).ok()) Inconsistent();
      return status;
    }
    *cleared_bytes = 0;
    if (absl::Status kernel = KernelMap(iova, ua, size); !kernel.ok()) {
      // The registry's entries of the range go too, as after any failed map (spec §7.5).
      if (!registry_.Unmap(id_, iova, size).ok()) Inconsistent();
      *cleared_bytes = size;
      return kernel;
    }
    return absl::OkStatus();
  }

  absl::Status UnmapDevice(uint64_t iova, uint64_t size) override {
    if (absl::Status status = registry_.CheckUnmap(id_, iova, size); !status.ok()) return status;
    return driver_->UnmapDma(iova, size);
  }

  bool UndoMap(uint64_t iova, uint64_t size, bool replaced,
               AcknowledgedMappings acknowledged) override {
    bool undone = driver_->UnmapDma(iova, size).ok();
    if (!registry_.Unmap(id_, iova, size).ok()) undone = false;
    if (replaced) {
      absl::StatusOr<std::vector<DmaMapping>> rows = acknowledged();
      if (!rows.ok()) return false;
      for (const DmaMapping& row : *rows) {
        if (!ReplayMapping(row.iova, row.ua, row.size).ok()) undone = false;
      }
    }
    return undone;
  }

  bool UndoUnmapDevice(uint64_t iova, uint64_t size, AcknowledgedMappings acknowledged) override {
    absl::StatusOr<std::vector<DmaMapping>> rows = acknowledged();
    if (!rows.ok()) return false;
    bool undone = true;
    for (const DmaMapping& row : *rows) {
      if (!KernelMap(row.iova, row.ua, row.size).ok()) undone = false;
    }
    return undone;
  }

  absl::Status ReplayRegistration(ContextId context, uint64_t ua, uint64_t size) override {
    if (absl::Status status = registry_.Register(id_, context, ua, size); !status.ok()) {
      return status;
    }
    return KernelRegister(context, ua, size);
  }

  absl::Status ReplayMapping(uint64_t iova, uint64_t ua, uint64_t size) override {
    // The registry first, as in Map: it checks the range is still registered.
    if (absl::Status status = registry_.Map(id_, iova, ua, size); !status.ok()) return status;
    return KernelMap(iova, ua, size);
  }

  void CloseDevice() override {
    if (!driver_->Close().ok()) Inconsistent();
  }

 private:
  void Inconsistent() { kernel_inconsistencies_->fetch_add(1, std::memory_order_relaxed); }

  // The kernel takes the agent's addresses: a VMM's range may be several pieces of the agent's
  // mapping (one per memory slot), each its own call; a failure undoes the pieces before it.
  absl::Status Pieces(ContextId context, uint64_t ua, uint64_t size,
                      std::vector<GuestPiece>* pieces) const {
    if (translator_ == nullptr) {
      pieces->assign(1, GuestPiece{.ua = ua, .agent_ua = ua, .size = size});
      return absl::OkStatus();
    }
    return translator_->ToAgent(context, ua, size, pieces);
  }

  absl::Status KernelRegister(ContextId context, uint64_t ua, uint64_t size) {
    bound_context_.store(context, std::memory_order_relaxed);
    std::vector<GuestPiece> pieces;
    if (absl::Status status = Pieces(context, ua, size, &pieces); !status.ok()) return status;
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (absl::Status status = driver_->RegisterMemory(pieces[i].agent_ua, pieces[i].size);
          !status.ok()) {
        for (size_t j = 0; j < i; ++j) {
          if (!driver_->UnregisterMemory(pieces[j].agent_ua, pieces[j].size).ok()) Inconsistent();
        }
        return status;
      }
    }
    return absl::OkStatus();
  }

  absl::Status KernelUnregister(ContextId context, uint64_t ua, uint64_t size) {
    std::vector<GuestPiece> pieces;
    if (absl::Status status = Pieces(context, ua, size, &pieces); !status.ok()) return status;
    absl::Status first;
    for (const GuestPiece& piece : pieces) {
      absl::Status status = driver_->UnregisterMemory(piece.agent_ua, piece.size);
      if (!status.ok() && first.ok()) first = status;
    }
    return first;
  }

  // Mappings need a registered range, so the container is bound by the time one comes.
  absl::Status KernelMap(uint64_t iova, uint64_t ua, uint64_t size) {
    std::vector<GuestPiece> pieces;
    if (absl::Status status =
            Pieces(bound_context_.load(std::memory_order_relaxed), ua, size, &pieces);
        !status.ok()) {
      return status;
    }
    uint64_t done = 0;
    for (const GuestPiece& piece : pieces) {
      if (absl::Status status = driver_->MapDma(iova + done, piece.agent_ua, piece.size);
          !status.ok()) {
        if (done > 0 && !driver_->UnmapDma(iova, done).ok()) Inconsistent();
        return status;
      }
      done += piece.size;
    }
    return absl::OkStatus();
  }

  // Constant after construction (the driver serializes its own ioctls).
  const std::unique_ptr<VfioContainerDriver> driver_;
  std::atomic<uint64_t>* const kernel_inconsistencies_;
  const AddressTranslator* const translator_;  // null: addresses are the agent's
  // The context of the container's registrations (set by the first; a container binds to one).
  std::atomic<ContextId> bound_context_{0};
};

}  // namespace

absl::StatusOr<std::unique_ptr<ContainerDma>> NewVfioContainerDma(
    Registry& registry, ContainerId id, const ContainerOptions& options,
    std::unique_ptr<VfioContainerDriver> driver, std::atomic<uint64_t>* kernel_inconsistencies,
    const AddressTranslator* translator) {
  if (absl::Status status = registry.CreateContainer(id, options); !status.ok()) return status;
  return std::make_unique<VfioContainerDma>(registry, id, options, std::move(driver),
                                            kernel_inconsistencies, translator);
}

}  // namespace dmapin::agent
