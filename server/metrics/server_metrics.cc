#include "server/metrics/server_metrics.h"

#include <algorithm>
#include <iterator>
#include <map>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "common/connection_metrics.h"
#include "common/metrics_util.h"
#include "common/registry_counters.h"
#include "dmapin/v1/admin.pb.h"
#include "prometheus/client_metric.h"
#include "prometheus/metric_type.h"
#include "prometheus/text_serializer.h"

namespace dmapin::server {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;
using Labels = std::vector<ClientMetric::Label>;

// The decision kinds, as ServerCore names them; their series exist from the first scrape.
constexpr absl::string_view kDecisionKinds[] = {"register", "unregister", "release_container",
                                                "teardown_context"};

double D(uint64_t value) { return static_cast<double>(value); }

// "pending" for "INTENT_STATE_PENDING".
std::string StateLabel(absl::string_view enum_name) {
  absl::ConsumePrefix(&enum_name, "INTENT_STATE_");
  return absl::AsciiStrToLower(enum_name);
}

// The result label: "OK" or an errno name as agents send them ("EBUSY"). The name comes from the
// agent, so anything else collapses into one value to keep the label set bounded.
std::string ResultLabel(absl::string_view result) {
  if (result == "OK") return "OK";
  const bool errno_like = result.size() >= 2 && result.size() <= 32 && result.front() == 'E' &&
                          std::all_of(result.begin(), result.end(), [](char c) {
                            return (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
                          });
  return errno_like ? std::string(result) : "EUNKNOWN";
}

// Registry counters as the agent reports them, with the agent's own series names (minus the
// "dmapin_agent_" prefix).
struct RegistryCounter {
  const char* suffix;
  const char* help;
  uint64_t (v1::RegistryCounters::*get)() const;
};
// The reported counters of common/registry_counters.h, then the agent's store-commit failures.
#define DMAPIN_FLEET_COUNTER(field, metric, agent_help, fleet_help) \
  {metric, fleet_help, &v1::RegistryCounters::field},
const RegistryCounter kRegistryCounters[] = {
    DMAPIN_REGISTRY_COUNTERS(DMAPIN_FLEET_COUNTER, DMAPIN_COUNTER_IGNORE)  // and:
    {"store_commit_failures_total", "Failed commits of the node agent's state store.",
     &v1::RegistryCounters::store_commit_failures},
};
#undef DMAPIN_FLEET_COUNTER

void CollectControlPlane(const FleetMetricsSnapshot& snapshot, std::vector<MetricFamily>& out) {
  const ServerCounters& c = snapshot.counters;
  AddScalar(out, "dmapin_server_agents_connected", "Agents with an open control stream.",
            MetricType::Gauge, D(snapshot.agents_connected));

  // Every state from the first scrape on, so that a state's series never appears out of nowhere.
  std::map<std::string, uint64_t> by_state;
  for (int value = v1::IntentState_MIN; value <= v1::IntentState_MAX; ++value) {
    if (v1::IntentState_IsValid(value) && value != v1::INTENT_STATE_UNSPECIFIED) {
      by_state[StateLabel(v1::IntentState_Name(static_cast<v1::IntentState>(value)))] = 0;
    }
  }
  for (const auto& [state, count] : snapshot.intents_by_state) by_state[StateLabel(state)] += count;
  FamilyBuilder intents("dmapin_server_intents", "Intents the server holds, by state.",
                        MetricType::Gauge);
  for (const auto& [state, count] : by_state) intents.Add(D(count), {{"state", state}});
  intents.MoveTo(out);
  AddScalar(out, "dmapin_server_oldest_pending_intent_age_seconds",
            "Age of the oldest intent still pursued (pending, applying or retrying); 0 when none.",
            MetricType::Gauge, snapshot.oldest_pending_intent_seconds);

  std::map<std::string, uint64_t> sent;
  for (absl::string_view kind : kDecisionKinds) sent[std::string(kind)] = 0;
  for (const auto& [kind, count] : c.decisions_sent) sent[kind] += count;
  FamilyBuilder sent_family("dmapin_server_decisions_sent_total",
                            "Decisions sent to agents, by kind.", MetricType::Counter);
  for (const auto& [kind, count] : sent) sent_family.Add(D(count), {{"kind", kind}});
  sent_family.MoveTo(out);

  // Keys are "kind/RESULT"; merged after ResultLabel so that collapsed names share one series.
  std::map<std::pair<std::string, std::string>, uint64_t> results;
  for (const auto& [key, count] : c.decision_results) {
    const size_t slash = key.rfind('/');
    std::string kind = slash == std::string::npos ? key : key.substr(0, slash);
    std::string result =
        ResultLabel(slash == std::string::npos ? absl::string_view()
                                               : absl::string_view(key).substr(slash + 1));
    results[{std::move(kind), std::move(result)}] += count;
  }
  FamilyBuilder results_family(
      "dmapin_server_decision_results_total",
      "Decision results received from agents, by kind and result (OK or the errno name).",
      MetricType::Counter);
  for (const auto& [key, count] : results) {
    results_family.Add(D(count), {{"kind", key.first}, {"result", key.second}});
  }
  results_family.MoveTo(out);

  const struct {
    const char* name;
    const char* help;
    uint64_t value;
  } kCounters[] = {
      {"dmapin_server_ebusy_retries_total",
       "EBUSY results after which the server scheduled a retry with backoff.", c.ebusy_retries},
      {"dmapin_server_policy_limit_refusals_total",
       "SetPolicy calls refused (ENOSPC) because --max_policies policies exist.",
       c.policy_limit_refusals},
      {"dmapin_server_decisions_timed_out_total",
       "Decisions that got no result within the decision timeout.", c.decisions_timed_out},
      {"dmapin_server_decisions_session_lost_total",
       "Decisions in flight when the agent's control stream ended or a new one replaced it.",
       c.decisions_session_lost},
      {"dmapin_server_intents_failed_lost_decisions_total",
       "Intents failed because --max_lost_decision_attempts decisions in a row got no result "
       "(the agent restarted or went silent while applying them).",
       c.intents_failed_lost_decisions},
      {"dmapin_server_stream_messages_received_total",
       "Messages received from agents on established control streams.", c.stream_messages_received},
      {"dmapin_server_stream_messages_sent_total", "Decisions sent to agents on control streams.",
       c.stream_messages_sent},
      {"dmapin_server_agent_connects_total", "Control streams established (agent hellos).",
       c.agent_connects},
      {"dmapin_server_agent_disconnects_total", "Control streams that ended.", c.agent_disconnects},
      {"dmapin_server_store_failures_total",
       "Failed commits or id allocations of the server's store.", c.store_failures},
      {"dmapin_server_reconcile_passes_total", "Reconcile passes run.", c.reconcile_passes},
      {"dmapin_server_decision_records_pruned_total",
       "Decision records deleted beyond the server's --decision_history.", c.decisions_pruned},
      {"dmapin_server_intents_pruned_total",
       "Finished intents forgotten beyond the server's --intent_history.", c.intents_pruned},
  };
  for (const auto& counter : kCounters) {
    AddScalar(out, counter.name, counter.help, MetricType::Counter, D(counter.value));
  }
  // WatchEvents. Both reasons always present, so a rate() over them never starts from nothing.
  FamilyBuilder dropped("dmapin_server_watchers_dropped_total",
                        "WatchEvents streams the server ended because the watcher fell behind: "
                        "lag (past --watch_max_lag_events) or buffer (all watchers' queues "
                        "together full, --watch_buffer_bytes).",
                        MetricType::Counter);
  for (const char* reason : {"buffer", "lag"}) {
    auto it = c.watchers_dropped.find(reason);
    dropped.Add(D(it == c.watchers_dropped.end() ? 0 : it->second), {{"reason", reason}});
  }
  dropped.MoveTo(out);
  AddScalar(out, "dmapin_server_watchers_refused_total",
            "WatchEvents streams refused beyond --max_watchers.", MetricType::Counter,
            D(c.watchers_refused));
  AddScalar(out, "dmapin_server_watchers", "WatchEvents streams open.", MetricType::Gauge,
            D(c.watchers));
  AddScalar(out, "dmapin_server_watch_buffered_bytes",
            "Bytes of events queued for the open WatchEvents streams together.", MetricType::Gauge,
            D(c.watch_buffered_bytes));
  // Kept a gauge for the dashboards that graph it; it only grows (events in the queues of
  // dropped watchers, since the server started).
  AddScalar(out, "dmapin_server_watch_events_dropped",
            "Events discarded with WatchEvents watchers dropped for falling behind, since the "
            "server started.",
            MetricType::Gauge, D(c.events_dropped));
}

void CollectFleet(const FleetMetricsSnapshot& snapshot, const ServerMetricsOptions& options,
                  std::vector<MetricFamily>& out) {
  struct Totals {
    uint64_t pinned = 0, regions = 0, users = 0, installed = 0, locked = 0, limit = 0,
             unlimited = 0, required = 0, contexts = 0, containers = 0;
  } fleet;

  FamilyBuilder connected("dmapin_fleet_node_connected",
                          "1 while the node's agent has an open control stream.",
                          MetricType::Gauge);
  FamilyBuilder pinned("dmapin_fleet_node_pinned_bytes",
                       "Bytes of the regions registered on the node.", MetricType::Gauge);
  FamilyBuilder regions("dmapin_fleet_node_regions", "Regions registered on the node.",
                        MetricType::Gauge);
  FamilyBuilder users("dmapin_fleet_node_region_users",
                      "Sum of the use counts of the node's regions.", MetricType::Gauge);
  FamilyBuilder installed("dmapin_fleet_node_installed_mappings",
                          "IOMMU entries installed on the node (sum of mapped - 1).",
                          MetricType::Gauge);
  FamilyBuilder locked("dmapin_fleet_node_locked_bytes",
                       "Bytes locked by the node's memory contexts.", MetricType::Gauge);
  FamilyBuilder limit("dmapin_fleet_node_memlock_limit_bytes",
                      "Sum of the memlock limits of the node's limited contexts.",
                      MetricType::Gauge);
  FamilyBuilder unlimited("dmapin_fleet_node_memlock_unlimited_contexts",
                          "Memory contexts on the node without a memlock limit.",
                          MetricType::Gauge);
  FamilyBuilder required("dmapin_fleet_node_required_locked_bytes",
                         "Bytes the node must be able to lock: its registered regions plus those "
                         "of admitted register intents.",
                         MetricType::Gauge);
  FamilyBuilder budget("dmapin_fleet_node_budget_bytes",
                       "Pinned-bytes budget of the node's fullest budgeted pool; absent without "
                       "one.",
                       MetricType::Gauge);
  FamilyBuilder budget_used("dmapin_fleet_node_budget_used_bytes",
                            "Bytes required across that pool (all its nodes); absent without a "
                            "budget.",
                            MetricType::Gauge);
  FamilyBuilder node_contexts("dmapin_fleet_node_contexts", "Memory contexts on the node.",
                              MetricType::Gauge);
  FamilyBuilder node_containers("dmapin_fleet_node_containers", "VFIO containers on the node.",
                                MetricType::Gauge);
  std::vector<FamilyBuilder> registry;
  for (const RegistryCounter& counter : kRegistryCounters) {
    registry.emplace_back(absl::StrCat("dmapin_fleet_node_", counter.suffix), counter.help,
                          MetricType::Counter);
  }

  FamilyBuilder context_locked("dmapin_fleet_context_locked_bytes",
                               "Bytes the memory context has locked.", MetricType::Gauge);
  FamilyBuilder context_limit("dmapin_fleet_context_memlock_limit_bytes",
                              "The memory context's memlock limit; absent when unlimited.",
                              MetricType::Gauge);
  FamilyBuilder context_unlimited("dmapin_fleet_context_memlock_unlimited",
                                  "1 when the memory context's memlock limit is unlimited.",
                                  MetricType::Gauge);
  FamilyBuilder context_regions("dmapin_fleet_context_regions",
                                "Regions registered in the memory context.", MetricType::Gauge);
  FamilyBuilder context_containers("dmapin_fleet_context_containers",
                                   "Containers bound to the memory context.", MetricType::Gauge);

  FamilyBuilder container_regions("dmapin_fleet_container_regions", "Regions the container holds.",
                                  MetricType::Gauge);
  FamilyBuilder container_installed("dmapin_fleet_container_installed_mappings",
                                    "IOMMU entries installed in the container.", MetricType::Gauge);

  // Not "_region_users": that is the fleet total's name.
  FamilyBuilder region_users("dmapin_fleet_region_used",
                             "Use count (`used`) of the region: its holding registrations.",
                             MetricType::Gauge);
  FamilyBuilder region_installed("dmapin_fleet_region_installed_mappings",
                                 "IOMMU entries installed on the region (mapped - 1).",
                                 MetricType::Gauge);
  FamilyBuilder region_containers("dmapin_fleet_region_containers",
                                  "Containers holding the region.", MetricType::Gauge);
  FamilyBuilder region_pending("dmapin_fleet_region_pending_release",
                               "1 when the region is unheld but still mapped.", MetricType::Gauge);
  uint64_t region_series = 0;

  for (const FleetMetricsSnapshot::NodeMetrics& node : snapshot.nodes) {
    const Labels labels = {{"node", node.name}};
    uint64_t node_locked = 0;
    uint64_t node_limit = 0;
    uint64_t node_unlimited = 0;
    for (const v1::Context& context : node.contexts) {
      const Labels context_labels = {{"context", context.name()}, {"node", node.name}};
      node_locked += context.locked_bytes();
      context_locked.Add(D(context.locked_bytes()), context_labels);
      if (context.memlock_unlimited()) {
        ++node_unlimited;
      } else {
        node_limit += context.memlock_limit_bytes();
        context_limit.Add(D(context.memlock_limit_bytes()), context_labels);
      }
      context_unlimited.Add(context.memlock_unlimited() ? 1 : 0, context_labels);
      context_regions.Add(D(context.regions()), context_labels);
      context_containers.Add(D(context.containers_size()), context_labels);
    }
    for (const v1::Container& container : node.containers) {
      const Labels container_labels = {{"container", container.name()}, {"node", node.name}};
      container_regions.Add(D(container.held_regions()), container_labels);
      container_installed.Add(D(container.installed_entries()), container_labels);
    }
    for (const v1::Region& region : node.regions_detail) {
      const Labels region_labels = {{"context", region.context()},
                                    {"node", node.name},
                                    {"size", absl::StrCat(region.size())},
                                    {"ua", absl::StrCat("0x", absl::Hex(region.ua()))}};
      region_users.Add(D(region.used()), region_labels);
      region_installed.Add(region.mapped() > 0 ? D(region.mapped() - 1) : 0, region_labels);
      region_containers.Add(D(region.containers_size()), region_labels);
      region_pending.Add(region.pending_release() ? 1 : 0, region_labels);
      ++region_series;
    }

    connected.Add(node.connected ? 1 : 0, labels);
    pinned.Add(D(node.pinned_bytes), labels);
    regions.Add(D(node.regions), labels);
    users.Add(D(node.used_sum), labels);
    installed.Add(D(node.installed_mappings), labels);
    locked.Add(D(node_locked), labels);
    limit.Add(D(node_limit), labels);
    unlimited.Add(D(node_unlimited), labels);
    required.Add(D(node.required_bytes), labels);
    if (node.budget_bytes > 0) {
      budget.Add(D(node.budget_bytes), labels);
      budget_used.Add(D(node.budget_used_bytes), labels);
    }
    node_contexts.Add(D(node.contexts.size()), labels);
    node_containers.Add(D(node.containers.size()), labels);
    for (size_t i = 0; i < registry.size(); ++i) {
      registry[i].Add(D((node.counters.*kRegistryCounters[i].get)()), labels);
    }

    fleet.pinned += node.pinned_bytes;
    fleet.regions += node.regions;
    fleet.users += node.used_sum;
    fleet.installed += node.installed_mappings;
    fleet.locked += node_locked;
    fleet.limit += node_limit;
    fleet.unlimited += node_unlimited;
    fleet.required += node.required_bytes;
    fleet.contexts += node.contexts.size();
    fleet.containers += node.containers.size();
  }

  AddScalar(out, "dmapin_fleet_nodes", "Nodes the server knows (connected or not).",
            MetricType::Gauge, D(snapshot.nodes.size()));
  AddScalar(out, "dmapin_fleet_pinned_bytes", "Bytes of the regions registered in the fleet.",
            MetricType::Gauge, D(fleet.pinned));
  AddScalar(out, "dmapin_fleet_regions", "Regions registered in the fleet.", MetricType::Gauge,
            D(fleet.regions));
  AddScalar(out, "dmapin_fleet_region_users", "Sum of the use counts of the fleet's regions.",
            MetricType::Gauge, D(fleet.users));
  AddScalar(out, "dmapin_fleet_installed_mappings", "IOMMU entries installed in the fleet.",
            MetricType::Gauge, D(fleet.installed));
  AddScalar(out, "dmapin_fleet_locked_bytes", "Bytes locked by the fleet's memory contexts.",
            MetricType::Gauge, D(fleet.locked));
  AddScalar(out, "dmapin_fleet_memlock_limit_bytes",
            "Sum of the memlock limits of the fleet's limited contexts.", MetricType::Gauge,
            D(fleet.limit));
  AddScalar(out, "dmapin_fleet_memlock_unlimited_contexts",
            "Memory contexts in the fleet without a memlock limit.", MetricType::Gauge,
            D(fleet.unlimited));
  AddScalar(out, "dmapin_fleet_required_locked_bytes",
            "Bytes the fleet must be able to lock (registered plus admitted).", MetricType::Gauge,
            D(fleet.required));
  AddScalar(out, "dmapin_fleet_contexts", "Memory contexts in the fleet.", MetricType::Gauge,
            D(fleet.contexts));
  AddScalar(out, "dmapin_fleet_containers", "VFIO containers in the fleet.", MetricType::Gauge,
            D(fleet.containers));

  connected.MoveTo(out);
  pinned.MoveTo(out);
  regions.MoveTo(out);
  users.MoveTo(out);
  installed.MoveTo(out);
  locked.MoveTo(out);
  limit.MoveTo(out);
  unlimited.MoveTo(out);
  required.MoveTo(out);
  budget.MoveTo(out);
  budget_used.MoveTo(out);
  node_contexts.MoveTo(out);
  node_containers.MoveTo(out);
  for (FamilyBuilder& family : registry) family.MoveTo(out);
  context_locked.MoveTo(out);
  context_limit.MoveTo(out);
  context_unlimited.MoveTo(out);
  context_regions.MoveTo(out);
  context_containers.MoveTo(out);
  container_regions.MoveTo(out);
  container_installed.MoveTo(out);
  if (options.per_region_series) {
    region_users.MoveTo(out);
    region_installed.MoveTo(out);
    region_containers.MoveTo(out);
    region_pending.MoveTo(out);
    AddScalar(out, "dmapin_fleet_region_series_omitted",
              "Regions without dmapin_fleet_region_* series because of the max_region_series cap.",
              MetricType::Gauge, D(fleet.regions - std::min(fleet.regions, region_series)));
  }
}

}  // namespace

// The Collectable handed to the exposer.
class ServerMetrics::Collector final : public prometheus::Collectable {
 public:
  explicit Collector(ServerMetrics* metrics) : metrics_(metrics) {}
  std::vector<MetricFamily> Collect() const override { return metrics_->Collect(); }

