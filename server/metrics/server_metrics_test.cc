#include "server/metrics/server_metrics.h"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "dmapin/v1/admin.pb.h"
#include "dmapin/v1/control.pb.h"
#include "gtest/gtest.h"
#include "prometheus/check_names.h"
#include "prometheus/text_serializer.h"
#include "server/core/server_core.h"
#include "server/store/sqlite_server_store.h"
#include "testing/exposition_parser.h"

namespace dmapin::server {
namespace {

constexpr uint64_t k64K = 0x10000;
constexpr uint64_t kBase = 0x10000000;
constexpr uint64_t kGiB = uint64_t{1} << 30;

using exposition::Labels;
using exposition::Parse;
using exposition::Sample;
using exposition::Value;

// Samples of `name`.
std::vector<Sample> SamplesOf(absl::string_view text, absl::string_view name) {
  std::vector<Sample> out;
  for (Sample& sample : Parse(text)) {
    if (sample.name == name) out.push_back(std::move(sample));
  }
  return out;
}

std::optional<double> D(uint64_t value) { return static_cast<double>(value); }

// Checks the exposition's structure: every family declared once with a valid name, counters
// ending in _total (and nothing else), every sample inside its family with valid label names,
// no series twice. Returns the family names.
std::set<std::string> CheckExposition(absl::string_view text) {
  std::set<std::string> families;
  std::set<std::pair<std::string, Labels>> series;
  std::string family;
  std::string type;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (absl::StartsWith(line, "# HELP ")) continue;
    if (absl::StartsWith(line, "# TYPE ")) {
      std::vector<std::string> parts = absl::StrSplit(line.substr(7), ' ');
      EXPECT_EQ(parts.size(), 2u) << line;
      if (parts.size() != 2) continue;
      family = parts[0];
      type = parts[1];
      EXPECT_TRUE(families.insert(family).second) << "family declared twice: " << family;
      EXPECT_TRUE(prometheus::CheckMetricName(family)) << family;
      EXPECT_EQ(type == "counter", absl::EndsWith(family, "_total"))
          << family << " is a " << type << ": counters, and only they, end in _total";
      EXPECT_TRUE(type == "counter" || type == "gauge" || type == "histogram") << line;
      continue;
    }
    if (line.front() == '#') {
      ADD_FAILURE() << "unexpected comment: " << line;
      continue;
    }
    std::vector<Sample> samples = Parse(line);
    if (samples.size() != 1) continue;
    const Sample& sample = samples[0];
    if (type == "histogram") {
      EXPECT_TRUE(sample.name == family + "_bucket" || sample.name == family + "_sum" ||
                  sample.name == family + "_count")
          << sample.name << " outside its family " << family;
    } else {
      EXPECT_EQ(sample.name, family) << "sample outside its family";
    }
    for (const auto& [key, value] : sample.labels) {
      EXPECT_TRUE(prometheus::CheckLabelName(key)) << key << " in " << line;
      EXPECT_FALSE(value.empty()) << "empty label value (same as no label): " << line;
    }
    EXPECT_TRUE(series.insert({sample.name, sample.labels}).second) << "duplicate series: " << line;
  }
  return families;
}

// An agent's control stream as the core sees it: records what the server sends.
class FakeSession : public AgentSession {
 public:
  bool Send(const v1::ServerMessage& message) override {
    MutexLock lock(&mu_);
    sent_.push_back(message);
    return true;
  }

  // The first decision of `kind` sent, waiting up to 10 s for it (a background pass may still be
  // sending).
  std::optional<v1::Decision> WaitForDecision(v1::DecisionKind kind) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (absl::Now() < deadline) {
      {
        MutexLock lock(&mu_);
        for (const v1::ServerMessage& message : sent_) {
          if (message.has_decision() && message.decision().kind() == kind) {
            return message.decision();
          }
        }
      }
      absl::SleepFor(absl::Milliseconds(1));
    }
    return std::nullopt;
  }

 private:
  Mutex mu_;
  std::vector<v1::ServerMessage> sent_ ABSL_GUARDED_BY(mu_);
};

v1::Context MakeContext(const std::string& name, std::optional<uint64_t> limit, uint64_t locked,
                        uint64_t regions, std::vector<std::string> containers) {
  v1::Context context;
  context.set_name(name);
  context.set_memlock_unlimited(!limit.has_value());
  context.set_memlock_limit_bytes(limit.value_or(0));
  context.set_locked_bytes(locked);
  context.set_regions(regions);
  for (const std::string& container : containers) context.add_containers(container);
  return context;
}

