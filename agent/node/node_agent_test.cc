#include "agent/node/node_agent.h"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/node/context_memory.h"
#include "agent/registry/memlock_backend.h"
#include "agent/registry/sim_backend.h"
#include "agent/store/state_store.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

constexpr uint64_t k64K = 0x10000;
constexpr uint64_t k1M = 0x100000;
constexpr uint64_t kBase = 0x10000000;

// Regions as comparable tuples: (context, ua, size, used, mapped, pending, holders).
using RegionKey =
    std::tuple<std::string, uint64_t, uint64_t, uint64_t, uint64_t, bool, std::vector<std::string>>;

std::vector<RegionKey> Snapshot(const NodeAgent& agent) {
  std::vector<RegionKey> keys;
  absl::StatusOr<std::vector<RegionView>> regions = agent.ListRegions("", false);
  EXPECT_TRUE(regions.ok()) << regions.status();
  if (!regions.ok()) return keys;
  for (const RegionView& view : *regions) {
    keys.emplace_back(view.context, view.info.ua, view.info.size, view.info.used, view.info.mapped,
                      view.info.pending_release, view.containers);
  }
  return keys;
}

// Everything a client reads of the agent's state (not its operation counters), as text: the
// regions, contexts and containers, the node's totals, and the translation of `probes`
// ((context, ua) pairs; "-" where it fails).
std::string Reads(const NodeAgent& agent,
                  const std::vector<std::pair<std::string, uint64_t>>& probes = {}) {
  std::string out;
  absl::StatusOr<std::vector<RegionView>> regions = agent.ListRegions("", false);
  if (!regions.ok()) return regions.status().ToString();
  for (const RegionView& view : *regions) {
    absl::StrAppend(&out, "region ", view.context, " ua=", absl::Hex(view.info.ua),
                    " size=", absl::Hex(view.info.size), " used=", view.info.used,
                    " mapped=", view.info.mapped, " pending=", view.info.pending_release,
                    " holders=", absl::StrJoin(view.containers, ","), "\n");
  }
  for (const ContextView& view : agent.ListContexts()) {
    absl::StrAppend(&out, "context ", view.name, " locked=", view.locked_bytes,
                    " regions=", view.regions, " containers=", absl::StrJoin(view.containers, ","),
                    "\n");
  }
  for (const ContainerView& view : agent.ListContainers()) {
    absl::StrAppend(&out, "container ", view.name, " context=", view.context,
                    " held=", view.held_regions, " installed=", view.installed_entries, "\n");
  }
  const NodeStatusView status = agent.Status();
  absl::StrAppend(&out, "node contexts=", status.contexts, " containers=", status.containers,
                  " regions=", status.regions, " locked=", status.locked_bytes,
                  " installed=", status.installed_entries, "\n");
  for (const auto& [context, ua] : probes) {
    absl::StatusOr<std::vector<uint64_t>> hpas = agent.Translate(context, {ua});
    absl::StrAppend(&out, "translate ", context, " ", absl::Hex(ua), " = ",
                    hpas.ok() ? absl::StrCat(absl::Hex((*hpas)[0])) : "-", "\n");
    absl::StatusOr<std::optional<RegionView>> region = agent.Lookup(context, ua, k64K);
    absl::StrAppend(
        &out, "lookup ", context, " ", absl::Hex(ua), " = ",
        region.ok() && region->has_value() ? absl::StrCat(absl::Hex((*region)->info.ua)) : "-",
        "\n");
  }
  return out;
}

absl::Status Injected(int) { return absl::UnavailableError("injected disk failure"); }
absl::Status InjectedAppend(uint64_t) { return absl::UnavailableError("injected disk failure"); }

class NodeAgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("node_agent_test_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    sim_ = *SimBackend::Create({.page_size = k64K});
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

  // Simulates a restart: a fresh backend (pins die with the process), store reopened.
  void Restart(StateStoreOptions options = {}) {
    agent_.reset();
    store_.reset();
    sim_ = *SimBackend::Create({.page_size = k64K});
    auto store = StateStore::Open(dir_.string(), std::move(options));
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    auto agent = NodeAgent::Create({.node_name = "node-a",
                                    .backend = sim_.get(),
                                    .store = store_.get(),
                                    .limits = limits_,
                                    .max_translate_uas = max_translate_uas_,
                                    .max_listed_hpas = max_listed_hpas_});
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = std::move(*agent);
  }

  // Restarts with a store that refuses every transaction (commit = true) or every journal
  // append, folding the journal only when asked (so a journal append is not refused because a
  // background fold failed first).
  void RestartRefusing(bool commit) {
    StateStoreOptions options{.journal_fold_interval = absl::Hours(1)};
    if (commit) {
      options.fail_commit_hook = Injected;
    } else {
      options.fail_journal_append_hook = InjectedAppend;
    }
    Restart(std::move(options));
  }

  // Expects `status` to be the refusal of a store failure, every read to equal `before`, the
  // same after a restart (nothing of the refused change became durable), and `undo_failures`
  // refused changes that could not be undone.
  void ExpectRefusedAndInvisible(const absl::Status& status, const std::string& before,
                                 const std::vector<std::pair<std::string, uint64_t>>& probes,
                                 uint64_t undo_failures = 0) {
    EXPECT_EQ(ErrnoOf(status), EIO) << status;
    EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
    EXPECT_FALSE(agent_->healthy());
    EXPECT_EQ(agent_->Status().refused_change_undo_failures, undo_failures);
    if (undo_failures == 0) {
      EXPECT_EQ(Reads(*agent_, probes), before);
    }
    Restart();
    EXPECT_EQ(Reads(*agent_, probes), before) << "after the restart";
  }

  void AddNames(absl::string_view context, std::vector<std::string> containers) {
    ASSERT_TRUE(agent_->CreateContext({.name = std::string(context)}).ok());
    for (const std::string& name : containers) {
      ASSERT_TRUE(agent_->CreateContainer({.name = name}).ok());
    }
  }

  // What Restart gives the agent.
  RegistryLimits limits_ = DefaultRegistryLimits();
  uint64_t max_translate_uas_ = uint64_t{1} << 20;
  uint64_t max_listed_hpas_ = uint64_t{1} << 20;

  std::filesystem::path dir_;
  std::unique_ptr<SimBackend> sim_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<NodeAgent> agent_;
};

