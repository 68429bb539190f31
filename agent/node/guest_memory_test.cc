#include "agent/node/guest_memory.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/errno_status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/open_fds.h"

namespace dmapin::agent {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

const uint64_t kPage = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
// VMM addresses for slots that need no real mapping in the test (the agent never touches ua).
constexpr uint64_t kBase = 0x7f0000000000;

std::string Hex(uint64_t value) { return absl::StrCat("0x", absl::Hex(value)); }

UniqueFd Memfd(const char* name, uint64_t size) {
  UniqueFd fd(memfd_create(name, MFD_CLOEXEC));
  if (!fd.valid()) ADD_FAILURE() << "memfd_create: " << std::strerror(errno);
  if (ftruncate(fd.get(), static_cast<off_t>(size)) != 0) ADD_FAILURE() << "ftruncate";
  return fd;
}

uint64_t InodeOf(int fd) {
  struct stat st;
  EXPECT_EQ(fstat(fd, &st), 0);
  return st.st_ino;
}

// Lines of /proc/self/maps that map inode `ino`: what the agent mapped of one object.
int MappingsOf(uint64_t ino) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  int n = 0;
  while (std::getline(maps, line)) {
    std::istringstream fields(line);
    std::string range, perms, offset, dev;
    uint64_t inode = 0;
    fields >> range >> perms >> offset >> dev >> inode;
    if (inode == ino) ++n;
  }
  return n;
}

// A mapping the test plays the VMM with.
struct Mapping {
  Mapping(void* addr, uint64_t size) : addr(addr), size(size) {}
  ~Mapping() {
    if (addr != MAP_FAILED) munmap(addr, size);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  uint64_t ua() const { return reinterpret_cast<uintptr_t>(addr); }
  char* bytes() const { return static_cast<char*>(addr); }
  void* addr;
  uint64_t size;
};

char* AgentBytes(const GuestSlot& slot) {
  return reinterpret_cast<char*>(static_cast<uintptr_t>(slot.agent_ua));
}

TEST(GuestMemoryTest, AttachMapsTheSamePages) {
  UniqueFd fd = Memfd("guest-ram", 4 * kPage);
  Mapping vmm(mmap(nullptr, 4 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0), 4 * kPage);
  ASSERT_NE(vmm.addr, MAP_FAILED);

  GuestMemory memory(kPage);
  ASSERT_TRUE(memory.Attach({{vmm.ua(), 4 * kPage, 0, fd.get()}}).ok());
  std::vector<GuestSlot> slots = memory.slots();
  ASSERT_EQ(slots.size(), 1u);
  EXPECT_EQ(slots[0].ua, vmm.ua());
  EXPECT_EQ(slots[0].size, 4 * kPage);
  EXPECT_NE(slots[0].agent_ua, vmm.ua());
  EXPECT_EQ(memory.bytes(), 4 * kPage);

  struct stat st;
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  EXPECT_EQ(slots[0].dev, st.st_dev);
  EXPECT_EQ(slots[0].ino, st.st_ino);
  EXPECT_THAT(slots[0].object, StartsWith("memfd:guest-ram dev "));
  EXPECT_THAT(slots[0].object, HasSubstr(absl::StrCat(" ino ", st.st_ino)));

  std::strcpy(vmm.bytes() + 3 * kPage + 5, "written by the VMM");
  EXPECT_STREQ(AgentBytes(slots[0]) + 3 * kPage + 5, "written by the VMM");
  std::strcpy(AgentBytes(slots[0]) + 17, "written by the agent");
  EXPECT_STREQ(vmm.bytes() + 17, "written by the agent");
}

TEST(GuestMemoryTest, AttachKeepsNoDescriptorAndDestructorUnmaps) {
  UniqueFd fd = Memfd("guest-ram", 2 * kPage);
  const uint64_t ino = InodeOf(fd.get());
  const int fds = harness::CountOpenFds();
  {
    GuestMemory memory(kPage);
    ASSERT_TRUE(
        memory.Attach({{kBase, kPage, 0, fd.get()}, {kBase + kPage, kPage, kPage, fd.get()}}).ok());
    EXPECT_GE(MappingsOf(ino), 1);
    EXPECT_EQ(harness::CountOpenFds(), fds);
  }
  EXPECT_EQ(MappingsOf(ino), 0);
}

TEST(GuestMemoryTest, ResolveWithinOneSlot) {
  UniqueFd fd = Memfd("guest-ram", 4 * kPage);
  GuestMemory memory(kPage);
  ASSERT_TRUE(memory.Attach({{kBase, 4 * kPage, 0, fd.get()}}).ok());
  const uint64_t agent = memory.slots()[0].agent_ua;

  std::vector<GuestPiece> pieces = {{1, 2, 3}, {4, 5, 6}};  // cleared by Resolve
  ASSERT_TRUE(memory.Resolve(kBase + kPage + 8, 2 * kPage, &pieces).ok());
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].ua, kBase + kPage + 8);
  EXPECT_EQ(pieces[0].agent_ua, agent + kPage + 8);
  EXPECT_EQ(pieces[0].size, 2 * kPage);

  ASSERT_TRUE(memory.Resolve(kBase, 4 * kPage, &pieces).ok());
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].agent_ua, agent);
  EXPECT_EQ(pieces[0].size, 4 * kPage);
}

