#include "agent/registry/memlock_backend.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "agent/registry/registry.h"
#include "common/errno_status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

using ::testing::HasSubstr;

const uint64_t kPs = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));

uint64_t VmLck() {
  absl::StatusOr<uint64_t> bytes = ReadVmLckBytes();
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.value_or(0);
}

uint32_t Log2(uint64_t x) { return static_cast<uint32_t>(__builtin_ctzll(x)); }

// Tests that need real frames: skipped (with the reason) where Create() refuses, e.g. not root.
class MemlockBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<MemlockBackend>> backend = MemlockBackend::Create();
    if (!backend.ok()) {
      if (ErrnoOf(backend.status()) == EPERM) {
        GTEST_SKIP() << "memlock backend unavailable (needs root / CAP_SYS_ADMIN): "
                     << backend.status();
      }
      FAIL() << backend.status();
    }
    backend_ = *std::move(backend);
  }

  BackedMemory Anonymous(uint64_t pages) {
    absl::StatusOr<BackedMemory> memory = BackedMemory::Anonymous(pages * kPs);
    EXPECT_TRUE(memory.ok()) << memory.status();
    return *std::move(memory);
  }

  std::unique_ptr<MemlockBackend> backend_;
};

TEST_F(MemlockBackendTest, BasicProperties) {
  EXPECT_EQ(backend_->name(), "memlock");
  EXPECT_EQ(backend_->page_size(), kPs);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), 0);
  EXPECT_EQ(backend_->LockedPages(), 0);
}

TEST_F(MemlockBackendTest, PinAnonymousLocksAndReportsDistinctFrames) {
  constexpr uint64_t kPages = 64;
  BackedMemory memory = Anonymous(kPages);
  const uint64_t before = VmLck();

  std::vector<uint64_t> hpas(kPages);
  uint64_t pinned = 99;
  uint32_t shift = 0;
  ASSERT_TRUE(backend_->PinPages(1, memory.ua(), absl::MakeSpan(hpas), &pinned, &shift).ok());
  EXPECT_EQ(pinned, kPages);
  EXPECT_EQ(shift, Log2(kPs));
  EXPECT_EQ(VmLck(), before + kPages * kPs);

  absl::flat_hash_set<uint64_t> distinct;
  for (uint64_t i = 0; i < kPages; ++i) {
    EXPECT_NE(hpas[i], 0) << "page " << i;
    EXPECT_EQ(hpas[i] % kPs, 0) << "page " << i;
    distinct.insert(hpas[i]);
    EXPECT_EQ(backend_->PinCount(1, memory.ua() + i * kPs).value(), 1);
  }
  EXPECT_EQ(distinct.size(), kPages);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), kPages);
  EXPECT_EQ(backend_->LockedPages(), kPages);

  // The memory is populated for write and still usable.
  static_cast<char*>(memory.data())[5 * kPs + 7] = 42;

  backend_->UnpinPages(1, memory.ua(), hpas);
  EXPECT_EQ(VmLck(), before);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), 0);
  EXPECT_EQ(backend_->LockedPages(), 0);
  EXPECT_EQ(backend_->PinCount(1, memory.ua()).value(), 0);
}

TEST_F(MemlockBackendTest, HpasMatchPagemapReader) {
  constexpr uint64_t kPages = 8;
  BackedMemory memory = Anonymous(kPages);
  std::vector<uint64_t> hpas(kPages);
  uint64_t pinned = 0;
  uint32_t shift = 0;
  ASSERT_TRUE(backend_->PinPages(1, memory.ua(), absl::MakeSpan(hpas), &pinned, &shift).ok());

  absl::StatusOr<PagemapReader> reader = PagemapReader::Open();
  ASSERT_TRUE(reader.ok()) << reader.status();
  for (uint64_t i = 0; i < kPages; ++i) {
    absl::StatusOr<uint64_t> hpa = reader->Hpa(memory.ua() + i * kPs);
    ASSERT_TRUE(hpa.ok()) << hpa.status();
    EXPECT_EQ(*hpa, hpas[i]);
  }
  backend_->UnpinPages(1, memory.ua(), hpas);
}

