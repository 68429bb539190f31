#include "agent/registry/registry.h"

#include <cerrno>
#include <memory>

#include "absl/strings/match.h"
#include "agent/registry/fault_injecting_backend.h"
#include "agent/registry/sim_backend.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

constexpr uint64_t k64K = 0x10000;
constexpr uint64_t k1M = 0x100000;
constexpr uint64_t kBase = 0x10000000;
constexpr ContextId kCtx = 1;
constexpr ContextId kOtherCtx = 2;

#define EXPECT_ERRNO(expr, err)                                        \
  do {                                                                 \
    absl::Status status_ = (expr);                                     \
    EXPECT_EQ(ErrnoOf(status_), err) << #expr << " -> " << status_;    \
    if (!status_.ok()) {                                               \
      EXPECT_EQ(status_.code(), StatusCodeForErrno(err)) << status_;   \
      EXPECT_TRUE(absl::StartsWith(status_.message(), ErrnoName(err))) \
          << "message does not name the errno: " << status_.message(); \
    }                                                                  \
  } while (0)

class RegistryTest : public ::testing::Test {
 protected:
  void SetUp() override { Reset(SimBackendOptions{}); }

  void Reset(SimBackendOptions options, ContextOptions context_options = {},
             RegistryLimits limits = DefaultRegistryLimits()) {
    registry_.reset();
    auto sim = SimBackend::Create(std::move(options));
    ASSERT_TRUE(sim.ok()) << sim.status();
    sim_ = std::move(*sim);
    faults_ = std::make_unique<FaultInjectingBackend>(sim_.get());
    registry_ = std::make_unique<Registry>(faults_.get(), limits);
    ASSERT_TRUE(registry_->CreateContext(kCtx, context_options).ok());
    ASSERT_TRUE(registry_->CreateContext(kOtherCtx, {}).ok());
    for (ContainerId id = 1; id <= 3; ++id) {
      ASSERT_TRUE(registry_->CreateContainer(id, {.iommu_page_size = sim_->page_size()}).ok());
    }
  }

  void TearDown() override {
    if (registry_ != nullptr) {
      absl::Status invariants = registry_->CheckInvariants();
      EXPECT_TRUE(invariants.ok()) << invariants;
    }
  }

  RegionInfo Region(uint64_t ua, uint64_t size, ContextId context = kCtx) {
    auto found = registry_->Find(context, ua, size / sim_->page_size());
    EXPECT_TRUE(found.ok()) << found.status();
    EXPECT_TRUE(found->has_value()) << "no region at 0x" << std::hex << ua;
    return found->value_or(RegionInfo{});
  }
  bool Absent(uint64_t ua, uint64_t size) {
    return !registry_->Find(kCtx, ua, size / sim_->page_size())->has_value();
  }
  uint64_t Locked(ContextId context = kCtx) { return registry_->GetContext(context)->locked_bytes; }
  absl::Status Invariants() { return registry_->CheckInvariants(); }

  std::unique_ptr<SimBackend> sim_;
  std::unique_ptr<FaultInjectingBackend> faults_;
  std::unique_ptr<Registry> registry_;
};

TEST_F(RegistryTest, RegisterCreatesRegionWithUsedAndMappedOne) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  RegionInfo region = Region(kBase, k1M);
  EXPECT_EQ(region.used, 1u);
  EXPECT_EQ(region.mapped, 1u);
  EXPECT_EQ(region.entries, 16u);
  EXPECT_EQ(region.holders, std::vector<ContainerId>{1});
  EXPECT_EQ(Locked(), k1M);
  EXPECT_EQ(*faults_->TotalPinnedPages(), 16u);
}

TEST_F(RegistryTest, SecondContainerSharesRegionWithoutPinning) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  const uint64_t pinned = faults_->pages_pinned();
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase, k1M).ok());
  EXPECT_EQ(faults_->pages_pinned(), pinned);
  EXPECT_EQ(Region(kBase, k1M).used, 2u);
  EXPECT_EQ((Region(kBase, k1M).holders), (std::vector<ContainerId>{1, 2}));
  EXPECT_EQ(Locked(), k1M);
}

TEST_F(RegistryTest, RegisterTwiceInOneContainerIsEbusy) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->Register(1, kCtx, kBase, k1M), EBUSY);
  EXPECT_EQ(Region(kBase, k1M).used, 1u);
}

TEST_F(RegistryTest, BadRangesAreEinvalAndChangeNothing) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->Register(2, kCtx, kBase + 0x1000, k1M), EINVAL);      // misaligned ua
  EXPECT_ERRNO(registry_->Register(2, kCtx, kBase + 2 * k1M, 0x1000), EINVAL);  // misaligned size
  EXPECT_ERRNO(registry_->Register(2, kCtx, kBase + 2 * k1M, 0), EINVAL);       // zero
  EXPECT_ERRNO(registry_->Register(2, kCtx, ~uint64_t{0} - k64K + 1, 2 * k64K), EINVAL);  // wrap
  EXPECT_ERRNO(registry_->Register(2, kCtx, kBase + k1M / 2, k1M), EINVAL);               // overlap
  EXPECT_ERRNO(registry_->Register(2, kCtx, kBase - k64K, 2 * k64K), EINVAL);  // overlap start
  EXPECT_ERRNO(registry_->Register(2, kCtx, kBase, 2 * k1M), EINVAL);          // same start
  EXPECT_ERRNO(registry_->Register(2, kCtx, kBase, k1M / 2), EINVAL);          // same start
  EXPECT_EQ(registry_->ListRegions().size(), 1u);
  EXPECT_EQ(Locked(), k1M);
  EXPECT_EQ(Region(kBase, k1M).used, 1u);
}

