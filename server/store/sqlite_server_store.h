// The embedded ServerStore: SQLite, `<dir>/server.db`.
//
// Durability (SqliteServerStoreOptions::sync_full), as the agent's StateStore:
//  - false (default): WAL journal, synchronous=NORMAL. A committed transaction is in the WAL file
//    (the kernel's page cache) before Commit returns: it survives the process dying at any
//    instant (kill -9), not necessarily a power loss.
//  - true: synchronous=FULL, one fsync per transaction: survives power loss too.
//
// Layout. Every proto is a serialized BLOB next to the indexed columns the queries filter and
// order by: policies (name), intents (id, node, state; rowid = first-insertion order), decisions
// (id, node, intent_id, sent_ns = sent_time as Unix nanoseconds, in_flight), node_admin (name),
// and meta (schema_version, epoch, id_block_end).
//
// Group commit: concurrent Commits queue up and the one at the front writes everyone's mutations
// in one transaction (LevelDB's writer queue), so N concurrent commits cost one WAL write (one
// fsync with sync_full). A mutation that fails is retried alone, so it never fails a neighbour.
//
// Ids: NextIds hands out ids from a block whose end is made durable first ("id_block_end" in
// meta), so a crash can skip the rest of the block but never repeats an id. Blocks are claimed
// inside a write transaction from the stored end, so even two processes sharing the file get
// disjoint ids.
//
// One connection guarded by a mutex. Not fork-safe: a child process must open its own store.
#ifndef DMAPIN_SERVER_STORE_SQLITE_SERVER_STORE_H_
#define DMAPIN_SERVER_STORE_SQLITE_SERVER_STORE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/mutex.h"
#include "common/sqlite_util.h"
#include "server/store/server_store.h"

namespace dmapin::server {

struct SqliteServerStoreOptions {
  // synchronous=FULL (survives power loss) instead of NORMAL (survives process crashes).
  bool sync_full = false;
  // Ids reserved per durable write of the id counter.
  uint64_t id_block_size = 1000;
  // Fault injection for tests: called with the 1-based number of each write transaction the
  // store attempts (Commit, PruneDecisions, BumpEpoch, a new id block), after its rows were
  // written and before COMMIT. A non-OK status rolls that transaction back and fails the call
  // with EIO. Runs under the store's lock: it must not call the store.
  std::function<absl::Status(int transaction_number)> fail_commit_hook;
};

struct ServerStoreStats {
  uint64_t commits = 0;         // successful Commit calls
  uint64_t failed_commits = 0;  // rejected, rolled back, or failed to commit
  uint64_t transactions = 0;    // successful write transactions of Commit (fewer when grouped)
  uint64_t id_blocks = 0;       // id blocks claimed
};

class SqliteServerStore final : public ServerStore {
 public:
  // Opens (creating if needed) `dir` and `dir/server.db`, runs quick_check and migrates the
  // schema. A damaged file fails with DATA_LOSS (errno EIO) naming the file; a schema newer than
  // this binary with FAILED_PRECONDITION.
  static absl::StatusOr<std::unique_ptr<SqliteServerStore>> Open(
      const std::string& dir, SqliteServerStoreOptions options = {});

  ~SqliteServerStore() override;
  SqliteServerStore(const SqliteServerStore&) = delete;
  SqliteServerStore& operator=(const SqliteServerStore&) = delete;

  absl::Status Commit(const ServerMutation& mutation) override;
  absl::StatusOr<std::vector<v1::Policy>> LoadPolicies() const override;
  absl::StatusOr<std::vector<v1::Intent>> LoadIntents() const override;
  absl::StatusOr<std::vector<NodeAdminState>> LoadNodeStates() const override;
  absl::StatusOr<DecisionPage> ListDecisions(const DecisionQuery& query) const override;
  absl::StatusOr<std::vector<v1::DecisionRecord>> LoadInFlightDecisions() const override;
  absl::StatusOr<uint64_t> PruneDecisions(uint64_t keep_last_n) override;
  absl::StatusOr<uint64_t> BumpEpoch() override;
  absl::StatusOr<uint64_t> NextIds(uint64_t n) override;

  ServerStoreStats stats() const;
  const std::string& path() const { return path_; }
  static int CurrentSchemaVersion();

 private:
  enum Sql : int;  // ids of the cached statements (defined in the .cc)
  static constexpr size_t kMaxOpsPerTransaction = 4096;
  struct Writer;

  SqliteServerStore(std::string path, SqliteServerStoreOptions options, sqlite3* db);

  absl::Status InitLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<sqlite3_stmt*> StatementLocked(int sql) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RunLocked(sqlite3_stmt* stmt, absl::string_view what) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ExecLocked(int sql, absl::string_view what) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RollbackLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SqliteError(int rc, absl::string_view what) const;

  // BEGIN IMMEDIATE, `body`, the fault hook, COMMIT; rolls back on any failure.
  absl::Status WriteTransactionLocked(const std::function<absl::Status()>& body)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One transaction for all of `mutations`.
  absl::Status CommitLocked(absl::Span<const ServerMutation* const> mutations)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ApplyLocked(const ServerMutation::Op& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The uint64 in meta under `key`; `fallback` when absent.
  absl::StatusOr<uint64_t> MetaU64Locked(absl::string_view key, uint64_t fallback) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status PutMetaLocked(absl::string_view key, absl::string_view value) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One read transaction around `body`.
  absl::Status ReadTransactionLocked(const std::function<absl::Status()>& body) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs a cached statement with `bind` applied, calling `row` for each result row.
  absl::Status EachRowLocked(int sql, const std::function<void(sqlite3_stmt*)>& bind,
                             const std::function<absl::Status(sqlite3_stmt*)>& row) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string path_;
  const std::string database_;  // "server database <path>", for errors
  const SqliteServerStoreOptions options_;

  // Callers waiting to commit; the front one commits for the group.
  Mutex queue_mu_;
  std::deque<Writer*> writers_ ABSL_GUARDED_BY(queue_mu_);

  // Lock order: ids_mu_ before mu_.
  Mutex ids_mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(ids_mu_) = 0;
  uint64_t block_end_ ABSL_GUARDED_BY(ids_mu_) = 0;  // ids in [next_id_, block_end_) are ours

  mutable Mutex mu_;
  sqlite3* const db_ ABSL_PT_GUARDED_BY(mu_);
  mutable StatementCache statements_ ABSL_GUARDED_BY(mu_);
  int transaction_number_ ABSL_GUARDED_BY(mu_) = 0;

  std::atomic<uint64_t> commits_{0};
  std::atomic<uint64_t> failed_commits_{0};
  std::atomic<uint64_t> transactions_{0};
  std::atomic<uint64_t> id_blocks_{0};
};

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_STORE_SQLITE_SERVER_STORE_H_
