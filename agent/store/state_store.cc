#include "agent/store/state_store.h"

#include <sqlite3.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <filesystem>
#include <optional>
#include <system_error>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/errno_status.h"
#include "common/sqlite_util.h"

namespace dmapin::agent {
namespace {

// Migration i takes the schema from version i to version i + 1; never edit a released one, append.
constexpr const char* kMigrations[] = {
    // Version 1.
    R"sql(
CREATE TABLE meta (
  key TEXT PRIMARY KEY NOT NULL,
  value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE contexts (
  name TEXT PRIMARY KEY NOT NULL,
  id INTEGER NOT NULL UNIQUE,
  memlock_limit_bytes INTEGER,  -- NULL: unlimited
  cap_ipc_lock INTEGER NOT NULL CHECK (cap_ipc_lock IN (0, 1)),
  backing INTEGER NOT NULL,
  mem_ua INTEGER NOT NULL,
  mem_size INTEGER NOT NULL
);

CREATE TABLE containers (
  name TEXT PRIMARY KEY NOT NULL,
  id INTEGER NOT NULL UNIQUE,
  iommu_page_size INTEGER NOT NULL,
  window_start INTEGER NOT NULL,
  window_size INTEGER NOT NULL
);

-- AUTOINCREMENT: seq never goes backwards, even after the newest hold is removed.
CREATE TABLE holds (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  container TEXT NOT NULL REFERENCES containers (name) ON DELETE CASCADE,
  context TEXT NOT NULL REFERENCES contexts (name) ON DELETE CASCADE,
  ua INTEGER NOT NULL,
  size INTEGER NOT NULL,
  UNIQUE (container, context, ua, size)
);
CREATE INDEX holds_by_context ON holds (context);

CREATE TABLE pending (
  context TEXT NOT NULL REFERENCES contexts (name) ON DELETE CASCADE,
  ua INTEGER NOT NULL,
  size INTEGER NOT NULL,
  PRIMARY KEY (context, ua, size)
) WITHOUT ROWID;

-- iova: 8-byte big-endian, so that BLOB order (memcmp) is unsigned 64-bit order.
CREATE TABLE mappings (
  container TEXT NOT NULL REFERENCES containers (name) ON DELETE CASCADE,
  iova BLOB NOT NULL CHECK (typeof(iova) = 'blob' AND length(iova) = 8),
  size INTEGER NOT NULL,
  ua INTEGER NOT NULL,
  PRIMARY KEY (container, iova)
) WITHOUT ROWID;

CREATE TABLE applied_decisions (
  decision_id TEXT PRIMARY KEY NOT NULL,
  epoch INTEGER NOT NULL,
  result INTEGER NOT NULL,  -- errno, 0 = success
  applied_at INTEGER NOT NULL  -- Unix time, milliseconds
) WITHOUT ROWID;
)sql",
    // Version 2: the memory context a container is bound to (spec §1: from its first registration
    // on, even after it lets every region go), backfilled from the holds; a VFIO container's
    // IOMMU groups.
    R"sql(
ALTER TABLE containers ADD COLUMN context TEXT REFERENCES contexts (name) ON DELETE CASCADE;
-- VFIO backends: the container's IOMMU group paths, comma-separated ('' for sim and memlock).
ALTER TABLE containers ADD COLUMN vfio_groups TEXT NOT NULL DEFAULT '';
UPDATE containers SET context =
  (SELECT context FROM holds WHERE holds.container = containers.name ORDER BY seq LIMIT 1);
)sql",
    // Version 3: the VMM that owns a context (pid 0: none) and the slots of its memory the agent
    // mapped.
    R"sql(
ALTER TABLE contexts ADD COLUMN owner_pid INTEGER NOT NULL DEFAULT 0;
ALTER TABLE contexts ADD COLUMN owner_uid INTEGER NOT NULL DEFAULT 0;
-- Clock ticks after boot (/proc/<pid>/stat field 22).
ALTER TABLE contexts ADD COLUMN owner_start_time INTEGER NOT NULL DEFAULT 0;
-- The local process that created a container (pid 0: none), which may map on it while unbound.
ALTER TABLE containers ADD COLUMN creator_pid INTEGER NOT NULL DEFAULT 0;
ALTER TABLE containers ADD COLUMN creator_start_time INTEGER NOT NULL DEFAULT 0;
CREATE TABLE memory_slots (
  context TEXT NOT NULL REFERENCES contexts (name) ON DELETE CASCADE,
  ua INTEGER NOT NULL,
  size INTEGER NOT NULL,
  offset INTEGER NOT NULL,
  dev INTEGER NOT NULL,
  ino INTEGER NOT NULL,
  PRIMARY KEY (context, ua)
) WITHOUT ROWID;
)sql",
    // Version 4: VFIO containers whose VMM holds their descriptors (the device handoff), and where
    // a type1 registration lives in its container's IOVA space, so that a restarted agent can
    // take the kernel's state back without unmapping anything.
    R"sql(
ALTER TABLE containers ADD COLUMN handed_off INTEGER NOT NULL DEFAULT 0 CHECK (handed_off IN (0, 1));
-- Type1: the first IOVA of the registration's pin range mapping (0: none, as for SPAPR).
ALTER TABLE holds ADD COLUMN device_iova INTEGER NOT NULL DEFAULT 0;
)sql",
};

constexpr int kCurrentSchemaVersion = sizeof(kMigrations) / sizeof(kMigrations[0]);