TEST_F(RegistryTest, RangeEndingExactlyAtTopOfAddressSpaceIsAllowed) {
  const uint64_t top = ~uint64_t{0} - k1M + 1;
  ASSERT_TRUE(registry_->Register(1, kCtx, top, k1M).ok());
  auto hpa = registry_->Translate(kCtx, ~uint64_t{0});
  ASSERT_TRUE(hpa.ok()) << hpa.status();
  EXPECT_EQ(*hpa & (k64K - 1), k64K - 1);
  ASSERT_TRUE(registry_->Unregister(1, top, k1M).ok());
}

TEST_F(RegistryTest, AdjacentRegionsDoNotOverlap) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase + k1M, k1M).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase - k64K, k64K).ok());
  EXPECT_EQ(registry_->ListRegions().size(), 3u);
  // Lookup never spans two regions.
  EXPECT_FALSE(registry_->Lookup(kCtx, kBase + k1M - 0x1000, 0x2000)->has_value());
  EXPECT_TRUE(registry_->Lookup(kCtx, kBase + k1M, 0x2000)->has_value());
}

TEST_F(RegistryTest, UnknownContainerOrContextIsEnoent) {
  EXPECT_ERRNO(registry_->Register(99, kCtx, kBase, k1M), ENOENT);
  EXPECT_ERRNO(registry_->Register(1, 99, kBase, k1M), ENOENT);
  EXPECT_ERRNO(registry_->Unregister(99, kBase, k1M), ENOENT);
  EXPECT_ERRNO(registry_->Map(99, 0, kBase, k64K), ENOENT);
  EXPECT_ERRNO(registry_->Unmap(99, 0, k64K), ENOENT);
  EXPECT_ERRNO(registry_->ReleaseContainer(99), ENOENT);
  EXPECT_ERRNO(registry_->TeardownContext(99), ENOENT);
  EXPECT_ERRNO(registry_->Translate(99, kBase).status(), ENOENT);
  EXPECT_ERRNO(registry_->CreateContainer(1, {}), EEXIST);
  EXPECT_ERRNO(registry_->CreateContext(kCtx, {}), EEXIST);
}

TEST_F(RegistryTest, ContainerBoundToOtherContextIsEperm) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->Register(1, kOtherCtx, kBase + 4 * k1M, k1M), EPERM);
  EXPECT_TRUE(registry_->ListRegions(kOtherCtx).empty());
  // The same address in another context (another address space) is a different region.
  ASSERT_TRUE(registry_->Register(2, kOtherCtx, kBase, k1M).ok());
  EXPECT_NE(*registry_->Translate(kCtx, kBase), *registry_->Translate(kOtherCtx, kBase));
}

TEST_F(RegistryTest, MemlockLimitIsStrictAndCapIpcLockWaivesIt) {
  Reset(SimBackendOptions{}, ContextOptions{.memlock_limit_bytes = 2 * k1M});
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase + k1M, k1M).ok());  // exactly at the limit
  EXPECT_ERRNO(registry_->Register(1, kCtx, kBase + 2 * k1M, k64K), ENOMEM);
  EXPECT_EQ(Locked(), 2 * k1M);
  // Identical registration needs no memlock.
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase, k1M).ok());
  // Overlap is checked before memlock.
  EXPECT_ERRNO(registry_->Register(3, kCtx, kBase + k64K, 4 * k1M), EINVAL);

  Reset(SimBackendOptions{}, ContextOptions{.memlock_limit_bytes = 0, .cap_ipc_lock = true});
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_EQ(Locked(), k1M);
}

// Issue 11: a register of 2^63 bytes allocated 2^50 bytes of hpas with `new` and the exception
// took the agent down. The default limits (the node's memory) refuse it first.
TEST_F(RegistryTest, HugeRegisterIsEnomemAndChangesNothing) {
  const uint64_t huge = uint64_t{1} << 63;
  for (uint64_t size : {huge, uint64_t{1} << 62, (PhysicalMemoryBytes() / k64K + 1) * k64K}) {
    absl::Status status = registry_->Register(1, kCtx, 0, size);
    EXPECT_ERRNO(status, ENOMEM);
    EXPECT_TRUE(absl::StrContains(status.message(), "--max_region_bytes")) << status;
  }
  EXPECT_TRUE(registry_->ListRegions().empty());
  EXPECT_EQ(Locked(), 0u);
  EXPECT_FALSE(registry_->GetContainer(1)->context.has_value()) << "a refused register bound it";
  EXPECT_EQ(*faults_->TotalPinnedPages(), 0u);
  EXPECT_EQ(registry_->stats().registers_over_limit, 3u);
  EXPECT_EQ(registry_->stats().registers_failed, 3u);
  EXPECT_TRUE(Invariants().ok()) << Invariants();
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
}

TEST_F(RegistryTest, RegionAndNodeLimitsAreInclusiveAndCountEveryContext) {
  Reset(SimBackendOptions{}, {}, {.max_region_bytes = 4 * k1M, .max_pinned_bytes = 6 * k1M});
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, 4 * k1M).ok());  // exactly the region limit
  EXPECT_ERRNO(registry_->Register(2, kOtherCtx, kBase, 4 * k1M + k64K), ENOMEM);
  absl::Status status = registry_->Register(2, kOtherCtx, kBase, 3 * k1M);
  EXPECT_ERRNO(status, ENOMEM);  // 4 + 3 MiB pinned > 6 MiB, though in another context
  EXPECT_TRUE(absl::StrContains(status.message(), "--max_pinned_bytes")) << status;
  ASSERT_TRUE(registry_->Register(2, kOtherCtx, kBase, 2 * k1M).ok());  // exactly the node limit
  // Another user of a registered region pins nothing, so no limit applies.
  ASSERT_TRUE(registry_->Register(3, kCtx, kBase, 4 * k1M).ok());
  EXPECT_ERRNO(registry_->Register(1, kCtx, kBase + 8 * k1M, k64K), ENOMEM);
  // Unregister and teardown give the room back.
  ASSERT_TRUE(registry_->Unregister(2, kBase, 2 * k1M).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase + 8 * k1M, 2 * k1M).ok());
  ASSERT_TRUE(registry_->TeardownContext(kCtx).ok());
  ASSERT_TRUE(registry_->CreateContext(kCtx, {}).ok());
  ASSERT_TRUE(registry_->CreateContainer(1, {.iommu_page_size = k64K}).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, 4 * k1M).ok());
  EXPECT_EQ(registry_->stats().registers_over_limit, 3u);
}

