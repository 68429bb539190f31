#include "agent/registry/memlock_backend.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/numeric/bits.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

// /proc/<pid>/pagemap entry layout (Documentation/admin-guide/mm/pagemap.rst).
constexpr uint64_t kPagemapPresent = uint64_t{1} << 63;
constexpr uint64_t kPagemapPfnMask = (uint64_t{1} << 55) - 1;

uint64_t SystemPageSize() { return static_cast<uint64_t>(sysconf(_SC_PAGESIZE)); }

// Reads a whole (small) file such as /proc/self/status.
absl::StatusOr<std::string> ReadSmallFile(const char* path) {
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  std::string contents;
  char buf[4096];
  for (;;) {
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      close(fd);
      return ErrnoStatus(err, absl::StrCat("read(", path, ")"));
    }
    if (n == 0) break;
    contents.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return contents;
}

bool IsOctal(char c) { return c >= '0' && c <= '7'; }

// Undoes the octal escapes (\040 for a space) the kernel uses in /proc/self/mounts.
std::string UnescapeMountField(absl::string_view field) {
  std::string out;
  for (size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size() && IsOctal(field[i + 1]) &&
        IsOctal(field[i + 2]) && IsOctal(field[i + 3])) {
      out.push_back(static_cast<char>(((field[i + 1] - '0') << 6) | ((field[i + 2] - '0') << 3) |
                                      (field[i + 3] - '0')));
      i += 3;
    } else {
      out.push_back(field[i]);
    }
  }
  return out;
}

// mlock/munlock as raw system calls: the sanitizers' interceptors turn the libc functions into
// no-ops ("mlock is unsupported"), which would make pinning silently do nothing under ASan/TSan.
int Mlock(uint64_t ua, uint64_t size) {
  return static_cast<int>(syscall(SYS_mlock, reinterpret_cast<void*>(ua), size));
}
int Munlock(uint64_t ua, uint64_t size) {
  return static_cast<int>(syscall(SYS_munlock, reinterpret_cast<void*>(ua), size));
}

// MADV_POPULATE_WRITE, retried when interrupted (it may return EINTR/EAGAIN on a signal or a
// transient fault-in failure).
int PopulateWrite(uint64_t ua, uint64_t size) {
  for (int attempt = 0;; ++attempt) {
    if (madvise(reinterpret_cast<void*>(ua), size, MADV_POPULATE_WRITE) == 0) return 0;
    if ((errno != EINTR && errno != EAGAIN) || attempt >= 8) return -1;
  }
}

}  // namespace

// --- PagemapReader ------------------------------------------------------------------------------

absl::StatusOr<PagemapReader> PagemapReader::Open() {
  const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, "open(/proc/self/pagemap)");
  return PagemapReader(fd, SystemPageSize());
}

PagemapReader::PagemapReader(PagemapReader&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), page_size_(other.page_size_) {}

PagemapReader& PagemapReader::operator=(PagemapReader&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    page_size_ = other.page_size_;
  }
  return *this;
}

PagemapReader::~PagemapReader() {
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<uint64_t> PagemapReader::Hpa(uint64_t page_ua) const {
  uint64_t hpa = 0;
  absl::Status status = ReadHpas(page_ua, absl::MakeSpan(&hpa, 1));
  if (!status.ok()) return status;
  return hpa;
}

absl::Status PagemapReader::ReadHpas(uint64_t ua, absl::Span<uint64_t> hpas) const {
  if (ua % page_size_ != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("pagemap: address %#x is not page aligned", ua));
  }
  // Read the entries straight into `hpas`, then turn each entry into an address in place.
  char* out = reinterpret_cast<char*>(hpas.data());
  const size_t bytes = hpas.size() * sizeof(uint64_t);
  const off_t offset = static_cast<off_t>(ua / page_size_ * sizeof(uint64_t));
  size_t done = 0;
  while (done < bytes) {
    const ssize_t n = pread(fd_, out + done, bytes - done, offset + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      return ErrnoStatus(
          errno, absl::StrFormat("pread(/proc/self/pagemap) for %d pages at %#x", hpas.size(), ua));
    }
    if (n == 0) {
      return ErrnoStatus(EFAULT, absl::StrFormat("pread(/proc/self/pagemap) hit end of file at "
                                                 "page %#x",
                                                 ua + done / sizeof(uint64_t) * page_size_));
    }
    done += static_cast<size_t>(n);
  }
  for (size_t i = 0; i < hpas.size(); ++i) {
    const uint64_t entry = hpas[i];
    const uint64_t page_ua = ua + i * page_size_;
    if ((entry & kPagemapPresent) == 0) {
      return ErrnoStatus(EFAULT, absl::StrFormat("page %#x is not present in /proc/self/pagemap "
                                                 "(entry %#x)",
                                                 page_ua, entry));
    }
    const uint64_t pfn = entry & kPagemapPfnMask;
    if (pfn == 0) {
      // Since Linux 4.2 frame numbers read as zero without CAP_SYS_ADMIN.
      return ErrnoStatus(EPERM, absl::StrFormat("/proc/self/pagemap hides the frame of present "
                                                "page %#x (needs CAP_SYS_ADMIN)",
                                                page_ua));
    }
    hpas[i] = pfn * page_size_;
  }
  return absl::OkStatus();
}

