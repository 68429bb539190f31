// ServerCore: the central service's brain. It holds the fleet policy and the admins' intents
// (durable in a ServerStore before any answer), what every agent reports (FleetState), and a
// level-triggered reconciler that compares the two and sends decisions to the agents, retrying
// EBUSY with backoff. The gRPC services only translate to and from it.
#ifndef DMAPIN_SERVER_CORE_SERVER_CORE_H_
#define DMAPIN_SERVER_CORE_SERVER_CORE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "dmapin/v1/admin.pb.h"
#include "dmapin/v1/control.pb.h"
#include "server/core/event_fanout.h"
#include "server/core/reconcile_loop.h"
#include "server/core/requirements.h"
#include "server/fleet/fleet_state.h"
#include "server/policy/policy.h"
#include "server/store/server_store.h"

namespace dmapin::server {

// One agent's control stream, as the core sees it.
class AgentSession {
 public:
  virtual ~AgentSession() = default;
  // Queues a message for the agent; never blocks. False once the stream is gone.
  virtual bool Send(const v1::ServerMessage& message) = 0;
};

struct ServerCoreOptions {
  ServerStore* store = nullptr;  // not owned
  absl::Duration reconcile_interval = absl::Milliseconds(20);
  // A decision without a result after this long is considered lost; the intent is re-evaluated.
  absl::Duration decision_timeout = absl::Seconds(30);
  // Decisions of an intent in a row that may end without a result (timed out, or the agent's
  // session ended while applying it) before the intent FAILS; 0: never. Between such attempts
  // the server waits lost_decision_backoff, doubled per loss up to the policy's max backoff.
  uint32_t max_lost_decision_attempts = 3;
  absl::Duration lost_decision_backoff = absl::Seconds(1);
  uint64_t report_interval_ms = 1000;
  uint64_t random_seed = 0;  // 0: from the clock
  // Decision records kept for ListDecisions (the newest; those in flight are always kept). Older
  // ones are pruned every prune_interval, so the store does not grow without bound. 0: keep all.
  uint64_t decision_history = 100000;
  // Finished intents (FAILED, WITHDRAWN, SUPERSEDED) kept for ListIntents, the newest; older
  // ones are forgotten (memory and store) every prune_interval. 0: keep all.
  uint64_t intent_history = 10000;
  absl::Duration prune_interval = absl::Minutes(1);
  // ListNodes builds its answer in chunks, each under one hold of the core's lock: at most this
  // many nodes, and no longer than list_nodes_max_hold. Each acquisition may wait behind a
  // commit, so fewer, bounded chunks answer sooner than many small ones.
  size_t list_nodes_chunk = 4096;
  absl::Duration list_nodes_max_hold = absl::Milliseconds(2);
  // Tests: called between ListNodes' chunks, without the core's lock.
  std::function<void()> between_list_chunks;
  // WatchEvents bounds: subscriptions open at once (more are refused with ENOSPC); events one
  // subscriber may have queued before it is dropped; bytes queued for all subscribers together
  // (when full, the subscriber furthest behind is dropped). A dropped subscriber's stream ends
  // with RESOURCE_EXHAUSTED "ENOBUFS: ... fell N events behind; reconnect".
  size_t max_watchers = 256;
  // Most policies at once (--max_policies): SetPolicy of another name beyond it answers ENOSPC
  // (RESOURCE_EXHAUSTED), counted; every intent and node is matched against all of them.
  size_t max_policies = 1024;
  size_t watch_max_lag_events = 10000;
  uint64_t watch_buffer_bytes = 64ull << 20;
};

// Counters of the control plane, for metrics.
struct ServerCounters {
  std::map<std::string, uint64_t> decisions_sent;    // by kind
  std::map<std::string, uint64_t> decision_results;  // by "kind/RESULT" (RESULT = OK or errno)
  uint64_t ebusy_retries = 0;
  uint64_t decisions_timed_out = 0;
  // SetPolicy refused for --max_policies.
  uint64_t policy_limit_refusals = 0;
  // Decisions in flight when the agent's session ended or a new one replaced it.
  uint64_t decisions_session_lost = 0;
  // Intents FAILED after max_lost_decision_attempts decisions in a row without a result.
  uint64_t intents_failed_lost_decisions = 0;
  uint64_t stream_messages_received = 0;
  uint64_t stream_messages_sent = 0;
  uint64_t agent_connects = 0;
  uint64_t agent_disconnects = 0;
  // WatchEvents: subscriptions dropped for falling behind (by reason: "lag", past
  // watch_max_lag_events, or "buffer", when all queues together were full), the events their
  // queues held then, and subscriptions refused beyond max_watchers.
  std::map<std::string, uint64_t> watchers_dropped;
  uint64_t events_dropped = 0;
  uint64_t watchers_refused = 0;
  uint64_t watchers = 0;              // open now
  uint64_t watch_buffered_bytes = 0;  // queued for them now
  uint64_t store_failures = 0;
  uint64_t reconcile_passes = 0;
  uint64_t decisions_pruned = 0;  // decision records deleted by the history limit
  uint64_t intents_pruned = 0;    // finished intents forgotten by the history limit
  // Reconcile pass durations in seconds, bucketed by the metrics layer.
  std::vector<double> reconcile_seconds_recent;
};

// A consistent copy of what metrics export.
struct FleetMetricsSnapshot {
  struct NodeMetrics {
    std::string name;
    bool connected = false;
    uint64_t pinned_bytes = 0;
    uint64_t regions = 0;
    uint64_t used_sum = 0;
    uint64_t installed_mappings = 0;
    uint64_t required_bytes = 0;
    uint64_t budget_bytes = 0;
    uint64_t budget_used_bytes = 0;
    v1::RegistryCounters counters;
    std::vector<v1::Context> contexts;
    std::vector<v1::Container> containers;
    std::vector<v1::Region> regions_detail;  // bounded by the caller's per-region cap
  };
  std::vector<NodeMetrics> nodes;
  std::map<std::string, uint64_t> intents_by_state;
  double oldest_pending_intent_seconds = 0;
  uint64_t agents_connected = 0;
  ServerCounters counters;
};

class ServerCore {
 public:
  static absl::StatusOr<std::unique_ptr<ServerCore>> Create(ServerCoreOptions options);
  ~ServerCore();

