// The node agent's durable state: an embedded SQLite database, `<dir>/state.db`.
//
// Contract. The agent applies an operation to the registry, describes the resulting row changes as
// a Mutation, and calls Commit before it replies (or first, for a change it could not undo); when
// Commit fails it undoes the change, so it is never seen. When Commit returns OK the change
// survives a kill -9 of the agent; a crash in the middle of a Commit leaves all of it or nothing of
// it (one SQLite transaction). After a restart the agent replays Load() into a fresh registry.
//
// Durability levels (StateStoreOptions::sync_full):
//  - false (default): WAL journal, synchronous=NORMAL. A committed transaction has been written to
//    the WAL file (the kernel's page cache) before Commit returns, so it survives the process
//    dying at any instant. A power loss or kernel crash can lose the most recent commits, never
//    the database's consistency: the WAL is fsync'ed only at checkpoints.
//  - true: WAL journal, synchronous=FULL. The WAL is fsync'ed at every commit, so acknowledged
//    commits survive power loss too, at the cost of one fsync per Commit.
//
// Encoding. SQLite integers are signed 64-bit: uint64 values (ids, addresses, sizes) are stored as
// their two's-complement bit pattern, so values >= 2^63 read back negative in the sqlite3 shell.
// A mapping's iova is an 8-byte big-endian BLOB (hex(iova) in the shell) because range queries
// need SQLite's order to be the unsigned order across the whole 64-bit IOVA space.
//
// The DMA hot path. A mapping change (RecordMap/RecordClear) does not start a transaction: it is
// one record appended to the mapping journal in the same directory (mapping_journal.h), durable
// as above when the call returns (the journal is flushed per record with sync_full). The store
// folds the journal into the `mappings` table in one transaction at a time: every
// journal_fold_interval or journal_fold_records records in the background, before each of its own
// transactions (so a Commit is ordered after every record that preceded it), in Load(), at Open
// (records a crash left behind) and on close. While the agent runs, the `mappings` table an
// operator reads in the sqlite3 shell may therefore lag by up to one fold interval; the meta key
// "journal_folded_seq" says how far it is.
//
// Threading. One connection guarded by a mutex: every method is thread-safe and commits are
// serialized. Not fork-safe: a child process must open its own StateStore.
#ifndef DMAPIN_AGENT_STORE_STATE_STORE_H_
#define DMAPIN_AGENT_STORE_STATE_STORE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "agent/store/mapping_journal.h"
#include "common/mutex.h"
#include "common/sqlite_util.h"

