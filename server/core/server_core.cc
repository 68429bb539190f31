#include "server/core/server_core.h"

#include <algorithm>
#include <cerrno>
#include <limits>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/errno_status.h"
#include "server/core/server_core_internal.h"

namespace dmapin::server {
using server_core_internal::IntentNumber;
using server_core_internal::kDrainLabel;
using server_core_internal::KeyOfIntent;
using server_core_internal::KeyOfRequest;
using server_core_internal::KindName;
using server_core_internal::Live;
using server_core_internal::Pursued;
using server_core_internal::RegionToken;
using server_core_internal::Rfc3339;

// --- Construction and loading -----------------------------------------------------------------

ServerCore::ServerCore(ServerCoreOptions options)
    : options_(options),
      events_(EventFanoutOptions{.max_watchers = options.max_watchers,
                                 .watch_max_lag_events = options.watch_max_lag_events,
                                 .watch_buffer_bytes = options.watch_buffer_bytes}) {
  rng_.seed(options_.random_seed != 0 ? options_.random_seed
                                      : static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())));
}

absl::StatusOr<std::unique_ptr<ServerCore>> ServerCore::Create(ServerCoreOptions options) {
  if (options.store == nullptr) return absl::InvalidArgumentError("ServerCore needs a store");
  std::unique_ptr<ServerCore> core(new ServerCore(options));
  if (absl::Status status = core->Load(); !status.ok()) return status;
  ServerCore* raw = core.get();
  core->loop_ = std::make_unique<ReconcileLoop>(
      options.reconcile_interval, [raw] { raw->ReconcileNow(); }, options.prune_interval,
      [raw] { raw->PruneDecisionHistory(); });
  return core;
}

ServerCore::~ServerCore() {
  loop_.reset();  // no pass runs once the members go
}

absl::Status ServerCore::Load() {
  absl::StatusOr<uint64_t> epoch = options_.store->BumpEpoch();
  if (!epoch.ok()) return epoch.status();
  epoch_ = *epoch;
  MutexLock lock(&mu_);
  absl::StatusOr<std::vector<v1::Policy>> policies = options_.store->LoadPolicies();
  if (!policies.ok()) return policies.status();
  for (v1::Policy& policy : *policies) policies_[policy.name()] = std::move(policy);
  requirements_.SetPolicies(PolicyListLocked());
  absl::StatusOr<std::vector<v1::Intent>> intents = options_.store->LoadIntents();
  if (!intents.ok()) return intents.status();
  for (v1::Intent& intent : *intents) {
    IntentEntry entry;
    // Whatever was in flight before the restart is re-evaluated against fresh snapshots.
    if (intent.state() == v1::INTENT_STATE_APPLYING) {
      intent.set_state(v1::INTENT_STATE_PENDING);
    }
    entry.intent = std::move(intent);
    entry.retry = MergeRetrySettings(PolicyListLocked());
    const std::string id = entry.intent.id();
    node_intents_[entry.intent.node()].push_back(id);
    intents_[id] = std::move(entry);
    UpdateRequirementLocked(id);
    ++intent_sequence_;
  }
  absl::StatusOr<std::vector<NodeAdminState>> nodes = options_.store->LoadNodeStates();
  if (!nodes.ok()) return nodes.status();
  for (NodeAdminState& state : *nodes) {
    if (state.drain_active) {
      DrainState& drain = drains_[state.name];
      drain.active = true;
      absl::Time started;
      std::string error;
      if (absl::ParseTime(absl::RFC3339_full, state.drain_started, &started, &error)) {
        drain.started = started;
      }
    }
    node_admin_[state.name] = std::move(state);
  }
  return absl::OkStatus();
}

absl::Status ServerCore::CommitLocked(const ServerMutation& mutation) {
  if (mutation.empty()) return absl::OkStatus();
  absl::Status status = options_.store->Commit(mutation);
  if (!status.ok()) ++counters_.store_failures;
  return status;
}

void ServerCore::Wake() {
  if (loop_ != nullptr) loop_->Wake();
}

void ServerCore::PruneFinishedIntents() {
  if (options_.intent_history == 0) return;
  MutexLock lock(&mu_);
  // Finished intents by number, oldest first; those beyond the newest intent_history go.
  std::vector<std::pair<uint64_t, std::string>> finished;
  for (const auto& [id, entry] : intents_) {
    switch (entry.intent.state()) {
      case v1::INTENT_STATE_FAILED:
      case v1::INTENT_STATE_WITHDRAWN:
      case v1::INTENT_STATE_SUPERSEDED:
        if (entry.inflight_decision.empty()) finished.emplace_back(IntentNumber(id), id);
        break;
      default:
        break;
    }
  }
  if (finished.size() <= options_.intent_history) return;
  const size_t excess = finished.size() - options_.intent_history;
  std::nth_element(finished.begin(), finished.begin() + excess, finished.end());
  finished.resize(excess);
  ServerMutation mutation;
  for (const auto& [number, id] : finished) mutation.DeleteIntent(id);
  // Memory forgets them only once the store did: a restart must not bring them back.
  if (!CommitLocked(mutation).ok()) return;
  absl::flat_hash_set<std::string> gone;
  for (auto& [number, id] : finished) {
    auto it = intents_.find(id);
    gone.insert(id);
    active_intents_.erase(id);
    intents_.erase(it);
  }
  for (auto& [node, ids] : node_intents_) {
    ids.erase(std::remove_if(ids.begin(), ids.end(),
                             [&gone](const std::string& id) { return gone.count(id) > 0; }),
              ids.end());
  }
  counters_.intents_pruned += gone.size();
}