TEST_F(NodeAgentTest, NamesAreValidated) {
  EXPECT_EQ(ErrnoOf(agent_->CreateContext({.name = ""}).status()), EINVAL);
  EXPECT_EQ(ErrnoOf(agent_->CreateContext({.name = "vm 1"}).status()), EINVAL);
  EXPECT_EQ(ErrnoOf(agent_->CreateContainer({.name = std::string(129, 'a')}).status()), EINVAL);
  ASSERT_TRUE(agent_->CreateContext({.name = "vm-1/ram_0.a"}).ok());
  EXPECT_EQ(ErrnoOf(agent_->CreateContext({.name = "vm-1/ram_0.a"}).status()), EEXIST);
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("nope", "vm-1/ram_0.a", kBase, k1M).status()), ENOENT);
  EXPECT_EQ(ErrnoOf(agent_->MapDma("nope", 0, kBase, k64K)), ENOENT);
}

TEST_F(NodeAgentTest, StateSurvivesRestartWithCounters) {
  AddNames("vm-1", {"c1", "c2"});
  ASSERT_TRUE(agent_->CreateContext({.name = "vm-2", .memlock_limit_bytes = 4 * k1M}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c3", .iommu_page_size = 0x1000}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase + 2 * k1M, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c3", "vm-2", kBase, 2 * k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, 4 * k64K).ok());
  ASSERT_TRUE(agent_->MapDma("c2", 0, kBase + 2 * k1M, k64K).ok());
  ASSERT_TRUE(agent_->MapDma("c3", 0x10000, kBase, 0x3000).ok());
  // Remap the middle of c1's range, unmap a piece: the store must split and trim rows.
  ASSERT_TRUE(agent_->MapDma("c1", k64K, kBase + 2 * k1M, k64K).ok());
  ASSERT_TRUE(agent_->UnmapDma("c1", 3 * k64K, k64K).ok());
  const auto before = Snapshot(*agent_);
  const auto translate_before = *agent_->Translate("vm-1", {kBase + 0x1234});
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);
  EXPECT_EQ(agent_->GetContext("vm-2")->spec.memlock_limit_bytes, 4 * k1M);
  EXPECT_EQ(agent_->GetContainer("c3")->options.iommu_page_size, 0x1000u);
  EXPECT_EQ(agent_->GetContainer("c1")->installed_entries, 3u);
  EXPECT_EQ(*agent_->Translate("vm-1", {kBase + 0x1234}), translate_before);
  // New ids do not collide with recovered ones.
  ASSERT_TRUE(agent_->CreateContainer({.name = "c4"}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c4", "vm-1", kBase, k1M).ok());
}

TEST_F(NodeAgentTest, EbusyLeavesDurableStateUnchanged) {
  AddNames("vm-1", {"c1"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, k64K).ok());
  EXPECT_EQ(ErrnoOf(agent_->UnregisterRegion("c1", kBase, k1M)), EBUSY);
  const auto before = Snapshot(*agent_);
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);
  ASSERT_TRUE(agent_->UnmapDma("c1", 0, k64K).ok());
  ASSERT_TRUE(agent_->UnregisterRegion("c1", kBase, k1M).ok());
  Restart();
  EXPECT_TRUE(Snapshot(*agent_).empty());
}

TEST_F(NodeAgentTest, PendingReleaseSurvivesRestartAndCompletesAfterUnmap) {
  AddNames("vm-1", {"c1", "c2"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-1", kBase + k1M, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c2", 0, kBase, 2 * k64K).ok());
  ASSERT_TRUE(agent_->ReleaseContainer("c1").ok());
  auto region = agent_->Lookup("vm-1", kBase, k1M);
  ASSERT_TRUE(region->has_value());
  EXPECT_TRUE((*region)->info.pending_release);
  const auto before = Snapshot(*agent_);
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);
  EXPECT_EQ(ErrnoOf(agent_->GetContainer("c1").status()), ENOENT);
  ASSERT_TRUE(agent_->UnmapDma("c2", 0, 2 * k64K).ok());
  EXPECT_FALSE(agent_->Lookup("vm-1", kBase, k1M)->has_value());
  Restart();
  EXPECT_FALSE(agent_->Lookup("vm-1", kBase, k1M)->has_value());
  EXPECT_EQ(agent_->GetContext("vm-1")->locked_bytes, k1M);
}