v1::Container MakeContainer(const std::string& name, const std::string& context, uint64_t held,
                            uint64_t installed) {
  v1::Container container;
  container.set_name(name);
  container.set_iommu_page_size(k64K);
  container.set_window_size(uint64_t{1} << 40);
  container.set_context(context);
  container.set_held_regions(held);
  container.set_installed_entries(installed);
  return container;
}

v1::Region MakeRegion(const std::string& context, uint64_t ua, uint64_t size, uint64_t used,
                      uint64_t mapped, std::vector<std::string> containers) {
  v1::Region region;
  region.set_context(context);
  region.set_ua(ua);
  region.set_size(size);
  region.set_entries(size / k64K);
  region.set_used(used);
  region.set_mapped(mapped);
  region.set_page_size(k64K);
  region.set_max_iommu_page_size(k64K);
  for (const std::string& container : containers) region.add_containers(container);
  return region;
}

class ServerMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = std::filesystem::path(tmp != nullptr ? tmp : ::testing::TempDir()) /
           absl::StrCat("server_metrics_test_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    auto store = SqliteServerStore::Open(dir_.string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    auto core = ServerCore::Create(ServerCoreOptions{.store = store_.get()});
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = std::move(*core);
  }

  void TearDown() override {
    core_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  // Connects `node` (labels pool=`pool`) and sends its snapshot.
  std::shared_ptr<FakeSession> Connect(const std::string& node, const std::string& pool,
                                       const v1::Snapshot& snapshot) {
    auto session = std::make_shared<FakeSession>();
    v1::Hello hello;
    hello.set_node_name(node);
    (*hello.mutable_labels())["pool"] = pool;
    hello.set_page_size(k64K);
    hello.set_backend("sim");
    hello.set_agent_version("test");
    hello.set_incarnation(absl::StrCat(node, "-1"));
    core_->AgentConnected(hello, session);
    v1::AgentMessage message;
    *message.mutable_snapshot() = snapshot;
    core_->AgentMessage(node, session.get(), message);
    return session;
  }

  // Two nodes. node-a (pool a, connected): contexts vm-1 (limit 64 pages, one region of 8 pages
  // held by two containers, 2 entries installed) and vm-2 (unlimited, one region of 4 pages, 1
  // entry). node-b (pool b): one context and region, then disconnected. A policy budgets pool a
  // at 1 GiB. On node-a a register intent stays in flight and an unregister intent of vm-1's
  // (mapped) region is answered EBUSY (retried in an hour); an unregister intent on node-b stays
  // pending.
  void Fleet() {
    v1::Snapshot a;
    *a.add_contexts() = MakeContext("vm-1", 64 * k64K, 8 * k64K, 1, {"vm-1/vfio-0", "vm-1/vfio-1"});
    *a.add_contexts() = MakeContext("vm-2", std::nullopt, 4 * k64K, 1, {"vm-2/vfio-0"});
    *a.add_containers() = MakeContainer("vm-1/vfio-0", "vm-1", 1, 2);
    *a.add_containers() = MakeContainer("vm-1/vfio-1", "vm-1", 1, 0);
    *a.add_containers() = MakeContainer("vm-2/vfio-0", "vm-2", 1, 1);
    *a.add_regions() = MakeRegion("vm-1", kBase, 8 * k64K, 2, 3, {"vm-1/vfio-0", "vm-1/vfio-1"});
    *a.add_regions() = MakeRegion("vm-2", kBase, 4 * k64K, 1, 2, {"vm-2/vfio-0"});
    a.mutable_counters()->set_registers_ok(3);
    a.mutable_counters()->set_maps_ok(2);
    a.mutable_counters()->set_unregister_ebusy(1);
    a.set_version(1);
    session_a_ = Connect("node-a", "a", a);

    v1::Snapshot b;
    *b.add_contexts() = MakeContext("vm-9", 16 * k64K, 2 * k64K, 1, {"vm-9/vfio-0"});
    *b.add_containers() = MakeContainer("vm-9/vfio-0", "vm-9", 1, 0);
    *b.add_regions() = MakeRegion("vm-9", kBase, 2 * k64K, 1, 1, {"vm-9/vfio-0"});
    b.mutable_counters()->set_registers_ok(1);
    b.set_version(1);
    std::shared_ptr<FakeSession> session_b = Connect("node-b", "b", b);
    core_->AgentDisconnected("node-b", session_b.get());

    v1::Policy policy;
    policy.set_name("pool-a");
    (*policy.mutable_node_selector())["pool"] = "a";
    policy.set_pinned_bytes_budget(kGiB);
    policy.mutable_ebusy_retry()->set_initial_backoff_ms(3600 * 1000);
    policy.mutable_ebusy_retry()->set_max_backoff_ms(3600 * 1000);
    ASSERT_TRUE(core_->SetPolicy(policy).ok());

    v1::CreateIntentRequest reg;
    reg.set_kind(v1::INTENT_KIND_REGISTER);
    reg.set_node("node-a");
    reg.set_context("vm-1");
    reg.set_container("vm-1/vfio-0");
    reg.set_ua(kBase + 32 * k64K);
    reg.set_size(4 * k64K);
    auto created = core_->CreateIntent(reg);
    ASSERT_TRUE(created.ok()) << created.status();

    v1::CreateIntentRequest busy;
    busy.set_kind(v1::INTENT_KIND_UNREGISTER);
    busy.set_node("node-a");
    busy.set_context("vm-1");
    busy.set_container("vm-1/vfio-0");
    busy.set_ua(kBase);
    busy.set_size(8 * k64K);
    created = core_->CreateIntent(busy);
    ASSERT_TRUE(created.ok()) << created.status();

    v1::CreateIntentRequest unreg;
    unreg.set_kind(v1::INTENT_KIND_UNREGISTER);
    unreg.set_node("node-b");
    unreg.set_context("vm-9");
    unreg.set_container("vm-9/vfio-0");
    unreg.set_ua(kBase);
    unreg.set_size(2 * k64K);
    created = core_->CreateIntent(unreg);
    ASSERT_TRUE(created.ok()) << created.status();

    core_->ReconcileNow();
    std::optional<v1::Decision> decision =
        session_a_->WaitForDecision(v1::DECISION_KIND_UNREGISTER);
    ASSERT_TRUE(decision.has_value());
    ASSERT_TRUE(session_a_->WaitForDecision(v1::DECISION_KIND_REGISTER).has_value());
    v1::AgentMessage answer;
    answer.mutable_result()->set_decision_id(decision->id());
    answer.mutable_result()->set_epoch(decision->epoch());
    answer.mutable_result()->set_errno_value(EBUSY);
    answer.mutable_result()->set_errno_name("EBUSY");
    answer.mutable_result()->set_message("still mapped");
    core_->AgentMessage("node-a", session_a_.get(), answer);
  }

  std::filesystem::path dir_;
  std::unique_ptr<SqliteServerStore> store_;
  std::unique_ptr<ServerCore> core_;
  std::shared_ptr<FakeSession> session_a_;
};

