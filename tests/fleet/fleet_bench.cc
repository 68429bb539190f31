// The control plane's benchmark: dmapin-server as a child process, FleetSim in this process, and
// for each fleet size the figures of issue 6, one line each, then a summary.
//
//   bazel run -c opt //tests/fleet:fleet_bench -- --agents=100,1000,10000
//
// Per fleet size N (each with a fresh server and state directory):
//  - connect: N agents say Hello and send their Snapshot (N x --regions regions); time until the
//    server's metrics show every region;
//  - server RSS per connected agent (VmRSS after connect minus before, / N);
//  - idle: server and simulator CPU over --idle_seconds with heartbeats only;
//  - /metrics scrape time, size and series count (default cardinality);
//  - decision round trip: --intents REGISTER intents spread over the fleet (intent i on node
//    i mod N, a new region), --concurrency CreateIntent calls in flight; each timed from its call
//    to the "intent_satisfied" event on WatchEvents (decision sent, applied by the simulated
//    agent, result back): p50/p99/max;
//  - admin reads with budgeted policies while decisions flow: two policies with pinned-bytes
//    budgets cover the fleet during the burst, and a reader calls ListNodes (the whole fleet)
//    and GetNode (random nodes) every --read_interval_ms until the burst ends: p50/p99/max of
//    each (their figures are the pools' sums, which the server once recomputed per node);
//  - counter ingestion: every agent sends Deltas back to back for --flood_seconds, each with
//    --flood_regions changed regions; region updates / s from the flood's start until the server's
//    metrics show every agent's final counters;
//  - the simulator's own CPU and RSS.
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/flags.h"
#include "testing/agent_process.h"
#include "tests/fleet/fleet_harness.h"
#include "tests/fleet/fleetsim.h"

ABSL_FLAG(std::string, server_binary, "server/dmapin-server",
          "The dmapin-server executable (bazel run passes it).");
ABSL_FLAG(std::string, agents, "100,1000,10000", "Fleet sizes to measure, comma-separated.");
ABSL_FLAG(int32_t, regions, 100, "Regions per simulated node at start.");
ABSL_FLAG(int32_t, channels, 16, "gRPC channels (TCP connections) the agents share.");
ABSL_FLAG(int32_t, intents, 10000, "Intents in the decision burst.");
ABSL_FLAG(int32_t, concurrency, 64, "CreateIntent calls in flight during the burst.");
ABSL_FLAG(int32_t, flood_seconds, 10, "Duration of the counter-ingestion flood.");
ABSL_FLAG(int32_t, flood_regions, 100, "Regions changed per Delta during the flood.");
ABSL_FLAG(int32_t, idle_seconds, 10, "Duration of the idle (heartbeats only) CPU measurement.");
ABSL_FLAG(int32_t, report_interval_ms, 1000, "The server's --report_interval_ms.");
ABSL_FLAG(int32_t, read_interval_ms, 100,
          "Pause between rounds of admin reads (one ListNodes, then --get_node_calls GetNode) "
          "during the decision burst.");
ABSL_FLAG(int32_t, get_node_calls, 10, "GetNode calls per round of admin reads.");
ABSL_FLAG(int32_t, timeout_seconds, 600, "Timeout of each phase.");
ABSL_FLAG(std::string, server_args, "", "Extra server flags, comma-separated.");