TEST_F(RegistryTest, LoweredLimitsKeepWhatIsRegisteredAndRefuseMore) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, 4 * k1M).ok());
  registry_->SetLimits({.max_region_bytes = k1M, .max_pinned_bytes = 2 * k1M});
  EXPECT_EQ(registry_->limits().max_pinned_bytes, 2 * k1M);
  EXPECT_ERRNO(registry_->Register(1, kCtx, kBase + 8 * k1M, k64K), ENOMEM);
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase, 4 * k1M).ok());
  EXPECT_EQ(Locked(), 4 * k1M);
}

// Without the limits, the hpas allocation itself must fail cleanly (2^63 bytes of 64 KiB pages
// need 2^50 bytes of addresses: more than the address space).
TEST_F(RegistryTest, AnAllocationThatCannotBeHadIsEnomem) {
  Reset(SimBackendOptions{}, {},
        {.max_region_bytes = ~uint64_t{0}, .max_pinned_bytes = ~uint64_t{0}});
  absl::Status status = registry_->Register(1, kCtx, 0, uint64_t{1} << 63);
  EXPECT_ERRNO(status, ENOMEM);
  EXPECT_TRUE(absl::StrContains(status.message(), "could not allocate")) << status;
  EXPECT_EQ(registry_->stats().allocation_failures, 1u);
  EXPECT_TRUE(registry_->ListRegions().empty());
  EXPECT_FALSE(registry_->GetContainer(1)->context.has_value());
  EXPECT_EQ(*faults_->TotalPinnedPages(), 0u);
}

TEST_F(RegistryTest, CheckRegisterAnswersAsRegisterWouldAndChangesNothing) {
  Reset(SimBackendOptions{}, {}, {.max_region_bytes = 4 * k1M, .max_pinned_bytes = 4 * k1M});
  EXPECT_TRUE(registry_->CheckRegister(1, kCtx, kBase, k1M).ok());
  EXPECT_TRUE(registry_->ListRegions().empty());
  EXPECT_FALSE(registry_->GetContainer(1)->context.has_value());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->CheckRegister(1, kCtx, kBase, k1M), EBUSY);
  EXPECT_ERRNO(registry_->CheckRegister(1, kOtherCtx, kBase, k1M), EPERM);
  EXPECT_ERRNO(registry_->CheckRegister(2, kCtx, kBase + k64K, k1M), EINVAL);
  EXPECT_ERRNO(registry_->CheckRegister(2, kCtx, kBase + 2 * k1M, 4 * k1M), ENOMEM);
  EXPECT_ERRNO(registry_->CheckRegister(9, kCtx, kBase, k1M), ENOENT);
  EXPECT_TRUE(registry_->CheckRegister(2, kCtx, kBase, k1M).ok());
  EXPECT_EQ(Region(kBase, k1M).used, 1u);
  EXPECT_EQ(registry_->stats().registers_failed, 5u);
}

// Unmap visited every IOMMU page of the range: over a window of 2^64 - 64 KiB (2^48 pages) it
// never returned, inside a read section that every writer then waited for.
TEST_F(RegistryTest, UnmapOfAHugeWindowCostsWhatIsMapped) {
  const uint64_t window = ~uint64_t{0} - k64K + 1;
  ASSERT_TRUE(
      registry_->CreateContainer(20, {.iommu_page_size = k64K, .window_size = window}).ok());
  ASSERT_TRUE(registry_->Register(20, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(20, 0, kBase, 2 * k64K).ok());
  ASSERT_TRUE(registry_->Map(20, window - k64K, kBase, k64K).ok());
  EXPECT_EQ(Region(kBase, k1M).mapped, 4u);
  ASSERT_TRUE(registry_->Unmap(20, k64K, window - k64K).ok());
  EXPECT_EQ(Region(kBase, k1M).mapped, 2u);  // the entry at iova 0 stays
  ASSERT_TRUE(registry_->Unmap(20, 0, window).ok());
  EXPECT_EQ(Region(kBase, k1M).mapped, 1u);
  EXPECT_EQ(registry_->GetContainer(20)->installed_entries, 0u);
}

TEST_F(RegistryTest, PinFailureRollsBackEverything) {
  Reset(SimBackendOptions{.holes = {{kBase + 5 * k64K, k64K}}});
  EXPECT_ERRNO(registry_->Register(1, kCtx, kBase, k1M), EFAULT);
  EXPECT_EQ(registry_->ListRegions().size(), 0u);
  EXPECT_EQ(Locked(), 0u);
  EXPECT_EQ(*faults_->TotalPinnedPages(), 0u);
  // The container is not bound by a failed registration.
  EXPECT_ERRNO(registry_->Map(1, 0, kBase, k64K), EPERM);
  EXPECT_TRUE(Invariants().ok()) << Invariants();
}

TEST_F(RegistryTest, ReadOnlyPagesCannotBePinnedForWrite) {
  Reset(SimBackendOptions{.readonly = {{kBase + k1M - k64K, k64K}}});
  absl::Status status = registry_->Register(1, kCtx, kBase, k1M);
  EXPECT_ERRNO(status, EFAULT);
  EXPECT_NE(status.message().find("0x100f0000"), absl::string_view::npos) << status;
  EXPECT_EQ(*faults_->TotalPinnedPages(), 0u);
}

TEST_F(RegistryTest, InjectedFaultOnNthPageRollsBack) {
  for (uint64_t n : {1, 2, 8, 16}) {
    faults_->FailNthPagePin(n, EFAULT);
    EXPECT_ERRNO(registry_->Register(1, kCtx, kBase, k1M), EFAULT);
    EXPECT_EQ(*faults_->TotalPinnedPages(), 0u) << "n=" << n;
    EXPECT_EQ(Locked(), 0u);
  }
  faults_->ClearFaults();
  faults_->FailNthPagePin(17, ENOMEM);  // beyond this registration: no effect on it
  EXPECT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_EQ(faults_->injected_failures(), 4u);
}

TEST_F(RegistryTest, UnregisterLastUserReleasesAndUnaccounts) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Unregister(1, kBase, k1M).ok());
  EXPECT_EQ(Region(kBase, k1M).used, 1u);
  EXPECT_EQ(Locked(), k1M);
  EXPECT_ERRNO(registry_->Unregister(1, kBase, k1M), ENOENT);  // no longer held by 1
  ASSERT_TRUE(registry_->Unregister(2, kBase, k1M).ok());
  EXPECT_TRUE(Absent(kBase, k1M));
  EXPECT_EQ(Locked(), 0u);
  EXPECT_EQ(*faults_->TotalPinnedPages(), 0u);
  EXPECT_ERRNO(registry_->Unregister(2, kBase, k1M), ENOENT);
}

