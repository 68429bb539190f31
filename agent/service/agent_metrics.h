// AgentMetrics: the node agent's own Prometheus metrics.
//
// Two kinds of series:
//  - RPC series, updated on the hot path by the gRPC service (NodeAgentService::Finish): a latency
//    histogram per method and an error counter per (method, errno). The per-method objects are
//    created up front, so recording a call is two clock reads in the service, one histogram
//    observation and, for a failed call only, one counter increment.
//  - State series, built from the agent's state at scrape time (a prometheus::Collectable whose
//    Collect() reads NodeAgent::Status/ListContexts/ListContainers/ListRegions and the store's
//    stats): per-context and per-container gauges, node totals, and the registry's and store's
//    counters. Nothing is cached, so a context that was torn down is simply absent from the next
//    scrape.
//
// Every name starts with "dmapin_agent_" (plus the standard process_cpu_seconds_total and
// process_resident_memory_bytes); sizes are bytes, durations seconds. The full list:
//
//  Node (no labels)
//   dmapin_agent_info{node,backend,version}          gauge, always 1
//   dmapin_agent_page_size_bytes                     gauge
//   dmapin_agent_contexts / _containers / _regions   gauge
//   dmapin_agent_locked_bytes                        gauge, bytes pinned on the node
//   dmapin_agent_installed_mappings                  gauge, IOMMU entries installed
//   dmapin_agent_store_failed                        gauge 0/1 (1: changes refused until restart)
//   dmapin_agent_refused_change_undo_failures_total  counter (refused changes not undone: reads
//                                                    may differ from what was acknowledged)
//   dmapin_agent_vfio_inconsistencies_total          counter (VFIO backends: kernel and registry
//                                                    may disagree; restart the agent)
//   dmapin_agent_store_commits_total                 counter (only with a store)
//   dmapin_agent_store_failed_commits_total          counter (only with a store)
//   dmapin_agent_store_transactions_total            counter (only with a store; < commits when
//                                                    group commit batched concurrent commits)
//   dmapin_agent_store_rows_written_total            counter (only with a store)
//   dmapin_agent_grpc_connections, _grpc_connections_limit, _grpc_connections_accepted_total,
//   _grpc_connections_refused_total{reason}          the gRPC listener (only with one; see
//                                                    common/connection_metrics.h)
//   dmapin_agent_registers_total, _register_failures_total, _unregisters_total,
//   _unregister_failures_total, _unregister_ebusy_total, _pin_failures_total,
//   _register_limit_refusals_total, _allocation_failures_total, _maps_total,
//   _map_failures_total, _map_rollbacks_total, _unmaps_total, _pending_releases_started_total,
//   _pending_releases_completed_total, _grace_periods_total      counters of the registry
//                                                    (listed in common/registry_counters.h)
//  Per context (label context)
//   dmapin_agent_context_locked_bytes                gauge, bytes the context has pinned
//   dmapin_agent_context_regions                     gauge
//   dmapin_agent_context_region_users                gauge, sum of `used` over its regions
//   dmapin_agent_context_installed_mappings          gauge, sum of (mapped - 1) over its regions
//   dmapin_agent_context_containers                  gauge, containers bound to it
//   dmapin_agent_context_memlock_limit_bytes         gauge; ABSENT when the limit is unlimited
//   dmapin_agent_context_memlock_unlimited           gauge 0/1
//  Per container (labels container, context; context="" until the container is bound)
//   dmapin_agent_container_pinned_bytes              gauge, size of the regions it holds
//   dmapin_agent_container_regions                   gauge, regions it holds
//   dmapin_agent_container_region_users              gauge, sum of `used` over the regions it holds
//   dmapin_agent_container_installed_mappings        gauge, IOMMU entries installed in it
//   (A container has no memlock limit of its own: join on `context` for its context's limit.)
//  Per RPC method (label method, e.g. "MapDma")
//   dmapin_agent_rpc_duration_seconds                histogram, 10 us .. 1 s; time spent in the
//                                                    handler (agent work and durable commit),
//                                                    without transport and (de)serialization
//   dmapin_agent_rpc_errors_total{method,errno}      counter; a series appears with its first error
//
// An unlimited memlock limit is left out rather than reported as +Inf, so that dashboards dividing
// locked bytes by the limit see no series instead of 0; dmapin_agent_context_memlock_unlimited
// tells "unlimited" apart from "context gone".
#ifndef DMAPIN_AGENT_SERVICE_AGENT_METRICS_H_
#define DMAPIN_AGENT_SERVICE_AGENT_METRICS_H_