TEST_F(MemlockBackendTest, EmptyAndMisalignedRanges) {
  BackedMemory memory = Anonymous(2);
  uint64_t pinned = 7;
  uint32_t shift = 0;
  EXPECT_TRUE(backend_->PinPages(1, memory.ua(), {}, &pinned, &shift).ok());
  EXPECT_EQ(pinned, 0);
  EXPECT_EQ(shift, Log2(kPs));

  std::vector<uint64_t> hpas(1);
  absl::Status status =
      backend_->PinPages(1, memory.ua() + 8, absl::MakeSpan(hpas), &pinned, &shift);
  EXPECT_EQ(ErrnoOf(status), EINVAL) << status;
  EXPECT_EQ(pinned, 0);
}

TEST_F(MemlockBackendTest, HoleGivesEfaultAndPinsLeadingPages) {
  constexpr uint64_t kPages = 8;
  constexpr uint64_t kHole = 3;
  BackedMemory memory = Anonymous(kPages);
  const uint64_t hole_ua = memory.ua() + kHole * kPs;
  ASSERT_EQ(munmap(reinterpret_cast<void*>(hole_ua), kPs), 0);
  const uint64_t before = VmLck();

  std::vector<uint64_t> hpas(kPages);
  uint64_t pinned = 99;
  uint32_t shift = 0;
  absl::Status status = backend_->PinPages(1, memory.ua(), absl::MakeSpan(hpas), &pinned, &shift);
  EXPECT_EQ(ErrnoOf(status), EFAULT) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(absl::StrFormat("%#x", hole_ua)));
  ASSERT_EQ(pinned, kHole);
  for (uint64_t i = 0; i < kHole; ++i) EXPECT_NE(hpas[i], 0);
  EXPECT_EQ(VmLck(), before + kHole * kPs);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), kHole);

  // The caller unpins exactly the leading pages.
  backend_->UnpinPages(1, memory.ua(), absl::MakeConstSpan(hpas).first(pinned));
  EXPECT_EQ(VmLck(), before);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), 0);
  EXPECT_EQ(backend_->LockedPages(), 0);
}

TEST_F(MemlockBackendTest, HoleAtFirstPagePinsNothing) {
  BackedMemory memory = Anonymous(4);
  ASSERT_EQ(munmap(memory.data(), kPs), 0);
  std::vector<uint64_t> hpas(4);
  uint64_t pinned = 99;
  uint32_t shift = 0;
  absl::Status status = backend_->PinPages(1, memory.ua(), absl::MakeSpan(hpas), &pinned, &shift);
  EXPECT_EQ(ErrnoOf(status), EFAULT) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(absl::StrFormat("%#x", memory.ua())));
  EXPECT_EQ(pinned, 0);
  EXPECT_EQ(backend_->LockedPages(), 0);
}

TEST_F(MemlockBackendTest, ReadOnlyPageGivesEfault) {
  constexpr uint64_t kPages = 8;
  constexpr uint64_t kReadOnly = 5;
  BackedMemory memory = Anonymous(kPages);
  const uint64_t ro_ua = memory.ua() + kReadOnly * kPs;
  ASSERT_EQ(mprotect(reinterpret_cast<void*>(ro_ua), kPs, PROT_READ), 0);
  const uint64_t before = VmLck();

  std::vector<uint64_t> hpas(kPages);
  uint64_t pinned = 99;
  uint32_t shift = 0;
  absl::Status status = backend_->PinPages(1, memory.ua(), absl::MakeSpan(hpas), &pinned, &shift);
  EXPECT_EQ(ErrnoOf(status), EFAULT) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(absl::StrFormat("%#x", ro_ua)));
  ASSERT_EQ(pinned, kReadOnly);
  EXPECT_EQ(VmLck(), before + kReadOnly * kPs);
  backend_->UnpinPages(1, memory.ua(), absl::MakeConstSpan(hpas).first(pinned));
  EXPECT_EQ(VmLck(), before);
  EXPECT_EQ(backend_->LockedPages(), 0);
}

