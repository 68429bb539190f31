#include "agent/store/mapping_journal.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::SizeIs;

class MappingJournalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = absl::StrCat(::testing::TempDir(), "/journal.XXXXXX");
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::vector<std::string> Files() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  std::string dir_;
};

std::string FilePathOf(const std::string& dir, uint64_t first_seq) {
  return absl::StrFormat("%s/mappings.%020d.log", dir, first_seq);
}

JournalRecord Map(uint64_t seq, uint64_t container, uint64_t iova, uint64_t size, uint64_t ua) {
  return {JournalRecord::kMap, seq, container, iova, size, ua};
}
JournalRecord Clear(uint64_t seq, uint64_t container, uint64_t iova, uint64_t size) {
  return {JournalRecord::kClear, seq, container, iova, size, 0};
}

TEST_F(MappingJournalTest, RecordsComeBackInOrderAfterReopen) {
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
    ASSERT_TRUE(journal.ok()) << journal.status();
    EXPECT_THAT((*journal)->recovered(), IsEmpty());
    EXPECT_EQ(*(*journal)->Append(JournalRecord::kMap, 7, 0x1000, 0x1000, 0x7000), 1u);
    EXPECT_EQ(*(*journal)->Append(JournalRecord::kClear, 7, 0x1000, 0x1000), 2u);
    EXPECT_EQ(*(*journal)->Append(JournalRecord::kMap, 9, 0, 0x2000, 0x9000), 3u);
  }
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(journal.ok()) << journal.status();
  EXPECT_THAT((*journal)->recovered(),
              ElementsAre(Map(1, 7, 0x1000, 0x1000, 0x7000), Clear(2, 7, 0x1000, 0x1000),
                          Map(3, 9, 0, 0x2000, 0x9000)));
  // Numbering continues after what was found.
  EXPECT_EQ(*(*journal)->Append(JournalRecord::kClear, 9, 0, 0x2000), 4u);
}

TEST_F(MappingJournalTest, NumberingStartsAtTheFloorGiven) {
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 500);
  ASSERT_TRUE(journal.ok()) << journal.status();
  EXPECT_EQ(*(*journal)->Append(JournalRecord::kMap, 1, 0, 0x1000, 0x1000), 500u);
}

// Slot n of a journal file: 0 is the header, records from 1.
constexpr off_t Slot(int n) { return n * 48; }

void Overwrite(const std::string& path, off_t offset, const std::string& bytes) {
  const int fd = open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, bytes.data(), bytes.size(), offset), static_cast<ssize_t>(bytes.size()));
  close(fd);
}

TEST_F(MappingJournalTest, TornTailIsDroppedAndCounted) {
  std::string path;
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, 0, 0x1000, 0x1000).ok());
    ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, 0x1000, 0x1000, 0x2000).ok());
    path = absl::StrCat(dir_, "/", Files().back());
  }
  // The second record half written, as a power loss during its write leaves it.
  Overwrite(path, Slot(2) + 20, std::string(28, '\0'));
  for (int run = 0; run < 2; ++run) {  // still fine once a later file follows it
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
    ASSERT_TRUE(journal.ok()) << journal.status();
    EXPECT_THAT((*journal)->recovered(), ElementsAre(Map(1, 1, 0, 0x1000, 0x1000)));
    EXPECT_EQ((*journal)->stats().torn_tail_bytes, 48u);
    EXPECT_THAT((*journal)->damage_report(), IsEmpty());
  }
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(journal.ok());
  EXPECT_EQ(*(*journal)->Append(JournalRecord::kMap, 1, 0x1000, 0x1000, 0x2000), 2u);
}

// Three records in one file; returns its path.
std::string WriteThree(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir, 1);
  EXPECT_TRUE(journal.ok());
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE((*journal)->Append(JournalRecord::kMap, 1, i * 0x1000, 0x1000, 0x1000).ok());
  }
  return FilePathOf(dir, 1);
}

