#include "common/sqlite_util.h"

#include <algorithm>
#include <cerrno>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/errno_status.h"

namespace dmapin {

const char* SqliteCodeName(int rc) {
  switch (rc & 0xff) {
    case SQLITE_ERROR:
      return "SQLITE_ERROR";
    case SQLITE_INTERNAL:
      return "SQLITE_INTERNAL";
    case SQLITE_PERM:
      return "SQLITE_PERM";
    case SQLITE_ABORT:
      return "SQLITE_ABORT";
    case SQLITE_BUSY:
      return "SQLITE_BUSY";
    case SQLITE_LOCKED:
      return "SQLITE_LOCKED";
    case SQLITE_NOMEM:
      return "SQLITE_NOMEM";
    case SQLITE_READONLY:
      return "SQLITE_READONLY";
    case SQLITE_IOERR:
      return "SQLITE_IOERR";
    case SQLITE_CORRUPT:
      return "SQLITE_CORRUPT";
    case SQLITE_FULL:
      return "SQLITE_FULL";
    case SQLITE_CANTOPEN:
      return "SQLITE_CANTOPEN";
    case SQLITE_PROTOCOL:
      return "SQLITE_PROTOCOL";
    case SQLITE_SCHEMA:
      return "SQLITE_SCHEMA";
    case SQLITE_CONSTRAINT:
      return "SQLITE_CONSTRAINT";
    case SQLITE_MISMATCH:
      return "SQLITE_MISMATCH";
    case SQLITE_MISUSE:
      return "SQLITE_MISUSE";
    case SQLITE_NOTADB:
      return "SQLITE_NOTADB";
    default:
      return "SQLITE_?";
  }
}

absl::Status SqliteDamaged(absl::string_view database, absl::string_view detail) {
  return ErrnoStatus(
      EIO, absl::StatusCode::kDataLoss,
      absl::StrCat(database, " is damaged (", detail, "); restore it or move it away"));
}

absl::Status SqliteStatus(sqlite3* db, absl::string_view database, int rc, absl::string_view what) {
  const char* detail = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  const std::string message =
      absl::StrCat(what, ": ", detail, " (", SqliteCodeName(rc), ", extended code ", rc, ")");
  const int primary = rc & 0xff;
  if (primary == SQLITE_CORRUPT || primary == SQLITE_NOTADB) {
    return SqliteDamaged(database, message);
  }
  return ErrnoStatus(EIO, absl::StrCat(database, ": ", message));
}

StatementCache::StatementCache(sqlite3* db, absl::string_view database,
                               absl::Span<const char* const> sql)
    : db_(db), database_(database), sql_(sql), statements_(sql.size(), nullptr) {}

absl::StatusOr<sqlite3_stmt*> StatementCache::Get(int index) {
  sqlite3_stmt*& stmt = statements_[index];
  if (stmt == nullptr) {
    const int rc =
        sqlite3_prepare_v3(db_, sql_[index], -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
    if (rc != SQLITE_OK) {
      stmt = nullptr;
      return SqliteStatus(db_, database_, rc, absl::StrCat("prepare \"", sql_[index], "\""));
    }
  }
  return stmt;
}

void StatementCache::Clear() {
  for (sqlite3_stmt*& stmt : statements_) {
    if (stmt != nullptr) sqlite3_finalize(stmt);
    stmt = nullptr;
  }
}

absl::Status RunStatement(sqlite3* db, absl::string_view database, sqlite3_stmt* stmt,
                          absl::string_view what, uint64_t* rows) {
  ScopedReset reset(stmt);
  const int rc = sqlite3_step(stmt);
  if (rc != SQLITE_DONE) return SqliteStatus(db, database, rc, what);
  if (rows != nullptr) *rows += static_cast<uint64_t>(sqlite3_changes(db));
  return absl::OkStatus();
}

void BindText(sqlite3_stmt* stmt, int index, absl::string_view value) {
  sqlite3_bind_text(stmt, index, value.data(), static_cast<int>(value.size()), SQLITE_TRANSIENT);
}

std::string ColumnText(sqlite3_stmt* stmt, int index) {
  const unsigned char* text = sqlite3_column_text(stmt, index);
  if (text == nullptr) return std::string();
  return std::string(reinterpret_cast<const char*>(text),
                     static_cast<size_t>(sqlite3_column_bytes(stmt, index)));
}

absl::StatusOr<std::vector<std::string>> QueryColumn(sqlite3* db, absl::string_view database,
                                                     const char* sql) {
  sqlite3_stmt* stmt = nullptr;
  int rc = sqlite3_prepare_v2(db, sql, -1, &stmt, nullptr);
  if (rc != SQLITE_OK) return SqliteStatus(db, database, rc, sql);
  std::vector<std::string> rows;
  while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) rows.push_back(ColumnText(stmt, 0));
  absl::Status status = rc == SQLITE_DONE ? absl::OkStatus() : SqliteStatus(db, database, rc, sql);
  sqlite3_finalize(stmt);
  if (!status.ok()) return status;
  return rows;
}

absl::Status PrepareDatabase(sqlite3* db, absl::string_view database, bool sync_full,
                             IntegrityCheck check) {
  sqlite3_busy_timeout(db, 5000);
  const char* pragma = check == IntegrityCheck::kFull ? "integrity_check" : "quick_check";
  absl::StatusOr<std::vector<std::string>> problems =
      QueryColumn(db, database, absl::StrCat("PRAGMA ", pragma).c_str());
  if (!problems.ok()) return problems.status();
  if (problems->size() != 1 || (*problems)[0] != "ok") {
    problems->resize(std::min<size_t>(problems->size(), 5));  // the first few say enough
    return SqliteDamaged(database, absl::StrCat(pragma, ": ", absl::StrJoin(*problems, "; ")));
  }
  absl::StatusOr<std::vector<std::string>> mode =
      QueryColumn(db, database, "PRAGMA journal_mode = WAL");
  if (!mode.ok()) return mode.status();
  if (mode->size() != 1 || (*mode)[0] != "wal") {
    return ErrnoStatus(
        EIO, absl::StrCat(database, ": cannot enable WAL (mode ", absl::StrJoin(*mode, ","), ")"));
  }
  return QueryColumn(db, database,
                     sync_full ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL")
      .status();
}

absl::Status MigrateSchema(sqlite3* db, absl::string_view database,
                           const std::vector<const char*>& migrations, absl::string_view program) {
  auto exec = [&](const std::string& sql, absl::string_view what) {
    char* error = nullptr;
    const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error);
    if (rc == SQLITE_OK) return absl::OkStatus();
    const std::string message = error != nullptr ? error : sqlite3_errstr(rc);
    sqlite3_free(error);
    return ErrnoStatus(EIO, absl::StrCat(database, ": ", what, " failed: ", message));
  };
  if (absl::Status s = exec("BEGIN IMMEDIATE", "begin migration"); !s.ok()) return s;
  auto fail = [&](absl::Status status) {
    sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
    return status;
  };
  absl::StatusOr<std::vector<std::string>> has_meta = QueryColumn(
      db, database, "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'");
  if (!has_meta.ok()) return fail(has_meta.status());
  const int current = static_cast<int>(migrations.size());
  int version = 0;
  if (!has_meta->empty()) {
    absl::StatusOr<std::vector<std::string>> value =
        QueryColumn(db, database, "SELECT value FROM meta WHERE key = 'schema_version'");
    if (!value.ok()) return fail(value.status());
    if (value->size() != 1 || !absl::SimpleAtoi((*value)[0], &version) || version < 1) {
      return fail(SqliteDamaged(database, "no valid schema_version in meta"));
    }
  }
  if (version > current) {
    return fail(
        ErrnoStatus(EIO, absl::StatusCode::kFailedPrecondition,
                    absl::StrCat(database, " has schema version ", version, ", newer than this ",
                                 program, "'s ", current, "; upgrade the ", program)));
  }
  for (int v = version; v < current; ++v) {
    absl::Status s = exec(migrations[v], absl::StrCat("migration to schema ", v + 1));
    if (!s.ok()) return fail(s);
  }
  if (version != current) {
    absl::Status s =
        exec(absl::StrCat("INSERT INTO meta (key, value) VALUES ('schema_version', '", current,
                          "') ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
             "record schema version");
    if (!s.ok()) return fail(s);
  }
  if (absl::Status s = exec("COMMIT", "commit migration"); !s.ok()) return fail(s);
  return absl::OkStatus();
}

}  // namespace dmapin
