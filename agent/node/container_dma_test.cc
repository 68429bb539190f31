// The registry-only ContainerDma (sim, memlock): one registry call per change, an unmap with
// nothing to take from a device first, undos that ask the store only when they must.
#include "agent/node/container_dma.h"

#include <cerrno>
#include <memory>
#include <vector>

#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
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

class RegistryContainerDmaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sim_ = *SimBackend::Create({.page_size = k64K});
    registry_ = std::make_unique<Registry>(sim_.get());
    ASSERT_TRUE(registry_->CreateContext(kContext, {}).ok());
    absl::StatusOr<std::unique_ptr<ContainerDma>> dma =
        NewRegistryContainerDma(*registry_, kContainer, {.iommu_page_size = k4K});
    ASSERT_TRUE(dma.ok()) << dma.status();
    dma_ = std::move(*dma);
  }
  void TearDown() override {
    absl::Status invariants = registry_->CheckInvariants();
    EXPECT_TRUE(invariants.ok()) << invariants;
  }

  uint64_t Installed() const { return registry_->GetContainer(kContainer)->installed_entries; }
  size_t Regions() const { return registry_->ListRegions(kContext).size(); }

  std::unique_ptr<SimBackend> sim_;
  std::unique_ptr<Registry> registry_;
  std::unique_ptr<ContainerDma> dma_;
};

TEST_F(RegistryContainerDmaTest, CreatesTheContainerInTheRegistry) {
  EXPECT_EQ(dma_->id(), kContainer);
  EXPECT_EQ(dma_->options().iommu_page_size, k4K);
  EXPECT_EQ(registry_->GetContainer(kContainer)->options.iommu_page_size, k4K);
  EXPECT_EQ(ErrnoOf(NewRegistryContainerDma(*registry_, kContainer, {}).status()), EEXIST);
}

TEST_F(RegistryContainerDmaTest, RegistersMapsUnmapsAndUnregisters) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  EXPECT_EQ(registry_->GetContainer(kContainer)->context, kContext);
  uint64_t cleared = 7;
  bool replaced = true;
  ASSERT_TRUE(dma_->Map(0, kBase, 4 * k4K, &cleared, &replaced).ok());
  EXPECT_EQ(cleared, 0u);
  EXPECT_FALSE(replaced);
  EXPECT_EQ(Installed(), 4u);
  EXPECT_EQ(ErrnoOf(dma_->Unregister(kContext, kBase, k1M)), EBUSY);
  ASSERT_TRUE(dma_->UnmapDevice(0, 4 * k4K).ok());
  EXPECT_EQ(Installed(), 4u) << "no device here: the registry's entries go in UnmapRegistry";
  ASSERT_TRUE(dma_->UnmapRegistry(0, 4 * k4K).ok());
  EXPECT_EQ(Installed(), 0u);
  ASSERT_TRUE(dma_->Unregister(kContext, kBase, k1M).ok());
  EXPECT_EQ(Regions(), 0u);
  ASSERT_TRUE(dma_->Unbind().ok());
  EXPECT_FALSE(registry_->GetContainer(kContainer)->context.has_value());
}

TEST_F(RegistryContainerDmaTest, AFailedMapSaysWhatItCleared) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  uint64_t cleared = 0;
  bool replaced = false;
  ASSERT_TRUE(dma_->Map(0, kBase, 4 * k4K, &cleared, &replaced).ok());
  // Runs off the region's end after two pages (spec §7.5).
  EXPECT_EQ(ErrnoOf(dma_->Map(0, kBase + k1M - 2 * k4K, 4 * k4K, &cleared, &replaced)), EINVAL);
  EXPECT_EQ(cleared, 2 * k4K);
  EXPECT_TRUE(replaced);
  EXPECT_EQ(Installed(), 2u);
}