namespace dmapin::agent {

// Well-known meta keys. "schema_version" belongs to the store: Mutation::PutMeta rejects it.
inline constexpr absl::string_view kMetaSchemaVersion = "schema_version";
inline constexpr absl::string_view kMetaNodeName = "node_name";
inline constexpr absl::string_view kMetaNextId = "next_id";
// The seq of the last mapping-journal record folded into the database. Belongs to the store.
inline constexpr absl::string_view kMetaJournalFoldedSeq = "journal_folded_seq";
// The first seq of the journal file appends went to at the last fold or Open: it must exist at the
// next Open (a deleted journal is then found). Belongs to the store.
inline constexpr absl::string_view kMetaJournalFileSeq = "journal_file_seq";

// --- Rows ------------------------------------------------------------------------------------

// A slot of the VMM's memory the agent mapped (GuestMemory): [ua, ua + size) of the VMM is
// [offset, offset + size) of the memory object (dev, ino).
struct StoredSlot {
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t offset = 0;
  uint64_t dev = 0;
  uint64_t ino = 0;
};

struct StoredContext {
  std::string name;
  uint64_t id = 0;
  std::optional<uint64_t> memlock_limit_bytes;  // nullopt = unlimited
  bool cap_ipc_lock = false;
  int backing = 0;
  // Simulated VMM memory the agent allocated itself (memlock demo mode); 0/0 when there is none.
  uint64_t mem_ua = 0;
  uint64_t mem_size = 0;
  // The owning process (pid 0: none) and its start time, so that a restart finds a VMM that
  // exited (or whose pid another process took) while the agent was down.
  int64_t owner_pid = 0;
  uint32_t owner_uid = 0;
  uint64_t owner_start_time = 0;
  // The VMM's memory, by ua. PutContext replaces the context's slots with these.
  std::vector<StoredSlot> slots;
};

struct StoredContainer {
  std::string name;
  uint64_t id = 0;
  uint64_t iommu_page_size = 0;
  uint64_t window_start = 0;
  uint64_t window_size = 0;
  // The memory context the container is bound to (Mutation::BindContainer); empty while unbound.
  // PutContainer does not change it.
  std::string context;
  // VFIO backends: the IOMMU group paths the container attaches; empty otherwise.
  std::vector<std::string> vfio_groups;
  // The local process that created the container (pid 0: none) and its start time.
  int64_t creator_pid = 0;
  uint64_t creator_start_time = 0;
  // VFIO: the VMM holds the container's devices and a descriptor of the container (the device
  // handoff), so the kernel keeps its mappings when the agent exits and a restarted agent takes
  // the container back from the VMM instead of opening it again.
  bool handed_off = false;
};

// One container holding one region. `seq` orders holds by commit: replay registers in seq order so
// that the first holder is the one that pins.
struct StoredHold {
  std::string container;
  std::string context;
  uint64_t ua = 0;
  uint64_t size = 0;
  int64_t seq = 0;
  // Type1: where the registration's pin range mapping starts in the container's IOVA space (0:
  // none, as for SPAPR and the registry-only backends).
  uint64_t device_iova = 0;
};

// A region pending release: held by no container, still mapped by some.
struct StoredPending {
  std::string context;
  uint64_t ua = 0;
  uint64_t size = 0;
};

// [iova, iova + size) of `container` maps [ua, ua + size). A container's rows never overlap.
struct StoredMapping {
  std::string container;
  uint64_t iova = 0;
  uint64_t size = 0;
  uint64_t ua = 0;
};

// A decision of the central server, applied at most once; `result` is the errno (0 = success).
struct StoredDecision {
  std::string decision_id;
  uint64_t epoch = 0;
  int result = 0;
  absl::Time applied_at;  // commit time, millisecond precision
};

inline bool operator==(const StoredSlot& a, const StoredSlot& b) {
  return std::tie(a.ua, a.size, a.offset, a.dev, a.ino) ==
         std::tie(b.ua, b.size, b.offset, b.dev, b.ino);
}
inline bool operator==(const StoredContext& a, const StoredContext& b) {
  return std::tie(a.name, a.id, a.memlock_limit_bytes, a.cap_ipc_lock, a.backing, a.mem_ua,
                  a.mem_size, a.owner_pid, a.owner_uid, a.owner_start_time, a.slots) ==
         std::tie(b.name, b.id, b.memlock_limit_bytes, b.cap_ipc_lock, b.backing, b.mem_ua,
                  b.mem_size, b.owner_pid, b.owner_uid, b.owner_start_time, b.slots);
}
inline bool operator==(const StoredContainer& a, const StoredContainer& b) {
  return std::tie(a.name, a.id, a.iommu_page_size, a.window_start, a.window_size, a.context,
                  a.vfio_groups, a.creator_pid, a.creator_start_time, a.handed_off) ==
         std::tie(b.name, b.id, b.iommu_page_size, b.window_start, b.window_size, b.context,
                  b.vfio_groups, b.creator_pid, b.creator_start_time, b.handed_off);
}
inline bool operator==(const StoredHold& a, const StoredHold& b) {
  return std::tie(a.container, a.context, a.ua, a.size, a.seq, a.device_iova) ==
         std::tie(b.container, b.context, b.ua, b.size, b.seq, b.device_iova);
}
inline bool operator==(const StoredPending& a, const StoredPending& b) {
  return std::tie(a.context, a.ua, a.size) == std::tie(b.context, b.ua, b.size);
}
inline bool operator==(const StoredMapping& a, const StoredMapping& b) {
  return std::tie(a.container, a.iova, a.size, a.ua) == std::tie(b.container, b.iova, b.size, b.ua);
}
inline bool operator==(const StoredDecision& a, const StoredDecision& b) {
  return std::tie(a.decision_id, a.epoch, a.result, a.applied_at) ==
         std::tie(b.decision_id, b.epoch, b.result, b.applied_at);
}

// Everything the store holds, as Load() reads it in one snapshot.
struct PersistedState {
  std::vector<StoredContext> contexts;      // by id
  std::vector<StoredContainer> containers;  // by id
  std::vector<StoredHold> holds;            // by seq
  std::vector<StoredPending> pending;       // by (context, ua, size)
  std::vector<StoredMapping> mappings;      // by (container, iova)
  std::vector<StoredDecision> decisions;    // by decision_id
  std::map<std::string, std::string> meta;  // includes "schema_version"
};

// --- Mutation --------------------------------------------------------------------------------

// The row changes of one agent operation, applied by StateStore::Commit in one transaction, in the
// order they were added. Deletes and removals of rows that do not exist are no-ops; an insert that
// breaks a constraint (a hold or mapping naming an unknown container, a second identical hold, a
// decision recorded twice, ...) fails the whole commit.
class Mutation {
 public:
  // Insert, or update every column but the name; the context's memory slots become
  // context.slots.
  Mutation& PutContext(StoredContext context);
  // Deletes the context, its holds and pending regions, and every container bound to it (with that
  // container's holds and mappings), as Registry::TeardownContext releases the containers bound to
  // the context.
  Mutation& DeleteContext(absl::string_view name);
  // Insert, or update every column but the name and the binding.
  Mutation& PutContainer(StoredContainer container);
  // Records that `container` is bound to `context` (its first registration). Deleting the context
  // deletes the container too.
  Mutation& BindContainer(absl::string_view container, absl::string_view context);
  // Records that the container's VMM holds its devices and a descriptor of it (handed_off).
  Mutation& MarkHandedOff(absl::string_view container);
  // Deletes the container with its holds and mappings.
  Mutation& DeleteContainer(absl::string_view name);
  // The hold gets the next seq. Container and context must exist.
  Mutation& AddHold(absl::string_view container, absl::string_view context, uint64_t ua,
                    uint64_t size, uint64_t device_iova = 0);
  Mutation& RemoveHold(absl::string_view container, absl::string_view context, uint64_t ua,
                       uint64_t size);
  // Idempotent. The context must exist.
  Mutation& PutPending(absl::string_view context, uint64_t ua, uint64_t size);
  Mutation& RemovePending(absl::string_view context, uint64_t ua, uint64_t size);
  // Trims or splits every row of `container` overlapping [iova, iova + size), then inserts this
  // one. Adjacent rows are not merged. The container must exist.
  Mutation& SetMapping(absl::string_view container, uint64_t iova, uint64_t size, uint64_t ua);
  // Trims or splits every row of `container` overlapping [iova, iova + size).
  Mutation& ClearMappings(absl::string_view container, uint64_t iova, uint64_t size);
  // Fails the commit if `decision_id` was already recorded. applied_at is the commit time.
  Mutation& RecordDecision(absl::string_view decision_id, uint64_t epoch, int result_errno);
  // Insert or overwrite.
  Mutation& PutMeta(absl::string_view key, absl::string_view value);

