// NodeAgent with real pinning (memlock) of another process's memory: the context works in the
// VMM's addresses, belongs to the VMM, and goes when the VMM exits (also across a restart).
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>

#include "agent/node/context_memory.h"
#include "agent/node/node_agent.h"
#include "agent/registry/memlock_backend.h"
#include "agent/store/state_store.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"
#include "testing/eventually.h"
#include "testing/fake_vmm.h"

namespace dmapin::agent {
namespace {

using harness::FakeVmm;

const uint64_t kPage = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));

class NodeAgentVmmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<MemlockBackend>> backend = MemlockBackend::Create();
    if (!backend.ok()) {
      GTEST_SKIP() << "memlock backend unavailable (needs root): " << backend.status();
    }
    backend_ = std::move(*backend);
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("vmm_agent_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    vmlck_before_ = *ReadVmLckBytes();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // A fresh agent over the test's state directory (the previous one must be gone).
  std::unique_ptr<NodeAgent> StartAgent() {
    store_.reset();
    absl::StatusOr<std::unique_ptr<StateStore>> store = StateStore::Open(dir_.string());
    EXPECT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    absl::StatusOr<std::unique_ptr<NodeAgent>> agent =
        NodeAgent::Create({.node_name = "n",
                           .backend = backend_.get(),
                           .store = store_.get(),
                           .memory_provider = provider_.get(),
                           .vmm_memory = true,
                           .manager_uids = {getuid()}});
    EXPECT_TRUE(agent.ok()) << agent.status();
    return agent.ok() ? std::move(*agent) : nullptr;
  }

  // The manager (this test process, by its uid) sets up a context for `vmm` with its memory.
  void SetUpVmm(NodeAgent& agent, const FakeVmm& vmm, const std::string& name,
                uint64_t registered_pages) {
    const Caller manager = Caller::Local(getpid(), getuid());
    absl::StatusOr<ContextView> context =
        agent.CreateContext({.name = name, .owner_pid = vmm.pid()}, manager);
    ASSERT_TRUE(context.ok()) << context.status();
    ASSERT_TRUE(context->owner.has_value());
    EXPECT_EQ(context->owner->pid, vmm.pid());
    absl::StatusOr<ContextView> attached =
        agent.AttachOwnerMemory(name, {{vmm.ua(), vmm.bytes()}}, manager);
    ASSERT_TRUE(attached.ok()) << attached.status();
    ASSERT_EQ(attached->slots.size(), 1u);
    EXPECT_EQ(attached->slots[0].ua, vmm.ua());
    ASSERT_TRUE(agent.CreateContainer({.name = name + "/c"}, manager).ok());
    absl::StatusOr<RegionView> region = agent.RegisterRegion(
        name + "/c", name, vmm.ua(), registered_pages * kPage, nullptr, manager);
    ASSERT_TRUE(region.ok()) << region.status();
  }

  std::unique_ptr<MemlockBackend> backend_;
  std::unique_ptr<ContextMemoryProvider> provider_ = NewBackedMemoryProvider("");
  std::filesystem::path dir_;
  std::unique_ptr<StateStore> store_;
  uint64_t vmlck_before_ = 0;
};

// The agent's own threads (the exit watch) act within seconds.
template <typename F>
bool Eventually(F done) {
  return harness::Eventually(done, absl::Seconds(10));
}

