// NodeAgent over the VFIO backends, with the scripted fake kernel (agent/vfio/fake_vfio_kernel.h)
// standing in for /dev/vfio: every registry change reaches the kernel, a kernel refusal leaves
// the registry and the store unchanged, a store refusal leaves the registry and the kernel
// unchanged, and a restart reopens the containers and replays.
#include <linux/vfio.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "agent/node/node_agent.h"
#include "agent/registry/sim_backend.h"
#include "agent/store/state_store.h"
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
const std::vector<std::string> kGroups = {"/dev/vfio/7"};

class NodeAgentVfioTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("node_agent_vfio_test_" + std::to_string(getpid()));
    std::filesystem::remove_all(dir_);
    Restart();
  }
  void TearDown() override {
    if (agent_ != nullptr) {
      absl::Status invariants = agent_->CheckInvariants();
      EXPECT_TRUE(invariants.ok()) << invariants;
    }
    agent_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  bool spapr() const { return std::string(GetParam()) == kVfioSpaprV2Backend; }

  // A restart: the process's pins and the kernel's containers die with it; the store stays.
  // With `keep_kernel`, the kernel stays too: what a VMM's descriptors hold (the device
  // handoff) outlives the agent, whose own descriptors close with it.
  void Restart(StateStoreOptions store_options = {}, bool keep_kernel = false) {
    agent_.reset();
    store_.reset();
    if (!keep_kernel || kernel_ == nullptr) kernel_ = std::make_unique<FakeVfioKernel>();
    sim_ = *SimBackend::Create(sim_options_);
    store_ = *StateStore::Open(dir_.string(), std::move(store_options));
    const std::string backend = GetParam();
    absl::StatusOr<std::unique_ptr<NodeAgent>> agent = NodeAgent::Create(
        {.node_name = "node-a",
         .backend = sim_.get(),
         .store = store_.get(),
         .vfio_backend = backend,
         .open_vfio_container = [this, backend](const std::vector<std::string>& groups)
             -> absl::StatusOr<std::unique_ptr<VfioContainerDriver>> {
           std::unique_ptr<VfioContainerDriver> driver =
               NewVfioContainerDriver(backend, kernel_.get());
           if (absl::Status status = driver->Open(groups); !status.ok()) return status;
           return driver;
         },
         .new_vfio_driver = [this,
                             backend] { return NewVfioContainerDriver(backend, kernel_.get()); }});
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = std::move(*agent);
  }

  // IOMMU pages the kernel has installed for guest mappings.
  uint64_t KernelMappedBytes() const {
    if (spapr()) return kernel_->SpaprTces().size() * k4K;
    uint64_t bytes = 0;
    for (const FakeType1Dma& dma : kernel_->Type1Dmas()) {
      if (dma.iova < (uint64_t{1} << 32)) bytes += dma.size;  // below the type1 pin range
    }
    return bytes;
  }
  // Regions the kernel holds pre-registered (SPAPR) or pinned in the pin range (type1).
  size_t KernelRegions() const {
    if (spapr()) return kernel_->SpaprRegions().size();
    size_t pins = 0;
    for (const FakeType1Dma& dma : kernel_->Type1Dmas()) pins += dma.iova >= (uint64_t{1} << 32);
    return pins;
  }

  // The ioctl that pins a region: SPAPR pre-registers, type1 maps into its pin range.
  unsigned long RegisterIoctl() const {  // NOLINT(runtime/int)
    return spapr() ? VFIO_IOMMU_SPAPR_REGISTER_MEMORY : VFIO_IOMMU_MAP_DMA;
  }
  unsigned long UnregisterIoctl() const {  // NOLINT(runtime/int)
    return spapr() ? VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY : VFIO_IOMMU_UNMAP_DMA;
  }

  // A restart whose store refuses every transaction (commit) or journal append (folding only when
  // asked, so an append is not refused by a failed background fold).
  void RestartRefusing(bool commit) {
    StateStoreOptions options{.journal_fold_interval = absl::Hours(1)};
    if (commit) {
      options.fail_commit_hook = [](int) { return absl::UnavailableError("injected"); };
    } else {
      options.fail_journal_append_hook = [](uint64_t) {
        return absl::UnavailableError("injected");
      };
    }
    Restart(std::move(options));
  }

  // What the registry and the kernel hold, for comparisons before and after a refused change.
  std::string State() const {
    std::string out = testing::PrintToString(Regions()) +
                      " kernel pages=" + testing::PrintToString(KernelPages()) +
                      " regions=" + std::to_string(KernelRegions());
    for (const ContainerView& view : agent_->ListContainers()) {
      out += " " + view.name + ":" + view.context + "/" + std::to_string(view.installed_entries);
    }
    return out;
  }
  // The kernel's guest mappings, as iova -> ua of each 4 KiB IOMMU page.
  std::map<uint64_t, uint64_t> KernelPages() const {
    if (spapr()) return kernel_->SpaprTces();
    std::map<uint64_t, uint64_t> pages;
    for (const FakeType1Dma& dma : kernel_->Type1Dmas()) {
      if (dma.iova >= (uint64_t{1} << 32)) continue;  // the pin range
      for (uint64_t at = 0; at < dma.size; at += k4K) pages[dma.iova + at] = dma.vaddr + at;
    }
    return pages;
  }
  std::vector<std::tuple<uint64_t, uint64_t, uint64_t>> Regions() const {
    std::vector<std::tuple<uint64_t, uint64_t, uint64_t>> regions;
    absl::StatusOr<std::vector<RegionView>> views = agent_->ListRegions("", false);
    EXPECT_TRUE(views.ok()) << views.status();
    if (!views.ok()) return regions;
    for (const RegionView& view : *views) {
      regions.emplace_back(view.info.ua, view.info.used, view.info.mapped);
    }
    return regions;
  }

  SimBackendOptions sim_options_{.page_size = k64K};
  std::filesystem::path dir_;
  std::unique_ptr<FakeVfioKernel> kernel_;
  std::unique_ptr<SimBackend> sim_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<NodeAgent> agent_;
};