  bool empty() const { return ops_.empty(); }
  size_t size() const { return ops_.size(); }

 private:
  friend class StateStore;

  struct DeleteContextOp {
    std::string name;
  };
  struct DeleteContainerOp {
    std::string name;
  };
  struct BindOp {
    std::string container;
    std::string context;
  };
  struct HandOffOp {
    std::string container;
  };
  struct HoldOp {
    bool add;
    std::string container;
    std::string context;
    uint64_t ua;
    uint64_t size;
    uint64_t device_iova;  // add only
  };
  struct PendingOp {
    bool add;
    std::string context;
    uint64_t ua;
    uint64_t size;
  };
  struct MappingOp {
    bool set;  // false: clear only
    std::string container;
    uint64_t iova;
    uint64_t size;
    uint64_t ua;
  };
  struct DecisionOp {
    std::string decision_id;
    uint64_t epoch;
    int result;
  };
  struct MetaOp {
    std::string key;
    std::string value;
  };
  using Op = std::variant<StoredContext, DeleteContextOp, StoredContainer, DeleteContainerOp,
                          BindOp, HandOffOp, HoldOp, PendingOp, MappingOp, DecisionOp, MetaOp>;

  std::vector<Op> ops_;
};

// --- Store -----------------------------------------------------------------------------------

struct StateStoreOptions {
  // synchronous=FULL (survives power loss) instead of NORMAL (survives process crashes); see the
  // top of this file.
  bool sync_full = false;
  // Fault injection for tests (in the spirit of LevelDB's Env): called with the 1-based number of
  // each transaction the store attempts, after the mutation's rows were written and before COMMIT.
  // A non-OK status makes that Commit roll back and fail with EIO. Runs under the store's lock: it
  // must not call the store.
  std::function<absl::Status(int commit_number)> fail_commit_hook;
  // Fault injection for the mapping journal: see MappingJournalOptions::fail_append_hook.
  std::function<absl::Status(uint64_t seq)> fail_journal_append_hook;
  // How often, at the latest, and after how many records the background folds the journal.
  absl::Duration journal_fold_interval = absl::Milliseconds(100);
  size_t journal_fold_records = 8192;
  // Damage found at Open (a damaged or lost state.db, a damaged or missing journal file) is set
  // aside and reported (recovery_report(), StoreStats) instead of failing with DATA_LOSS. The
  // agent's --recover_damaged_state.
  bool recover_damaged_state = false;
};

// Counters for metrics.
struct StoreStats {
  uint64_t commits = 0;         // successful
  uint64_t failed_commits = 0;  // rejected, rolled back, or failed to commit
  // Rows inserted, updated or deleted directly by successful commits (cascaded deletes not
  // counted).
  uint64_t rows_written = 0;
  // SQLite transactions; fewer than commits when concurrent commits were grouped.
  uint64_t transactions = 0;
  // The mapping journal.
  uint64_t journal_records = 0;         // appended
  uint64_t journal_failed_records = 0;  // refused or failed to write
  uint64_t journal_folds = 0;           // transactions that folded records
  uint64_t journal_records_folded = 0;
  // Folded records that a later record of the same fold made moot (not applied; see Coalesce).
  uint64_t journal_records_coalesced = 0;
  // Records of containers deleted before the fold reached them (nothing to apply).
  uint64_t journal_records_skipped = 0;
  uint64_t journal_torn_tail_bytes = 0;  // found at Open after a power loss or a failed write
  // Recovery at Open (StateStoreOptions::recover_damaged_state): journal files set aside and the
  // well-formed records they held after the damage; 1 when the database itself was set aside and
  // the node started empty.
  uint64_t journal_damaged_files = 0;
  uint64_t journal_damaged_records_dropped = 0;
  uint64_t state_set_aside = 0;
};

class StateStore {
 public:
  // Opens (creating if needed) `dir` and `dir/state.db`, runs integrity_check, migrates the
  // schema to the current version, and folds what the mapping journal holds from before. A damaged
  // file fails with DATA_LOSS (errno EIO) naming the file and offset, and so does a database that
  // is missing or empty while journal files of an earlier run are there (state lost, not a first
  // start), unless options.recover_damaged_state; a schema newer than this binary fails with
  // FAILED_PRECONDITION.
  static absl::StatusOr<std::unique_ptr<StateStore>> Open(const std::string& dir,
                                                          StateStoreOptions options = {});