void ServerCore::PruneDecisionHistory() {
  PruneFinishedIntents();
  if (options_.decision_history == 0) return;
  // The store is thread-safe: no need to hold mu_ (and stall the control plane) while it deletes.
  absl::StatusOr<uint64_t> pruned = options_.store->PruneDecisions(options_.decision_history);
  MutexLock lock(&mu_);
  if (pruned.ok()) {
    counters_.decisions_pruned += *pruned;
  } else {
    ++counters_.store_failures;
  }
}

// --- Control streams --------------------------------------------------------------------------

v1::Welcome ServerCore::AgentConnected(const v1::Hello& hello,
                                       std::shared_ptr<AgentSession> session) {
  const absl::Time now = absl::Now();
  MutexLock lock(&mu_);
  const NodeReport* before = fleet_.Find(hello.node_name());
  const bool restarted = before == nullptr || before->hello.incarnation() != hello.incarnation();
  fleet_.Connect(hello, now);
  requirements_.SetLabels(hello.node_name(), std::map<std::string, std::string>(
                                                 hello.labels().begin(), hello.labels().end()));
  dirty_nodes_.insert(hello.node_name());
  sessions_[hello.node_name()] = std::move(session);
  ++counters_.agent_connects;
  // Answers to decisions sent on an older stream will not come: re-evaluate after the snapshot.
  ServerMutation mutation;
  LoseNodeDecisionsLocked(hello.node_name(), now, &mutation);
  // Decisions lost with an earlier session: a new incarnation means the agent restarted.
  for (const std::string& id : NodeIntentsLocked(hello.node_name())) {
    IntentEntry& entry = intents_.at(id);
    if (entry.lost_incarnation.empty()) continue;
    if (entry.lost_incarnation != hello.incarnation()) ++entry.lost_restarts;
    entry.lost_incarnation.clear();
  }
  CommitLocked(mutation).IgnoreError();  // counted in store_failures; the intents are rewritten
  EmitLocked("node_connected", hello.node_name(), "", "", "",
             restarted ? "new agent incarnation" : "reconnected", now);
  v1::Welcome welcome;
  welcome.set_server_epoch(epoch_);
  welcome.set_report_interval_ms(options_.report_interval_ms);
  return welcome;
}

void ServerCore::AgentMessage(const std::string& node, const AgentSession* session,
                              const v1::AgentMessage& message) {
  const absl::Time now = absl::Now();
  bool wake = false;
  {
    MutexLock lock(&mu_);
    auto current = sessions_.find(node);
    if (current == sessions_.end() || current->second.get() != session) return;
    ++counters_.stream_messages_received;
    ServerMutation mutation;
    switch (message.body_case()) {
      case v1::AgentMessage::kSnapshot:
        ApplyRegionChangesLocked(node, fleet_.ApplySnapshot(node, message.snapshot(), now));
        awaiting_confirmation_.erase(node);
        dirty_nodes_.insert(node);
        wake = true;
        break;
      case v1::AgentMessage::kDelta:
        ApplyRegionChangesLocked(node, fleet_.ApplyDelta(node, message.delta(), now));
        for (const v1::EndedContext& ended : message.delta().ended_contexts()) {
          EmitLocked("vmm_exited", node, "", "", "",
                     absl::StrFormat("context %s: its VMM (pid %d) exited; the agent tore the "
                                     "context down, released its containers and unpinned %d "
                                     "bytes",
                                     ended.context(), ended.owner_pid(), ended.unpinned_bytes()),
                     now);
          WithdrawIntentsOfEndedContextLocked(node, ended.context(), now, &mutation);
        }
        awaiting_confirmation_.erase(node);
        dirty_nodes_.insert(node);
        wake = true;
        break;
      case v1::AgentMessage::kResult:
        HandleResultLocked(node, message.result(), now, &mutation);
        dirty_nodes_.insert(node);
        wake = true;
        break;
      case v1::AgentMessage::kHeartbeat:
        fleet_.Confirm(node, now);
        if (awaiting_confirmation_.erase(node) > 0) {
          dirty_nodes_.insert(node);
          wake = true;
        }
        break;
      default:
        fleet_.Touch(node, now);
        break;
    }
    CommitLocked(mutation).IgnoreError();  // counted in store_failures; the next pass retries
  }
  if (wake) Wake();
}

void ServerCore::AgentDisconnected(const std::string& node, const AgentSession* session) {
  const absl::Time now = absl::Now();
  MutexLock lock(&mu_);
  auto current = sessions_.find(node);
  if (current == sessions_.end() || current->second.get() != session) return;
  sessions_.erase(current);
  fleet_.Disconnect(node, now);
  dirty_nodes_.insert(node);
  ++counters_.agent_disconnects;
  ServerMutation mutation;
  LoseNodeDecisionsLocked(node, now, &mutation);
  CommitLocked(mutation).IgnoreError();  // counted in store_failures; the intents are rewritten
  EmitLocked("node_disconnected", node, "", "", "", "", now);
}

// --- Events -----------------------------------------------------------------------------------

