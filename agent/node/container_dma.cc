#include "agent/node/container_dma.h"

#include <unistd.h>

#include <cerrno>
#include <utility>

#include "absl/base/optimization.h"
#include "absl/strings/str_format.h"
#include "common/errno_status.h"

namespace dmapin::agent {

absl::Status ContainerDma::Release() {
  if (awaiting_adoption()) return AwaitingAdoption("release");
  if (absl::Status status = registry_.ReleaseContainer(id_); !status.ok()) return status;
  CloseDevice();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<VfioFd>> ContainerDma::OpenDevices(
    absl::Span<const std::string> devices) {
  return ErrnoStatus(ENODEV, "the container has no devices: the node's backend is not VFIO");
}

absl::StatusOr<AdoptionReport> ContainerDma::Adopt(int container_fd) {
  ::close(container_fd);
  return ErrnoStatus(EINVAL,
                     "the container is not waiting to be taken back (the node's backend "
                     "is not VFIO)");
}

absl::Status ContainerDma::AwaitingAdoption(absl::string_view what) const {
  return ErrnoStatus(EAGAIN, absl::StrFormat("%s: the container waits for its VMM to give its "
                                             "descriptor back after the agent restarted "
                                             "(AdoptContainer on the memory socket)",
                                             what));
}

namespace {

// The sim and memlock backends: the registry is the IOMMU, so every change is one registry call
// and an unmap has nothing to take from a device first.
class RegistryContainerDma final : public ContainerDma {
 public:
  RegistryContainerDma(Registry& registry, ContainerId id, const ContainerOptions& options)
      : ContainerDma(registry, id, options) {}

  absl::Status Register(ContextId context, uint64_t ua, uint64_t size) override {
    return registry_.Register(id_, context, ua, size);
  }
  absl::Status Unregister(ContextId context, uint64_t ua, uint64_t size) override {
    return registry_.Unregister(id_, ua, size);
  }

  absl::Status Map(uint64_t iova, uint64_t ua, uint64_t size, uint64_t* cleared_bytes,
                   bool* replaced) override {
    uint64_t cleared_pages = 0;
    absl::Status status = registry_.Map(id_, iova, ua, size, &cleared_pages, replaced);
    *cleared_bytes = status.ok() ? 0 : cleared_pages * options_.iommu_page_size;
    return status;
  }
  absl::Status UnmapDevice(uint64_t iova, uint64_t size) override {
    // Only the inline check here; the registry says which one failed.
    if (ABSL_PREDICT_FALSE(!DmaRangeOk(options_, iova, size, /*ua=*/0))) {
      return registry_.CheckUnmap(id_, iova, size);
    }
    return absl::OkStatus();
  }

  bool UndoMap(uint64_t iova, uint64_t size, bool replaced,
               AcknowledgedMappings acknowledged) override {
    bool undone = registry_.Unmap(id_, iova, size).ok();
    if (replaced) {
      absl::StatusOr<std::vector<DmaMapping>> rows = acknowledged();
      if (!rows.ok()) return false;
      for (const DmaMapping& row : *rows) {
        if (!registry_.Map(id_, row.iova, row.ua, row.size).ok()) undone = false;
      }
    }
    return undone;
  }
  bool UndoUnmapDevice(uint64_t iova, uint64_t size, AcknowledgedMappings acknowledged) override {
    return true;  // UnmapDevice changed nothing
  }

  absl::Status ReplayRegistration(ContextId context, uint64_t ua, uint64_t size,
                                  uint64_t device_iova) override {
    return registry_.Register(id_, context, ua, size);
  }
  absl::Status ReplayMapping(uint64_t iova, uint64_t ua, uint64_t size) override {
    return registry_.Map(id_, iova, ua, size);
  }

  void CloseDevice() override {}
};

}  // namespace

absl::StatusOr<std::unique_ptr<ContainerDma>> NewRegistryContainerDma(
    Registry& registry, ContainerId id, const ContainerOptions& options) {
  if (absl::Status status = registry.CreateContainer(id, options); !status.ok()) return status;
  return std::make_unique<RegistryContainerDma>(registry, id, options);
}

}  // namespace dmapin::agent
