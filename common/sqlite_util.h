// Helpers shared by dmapin's SQLite stores (the agent's state store, the server's store).
//
// `database` names the file in errors, e.g. "state database /var/lib/dmapin/agent/state.db".
#ifndef DMAPIN_COMMON_SQLITE_UTIL_H_
#define DMAPIN_COMMON_SQLITE_UTIL_H_

#include <sqlite3.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace dmapin {

// "SQLITE_BUSY" for the primary code of `rc`.
const char* SqliteCodeName(int rc);

// DATA_LOSS (errno EIO): the file is damaged and must be restored or moved away.
absl::Status SqliteDamaged(absl::string_view database, absl::string_view detail);

// An EIO status naming the SQLite error of `what`; DATA_LOSS (SqliteDamaged) when the file is
// corrupt or not a database. `db` may be null (the message then comes from `rc` alone).
absl::Status SqliteStatus(sqlite3* db, absl::string_view database, int rc, absl::string_view what);

// Resets a cached statement when it goes out of scope: a statement left mid-iteration would keep
// its read transaction open.
class ScopedReset {
 public:
  explicit ScopedReset(sqlite3_stmt* stmt) : stmt_(stmt) {}
  ~ScopedReset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  ScopedReset(const ScopedReset&) = delete;
  ScopedReset& operator=(const ScopedReset&) = delete;

 private:
  sqlite3_stmt* const stmt_;
};

// A connection's prepared statements, by index into a table of SQL texts: each is prepared on
// first use (SQLITE_PREPARE_PERSISTENT) and kept until Clear(), which the owner calls before it
// closes the connection. Not thread-safe: the lock that guards the connection guards it too.
class StatementCache {
 public:
  // `sql` must outlive the cache (a static table); `database` names the file in errors.
  StatementCache(sqlite3* db, absl::string_view database, absl::Span<const char* const> sql);
  ~StatementCache() { Clear(); }
  StatementCache(const StatementCache&) = delete;
  StatementCache& operator=(const StatementCache&) = delete;

  absl::StatusOr<sqlite3_stmt*> Get(int index);
  // Finalizes every prepared statement.
  void Clear();

 private:
  sqlite3* const db_;
  const std::string database_;
  const absl::Span<const char* const> sql_;
  std::vector<sqlite3_stmt*> statements_;
};

// Steps `stmt`, a statement that returns no rows, and resets it; adds the rows it changed to
// `*rows` when given. Errors name `what`.
absl::Status RunStatement(sqlite3* db, absl::string_view database, sqlite3_stmt* stmt,
                          absl::string_view what, uint64_t* rows = nullptr);

void BindText(sqlite3_stmt* stmt, int index, absl::string_view value);
std::string ColumnText(sqlite3_stmt* stmt, int index);

// One-off statements (pragmas): the first column of every row.
absl::StatusOr<std::vector<std::string>> QueryColumn(sqlite3* db, absl::string_view database,
                                                     const char* sql);

// How thoroughly PrepareDatabase checks the file. kQuick: the b-tree of every page. kFull:
// integrity_check, which also matches every index against its table (a damaged index passes
// kQuick, and a lookup through it then finds rows that are gone, or misses rows that are there).
enum class IntegrityCheck { kQuick, kFull };

// What a store does to a freshly opened connection, before anything writes: a busy timeout (an
// operator's sqlite3 shell may be reading), the integrity check (DATA_LOSS when damaged), WAL, and
// synchronous FULL (fsync every commit) or NORMAL (survive process crashes).
absl::Status PrepareDatabase(sqlite3* db, absl::string_view database, bool sync_full,
                             IntegrityCheck check = IntegrityCheck::kQuick);

// Brings the schema to version migrations.size(): migration i takes version i to i + 1 (never
// edit a released one, append). The version lives in the table meta (key TEXT PRIMARY KEY, value
// TEXT), which migration 0 must create, under the key "schema_version". One write transaction for
// the check and every step: two processes opening the same file cannot both migrate, and a crash
// mid-migration leaves the old version intact. A newer schema fails with FAILED_PRECONDITION
// asking to upgrade `program` ("agent", "server").
absl::Status MigrateSchema(sqlite3* db, absl::string_view database,
                           const std::vector<const char*>& migrations, absl::string_view program);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_SQLITE_UTIL_H_
