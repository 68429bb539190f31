#include "agent/node/vfio_container_dma.h"

#include <map>
#include <utility>
#include <vector>

#include "absl/base/optimization.h"
#include "absl/strings/str_format.h"
#include "common/errno_status.h"
#include "common/mutex.h"

namespace dmapin::agent {
namespace {

class VfioContainerDma final : public ContainerDma {
 public:
  VfioContainerDma(Registry& registry, ContainerId id, const ContainerOptions& options,
                   std::unique_ptr<VfioContainerDriver> driver,
                   std::atomic<uint64_t>* kernel_inconsistencies,
                   const AddressTranslator* translator, bool awaiting_adoption)
      : ContainerDma(registry, id, options),
        driver_(std::move(driver)),
        kernel_inconsistencies_(kernel_inconsistencies),
        translator_(translator),
        awaiting_(awaiting_adoption),
        handed_off_(awaiting_adoption) {}

  absl::Status Register(ContextId context, uint64_t ua, uint64_t size) override {
    if (awaiting_adoption()) return AwaitingAdoption("register");
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
    if (awaiting_adoption()) return AwaitingAdoption("unregister");
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
    if (ABSL_PREDICT_FALSE(awaiting_adoption())) {
      *cleared_bytes = 0;
      *replaced = false;
      return AwaitingAdoption("map");
    }
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
    if (ABSL_PREDICT_FALSE(awaiting_adoption())) return AwaitingAdoption("unmap");
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

  absl::Status ReplayRegistration(ContextId context, uint64_t ua, uint64_t size,
                                  uint64_t device_iova) override {
    if (absl::Status status = registry_.Register(id_, context, ua, size); !status.ok()) {
      return status;
    }
    if (awaiting_adoption()) {
      bound_context_.store(context, std::memory_order_relaxed);
      MutexLock lock(&mu_);
      expected_registrations_.push_back({.ua = ua, .size = size, .device_iova = device_iova});
      return absl::OkStatus();
    }
    return KernelRegister(context, ua, size, device_iova);
  }

  absl::Status ReplayMapping(uint64_t iova, uint64_t ua, uint64_t size) override {
    // The registry first, as in Map: it checks the range is still registered.
    if (absl::Status status = registry_.Map(id_, iova, ua, size); !status.ok()) return status;
    if (awaiting_adoption()) {
      MutexLock lock(&mu_);
      expected_mappings_.push_back({.iova = iova, .ua = ua, .size = size});
      return absl::OkStatus();
    }
    return KernelMap(iova, ua, size);
  }

  uint64_t DeviceIova(uint64_t ua, uint64_t size) const override {
    MutexLock lock(&mu_);
    auto it = device_iovas_.find({ua, size});
    return it == device_iovas_.end() ? 0 : it->second;
  }

  absl::StatusOr<std::vector<VfioFd>> OpenDevices(absl::Span<const std::string> devices) override {
    if (awaiting_adoption()) return AwaitingAdoption("open devices");
    std::vector<VfioFd> fds;
    absl::StatusOr<int> container = driver_->DupContainer();
    if (!container.ok()) return container.status();
    fds.emplace_back(driver_->kernel(), *container);
    for (const std::string& name : devices) {
      absl::StatusOr<int> device = driver_->OpenDevice(name);
      if (!device.ok()) return device.status();  // `fds` close what was opened
      fds.emplace_back(driver_->kernel(), *device);
    }
    return fds;
  }

  void MarkHandedOff() override { handed_off_.store(true, std::memory_order_release); }
  bool handed_off() const override { return handed_off_.load(std::memory_order_acquire); }
  bool awaiting_adoption() const override { return awaiting_.load(std::memory_order_acquire); }

  absl::StatusOr<AdoptionReport> Adopt(int container_fd) override {
    if (!awaiting_adoption()) {
      driver_->kernel()->Close(container_fd);
      return ErrnoStatus(EBUSY, "the container is not waiting to be taken back: it is served");
    }
    if (absl::Status status = driver_->Adopt(container_fd); !status.ok()) return status;
    absl::StatusOr<VfioDmaWindow> window = driver_->DmaWindow();
    if (!window.ok() || window->start != options_.window_start ||
        window->size != options_.window_size ||
        window->iommu_page_size != options_.iommu_page_size) {
      driver_->Close().IgnoreError();
      return ErrnoStatus(
          EINVAL,
          absl::StrFormat("the received container's DMA window is not the one recorded "
                          "[0x%x, +0x%x) with 0x%x pages: not this container",
                          options_.window_start, options_.window_size, options_.iommu_page_size));
    }
    MutexLock lock(&mu_);
    AdoptionReport report;
    const ContextId context = bound_context_.load(std::memory_order_relaxed);
    for (const ExpectedRegistration& reg : expected_registrations_) {
      std::vector<GuestPiece> pieces;
      if (absl::Status status = Pieces(context, reg.ua, reg.size, &pieces); !status.ok()) {
        report.Inconsistent(absl::StrFormat("registration ua=0x%x size=0x%x: %s", reg.ua, reg.size,
                                            status.ToString()));
        continue;
      }
      uint64_t offset = 0;
      for (const GuestPiece& piece : pieces) {
        const uint64_t at = reg.device_iova == 0 ? 0 : reg.device_iova + offset;
        offset += piece.size;
        absl::Status adopted =
            at == 0 ? ErrnoStatus(ENOENT, "no pin IOVA recorded (a store older than schema 4)")
                    : driver_->AdoptRegistration(piece.agent_ua, piece.size, at);
        if (adopted.ok()) {
          ++report.registrations;
          continue;
        }
        // Not in the kernel as recorded: pin it again (counted either way).
        report.Inconsistent(absl::StrFormat("registration ua=0x%x size=0x%x at pin iova 0x%x: %s",
                                            reg.ua, reg.size, at, adopted.ToString()));
        if (!driver_->RegisterMemoryAt(piece.agent_ua, piece.size, at).ok()) Inconsistent();
      }
      device_iovas_[{reg.ua, reg.size}] = reg.device_iova;
    }
    for (const DmaMapping& mapping : expected_mappings_) {
      std::vector<GuestPiece> pieces;
      if (absl::Status status = Pieces(context, mapping.ua, mapping.size, &pieces); !status.ok()) {
        report.Inconsistent(absl::StrFormat("mapping iova=0x%x size=0x%x: %s", mapping.iova,
                                            mapping.size, status.ToString()));
        continue;
      }
      uint64_t done = 0;
      for (const GuestPiece& piece : pieces) {
        const uint64_t iova = mapping.iova + done;
        done += piece.size;
        absl::Status adopted = driver_->AdoptMapping(iova, piece.agent_ua, piece.size);
        if (adopted.ok()) {
          ++report.mappings;
          continue;
        }
        // E.g. an unmap the old process had made in the kernel but not recorded when it died
        // (never acknowledged): the recorded mapping is made again.
        report.Inconsistent(absl::StrFormat("mapping iova=0x%x size=0x%x: %s", iova, piece.size,
                                            adopted.ToString()));
        if (!driver_->MapDma(iova, piece.agent_ua, piece.size).ok()) Inconsistent();
      }
    }
    expected_registrations_.clear();
    expected_mappings_.clear();
    awaiting_.store(false, std::memory_order_release);
    return report;
  }

  absl::Status PrepareForExit() override {
    if (!handed_off() || awaiting_adoption()) return absl::OkStatus();
    return driver_->InvalidateAddresses();
  }

  void CloseDevice() override {
    // The VMM's descriptors keep the container: take everything out of it ourselves.
    if (handed_off() && !driver_->ClearAll().ok()) Inconsistent();
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

  // All pieces of one registration go together in the device's IOVA space (type1's pin range),
  // from `device_iova` on (0: wherever there is room), so that the hold's one IOVA says where.
  absl::Status KernelRegister(ContextId context, uint64_t ua, uint64_t size,
                              uint64_t device_iova = 0) {
    bound_context_.store(context, std::memory_order_relaxed);
    std::vector<GuestPiece> pieces;
    if (absl::Status status = Pieces(context, ua, size, &pieces); !status.ok()) return status;
    if (device_iova == 0) {
      absl::StatusOr<uint64_t> free = driver_->FreeDeviceIova(size);
      if (!free.ok()) return free.status();
      device_iova = *free;
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < pieces.size(); ++i) {
      const uint64_t at = device_iova == 0 ? 0 : device_iova + offset;
      if (absl::Status status = driver_->RegisterMemoryAt(pieces[i].agent_ua, pieces[i].size, at);
          !status.ok()) {
        for (size_t j = 0; j < i; ++j) {
          if (!driver_->UnregisterMemory(pieces[j].agent_ua, pieces[j].size).ok()) Inconsistent();
        }
        return status;
      }
      offset += pieces[i].size;
    }
    MutexLock lock(&mu_);
    device_iovas_[{ua, size}] = device_iova;
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
    if (first.ok()) {
      MutexLock lock(&mu_);
      device_iovas_.erase({ua, size});
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
  // Recovered from a handed-off container until Adopt takes it back; then served again.
  std::atomic<bool> awaiting_;
  std::atomic<bool> handed_off_;

  struct ExpectedRegistration {
    uint64_t ua = 0;
    uint64_t size = 0;
    uint64_t device_iova = 0;
  };
  mutable Mutex mu_;
  // (ua, size) of each registration -> where it lives in the device's IOVA space.
  std::map<std::pair<uint64_t, uint64_t>, uint64_t> device_iovas_ ABSL_GUARDED_BY(mu_);
  // What the recovery replayed while awaiting adoption: what the kernel should have.
  std::vector<ExpectedRegistration> expected_registrations_ ABSL_GUARDED_BY(mu_);
  std::vector<DmaMapping> expected_mappings_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<ContainerDma>> NewVfioContainerDma(
    Registry& registry, ContainerId id, const ContainerOptions& options,
    std::unique_ptr<VfioContainerDriver> driver, std::atomic<uint64_t>* kernel_inconsistencies,
    const AddressTranslator* translator) {
  if (absl::Status status = registry.CreateContainer(id, options); !status.ok()) return status;
  return std::make_unique<VfioContainerDma>(registry, id, options, std::move(driver),
                                            kernel_inconsistencies, translator,
                                            /*awaiting_adoption=*/false);
}

absl::StatusOr<std::unique_ptr<ContainerDma>> NewAdoptableVfioContainerDma(
    Registry& registry, ContainerId id, const ContainerOptions& options,
    std::unique_ptr<VfioContainerDriver> closed_driver,
    std::atomic<uint64_t>* kernel_inconsistencies, const AddressTranslator* translator) {
  if (absl::Status status = registry.CreateContainer(id, options); !status.ok()) return status;
  return std::make_unique<VfioContainerDma>(registry, id, options, std::move(closed_driver),
                                            kernel_inconsistencies, translator,
                                            /*awaiting_adoption=*/true);
}

}  // namespace dmapin::agent