TEST(GuestMemoryTest, ResolveSplitsAcrossAdjacentSlots) {
  UniqueFd low = Memfd("low", 2 * kPage);
  UniqueFd high = Memfd("high", 8 * kPage);
  GuestMemory memory(kPage);
  // Given out of order: slots() and Resolve go by ua.
  ASSERT_TRUE(memory
                  .Attach({{kBase + 2 * kPage, 3 * kPage, 4 * kPage, high.get()},
                           {kBase, 2 * kPage, 0, low.get()}})
                  .ok());
  std::vector<GuestSlot> slots = memory.slots();
  ASSERT_EQ(slots.size(), 2u);
  EXPECT_EQ(slots[0].ua, kBase);
  EXPECT_EQ(slots[1].ua, kBase + 2 * kPage);
  EXPECT_EQ(slots[1].offset, 4 * kPage);
  EXPECT_EQ(memory.bytes(), 5 * kPage);

  std::vector<GuestPiece> pieces;
  ASSERT_TRUE(memory.Resolve(kBase + kPage, 3 * kPage, &pieces).ok());
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[0].ua, kBase + kPage);
  EXPECT_EQ(pieces[0].agent_ua, slots[0].agent_ua + kPage);
  EXPECT_EQ(pieces[0].size, kPage);
  EXPECT_EQ(pieces[1].ua, kBase + 2 * kPage);
  EXPECT_EQ(pieces[1].agent_ua, slots[1].agent_ua);
  EXPECT_EQ(pieces[1].size, 2 * kPage);

  // The agent's pieces are the object's pages at the slots' offsets.
  std::strcpy(AgentBytes(slots[1]), "high page 4");
  char check[16] = {};
  ASSERT_EQ(pread(high.get(), check, sizeof(check) - 1, static_cast<off_t>(4 * kPage)), 15);
  EXPECT_STREQ(check, "high page 4");
}