TEST_P(NodeAgentVfioTest, ContainersNeedGroupsAndTakeTheKernelsWindow) {
  EXPECT_EQ(ErrnoOf(agent_->CreateContainer({.name = "c"}).status()), EINVAL);
  EXPECT_EQ(
      ErrnoOf(agent_->CreateContainer({.name = "c", .vfio_groups = {"/dev/vfio/99"}}).status()),
      ENOENT);
  EXPECT_EQ(
      ErrnoOf(
          agent_->CreateContainer({.name = "c", .iommu_page_size = 1 << 24, .vfio_groups = kGroups})
              .status()),
      EINVAL);
  EXPECT_TRUE(kernel_->OpenFds().empty()) << "a refused container leaked descriptors";
  absl::StatusOr<ContainerView> view =
      agent_->CreateContainer({.name = "c", .vfio_groups = kGroups});
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->vfio_groups, kGroups);
  EXPECT_EQ(view->options.iommu_page_size, k4K);  // both fakes offer 4 KiB IOMMU pages
  EXPECT_GT(view->options.window_size, 0u);
  EXPECT_EQ(agent_->Status().backend, GetParam());
}

TEST_P(NodeAgentVfioTest, EveryChangeReachesTheKernelAndEbusyComesFromTheRegistry) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase, k1M).ok());
  EXPECT_EQ(KernelRegions(), 1u);
  ASSERT_TRUE(agent_->MapDma("c", 0, kBase, 4 * k4K).ok());
  EXPECT_EQ(KernelMappedBytes(), 4 * k4K);
  // A remap of part of the range and a partial unmap, as the registry allows them.
  ASSERT_TRUE(agent_->MapDma("c", 2 * k4K, kBase + 8 * k4K, 4 * k4K).ok());
  EXPECT_EQ(KernelMappedBytes(), 6 * k4K);
  ASSERT_TRUE(agent_->UnmapDma("c", k4K, k4K).ok());
  EXPECT_EQ(KernelMappedBytes(), 5 * k4K);

  // Spec §3.4 from the registry, whatever the kernel would answer.
  EXPECT_EQ(ErrnoOf(agent_->UnregisterRegion("c", kBase, k1M)), EBUSY);
  EXPECT_EQ(KernelRegions(), 1u);
  ASSERT_TRUE(agent_->UnmapDma("c", 0, 6 * k4K).ok());
  EXPECT_EQ(KernelMappedBytes(), 0u);
  ASSERT_TRUE(agent_->UnregisterRegion("c", kBase, k1M).ok());
  EXPECT_EQ(KernelRegions(), 0u);

  ASSERT_TRUE(agent_->ReleaseContainer("c").ok());
  EXPECT_TRUE(kernel_->OpenFds().empty()) << "the released container is still open";
}