void ExpectDataLoss(const absl::StatusOr<std::unique_ptr<MappingJournal>>& journal,
                    const std::string& mentions) {
  ASSERT_FALSE(journal.ok());
  EXPECT_EQ(journal.status().code(), absl::StatusCode::kDataLoss) << journal.status();
  EXPECT_THAT(std::string(journal.status().message()), ::testing::HasSubstr(mentions));
  EXPECT_THAT(std::string(journal.status().message()), ::testing::HasSubstr("EIO"));
}

TEST_F(MappingJournalTest, ADamagedRecordFollowedByRecordsIsDataLoss) {
  const std::string path = WriteThree(dir_);
  Overwrite(path, Slot(2) + 30, "\x5a");  // inside the second record; the third is intact
  ExpectDataLoss(MappingJournal::Open(dir_, 1),
                 absl::StrCat(path, " at offset ", Slot(2), ": a record failing its checksum"));
  EXPECT_THAT(Files(), ElementsAre(::testing::EndsWith(".log")));  // nothing touched
}

TEST_F(MappingJournalTest, AnEmptiedRecordFollowedByRecordsIsDataLoss) {
  const std::string path = WriteThree(dir_);
  Overwrite(path, Slot(1), std::string(48, '\0'));
  ExpectDataLoss(MappingJournal::Open(dir_, 1),
                 absl::StrCat(path, " at offset 48: an empty record slot followed by data"));
}

TEST_F(MappingJournalTest, ATruncatedFileIsDataLoss) {
  const std::string path = WriteThree(dir_);
  std::filesystem::resize_file(path, Slot(3));  // at a record boundary
  ExpectDataLoss(MappingJournal::Open(dir_, 1), absl::StrCat(path, " holds 144 bytes"));
  // Recovery keeps the records the cut left, and the file is whole again.
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal =
        MappingJournal::Open(dir_, 1, {.recover_damaged = true});
    ASSERT_TRUE(journal.ok()) << journal.status();
    EXPECT_THAT((*journal)->recovered(), SizeIs(2));
    EXPECT_EQ((*journal)->stats().damaged_records_dropped, 0u);
  }
  EXPECT_TRUE(MappingJournal::Open(dir_, 1).ok());
  std::filesystem::resize_file(path, 0);
  ExpectDataLoss(MappingJournal::Open(dir_, 1), absl::StrCat(path, " holds 0 bytes: truncated"));
}

TEST_F(MappingJournalTest, AMissingFileIsDataLoss) {
  uint64_t appending = 0;
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
    ASSERT_TRUE(journal.ok());
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, i * 0x1000, 0x1000, 0x1000).ok());
      (*journal)->TakeUnfolded(&appending);  // one file per record
    }
    ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, 0x9000, 0x1000, 0x1000).ok());
  }
  EXPECT_EQ(appending, 4u);
  ASSERT_THAT(Files(), SizeIs(4));
  // A file between two others: a gap in the sequence.
  std::filesystem::rename(FilePathOf(dir_, 2), absl::StrCat(dir_, "/elsewhere"));
  ExpectDataLoss(MappingJournal::Open(dir_, 1),
                 absl::StrCat(FilePathOf(dir_, 3), " starts at seq 3 but the records of ",
                              FilePathOf(dir_, 1), " end at 1"));
  std::filesystem::rename(absl::StrCat(dir_, "/elsewhere"), FilePathOf(dir_, 2));
  // The oldest file, which records the caller has not folded need.
  std::filesystem::remove(FilePathOf(dir_, 1));
  ExpectDataLoss(MappingJournal::Open(dir_, 1), "records 1-1 are missing");
  EXPECT_TRUE(MappingJournal::Open(dir_, 2).ok());  // record 1 was folded: nothing is missing
  // Every file, when the caller knows which one was being appended to.
  std::filesystem::remove_all(dir_);
  std::filesystem::create_directory(dir_);
  ExpectDataLoss(MappingJournal::Open(dir_, 5, {.expected_file_seq = 4}),
                 absl::StrCat(FilePathOf(dir_, 4), " is missing"));
  EXPECT_TRUE(MappingJournal::Open(dir_, 5).ok());  // a caller that knows nothing: a new journal
}