void ServerCore::EmitLocked(const std::string& type, const std::string& node,
                            const std::string& intent_id, const std::string& decision_id,
                            const std::string& result, const std::string& message, absl::Time now) {
  if (!events_.HasSubscribers()) return;  // no event is built that nobody reads
  auto event = std::make_shared<v1::Event>();
  event->set_time(Rfc3339(now));
  event->set_type(type);
  event->set_node(node);
  event->set_intent_id(intent_id);
  event->set_decision_id(decision_id);
  event->set_result(result);
  event->set_message(message);
  // Published under mu_: watchers see events in the order the core's changes happened.
  events_.Publish(std::move(event));
}

absl::StatusOr<std::shared_ptr<EventSubscription>> ServerCore::Subscribe(
    const std::string& node_filter) {
  return events_.Subscribe(node_filter);
}

// --- Policies ---------------------------------------------------------------------------------

std::vector<v1::Policy> ServerCore::PolicyListLocked() const {
  std::vector<v1::Policy> list;
  for (const auto& [name, policy] : policies_) list.push_back(policy);
  return list;
}

absl::StatusOr<v1::Policy> ServerCore::SetPolicy(v1::Policy policy) {
  if (absl::Status status = ValidatePolicy(policy); !status.ok()) return status;
  const absl::Time now = absl::Now();
  MutexLock lock(&mu_);
  auto existing = policies_.find(policy.name());
  if (existing == policies_.end() && policies_.size() >= options_.max_policies) {
    ++counters_.policy_limit_refusals;
    return ErrnoStatus(ENOSPC,
                       absl::StrFormat("policy \"%s\": %d policies exist, at most %d "
                                       "(--max_policies); delete one first",
                                       policy.name(), policies_.size(), options_.max_policies));
  }
  policy.set_revision(existing == policies_.end() ? 1 : existing->second.revision() + 1);
  policy.set_update_time(Rfc3339(now));
  ServerMutation mutation;
  mutation.PutPolicy(policy);
  if (absl::Status status = CommitLocked(mutation); !status.ok()) return status;
  policies_[policy.name()] = policy;
  const std::vector<v1::Policy> list = PolicyListLocked();
  requirements_.SetPolicies(list);
  // New retry settings apply to the intents from now on.
  for (auto& [id, entry] : intents_) {
    const NodeReport* node = fleet_.Find(entry.intent.node());
    std::map<std::string, std::string> labels;
    if (node != nullptr) labels.insert(node->hello.labels().begin(), node->hello.labels().end());
    entry.retry = MergeRetrySettings(MatchingPolicies(list, labels));
  }
  EmitLocked("policy_set", "", "", "", "", policy.name(), now);
  return policy;
}

absl::StatusOr<v1::Policy> ServerCore::GetPolicy(const std::string& name) const {
  MutexLock lock(&mu_);
  auto it = policies_.find(name);
  if (it == policies_.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("policy \"%s\" does not exist", name));
  }
  return it->second;
}

std::vector<v1::Policy> ServerCore::ListPolicies() const {
  MutexLock lock(&mu_);
  return PolicyListLocked();
}

absl::Status ServerCore::DeletePolicy(const std::string& name) {
  MutexLock lock(&mu_);
  if (policies_.count(name) == 0) {
    return ErrnoStatus(ENOENT, absl::StrFormat("policy \"%s\" does not exist", name));
  }
  ServerMutation mutation;
  mutation.DeletePolicy(name);
  if (absl::Status status = CommitLocked(mutation); !status.ok()) return status;
  policies_.erase(name);
  requirements_.SetPolicies(PolicyListLocked());
  EmitLocked("policy_deleted", "", "", "", "", name, absl::Now());
  return absl::OkStatus();
}

// --- Intents ----------------------------------------------------------------------------------

bool ServerCore::NodeKnownLocked(const std::string& name) const {
  return fleet_.Find(name) != nullptr || node_admin_.count(name) > 0;
}

NodeFacts ServerCore::FactsLocked(const std::string& name, const RegionKey& asked) const {
  NodeFacts facts;
  facts.name = name;
  facts.known = NodeKnownLocked(name);
  auto admin = node_admin_.find(name);
  facts.cordoned = admin != node_admin_.end() && admin->second.cordoned;
  const NodeReport* node = fleet_.Find(name);
  if (node != nullptr) {
    facts.labels.insert(node->hello.labels().begin(), node->hello.labels().end());
    facts.page_size = node->hello.page_size();
    facts.physical_memory_bytes = node->hello.physical_memory_bytes();
    facts.max_region_bytes = node->hello.max_region_bytes();
    facts.max_pinned_bytes = node->hello.max_pinned_bytes();
    auto context = node->contexts.find(asked.context);
    if (context != node->contexts.end() && !context->second.memlock_unlimited() &&
        !context->second.cap_ipc_lock()) {
      facts.context_memlock_limit_bytes[asked.context] = context->second.memlock_limit_bytes();
    }
  }
  facts.required_bytes = requirements_.RequiredBytes(name);
  facts.regions = requirements_.Regions(name);
  facts.context_bytes[asked.context] = requirements_.ContextBytes(name, asked.context);
  if (requirements_.Requested(name, asked) || (node != nullptr && node->regions.count(asked) > 0)) {
    facts.required_regions.insert(RegionKey{asked.context, asked.ua, asked.size});
  }
  return facts;
}