// Spec §4: a container that registers a region pending release adds a user beside the pending
// reference; both survive a restart, and the pending reference is dropped (and persisted as
// dropped) when the last mapping goes, leaving the region with its new holder.
TEST_F(NodeAgentTest, PendingRegionRegisteredAgainSurvivesRestartWithBothUsers) {
  AddNames("vm-1", {"c1", "c2", "c3"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-1", kBase + k1M, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c2", 0, kBase, 2 * k64K).ok());
  ASSERT_TRUE(agent_->ReleaseContainer("c1").ok());
  ASSERT_TRUE(agent_->RegisterRegion("c3", "vm-1", kBase, k1M).ok());
  auto region = agent_->Lookup("vm-1", kBase, k1M);
  ASSERT_TRUE(region->has_value());
  EXPECT_TRUE((*region)->info.pending_release);
  EXPECT_EQ((*region)->info.used, 2u);
  const auto before = Snapshot(*agent_);
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);
  ASSERT_TRUE(agent_->UnmapDma("c2", 0, 2 * k64K).ok());
  region = agent_->Lookup("vm-1", kBase, k1M);
  ASSERT_TRUE(region->has_value());
  EXPECT_FALSE((*region)->info.pending_release);
  EXPECT_EQ((*region)->info.used, 1u);
  const auto after = Snapshot(*agent_);
  Restart();
  EXPECT_EQ(Snapshot(*agent_), after);
  ASSERT_TRUE(agent_->UnregisterRegion("c3", kBase, k1M).ok());
  EXPECT_FALSE(agent_->Lookup("vm-1", kBase, k1M)->has_value());
}

TEST_F(NodeAgentTest, FailedMapThatClearedEntriesIsPersisted) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm-1"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c1", .iommu_page_size = 0x1000}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, 0x4000).ok());
  // Runs off the region's end after two pages: those two entries end up cleared.
  EXPECT_EQ(ErrnoOf(agent_->MapDma("c1", 0, kBase + k1M - 0x2000, 0x4000)), EINVAL);
  EXPECT_EQ(agent_->GetContainer("c1")->installed_entries, 2u);
  const auto before = Snapshot(*agent_);
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);
}

TEST_F(NodeAgentTest, TeardownIsPersisted) {
  AddNames("vm-1", {"c1", "c2"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, k64K).ok());
  ASSERT_TRUE(agent_->TeardownContext("vm-1").ok());
  EXPECT_EQ(ErrnoOf(agent_->MapDma("c1", 0, kBase, k64K)), ENOENT);
  Restart();
  EXPECT_EQ(ErrnoOf(agent_->GetContext("vm-1").status()), ENOENT);
  EXPECT_EQ(ErrnoOf(agent_->GetContainer("c1").status()), ENOENT);
  EXPECT_TRUE(agent_->GetContainer("c2").ok());  // never bound: not part of the context
  EXPECT_EQ(*sim_->TotalPinnedPages(), 0u);
}

TEST_F(NodeAgentTest, StoreFailureStopsChangesUntilRestart) {
  AddNames("vm-1", {"c1"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  const auto before = Snapshot(*agent_);
  // The DMA path writes the mapping journal.
  Restart({.fail_journal_append_hook = [](uint64_t) {
    return absl::UnavailableError("injected disk failure");
  }});
  absl::Status status = agent_->MapDma("c1", 0, kBase, k64K);
  EXPECT_EQ(ErrnoOf(status), EIO) << status;
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;  // README "Errors"
  EXPECT_FALSE(agent_->healthy());
  EXPECT_EQ(agent_->Status().store_commit_failures, 1u);
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("c1", "vm-1", kBase + k1M, k1M).status()), EIO);
  // Reads still work, but show only acknowledged state: the refused map was undone.
  EXPECT_TRUE(agent_->Translate("vm-1", {kBase}).ok());
  EXPECT_EQ(Snapshot(*agent_), before);
  EXPECT_EQ(agent_->GetContainer("c1")->installed_entries, 0u);
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);  // the unacknowledged map is not there
  EXPECT_TRUE(agent_->healthy());
}

// Issue 11: a change the store refuses is not acknowledged, so no read may show it, before or
// after a restart. One test per kind of change; each restarts with a refusing store first.

TEST_F(NodeAgentTest, RefusedMapIsUndone) {
  AddNames("vm-1", {"c1"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, k64K).ok());
  const std::vector<std::pair<std::string, uint64_t>> probes = {{"vm-1", kBase}};
  const std::string before = Reads(*agent_, probes);
  RestartRefusing(/*commit=*/false);
  ExpectRefusedAndInvisible(agent_->MapDma("c1", 4 * k64K, kBase + k64K, 2 * k64K), before, probes);
}

// A map into a context with a region pending release is recorded in a transaction.
TEST_F(NodeAgentTest, RefusedMapBesideAPendingReleaseIsUndone) {
  AddNames("vm-1", {"c1", "c2"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-1", kBase + k1M, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c2", 0, kBase, k64K).ok());
  ASSERT_TRUE(agent_->ReleaseContainer("c1").ok());
  const std::vector<std::pair<std::string, uint64_t>> probes = {{"vm-1", kBase},
                                                                {"vm-1", kBase + k1M}};
  const std::string before = Reads(*agent_, probes);
  ASSERT_NE(before.find("pending=1"), std::string::npos) << before;
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->MapDma("c2", 8 * k64K, kBase + k1M, 2 * k64K), before, probes);
}

