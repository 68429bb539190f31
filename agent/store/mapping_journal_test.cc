#include "agent/store/mapping_journal.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin {
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

TEST_F(MappingJournalTest, TornTailIsDroppedAndCounted) {
  std::string path;
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, 0, 0x1000, 0x1000).ok());
    ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, 0x1000, 0x1000, 0x2000).ok());
    path = absl::StrCat(dir_, "/", Files().back());
  }
  // Half of the second record, as a power loss during its write would leave it.
  std::filesystem::resize_file(path, 48 + 20);
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(journal.ok());
  EXPECT_THAT((*journal)->recovered(), ElementsAre(Map(1, 1, 0, 0x1000, 0x1000)));
  EXPECT_EQ((*journal)->stats().torn_tail_bytes, 20u);
  EXPECT_EQ(*(*journal)->Append(JournalRecord::kMap, 1, 0x1000, 0x1000, 0x2000), 2u);
}

TEST_F(MappingJournalTest, CorruptRecordEndsTheLog) {
  std::string path;
  {
    absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
    ASSERT_TRUE(journal.ok());
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE((*journal)->Append(JournalRecord::kMap, 1, i * 0x1000, 0x1000, 0x1000).ok());
    }
    path = absl::StrCat(dir_, "/", Files().back());
  }
  const int fd = open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  const char garbage = 0x5a;
  ASSERT_EQ(pwrite(fd, &garbage, 1, 48 + 30), 1);  // inside the second record
  close(fd);
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(journal.ok());
  EXPECT_THAT((*journal)->recovered(), SizeIs(1));
  EXPECT_EQ((*journal)->stats().torn_tail_bytes, 96u);
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
  absl::StatusOr<std::unique_ptr<MappingJournal>> reopened = MappingJournal::Open(dir_, 1);
  ASSERT_TRUE(reopened.ok());
  EXPECT_THAT((*reopened)->recovered(), ElementsAre(Clear(3, 1, 0, 0x1000)));
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

TEST_F(MappingJournalTest, UnreadableDirectoryIsAnError) {
  absl::StatusOr<std::unique_ptr<MappingJournal>> journal =
      MappingJournal::Open(absl::StrCat(dir_, "/missing"), 1);
  EXPECT_FALSE(journal.ok());
  EXPECT_THAT(std::string(journal.status().message()), ::testing::HasSubstr("ENOENT"));
}

}  // namespace
}  // namespace dmapin