TEST_F(ServerMetricsTest, FleetSeriesMatchTheSnapshot) {
  ASSERT_NO_FATAL_FAILURE(Fleet());
  ServerMetrics metrics(core_.get());
  const std::string text = metrics.TextExposition();
  const FleetMetricsSnapshot snapshot = core_->MetricsSnapshot(0);
  SCOPED_TRACE(text);

  ASSERT_EQ(snapshot.nodes.size(), 2u);
  uint64_t pinned = 0, regions = 0, users = 0, installed = 0, required = 0;
  for (const FleetMetricsSnapshot::NodeMetrics& node : snapshot.nodes) {
    const Labels labels = {{"node", node.name}};
    EXPECT_EQ(Value(text, "dmapin_fleet_node_connected", labels), node.connected ? 1 : 0);
    EXPECT_EQ(Value(text, "dmapin_fleet_node_pinned_bytes", labels), D(node.pinned_bytes));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_regions", labels), D(node.regions));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_region_users", labels), D(node.used_sum));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_installed_mappings", labels),
              D(node.installed_mappings));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_required_locked_bytes", labels),
              D(node.required_bytes));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_contexts", labels), D(node.contexts.size()));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_containers", labels), D(node.containers.size()));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_registers_total", labels),
              D(node.counters.registers_ok()));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_maps_total", labels), D(node.counters.maps_ok()));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_unregister_ebusy_total", labels),
              D(node.counters.unregister_ebusy()));
    if (node.budget_bytes > 0) {
      EXPECT_EQ(Value(text, "dmapin_fleet_node_budget_bytes", labels), D(node.budget_bytes));
      EXPECT_EQ(Value(text, "dmapin_fleet_node_budget_used_bytes", labels),
                D(node.budget_used_bytes));
    } else {
      EXPECT_EQ(Value(text, "dmapin_fleet_node_budget_bytes", labels), std::nullopt);
      EXPECT_EQ(Value(text, "dmapin_fleet_node_budget_used_bytes", labels), std::nullopt);
    }
    uint64_t locked = 0, limit = 0, unlimited = 0;
    for (const v1::Context& context : node.contexts) {
      const Labels context_labels = {{"context", context.name()}, {"node", node.name}};
      locked += context.locked_bytes();
      EXPECT_EQ(Value(text, "dmapin_fleet_context_locked_bytes", context_labels),
                D(context.locked_bytes()));
      EXPECT_EQ(Value(text, "dmapin_fleet_context_regions", context_labels), D(context.regions()));
      EXPECT_EQ(Value(text, "dmapin_fleet_context_containers", context_labels),
                D(context.containers_size()));
      EXPECT_EQ(Value(text, "dmapin_fleet_context_memlock_unlimited", context_labels),
                context.memlock_unlimited() ? 1 : 0);
      if (context.memlock_unlimited()) {
        ++unlimited;
        EXPECT_EQ(Value(text, "dmapin_fleet_context_memlock_limit_bytes", context_labels),
                  std::nullopt);
      } else {
        limit += context.memlock_limit_bytes();
        EXPECT_EQ(Value(text, "dmapin_fleet_context_memlock_limit_bytes", context_labels),
                  D(context.memlock_limit_bytes()));
      }
    }
    EXPECT_EQ(Value(text, "dmapin_fleet_node_locked_bytes", labels), D(locked));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_memlock_limit_bytes", labels), D(limit));
    EXPECT_EQ(Value(text, "dmapin_fleet_node_memlock_unlimited_contexts", labels), D(unlimited));
    for (const v1::Container& container : node.containers) {
      const Labels container_labels = {{"container", container.name()}, {"node", node.name}};
      EXPECT_EQ(Value(text, "dmapin_fleet_container_regions", container_labels),
                D(container.held_regions()));
      EXPECT_EQ(Value(text, "dmapin_fleet_container_installed_mappings", container_labels),
                D(container.installed_entries()));
    }
    pinned += node.pinned_bytes;
    regions += node.regions;
    users += node.used_sum;
    installed += node.installed_mappings;
    required += node.required_bytes;
  }
  EXPECT_EQ(Value(text, "dmapin_fleet_nodes"), 2);
  EXPECT_EQ(Value(text, "dmapin_fleet_pinned_bytes"), D(pinned));
  EXPECT_EQ(Value(text, "dmapin_fleet_regions"), D(regions));
  EXPECT_EQ(Value(text, "dmapin_fleet_region_users"), D(users));
  EXPECT_EQ(Value(text, "dmapin_fleet_installed_mappings"), D(installed));
  EXPECT_EQ(Value(text, "dmapin_fleet_required_locked_bytes"), D(required));

  // And the snapshot holds what the agents reported (so the loop above compared real numbers).
  const Labels a = {{"node", "node-a"}};
  const Labels b = {{"node", "node-b"}};
  EXPECT_EQ(Value(text, "dmapin_fleet_node_connected", a), 1);
  EXPECT_EQ(Value(text, "dmapin_fleet_node_connected", b), 0);
  EXPECT_EQ(Value(text, "dmapin_fleet_node_pinned_bytes", a), 12.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_fleet_node_region_users", a), 3);
  EXPECT_EQ(Value(text, "dmapin_fleet_node_installed_mappings", a), 3);
  EXPECT_EQ(Value(text, "dmapin_fleet_node_locked_bytes", a), 12.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_fleet_node_memlock_limit_bytes", a), 64.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_fleet_node_memlock_unlimited_contexts", a), 1);
  // Registered (12 pages) plus the admitted register intent (4 pages).
  EXPECT_EQ(Value(text, "dmapin_fleet_node_required_locked_bytes", a), 16.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_fleet_node_budget_bytes", a), static_cast<double>(kGiB));
  EXPECT_EQ(Value(text, "dmapin_fleet_node_budget_used_bytes", a), 16.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_fleet_node_budget_bytes", b), std::nullopt);
  EXPECT_EQ(Value(text, "dmapin_fleet_context_memlock_limit_bytes",
                  {{"context", "vm-2"}, {"node", "node-a"}}),
            std::nullopt);
  EXPECT_EQ(Value(text, "dmapin_fleet_context_memlock_unlimited",
                  {{"context", "vm-2"}, {"node", "node-a"}}),
            1);
  EXPECT_EQ(Value(text, "dmapin_fleet_container_installed_mappings",
                  {{"container", "vm-1/vfio-0"}, {"node", "node-a"}}),
            2);
  EXPECT_EQ(Value(text, "dmapin_fleet_locked_bytes"), 14.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_fleet_memlock_limit_bytes"), 80.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_fleet_memlock_unlimited_contexts"), 1);
  EXPECT_EQ(Value(text, "dmapin_fleet_contexts"), 3);
  EXPECT_EQ(Value(text, "dmapin_fleet_containers"), 4);
  EXPECT_TRUE(Value(text, "process_cpu_seconds_total").has_value());
  EXPECT_TRUE(Value(text, "process_resident_memory_bytes").has_value());
}