TEST(GuestMemoryTest, ResolveNamesTheFirstUncoveredByte) {
  UniqueFd fd = Memfd("guest-ram", 2 * kPage);
  GuestMemory memory(kPage);
  ASSERT_TRUE(
      memory.Attach({{kBase, kPage, 0, fd.get()}, {kBase + 2 * kPage, kPage, kPage, fd.get()}})
          .ok());
  std::vector<GuestPiece> pieces;
  absl::Status hole = memory.Resolve(kBase + 8, 3 * kPage - 8, &pieces);
  EXPECT_EQ(ErrnoOf(hole), EFAULT);
  EXPECT_EQ(hole.code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(hole.message(),
            absl::StrCat("EFAULT: ", Hex(kBase + kPage), " is not in any memory slot of the VMM"));
  EXPECT_TRUE(pieces.empty());

  absl::Status before = memory.Resolve(kBase - kPage, kPage, &pieces);
  EXPECT_EQ(ErrnoOf(before), EFAULT);
  EXPECT_THAT(before.message(), HasSubstr(Hex(kBase - kPage)));
  absl::Status after = memory.Resolve(kBase + 2 * kPage + 16, kPage, &pieces);
  EXPECT_EQ(ErrnoOf(after), EFAULT);
  EXPECT_THAT(after.message(), HasSubstr(Hex(kBase + 3 * kPage)));

  EXPECT_EQ(ErrnoOf(memory.Resolve(kBase, 0, &pieces)), EINVAL);
  EXPECT_EQ(ErrnoOf(memory.Resolve(~uint64_t{0} - 10, 20, &pieces)), EINVAL);
  EXPECT_EQ(ErrnoOf(GuestMemory(kPage).Resolve(kBase, kPage, &pieces)), EFAULT);
}

// A GuestMemory with one slot at kBase, and the checks that a refused Attach changed nothing.
class AttachErrorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(memory_.Attach({{kBase, 2 * kPage, 0, fd_.get()}}).ok());
    before_ = memory_.slots();
    fds_ = harness::CountOpenFds();
  }

  // Attach(sources) fails with `err` and a message that has `text`, and nothing changes.
  void ExpectRefused(std::vector<SlotSource> sources, int err, const std::string& text) {
    absl::Status status = memory_.Attach(sources);
    EXPECT_EQ(ErrnoOf(status), err) << status;
    EXPECT_THAT(std::string(status.message()), StartsWith(ErrnoName(err) + ": "));
    EXPECT_THAT(std::string(status.message()), HasSubstr(text));
    std::vector<GuestSlot> after = memory_.slots();
    ASSERT_EQ(after.size(), before_.size());
    for (size_t i = 0; i < after.size(); ++i) {
      EXPECT_EQ(after[i].ua, before_[i].ua);
      EXPECT_EQ(after[i].agent_ua, before_[i].agent_ua);
    }
    EXPECT_EQ(memory_.bytes(), 2 * kPage);
    EXPECT_EQ(harness::CountOpenFds(), fds_);
  }

  UniqueFd fd_ = Memfd("guest-ram", 4 * kPage);
  GuestMemory memory_{kPage};
  std::vector<GuestSlot> before_;
  int fds_ = 0;
};

constexpr uint64_t kFree = kBase + 0x100000;  // no slot there

TEST_F(AttachErrorTest, BadShapes) {
  const int fd = fd_.get();
  ExpectRefused({{kFree, 0, 0, fd}}, EINVAL, "slot 0 (ua 0x7f0000100000, size 0x0): size 0");
  ExpectRefused({{kFree + 1, kPage, 0, fd}}, EINVAL, "multiples of the page size");
  ExpectRefused({{kFree, kPage + 1, 0, fd}}, EINVAL, "multiples of the page size");
  ExpectRefused({{kFree, kPage, 1, fd}}, EINVAL, "multiples of the page size");
  ExpectRefused({{~uint64_t{0} - kPage + 1, kPage, 0, fd}}, EINVAL, "ua + size wraps");
  ExpectRefused({{kFree, 2 * kPage, ~uint64_t{0} - kPage + 1, fd}}, EINVAL, "+ size wraps");
  // The index of the bad one, after good ones.
  ExpectRefused(
      {{kFree, kPage, 0, fd}, {kFree + kPage, kPage, 0, fd}, {kFree + 2 * kPage, 0, 0, fd}}, EINVAL,
      absl::StrCat("slot 2 (ua ", Hex(kFree + 2 * kPage), ", size 0x0)"));
}