// Upserts, not INSERT OR REPLACE: REPLACE deletes the old row first, which would cascade to the
// holds, pending regions and mappings that reference it.
constexpr const char* kSqlText[] = {
    /* kBeginWrite */ "BEGIN IMMEDIATE",
    /* kBeginRead */ "BEGIN",
    /* kCommit */ "COMMIT",
    /* kRollback */ "ROLLBACK",
    /* kUpsertContext */
    "INSERT INTO contexts (name, id, memlock_limit_bytes, cap_ipc_lock, backing, mem_ua, mem_size, "
    "owner_pid, owner_uid, owner_start_time) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (name) DO UPDATE SET "
    "id = excluded.id, memlock_limit_bytes = excluded.memlock_limit_bytes, "
    "cap_ipc_lock = excluded.cap_ipc_lock, backing = excluded.backing, mem_ua = excluded.mem_ua, "
    "mem_size = excluded.mem_size, owner_pid = excluded.owner_pid, "
    "owner_uid = excluded.owner_uid, owner_start_time = excluded.owner_start_time",
    /* kDeleteSlotsOfContext */ "DELETE FROM memory_slots WHERE context = ?1",
    /* kInsertSlot */
    "INSERT INTO memory_slots (context, ua, size, offset, dev, ino) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    /* kDeleteContainersOfContext */
    "DELETE FROM containers WHERE context = ?1",
    /* kDeleteContext */ "DELETE FROM contexts WHERE name = ?1",
    /* kUpsertContainer */
    "INSERT INTO containers (name, id, iommu_page_size, window_start, window_size, vfio_groups, "
    "creator_pid, creator_start_time, handed_off) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (name) DO UPDATE SET "
    "id = excluded.id, iommu_page_size = excluded.iommu_page_size, "
    "window_start = excluded.window_start, window_size = excluded.window_size, "
    "vfio_groups = excluded.vfio_groups, creator_pid = excluded.creator_pid, "
    "creator_start_time = excluded.creator_start_time, handed_off = excluded.handed_off",
    /* kDeleteContainer */ "DELETE FROM containers WHERE name = ?1",
    /* kBindContainer */ "UPDATE containers SET context = ?2 WHERE name = ?1",
    /* kMarkHandedOff */ "UPDATE containers SET handed_off = 1 WHERE name = ?1",
    /* kInsertHold */
    "INSERT INTO holds (container, context, ua, size, device_iova) VALUES (?1, ?2, ?3, ?4, ?5)",
    /* kDeleteHold */
    "DELETE FROM holds WHERE container = ?1 AND context = ?2 AND ua = ?3 AND size = ?4",
    /* kInsertPending */
    "INSERT INTO pending (context, ua, size) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
    /* kDeletePending */ "DELETE FROM pending WHERE context = ?1 AND ua = ?2 AND size = ?3",
    /* kMappingAtOrBefore */
    "SELECT iova, size, ua FROM mappings WHERE container = ?1 AND iova <= ?2 "
    "ORDER BY iova DESC LIMIT 1",
    /* kMappingsStartingIn */
    "SELECT iova, size, ua FROM mappings WHERE container = ?1 AND iova > ?2 AND iova <= ?3 "
    "ORDER BY iova",
    /* kDeleteMapping */ "DELETE FROM mappings WHERE container = ?1 AND iova = ?2",
    /* kTrimMapping */ "UPDATE mappings SET size = ?3 WHERE container = ?1 AND iova = ?2",
    /* kInsertMapping */ "INSERT INTO mappings (container, iova, size, ua) VALUES (?1, ?2, ?3, ?4)",
    /* kInsertDecision */
    "INSERT INTO applied_decisions (decision_id, epoch, result, applied_at) "
    "VALUES (?1, ?2, ?3, ?4)",
    /* kUpsertMeta */
    "INSERT INTO meta (key, value) VALUES (?1, ?2) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    /* kSelectDecision */ "SELECT result FROM applied_decisions WHERE decision_id = ?1",
    /* kLoadContexts */
    "SELECT name, id, memlock_limit_bytes, cap_ipc_lock, backing, mem_ua, mem_size, owner_pid, "
    "owner_uid, owner_start_time FROM contexts",
    /* kLoadSlots */ "SELECT context, ua, size, offset, dev, ino FROM memory_slots",
    /* kLoadContainers */
    "SELECT name, id, iommu_page_size, window_start, window_size, context, vfio_groups, "
    "creator_pid, creator_start_time, handed_off FROM containers",
    /* kLoadHolds */
    "SELECT container, context, ua, size, seq, device_iova FROM holds ORDER BY seq",
    /* kLoadPending */ "SELECT context, ua, size FROM pending",
    /* kLoadMappings */ "SELECT container, iova, size, ua FROM mappings ORDER BY container, iova",
    /* kLoadDecisions */
    "SELECT decision_id, epoch, result, applied_at FROM applied_decisions ORDER BY decision_id",
    /* kLoadMeta */ "SELECT key, value FROM meta",
    /* kContainerNameById */ "SELECT name FROM containers WHERE id = ?1",
    /* kSelectMeta */ "SELECT value FROM meta WHERE key = ?1",
};

constexpr int kNumStatements = sizeof(kSqlText) / sizeof(kSqlText[0]);

// uint64 values travel as their int64 bit pattern.
void BindU64(sqlite3_stmt* stmt, int index, uint64_t value) {
  sqlite3_bind_int64(stmt, index, static_cast<sqlite3_int64>(value));
}

void BindIova(sqlite3_stmt* stmt, int index, uint64_t iova) {
  unsigned char bytes[8];
  for (int i = 7; i >= 0; --i) {
    bytes[i] = static_cast<unsigned char>(iova & 0xff);
    iova >>= 8;
  }
  sqlite3_bind_blob(stmt, index, bytes, sizeof(bytes), SQLITE_TRANSIENT);
}

uint64_t ColumnU64(sqlite3_stmt* stmt, int index) {
  return static_cast<uint64_t>(sqlite3_column_int64(stmt, index));
}

// False when the column is not an 8-byte blob (the CHECK constraint rules that out).
bool ColumnIova(sqlite3_stmt* stmt, int index, uint64_t* iova) {
  const auto* bytes = static_cast<const unsigned char*>(sqlite3_column_blob(stmt, index));
  if (bytes == nullptr || sqlite3_column_bytes(stmt, index) != 8) return false;
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value = (value << 8) | bytes[i];
  *iova = value;
  return true;
}

// [start, start + size) is non-empty and does not wrap past 2^64.
bool ValidRange(uint64_t start, uint64_t size) { return size != 0 && start + (size - 1) >= start; }

absl::Status Invalid(absl::string_view what) {
  return ErrnoStatus(EINVAL, absl::StrCat("state store mutation: ", what));
}

absl::Status CheckName(absl::string_view kind, absl::string_view name) {
  if (name.empty()) return Invalid(absl::StrCat("empty ", kind, " name"));
  return absl::OkStatus();
}

absl::Status CheckRange(absl::string_view kind, uint64_t start, uint64_t size) {
  if (!ValidRange(start, size)) {
    return Invalid(
        absl::StrCat(kind, " 0x", absl::Hex(start), "+0x", absl::Hex(size), " is empty or wraps"));
  }
  return absl::OkStatus();
}

}  // namespace

enum StateStore::Sql : int {
  kBeginWrite,
  kBeginRead,
  kCommit,
  kRollback,
  kUpsertContext,
  kDeleteSlotsOfContext,
  kInsertSlot,
  kDeleteContainersOfContext,
  kDeleteContext,
  kUpsertContainer,
  kDeleteContainer,
  kBindContainer,
  kMarkHandedOff,
  kInsertHold,
  kDeleteHold,
  kInsertPending,
  kDeletePending,
  kMappingAtOrBefore,
  kMappingsStartingIn,
  kDeleteMapping,
  kTrimMapping,
  kInsertMapping,
  kInsertDecision,
  kUpsertMeta,
  kSelectDecision,
  kLoadContexts,
  kLoadSlots,
  kLoadContainers,
  kLoadHolds,
  kLoadPending,
  kLoadMappings,
  kLoadDecisions,
  kLoadMeta,
  kContainerNameById,
  kSelectMeta,
  kSqlCount,
};

// --- Mutation --------------------------------------------------------------------------------

Mutation& Mutation::PutContext(StoredContext context) {
  ops_.emplace_back(std::move(context));
  return *this;
}

Mutation& Mutation::DeleteContext(absl::string_view name) {
  ops_.emplace_back(DeleteContextOp{std::string(name)});
  return *this;
}

Mutation& Mutation::PutContainer(StoredContainer container) {
  ops_.emplace_back(std::move(container));
  return *this;
}

Mutation& Mutation::DeleteContainer(absl::string_view name) {
  ops_.emplace_back(DeleteContainerOp{std::string(name)});
  return *this;
}

Mutation& Mutation::BindContainer(absl::string_view container, absl::string_view context) {
  ops_.emplace_back(BindOp{std::string(container), std::string(context)});
  return *this;
}

Mutation& Mutation::MarkHandedOff(absl::string_view container) {
  ops_.emplace_back(HandOffOp{std::string(container)});
  return *this;
}

