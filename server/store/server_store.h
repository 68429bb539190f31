// The central service's durable state, behind an interface: what admins asked for (policies and
// intents), what the server told the agents (decision records), node admin state (cordon, drain),
// the server epoch and a never-repeating id counter.
//
// Contract. The server changes its in-memory state, describes the change as a ServerMutation, and
// calls Commit before it answers the admin (or sends the decision). When Commit returns OK the
// change survives a kill -9 of the server; a failed or interrupted Commit leaves all of it or
// nothing of it. After a restart the server rebuilds its state from the Load* calls.
//
// SqliteServerStore (sqlite_server_store.h) is the embedded default; a distributed store for
// several server replicas can implement the same interface later.
//
// Threading: implementations are thread-safe.
#ifndef DMAPIN_SERVER_STORE_SERVER_STORE_H_
#define DMAPIN_SERVER_STORE_SERVER_STORE_H_

#include <cstdint>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "dmapin/v1/admin.pb.h"

namespace dmapin::server {

// A node's admin state: what admins set on it, as opposed to what its agent reports.
struct NodeAdminState {
  std::string name;
  bool cordoned = false;
  bool drain_active = false;
  std::string drain_started;  // RFC 3339; empty when no drain ever started
};

inline bool operator==(const NodeAdminState& a, const NodeAdminState& b) {
  return std::tie(a.name, a.cordoned, a.drain_active, a.drain_started) ==
         std::tie(b.name, b.cordoned, b.drain_active, b.drain_started);
}

// ListDecisions: records in (sent_time, id) order, oldest first, optionally filtered.
struct DecisionQuery {
  std::string node;       // empty: every node
  std::string intent_id;  // empty: every intent
  // 0: kDefaultPageSize; larger than kMaxPageSize: kMaxPageSize.
  uint32_t page_size = 0;
  // Empty for the first page, else a next_page_token of a query with the same filters. Tokens
  // are opaque; a page's token stays valid when records are added (later records show up on
  // later pages) or pruned.
  std::string page_token;

  static constexpr uint32_t kDefaultPageSize = 100;
  static constexpr uint32_t kMaxPageSize = 1000;
};

struct DecisionPage {
  std::vector<v1::DecisionRecord> decisions;
  std::string next_page_token;  // empty after the last page
};

// The changes of one server operation, applied by ServerStore::Commit in one transaction, in the
// order they were added.
class ServerMutation {
 public:
  // Insert, or replace the stored policy of that name.
  ServerMutation& PutPolicy(v1::Policy policy);
  // Fails the whole commit with NOT_FOUND (ENOENT) if no such policy is stored at that point.
  ServerMutation& DeletePolicy(absl::string_view name);
  // Insert, or replace the stored intent with that id (its position in LoadIntents is kept).
  ServerMutation& PutIntent(v1::Intent intent);
  // Deleting an intent that is not stored is a no-op (for pruning finished intents).
  ServerMutation& DeleteIntent(absl::string_view id);
  // Insert, or replace the record with that id. sent_time must be RFC 3339: it orders records.
  ServerMutation& PutDecision(v1::DecisionRecord decision);
  // Insert or replace.
  ServerMutation& PutNodeState(NodeAdminState state);
  // Deleting a node state that is not stored is a no-op.
  ServerMutation& DeleteNodeState(absl::string_view name);

  bool empty() const { return ops_.empty(); }
  size_t size() const { return ops_.size(); }

  struct DeletePolicyOp {
    std::string name;
  };
  struct DeleteIntentOp {
    std::string id;
  };
  struct DeleteNodeStateOp {
    std::string name;
  };
  using Op = std::variant<v1::Policy, DeletePolicyOp, v1::Intent, DeleteIntentOp,
                          v1::DecisionRecord, NodeAdminState, DeleteNodeStateOp>;
  const std::vector<Op>& ops() const { return ops_; }

 private:
  std::vector<Op> ops_;
};

class ServerStore {
 public:
  virtual ~ServerStore() = default;

  // Applies `mutation` in one transaction. OK means durable. Errors: INVALID_ARGUMENT (EINVAL)
  // for a malformed operation (empty name or id, unparsable sent_time; nothing is written),
  // NOT_FOUND for DeletePolicy of an absent policy, otherwise an I/O error (EIO; DATA_LOSS for a
  // damaged store). An empty mutation is a no-op.
  virtual absl::Status Commit(const ServerMutation& mutation) = 0;

  // Every policy, by name.
  virtual absl::StatusOr<std::vector<v1::Policy>> LoadPolicies() const = 0;
  // Every intent, in the order they were first stored.
  virtual absl::StatusOr<std::vector<v1::Intent>> LoadIntents() const = 0;
  // Every node admin state, by name.
  virtual absl::StatusOr<std::vector<NodeAdminState>> LoadNodeStates() const = 0;

  virtual absl::StatusOr<DecisionPage> ListDecisions(const DecisionQuery& query) const = 0;
  // Decisions sent but without a result (result empty), in (sent_time, id) order: after a
  // restart the server re-sends these under the same id, which the agents apply at most once.
  virtual absl::StatusOr<std::vector<v1::DecisionRecord>> LoadInFlightDecisions() const = 0;
  // Deletes every decision record except the newest `keep_last_n` by (sent_time, id); records
  // still in flight are always kept (and do not count towards n). Returns how many were deleted.
  virtual absl::StatusOr<uint64_t> PruneDecisions(uint64_t keep_last_n) = 0;

  // Durably increments the server epoch and returns the new value (1 on a fresh store). Called
  // once at each server start.
  virtual absl::StatusOr<uint64_t> BumpEpoch() = 0;
  // Reserves `n` >= 1 consecutive ids [first, first + n) and returns `first` (>= 1). Ids are never
  // handed out twice, also across restarts and crashes (gaps are allowed). Most calls are served
  // from memory.
  virtual absl::StatusOr<uint64_t> NextIds(uint64_t n) = 0;

  // Conveniences, each one Commit.
  absl::Status PutPolicy(const v1::Policy& policy);
  absl::Status DeletePolicy(absl::string_view name);
  // All or nothing.
  absl::Status PutIntents(absl::Span<const v1::Intent> intents);
  absl::Status PutDecisions(absl::Span<const v1::DecisionRecord> decisions);
  absl::Status PutNodeState(const NodeAdminState& state);
  // One id.
  absl::StatusOr<uint64_t> NextId() { return NextIds(1); }
};

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_STORE_SERVER_STORE_H_
