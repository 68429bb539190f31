#include "server/store/server_store.h"

#include <utility>

namespace dmapin::server {

ServerMutation& ServerMutation::PutPolicy(v1::Policy policy) {
  ops_.emplace_back(std::move(policy));
  return *this;
}

ServerMutation& ServerMutation::DeletePolicy(absl::string_view name) {
  ops_.emplace_back(DeletePolicyOp{std::string(name)});
  return *this;
}

ServerMutation& ServerMutation::PutIntent(v1::Intent intent) {
  ops_.emplace_back(std::move(intent));
  return *this;
}

ServerMutation& ServerMutation::DeleteIntent(absl::string_view id) {
  ops_.emplace_back(DeleteIntentOp{std::string(id)});
  return *this;
}

ServerMutation& ServerMutation::PutDecision(v1::DecisionRecord decision) {
  ops_.emplace_back(std::move(decision));
  return *this;
}

ServerMutation& ServerMutation::PutNodeState(NodeAdminState state) {
  ops_.emplace_back(std::move(state));
  return *this;
}

ServerMutation& ServerMutation::DeleteNodeState(absl::string_view name) {
  ops_.emplace_back(DeleteNodeStateOp{std::string(name)});
  return *this;
}

absl::Status ServerStore::PutPolicy(const v1::Policy& policy) {
  return Commit(ServerMutation().PutPolicy(policy));
}

absl::Status ServerStore::DeletePolicy(absl::string_view name) {
  return Commit(ServerMutation().DeletePolicy(name));
}

absl::Status ServerStore::PutIntents(absl::Span<const v1::Intent> intents) {
  ServerMutation mutation;
  for (const v1::Intent& intent : intents) mutation.PutIntent(intent);
  return Commit(mutation);
}

absl::Status ServerStore::PutDecisions(absl::Span<const v1::DecisionRecord> decisions) {
  ServerMutation mutation;
  for (const v1::DecisionRecord& decision : decisions) mutation.PutDecision(decision);
  return Commit(mutation);
}

absl::Status ServerStore::PutNodeState(const NodeAdminState& state) {
  return Commit(ServerMutation().PutNodeState(state));
}

}  // namespace dmapin::server
