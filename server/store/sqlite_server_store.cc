#include "server/store/sqlite_server_store.h"

#include <sqlite3.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <filesystem>
#include <limits>
#include <system_error>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "common/errno_status.h"
#include "common/sqlite_util.h"

namespace dmapin::server {
namespace {

constexpr absl::string_view kMetaEpoch = "epoch";
constexpr absl::string_view kMetaIdBlockEnd = "id_block_end";

// Migration i takes the schema from version i to version i + 1; never edit a released one, append.
constexpr const char* kMigrations[] = {
    // Version 1.
    R"sql(
CREATE TABLE meta (
  key TEXT PRIMARY KEY NOT NULL,
  value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE policies (
  name TEXT PRIMARY KEY NOT NULL,
  body BLOB NOT NULL  -- dmapin.v1.Policy
) WITHOUT ROWID;

-- seq: first-insertion order (an upsert keeps it).
CREATE TABLE intents (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  node TEXT NOT NULL,
  state INTEGER NOT NULL,
  body BLOB NOT NULL  -- dmapin.v1.Intent
);
CREATE INDEX intents_by_node_state ON intents (node, state);
CREATE INDEX intents_by_state ON intents (state);

-- sent_ns: sent_time as Unix nanoseconds, the order of ListDecisions (RFC 3339 strings with
-- varying fraction digits do not sort as text).
CREATE TABLE decisions (
  id TEXT PRIMARY KEY NOT NULL,
  node TEXT NOT NULL,
  intent_id TEXT NOT NULL,
  sent_ns INTEGER NOT NULL,
  in_flight INTEGER NOT NULL CHECK (in_flight IN (0, 1)),
  body BLOB NOT NULL  -- dmapin.v1.DecisionRecord
) WITHOUT ROWID;
CREATE INDEX decisions_by_time ON decisions (sent_ns, id);
CREATE INDEX decisions_by_node ON decisions (node, sent_ns, id);
CREATE INDEX decisions_by_intent ON decisions (intent_id, sent_ns, id);
CREATE INDEX decisions_in_flight ON decisions (sent_ns, id) WHERE in_flight = 1;

CREATE TABLE node_admin (
  name TEXT PRIMARY KEY NOT NULL,
  cordoned INTEGER NOT NULL CHECK (cordoned IN (0, 1)),
  drain_active INTEGER NOT NULL CHECK (drain_active IN (0, 1)),
  drain_started TEXT NOT NULL
) WITHOUT ROWID;
)sql",
};

constexpr int kCurrentSchemaVersion = sizeof(kMigrations) / sizeof(kMigrations[0]);

// ListDecisions: ?1 node, ?2 intent_id, (?3, ?4) the last (sent_ns, id) returned, ?5 limit.
#define DMAPIN_DECISIONS_AFTER "(sent_ns, id) > (?3, ?4) ORDER BY sent_ns, id LIMIT ?5"

constexpr const char* kSqlText[] = {
    /* kBeginWrite */ "BEGIN IMMEDIATE",
    /* kBeginRead */ "BEGIN",
    /* kCommit */ "COMMIT",
    /* kRollback */ "ROLLBACK",
    /* kSelectMeta */ "SELECT value FROM meta WHERE key = ?1",
    /* kUpsertMeta */
    "INSERT INTO meta (key, value) VALUES (?1, ?2) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    /* kUpsertPolicy */
    "INSERT INTO policies (name, body) VALUES (?1, ?2) "
    "ON CONFLICT (name) DO UPDATE SET body = excluded.body",
    /* kDeletePolicy */ "DELETE FROM policies WHERE name = ?1",
    /* kUpsertIntent */
    "INSERT INTO intents (id, node, state, body) VALUES (?1, ?2, ?3, ?4) "
    "ON CONFLICT (id) DO UPDATE SET node = excluded.node, state = excluded.state, "
    "body = excluded.body",
    /* kDeleteIntent */ "DELETE FROM intents WHERE id = ?1",
    /* kUpsertDecision */
    "INSERT INTO decisions (id, node, intent_id, sent_ns, in_flight, body) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO UPDATE SET node = excluded.node, "
    "intent_id = excluded.intent_id, sent_ns = excluded.sent_ns, in_flight = excluded.in_flight, "
    "body = excluded.body",
    /* kUpsertNodeState */
    "INSERT INTO node_admin (name, cordoned, drain_active, drain_started) "
    "VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name) DO UPDATE SET cordoned = excluded.cordoned, "
    "drain_active = excluded.drain_active, drain_started = excluded.drain_started",
    /* kDeleteNodeState */ "DELETE FROM node_admin WHERE name = ?1",
    /* kLoadPolicies */ "SELECT name, body FROM policies ORDER BY name",
    /* kLoadIntents */ "SELECT id, body FROM intents ORDER BY seq",
    /* kLoadNodeStates */
    "SELECT name, cordoned, drain_active, drain_started FROM node_admin ORDER BY name",
    /* kListDecisionsAll */
    "SELECT id, body, sent_ns FROM decisions WHERE " DMAPIN_DECISIONS_AFTER,
    /* kListDecisionsNode */
    "SELECT id, body, sent_ns FROM decisions WHERE node = ?1 AND " DMAPIN_DECISIONS_AFTER,
    /* kListDecisionsIntent */
    "SELECT id, body, sent_ns FROM decisions WHERE intent_id = ?2 AND " DMAPIN_DECISIONS_AFTER,
    /* kListDecisionsBoth */
    "SELECT id, body, sent_ns FROM decisions WHERE node = ?1 AND intent_id = ?2 "
    "AND " DMAPIN_DECISIONS_AFTER,
    /* kLoadInFlight */
    "SELECT id, body FROM decisions WHERE in_flight = 1 ORDER BY sent_ns, id",
    /* kPruneDecisions */
    "DELETE FROM decisions WHERE in_flight = 0 AND id IN (SELECT id FROM decisions "
    "WHERE in_flight = 0 ORDER BY sent_ns DESC, id DESC LIMIT -1 OFFSET ?1)",
};

#undef DMAPIN_DECISIONS_AFTER

constexpr int kNumStatements = sizeof(kSqlText) / sizeof(kSqlText[0]);

void BindBlob(sqlite3_stmt* stmt, int index, const std::string& value) {
  sqlite3_bind_blob(stmt, index, value.data(), static_cast<int>(value.size()), SQLITE_TRANSIENT);
}

// Parses the BLOB in column `index` into `message`.
bool ColumnProto(sqlite3_stmt* stmt, int index, google::protobuf::MessageLite* message) {
  const void* data = sqlite3_column_blob(stmt, index);
  const int size = sqlite3_column_bytes(stmt, index);
  if (data == nullptr) return size == 0 && message->ParseFromString(std::string());
  return message->ParseFromArray(data, size);
}

absl::Status Invalid(absl::string_view what) {
  return ErrnoStatus(EINVAL, absl::StrCat("server store mutation: ", what));
}

// sent_time as Unix nanoseconds.
absl::StatusOr<int64_t> SentNanos(const v1::DecisionRecord& decision) {
  absl::Time time;
  std::string error;
  if (!absl::ParseTime(absl::RFC3339_full, decision.sent_time(), &time, &error)) {
    return Invalid(absl::StrCat("decision \"", decision.id(), "\": sent_time \"",
                                absl::CHexEscape(decision.sent_time()),
                                "\" is not RFC 3339: ", error));
  }
  return absl::ToUnixNanos(time);
}

absl::Status Validate(const ServerMutation::Op& op) {
  if (const auto* policy = std::get_if<v1::Policy>(&op)) {
    if (policy->name().empty()) return Invalid("policy with an empty name");
    return absl::OkStatus();
  }
  if (const auto* del = std::get_if<ServerMutation::DeletePolicyOp>(&op)) {
    if (del->name.empty()) return Invalid("delete of a policy with an empty name");
    return absl::OkStatus();
  }
  if (const auto* intent = std::get_if<v1::Intent>(&op)) {
    if (intent->id().empty()) return Invalid("intent with an empty id");
    return absl::OkStatus();
  }
  if (const auto* del = std::get_if<ServerMutation::DeleteIntentOp>(&op)) {
    if (del->id.empty()) return Invalid("delete of an intent with an empty id");
    return absl::OkStatus();
  }
  if (const auto* decision = std::get_if<v1::DecisionRecord>(&op)) {
    if (decision->id().empty()) return Invalid("decision with an empty id");
    return SentNanos(*decision).status();
  }
  if (const auto* node = std::get_if<NodeAdminState>(&op)) {
    if (node->name.empty()) return Invalid("node state with an empty name");
    return absl::OkStatus();
  }
  if (const auto* del = std::get_if<ServerMutation::DeleteNodeStateOp>(&op)) {
    if (del->name.empty()) return Invalid("delete of a node state with an empty name");
    return absl::OkStatus();
  }
  return Invalid("unknown operation");
}

// --- Page tokens --------------------------------------------------------------------------------

// FNV-1a: stable across processes (absl::Hash is not), so a token survives a server restart.
uint64_t Fingerprint(absl::string_view node, absl::string_view intent_id) {
  uint64_t hash = 0xcbf29ce484222325u;
  auto mix = [&hash](absl::string_view s) {
    for (char c : s) {
      hash ^= static_cast<unsigned char>(c);
      hash *= 0x100000001b3u;
    }
    hash ^= 0xff;  // separator: ("ab", "") and ("a", "b") differ
    hash *= 0x100000001b3u;
  };
  mix(node);
  mix(intent_id);
  return hash;
}

// "d1:<filter fingerprint hex>:<sent_ns>:<id>", web-safe base64.
std::string EncodeToken(const DecisionQuery& query, int64_t sent_ns, absl::string_view id) {
  return absl::WebSafeBase64Escape(absl::StrCat(
      "d1:", absl::Hex(Fingerprint(query.node, query.intent_id)), ":", sent_ns, ":", id));
}

absl::Status DecodeToken(const DecisionQuery& query, int64_t* sent_ns, std::string* id) {
  auto bad = [](absl::string_view why) {
    return ErrnoStatus(EINVAL, absl::StrCat("page_token: ", why));
  };
  std::string raw;
  if (!absl::WebSafeBase64Unescape(query.page_token, &raw)) return bad("malformed");
  std::vector<std::string> parts = absl::StrSplit(raw, absl::MaxSplits(':', 3));
  uint64_t fingerprint = 0;
  if (parts.size() != 4 || parts[0] != "d1" || !absl::SimpleHexAtoi(parts[1], &fingerprint) ||
      !absl::SimpleAtoi(parts[2], sent_ns)) {
    return bad("malformed");
  }
  if (fingerprint != Fingerprint(query.node, query.intent_id)) {
    return bad("belongs to a query with other filters (node, intent_id)");
  }
  *id = std::move(parts[3]);
  return absl::OkStatus();
}

}  // namespace

enum SqliteServerStore::Sql : int {
  kBeginWrite,
  kBeginRead,
  kCommit,
  kRollback,
  kSelectMeta,
  kUpsertMeta,
  kUpsertPolicy,
  kDeletePolicy,
  kUpsertIntent,
  kDeleteIntent,
  kUpsertDecision,
  kUpsertNodeState,
  kDeleteNodeState,
  kLoadPolicies,
  kLoadIntents,
  kLoadNodeStates,
  kListDecisionsAll,
  kListDecisionsNode,
  kListDecisionsIntent,
  kListDecisionsBoth,
  kLoadInFlight,
  kPruneDecisions,
  kSqlCount,
};

int SqliteServerStore::CurrentSchemaVersion() { return kCurrentSchemaVersion; }

SqliteServerStore::SqliteServerStore(std::string path, SqliteServerStoreOptions options,
                                     sqlite3* db)
    : path_(std::move(path)),
      database_(absl::StrCat("server database ", path_)),
      options_(std::move(options)),
      db_(db),
      statements_(db, database_, kSqlText) {
  static_assert(kSqlCount == kNumStatements, "kSqlText and Sql disagree");
}

SqliteServerStore::~SqliteServerStore() {
  MutexLock lock(&mu_);
  statements_.Clear();
  sqlite3_close_v2(db_);
}

absl::StatusOr<std::unique_ptr<SqliteServerStore>> SqliteServerStore::Open(
    const std::string& dir, SqliteServerStoreOptions options) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return ErrnoStatus(error.value(), absl::StrCat("cannot create the state directory ", dir, ": ",
                                                   error.message()));
  }
  if (options.id_block_size == 0) options.id_block_size = 1;
  std::string path = absl::StrCat(dir, "/server.db");
  sqlite3* db = nullptr;
  // NOMUTEX: the store's own mutex serializes every use of the connection.
  const int rc = sqlite3_open_v2(
      path.c_str(), &db,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE,
      nullptr);
  if (rc != SQLITE_OK) {
    absl::Status status = SqliteStatus(db, absl::StrCat("server database ", path), rc, "open");
    sqlite3_close_v2(db);
    return status;
  }
  std::unique_ptr<SqliteServerStore> store(
      new SqliteServerStore(std::move(path), std::move(options), db));
  {
    MutexLock lock(&store->mu_);
    if (absl::Status status = store->InitLocked(); !status.ok()) return status;
  }
  return store;
}