TEST_F(ServerMetricsTest, ControlPlaneSeriesMatchTheSnapshot) {
  ASSERT_NO_FATAL_FAILURE(Fleet());
  ServerMetrics metrics(core_.get());
  const std::string text = metrics.TextExposition();
  const FleetMetricsSnapshot snapshot = core_->MetricsSnapshot(0);
  SCOPED_TRACE(text);

  EXPECT_EQ(Value(text, "dmapin_server_agents_connected"), D(snapshot.agents_connected));
  EXPECT_EQ(Value(text, "dmapin_server_agents_connected"), 1);
  EXPECT_EQ(Value(text, "dmapin_server_intents", {{"state", "retrying"}}), 1);
  EXPECT_EQ(Value(text, "dmapin_server_intents", {{"state", "applying"}}), 1);
  EXPECT_EQ(Value(text, "dmapin_server_intents", {{"state", "pending"}}), 1);
  // Every state is there, even without intents.
  for (const char* state :
       {"applying", "satisfied", "failed", "withdrawn", "superseded", "pending", "retrying"}) {
    EXPECT_TRUE(Value(text, "dmapin_server_intents", {{"state", state}}).has_value()) << state;
  }
  for (const auto& [state, count] : snapshot.intents_by_state) {
    ASSERT_TRUE(absl::StartsWith(state, "INTENT_STATE_")) << state;
    std::string label = state.substr(13);
    for (char& c : label) c = static_cast<char>(std::tolower(c));
    EXPECT_EQ(Value(text, "dmapin_server_intents", {{"state", label}}), D(count)) << state;
  }
  const std::optional<double> age = Value(text, "dmapin_server_oldest_pending_intent_age_seconds");
  ASSERT_TRUE(age.has_value());
  EXPECT_GE(*age, 0);
  EXPECT_LT(*age, 600);

  const ServerCounters& c = snapshot.counters;
  EXPECT_EQ(Value(text, "dmapin_server_decisions_sent_total", {{"kind", "register"}}), 1);
  EXPECT_EQ(Value(text, "dmapin_server_decisions_sent_total", {{"kind", "register"}}),
            D(c.decisions_sent.at("register")));
  EXPECT_EQ(Value(text, "dmapin_server_decisions_sent_total", {{"kind", "unregister"}}), 1);
  EXPECT_EQ(Value(text, "dmapin_server_decisions_sent_total", {{"kind", "teardown_context"}}), 0);
  EXPECT_EQ(Value(text, "dmapin_server_decision_results_total",
                  {{"kind", "unregister"}, {"result", "EBUSY"}}),
            D(c.decision_results.at("unregister/EBUSY")));
  EXPECT_EQ(Value(text, "dmapin_server_decision_results_total",
                  {{"kind", "unregister"}, {"result", "EBUSY"}}),
            1);
  EXPECT_EQ(SamplesOf(text, "dmapin_server_decision_results_total").size(), 1u);
  EXPECT_EQ(Value(text, "dmapin_server_ebusy_retries_total"), D(c.ebusy_retries));
  EXPECT_EQ(Value(text, "dmapin_server_ebusy_retries_total"), 1);
  EXPECT_EQ(Value(text, "dmapin_server_decisions_timed_out_total"), 0);
  EXPECT_EQ(Value(text, "dmapin_server_decisions_session_lost_total"), D(c.decisions_session_lost));
  EXPECT_EQ(Value(text, "dmapin_server_intents_failed_lost_decisions_total"),
            D(c.intents_failed_lost_decisions));
  EXPECT_EQ(Value(text, "dmapin_server_stream_messages_received_total"),
            D(c.stream_messages_received));
  EXPECT_EQ(Value(text, "dmapin_server_stream_messages_received_total"),
            3);  // 2 snapshots, 1 result
  EXPECT_EQ(Value(text, "dmapin_server_stream_messages_sent_total"), D(c.stream_messages_sent));
  EXPECT_EQ(Value(text, "dmapin_server_stream_messages_sent_total"), 2);
  EXPECT_EQ(Value(text, "dmapin_server_agent_connects_total"), 2);
  EXPECT_EQ(Value(text, "dmapin_server_agent_disconnects_total"), 1);
  EXPECT_EQ(Value(text, "dmapin_server_watch_events_dropped"), 0);
  EXPECT_EQ(Value(text, "dmapin_server_watchers_dropped_total", {{"reason", "lag"}}), 0);
  EXPECT_EQ(Value(text, "dmapin_server_watchers_dropped_total", {{"reason", "buffer"}}), 0);
  EXPECT_EQ(Value(text, "dmapin_server_watchers_refused_total"), 0);
  EXPECT_EQ(Value(text, "dmapin_server_watchers"), 0);
  EXPECT_EQ(Value(text, "dmapin_server_watch_buffered_bytes"), 0);
  EXPECT_EQ(Value(text, "dmapin_server_store_failures_total"), 0);
  EXPECT_TRUE(Value(text, "dmapin_server_reconcile_passes_total").has_value());
}