TEST_F(NodeAgentVmmTest, PinsTheVmmsOwnPagesAndReleasesThemWhenTheVmmExits) {
  absl::StatusOr<FakeVmm> vmm = FakeVmm::Start(64);
  ASSERT_TRUE(vmm.ok()) << vmm.status();
  std::unique_ptr<NodeAgent> agent = StartAgent();
  ASSERT_NE(agent, nullptr);
  SetUpVmm(*agent, *vmm, "vm", 32);
  EXPECT_EQ(*ReadVmLckBytes() - vmlck_before_, 32 * kPage);

  // The registry's frames are the VMM's: Translate (by the owner) equals its own pagemap.
  const Caller owner = Caller::Local(vmm->pid(), getuid());
  const uint64_t ua = vmm->ua() + 3 * kPage;
  absl::StatusOr<std::vector<uint64_t>> hpas = agent->Translate("vm", {ua}, owner);
  ASSERT_TRUE(hpas.ok()) << hpas.status();
  absl::StatusOr<uint64_t> frame = vmm->Hpa(ua);
  ASSERT_TRUE(frame.ok()) << frame.status();
  if (*frame != 0) {
    EXPECT_EQ(hpas->front(), *frame);
  }

  // The same bytes: written through the agent's view, read in the VMM.
  const uint64_t agent_ua = agent->GetContext("vm")->slots[0].agent_ua;
  std::memcpy(reinterpret_cast<void*>(agent_ua + 3 * kPage), "written by the agent", 20);
  EXPECT_EQ(*vmm->Read(ua, 20), "written by the agent");

  // Only the owner maps; the manager, another local process and TCP peers get EPERM, and
  // nothing changes.
  EXPECT_TRUE(agent->MapDma("vm/c", 0, vmm->ua(), 4 * kPage, owner).ok());
  for (const Caller& other :
       {Caller::Local(getpid(), getuid()), Caller::Local(1, getuid() + 1), Caller::Remote()}) {
    EXPECT_EQ(ErrnoOf(agent->MapDma("vm/c", 0x100000, vmm->ua(), kPage, other)), EPERM)
        << other.Describe();
    EXPECT_EQ(ErrnoOf(agent->UnmapDma("vm/c", 0, kPage, other)), EPERM) << other.Describe();
    EXPECT_EQ(ErrnoOf(agent->Translate("vm", {ua}, other).status()), EPERM) << other.Describe();
  }
  EXPECT_EQ(ErrnoOf(agent->TeardownContext("vm", nullptr, Caller::Local(1, getuid() + 1))), EPERM);
  EXPECT_EQ(ErrnoOf(agent
                        ->RegisterRegion("vm/c", "vm", vmm->ua() + 40 * kPage, kPage, nullptr,
                                         Caller::Local(1, getuid() + 1))
                        .status()),
            EPERM);
  EXPECT_EQ(agent->Lookup("vm", vmm->ua(), kPage)->value().info.mapped, 5u);  // 1 + 4 pages
  EXPECT_EQ(agent->Status().permission_denied, 11u);

  // Memory no slot covers: EFAULT (spec §2.6).
  EXPECT_EQ(ErrnoOf(agent->RegisterRegion("vm/c", "vm", vmm->ua() + vmm->bytes(), kPage).status()),
            EFAULT);

  // The VMM exits: the final cleanup releases the container and unpins every page.
  vmm->Kill();
  EXPECT_TRUE(Eventually([&] { return !agent->GetContext("vm").ok(); }));
  EXPECT_FALSE(agent->GetContainer("vm/c").ok());
  EXPECT_EQ(agent->Status().owner_exit_teardowns, 1u);
  EXPECT_EQ(*ReadVmLckBytes(), vmlck_before_);
  absl::Status invariants = agent->CheckInvariants();
  EXPECT_TRUE(invariants.ok()) << invariants;
}

// An owner's exit is remembered for the central service's event until a new context takes the
// name: that one's removal later is not a VMM exit.
TEST_F(NodeAgentVmmTest, AnExitIsForgottenWhenTheNameIsTakenAgain) {
  absl::StatusOr<FakeVmm> vmm = FakeVmm::Start(4);
  ASSERT_TRUE(vmm.ok()) << vmm.status();
  std::unique_ptr<NodeAgent> agent = StartAgent();
  ASSERT_NE(agent, nullptr);
  ASSERT_TRUE(agent->CreateContext({.name = "vm", .owner_pid = vmm->pid()}).ok());
  vmm->Kill();
  ASSERT_TRUE(Eventually([&] { return !agent->GetContext("vm").ok(); }));
  ASSERT_EQ(agent->RecentOwnerExits().size(), 1u);
  EXPECT_EQ(agent->RecentOwnerExits()[0].context, "vm");
  ASSERT_TRUE(agent->CreateContext({.name = "vm"}).ok());
  EXPECT_TRUE(agent->RecentOwnerExits().empty());
}