// --- BackedMemory -------------------------------------------------------------------------------

namespace {

// mmap at `at` (0: anywhere). A fixed address must be free: the agent re-creates a context's
// memory where it was before a restart, and never clobbers another mapping to get there.
void* MapAt(uint64_t at, uint64_t size, int flags, int fd, int* err) {
  if (at != 0) flags |= MAP_FIXED_NOREPLACE;
  void* addr = mmap(reinterpret_cast<void*>(at), size, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (addr == MAP_FAILED) {
    *err = errno;
    return MAP_FAILED;
  }
  if (at != 0 && reinterpret_cast<uint64_t>(addr) != at) {  // kernels before 4.17 ignore the flag
    munmap(addr, size);
    *err = EEXIST;
    return MAP_FAILED;
  }
  return addr;
}

}  // namespace

absl::StatusOr<BackedMemory> BackedMemory::Anonymous(uint64_t size, uint64_t at) {
  const uint64_t ps = SystemPageSize();
  if (size == 0 || size % ps != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("anonymous memory size %#x is not a positive "
                                               "multiple of the page size %#x",
                                               size, ps));
  }
  int err = 0;
  void* addr = MapAt(at, size, MAP_PRIVATE | MAP_ANONYMOUS, -1, &err);
  if (addr == MAP_FAILED) {
    return ErrnoStatus(err, absl::StrFormat("mmap(MAP_ANONYMOUS, at %#x, size %#x)", at, size));
  }
  return BackedMemory(addr, size, -1, ps);
}

absl::StatusOr<BackedMemory> BackedMemory::Memfd(absl::string_view name, uint64_t size,
                                                 uint64_t at) {
  const uint64_t ps = SystemPageSize();
  if (size == 0 || size % ps != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("memfd size %#x is not a positive multiple of "
                                               "the page size %#x",
                                               size, ps));
  }
  const std::string name_str(name);
  const int fd = memfd_create(name_str.c_str(), MFD_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("memfd_create(", name_str, ")"));
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoStatus(err, absl::StrFormat("ftruncate(memfd %s, %#x)", name_str, size));
  }
  int err = 0;
  void* addr = MapAt(at, size, MAP_SHARED, fd, &err);
  if (addr == MAP_FAILED) {
    close(fd);
    return ErrnoStatus(err,
                       absl::StrFormat("mmap(memfd %s, at %#x, size %#x)", name_str, at, size));
  }
  return BackedMemory(addr, size, fd, ps);
}

absl::StatusOr<BackedMemory> BackedMemory::HugetlbfsFile(absl::string_view dir, uint64_t size,
                                                         uint64_t at) {
  const std::string dir_str(dir);
  struct statfs fs;
  if (statfs(dir_str.c_str(), &fs) != 0) {
    const int err = errno;
    return ErrnoStatus(err, absl::StrCat("statfs(", dir_str, "): no hugetlbfs mount there"));
  }
  if (static_cast<uint64_t>(fs.f_type) != HUGETLBFS_MAGIC) {
    return ErrnoStatus(EINVAL, absl::StrCat(dir_str,
                                            " is not a hugetlbfs mount (mount one with "
                                            "`mount -t hugetlbfs none <dir>`)"));
  }
  const uint64_t huge = static_cast<uint64_t>(fs.f_bsize);
  if (size == 0 || size % huge != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("hugetlbfs size %#x is not a positive multiple of "
                                               "the huge page size %#x of %s",
                                               size, huge, dir_str));
  }
  std::string path = absl::StrCat(dir_str, "/dmapin-XXXXXX");
  const int fd = mkostemp(path.data(), O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("mkostemp(", path, ")"));
  // Unlinked at once: the pages go back to the pool when the last mapping and fd are gone.
  unlink(path.c_str());
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoStatus(err, absl::StrFormat("ftruncate(%s, %#x)", path, size));
  }
  int err = 0;
  void* addr = MapAt(at, size, MAP_SHARED, fd, &err);
  if (addr == MAP_FAILED) {
    close(fd);
    // ENOMEM here usually means the pool (nr_hugepages) has too few free huge pages.
    return ErrnoStatus(
        err, absl::StrFormat("mmap(%s, size %#x): not enough free huge pages?", path, size));
  }
  return BackedMemory(addr, size, fd, huge);
}

