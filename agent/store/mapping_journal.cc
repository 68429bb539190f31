#include "agent/store/mapping_journal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

constexpr size_t kRecordBytes = 48;
constexpr char kPrefix[] = "mappings.";
constexpr char kSuffix[] = ".log";
constexpr char kTempSuffix[] = ".log.tmp";
constexpr uint32_t kHeaderKind = 3;
constexpr uint64_t kMagic = 0x31'4a'6e'69'70'61'6d'64;  // "dmapinJ1" little-endian

// Little-endian fields of the journal's records, byte by byte (the same file on any host;
// compilers make each a single load or store on little-endian ones).
template <typename T>
void StoreLittleEndian(char* out, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) out[i] = static_cast<char>(value >> (8 * i));
}
template <typename T>
T LoadLittleEndian(const char* in) {
  T value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) {
    value |= static_cast<T>(static_cast<unsigned char>(in[i])) << (8 * i);
  }
  return value;
}

uint32_t Checksum(const char* data, size_t size) {
  return static_cast<uint32_t>(
      crc32(crc32(0, nullptr, 0), reinterpret_cast<const Bytef*>(data), static_cast<uInt>(size)));
}

void EncodeSlot(uint32_t kind, uint64_t seq, uint64_t container_id, uint64_t iova, uint64_t size,
                uint64_t ua, char* out) {
  StoreLittleEndian<uint32_t>(out + 4, kind);
  StoreLittleEndian<uint64_t>(out + 8, seq);
  StoreLittleEndian<uint64_t>(out + 16, container_id);
  StoreLittleEndian<uint64_t>(out + 24, iova);
  StoreLittleEndian<uint64_t>(out + 32, size);
  StoreLittleEndian<uint64_t>(out + 40, ua);
  StoreLittleEndian<uint32_t>(out, Checksum(out + 4, kRecordBytes - 4));
}

enum class Slot {
  kRecord,      // a well-formed record
  kZero,        // never written
  kBadSum,      // fails its checksum: torn, or damaged
  kBadContent,  // its checksum holds, its contents do not (not a record kind): damaged
};

Slot DecodeSlot(const char* in, JournalRecord* record) {
  if (LoadLittleEndian<uint32_t>(in) != Checksum(in + 4, kRecordBytes - 4)) {
    return std::all_of(in, in + kRecordBytes, [](char c) { return c == 0; }) ? Slot::kZero
                                                                             : Slot::kBadSum;
  }
  const uint32_t kind = LoadLittleEndian<uint32_t>(in + 4);
  if (kind != JournalRecord::kMap && kind != JournalRecord::kClear) return Slot::kBadContent;
  record->kind = static_cast<JournalRecord::Kind>(kind);
  record->seq = LoadLittleEndian<uint64_t>(in + 8);
  record->container_id = LoadLittleEndian<uint64_t>(in + 16);
  record->iova = LoadLittleEndian<uint64_t>(in + 24);
  record->size = LoadLittleEndian<uint64_t>(in + 32);
  record->ua = LoadLittleEndian<uint64_t>(in + 40);
  return Slot::kRecord;
}

// The header's first seq and record slots, or nullopt when slot 0 is not a header.
std::optional<std::pair<uint64_t, uint64_t>> DecodeHeader(absl::string_view data) {
  if (data.size() < kRecordBytes) return std::nullopt;
  const char* in = data.data();
  if (LoadLittleEndian<uint32_t>(in) != Checksum(in + 4, kRecordBytes - 4) ||
      LoadLittleEndian<uint32_t>(in + 4) != kHeaderKind ||
      LoadLittleEndian<uint64_t>(in + 40) != kMagic) {
    return std::nullopt;
  }
  return std::make_pair(LoadLittleEndian<uint64_t>(in + 8), LoadLittleEndian<uint64_t>(in + 16));
}