// A remap overwrites entries whose addresses nothing in memory keeps: they come back from the
// store's acknowledged mappings. So do those a failed map cleared (spec §7.5) when the record of
// that clear is refused.
TEST_F(NodeAgentTest, RefusedRemapIsUndoneFromTheAcknowledgedMappings) {
  ASSERT_TRUE(agent_->CreateContext({.name = "vm-1"}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "c1", .iommu_page_size = 0x1000}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, 0x4000).ok());
  // The first append of this run goes through, and stays in the journal (no fold): the remap's
  // undo reads it from there.
  Restart({.fail_journal_append_hook =
               [appends = 0](uint64_t) mutable {
                 return ++appends > 1 ? absl::UnavailableError("injected") : absl::OkStatus();
               },
           .journal_fold_interval = absl::Hours(1)});
  ASSERT_TRUE(agent_->MapDma("c1", 0x2000, kBase + 0x8000, 0x1000).ok());
  const std::string before = Reads(*agent_);
  ExpectRefusedAndInvisible(agent_->MapDma("c1", 0x1000, kBase + 0x20000, 0x2000), before, {});
  // A map that runs off the region's end after two pages clears the entries it reached.
  RestartRefusing(/*commit=*/false);
  ExpectRefusedAndInvisible(agent_->MapDma("c1", 0, kBase + k1M - 0x2000, 0x4000), before, {});
}

TEST_F(NodeAgentTest, RefusedUnmapIsNotApplied) {
  AddNames("vm-1", {"c1"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, 4 * k64K).ok());
  const std::string before = Reads(*agent_, {{"vm-1", kBase}});
  RestartRefusing(/*commit=*/false);
  ExpectRefusedAndInvisible(agent_->UnmapDma("c1", k64K, 2 * k64K), before, {{"vm-1", kBase}});
}

// An unmap that completes a pending release: the unmap is durable before the registry sees it;
// the pending row it would drop is one recovery drops too, so the unmap stays acknowledged even
// when that row's transaction fails, and memory is what the restart rebuilds.
TEST_F(NodeAgentTest, UnmapCompletingAPendingReleaseIsAcknowledgedOnceDurable) {
  AddNames("vm-1", {"c1", "c2"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-1", kBase + k1M, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c2", 0, kBase, k64K).ok());
  ASSERT_TRUE(agent_->ReleaseContainer("c1").ok());
  RestartRefusing(/*commit=*/true);
  ASSERT_TRUE(agent_->UnmapDma("c2", 0, k64K).ok());
  EXPECT_FALSE(agent_->healthy()) << "the pending row's transaction failed";
  EXPECT_FALSE(agent_->Lookup("vm-1", kBase, k1M)->has_value());
  const std::string after = Reads(*agent_, {{"vm-1", kBase}});
  Restart();
  EXPECT_EQ(Reads(*agent_, {{"vm-1", kBase}}), after);
}

TEST_F(NodeAgentTest, RefusedRegisterIsUndone) {
  AddNames("vm-1", {"c1", "c2"});
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-1", kBase + 2 * k1M, k1M).ok());
  const std::vector<std::pair<std::string, uint64_t>> probes = {{"vm-1", kBase},
                                                                {"vm-1", kBase + 2 * k1M}};
  const std::string before = Reads(*agent_, probes);
  // The first registration of c1 (a new region, and the binding).
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).status(), before,
                            probes);
  EXPECT_TRUE(agent_->GetContainer("c1")->context.empty()) << "the refused register bound it";
  EXPECT_EQ(*sim_->TotalPinnedPages(), k1M / k64K);
  // Another holder of an existing region.
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->RegisterRegion("c1", "vm-1", kBase + 2 * k1M, k1M).status(),
                            before, probes);
  // A decision is not recorded either: it applies after the restart.
  RestartRefusing(/*commit=*/true);
  const DecisionSpec decision{.tag = {.id = "d-1", .epoch = 1},
                              .kind = DecisionKind::kRegister,
                              .context = "vm-1",
                              .container = "c1",
                              .ua = kBase,
                              .size = k1M};
  ExpectRefusedAndInvisible(agent_->ApplyDecision(decision).status, before, probes);
  DecisionOutcome applied = agent_->ApplyDecision(decision);
  EXPECT_TRUE(applied.status.ok()) << applied.status;
  EXPECT_FALSE(applied.duplicate);
}

// A register beside a region pending release also records the context's pending rows.
TEST_F(NodeAgentTest, RefusedRegisterOfAPendingRegionIsUndone) {
  AddNames("vm-1", {"c1", "c2", "c3"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-1", kBase + k1M, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c2", 0, kBase, k64K).ok());
  ASSERT_TRUE(agent_->ReleaseContainer("c1").ok());
  const std::string before = Reads(*agent_, {{"vm-1", kBase}});
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->RegisterRegion("c3", "vm-1", kBase, k1M).status(), before,
                            {{"vm-1", kBase}});
  // The pending release still completes with the last unmap.
  ASSERT_TRUE(agent_->UnmapDma("c2", 0, k64K).ok());
  EXPECT_FALSE(agent_->Lookup("vm-1", kBase, k1M)->has_value());
}