FleetFacts ServerCore::PoolFactsLocked() const {
  FleetFacts pools;
  pools.pool_required_bytes = requirements_.PoolTotals();
  return pools;
}

void ServerCore::UpdateRequirementLocked(const std::string& id) {
  auto it = intents_.find(id);
  const bool wanted = it != intents_.end() &&
                      it->second.intent.kind() == v1::INTENT_KIND_REGISTER &&
                      Live(it->second.intent);
  auto counted = requiring_.find(id);
  if (wanted == (counted != requiring_.end())) return;
  if (wanted) {
    const v1::Intent& intent = it->second.intent;
    const RegionKey key = KeyOfIntent(intent);
    const NodeReport* node = fleet_.Find(intent.node());
    requirements_.Require(intent.node(), key, node != nullptr && node->regions.count(key) > 0);
    requiring_.emplace(id, std::make_pair(intent.node(), key));
  } else {
    requirements_.Release(counted->second.first, counted->second.second);
    requiring_.erase(counted);
  }
}

void ServerCore::ApplyRegionChangesLocked(const std::string& node, const RegionChanges& changes) {
  for (const RegionKey& key : changes.added) requirements_.Reported(node, key);
  for (const RegionKey& key : changes.removed) requirements_.Unreported(node, key);
}

const std::vector<std::string>& ServerCore::NodeIntentsLocked(const std::string& node) const {
  static const std::vector<std::string>* const kNone = new std::vector<std::string>();
  auto it = node_intents_.find(node);
  return it == node_intents_.end() ? *kNone : it->second;
}

absl::StatusOr<v1::Intent> ServerCore::AddIntentLocked(const v1::CreateIntentRequest& request,
                                                       const v1::EbusyRetry& retry, absl::Time now,
                                                       ServerMutation* mutation, IntentUndo* undo) {
  absl::StatusOr<uint64_t> number = options_.store->NextId();
  if (!number.ok()) return number.status();
  v1::Intent intent;
  intent.set_id(absl::StrCat("i-", *number));
  intent.set_kind(request.kind());
  intent.set_node(request.node());
  intent.set_context(request.context());
  intent.set_container(request.container());
  intent.set_ua(request.ua());
  intent.set_size(request.size());
  *intent.mutable_labels() = request.labels();
  intent.set_state(v1::INTENT_STATE_PENDING);
  intent.set_create_time(Rfc3339(now));
  intent.set_update_time(Rfc3339(now));
  // A later intent replaces the live ones it contradicts or repeats (on its node).
  for (const std::string& id : NodeIntentsLocked(intent.node())) {
    IntentEntry& entry = intents_.at(id);
    const v1::Intent& other = entry.intent;
    if (!Live(other)) continue;
    bool replaced = false;
    switch (intent.kind()) {
      case v1::INTENT_KIND_REGISTER:
      case v1::INTENT_KIND_UNREGISTER:
        replaced = (other.kind() == v1::INTENT_KIND_REGISTER ||
                    other.kind() == v1::INTENT_KIND_UNREGISTER) &&
                   other.container() == intent.container() &&
                   KeyOfIntent(other) == KeyOfIntent(intent);
        break;
      case v1::INTENT_KIND_RELEASE_CONTAINER:
        replaced = other.container() == intent.container() &&
                   other.kind() != v1::INTENT_KIND_TEARDOWN_CONTEXT;
        break;
      case v1::INTENT_KIND_TEARDOWN_CONTEXT:
        replaced = other.context() == intent.context();
        break;
      default:
        break;
    }
    if (!replaced) continue;
    if (undo != nullptr) undo->replaced.emplace_back(id, entry);
    if (!entry.inflight_decision.empty()) {
      if (undo != nullptr) {
        auto inflight = inflight_.find(entry.inflight_decision);
        if (inflight != inflight_.end()) undo->inflight.emplace_back(*inflight);
        auto record = inflight_records_.find(entry.inflight_decision);
        if (record != inflight_records_.end()) undo->records.emplace_back(*record);
      }
      inflight_.erase(entry.inflight_decision);
      inflight_records_.erase(entry.inflight_decision);
      entry.inflight_decision.clear();
    }
    SetStateLocked(entry, v1::INTENT_STATE_SUPERSEDED, now, mutation);
    entry.intent.set_last_message(absl::StrCat("superseded by ", intent.id()));
    mutation->PutIntent(entry.intent);
  }
  mutation->PutIntent(intent);
  IntentEntry entry;
  entry.intent = intent;
  entry.retry = retry;
  if (const NodeReport* report = fleet_.Find(intent.node()); report != nullptr) {
    entry.confirmations_at_creation = report->confirmations;
  }
  awaiting_confirmation_.insert(intent.node());
  intents_[intent.id()] = std::move(entry);
  UpdateRequirementLocked(intent.id());
  node_intents_[intent.node()].push_back(intent.id());
  active_intents_.insert(intent.id());
  if (undo != nullptr) undo->added.push_back(intent.id());
  ++intent_sequence_;
  return intent;
}