TEST_P(NodeAgentVfioTest, AKernelRefusalChangesNothing) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  // SPAPR pre-registers with REGISTER_MEMORY; type1 pins with MAP_DMA into its pin range.
  kernel_->InjectIoctlErrno(spapr() ? VFIO_IOMMU_SPAPR_REGISTER_MEMORY : VFIO_IOMMU_MAP_DMA, 1,
                            ENOMEM);
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("c", "vm", kBase, k1M).status()), ENOMEM);
  EXPECT_TRUE(agent_->ListRegions("", false)->empty());
  EXPECT_TRUE(agent_->GetContainer("c")->context.empty()) << "a refused register bound it";

  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase, k1M).ok());
  kernel_->InjectIoctlErrno(VFIO_IOMMU_MAP_DMA, 1, EFAULT);
  EXPECT_EQ(ErrnoOf(agent_->MapDma("c", 0, kBase, 2 * k4K)), EFAULT);
  EXPECT_EQ((*agent_->ListRegions("", false))[0].info.mapped, 1u);
  EXPECT_EQ(KernelMappedBytes(), 0u);

  kernel_->InjectIoctlErrno(VFIO_IOMMU_UNMAP_DMA, 1, EIO);
  ASSERT_TRUE(agent_->MapDma("c", 0, kBase, 2 * k4K).ok());
  EXPECT_EQ(ErrnoOf(agent_->UnmapDma("c", 0, 2 * k4K)), EIO);
  EXPECT_EQ((*agent_->ListRegions("", false))[0].info.mapped, 3u) << "the registry unmapped";
  EXPECT_EQ(KernelMappedBytes(), 2 * k4K);
  EXPECT_EQ(agent_->Status().vfio_inconsistencies, 0u);
}

// The registry's checks come before the kernel: a register it refuses (over the node's limits,
// overlapping, twice in one container) never reaches the kernel, which would otherwise pin (or try
// to pin) it first.
TEST_P(NodeAgentVfioTest, ARegisterTheRegistryRefusesNeverReachesTheKernel) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase, k1M).ok());
  kernel_->ClearCalls();
  const uint64_t half = uint64_t{1} << 63;  // [2^63, 2^64): no overlap with the region at kBase
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("c", "vm", half, half).status()), ENOMEM);
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("c", "vm", kBase + k64K, k1M).status()), EINVAL);
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("c", "vm", kBase, k1M).status()), EBUSY);
  EXPECT_TRUE(kernel_->IoctlCalls(RegisterIoctl()).empty())
      << testing::PrintToString(kernel_->CallLog());
  EXPECT_EQ(KernelRegions(), 1u);
  EXPECT_EQ(agent_->ListRegions("", false)->size(), 1u);
  EXPECT_EQ(agent_->Status().vfio_inconsistencies, 0u);
}