absl::Status SqliteServerStore::InitLocked() {
  if (absl::Status s = PrepareDatabase(db_, database_, options_.sync_full); !s.ok()) return s;
  return MigrateSchema(db_, database_, {std::begin(kMigrations), std::end(kMigrations)}, "server");
}

absl::Status SqliteServerStore::SqliteError(int rc, absl::string_view what) const {
  return SqliteStatus(db_, database_, rc, what);
}

absl::StatusOr<sqlite3_stmt*> SqliteServerStore::StatementLocked(int sql) const {
  return statements_.Get(sql);
}

absl::Status SqliteServerStore::RunLocked(sqlite3_stmt* stmt, absl::string_view what) const {
  return RunStatement(db_, database_, stmt, what);
}

absl::Status SqliteServerStore::ExecLocked(int sql, absl::string_view what) const {
  absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(sql);
  if (!stmt.ok()) return stmt.status();
  return RunLocked(*stmt, what);
}

void SqliteServerStore::RollbackLocked() const {
  // A failed COMMIT (I/O error, ...) may already have rolled back.
  if (sqlite3_get_autocommit(db_)) return;
  (void)ExecLocked(kRollback, "rollback");
}

absl::Status SqliteServerStore::EachRowLocked(
    int sql, const std::function<void(sqlite3_stmt*)>& bind,
    const std::function<absl::Status(sqlite3_stmt*)>& row) const {
  absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(sql);
  if (!stmt.ok()) return stmt.status();
  ScopedReset reset(*stmt);
  if (bind) bind(*stmt);
  int rc;
  while ((rc = sqlite3_step(*stmt)) == SQLITE_ROW) {
    if (absl::Status s = row(*stmt); !s.ok()) return s;
  }
  if (rc != SQLITE_DONE) return SqliteError(rc, kSqlText[sql]);
  return absl::OkStatus();
}