void ServerCore::RollbackLocked(IntentUndo& undo) {
  for (auto it = undo.replaced.rbegin(); it != undo.replaced.rend(); ++it) {
    intents_[it->first] = std::move(it->second);
    UpdateRequirementLocked(it->first);
  }
  for (auto it = undo.added.rbegin(); it != undo.added.rend(); ++it) {
    auto added = intents_.find(*it);
    if (added == intents_.end()) continue;
    std::vector<std::string>& ids = node_intents_[added->second.intent.node()];
    if (!ids.empty() && ids.back() == *it) ids.pop_back();
    active_intents_.erase(*it);
    intents_.erase(added);
    UpdateRequirementLocked(*it);
    --intent_sequence_;
  }
  for (auto& [decision, intent] : undo.inflight) inflight_[decision] = std::move(intent);
  for (auto& [decision, record] : undo.records) inflight_records_[decision] = std::move(record);
  undo = IntentUndo();
}

absl::StatusOr<v1::CreateIntentResponse> ServerCore::CreateIntent(
    const v1::CreateIntentRequest& request) {
  const absl::Time now = absl::Now();
  MutexLock lock(&mu_);
  const NodeReport* node = fleet_.Find(request.node());
  const uint64_t page_size = node != nullptr ? node->hello.page_size() : 0;
  if (absl::Status status = ValidateIntentRequest(request, page_size); !status.ok()) {
    return status;
  }
  const std::vector<v1::Policy> list = PolicyListLocked();
  AdmissionResult admission =
      Admit(request, FactsLocked(request.node(), KeyOfRequest(request)), PoolFactsLocked(), list);
  if (!admission.status.ok()) {
    EmitLocked("intent_rejected", request.node(), "", "", "", admission.status.ToString(), now);
    return admission.status;
  }
  v1::CreateIntentResponse response;
  for (const std::string& name : admission.admitted_by) response.add_admitted_by(name);
  response.set_admission(admission.explanation);
  if (request.dry_run()) {
    v1::Intent* preview = response.mutable_intent();
    preview->set_kind(request.kind());
    preview->set_node(request.node());
    preview->set_context(request.context());
    preview->set_container(request.container());
    preview->set_ua(request.ua());
    preview->set_size(request.size());
    *preview->mutable_labels() = request.labels();
    preview->set_state(v1::INTENT_STATE_PENDING);
    return response;
  }
  // Memory keeps the change only once the store took it; on failure the undo log restores the
  // entries it touched (a copy of every intent would make each CreateIntent O(intents)).
  IntentUndo undo;
  ServerMutation mutation;
  absl::StatusOr<v1::Intent> intent =
      AddIntentLocked(request, admission.retry, now, &mutation, &undo);
  absl::Status committed = intent.ok() ? CommitLocked(mutation) : intent.status();
  if (!committed.ok()) {
    RollbackLocked(undo);
    return committed;
  }
  *response.mutable_intent() = *intent;
  EmitLocked("intent_created", intent->node(), intent->id(), "", "", KindName(intent->kind()), now);
  Wake();
  return response;
}

absl::StatusOr<v1::Intent> ServerCore::GetIntent(const std::string& id) const {
  MutexLock lock(&mu_);
  auto it = intents_.find(id);
  if (it == intents_.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("intent \"%s\" does not exist", id));
  }
  return it->second.intent;
}

namespace {

uint32_t PageSize(uint32_t requested) {
  if (requested == 0) return 100;
  return std::min<uint32_t>(requested, 1000);
}

}  // namespace

absl::StatusOr<v1::ListIntentsResponse> ServerCore::ListIntents(
    const v1::ListIntentsRequest& request) const {
  uint64_t after = 0;
  if (!request.page_token().empty() && !absl::SimpleAtoi(request.page_token(), &after)) {
    return ErrnoStatus(EINVAL, absl::StrCat("page_token \"", request.page_token(),
                                            "\" is not a token this server issued"));
  }
  MutexLock lock(&mu_);
  std::vector<const v1::Intent*> selected;
  for (const auto& [id, entry] : intents_) {
    const v1::Intent& intent = entry.intent;
    if (!request.node().empty() && intent.node() != request.node()) continue;
    if (request.state() != v1::INTENT_STATE_UNSPECIFIED && intent.state() != request.state()) {
      continue;
    }
    if (IntentNumber(intent.id()) <= after) continue;
    selected.push_back(&intent);
  }
  std::sort(selected.begin(), selected.end(), [](const v1::Intent* a, const v1::Intent* b) {
    return IntentNumber(a->id()) < IntentNumber(b->id());
  });
  v1::ListIntentsResponse response;
  const uint32_t page = PageSize(request.page_size());
  for (size_t i = 0; i < selected.size() && i < page; ++i) *response.add_intents() = *selected[i];
  if (selected.size() > page) {
    response.set_next_page_token(absl::StrCat(IntentNumber(selected[page - 1]->id())));
  }
  return response;
}

void ServerCore::WithdrawIntentsOfEndedContextLocked(const std::string& node,
                                                     const std::string& context, absl::Time now,
                                                     ServerMutation* mutation) {
  for (auto& [id, entry] : intents_) {
    const v1::IntentState state = entry.intent.state();
    if (entry.intent.node() != node || entry.intent.context() != context ||
        state == v1::INTENT_STATE_WITHDRAWN || state == v1::INTENT_STATE_FAILED ||
        state == v1::INTENT_STATE_SUPERSEDED) {
      continue;
    }
    // Nothing to pursue: the address space the intent is about is gone with its VMM.
    SetStateLocked(entry, v1::INTENT_STATE_WITHDRAWN, now, mutation);
    entry.inflight_decision.clear();
    EmitLocked("intent_withdrawn", node, id, "", "",
               absl::StrFormat("its context %s ended: its VMM exited", context), now);
  }
}