  uint64_t epoch() const { return epoch_; }

  // --- Control streams -----------------------------------------------------------------------
  // A stream said hello; replaces any older session of the node.
  v1::Welcome AgentConnected(const v1::Hello& hello, std::shared_ptr<AgentSession> session);
  // A message of an established session (ignored if the session was replaced since).
  void AgentMessage(const std::string& node, const AgentSession* session,
                    const v1::AgentMessage& message);
  void AgentDisconnected(const std::string& node, const AgentSession* session);

  // --- Admin ---------------------------------------------------------------------------------
  absl::StatusOr<v1::Policy> SetPolicy(v1::Policy policy);
  absl::StatusOr<v1::Policy> GetPolicy(const std::string& name) const;
  std::vector<v1::Policy> ListPolicies() const;
  absl::Status DeletePolicy(const std::string& name);

  absl::StatusOr<v1::CreateIntentResponse> CreateIntent(const v1::CreateIntentRequest& request);
  absl::StatusOr<v1::Intent> GetIntent(const std::string& id) const;
  absl::StatusOr<v1::ListIntentsResponse> ListIntents(const v1::ListIntentsRequest& request) const;
  absl::StatusOr<v1::Intent> WithdrawIntent(const std::string& id);

  std::vector<v1::Node> ListNodes() const;
  absl::StatusOr<v1::Node> GetNode(const std::string& name) const;
  absl::StatusOr<v1::Node> SetCordon(const std::string& name, bool cordoned);
  absl::StatusOr<v1::Node> DrainNode(const std::string& name);

  absl::StatusOr<v1::ListRegionsFleetResponse> ListRegions(
      const v1::ListRegionsFleetRequest& request) const;
  absl::StatusOr<v1::FleetRegion> GetRegion(const v1::GetRegionFleetRequest& request) const;
  absl::StatusOr<v1::ListDecisionsResponse> ListDecisions(
      const v1::ListDecisionsRequest& request) const;