TEST_F(NodeAgentTest, RefusedUnregisterIsUndone) {
  AddNames("vm-1", {"c1", "c2"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase + 2 * k1M, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-1", kBase + 2 * k1M, k1M).ok());
  const std::vector<std::pair<std::string, uint64_t>> probes = {{"vm-1", kBase},
                                                                {"vm-1", kBase + 2 * k1M}};
  const std::string before = Reads(*agent_, probes);
  // The last holder: the region went, and comes back re-pinned.
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->UnregisterRegion("c1", kBase, k1M), before, probes);
  // One of two holders.
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->UnregisterRegion("c2", kBase + 2 * k1M, k1M), before, probes);
  EXPECT_EQ(*sim_->TotalPinnedPages(), 2 * k1M / k64K);
}

TEST_F(NodeAgentTest, RefusedContextsAndContainersAreUndone) {
  AddNames("vm-1", {"c1"});
  const std::string before = Reads(*agent_);
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->CreateContext({.name = "vm-2"}).status(), before, {});
  EXPECT_EQ(ErrnoOf(agent_->GetContext("vm-2").status()), ENOENT);
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->CreateContainer({.name = "c2"}).status(), before, {});
  EXPECT_EQ(ErrnoOf(agent_->GetContainer("c2").status()), ENOENT);
  // The ids the refused creations took are free again; new names work.
  ASSERT_TRUE(agent_->CreateContainer({.name = "c2"}).ok());
  ASSERT_TRUE(agent_->CreateContext({.name = "vm-2"}).ok());
}

// A teardown or release cannot be undone (pins and mappings go), so the store takes it first.
TEST_F(NodeAgentTest, RefusedTeardownAndReleaseAreNotApplied) {
  AddNames("vm-1", {"c1", "idle"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, 2 * k64K).ok());
  const std::vector<std::pair<std::string, uint64_t>> probes = {{"vm-1", kBase}};
  const std::string before = Reads(*agent_, probes);
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->TeardownContext("vm-1"), before, probes);
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->ReleaseContainer("idle"), before, probes);
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->ReleaseContainer("c1"), before, probes);
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, k64K).ok()) << "the container still works";
}

// A release that leaves a region pending (another container maps it) and completes another: the
// store takes the rows it will leave, before the release.
TEST_F(NodeAgentTest, RefusedReleaseWithPendingEffectsIsNotApplied) {
  AddNames("vm-1", {"c1", "c2", "c3"});
  ASSERT_TRUE(agent_->RegisterRegion("c3", "vm-1", kBase + 4 * k1M, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-1", kBase + 2 * k1M, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase + 4 * k1M, k64K).ok());
  ASSERT_TRUE(agent_->ReleaseContainer("c3").ok());  // pending, kept by c1's mapping
  ASSERT_TRUE(agent_->MapDma("c2", 0, kBase, k64K).ok());
  const std::vector<std::pair<std::string, uint64_t>> probes = {{"vm-1", kBase},
                                                                {"vm-1", kBase + 4 * k1M}};
  const std::string before = Reads(*agent_, probes);
  RestartRefusing(/*commit=*/true);
  ExpectRefusedAndInvisible(agent_->ReleaseContainer("c1"), before, probes);
  // Accepted, it leaves kBase pending and completes kBase + 4 MiB, as the restart confirms.
  ASSERT_TRUE(agent_->ReleaseContainer("c1").ok());
  EXPECT_TRUE(agent_->Lookup("vm-1", kBase, k1M)->value().info.pending_release);
  EXPECT_FALSE(agent_->Lookup("vm-1", kBase + 4 * k1M, k1M)->has_value());
  const std::string after = Reads(*agent_, probes);
  Restart();
  EXPECT_EQ(Reads(*agent_, probes), after);
  absl::StatusOr<PersistedState> state = store_->Load();
  ASSERT_TRUE(state.ok());
  ASSERT_EQ(state->pending.size(), 1u);
  EXPECT_EQ(state->pending[0].ua, kBase);
}

TEST_F(NodeAgentTest, PendingRowThatNoMappingKeepsIsDroppedAtRecovery) {
  // What an unmap racing the unregister that made its region pending leaves behind: the pending
  // row, and no mapping keeping the region.
  AddNames("vm-1", {"c1"});
  const auto before = Snapshot(*agent_);
  ASSERT_TRUE(store_->Commit(Mutation().PutPending("vm-1", kBase, k1M)).ok());
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);
  absl::StatusOr<PersistedState> state = store_->Load();
  ASSERT_TRUE(state.ok());
  EXPECT_TRUE(state->pending.empty());
}

TEST_F(NodeAgentTest, CommitFailureStopsChangesUntilRestart) {
  AddNames("vm-1", {"c1"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, k64K).ok());
  const auto before = Snapshot(*agent_);
  Restart({.fail_commit_hook = [](int) { return absl::UnavailableError("injected"); }});
  absl::Status status = agent_->RegisterRegion("c1", "vm-1", kBase + k1M, k1M).status();
  EXPECT_EQ(ErrnoOf(status), EIO) << status;
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_FALSE(agent_->healthy());
  const absl::Status refused = agent_->MapDma("c1", k64K, kBase, k64K);
  EXPECT_EQ(ErrnoOf(refused), EIO);
  EXPECT_EQ(refused.code(), absl::StatusCode::kInternal) << refused;
  EXPECT_EQ(Snapshot(*agent_), before);  // the refused register was undone
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);  // the journaled map survived, the failed register not
}