TEST_F(MemlockBackendTest, PinsAreCountedPerPageAcrossContexts) {
  // Context 1 pins pages [0, 8), context 2 pins [4, 12) of the same memory.
  BackedMemory memory = Anonymous(12);
  const uint64_t before = VmLck();
  std::vector<uint64_t> a(8);
  std::vector<uint64_t> b(8);
  uint64_t pinned = 0;
  uint32_t shift = 0;
  ASSERT_TRUE(backend_->PinPages(1, memory.ua(), absl::MakeSpan(a), &pinned, &shift).ok());
  ASSERT_TRUE(
      backend_->PinPages(2, memory.ua() + 4 * kPs, absl::MakeSpan(b), &pinned, &shift).ok());
  EXPECT_EQ(VmLck(), before + 12 * kPs);
  EXPECT_EQ(backend_->LockedPages(), 12);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), 16);
  for (uint64_t i = 4; i < 8; ++i) {
    EXPECT_EQ(a[i], b[i - 4]) << "shared page " << i;
    EXPECT_EQ(backend_->PinCount(1, memory.ua() + i * kPs).value(), 1);
    EXPECT_EQ(backend_->PinCount(2, memory.ua() + i * kPs).value(), 1);
  }
  EXPECT_EQ(backend_->PinCount(2, memory.ua()).value(), 0);

  // Dropping context 1 unlocks only the pages context 2 does not hold.
  backend_->UnpinPages(1, memory.ua(), a);
  EXPECT_EQ(VmLck(), before + 8 * kPs);
  EXPECT_EQ(backend_->LockedPages(), 8);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), 8);
  EXPECT_EQ(backend_->PinCount(1, memory.ua() + 4 * kPs).value(), 0);

  // Unpinning what a context does not hold changes nothing.
  backend_->UnpinPages(1, memory.ua(), a);
  EXPECT_EQ(VmLck(), before + 8 * kPs);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), 8);

  backend_->UnpinPages(2, memory.ua() + 4 * kPs, b);
  EXPECT_EQ(VmLck(), before);
  EXPECT_EQ(backend_->LockedPages(), 0);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), 0);
}

TEST_F(MemlockBackendTest, SameContextPinningTwiceNeedsTwoUnpins) {
  BackedMemory memory = Anonymous(4);
  const uint64_t before = VmLck();
  std::vector<uint64_t> hpas(4);
  uint64_t pinned = 0;
  uint32_t shift = 0;
  ASSERT_TRUE(backend_->PinPages(1, memory.ua(), absl::MakeSpan(hpas), &pinned, &shift).ok());
  ASSERT_TRUE(backend_->PinPages(1, memory.ua(), absl::MakeSpan(hpas), &pinned, &shift).ok());
  EXPECT_EQ(backend_->PinCount(1, memory.ua()).value(), 2);
  backend_->UnpinPages(1, memory.ua(), hpas);
  EXPECT_EQ(VmLck(), before + 4 * kPs);
  backend_->UnpinPages(1, memory.ua(), hpas);
  EXPECT_EQ(VmLck(), before);
}

TEST_F(MemlockBackendTest, ConcurrentOverlappingPinsLeaveNothingLocked) {
  constexpr uint64_t kPages = 32;
  BackedMemory memory = Anonymous(kPages);
  const uint64_t before = VmLck();
  std::vector<std::thread> threads;
  for (ContextId context = 1; context <= 4; ++context) {
    threads.emplace_back([&, context] {
      // Each thread pins a window that overlaps its neighbours'.
      const uint64_t first = (context - 1) * 4;
      std::vector<uint64_t> hpas(16);
      for (int round = 0; round < 200; ++round) {
        uint64_t pinned = 0;
        uint32_t shift = 0;
        absl::Status status = backend_->PinPages(context, memory.ua() + first * kPs,
                                                 absl::MakeSpan(hpas), &pinned, &shift);
        EXPECT_TRUE(status.ok()) << status;
        EXPECT_EQ(backend_->PinCount(context, memory.ua() + first * kPs).value(), 1);
        backend_->UnpinPages(context, memory.ua() + first * kPs, hpas);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(backend_->LockedPages(), 0);
  EXPECT_EQ(backend_->TotalPinnedPages().value(), 0);
  EXPECT_EQ(VmLck(), before);
}

TEST_F(MemlockBackendTest, MemfdBackingSharesFramesBetweenMappings) {
  constexpr uint64_t kPages = 16;
  absl::StatusOr<BackedMemory> memory = BackedMemory::Memfd("dmapin-test", kPages * kPs);
  ASSERT_TRUE(memory.ok()) << memory.status();
  ASSERT_GE(memory->fd(), 0);
  const uint64_t before = VmLck();

  std::vector<uint64_t> hpas(kPages);
  uint64_t pinned = 0;
  uint32_t shift = 0;
  ASSERT_TRUE(backend_->PinPages(1, memory->ua(), absl::MakeSpan(hpas), &pinned, &shift).ok());
  EXPECT_EQ(pinned, kPages);
  EXPECT_EQ(shift, Log2(kPs));
  EXPECT_EQ(VmLck(), before + kPages * kPs);

  // A second mapping of the same memfd (as a VMM would have) sees the same frames.
  void* second = mmap(nullptr, kPages * kPs, PROT_READ | PROT_WRITE, MAP_SHARED, memory->fd(), 0);
  ASSERT_NE(second, MAP_FAILED);
  const uint64_t second_ua = reinterpret_cast<uintptr_t>(second);
  std::vector<uint64_t> second_hpas(kPages);
  ASSERT_TRUE(backend_->PinPages(2, second_ua, absl::MakeSpan(second_hpas), &pinned, &shift).ok());
  EXPECT_EQ(second_hpas, hpas);
  static_cast<char*>(memory->data())[3 * kPs] = 'x';
  EXPECT_EQ(static_cast<char*>(second)[3 * kPs], 'x');

  backend_->UnpinPages(2, second_ua, second_hpas);
  backend_->UnpinPages(1, memory->ua(), hpas);
  EXPECT_EQ(VmLck(), before);
  munmap(second, kPages * kPs);
}

// --- Huge pages ---------------------------------------------------------------------------------

absl::StatusOr<uint64_t> MeminfoValue(absl::string_view key) {
  int fd = open("/proc/meminfo", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, "open(/proc/meminfo)");
  std::string text(16384, '\0');
  const ssize_t n = read(fd, text.data(), text.size());
  close(fd);
  if (n <= 0) return ErrnoStatus(EIO, "read(/proc/meminfo)");
  text.resize(static_cast<size_t>(n));
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, key) || !absl::ConsumePrefix(&line, ":")) continue;
    line = absl::StripAsciiWhitespace(line);
    absl::ConsumeSuffix(&line, "kB");
    uint64_t value = 0;
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &value)) return value;
  }
  return ErrnoStatus(ENOENT, absl::StrCat("no ", key, " in /proc/meminfo"));
}