absl::Status SqliteServerStore::ReadTransactionLocked(
    const std::function<absl::Status()>& body) const {
  if (absl::Status s = ExecLocked(kBeginRead, "begin read"); !s.ok()) return s;
  absl::Status status = body();
  if (status.ok()) status = ExecLocked(kCommit, "end read");
  if (!status.ok()) RollbackLocked();
  return status;
}

absl::StatusOr<uint64_t> SqliteServerStore::MetaU64Locked(absl::string_view key,
                                                          uint64_t fallback) const {
  uint64_t value = fallback;
  absl::Status status = EachRowLocked(
      kSelectMeta, [&](sqlite3_stmt* stmt) { BindText(stmt, 1, key); },
      [&](sqlite3_stmt* stmt) {
        const std::string text = ColumnText(stmt, 0);
        if (!absl::SimpleAtoi(text, &value)) {
          return SqliteDamaged(
              database_,
              absl::StrCat("meta ", key, " = \"", absl::CHexEscape(text), "\" is not a number"));
        }
        return absl::OkStatus();
      });
  if (!status.ok()) return status;
  return value;
}

absl::Status SqliteServerStore::PutMetaLocked(absl::string_view key,
                                              absl::string_view value) const {
  absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kUpsertMeta);
  if (!stmt.ok()) return stmt.status();
  BindText(*stmt, 1, key);
  BindText(*stmt, 2, value);
  return RunLocked(*stmt, absl::StrCat("put meta ", key));
}