TEST_F(RegistryContainerDmaTest, UnmapDeviceChecksWhatTheRegistryWouldTakeAndChangesNothing) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  uint64_t cleared = 0;
  bool replaced = false;
  ASSERT_TRUE(dma_->Map(0, kBase, 2 * k4K, &cleared, &replaced).ok());
  EXPECT_EQ(ErrnoOf(dma_->UnmapDevice(1, k4K)), EINVAL);
  EXPECT_EQ(ErrnoOf(dma_->UnmapDevice(0, 0)), EINVAL);
  EXPECT_EQ(ErrnoOf(dma_->UnmapDevice(uint64_t{1} << 40, k4K)), ENXIO);
  EXPECT_EQ(Installed(), 2u);
}

TEST_F(RegistryContainerDmaTest, UndosAskForTheAcknowledgedMappingsOnlyWhenTheyMust) {
  ASSERT_TRUE(dma_->Register(kContext, kBase, k1M).ok());
  uint64_t cleared = 0;
  bool replaced = false;
  ASSERT_TRUE(dma_->Map(0, kBase, 2 * k4K, &cleared, &replaced).ok());
  int asked = 0;
  auto acknowledged = [&]() -> absl::StatusOr<std::vector<DmaMapping>> {
    ++asked;
    return std::vector<DmaMapping>{{.iova = 0, .ua = kBase, .size = 2 * k4K}};
  };
  // An unmap's first step changed nothing here, so its undo has nothing to put back.
  ASSERT_TRUE(dma_->UnmapDevice(0, 2 * k4K).ok());
  EXPECT_TRUE(dma_->UndoUnmapDevice(0, 2 * k4K, acknowledged));
  EXPECT_EQ(asked, 0);

  // A fresh map is taken out again; nothing to ask for.
  ASSERT_TRUE(dma_->Map(8 * k4K, kBase, k4K, &cleared, &replaced).ok());
  EXPECT_TRUE(dma_->UndoMap(8 * k4K, k4K, /*replaced=*/false, acknowledged));
  EXPECT_EQ(asked, 0);
  EXPECT_EQ(Installed(), 2u);

  // A remap is taken out and what it overwrote comes back from the acknowledged mappings.
  ASSERT_TRUE(dma_->Map(0, kBase + k64K, 2 * k4K, &cleared, &replaced).ok());
  EXPECT_TRUE(replaced);
  EXPECT_TRUE(dma_->UndoMap(0, 2 * k4K, replaced, acknowledged));
  EXPECT_EQ(asked, 1);
  EXPECT_EQ(Installed(), 2u);
  EXPECT_EQ(registry_->ListRegions(kContext)[0].mapped, 3u) << "both entries map the region again";

  // When the store cannot say, the undo reports it.
  ASSERT_TRUE(dma_->Map(0, kBase + k64K, 2 * k4K, &cleared, &replaced).ok());
  EXPECT_FALSE(dma_->UndoMap(0, 2 * k4K, replaced, [] {
    return absl::StatusOr<std::vector<DmaMapping>>(absl::UnavailableError("no store"));
  }));
}

TEST_F(RegistryContainerDmaTest, ReplayBindAndRelease) {
  ASSERT_TRUE(dma_->Bind(kContext).ok());
  EXPECT_EQ(registry_->GetContainer(kContainer)->context, kContext);
  ASSERT_TRUE(dma_->ReplayRegistration(kContext, kBase, k1M, 0).ok());
  ASSERT_TRUE(dma_->ReplayMapping(0, kBase, 2 * k4K).ok());
  EXPECT_EQ(Installed(), 2u);
  ASSERT_TRUE(dma_->Release().ok());
  EXPECT_EQ(ErrnoOf(registry_->GetContainer(kContainer).status()), ENOENT);
  EXPECT_EQ(Regions(), 0u);
  EXPECT_EQ(ErrnoOf(dma_->Release()), ENOENT);
}

}  // namespace
}  // namespace dmapin::agent