namespace dmapin {
namespace fleetsim {
namespace {

constexpr uint64_t kRegionBase = uint64_t{1} << 32;  // as FleetSim lays out regions
constexpr uint64_t kRegionSize = 2 << 20;
constexpr double kMiB = 1 << 20;

struct Figures {
  int agents = 0;
  double connect_s = 0;
  double rss_per_agent_kib = 0;
  double server_rss_mib = 0;
  double idle_cpu_pct = 0;
  double sim_idle_cpu_pct = 0;
  double scrape_s = 0;
  double scrape_mib = 0;
  uint64_t series = 0;
  double scrape_after_s = 0;
  double p50_ms = 0, p99_ms = 0, max_ms = 0;
  double list_p50_ms = 0, list_p99_ms = 0, list_max_ms = 0;
  double get_p50_ms = 0, get_p99_ms = 0, get_max_ms = 0;
  uint64_t list_calls = 0, get_calls = 0, read_errors = 0;
  double intents_per_s = 0;
  uint64_t burst_missing = 0;
  double ingest_per_s = 0;
  double sim_cpu_s = 0, sim_rss_mib = 0;
  bool ok = true;
  std::string error;
};

void Line(int agents, const std::string& text) {
  std::printf("[agents=%d] %s\n", agents, text.c_str());
  std::fflush(stdout);
}

// Polls the metrics until `done` holds for the exposition; the time it first held, or nullopt.
// Admin reads on their own thread until Stop(): rounds of one ListNodes and `get_calls` GetNode
// on random nodes, `interval` apart, each timed.
class AdminReader {
 public:
  AdminReader(v1::Admin::Stub* admin, const FleetSim* sim, int get_calls, absl::Duration interval)
      : thread_([=] { Run(admin, sim, get_calls, interval); }) {}
  ~AdminReader() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  std::vector<double> list_ms, get_ms;  // read after Stop()
  uint64_t errors = 0;
  std::string first_error;
  size_t last_list_size = 0;

 private:
  void Run(v1::Admin::Stub* admin, const FleetSim* sim, int get_calls, absl::Duration interval) {
    std::mt19937_64 rng(3);
    auto failed = [&](const grpc::Status& status) {
      if (errors++ == 0) first_error = status.error_message();
    };
    while (!stop_) {
      {
        grpc::ClientContext context;
        v1::ListNodesResponse response;
        const absl::Time start = absl::Now();
        const grpc::Status status = admin->ListNodes(&context, v1::ListNodesRequest(), &response);
        if (status.ok()) {
          list_ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
          last_list_size = static_cast<size_t>(response.nodes_size());
        } else {
          failed(status);
        }
      }
      for (int i = 0; i < get_calls && !stop_; ++i) {
        grpc::ClientContext context;
        v1::GetNodeRequest request;
        request.set_name(sim->NodeName(static_cast<int>(rng() % sim->size())));
        v1::Node node;
        const absl::Time start = absl::Now();
        const grpc::Status status = admin->GetNode(&context, request, &node);
        if (status.ok()) {
          get_ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
        } else {
          failed(status);
        }
      }
      absl::SleepFor(interval);
    }
  }