// Results with odd errno names collapse into EUNKNOWN rather than growing the label set.
TEST_F(ServerMetricsTest, MalformedErrnoNamesCollapse) {
  ASSERT_NO_FATAL_FAILURE(Fleet());
  // Another decision (the unregister intent's EBUSY retry is an hour away), answered with a
  // made-up errno name.
  v1::CreateIntentRequest request;
  request.set_kind(v1::INTENT_KIND_RELEASE_CONTAINER);
  request.set_node("node-a");
  request.set_container("vm-2/vfio-0");
  ASSERT_TRUE(core_->CreateIntent(request).ok());
  core_->ReconcileNow();
  std::optional<v1::Decision> release;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!release.has_value() && absl::Now() < deadline) {
    auto decisions = core_->ListDecisions(v1::ListDecisionsRequest());
    ASSERT_TRUE(decisions.ok());
    for (const v1::DecisionRecord& record : decisions->decisions()) {
      if (record.kind() == "release_container") {
        release.emplace();
        release->set_id(record.id());
        release->set_epoch(record.epoch());
      }
    }
    if (!release.has_value()) absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_TRUE(release.has_value());
  v1::AgentMessage answer;
  answer.mutable_result()->set_decision_id(release->id());
  answer.mutable_result()->set_epoch(release->epoch());
  answer.mutable_result()->set_errno_value(999);
  answer.mutable_result()->set_errno_name("weird name{\"}");
  core_->AgentMessage("node-a", session_a_.get(), answer);

  ServerMetrics metrics(core_.get());
  const std::string text = metrics.TextExposition();
  SCOPED_TRACE(text);
  EXPECT_EQ(Value(text, "dmapin_server_decision_results_total",
                  {{"kind", "release_container"}, {"result", "EUNKNOWN"}}),
            1);
  CheckExposition(text);
}

