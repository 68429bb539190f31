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
#include <iterator>
#include <map>
#include <utility>

#include "absl/base/internal/endian.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "agent/registry/errno_status.h"

namespace dmapin {
namespace {

constexpr size_t kRecordBytes = 48;
constexpr char kPrefix[] = "mappings.";
constexpr char kSuffix[] = ".log";

uint32_t Checksum(const char* data, size_t size) {
  return static_cast<uint32_t>(
      crc32(crc32(0, nullptr, 0), reinterpret_cast<const Bytef*>(data), static_cast<uInt>(size)));
}

void Encode(const JournalRecord& record, char* out) {
  absl::little_endian::Store32(out + 4, record.kind);
  absl::little_endian::Store64(out + 8, record.seq);
  absl::little_endian::Store64(out + 16, record.container_id);
  absl::little_endian::Store64(out + 24, record.iova);
  absl::little_endian::Store64(out + 32, record.size);
  absl::little_endian::Store64(out + 40, record.ua);
  absl::little_endian::Store32(out, Checksum(out + 4, kRecordBytes - 4));
}

bool Decode(const char* in, JournalRecord* record) {
  if (absl::little_endian::Load32(in) != Checksum(in + 4, kRecordBytes - 4)) return false;
  const uint32_t kind = absl::little_endian::Load32(in + 4);
  if (kind != JournalRecord::kMap && kind != JournalRecord::kClear) return false;
  record->kind = static_cast<JournalRecord::Kind>(kind);
  record->seq = absl::little_endian::Load64(in + 8);
  record->container_id = absl::little_endian::Load64(in + 16);
  record->iova = absl::little_endian::Load64(in + 24);
  record->size = absl::little_endian::Load64(in + 32);
  record->ua = absl::little_endian::Load64(in + 40);
  return true;
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

MappingJournal::MappingJournal(std::string dir, MappingJournalOptions options)
    : dir_(std::move(dir)), options_(std::move(options)) {}

MappingJournal::~MappingJournal() {
  MutexLock lock(&mu_);
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<std::unique_ptr<MappingJournal>> MappingJournal::Open(
    const std::string& dir, uint64_t min_seq, MappingJournalOptions options) {
  std::unique_ptr<MappingJournal> journal(new MappingJournal(dir, std::move(options)));
  // The files in seq order: their names sort as their first seqs.
  std::vector<std::pair<uint64_t, std::string>> files;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    const std::string filename = entry.path().filename().string();
    absl::string_view name = filename;
    uint64_t first_seq = 0;
    if (absl::ConsumePrefix(&name, kPrefix) && absl::ConsumeSuffix(&name, kSuffix) &&
        absl::SimpleAtoi(name, &first_seq)) {
      files.emplace_back(first_seq, entry.path().string());
    }
  }
  if (error) {
    return ErrnoStatus(error.value(), absl::StrCat("cannot list the mapping journal in ", dir, ": ",
                                                   error.message()));
  }
  std::sort(files.begin(), files.end());

  MutexLock lock(&journal->mu_);
  uint64_t last_seq = 0;
  for (const auto& [first_seq, path] : files) {
    std::ifstream in(path, std::ios::binary);
    const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) return ErrnoStatus(EIO, absl::StrCat("cannot read the mapping journal ", path));
    size_t offset = 0;
    File file{path, 0};
    for (; offset + kRecordBytes <= data.size(); offset += kRecordBytes) {
      JournalRecord record;
      if (!Decode(data.data() + offset, &record)) break;
      if (last_seq != 0 && record.seq != last_seq + 1) break;
      last_seq = record.seq;
      file.last_seq = record.seq;
      journal->recovered_.push_back(record);
    }
    journal->stats_.torn_tail_bytes += data.size() - offset;
    if (file.last_seq == 0) {
      // Holds no record (a rotation's new file, or only a torn one). Its name may be the one
      // the new file below gets: it must not stay listed for deletion.
      unlink(path.c_str());
      continue;
    }
    journal->closed_.push_back(std::move(file));
  }
  journal->next_seq_ = std::max(last_seq + 1, std::max<uint64_t>(min_seq, 1));
  if (absl::Status status = journal->StartFileLocked(); !status.ok()) return status;
  return journal;
}

absl::Status MappingJournal::StartFileLocked() {
  std::string path = FilePath(dir_, next_seq_);
  // O_EXCL: a file of this name could only hold records this journal still needs.
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("cannot create the mapping journal ", path));
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
  current_ = File{std::move(path), 0};
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
  const JournalRecord record{kind, next_seq_, container_id, iova, size, ua};
  if (options_.fail_append_hook) {
    if (absl::Status injected = options_.fail_append_hook(record.seq); !injected.ok()) {
      return fail(ErrnoStatus(
          EIO, absl::StrCat("mapping journal: injected failure: ", injected.ToString())));
    }
  }
  char buffer[kRecordBytes];
  Encode(record, buffer);
  ssize_t written;
  do {
    written = write(fd_, buffer, sizeof(buffer));
  } while (written < 0 && errno == EINTR);
  if (written != static_cast<ssize_t>(sizeof(buffer))) {
    // A short write (ENOSPC part-way) leaves a torn record, which readers skip with what follows.
    const int err = written < 0 ? errno : ENOSPC;
    return fail(
        ErrnoStatus(err, absl::StrCat("cannot append to the mapping journal ", current_.path)));
  }
  ++next_seq_;
  current_.last_seq = record.seq;
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

std::vector<JournalRecord> MappingJournal::TakeUnfolded() {
  MutexLock lock(&mu_);
  // The rotation below closes the file a running flush uses.
  while (syncing_) synced_cv_.wait(mu_);
  std::vector<JournalRecord> records = std::move(unfolded_);
  unfolded_.clear();
  // A journal that cannot start a new file keeps appending to this one; DropFolded then waits
  // for a later rotation. A failed journal keeps its file for the next start to read.
  if (current_.last_seq != 0 && !failed_) (void)StartFileLocked();
  return records;
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

}  // namespace dmapin
