// The VFIO ContainerDma against the scripted fake kernel, for both drivers: every change reaches
// the registry and the kernel in the spec's order (checked by a kernel that notes what the
// registry held at each of its calls), and each failure is rolled back where it must be.
#include "agent/node/vfio_container_dma.h"

#include <linux/vfio.h>

#include <atomic>
#include <cerrno>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "agent/node/container_dma.h"
#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
#include "agent/vfio/fake_vfio_kernel.h"
#include "agent/vfio/vfio_container.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

constexpr uint64_t k4K = 0x1000;
constexpr uint64_t k64K = 0x10000;
constexpr uint64_t k1M = 0x100000;
constexpr uint64_t kBase = 0x10000000;
constexpr ContextId kContext = 1;
constexpr ContainerId kContainer = 2;
constexpr uint64_t kPinRange = uint64_t{1} << 32;  // type1's pin range lies above (fake kernel)

// A DMA ioctl as the kernel received it, with what the registry held at that moment.
struct KernelCall {
  unsigned long request = 0;  // NOLINT(runtime/int)
  uint64_t iova = 0;          // MAP_DMA / UNMAP_DMA
  size_t registry_regions = 0;
  uint64_t registry_entries = 0;
};

// Forwards to the fake kernel, noting the registry's state at every DMA ioctl.
class NotingKernel final : public VfioKernel {
 public:
  NotingKernel(FakeVfioKernel* kernel, const Registry* registry)
      : kernel_(kernel), registry_(registry) {}
  int Open(const char* path, int flags) override { return kernel_->Open(path, flags); }
  int Close(int fd) override { return kernel_->Close(fd); }
  int Dup(int fd) override { return kernel_->Dup(fd); }
  int Ioctl(int fd, unsigned long request, void* arg) override {  // NOLINT(runtime/int)
    if (request == VFIO_IOMMU_MAP_DMA || request == VFIO_IOMMU_UNMAP_DMA ||
        request == VFIO_IOMMU_SPAPR_REGISTER_MEMORY ||
        request == VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY) {
      KernelCall call{.request = request};
      if (request == VFIO_IOMMU_MAP_DMA)
        call.iova = static_cast<vfio_iommu_type1_dma_map*>(arg)->iova;
      if (request == VFIO_IOMMU_UNMAP_DMA) {
        call.iova = static_cast<vfio_iommu_type1_dma_unmap*>(arg)->iova;
      }
      call.registry_regions = registry_->ListRegions(kContext).size();
      absl::StatusOr<ContainerInfo> info = registry_->GetContainer(kContainer);
      call.registry_entries = info.ok() ? info->installed_entries : 0;
      calls.push_back(call);
    }
    return kernel_->Ioctl(fd, request, arg);
  }

  std::vector<KernelCall> calls;

 private:
  FakeVfioKernel* const kernel_;
  const Registry* const registry_;
};

class VfioContainerDmaTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override { Start({}); }
  void TearDown() override {
    absl::Status invariants = registry_->CheckInvariants();
    EXPECT_TRUE(invariants.ok()) << invariants;
  }

  void Start(SimBackendOptions sim_options) {
    dma_.reset();
    registry_.reset();
    sim_options.page_size = k64K;
    sim_ = *SimBackend::Create(sim_options);
    registry_ = std::make_unique<Registry>(sim_.get());
    kernel_ = std::make_unique<FakeVfioKernel>();
    noting_ = std::make_unique<NotingKernel>(kernel_.get(), registry_.get());
    ASSERT_TRUE(registry_->CreateContext(kContext, {}).ok());
    std::unique_ptr<VfioContainerDriver> driver = NewVfioContainerDriver(GetParam(), noting_.get());
    ASSERT_TRUE(driver->Open({"/dev/vfio/7"}).ok());
    absl::StatusOr<VfioDmaWindow> window = driver->DmaWindow();
    ASSERT_TRUE(window.ok()) << window.status();
    absl::StatusOr<std::unique_ptr<ContainerDma>> dma =
        NewVfioContainerDma(*registry_, kContainer,
                            {.iommu_page_size = window->iommu_page_size,
                             .window_start = window->start,
                             .window_size = window->size},
                            std::move(driver), &inconsistencies_);
    ASSERT_TRUE(dma.ok()) << dma.status();
    dma_ = std::move(*dma);
    noting_->calls.clear();
  }

  bool spapr() const { return std::string(GetParam()) == kVfioSpaprV2Backend; }
  unsigned long RegisterIoctl() const {  // NOLINT(runtime/int)
    return spapr() ? VFIO_IOMMU_SPAPR_REGISTER_MEMORY : VFIO_IOMMU_MAP_DMA;
  }
  unsigned long UnregisterIoctl() const {  // NOLINT(runtime/int)
    return spapr() ? VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY : VFIO_IOMMU_UNMAP_DMA;
  }
  // The kernel calls of guest mappings (type1's MAP_DMA / UNMAP_DMA below its pin range).
  std::vector<KernelCall> DmaCalls() const {
    std::vector<KernelCall> calls;
    for (const KernelCall& call : noting_->calls) {
      const bool dma = call.request == VFIO_IOMMU_MAP_DMA || call.request == VFIO_IOMMU_UNMAP_DMA;
      if (dma && (spapr() || call.iova < kPinRange)) calls.push_back(call);
    }
    return calls;
  }
  // The kernel's guest mappings, as iova -> ua of each 4 KiB IOMMU page.
  std::map<uint64_t, uint64_t> KernelPages() const {
    if (spapr()) return kernel_->SpaprTces();
    std::map<uint64_t, uint64_t> pages;
    for (const FakeType1Dma& dma : kernel_->Type1Dmas()) {
      if (dma.iova >= kPinRange) continue;
      for (uint64_t at = 0; at < dma.size; at += k4K) pages[dma.iova + at] = dma.vaddr + at;
    }
    return pages;
  }
  size_t KernelRegions() const {
    if (spapr()) return kernel_->SpaprRegions().size();
    size_t pins = 0;
    for (const FakeType1Dma& dma : kernel_->Type1Dmas()) pins += dma.iova >= kPinRange;
    return pins;
  }
  uint64_t Installed() const { return registry_->GetContainer(kContainer)->installed_entries; }
  size_t Regions() const { return registry_->ListRegions(kContext).size(); }
  absl::Status Map(uint64_t iova, uint64_t ua, uint64_t size, uint64_t* cleared = nullptr,
                   bool* replaced = nullptr) {
    uint64_t cleared_bytes = 0;
    bool replaced_entries = false;
    absl::Status status = dma_->Map(iova, ua, size, &cleared_bytes, &replaced_entries);
    if (cleared != nullptr) *cleared = cleared_bytes;
    if (replaced != nullptr) *replaced = replaced_entries;
    return status;
  }

  std::atomic<uint64_t> inconsistencies_{0};
  std::unique_ptr<SimBackend> sim_;
  std::unique_ptr<Registry> registry_;
  std::unique_ptr<FakeVfioKernel> kernel_;
  std::unique_ptr<NotingKernel> noting_;
  std::unique_ptr<ContainerDma> dma_;
};

// A register is checked by the registry, pinned by the kernel, then taken by the registry; one
// the registry refuses never reaches the kernel.
TEST_P(VfioContainerDmaTest, RegisterChecksInTheRegistryThenPinsInTheKernel) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  ASSERT_EQ(noting_->calls.size(), 1u);
  EXPECT_EQ(noting_->calls[0].request, RegisterIoctl());
  EXPECT_EQ(noting_->calls[0].registry_regions, 0u) << "the registry registered first";
  EXPECT_EQ(Regions(), 1u);
  EXPECT_EQ(KernelRegions(), 1u);

  noting_->calls.clear();
  EXPECT_EQ(ErrnoOf(dma_->Register(kContext, kBase, k1M)), EBUSY);
  EXPECT_EQ(ErrnoOf(dma_->Register(kContext, kBase + k64K, k1M)), EINVAL);
  EXPECT_TRUE(noting_->calls.empty());
  EXPECT_EQ(inconsistencies_.load(), 0u);
}