TEST_F(ServerMetricsTest, ExpositionIsWellFormed) {
  ASSERT_NO_FATAL_FAILURE(Fleet());
  for (const bool per_region : {false, true}) {
    SCOPED_TRACE(per_region ? "per-region series" : "no per-region series");
    ServerMetrics metrics(core_.get(), {.per_region_series = per_region});
    // Serialize the collectable's families ourselves, as the exposer would.
    const std::vector<prometheus::MetricFamily> families = metrics.collectable()->Collect();
    const std::string text = prometheus::TextSerializer().Serialize(families);
    SCOPED_TRACE(text);
    const std::set<std::string> names = CheckExposition(text);
    EXPECT_EQ(names.size(), families.size());
    for (const char* name :
         {"dmapin_server_reconcile_duration_seconds", "dmapin_server_decisions_sent_total",
          "dmapin_fleet_node_pinned_bytes", "dmapin_fleet_context_locked_bytes",
          "dmapin_fleet_container_regions", "dmapin_server_intents"}) {
      EXPECT_EQ(names.count(name), 1u) << name;
    }
    EXPECT_EQ(names.count("dmapin_fleet_region_used"), per_region ? 1u : 0u);
    EXPECT_EQ(names.count("dmapin_fleet_region_series_omitted"), per_region ? 1u : 0u);
    // Our own families follow the naming scheme.
    for (const std::string& name : names) {
      EXPECT_TRUE(absl::StartsWith(name, "dmapin_server_") ||
                  absl::StartsWith(name, "dmapin_fleet_") || absl::StartsWith(name, "process_"))
          << name;
    }
  }
}