TEST_F(AttachErrorTest, DescriptorsThatAreNoMemoryObject) {
  int pair[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd socket0(pair[0]), socket1(pair[1]);
  ASSERT_EQ(pipe2(pair, O_CLOEXEC), 0);
  UniqueFd pipe0(pair[0]), pipe1(pair[1]);
  UniqueFd dir(open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  UniqueFd null(open("/dev/null", O_RDWR | O_CLOEXEC));
  ASSERT_TRUE(dir.valid() && null.valid());
  fds_ = harness::CountOpenFds();

  ExpectRefused({{kFree, kPage, 0, socket0.get()}}, EINVAL, "is a socket");
  ExpectRefused({{kFree, kPage, 0, pipe1.get()}}, EINVAL, "is a pipe");
  ExpectRefused({{kFree, kPage, 0, dir.get()}}, EINVAL, "is a directory");
  ExpectRefused({{kFree, kPage, 0, null.get()}}, EINVAL, "is a character device");
  ExpectRefused({{kFree, kPage, 0, -1}}, EBADF, "fd -1 is not an open descriptor");
  const int closed = null.release();
  close(closed);
  fds_ = harness::CountOpenFds();
  ExpectRefused({{kFree, kPage, 0, closed}}, EBADF,
                absl::StrCat("slot 0 (ua ", Hex(kFree), ", size ", Hex(kPage), ")"));
}

TEST_F(AttachErrorTest, ReadOnlyObject) {
  UniqueFd read_only(open(absl::StrCat("/proc/self/fd/", fd_.get()).c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(read_only.valid());
  fds_ = harness::CountOpenFds();
  ExpectRefused({{kFree, kPage, 0, read_only.get()}}, EACCES, "is open read-only");
}

TEST_F(AttachErrorTest, PastTheEndOfTheObject) {
  UniqueFd small = Memfd("small", kPage);
  fds_ = harness::CountOpenFds();
  ExpectRefused(
      {{kFree, 2 * kPage, 0, small.get()}}, ENXIO,
      absl::StrCat("slot 0 (ua ", Hex(kFree), ", size ", Hex(2 * kPage), "): [0x0, ",
                   Hex(2 * kPage), ") reaches past the end of the object (size ", Hex(kPage), ")"));
  ExpectRefused({{kFree, kPage, 2 * kPage, small.get()}}, ENXIO,
                absl::StrCat("[", Hex(2 * kPage), ", ", Hex(3 * kPage),
                             ") reaches past the end of the object (size ", Hex(kPage), ")"));
}

TEST_F(AttachErrorTest, Overlaps) {
  const int fd = fd_.get();
  ExpectRefused({{kFree, 2 * kPage, 0, fd}, {kFree + kPage, kPage, 0, fd}}, EINVAL,
                absl::StrCat("slot 1 (ua ", Hex(kFree + kPage), ", size ", Hex(kPage),
                             ") overlaps slot 0 (ua ", Hex(kFree), ", size ", Hex(2 * kPage), ")"));
  ExpectRefused({{kFree, kPage, 0, fd}, {kBase + kPage, 2 * kPage, 0, fd}}, EINVAL,
                absl::StrCat("slot 1 (ua ", Hex(kBase + kPage), ", size ", Hex(2 * kPage),
                             ") overlaps attached slot [", Hex(kBase), ", ", Hex(kBase + 2 * kPage),
                             ") (memfd:guest-ram dev "));
  ExpectRefused({{kBase - kPage, 2 * kPage, 0, fd}}, EINVAL, "overlaps attached slot");
  // Adjacent is fine.
  EXPECT_TRUE(memory_.Attach({{kBase + 2 * kPage, kPage, 0, fd}}).ok());
}

TEST_F(AttachErrorTest, TooManySlots) {
  std::vector<SlotSource> many;
  for (size_t i = 0; i < GuestMemory::kMaxSlots; ++i) {
    many.push_back({kFree + i * kPage, kPage, 0, fd_.get()});
  }
  ExpectRefused(many, EINVAL, "pass the limit of 512");
  many.pop_back();
  ASSERT_TRUE(memory_.Attach(many).ok());
  EXPECT_EQ(memory_.slots().size(), GuestMemory::kMaxSlots);
  absl::Status one_more = memory_.Attach({{kBase - kPage, kPage, 0, fd_.get()}});
  EXPECT_EQ(ErrnoOf(one_more), EINVAL);
  EXPECT_THAT(std::string(one_more.message()), HasSubstr("512"));
}

TEST(GuestMemoryTest, FailedAttachLeavesNothingMapped) {
  UniqueFd fd = Memfd("guest-ram", 4 * kPage);
  const uint64_t ino = InodeOf(fd.get());
  UniqueFd read_only(open(absl::StrCat("/proc/self/fd/", fd.get()).c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(read_only.valid());
  const int fds = harness::CountOpenFds();
  GuestMemory memory(kPage);
  // Slots 0 and 1 are mapped before slot 2 fails.
  absl::Status status = memory.Attach({{kBase, kPage, 0, fd.get()},
                                       {kBase + 4 * kPage, 2 * kPage, 2 * kPage, fd.get()},
                                       {kBase + 8 * kPage, kPage, 0, read_only.get()}});
  EXPECT_EQ(ErrnoOf(status), EACCES);
  EXPECT_THAT(std::string(status.message()), HasSubstr("slot 2"));
  EXPECT_EQ(MappingsOf(ino), 0);
  EXPECT_TRUE(memory.slots().empty());
  EXPECT_EQ(memory.bytes(), 0u);
  EXPECT_EQ(harness::CountOpenFds(), fds);
}

TEST(GuestMemoryTest, ConcurrentOverlappingAttachesOneWins) {
  UniqueFd fd = Memfd("guest-ram", 4 * kPage);
  for (int round = 0; round < 50; ++round) {
    GuestMemory memory(kPage);
    std::atomic<int> won{0};
    auto attach = [&](uint64_t ua) {
      if (memory.Attach({{ua, 2 * kPage, 0, fd.get()}}).ok()) ++won;
    };
    std::thread a(attach, kBase), b(attach, kBase + kPage);
    std::vector<GuestPiece> pieces;
    (void)memory.Resolve(kBase, kPage, &pieces);
    a.join();
    b.join();
    EXPECT_EQ(won.load(), 1);
    EXPECT_EQ(memory.slots().size(), 1u);
  }
  EXPECT_EQ(MappingsOf(InodeOf(fd.get())), 0);
}

// --- OpenProcessSlots -------------------------------------------------------------------------

// ESRCH is not (yet) in common/errno_status's table, where ErrnoOf reads it back as EIO; the
// message starts with ErrnoName(ESRCH) either way.
void ExpectEsrch(const absl::Status& status) {
  EXPECT_THAT(std::string(status.message()), StartsWith(ErrnoName(ESRCH) + ": ")) << status;
  if (ErrnoFromName("ESRCH").has_value()) {
    EXPECT_EQ(ErrnoOf(status), ESRCH);
  }
}

// Skips when map_files is closed to this process (it needs CAP_SYS_ADMIN).
#define SKIP_IF_NO_MAP_FILES(status)                                               \
  if (!(status).ok() && (ErrnoOf(status) == EPERM || ErrnoOf(status) == EACCES) && \
      geteuid() != 0) {                                                            \
    GTEST_SKIP() << "/proc/<pid>/map_files needs CAP_SYS_ADMIN: " << (status);     \
  }

TEST(OpenProcessSlotsTest, SharedMemfdMappingWithOffset) {
  UniqueFd fd = Memfd("vmm-ram", 4 * kPage);
  // The VMM maps pages 1..3 of the object; the range starts at its second page (object page 2).
  Mapping vmm(mmap(nullptr, 3 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), kPage),
              3 * kPage);
  ASSERT_NE(vmm.addr, MAP_FAILED);
  std::strcpy(vmm.bytes() + kPage, "object page 2");

  absl::StatusOr<std::vector<ProcessSlot>> slots =
      OpenProcessSlots(getpid(), {{vmm.ua() + kPage, 2 * kPage}});
  SKIP_IF_NO_MAP_FILES(slots.status());
  ASSERT_TRUE(slots.ok()) << slots.status();
  ASSERT_EQ(slots->size(), 1u);
  const ProcessSlot& slot = (*slots)[0];
  EXPECT_EQ(slot.source.ua, vmm.ua() + kPage);
  EXPECT_EQ(slot.source.size, 2 * kPage);
  EXPECT_EQ(slot.source.offset, 2 * kPage);
  EXPECT_EQ(slot.source.fd, slot.fd.get());
  EXPECT_EQ(InodeOf(slot.fd.get()), InodeOf(fd.get()));
  EXPECT_EQ(fcntl(slot.fd.get(), F_GETFD), FD_CLOEXEC);

  GuestMemory memory(kPage);
  ASSERT_TRUE(memory.Attach({slot.source}).ok());
  std::vector<GuestPiece> pieces;
  ASSERT_TRUE(memory.Resolve(vmm.ua() + kPage, 2 * kPage, &pieces).ok());
  ASSERT_EQ(pieces.size(), 1u);
  char* agent = reinterpret_cast<char*>(static_cast<uintptr_t>(pieces[0].agent_ua));
  EXPECT_STREQ(agent, "object page 2");
  std::strcpy(agent + kPage, "from the agent");
  EXPECT_STREQ(vmm.bytes() + 2 * kPage, "from the agent");
}

TEST(OpenProcessSlotsTest, SeveralRangesAndASplitMapping) {
  UniqueFd fd = Memfd("vmm-ram", 4 * kPage);
  Mapping vmm(mmap(nullptr, 4 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0), 4 * kPage);
  ASSERT_NE(vmm.addr, MAP_FAILED);
  // Two VMAs of the same object at contiguous offsets.
  ASSERT_EQ(mprotect(vmm.bytes() + 2 * kPage, 2 * kPage, PROT_READ), 0);
  UniqueFd other = Memfd("other", kPage);
  Mapping second(mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_SHARED, other.get(), 0), kPage);
  ASSERT_NE(second.addr, MAP_FAILED);

  const int fds = harness::CountOpenFds();
  {
    absl::StatusOr<std::vector<ProcessSlot>> slots =
        OpenProcessSlots(getpid(), {{vmm.ua() + kPage, 3 * kPage}, {second.ua(), kPage}});
    SKIP_IF_NO_MAP_FILES(slots.status());
    ASSERT_TRUE(slots.ok()) << slots.status();
    ASSERT_EQ(slots->size(), 2u);
    EXPECT_EQ((*slots)[0].source.offset, kPage);
    EXPECT_EQ((*slots)[0].source.size, 3 * kPage);
    EXPECT_EQ(InodeOf((*slots)[0].fd.get()), InodeOf(fd.get()));
    EXPECT_EQ((*slots)[1].source.offset, 0u);
    EXPECT_EQ(InodeOf((*slots)[1].fd.get()), InodeOf(other.get()));
  }
  EXPECT_EQ(harness::CountOpenFds(), fds);  // the descriptors went with the slots
}

TEST(OpenProcessSlotsTest, LowAddressHasNoPaddingInMapFiles) {
  // maps prints "02000000-02001000"; the map_files entry is "2000000-2001000".
  UniqueFd fd = Memfd("vmm-ram", kPage);
  void* want = reinterpret_cast<void*>(uintptr_t{0x2000000});
  Mapping vmm(
      mmap(want, kPage, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd.get(), 0),
      kPage);
  if (vmm.addr != want) GTEST_SKIP() << "0x2000000 is not free here";
  absl::StatusOr<std::vector<ProcessSlot>> slots = OpenProcessSlots(getpid(), {{vmm.ua(), kPage}});
  SKIP_IF_NO_MAP_FILES(slots.status());
  ASSERT_TRUE(slots.ok()) << slots.status();
  EXPECT_EQ(InodeOf((*slots)[0].fd.get()), InodeOf(fd.get()));
}

TEST(OpenProcessSlotsTest, PrivateMappingIsRefused) {
  Mapping anon(mmap(nullptr, 2 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
               2 * kPage);
  ASSERT_NE(anon.addr, MAP_FAILED);
  absl::StatusOr<std::vector<ProcessSlot>> slots =
      OpenProcessSlots(getpid(), {{anon.ua(), 2 * kPage}});
  EXPECT_EQ(ErrnoOf(slots.status()), EINVAL);
  EXPECT_THAT(std::string(slots.status().message()),
              HasSubstr("private mapping: anonymous or MAP_PRIVATE memory cannot be shared with "
                        "the agent"));

  UniqueFd fd = Memfd("vmm-ram", kPage);
  Mapping cow(mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.get(), 0), kPage);
  ASSERT_NE(cow.addr, MAP_FAILED);
  EXPECT_EQ(ErrnoOf(OpenProcessSlots(getpid(), {{cow.ua(), kPage}}).status()), EINVAL);
}

TEST(OpenProcessSlotsTest, UnmappedRangeIsEfault) {
  // Reserve three pages, map the object over the first, unmap the rest: a mapping, then a hole.
  Mapping area(mmap(nullptr, 3 * kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), 3 * kPage);
  ASSERT_NE(area.addr, MAP_FAILED);
  UniqueFd fd = Memfd("vmm-ram", kPage);
  ASSERT_EQ(mmap(area.addr, kPage, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd.get(), 0),
            area.addr);
  ASSERT_EQ(munmap(area.bytes() + kPage, 2 * kPage), 0);

  const int fds = harness::CountOpenFds();
  absl::Status hole = OpenProcessSlots(getpid(), {{area.ua() + kPage, kPage}}).status();
  EXPECT_EQ(ErrnoOf(hole), EFAULT);
  EXPECT_THAT(std::string(hole.message()), HasSubstr(Hex(area.ua() + kPage)));
  absl::Status past = OpenProcessSlots(getpid(), {{area.ua(), 2 * kPage}}).status();
  EXPECT_EQ(ErrnoOf(past), EFAULT);
  EXPECT_THAT(std::string(past.message()), HasSubstr(Hex(area.ua() + kPage)));
  // A good range before a bad one: nothing stays open.
  absl::Status second =
      OpenProcessSlots(getpid(), {{area.ua(), kPage}, {area.ua() + kPage, kPage}}).status();
  EXPECT_EQ(ErrnoOf(second), EFAULT);
  EXPECT_THAT(std::string(second.message()), HasSubstr("range 1"));
  EXPECT_EQ(harness::CountOpenFds(), fds);
}

TEST(OpenProcessSlotsTest, AdjacentMappingsOfOtherObjectsOrOffsetsAreEfault) {
  Mapping area(mmap(nullptr, 3 * kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), 3 * kPage);
  ASSERT_NE(area.addr, MAP_FAILED);
  UniqueFd a = Memfd("a", 4 * kPage);
  UniqueFd b = Memfd("b", kPage);
  const int prot = PROT_READ | PROT_WRITE;
  ASSERT_EQ(mmap(area.addr, kPage, prot, MAP_SHARED | MAP_FIXED, a.get(), 0), area.addr);
  ASSERT_NE(mmap(area.bytes() + kPage, kPage, prot, MAP_SHARED | MAP_FIXED, b.get(), 0),
            MAP_FAILED);
  // Object a again, at offset 3 pages: not contiguous with b's page nor with a's first.
  ASSERT_NE(mmap(area.bytes() + 2 * kPage, kPage, prot, MAP_SHARED | MAP_FIXED, a.get(),
                 static_cast<off_t>(3 * kPage)),
            MAP_FAILED);
  for (uint64_t start : {area.ua(), area.ua() + kPage}) {
    absl::Status status = OpenProcessSlots(getpid(), {{start, 2 * kPage}}).status();
    EXPECT_EQ(ErrnoOf(status), EFAULT) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr("spans different mappings"));
    EXPECT_THAT(std::string(status.message()), HasSubstr(Hex(start + kPage)));
  }
}

TEST(OpenProcessSlotsTest, BadRangesAndMissingProcess) {
  EXPECT_EQ(ErrnoOf(OpenProcessSlots(getpid(), {{kBase, 0}}).status()), EINVAL);
  EXPECT_EQ(ErrnoOf(OpenProcessSlots(getpid(), {{~uint64_t{0} - 1, 4}}).status()), EINVAL);
  // Above any pid_max (at most 2^22).
  ExpectEsrch(OpenProcessSlots(0x7ffffff0, {{kBase, kPage}}).status());
  ExpectEsrch(OpenProcessSlots(-1, {{kBase, kPage}}).status());
}

// A regular file on a disk filesystem is not guest memory: refused, nothing mapped.
TEST(GuestMemoryFsTest, AFileOnDiskIsRefused) {
  const std::string path = absl::StrCat(::testing::TempDir(), "/disk_file_", getpid());
  UniqueFd file(open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  ASSERT_TRUE(file.valid()) << std::strerror(errno);
  unlink(path.c_str());
  struct statfs fs;
  ASSERT_EQ(fstatfs(file.get(), &fs), 0);
  if (fs.f_type == TMPFS_MAGIC) GTEST_SKIP() << "the test's temporary directory is on tmpfs";
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  ASSERT_EQ(ftruncate(file.get(), static_cast<off_t>(page)), 0);
  GuestMemory memory(page);
  const absl::Status status = memory.Attach({{.ua = 0x10000000, .size = page, .fd = file.get()}});
  EXPECT_EQ(ErrnoOf(status), EINVAL) << status;
  EXPECT_NE(status.message().find("not shared memory"), std::string::npos) << status;
  EXPECT_TRUE(memory.slots().empty());
}

}  // namespace
}  // namespace dmapin::agent
