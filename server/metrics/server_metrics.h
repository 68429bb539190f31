// ServerMetrics: the central service's Prometheus metrics.
//
// Everything is built at scrape time from one ServerCore::MetricsSnapshot (a consistent copy taken
// under the core's lock), so the series of one scrape agree with each other and nothing is cached:
// a node, context or container the server forgot is absent from the next scrape. The one piece of
// state kept between scrapes is the reconcile-latency histogram (see below).
//
// Naming scheme: "dmapin_server_" for the server's own control plane (decisions, intents, streams,
// store, reconciler); "dmapin_fleet_" for the fleet's state as the agents report it, with the
// granularity in the name (dmapin_fleet_X fleet total, dmapin_fleet_node_X{node},
// dmapin_fleet_context_X{node,context}, dmapin_fleet_container_X{node,container},
// dmapin_fleet_region_X{node,context,ua,size}). Sizes are bytes, durations seconds, counters end
// in _total. A disconnected node keeps exporting its last reported state (with
// dmapin_fleet_node_connected 0) until the server forgets it. The full list:
//
//  Control plane (no labels unless given)
//   dmapin_server_agents_connected                   gauge, agents with an open control stream
//   dmapin_server_intents{state}                     gauge, intents held, by state (pending,
//                                                    applying, retrying, satisfied, failed,
//                                                    withdrawn, superseded; all always present)
//   dmapin_server_oldest_pending_intent_age_seconds  gauge, age of the oldest intent still pursued
//                                                    (pending/applying/retrying); 0 when none
//   dmapin_server_decisions_sent_total{kind}         counter; kind = register, unregister,
//                                                    release_container, teardown_context (always
//                                                    present)
//   dmapin_server_decision_results_total{kind,result} counter; result = OK or the errno name
//                                                    (EBUSY, ENOENT, ...; EUNKNOWN when the agent
//                                                    sent none or a malformed one); a series
//                                                    appears with its first result
//   dmapin_server_ebusy_retries_total                counter, EBUSY answers scheduled for retry
//   dmapin_server_decisions_timed_out_total          counter, decisions that got no result in time
//   dmapin_server_decisions_session_lost_total       counter, decisions in flight when the
//                                                    agent's stream ended or was replaced
//   dmapin_server_intents_failed_lost_decisions_total counter, intents FAILED after
//                                                    --max_lost_decision_attempts decisions in a
//                                                    row without a result
//   dmapin_server_stream_messages_received_total     counter, agent -> server control messages
//   dmapin_server_stream_messages_sent_total         counter, server -> agent decisions
//   dmapin_server_agent_connects_total               counter
//   dmapin_server_agent_disconnects_total            counter
//   dmapin_server_watchers                           gauge, WatchEvents streams open
//   dmapin_server_watch_buffered_bytes               gauge, bytes queued for them together
//   dmapin_server_watchers_dropped_total{reason}     counter, streams ended for falling behind:
//                                                    lag, buffer (always both present)
//   dmapin_server_watchers_refused_total             counter, streams refused (--max_watchers)
//   dmapin_server_grpc_connections, _grpc_connections_limit   gauges, open / --max_connections
//   dmapin_server_grpc_connections_accepted_total    counter
//   dmapin_server_grpc_connections_refused_total{reason}  counter, closed at once: limit, fds
//   dmapin_server_watch_events_dropped               gauge that only grows: events discarded with
//                                                    the dropped watchers since start
//   dmapin_server_store_failures_total               counter, failed commits/id allocations
//   dmapin_server_reconcile_passes_total             counter
//   dmapin_server_decision_records_pruned_total      counter, records deleted beyond
//   --decision_history dmapin_server_reconcile_duration_seconds         histogram, 100 us .. 10 s
//   dmapin_server_reconcile_durations_unobserved_total counter, passes missing from the histogram
//   process_cpu_seconds_total, process_resident_memory_bytes   the standard process series
//  Fleet totals (no labels; sums over the nodes below)
//   dmapin_fleet_nodes                               gauge, nodes known (connected or not)
//   dmapin_fleet_pinned_bytes, _regions, _region_users, _installed_mappings, _locked_bytes,
//   _memlock_limit_bytes, _memlock_unlimited_contexts, _required_locked_bytes, _contexts,
//   _containers                                      gauges
//   (No fleet total of budgets: a pool budget is shared by its nodes, so a sum would count it
//   once per node.)
//  Per node (label node)
//   dmapin_fleet_node_connected                      gauge 0/1
//   dmapin_fleet_node_pinned_bytes                   gauge, sum of the sizes of its regions
//   dmapin_fleet_node_regions                        gauge
//   dmapin_fleet_node_region_users                   gauge, sum of `used` over its regions
//   dmapin_fleet_node_installed_mappings             gauge, sum of (mapped - 1) over its regions
//   dmapin_fleet_node_locked_bytes                   gauge, sum of its contexts' locked bytes
//   dmapin_fleet_node_memlock_limit_bytes            gauge, sum of its limited contexts' limits
//   dmapin_fleet_node_memlock_unlimited_contexts     gauge, contexts without a memlock limit
//   dmapin_fleet_node_required_locked_bytes          gauge, bytes pinned plus admitted to pin
//   dmapin_fleet_node_budget_bytes                   gauge, the tightest matching pool budget;
//                                                    ABSENT when no policy budgets the node
//   dmapin_fleet_node_budget_used_bytes              gauge, that pool's required bytes (the whole
//                                                    pool's, not the node's); absent likewise
//   dmapin_fleet_node_contexts, _containers          gauges
//   dmapin_fleet_node_registers_total, _register_failures_total, _unregisters_total,
//   _unregister_failures_total, _unregister_ebusy_total, _pin_failures_total, _maps_total,
//   _map_failures_total, _map_rollbacks_total, _unmaps_total, _pending_releases_started_total,
//   _pending_releases_completed_total, _store_commit_failures_total
//                                                    counters as the agent last reported them
//                                                    (listed in common/registry_counters.h)
//                                                    (they restart from 0 with the agent)
//  Per context (labels node, context)
//   dmapin_fleet_context_locked_bytes                gauge
//   dmapin_fleet_context_memlock_limit_bytes         gauge; ABSENT when unlimited
//   dmapin_fleet_context_memlock_unlimited           gauge 0/1
//   dmapin_fleet_context_regions                     gauge
//   dmapin_fleet_context_containers                  gauge, containers bound to it
//  Per container (labels node, container)
//   dmapin_fleet_container_regions                   gauge, regions it holds
//   dmapin_fleet_container_installed_mappings        gauge, IOMMU entries installed in it
//  Per region (labels node, context, ua (hex), size (bytes, decimal); only with
//  per_region_series, at most max_region_series regions per scrape)
//   dmapin_fleet_region_used                         gauge, `used` (not _region_users: that
//                                                    name is the fleet total's)
//   dmapin_fleet_region_installed_mappings           gauge, mapped - 1
//   dmapin_fleet_region_containers                   gauge, containers holding it
//   dmapin_fleet_region_pending_release              gauge 0/1
//   dmapin_fleet_region_series_omitted               gauge, regions left out by the cap (only
//                                                    with per_region_series)
//
// Cardinality: labels are node, context, container, region keys (bounded by what the fleet
// holds, and regions only on request and capped), intent state, decision kind and errno name.
// Nothing is labelled per intent or per decision.
//
// The reconcile histogram. ServerCore keeps only the durations of its most recent passes (a
// vector trimmed from 4097 to 2049 entries), which cannot be turned into a cumulative histogram
// as such. ServerMetrics therefore owns the histogram and, at each scrape, observes the passes
// counted by reconcile_passes since the previous scrape, which are the last entries of that
// vector. That is exact as long as fewer than 2049 passes happen between two scrapes (about 40 s
// at the default 20 ms interval). If more did, the durations of the older ones are gone: they
// are counted in dmapin_server_reconcile_durations_unobserved_total, so that
// histogram _count + unobserved == reconcile_passes_total at every scrape.
#ifndef DMAPIN_SERVER_METRICS_SERVER_METRICS_H_
#define DMAPIN_SERVER_METRICS_SERVER_METRICS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "common/mutex.h"
#include "common/server_limits.h"
#include "prometheus/collectable.h"
#include "prometheus/histogram.h"
#include "prometheus/metric_family.h"
#include "server/core/server_core.h"