TEST_F(RegistryTest, UnregisterDoesNotBisect) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->Unregister(1, kBase, k64K), ENOENT);
  EXPECT_ERRNO(registry_->Unregister(1, kBase + k64K, k1M - k64K), ENOENT);
  EXPECT_ERRNO(registry_->Unregister(1, kBase + 1, k1M), EINVAL);
  EXPECT_EQ(Region(kBase, k1M).used, 1u);
}

TEST_F(RegistryTest, LastUnregisterWhileMappedIsEbusyThenSucceedsAfterUnmap) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase, 2 * k64K).ok());
  EXPECT_EQ(Region(kBase, k1M).mapped, 3u);
  EXPECT_ERRNO(registry_->Unregister(1, kBase, k1M), EBUSY);
  RegionInfo region = Region(kBase, k1M);
  EXPECT_EQ(region.used, 1u);
  EXPECT_EQ(region.mapped, 3u);
  EXPECT_EQ(region.holders, std::vector<ContainerId>{1});
  ASSERT_TRUE(registry_->Unmap(1, 0, 2 * k64K).ok());
  EXPECT_EQ(Region(kBase, k1M).mapped, 1u);
  ASSERT_TRUE(registry_->Unregister(1, kBase, k1M).ok());
  EXPECT_TRUE(Absent(kBase, k1M));
  EXPECT_EQ(registry_->stats().unregister_ebusy, 1u);
}

TEST_F(RegistryTest, MapCountsOneEntryPerIommuPageAndRollsBack) {
  ASSERT_TRUE(registry_->CreateContainer(10, {.iommu_page_size = 0x1000}).ok());
  ASSERT_TRUE(registry_->Register(10, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(10, 0, kBase, k64K).ok());
  EXPECT_EQ(Region(kBase, k1M).mapped, 17u);
  // Crossing the region's end: nothing of this call stays installed.
  uint64_t cleared = 99;
  EXPECT_ERRNO(registry_->Map(10, 0x100000, kBase + k1M - 0x2000, 0x4000, &cleared), EINVAL);
  EXPECT_EQ(cleared, 2u);  // two pages were installed, then cleared again
  EXPECT_EQ(Region(kBase, k1M).mapped, 17u);
  EXPECT_EQ(registry_->stats().map_rollbacks, 1u);
  // Unmap of a partly installed range clears only what is installed.
  ASSERT_TRUE(registry_->Unmap(10, 0x8000, 0x10000).ok());
  EXPECT_EQ(Region(kBase, k1M).mapped, 9u);
  EXPECT_EQ(registry_->GetContainer(10)->installed_entries, 8u);
}

TEST_F(RegistryTest, MapChecksInOrder) {
  EXPECT_ERRNO(registry_->Map(1, 0, kBase, k64K), EPERM);  // never registered
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->Map(1, 0, kBase, 0), EINVAL);
  EXPECT_ERRNO(registry_->Map(1, 0x1000, kBase, k64K), EINVAL);
  EXPECT_ERRNO(registry_->Map(1, 0, kBase + 0x1000, k64K), EINVAL);
  EXPECT_ERRNO(registry_->Map(1, uint64_t{1} << 41, kBase + 0x1000, k64K),
               EINVAL);  // before window
  EXPECT_ERRNO(registry_->Map(1, uint64_t{1} << 40, kBase, k64K), ENXIO);
  EXPECT_ERRNO(registry_->Map(1, (uint64_t{1} << 40) - k64K, kBase, 2 * k64K), ENXIO);
  EXPECT_ERRNO(registry_->Map(1, 0, kBase + k1M, k64K), EINVAL);  // unregistered memory
  // A ua range wrapping past 2^64 fails the lookup (step 4), so the window (step 3) comes first;
  // inside the window the wrap must not reach the region at kBase through low addresses.
  const uint64_t wrapping_ua = uint64_t{0} - k64K;
  EXPECT_ERRNO(registry_->Map(1, uint64_t{1} << 40, wrapping_ua, 2 * k64K), ENXIO);
  EXPECT_ERRNO(registry_->Map(1, 0, wrapping_ua, kBase + k64K), EINVAL);
  EXPECT_ERRNO(registry_->Unmap(1, 0x1000, k64K), EINVAL);
  EXPECT_ERRNO(registry_->Unmap(1, uint64_t{1} << 40, k64K), ENXIO);
  EXPECT_EQ(Region(kBase, k1M).mapped, 1u);
}

