#include "agent/service/agent_metrics.h"

#include <initializer_list>
#include <map>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "common/connection_metrics.h"
#include "common/errno_status.h"
#include "common/metrics_util.h"
#include "common/registry_counters.h"
#include "prometheus/client_metric.h"
#include "prometheus/metric_type.h"
#include "prometheus/text_serializer.h"

namespace dmapin::agent {
namespace {

// One scalar series of a table of them (the ownership counters, the store's, the memory
// socket's): the tables list name, help, type and value once each.
struct ScalarMetric {
  const char* name;
  const char* help;
  prometheus::MetricType type;
  uint64_t value;
};

void AddScalars(std::vector<prometheus::MetricFamily>& out,
                std::initializer_list<ScalarMetric> metrics) {
  for (const ScalarMetric& metric : metrics) {
    AddScalar(out, metric.name, metric.help, metric.type, static_cast<double>(metric.value));
  }
}

constexpr absl::string_view kMethodNames[kRpcMethodCount] = {
    "CreateContext", "GetContext",     "ListContexts",     "TeardownContext", "CreateContainer",
    "GetContainer",  "ListContainers", "ReleaseContainer", "RegisterRegion",  "UnregisterRegion",
    "MapDma",        "UnmapDma",       "Translate",        "Lookup",          "ListRegions",
    "GetNodeStatus", "AttachMemory",
};

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

}  // namespace

absl::string_view RpcMethodName(RpcMethod method) {
  const int index = static_cast<int>(method);
  if (index < 0 || index >= kRpcMethodCount) return "unknown";
  return kMethodNames[index];
}

// The Collectable handed to the exposer: the RPC registry's families plus the state families.
class AgentMetrics::Collector final : public prometheus::Collectable {
 public:
  explicit Collector(const AgentMetrics* metrics) : metrics_(metrics) {}
  std::vector<MetricFamily> Collect() const override { return metrics_->Collect(); }