bool WriteFile(const char* path, const std::string& contents) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok =
      write(fd, contents.data(), contents.size()) == static_cast<ssize_t>(contents.size());
  close(fd);
  return ok;
}

// Finds (or, as root, provides) a hugetlbfs mount with free huge pages; undoes what it changed.
class HugePages {
 public:
  ~HugePages() {
    if (raised_pool_) WriteFile("/proc/sys/vm/nr_hugepages", absl::StrCat(original_pool_));
    if (mounted_) umount2(mount_.c_str(), MNT_DETACH);
    if (created_dir_) rmdir(mount_.c_str());
  }

  // Empty when usable, else why not (for GTEST_SKIP).
  std::string Prepare(uint64_t needed) {
    absl::StatusOr<std::string> mount = BackedMemory::FindHugetlbfsMount();
    if (!mount.ok()) {
      if (geteuid() != 0) return "no hugetlbfs mount and not root to mount one";
      mount_ = "/dev/hugepages";
      created_dir_ = mkdir(mount_.c_str(), 0755) == 0;
      if (::mount("none", mount_.c_str(), "hugetlbfs", 0, nullptr) != 0) {
        return absl::StrCat("no hugetlbfs mount, and mounting one on /dev/hugepages failed: ",
                            strerror(errno));
      }
      mounted_ = true;
    } else {
      mount_ = *mount;
    }
    absl::StatusOr<uint64_t> free_pages = MeminfoValue("HugePages_Free");
    if (!free_pages.ok()) return std::string(free_pages.status().message());
    if (*free_pages < needed) {
      absl::StatusOr<uint64_t> total = MeminfoValue("HugePages_Total");
      if (geteuid() != 0 || !total.ok()) {
        return absl::StrCat("only ", *free_pages, " free huge pages (HugePages_Free), need ",
                            needed, "; not root to raise vm.nr_hugepages");
      }
      original_pool_ = *total;
      raised_pool_ = true;
      WriteFile("/proc/sys/vm/nr_hugepages", absl::StrCat(*total + 16));
      free_pages = MeminfoValue("HugePages_Free");
      if (!free_pages.ok() || *free_pages < needed) {
        return absl::StrCat("raising vm.nr_hugepages gave only ", free_pages.value_or(0),
                            " free huge pages, need ", needed);
      }
    }
    return "";
  }

  const std::string& mount() const { return mount_; }

 private:
  std::string mount_;
  bool created_dir_ = false;
  bool mounted_ = false;
  bool raised_pool_ = false;
  uint64_t original_pool_ = 0;
};

