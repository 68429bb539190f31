#include "server/core/server_core.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/errno_status.h"
#include "dmapin/v1/admin.pb.h"
#include "dmapin/v1/control.pb.h"
#include "gtest/gtest.h"
#include "server/store/sqlite_server_store.h"

namespace dmapin::server {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kMiB = 1024 * 1024;
constexpr char kDrainLabel[] = "dmapin.dev/drain";

// An agent's control stream as the core sees it: records what the core sends.
class FakeSession : public AgentSession {
 public:
  bool Send(const v1::ServerMessage& message) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    messages_.push_back(message);
    return true;
  }
  std::vector<v1::Decision> Decisions() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<v1::Decision> decisions;
    for (const v1::ServerMessage& message : messages_) {
      if (message.has_decision()) decisions.push_back(message.decision());
    }
    return decisions;
  }
  size_t decision_count() const { return Decisions().size(); }
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }

 private:
  mutable std::mutex mu_;
  bool closed_ = false;
  std::vector<v1::ServerMessage> messages_;
};

v1::Hello MakeHello(const std::string& node, const std::map<std::string, std::string>& labels,
                    const std::string& incarnation = "inc-1") {
  v1::Hello hello;
  hello.set_node_name(node);
  for (const auto& [key, value] : labels) (*hello.mutable_labels())[key] = value;
  hello.set_page_size(kPage);
  hello.set_backend("sim");
  hello.add_available_backends("sim");
  hello.set_agent_version("test");
  hello.set_incarnation(incarnation);
  return hello;
}

v1::Region MakeRegion(const std::string& context, uint64_t ua, uint64_t size,
                      const std::vector<std::string>& containers, uint64_t used = 1,
                      uint64_t mapped = 1) {
  v1::Region region;
  region.set_context(context);
  region.set_ua(ua);
  region.set_size(size);
  region.set_entries(size / kPage);
  region.set_used(used);
  region.set_mapped(mapped);
  region.set_page_size(kPage);
  region.set_max_iommu_page_size(kPage);
  for (const std::string& container : containers) region.add_containers(container);
  return region;
}

// A snapshot holding `regions`, their contexts and containers, and the extra ones named.
v1::AgentMessage SnapshotMessage(const std::vector<v1::Region>& regions, uint64_t version,
                                 const std::set<std::string>& extra_contexts = {},
                                 const std::set<std::string>& extra_containers = {}) {
  std::set<std::string> contexts = extra_contexts;
  std::set<std::string> containers = extra_containers;
  v1::AgentMessage message;
  v1::Snapshot* snapshot = message.mutable_snapshot();
  for (const v1::Region& region : regions) {
    *snapshot->add_regions() = region;
    contexts.insert(region.context());
    for (const std::string& container : region.containers()) containers.insert(container);
  }
  for (const std::string& name : contexts) {
    v1::Context* context = snapshot->add_contexts();
    context->set_name(name);
    context->set_memlock_unlimited(true);
  }
  for (const std::string& name : containers) {
    v1::Container* container = snapshot->add_containers();
    container->set_name(name);
    container->set_iommu_page_size(kPage);
  }
  snapshot->mutable_counters()->set_registers_ok(regions.size());
  snapshot->set_version(version);
  return message;
}

v1::AgentMessage ResultMessage(const v1::Decision& decision, int err,
                               const std::string& text = "") {
  v1::AgentMessage message;
  v1::DecisionResult* result = message.mutable_result();
  result->set_decision_id(decision.id());
  result->set_epoch(decision.epoch());
  result->set_errno_value(err);
  result->set_errno_name(err == 0        ? "OK"
                         : err == EBUSY  ? "EBUSY"
                         : err == ENOENT ? "ENOENT"
                                         : "E?");
  result->set_message(text);
  return message;
}

v1::CreateIntentRequest RegionIntent(v1::IntentKind kind, const std::string& node,
                                     const std::string& context, const std::string& container,
                                     uint64_t ua, uint64_t size) {
  v1::CreateIntentRequest request;
  request.set_kind(kind);
  request.set_node(node);
  request.set_context(context);
  request.set_container(container);
  request.set_ua(ua);
  request.set_size(size);
  return request;
}

v1::CreateIntentRequest Register(const std::string& node, uint64_t ua, uint64_t size,
                                 const std::string& container = "c1") {
  return RegionIntent(v1::INTENT_KIND_REGISTER, node, "vm-1", container, ua, size);
}

v1::CreateIntentRequest Unregister(const std::string& node, uint64_t ua, uint64_t size,
                                   const std::string& container = "c1") {
  return RegionIntent(v1::INTENT_KIND_UNREGISTER, node, "vm-1", container, ua, size);
}

absl::Time ParseRfc3339(const std::string& text) {
  absl::Time time;
  std::string error;
  EXPECT_TRUE(absl::ParseTime(absl::RFC3339_full, text, &time, &error)) << text << ": " << error;
  return time;
}

class ServerCoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/server_core_test.", getpid(), ".",
                        info->name());
    std::filesystem::remove_all(dir_);
    OpenStore();
    StartCore();
  }

  void TearDown() override {
    core_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  void OpenStore() {
    absl::StatusOr<std::unique_ptr<SqliteServerStore>> store = SqliteServerStore::Open(dir_);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
  }

  void StartCore(const std::function<void(ServerCoreOptions&)>& tweak = nullptr) {
    ServerCoreOptions options;
    options.store = store_.get();
    // A fast background loop: any duplicate decision it would make shows up in the tests.
    options.reconcile_interval = absl::Milliseconds(2);
    options.decision_timeout = absl::Seconds(60);
    options.lost_decision_backoff = absl::Milliseconds(1);
    options.random_seed = 42;
    if (tweak) tweak(options);
    absl::StatusOr<std::unique_ptr<ServerCore>> core = ServerCore::Create(options);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = std::move(*core);
  }

  // Connects `node` and sends its snapshot, as an agent does right after hello.
  std::shared_ptr<FakeSession> Connect(const std::string& node,
                                       const std::map<std::string, std::string>& labels,
                                       const std::vector<v1::Region>& regions = {},
                                       const std::string& incarnation = "inc-1") {
    auto session = std::make_shared<FakeSession>();
    const v1::Welcome welcome =
        core_->AgentConnected(MakeHello(node, labels, incarnation), session);
    EXPECT_EQ(welcome.server_epoch(), core_->epoch());
    SendSnapshot(node, session, regions);
    return session;
  }

  void SendSnapshot(const std::string& node, const std::shared_ptr<FakeSession>& session,
                    const std::vector<v1::Region>& regions,
                    const std::set<std::string>& extra_contexts = {"vm-1"},
                    const std::set<std::string>& extra_containers = {"c1"}) {
    core_->AgentMessage(
        node, session.get(),
        SnapshotMessage(regions, ++snapshot_version_, extra_contexts, extra_containers));
  }

  // What an agent sends every report interval when nothing changed.
  void SendHeartbeat(const std::string& node, const std::shared_ptr<FakeSession>& session) {
    v1::AgentMessage heartbeat;
    heartbeat.mutable_heartbeat()->set_sequence(++heartbeat_sequence_);
    core_->AgentMessage(node, session.get(), heartbeat);
  }

  void Answer(const std::string& node, const std::shared_ptr<FakeSession>& session,
              const v1::Decision& decision, int err) {
    core_->AgentMessage(node, session.get(), ResultMessage(decision, err));
  }

  // Runs reconcile passes until `done` holds; false after 10 s.
  bool Eventually(const std::function<bool()>& done) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (!done()) {
      if (absl::Now() > deadline) return false;
      core_->ReconcileNow();
      absl::SleepFor(absl::Milliseconds(1));
    }
    return true;
  }

  // A few passes, so anything the core would send has been sent.
  void Settle() {
    for (int i = 0; i < 5; ++i) core_->ReconcileNow();
  }

  // The decisions of `session`, waiting until there are `n`.
  std::vector<v1::Decision> WaitDecisions(const std::shared_ptr<FakeSession>& session, size_t n) {
    EXPECT_TRUE(Eventually([&] { return session->decision_count() >= n; }))
        << "expected " << n << " decisions, got " << session->decision_count();
    return session->Decisions();
  }

  v1::Intent MustGetIntent(const std::string& id) {
    absl::StatusOr<v1::Intent> intent = core_->GetIntent(id);
    EXPECT_TRUE(intent.ok()) << intent.status();
    return intent.ok() ? *intent : v1::Intent();
  }

  v1::Intent MustCreate(const v1::CreateIntentRequest& request) {
    absl::StatusOr<v1::CreateIntentResponse> response = core_->CreateIntent(request);
    EXPECT_TRUE(response.ok()) << response.status();
    return response.ok() ? response->intent() : v1::Intent();
  }

  std::vector<v1::Intent> Intents(const std::string& node = "") {
    v1::ListIntentsRequest request;
    request.set_node(node);
    request.set_page_size(1000);
    absl::StatusOr<v1::ListIntentsResponse> response = core_->ListIntents(request);
    EXPECT_TRUE(response.ok()) << response.status();
    if (!response.ok()) return {};
    return {response->intents().begin(), response->intents().end()};
  }

  size_t StoredIntents() {
    absl::StatusOr<std::vector<v1::Intent>> intents = store_->LoadIntents();
    EXPECT_TRUE(intents.ok()) << intents.status();
    return intents.ok() ? intents->size() : 0;
  }

  v1::Node MustGetNode(const std::string& name) {
    absl::StatusOr<v1::Node> node = core_->GetNode(name);
    EXPECT_TRUE(node.ok()) << node.status();
    return node.ok() ? *node : v1::Node();
  }

  v1::Policy SetPolicy(v1::Policy policy) {
    absl::StatusOr<v1::Policy> set = core_->SetPolicy(std::move(policy));
    EXPECT_TRUE(set.ok()) << set.status();
    return set.ok() ? *set : v1::Policy();
  }

  std::string dir_;
  std::unique_ptr<SqliteServerStore> store_;
  std::unique_ptr<ServerCore> core_;
  uint64_t snapshot_version_ = 0;
  uint64_t heartbeat_sequence_ = 0;
};

// Reads events until one of `type` arrives (nullopt after 5 s); `seen` collects every type read.
std::optional<v1::Event> WaitEvent(EventSubscription& subscription, const std::string& type,
                                   std::vector<std::string>* seen = nullptr) {
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline) {
    std::optional<v1::Event> event = subscription.Next(deadline - absl::Now());
    if (!event.has_value()) return std::nullopt;
    if (seen != nullptr) seen->push_back(event->type());
    if (event->type() == type) return event;
  }
  return std::nullopt;
}

// --- (1) Register: one decision, satisfied by the result and the snapshot ---------------------

TEST_F(ServerCoreTest, DecisionHistoryIsPrunedToItsLimit) {
  core_.reset();
  StartCore([](ServerCoreOptions& options) {
    options.decision_history = 2;
    options.prune_interval = absl::Milliseconds(1);
  });
  auto a = Connect("node-a", {});
  for (int i = 0; i < 5; ++i) MustCreate(Register("node-a", 0x100000 + i * kMiB, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(a, 5);
  ASSERT_EQ(decisions.size(), 5u);
  for (const v1::Decision& decision : decisions) Answer("node-a", a, decision, 0);
  auto records = [&] {
    absl::StatusOr<v1::ListDecisionsResponse> list = core_->ListDecisions({});
    EXPECT_TRUE(list.ok()) << list.status();
    return list.ok() ? list->decisions_size() : -1;
  };
  ASSERT_TRUE(Eventually([&] { return records() == 2; })) << records() << " records kept";
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.decisions_pruned, 3u);
}

TEST_F(ServerCoreTest, FinishedIntentsArePrunedToTheirLimitInMemoryAndTheStore) {
  core_.reset();
  StartCore([](ServerCoreOptions& options) {
    options.intent_history = 2;
    options.prune_interval = absl::Milliseconds(1);
  });
  auto a = Connect("node-a", {});
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i)
    ids.push_back(MustCreate(Register("node-a", 0x100000 + i * kMiB, kMiB)).id());
  const std::string live = MustCreate(Register("node-a", 0x900000, kMiB)).id();
  for (const std::string& id : ids) ASSERT_TRUE(core_->WithdrawIntent(id).ok());
  auto listed = [&] {
    absl::StatusOr<v1::ListIntentsResponse> list = core_->ListIntents({});
    EXPECT_TRUE(list.ok()) << list.status();
    return list.ok() ? list->intents_size() : -1;
  };
  // Two finished intents stay (the newest), and the live one.
  ASSERT_TRUE(Eventually([&] { return listed() == 3; })) << listed() << " intents listed";
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.intents_pruned, 3u);
  EXPECT_EQ(ErrnoOf(core_->GetIntent(ids[0]).status()), ENOENT);
  EXPECT_TRUE(core_->GetIntent(ids[4]).ok());
  EXPECT_TRUE(core_->GetIntent(live).ok());
  EXPECT_EQ(StoredIntents(), 3u) << "the store forgot them too";
}