TEST_F(MappingJournalTest, RecoveryKeepsWhatPrecedesTheDamageAndSetsTheRestAside) {
  const std::string path = WriteThree(dir_);
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, 0x5000, 0x1000, 0x1000).ok());
  }  // records 1-3 in the first file, 4 in the second
  Overwrite(path, Slot(2) + 30, "\x5a");
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal =
      MappingJournal::Open(dir_, 1, {.recover_damaged = true});
  ASSERT_TRUE(journal.ok()) << journal.status();
  EXPECT_THAT((*journal)->recovered(), ElementsAre(Map(1, 1, 0, 0x1000, 0x1000)));
  EXPECT_EQ((*journal)->stats().damaged_files, 2u);
  EXPECT_EQ((*journal)->stats().damaged_records_dropped, 2u);  // 3 and 4; 2 is not a record
  ASSERT_THAT((*journal)->damage_report(), SizeIs(1));
  EXPECT_THAT((*journal)->damage_report()[0],
              ::testing::HasSubstr("kept the records up to seq 1, dropped 2"));
  EXPECT_EQ(*(*journal)->Append(JournalRecord::kClear, 1, 0, 0x1000), 2u);
  journal->reset();
  // The first file keeps record 1 (a copy of it as found went aside), the second went aside.
  EXPECT_THAT(Files(),
              ElementsAre(::testing::EndsWith("1.log"), ::testing::HasSubstr("1.log.damaged."),
                          ::testing::EndsWith("2.log"), ::testing::HasSubstr("4.log.damaged.")));
  // The next start reads what was kept and what this one wrote, nothing of what went aside.
  journal = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(journal.ok()) << journal.status();
  EXPECT_THAT((*journal)->recovered(),
              ElementsAre(Map(1, 1, 0, 0x1000, 0x1000), Clear(2, 1, 0, 0x1000)));
}

TEST_F(MappingJournalTest, AFullFileRotatesToTheNext) {
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal =
        MappingJournal::Open(dir_, 1, {.file_records = 2});
    ASSERT_TRUE(journal.ok());
    for (int i = 0; i < 5; ++i) {
      ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, i * 0x1000, 0x1000, 0x1000).ok());
    }
    EXPECT_EQ((*journal)->stats().files_created, 3u);
  }
  EXPECT_THAT(Files(), SizeIs(3));
  EXPECT_EQ(std::filesystem::file_size(FilePathOf(dir_, 1)), uintmax_t{Slot(3)});
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(journal.ok()) << journal.status();
  EXPECT_THAT((*journal)->recovered(), SizeIs(5));
}

TEST_F(MappingJournalTest, TakeRotatesAndDropDeletesFoldedFiles) {
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(journal.ok());
  MappingJournal& j = **journal;
  ASSERT_TRUE(j.Append(JournalRecord::kMap, 1, 0, 0x1000, 0x1000).ok());
  ASSERT_TRUE(j.Append(JournalRecord::kMap, 1, 0x1000, 0x1000, 0x2000).ok());
  EXPECT_EQ(j.unfolded(), 2u);
  std::vector<JournalRecord> taken = j.TakeUnfolded();
  EXPECT_THAT(taken, SizeIs(2));
  EXPECT_EQ(j.unfolded(), 0u);
  ASSERT_TRUE(j.Append(JournalRecord::kClear, 1, 0, 0x1000).ok());
  EXPECT_THAT(Files(), SizeIs(2));  // the taken records' file and the new one
  j.DropFolded(1);                  // the first file also holds seq 2: kept
  EXPECT_THAT(Files(), SizeIs(2));
  j.DropFolded(2);
  EXPECT_THAT(Files(), SizeIs(1));
  EXPECT_EQ(j.stats().files_deleted, 1u);
  // The record after the rotation is still read back.
  journal->reset();
  absl::StatusOr<std::unique_ptr<MappingJournal>> reopened = MappingJournal::Open(dir_, 3);
  ASSERT_TRUE(reopened.ok());
  EXPECT_THAT((*reopened)->recovered(), ElementsAre(Clear(3, 1, 0, 0x1000)));
}