  // Folds the journal, then closes the connection (checkpointing the WAL when it is the last one).
  ~StateStore();
  StateStore(const StateStore&) = delete;
  StateStore& operator=(const StateStore&) = delete;

  // Applies `mutation` in one transaction (BEGIN IMMEDIATE ... COMMIT). OK means durable as
  // described at the top of this file. Errors: EINVAL for a malformed operation (nothing is
  // written), otherwise EIO naming the SQLite error, after rolling everything back. An empty
  // mutation is a no-op that starts no transaction.
  absl::Status Commit(const Mutation& mutation);

  // The DMA hot path: makes one mapping change of container `container_id` (StoredContainer::id)
  // durable without a transaction; it reaches the `mappings` table at the next fold, with the
  // effect of Mutation::SetMapping / ClearMappings. Records of a container deleted before the fold
  // are dropped. EINVAL for an empty or wrapping range (nothing written); EIO once the journal or
  // a fold failed (the store then takes no more changes: restart to recover from the files).
  absl::Status RecordMap(uint64_t container_id, uint64_t iova, uint64_t size, uint64_t ua);
  absl::Status RecordClear(uint64_t container_id, uint64_t iova, uint64_t size);

  // Folds the journal now (the background does it anyway).
  absl::Status FoldJournal();

  // The acknowledged mappings of container `container_id` (StoredContainer::id) inside
  // [iova, iova + size), clipped to it, by iova: the rows as folded with the journal's unfolded
  // records applied, read without a fold (so also from a store that refuses transactions). For an
  // agent putting back entries whose change the store refused. EIO once a fold failed (the records
  // it took are only in the files then); ENOENT for an unknown container.
  absl::StatusOr<std::vector<StoredMapping>> AcknowledgedMappings(uint64_t container_id,
                                                                  uint64_t iova, uint64_t size);