// A failure after the kernel call (the registry's pin of a hole) undoes the kernel call.
TEST_P(NodeAgentVfioTest, ARegistryFailureAfterTheKernelCallUndoesIt) {
  sim_options_.holes = {{kBase + 4 * k64K, k64K}};
  Restart();
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  kernel_->ClearCalls();
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("c", "vm", kBase, k1M).status()), EFAULT);
  EXPECT_EQ(kernel_->IoctlCalls(RegisterIoctl()).size(), 1u);
  EXPECT_EQ(kernel_->IoctlCalls(UnregisterIoctl()).size(), 1u) << "the kernel call was not undone";
  EXPECT_EQ(KernelRegions(), 0u);
  EXPECT_TRUE(agent_->ListRegions("", false)->empty());
  EXPECT_TRUE(agent_->GetContainer("c")->context.empty());
  EXPECT_EQ(agent_->Status().vfio_inconsistencies, 0u);
  // An undo the kernel refuses is counted: registry and kernel now disagree.
  kernel_->InjectIoctlErrno(UnregisterIoctl(), 1, EIO);
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("c", "vm", kBase, k1M).status()), EFAULT);
  EXPECT_EQ(agent_->Status().vfio_inconsistencies, 1u);
  // The registry is still consistent (TearDown checks its invariants); a region without the hole
  // goes through.
  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase + k1M, k1M).ok());
}

// The kernel unmaps first, so the registry's checks must come before it: a misaligned unmap
// reached type1's driver, which dropped the kernel mapping and could not map back its misaligned
// remainder, while the registry (refusing the range) kept the mapping.
TEST_P(NodeAgentVfioTest, AnUnmapTheRegistryRefusesNeverReachesTheKernel) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c", 0, kBase, 2 * k4K).ok());
  kernel_->ClearCalls();
  EXPECT_EQ(ErrnoOf(agent_->UnmapDma("c", 1, k4K)), EINVAL);
  EXPECT_EQ(ErrnoOf(agent_->UnmapDma("c", 0, k4K + 1)), EINVAL);
  EXPECT_EQ(ErrnoOf(agent_->UnmapDma("c", 0, 0)), EINVAL);
  EXPECT_TRUE(kernel_->IoctlCalls(VFIO_IOMMU_UNMAP_DMA).empty())
      << testing::PrintToString(kernel_->CallLog());
  EXPECT_EQ(KernelMappedBytes(), 2 * k4K);
  EXPECT_EQ((*agent_->ListRegions("", false))[0].info.mapped, 3u);
  ASSERT_TRUE(agent_->UnmapDma("c", 0, 2 * k4K).ok());
  EXPECT_EQ(KernelMappedBytes(), 0u);
}

TEST_P(NodeAgentVfioTest, RestartReopensTheContainersAndReplays) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "idle", .vfio_groups = {"/dev/vfio/8"}}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c", 0, kBase, 3 * k4K).ok());
  Restart();
  EXPECT_EQ(KernelRegions(), 1u);
  EXPECT_EQ(KernelMappedBytes(), 3 * k4K);
  EXPECT_EQ(kernel_->OpenFds().size(), 4u) << "two containers, each with its group";
  EXPECT_EQ((*agent_->ListRegions("", false))[0].info.mapped, 4u);
  ASSERT_TRUE(agent_->UnmapDma("c", 0, 3 * k4K).ok());
  ASSERT_TRUE(agent_->UnregisterRegion("c", kBase, k1M).ok());
  EXPECT_EQ(KernelRegions(), 0u);
}

// Issue 11: a change the store refuses is undone in the kernel as in the registry.
// The device handoff: the VMM (here: descriptors the test keeps in the fake kernel's table) holds
// the device and a duplicate of the container, so a restart of the agent unmaps nothing; the new
// agent waits for the container (EAGAIN), takes it back and serves it again.