// The registry's pin fails after the kernel pinned (a hole): the kernel's registration is undone;
// an undo the kernel refuses is counted.
TEST_P(VfioContainerDmaTest, ARegistryFailureAfterTheKernelIsUndoneInTheKernel) {
  Start({.holes = {{kBase + 4 * k64K, k64K}}});
  EXPECT_EQ(ErrnoOf(dma_->Register(kContext, kBase, k1M)), EFAULT);
  ASSERT_EQ(noting_->calls.size(), 2u);
  EXPECT_EQ(noting_->calls[0].request, RegisterIoctl());
  EXPECT_EQ(noting_->calls[1].request, UnregisterIoctl());
  EXPECT_EQ(KernelRegions(), 0u);
  EXPECT_EQ(Regions(), 0u);
  EXPECT_EQ(inconsistencies_.load(), 0u);

  kernel_->InjectIoctlErrno(UnregisterIoctl(), 1, EIO);
  EXPECT_EQ(ErrnoOf(dma_->Register(kContext, kBase, k1M)), EFAULT);
  EXPECT_EQ(inconsistencies_.load(), 1u);
}

// An unregister goes to the registry first (the EBUSY of spec §3.4 is its answer); a kernel
// refusal gives the container its hold back.
TEST_P(VfioContainerDmaTest, UnregisterGoesToTheRegistryFirstAndAKernelRefusalRestoresTheHold) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  ASSERT_TRUE(Map(0, kBase, k4K).ok());
  noting_->calls.clear();
  EXPECT_EQ(ErrnoOf(dma_->Unregister(kContext, kBase, k1M)), EBUSY);
  EXPECT_TRUE(noting_->calls.empty());
  ASSERT_TRUE(dma_->UnmapDevice(0, k4K).ok());
  ASSERT_TRUE(dma_->UnmapRegistry(0, k4K).ok());

  noting_->calls.clear();
  kernel_->InjectIoctlErrno(UnregisterIoctl(), 1, EIO);
  EXPECT_EQ(ErrnoOf(dma_->Unregister(kContext, kBase, k1M)), EIO);
  ASSERT_EQ(noting_->calls.size(), 1u);
  EXPECT_EQ(noting_->calls[0].registry_regions, 0u) << "the registry unregistered first";
  EXPECT_EQ(Regions(), 1u) << "the hold is back";
  EXPECT_EQ(registry_->GetContainer(kContainer)->held_regions, 1u);
  EXPECT_EQ(KernelRegions(), 1u);
  EXPECT_EQ(inconsistencies_.load(), 0u);

  ASSERT_TRUE(dma_->Unregister(kContext, kBase, k1M).ok());
  EXPECT_EQ(Regions(), 0u);
  EXPECT_EQ(KernelRegions(), 0u);
}

// A map goes to the registry first (it checks the range is registered); a kernel refusal takes
// the registry's entries out again.
TEST_P(VfioContainerDmaTest, MapGoesToTheRegistryFirstAndAKernelRefusalClearsIt) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  noting_->calls.clear();
  ASSERT_TRUE(Map(0, kBase, 2 * k4K).ok());
  ASSERT_EQ(DmaCalls().size(), 1u);
  EXPECT_EQ(DmaCalls()[0].registry_entries, 2u) << "the kernel mapped before the registry";
  EXPECT_EQ(KernelPages().size(), 2u);

  noting_->calls.clear();
  EXPECT_EQ(ErrnoOf(Map(16 * k4K, kBase + k1M, k4K)), EINVAL) << "outside every region";
  EXPECT_TRUE(DmaCalls().empty());

  kernel_->InjectIoctlErrno(VFIO_IOMMU_MAP_DMA, 1, EFAULT);
  uint64_t cleared = 0;
  EXPECT_EQ(ErrnoOf(Map(8 * k4K, kBase, 2 * k4K, &cleared)), EFAULT);
  EXPECT_EQ(cleared, 2 * k4K);
  EXPECT_EQ(Installed(), 2u) << "the refused range's entries went again";
  EXPECT_EQ(KernelPages().size(), 2u);
  EXPECT_EQ(inconsistencies_.load(), 0u);
}