TEST_F(RegistryTest, MapMayUseAnyRegionOfTheContextAndSpanAdjacentRegions) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase + k1M, k1M).ok());
  // Container 1 holds only the first region but may map the second (as the kernel does).
  ASSERT_TRUE(registry_->Map(1, 0, kBase + k1M - k64K, 2 * k64K).ok());
  EXPECT_EQ(Region(kBase, k1M).mapped, 2u);
  EXPECT_EQ(Region(kBase + k1M, k1M).mapped, 2u);
}

TEST_F(RegistryTest, RemapMovesTheCount) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase + 4 * k1M, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase, k64K).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase + 4 * k1M, k64K).ok());
  EXPECT_EQ(Region(kBase, k1M).mapped, 1u);
  EXPECT_EQ(Region(kBase + 4 * k1M, k1M).mapped, 2u);
}

// Map starts from the region this thread mapped into last; that hint must never outlive the region,
// cross to another context, or reach another registry.
TEST_F(RegistryTest, MapHintNeverOutlivesItsRegion) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase + k64K, k64K).ok());
  ASSERT_TRUE(registry_->Unmap(1, 0, k64K).ok());
  ASSERT_TRUE(registry_->Unregister(1, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->Map(1, 0, kBase + k64K, k64K), EINVAL);
  // A smaller region where the old one was (its Region may reuse the old one's memory).
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k64K).ok());
  EXPECT_ERRNO(registry_->Map(1, 0, kBase + k64K, k64K), EINVAL);
  ASSERT_TRUE(registry_->Map(1, 0, kBase, k64K).ok());
  EXPECT_EQ(Region(kBase, k64K).mapped, 2u);
  ASSERT_TRUE(registry_->Unmap(1, 0, k64K).ok());
}

TEST_F(RegistryTest, MapHintStaysInItsContext) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(3, kOtherCtx, kBase + 8 * k1M, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase, k64K).ok());
  EXPECT_ERRNO(registry_->Map(3, 0, kBase, k64K), EINVAL);
}

TEST_F(RegistryTest, MapHintDoesNotSurviveTeardownAndRecreate) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase, k64K).ok());
  ASSERT_TRUE(registry_->TeardownContext(kCtx).ok());
  ASSERT_TRUE(registry_->CreateContext(kCtx, {}).ok());
  ASSERT_TRUE(registry_->CreateContainer(1, {.iommu_page_size = sim_->page_size()}).ok());
  ASSERT_TRUE(registry_->BindContainer(1, kCtx).ok());
  EXPECT_ERRNO(registry_->Map(1, 0, kBase, k64K), EINVAL);
}

TEST_F(RegistryTest, MapHintDoesNotReachAnotherRegistry) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase, k64K).ok());
  Registry other(faults_.get());
  ASSERT_TRUE(other.CreateContext(kCtx, {}).ok());
  ASSERT_TRUE(other.CreateContainer(1, {.iommu_page_size = sim_->page_size()}).ok());
  ASSERT_TRUE(other.BindContainer(1, kCtx).ok());
  EXPECT_ERRNO(other.Map(1, 0, kBase, k64K), EINVAL);
}

TEST_F(RegistryTest, HugePagesLimitIommuPageSize) {
  const uint64_t k16M = 0x1000000;
  Reset(SimBackendOptions{.huge = {{0x40000000, 4 * k16M, k16M}}});
  ASSERT_TRUE(registry_->CreateContainer(10, {.iommu_page_size = k16M}).ok());
  ASSERT_TRUE(registry_->Register(10, kCtx, 0x40000000, 2 * k16M).ok());
  EXPECT_EQ(Region(0x40000000, 2 * k16M).max_iommu_page_size, k16M);
  ASSERT_TRUE(registry_->Map(10, 0, 0x40000000, 2 * k16M).ok());
  EXPECT_EQ(Region(0x40000000, 2 * k16M).mapped, 3u);
  // Normal memory allows IOMMU pages up to PS only.
  ASSERT_TRUE(registry_->Register(10, kCtx, 0x80000000, k16M).ok());
  EXPECT_ERRNO(registry_->Map(10, k16M * 4, 0x80000000, k16M), EINVAL);
  // Huge backing but ua aligned only to 64 KiB: the alignment caps the IOMMU page.
  ASSERT_TRUE(registry_->Register(1, kCtx, 0x40000000 + 2 * k16M + k64K, k64K).ok());
  EXPECT_EQ(Region(0x40000000 + 2 * k16M + k64K, k64K).max_iommu_page_size, k64K);
  // Huge frames are contiguous.
  EXPECT_EQ(*registry_->Translate(kCtx, 0x40000000 + k1M),
            *registry_->Translate(kCtx, 0x40000000) + k1M);
}

