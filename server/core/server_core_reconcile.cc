// ServerCore's reconciler: each pass compares the intents with what the nodes report and sends
// the decisions that close the gap (see ReconcileLocked), and handles what the agents answer.
#include <algorithm>
#include <cerrno>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/errno_status.h"
#include "server/core/server_core.h"
#include "server/core/server_core_internal.h"

namespace dmapin::server {
using server_core_internal::DecisionKindOf;
using server_core_internal::kDrainLabel;
using server_core_internal::KeyOfIntent;
using server_core_internal::KindName;
using server_core_internal::Pursued;
using server_core_internal::Rfc3339;

// --- Reconciliation ---------------------------------------------------------------------------

void ServerCore::ReconcileNow() {
  std::vector<std::pair<std::shared_ptr<AgentSession>, v1::ServerMessage>> outbox;
  {
    MutexLock lock(&mu_);
    const absl::Time start = absl::Now();
    ServerMutation mutation;
    ReconcileLocked(start, &mutation, &outbox);
    // Durable before anything is sent: a decision the server forgot could not be told apart
    // from one it never made.
    if (!CommitLocked(mutation).ok()) {
      // Nothing is sent; the decisions are forgotten and the next pass tries again.
      for (auto& [session, message] : outbox) {
        const std::string& decision_id = message.decision().id();
        auto intent = intents_.find(inflight_[decision_id]);
        if (intent != intents_.end()) intent->second.inflight_decision.clear();
        inflight_.erase(decision_id);
        inflight_records_.erase(decision_id);
      }
      outbox.clear();
    }
    ++counters_.reconcile_passes;
    counters_.reconcile_seconds_recent.push_back(absl::ToDoubleSeconds(absl::Now() - start));
    if (counters_.reconcile_seconds_recent.size() > 4096) {
      counters_.reconcile_seconds_recent.erase(counters_.reconcile_seconds_recent.begin(),
                                               counters_.reconcile_seconds_recent.begin() + 2048);
    }
    counters_.stream_messages_sent += outbox.size();
  }
  for (auto& [session, message] : outbox) session->Send(message);
}

bool ServerCore::SatisfiedLocked(const v1::Intent& intent, const NodeReport& node) const {
  switch (intent.kind()) {
    case v1::INTENT_KIND_REGISTER:
      return node.Holds(KeyOfIntent(intent), intent.container());
    case v1::INTENT_KIND_UNREGISTER:
      return !node.Holds(KeyOfIntent(intent), intent.container());
    case v1::INTENT_KIND_RELEASE_CONTAINER:
      return node.containers.count(intent.container()) == 0;
    case v1::INTENT_KIND_TEARDOWN_CONTEXT:
      return node.contexts.count(intent.context()) == 0;
    default:
      return false;
  }
}

void ServerCore::SetStateLocked(IntentEntry& entry, v1::IntentState state, absl::Time now,
                                ServerMutation* mutation) {
  v1::Intent& intent = entry.intent;
  if (intent.state() == state) return;
  intent.set_state(state);
  intent.set_update_time(Rfc3339(now));
  if (state == v1::INTENT_STATE_SATISFIED) ResetLost(entry);
  if (state != v1::INTENT_STATE_RETRYING) {
    intent.clear_retrying_since();
    intent.clear_next_attempt_time();
  }
  mutation->PutIntent(intent);
  UpdateRequirementLocked(intent.id());
}

void ServerCore::ReconcileLocked(
    absl::Time now, ServerMutation* mutation,
    std::vector<std::pair<std::shared_ptr<AgentSession>, v1::ServerMessage>>* outbox) {
  for (auto& [name, drain] : drains_) {
    if (drain.active) AddDrainIntentsLocked(name, now, mutation);
  }
  // Which intents to look at: a full pass now and then (a safety net), else only those that can
  // change without news from their node (pending, applying, retrying: new intents, timeouts and
  // backoffs) and those of the nodes that reported, connected or disconnected since the last
  // pass. A satisfied intent only changes when its node reports, so a pass costs what changed,
  // not O(intents): at fleet scale every Delta wakes the loop.
  std::set<std::string> candidates;
  if (now - last_full_pass_ >= kFullPassInterval) {
    last_full_pass_ = now;
    for (const auto& [id, entry] : intents_) candidates.insert(candidates.end(), id);
  } else {
    candidates = active_intents_;
    for (const std::string& node : dirty_nodes_) {
      for (const std::string& id : NodeIntentsLocked(node)) candidates.insert(id);
    }
  }
  dirty_nodes_.clear();
  for (const std::string& id : candidates) {
    auto it = intents_.find(id);
    if (it == intents_.end()) {
      active_intents_.erase(id);
      continue;
    }
    const bool ok = ReconcileIntentLocked(id, it->second, now, mutation, outbox);
    const v1::Intent& intent = it->second.intent;
    if (Pursued(intent) && intent.state() != v1::INTENT_STATE_SATISFIED) {
      active_intents_.insert(id);
    } else {
      active_intents_.erase(id);
    }
    if (!ok) {
      last_full_pass_ = absl::InfinitePast();  // the rest waits for the next (full) pass
      return;
    }
  }
  for (auto& [name, drain] : drains_) {
    if (!drain.active) continue;
    const NodeReport* node = fleet_.Find(name);
    bool busy = node == nullptr || !node->synced || !node->regions.empty();
    for (const std::string& id : NodeIntentsLocked(name)) {
      const IntentEntry& entry = intents_.at(id);
      if (entry.intent.labels().count(kDrainLabel) > 0 && Pursued(entry.intent)) {
        busy = true;
      }
    }
    if (!busy) {
      drain.active = false;
      drain.finished = now;
      NodeAdminState& admin = node_admin_[name];
      admin.name = name;
      admin.drain_active = false;
      mutation->PutNodeState(admin);
      EmitLocked("drain_finished", name, "", "", "OK", "every region is unregistered", now);
    }
  }
}

bool ServerCore::ReconcileIntentLocked(
    const std::string& id, IntentEntry& entry, absl::Time now, ServerMutation* mutation,
    std::vector<std::pair<std::shared_ptr<AgentSession>, v1::ServerMessage>>* outbox) {
  v1::Intent& intent = entry.intent;
  if (!Pursued(intent)) return true;
  const NodeReport* node = fleet_.Find(intent.node());
  // Only a snapshot of the current connection counts: the report kept from before a reconnect
  // may miss what the agent applied since.
  const bool reported = node != nullptr && node->synced;
  if (intent.state() == v1::INTENT_STATE_SATISFIED) {
    // Only a report newer than the confirmation can show a divergence.
    if (!reported || !node->connected || node->reports <= entry.reports_at_result ||
        SatisfiedLocked(intent, *node)) {
      return true;
    }
    SetStateLocked(entry, v1::INTENT_STATE_PENDING, now, mutation);
    EmitLocked("intent_diverged", intent.node(), id, "", "", "reported state no longer holds", now);
  }
  if (reported && node->connected && entry.inflight_decision.empty() &&
      SatisfiedLocked(intent, *node)) {
    // A report from before the intent may be stale (the VMM may have changed the node behind
    // the server's back): wait for the agent's next delta or heartbeat to confirm it.
    if (node->confirmations <= entry.confirmations_at_creation) return true;
    entry.reports_at_result = node->reports;
    SetStateLocked(entry, v1::INTENT_STATE_SATISFIED, now, mutation);
    EmitLocked("intent_satisfied", intent.node(), id, "", "OK", "", now);
    return true;
  }
  if (!entry.inflight_decision.empty()) {
    if (now - entry.inflight_since < options_.decision_timeout) return true;
    ++counters_.decisions_timed_out;
    LoseDecisionLocked(entry, Loss::kTimeout, now, mutation);
  }
  auto session = sessions_.find(intent.node());
  if (!reported || !node->connected || session == sessions_.end()) {
    if (intent.state() == v1::INTENT_STATE_APPLYING) {
      SetStateLocked(entry, v1::INTENT_STATE_PENDING, now, mutation);
    }
    return true;
  }
  const uint32_t max_lost = options_.max_lost_decision_attempts;
  if (max_lost != 0 && intent.lost_attempts() >= max_lost) {
    // The same decision again would most likely end the same way (an agent that crashes while
    // applying it would crash-loop): the intent fails, saying why.
    const uint32_t lost = intent.lost_attempts();
    const uint32_t timeouts = std::min(entry.lost_timeouts, lost);
    const uint32_t sessions = std::min(entry.lost_sessions, lost - timeouts);
    const uint32_t restarts = std::min(entry.lost_restarts, sessions);
    const uint32_t unknown = lost - timeouts - sessions;
    std::string what;
    if (restarts == lost) {
      what = absl::StrCat("agent restarted ", lost, " times while applying this decision");
    } else if (timeouts == lost) {
      what = absl::StrCat("agent gave no result to this decision ", lost, " times in a row (each ",
                          "timed out after ", absl::FormatDuration(options_.decision_timeout), ")");
    } else {
      std::vector<std::string> causes;
      if (restarts > 0) causes.push_back(absl::StrCat("the agent restarted ", restarts, " times"));
      if (sessions > restarts) {
        causes.push_back(absl::StrCat("its session ended ", sessions - restarts, " times"));
      }
      if (timeouts > 0) {
        causes.push_back(absl::StrCat(timeouts, " timed out after ",
                                      absl::FormatDuration(options_.decision_timeout)));
      }
      if (unknown > 0) causes.push_back(absl::StrCat(unknown, " before the server restarted"));
      what = absl::StrCat("this decision ended without a result ", lost, " times in a row (",
                          absl::StrJoin(causes, ", "), ")");
    }
    const int err = sessions > 0 || timeouts < lost ? ECONNRESET : ETIMEDOUT;
    intent.set_last_errno(err);
    intent.set_last_errno_name(err == ECONNRESET ? "ECONNRESET" : "ETIMEDOUT");
    intent.set_last_message(absl::StrCat(
        what, "; giving up at --max_lost_decision_attempts=", max_lost,
        " so that the node does not crash-loop on it: see the agent's log for decision ",
        intent.last_decision_id(),
        ", and check the request against what the node can hold; create the intent again to "
        "retry"));
    SetStateLocked(entry, v1::INTENT_STATE_FAILED, now, mutation);
    mutation->PutIntent(intent);
    ++counters_.intents_failed_lost_decisions;
    EmitLocked("intent_failed", intent.node(), id, intent.last_decision_id(),
               intent.last_errno_name(), intent.last_message(), now);
    return true;
  }
  if (intent.kind() == v1::INTENT_KIND_REGISTER) {
    // Admitted before the node said what it can hold (or it holds less since a restart): a
    // registration it can never hold fails here rather than being sent (the agent would refuse
    // it, or die pinning it) again and again.
    absl::Status capacity = CheckNodeCapacity(intent.context(), intent.size(),
                                              FactsLocked(intent.node(), KeyOfIntent(intent)));
    if (!capacity.ok()) {
      intent.set_last_errno(ENOMEM);
      intent.set_last_errno_name("ENOMEM");
      intent.set_last_message(absl::StrCat(capacity.message(),
                                           " (the node reported this limit after the intent was "
                                           "admitted); nothing was sent"));
      SetStateLocked(entry, v1::INTENT_STATE_FAILED, now, mutation);
      mutation->PutIntent(intent);
      EmitLocked("intent_failed", intent.node(), id, "", "ENOMEM", intent.last_message(), now);
      return true;
    }
  }
  // EBUSY retries and decisions lost before wait out their backoff.
  if (now < entry.next_attempt) return true;

  absl::StatusOr<uint64_t> number = options_.store->NextId();
  if (!number.ok()) {
    ++counters_.store_failures;
    return false;
  }
  const std::string decision_id = absl::StrCat("d-", *number);
  v1::ServerMessage message;
  v1::Decision* decision = message.mutable_decision();
  decision->set_id(decision_id);
  decision->set_epoch(epoch_);
  decision->set_kind(DecisionKindOf(intent.kind()));
  decision->set_context(intent.context());
  decision->set_container(intent.container());
  decision->set_ua(intent.ua());
  decision->set_size(intent.size());
  v1::DecisionRecord record;
  record.set_id(decision_id);
  record.set_epoch(epoch_);
  record.set_intent_id(id);
  record.set_node(intent.node());
  record.set_kind(KindName(intent.kind()));
  record.set_sent_time(Rfc3339(now));
  mutation->PutDecision(record);
  inflight_[decision_id] = id;
  inflight_records_[decision_id] = record;
  entry.inflight_decision = decision_id;
  entry.inflight_since = now;
  entry.inflight_incarnation = node->hello.incarnation();
  if (intent.state() != v1::INTENT_STATE_RETRYING) intent.clear_next_attempt_time();
  intent.set_attempts(intent.attempts() + 1);
  intent.set_last_decision_id(decision_id);
  intent.set_update_time(Rfc3339(now));
  if (intent.state() != v1::INTENT_STATE_RETRYING) intent.set_state(v1::INTENT_STATE_APPLYING);
  mutation->PutIntent(intent);
  ++counters_.decisions_sent[KindName(intent.kind())];
  EmitLocked("decision_sent", intent.node(), id, decision_id, "", KindName(intent.kind()), now);
  outbox->emplace_back(session->second, std::move(message));
  return true;
}

void ServerCore::HandleResultLocked(const std::string& node, const v1::DecisionResult& result,
                                    absl::Time now, ServerMutation* mutation) {
  auto inflight = inflight_.find(result.decision_id());
  if (inflight == inflight_.end()) return;  // timed out, or from before a reconnect
  const std::string intent_id = inflight->second;
  inflight_.erase(inflight);
  v1::DecisionRecord record = std::move(inflight_records_[result.decision_id()]);
  inflight_records_.erase(result.decision_id());
  const std::string outcome = result.errno_value() == 0 ? "OK" : result.errno_name();
  record.set_result(outcome);
  record.set_result_time(Rfc3339(now));
  record.set_message(result.message());
  mutation->PutDecision(record);

  auto it = intents_.find(intent_id);
  if (it == intents_.end()) return;
  IntentEntry& entry = it->second;
  v1::Intent& intent = entry.intent;
  ++counters_.decision_results[absl::StrCat(KindName(intent.kind()), "/", outcome)];
  if (entry.inflight_decision != result.decision_id()) return;
  entry.inflight_decision.clear();
  ResetLost(entry);  // the agent lived through applying it
  intent.set_last_errno(result.errno_value());
  intent.set_last_errno_name(outcome);
  intent.set_last_message(result.message());
  EmitLocked("decision_result", node, intent_id, result.decision_id(), outcome, result.message(),
             now);
  if (!Pursued(intent)) {  // withdrawn or superseded while in flight
    mutation->PutIntent(intent);
    return;
  }
  const NodeReport* report = fleet_.Find(node);
  // What the intent asks for already holds: the container holds the region (a register's
  // EBUSY, spec §2.2), or the registration, container or context is already gone (ENOENT).
  const bool already_done = intent.kind() == v1::INTENT_KIND_REGISTER
                                ? result.errno_value() == EBUSY
                                : result.errno_value() == ENOENT;
  if (result.errno_value() == 0 || already_done) {
    entry.reports_at_result = report != nullptr ? report->reports : 0;
    SetStateLocked(entry, v1::INTENT_STATE_SATISFIED, now, mutation);
    mutation->PutIntent(intent);
    EmitLocked("intent_satisfied", node, intent_id, result.decision_id(), outcome, "", now);
    return;
  }
  if (result.errno_value() == EBUSY) {
    ++counters_.ebusy_retries;
    if (intent.state() != v1::INTENT_STATE_RETRYING) {
      intent.set_state(v1::INTENT_STATE_RETRYING);
      intent.set_retrying_since(Rfc3339(now));
    }
    entry.next_attempt = now + EbusyBackoff(entry.retry, intent.attempts(), rng_());
    intent.set_next_attempt_time(Rfc3339(entry.next_attempt));
    intent.set_update_time(Rfc3339(now));
    mutation->PutIntent(intent);
    EmitLocked("intent_retrying", node, intent_id, result.decision_id(), outcome,
               absl::StrCat("next attempt ", Rfc3339(entry.next_attempt)), now);
    return;
  }
  SetStateLocked(entry, v1::INTENT_STATE_FAILED, now, mutation);
  mutation->PutIntent(intent);
  EmitLocked("intent_failed", node, intent_id, result.decision_id(), outcome, result.message(),
             now);
}

void ServerCore::ResetLost(IntentEntry& entry) {
  entry.intent.set_lost_attempts(0);
  entry.lost_timeouts = entry.lost_sessions = entry.lost_restarts = 0;
  entry.lost_incarnation.clear();
}

void ServerCore::LoseDecisionLocked(IntentEntry& entry, Loss loss, absl::Time now,
                                    ServerMutation* mutation) {
  v1::Intent& intent = entry.intent;
  const std::string decision_id = std::move(entry.inflight_decision);
  entry.inflight_decision.clear();
  const bool timeout = loss == Loss::kTimeout;
  const int err = timeout ? ETIMEDOUT : ECONNRESET;
  const std::string err_name = timeout ? "ETIMEDOUT" : "ECONNRESET";
  const std::string why = timeout
                              ? absl::StrCat("no result within the decision timeout (",
                                             absl::FormatDuration(options_.decision_timeout), ")")
                              : "the agent's session ended while it was applying it";
  // The record says the decision got no result (and may be pruned like an answered one).
  if (auto record = inflight_records_.find(decision_id); record != inflight_records_.end()) {
    record->second.set_result(err_name);
    record->second.set_result_time(Rfc3339(now));
    record->second.set_message(absl::StrCat("no result: ", why));
    mutation->PutDecision(record->second);
    inflight_records_.erase(record);
  }
  inflight_.erase(decision_id);
  if (!Pursued(intent)) return;
  intent.set_lost_attempts(intent.lost_attempts() + 1);
  if (timeout) {
    ++entry.lost_timeouts;
  } else {
    ++counters_.decisions_session_lost;
    ++entry.lost_sessions;
    entry.lost_incarnation = entry.inflight_incarnation;
  }
  // Back off: the first wait is lost_decision_backoff (at least the policy's initial EBUSY
  // backoff), doubled per loss up to the policy's max, with its jitter.
  v1::EbusyRetry backoff = EffectiveRetry(entry.retry);
  backoff.set_initial_backoff_ms(std::max<uint64_t>(
      backoff.initial_backoff_ms(), absl::ToInt64Milliseconds(options_.lost_decision_backoff)));
  entry.next_attempt = now + EbusyBackoff(backoff, intent.lost_attempts(), rng_());
  if (intent.state() == v1::INTENT_STATE_APPLYING) {
    SetStateLocked(entry, v1::INTENT_STATE_PENDING, now, mutation);
  }
  intent.set_last_errno(err);
  intent.set_last_errno_name(err_name);
  intent.set_last_message(absl::StrCat(
      "decision ", decision_id, ": ", why, "; ", intent.lost_attempts(),
      " in a row without a result",
      options_.max_lost_decision_attempts != 0
          ? absl::StrCat(" (the intent fails at ", options_.max_lost_decision_attempts, ")")
          : ""));
  intent.set_next_attempt_time(Rfc3339(entry.next_attempt));
  intent.set_update_time(Rfc3339(now));
  mutation->PutIntent(intent);
  EmitLocked("decision_lost", intent.node(), intent.id(), decision_id, err_name, why, now);
}

void ServerCore::LoseNodeDecisionsLocked(const std::string& node, absl::Time now,
                                         ServerMutation* mutation) {
  for (const std::string& id : NodeIntentsLocked(node)) {
    IntentEntry& entry = intents_.at(id);
    if (!entry.inflight_decision.empty()) {
      LoseDecisionLocked(entry, Loss::kSessionEnded, now, mutation);
    }
  }
}

}  // namespace dmapin::server