absl::StatusOr<std::string> BackedMemory::FindHugetlbfsMount() {
  absl::StatusOr<std::string> mounts = ReadSmallFile("/proc/self/mounts");
  if (!mounts.ok()) return mounts.status();
  for (absl::string_view line : absl::StrSplit(*mounts, '\n', absl::SkipEmpty())) {
    std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.size() >= 3 && fields[2] == "hugetlbfs") return UnescapeMountField(fields[1]);
  }
  return ErrnoStatus(ENOENT, "no hugetlbfs mount in /proc/self/mounts");
}

BackedMemory::BackedMemory(BackedMemory&& other) noexcept
    : addr_(std::exchange(other.addr_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      fd_(std::exchange(other.fd_, -1)),
      backing_page_size_(other.backing_page_size_) {}

BackedMemory& BackedMemory::operator=(BackedMemory&& other) noexcept {
  if (this != &other) {
    Reset();
    addr_ = std::exchange(other.addr_, nullptr);
    size_ = std::exchange(other.size_, 0);
    fd_ = std::exchange(other.fd_, -1);
    backing_page_size_ = other.backing_page_size_;
  }
  return *this;
}

BackedMemory::~BackedMemory() { Reset(); }

void BackedMemory::Reset() {
  if (addr_ != nullptr) munmap(addr_, size_);
  if (fd_ >= 0) close(fd_);
  addr_ = nullptr;
  size_ = 0;
  fd_ = -1;
}

// --- ReadVmLckBytes -----------------------------------------------------------------------------

absl::StatusOr<uint64_t> ReadVmLckBytes() {
  absl::StatusOr<std::string> status = ReadSmallFile("/proc/self/status");
  if (!status.ok()) return status.status();
  for (absl::string_view line : absl::StrSplit(*status, '\n')) {
    if (!absl::ConsumePrefix(&line, "VmLck:")) continue;
    line = absl::StripAsciiWhitespace(line);
    uint64_t kib = 0;
    if (!absl::ConsumeSuffix(&line, "kB") ||
        !absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &kib)) {
      return ErrnoStatus(EIO, absl::StrCat("cannot parse VmLck line in /proc/self/status"));
    }
    return kib * 1024;
  }
  return ErrnoStatus(ENOENT, "no VmLck line in /proc/self/status");
}

// --- MemlockBackend -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<MemlockBackend>> MemlockBackend::Create() {
  absl::StatusOr<PagemapReader> pagemap = PagemapReader::Open();
  if (!pagemap.ok()) return pagemap.status();
  const uint64_t ps = SystemPageSize();
  if (ps < 4096 || !absl::has_single_bit(ps)) {
    return ErrnoStatus(EINVAL, absl::StrFormat("page size %#x is not a power of two >= 4096", ps));
  }

  // Probe one page: does the kernel have MADV_POPULATE_WRITE, and are frame numbers visible?
  absl::StatusOr<BackedMemory> probe = BackedMemory::Anonymous(ps);
  if (!probe.ok()) return probe.status();
  if (PopulateWrite(probe->ua(), ps) != 0) {
    const int err = errno;
    if (err == EINVAL) {
      return ErrnoStatus(EINVAL,
                         "madvise(MADV_POPULATE_WRITE) is not supported by this kernel "
                         "(needs Linux 5.14+)");
    }
    return ErrnoStatus(
        err, absl::StrFormat("madvise(%#x, MADV_POPULATE_WRITE) of a probe page", probe->ua()));
  }
  absl::StatusOr<uint64_t> hpa = pagemap->Hpa(probe->ua());
  if (!hpa.ok()) {
    if (ErrnoOf(hpa.status()) == EPERM) {
      return ErrnoStatus(EPERM,
                         "/proc/self/pagemap reports frame number 0 for a present page: "
                         "the memlock backend needs CAP_SYS_ADMIN (run the agent as root)");
    }
    return hpa.status();
  }
  return std::unique_ptr<MemlockBackend>(new MemlockBackend(*std::move(pagemap), ps));
}