absl::Status SqliteServerStore::WriteTransactionLocked(const std::function<absl::Status()>& body) {
  const int number = ++transaction_number_;
  if (absl::Status s = ExecLocked(kBeginWrite, absl::StrCat("begin transaction #", number));
      !s.ok()) {
    return s;
  }
  absl::Status status = body();
  if (status.ok() && options_.fail_commit_hook) {
    absl::Status injected = options_.fail_commit_hook(number);
    if (!injected.ok()) {
      status = ErrnoStatus(
          EIO, absl::StrCat("transaction #", number, ": injected failure: ", injected.ToString()));
    }
  }
  if (status.ok()) status = ExecLocked(kCommit, absl::StrCat("commit transaction #", number));
  if (!status.ok()) RollbackLocked();
  return status;
}

// --- Commit -------------------------------------------------------------------------------------

// Group commit, as LevelDB's DBImpl::Write and the agent's StateStore.
struct SqliteServerStore::Writer {
  const ServerMutation* mutation;
  absl::Status status;
  bool done = false;
  std::condition_variable_any cv;
};

absl::Status SqliteServerStore::Commit(const ServerMutation& mutation) {
  if (mutation.empty()) return absl::OkStatus();
  for (const ServerMutation::Op& op : mutation.ops()) {
    if (absl::Status status = Validate(op); !status.ok()) {
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
      if (!batch.empty() && ops + writer->mutation->size() > kMaxOpsPerTransaction) break;
      ops += writer->mutation->size();
      batch.push_back(writer);
    }
  }

  {
    MutexLock lock(&mu_);
    std::vector<const ServerMutation*> mutations;
    for (Writer* writer : batch) mutations.push_back(writer->mutation);
    absl::Status status = CommitLocked(mutations);
    if (status.ok() || batch.size() == 1) {
      for (Writer* writer : batch) writer->status = status;
    } else {
      // One bad mutation (DeletePolicy of an absent policy, ...) must not fail its neighbours.
      for (Writer* writer : batch) writer->status = CommitLocked({writer->mutation});
    }
    for (Writer* writer : batch) {
      if (writer->status.ok()) {
        commits_.fetch_add(1, std::memory_order_relaxed);
      } else {
        failed_commits_.fetch_add(1, std::memory_order_relaxed);
      }
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

absl::Status SqliteServerStore::CommitLocked(absl::Span<const ServerMutation* const> mutations) {
  absl::Status status = WriteTransactionLocked([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const ServerMutation* mutation : mutations) {
      for (size_t i = 0; i < mutation->ops().size(); ++i) {
        absl::Status s = ApplyLocked(mutation->ops()[i]);
        if (!s.ok()) {
          if (s.code() == absl::StatusCode::kNotFound) return s;
          // Keeps the code (DATA_LOSS for a damaged file) and adds which operation failed.
          return ErrnoStatus(EIO, s.code(),
                             absl::StrCat("operation ", i + 1, " of ", mutation->ops().size(), ": ",
                                          absl::StripPrefix(s.message(), "EIO: ")));
        }
      }
    }
    return absl::OkStatus();
  });
  if (status.ok()) transactions_.fetch_add(1, std::memory_order_relaxed);
  return status;
}

absl::Status SqliteServerStore::ApplyLocked(const ServerMutation::Op& op) {
  if (const auto* policy = std::get_if<v1::Policy>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kUpsertPolicy);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, policy->name());
    BindBlob(*stmt, 2, policy->SerializeAsString());
    return RunLocked(*stmt, absl::StrCat("put policy \"", policy->name(), "\""));
  }
  if (const auto* del = std::get_if<ServerMutation::DeletePolicyOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kDeletePolicy);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, del->name);
    if (absl::Status s = RunLocked(*stmt, absl::StrCat("delete policy \"", del->name, "\""));
        !s.ok()) {
      return s;
    }
    if (sqlite3_changes(db_) == 0) {
      return ErrnoStatus(ENOENT, absl::StrCat("policy \"", del->name, "\" not found"));
    }
    return absl::OkStatus();
  }
  if (const auto* intent = std::get_if<v1::Intent>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kUpsertIntent);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, intent->id());
    BindText(*stmt, 2, intent->node());
    sqlite3_bind_int(*stmt, 3, static_cast<int>(intent->state()));
    BindBlob(*stmt, 4, intent->SerializeAsString());
    return RunLocked(*stmt, absl::StrCat("put intent \"", intent->id(), "\""));
  }
  if (const auto* del = std::get_if<ServerMutation::DeleteIntentOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kDeleteIntent);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, del->id);
    return RunLocked(*stmt, absl::StrCat("delete intent \"", del->id, "\""));
  }
  if (const auto* decision = std::get_if<v1::DecisionRecord>(&op)) {
    absl::StatusOr<int64_t> sent_ns = SentNanos(*decision);
    if (!sent_ns.ok()) return sent_ns.status();
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kUpsertDecision);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, decision->id());
    BindText(*stmt, 2, decision->node());
    BindText(*stmt, 3, decision->intent_id());
    sqlite3_bind_int64(*stmt, 4, *sent_ns);
    sqlite3_bind_int(*stmt, 5, decision->result().empty() ? 1 : 0);
    BindBlob(*stmt, 6, decision->SerializeAsString());
    return RunLocked(*stmt, absl::StrCat("put decision \"", decision->id(), "\""));
  }
  if (const auto* node = std::get_if<NodeAdminState>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kUpsertNodeState);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, node->name);
    sqlite3_bind_int(*stmt, 2, node->cordoned ? 1 : 0);
    sqlite3_bind_int(*stmt, 3, node->drain_active ? 1 : 0);
    BindText(*stmt, 4, node->drain_started);
    return RunLocked(*stmt, absl::StrCat("put node state \"", node->name, "\""));
  }
  if (const auto* del = std::get_if<ServerMutation::DeleteNodeStateOp>(&op)) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kDeleteNodeState);
    if (!stmt.ok()) return stmt.status();
    BindText(*stmt, 1, del->name);
    return RunLocked(*stmt, absl::StrCat("delete node state \"", del->name, "\""));
  }
  return Invalid("unknown operation");
}