  std::atomic<bool> stop_{false};
  std::thread thread_;
};

template <typename Done>
std::optional<absl::Time> AwaitMetrics(int port, absl::Duration timeout, Done done) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    absl::StatusOr<std::string> text = harness::ScrapeMetrics(port);
    const absl::Time at = absl::Now();
    if (text.ok() && done(*text)) return at;
    absl::SleepFor(absl::Milliseconds(100));
  }
  return std::nullopt;
}

Figures Round(int n) {
  Figures f;
  f.agents = n;
  const int regions = absl::GetFlag(FLAGS_regions);
  const absl::Duration timeout = absl::Seconds(absl::GetFlag(FLAGS_timeout_seconds));
  std::vector<std::string> server_args = {
      absl::StrCat("--report_interval_ms=", absl::GetFlag(FLAGS_report_interval_ms))};
  for (absl::string_view arg :
       absl::StrSplit(absl::GetFlag(FLAGS_server_args), ',', absl::SkipEmpty())) {
    server_args.emplace_back(arg);
  }
  absl::StatusOr<std::unique_ptr<ServerUnderTest>> started =
      ServerUnderTest::Start(absl::GetFlag(FLAGS_server_binary), server_args);
  if (!started.ok()) {
    f.ok = false;
    f.error = started.status().ToString();
    Line(n, "server did not start: " + f.error);
    return f;
  }
  ServerUnderTest& server = **started;
  absl::SleepFor(absl::Milliseconds(300));
  const ProcUsage server_base = ReadProcUsage(server.pid());
  const ProcUsage sim_base = ReadProcUsage(0);

  FleetSimOptions options;
  options.server_address = server.target();
  options.agents = n;
  options.channels = absl::GetFlag(FLAGS_channels);
  options.regions_per_node = regions;
  options.region_size = kRegionSize;
  options.labels = {{"pool", "bench"}};
  FleetSim sim(options);
  const ProcUsage sim_built = ReadProcUsage(0);

  // --- Connect ---
  const absl::Time connect_start = absl::Now();
  sim.Start();
  const bool welcomed = sim.AwaitWelcomed(static_cast<uint64_t>(n), timeout);
  const double want_regions = static_cast<double>(n) * regions;
  std::optional<absl::Time> synced =
      AwaitMetrics(server.metrics_port(), timeout, [&](const std::string& text) {
        return SumMetric(text, "dmapin_fleet_regions") == want_regions &&
               SumMetric(text, "dmapin_server_agents_connected") == n;
      });
  if (!welcomed || !synced.has_value()) {
    f.ok = false;
    f.error = absl::StrCat("the fleet did not connect within ", absl::FormatDuration(timeout));
    Line(n, f.error);
    return f;
  }
  f.connect_s = absl::ToDoubleSeconds(*synced - connect_start);
  Line(n, absl::StrFormat(
              "connect: %d agents welcomed, %d regions in the server's view after "
              "%.2f s (simulator build: %.1f MiB for the agents' state)",
              n, static_cast<int64_t>(want_regions), f.connect_s,
              (static_cast<double>(sim_built.rss_bytes) - static_cast<double>(sim_base.rss_bytes)) /
                  kMiB));

  // --- Memory and idle CPU ---
  absl::SleepFor(absl::Seconds(2));
  const ProcUsage server_connected = ReadProcUsage(server.pid());
  f.server_rss_mib = static_cast<double>(server_connected.rss_bytes) / kMiB;
  f.rss_per_agent_kib = (static_cast<double>(server_connected.rss_bytes) -
                         static_cast<double>(server_base.rss_bytes)) /
                        1024.0 / n;
  Line(n, absl::StrFormat("server RSS: %.1f MiB connected (%.1f MiB before), %.1f KiB per agent "
                          "(%d regions each), %d threads",
                          f.server_rss_mib, static_cast<double>(server_base.rss_bytes) / kMiB,
                          f.rss_per_agent_kib, regions,
                          static_cast<int64_t>(server_connected.threads)));
  const int idle_seconds = absl::GetFlag(FLAGS_idle_seconds);
  const ProcUsage idle_server0 = ReadProcUsage(server.pid());
  const ProcUsage idle_sim0 = ReadProcUsage(0);
  const absl::Time idle_start = absl::Now();
  absl::SleepFor(absl::Seconds(idle_seconds));
  const double idle_wall = absl::ToDoubleSeconds(absl::Now() - idle_start);
  f.idle_cpu_pct =
      100 * (ReadProcUsage(server.pid()).cpu_seconds - idle_server0.cpu_seconds) / idle_wall;
  f.sim_idle_cpu_pct = 100 * (ReadProcUsage(0).cpu_seconds - idle_sim0.cpu_seconds) / idle_wall;
  Line(n, absl::StrFormat("idle (heartbeats every %d ms): server CPU %.1f%% of one core, "
                          "simulator CPU %.1f%%",
                          absl::GetFlag(FLAGS_report_interval_ms), f.idle_cpu_pct,
                          f.sim_idle_cpu_pct));

  // --- /metrics ---
  absl::Duration worst;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<Scrape> scrape = TimedScrape(server.metrics_port());
    if (!scrape.ok()) {
      Line(n, "scrape failed: " + scrape.status().ToString());
      continue;
    }
    worst = std::max(worst, scrape->took);
    f.scrape_mib = static_cast<double>(scrape->text.size()) / kMiB;
    f.series = CountSeries(scrape->text);
  }
  f.scrape_s = absl::ToDoubleSeconds(worst);
  Line(n, absl::StrFormat("/metrics: %.3f s (worst of 3), %.2f MiB, %d series (target <= 1 s)",
                          f.scrape_s, f.scrape_mib, static_cast<int64_t>(f.series)));