// Calls `visit(offset, slot)` for each whole 48-byte slot of the file at `path`, in order, until it
// returns false; sets `*size` to the file's size. Reads through a small buffer: a journal file is
// up to ~800 KB, and holding it whole at every start would cost that much memory per file.
absl::Status ForEachSlot(const std::string& path, uint64_t* size,
                         const std::function<bool(uint64_t offset, const char* slot)>& visit) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("cannot read the mapping journal ", path));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoStatus(err, absl::StrCat("cannot stat the mapping journal ", path));
  }
  *size = static_cast<uint64_t>(st.st_size);
  char buffer[1365 * kRecordBytes];  // 64 KiB of whole slots
  uint64_t offset = 0;
  size_t held = 0;  // bytes in buffer
  for (;;) {
    const ssize_t got = read(fd, buffer + held, sizeof(buffer) - held);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int err = errno;
      close(fd);
      return ErrnoStatus(err, absl::StrCat("cannot read the mapping journal ", path));
    }
    held += static_cast<size_t>(got);
    size_t used = 0;
    for (; used + kRecordBytes <= held; used += kRecordBytes, offset += kRecordBytes) {
      if (!visit(offset, buffer + used)) {
        close(fd);
        return absl::OkStatus();
      }
    }
    if (got == 0) break;  // a partial last slot is left unvisited
    std::memmove(buffer, buffer + used, held - used);
    held -= used;
  }
  close(fd);
  return absl::OkStatus();
}

// Well-formed records after the header of the file at `path`, for the damage report.
uint64_t CountRecords(const std::string& path) {
  uint64_t count = 0;
  uint64_t size = 0;
  (void)ForEachSlot(path, &size, [&count](uint64_t offset, const char* slot) {
    JournalRecord record;
    if (offset > 0 && DecodeSlot(slot, &record) == Slot::kRecord) ++count;
    return true;
  });
  return count;
}

std::string FilePath(const std::string& dir, uint64_t first_seq) {
  return absl::StrFormat("%s/%s%020d%s", dir, kPrefix, first_seq, kSuffix);
}

absl::Status SyncDirectory(const std::string& dir) {
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("open ", dir));
  const int rc = fsync(fd);
  const int err = errno;
  close(fd);
  return rc == 0 ? absl::OkStatus() : ErrnoStatus(err, absl::StrCat("fsync ", dir));
}

// After damage: copies the file at `path` to `aside`, then keeps its header and first `records`
// records, with zeros after them up to the size its header says (`slots`).
absl::Status RepairFile(const std::string& path, const std::string& aside, uint64_t records,
                        uint64_t slots) {
  std::error_code error;
  std::filesystem::copy_file(path, aside, std::filesystem::copy_options::overwrite_existing, error);
  if (error) {
    return ErrnoStatus(error.value(), absl::StrCat("cannot copy ", path, ": ", error.message()));
  }
  const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("open ", path));
  const off_t keep = static_cast<off_t>((records + 1) * kRecordBytes);
  const off_t full = static_cast<off_t>((slots + 1) * kRecordBytes);
  const bool ok = ftruncate(fd, keep) == 0 && ftruncate(fd, full) == 0 &&
                  posix_fallocate(fd, 0, full) == 0 && fdatasync(fd) == 0;
  const int err = errno;
  close(fd);
  return ok ? absl::OkStatus() : ErrnoStatus(err, absl::StrCat("rewrite ", path));
}

}  // namespace

std::vector<JournalRecord> Coalesce(const std::vector<JournalRecord>& records) {
  // Per container, the union of the ranges of the records after the one at hand, as disjoint
  // [first, last] intervals keyed by first.
  absl::flat_hash_map<uint64_t, std::map<uint64_t, uint64_t>> covered;
  std::vector<bool> keep(records.size(), false);
  for (size_t i = records.size(); i-- > 0;) {
    const JournalRecord& record = records[i];
    const uint64_t first = record.iova;
    const uint64_t last = record.iova + (record.size - 1);
    std::map<uint64_t, uint64_t>& intervals = covered[record.container_id];
    auto next = intervals.upper_bound(first);
    if (next != intervals.begin() && std::prev(next)->second >= last) continue;  // covered
    keep[i] = true;
    // Merge [first, last] with every interval it overlaps or touches.
    uint64_t merged_first = first;
    uint64_t merged_last = last;
    auto it = next;
    if (it != intervals.begin()) {
      auto before = std::prev(it);
      if (before->second >= first - 1 || first == 0) it = before;
    }
    while (it != intervals.end() && (merged_last == ~uint64_t{0} || it->first <= merged_last + 1)) {
      merged_first = std::min(merged_first, it->first);
      merged_last = std::max(merged_last, it->second);
      it = intervals.erase(it);
    }
    intervals.emplace(merged_first, merged_last);
  }
  std::vector<JournalRecord> kept;
  for (size_t i = 0; i < records.size(); ++i) {
    if (keep[i]) kept.push_back(records[i]);
  }
  return kept;
}