Mutation& Mutation::AddHold(absl::string_view container, absl::string_view context, uint64_t ua,
                            uint64_t size, uint64_t device_iova) {
  ops_.emplace_back(
      HoldOp{true, std::string(container), std::string(context), ua, size, device_iova});
  return *this;
}

Mutation& Mutation::RemoveHold(absl::string_view container, absl::string_view context, uint64_t ua,
                               uint64_t size) {
  ops_.emplace_back(HoldOp{false, std::string(container), std::string(context), ua, size, 0});
  return *this;
}

Mutation& Mutation::PutPending(absl::string_view context, uint64_t ua, uint64_t size) {
  ops_.emplace_back(PendingOp{true, std::string(context), ua, size});
  return *this;
}

Mutation& Mutation::RemovePending(absl::string_view context, uint64_t ua, uint64_t size) {
  ops_.emplace_back(PendingOp{false, std::string(context), ua, size});
  return *this;
}

Mutation& Mutation::SetMapping(absl::string_view container, uint64_t iova, uint64_t size,
                               uint64_t ua) {
  ops_.emplace_back(MappingOp{true, std::string(container), iova, size, ua});
  return *this;
}

Mutation& Mutation::ClearMappings(absl::string_view container, uint64_t iova, uint64_t size) {
  ops_.emplace_back(MappingOp{false, std::string(container), iova, size, 0});
  return *this;
}

Mutation& Mutation::RecordDecision(absl::string_view decision_id, uint64_t epoch,
                                   int result_errno) {
  ops_.emplace_back(DecisionOp{std::string(decision_id), epoch, result_errno});
  return *this;
}

Mutation& Mutation::PutMeta(absl::string_view key, absl::string_view value) {
  ops_.emplace_back(MetaOp{std::string(key), std::string(value)});
  return *this;
}

// --- StateStore ------------------------------------------------------------------------------

int StateStore::CurrentSchemaVersion() { return kCurrentSchemaVersion; }

absl::Status StateStore::Validate(const Mutation::Op& op) {
  if (const auto* context = std::get_if<StoredContext>(&op)) {
    return CheckName("context", context->name);
  }
  if (const auto* del = std::get_if<Mutation::DeleteContextOp>(&op)) {
    return CheckName("context", del->name);
  }
  if (const auto* container = std::get_if<StoredContainer>(&op)) {
    for (const std::string& group : container->vfio_groups) {
      if (group.empty() || absl::StrContains(group, ',')) {
        return Invalid(absl::StrCat("container \"", container->name, "\": VFIO group path \"",
                                    group, "\" is empty or has a comma"));
      }
    }
    return CheckName("container", container->name);
  }
  if (const auto* del = std::get_if<Mutation::DeleteContainerOp>(&op)) {
    return CheckName("container", del->name);
  }
  if (const auto* bind = std::get_if<Mutation::BindOp>(&op)) {
    if (absl::Status s = CheckName("container", bind->container); !s.ok()) return s;
    return CheckName("context", bind->context);
  }
  if (const auto* handoff = std::get_if<Mutation::HandOffOp>(&op)) {
    return CheckName("container", handoff->container);
  }
  if (const auto* hold = std::get_if<Mutation::HoldOp>(&op)) {
    if (absl::Status s = CheckName("container", hold->container); !s.ok()) return s;
    if (absl::Status s = CheckName("context", hold->context); !s.ok()) return s;
    return CheckRange("hold", hold->ua, hold->size);
  }
  if (const auto* pending = std::get_if<Mutation::PendingOp>(&op)) {
    if (absl::Status s = CheckName("context", pending->context); !s.ok()) return s;
    return CheckRange("pending region", pending->ua, pending->size);
  }
  if (const auto* mapping = std::get_if<Mutation::MappingOp>(&op)) {
    if (absl::Status s = CheckName("container", mapping->container); !s.ok()) return s;
    if (absl::Status s = CheckRange("mapping iova", mapping->iova, mapping->size); !s.ok()) {
      return s;
    }
    if (mapping->set) return CheckRange("mapping ua", mapping->ua, mapping->size);
    return absl::OkStatus();
  }
  if (const auto* decision = std::get_if<Mutation::DecisionOp>(&op)) {
    if (decision->decision_id.empty()) return Invalid("empty decision id");
    return absl::OkStatus();
  }
  if (const auto* meta = std::get_if<Mutation::MetaOp>(&op)) {
    if (meta->key.empty()) return Invalid("empty meta key");
    if (meta->key == kMetaSchemaVersion || meta->key == kMetaJournalFoldedSeq ||
        meta->key == kMetaJournalFileSeq) {
      return Invalid(absl::StrCat("meta key \"", meta->key, "\" belongs to the store"));
    }
    return absl::OkStatus();
  }
  return Invalid("unknown operation");
}

StateStore::StateStore(std::string path, StateStoreOptions options, sqlite3* db)
    : path_(std::move(path)),
      database_(absl::StrCat("state database ", path_)),
      options_(std::move(options)),
      db_(db),
      statements_(db, database_, kSqlText) {
  static_assert(kSqlCount == kNumStatements, "kSqlText and Sql disagree");
}

StateStore::~StateStore() {
  if (folder_.joinable()) {
    {
      MutexLock lock(&folder_mu_);
      folder_stop_ = true;
    }
    folder_cv_.notify_one();
    folder_.join();
  }
  MutexLock lock(&mu_);
  // Best effort: whatever is not folded here is folded from the files at the next Open.
  if (journal_ != nullptr) (void)FoldJournalLocked();
  statements_.Clear();
  sqlite3_close_v2(db_);
}

namespace {

// Moves the store's files in `dir` aside (`<name>.damaged.<unix time>`); returns what it moved.
std::vector<std::string> SetAsideStoreFiles(const std::string& dir, const std::string& path) {
  const std::string suffix = absl::StrCat(".damaged.", absl::ToUnixSeconds(absl::Now()));
  std::vector<std::string> files = ListJournalFiles(dir);
  for (const char* sqlite_file : {"", "-wal", "-shm"}) {
    files.push_back(absl::StrCat(path, sqlite_file));
  }
  std::vector<std::string> moved;
  for (const std::string& file : files) {
    const std::string aside = file + suffix;
    if (rename(file.c_str(), aside.c_str()) == 0) moved.push_back(aside);
  }
  return moved;
}

absl::StatusOr<sqlite3*> OpenDatabase(const std::string& path) {
  sqlite3* db = nullptr;
  // NOMUTEX: the store's own mutex serializes every use of the connection.
  const int rc = sqlite3_open_v2(
      path.c_str(), &db,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE,
      nullptr);
  if (rc != SQLITE_OK) {
    absl::Status status = SqliteStatus(db, absl::StrCat("state database ", path), rc, "open");
    sqlite3_close_v2(db);
    return status;
  }
  return db;
}

constexpr absl::string_view kRecoverHint =
    "; or start with --recover_damaged_state to set the damaged files aside and start this node "
    "empty";

}  // namespace