absl::StatusOr<v1::Intent> ServerCore::WithdrawIntent(const std::string& id) {
  const absl::Time now = absl::Now();
  MutexLock lock(&mu_);
  auto it = intents_.find(id);
  if (it == intents_.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("intent \"%s\" does not exist", id));
  }
  IntentEntry& entry = it->second;
  if (entry.intent.state() == v1::INTENT_STATE_WITHDRAWN) return entry.intent;
  IntentEntry saved = entry;
  ServerMutation mutation;
  SetStateLocked(entry, v1::INTENT_STATE_WITHDRAWN, now, &mutation);
  if (absl::Status status = CommitLocked(mutation); !status.ok()) {
    entry = std::move(saved);
    UpdateRequirementLocked(id);
    return status;
  }
  if (!entry.inflight_decision.empty()) {
    // The answer is still recorded when it comes; the intent just stops being pursued.
    entry.inflight_decision.clear();
  }
  EmitLocked("intent_withdrawn", entry.intent.node(), id, "", "", "", now);
  return entry.intent;
}

// --- Nodes ------------------------------------------------------------------------------------

v1::Node ServerCore::NodeViewLocked(const std::string& name) const {
  return NodeViewLocked(name, fleet_.Find(name));
}

v1::Node ServerCore::NodeViewLocked(const std::string& name, const NodeReport* node) const {
  v1::Node view;
  view.set_name(name);
  if (node != nullptr) {
    *view.mutable_labels() = node->hello.labels();
    view.set_connection(node->connected ? v1::CONNECTION_STATE_CONNECTED
                                        : v1::CONNECTION_STATE_DISCONNECTED);
    view.set_last_seen(Rfc3339(node->last_seen));
    view.set_backend(node->hello.backend());
    view.set_page_size(node->hello.page_size());
    view.set_pinned_bytes(node->pinned_bytes());
    view.set_regions(node->regions.size());
    view.set_used_sum(node->used_sum());
    view.set_installed_mappings(node->installed_mappings());
    view.set_incarnation(node->hello.incarnation());
  } else {
    view.set_connection(v1::CONNECTION_STATE_DISCONNECTED);
  }
  auto admin = node_admin_.find(name);
  view.set_cordoned(admin != node_admin_.end() && admin->second.cordoned);
  const Requirements::NodeFigures figures = requirements_.Figures(name);
  view.set_required_bytes(figures.required_bytes);
  view.set_budget_bytes(figures.budget.budget_bytes);
  view.set_budget_used_ratio(figures.budget.used_ratio);
  auto drain = drains_.find(name);
  if (drain != drains_.end()) {
    v1::DrainProgress* progress = view.mutable_drain();
    progress->set_active(drain->second.active);
    progress->set_regions_total(drain->second.regions_total);
    progress->set_regions_remaining(node != nullptr ? node->regions.size() : 0);
    uint64_t retrying = 0;
    for (const std::string& id : NodeIntentsLocked(name)) {
      const IntentEntry& entry = intents_.at(id);
      if (entry.intent.labels().count(kDrainLabel) > 0 &&
          entry.intent.state() == v1::INTENT_STATE_RETRYING) {
        ++retrying;
      }
    }
    progress->set_regions_retrying(retrying);
    progress->set_started(Rfc3339(drain->second.started));
    progress->set_finished(Rfc3339(drain->second.finished));
  }
  return view;
}

std::vector<v1::Node> ServerCore::ListNodes() const {
  // The lock is taken once per chunk of nodes, so that a listing of the whole fleet holds the
  // control streams and the reconciler up for one chunk at a time, not for the fleet. Each view
  // is consistent; a node that appears meanwhile may be missed (it arrived during the listing).
  std::vector<v1::Node> nodes;
  std::string last;  // the last name listed
  for (bool first = true;; first = false) {
    bool done = false;
    {
      MutexLock lock(&mu_);
      // Names in order, merging the nodes that reported and those with admin state only.
      const auto& reports = fleet_.nodes();
      auto report = first ? reports.begin() : reports.upper_bound(last);
      auto admin = first ? node_admin_.begin() : node_admin_.upper_bound(last);
      const absl::Time held_since = absl::Now();
      for (size_t n = 0; n < std::max<size_t>(options_.list_nodes_chunk, 1); ++n) {
        if (n % 64 == 63 && absl::Now() - held_since >= options_.list_nodes_max_hold) break;
        if (report == reports.end() && admin == node_admin_.end()) break;
        if (admin == node_admin_.end() ||
            (report != reports.end() && report->first <= admin->first)) {
          last = report->first;
        } else {
          last = admin->first;
        }
        const NodeReport* node = nullptr;
        if (report != reports.end() && report->first == last) node = &(report++)->second;
        if (admin != node_admin_.end() && admin->first == last) ++admin;
        nodes.push_back(NodeViewLocked(last, node));
      }
      done = report == reports.end() && admin == node_admin_.end();
    }
    if (done) break;
    if (options_.between_list_chunks) options_.between_list_chunks();
  }
  return nodes;
}