TEST_F(MappingJournalTest, AnEmptyFileLeftByARotationIsNotDeletedWithItsSuccessor) {
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, 0, 0x1000, 0x1000).ok());
    (*journal)->TakeUnfolded();  // starts mappings.<2>.log, then the process dies
  }
  {
    // The new file of this run is mappings.<2>.log again.
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
    ASSERT_TRUE(journal.ok()) << journal.status();
    ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, 0x1000, 0x1000, 0x2000).ok());
    (*journal)->DropFolded(1);  // record 1 was folded; record 2 was not
  }
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 2);
  ASSERT_TRUE(journal.ok());
  EXPECT_THAT((*journal)->recovered(), ElementsAre(Map(2, 1, 0x1000, 0x1000, 0x2000)));
}

TEST_F(MappingJournalTest, FailedAppendIsStickyAndNotReadBack) {
  MappingJournalOptions options;
  options.fail_append_hook = [](uint64_t seq) {
    return seq == 2 ? absl::InternalError("disk on fire") : absl::OkStatus();
  };
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal =
        MappingJournal::Open(dir_, 1, options);
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, 0, 0x1000, 0x1000).ok());
    absl::StatusOr<uint64_t> failed = (*journal)->Append(JournalRecord::kMap, 1, 0, 0x1000, 0x1000);
    ASSERT_FALSE(failed.ok());
    EXPECT_THAT(std::string(failed.status().message()), ::testing::HasSubstr("EIO"));
    EXPECT_FALSE((*journal)->Append(JournalRecord::kClear, 1, 0, 0x1000).ok());
    EXPECT_EQ((*journal)->stats().failed_appends, 2u);
  }
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(journal.ok());
  EXPECT_THAT((*journal)->recovered(), ElementsAre(Map(1, 1, 0, 0x1000, 0x1000)));
}

TEST_F(MappingJournalTest, FlushedAppendsFromManyThreadsAllComeBack) {
  constexpr int kThreads = 8;
  constexpr int kPerThread = 100;
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal =
        MappingJournal::Open(dir_, 1, {.sync = true});
    ASSERT_TRUE(journal.ok());
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&journal, t] {
        for (int i = 0; i < kPerThread; ++i) {
          EXPECT_TRUE((*journal)->Append(JournalRecord::kMap, t, i * 0x1000, 0x1000, 0x1000).ok());
          // A rotation now and then, as the store's folds do.
          if (i % 25 == 0) (*journal)->TakeUnfolded();
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    EXPECT_EQ((*journal)->stats().appends, uint64_t{kThreads * kPerThread});
  }
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(journal.ok());
  ASSERT_THAT((*journal)->recovered(), SizeIs(kThreads * kPerThread));
  for (size_t i = 0; i < (*journal)->recovered().size(); ++i) {
    EXPECT_EQ((*journal)->recovered()[i].seq, i + 1);
  }
}

TEST_F(MappingJournalTest, UnreadableDirectoryIsAnError) {
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal =
      MappingJournal::Open(absl::StrCat(dir_, "/missing"), 1);
  EXPECT_FALSE(journal.ok());
  EXPECT_THAT(std::string(journal.status().message()), ::testing::HasSubstr("ENOENT"));
}

// --- Coalesce -----------------------------------------------------------------------------------

// The rows of Mutation::SetMapping / ClearMappings, as a model: per container, iova -> (size, ua);
// a record trims or splits every row overlapping its range, then (a map) inserts itself.
using Rows = std::map<std::pair<uint64_t, uint64_t>, std::pair<uint64_t, uint64_t>>;