// A map the registry fails after clearing entries (spec §7.5) clears them in the kernel too.
TEST_P(VfioContainerDmaTest, AFailedRegistryMapClearsTheKernelToo) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  ASSERT_TRUE(Map(0, kBase, 4 * k4K).ok());
  uint64_t cleared = 0;
  bool replaced = false;
  EXPECT_EQ(ErrnoOf(Map(0, kBase + k1M - 2 * k4K, 4 * k4K, &cleared, &replaced)), EINVAL);
  EXPECT_EQ(cleared, 2 * k4K);
  EXPECT_TRUE(replaced);
  EXPECT_EQ(Installed(), 2u);
  const std::map<uint64_t, uint64_t> expected = {{2 * k4K, kBase + 2 * k4K},
                                                 {3 * k4K, kBase + 3 * k4K}};
  EXPECT_EQ(KernelPages(), expected);
  EXPECT_EQ(inconsistencies_.load(), 0u);
}

// An unmap takes the range from the kernel while the registry still has it, and only a range the
// registry would take.
TEST_P(VfioContainerDmaTest, UnmapDeviceUnmapsTheKernelFirstAndOnlyWhatTheRegistryTakes) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  ASSERT_TRUE(Map(0, kBase, 2 * k4K).ok());
  noting_->calls.clear();
  EXPECT_EQ(ErrnoOf(dma_->UnmapDevice(1, k4K)), EINVAL);
  EXPECT_EQ(ErrnoOf(dma_->UnmapDevice(0, k4K + 1)), EINVAL);
  EXPECT_TRUE(noting_->calls.empty());

  ASSERT_TRUE(dma_->UnmapDevice(0, 2 * k4K).ok());
  ASSERT_EQ(DmaCalls().size(), 1u);
  EXPECT_EQ(DmaCalls()[0].registry_entries, 2u);
  EXPECT_TRUE(KernelPages().empty());
  EXPECT_EQ(Installed(), 2u);
  ASSERT_TRUE(dma_->UnmapRegistry(0, 2 * k4K).ok());
  EXPECT_EQ(Installed(), 0u);
}

// Undoing a refused remap: the kernel's entries go first (the registry still has them when it
// unmaps), then the registry's, then the acknowledged mappings come back in both.
TEST_P(VfioContainerDmaTest, UndoMapUnmapsTheKernelFirstAndPutsBackTheAcknowledged) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  ASSERT_TRUE(Map(0, kBase, 2 * k4K).ok());
  const std::map<uint64_t, uint64_t> acknowledged_pages = KernelPages();
  bool replaced = false;
  ASSERT_TRUE(Map(0, kBase + k64K, 2 * k4K, nullptr, &replaced).ok());
  ASSERT_TRUE(replaced);
  noting_->calls.clear();
  int asked = 0;
  EXPECT_TRUE(dma_->UndoMap(0, 2 * k4K, replaced, [&] {
    ++asked;
    return absl::StatusOr<std::vector<DmaMapping>>(
        std::vector<DmaMapping>{{.iova = 0, .ua = kBase, .size = 2 * k4K}});
  }));
  EXPECT_EQ(asked, 1);
  const std::vector<KernelCall> calls = DmaCalls();
  ASSERT_GE(calls.size(), 2u);
  EXPECT_EQ(calls.front().request, VFIO_IOMMU_UNMAP_DMA);
  EXPECT_EQ(calls.front().registry_entries, 2u) << "the registry unmapped before the kernel";
  EXPECT_EQ(calls.back().request, VFIO_IOMMU_MAP_DMA);
  EXPECT_EQ(calls.back().registry_entries, 2u) << "the registry maps back first";
  EXPECT_EQ(KernelPages(), acknowledged_pages);
  EXPECT_EQ(Installed(), 2u);

  // A fresh map's undo needs nothing from the store.
  ASSERT_TRUE(Map(8 * k4K, kBase, k4K).ok());
  EXPECT_TRUE(dma_->UndoMap(8 * k4K, k4K, /*replaced=*/false, [&] {
    ++asked;
    return absl::StatusOr<std::vector<DmaMapping>>(std::vector<DmaMapping>{});
  }));
  EXPECT_EQ(asked, 1);
  EXPECT_EQ(KernelPages(), acknowledged_pages);
  EXPECT_EQ(Installed(), 2u);

  // A kernel that refuses the undo's unmap: reported, and the registry's entries still go.
  ASSERT_TRUE(Map(8 * k4K, kBase, k4K).ok());
  kernel_->InjectIoctlErrno(VFIO_IOMMU_UNMAP_DMA, 1, EIO);
  EXPECT_FALSE(dma_->UndoMap(8 * k4K, k4K, /*replaced=*/false, [&] {
    return absl::StatusOr<std::vector<DmaMapping>>(std::vector<DmaMapping>{});
  }));
  EXPECT_EQ(Installed(), 2u);
  ASSERT_TRUE(dma_->UnmapDevice(8 * k4K, k4K).ok());
}