  // --- Decision burst ---
  const int intents = absl::GetFlag(FLAGS_intents);
  std::vector<v1::CreateIntentRequest> requests;
  for (int i = 0; i < intents; ++i) {
    v1::CreateIntentRequest request;
    request.set_kind(v1::INTENT_KIND_REGISTER);
    request.set_node(sim.NodeName(i % n));
    request.set_context("vm0");
    request.set_container("vm0/c0");
    request.set_ua(kRegionBase + static_cast<uint64_t>(regions + i / n) * kRegionSize);
    request.set_size(kRegionSize);
    requests.push_back(std::move(request));
  }
  // Budgeted policies over the fleet: admission and every node's budget figures use the pools'
  // sums (a pool of the bench's nodes and one of every node), with room for the whole burst.
  for (const auto& [name, pool] : {std::pair<std::string, std::string>{"bench-pool", "bench"},
                                   std::pair<std::string, std::string>{"fleet", ""}}) {
    v1::SetPolicyRequest request;
    request.mutable_policy()->set_name(name);
    if (!pool.empty()) (*request.mutable_policy()->mutable_node_selector())["pool"] = pool;
    request.mutable_policy()->set_pinned_bytes_budget(uint64_t{1} << 60);
    grpc::ClientContext context;
    v1::Policy set;
    if (grpc::Status status = server.admin()->SetPolicy(&context, request, &set); !status.ok()) {
      f.ok = false;
      Line(n, "SetPolicy " + name + ": " + status.error_message());
    }
  }
  const FleetSimStats before_burst = sim.Stats();
  AdminReader reader(server.admin(), &sim, absl::GetFlag(FLAGS_get_node_calls),
                     absl::Milliseconds(absl::GetFlag(FLAGS_read_interval_ms)));
  BurstResult burst = RunDecisionBurst(harness::MakeChannel(server.target()), requests,
                                       absl::GetFlag(FLAGS_concurrency), timeout);
  reader.Stop();
  const FleetSimStats after_burst = sim.Stats();
  f.p50_ms = Percentile(burst.latency_ms, 50);
  f.p99_ms = Percentile(burst.latency_ms, 99);
  f.max_ms = Percentile(burst.latency_ms, 100);
  f.burst_missing = burst.unobserved + burst.create_errors;
  f.intents_per_s = burst.created / std::max(1e-9, absl::ToDoubleSeconds(burst.total_time));
  Line(n,
       absl::StrFormat(
           "decision round trip (CreateIntent -> decision -> agent applies -> result -> "
           "satisfied), %d intents, %d in flight: p50 %.1f ms, p99 %.1f ms, max %.1f ms "
           "(target p99 <= 100 ms); CreateIntent answer p50 %.1f ms p99 %.1f ms; %.0f "
           "intents/s end to end; %d created, %d errors%s, %d satisfied, %d not seen; agents "
           "applied %d decisions",
           intents, absl::GetFlag(FLAGS_concurrency), f.p50_ms, f.p99_ms, f.max_ms,
           Percentile(burst.create_ms, 50), Percentile(burst.create_ms, 99), f.intents_per_s,
           static_cast<int64_t>(burst.created), static_cast<int64_t>(burst.create_errors),
           burst.first_error.empty() ? "" : " (" + burst.first_error + ")",
           static_cast<int64_t>(burst.satisfied), static_cast<int64_t>(burst.unobserved),
           static_cast<int64_t>(after_burst.decisions_applied - before_burst.decisions_applied)));

  f.list_calls = reader.list_ms.size();
  f.get_calls = reader.get_ms.size();
  f.read_errors = reader.errors;
  f.list_p50_ms = Percentile(reader.list_ms, 50);
  f.list_p99_ms = Percentile(reader.list_ms, 99);
  f.list_max_ms = Percentile(reader.list_ms, 100);
  f.get_p50_ms = Percentile(reader.get_ms, 50);
  f.get_p99_ms = Percentile(reader.get_ms, 99);
  f.get_max_ms = Percentile(reader.get_ms, 100);
  Line(n, absl::StrFormat(
              "admin reads with 2 budgeted policies during the burst (every %d ms: ListNodes, "
              "then %d GetNode): ListNodes (%d nodes) p50 %.1f ms, p99 %.1f ms, max %.1f ms over "
              "%d calls; GetNode p50 %.2f ms, p99 %.2f ms, max %.2f ms over %d calls; %d errors%s "
              "(target p99 <= 100 ms)",
              absl::GetFlag(FLAGS_read_interval_ms), absl::GetFlag(FLAGS_get_node_calls),
              static_cast<int64_t>(reader.last_list_size), f.list_p50_ms, f.list_p99_ms,
              f.list_max_ms, static_cast<int64_t>(f.list_calls), f.get_p50_ms, f.get_p99_ms,
              f.get_max_ms, static_cast<int64_t>(f.get_calls), static_cast<int64_t>(f.read_errors),
              reader.first_error.empty() ? "" : " (" + reader.first_error + ")"));
  const bool reads_ok = f.read_errors == 0 && f.list_calls > 0 && f.get_calls > 0;
  std::printf(
      "RATIO list_nodes_budgeted_%d: p99=%.1fms (p50 %.1f, max %.1f, %d calls, %d nodes) "
      "target<=100ms %s\n",
      n, f.list_p99_ms, f.list_p50_ms, f.list_max_ms, static_cast<int>(f.list_calls),
      static_cast<int>(reader.last_list_size), reads_ok && f.list_p99_ms <= 100 ? "PASS" : "FAIL");
  std::printf(
      "RATIO get_node_budgeted_%d: p99=%.2fms (p50 %.2f, max %.2f, %d calls) "
      "target<=100ms %s\n",
      n, f.get_p99_ms, f.get_p50_ms, f.get_max_ms, static_cast<int>(f.get_calls),
      reads_ok && f.get_p99_ms <= 100 ? "PASS" : "FAIL");
  std::fflush(stdout);
  if (!reads_ok) f.ok = false;

