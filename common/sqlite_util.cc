#include "common/sqlite_util.h"

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "agent/registry/errno_status.h"

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

}  // namespace dmapin