TEST_F(MemlockBackendTest, HugetlbfsBackingReportsHugePageShift) {
  HugePages huge_pages;
  const std::string why_not = huge_pages.Prepare(2);
  if (!why_not.empty()) GTEST_SKIP() << "hugetlbfs unavailable: " << why_not;

  EXPECT_EQ(ErrnoOf(BackedMemory::HugetlbfsFile(huge_pages.mount(), 0).status()), EINVAL);
  absl::StatusOr<uint64_t> huge_kib = MeminfoValue("Hugepagesize");
  ASSERT_TRUE(huge_kib.ok()) << huge_kib.status();
  const uint64_t huge = *huge_kib * 1024;
  // Scoped so the mapping is gone before ~HugePages shrinks the pool again.
  {
    absl::StatusOr<BackedMemory> memory = BackedMemory::HugetlbfsFile(huge_pages.mount(), 2 * huge);
    ASSERT_TRUE(memory.ok()) << memory.status();
    EXPECT_EQ(memory->backing_page_size(), huge);
    EXPECT_EQ(memory->ua() % huge, 0);
    const uint64_t pages = 2 * huge / kPs;
    std::vector<uint64_t> hpas(pages);
    uint64_t pinned = 0;
    uint32_t shift = 0;
    absl::Status status =
        backend_->PinPages(1, memory->ua(), absl::MakeSpan(hpas), &pinned, &shift);
    ASSERT_TRUE(status.ok()) << status;
    EXPECT_EQ(pinned, pages);
    EXPECT_EQ(shift, Log2(huge));
    // Each huge page is physically contiguous and naturally aligned. (VmLck is not checked:
    // the kernel does not account mlock of hugetlb mappings.)
    for (uint64_t i = 0; i < pages; ++i) {
      if (i % (huge / kPs) == 0) {
        EXPECT_EQ(hpas[i] % huge, 0) << "page " << i;
      } else {
        EXPECT_EQ(hpas[i], hpas[i - 1] + kPs) << "page " << i;
      }
    }
    backend_->UnpinPages(1, memory->ua(), hpas);
    EXPECT_EQ(backend_->LockedPages(), 0);
  }
}

// --- Pieces that need no privileges -------------------------------------------------------------

TEST(BackedMemoryTest, AnonymousMemoryIsUsableAndMovable) {
  absl::StatusOr<BackedMemory> memory = BackedMemory::Anonymous(4 * kPs);
  ASSERT_TRUE(memory.ok()) << memory.status();
  EXPECT_EQ(memory->size(), 4 * kPs);
  EXPECT_EQ(memory->fd(), -1);
  EXPECT_EQ(memory->ua() % kPs, 0);
  EXPECT_EQ(memory->backing_page_size(), kPs);
  static_cast<char*>(memory->data())[4 * kPs - 1] = 1;

  const uint64_t ua = memory->ua();
  BackedMemory moved = *std::move(memory);
  EXPECT_EQ(moved.ua(), ua);
  EXPECT_EQ(memory->ua(), 0);  // NOLINT(bugprone-use-after-move): moved-from is empty
  absl::StatusOr<BackedMemory> other = BackedMemory::Anonymous(kPs);
  ASSERT_TRUE(other.ok());
  moved = *std::move(other);
  EXPECT_EQ(moved.size(), kPs);
}

TEST(BackedMemoryTest, RejectsBadSizes) {
  EXPECT_EQ(ErrnoOf(BackedMemory::Anonymous(0).status()), EINVAL);
  EXPECT_EQ(ErrnoOf(BackedMemory::Anonymous(kPs + 1).status()), EINVAL);
  EXPECT_EQ(ErrnoOf(BackedMemory::Memfd("x", 0).status()), EINVAL);
}