TEST_F(RegistryTest, TranslateKeepsOffsetAndDistinctPages) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  const uint64_t a = *registry_->Translate(kCtx, kBase + 0x31234);
  EXPECT_EQ(a % k64K, 0x1234u);
  EXPECT_EQ(a - 0x1234, *registry_->Translate(kCtx, kBase + 0x30000));
  EXPECT_NE(a - 0x1234, *registry_->Translate(kCtx, kBase + 0x40000));
  absl::Status outside = registry_->Translate(kCtx, kBase + k1M).status();
  EXPECT_EQ(ErrnoOf(outside), EFAULT);
  EXPECT_EQ(outside.code(), absl::StatusCode::kOutOfRange);

  Registry::ReadSession session(*registry_, kCtx);
  ASSERT_TRUE(session.valid());
  uint64_t hpa = 0;
  for (uint64_t offset = 0; offset < k1M; offset += 0x1000) {
    ASSERT_TRUE(session.TryTranslate(kBase + offset, &hpa));
    EXPECT_EQ(hpa, sim_->FakeHpa(kCtx, kBase + (offset & ~(k64K - 1))) + (offset & (k64K - 1)));
  }
  EXPECT_FALSE(session.TryTranslate(kBase - 1, &hpa));
  EXPECT_FALSE(Registry::ReadSession(*registry_, 99).valid());
}

TEST_F(RegistryTest, TranslatePagesRunsAcrossAdjacentRegionsAndStopsAtAGap) {
  // [kBase, +1M) and [kBase + 1M, +128K) are adjacent; a gap follows.
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase + k1M, 2 * k64K).ok());
  Registry::ReadSession session(*registry_, kCtx);
  std::vector<uint64_t> hpas(40, 0);
  const uint64_t start = kBase + 3 * k64K + 0x123;  // the offset is kept on every page
  const size_t done = session.TranslatePages(start, absl::MakeSpan(hpas));
  EXPECT_EQ(done, 16u - 3u + 2u);
  for (size_t i = 0; i < done; ++i) {
    EXPECT_EQ(hpas[i], sim_->FakeHpa(kCtx, kBase + (3 + i) * k64K) + 0x123) << i;
  }
  EXPECT_EQ(session.TranslatePages(kBase - k64K, absl::MakeSpan(hpas)), 0u);
  EXPECT_EQ(session.TranslatePages(kBase, absl::MakeSpan(hpas).first(5)), 5u);
  EXPECT_EQ(Registry::ReadSession(*registry_, 99).TranslatePages(kBase, absl::MakeSpan(hpas)), 0u);
}

TEST_F(RegistryTest, WriterCallsInsideReadSessionAreRefused) {
  Registry::ReadSession session(*registry_, kCtx);
  EXPECT_EQ(registry_->Register(1, kCtx, kBase, k1M).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(RegistryTest, ReleaseContainerClearsMappingsAndUnregisters) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase, 4 * k64K).ok());
  ASSERT_TRUE(registry_->ReleaseContainer(1).ok());
  EXPECT_TRUE(registry_->ListRegions().empty());
  EXPECT_EQ(Locked(), 0u);
  EXPECT_ERRNO(registry_->Map(1, 0, kBase, k64K), ENOENT);
  // The id may be reused for a new container.
  ASSERT_TRUE(registry_->CreateContainer(1, {.iommu_page_size = k64K}).ok());
  ASSERT_TRUE(registry_->Register(1, kOtherCtx, kBase, k1M).ok());
}

TEST_F(RegistryTest, ReleaseWhileAnotherContainerMapsLeavesPendingReleaseThenCompletes) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase + k1M, k1M).ok());
  // Container 2 maps container 1's region (allowed: same context).
  ASSERT_TRUE(registry_->Map(2, 0, kBase, 2 * k64K).ok());
  ASSERT_TRUE(registry_->ReleaseContainer(1).ok());
  RegionInfo region = Region(kBase, k1M);
  EXPECT_TRUE(region.pending_release);
  EXPECT_EQ(region.used, 1u);
  EXPECT_TRUE(region.holders.empty());
  EXPECT_EQ(Locked(), 2 * k1M);
  ASSERT_TRUE(Invariants().ok()) << Invariants();
  ASSERT_TRUE(registry_->Unmap(2, 0, k64K).ok());
  EXPECT_FALSE(Absent(kBase, k1M));  // still one mapping
  ASSERT_TRUE(registry_->Unmap(2, k64K, k64K).ok());
  EXPECT_TRUE(Absent(kBase, k1M));
  EXPECT_EQ(Locked(), k1M);
  EXPECT_EQ(registry_->stats().pending_releases_completed, 1u);
}

TEST_F(RegistryTest, PendingReleaseCompletesWhenTheMappingContainerIsReleased) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase + k1M, k1M).ok());
  ASSERT_TRUE(registry_->Map(2, 0, kBase, k64K).ok());
  ASSERT_TRUE(registry_->ReleaseContainer(1).ok());
  ASSERT_TRUE(registry_->ReleaseContainer(2).ok());
  EXPECT_TRUE(registry_->ListRegions().empty());
  EXPECT_EQ(*faults_->TotalPinnedPages(), 0u);
}

// Spec §4: a container that registers a region pending release adds a user (§2.3); the pending
// reference stays until `mapped` returns to 1 and is dropped then, leaving the region with its
// holder.
TEST_F(RegistryTest, RegisteringAPendingRegionAddsAUserBesideThePendingReference) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase + k1M, k1M).ok());
  ASSERT_TRUE(registry_->Map(2, 0, kBase, k64K).ok());
  ASSERT_TRUE(registry_->ReleaseContainer(1).ok());
  ASSERT_TRUE(registry_->Register(3, kCtx, kBase, k1M).ok());
  RegionInfo region = Region(kBase, k1M);
  EXPECT_TRUE(region.pending_release);
  EXPECT_EQ(region.used, 2u);
  EXPECT_EQ(region.holders, std::vector<ContainerId>{3});
  EXPECT_EQ(Locked(), 2 * k1M);  // nothing pinned again
  ASSERT_TRUE(Invariants().ok()) << Invariants();
  ASSERT_TRUE(registry_->Unmap(2, 0, k64K).ok());
  region = Region(kBase, k1M);
  EXPECT_FALSE(region.pending_release);
  EXPECT_EQ(region.used, 1u);
  EXPECT_EQ(region.mapped, 1u);
  EXPECT_EQ(registry_->stats().pending_releases_completed, 1u);
  ASSERT_TRUE(Invariants().ok()) << Invariants();
  // The new holder is now the only user: its unregister removes the region.
  ASSERT_TRUE(registry_->Unregister(3, kBase, k1M).ok());
  EXPECT_TRUE(Absent(kBase, k1M));
  EXPECT_EQ(Locked(), k1M);
}