TEST_F(NodeAgentVmmTest, PrivateMemoryCannotBeAttached) {
  absl::StatusOr<FakeVmm> vmm = FakeVmm::Start(4, FakeVmm::Memory::kPrivateAnonymous);
  ASSERT_TRUE(vmm.ok()) << vmm.status();
  std::unique_ptr<NodeAgent> agent = StartAgent();
  ASSERT_NE(agent, nullptr);
  ASSERT_TRUE(agent->CreateContext({.name = "vm", .owner_pid = vmm->pid()}).ok());
  absl::StatusOr<ContextView> attached =
      agent->AttachOwnerMemory("vm", {{vmm->ua(), vmm->bytes()}});
  EXPECT_EQ(ErrnoOf(attached.status()), EINVAL) << attached.status();
  EXPECT_TRUE(agent->GetContext("vm")->slots.empty());
}

TEST_F(NodeAgentVmmTest, NamingAnotherProcessTakesAManager) {
  absl::StatusOr<FakeVmm> vmm = FakeVmm::Start(4);
  ASSERT_TRUE(vmm.ok()) << vmm.status();
  std::unique_ptr<NodeAgent> agent = StartAgent();
  ASSERT_NE(agent, nullptr);
  const uid_t not_a_manager = getuid() + 1;
  EXPECT_EQ(ErrnoOf(agent
                        ->CreateContext({.name = "vm", .owner_pid = vmm->pid()},
                                        Caller::Local(getpid(), not_a_manager))
                        .status()),
            EPERM);
  EXPECT_EQ(
      ErrnoOf(
          agent->CreateContext({.name = "vm", .owner_pid = vmm->pid()}, Caller::Remote()).status()),
      EPERM);
  // A process creating its own context owns it.
  absl::StatusOr<ContextView> own =
      agent->CreateContext({.name = "own"}, Caller::Local(vmm->pid(), not_a_manager));
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_EQ(own->owner->pid, vmm->pid());
  EXPECT_FALSE(agent->GetContext("vm").ok());
}

TEST_F(NodeAgentVmmTest, RestartReattachesALiveVmmAndTearsDownOneThatExited) {
  absl::StatusOr<FakeVmm> alive = FakeVmm::Start(16);
  absl::StatusOr<FakeVmm> exits = FakeVmm::Start(16);
  ASSERT_TRUE(alive.ok() && exits.ok());
  std::vector<uint64_t> hpas_before;
  {
    std::unique_ptr<NodeAgent> agent = StartAgent();
    ASSERT_NE(agent, nullptr);
    SetUpVmm(*agent, *alive, "alive", 8);
    SetUpVmm(*agent, *exits, "exits", 8);
    ASSERT_TRUE(
        agent->MapDma("alive/c", 0, alive->ua(), 2 * kPage, Caller::Local(alive->pid(), getuid()))
            .ok());
    hpas_before = *agent->Translate("alive", {alive->ua(), alive->ua() + 7 * kPage});
  }  // the agent goes: its mappings and pins with it
  EXPECT_EQ(*ReadVmLckBytes(), vmlck_before_);
  exits->Kill();  // while the agent is down
  std::unique_ptr<NodeAgent> agent = StartAgent();
  ASSERT_NE(agent, nullptr);
  EXPECT_FALSE(agent->GetContext("exits").ok());
  EXPECT_FALSE(agent->GetContainer("exits/c").ok());
  EXPECT_EQ(agent->Status().owner_exits_at_recovery, 1u);
  absl::StatusOr<ContextView> context = agent->GetContext("alive");
  ASSERT_TRUE(context.ok()) << context.status();
  EXPECT_EQ(context->locked_bytes, 8 * kPage);
  ASSERT_EQ(context->slots.size(), 1u);
  EXPECT_EQ(*agent->Translate("alive", {alive->ua(), alive->ua() + 7 * kPage}), hpas_before);
  EXPECT_EQ(agent->Lookup("alive", alive->ua(), kPage)->value().info.mapped, 3u);  // 1 + 2 pages
  EXPECT_EQ(*ReadVmLckBytes() - vmlck_before_, 8 * kPage);
  // And the recovered owner is watched again.
  alive->Kill();
  EXPECT_TRUE(Eventually([&] { return !agent->GetContext("alive").ok(); }));
  EXPECT_EQ(*ReadVmLckBytes(), vmlck_before_);
}

}  // namespace
}  // namespace dmapin::agent