TEST(BackedMemoryTest, MemfdExposesItsFd) {
  absl::StatusOr<BackedMemory> memory = BackedMemory::Memfd("dmapin-fd", 2 * kPs);
  ASSERT_TRUE(memory.ok()) << memory.status();
  ASSERT_GE(memory->fd(), 0);
  struct stat st;
  ASSERT_EQ(fstat(memory->fd(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 2 * kPs);
}

TEST(BackedMemoryTest, HugetlbfsErrorsNameTheProblem) {
  absl::StatusOr<BackedMemory> missing =
      BackedMemory::HugetlbfsFile("/nonexistent-dmapin-dir", 1 << 21);
  EXPECT_EQ(ErrnoOf(missing.status()), ENOENT) << missing.status();
  absl::StatusOr<BackedMemory> not_huge = BackedMemory::HugetlbfsFile("/proc", 1 << 21);
  EXPECT_EQ(ErrnoOf(not_huge.status()), EINVAL) << not_huge.status();
  EXPECT_THAT(std::string(not_huge.status().message()), HasSubstr("not a hugetlbfs mount"));
}

TEST(ReadVmLckBytesTest, ReadsStatus) {
  absl::StatusOr<uint64_t> bytes = ReadVmLckBytes();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes % 1024, 0);
}

TEST(PagemapReaderTest, UntouchedPageIsNotPresent) {
  absl::StatusOr<PagemapReader> reader = PagemapReader::Open();
  ASSERT_TRUE(reader.ok()) << reader.status();
  absl::StatusOr<BackedMemory> memory = BackedMemory::Anonymous(kPs);
  ASSERT_TRUE(memory.ok());
  EXPECT_EQ(ErrnoOf(reader->Hpa(memory->ua()).status()), EFAULT);
  EXPECT_EQ(ErrnoOf(reader->Hpa(memory->ua() + 1).status()), EINVAL);
}

// --- Through the registry -----------------------------------------------------------------------

TEST_F(MemlockBackendTest, RegistryRegisterPinsAndUnregisterUnpins) {
  constexpr uint64_t kPages = 32;
  BackedMemory memory = Anonymous(kPages);
  const uint64_t before = VmLck();
  {
    Registry registry(backend_.get());
    ASSERT_TRUE(registry.CreateContext(1, ContextOptions{}).ok());
    ASSERT_TRUE(registry.CreateContainer(10, ContainerOptions{}).ok());
    absl::Status status = registry.Register(10, 1, memory.ua(), kPages * kPs);
    ASSERT_TRUE(status.ok()) << status;
    EXPECT_EQ(VmLck(), before + kPages * kPs);
    EXPECT_EQ(backend_->TotalPinnedPages().value(), kPages);

    absl::StatusOr<PagemapReader> reader = PagemapReader::Open();
    ASSERT_TRUE(reader.ok()) << reader.status();
    absl::StatusOr<uint64_t> hpa = registry.Translate(1, memory.ua() + 3 * kPs + 5);
    ASSERT_TRUE(hpa.ok()) << hpa.status();
    EXPECT_EQ(*hpa, reader->Hpa(memory.ua() + 3 * kPs).value() + 5);
    EXPECT_TRUE(registry.CheckInvariants().ok()) << registry.CheckInvariants();

    status = registry.Unregister(10, memory.ua(), kPages * kPs);
    ASSERT_TRUE(status.ok()) << status;
    EXPECT_EQ(VmLck(), before);
    EXPECT_EQ(backend_->TotalPinnedPages().value(), 0);

    // A hole makes Register fail with EFAULT and leaves nothing locked.
    ASSERT_EQ(munmap(reinterpret_cast<void*>(memory.ua() + 7 * kPs), kPs), 0);
    status = registry.Register(10, 1, memory.ua(), kPages * kPs);
    EXPECT_EQ(ErrnoOf(status), EFAULT) << status;
    EXPECT_EQ(VmLck(), before);
    EXPECT_EQ(backend_->TotalPinnedPages().value(), 0);
    EXPECT_TRUE(registry.CheckInvariants().ok()) << registry.CheckInvariants();
  }
  EXPECT_EQ(backend_->LockedPages(), 0);
}

}  // namespace
}  // namespace dmapin::agent

namespace dmapin::agent {
namespace {

TEST(BackedMemoryFixedAddressTest, MapsAtAFreeAddressAndRefusesAnOccupiedOne) {
  const uint64_t size = 16 * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  uint64_t ua = 0;
  {
    absl::StatusOr<BackedMemory> first = BackedMemory::Anonymous(size);
    ASSERT_TRUE(first.ok()) << first.status();
    ua = first->ua();
    absl::StatusOr<BackedMemory> clash = BackedMemory::Memfd("clash", size, ua);
    EXPECT_EQ(ErrnoOf(clash.status()), EEXIST) << clash.status();
  }
  // Freed: the same address can be had again (as after an agent restart).
  absl::StatusOr<BackedMemory> again = BackedMemory::Anonymous(size, ua);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->ua(), ua);
}

}  // namespace
}  // namespace dmapin::agent
