// MappingJournal: the append-only log that makes a DMA map or unmap durable in one write(2).
//
// Why. Every acknowledged MapDma/UnmapDma must survive a kill -9 of the agent. A SQLite
// transaction per call costs ~15 us (locks, WAL frame, page updates); appending a fixed 48-byte
// record to a file costs one write(2) into the page cache, which survives the process as well.
// The StateStore folds the records into its `mappings` table in the background and before every
// transaction of its own, so the database stays the one source of truth and the journal stays
// short (see state_store.h).
//
// Format. Files `<dir>/mappings.<first seq, 20 digits>.log` of fixed size, 48-byte slots:
//   slot 0, the header: the record layout below with kind 3, seq = the file's first seq,
//     container_id = the number of record slots, ua = the magic "dmapinJ1";
//   slots 1..n: records u32 crc32 (zlib's, of the 44 bytes that follow) | u32 kind | u64 seq |
//     u64 container_id | u64 iova | u64 size | u64 ua, little-endian; zeros after the last one.
// A file is created under a temporary name, preallocated to its full size and then linked into
// place, so its size is a witness: a shorter file was truncated. Sequence numbers rise by one
// across files and restarts.
//
// Damage. A crash can leave one thing only: a torn last record (a slot that is not zeros and fails
// its checksum, followed by zeros), found and counted at Open. Anything else is corruption, and
// Open fails with DATA_LOSS naming the file and offset: a damaged record followed by data, a
// record out of sequence, a truncated file, a gap between files or before the first record the
// caller has not folded (`min_seq`), a missing file the caller recorded as the one being appended
// to (`expected_file_seq`). With options.recover_damaged Open keeps the records before the first
// damage, moves that file and every later one aside (`<name>.damaged.<unix time>`), and reports and
// counts exactly what it dropped.
//
// Threading: every method is thread-safe; appends are serialized.
#ifndef DMAPIN_AGENT_STORE_MAPPING_JOURNAL_H_
#define DMAPIN_AGENT_STORE_MAPPING_JOURNAL_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/mutex.h"

namespace dmapin::agent {

struct JournalRecord {
  enum Kind : uint32_t {
    kMap = 1,    // [iova, iova + size) of the container now maps [ua, ua + size)
    kClear = 2,  // [iova, iova + size) of the container maps nothing
  };
  Kind kind = kMap;
  uint64_t seq = 0;
  uint64_t container_id = 0;
  uint64_t iova = 0;
  uint64_t size = 0;
  uint64_t ua = 0;  // kMap only
};

inline bool operator==(const JournalRecord& a, const JournalRecord& b) {
  return a.kind == b.kind && a.seq == b.seq && a.container_id == b.container_id &&
         a.iova == b.iova && a.size == b.size && a.ua == b.ua;
}

// The records of `records` (by seq) whose effect survives them all: a record whose range a later
// record of the same container covers is dropped, since a map or a clear decides everything inside
// its range and touches nothing outside it. Applying the result to any state gives the same rows
// as applying `records`; a map undone by its unmap in the same batch costs nothing.
std::vector<JournalRecord> Coalesce(const std::vector<JournalRecord>& records);

struct MappingJournalOptions {
  // An append returns once its record is flushed (fdatasync; concurrent appends share one flush),
  // and a new file's directory entry is flushed too: records then survive a power loss.
  bool sync = false;
  // Fault injection for tests: called with each record's seq before it is written; a non-OK
  // status fails that append as a write error would.
  std::function<absl::Status(uint64_t seq)> fail_append_hook;
  // Record slots per file; a full file rotates to a new one.
  uint64_t file_records = 16384;
  // The first seq of the file the caller recorded as the one being appended to (see
  // current_file_seq()); it must still be there. 0: not known.
  uint64_t expected_file_seq = 0;
  // Damage found at Open is dropped (reported, counted, the files kept aside) instead of failing.
  bool recover_damaged = false;
};

struct JournalStats {
  uint64_t appends = 0;
  uint64_t failed_appends = 0;
  uint64_t files_created = 0;
  uint64_t files_deleted = 0;
  // Bytes of torn last records found at Open.
  uint64_t torn_tail_bytes = 0;
  // Open with recover_damaged: files moved aside, and the well-formed records in them (from the
  // damage on) that were not recovered.
  uint64_t damaged_files = 0;
  uint64_t damaged_records_dropped = 0;
};

// The journal files in `dir` (what Open reads), by name.
std::vector<std::string> ListJournalFiles(const std::string& dir);

class MappingJournal {
 public:
  // Reads every journal file in `dir` (kept in recovered()) and starts a new file whose records
  // are numbered from max(last recovered seq, `min_seq - 1`) + 1. Records below `min_seq` were
  // folded by the caller: files holding only those are deleted unread. Damage: see the top.
  static absl::StatusOr<std::unique_ptr<MappingJournal>> Open(const std::string& dir,
                                                              uint64_t min_seq,
                                                              MappingJournalOptions options = {});
  ~MappingJournal();
  MappingJournal(const MappingJournal&) = delete;
  MappingJournal& operator=(const MappingJournal&) = delete;