  // ENOSPC beyond options.max_watchers subscriptions.
  absl::StatusOr<std::shared_ptr<EventSubscription>> Subscribe(const std::string& node_filter);

  // --- Metrics and tests ---------------------------------------------------------------------
  FleetMetricsSnapshot MetricsSnapshot(size_t max_regions) const;
  // Runs one reconcile pass now (the background loop also runs them).
  void ReconcileNow();

 private:
  struct IntentEntry {
    v1::Intent intent;
    v1::EbusyRetry retry;
    absl::Time next_attempt = absl::InfinitePast();
    std::string inflight_decision;
    absl::Time inflight_since;
    // The node's report count when the agent confirmed the intent; a later report that
    // disagrees means the state diverged.
    uint64_t reports_at_result = 0;
    // The node's confirmations when the intent was admitted: it is satisfied without a decision
    // only by a state the agent confirmed after that.
    uint64_t confirmations_at_creation = 0;
    // The agent incarnation the in-flight decision went to.
    std::string inflight_incarnation;
    // Of intent.lost_attempts(): how many timed out, how many ended with the agent's session,
    // and of those after how many a new agent incarnation connected (the agent restarted while
    // applying it). Not durable: after a server restart the earlier losses are of unknown cause.
    uint32_t lost_timeouts = 0;
    uint32_t lost_sessions = 0;
    uint32_t lost_restarts = 0;
    // The incarnation of a session that ended with this intent's decision in flight, until the
    // node's next Hello tells whether the agent restarted.
    std::string lost_incarnation;
  };
  enum class Loss { kTimeout, kSessionEnded };
  // A result came, or the intent holds: the losses in a row start again from 0.
  static void ResetLost(IntentEntry& entry);
  // What AddIntentLocked changed, so that a failed commit can put memory back as it was
  // without copying every intent beforehand.
  struct IntentUndo {
    std::vector<std::pair<std::string, IntentEntry>> replaced;        // previous versions, in order
    std::vector<std::pair<std::string, std::string>> inflight;        // erased inflight_ entries
    std::vector<std::pair<std::string, v1::DecisionRecord>> records;  // and their records
    std::vector<std::string> added;                                   // new intent ids, in order
  };
  struct DrainState {
    bool active = false;
    absl::Time started;
    absl::Time finished;
    uint64_t regions_total = 0;
  };

  explicit ServerCore(ServerCoreOptions options);
  absl::Status Load();