// --- Reads --------------------------------------------------------------------------------------

absl::StatusOr<std::vector<v1::Policy>> SqliteServerStore::LoadPolicies() const {
  MutexLock lock(&mu_);
  std::vector<v1::Policy> policies;
  absl::Status status = EachRowLocked(kLoadPolicies, nullptr, [&](sqlite3_stmt* stmt) {
    if (!ColumnProto(stmt, 1, &policies.emplace_back())) {
      return SqliteDamaged(database_,
                           absl::StrCat("policy \"", ColumnText(stmt, 0), "\" does not parse"));
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return policies;
}

absl::StatusOr<std::vector<v1::Intent>> SqliteServerStore::LoadIntents() const {
  MutexLock lock(&mu_);
  std::vector<v1::Intent> intents;
  absl::Status status = EachRowLocked(kLoadIntents, nullptr, [&](sqlite3_stmt* stmt) {
    if (!ColumnProto(stmt, 1, &intents.emplace_back())) {
      return SqliteDamaged(database_,
                           absl::StrCat("intent \"", ColumnText(stmt, 0), "\" does not parse"));
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return intents;
}

absl::StatusOr<std::vector<NodeAdminState>> SqliteServerStore::LoadNodeStates() const {
  MutexLock lock(&mu_);
  std::vector<NodeAdminState> nodes;
  absl::Status status = EachRowLocked(kLoadNodeStates, nullptr, [&](sqlite3_stmt* stmt) {
    NodeAdminState& node = nodes.emplace_back();
    node.name = ColumnText(stmt, 0);
    node.cordoned = sqlite3_column_int(stmt, 1) != 0;
    node.drain_active = sqlite3_column_int(stmt, 2) != 0;
    node.drain_started = ColumnText(stmt, 3);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return nodes;
}

absl::StatusOr<DecisionPage> SqliteServerStore::ListDecisions(const DecisionQuery& query) const {
  int64_t after_ns = std::numeric_limits<int64_t>::min();
  std::string after_id;  // "" sorts before every id, and ids are never empty
  if (!query.page_token.empty()) {
    if (absl::Status s = DecodeToken(query, &after_ns, &after_id); !s.ok()) return s;
  }
  uint32_t page_size = query.page_size == 0 ? DecisionQuery::kDefaultPageSize : query.page_size;
  page_size = std::min(page_size, DecisionQuery::kMaxPageSize);
  const int sql = query.node.empty()
                      ? (query.intent_id.empty() ? kListDecisionsAll : kListDecisionsIntent)
                      : (query.intent_id.empty() ? kListDecisionsNode : kListDecisionsBoth);

  MutexLock lock(&mu_);
  DecisionPage page;
  int64_t last_ns = 0;
  std::string last_id;
  int rows = 0;
  absl::Status status = EachRowLocked(
      sql,
      [&](sqlite3_stmt* stmt) {
        if (!query.node.empty()) BindText(stmt, 1, query.node);
        if (!query.intent_id.empty()) BindText(stmt, 2, query.intent_id);
        sqlite3_bind_int64(stmt, 3, after_ns);
        BindText(stmt, 4, after_id);
        // One more than the page: tells whether there is a next page.
        sqlite3_bind_int64(stmt, 5, int64_t{page_size} + 1);
      },
      [&](sqlite3_stmt* stmt) {
        if (++rows > static_cast<int>(page_size)) return absl::OkStatus();
        last_id = ColumnText(stmt, 0);
        last_ns = sqlite3_column_int64(stmt, 2);
        if (!ColumnProto(stmt, 1, &page.decisions.emplace_back())) {
          return SqliteDamaged(database_,
                               absl::StrCat("decision \"", last_id, "\" does not parse"));
        }
        return absl::OkStatus();
      });
  if (!status.ok()) return status;
  if (rows > static_cast<int>(page_size))
    page.next_page_token = EncodeToken(query, last_ns, last_id);
  return page;
}

absl::StatusOr<std::vector<v1::DecisionRecord>> SqliteServerStore::LoadInFlightDecisions() const {
  MutexLock lock(&mu_);
  std::vector<v1::DecisionRecord> decisions;
  absl::Status status = EachRowLocked(kLoadInFlight, nullptr, [&](sqlite3_stmt* stmt) {
    if (!ColumnProto(stmt, 1, &decisions.emplace_back())) {
      return SqliteDamaged(database_,
                           absl::StrCat("decision \"", ColumnText(stmt, 0), "\" does not parse"));
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return decisions;
}

// --- Other writes -------------------------------------------------------------------------------

absl::StatusOr<uint64_t> SqliteServerStore::PruneDecisions(uint64_t keep_last_n) {
  MutexLock lock(&mu_);
  uint64_t deleted = 0;
  absl::Status status = WriteTransactionLocked([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::StatusOr<sqlite3_stmt*> stmt = StatementLocked(kPruneDecisions);
    if (!stmt.ok()) return stmt.status();
    // OFFSET is signed: n >= 2^63 keeps everything anyway.
    sqlite3_bind_int64(*stmt, 1,
                       static_cast<int64_t>(std::min<uint64_t>(
                           keep_last_n, uint64_t{std::numeric_limits<int64_t>::max()})));
    if (absl::Status s = RunLocked(*stmt, "prune decisions"); !s.ok()) return s;
    deleted = static_cast<uint64_t>(sqlite3_changes(db_));
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return deleted;
}

absl::StatusOr<uint64_t> SqliteServerStore::BumpEpoch() {
  MutexLock lock(&mu_);
  uint64_t epoch = 0;
  absl::Status status = WriteTransactionLocked([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::StatusOr<uint64_t> stored = MetaU64Locked(kMetaEpoch, 0);
    if (!stored.ok()) return stored.status();
    if (*stored == std::numeric_limits<uint64_t>::max()) {
      return SqliteDamaged(database_, "the epoch is at its maximum");
    }
    epoch = *stored + 1;
    return PutMetaLocked(kMetaEpoch, absl::StrCat(epoch));
  });
  if (!status.ok()) return status;
  return epoch;
}

absl::StatusOr<uint64_t> SqliteServerStore::NextIds(uint64_t n) {
  if (n == 0) return ErrnoStatus(EINVAL, "NextIds: n must be >= 1");
  MutexLock ids(&ids_mu_);
  if (block_end_ - next_id_ >= n) {
    const uint64_t first = next_id_;
    next_id_ += n;
    return first;
  }
  // A new block, starting at the stored end (not at ours: another process may have claimed
  // blocks since). The rest of the current block is skipped.
  MutexLock lock(&mu_);
  uint64_t first = 0;
  uint64_t end = 0;
  absl::Status status = WriteTransactionLocked([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::StatusOr<uint64_t> stored = MetaU64Locked(kMetaIdBlockEnd, 1);
    if (!stored.ok()) return stored.status();
    const uint64_t size = std::max(n, options_.id_block_size);
    if (*stored == 0) return SqliteDamaged(database_, "meta id_block_end is 0");
    if (*stored > std::numeric_limits<uint64_t>::max() - size) {
      return ErrnoStatus(
          EOVERFLOW, absl::StrCat(database_, ": the id counter is exhausted (at ", *stored, ")"));
    }
    first = *stored;
    end = first + size;
    return PutMetaLocked(kMetaIdBlockEnd, absl::StrCat(end));
  });
  if (!status.ok()) return status;
  id_blocks_.fetch_add(1, std::memory_order_relaxed);
  next_id_ = first + n;
  block_end_ = end;
  return first;
}

ServerStoreStats SqliteServerStore::stats() const {
  ServerStoreStats stats;
  stats.commits = commits_.load(std::memory_order_relaxed);
  stats.failed_commits = failed_commits_.load(std::memory_order_relaxed);
  stats.transactions = transactions_.load(std::memory_order_relaxed);
  stats.id_blocks = id_blocks_.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace dmapin::server