// The new holder's unregister while the region is still pending and mapped is OK (the pending
// reference is another user, §3.3), not EBUSY; the region goes when the last mapping does.
TEST_F(RegistryTest, NewHolderOfAPendingRegionUnregistersWhileItIsStillMapped) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase + k1M, k1M).ok());
  ASSERT_TRUE(registry_->Map(2, 0, kBase, 2 * k64K).ok());
  ASSERT_TRUE(registry_->ReleaseContainer(1).ok());
  ASSERT_TRUE(registry_->Register(3, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Unregister(3, kBase, k1M).ok());
  RegionInfo region = Region(kBase, k1M);
  EXPECT_TRUE(region.pending_release);
  EXPECT_EQ(region.used, 1u);
  EXPECT_TRUE(region.holders.empty());
  ASSERT_TRUE(Invariants().ok()) << Invariants();
  ASSERT_TRUE(registry_->Unmap(2, 0, k64K).ok());
  EXPECT_FALSE(Absent(kBase, k1M));
  ASSERT_TRUE(registry_->Unmap(2, k64K, k64K).ok());
  EXPECT_TRUE(Absent(kBase, k1M));
  EXPECT_EQ(Locked(), k1M);
}

// Releasing the new holder's container while the region is pending keeps it pending (the
// pending reference remains a user) until the mapping container lets go.
TEST_F(RegistryTest, ReleasingTheNewHolderOfAPendingRegionKeepsItPending) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase + k1M, k1M).ok());
  ASSERT_TRUE(registry_->Map(2, 0, kBase, k64K).ok());
  ASSERT_TRUE(registry_->ReleaseContainer(1).ok());
  ASSERT_TRUE(registry_->Register(3, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->ReleaseContainer(3).ok());
  RegionInfo region = Region(kBase, k1M);
  EXPECT_TRUE(region.pending_release);
  EXPECT_EQ(region.used, 1u);
  ASSERT_TRUE(Invariants().ok()) << Invariants();
  ASSERT_TRUE(registry_->ReleaseContainer(2).ok());
  EXPECT_TRUE(registry_->ListRegions().empty());
  EXPECT_EQ(*faults_->TotalPinnedPages(), 0u);
}

TEST_F(RegistryTest, RestorePendingReleaseGivesBackThePendingReference) {
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase + k1M, k1M).ok());
  ASSERT_TRUE(registry_->Register(3, kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->RestorePendingRelease(kCtx, kBase, k1M), EINVAL);  // nothing mapped
  EXPECT_ERRNO(registry_->RestorePendingRelease(kCtx, kBase, 2 * k1M), ENOENT);
  ASSERT_TRUE(registry_->Map(2, 0, kBase, k64K).ok());
  ASSERT_TRUE(registry_->RestorePendingRelease(kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->RestorePendingRelease(kCtx, kBase, k1M), EBUSY);
  RegionInfo region = Region(kBase, k1M);
  EXPECT_TRUE(region.pending_release);
  EXPECT_EQ(region.used, 2u);
  ASSERT_TRUE(Invariants().ok()) << Invariants();
  ASSERT_TRUE(registry_->Unmap(2, 0, k64K).ok());
  EXPECT_FALSE(Region(kBase, k1M).pending_release);
  EXPECT_EQ(Region(kBase, k1M).used, 1u);
}

TEST_F(RegistryTest, TeardownContextReleasesEverythingWhateverTheCounters) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase, 4 * k64K).ok());
  ASSERT_TRUE(registry_->Register(3, kOtherCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->TeardownContext(kCtx).ok());
  EXPECT_EQ(*faults_->TotalPinnedPages(), 16u);  // only the other context's region
  EXPECT_ERRNO(registry_->GetContext(kCtx).status(), ENOENT);
  EXPECT_ERRNO(registry_->Map(1, 0, kBase, k64K), ENOENT);  // bound containers went with it
  EXPECT_EQ(registry_->ListRegions().size(), 1u);
}

TEST_F(RegistryTest, LookupIsByteExactContainment) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_TRUE(registry_->Lookup(kCtx, kBase + k1M - 1, 1)->has_value());
  EXPECT_FALSE(registry_->Lookup(kCtx, kBase + k1M - 1, 2)->has_value());
  EXPECT_FALSE(registry_->Lookup(kCtx, kBase - 1, 2)->has_value());
  EXPECT_FALSE(registry_->Lookup(kCtx, kBase, 0)->has_value());
  EXPECT_FALSE(registry_->Lookup(kCtx, ~uint64_t{0}, 2)->has_value());
}