absl::StatusOr<std::unique_ptr<StateStore>> StateStore::Open(const std::string& dir,
                                                             StateStoreOptions options) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return ErrnoStatus(error.value(), absl::StrCat("cannot create the state directory ", dir, ": ",
                                                   error.message()));
  }
  std::string path = absl::StrCat(dir, "/state.db");
  std::vector<std::string> report;
  bool set_aside = false;
  // First start, or state lost? Every Open leaves a journal file beside the database, so a
  // missing or empty database with journal files beside it is a node whose state went away.
  struct stat st;
  const bool database_exists = stat(path.c_str(), &st) == 0;
  if ((!database_exists || st.st_size == 0) && !ListJournalFiles(dir).empty()) {
    const std::string what = absl::StrCat(path, database_exists ? " is empty" : " is missing",
                                          " but the mapping journal of an earlier run is in ", dir,
                                          ": this node's state is lost, not new");
    if (!options.recover_damaged_state) {
      return ErrnoStatus(EIO, absl::StatusCode::kDataLoss,
                         absl::StrCat(what, ". Restore state.db", kRecoverHint));
    }
    report.push_back(absl::StrCat(what, ". Recovering: starting empty; moved aside: ",
                                  absl::StrJoin(SetAsideStoreFiles(dir, path), ", ")));
    set_aside = true;
  }
  std::unique_ptr<StateStore> store;
  for (int attempt = 0;; ++attempt) {
    absl::StatusOr<sqlite3*> db = OpenDatabase(path);
    if (!db.ok()) return db.status();
    store.reset(new StateStore(path, options, *db));
    absl::Status status;
    {
      MutexLock lock(&store->mu_);
      status = store->InitLocked();
    }
    if (status.ok()) break;
    store.reset();
    if (status.code() != absl::StatusCode::kDataLoss) return status;
    if (!options.recover_damaged_state || attempt > 0) {
      return AppendToMessage(status, kRecoverHint);
    }
    report.push_back(absl::StrCat(status.message(), ". Recovering: starting empty; moved aside: ",
                                  absl::StrJoin(SetAsideStoreFiles(dir, path), ", ")));
    set_aside = true;
  }
  store->recovery_report_ = std::move(report);
  store->state_set_aside_ = set_aside;
  {
    MutexLock lock(&store->mu_);
    // The journal's records from before a crash, folded before anyone reads or writes.
    absl::StatusOr<uint64_t> folded_seq = store->MetaU64Locked(kMetaJournalFoldedSeq);
    if (!folded_seq.ok()) return folded_seq.status();
    absl::StatusOr<uint64_t> file_seq = store->MetaU64Locked(kMetaJournalFileSeq);
    if (!file_seq.ok()) return file_seq.status();
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal =
        MappingJournal::Open(dir, *folded_seq + 1,
                             {.sync = store->options_.sync_full,
                              .fail_append_hook = store->options_.fail_journal_append_hook,
                              .expected_file_seq = *file_seq,
                              .recover_damaged = store->options_.recover_damaged_state});
    if (!journal.ok()) return journal.status();
    store->journal_ = std::move(*journal);
    for (const std::string& line : store->journal_->damage_report()) {
      store->recovery_report_.push_back(line);
    }
    std::vector<JournalRecord> records;
    for (const JournalRecord& record : store->journal_->recovered()) {
      if (record.seq > *folded_seq) records.push_back(record);
    }
    // Also records the file appends now go to: a later Open must find it.
    if (absl::Status status = store->FoldLocked(records, store->journal_->current_file_seq());
        !status.ok()) {
      return AppendToMessage(status, " (at open: the journal left by the previous run)");
    }
    if (!store->journal_->recovered().empty()) {
      store->journal_->DropFolded(store->journal_->recovered().back().seq);
    }
  }
  store->folder_ = std::thread([raw = store.get()] { raw->FoldInBackground(); });
  return store;
}

absl::StatusOr<uint64_t> StateStore::MetaU64Locked(absl::string_view key) const {
  absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kSelectMeta);
  if (!stmt.ok()) return stmt.status();
  ScopedReset reset(*stmt);
  BindText(*stmt, 1, key);
  const int rc = sqlite3_step(*stmt);
  if (rc == SQLITE_ROW) return ColumnU64(*stmt, 0);
  if (rc != SQLITE_DONE) return SqliteError(rc, absl::StrCat("read ", key));
  return 0;
}

absl::Status StateStore::RecordMap(uint64_t container_id, uint64_t iova, uint64_t size,
                                   uint64_t ua) {
  return Record(JournalRecord::kMap, container_id, iova, size, ua);
}

absl::Status StateStore::RecordClear(uint64_t container_id, uint64_t iova, uint64_t size) {
  return Record(JournalRecord::kClear, container_id, iova, size, 0);
}

absl::Status StateStore::Record(JournalRecord::Kind kind, uint64_t container_id, uint64_t iova,
                                uint64_t size, uint64_t ua) {
  if (absl::Status status = CheckRange("mapping iova", iova, size); !status.ok()) return status;
  if (kind == JournalRecord::kMap) {
    if (absl::Status status = CheckRange("mapping ua", ua, size); !status.ok()) return status;
  }
  if (fold_failed_.load(std::memory_order_acquire)) {
    return ErrnoStatus(EIO, absl::StrCat(database_,
                                         ": folding the mapping journal failed earlier; "
                                         "the store takes no more changes"));
  }
  size_t unfolded = 0;
  absl::StatusOr<uint64_t> seq = journal_->Append(kind, container_id, iova, size, ua, &unfolded);
  if (!seq.ok()) return seq.status();
  if (unfolded >= options_.journal_fold_records) {
    {
      MutexLock lock(&folder_mu_);
      folder_wake_ = true;
    }
    folder_cv_.notify_one();
  }
  return absl::OkStatus();
}

void StateStore::FoldInBackground() {
  MutexLock lock(&folder_mu_);
  while (!folder_stop_) {
    folder_cv_.wait_for(
        folder_mu_, absl::ToChronoNanoseconds(options_.journal_fold_interval),
        [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return folder_stop_ || folder_wake_; });
    if (folder_stop_) break;
    folder_wake_ = false;
    folder_mu_.Unlock();
    // A failure is sticky and answered to the next caller; nothing more to do here.
    (void)FoldJournal();
    folder_mu_.Lock();
  }
}

absl::Status StateStore::FoldJournal() {
  MutexLock lock(&mu_);
  return FoldJournalLocked();
}

namespace {

// Trims or splits the rows overlapping [iova, iova + size), as Mutation::ClearMappings does.
void ClearRows(std::vector<StoredMapping>& rows, uint64_t iova, uint64_t size) {
  const uint64_t last = iova + (size - 1);
  std::vector<StoredMapping> kept;
  for (const StoredMapping& row : rows) {
    const uint64_t row_last = row.iova + (row.size - 1);
    if (row_last < iova || row.iova > last) {
      kept.push_back(row);
      continue;
    }
    if (row.iova < iova) {
      kept.push_back({row.container, row.iova, iova - row.iova, row.ua});
    }
    if (row_last > last) {
      kept.push_back({row.container, last + 1, row_last - last, row.ua + (last + 1 - row.iova)});
    }
  }
  rows = std::move(kept);
}

}  // namespace