#include <array>
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "agent/node/node_agent.h"
#include "agent/service/memory_socket.h"
#include "agent/service/version.h"
#include "agent/store/state_store.h"
#include "common/mutex.h"
#include "common/server_limits.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"

namespace dmapin::agent {

// The methods of dmapin.v1.NodeAgent, as metric label values.
enum class RpcMethod : int {
  kCreateContext,
  kGetContext,
  kListContexts,
  kTeardownContext,
  kCreateContainer,
  kGetContainer,
  kListContainers,
  kReleaseContainer,
  kRegisterRegion,
  kUnregisterRegion,
  kMapDma,
  kUnmapDma,
  kTranslate,
  kLookup,
  kListRegions,
  kGetNodeStatus,
  kAttachMemory,
};
inline constexpr int kRpcMethodCount = static_cast<int>(RpcMethod::kAttachMemory) + 1;

// "MapDma" for RpcMethod::kMapDma.
absl::string_view RpcMethodName(RpcMethod method);

struct AgentMetricsOptions {
  // Not owned; must outlive the metrics. Required.
  const NodeAgent* agent = nullptr;
  // Not owned; must outlive the metrics. nullptr: no dmapin_agent_store_*_total series.
  const StateStore* store = nullptr;
  // Not owned; must outlive the metrics. nullptr: no dmapin_agent_grpc_connections* series.
  const ConnectionListener* listener = nullptr;
  // Not owned; must outlive the metrics. nullptr: no dmapin_agent_memory_socket_* series.
  const MemorySocketServer* memory_socket = nullptr;
  // The version label of dmapin_agent_info.
  std::string version = kAgentVersion;
};

class AgentMetrics {
 public:
  using Clock = std::chrono::steady_clock;

  explicit AgentMetrics(AgentMetricsOptions options);
  ~AgentMetrics();
  AgentMetrics(const AgentMetrics&) = delete;
  AgentMetrics& operator=(const AgentMetrics&) = delete;

  // The histogram's upper bounds in seconds: 10 us to 1 s, 1-2.5-5 per decade.
  static const std::vector<double>& LatencyBuckets();

  // Hot path: one finished call of `method` that took `latency`; `err` is its errno (0: OK).
  // Thread-safe; allocates only on the first error of a (method, errno) pair.
  void RecordRpc(RpcMethod method, Clock::duration latency, int err);

  // Everything, for prometheus::Exposer::RegisterCollectable. Whoever registers it must remove it
  // (or destroy the exposer) before this object and the agent go away.
  std::shared_ptr<prometheus::Collectable> collectable() const { return collector_; }

  // All families as of now, and their text exposition (format 0.0.4).
  std::vector<prometheus::MetricFamily> Collect() const;
  std::string TextExposition() const;

 private:
  class Collector;
  // One slot per errno value below this; others share slot 0 ("EUNKNOWN").
  static constexpr int kErrnoSlots = 256;

  prometheus::Counter* ErrorCounter(int method, int err);
  std::vector<prometheus::MetricFamily> CollectState() const;

  const AgentMetricsOptions options_;
  // RPC families (owned by the registry).
  std::shared_ptr<prometheus::Registry> rpc_registry_;
  prometheus::Family<prometheus::Histogram>* duration_family_ = nullptr;
  prometheus::Family<prometheus::Counter>* errors_family_ = nullptr;
  std::array<prometheus::Histogram*, kRpcMethodCount> durations_ = {};
  // Error counters, created on first use; written under errors_mu_, read without it.
  Mutex errors_mu_;
  std::array<std::array<std::atomic<prometheus::Counter*>, kErrnoSlots>, kRpcMethodCount> errors_;
  std::shared_ptr<prometheus::Collectable> collector_;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_SERVICE_AGENT_METRICS_H_