  void ReconcileLocked(
      absl::Time now, ServerMutation* mutation,
      std::vector<std::pair<std::shared_ptr<AgentSession>, v1::ServerMessage>>* outbox)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One intent of a pass; false when the store failed (the pass stops there).
  bool ReconcileIntentLocked(
      const std::string& id, IntentEntry& entry, absl::Time now, ServerMutation* mutation,
      std::vector<std::pair<std::shared_ptr<AgentSession>, v1::ServerMessage>>* outbox)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HandleResultLocked(const std::string& node, const v1::DecisionResult& result, absl::Time now,
                          ServerMutation* mutation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The entry's in-flight decision will get no result: forgets it, counts the loss, backs off.
  void LoseDecisionLocked(IntentEntry& entry, Loss loss, absl::Time now, ServerMutation* mutation)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The in-flight decisions of the node's intents, on its session ending or being replaced.
  void LoseNodeDecisionsLocked(const std::string& node, absl::Time now, ServerMutation* mutation)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CommitLocked(const ServerMutation& mutation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetStateLocked(IntentEntry& entry, v1::IntentState state, absl::Time now,
                      ServerMutation* mutation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool SatisfiedLocked(const v1::Intent& intent, const NodeReport& node) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // New intent: supersedes what it replaces, is stored and announced.
  // With `undo`, records what it changes for RollbackLocked.
  absl::StatusOr<v1::Intent> AddIntentLocked(const v1::CreateIntentRequest& request,
                                             const v1::EbusyRetry& retry, absl::Time now,
                                             ServerMutation* mutation, IntentUndo* undo = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RollbackLocked(IntentUndo& undo) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The ids of `node`'s intents (any state), oldest first.
  const std::vector<std::string>& NodeIntentsLocked(const std::string& node) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Admission's facts from the running totals of requirements_, in O(policies + log): the
  // node's sums, and whether `asked` (a region, and its context) is required already.
  NodeFacts FactsLocked(const std::string& node, const RegionKey& asked = RegionKey()) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Every pool's required bytes, from the running totals: O(policies).
  FleetFacts PoolFactsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Counts or uncounts intent `id` in requirements_ as it is (or is not) a live REGISTER now;
  // call after any change of an intent's state and after putting an entry back.
  void UpdateRequirementLocked(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A report changed the node's regions.
  void ApplyRegionChangesLocked(const std::string& node, const RegionChanges& changes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // O(log nodes + the node's pools), whatever the fleet and the node hold; `node`: its report.
  v1::Node NodeViewLocked(const std::string& name, const NodeReport* node) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::Node NodeViewLocked(const std::string& name) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool NodeKnownLocked(const std::string& name) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The intents on `context` of `node` that are still pursued, after its VMM exited: withdrawn.
  void WithdrawIntentsOfEndedContextLocked(const std::string& node, const std::string& context,
                                           absl::Time now, ServerMutation* mutation)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EmitLocked(const std::string& type, const std::string& node, const std::string& intent_id,
                  const std::string& decision_id, const std::string& result,
                  const std::string& message, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AddDrainIntentsLocked(const std::string& node, absl::Time now, ServerMutation* mutation,
                             IntentUndo* undo = nullptr) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<std::string> PoliciesSnapshotLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<v1::Policy> PolicyListLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ServerCoreOptions options_;
  uint64_t epoch_ = 0;
  // WatchEvents subscriptions; its own lock, taken inside mu_ when publishing.
  EventFanout events_;

  mutable Mutex mu_;
  std::map<std::string, v1::Policy> policies_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, IntentEntry> intents_ ABSL_GUARDED_BY(mu_);
  // Intent ids by node, in creation order: what concerns one node without scanning every
  // intent. Intents are never forgotten, so ids are only appended (and removed by a rollback).
  std::map<std::string, std::vector<std::string>> node_intents_ ABSL_GUARDED_BY(mu_);
  // What a reconcile pass looks at besides a periodic full pass (see ReconcileLocked): intents
  // that may need attention without news from their node (a superset of the pending, applying
  // and retrying ones), and nodes that reported, connected or disconnected since the last pass.
  static constexpr absl::Duration kFullPassInterval = absl::Seconds(1);
  std::set<std::string> active_intents_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> dirty_nodes_ ABSL_GUARDED_BY(mu_);
  // Nodes with intents waiting for a confirmation newer than themselves: their next heartbeat
  // makes them dirty (other heartbeats wake nothing).
  std::set<std::string> awaiting_confirmation_ ABSL_GUARDED_BY(mu_);
  absl::Time last_full_pass_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  std::map<std::string, NodeAdminState> node_admin_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, DrainState> drains_ ABSL_GUARDED_BY(mu_);
  FleetState fleet_ ABSL_GUARDED_BY(mu_);
  // What the nodes require (reported regions and live REGISTER intents), per node and per pool,
  // kept as both change; requiring_ holds the intents counted there, with their node and region.
  Requirements requirements_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::pair<std::string, RegionKey>> requiring_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<AgentSession>> sessions_ ABSL_GUARDED_BY(mu_);
  // Decision id -> intent id, for decisions sent and not yet answered.
  std::map<std::string, std::string> inflight_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, v1::DecisionRecord> inflight_records_ ABSL_GUARDED_BY(mu_);
  ServerCounters counters_ ABSL_GUARDED_BY(mu_);
  std::mt19937_64 rng_ ABSL_GUARDED_BY(mu_);
  uint64_t intent_sequence_ ABSL_GUARDED_BY(mu_) = 0;  // creation order for stable listing

  // Deletes decision records beyond options_.decision_history and finished intents beyond
  // options_.intent_history (from the loop's thread).
  void PruneDecisionHistory();
  void PruneFinishedIntents();
  // Asks the loop for a pass now.
  void Wake();
  // Last: destroyed (its thread joined) before the state its passes use.
  std::unique_ptr<ReconcileLoop> loop_;
};

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_CORE_SERVER_CORE_H_