MemlockBackend::MemlockBackend(PagemapReader pagemap, uint64_t page_size)
    : pagemap_(std::move(pagemap)),
      page_size_(page_size),
      page_shift_(static_cast<uint32_t>(absl::countr_zero(page_size))) {}

MemlockBackend::~MemlockBackend() {
  MutexLock lock(&mu_);
  // Failures (already unmapped) do not matter here.
  lock_counts_.ForEachPinnedRun([this](uint64_t first, uint64_t count, uint64_t) {
    Munlock(first << page_shift_, count << page_shift_);
  });
}

uint64_t MemlockBackend::FirstUnpopulatablePage(uint64_t ua, uint64_t pages) const {
  for (uint64_t i = 0; i < pages; ++i) {
    if (PopulateWrite(ua + i * page_size_, page_size_) != 0) return i;
  }
  return pages;
}

absl::StatusOr<uint32_t> MemlockBackend::BackingPageShift(uint64_t ua, uint64_t size) const {
  const uint64_t end = ua + size;
  const int fd = open("/proc/self/smaps", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, "open(/proc/self/smaps)");
  // smaps is generated VMA by VMA as it is read, and VMAs come in address order: read it in
  // chunks and stop after the range instead of making the kernel walk every VMA.
  uint64_t min_page = 0;
  uint64_t covered_to = ua;  // [ua, covered_to) is covered by VMAs seen so far
  bool in_range = false;     // the VMA whose fields we are reading overlaps the range
  bool done = false;
  std::string pending;
  char buf[16384];
  while (!done) {
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      close(fd);
      return ErrnoStatus(err, "read(/proc/self/smaps)");
    }
    if (n == 0) break;
    pending.append(buf, static_cast<size_t>(n));
    size_t line_start = 0;
    for (size_t nl; !done && (nl = pending.find('\n', line_start)) != std::string::npos;
         line_start = nl + 1) {
      absl::string_view line(pending.data() + line_start, nl - line_start);
      const absl::string_view first = line.substr(0, line.find(' '));
      if (!first.empty() && first.back() == ':') {
        // A "Key: value" line of the current VMA.
        absl::string_view value = line;
        if (!in_range || !absl::ConsumePrefix(&value, "KernelPageSize:")) continue;
        value = absl::StripAsciiWhitespace(value);
        uint64_t kib = 0;
        if (absl::ConsumeSuffix(&value, "kB") &&
            absl::SimpleAtoi(absl::StripAsciiWhitespace(value), &kib) && kib != 0 &&
            (min_page == 0 || kib * 1024 < min_page)) {
          min_page = kib * 1024;
        }
        continue;
      }
      // A VMA header: "start-end perms offset dev inode [path]".
      const size_t dash = first.find('-');
      uint64_t start = 0;
      uint64_t vma_end = 0;
      if (dash == absl::string_view::npos || !absl::SimpleHexAtoi(first.substr(0, dash), &start) ||
          !absl::SimpleHexAtoi(first.substr(dash + 1), &vma_end)) {
        in_range = false;
        continue;
      }
      if (start >= end) {
        done = true;
        break;
      }
      in_range = vma_end > ua;
      if (in_range) {
        if (start > covered_to) {
          done = true;  // a gap: reported below
          break;
        }
        covered_to = std::max(covered_to, vma_end);
      }
    }
    pending.erase(0, line_start);
  }
  close(fd);
  if (covered_to < end || min_page == 0) {
    return ErrnoStatus(EFAULT, absl::StrFormat("/proc/self/smaps: [%#x, %#x) is not covered by "
                                               "mappings (first gap at %#x)",
                                               ua, end, covered_to));
  }
  return static_cast<uint32_t>(absl::countr_zero(min_page));
}

absl::Status MemlockBackend::LockPages(ContextId context, uint64_t ua, uint64_t pages) {
  MutexLock lock(&mu_);
  if (Mlock(ua, pages * page_size_) != 0) {
    const int err = errno;
    // mlock may have locked a prefix; drop it where no other pin holds the page.
    MunlockUnlockedRuns(ua, pages);
    return ErrnoStatus(err, absl::StrFormat("mlock(%#x, %#x)", ua, pages * page_size_));
  }
  pins_[context].Increment(ua >> page_shift_, pages);
  lock_counts_.Increment(ua >> page_shift_, pages);
  total_pins_ += pages;
  return absl::OkStatus();
}