// Undoing an unmap's first step maps the acknowledged mappings back in the kernel only (the
// registry never let them go).
TEST_P(VfioContainerDmaTest, UndoUnmapDeviceMapsTheKernelBackOnly) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  ASSERT_TRUE(Map(0, kBase, 2 * k4K).ok());
  const std::map<uint64_t, uint64_t> before = KernelPages();
  ASSERT_TRUE(dma_->UnmapDevice(0, 2 * k4K).ok());
  EXPECT_TRUE(dma_->UndoUnmapDevice(0, 2 * k4K, [] {
    return absl::StatusOr<std::vector<DmaMapping>>(
        std::vector<DmaMapping>{{.iova = 0, .ua = kBase, .size = 2 * k4K}});
  }));
  EXPECT_EQ(KernelPages(), before);
  EXPECT_EQ(Installed(), 2u);
  EXPECT_EQ(registry_->ListRegions(kContext)[0].mapped, 3u);

  ASSERT_TRUE(dma_->UnmapDevice(0, 2 * k4K).ok());
  EXPECT_FALSE(dma_->UndoUnmapDevice(0, 2 * k4K, [] {
    return absl::StatusOr<std::vector<DmaMapping>>(absl::UnavailableError("no store"));
  }));
  ASSERT_TRUE(dma_->UnmapRegistry(0, 2 * k4K).ok());
}

TEST_P(VfioContainerDmaTest, ReplayGoesToTheRegistryThenTheKernel) {
  ASSERT_TRUE(dma_->ReplayRegistration(kContext, kBase, k1M, 0).ok());
  ASSERT_EQ(noting_->calls.size(), 1u);
  EXPECT_EQ(noting_->calls[0].registry_regions, 1u);
  ASSERT_TRUE(dma_->ReplayMapping(0, kBase, 2 * k4K).ok());
  ASSERT_EQ(DmaCalls().size(), 1u);
  EXPECT_EQ(DmaCalls()[0].registry_entries, 2u);
  EXPECT_EQ(KernelPages().size(), 2u);
  EXPECT_EQ(KernelRegions(), 1u);
}

// Release lets the registry go first, then closes the kernel's container; a failed close is
// counted, not returned.
TEST_P(VfioContainerDmaTest, ReleaseClosesTheKernelSideAndCountsAFailedClose) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  ASSERT_TRUE(Map(0, kBase, 2 * k4K).ok());
  kernel_->InjectCloseErrno(1, EIO);
  ASSERT_TRUE(dma_->Release().ok());
  EXPECT_EQ(ErrnoOf(registry_->GetContainer(kContainer).status()), ENOENT);
  EXPECT_TRUE(kernel_->OpenFds().empty());
  EXPECT_EQ(inconsistencies_.load(), 1u);
  EXPECT_EQ(ErrnoOf(dma_->Release()), ENOENT) << "the registry refuses a second release";
}

INSTANTIATE_TEST_SUITE_P(Backends, VfioContainerDmaTest,
                         ::testing::Values(kVfioSpaprV2Backend, kVfioType1Backend));

}  // namespace
}  // namespace dmapin::agent