namespace dmapin::server {

struct ServerMetricsOptions {
  // Export the dmapin_fleet_region_* series (one series per region in each family).
  bool per_region_series = false;
  // At most this many regions (fleet-wide, per scrape) get per-region series.
  size_t max_region_series = 1000;
  // The gRPC listener whose connections are exported (dmapin_server_grpc_connections*); not
  // owned, may be null.
  const ConnectionListener* listener = nullptr;
};

class ServerMetrics {
 public:
  // `core` is not owned and must outlive the metrics.
  explicit ServerMetrics(const ServerCore* core, ServerMetricsOptions options = {});
  ~ServerMetrics();
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  // The reconcile histogram's upper bounds in seconds: 100 us to 10 s, 1-2.5-5 per decade.
  static const std::vector<double>& ReconcileBuckets();

  // Everything, for prometheus::Exposer::RegisterCollectable. Whoever registers it must remove it
  // (or destroy the exposer) before this object and the core go away.
  std::shared_ptr<prometheus::Collectable> collectable() const { return collector_; }

  // All families as of now (one MetricsSnapshot), and their text exposition (format 0.0.4).
  // Thread-safe: concurrent scrapes are fine.
  std::vector<prometheus::MetricFamily> Collect();
  std::string TextExposition();

 private:
  class Collector;

  // Feeds the histogram with the passes `counters` shows beyond those already observed, then
  // appends the histogram and its unobserved counter to `out`.
  void CollectReconcile(const ServerCounters& counters, std::vector<prometheus::MetricFamily>& out);

  const ServerCore* const core_;
  const ServerMetricsOptions options_;
  Mutex mu_;
  prometheus::Histogram reconcile_seconds_ ABSL_GUARDED_BY(mu_);
  // reconcile_passes as of the newest snapshot fed to the histogram.
  uint64_t passes_seen_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t passes_unobserved_ ABSL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<prometheus::Collectable> collector_;
};

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_METRICS_SERVER_METRICS_H_