  // Folds the journal, then reads everything.
  absl::StatusOr<PersistedState> Load();

  // The result errno recorded for `decision_id`, or nullopt if it was never applied.
  absl::StatusOr<std::optional<int>> DecisionResult(absl::string_view decision_id) const;

  StoreStats stats() const;

  // With recover_damaged_state: one line per damage Open found and what it dropped or set aside.
  const std::vector<std::string>& recovery_report() const { return recovery_report_; }

  // The database file.
  const std::string& path() const { return path_; }

  // The schema version this binary writes.
  static int CurrentSchemaVersion();

 private:
  // Ids of the cached statements (defined in the .cc).
  enum Sql : int;

  struct Writer;
  static constexpr size_t kMaxOpsPerTransaction = 4096;

  StateStore(std::string path, StateStoreOptions options, sqlite3* db);
  absl::Status Record(JournalRecord::Kind kind, uint64_t container_id, uint64_t iova, uint64_t size,
                      uint64_t ua);
  // Applies `records` (by seq) to the mappings table in one transaction. A failure is sticky:
  // the records left memory and only the files (read again at the next Open) still have them.
  // Also records `file_seq` as the journal file appends go to (kMetaJournalFileSeq).
  absl::Status FoldLocked(const std::vector<JournalRecord>& records, uint64_t file_seq)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A meta value as a number; 0 when absent.
  absl::StatusOr<uint64_t> MetaU64Locked(absl::string_view key) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status FoldJournalLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FoldInBackground();
  // One transaction for all of `mutations`; all or nothing.
  absl::Status CommitLocked(absl::Span<const Mutation* const> mutations)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Status InitLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<sqlite3_stmt*> StatementLocked(Sql sql) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs a statement that returns no rows; adds the rows it changed to `*rows` when given.
  absl::Status RunLocked(sqlite3_stmt* stmt, absl::string_view what, uint64_t* rows = nullptr) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ExecLocked(Sql sql, absl::string_view what) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RollbackLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static absl::Status Validate(const Mutation::Op& op);
  absl::Status ApplyLocked(const Mutation::Op& op, int64_t now_ms, uint64_t* rows)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ClearMappingRangeLocked(const std::string& container, uint64_t iova, uint64_t size,
                                       uint64_t* rows) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status LoadLocked(PersistedState* state) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SqliteError(int rc, absl::string_view what) const;

  const std::string path_;
  const std::string database_;  // "state database <path>", for errors
  const StateStoreOptions options_;
  // Set by Open before the store is shared.
  std::vector<std::string> recovery_report_;
  bool state_set_aside_ = false;

  // Callers waiting to commit; the front one commits for the group (see Commit).
  Mutex queue_mu_;
  std::deque<Writer*> writers_ ABSL_GUARDED_BY(queue_mu_);

  mutable Mutex mu_;
  sqlite3* const db_ ABSL_PT_GUARDED_BY(mu_);
  mutable StatementCache statements_ ABSL_GUARDED_BY(mu_);
  int commit_number_ ABSL_GUARDED_BY(mu_) = 0;

  // Atomics so that a metrics scrape never waits behind an fsync.
  std::atomic<uint64_t> commits_{0};
  std::atomic<uint64_t> failed_commits_{0};
  std::atomic<uint64_t> rows_written_{0};
  std::atomic<uint64_t> transactions_{0};

  std::unique_ptr<MappingJournal> journal_;  // set by Open
  std::atomic<bool> fold_failed_{false};
  std::atomic<uint64_t> journal_folds_{0};
  std::atomic<uint64_t> journal_records_folded_{0};
  std::atomic<uint64_t> journal_records_skipped_{0};
  std::atomic<uint64_t> journal_records_coalesced_{0};
  // The background folder.
  Mutex folder_mu_;
  std::condition_variable_any folder_cv_;
  bool folder_stop_ ABSL_GUARDED_BY(folder_mu_) = false;
  bool folder_wake_ ABSL_GUARDED_BY(folder_mu_) = false;
  std::thread folder_;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_STORE_STATE_STORE_H_