TEST_F(NodeAgentTest, DecisionsApplyAtMostOnceAcrossRestarts) {
  AddNames("vm-1", {"c1"});
  DecisionSpec reg{.tag = {.id = "d-1", .epoch = 7},
                   .kind = DecisionKind::kRegister,
                   .context = "vm-1",
                   .container = "c1",
                   .ua = kBase,
                   .size = k1M};
  DecisionOutcome first = agent_->ApplyDecision(reg);
  ASSERT_TRUE(first.status.ok()) << first.status;
  EXPECT_FALSE(first.duplicate);
  DecisionOutcome again = agent_->ApplyDecision(reg);
  EXPECT_TRUE(again.status.ok());
  EXPECT_TRUE(again.duplicate);
  EXPECT_EQ(agent_->Lookup("vm-1", kBase, k1M)->value().info.used, 1u);

  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, k64K).ok());
  DecisionSpec unreg{.tag = {.id = "d-2", .epoch = 7},
                     .kind = DecisionKind::kUnregister,
                     .container = "c1",
                     .ua = kBase,
                     .size = k1M};
  EXPECT_EQ(ErrnoOf(agent_->ApplyDecision(unreg).status), EBUSY);
  Restart();
  // Both answers survive the restart; the repeat is not applied again.
  DecisionOutcome repeat = agent_->ApplyDecision(reg);
  EXPECT_TRUE(repeat.duplicate);
  DecisionOutcome busy = agent_->ApplyDecision(unreg);
  EXPECT_TRUE(busy.duplicate);
  EXPECT_EQ(ErrnoOf(busy.status), EBUSY);
  // A retry is a new decision.
  ASSERT_TRUE(agent_->UnmapDma("c1", 0, k64K).ok());
  unreg.tag.id = "d-3";
  EXPECT_TRUE(agent_->ApplyDecision(unreg).status.ok());
  EXPECT_FALSE(agent_->Lookup("vm-1", kBase, k1M)->has_value());
  EXPECT_EQ(ErrnoOf(agent_->ApplyDecision({.tag = {.id = ""}}).status), EINVAL);
}

// Issue 11: a decision to register 2^63 bytes aborted the agent (std::bad_alloc on the
// control-client thread) and, re-sent on every reconnect, kept it down.
TEST_F(NodeAgentTest, HugeRegisterIsEnomemChangesNothingAndItsAnswerIsRecorded) {
  AddNames("vm-1", {"c1"});
  const std::vector<RegionKey> before = Snapshot(*agent_);
  for (uint64_t size : {uint64_t{1} << 63, uint64_t{1} << 40}) {
    absl::StatusOr<RegionView> region = agent_->RegisterRegion("c1", "vm-1", 0, size);
    EXPECT_EQ(ErrnoOf(region.status()), ENOMEM) << region.status();
    EXPECT_EQ(region.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_NE(region.status().message().find("--max_region_bytes"), absl::string_view::npos)
        << region.status();
  }
  const DecisionSpec huge{.tag = {.id = "d-huge", .epoch = 1},
                          .kind = DecisionKind::kRegister,
                          .context = "vm-1",
                          .container = "c1",
                          .ua = 0,
                          .size = uint64_t{1} << 63};
  EXPECT_EQ(ErrnoOf(agent_->ApplyDecision(huge).status), ENOMEM);
  EXPECT_EQ(Snapshot(*agent_), before);
  EXPECT_TRUE(agent_->GetContainer("c1")->context.empty()) << "a refused register bound it";
  EXPECT_EQ(agent_->Status().counters.registers_over_limit, 3u);
  EXPECT_TRUE(agent_->healthy());
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);
  // The re-sent decision is answered from the record.
  DecisionOutcome again = agent_->ApplyDecision(huge);
  EXPECT_TRUE(again.duplicate);
  EXPECT_EQ(ErrnoOf(again.status), ENOMEM);
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
}

TEST_F(NodeAgentTest, NodeLimitCountsEveryContextAndALoweredLimitKeepsWhatWasAcknowledged) {
  limits_ = {.max_region_bytes = 4 * k1M, .max_pinned_bytes = 6 * k1M};
  Restart();
  AddNames("vm-1", {"c1"});
  AddNames("vm-2", {"c2"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, 4 * k1M).ok());
  absl::Status status = agent_->RegisterRegion("c2", "vm-2", kBase, 4 * k1M).status();
  EXPECT_EQ(ErrnoOf(status), ENOMEM);
  EXPECT_NE(status.message().find("--max_pinned_bytes"), absl::string_view::npos) << status;
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-2", kBase, 2 * k1M).ok());
  const std::vector<RegionKey> before = Snapshot(*agent_);
  // A restart with lower limits restores every region, then refuses more.
  limits_ = {.max_region_bytes = k1M, .max_pinned_bytes = 2 * k1M};
  Restart();
  EXPECT_EQ(Snapshot(*agent_), before);
  EXPECT_EQ(ErrnoOf(agent_->RegisterRegion("c2", "vm-2", kBase + 8 * k1M, k64K).status()), ENOMEM);
  ASSERT_TRUE(agent_->UnregisterRegion("c1", kBase, 4 * k1M).ok());
  ASSERT_TRUE(agent_->UnregisterRegion("c2", kBase, 2 * k1M).ok());
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-2", kBase, k1M).ok());
}