TEST_F(ServerCoreTest, RegisterIntentSendsOneDecisionAndIsSatisfied) {
  auto a = Connect("node-a", {{"pool", "a"}});
  auto b = Connect("node-b", {{"pool", "a"}});

  const v1::Intent created = MustCreate(Register("node-a", 0x100000, 2 * kMiB));
  ASSERT_FALSE(created.id().empty());
  EXPECT_EQ(created.state(), v1::INTENT_STATE_PENDING);
  EXPECT_EQ(StoredIntents(), 1u) << "the intent is durable before the answer";

  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  Settle();
  decisions = a->Decisions();
  ASSERT_EQ(decisions.size(), 1u);
  EXPECT_EQ(b->decision_count(), 0u) << "the decision goes to the intent's node only";
  const v1::Decision& decision = decisions[0];
  EXPECT_FALSE(decision.id().empty());
  EXPECT_EQ(decision.epoch(), core_->epoch());
  EXPECT_EQ(decision.kind(), v1::DECISION_KIND_REGISTER);
  EXPECT_EQ(decision.context(), "vm-1");
  EXPECT_EQ(decision.container(), "c1");
  EXPECT_EQ(decision.ua(), 0x100000u);
  EXPECT_EQ(decision.size(), 2 * kMiB);

  v1::Intent intent = MustGetIntent(created.id());
  EXPECT_EQ(intent.state(), v1::INTENT_STATE_APPLYING);
  EXPECT_EQ(intent.attempts(), 1u);
  EXPECT_EQ(intent.last_decision_id(), decision.id());

  v1::ListDecisionsRequest list;
  list.set_intent_id(created.id());
  absl::StatusOr<v1::ListDecisionsResponse> records = core_->ListDecisions(list);
  ASSERT_TRUE(records.ok()) << records.status();
  ASSERT_EQ(records->decisions_size(), 1);
  EXPECT_EQ(records->decisions(0).id(), decision.id());
  EXPECT_EQ(records->decisions(0).node(), "node-a");
  EXPECT_EQ(records->decisions(0).result(), "") << "in flight";

  // The agent applies it: result, then a report showing the region.
  Answer("node-a", a, decision, 0);
  EXPECT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_SATISFIED);
  SendSnapshot("node-a", a, {MakeRegion("vm-1", 0x100000, 2 * kMiB, {"c1"})});
  Settle();
  intent = MustGetIntent(created.id());
  EXPECT_EQ(intent.state(), v1::INTENT_STATE_SATISFIED);
  EXPECT_EQ(intent.last_errno(), 0);
  EXPECT_EQ(intent.attempts(), 1u);
  EXPECT_EQ(a->decision_count(), 1u) << "a satisfied registration is not sent again";

  records = core_->ListDecisions(list);
  ASSERT_TRUE(records.ok()) << records.status();
  ASSERT_EQ(records->decisions_size(), 1);
  EXPECT_EQ(records->decisions(0).result(), "OK");

  // A second intent gets a decision with a different id.
  MustCreate(Register("node-a", 0x400000, kMiB));
  decisions = WaitDecisions(a, 2);
  ASSERT_EQ(decisions.size(), 2u);
  EXPECT_NE(decisions[1].id(), decisions[0].id());
  EXPECT_EQ(decisions[1].epoch(), core_->epoch());
  EXPECT_EQ(decisions[1].ua(), 0x400000u);

  const FleetMetricsSnapshot metrics = core_->MetricsSnapshot(100);
  EXPECT_EQ(metrics.counters.decisions_sent.at("register"), 2u);
  EXPECT_EQ(metrics.counters.decision_results.at("register/OK"), 1u);
}

// Delegates to a real store; Commit fails while `fail` is set.
class FlakyStore : public ServerStore {
 public:
  explicit FlakyStore(ServerStore* base) : base_(base) {}
  absl::Status Commit(const ServerMutation& mutation) override {
    if (fail) return absl::UnavailableError("EIO: injected commit failure");
    return base_->Commit(mutation);
  }
  absl::StatusOr<std::vector<v1::Policy>> LoadPolicies() const override {
    return base_->LoadPolicies();
  }
  absl::StatusOr<std::vector<v1::Intent>> LoadIntents() const override {
    return base_->LoadIntents();
  }
  absl::StatusOr<std::vector<NodeAdminState>> LoadNodeStates() const override {
    return base_->LoadNodeStates();
  }
  absl::StatusOr<DecisionPage> ListDecisions(const DecisionQuery& query) const override {
    return base_->ListDecisions(query);
  }
  absl::StatusOr<std::vector<v1::DecisionRecord>> LoadInFlightDecisions() const override {
    return base_->LoadInFlightDecisions();
  }
  absl::StatusOr<uint64_t> PruneDecisions(uint64_t keep_last_n) override {
    return base_->PruneDecisions(keep_last_n);
  }
  absl::StatusOr<uint64_t> BumpEpoch() override { return base_->BumpEpoch(); }
  absl::StatusOr<uint64_t> NextIds(uint64_t n) override { return base_->NextIds(n); }

  std::atomic<bool> fail{false};

 private:
  ServerStore* const base_;
};