absl::StatusOr<v1::Node> ServerCore::GetNode(const std::string& name) const {
  MutexLock lock(&mu_);
  if (!NodeKnownLocked(name)) {
    return ErrnoStatus(ENOENT, absl::StrFormat("node \"%s\" has never connected", name));
  }
  return NodeViewLocked(name);
}

absl::StatusOr<v1::Node> ServerCore::SetCordon(const std::string& name, bool cordoned) {
  const absl::Time now = absl::Now();
  MutexLock lock(&mu_);
  if (!NodeKnownLocked(name)) {
    return ErrnoStatus(ENOENT, absl::StrFormat("node \"%s\" has never connected", name));
  }
  NodeAdminState state = node_admin_[name];
  state.name = name;
  state.cordoned = cordoned;
  ServerMutation mutation;
  mutation.PutNodeState(state);
  if (absl::Status status = CommitLocked(mutation); !status.ok()) return status;
  node_admin_[name] = state;
  EmitLocked(cordoned ? "node_cordoned" : "node_uncordoned", name, "", "", "", "", now);
  return NodeViewLocked(name);
}

void ServerCore::AddDrainIntentsLocked(const std::string& name, absl::Time now,
                                       ServerMutation* mutation, IntentUndo* undo) {
  const NodeReport* node = fleet_.Find(name);
  if (node == nullptr || !node->synced) return;
  for (const auto& [key, region] : node->regions) {
    for (const std::string& container : region.containers()) {
      bool covered = false;
      for (const std::string& id : NodeIntentsLocked(name)) {
        const IntentEntry& entry = intents_.at(id);
        const v1::Intent& intent = entry.intent;
        // The agent reports after it answers: an unregister it confirmed still shows in the
        // report until the next one.
        const bool awaiting_report = intent.state() == v1::INTENT_STATE_SATISFIED &&
                                     node->reports <= entry.reports_at_result;
        if (intent.node() == name && intent.kind() == v1::INTENT_KIND_UNREGISTER &&
            intent.container() == container && KeyOfIntent(intent) == key &&
            (Pursued(intent) || awaiting_report)) {
          covered = true;
          break;
        }
      }
      if (covered) continue;
      v1::CreateIntentRequest request;
      request.set_kind(v1::INTENT_KIND_UNREGISTER);
      request.set_node(name);
      request.set_context(key.context);
      request.set_container(container);
      request.set_ua(key.ua);
      request.set_size(key.size);
      (*request.mutable_labels())[kDrainLabel] = "true";
      const std::vector<v1::Policy> list = PolicyListLocked();
      std::map<std::string, std::string> labels(node->hello.labels().begin(),
                                                node->hello.labels().end());
      absl::StatusOr<v1::Intent> intent = AddIntentLocked(
          request, MergeRetrySettings(MatchingPolicies(list, labels)), now, mutation, undo);
      if (intent.ok()) {
        EmitLocked("intent_created", name, intent->id(), "", "", "unregister (drain)", now);
      }
    }
  }
}

absl::StatusOr<v1::Node> ServerCore::DrainNode(const std::string& name) {
  const absl::Time now = absl::Now();
  MutexLock lock(&mu_);
  if (!NodeKnownLocked(name)) {
    return ErrnoStatus(ENOENT, absl::StrFormat("node \"%s\" has never connected", name));
  }
  NodeAdminState state = node_admin_[name];
  state.name = name;
  state.cordoned = true;
  state.drain_active = true;
  state.drain_started = Rfc3339(now);
  IntentUndo undo;
  ServerMutation mutation;
  mutation.PutNodeState(state);
  AddDrainIntentsLocked(name, now, &mutation, &undo);
  if (absl::Status status = CommitLocked(mutation); !status.ok()) {
    RollbackLocked(undo);
    return status;
  }
  node_admin_[name] = state;
  DrainState& drain = drains_[name];
  drain.active = true;
  drain.started = now;
  drain.finished = absl::Time();
  const NodeReport* node = fleet_.Find(name);
  drain.regions_total = node != nullptr ? node->regions.size() : 0;
  EmitLocked("drain_started", name, "", "", "",
             absl::StrCat(drain.regions_total, " regions to unregister"), now);
  Wake();
  return NodeViewLocked(name);
}

// --- Regions and decisions --------------------------------------------------------------------

namespace {

void FillRegion(const std::string& node, const v1::Region& region, v1::FleetRegion* out) {
  out->set_node(node);
  out->set_context(region.context());
  out->set_ua(region.ua());
  out->set_size(region.size());
  out->set_used(region.used());
  out->set_mapped(region.mapped());
  out->set_pending_release(region.pending_release());
  *out->mutable_containers() = region.containers();
}

}  // namespace

absl::StatusOr<v1::ListRegionsFleetResponse> ServerCore::ListRegions(
    const v1::ListRegionsFleetRequest& request) const {
  MutexLock lock(&mu_);
  const uint32_t page = PageSize(request.page_size());
  v1::ListRegionsFleetResponse response;
  std::string last_token;
  bool past_token = request.page_token().empty();
  for (const auto& [name, node] : fleet_.nodes()) {
    if (!request.node().empty() && name != request.node()) continue;
    for (const auto& [key, region] : node.regions) {
      if (!request.context().empty() && key.context != request.context()) continue;
      const std::string token = RegionToken(name, key);
      if (!past_token) {
        if (token == request.page_token()) past_token = true;
        continue;
      }
      if (static_cast<uint32_t>(response.regions_size()) == page) {
        response.set_next_page_token(last_token);
        return response;
      }
      v1::FleetRegion* out = response.add_regions();
      FillRegion(name, region, out);
      for (const std::string& id : NodeIntentsLocked(name)) {
        const v1::Intent& intent = intents_.at(id).intent;
        if (KeyOfIntent(intent) == key && intent.state() == v1::INTENT_STATE_RETRYING) {
          out->set_retrying_since(intent.retrying_since());
          out->set_attempts(intent.attempts());
        }
      }
      last_token = token;
    }
  }
  if (!past_token) {
    return ErrnoStatus(EINVAL, absl::StrCat("page_token \"", request.page_token(),
                                            "\" does not name a region any more; start over"));
  }
  return response;
}