std::vector<std::string> ListJournalFiles(const std::string& dir) {
  std::vector<std::string> paths;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    const std::string filename = entry.path().filename().string();
    if (absl::StartsWith(filename, kPrefix) && absl::EndsWith(filename, kSuffix)) {
      paths.push_back(entry.path().string());
    }
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

MappingJournal::MappingJournal(std::string dir, MappingJournalOptions options)
    : dir_(std::move(dir)), options_(std::move(options)) {}

MappingJournal::~MappingJournal() {
  MutexLock lock(&mu_);
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<std::unique_ptr<MappingJournal>> MappingJournal::Open(
    const std::string& dir, uint64_t min_seq, MappingJournalOptions options) {
  if (options.file_records == 0) return ErrnoStatus(EINVAL, "mapping journal: file_records is 0");
  std::unique_ptr<MappingJournal> journal(new MappingJournal(dir, std::move(options)));
  std::vector<File> files;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    const std::string filename = entry.path().filename().string();
    absl::string_view name = filename;
    uint64_t first_seq = 0;
    if (!absl::ConsumePrefix(&name, kPrefix)) continue;
    if (absl::EndsWith(name, kTempSuffix)) {
      // A file whose creation a crash interrupted: never linked into place, holds no record.
      unlink(entry.path().c_str());
    } else if (absl::ConsumeSuffix(&name, kSuffix) && absl::SimpleAtoi(name, &first_seq)) {
      files.push_back(File{entry.path().string(), first_seq});
    }
  }
  if (error) {
    return ErrnoStatus(error.value(), absl::StrCat("cannot list the mapping journal in ", dir, ": ",
                                                   error.message()));
  }
  // Names sort as their first seqs.
  std::sort(files.begin(), files.end(),
            [](const File& a, const File& b) { return a.first_seq < b.first_seq; });

  MutexLock lock(&journal->mu_);
  if (absl::Status status =
          journal->RecoverLocked(std::move(files), std::max<uint64_t>(min_seq, 1));
      !status.ok()) {
    return status;
  }
  uint64_t last_seq = journal->recovered_.empty() ? 0 : journal->recovered_.back().seq;
  journal->next_seq_ = std::max(last_seq + 1, std::max<uint64_t>(min_seq, 1));
  if (std::optional<File> empty = std::exchange(journal->empty_, std::nullopt); empty.has_value()) {
    if (empty->first_seq == journal->next_seq_) {
      journal->fd_ = open(empty->path.c_str(), O_WRONLY | O_CLOEXEC);
      if (journal->fd_ < 0) {
        return ErrnoStatus(errno, absl::StrCat("cannot open the mapping journal ", empty->path));
      }
      journal->current_ = *std::move(empty);
      return journal;
    }
    unlink(empty->path.c_str());
  }
  if (absl::Status status = journal->StartFileLocked(); !status.ok()) return status;
  return journal;
}

absl::Status MappingJournal::RecoverLocked(std::vector<File> files, uint64_t min_seq) {
  // The first damage found: the index of the first file that cannot be kept, and what is wrong.
  std::optional<std::pair<size_t, std::string>> damage;
  if (const uint64_t expected = options_.expected_file_seq; expected != 0) {
    auto it = std::find_if(files.begin(), files.end(),
                           [&](const File& file) { return file.first_seq >= expected; });
    if (it == files.end() || it->first_seq != expected) {
      damage.emplace(it - files.begin(),
                     absl::StrCat(FilePath(dir_, expected),
                                  " is missing: the state database records it as the file the "
                                  "journal was appending to"));
    }
  }
  const size_t readable = damage.has_value() ? damage->first : files.size();
  uint64_t next_seq = 0;  // the seq the next file must start at; 0 before the first file read
  std::string previous;   // the file read before, for messages
  std::vector<std::string> empties;
  for (size_t i = 0; i < readable; ++i) {
    File& file = files[i];
    if (i + 1 < files.size() && files[i + 1].first_seq <= min_seq) {
      // Holds only records the caller folded (a crash came before it deleted the file).
      if (unlink(file.path.c_str()) == 0) ++stats_.files_deleted;
      continue;
    }
    if (next_seq == 0 && file.first_seq > min_seq) {
      damage.emplace(i, absl::StrCat("records ", min_seq, "-", file.first_seq - 1,
                                     " are missing: the oldest journal file ", file.path,
                                     " starts after them and the state database holds records "
                                     "up to ",
                                     min_seq - 1, " only"));
      break;
    }
    if (next_seq != 0 && file.first_seq != next_seq) {
      damage.emplace(
          i, absl::StrCat(file.path, " starts at seq ", file.first_seq, " but the records of ",
                          previous, " end at ", next_seq - 1, ": records are missing"));
      break;
    }
    uint64_t size = 0;
    std::optional<std::pair<uint64_t, uint64_t>> header;
    uint64_t bytes = 0;       // what the header says the file holds
    uint64_t end_of_log = 0;  // offset of the first slot that is not the next record
    Slot slot = Slot::kZero;  // what that slot is
    JournalRecord record;     // and, a record, which
    uint64_t rest = 0;        // offset of data after the end of the log; 0: none
    absl::Status read = ForEachSlot(file.path, &size, [&](uint64_t offset, const char* in) {
      if (offset == 0) {
        header = DecodeHeader(absl::string_view(in, kRecordBytes));
        if (!header.has_value() || header->first != file.first_seq) return false;
        bytes = (std::min<uint64_t>(header->second, uint64_t{1} << 40) + 1) * kRecordBytes;
        return true;
      }
      if (offset >= bytes) return false;  // beyond the header's size: judged below
      if (end_of_log == 0) {
        slot = DecodeSlot(in, &record);
        const uint64_t want = file.records == 0 ? file.first_seq : file.last_seq + 1;
        if (slot == Slot::kRecord && record.seq == want) {
          file.last_seq = record.seq;
          ++file.records;
          recovered_.push_back(record);
          return true;
        }
        end_of_log = offset;
        // A record out of sequence or of no known kind ends the scan: damage.
        return slot != Slot::kRecord && slot != Slot::kBadContent;
      }
      // After the end of the log: the file's unused slots, zeros.
      const char* nonzero = std::find_if(in, in + kRecordBytes, [](char c) { return c != 0; });
      if (nonzero == in + kRecordBytes) return true;
      rest = offset + static_cast<uint64_t>(nonzero - in);
      return false;
    });
    if (!read.ok()) return read;
    if (!header.has_value() || header->first != file.first_seq) {
      damage.emplace(i, size < kRecordBytes
                            ? absl::StrCat(file.path, " holds ", size, " bytes: truncated")
                            : absl::StrCat(file.path, " at offset 0: not a journal header for seq ",
                                           file.first_seq));
      break;
    }
    file.slots = header->second;
    if (end_of_log != 0 && (slot == Slot::kRecord || slot == Slot::kBadContent)) {
      damage.emplace(i,
                     absl::StrCat(file.path, " at offset ", end_of_log, ": ",
                                  slot == Slot::kRecord
                                      ? absl::StrCat("record seq ", record.seq, " out of sequence")
                                      : std::string("a record of no known kind")));
      break;
    }
    if (rest != 0) {
      damage.emplace(i, absl::StrCat(file.path, " at offset ", end_of_log, ": ",
                                     slot == Slot::kZero ? "an empty record slot"
                                                         : "a record failing its checksum",
                                     " followed by data at offset ", rest));
      break;
    }
    if (end_of_log != 0 && slot == Slot::kBadSum) stats_.torn_tail_bytes += kRecordBytes;
    // Truncation is judged after the records it left: recovery keeps them.
    if (size != bytes) {
      damage.emplace(i, absl::StrCat(file.path, " holds ", size, " bytes where its header says ",
                                     bytes, ": truncated"));
      break;
    }
    next_seq = file.records == 0 ? file.first_seq : file.last_seq + 1;
    previous = file.path;
    if (file.records == 0) {
      // Holds no record (a rotation's new file, the last one): Open appends to it again rather
      // than delete and recreate it, so the file the caller recorded never goes missing.
      if (i + 1 == files.size()) {
        empty_ = std::move(file);
      } else {
        empties.push_back(file.path);  // deleted once the journal is known whole
      }
      continue;
    }
    closed_.push_back(std::move(file));
  }
  if (!damage.has_value()) {
    for (const std::string& path : empties) unlink(path.c_str());
    return absl::OkStatus();
  }
  const std::string what = absl::StrCat("mapping journal damaged: ", damage->second);
  if (!options_.recover_damaged) {
    return ErrnoStatus(EIO, absl::StatusCode::kDataLoss,
                       absl::StrCat(what,
                                    ". Acknowledged DMA mappings from there on would be lost; "
                                    "restore the journal, or start with --recover_damaged_state "
                                    "to drop them (they are reported and counted)"));
  }
  // Keep the records before the damage; set the damaged file and every later one aside.
  const uint64_t keep_seq = recovered_.empty() ? 0 : recovered_.back().seq;
  SetAsideLocked(files, damage->first, keep_seq, what);
  return absl::OkStatus();
}

void MappingJournal::SetAsideLocked(const std::vector<File>& files, size_t from, uint64_t keep_seq,
                                    const std::string& damage) {
  const std::string suffix = absl::StrCat(".damaged.", absl::ToUnixSeconds(absl::Now()));
  std::vector<std::string> moved;
  uint64_t dropped = 0;
  for (size_t i = from; i < files.size(); ++i) {
    const File& file = files[i];
    uint64_t records = CountRecords(file.path);
    const std::string aside = file.path + suffix;
    if (i == from && file.records > 0) {
      // Its first records are kept: a copy goes aside, the file keeps them and zeros after them.
      records -= std::min(records, file.records);
      const absl::Status status = RepairFile(file.path, aside, file.records, file.slots);
      moved.push_back(status.ok()
                          ? absl::StrCat(aside, " (a copy; ", file.path, " keeps seq ",
                                         file.first_seq, "-", file.last_seq, ")")
                          : absl::StrCat(file.path, " (cannot repair it: ", status.message(), ")"));
    } else if (rename(file.path.c_str(), aside.c_str()) == 0) {
      moved.push_back(aside);
    } else {
      moved.push_back(absl::StrCat(file.path, " (cannot move it aside: ", strerror(errno), ")"));
    }
    dropped += records;
  }
  stats_.damaged_files += moved.size();
  stats_.damaged_records_dropped += dropped;
  damage_report_.push_back(
      absl::StrCat(damage, ". Recovering: kept the records up to seq ", keep_seq, ", dropped ",
                   dropped, " well-formed records after the damage; moved aside: ",
                   moved.empty() ? std::string("nothing") : absl::StrJoin(moved, ", ")));
}

absl::Status MappingJournal::StartFileLocked() {
  std::string path = FilePath(dir_, next_seq_);
  const std::string temp = absl::StrCat(path, ".tmp");
  const int fd = open(temp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("cannot create the mapping journal ", temp));
  auto failed = [&](int err, absl::string_view what) {
    close(fd);
    unlink(temp.c_str());
    return ErrnoStatus(err, absl::StrCat("cannot ", what, " the mapping journal ", temp));
  };
  char header[kRecordBytes];
  EncodeSlot(kHeaderKind, next_seq_, options_.file_records, 0, 0, kMagic, header);
  if (pwrite(fd, header, sizeof(header), 0) != static_cast<ssize_t>(sizeof(header))) {
    return failed(errno != 0 ? errno : ENOSPC, "write the header of");
  }
  // Every block now: no append runs out of space, and the size says how long the file must be.
  const off_t bytes = static_cast<off_t>((options_.file_records + 1) * kRecordBytes);
  if (const int err = posix_fallocate(fd, 0, bytes); err != 0) return failed(err, "preallocate");
  if (options_.sync && fdatasync(fd) != 0) return failed(errno, "flush");
  // link(2) fails if the name exists: a file of this name could only hold records still needed.
  if (link(temp.c_str(), path.c_str()) != 0) return failed(errno, "link into place");
  unlink(temp.c_str());
  if (options_.sync) {
    if (absl::Status status = SyncDirectory(dir_); !status.ok()) {
      close(fd);
      return status;
    }
  }
  if (fd_ >= 0) {
    // Appenders still waiting for a flush of the old file get it here.
    if (options_.sync && fdatasync(fd_) == 0) synced_seq_ = next_seq_ - 1;
    close(fd_);
    closed_.push_back(std::move(current_));
  }
  fd_ = fd;
  current_ = File{std::move(path), next_seq_, 0, 0, options_.file_records};
  ++stats_.files_created;
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> MappingJournal::Append(JournalRecord::Kind kind, uint64_t container_id,
                                                uint64_t iova, uint64_t size, uint64_t ua,
                                                size_t* unfolded) {
  MutexLock lock(&mu_);
  auto fail = [&](absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    failed_ = true;
    ++stats_.failed_appends;
    return status;
  };
  if (failed_) {
    ++stats_.failed_appends;
    return ErrnoStatus(EIO, absl::StrCat("the mapping journal ", current_.path,
                                         " failed earlier and takes no more records"));
  }
  if (current_.records == current_.slots) {
    // Full: the rotation closes the file a running flush uses.
    while (syncing_) synced_cv_.wait(mu_);
    if (absl::Status status = StartFileLocked(); !status.ok()) return fail(status);
  }
  const JournalRecord record{kind, next_seq_, container_id, iova, size, ua};
  if (options_.fail_append_hook) {
    if (absl::Status injected = options_.fail_append_hook(record.seq); !injected.ok()) {
      return fail(ErrnoStatus(
          EIO, absl::StrCat("mapping journal: injected failure: ", injected.ToString())));
    }
  }
  char buffer[kRecordBytes];
  EncodeSlot(kind, record.seq, container_id, iova, size, ua, buffer);
  const off_t offset = static_cast<off_t>((current_.records + 1) * kRecordBytes);
  ssize_t written;
  do {
    written = pwrite(fd_, buffer, sizeof(buffer), offset);
  } while (written < 0 && errno == EINTR);
  if (written != static_cast<ssize_t>(sizeof(buffer))) {
    // A short write leaves a torn record: the journal takes nothing after it (see failed_).
    const int err = written < 0 ? errno : ENOSPC;
    return fail(
        ErrnoStatus(err, absl::StrCat("cannot append to the mapping journal ", current_.path)));
  }
  ++next_seq_;
  current_.last_seq = record.seq;
  ++current_.records;
  unfolded_.push_back(record);
  if (options_.sync) {
    if (absl::Status status = SyncLocked(record.seq); !status.ok()) return fail(status);
  }
  ++stats_.appends;
  if (unfolded != nullptr) *unfolded = unfolded_.size();
  return record.seq;
}

absl::Status MappingJournal::SyncLocked(uint64_t seq) {
  // Group flush: one fdatasync covers every record written before it started, so concurrent
  // appenders share it instead of queueing one flush each.
  while (synced_seq_ < seq) {
    if (failed_) {
      return ErrnoStatus(EIO,
                         absl::StrCat("flushing the mapping journal ", current_.path, " failed"));
    }
    if (syncing_) {
      synced_cv_.wait(mu_);
      continue;
    }
    syncing_ = true;
    const uint64_t target = next_seq_ - 1;
    const int fd = fd_;  // StartFileLocked waits for the flush before it closes this
    mu_.Unlock();
    const int rc = fdatasync(fd);
    const int err = errno;
    mu_.Lock();
    syncing_ = false;
    synced_cv_.notify_all();
    if (rc != 0) {
      failed_ = true;
      return ErrnoStatus(err, absl::StrCat("cannot flush the mapping journal ", current_.path));
    }
    synced_seq_ = std::max(synced_seq_, target);
  }
  return absl::OkStatus();
}

std::vector<JournalRecord> MappingJournal::TakeUnfolded(uint64_t* file_seq) {
  MutexLock lock(&mu_);
  // The rotation below closes the file a running flush uses.
  while (syncing_) synced_cv_.wait(mu_);
  std::vector<JournalRecord> records = std::move(unfolded_);
  unfolded_.clear();
  // A journal that cannot start a new file keeps appending to this one; DropFolded then waits
  // for a later rotation. A failed journal keeps its file for the next start to read.
  if (current_.last_seq != 0 && !failed_) (void)StartFileLocked();
  if (file_seq != nullptr) *file_seq = current_.first_seq;
  return records;
}

uint64_t MappingJournal::current_file_seq() const {
  MutexLock lock(&mu_);
  return current_.first_seq;
}

size_t MappingJournal::unfolded() const {
  MutexLock lock(&mu_);
  return unfolded_.size();
}

std::vector<JournalRecord> MappingJournal::PeekUnfolded() const {
  MutexLock lock(&mu_);
  return unfolded_;
}

void MappingJournal::DropFolded(uint64_t seq) {
  MutexLock lock(&mu_);
  auto keep = closed_.begin();
  for (; keep != closed_.end() && keep->last_seq <= seq; ++keep) {
    if (unlink(keep->path.c_str()) == 0 || errno == ENOENT) ++stats_.files_deleted;
  }
  closed_.erase(closed_.begin(), keep);
}

JournalStats MappingJournal::stats() const {
  MutexLock lock(&mu_);
  return stats_;
}

}  // namespace dmapin::agent
