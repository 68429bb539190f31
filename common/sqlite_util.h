// Helpers shared by dmapin's SQLite stores (the agent's state store, the server's store).
//
// `database` names the file in errors, e.g. "state database /var/lib/dmapin/agent/state.db".
#ifndef DMAPIN_COMMON_SQLITE_UTIL_H_
#define DMAPIN_COMMON_SQLITE_UTIL_H_

#include <sqlite3.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

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

void BindText(sqlite3_stmt* stmt, int index, absl::string_view value);
std::string ColumnText(sqlite3_stmt* stmt, int index);

// One-off statements (pragmas): the first column of every row.
absl::StatusOr<std::vector<std::string>> QueryColumn(sqlite3* db, absl::string_view database,
                                                     const char* sql);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_SQLITE_UTIL_H_