  // The records found at Open, by seq.
  const std::vector<JournalRecord>& recovered() const { return recovered_; }
  // With recover_damaged: one line per damage found at Open and what was dropped for it.
  const std::vector<std::string>& damage_report() const { return damage_report_; }

  // Writes one record; OK means it is in the file (and flushed with options.sync). Returns its seq,
  // and in `*unfolded` (when given) how many records now wait for TakeUnfolded. After a failed
  // write the journal refuses every later append (EIO): a record written after a torn one would
  // never be read back.
  absl::StatusOr<uint64_t> Append(JournalRecord::Kind kind, uint64_t container_id, uint64_t iova,
                                  uint64_t size, uint64_t ua = 0, size_t* unfolded = nullptr);

  // Hands over the records appended since the last call (by seq) and moves later appends to a new
  // file, so that the files holding them can be deleted once they are folded elsewhere. Sets
  // `*file_seq` (when given) to the first seq of the file appends go to now.
  std::vector<JournalRecord> TakeUnfolded(uint64_t* file_seq = nullptr);
  // Records appended and not yet taken.
  size_t unfolded() const;
  // The first seq of the file appends go to now.
  uint64_t current_file_seq() const;
  // A copy of them (by seq), leaving them for TakeUnfolded.
  std::vector<JournalRecord> PeekUnfolded() const;

  // Deletes every file (not the one being appended to) whose records all have seq <= `seq`.
  void DropFolded(uint64_t seq);

  JournalStats stats() const;

 private:
  struct File {
    std::string path;
    uint64_t first_seq = 0;
    uint64_t last_seq = 0;  // 0: no records
    uint64_t records = 0;
    uint64_t slots = 0;  // record slots, from its header
  };
  // Open's reading of the files, oldest first, into recovered_ (damage: see the top).
  absl::Status RecoverLocked(std::vector<File> files, uint64_t min_seq)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves files[from..] aside after damage, counting what they held.
  void SetAsideLocked(const std::vector<File>& files, size_t from, uint64_t keep_seq,
                      const std::string& damage) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  MappingJournal(std::string dir, MappingJournalOptions options);
  // Moves appends to a new file. No flush may be running (syncing_ false).
  absl::Status StartFileLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // With options.sync: returns once record `seq` is flushed (releases mu_ while flushing).
  absl::Status SyncLocked(uint64_t seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string dir_;
  const MappingJournalOptions options_;
  std::vector<JournalRecord> recovered_;
  std::vector<std::string> damage_report_;

  mutable Mutex mu_;
  int fd_ ABSL_GUARDED_BY(mu_) = -1;
  File current_ ABSL_GUARDED_BY(mu_);
  std::vector<File> closed_ ABSL_GUARDED_BY(mu_);   // oldest first
  std::optional<File> empty_ ABSL_GUARDED_BY(mu_);  // Open: a last file holding no record
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<JournalRecord> unfolded_ ABSL_GUARDED_BY(mu_);
  // options.sync: records up to synced_seq_ are flushed; one flush runs at a time.
  uint64_t synced_seq_ ABSL_GUARDED_BY(mu_) = 0;
  bool syncing_ ABSL_GUARDED_BY(mu_) = false;
  std::condition_variable_any synced_cv_;
  JournalStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_STORE_MAPPING_JOURNAL_H_