void MemlockBackend::UnlockPages(ContextId context, uint64_t ua, uint64_t pages) {
  MutexLock lock(&mu_);
  auto pins = pins_.find(context);
  // Pages not pinned by this context are skipped: the invariant checker sees the imbalance via
  // PinCount.
  if (pins == pins_.end()) return;
  // The callback runs synchronously, under the mu_ held here; clang cannot follow a lambda
  // through PinRuns' template, and a REQUIRES annotation would leak into PinRuns itself.
  total_pins_ -= pins->second.Decrement(
      ua >> page_shift_, pages,
      [this](uint64_t first, uint64_t count, uint64_t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        lock_counts_.Decrement(first, count,
                               [this](uint64_t run, uint64_t run_pages, uint64_t left) {
                                 // Failure means the pages were unmapped already, which unlocked
                                 // them too.
                                 if (left == 0)
                                   Munlock(run << page_shift_, run_pages << page_shift_);
                               });
      });
  if (pins->second.empty()) pins_.erase(pins);
}

void MemlockBackend::MunlockUnlockedRuns(uint64_t ua, uint64_t pages) {
  lock_counts_.ForEachUnpinnedRun(ua >> page_shift_, pages, [this](uint64_t first, uint64_t count) {
    Munlock(first << page_shift_, count << page_shift_);
  });
}

absl::Status MemlockBackend::PinPages(ContextId context, uint64_t ua, absl::Span<uint64_t> hpas,
                                      uint64_t* pinned, uint32_t* backing_page_shift) {
  *pinned = 0;
  const uint64_t pages = hpas.size();
  if (pages == 0) {
    *backing_page_shift = page_shift_;
    return absl::OkStatus();
  }
  const uint64_t size = pages << page_shift_;
  if (ua % page_size_ != 0 || (size >> page_shift_) != pages || ua + size < ua) {
    return ErrnoStatus(EINVAL, absl::StrFormat("pin range of %d pages at %#x is misaligned or "
                                               "wraps",
                                               pages, ua));
  }

  // Fault every page in for write first (outside the lock: this is the slow part). It fails for
  // holes and read-only pages; then find the first such page and pin only the pages before it.
  uint64_t good = pages;
  int populate_err = 0;
  if (PopulateWrite(ua, size) != 0) {
    populate_err = errno;
    good = FirstUnpopulatablePage(ua, pages);
    if (good < pages) populate_err = errno;
  }

  uint32_t shift = page_shift_;
  if (good == pages) {
    absl::StatusOr<uint32_t> backing = BackingPageShift(ua, size);
    if (!backing.ok()) return backing.status();
    shift = *backing;
  }

  if (good > 0) {
    absl::Status status = LockPages(context, ua, good);
    if (!status.ok()) return status;
    // Locked pages stay present, so their frames can be read outside the lock.
    status = pagemap_.ReadHpas(ua, hpas.first(good));
    if (!status.ok()) {
      UnlockPages(context, ua, good);
      return status;
    }
  }
  *pinned = good;
  if (good < pages) {
    return ErrnoStatus(EFAULT, absl::StrFormat("page %#x cannot be pinned for write: "
                                               "madvise(MADV_POPULATE_WRITE) failed with %s "
                                               "(a hole or read-only memory)",
                                               ua + good * page_size_, ErrnoName(populate_err)));
  }
  *backing_page_shift = shift;
  return absl::OkStatus();
}

void MemlockBackend::UnpinPages(ContextId context, uint64_t ua, absl::Span<const uint64_t> hpas) {
  if (!hpas.empty()) UnlockPages(context, ua, hpas.size());
}

absl::StatusOr<uint64_t> MemlockBackend::PinCount(ContextId context, uint64_t page_ua) const {
  MutexLock lock(&mu_);
  auto it = pins_.find(context);
  return it == pins_.end() ? 0 : it->second.Count(page_ua >> page_shift_);
}

absl::StatusOr<uint64_t> MemlockBackend::TotalPinnedPages() const {
  MutexLock lock(&mu_);
  return total_pins_;
}

uint64_t MemlockBackend::LockedPages() const {
  MutexLock lock(&mu_);
  return lock_counts_.covered_pages();
}

}  // namespace dmapin::agent