  // --- Counter ingestion ---
  sim.AwaitFlushed(absl::Seconds(30));
  const FleetSimStats before_flood = sim.Stats();
  const ProcUsage flood_server0 = ReadProcUsage(server.pid());
  const ProcUsage flood_sim0 = ReadProcUsage(0);
  const absl::Time flood_start = absl::Now();
  sim.StartFlood(absl::GetFlag(FLAGS_flood_regions));
  absl::SleepFor(absl::Seconds(absl::GetFlag(FLAGS_flood_seconds)));
  sim.StopFlood();
  const absl::Time flood_stop = absl::Now();
  sim.AwaitFlushed(timeout);
  const FleetSimStats after_flood = sim.Stats();
  const double want_maps = static_cast<double>(after_flood.counters.maps_ok());
  const double want_unmaps = static_cast<double>(after_flood.counters.unmaps());
  std::optional<absl::Time> absorbed =
      AwaitMetrics(server.metrics_port(), timeout, [&](const std::string& text) {
        return SumMetric(text, "dmapin_fleet_node_maps_total") == want_maps &&
               SumMetric(text, "dmapin_fleet_node_unmaps_total") == want_unmaps;
      });
  const double updates =
      static_cast<double>(after_flood.region_updates_sent - before_flood.region_updates_sent);
  const double flood_server_cpu = ReadProcUsage(server.pid()).cpu_seconds;
  const double flood_sim_cpu = ReadProcUsage(0).cpu_seconds;
  if (absorbed.has_value()) {
    const double seconds = absl::ToDoubleSeconds(*absorbed - flood_start);
    f.ingest_per_s = updates / seconds;
    Line(n, absl::StrFormat(
                "counter ingestion: %.0f region updates in %d Deltas sent in %.1f s, absorbed "
                "(server metrics show every agent's final counters) %.1f s after the start: "
                "%.0f region updates/s (target >= 200000/s); server CPU %.0f%%, simulator CPU "
                "%.0f%% of one core",
                updates, static_cast<int64_t>(after_flood.deltas_sent - before_flood.deltas_sent),
                absl::ToDoubleSeconds(flood_stop - flood_start), seconds, f.ingest_per_s,
                100 * (flood_server_cpu - flood_server0.cpu_seconds) / seconds,
                100 * (flood_sim_cpu - flood_sim0.cpu_seconds) / seconds));
  } else {
    f.ok = false;
    Line(n, "counter ingestion: the server's metrics never showed the final counters");
  }

  absl::StatusOr<Scrape> final_scrape = TimedScrape(server.metrics_port());
  if (final_scrape.ok()) {
    f.scrape_after_s = absl::ToDoubleSeconds(final_scrape->took);
    Line(n,
         absl::StrFormat("/metrics after the burst and flood: %.3f s, %.2f MiB", f.scrape_after_s,
                         static_cast<double>(final_scrape->text.size()) / kMiB));
  }

