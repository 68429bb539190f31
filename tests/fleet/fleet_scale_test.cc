// Fleet scale, correctness: 500 simulated agents (FleetSim, one process) against a real
// dmapin-server process on loopback.
//  - A burst of intents (new registrations, registrations of a region another container holds,
//    unregistrations answered EBUSY first) across the fleet: every intent ends SATISFIED, every
//    decision the server sent was applied exactly once, by the agent it was meant for.
//  - The server's /metrics equal the sum of the agents' own counters and registry state.
//  - Agents disconnect and reconnect in waves: dmapin_server_agents_connected follows and comes
//    back to the fleet size, the connect/disconnect counters add up, nothing leaks.
//
//   bazel test //tests/fleet:fleet_scale_test
#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "testing/agent_process.h"
#include "tests/fleet/fleet_harness.h"
#include "tests/fleet/fleetsim.h"

namespace dmapin {
namespace fleetsim {
namespace {

constexpr int kAgents = 500;
constexpr int kRegions = 10;
constexpr int kWaves = 5;
constexpr int kWaveSize = 100;
constexpr uint64_t kRegionBase = uint64_t{1} << 32;  // as FleetSim lays out regions
constexpr uint64_t kRegionSize = 2 << 20;
constexpr absl::Duration kWait = absl::Seconds(60);

std::string& ServerBinary() {
  static std::string path;
  return path;
}

// Polls the server's metrics until `done` holds; the last exposition either way.
bool MetricsEventually(int port, const std::function<bool(const std::string&)>& done,
                       std::string* last, absl::Duration timeout = kWait) {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    absl::StatusOr<std::string> text = harness::ScrapeMetrics(port);
    if (text.ok()) {
      *last = *text;
      if (done(*text)) return true;
    }
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(100));
  }
}

// The fleet totals the server exports, next to the agents' own sums.
std::map<std::string, std::pair<double, double>> Compare(const std::string& text,
                                                         const FleetSimStats& s) {
  const auto d = [](uint64_t v) { return static_cast<double>(v); };
  return {
      {"dmapin_fleet_regions", {SumMetric(text, "dmapin_fleet_regions"), d(s.regions)}},
      {"dmapin_fleet_pinned_bytes",
       {SumMetric(text, "dmapin_fleet_pinned_bytes"), d(s.pinned_bytes)}},
      {"dmapin_fleet_region_users", {SumMetric(text, "dmapin_fleet_region_users"), d(s.used_sum)}},
      {"dmapin_fleet_installed_mappings",
       {SumMetric(text, "dmapin_fleet_installed_mappings"), d(s.installed_mappings)}},
      {"dmapin_fleet_contexts", {SumMetric(text, "dmapin_fleet_contexts"), d(s.contexts)}},
      {"dmapin_fleet_containers", {SumMetric(text, "dmapin_fleet_containers"), d(s.containers)}},
      {"dmapin_fleet_node_registers_total",
       {SumMetric(text, "dmapin_fleet_node_registers_total"), d(s.counters.registers_ok())}},
      {"dmapin_fleet_node_unregisters_total",
       {SumMetric(text, "dmapin_fleet_node_unregisters_total"), d(s.counters.unregisters_ok())}},
      {"dmapin_fleet_node_unregister_failures_total",
       {SumMetric(text, "dmapin_fleet_node_unregister_failures_total"),
        d(s.counters.unregisters_failed())}},
      {"dmapin_fleet_node_unregister_ebusy_total",
       {SumMetric(text, "dmapin_fleet_node_unregister_ebusy_total"),
        d(s.counters.unregister_ebusy())}},
      {"dmapin_fleet_node_maps_total",
       {SumMetric(text, "dmapin_fleet_node_maps_total"), d(s.counters.maps_ok())}},
      {"dmapin_fleet_node_unmaps_total",
       {SumMetric(text, "dmapin_fleet_node_unmaps_total"), d(s.counters.unmaps())}},
  };
}

bool AllEqual(const std::map<std::string, std::pair<double, double>>& compared) {
  return std::all_of(compared.begin(), compared.end(),
                     [](const auto& entry) { return entry.second.first == entry.second.second; });
}

std::string Describe(const std::map<std::string, std::pair<double, double>>& compared) {
  std::string out;
  for (const auto& [name, values] : compared) {
    absl::StrAppend(&out, "  ", name, ": server ", values.first, ", agents ", values.second,
                    values.first == values.second ? "" : "  <-- differs", "\n");
  }
  return out;
}

TEST(FleetScaleTest, DecisionsOnceMetricsAddUpNoStreamLeak) {
  RaiseNofileLimit(65536);
  absl::StatusOr<std::unique_ptr<ServerUnderTest>> started = ServerUnderTest::Start(
      ServerBinary(), {"--report_interval_ms=200", "--reconcile_interval_ms=10"});
  ASSERT_TRUE(started.ok()) << started.status();
  ServerUnderTest& server = **started;
  const int port = server.metrics_port();

  FleetSimOptions options;
  options.server_address = server.target();
  options.agents = kAgents;
  options.channels = 8;
  options.regions_per_node = kRegions;
  options.region_size = kRegionSize;
  options.containers_per_context = 2;
  options.maps_per_second = 2;
  options.ebusy_share = 0.3;
  options.labels = {{"pool", "scale"}};
  FleetSim sim(options);
  sim.Start();
  ASSERT_TRUE(sim.AwaitWelcomed(kAgents, kWait)) << server.process()->LogTail();
  std::string text;
  ASSERT_TRUE(MetricsEventually(
      port,
      [](const std::string& t) {
        return SumMetric(t, "dmapin_fleet_regions") == kAgents * kRegions &&
               SumMetric(t, "dmapin_server_agents_connected") == kAgents;
      },
      &text))
      << "regions " << SumMetric(text, "dmapin_fleet_regions") << ", connected "
      << SumMetric(text, "dmapin_server_agents_connected");

  // --- The burst: per node a new region (vm0/c0), a second holder for region 0 (vm0/c1) and
  // the unregistration of region 1 (its only holder; mapped by the workload or given EBUSY by
  // the 30 % share, then retried).
  std::vector<v1::CreateIntentRequest> requests;
  std::map<std::string, int> node_index;
  for (int i = 0; i < kAgents; ++i) node_index[sim.NodeName(i)] = i;
  for (int i = 0; i < kAgents; ++i) {
    v1::CreateIntentRequest request;
    request.set_node(sim.NodeName(i));
    request.set_context("vm0");
    request.set_size(kRegionSize);
    request.set_kind(v1::INTENT_KIND_REGISTER);
    request.set_container("vm0/c0");
    request.set_ua(kRegionBase + kRegions * kRegionSize);
    requests.push_back(request);
    request.set_container("vm0/c1");
    request.set_ua(kRegionBase);
    requests.push_back(request);
    request.set_kind(v1::INTENT_KIND_UNREGISTER);
    request.set_container("vm0/c0");
    request.set_ua(kRegionBase + kRegionSize);
    requests.push_back(request);
  }
  BurstResult burst = RunDecisionBurst(harness::MakeChannel(server.target()), requests, 32, kWait);
  ASSERT_EQ(burst.create_errors, 0u) << burst.first_error;
  ASSERT_EQ(burst.created, requests.size());
  EXPECT_EQ(burst.unobserved, 0u) << "intents not seen satisfied on WatchEvents";

  // Every intent satisfied by a decision its agent applied (once) successfully.
  int retried = 0;
  for (const std::string& id : burst.intent_ids) {
    grpc::ClientContext context;
    v1::GetIntentRequest request;
    request.set_id(id);
    v1::Intent intent;
    ASSERT_TRUE(server.admin()->GetIntent(&context, request, &intent).ok()) << id;
    ASSERT_EQ(intent.state(), v1::INTENT_STATE_SATISFIED) << intent.DebugString();
    int err = -1;
    ASSERT_TRUE(sim.Applied(node_index[intent.node()], intent.last_decision_id(), &err))
        << intent.DebugString();
    EXPECT_EQ(err, 0) << intent.DebugString();
    if (intent.attempts() > 1) ++retried;
  }
  EXPECT_GT(retried, 0) << "no unregistration was answered EBUSY and retried";
  const std::map<std::string, int> applications = sim.DecisionApplications();
  for (const auto& [id, count] : applications) EXPECT_EQ(count, 1) << "decision " << id;
  FleetSimStats stats = sim.Stats();
  EXPECT_EQ(stats.duplicates, 0u) << "the server sent a decision id twice";
  EXPECT_GT(stats.ebusy_answers, 0u);
  // Every decision the server sent was applied, and answered, exactly once.
  ASSERT_TRUE(MetricsEventually(
      port,
      [&](const std::string& t) {
        return SumMetric(t, "dmapin_server_decisions_sent_total") ==
                   static_cast<double>(applications.size()) &&
               SumMetric(t, "dmapin_server_decision_results_total") ==
                   static_cast<double>(applications.size());
      },
      &text))
      << "decisions sent " << SumMetric(text, "dmapin_server_decisions_sent_total") << ", results "
      << SumMetric(text, "dmapin_server_decision_results_total") << ", applied by the agents "
      << applications.size();
  EXPECT_EQ(SumMetric(text, "dmapin_server_ebusy_retries_total"),
            static_cast<double>(stats.ebusy_answers));

  // --- Metrics equal the agents' sums once the workload stops and every agent reported.
  sim.SetMapsPerSecond(0);
  absl::SleepFor(absl::Milliseconds(300));
  sim.ReportNow();
  ASSERT_TRUE(sim.AwaitFlushed(kWait));
  stats = sim.Stats();
  EXPECT_EQ(stats.regions, static_cast<uint64_t>(kAgents * kRegions));  // +1 new, -1 gone
  ASSERT_TRUE(MetricsEventually(
      port, [&](const std::string& t) { return AllEqual(Compare(t, stats)); }, &text))
      << Describe(Compare(text, stats));

  // --- Waves of disconnects and reconnects.
  for (int wave = 0; wave < kWaves; ++wave) {
    SCOPED_TRACE(absl::StrCat("wave ", wave));
    const int first = wave * kWaveSize;
    sim.Disconnect(first, kWaveSize);
    ASSERT_TRUE(MetricsEventually(
        port,
        [&](const std::string& t) {
          return SumMetric(t, "dmapin_server_agents_connected") == kAgents - kWaveSize &&
                 SumMetric(t, "dmapin_fleet_node_connected") == kAgents - kWaveSize;
        },
        &text))
        << "connected " << SumMetric(text, "dmapin_server_agents_connected");
    sim.Connect(first, kWaveSize);
    ASSERT_TRUE(sim.AwaitWelcomed(kAgents, kWait));
    ASSERT_TRUE(MetricsEventually(
        port,
        [&](const std::string& t) {
          return SumMetric(t, "dmapin_server_agents_connected") == kAgents;
        },
        &text))
        << "connected " << SumMetric(text, "dmapin_server_agents_connected");
  }
  stats = sim.Stats();
  EXPECT_EQ(stats.connects, static_cast<uint64_t>(kAgents + kWaves * kWaveSize));
  EXPECT_EQ(stats.disconnects, static_cast<uint64_t>(kWaves * kWaveSize));
  ASSERT_TRUE(MetricsEventually(
      port,
      [&](const std::string& t) {
        return SumMetric(t, "dmapin_server_agent_connects_total") ==
                   static_cast<double>(stats.connects) &&
               SumMetric(t, "dmapin_server_agent_disconnects_total") ==
                   static_cast<double>(stats.disconnects) &&
               AllEqual(Compare(t, stats));
      },
      &text))
      << "connects " << SumMetric(text, "dmapin_server_agent_connects_total") << " (agents "
      << stats.connects << "), disconnects "
      << SumMetric(text, "dmapin_server_agent_disconnects_total") << " (agents "
      << stats.disconnects << ")\n"
      << Describe(Compare(text, stats));

  // --- Everyone leaves: nothing stays connected.
  sim.Stop();
  stats = sim.Stats();
  ASSERT_TRUE(MetricsEventually(
      port,
      [&](const std::string& t) {
        return SumMetric(t, "dmapin_server_agents_connected") == 0 &&
               SumMetric(t, "dmapin_server_agent_disconnects_total") ==
                   SumMetric(t, "dmapin_server_agent_connects_total");
      },
      &text))
      << "connected " << SumMetric(text, "dmapin_server_agents_connected") << ", connects "
      << SumMetric(text, "dmapin_server_agent_connects_total") << ", disconnects "
      << SumMetric(text, "dmapin_server_agent_disconnects_total");
  EXPECT_EQ(SumMetric(text, "dmapin_server_agent_connects_total"),
            static_cast<double>(stats.connects));
  EXPECT_TRUE(server.Stop().ok()) << server.process()->LogTail();
}

}  // namespace
}  // namespace fleetsim
}  // namespace dmapin

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--server_binary=")) {
      dmapin::fleetsim::ServerBinary() = std::string(arg);
    }
  }
  return RUN_ALL_TESTS();
}