 private:
  const AgentMetrics* const metrics_;
};

const std::vector<double>& AgentMetrics::LatencyBuckets() {
  static const std::vector<double>* const kBuckets =
      new std::vector<double>{10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3,   2.5e-3,
                              5e-3,  10e-3, 25e-3, 50e-3,  100e-3, 250e-3, 500e-3, 1.0};
  return *kBuckets;
}

AgentMetrics::AgentMetrics(AgentMetricsOptions options)
    : options_(std::move(options)), rpc_registry_(std::make_shared<prometheus::Registry>()) {
  duration_family_ =
      &prometheus::BuildHistogram()
           .Name("dmapin_agent_rpc_duration_seconds")
           .Help(
               "Time the agent spent handling a dmapin.v1.NodeAgent call (registry work and "
               "durable commit; transport and (de)serialization excluded), by method.")
           .Register(*rpc_registry_);
  errors_family_ = &prometheus::BuildCounter()
                        .Name("dmapin_agent_rpc_errors_total")
                        .Help("dmapin.v1.NodeAgent calls that failed, by method and errno.")
                        .Register(*rpc_registry_);
  for (int method = 0; method < kRpcMethodCount; ++method) {
    durations_[method] =
        &duration_family_->Add({{"method", std::string(kMethodNames[method])}}, LatencyBuckets());
    for (std::atomic<prometheus::Counter*>& slot : errors_[method]) {
      slot.store(nullptr, std::memory_order_relaxed);
    }
  }
  collector_ = std::make_shared<Collector>(this);
}

AgentMetrics::~AgentMetrics() = default;

prometheus::Counter* AgentMetrics::ErrorCounter(int method, int err) {
  const int slot = err > 0 && err < kErrnoSlots ? err : 0;
  std::atomic<prometheus::Counter*>& cached = errors_[method][slot];
  prometheus::Counter* counter = cached.load(std::memory_order_acquire);
  if (counter != nullptr) return counter;
  MutexLock lock(&errors_mu_);
  counter = cached.load(std::memory_order_relaxed);
  if (counter == nullptr) {
    counter = &errors_family_->Add({{"method", std::string(kMethodNames[method])},
                                    {"errno", slot == 0 ? "EUNKNOWN" : ErrnoName(slot)}});
    cached.store(counter, std::memory_order_release);
  }
  return counter;
}

void AgentMetrics::RecordRpc(RpcMethod method, Clock::duration latency, int err) {
  const int index = static_cast<int>(method);
  if (index < 0 || index >= kRpcMethodCount) return;
  durations_[index]->Observe(std::chrono::duration<double>(latency).count());
  if (err != 0) ErrorCounter(index, err)->Increment();
}

std::vector<MetricFamily> AgentMetrics::Collect() const {
  std::vector<MetricFamily> families = rpc_registry_->Collect();
  std::vector<MetricFamily> state = CollectState();
  families.insert(families.end(), std::make_move_iterator(state.begin()),
                  std::make_move_iterator(state.end()));
  return families;
}

std::string AgentMetrics::TextExposition() const {
  return prometheus::TextSerializer().Serialize(Collect());
}

std::vector<MetricFamily> AgentMetrics::CollectState() const {
  const NodeAgent& agent = *options_.agent;
  const NodeStatusView status = agent.Status();
  const std::vector<ContextView> contexts = agent.ListContexts();
  const std::vector<ContainerView> containers = agent.ListContainers();
  absl::StatusOr<std::vector<RegionView>> regions = agent.ListRegions("", /*with_hpas=*/false);

  // Sums over the regions, by context and by holding container.
  struct ContextSums {
    uint64_t users = 0;
    uint64_t installed = 0;
  };
  struct ContainerSums {
    uint64_t pinned_bytes = 0;
    uint64_t users = 0;
  };
  std::map<std::string, ContextSums> by_context;
  std::map<std::string, ContainerSums> by_container;
  if (regions.ok()) {
    for (const RegionView& region : *regions) {
      ContextSums& context = by_context[region.context];
      context.users += region.info.used;
      // `mapped` is biased by one (spec §5); 0 only for a region on its way out.
      context.installed += region.info.mapped > 0 ? region.info.mapped - 1 : 0;
      for (const std::string& holder : region.containers) {
        ContainerSums& container = by_container[holder];
        container.pinned_bytes += region.info.size;
        container.users += region.info.used;
      }
    }
  }

  std::vector<MetricFamily> out;
  FamilyBuilder("dmapin_agent_info", "The agent's node, pinning backend and version (always 1).",
                MetricType::Gauge)
      .Add(1,
           {{"backend", status.backend}, {"node", status.node_name}, {"version", options_.version}})
      .MoveTo(out);
  AddScalar(out, "dmapin_agent_page_size_bytes", "The node's page size (pinning granule).",
            MetricType::Gauge, static_cast<double>(status.page_size));
  AddScalar(out, "dmapin_agent_contexts", "Memory contexts on the node.", MetricType::Gauge,
            static_cast<double>(status.contexts));
  AddScalar(out, "dmapin_agent_containers", "VFIO containers on the node.", MetricType::Gauge,
            static_cast<double>(status.containers));
  AddScalar(out, "dmapin_agent_regions", "Registered regions on the node.", MetricType::Gauge,
            static_cast<double>(status.regions));
  AddScalar(out, "dmapin_agent_locked_bytes", "Bytes pinned (locked) on the node.",
            MetricType::Gauge, static_cast<double>(status.locked_bytes));
  AddScalar(out, "dmapin_agent_installed_mappings",
            "IOMMU entries installed across all containers.", MetricType::Gauge,
            static_cast<double>(status.installed_entries));
  AddScalar(out, "dmapin_agent_store_failed",
            "1 after a state-store failure: the refused change was undone, and the agent refuses "
            "changes until it is restarted.",
            MetricType::Gauge, status.store_failed ? 1 : 0);
  AddScalar(out, "dmapin_agent_refused_change_undo_failures_total",
            "Changes the state store refused that could not be undone in memory or in the kernel "
            "(reads may differ from the acknowledged state until the restart).",
            MetricType::Counter, static_cast<double>(status.refused_change_undo_failures));
  AddScalar(out, "dmapin_agent_vfio_inconsistencies_total",
            "VFIO backends: kernel calls that failed after the registry changed and could not be "
            "rolled back, and failed closes of released containers.",
            MetricType::Counter, static_cast<double>(status.vfio_inconsistencies));
  // Ownership: who may call, and each VMM's final cleanup.
  AddScalars(
      out,
      {
          {"dmapin_agent_permission_denied_total",
           "Calls refused with EPERM because the caller does not own the context (DMA calls), is "
           "neither its owner nor a manager (control calls), or is a TCP peer making a DMA call.",
           MetricType::Counter, status.permission_denied},
          {"dmapin_agent_owner_exit_teardowns_total",
           "Contexts torn down because the VMM that owns them exited (their containers released, "
           "every page they pinned unpinned).",
           MetricType::Counter, status.owner_exit_teardowns},
          {"dmapin_agent_owner_exits_at_recovery_total",
           "Contexts torn down at start because their VMM exited while the agent was down.",
           MetricType::Counter, status.owner_exits_at_recovery},
          {"dmapin_agent_memory_lost_at_recovery_total",
           "Contexts torn down at start because their VMM's memory could not be mapped again (it "
           "no longer maps the same object at the same address).",
           MetricType::Counter, status.memory_lost_at_recovery},
          {"dmapin_agent_limit_refusals_total",
           "Creations and registrations refused (ENOSPC) for a count limit: --max_contexts, "
           "--max_contexts_per_owner, --max_containers, --max_regions_per_context.",
           MetricType::Counter, status.limit_refusals},
          // Restarts (README, "What happens when the agent dies").
          {"dmapin_agent_containers_reopened_at_recovery_total",
           "VFIO containers opened again at start because their VMM did not hold them: the "
           "kernel dropped their DMA mappings while the agent was down (made again since).",
           MetricType::Counter, status.containers_reopened_at_recovery},
          {"dmapin_agent_containers_awaiting_adoption",
           "VFIO containers whose VMM holds them across the agent's restart and has not given "
           "their descriptor back yet: their DMA works, their registrations and maps answer "
           "EAGAIN.",
           MetricType::Gauge, status.containers_awaiting_adoption},
          {"dmapin_agent_containers_adopted_total",
           "VFIO containers taken back from their VMM after a restart without unmapping "
           "anything.",
           MetricType::Counter, status.containers_adopted},
          {"dmapin_agent_adoption_inconsistencies_total",
           "Registrations and mappings the store recorded that the kernel did not have as "
           "recorded when their container was taken back (each made again).",
           MetricType::Counter, status.adoption_inconsistencies},
      });
  if (options_.store != nullptr) {
    const StoreStats store = options_.store->stats();
    AddScalars(
        out,
        {
            {"dmapin_agent_store_commits_total", "Successful commits of the state store.",
             MetricType::Counter, store.commits},
            {"dmapin_agent_store_failed_commits_total",
             "Commits of the state store that were rejected, rolled back or failed.",
             MetricType::Counter, store.failed_commits},
            {"dmapin_agent_store_transactions_total",
             "SQLite transactions of the state store; fewer than commits when concurrent commits "
             "were grouped into one transaction.",
             MetricType::Counter, store.transactions},
            {"dmapin_agent_store_rows_written_total",
             "Rows inserted, updated or deleted by successful state-store commits.",
             MetricType::Counter, store.rows_written},
            {"dmapin_agent_store_journal_records_total",
             "DMA map/unmap changes made durable by one append to the mapping journal.",
             MetricType::Counter, store.journal_records},
            {"dmapin_agent_store_journal_failed_records_total",
             "Mapping-journal appends that were refused or failed to write.", MetricType::Counter,
             store.journal_failed_records},
            {"dmapin_agent_store_journal_folds_total",
             "Transactions that folded mapping-journal records into the state database.",
             MetricType::Counter, store.journal_folds},
            {"dmapin_agent_store_journal_records_folded_total",
             "Mapping-journal records applied to the state database.", MetricType::Counter,
             store.journal_records_folded},
            {"dmapin_agent_store_journal_records_coalesced_total",
             "Folded mapping-journal records made moot by a later record of the same fold (a "
             "map and its unmap), so never written to the state database.",
             MetricType::Counter, store.journal_records_coalesced},
            {"dmapin_agent_store_journal_records_skipped_total",
             "Mapping-journal records of containers deleted before the fold reached them.",
             MetricType::Counter, store.journal_records_skipped},
            {"dmapin_agent_store_journal_torn_tail_bytes",
             "Bytes of a torn last mapping-journal record found at start (a power loss or a "
             "failed write in the previous run).",
             MetricType::Gauge, store.journal_torn_tail_bytes},
            {"dmapin_agent_store_recovery_journal_files_set_aside",
             "Damaged mapping-journal files set aside at start (--recover_damaged_state).",
             MetricType::Gauge, store.journal_damaged_files},
            {"dmapin_agent_store_recovery_journal_records_dropped",
             "Well-formed mapping-journal records after damage, dropped at start "
             "(--recover_damaged_state): acknowledged DMA mappings this node lost.",
             MetricType::Gauge, store.journal_damaged_records_dropped},
            {"dmapin_agent_store_recovery_state_set_aside",
             "1 when a damaged or lost state.db was set aside at start and the node started "
             "empty (--recover_damaged_state).",
             MetricType::Gauge, store.state_set_aside},
        });
  }

  // The registry's counters, as listed in common/registry_counters.h.
  const RegistryStats& c = status.counters;
#define DMAPIN_AGENT_COUNTER(field, metric, agent_help, ...)              \
  AddScalar(out, "dmapin_agent_" metric, agent_help, MetricType::Counter, \
            static_cast<double>(c.field));
  DMAPIN_REGISTRY_COUNTERS(DMAPIN_AGENT_COUNTER, DMAPIN_AGENT_COUNTER)
#undef DMAPIN_AGENT_COUNTER

  FamilyBuilder locked("dmapin_agent_context_locked_bytes", "Bytes the context has pinned.",
                       MetricType::Gauge);
  FamilyBuilder context_regions("dmapin_agent_context_regions",
                                "Regions registered in the context.", MetricType::Gauge);
  FamilyBuilder context_users("dmapin_agent_context_region_users",
                              "Sum of the use counts (holding registrations) of the context's "
                              "regions.",
                              MetricType::Gauge);
  FamilyBuilder context_installed("dmapin_agent_context_installed_mappings",
                                  "IOMMU entries installed on the context's regions (sum of "
                                  "mapped - 1).",
                                  MetricType::Gauge);
  FamilyBuilder context_containers("dmapin_agent_context_containers",
                                   "Containers bound to the context.", MetricType::Gauge);
  FamilyBuilder limit("dmapin_agent_context_memlock_limit_bytes",
                      "The context's memlock limit (RLIMIT_MEMLOCK); absent when unlimited.",
                      MetricType::Gauge);
  FamilyBuilder unlimited("dmapin_agent_context_memlock_unlimited",
                          "1 when the context's memlock limit is unlimited.", MetricType::Gauge);
  for (const ContextView& context : contexts) {
    if (context.name.empty()) continue;  // torn down while we listed
    const std::vector<ClientMetric::Label> labels = {{"context", context.name}};
    const ContextSums sums = by_context[context.name];
    locked.Add(static_cast<double>(context.locked_bytes), labels);
    context_regions.Add(static_cast<double>(context.regions), labels);
    context_users.Add(static_cast<double>(sums.users), labels);
    context_installed.Add(static_cast<double>(sums.installed), labels);
    context_containers.Add(static_cast<double>(context.containers.size()), labels);
    const bool is_unlimited = !context.spec.memlock_limit_bytes.has_value();
    if (!is_unlimited) limit.Add(static_cast<double>(*context.spec.memlock_limit_bytes), labels);
    unlimited.Add(is_unlimited ? 1 : 0, labels);
  }
  locked.MoveTo(out);
  context_regions.MoveTo(out);
  context_users.MoveTo(out);
  context_installed.MoveTo(out);
  context_containers.MoveTo(out);
  limit.MoveTo(out);
  unlimited.MoveTo(out);

  FamilyBuilder pinned("dmapin_agent_container_pinned_bytes",
                       "Bytes of the regions the container holds (pinned for it).",
                       MetricType::Gauge);
  FamilyBuilder container_regions("dmapin_agent_container_regions", "Regions the container holds.",
                                  MetricType::Gauge);
  FamilyBuilder container_users("dmapin_agent_container_region_users",
                                "Sum of the use counts of the regions the container holds.",
                                MetricType::Gauge);
  FamilyBuilder container_installed("dmapin_agent_container_installed_mappings",
                                    "IOMMU entries installed in the container.", MetricType::Gauge);
  for (const ContainerView& container : containers) {
    if (container.name.empty()) continue;  // released while we listed
    const std::vector<ClientMetric::Label> labels = {{"container", container.name},
                                                     {"context", container.context}};
    const ContainerSums sums = by_container[container.name];
    pinned.Add(static_cast<double>(sums.pinned_bytes), labels);
    container_regions.Add(static_cast<double>(container.held_regions), labels);
    container_users.Add(static_cast<double>(sums.users), labels);
    container_installed.Add(static_cast<double>(container.installed_entries), labels);
  }
  pinned.MoveTo(out);
  container_regions.MoveTo(out);
  container_users.MoveTo(out);
  container_installed.MoveTo(out);

  if (options_.listener != nullptr) AddConnectionMetrics(out, "dmapin_agent_", *options_.listener);
  if (options_.memory_socket != nullptr) {
    // The memory socket's connections and its refusals of malformed records.
    const MemorySocketStats socket = options_.memory_socket->stats();
    AddScalars(
        out,
        {
            {"dmapin_agent_memory_socket_connections", "Open connections of the memory socket.",
             MetricType::Gauge, socket.open_connections},
            {"dmapin_agent_memory_socket_connections_total",
             "Connections the memory socket accepted.", MetricType::Counter, socket.connections},
            {"dmapin_agent_memory_socket_refused_connections_total",
             "Connections the memory socket closed at once: its connection limit was reached.",
             MetricType::Counter, socket.refused_connections},
            {"dmapin_agent_memory_socket_requests_total", "Records the memory socket answered.",
             MetricType::Counter, socket.requests},
            {"dmapin_agent_memory_socket_bad_requests_total",
             "Records refused before the handler: malformed, too large, too many descriptors.",
             MetricType::Counter, socket.bad_requests},
        });
  }
  AddProcessMetrics(out);
  return out;
}

}  // namespace dmapin::agent