  const ProcUsage sim_end = ReadProcUsage(0);
  const ProcUsage server_end = ReadProcUsage(server.pid());
  f.sim_cpu_s = sim_end.cpu_seconds - sim_base.cpu_seconds;
  f.sim_rss_mib = static_cast<double>(sim_end.rss_bytes) / kMiB;
  const FleetSimStats stats = sim.Stats();
  Line(n,
       absl::StrFormat(
           "simulator: %.1f s CPU over the round, RSS %.1f MiB (bench process), %d "
           "threads; %d messages sent, %d received, %d reconnects, %d duplicate decisions; "
           "server: %.1f s CPU, RSS %.1f MiB (peak %.1f MiB)",
           f.sim_cpu_s, f.sim_rss_mib, static_cast<int64_t>(sim_end.threads),
           static_cast<int64_t>(stats.messages_sent), static_cast<int64_t>(stats.messages_received),
           static_cast<int64_t>(stats.connects - static_cast<uint64_t>(n)),
           static_cast<int64_t>(stats.duplicates), server_end.cpu_seconds - server_base.cpu_seconds,
           static_cast<double>(server_end.rss_bytes) / kMiB,
           static_cast<double>(server_end.rss_peak_bytes) / kMiB));
  sim.Stop();
  if (absl::Status stopped = server.Stop(); !stopped.ok()) {
    Line(n, "server stop: " + stopped.ToString());
  }
  return f;
}

int Main() {
  const uint64_t nofile = RaiseNofileLimit(1 << 20);
  std::vector<int> sizes;
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_agents), ',', absl::SkipEmpty())) {
    int n = 0;
    if (!absl::SimpleAtoi(part, &n) || n <= 0) {
      std::fprintf(stderr, "fleet_bench: bad --agents entry \"%s\"\n", std::string(part).c_str());
      return 2;
    }
    sizes.push_back(n);
  }
  std::printf(
      "fleet_bench: %d cores, RLIMIT_NOFILE %llu, %d regions per agent, %d channels, "
      "server %s\n",
      static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)), static_cast<unsigned long long>(nofile),
      absl::GetFlag(FLAGS_regions), absl::GetFlag(FLAGS_channels),
      absl::GetFlag(FLAGS_server_binary).c_str());
  std::vector<Figures> all;
  for (int n : sizes) all.push_back(Round(n));

  std::printf(
      "\nsummary (targets: p99 <= 100 ms, ListNodes/GetNode p99 <= 100 ms, ingestion >= "
      "200000 region updates/s, /metrics <= 1 s):\n");
  std::printf("%8s %10s %9s %9s %9s %10s %10s %10s %12s %9s %9s %10s %9s\n", "agents", "connect_s",
              "p50_ms", "p99_ms", "max_ms", "list_p99", "intents/s", "ingest/s", "scrape_s",
              "scrapeMiB", "KiB/agt", "idleCPU%", "simCPU_s");
  bool all_met = true;
  for (const Figures& f : all) {
    std::printf(
        "%8d %10.2f %9.1f %9.1f %9.1f %10.1f %10.0f %10.0f %5.3f/%5.3f %9.2f %9.1f %10.1f "
        "%9.1f%s\n",
        f.agents, f.connect_s, f.p50_ms, f.p99_ms, f.max_ms, f.list_p99_ms, f.intents_per_s,
        f.ingest_per_s, f.scrape_s, f.scrape_after_s, f.scrape_mib, f.rss_per_agent_kib,
        f.idle_cpu_pct, f.sim_cpu_s, f.ok ? "" : "  (incomplete)");
    const bool met = f.ok && f.p99_ms <= 100 && f.list_p99_ms <= 100 && f.get_p99_ms <= 100 &&
                     f.burst_missing == 0 && f.ingest_per_s >= 200000 && f.scrape_s <= 1 &&
                     f.scrape_after_s <= 1;
    all_met = all_met && met;
    std::printf("%8s targets %s\n", "", met ? "met" : "NOT met");
  }
  return all_met ? 0 : 1;
}

}  // namespace
}  // namespace fleetsim
}  // namespace dmapin

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "The control plane's benchmark: dmapin-server and a simulated fleet.\n"
      "Usage: bazel run -c opt //tests/fleet:fleet_bench -- --agents=100,1000,10000");
  dmapin::ParseFlagsOrExit(argc, argv);
  return dmapin::fleetsim::Main();
}