TEST_F(ServerMetricsTest, PerRegionSeriesAreOptInAndCapped) {
  ASSERT_NO_FATAL_FAILURE(Fleet());
  {
    ServerMetrics metrics(core_.get());
    const std::string text = metrics.TextExposition();
    EXPECT_TRUE(SamplesOf(text, "dmapin_fleet_region_used").empty());
    EXPECT_EQ(Value(text, "dmapin_fleet_region_series_omitted"), std::nullopt);
  }
  {
    ServerMetrics metrics(core_.get(), {.per_region_series = true});
    const std::string text = metrics.TextExposition();
    SCOPED_TRACE(text);
    EXPECT_EQ(Value(text, "dmapin_fleet_region_series_omitted"), 0);
    const FleetMetricsSnapshot snapshot = core_->MetricsSnapshot(1000);
    size_t regions = 0;
    for (const FleetMetricsSnapshot::NodeMetrics& node : snapshot.nodes) {
      for (const v1::Region& region : node.regions_detail) {
        ++regions;
        const Labels labels = {{"context", region.context()},
                               {"node", node.name},
                               {"size", absl::StrCat(region.size())},
                               {"ua", absl::StrCat("0x", absl::Hex(region.ua()))}};
        EXPECT_EQ(Value(text, "dmapin_fleet_region_used", labels), D(region.used()));
        EXPECT_EQ(Value(text, "dmapin_fleet_region_installed_mappings", labels),
                  D(region.mapped() - 1));
        EXPECT_EQ(Value(text, "dmapin_fleet_region_containers", labels),
                  D(region.containers_size()));
        EXPECT_EQ(Value(text, "dmapin_fleet_region_pending_release", labels), 0);
      }
    }
    EXPECT_EQ(regions, 3u);
    EXPECT_EQ(SamplesOf(text, "dmapin_fleet_region_used").size(), 3u);
    EXPECT_EQ(
        Value(text, "dmapin_fleet_region_used",
              {{"context", "vm-1"}, {"node", "node-a"}, {"size", "524288"}, {"ua", "0x10000000"}}),
        2);
  }
  {
    ServerMetrics metrics(core_.get(), {.per_region_series = true, .max_region_series = 1});
    const std::string text = metrics.TextExposition();
    SCOPED_TRACE(text);
    for (const char* name :
         {"dmapin_fleet_region_used", "dmapin_fleet_region_installed_mappings",
          "dmapin_fleet_region_containers", "dmapin_fleet_region_pending_release"}) {
      EXPECT_EQ(SamplesOf(text, name).size(), 1u) << name;
    }
    EXPECT_EQ(Value(text, "dmapin_fleet_region_series_omitted"), 2);
    CheckExposition(text);
  }
}