 private:
  ServerMetrics* const metrics_;
};

const std::vector<double>& ServerMetrics::ReconcileBuckets() {
  static const std::vector<double>* const kBuckets =
      new std::vector<double>{100e-6, 250e-6, 500e-6, 1e-3,   2.5e-3, 5e-3, 10e-3, 25e-3,
                              50e-3,  100e-3, 250e-3, 500e-3, 1.0,    2.5,  5.0,   10.0};
  return *kBuckets;
}

ServerMetrics::ServerMetrics(const ServerCore* core, ServerMetricsOptions options)
    : core_(core),
      options_(options),
      reconcile_seconds_(ReconcileBuckets()),
      collector_(std::make_shared<Collector>(this)) {}

ServerMetrics::~ServerMetrics() = default;

void ServerMetrics::CollectReconcile(const ServerCounters& counters,
                                     std::vector<MetricFamily>& out) {
  MutexLock lock(&mu_);
  // A snapshot older than one already fed (concurrent scrapes) brings nothing new.
  if (counters.reconcile_passes > passes_seen_) {
    const std::vector<double>& recent = counters.reconcile_seconds_recent;
    const uint64_t fresh = counters.reconcile_passes - passes_seen_;
    // The core appends one duration per pass under the same lock that counts it, so the last
    // `fresh` entries are exactly the new passes, as far as the vector still holds them.
    const uint64_t available = std::min<uint64_t>(fresh, recent.size());
    for (size_t i = recent.size() - available; i < recent.size(); ++i) {
      reconcile_seconds_.Observe(recent[i]);
    }
    passes_unobserved_ += fresh - available;
    passes_seen_ = counters.reconcile_passes;
  }
  MetricFamily histogram;
  histogram.name = "dmapin_server_reconcile_duration_seconds";
  histogram.help = "Duration of the server's reconcile passes.";
  histogram.type = MetricType::Histogram;
  histogram.metric.push_back(reconcile_seconds_.Collect());
  out.push_back(std::move(histogram));
  AddScalar(out, "dmapin_server_reconcile_durations_unobserved_total",
            "Reconcile passes missing from dmapin_server_reconcile_duration_seconds because too "
            "many ran between two scrapes for the server to still hold their durations.",
            MetricType::Counter, D(passes_unobserved_));
}

std::vector<MetricFamily> ServerMetrics::Collect() {
  const FleetMetricsSnapshot snapshot =
      core_->MetricsSnapshot(options_.per_region_series ? options_.max_region_series : 0);
  std::vector<MetricFamily> out;
  CollectControlPlane(snapshot, out);
  CollectReconcile(snapshot.counters, out);
  CollectFleet(snapshot, options_, out);
  if (options_.listener != nullptr) AddConnectionMetrics(out, "dmapin_server_", *options_.listener);
  AddProcessMetrics(out);
  return out;
}

std::string ServerMetrics::TextExposition() {
  return prometheus::TextSerializer().Serialize(Collect());
}

}  // namespace dmapin::server