absl::StatusOr<std::vector<StoredMapping>> StateStore::AcknowledgedMappings(uint64_t container_id,
                                                                            uint64_t iova,
                                                                            uint64_t size) {
  if (size == 0 || iova + (size - 1) < iova) {
    return ErrnoStatus(EINVAL, "acknowledged mappings: empty or wrapping range");
  }
  MutexLock lock(&mu_);
  if (fold_failed_.load(std::memory_order_acquire)) {
    return ErrnoStatus(EIO, absl::StrCat(database_,
                                         ": folding the mapping journal failed earlier; "
                                         "its records are only in the files"));
  }
  if (absl::Status s = ExecLocked(kBeginRead, "begin read"); !s.ok()) return s;
  PersistedState state;
  absl::Status status = LoadLocked(&state);
  if (status.ok()) status = ExecLocked(kCommit, "end read");
  if (!status.ok()) {
    RollbackLocked();
    return status;
  }
  auto container = std::find_if(state.containers.begin(), state.containers.end(),
                                [&](const StoredContainer& c) { return c.id == container_id; });
  if (container == state.containers.end()) {
    return ErrnoStatus(ENOENT, absl::StrCat("container id ", container_id, " is not stored"));
  }
  std::vector<StoredMapping> rows;
  for (StoredMapping& row : state.mappings) {
    if (row.container == container->name) rows.push_back(std::move(row));
  }
  // Under mu_ no fold runs: every record is either folded above or still in the journal.
  for (const JournalRecord& record : journal_->PeekUnfolded()) {
    if (record.container_id != container_id) continue;
    ClearRows(rows, record.iova, record.size);
    if (record.kind == JournalRecord::kMap) {
      rows.push_back({container->name, record.iova, record.size, record.ua});
    }
  }
  // Clip to the range: what lies outside it goes, twice over.
  if (iova > 0) ClearRows(rows, 0, iova);
  const uint64_t last = iova + (size - 1);
  if (last != ~uint64_t{0}) ClearRows(rows, last + 1, ~uint64_t{0} - last);
  std::sort(rows.begin(), rows.end(),
            [](const StoredMapping& a, const StoredMapping& b) { return a.iova < b.iova; });
  return rows;
}

absl::Status StateStore::FoldJournalLocked() {
  if (fold_failed_.load(std::memory_order_acquire)) {
    return ErrnoStatus(EIO, absl::StrCat(database_,
                                         ": folding the mapping journal failed earlier; "
                                         "the store takes no more changes"));
  }
  uint64_t appending = 0;
  std::vector<JournalRecord> records = journal_->TakeUnfolded(&appending);
  if (records.empty()) return absl::OkStatus();
  absl::Status status = FoldLocked(records, appending);
  if (!status.ok()) {
    fold_failed_.store(true, std::memory_order_release);
    return status;
  }
  journal_->DropFolded(records.back().seq);
  return absl::OkStatus();
}