TEST_P(NodeAgentVfioTest, AHandedOffContainerKeepsItsMappingsAcrossARestart) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c", 0, kBase, k64K).ok());
  ASSERT_TRUE(agent_->MapDma("c", 2 * k64K, kBase + k64K, k64K).ok());
  EXPECT_EQ(ErrnoOf(agent_->OpenDevices("c", {"0000:00:08.0"}).status()), ENODEV);  // not ours
  EXPECT_EQ(ErrnoOf(agent_->OpenDevices("c", {}).status()), EINVAL);
  absl::StatusOr<DeviceHandoff> handoff = agent_->OpenDevices("c", {"0000:00:07.0"});
  ASSERT_TRUE(handoff.ok()) << handoff.status();
  ASSERT_EQ(handoff->fds.size(), 2u);
  EXPECT_TRUE(handoff->container.handed_off);
  // The VMM's now: they stay in the fake kernel's table across the agent's restarts.
  const int vmm_container = handoff->fds[0].release();
  const int vmm_device = handoff->fds[1].release();
  const std::map<uint64_t, uint64_t> pages = KernelPages();
  const std::string before = testing::PrintToString(Regions());

  for (const bool planned : {false, true}) {
    SCOPED_TRACE(planned ? "planned exit" : "crash");
    if (planned) agent_->PrepareForExit();
    Restart({}, /*keep_kernel=*/true);
    EXPECT_EQ(KernelPages().size(), pages.size());  // nothing unmapped
    EXPECT_EQ(testing::PrintToString(Regions()), before);
    ASSERT_TRUE(agent_->GetContainer("c")->awaiting_adoption);
    EXPECT_EQ(agent_->Status().containers_awaiting_adoption, 1u);
    // Until the VMM gives it back: EAGAIN for what would change the kernel.
    EXPECT_EQ(ErrnoOf(agent_->MapDma("c", 4 * k64K, kBase, k64K)), EAGAIN);
    EXPECT_EQ(ErrnoOf(agent_->UnmapDma("c", 0, k64K)), EAGAIN);
    EXPECT_EQ(ErrnoOf(agent_->ReleaseContainer("c")), EAGAIN);
    absl::Status registered = agent_->RegisterRegion("c", "vm", kBase + k1M, k1M).status();
    EXPECT_EQ(ErrnoOf(registered), EAGAIN) << registered;

    absl::StatusOr<AdoptionReport> adopted =
        agent_->AdoptContainer("c", kernel_->Dup(vmm_container));
    if (spapr()) {
      // The kernel binds a SPAPR container to the mm that first registered: no other process
      // may change it. The container stays as the old agent left it.
      EXPECT_EQ(ErrnoOf(adopted.status()), EOPNOTSUPP);
      EXPECT_TRUE(agent_->GetContainer("c")->awaiting_adoption);
      break;
    }
    ASSERT_TRUE(adopted.ok()) << adopted.status();
    EXPECT_EQ(adopted->registrations, 1u);
    EXPECT_EQ(adopted->mappings, 2u);
    EXPECT_EQ(adopted->inconsistencies, 0u);
    EXPECT_EQ(ErrnoOf(agent_->AdoptContainer("c", kernel_->Dup(vmm_container)).status()), EBUSY);
    for (const FakeType1Dma& dma : kernel_->Type1Dmas()) EXPECT_FALSE(dma.vaddr_invalid);
    EXPECT_EQ(KernelPages(), pages);
    const NodeStatusView status = agent_->Status();
    EXPECT_EQ(status.containers_awaiting_adoption, 0u);
    EXPECT_EQ(status.containers_adopted, 1u);
    EXPECT_FALSE(agent_->GetContainer("c")->awaiting_adoption);
    EXPECT_TRUE(agent_->GetContainer("c")->handed_off);
    // Served again: a map, an unmap.
    absl::Status mapped = agent_->MapDma("c", 4 * k64K, kBase + 2 * k64K, k64K);
    ASSERT_TRUE(mapped.ok()) << mapped;
    ASSERT_TRUE(agent_->UnmapDma("c", 4 * k64K, k64K).ok());
    EXPECT_EQ(KernelPages(), pages);
  }
  if (!spapr()) {
    // A release while the VMM still holds the device takes everything out of the kernel itself.
    ASSERT_TRUE(agent_->ReleaseContainer("c").ok());
    EXPECT_TRUE(kernel_->Type1Dmas().empty());
  }
  EXPECT_EQ(kernel_->Close(vmm_device), 0);
  EXPECT_EQ(kernel_->Close(vmm_container), 0);
}