TEST_F(NodeAgentTest, CreateContextRefusesUnknownBackingsAndMemoryOverTheNodeLimit) {
  for (int backing : {4, -1, 1000}) {
    absl::Status status =
        agent_->CreateContext({.name = "vm", .backing = static_cast<MemoryBacking>(backing)})
            .status();
    EXPECT_EQ(ErrnoOf(status), EINVAL) << "backing " << backing << ": " << status;
  }
  EXPECT_EQ(
      ErrnoOf(agent_->CreateContext({.name = "vm", .memory_bytes = uint64_t{1} << 63}).status()),
      ENOMEM);
  EXPECT_TRUE(agent_->ListContexts().empty());
  // Every MemoryBacking value is taken (the sim backend ignores it).
  for (int backing = 0; backing <= 3; ++backing) {
    const std::string name = "vm-" + std::to_string(backing);
    absl::StatusOr<ContextView> view =
        agent_->CreateContext({.name = name, .backing = static_cast<MemoryBacking>(backing)});
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(static_cast<int>(view->spec.backing), backing);
  }
}

TEST_F(NodeAgentTest, TranslateAndListingWithHpasAreBounded) {
  max_translate_uas_ = 4;
  max_listed_hpas_ = 32;
  Restart();
  AddNames("vm-1", {"c1"});
  AddNames("vm-2", {"c2"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());  // 16 pages
  ASSERT_TRUE(agent_->RegisterRegion("c2", "vm-2", kBase, k1M).ok());
  const std::vector<uint64_t> four(4, kBase);
  const std::vector<uint64_t> five(5, kBase);
  EXPECT_TRUE(agent_->Translate("vm-1", four).ok());
  EXPECT_EQ(ErrnoOf(agent_->Translate("vm-1", five).status()), ENOMEM);
  absl::StatusOr<std::vector<RegionView>> all = agent_->ListRegions("", true);
  ASSERT_TRUE(all.ok()) << all.status();  // exactly 32 addresses
  EXPECT_EQ((*all)[0].info.hpas.size(), 16u);
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase + 2 * k1M, k64K).ok());
  EXPECT_EQ(ErrnoOf(agent_->ListRegions("", true).status()), ENOMEM);
  EXPECT_TRUE(agent_->ListRegions("vm-2", true).ok());
  EXPECT_TRUE(agent_->ListRegions("", false).ok());
}

TEST_F(NodeAgentTest, StatusCountsEverything) {
  AddNames("vm-1", {"c1"});
  ASSERT_TRUE(agent_->RegisterRegion("c1", "vm-1", kBase, k1M).ok());
  ASSERT_TRUE(agent_->MapDma("c1", 0, kBase, 2 * k64K).ok());
  NodeStatusView status = agent_->Status();
  EXPECT_EQ(status.node_name, "node-a");
  EXPECT_EQ(status.backend, "sim");
  EXPECT_EQ(status.contexts, 1u);
  EXPECT_EQ(status.containers, 1u);
  EXPECT_EQ(status.regions, 1u);
  EXPECT_EQ(status.locked_bytes, k1M);
  EXPECT_EQ(status.installed_entries, 2u);
  EXPECT_EQ(status.counters.maps_ok, 1u);
}

}  // namespace
}  // namespace dmapin::agent