absl::StatusOr<v1::FleetRegion> ServerCore::GetRegion(
    const v1::GetRegionFleetRequest& request) const {
  MutexLock lock(&mu_);
  const NodeReport* node = fleet_.Find(request.node());
  if (node == nullptr) {
    return ErrnoStatus(ENOENT, absl::StrFormat("node \"%s\" has never connected", request.node()));
  }
  const RegionKey key{request.context(), request.ua(), request.size()};
  auto it = node->regions.find(key);
  if (it == node->regions.end()) {
    return ErrnoStatus(
        ENOENT, absl::StrFormat("node \"%s\" reports no region %s ua=0x%x "
                                "size=0x%x",
                                request.node(), request.context(), request.ua(), request.size()));
  }
  v1::FleetRegion region;
  FillRegion(request.node(), it->second, &region);
  for (const std::string& id : NodeIntentsLocked(request.node())) {
    const v1::Intent& intent = intents_.at(id).intent;
    if (KeyOfIntent(intent) == key && intent.state() == v1::INTENT_STATE_RETRYING) {
      region.set_retrying_since(intent.retrying_since());
      region.set_attempts(intent.attempts());
    }
  }
  return region;
}

absl::StatusOr<v1::ListDecisionsResponse> ServerCore::ListDecisions(
    const v1::ListDecisionsRequest& request) const {
  DecisionQuery query;
  query.node = request.node();
  query.intent_id = request.intent_id();
  query.page_size = request.page_size();
  query.page_token = request.page_token();
  absl::StatusOr<DecisionPage> page = options_.store->ListDecisions(query);
  if (!page.ok()) return page.status();
  v1::ListDecisionsResponse response;
  for (v1::DecisionRecord& record : page->decisions) *response.add_decisions() = std::move(record);
  response.set_next_page_token(page->next_page_token);
  return response;
}

// --- Metrics ----------------------------------------------------------------------------------

FleetMetricsSnapshot ServerCore::MetricsSnapshot(size_t max_regions) const {
  const absl::Time now = absl::Now();
  MutexLock lock(&mu_);
  FleetMetricsSnapshot snapshot;
  size_t regions_left = max_regions;
  // Everything below runs under the core's lock, which stalls the control streams: at fleet
  // scale (a million regions) it must stay one cheap pass over the regions.
  for (const auto& [name, node] : fleet_.nodes()) {
    FleetMetricsSnapshot::NodeMetrics metrics;
    metrics.name = name;
    metrics.connected = node.connected;
    metrics.regions = node.regions.size();
    metrics.pinned_bytes = node.pinned_bytes();
    metrics.used_sum = node.used_sum();
    metrics.installed_mappings = node.installed_mappings();
    const Requirements::NodeFigures figures = requirements_.Figures(name);
    metrics.required_bytes = figures.required_bytes;
    metrics.budget_bytes = figures.budget.budget_bytes;
    metrics.budget_used_bytes = figures.budget.used_bytes;
    metrics.counters = node.counters;
    for (const auto& [context_name, context] : node.contexts) metrics.contexts.push_back(context);
    for (const auto& [container_name, container] : node.containers) {
      metrics.containers.push_back(container);
    }
    for (const auto& [key, region] : node.regions) {
      if (regions_left == 0) break;
      metrics.regions_detail.push_back(region);
      --regions_left;
    }
    snapshot.nodes.push_back(std::move(metrics));
  }
  absl::Time oldest = now;
  for (const auto& [id, entry] : intents_) {
    const v1::Intent& intent = entry.intent;
    ++snapshot.intents_by_state[v1::IntentState_Name(intent.state())];
    if (intent.state() == v1::INTENT_STATE_PENDING || intent.state() == v1::INTENT_STATE_APPLYING ||
        intent.state() == v1::INTENT_STATE_RETRYING) {
      absl::Time created;
      std::string error;
      if (absl::ParseTime(absl::RFC3339_full, intent.create_time(), &created, &error)) {
        oldest = std::min(oldest, created);
      }
    }
  }
  snapshot.oldest_pending_intent_seconds = absl::ToDoubleSeconds(now - oldest);
  snapshot.agents_connected = fleet_.connected();
  snapshot.counters = counters_;
  const EventFanoutStats watch = events_.stats();
  snapshot.counters.watchers_dropped = watch.watchers_dropped;
  snapshot.counters.events_dropped = watch.events_dropped;
  snapshot.counters.watchers_refused = watch.watchers_refused;
  snapshot.counters.watchers = watch.watchers;
  snapshot.counters.watch_buffered_bytes = watch.buffered_bytes;
  return snapshot;
}

}  // namespace dmapin::server