TEST_P(NodeAgentVfioTest, ARefusedRegisterOrMapIsUndoneInTheKernelToo) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  const std::string unregistered = State();
  RestartRefusing(/*commit=*/true);
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("c", "vm", kBase, k1M).status()), EIO);
  EXPECT_EQ(State(), unregistered);
  EXPECT_EQ(KernelRegions(), 0u);

  Restart();
  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c", 0, kBase, 2 * k4K).ok());
  const std::string mapped = State();
  RestartRefusing(/*commit=*/false);
  EXPECT_EQ(State(), mapped);
  EXPECT_EQ(ErrnoOf(agent_->MapDma("c", 4 * k4K, kBase + k64K, 2 * k4K)), EIO);
  EXPECT_EQ(State(), mapped);
  EXPECT_EQ(KernelMappedBytes(), 2 * k4K);
  EXPECT_EQ(agent_->Status().refused_change_undo_failures, 0u);
  EXPECT_EQ(agent_->Status().vfio_inconsistencies, 0u);
  Restart();
  EXPECT_EQ(State(), mapped);
}

TEST_P(NodeAgentVfioTest, ARefusedUnregisterIsUndoneInTheKernelToo) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase, k1M).ok());
  const std::string before = State();
  RestartRefusing(/*commit=*/true);
  kernel_->ClearCalls();
  EXPECT_EQ(ErrnoOf(agent_->UnregisterRegion("c", kBase, k1M)), EIO);
  EXPECT_EQ(kernel_->IoctlCalls(RegisterIoctl()).size(), 1u) << "the kernel call was not undone";
  EXPECT_EQ(State(), before);
  EXPECT_EQ(agent_->Status().refused_change_undo_failures, 0u);
  Restart();
  EXPECT_EQ(State(), before);
}

// A refused container is closed again; nothing of it stays open in the kernel.
TEST_P(NodeAgentVfioTest, ARefusedContainerIsClosed) {
  RestartRefusing(/*commit=*/true);
  EXPECT_EQ(ErrnoOf(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).status()), EIO);
  EXPECT_TRUE(kernel_->OpenFds().empty()) << "the refused container is still open";
  EXPECT_TRUE(agent_->ListContainers().empty());
  EXPECT_EQ(agent_->Status().vfio_inconsistencies, 0u);
}

// An unmap is recorded before the registry sees it, but after the kernel (the device must not
// reach what the registry may release). When the record is refused the registry still shows the
// acknowledged mapping, and the kernel gets it back from the store.
TEST_P(NodeAgentVfioTest, ARefusedUnmapIsUndoneInTheKernel) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c", .vfio_groups = kGroups}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c", "vm", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c", 0, kBase, 2 * k4K).ok());
  ASSERT_TRUE(agent_->MapDma("c", 4 * k4K, kBase + k64K, k4K).ok());
  const std::string before = State();
  RestartRefusing(/*commit=*/false);
  kernel_->ClearCalls();
  EXPECT_EQ(ErrnoOf(agent_->UnmapDma("c", k4K, 4 * k4K)), EIO);
  EXPECT_FALSE(kernel_->IoctlCalls(VFIO_IOMMU_UNMAP_DMA).empty());
  EXPECT_EQ(State(), before);
  EXPECT_EQ(agent_->Status().refused_change_undo_failures, 0u);
  // A remap's overwritten entries come back in the kernel too.
  RestartRefusing(/*commit=*/false);
  EXPECT_EQ(ErrnoOf(agent_->MapDma("c", k4K, kBase + 2 * k64K, 4 * k4K)), EIO);
  EXPECT_EQ(State(), before);
  EXPECT_EQ(agent_->Status().refused_change_undo_failures, 0u);
  Restart();
  EXPECT_EQ(State(), before);
}

INSTANTIATE_TEST_SUITE_P(Backends, NodeAgentVfioTest,
                         ::testing::Values(kVfioSpaprV2Backend, kVfioType1Backend));

}  // namespace
}  // namespace dmapin::agent