TEST_F(RegistryTest, ContainerOptionsAreValidated) {
  EXPECT_ERRNO(registry_->CreateContainer(20, {.iommu_page_size = 0x3000}), EINVAL);
  EXPECT_ERRNO(registry_->CreateContainer(20, {.iommu_page_size = 0x1000, .window_size = 0}),
               EINVAL);
  EXPECT_ERRNO(registry_->CreateContainer(20, {.iommu_page_size = 0x1000, .window_start = 0x800}),
               EINVAL);
  ASSERT_TRUE(registry_
                  ->CreateContainer(20, {.iommu_page_size = k64K,
                                         .window_start = uint64_t{1} << 59,
                                         .window_size = uint64_t{1} << 30})
                  .ok());
  ASSERT_TRUE(registry_->Register(20, kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->Map(20, 0, kBase, k64K), ENXIO);
  ASSERT_TRUE(registry_->Map(20, uint64_t{1} << 59, kBase, k64K).ok());
}

TEST_F(RegistryTest, ManyRegionsIndexAndUnindexCleanly) {
  for (uint64_t i = 0; i < 500; ++i) {
    ASSERT_TRUE(
        registry_->Register(1 + i % 3, kCtx, kBase + i * 3 * k64K, (1 + i % 2) * k64K).ok());
  }
  ASSERT_TRUE(Invariants().ok()) << Invariants();
  for (uint64_t i = 0; i < 500; i += 2) {
    ASSERT_TRUE(registry_->Unregister(1 + i % 3, kBase + i * 3 * k64K, (1 + i % 2) * k64K).ok());
  }
  ASSERT_TRUE(Invariants().ok()) << Invariants();
  EXPECT_EQ(registry_->ListRegions().size(), 250u);
  EXPECT_FALSE(registry_->Lookup(kCtx, kBase, 1)->has_value());
  EXPECT_TRUE(registry_->Lookup(kCtx, kBase + 3 * k64K, 1)->has_value());
}

}  // namespace
}  // namespace dmapin::agent

namespace dmapin::agent {
namespace {

// An agent whose record of a container's first register was refused takes the binding back.
TEST_F(RegistryTest, UnbindContainerUndoesTheFirstRegistersBinding) {
  EXPECT_TRUE(registry_->UnbindContainer(1).ok()) << "unbound already";
  EXPECT_ERRNO(registry_->UnbindContainer(99), ENOENT);
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  EXPECT_ERRNO(registry_->UnbindContainer(1), EBUSY);  // it holds the region
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Unregister(2, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(2, 0, kBase, k64K).ok());
  EXPECT_ERRNO(registry_->UnbindContainer(2), EBUSY);  // it maps c1's region
  EXPECT_EQ(registry_->GetContainer(2)->context, kCtx);
  ASSERT_TRUE(registry_->Unmap(2, 0, k64K).ok());
  ASSERT_TRUE(registry_->UnbindContainer(2).ok());
  EXPECT_FALSE(registry_->GetContainer(2)->context.has_value());
  EXPECT_EQ(registry_->GetContext(kCtx)->containers, std::vector<ContainerId>{1});
  EXPECT_ERRNO(registry_->Map(2, 0, kBase, k64K), EPERM);
  // Free to bind elsewhere now.
  ASSERT_TRUE(registry_->Register(2, kOtherCtx, kBase, k1M).ok());
}

TEST_F(RegistryTest, PendingAfterReleaseIsWhatTheReleaseLeaves) {
  const uint64_t ps = sim_->page_size();
  // P: pending since container 3 went, kept only by container 1's mapping (completes).
  ASSERT_TRUE(registry_->Register(3, kCtx, kBase + 4 * k1M, k1M).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, 0, kBase + 4 * k1M, ps).ok());
  ASSERT_TRUE(registry_->ReleaseContainer(3).ok());
  // A: held by 1 alone, mapped by 2 (goes pending). C: held by 1 alone, mapped by 1 (goes).
  // B: held by 1 and 2 (stays, not pending).
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase + 6 * k1M, k1M).ok());
  ASSERT_TRUE(registry_->Map(2, 0, kBase, ps).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase + 2 * k1M, k1M).ok());
  ASSERT_TRUE(registry_->Map(1, ps, kBase + 2 * k1M, ps).ok());
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase + 6 * k1M, k1M).ok());
  absl::StatusOr<std::vector<std::pair<uint64_t, uint64_t>>> predicted =
      registry_->PendingAfterRelease(1);
  ASSERT_TRUE(predicted.ok()) << predicted.status();
  EXPECT_EQ(*predicted, (std::vector<std::pair<uint64_t, uint64_t>>{{kBase, k1M}}));
  EXPECT_TRUE(Region(kBase + 4 * k1M, k1M).pending_release) << "it changed nothing";
  ASSERT_TRUE(registry_->ReleaseContainer(1).ok());
  std::vector<std::pair<uint64_t, uint64_t>> pending;
  for (const RegionInfo& region : registry_->ListRegions()) {
    if (region.pending_release) pending.emplace_back(region.ua, region.size);
  }
  EXPECT_EQ(pending, *predicted);
  EXPECT_ERRNO(registry_->PendingAfterRelease(3).status(), ENOENT);
  // Container 2 keeps only A pending; its release completes it.
  EXPECT_TRUE(registry_->PendingAfterRelease(2)->empty());
}

TEST_F(RegistryTest, MapSaysWhetherItReplacedEntries) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, k1M).ok());
  bool replaced = true;
  ASSERT_TRUE(registry_->Map(1, 0, kBase, 2 * k64K, nullptr, &replaced).ok());
  EXPECT_FALSE(replaced);
  ASSERT_TRUE(registry_->Map(1, k64K, kBase, 2 * k64K, nullptr, &replaced).ok());
  EXPECT_TRUE(replaced);
  // A failed map that only cleared what it installed itself replaced nothing.
  uint64_t cleared = 0;
  EXPECT_ERRNO(registry_->Map(1, 4 * k64K, kBase + k1M - k64K, 2 * k64K, &cleared, &replaced),
               EINVAL);
  EXPECT_EQ(cleared, 1u);
  EXPECT_FALSE(replaced);
  EXPECT_ERRNO(registry_->Map(1, 0, kBase + k1M - k64K, 2 * k64K, &cleared, &replaced), EINVAL);
  EXPECT_TRUE(replaced);
}

}  // namespace
}  // namespace dmapin::agent