absl::Status StateStore::FoldLocked(const std::vector<JournalRecord>& records, uint64_t file_seq) {
  if (absl::Status status = ExecLocked(kBeginWrite, "begin journal fold"); !status.ok()) {
    return status;
  }
  // Container names by id, looked up once per fold. A container deleted since its records were
  // written has no row: its mappings went with it.
  absl::flat_hash_map<uint64_t, std::optional<std::string>> names;
  absl::Status status;
  uint64_t rows = 0;
  uint64_t skipped = 0;
  absl::StatusOr<sqlite3_stmt*> by_id = StatementLocked(kContainerNameById);
  if (!by_id.ok()) status = by_id.status();
  const std::vector<JournalRecord> effective = Coalesce(records);
  for (size_t i = 0; i < effective.size() && status.ok(); ++i) {
    const JournalRecord& record = effective[i];
    auto [name, inserted] = names.try_emplace(record.container_id);
    if (inserted) {
      ScopedReset reset(*by_id);
      BindU64(*by_id, 1, record.container_id);
      const int rc = sqlite3_step(*by_id);
      if (rc == SQLITE_ROW) {
        name->second = ColumnText(*by_id, 0);
      } else if (rc != SQLITE_DONE) {
        status = SqliteError(rc, "look up a container by id");
        break;
      }
    }
    if (!name->second.has_value()) {
      ++skipped;
      continue;
    }
    status = ApplyLocked(Mutation::MappingOp{record.kind == JournalRecord::kMap, *name->second,
                                             record.iova, record.size, record.ua},
                         0, &rows);
  }
  if (status.ok() && !records.empty()) {
    status = ApplyLocked(
        Mutation::MetaOp{std::string(kMetaJournalFoldedSeq), absl::StrCat(records.back().seq)}, 0,
        &rows);
  }
  if (status.ok()) {
    status = ApplyLocked(Mutation::MetaOp{std::string(kMetaJournalFileSeq), absl::StrCat(file_seq)},
                         0, &rows);
  }
  if (status.ok()) status = ExecLocked(kCommit, "commit journal fold");
  if (!status.ok()) {
    RollbackLocked();
    return ErrnoStatus(
        EIO, status.code(),
        absl::StrCat("folding mapping journal records ",
                     records.empty() ? std::string("(none)")
                                     : absl::StrCat(records.front().seq, "-", records.back().seq),
                     " into ", database_, ": ", absl::StripPrefix(status.message(), "EIO: ")));
  }
  journal_folds_.fetch_add(1, std::memory_order_relaxed);
  journal_records_folded_.fetch_add(records.size() - skipped, std::memory_order_relaxed);
  journal_records_coalesced_.fetch_add(records.size() - effective.size(),
                                       std::memory_order_relaxed);
  journal_records_skipped_.fetch_add(skipped, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status StateStore::InitLocked() {
  // The full check: a damaged index passes the quick one, and recovery would then read through it
  // (an acknowledged release came back). The agent's database is small; see the README for costs.
  if (absl::Status s = PrepareDatabase(db_, database_, options_.sync_full, IntegrityCheck::kFull);
      !s.ok()) {
    return s;
  }
  // A SQLite built without foreign keys ignores the pragma; the cascades depend on it.
  absl::StatusOr<std::vector<std::string>> fk =
      QueryColumn(db_, database_, "PRAGMA foreign_keys = ON");
  if (fk.ok()) fk = QueryColumn(db_, database_, "PRAGMA foreign_keys");
  if (!fk.ok()) return fk.status();
  if (fk->size() != 1 || (*fk)[0] != "1") {
    return ErrnoStatus(EIO, "this SQLite does not enforce foreign keys");
  }
  return MigrateSchema(db_, database_, {std::begin(kMigrations), std::end(kMigrations)}, "agent");
}

absl::Status StateStore::SqliteError(int rc, absl::string_view what) const {
  return SqliteStatus(db_, database_, rc, what);
}

absl::StatusOr<sqlite3_stmt*> StateStore::StatementLocked(Sql sql) const {
  return statements_.Get(sql);
}

absl::Status StateStore::RunLocked(sqlite3_stmt* stmt, absl::string_view what,
                                   uint64_t* rows) const {
  return RunStatement(db_, database_, stmt, what, rows);
}

absl::Status StateStore::ExecLocked(Sql sql, absl::string_view what) const {
  absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(sql);
  if (!stmt.ok()) return stmt.status();
  return RunLocked(*stmt, what);
}

void StateStore::RollbackLocked() const {
  // A failed COMMIT (I/O error, ...) may already have rolled back.
  if (sqlite3_get_autocommit(db_)) return;
  // If even ROLLBACK fails, the next BEGIN fails too: every later commit reports EIO.
  (void)ExecLocked(kRollback, "rollback");
}

// Group commit, as LevelDB's DBImpl::Write: concurrent callers queue up; the one at the front
// commits the mutations of everyone queued behind it in one transaction, so N concurrent commits
// cost one BEGIN/COMMIT (one WAL write, one fsync with sync_full) instead of N.
struct StateStore::Writer {
  const Mutation* mutation;
  absl::Status status;
  bool done = false;
  std::condition_variable_any cv;
};

absl::Status StateStore::Commit(const Mutation& mutation) {
  if (mutation.empty()) return absl::OkStatus();
  for (size_t i = 0; i < mutation.ops_.size(); ++i) {
    if (absl::Status status = Validate(mutation.ops_[i]); !status.ok()) {
      failed_commits_.fetch_add(1, std::memory_order_relaxed);
      return status;
    }
  }

  Writer self{&mutation};
  std::vector<Writer*> batch;
  {
    MutexLock queue(&queue_mu_);
    writers_.push_back(&self);
    while (!self.done && writers_.front() != &self) self.cv.wait(queue_mu_);
    if (self.done) return self.status;
    // The leader takes everyone queued now, bounded so one transaction stays short.
    size_t ops = 0;
    for (Writer* writer : writers_) {
      if (!batch.empty() && ops + writer->mutation->ops_.size() > kMaxOpsPerTransaction) break;
      ops += writer->mutation->ops_.size();
      batch.push_back(writer);
    }
  }

  {
    MutexLock lock(&mu_);
    std::vector<const Mutation*> mutations;
    for (Writer* writer : batch) mutations.push_back(writer->mutation);
    // The journal's records precede these mutations: fold them first.
    absl::Status status = FoldJournalLocked();
    if (!status.ok()) {
      failed_commits_.fetch_add(batch.size(), std::memory_order_relaxed);
    } else {
      status = CommitLocked(mutations);
    }
    if (status.ok() || batch.size() == 1 || fold_failed_.load(std::memory_order_acquire)) {
      for (Writer* writer : batch) writer->status = status;
    } else {
      // One bad mutation must not fail its neighbours: retry each on its own.
      for (Writer* writer : batch) writer->status = CommitLocked({writer->mutation});
    }
  }

  MutexLock queue(&queue_mu_);
  for (Writer* writer : batch) {
    writers_.pop_front();
    if (writer != &self) {
      writer->done = true;
      writer->cv.notify_one();
    }
  }
  if (!writers_.empty()) writers_.front()->cv.notify_one();
  return self.status;
}

absl::Status StateStore::CommitLocked(absl::Span<const Mutation* const> mutations) {
  const int number = ++commit_number_;
  auto fail = [&](absl::Status status) {
    failed_commits_.fetch_add(mutations.size(), std::memory_order_relaxed);
    return status;
  };
  if (absl::Status status = ExecLocked(kBeginWrite, "begin"); !status.ok()) return fail(status);
  const int64_t now_ms = absl::ToUnixMillis(absl::Now());
  uint64_t rows = 0;
  absl::Status status;
  for (const Mutation* mutation : mutations) {
    for (size_t i = 0; i < mutation->ops_.size() && status.ok(); ++i) {
      status = ApplyLocked(mutation->ops_[i], now_ms, &rows);
      if (!status.ok()) {
        // Keeps the code (DATA_LOSS for a damaged file) and adds which operation failed.
        status = ErrnoStatus(
            EIO, status.code(),
            absl::StrCat("commit #", number, ", operation ", i + 1, " of ", mutation->ops_.size(),
                         ": ", absl::StripPrefix(status.message(), "EIO: ")));
      }
    }
  }
  if (status.ok() && options_.fail_commit_hook) {
    absl::Status injected = options_.fail_commit_hook(number);
    if (!injected.ok()) {
      status = ErrnoStatus(
          EIO, absl::StrCat("commit #", number, ": injected failure: ", injected.ToString()));
    }
  }
  if (status.ok()) status = ExecLocked(kCommit, absl::StrCat("commit #", number));
  if (!status.ok()) {
    RollbackLocked();
    return fail(status);
  }
  commits_.fetch_add(mutations.size(), std::memory_order_relaxed);
  transactions_.fetch_add(1, std::memory_order_relaxed);
  rows_written_.fetch_add(rows, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status StateStore::ApplyLocked(const Mutation::Op& op, int64_t now_ms, uint64_t* rows) {
  if (const auto* context = std::get_if<StoredContext>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kUpsertContext);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, context->name);
    BindU64(*stmt, 2, context->id);
    if (context->memlock_limit_bytes.has_value()) {
      BindU64(*stmt, 3, *context->memlock_limit_bytes);
    } else {
      sqlite3_bind_null(*stmt, 3);
    }
    sqlite3_bind_int(*stmt, 4, context->cap_ipc_lock ? 1 : 0);
    sqlite3_bind_int(*stmt, 5, context->backing);
    BindU64(*stmt, 6, context->mem_ua);
    BindU64(*stmt, 7, context->mem_size);
    sqlite3_bind_int64(*stmt, 8, context->owner_pid);
    BindU64(*stmt, 9, context->owner_uid);
    BindU64(*stmt, 10, context->owner_start_time);
    absl::Status status =
        RunLocked(*stmt, absl::StrCat("put context \"", context->name, "\""), rows);
    if (!status.ok()) return status;
    absl::StatusOr<sqlite3_stmt*> clear = StatementLocked(kDeleteSlotsOfContext);
    if (!clear.ok()) return clear.status();
    BindText(*clear, 1, context->name);
    status =
        RunLocked(*clear, absl::StrCat("clear the slots of context \"", context->name, "\""), rows);
    if (!status.ok()) return status;
    for (const StoredSlot& slot : context->slots) {
      absl::StatusOr<sqlite3_stmt*> insert = StatementLocked(kInsertSlot);
      if (!insert.ok()) return insert.status();
      BindText(*insert, 1, context->name);
      BindU64(*insert, 2, slot.ua);
      BindU64(*insert, 3, slot.size);
      BindU64(*insert, 4, slot.offset);
      BindU64(*insert, 5, slot.dev);
      BindU64(*insert, 6, slot.ino);
      status = RunLocked(
          *insert, absl::StrCat("put a memory slot of context \"", context->name, "\""), rows);
      if (!status.ok()) return status;
    }
    return absl::OkStatus();
  }
  if (const auto* del = std::get_if<Mutation::DeleteContextOp>(&op)) {
    // The containers first, explicitly: their holds and mappings go with them.
    absl::StatusOr<sqlite3_stmt*> containers = StatementLocked(kDeleteContainersOfContext);
    if (!containers.ok()) return containers.status();
    BindText(*containers, 1, del->name);
    absl::Status status = RunLocked(
        *containers, absl::StrCat("delete the containers of context \"", del->name, "\""), rows);
    if (!status.ok()) return status;
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kDeleteContext);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, del->name);
    return RunLocked(*stmt, absl::StrCat("delete context \"", del->name, "\""), rows);
  }
  if (const auto* container = std::get_if<StoredContainer>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kUpsertContainer);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, container->name);
    BindU64(*stmt, 2, container->id);
    BindU64(*stmt, 3, container->iommu_page_size);
    BindU64(*stmt, 4, container->window_start);
    BindU64(*stmt, 5, container->window_size);
    BindText(*stmt, 6, absl::StrJoin(container->vfio_groups, ","));
    sqlite3_bind_int64(*stmt, 7, container->creator_pid);
    BindU64(*stmt, 8, container->creator_start_time);
    sqlite3_bind_int64(*stmt, 9, container->handed_off ? 1 : 0);
    return RunLocked(*stmt, absl::StrCat("put container \"", container->name, "\""), rows);
  }
  if (const auto* del = std::get_if<Mutation::DeleteContainerOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kDeleteContainer);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, del->name);
    return RunLocked(*stmt, absl::StrCat("delete container \"", del->name, "\""), rows);
  }
  if (const auto* bind = std::get_if<Mutation::BindOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kBindContainer);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, bind->container);
    BindText(*stmt, 2, bind->context);
    return RunLocked(
        *stmt,
        absl::StrCat("bind container \"", bind->container, "\" to context \"", bind->context, "\""),
        rows);
  }
  if (const auto* handoff = std::get_if<Mutation::HandOffOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kMarkHandedOff);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, handoff->container);
    return RunLocked(*stmt, absl::StrCat("mark container \"", handoff->container, "\" handed off"),
                     rows);
  }
  if (const auto* hold = std::get_if<Mutation::HoldOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(hold->add ? kInsertHold : kDeleteHold);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, hold->container);
    BindText(*stmt, 2, hold->context);
    BindU64(*stmt, 3, hold->ua);
    BindU64(*stmt, 4, hold->size);
    if (hold->add) BindU64(*stmt, 5, hold->device_iova);
    return RunLocked(*stmt,
                     absl::StrCat(hold->add ? "add" : "remove", " hold of container \"",
                                  hold->container, "\" on context \"", hold->context, "\" ua=0x",
                                  absl::Hex(hold->ua), " size=0x", absl::Hex(hold->size)),
                     rows);
  }
  if (const auto* pending = std::get_if<Mutation::PendingOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt =
        StatementLocked(pending->add ? kInsertPending : kDeletePending);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, pending->context);
    BindU64(*stmt, 2, pending->ua);
    BindU64(*stmt, 3, pending->size);
    return RunLocked(*stmt,
                     absl::StrCat(pending->add ? "put" : "remove", " pending region of context \"",
                                  pending->context, "\" ua=0x", absl::Hex(pending->ua), " size=0x",
                                  absl::Hex(pending->size)),
                     rows);
  }
  if (const auto* mapping = std::get_if<Mutation::MappingOp>(&op)) {
    absl::Status status =
        ClearMappingRangeLocked(mapping->container, mapping->iova, mapping->size, rows);
    if (!status.ok() || !mapping->set) return status;
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kInsertMapping);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, mapping->container);
    BindIova(*stmt, 2, mapping->iova);
    BindU64(*stmt, 3, mapping->size);
    BindU64(*stmt, 4, mapping->ua);
    return RunLocked(*stmt,
                     absl::StrCat("set mapping of container \"", mapping->container, "\" iova=0x",
                                  absl::Hex(mapping->iova), " size=0x", absl::Hex(mapping->size)),
                     rows);
  }
  if (const auto* decision = std::get_if<Mutation::DecisionOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kInsertDecision);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, decision->decision_id);
    BindU64(*stmt, 2, decision->epoch);
    sqlite3_bind_int(*stmt, 3, decision->result);
    sqlite3_bind_int64(*stmt, 4, now_ms);
    return RunLocked(*stmt, absl::StrCat("record decision \"", decision->decision_id, "\""), rows);
  }
  if (const auto* meta = std::get_if<Mutation::MetaOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kUpsertMeta);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, meta->key);
    BindText(*stmt, 2, meta->value);
    return RunLocked(*stmt, absl::StrCat("put meta \"", meta->key, "\""), rows);
  }
  return ErrnoStatus(EINVAL, "unknown mutation operation");
}