// _count + unobserved == reconcile_passes_total in every scrape; buckets are cumulative in `le`
// and never fall between scrapes; passes the core no longer holds durations for are counted as
// unobserved instead of silently missing.
TEST_F(ServerMetricsTest, ReconcileHistogramIsCumulative) {
  ASSERT_NO_FATAL_FAILURE(Fleet());
  ServerMetrics metrics(core_.get());
  std::map<std::string, double> previous_buckets;
  double previous_count = 0;
  double previous_unobserved = 0;
  auto scrape = [&](const char* step) {
    SCOPED_TRACE(step);
    const std::string text = metrics.TextExposition();
    const std::optional<double> passes = Value(text, "dmapin_server_reconcile_passes_total");
    const std::optional<double> count =
        Value(text, "dmapin_server_reconcile_duration_seconds_count");
    const std::optional<double> unobserved =
        Value(text, "dmapin_server_reconcile_durations_unobserved_total");
    const std::optional<double> sum = Value(text, "dmapin_server_reconcile_duration_seconds_sum");
    EXPECT_TRUE(passes && count && unobserved && sum) << text;
    if (!(passes && count && unobserved && sum)) return;
    EXPECT_EQ(*count + *unobserved, *passes);
    EXPECT_GE(*count, previous_count);
    EXPECT_GE(*unobserved, previous_unobserved);
    EXPECT_GE(*sum, 0);
    const std::vector<Sample> buckets =
        SamplesOf(text, "dmapin_server_reconcile_duration_seconds_bucket");
    EXPECT_EQ(buckets.size(), ServerMetrics::ReconcileBuckets().size() + 1);
    double last = 0;
    for (const Sample& bucket : buckets) {  // TextSerializer writes them in `le` order
      EXPECT_GE(bucket.value, last) << bucket.labels.at("le");
      last = bucket.value;
      EXPECT_GE(bucket.value, previous_buckets[bucket.labels.at("le")]) << bucket.labels.at("le");
      previous_buckets[bucket.labels.at("le")] = bucket.value;
    }
    EXPECT_EQ(last, *count);  // le="+Inf"
    previous_count = *count;
    previous_unobserved = *unobserved;
  };

  scrape("first");
  EXPECT_GT(previous_count, 0);  // Fleet() ran passes
  EXPECT_EQ(previous_unobserved, 0);
  const double before = previous_count;
  for (int i = 0; i < 10; ++i) core_->ReconcileNow();
  scrape("after 10 passes");
  EXPECT_GE(previous_count, before + 10);
  EXPECT_EQ(previous_unobserved, 0);
  // More passes than the core keeps durations of (at most 4096).
  for (int i = 0; i < 5000; ++i) core_->ReconcileNow();
  scrape("after 5000 passes");
  EXPECT_GE(previous_unobserved, 5000 - 4096);
  EXPECT_GE(previous_count, before + 10 + 2049);
  scrape("again");
  EXPECT_EQ(ServerMetrics::ReconcileBuckets().front(), 100e-6);
  EXPECT_EQ(ServerMetrics::ReconcileBuckets().back(), 10.0);
}

// Concurrent scrapes while passes run never count a pass twice.
TEST_F(ServerMetricsTest, ConcurrentScrapes) {
  ASSERT_NO_FATAL_FAILURE(Fleet());
  ServerMetrics metrics(core_.get());
  std::vector<std::thread> threads;
  threads.emplace_back([&] {
    for (int i = 0; i < 500; ++i) core_->ReconcileNow();
  });
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 30; ++i) metrics.Collect();
    });
  }
  for (std::thread& thread : threads) thread.join();
  const std::string text = metrics.TextExposition();
  const std::optional<double> passes = Value(text, "dmapin_server_reconcile_passes_total");
  const std::optional<double> count = Value(text, "dmapin_server_reconcile_duration_seconds_count");
  const std::optional<double> unobserved =
      Value(text, "dmapin_server_reconcile_durations_unobserved_total");
  ASSERT_TRUE(passes && count && unobserved);
  EXPECT_EQ(*count + *unobserved, *passes);
  EXPECT_EQ(*unobserved, 0);
}

// Lints the exposition with Prometheus's own checker when Debian's `promtool` (package prometheus)
// is installed.
TEST_F(ServerMetricsTest, PromtoolCheckMetrics) {
  const std::string promtool = exposition::FindPromtool();
  if (promtool.empty()) {
    GTEST_SKIP() << "promtool not found (apt-get install prometheus); exposition not linted";
  }
  ASSERT_NO_FATAL_FAILURE(Fleet());
  ServerMetrics metrics(core_.get(), {.per_region_series = true});
  const std::string text = metrics.TextExposition();
  const absl::Status lint = exposition::PromtoolCheck(promtool, text, dir_);
  EXPECT_TRUE(lint.ok()) << lint.message() << "\nexposition:\n" << text;
}

}  // namespace
}  // namespace dmapin::server