void Apply(const JournalRecord& r, Rows* rows) {
  const uint64_t last = r.iova + (r.size - 1);
  Rows next;
  for (const auto& [key, value] : *rows) {
    const auto [container, iova] = key;
    const auto [size, ua] = value;
    const uint64_t row_last = iova + (size - 1);
    if (container != r.container_id || row_last < r.iova || iova > last) {
      next[key] = value;
      continue;
    }
    if (iova < r.iova) next[{container, iova}] = {r.iova - iova, ua};
    if (row_last > last) next[{container, last + 1}] = {row_last - last, ua + (last + 1 - iova)};
  }
  if (r.kind == JournalRecord::kMap) next[{r.container_id, r.iova}] = {r.size, r.ua};
  *rows = std::move(next);
}

TEST(CoalesceTest, AMapUndoneByItsUnmapLeavesOnlyTheUnmap) {
  const std::vector<JournalRecord> records = {
      Map(1, 7, 0x1000, 0x1000, 0xa000), Map(2, 7, 0x2000, 0x1000, 0xb000),
      Clear(3, 7, 0x1000, 0x1000), Map(4, 8, 0x1000, 0x1000, 0xc000)};
  EXPECT_THAT(Coalesce(records),
              ElementsAre(Map(2, 7, 0x2000, 0x1000, 0xb000), Clear(3, 7, 0x1000, 0x1000),
                          Map(4, 8, 0x1000, 0x1000, 0xc000)));
}

TEST(CoalesceTest, ARecordCoveredByTheUnionOfLaterOnesGoes) {
  const std::vector<JournalRecord> records = {Map(1, 7, 0x1000, 0x2000, 0xa000),
                                              Clear(2, 7, 0x0, 0x2000),
                                              Map(3, 7, 0x2000, 0x2000, 0xb000)};
  EXPECT_THAT(Coalesce(records),
              ElementsAre(Clear(2, 7, 0x0, 0x2000), Map(3, 7, 0x2000, 0x2000, 0xb000)));
  // Partly covered: kept.
  const std::vector<JournalRecord> partial = {Map(1, 7, 0x1000, 0x2000, 0xa000),
                                              Clear(2, 7, 0x0, 0x2000)};
  EXPECT_THAT(Coalesce(partial), SizeIs(2));
}

TEST(CoalesceTest, TopOfTheAddressSpace) {
  const uint64_t top = ~uint64_t{0} - 0xfff;
  const std::vector<JournalRecord> records = {Map(1, 7, top, 0x1000, 0xa000),
                                              Map(2, 7, 0, 0x1000, 0xa000),
                                              Clear(3, 7, top - 0x1000, 0x2000)};
  EXPECT_THAT(Coalesce(records),
              ElementsAre(Map(2, 7, 0, 0x1000, 0xa000), Clear(3, 7, top - 0x1000, 0x2000)));
}

TEST(CoalesceTest, SameRowsAsApplyingEveryRecord) {
  const unsigned seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  for (int round = 0; round < 2000; ++round) {
    // Small ranges on a few pages of two containers, so that records overlap in every way.
    Rows start;
    for (int i = 0; i < 4; ++i) {
      const uint64_t iova = (rng() % 16) * 0x1000;
      start[{1 + rng() % 2, iova}] = {0x1000, 0x100000 + iova};
    }
    std::vector<JournalRecord> records;
    const int n = 1 + static_cast<int>(rng() % 12);
    for (int i = 0; i < n; ++i) {
      const uint64_t iova = (rng() % 16) * 0x1000;
      const uint64_t size = (1 + rng() % 4) * 0x1000;
      const uint64_t container = 1 + rng() % 2;
      records.push_back(rng() % 2 == 0
                            ? Map(i + 1, container, iova, size, 0x200000 + rng() % 64 * 0x1000)
                            : Clear(i + 1, container, iova, size));
    }
    Rows all = start;
    for (const JournalRecord& r : records) Apply(r, &all);
    Rows coalesced = start;
    for (const JournalRecord& r : Coalesce(records)) Apply(r, &coalesced);
    ASSERT_EQ(all, coalesced) << "round " << round;
  }
}

}  // namespace
}  // namespace dmapin::agent