namespace dmapin::agent {
namespace {

// The memlock backend: real pins of memory the agent maps; a restart re-maps the memory at the
// same address and re-pins exactly what was acknowledged (VmLck tells).
TEST(NodeAgentMemlockTest, RestartRemapsMemoryAndRepinsExactly) {
#if defined(__SANITIZE_ADDRESS__)
  // The "restart" here is in one process: ASan's allocator may place its own mappings in the
  // range the first agent released before the second re-maps it there (EEXIST). A real restart
  // is a new process; tests/crash covers that one.
  GTEST_SKIP() << "in-process re-map at a fixed address is unreliable under ASan";
#endif
  absl::StatusOr<std::unique_ptr<MemlockBackend>> probe = MemlockBackend::Create();
  if (!probe.ok()) GTEST_SKIP() << "memlock backend unavailable (needs root): " << probe.status();
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / ("memlock_agent_" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  const uint64_t ps = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t vmlck_before = *ReadVmLckBytes();
  uint64_t ua = 0;
  for (int round = 0; round < 2; ++round) {
    auto backend = MemlockBackend::Create();
    ASSERT_TRUE(backend.ok());
    auto store = StateStore::Open(dir.string());
    ASSERT_TRUE(store.ok()) << store.status();
    std::unique_ptr<ContextMemoryProvider> provider = NewBackedMemoryProvider("");
    auto agent = NodeAgent::Create({.node_name = "n",
                                    .backend = backend->get(),
                                    .store = store->get(),
                                    .memory_provider = provider.get()});
    ASSERT_TRUE(agent.ok()) << agent.status();
    if (round == 0) {
      auto context = (*agent)->CreateContext(
          {.name = "vm", .backing = MemoryBacking::kMemfd, .memory_bytes = 256 * ps});
      ASSERT_TRUE(context.ok()) << context.status();
      ua = context->memory_ua;
      ASSERT_NE(ua, 0u);
      ASSERT_TRUE((*agent)->CreateContainer({.name = "c"}).ok());
      ASSERT_TRUE((*agent)->RegisterRegion("c", "vm", ua, 64 * ps).ok());
      ASSERT_TRUE((*agent)->RegisterRegion("c", "vm", ua + 128 * ps, 32 * ps).ok());
      ASSERT_TRUE((*agent)->MapDma("c", 0, ua, 4 * ps).ok());
    } else {
      EXPECT_EQ((*agent)->GetContext("vm")->memory_ua, ua);
      EXPECT_EQ((*agent)->GetContext("vm")->locked_bytes, 96 * ps);
      EXPECT_EQ((*agent)->Lookup("vm", ua, ps)->value().info.mapped, 5u);
    }
    EXPECT_EQ(*ReadVmLckBytes() - vmlck_before, 96 * ps) << "round " << round;
    absl::Status invariants = (*agent)->CheckInvariants();
    EXPECT_TRUE(invariants.ok()) << invariants;
    if (round == 1) {
      ASSERT_TRUE((*agent)->TeardownContext("vm").ok());
      EXPECT_EQ(*ReadVmLckBytes(), vmlck_before);
    }
    // Leaving scope unmaps and unpins, as a process exit would.
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dmapin::agent

namespace dmapin::agent {
namespace {

constexpr uint64_t kLimitPage = 65536;

// What a caller may choose: the memlock limit and its waiver are the node's; only managers (and
// the agent itself) pick beyond them.
TEST(NodeAgentChoiceTest, MemlockLimitAndWaiverAreTheNodesDecision) {
  auto sim = *SimBackend::Create({.page_size = kLimitPage});
  auto agent = *NodeAgent::Create({.node_name = "n",
                                   .backend = sim.get(),
                                   .manager_uids = {4000},
                                   .context_memlock_limit_bytes = uint64_t{1} << 20});
  const Caller vmm = Caller::Local(getpid(), 3000);
  const Caller manager = Caller::Local(getpid(), 4000);
  EXPECT_EQ(ErrnoOf(agent->CreateContext({.name = "waiver", .cap_ipc_lock = true}, vmm).status()),
            EPERM);
  EXPECT_EQ(ErrnoOf(agent->CreateContext({.name = "unlimited"}, vmm).status()), EPERM);
  EXPECT_EQ(
      ErrnoOf(agent->CreateContext({.name = "more", .memlock_limit_bytes = 2 << 20}, vmm).status()),
      EPERM);
  EXPECT_EQ(ErrnoOf(agent->CreateContext({.name = "tcp"}, Caller::Remote()).status()), EPERM);
  EXPECT_TRUE(agent->ListContexts().empty()) << "a refusal created something";
  EXPECT_EQ(agent->Status().permission_denied, 4u);
  // Less than the node's limit is the VMM's to choose; beyond it, a manager's.
  EXPECT_TRUE(agent->CreateContext({.name = "less", .memlock_limit_bytes = 512 << 10}, vmm).ok());
  EXPECT_TRUE(agent->CreateContext({.name = "managed", .cap_ipc_lock = true}, manager).ok());
  EXPECT_TRUE(agent->CreateContext({.name = "internal"}).ok());
}

TEST(NodeAgentChoiceTest, CountLimitsAreEnospcAndChangeNothing) {
  auto sim = *SimBackend::Create({.page_size = kLimitPage});
  auto agent = *NodeAgent::Create({.node_name = "n",
                                   .backend = sim.get(),
                                   .max_contexts = 3,
                                   .max_contexts_per_owner = 2,
                                   .max_containers = 1,
                                   .max_regions_per_context = 1});
  const Caller vmm = Caller::Local(getpid(), 3000);
  ASSERT_TRUE(agent->CreateContext({.name = "a"}, vmm).ok());
  ASSERT_TRUE(agent->CreateContext({.name = "b"}, vmm).ok());
  EXPECT_EQ(ErrnoOf(agent->CreateContext({.name = "c"}, vmm).status()), ENOSPC);  // per owner
  ASSERT_TRUE(agent->CreateContext({.name = "d"}).ok());
  EXPECT_EQ(ErrnoOf(agent->CreateContext({.name = "e"}).status()), ENOSPC);  // per node
  ASSERT_TRUE(agent->CreateContainer({.name = "c1"}).ok());
  EXPECT_EQ(ErrnoOf(agent->CreateContainer({.name = "c2"}).status()), ENOSPC);
  ASSERT_TRUE(agent->RegisterRegion("c1", "d", 0x10000000, kLimitPage).ok());
  absl::StatusOr<RegionView> second = agent->RegisterRegion("c1", "d", 0x20000000, kLimitPage);
  EXPECT_EQ(ErrnoOf(second.status()), ENOSPC) << second.status();
  EXPECT_NE(second.status().message().find("--max_regions_per_context"), std::string::npos);
  EXPECT_EQ(agent->ListContexts().size(), 3u);
  EXPECT_EQ(agent->ListContainers().size(), 1u);
  EXPECT_EQ(agent->GetContext("d")->regions, 1u);
  EXPECT_EQ(agent->Status().limit_refusals, 4u);
}

}  // namespace
}  // namespace dmapin::agent