// CreateIntent keeps a change in memory only once the store took it: a failed commit of an
// intent that supersedes one in flight leaves the old intent, its in-flight decision and the
// node's intent index as they were (an undo log, not a copy of every intent).
TEST_F(ServerCoreTest, FailedCommitOfASupersedingIntentRestoresMemory) {
  core_.reset();
  FlakyStore flaky(store_.get());
  ServerCoreOptions options;
  options.store = &flaky;
  options.reconcile_interval = absl::Milliseconds(2);
  options.decision_timeout = absl::Seconds(60);
  options.random_seed = 42;
  absl::StatusOr<std::unique_ptr<ServerCore>> core = ServerCore::Create(options);
  ASSERT_TRUE(core.ok()) << core.status();
  core_ = std::move(*core);

  auto a = Connect("node-a", {});
  const v1::Intent first = MustCreate(Register("node-a", 0x100000, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  ASSERT_EQ(decisions.size(), 1u);
  ASSERT_EQ(MustGetIntent(first.id()).state(), v1::INTENT_STATE_APPLYING);

  flaky.fail = true;
  absl::StatusOr<v1::CreateIntentResponse> failed =
      core_->CreateIntent(Unregister("node-a", 0x100000, kMiB));
  flaky.fail = false;
  EXPECT_FALSE(failed.ok());
  EXPECT_EQ(Intents().size(), 1u) << "the failed intent is not kept";
  EXPECT_EQ(MustGetIntent(first.id()).state(), v1::INTENT_STATE_APPLYING);
  EXPECT_EQ(MustGetNode("node-a").required_bytes(), kMiB) << "the restored intent counts again";
  // The restored in-flight decision's answer still counts, and nothing is sent again.
  Answer("node-a", a, decisions[0], 0);
  EXPECT_EQ(MustGetIntent(first.id()).state(), v1::INTENT_STATE_SATISFIED);
  SendSnapshot("node-a", a, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  Settle();
  EXPECT_EQ(a->decision_count(), 1u);

  // A later intent on the node supersedes it normally.
  const v1::Intent second = MustCreate(Unregister("node-a", 0x100000, kMiB));
  EXPECT_EQ(MustGetIntent(first.id()).state(), v1::INTENT_STATE_SUPERSEDED);
  EXPECT_EQ(Intents().size(), 2u);
  decisions = WaitDecisions(a, 2);
  ASSERT_EQ(decisions.size(), 2u);
  EXPECT_EQ(decisions[1].kind(), v1::DECISION_KIND_UNREGISTER);
  core_.reset();  // before `flaky` goes
}

TEST_F(ServerCoreTest, RegisterIntentIsKeptAndRestoredWhenTheRegionGoes) {
  auto a = Connect("node-a", {});
  const v1::Intent created = MustCreate(Register("node-a", 0x100000, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  ASSERT_EQ(decisions.size(), 1u);
  Answer("node-a", a, decisions[0], 0);
  SendSnapshot("node-a", a, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  Settle();
  EXPECT_EQ(a->decision_count(), 1u);
  // Someone unregistered it behind the server's back: the next report shows it gone.
  SendSnapshot("node-a", a, {});
  decisions = WaitDecisions(a, 2);
  Settle();
  ASSERT_EQ(a->decision_count(), 2u);
  EXPECT_EQ(decisions[1].kind(), v1::DECISION_KIND_REGISTER);
  EXPECT_NE(decisions[1].id(), decisions[0].id());
  EXPECT_EQ(MustGetIntent(created.id()).attempts(), 2u);
}

// A context the agent tore down because its VMM exited is an event watchers see.
TEST_F(ServerCoreTest, AnEndedContextIsAVmmExitedEventAndItsIntentsAreWithdrawn) {
  auto a = Connect("node-a", {}, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  const v1::Intent held = MustCreate(Register("node-a", 0x100000, kMiB));
  Settle();
  auto events = *core_->Subscribe("node-a");
  v1::AgentMessage delta;
  delta.mutable_delta()->set_version(++snapshot_version_);
  delta.mutable_delta()->add_removed_contexts("vm-1");
  v1::EndedContext* ended = delta.mutable_delta()->add_ended_contexts();
  ended->set_context("vm-1");
  ended->set_owner_pid(4242);
  ended->set_unpinned_bytes(kMiB);
  core_->AgentMessage("node-a", a.get(), delta);
  for (;;) {
    std::optional<v1::Event> event = events->Next(absl::Seconds(10));
    ASSERT_TRUE(event.has_value()) << "no vmm_exited event";
    if (event->type() != "vmm_exited") continue;
    EXPECT_EQ(event->node(), "node-a");
    EXPECT_NE(event->message().find("vm-1"), std::string::npos) << event->message();
    EXPECT_NE(event->message().find("pid 4242"), std::string::npos) << event->message();
    break;
  }
  // The registration it asked for is moot with the VMM gone: withdrawn, never re-sent.
  EXPECT_EQ(MustGetIntent(held.id()).state(), v1::INTENT_STATE_WITHDRAWN);
  Settle();
  for (const v1::Decision& decision : a->Decisions()) {
    EXPECT_NE(decision.kind(), v1::DECISION_KIND_REGISTER) << "re-sent after the VMM exited";
  }
}

TEST_F(ServerCoreTest, AReportOlderThanTheIntentIsNotTrusted) {
  // The report says c1 holds the region; the VMM then unregisters it on the agent directly.
  auto a = Connect("node-a", {}, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  const v1::Intent held = MustCreate(Register("node-a", 0x100000, kMiB));
  Settle();
  EXPECT_NE(MustGetIntent(held.id()).state(), v1::INTENT_STATE_SATISFIED)
      << "satisfied from a report older than the intent";
  EXPECT_EQ(a->decision_count(), 0u) << "the report says it holds: wait for a confirmation";
  // The agent's next delta shows the region gone: the register is sent.
  v1::AgentMessage delta;
  delta.mutable_delta()->set_version(++snapshot_version_);
  v1::RegionKey* removed = delta.mutable_delta()->add_removed_regions();
  removed->set_context("vm-1");
  removed->set_ua(0x100000);
  removed->set_size(kMiB);
  core_->AgentMessage("node-a", a.get(), delta);
  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  ASSERT_EQ(decisions.size(), 1u);
  EXPECT_EQ(decisions[0].kind(), v1::DECISION_KIND_REGISTER);

  // Where the report was right, a heartbeat confirms it: satisfied without a decision.
  auto b = Connect("node-b", {}, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  const v1::Intent confirmed = MustCreate(Register("node-b", 0x100000, kMiB));
  Settle();
  EXPECT_NE(MustGetIntent(confirmed.id()).state(), v1::INTENT_STATE_SATISFIED);
  SendHeartbeat("node-b", b);
  ASSERT_TRUE(Eventually(
      [&] { return MustGetIntent(confirmed.id()).state() == v1::INTENT_STATE_SATISFIED; }));
  EXPECT_EQ(b->decision_count(), 0u);
}

TEST_F(ServerCoreTest, RegisterAnsweredEbusyIsAlreadyHeld) {
  // The agent holds the region although the server's view does not show it yet: the register's
  // EBUSY (spec §2.2: this container already holds it) means the intent holds.
  auto a = Connect("node-a", {});
  const v1::Intent intent = MustCreate(Register("node-a", 0x100000, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  ASSERT_EQ(decisions.size(), 1u);
  Answer("node-a", a, decisions[0], EBUSY);
  EXPECT_EQ(MustGetIntent(intent.id()).state(), v1::INTENT_STATE_SATISFIED);
  Settle();
  EXPECT_EQ(a->decision_count(), 1u) << "retried a register the agent already holds";
}

TEST_F(ServerCoreTest, LaterIntentSupersedesAndListingPages) {
  auto a = Connect("node-a", {});
  const v1::Intent first = MustCreate(Register("node-a", 0x100000, kMiB));
  const v1::Intent second = MustCreate(Unregister("node-a", 0x100000, kMiB));
  const v1::Intent superseded = MustGetIntent(first.id());
  EXPECT_EQ(superseded.state(), v1::INTENT_STATE_SUPERSEDED);
  EXPECT_TRUE(absl::StrContains(superseded.last_message(), second.id()));
  for (int i = 0; i < 3; ++i) MustCreate(Register("node-a", 0x400000 + i * kMiB, kMiB));

  v1::ListIntentsRequest request;
  request.set_page_size(2);
  std::vector<std::string> ids;
  for (int page = 0; page < 10; ++page) {
    absl::StatusOr<v1::ListIntentsResponse> response = core_->ListIntents(request);
    ASSERT_TRUE(response.ok()) << response.status();
    for (const v1::Intent& intent : response->intents()) ids.push_back(intent.id());
    if (response->next_page_token().empty()) break;
    request.set_page_token(response->next_page_token());
  }
  ASSERT_EQ(ids.size(), 5u);
  EXPECT_EQ(ids[0], first.id());
  EXPECT_EQ(ids[1], second.id());
  EXPECT_EQ(std::set<std::string>(ids.begin(), ids.end()).size(), 5u);

  v1::ListIntentsRequest by_state;
  by_state.set_state(v1::INTENT_STATE_SUPERSEDED);
  absl::StatusOr<v1::ListIntentsResponse> filtered = core_->ListIntents(by_state);
  ASSERT_TRUE(filtered.ok()) << filtered.status();
  ASSERT_EQ(filtered->intents_size(), 1);
  EXPECT_EQ(filtered->intents(0).id(), first.id());
  v1::ListIntentsRequest bad_token;
  bad_token.set_page_token("not-a-token");
  EXPECT_EQ(core_->ListIntents(bad_token).status().code(), absl::StatusCode::kInvalidArgument);
  // The agent does not hold the region: once it confirms that state (its next heartbeat), the
  // unregister holds without a decision, and the superseded register is not sent any more (the
  // background loop may have sent it once before the unregister arrived: attempts says).
  const uint32_t register_attempts = superseded.attempts();
  EXPECT_LE(register_attempts, 1u);
  WaitDecisions(a, 3 + register_attempts);
  SendHeartbeat("node-a", a);
  ASSERT_TRUE(
      Eventually([&] { return MustGetIntent(second.id()).state() == v1::INTENT_STATE_SATISFIED; }));
  Settle();
  EXPECT_EQ(a->decision_count(), 3 + register_attempts);
  size_t for_region = 0;
  for (const v1::Decision& decision : a->Decisions()) {
    if (decision.ua() != 0x100000) continue;
    ++for_region;
    EXPECT_EQ(decision.kind(), v1::DECISION_KIND_REGISTER);
  }
  EXPECT_EQ(for_region, register_attempts);
  EXPECT_EQ(MustGetIntent(first.id()).attempts(), register_attempts);
  EXPECT_EQ(MustGetIntent(second.id()).attempts(), 0u);
  EXPECT_EQ(MustGetIntent(first.id()).state(), v1::INTENT_STATE_SUPERSEDED);
}

// --- (2) Admission ------------------------------------------------------------------------------

TEST_F(ServerCoreTest, OverPoolBudgetIsResourceExhaustedWithReason) {
  v1::Policy policy;
  policy.set_name("pool-a");
  (*policy.mutable_node_selector())["pool"] = "a";
  policy.set_pinned_bytes_budget(4 * kMiB);
  SetPolicy(policy);
  auto a = Connect("node-a", {{"pool", "a"}});
  auto b = Connect("node-b", {{"pool", "a"}});
  auto c = Connect("node-c", {{"pool", "b"}});

  MustCreate(Register("node-a", 0, 2 * kMiB));
  MustCreate(Register("node-b", 0, 2 * kMiB));
  EXPECT_EQ(MustGetNode("node-a").budget_bytes(), 4 * kMiB);
  EXPECT_DOUBLE_EQ(MustGetNode("node-a").budget_used_ratio(), 1.0);

  absl::StatusOr<v1::CreateIntentResponse> over =
      core_->CreateIntent(Register("node-a", 0x200000, kPage));
  ASSERT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_TRUE(absl::StrContains(over.status().message(), "pool-a")) << over.status();
  EXPECT_TRUE(absl::StrContains(over.status().message(), "over by")) << over.status();
  EXPECT_EQ(Intents().size(), 2u);
  EXPECT_EQ(StoredIntents(), 2u);

  // Another pool is not limited by pool-a.
  MustCreate(Register("node-c", 0, 8 * kMiB));
  // The same region again (another container) costs nothing more.
  MustCreate(Register("node-a", 0, 2 * kMiB, "c2"));
  EXPECT_EQ(Intents().size(), 4u);

  // Unknown node.
  absl::StatusOr<v1::CreateIntentResponse> unknown =
      core_->CreateIntent(Register("node-x", 0, kPage));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << unknown.status();
  EXPECT_EQ(Intents().size(), 4u);
}

TEST_F(ServerCoreTest, PoliciesBeyondMaxPoliciesAreEnospcAndCounted) {
  core_.reset();
  StartCore([](ServerCoreOptions& options) { options.max_policies = 2; });
  v1::Policy policy;
  for (const char* name : {"a", "b"}) {
    policy.set_name(name);
    ASSERT_TRUE(core_->SetPolicy(policy).ok());
  }
  policy.set_name("c");
  absl::StatusOr<v1::Policy> third = core_->SetPolicy(policy);
  EXPECT_EQ(ErrnoOf(third.status()), ENOSPC) << third.status();
  EXPECT_NE(third.status().message().find("--max_policies"), absl::string_view::npos);
  policy.set_name("a");  // an existing one still changes
  EXPECT_TRUE(core_->SetPolicy(policy).ok());
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.policy_limit_refusals, 1u);
}

TEST_F(ServerCoreTest, LabelPolicyDeniesWithPermissionDenied) {
  v1::Policy policy;
  policy.set_name("tenants");
  v1::LabelRequirement* allow = policy.add_allow();
  allow->set_key("tenant");
  allow->add_values("blue");
  v1::LabelRequirement* deny = policy.add_deny();
  deny->set_key("frozen");
  SetPolicy(policy);
  auto a = Connect("node-a", {});

  v1::CreateIntentRequest red = Register("node-a", 0, kMiB);
  (*red.mutable_labels())["tenant"] = "red";
  absl::StatusOr<v1::CreateIntentResponse> denied = core_->CreateIntent(red);
  ASSERT_EQ(denied.status().code(), absl::StatusCode::kPermissionDenied) << denied.status();
  EXPECT_TRUE(absl::StrContains(denied.status().message(), "tenants")) << denied.status();
  EXPECT_TRUE(absl::StrContains(denied.status().message(), "allow[0]")) << denied.status();

  v1::CreateIntentRequest unlabelled = Unregister("node-a", 0, kMiB);
  EXPECT_EQ(core_->CreateIntent(unlabelled).status().code(), absl::StatusCode::kPermissionDenied);

  v1::CreateIntentRequest frozen = Register("node-a", 0, kMiB);
  (*frozen.mutable_labels())["tenant"] = "blue";
  (*frozen.mutable_labels())["frozen"] = "yes";
  absl::StatusOr<v1::CreateIntentResponse> frozen_denied = core_->CreateIntent(frozen);
  ASSERT_EQ(frozen_denied.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(absl::StrContains(frozen_denied.status().message(), "deny[0]"))
      << frozen_denied.status();

  EXPECT_TRUE(Intents().empty());
  EXPECT_EQ(StoredIntents(), 0u);
  Settle();
  EXPECT_EQ(a->decision_count(), 0u);

  v1::CreateIntentRequest blue = Register("node-a", 0, kMiB);
  (*blue.mutable_labels())["tenant"] = "blue";
  absl::StatusOr<v1::CreateIntentResponse> admitted = core_->CreateIntent(blue);
  ASSERT_TRUE(admitted.ok()) << admitted.status();
  ASSERT_EQ(admitted->admitted_by_size(), 1);
  EXPECT_EQ(admitted->admitted_by(0), "tenants");
}

TEST_F(ServerCoreTest, DryRunAnswersWithoutStoringAnything) {
  v1::Policy policy;
  policy.set_name("small");
  policy.set_pinned_bytes_budget(2 * kMiB);
  SetPolicy(policy);
  auto a = Connect("node-a", {});
  auto events = *core_->Subscribe("");

  v1::CreateIntentRequest request = Register("node-a", 0, kMiB);
  request.set_dry_run(true);
  absl::StatusOr<v1::CreateIntentResponse> response = core_->CreateIntent(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_TRUE(response->intent().id().empty());
  EXPECT_EQ(response->intent().kind(), v1::INTENT_KIND_REGISTER);
  EXPECT_EQ(response->intent().size(), kMiB);
  ASSERT_EQ(response->admitted_by_size(), 1);
  EXPECT_EQ(response->admitted_by(0), "small");
  EXPECT_TRUE(absl::StrContains(response->admission(), "would be admitted"))
      << response->admission();

  // Over budget: refused, as the real request would be.
  v1::CreateIntentRequest big = Register("node-a", 0, 4 * kMiB);
  big.set_dry_run(true);
  EXPECT_EQ(core_->CreateIntent(big).status().code(), absl::StatusCode::kResourceExhausted);

  Settle();
  EXPECT_TRUE(Intents().empty());
  EXPECT_EQ(StoredIntents(), 0u);
  EXPECT_EQ(a->decision_count(), 0u);
  EXPECT_EQ(MustGetNode("node-a").required_bytes(), 0u);
  while (EventSubscription::EventPtr event = events->TryNext()) {
    EXPECT_NE(event->type(), "intent_created");
  }
}

TEST_F(ServerCoreTest, MalformedRequestsAreInvalidArgumentNamingTheField) {
  auto a = Connect("node-a", {});
  struct Case {
    std::string name;
    std::function<void(v1::CreateIntentRequest*)> mutate;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"empty node", [](v1::CreateIntentRequest* r) { r->clear_node(); }, "intent.node"},
      {"zero size", [](v1::CreateIntentRequest* r) { r->set_size(0); }, "intent.size"},
      {"misaligned size", [](v1::CreateIntentRequest* r) { r->set_size(kMiB + 1); }, "intent.size"},
      {"misaligned ua", [](v1::CreateIntentRequest* r) { r->set_ua(0x1001); }, "intent.ua"},
      {"wrapping", [](v1::CreateIntentRequest* r) { r->set_ua(~uint64_t{0} - kPage + 1); },
       "intent.size"},
      {"unspecified kind",
       [](v1::CreateIntentRequest* r) { r->set_kind(v1::INTENT_KIND_UNSPECIFIED); }, "intent.kind"},
      {"unknown kind",
       [](v1::CreateIntentRequest* r) { r->set_kind(static_cast<v1::IntentKind>(99)); },
       "intent.kind"},
      {"no container", [](v1::CreateIntentRequest* r) { r->clear_container(); },
       "intent.container"},
      {"no context", [](v1::CreateIntentRequest* r) { r->clear_context(); }, "intent.context"},
      {"bad label", [](v1::CreateIntentRequest* r) { (*r->mutable_labels())["-bad"] = "x"; },
       "intent.labels"},
      {"release with ua",
       [](v1::CreateIntentRequest* r) {
         r->set_kind(v1::INTENT_KIND_RELEASE_CONTAINER);
         r->set_size(0);
       },
       "intent.ua"},
      {"teardown with container",
       [](v1::CreateIntentRequest* r) {
         r->set_kind(v1::INTENT_KIND_TEARDOWN_CONTEXT);
         r->set_ua(0);
         r->set_size(0);
       },
       "intent.container"},
  };
  for (const Case& c : cases) {
    v1::CreateIntentRequest request = Register("node-a", 0x10000, kMiB);
    c.mutate(&request);
    absl::StatusOr<v1::CreateIntentResponse> response = core_->CreateIntent(request);
    EXPECT_EQ(response.status().code(), absl::StatusCode::kInvalidArgument)
        << c.name << ": " << response.status();
    EXPECT_TRUE(absl::StrContains(response.status().message(), c.field))
        << c.name << ": " << response.status();
    // Also as a dry run.
    request.set_dry_run(true);
    EXPECT_EQ(core_->CreateIntent(request).status().code(), absl::StatusCode::kInvalidArgument)
        << c.name;
  }
  Settle();
  EXPECT_TRUE(Intents().empty());
  EXPECT_EQ(StoredIntents(), 0u);
  EXPECT_EQ(a->decision_count(), 0u);

  v1::Policy bad_policy;
  bad_policy.set_name("bad name!");
  absl::StatusOr<v1::Policy> set = core_->SetPolicy(bad_policy);
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(set.status().message(), "policy.name")) << set.status();
  EXPECT_TRUE(core_->ListPolicies().empty());
}

// --- (3) EBUSY ----------------------------------------------------------------------------------

TEST_F(ServerCoreTest, EbusyIsRetriedWithBackoffUntilTheAgentAnswersOk) {
  v1::Policy policy;
  policy.set_name("slow-retry");
  policy.mutable_ebusy_retry()->set_initial_backoff_ms(500);
  policy.mutable_ebusy_retry()->set_max_backoff_ms(500);
  SetPolicy(policy);
  const v1::Region mapped = MakeRegion("vm-1", 0x100000, kMiB, {"c1"}, 1, 3);
  auto a = Connect("node-a", {}, {mapped});

  const v1::Intent created = MustCreate(Unregister("node-a", 0x100000, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  ASSERT_EQ(decisions.size(), 1u);
  EXPECT_EQ(decisions[0].kind(), v1::DECISION_KIND_UNREGISTER);

  const absl::Time answered = absl::Now();
  Answer("node-a", a, decisions[0], EBUSY);
  core_->ReconcileNow();
  const bool before_backoff = absl::Now() - answered < absl::Milliseconds(350);
  v1::Intent intent = MustGetIntent(created.id());
  EXPECT_EQ(intent.state(), v1::INTENT_STATE_RETRYING);
  EXPECT_EQ(intent.attempts(), 1u);
  EXPECT_EQ(intent.last_errno(), EBUSY);
  EXPECT_EQ(intent.last_errno_name(), "EBUSY");
  ASSERT_FALSE(intent.retrying_since().empty());
  ASSERT_FALSE(intent.next_attempt_time().empty());
  const absl::Duration backoff =
      ParseRfc3339(intent.next_attempt_time()) - ParseRfc3339(intent.retrying_since());
  EXPECT_GE(backoff, absl::Milliseconds(400));
  EXPECT_LE(backoff, absl::Milliseconds(600));
  if (before_backoff) {
    EXPECT_EQ(a->decision_count(), 1u) << "retried before the backoff";
  }
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.ebusy_retries, 1u);

  v1::GetRegionFleetRequest get;
  get.set_node("node-a");
  get.set_context("vm-1");
  get.set_ua(0x100000);
  get.set_size(kMiB);
  absl::StatusOr<v1::FleetRegion> region = core_->GetRegion(get);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(region->attempts(), 1u);
  EXPECT_EQ(region->retrying_since(), intent.retrying_since());
  EXPECT_EQ(region->mapped(), 3u);
  v1::ListRegionsFleetRequest list;
  list.set_node("node-a");
  absl::StatusOr<v1::ListRegionsFleetResponse> regions = core_->ListRegions(list);
  ASSERT_TRUE(regions.ok()) << regions.status();
  ASSERT_EQ(regions->regions_size(), 1);
  EXPECT_EQ(regions->regions(0).attempts(), 1u);

  // The retry comes after the backoff, not before.
  decisions = WaitDecisions(a, 2);
  ASSERT_EQ(decisions.size(), 2u);
  EXPECT_GE(absl::Now() - answered, absl::Milliseconds(400));
  EXPECT_EQ(decisions[1].kind(), v1::DECISION_KIND_UNREGISTER);
  EXPECT_NE(decisions[1].id(), decisions[0].id());
  EXPECT_EQ(decisions[1].epoch(), core_->epoch());
  intent = MustGetIntent(created.id());
  EXPECT_EQ(intent.attempts(), 2u);
  EXPECT_EQ(intent.state(), v1::INTENT_STATE_RETRYING);
  EXPECT_EQ(intent.last_decision_id(), decisions[1].id());

  Answer("node-a", a, decisions[1], EBUSY);
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.ebusy_retries, 2u);
  region = core_->GetRegion(get);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(region->attempts(), 2u);

  // Mappings go; the third attempt succeeds.
  decisions = WaitDecisions(a, 3);
  ASSERT_EQ(decisions.size(), 3u);
  Answer("node-a", a, decisions[2], 0);
  intent = MustGetIntent(created.id());
  EXPECT_EQ(intent.state(), v1::INTENT_STATE_SATISFIED);
  EXPECT_EQ(intent.attempts(), 3u);
  EXPECT_EQ(intent.last_errno(), 0);
  EXPECT_TRUE(intent.retrying_since().empty());
  EXPECT_TRUE(intent.next_attempt_time().empty());
  SendSnapshot("node-a", a, {});
  Settle();
  EXPECT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_SATISFIED);
  EXPECT_EQ(a->decision_count(), 3u);
  EXPECT_EQ(core_->GetRegion(get).status().code(), absl::StatusCode::kNotFound);

  const FleetMetricsSnapshot metrics = core_->MetricsSnapshot(0);
  EXPECT_EQ(metrics.counters.ebusy_retries, 2u);
  EXPECT_EQ(metrics.counters.decisions_sent.at("unregister"), 3u);
  EXPECT_EQ(metrics.counters.decision_results.at("unregister/EBUSY"), 2u);
  EXPECT_EQ(metrics.counters.decision_results.at("unregister/OK"), 1u);
  // The stored intent agrees.
  absl::StatusOr<std::vector<v1::Intent>> stored = store_->LoadIntents();
  ASSERT_TRUE(stored.ok()) << stored.status();
  ASSERT_EQ(stored->size(), 1u);
  EXPECT_EQ((*stored)[0].state(), v1::INTENT_STATE_SATISFIED);
  EXPECT_EQ((*stored)[0].attempts(), 3u);
}

TEST_F(ServerCoreTest, WithdrawStopsEbusyRetries) {
  v1::Policy policy;
  policy.set_name("quick-retry");
  policy.mutable_ebusy_retry()->set_initial_backoff_ms(50);
  policy.mutable_ebusy_retry()->set_max_backoff_ms(50);
  SetPolicy(policy);
  auto a = Connect("node-a", {}, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"}, 1, 2)});

  const v1::Intent created = MustCreate(Unregister("node-a", 0x100000, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  ASSERT_EQ(decisions.size(), 1u);
  Answer("node-a", a, decisions[0], EBUSY);
  // It does retry while pursued.
  decisions = WaitDecisions(a, 2);
  ASSERT_EQ(decisions.size(), 2u);
  Answer("node-a", a, decisions[1], EBUSY);
  ASSERT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_RETRYING);

  absl::StatusOr<v1::Intent> withdrawn = core_->WithdrawIntent(created.id());
  ASSERT_TRUE(withdrawn.ok()) << withdrawn.status();
  EXPECT_EQ(withdrawn->state(), v1::INTENT_STATE_WITHDRAWN);
  EXPECT_TRUE(withdrawn->next_attempt_time().empty());
  // Every decision made before the withdrawal is counted in attempts (a retry may have been on
  // its way).
  const uint32_t sent = withdrawn->attempts();
  EXPECT_GE(sent, 2u);

  // Let the backoff (at most 60 ms) pass several times over: nothing more is sent.
  const absl::Time until = absl::Now() + absl::Milliseconds(300);
  EXPECT_TRUE(Eventually([&] { return absl::Now() > until; }));
  Settle();
  EXPECT_EQ(a->decision_count(), sent);
  const v1::Intent intent = MustGetIntent(created.id());
  EXPECT_EQ(intent.state(), v1::INTENT_STATE_WITHDRAWN);
  EXPECT_EQ(intent.attempts(), sent);
  absl::StatusOr<std::vector<v1::Intent>> stored = store_->LoadIntents();
  ASSERT_TRUE(stored.ok()) << stored.status();
  ASSERT_EQ(stored->size(), 1u);
  EXPECT_EQ((*stored)[0].state(), v1::INTENT_STATE_WITHDRAWN);

  // Withdrawing again is idempotent; an unknown id is NOT_FOUND.
  EXPECT_TRUE(core_->WithdrawIntent(created.id()).ok());
  EXPECT_EQ(core_->WithdrawIntent("i-999999").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ServerCoreTest, WithdrawWhileInFlightRecordsTheLateAnswerButStopsPursuing) {
  auto a = Connect("node-a", {});
  const v1::Intent created = MustCreate(Register("node-a", 0, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  ASSERT_EQ(decisions.size(), 1u);
  ASSERT_TRUE(core_->WithdrawIntent(created.id()).ok());
  Answer("node-a", a, decisions[0], EBUSY);
  Settle();
  EXPECT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_WITHDRAWN);
  EXPECT_EQ(a->decision_count(), 1u);
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.ebusy_retries, 0u);
  v1::ListDecisionsRequest list;
  list.set_intent_id(created.id());
  absl::StatusOr<v1::ListDecisionsResponse> records = core_->ListDecisions(list);
  ASSERT_TRUE(records.ok()) << records.status();
  ASSERT_EQ(records->decisions_size(), 1);
  EXPECT_EQ(records->decisions(0).result(), "EBUSY");
}

// --- (4) Drain and cordon -----------------------------------------------------------------------

TEST_F(ServerCoreTest, DrainUnregistersEverythingOnTheNodeWithProgress) {
  const v1::Region r1 = MakeRegion("vm-1", 0x100000, kMiB, {"c1"});
  const v1::Region r2 = MakeRegion("vm-1", 0x400000, 2 * kMiB, {"c1", "c2"}, 2, 2);
  auto a = Connect("node-a", {}, {r1, r2});
  auto b = Connect("node-b", {}, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  auto events = *core_->Subscribe("node-a");

  absl::StatusOr<v1::Node> drained = core_->DrainNode("node-a");
  ASSERT_TRUE(drained.ok()) << drained.status();
  EXPECT_TRUE(drained->cordoned());
  EXPECT_TRUE(drained->drain().active());
  EXPECT_EQ(drained->drain().regions_total(), 2u);
  EXPECT_EQ(drained->drain().regions_remaining(), 2u);
  EXPECT_FALSE(drained->drain().started().empty());

  // One unregister intent per (region, container).
  std::vector<v1::Intent> intents = Intents("node-a");
  ASSERT_EQ(intents.size(), 3u);
  std::set<std::pair<uint64_t, std::string>> targets;
  for (const v1::Intent& intent : intents) {
    EXPECT_EQ(intent.kind(), v1::INTENT_KIND_UNREGISTER);
    EXPECT_EQ(intent.labels().count(kDrainLabel), 1u);
    targets.insert({intent.ua(), intent.container()});
  }
  EXPECT_EQ(targets, (std::set<std::pair<uint64_t, std::string>>{
                         {0x100000, "c1"}, {0x400000, "c1"}, {0x400000, "c2"}}));
  EXPECT_EQ(StoredIntents(), 3u);

  // Cordoned: no new registrations.
  absl::StatusOr<v1::CreateIntentResponse> refused =
      core_->CreateIntent(Register("node-a", 0x800000, kMiB));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();

  std::vector<v1::Decision> decisions = WaitDecisions(a, 3);
  ASSERT_EQ(decisions.size(), 3u);
  const v1::Decision* busy = nullptr;
  for (const v1::Decision& decision : decisions) {
    EXPECT_EQ(decision.kind(), v1::DECISION_KIND_UNREGISTER);
    if (decision.ua() == 0x400000 && decision.container() == "c2") {
      busy = &decision;
      continue;
    }
    Answer("node-a", a, decision, 0);
  }
  ASSERT_NE(busy, nullptr);
  const v1::Decision busy_decision = *busy;
  Answer("node-a", a, busy_decision, EBUSY);
  // Until the agent reports, the server must not take the regions it just unregistered for new
  // work (the agent sends its report after the results). The EBUSY one is retried meanwhile.
  Settle();
  auto sent_for = [&](uint64_t ua, const std::string& container) {
    size_t n = 0;
    for (const v1::Decision& decision : a->Decisions()) {
      n += decision.ua() == ua && decision.container() == container ? 1 : 0;
    }
    return n;
  };
  EXPECT_EQ(sent_for(0x100000, "c1"), 1u) << "unregistered twice";
  EXPECT_EQ(sent_for(0x400000, "c1"), 1u) << "unregistered twice";
  EXPECT_EQ(Intents("node-a").size(), 3u);

  SendSnapshot("node-a", a, {MakeRegion("vm-1", 0x400000, 2 * kMiB, {"c2"}, 1, 2)}, {"vm-1"},
               {"c1", "c2"});
  Settle();
  v1::Node node = MustGetNode("node-a");
  EXPECT_TRUE(node.drain().active());
  EXPECT_EQ(node.drain().regions_total(), 2u);
  EXPECT_EQ(node.drain().regions_remaining(), 1u);
  EXPECT_EQ(node.drain().regions_retrying(), 1u);
  EXPECT_TRUE(node.drain().finished().empty());

  // The retry (default backoff: milliseconds) succeeds.
  decisions = WaitDecisions(a, 4);
  ASSERT_EQ(decisions.size(), 4u);
  EXPECT_EQ(decisions[3].ua(), 0x400000u);
  EXPECT_EQ(decisions[3].container(), "c2");
  Answer("node-a", a, decisions[3], 0);
  Settle();
  EXPECT_EQ(a->decision_count(), 4u) << "unregistered twice";
  EXPECT_EQ(Intents("node-a").size(), 3u);
  EXPECT_TRUE(MustGetNode("node-a").drain().active()) << "the agent has not reported yet";
  SendSnapshot("node-a", a, {}, {"vm-1"}, {"c1", "c2"});
  ASSERT_TRUE(Eventually([&] { return !MustGetNode("node-a").drain().active(); }));
  node = MustGetNode("node-a");
  EXPECT_EQ(node.drain().regions_remaining(), 0u);
  EXPECT_EQ(node.drain().regions_retrying(), 0u);
  EXPECT_FALSE(node.drain().finished().empty());
  EXPECT_TRUE(node.cordoned()) << "a drained node stays cordoned";
  for (const v1::Intent& intent : Intents("node-a")) {
    EXPECT_EQ(intent.state(), v1::INTENT_STATE_SATISFIED) << intent.ShortDebugString();
  }
  EXPECT_EQ(a->decision_count(), 4u);
  EXPECT_EQ(b->decision_count(), 0u) << "other nodes are left alone";
  EXPECT_TRUE(Intents("node-b").empty());

  std::vector<std::string> seen;
  EXPECT_TRUE(WaitEvent(*events, "drain_started", &seen).has_value());
  EXPECT_TRUE(WaitEvent(*events, "drain_finished", &seen).has_value());
}

TEST_F(ServerCoreTest, CordonBlocksNewRegistrationsOnly) {
  auto a = Connect("node-a", {}, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  absl::StatusOr<v1::Node> cordoned = core_->SetCordon("node-a", true);
  ASSERT_TRUE(cordoned.ok()) << cordoned.status();
  EXPECT_TRUE(cordoned->cordoned());
  EXPECT_FALSE(cordoned->drain().active());

  absl::StatusOr<v1::CreateIntentResponse> refused =
      core_->CreateIntent(Register("node-a", 0x800000, kMiB));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "cordoned")) << refused.status();
  EXPECT_TRUE(Intents().empty());
  // Unregistering is still allowed.
  MustCreate(Unregister("node-a", 0x100000, kMiB));
  EXPECT_EQ(Intents().size(), 1u);

  ASSERT_TRUE(core_->SetCordon("node-a", false).ok());
  EXPECT_FALSE(MustGetNode("node-a").cordoned());
  MustCreate(Register("node-a", 0x800000, kMiB));
  EXPECT_EQ(Intents().size(), 2u);

  EXPECT_EQ(core_->SetCordon("node-x", true).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(core_->DrainNode("node-x").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(core_->GetNode("node-x").status().code(), absl::StatusCode::kNotFound);
}

// --- (5) Restart --------------------------------------------------------------------------------

TEST_F(ServerCoreTest, RestartKeepsPoliciesAndIntentsAndDoesNotResendAnsweredDecisions) {
  v1::Policy policy;
  policy.set_name("pool-a");
  (*policy.mutable_node_selector())["pool"] = "a";
  policy.set_pinned_bytes_budget(64 * kMiB);
  const v1::Policy stored_policy = SetPolicy(policy);
  auto a = Connect("node-a", {{"pool", "a"}});
  Connect("node-b", {{"pool", "a"}});
  ASSERT_TRUE(core_->SetCordon("node-b", true).ok());

  // i1: answered and reported. i2: sent, applied by the agent, answer lost in the restart.
  const v1::Intent i1 = MustCreate(Register("node-a", 0x100000, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  ASSERT_EQ(decisions.size(), 1u);
  Answer("node-a", a, decisions[0], 0);
  SendSnapshot("node-a", a, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  const v1::Intent i2 = MustCreate(Register("node-a", 0x400000, kMiB));
  decisions = WaitDecisions(a, 2);
  ASSERT_EQ(decisions.size(), 2u);
  Settle();
  ASSERT_EQ(a->decision_count(), 2u);
  EXPECT_EQ(MustGetIntent(i1.id()).state(), v1::INTENT_STATE_SATISFIED);
  EXPECT_EQ(MustGetIntent(i2.id()).state(), v1::INTENT_STATE_APPLYING);
  const std::set<std::string> old_ids = {decisions[0].id(), decisions[1].id()};
  const uint64_t old_epoch = core_->epoch();

  core_.reset();
  StartCore();
  ASSERT_NE(core_, nullptr);
  EXPECT_GT(core_->epoch(), old_epoch);

  // Policies and intents survived.
  const std::vector<v1::Policy> policies = core_->ListPolicies();
  ASSERT_EQ(policies.size(), 1u);
  EXPECT_EQ(policies[0].name(), "pool-a");
  EXPECT_EQ(policies[0].pinned_bytes_budget(), 64 * kMiB);
  EXPECT_EQ(policies[0].revision(), stored_policy.revision());
  ASSERT_EQ(Intents().size(), 2u);
  EXPECT_EQ(MustGetIntent(i1.id()).state(), v1::INTENT_STATE_SATISFIED);
  EXPECT_EQ(MustGetIntent(i2.id()).state(), v1::INTENT_STATE_PENDING)
      << "what was in flight is re-evaluated";
  EXPECT_TRUE(MustGetNode("node-b").cordoned()) << "admin state survives";

  // The agent reconnects and shows both regions: nothing is sent again.
  auto a2 = std::make_shared<FakeSession>();
  const v1::Welcome welcome = core_->AgentConnected(MakeHello("node-a", {{"pool", "a"}}), a2);
  EXPECT_EQ(welcome.server_epoch(), core_->epoch());
  core_->ReconcileNow();
  SendSnapshot(
      "node-a", a2,
      {MakeRegion("vm-1", 0x100000, kMiB, {"c1"}), MakeRegion("vm-1", 0x400000, kMiB, {"c1"})});
  ASSERT_TRUE(
      Eventually([&] { return MustGetIntent(i2.id()).state() == v1::INTENT_STATE_SATISFIED; }));
  Settle();
  EXPECT_EQ(a2->decision_count(), 0u);
  EXPECT_EQ(a->decision_count(), 2u);
  EXPECT_EQ(MustGetIntent(i1.id()).state(), v1::INTENT_STATE_SATISFIED);

  // New decisions carry the new epoch and ids never used before.
  const v1::Intent i3 = MustCreate(Register("node-a", 0x800000, kMiB));
  EXPECT_FALSE(i3.id().empty());
  decisions = WaitDecisions(a2, 1);
  ASSERT_EQ(decisions.size(), 1u);
  EXPECT_EQ(decisions[0].epoch(), core_->epoch());
  EXPECT_EQ(old_ids.count(decisions[0].id()), 0u);
  // A late answer to a decision of the old epoch changes nothing.
  core_->AgentMessage("node-a", a2.get(), ResultMessage(*a->Decisions().rbegin(), EBUSY));
  Settle();
  EXPECT_EQ(MustGetIntent(i2.id()).state(), v1::INTENT_STATE_SATISFIED);
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.ebusy_retries, 0u);
}

// --- (6) Reconnect ------------------------------------------------------------------------------

TEST_F(ServerCoreTest, ReconnectResynchronisesFromTheSnapshotWithoutDuplicates) {
  auto s1 = Connect("node-a", {});
  const v1::Intent created = MustCreate(Register("node-a", 0x100000, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(s1, 1);
  ASSERT_EQ(decisions.size(), 1u);

  // The agent applies the decision, then the stream breaks before the answer arrives.
  core_->AgentDisconnected("node-a", s1.get());
  s1->Close();
  EXPECT_EQ(MustGetNode("node-a").connection(), v1::CONNECTION_STATE_DISCONNECTED);
  Settle();
  EXPECT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_PENDING);
  // Messages of the dead stream are ignored.
  const uint64_t received = core_->MetricsSnapshot(0).counters.stream_messages_received;
  core_->AgentMessage("node-a", s1.get(), ResultMessage(decisions[0], 0));
  EXPECT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_PENDING);
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.stream_messages_received, received);

  // Reconnect: until the new snapshot, the old report is stale; nothing is decided from it.
  auto s2 = std::make_shared<FakeSession>();
  core_->AgentConnected(MakeHello("node-a", {}), s2);
  EXPECT_EQ(MustGetNode("node-a").connection(), v1::CONNECTION_STATE_CONNECTED);
  Settle();
  EXPECT_EQ(s2->decision_count(), 0u) << "decided from the report of before the reconnect";
  SendSnapshot("node-a", s2, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  ASSERT_TRUE(Eventually(
      [&] { return MustGetIntent(created.id()).state() == v1::INTENT_STATE_SATISFIED; }));
  Settle();
  EXPECT_EQ(s2->decision_count(), 0u);
  EXPECT_EQ(s1->decision_count(), 1u);
  EXPECT_EQ(MustGetIntent(created.id()).attempts(), 1u);

  const FleetMetricsSnapshot metrics = core_->MetricsSnapshot(0);
  EXPECT_EQ(metrics.counters.agent_connects, 2u);
  EXPECT_EQ(metrics.counters.agent_disconnects, 1u);
}

TEST_F(ServerCoreTest, ReplacedSessionResendsOnlyWhatTheSnapshotLacks) {
  auto s1 = Connect("node-a", {});
  const v1::Intent created = MustCreate(Register("node-a", 0x100000, kMiB));
  std::vector<v1::Decision> decisions = WaitDecisions(s1, 1);
  ASSERT_EQ(decisions.size(), 1u);

  // A new stream replaces the old one without a disconnect (the old one is half-dead); this
  // time the decision was lost, and the snapshot shows it.
  auto s2 = std::make_shared<FakeSession>();
  core_->AgentConnected(MakeHello("node-a", {}, "inc-2"), s2);
  // The old stream's answer is ignored.
  core_->AgentMessage("node-a", s1.get(), ResultMessage(decisions[0], 0));
  SendSnapshot("node-a", s2, {});
  std::vector<v1::Decision> resent = WaitDecisions(s2, 1);
  Settle();
  ASSERT_EQ(s2->decision_count(), 1u);
  EXPECT_EQ(s1->decision_count(), 1u);
  EXPECT_EQ(resent[0].kind(), v1::DECISION_KIND_REGISTER);
  EXPECT_NE(resent[0].id(), decisions[0].id());
  EXPECT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_APPLYING);
  Answer("node-a", s2, resent[0], 0);
  SendSnapshot("node-a", s2, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"})});
  Settle();
  EXPECT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_SATISFIED);
  EXPECT_EQ(s2->decision_count(), 1u);
  // Disconnecting the replaced session does not disconnect the node.
  core_->AgentDisconnected("node-a", s1.get());
  EXPECT_EQ(MustGetNode("node-a").connection(), v1::CONNECTION_STATE_CONNECTED);
  EXPECT_EQ(MustGetNode("node-a").incarnation(), "inc-2");
}

// --- (7) Events ---------------------------------------------------------------------------------

// One event per call (policy_set, for every subscriber without a node filter).
void EmitPolicyEvents(ServerCore& core, int n) {
  for (int i = 0; i < n; ++i) {
    v1::Policy policy;
    policy.set_name(absl::StrCat("p", i));
    ASSERT_TRUE(core.SetPolicy(policy).ok());
  }
}

TEST_F(ServerCoreTest, AWatcherThatFallsTooFarBehindIsDroppedAndItsQueueReleased) {
  core_.reset();
  StartCore([](ServerCoreOptions& options) { options.watch_max_lag_events = 3; });
  auto stuck = *core_->Subscribe("");
  auto reader = *core_->Subscribe("");
  EmitPolicyEvents(*core_, 3);
  EXPECT_EQ(stuck->queued(), 3u);
  while (reader->TryNext() != nullptr) {
  }
  EXPECT_GT(core_->MetricsSnapshot(0).counters.watch_buffered_bytes, 0u);

  EmitPolicyEvents(*core_, 1);  // the fourth: `stuck` is 3 behind, at the limit
  EXPECT_TRUE(stuck->closed());
  EXPECT_EQ(stuck->queued(), 0u);
  EXPECT_EQ(stuck->queued_bytes(), 0u);
  const absl::Status why = stuck->end_status();
  EXPECT_EQ(why.code(), absl::StatusCode::kResourceExhausted) << why;
  EXPECT_EQ(ErrnoOf(why), ENOBUFS) << why;
  EXPECT_TRUE(absl::StartsWith(why.message(), "ENOBUFS: the watcher fell 3 events behind")) << why;
  EXPECT_TRUE(absl::StrContains(why.message(), "reconnect")) << why;
  // The one that reads is untouched.
  EXPECT_FALSE(reader->closed());
  EXPECT_EQ(reader->queued(), 1u);

  const ServerCounters counters = core_->MetricsSnapshot(0).counters;
  EXPECT_EQ(counters.watchers_dropped.at("lag"), 1u);
  EXPECT_EQ(counters.events_dropped, 3u);
  EXPECT_EQ(counters.watchers, 1u);
  EXPECT_EQ(counters.watch_buffered_bytes, reader->queued_bytes());
}

TEST_F(ServerCoreTest, WhenAllQueuesAreFullTheWatcherFurthestBehindIsDropped) {
  uint64_t cost = 0;  // what one queued event is charged
  {
    auto probe = *core_->Subscribe("");
    EmitPolicyEvents(*core_, 1);
    cost = probe->queued_bytes();
    ASSERT_GT(cost, 0u);
  }
  core_.reset();
  // Room for four and a half events across all watchers.
  const uint64_t budget = 4 * cost + cost / 2;
  StartCore([budget](ServerCoreOptions& options) { options.watch_buffer_bytes = budget; });
  auto far = *core_->Subscribe("");
  EmitPolicyEvents(*core_, 2);
  auto near = *core_->Subscribe("");
  EmitPolicyEvents(*core_, 1);
  ASSERT_FALSE(far->closed());
  ASSERT_EQ(far->queued(), 3u);
  ASSERT_EQ(near->queued(), 1u);
  EmitPolicyEvents(*core_, 2);
  EXPECT_TRUE(far->closed());
  EXPECT_EQ(ErrnoOf(far->end_status()), ENOBUFS) << far->end_status();
  EXPECT_TRUE(absl::StrContains(far->end_status().message(), "buffers were full"))
      << far->end_status();
  EXPECT_FALSE(near->closed());
  EXPECT_EQ(near->queued(), 3u);
  const ServerCounters counters = core_->MetricsSnapshot(0).counters;
  EXPECT_EQ(counters.watchers_dropped.at("buffer"), 1u);
  EXPECT_LE(counters.watch_buffered_bytes, budget);
}

TEST_F(ServerCoreTest, WatchersBeyondTheLimitAreRefusedUntilOneLeaves) {
  core_.reset();
  StartCore([](ServerCoreOptions& options) { options.max_watchers = 2; });
  auto first = *core_->Subscribe("");
  auto second = *core_->Subscribe("node-a");
  absl::StatusOr<std::shared_ptr<EventSubscription>> third = core_->Subscribe("");
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StartsWith(third.status().message(), "ENOSPC: already 2 WatchEvents streams"))
      << third.status();
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.watchers_refused, 1u);

  EmitPolicyEvents(*core_, 2);
  first->Close();  // the client went away: its queue goes at once
  EXPECT_EQ(first->queued(), 0u);
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.watch_buffered_bytes, 0u);
  EXPECT_TRUE(core_->Subscribe("").ok());
}

TEST_F(ServerCoreTest, WatchEventsReceivesTheIntentLifecycle) {
  auto all = *core_->Subscribe("");
  auto only_b = *core_->Subscribe("node-b");
  auto a = Connect("node-a", {});
  std::optional<v1::Event> connected = WaitEvent(*all, "node_connected");
  ASSERT_TRUE(connected.has_value());
  EXPECT_EQ(connected->node(), "node-a");
  EXPECT_FALSE(connected->time().empty());

  const v1::Intent created = MustCreate(Register("node-a", 0, kMiB));
  std::optional<v1::Event> event = WaitEvent(*all, "intent_created");
  ASSERT_TRUE(event.has_value());
  EXPECT_EQ(event->intent_id(), created.id());
  EXPECT_EQ(event->node(), "node-a");

  std::vector<v1::Decision> decisions = WaitDecisions(a, 1);
  ASSERT_EQ(decisions.size(), 1u);
  event = WaitEvent(*all, "decision_sent");
  ASSERT_TRUE(event.has_value());
  EXPECT_EQ(event->decision_id(), decisions[0].id());
  EXPECT_EQ(event->intent_id(), created.id());

  Answer("node-a", a, decisions[0], 0);
  event = WaitEvent(*all, "decision_result");
  ASSERT_TRUE(event.has_value());
  EXPECT_EQ(event->decision_id(), decisions[0].id());
  EXPECT_EQ(event->result(), "OK");
  event = WaitEvent(*all, "intent_satisfied");
  ASSERT_TRUE(event.has_value());
  EXPECT_EQ(event->intent_id(), created.id());

  // The node filter: nothing of node-a reaches node-b's subscriber.
  while (EventSubscription::EventPtr other = only_b->TryNext()) {
    ADD_FAILURE() << "node-b subscriber got " << other->ShortDebugString();
  }
  auto b = Connect("node-b", {});
  event = WaitEvent(*only_b, "node_connected");
  ASSERT_TRUE(event.has_value());
  EXPECT_EQ(event->node(), "node-b");

  core_->AgentDisconnected("node-b", b.get());
  event = WaitEvent(*all, "node_disconnected");
  ASSERT_TRUE(event.has_value());
  EXPECT_EQ(event->node(), "node-b");
  EXPECT_TRUE(all->end_status().ok()) << all->end_status();

  // Subscriptions end with the core.
  core_.reset();
  EXPECT_TRUE(all->closed());
  EXPECT_FALSE(all->Next(absl::Milliseconds(1)).has_value());
}

// --- (8) Metrics --------------------------------------------------------------------------------

TEST_F(ServerCoreTest, MetricsSnapshotEqualsWhatTheAgentsReported) {
  v1::Policy policy;
  policy.set_name("pool-a");
  (*policy.mutable_node_selector())["pool"] = "a";
  policy.set_pinned_bytes_budget(64 * kMiB);
  SetPolicy(policy);
  // mapped counts the registration itself (1) plus each installed mapping.
  const std::vector<v1::Region> regions_a = {
      MakeRegion("vm-1", 0x100000, 2 * kMiB, {"c1"}, 1, 3),
      MakeRegion("vm-1", 0x400000, kMiB, {"c1", "c2"}, 2, 1),
      MakeRegion("vm-2", 0x100000, 4 * kMiB, {"c3"}, 1, 0),
  };
  const std::vector<v1::Region> regions_b = {MakeRegion("vm-9", 0, 64 * 1024, {"c9"}, 1, 2)};
  auto a = Connect("node-a", {{"pool", "a"}}, regions_a);
  auto b = Connect("node-b", {{"pool", "b"}}, regions_b);

  auto expect_node = [&](const FleetMetricsSnapshot::NodeMetrics& metrics,
                         const std::vector<v1::Region>& regions) {
    uint64_t pinned = 0, used = 0, installed = 0;
    for (const v1::Region& region : regions) {
      pinned += region.size();
      used += region.used();
      installed += region.mapped() > 0 ? region.mapped() - 1 : 0;
    }
    EXPECT_EQ(metrics.pinned_bytes, pinned) << metrics.name;
    EXPECT_EQ(metrics.regions, regions.size()) << metrics.name;
    EXPECT_EQ(metrics.used_sum, used) << metrics.name;
    EXPECT_EQ(metrics.installed_mappings, installed) << metrics.name;
    EXPECT_EQ(metrics.counters.registers_ok(), regions.size()) << metrics.name;
    // And the admin API says the same.
    const v1::Node node = MustGetNode(metrics.name);
    EXPECT_EQ(node.pinned_bytes(), pinned);
    EXPECT_EQ(node.regions(), regions.size());
    EXPECT_EQ(node.used_sum(), used);
    EXPECT_EQ(node.installed_mappings(), installed);
  };

  FleetMetricsSnapshot metrics = core_->MetricsSnapshot(100);
  ASSERT_EQ(metrics.nodes.size(), 2u);
  ASSERT_EQ(metrics.nodes[0].name, "node-a");
  ASSERT_EQ(metrics.nodes[1].name, "node-b");
  expect_node(metrics.nodes[0], regions_a);
  expect_node(metrics.nodes[1], regions_b);
  EXPECT_EQ(metrics.nodes[0].pinned_bytes, 7 * kMiB);
  EXPECT_EQ(metrics.nodes[0].used_sum, 4u);
  EXPECT_EQ(metrics.nodes[0].installed_mappings, 2u);
  EXPECT_EQ(metrics.nodes[0].required_bytes, 7 * kMiB) << "what is pinned counts";
  EXPECT_EQ(metrics.nodes[0].budget_bytes, 64 * kMiB);
  EXPECT_EQ(metrics.nodes[0].budget_used_bytes, 7 * kMiB);
  EXPECT_EQ(metrics.nodes[1].budget_bytes, 0u);
  EXPECT_EQ(metrics.nodes[0].regions_detail.size(), 3u);
  EXPECT_EQ(metrics.nodes[0].contexts.size(), 2u);
  EXPECT_EQ(metrics.nodes[0].containers.size(), 3u);
  EXPECT_TRUE(metrics.nodes[0].connected);
  EXPECT_EQ(metrics.agents_connected, 2u);
  EXPECT_EQ(metrics.counters.agent_connects, 2u);
  EXPECT_EQ(metrics.counters.stream_messages_received, 2u);

  // The region detail is capped across the fleet.
  metrics = core_->MetricsSnapshot(2);
  size_t detail = 0;
  for (const auto& node : metrics.nodes) detail += node.regions_detail.size();
  EXPECT_EQ(detail, 2u);

  // A delta: one region unmapped, one gone.
  v1::AgentMessage delta;
  delta.mutable_delta()->set_version(++snapshot_version_);
  *delta.mutable_delta()->add_upserted_regions() =
      MakeRegion("vm-1", 0x100000, 2 * kMiB, {"c1"}, 1, 1);
  v1::RegionKey* removed = delta.mutable_delta()->add_removed_regions();
  removed->set_context("vm-2");
  removed->set_ua(0x100000);
  removed->set_size(4 * kMiB);
  core_->AgentMessage("node-a", a.get(), delta);
  const std::vector<v1::Region> after_a = {
      MakeRegion("vm-1", 0x100000, 2 * kMiB, {"c1"}, 1, 1),
      MakeRegion("vm-1", 0x400000, kMiB, {"c1", "c2"}, 2, 1),
  };
  metrics = core_->MetricsSnapshot(100);
  ASSERT_EQ(metrics.nodes.size(), 2u);
  EXPECT_EQ(metrics.nodes[0].pinned_bytes, 3 * kMiB);
  EXPECT_EQ(metrics.nodes[0].regions, 2u);
  EXPECT_EQ(metrics.nodes[0].used_sum, 3u);
  EXPECT_EQ(metrics.nodes[0].installed_mappings, 0u);
  const v1::Node node_a = MustGetNode("node-a");
  EXPECT_EQ(node_a.pinned_bytes(), 3 * kMiB);
  EXPECT_EQ(node_a.installed_mappings(), 0u);

  // Intents by state; a disconnected node keeps its last report.
  MustCreate(Register("node-a", 0x800000, kMiB));
  core_->AgentDisconnected("node-b", b.get());
  metrics = core_->MetricsSnapshot(100);
  EXPECT_EQ(metrics.agents_connected, 1u);
  EXPECT_FALSE(metrics.nodes[1].connected);
  expect_node(metrics.nodes[1], regions_b);
  uint64_t intents = 0;
  for (const auto& [state, count] : metrics.intents_by_state) intents += count;
  EXPECT_EQ(intents, 1u);
  EXPECT_EQ(metrics.nodes[0].required_bytes, 4 * kMiB);
}

// --- (8) Decisions that never get a result -----------------------------------------------------

// An agent that dies while applying a decision (e.g. pinning more than the node has) gets it again
// when it comes back, and would die again: after --max_lost_decision_attempts such decisions in a
// row the intent FAILS, saying why, and nothing more is sent.
TEST_F(ServerCoreTest, AnAgentThatRestartsWhileApplyingADecisionFailsTheIntentAtTheLimit) {
  core_.reset();
  StartCore([](ServerCoreOptions& options) { options.max_lost_decision_attempts = 3; });
  auto session = Connect("node-a", {}, {}, "inc-0");
  const v1::Intent created = MustCreate(Register("node-a", 0x100000, kMiB));
  for (int crash = 1; crash <= 3; ++crash) {
    std::vector<v1::Decision> decisions = WaitDecisions(session, 1);
    ASSERT_EQ(decisions.size(), 1u) << "crash " << crash;
    // The agent dies applying it: the stream ends without a result; a new incarnation comes.
    core_->AgentDisconnected("node-a", session.get());
    v1::Intent intent = MustGetIntent(created.id());
    EXPECT_EQ(intent.lost_attempts(), static_cast<uint32_t>(crash));
    EXPECT_EQ(intent.last_errno_name(), "ECONNRESET");
    EXPECT_TRUE(absl::StrContains(intent.last_message(), decisions[0].id()))
        << intent.last_message();
    EXPECT_EQ(intent.state(), v1::INTENT_STATE_PENDING);
    EXPECT_FALSE(intent.next_attempt_time().empty()) << "it backs off";
    session = Connect("node-a", {}, {}, absl::StrCat("inc-", crash));
  }
  ASSERT_TRUE(
      Eventually([&] { return MustGetIntent(created.id()).state() == v1::INTENT_STATE_FAILED; }));
  Settle();
  EXPECT_EQ(session->decision_count(), 0u) << "the fourth attempt is not sent";
  const v1::Intent failed = MustGetIntent(created.id());
  EXPECT_EQ(failed.attempts(), 3u);
  EXPECT_EQ(failed.last_errno(), ECONNRESET);
  EXPECT_TRUE(absl::StartsWith(failed.last_message(),
                               "agent restarted 3 times while applying this decision; giving up"))
      << failed.last_message();
  // Listed as failed; the decision records say they got no result.
  v1::ListIntentsRequest request;
  request.set_state(v1::INTENT_STATE_FAILED);
  absl::StatusOr<v1::ListIntentsResponse> listed = core_->ListIntents(request);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->intents_size(), 1);
  EXPECT_EQ(listed->intents(0).last_message(), failed.last_message());
  v1::ListDecisionsRequest decisions;
  decisions.set_intent_id(created.id());
  absl::StatusOr<v1::ListDecisionsResponse> records = core_->ListDecisions(decisions);
  ASSERT_TRUE(records.ok()) << records.status();
  ASSERT_EQ(records->decisions_size(), 3);
  for (const v1::DecisionRecord& record : records->decisions()) {
    EXPECT_EQ(record.result(), "ECONNRESET") << record.id();
  }
  const ServerCounters counters = core_->MetricsSnapshot(0).counters;
  EXPECT_EQ(counters.intents_failed_lost_decisions, 1u);
  EXPECT_EQ(counters.decisions_session_lost, 3u);
  // The failed intent requires nothing any more; a new one for the region starts afresh.
  EXPECT_EQ(MustGetNode("node-a").required_bytes(), 0u);
  const v1::Intent again = MustCreate(Register("node-a", 0x100000, kMiB));
  EXPECT_EQ(WaitDecisions(session, 1).size(), 1u);
  EXPECT_EQ(MustGetIntent(again.id()).lost_attempts(), 0u);
}

// Only losses in a row count: a result in between (the agent lived through applying it) resets
// the count, and so does a report showing the intent holds.
TEST_F(ServerCoreTest, AResultBetweenLostDecisionsStartsTheCountAgain) {
  core_.reset();
  StartCore([](ServerCoreOptions& options) { options.max_lost_decision_attempts = 2; });
  auto session = Connect("node-a", {}, {}, "inc-0");
  const v1::Intent created = MustCreate(Unregister("node-a", 0x100000, kMiB));
  SendSnapshot("node-a", session, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"}, 1, 2)});
  std::vector<v1::Decision> decisions = WaitDecisions(session, 1);
  ASSERT_EQ(decisions.size(), 1u);
  // A new stream replaces the old one while the decision is in flight (same incarnation).
  auto replaced = std::make_shared<FakeSession>();
  core_->AgentConnected(MakeHello("node-a", {}, "inc-0"), replaced);
  SendSnapshot("node-a", replaced, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"}, 1, 2)});
  EXPECT_EQ(MustGetIntent(created.id()).lost_attempts(), 1u);
  decisions = WaitDecisions(replaced, 1);
  ASSERT_EQ(decisions.size(), 1u);
  Answer("node-a", replaced, decisions[0], EBUSY);  // a result: the count starts again
  EXPECT_EQ(MustGetIntent(created.id()).lost_attempts(), 0u);
  EXPECT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_RETRYING);
  decisions = WaitDecisions(replaced, 2);
  ASSERT_EQ(decisions.size(), 2u);
  core_->AgentDisconnected("node-a", replaced.get());
  EXPECT_EQ(MustGetIntent(created.id()).lost_attempts(), 1u);
  EXPECT_EQ(MustGetIntent(created.id()).state(), v1::INTENT_STATE_RETRYING);
  auto back = Connect("node-a", {}, {MakeRegion("vm-1", 0x100000, kMiB, {"c1"}, 1, 2)}, "inc-0");
  decisions = WaitDecisions(back, 1);
  ASSERT_EQ(decisions.size(), 1u);
  Answer("node-a", back, decisions[0], 0);
  const v1::Intent satisfied = MustGetIntent(created.id());
  EXPECT_EQ(satisfied.state(), v1::INTENT_STATE_SATISFIED);
  EXPECT_EQ(satisfied.lost_attempts(), 0u);
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.intents_failed_lost_decisions, 0u);
}

// Decisions that time out count the same way, and say so.
TEST_F(ServerCoreTest, DecisionsThatTimeOutFailTheIntentAtTheLimit) {
  core_.reset();
  StartCore([](ServerCoreOptions& options) {
    options.max_lost_decision_attempts = 2;
    options.decision_timeout = absl::Milliseconds(20);
  });
  auto session = Connect("node-a", {});
  const v1::Intent created = MustCreate(Register("node-a", 0x100000, kMiB));
  ASSERT_TRUE(
      Eventually([&] { return MustGetIntent(created.id()).state() == v1::INTENT_STATE_FAILED; }));
  const v1::Intent failed = MustGetIntent(created.id());
  EXPECT_EQ(session->decision_count(), 2u);
  EXPECT_EQ(failed.last_errno_name(), "ETIMEDOUT");
  EXPECT_TRUE(absl::StartsWith(failed.last_message(),
                               "agent gave no result to this decision 2 times in a row"))
      << failed.last_message();
  const ServerCounters counters = core_->MetricsSnapshot(0).counters;
  EXPECT_EQ(counters.decisions_timed_out, 2u);
  EXPECT_EQ(counters.intents_failed_lost_decisions, 1u);
}

// Between lost decisions the server waits (lost_decision_backoff, doubling): a crash-looping agent
// is not handed the same decision the moment it comes back.
TEST_F(ServerCoreTest, ALostDecisionIsSentAgainOnlyAfterTheBackoff) {
  core_.reset();
  StartCore([](ServerCoreOptions& options) { options.lost_decision_backoff = absl::Seconds(30); });
  auto session = Connect("node-a", {}, {}, "inc-0");
  const v1::Intent created = MustCreate(Register("node-a", 0x100000, kMiB));
  ASSERT_EQ(WaitDecisions(session, 1).size(), 1u);
  const absl::Time lost_at = absl::Now();
  core_->AgentDisconnected("node-a", session.get());
  session = Connect("node-a", {}, {}, "inc-1");
  Settle();
  EXPECT_EQ(session->decision_count(), 0u) << "sent again before the backoff";
  const v1::Intent intent = MustGetIntent(created.id());
  EXPECT_EQ(intent.state(), v1::INTENT_STATE_PENDING);
  // 30 s with the default 20 % jitter.
  EXPECT_GE(ParseRfc3339(intent.next_attempt_time()), lost_at + absl::Seconds(24));
  EXPECT_LE(ParseRfc3339(intent.next_attempt_time()), absl::Now() + absl::Seconds(36));
}

// --- (8b) What a node can hold --------------------------------------------------------------

// Even with no policy, CreateIntent (and dry_run) refuses a registration the node can never hold,
// from what its agent reports: its memory, the agent's per-region and per-node limits, the
// context's memlock limit in whole pages.
TEST_F(ServerCoreTest, ARegistrationLargerThanTheNodeCanHoldIsRefusedAtAdmission) {
  v1::Hello hello = MakeHello("node-a", {});
  hello.set_physical_memory_bytes(256 * kMiB);
  hello.set_max_region_bytes(64 * kMiB);
  hello.set_max_pinned_bytes(128 * kMiB);
  auto session = std::make_shared<FakeSession>();
  core_->AgentConnected(hello, session);
  v1::AgentMessage snapshot =
      SnapshotMessage({MakeRegion("vm-1", 0, 48 * kMiB, {"c1"})}, 1, {"vm-1", "small"}, {"c1"});
  for (v1::Context& context : *snapshot.mutable_snapshot()->mutable_contexts()) {
    if (context.name() != "small") continue;
    context.set_memlock_unlimited(false);
    context.set_memlock_limit_bytes(8 * kMiB + kPage / 2);
  }
  core_->AgentMessage("node-a", session.get(), snapshot);

  struct Case {
    v1::CreateIntentRequest request;
    std::string names;  // what the refusal names
  } cases[] = {
      {Register("node-a", 0x10000000, 64 * kMiB + kPage),
       "can never hold this region: 64.00 MiB (67112960 bytes) > the agent's --max_region_bytes "
       "(64 MiB)"},
      {RegionIntent(v1::INTENT_KIND_REGISTER, "node-a", "small", "c1", 0, 8 * kMiB + kPage),
       "the memlock limit of context \"small\" (8 MiB)"},
  };
  for (Case& c : cases) {
    for (bool dry_run : {true, false}) {
      c.request.set_dry_run(dry_run);
      absl::StatusOr<v1::CreateIntentResponse> refused = core_->CreateIntent(c.request);
      ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
      EXPECT_TRUE(absl::StartsWith(refused.status().message(), "ENOMEM: ")) << refused.status();
      EXPECT_TRUE(absl::StrContains(refused.status().message(), c.names)) << refused.status();
    }
  }
  // With what the node requires already: 48 MiB reported + 64 + 32 > 128 MiB.
  MustCreate(Register("node-a", 0x10000000, 64 * kMiB));
  absl::StatusOr<v1::CreateIntentResponse> over =
      core_->CreateIntent(Register("node-a", 0x20000000, 32 * kMiB));
  ASSERT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_EQ(over.status().message(),
            "ENOMEM: node \"node-a\": the agent's --max_pinned_bytes 128 MiB: 112 MiB required + "
            "32 MiB requested = 144 MiB, over by 16 MiB");
  MustCreate(RegionIntent(v1::INTENT_KIND_REGISTER, "node-a", "small", "c1", 0, 8 * kMiB));
  EXPECT_EQ(Intents().size(), 2u);
  EXPECT_EQ(StoredIntents(), 2u) << "nothing refused was stored";
}

// An intent stored before the node said what it can hold, which it then cannot, fails with the
// reason instead of being sent again and again.
TEST_F(ServerCoreTest, AStoredIntentTheNodeCanNoLongerHoldFailsWithTheReason) {
  auto session = Connect("node-a", {}, {}, "inc-0");
  const v1::Intent created = MustCreate(Register("node-a", 0x10000000, 64 * kMiB));
  ASSERT_EQ(WaitDecisions(session, 1).size(), 1u);
  // The agent restarts with --max_region_bytes=32 MiB (the decision in flight is lost).
  core_->AgentDisconnected("node-a", session.get());
  v1::Hello hello = MakeHello("node-a", {}, "inc-1");
  hello.set_max_region_bytes(32 * kMiB);
  session = std::make_shared<FakeSession>();
  core_->AgentConnected(hello, session);
  SendSnapshot("node-a", session, {});
  ASSERT_TRUE(
      Eventually([&] { return MustGetIntent(created.id()).state() == v1::INTENT_STATE_FAILED; }));
  Settle();
  EXPECT_EQ(session->decision_count(), 0u) << "not sent to the node that cannot hold it";
  const v1::Intent failed = MustGetIntent(created.id());
  EXPECT_EQ(failed.last_errno_name(), "ENOMEM");
  EXPECT_TRUE(absl::StrContains(failed.last_message(),
                                "can never hold this region: 64 MiB > the agent's "
                                "--max_region_bytes (32 MiB)"))
      << failed.last_message();
  EXPECT_EQ(MustGetNode("node-a").required_bytes(), 0u);
}

// --- (9) Fleet-scale reads ---------------------------------------------------------------------

// The budget figures are running totals: they follow reports, intents (created, failed,
// withdrawn, superseded) and relabelled nodes without a recomputation over the fleet.
TEST_F(ServerCoreTest, BudgetFiguresFollowReportsIntentsAndLabels) {
  v1::Policy policy;
  policy.set_name("pool-a");
  (*policy.mutable_node_selector())["pool"] = "a";
  policy.set_pinned_bytes_budget(64 * kMiB);
  SetPolicy(policy);
  auto a = Connect("node-a", {{"pool", "a"}}, {MakeRegion("vm-1", 0x100000, 2 * kMiB, {"c1"})});
  auto b = Connect("node-b", {{"pool", "a"}}, {MakeRegion("vm-1", 0x100000, 4 * kMiB, {"c1"})});
  auto pool_use = [&](const std::string& node) {
    const v1::Node view = MustGetNode(node);
    return static_cast<uint64_t>(view.budget_used_ratio() * static_cast<double>(64 * kMiB));
  };
  EXPECT_EQ(pool_use("node-a"), 6 * kMiB);
  EXPECT_EQ(MustGetNode("node-a").required_bytes(), 2 * kMiB);

  // An intent for a region already reported costs nothing; a new one counts before it is sent.
  const v1::Intent same = MustCreate(Register("node-a", 0x100000, 2 * kMiB, "c2"));
  const v1::Intent more = MustCreate(Register("node-a", 0x800000, 8 * kMiB));
  EXPECT_EQ(MustGetNode("node-a").required_bytes(), 10 * kMiB);
  EXPECT_EQ(pool_use("node-b"), 14 * kMiB);
  // Withdrawn: no longer required. The reported region stays required while reported.
  ASSERT_TRUE(core_->WithdrawIntent(more.id()).ok());
  ASSERT_TRUE(core_->WithdrawIntent(same.id()).ok());
  EXPECT_EQ(MustGetNode("node-a").required_bytes(), 2 * kMiB);
  EXPECT_EQ(pool_use("node-a"), 6 * kMiB);
  // Failed: the agent refuses the registration.
  const v1::Intent refused = MustCreate(Register("node-b", 0x4000000, 16 * kMiB));
  EXPECT_EQ(pool_use("node-a"), 22 * kMiB);
  std::vector<v1::Decision> decisions = WaitDecisions(b, 1);
  ASSERT_EQ(decisions.size(), 1u);
  core_->AgentMessage("node-b", b.get(), ResultMessage(decisions[0], EFAULT, "a hole"));
  EXPECT_EQ(MustGetIntent(refused.id()).state(), v1::INTENT_STATE_FAILED);
  EXPECT_EQ(pool_use("node-a"), 6 * kMiB);
  // Superseded by an unregister: no longer required once the agent stops reporting it.
  const v1::Intent kept = MustCreate(Register("node-b", 0x100000, 4 * kMiB));
  MustCreate(Unregister("node-b", 0x100000, 4 * kMiB));
  EXPECT_EQ(MustGetIntent(kept.id()).state(), v1::INTENT_STATE_SUPERSEDED);
  EXPECT_EQ(MustGetNode("node-b").required_bytes(), 4 * kMiB) << "still reported";
  SendSnapshot("node-b", b, {});
  EXPECT_EQ(MustGetNode("node-b").required_bytes(), 0u);
  EXPECT_EQ(pool_use("node-a"), 2 * kMiB);
  // node-a comes back in another pool: pool-a no longer counts it.
  core_->AgentDisconnected("node-a", a.get());
  a = Connect("node-a", {{"pool", "b"}}, {MakeRegion("vm-1", 0x100000, 2 * kMiB, {"c1"})});
  EXPECT_EQ(MustGetNode("node-a").budget_bytes(), 0u);
  EXPECT_EQ(pool_use("node-b"), 0u);
  // The budget applies at admission from the same totals.
  MustCreate(Register("node-b", 0, 64 * kMiB));
  absl::StatusOr<v1::CreateIntentResponse> over =
      core_->CreateIntent(Register("node-b", 0x8000000, kPage));
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  // And the listing says what GetNode says.
  for (const v1::Node& node : core_->ListNodes()) {
    const v1::Node single = MustGetNode(node.name());
    EXPECT_EQ(node.required_bytes(), single.required_bytes()) << node.name();
    EXPECT_EQ(node.budget_bytes(), single.budget_bytes()) << node.name();
    EXPECT_DOUBLE_EQ(node.budget_used_ratio(), single.budget_used_ratio()) << node.name();
  }
}

// ListNodes over a fleet holds the core's lock one chunk of nodes at a time: an agent's Control
// message is handled while the listing is under way (were the lock held for the whole fleet, the
// message would wait for the listing, and the listing for it: the hook gives up after 5 s).
TEST_F(ServerCoreTest, ControlMessagesAreHandledWhileListNodesRuns) {
  core_.reset();
  std::atomic<int> chunks{0};
  std::atomic<bool> handled_during_listing{false};
  std::thread agent;
  std::shared_ptr<FakeSession> first;
  StartCore([&](ServerCoreOptions& options) {
    options.list_nodes_chunk = 16;
    options.between_list_chunks = [&] {
      if (chunks++ != 0) return;
      std::atomic<bool> done{false};
      agent = std::thread([&] {
        SendHeartbeat("node-00000", first);
        SendSnapshot("node-00000", first,
                     {MakeRegion("vm-1", 0, kMiB, {"c1"}), MakeRegion("vm-1", kMiB, kMiB, {"c1"})});
        done = true;
      });
      const absl::Time deadline = absl::Now() + absl::Seconds(5);
      while (!done && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
      handled_during_listing = done.load();
    };
  });
  v1::Policy policy;
  policy.set_name("pool-a");
  (*policy.mutable_node_selector())["pool"] = "a";
  policy.set_pinned_bytes_budget(1024 * kMiB);
  SetPolicy(policy);
  constexpr int kNodes = 100;
  for (int i = 0; i < kNodes; ++i) {
    const std::string name = absl::StrFormat("node-%05d", i);
    auto session = Connect(name, {{"pool", "a"}}, {MakeRegion("vm-1", 0, kMiB, {"c1"})});
    if (i == 0) first = session;
  }
  const uint64_t received = core_->MetricsSnapshot(0).counters.stream_messages_received;
  const std::vector<v1::Node> nodes = core_->ListNodes();
  if (agent.joinable()) agent.join();
  EXPECT_TRUE(handled_during_listing) << "the Control message waited for the whole listing";
  EXPECT_EQ(chunks.load(), kNodes / 16) << "one hook call between each two chunks";
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.stream_messages_received, received + 2);
  ASSERT_EQ(nodes.size(), static_cast<size_t>(kNodes)) << "every node once, in name order";
  for (int i = 0; i < kNodes; ++i) {
    EXPECT_EQ(nodes[i].name(), absl::StrFormat("node-%05d", i));
    EXPECT_EQ(nodes[i].budget_bytes(), 1024 * kMiB);
  }
  // The snapshot sent during the listing added 1 MiB to the pool; the first chunk was listed
  // before it, the last after.
  EXPECT_DOUBLE_EQ(nodes.front().budget_used_ratio(), 100.0 / 1024);
  EXPECT_DOUBLE_EQ(nodes.back().budget_used_ratio(), 101.0 / 1024);
  EXPECT_EQ(MustGetNode("node-00000").required_bytes(), 2 * kMiB);
}

}  // namespace
}  // namespace dmapin::server