absl::Status StateStore::ClearMappingRangeLocked(const std::string& container, uint64_t iova,
                                                 uint64_t size, uint64_t* rows) {
  // Inclusive ends throughout: a range may end at 2^64 - 1, where iova + size wraps to 0.
  const uint64_t last = iova + (size - 1);
  std::vector<StoredMapping> overlapping;
  auto collect = [&](Sql sql, bool with_last) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> absl::Status {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(sql);
    if (!stmt.ok()) return stmt.status();
    ScopedReset reset(*stmt);
    BindText(*stmt, 1, container);
    BindIova(*stmt, 2, iova);
    if (with_last) BindIova(*stmt, 3, last);
    int rc;
    while ((rc = sqlite3_step(*stmt)) == SQLITE_ROW) {
      StoredMapping row;
      row.container = container;
      if (!ColumnIova(*stmt, 0, &row.iova)) {
        return SqliteStatus(nullptr, database_, SQLITE_CORRUPT, "mapping iova is not 8 bytes");
      }
      row.size = ColumnU64(*stmt, 1);
      row.ua = ColumnU64(*stmt, 2);
      if (row.size == 0) continue;  // never written; would confuse the arithmetic below
      const uint64_t row_last = row.iova + (row.size - 1);
      if (row_last >= iova) overlapping.push_back(std::move(row));
    }
    if (rc != SQLITE_DONE) return SqliteError(rc, "find overlapping mappings");
    return absl::OkStatus();
  };
  // Rows never overlap, so only the last row starting at or before `iova` can reach into the
  // range from the left; every other overlapping row starts inside (iova, last].
  if (absl::Status s = collect(kMappingAtOrBefore, false); !s.ok()) return s;
  if (absl::Status s = collect(kMappingsStartingIn, true); !s.ok()) return s;

  for (const StoredMapping& row : overlapping) {
    const uint64_t row_last = row.iova + (row.size - 1);
    const std::string what =
        absl::StrCat("trim mapping of container \"", container, "\" iova=0x", absl::Hex(row.iova));
    absl::StatusOr<sqlite3_stmt*> stmt =
        StatementLocked(row.iova < iova ? kTrimMapping : kDeleteMapping);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, container);
    BindIova(*stmt, 2, row.iova);
    if (row.iova < iova) BindU64(*stmt, 3, iova - row.iova);  // keep the left part
    if (absl::Status s = RunLocked(*stmt, what, rows); !s.ok()) return s;
    if (row_last > last) {  // keep the right part, as its own row
      absl::StatusOr<sqlite3_stmt*> insert = StatementLocked(kInsertMapping);
      if (!insert.ok()) return insert.status();
      const uint64_t start = last + 1;
      BindText(*insert, 1, container);
      BindIova(*insert, 2, start);
      BindU64(*insert, 3, row_last - last);
      BindU64(*insert, 4, row.ua + (start - row.iova));
      if (absl::Status s = RunLocked(*insert, what, rows); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<PersistedState> StateStore::Load() {
  MutexLock lock(&mu_);
  if (absl::Status status = FoldJournalLocked(); !status.ok()) return status;
  // One read transaction: a snapshot even if another process writes meanwhile.
  if (absl::Status s = ExecLocked(kBeginRead, "begin load"); !s.ok()) return s;
  PersistedState state;
  absl::Status status = LoadLocked(&state);
  if (status.ok()) status = ExecLocked(kCommit, "end load");
  if (!status.ok()) {
    RollbackLocked();
    return status;
  }
  return state;
}

absl::Status StateStore::LoadLocked(PersistedState* state) const {
  // Runs `sql`, calling `row` for each result row.
  auto each = [this](Sql sql, const auto& row) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> absl::Status {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(sql);
    if (!stmt.ok()) return stmt.status();
    ScopedReset reset(*stmt);
    int rc;
    while ((rc = sqlite3_step(*stmt)) == SQLITE_ROW) {
      if (absl::Status s = row(*stmt); !s.ok()) return s;
    }
    if (rc != SQLITE_DONE) return SqliteError(rc, absl::StrCat("load: ", kSqlText[sql]));
    return absl::OkStatus();
  };
  absl::Status status = each(kLoadContexts, [&](sqlite3_stmt* stmt) {
    StoredContext& c = state->contexts.emplace_back();
    c.name = ColumnText(stmt, 0);
    c.id = ColumnU64(stmt, 1);
    if (sqlite3_column_type(stmt, 2) != SQLITE_NULL) c.memlock_limit_bytes = ColumnU64(stmt, 2);
    c.cap_ipc_lock = sqlite3_column_int(stmt, 3) != 0;
    c.backing = sqlite3_column_int(stmt, 4);
    c.mem_ua = ColumnU64(stmt, 5);
    c.mem_size = ColumnU64(stmt, 6);
    c.owner_pid = sqlite3_column_int64(stmt, 7);
    c.owner_uid = static_cast<uint32_t>(ColumnU64(stmt, 8));
    c.owner_start_time = ColumnU64(stmt, 9);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  {
    absl::flat_hash_map<std::string, StoredContext*> by_name;
    for (StoredContext& c : state->contexts) by_name[c.name] = &c;
    status = each(kLoadSlots, [&](sqlite3_stmt* stmt) {
      auto it = by_name.find(ColumnText(stmt, 0));
      // The foreign key makes a slot of no context impossible; skip rather than trust it.
      if (it == by_name.end()) return absl::OkStatus();
      it->second->slots.push_back({.ua = ColumnU64(stmt, 1),
                                   .size = ColumnU64(stmt, 2),
                                   .offset = ColumnU64(stmt, 3),
                                   .dev = ColumnU64(stmt, 4),
                                   .ino = ColumnU64(stmt, 5)});
      return absl::OkStatus();
    });
    if (!status.ok()) return status;
    for (StoredContext& c : state->contexts) {
      std::sort(c.slots.begin(), c.slots.end(),
                [](const StoredSlot& a, const StoredSlot& b) { return a.ua < b.ua; });
    }
  }
  status = each(kLoadContainers, [&](sqlite3_stmt* stmt) {
    StoredContainer& c = state->containers.emplace_back();
    c.name = ColumnText(stmt, 0);
    c.id = ColumnU64(stmt, 1);
    c.iommu_page_size = ColumnU64(stmt, 2);
    c.window_start = ColumnU64(stmt, 3);
    c.window_size = ColumnU64(stmt, 4);
    if (sqlite3_column_type(stmt, 5) != SQLITE_NULL) c.context = ColumnText(stmt, 5);
    const std::string groups = ColumnText(stmt, 6);
    if (!groups.empty()) c.vfio_groups = absl::StrSplit(groups, ',');
    c.creator_pid = sqlite3_column_int64(stmt, 7);
    c.creator_start_time = ColumnU64(stmt, 8);
    c.handed_off = sqlite3_column_int64(stmt, 9) != 0;
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  status = each(kLoadHolds, [&](sqlite3_stmt* stmt) {
    StoredHold& h = state->holds.emplace_back();
    h.container = ColumnText(stmt, 0);
    h.context = ColumnText(stmt, 1);
    h.ua = ColumnU64(stmt, 2);
    h.size = ColumnU64(stmt, 3);
    h.seq = sqlite3_column_int64(stmt, 4);
    h.device_iova = ColumnU64(stmt, 5);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  status = each(kLoadPending, [&](sqlite3_stmt* stmt) {
    StoredPending& p = state->pending.emplace_back();
    p.context = ColumnText(stmt, 0);
    p.ua = ColumnU64(stmt, 1);
    p.size = ColumnU64(stmt, 2);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  status = each(kLoadMappings, [&](sqlite3_stmt* stmt) {
    StoredMapping& m = state->mappings.emplace_back();
    m.container = ColumnText(stmt, 0);
    if (!ColumnIova(stmt, 1, &m.iova)) {
      return SqliteStatus(nullptr, database_, SQLITE_CORRUPT, "mapping iova is not 8 bytes");
    }
    m.size = ColumnU64(stmt, 2);
    m.ua = ColumnU64(stmt, 3);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  status = each(kLoadDecisions, [&](sqlite3_stmt* stmt) {
    StoredDecision& d = state->decisions.emplace_back();
    d.decision_id = ColumnText(stmt, 0);
    d.epoch = ColumnU64(stmt, 1);
    d.result = sqlite3_column_int(stmt, 2);
    d.applied_at = absl::FromUnixMillis(sqlite3_column_int64(stmt, 3));
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  status = each(kLoadMeta, [&](sqlite3_stmt* stmt) {
    state->meta[ColumnText(stmt, 0)] = ColumnText(stmt, 1);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;

  // Sorted here rather than in SQL: SQLite compares these uint64 columns as signed.
  std::sort(state->contexts.begin(), state->contexts.end(),
            [](const StoredContext& a, const StoredContext& b) { return a.id < b.id; });
  std::sort(state->containers.begin(), state->containers.end(),
            [](const StoredContainer& a, const StoredContainer& b) { return a.id < b.id; });
  std::sort(state->pending.begin(), state->pending.end(),
            [](const StoredPending& a, const StoredPending& b) {
              return std::tie(a.context, a.ua, a.size) < std::tie(b.context, b.ua, b.size);
            });
  return absl::OkStatus();
}

absl::StatusOr<std::optional<int>> StateStore::DecisionResult(absl::string_view decision_id) const {
  MutexLock lock(&mu_);
  absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kSelectDecision);
  if (!stmt.ok()) return stmt.status();
  ScopedReset reset(*stmt);
  BindText(*stmt, 1, decision_id);
  const int rc = sqlite3_step(*stmt);
  if (rc == SQLITE_ROW) return std::optional<int>(sqlite3_column_int(*stmt, 0));
  if (rc == SQLITE_DONE) return std::optional<int>();
  return SqliteError(rc, absl::StrCat("look up decision \"", decision_id, "\""));
}

StoreStats StateStore::stats() const {
  StoreStats stats;
  stats.commits = commits_.load(std::memory_order_relaxed);
  stats.failed_commits = failed_commits_.load(std::memory_order_relaxed);
  stats.rows_written = rows_written_.load(std::memory_order_relaxed);
  stats.transactions = transactions_.load(std::memory_order_relaxed);
  if (journal_ != nullptr) {
    const JournalStats journal = journal_->stats();
    stats.journal_records = journal.appends;
    stats.journal_failed_records = journal.failed_appends;
    stats.journal_torn_tail_bytes = journal.torn_tail_bytes;
    stats.journal_damaged_files = journal.damaged_files;
    stats.journal_damaged_records_dropped = journal.damaged_records_dropped;
  }
  stats.state_set_aside = state_set_aside_ ? 1 : 0;
  stats.journal_folds = journal_folds_.load(std::memory_order_relaxed);
  stats.journal_records_folded = journal_records_folded_.load(std::memory_order_relaxed);
  stats.journal_records_skipped = journal_records_skipped_.load(std::memory_order_relaxed);
  stats.journal_records_coalesced = journal_records_coalesced_.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace dmapin::agent
