#include "agent/node/guest_memory.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

constexpr uint64_t kMaxU64 = std::numeric_limits<uint64_t>::max();

// [ua, ua + size) must end within 64 bits: an end of 2^64 is refused too, so every end fits.
bool Wraps(uint64_t start, uint64_t size) { return size > kMaxU64 - start; }

std::string Hex(uint64_t value) { return absl::StrCat("0x", absl::Hex(value)); }

std::string SlotName(size_t index, const SlotSource& source) {
  return absl::StrCat("slot ", index, " (ua ", Hex(source.ua), ", size ", Hex(source.size), ")");
}

std::string Range(uint64_t ua, uint64_t size) {
  return absl::StrCat("[", Hex(ua), ", ", Hex(ua + size), ")");
}

std::string SlotRange(const GuestSlot& slot) {
  return absl::StrCat("attached slot ", Range(slot.ua, slot.size), " (", slot.object, ")");
}

// What a descriptor that is not a regular file is, for the message that refuses it.
const char* FileKind(mode_t mode) {
  switch (mode & S_IFMT) {
    case S_IFSOCK:
      return "a socket";
    case S_IFIFO:
      return "a pipe";
    case S_IFDIR:
      return "a directory";
    case S_IFCHR:
      return "a character device";
    case S_IFBLK:
      return "a block device";
    case S_IFLNK:
      return "a symbolic link";
    default:
      return "not a regular file";
  }
}

// "memfd:guest-ram dev 0:1 ino 1042": the name /proc/self/fd gives the object (a memfd's without
// the leading '/' and " (deleted)"), then its identity.
std::string DescribeObject(int fd, const struct stat& st) {
  char link[512];
  std::string path = absl::StrCat("/proc/self/fd/", fd);
  ssize_t n = ::readlink(path.c_str(), link, sizeof(link) - 1);
  std::string name = n > 0 ? std::string(link, static_cast<size_t>(n)) : "?";
  if (absl::StartsWith(name, "/memfd:")) {
    name.erase(0, 1);
    constexpr absl::string_view kDeleted = " (deleted)";
    if (absl::EndsWith(name, kDeleted)) name.resize(name.size() - kDeleted.size());
  }
  return absl::StrCat(name, " dev ", major(st.st_dev), ":", minor(st.st_dev), " ino ", st.st_ino);
}

// The error of a source that is not attachable on its own (no descriptor looked at).
absl::Status CheckShape(size_t index, const SlotSource& source, uint64_t page_size) {
  auto invalid = [&](absl::string_view why) {
    return ErrnoStatus(EINVAL, absl::StrCat(SlotName(index, source), ": ", why));
  };
  if (source.size == 0) return invalid("size 0");
  if (source.ua % page_size != 0 || source.size % page_size != 0 ||
      source.offset % page_size != 0) {
    return invalid(absl::StrCat("ua, size and offset (", Hex(source.offset),
                                ") must be multiples of the page size ", Hex(page_size)));
  }
  if (Wraps(source.ua, source.size)) return invalid("ua + size wraps");
  if (Wraps(source.offset, source.size)) {
    return invalid(absl::StrCat("offset ", Hex(source.offset), " + size wraps"));
  }
  return absl::OkStatus();
}

// The attached slot that overlaps [ua, ua + size) in `slots` (sorted, disjoint), or nullptr.
const GuestSlot* FindOverlap(const std::vector<GuestSlot>& slots, uint64_t ua, uint64_t size) {
  auto it = std::upper_bound(slots.begin(), slots.end(), ua,
                             [](uint64_t a, const GuestSlot& slot) { return a < slot.ua; });
  if (it != slots.begin() && std::prev(it)->ua + std::prev(it)->size > ua) return &*std::prev(it);
  if (it != slots.end() && it->ua < ua + size) return &*it;
  return nullptr;
}

// Maps one source shared and writable; fills `slot` (agent_ua, dev, ino, object).
absl::Status MapSource(size_t index, const SlotSource& source, GuestSlot* slot) {
  const std::string name = SlotName(index, source);
  struct stat st;
  if (source.fd < 0 || ::fstat(source.fd, &st) != 0) {
    return ErrnoStatus(EBADF, absl::StrCat(name, ": fd ", source.fd, " is not an open descriptor"));
  }
  if (!S_ISREG(st.st_mode)) {
    return ErrnoStatus(EINVAL,
                       absl::StrCat(name, ": fd ", source.fd, " is ", FileKind(st.st_mode),
                                    ", not a memory object (memfd, hugetlbfs or tmpfs file)"));
  }
  // Guest RAM lives in shared memory: a disk file's page cache is no place to pin for DMA (the
  // kernel's long-term pins refuse it, and writeback would race the device).
  struct statfs fs;
  if (::fstatfs(source.fd, &fs) != 0) {
    return ErrnoStatus(errno, absl::StrCat(name, ": fstatfs of fd ", source.fd));
  }
  if (fs.f_type != TMPFS_MAGIC && fs.f_type != HUGETLBFS_MAGIC) {
    return ErrnoStatus(EINVAL, absl::StrCat(name, ": fd ", source.fd, " is a file on a ",
                                            "filesystem of type 0x", absl::Hex(fs.f_type),
                                            ", not shared memory (memfd, tmpfs or hugetlbfs)"));
  }
  const uint64_t object_size = static_cast<uint64_t>(st.st_size);
  if (source.offset + source.size > object_size) {
    return ErrnoStatus(
        ENXIO, absl::StrCat(name, ": ", Range(source.offset, source.size),
                            " reaches past the end of the object (size ", Hex(object_size), ")"));
  }
  void* addr = ::mmap(nullptr, source.size, PROT_READ | PROT_WRITE, MAP_SHARED, source.fd,
                      static_cast<off_t>(source.offset));
  if (addr == MAP_FAILED) {
    const int err = errno;
    std::string why;
    if (err == EACCES) {
      const int flags = ::fcntl(source.fd, F_GETFL);
      const char* mode = (flags & O_ACCMODE) == O_RDONLY   ? "read-only"
                         : (flags & O_ACCMODE) == O_WRONLY ? "write-only"
                                                           : "read-write";
      why = absl::StrCat("fd ", source.fd, " is open ", mode,
                         ": the agent maps guest memory shared, readable and writable");
    } else if (err == EPERM) {
      why = "mmap refused a shared writable mapping (a memfd sealed against writes?)";
    } else {
      why = absl::StrCat("mmap: ", std::strerror(err));
    }
    return ErrnoStatus(err, absl::StrCat(name, ": ", why));
  }
  slot->ua = source.ua;
  slot->size = source.size;
  slot->offset = source.offset;
  slot->agent_ua = reinterpret_cast<uintptr_t>(addr);
  slot->dev = st.st_dev;
  slot->ino = st.st_ino;
  slot->object = DescribeObject(source.fd, st);
  return absl::OkStatus();
}

// Whether `sources` still fit next to `slots` (the attached ones, under the lock).
absl::Status CheckAgainstSlots(const std::vector<GuestSlot>& slots,
                               absl::Span<const SlotSource> sources) {
  constexpr size_t kMax = GuestMemory::kMaxSlots;
  if (sources.size() > kMax || slots.size() > kMax - sources.size()) {
    return ErrnoStatus(EINVAL, absl::StrCat(sources.size(), " slots more than ", slots.size(),
                                            " attached pass the limit of ", kMax, " per VMM"));
  }
  for (size_t i = 0; i < sources.size(); ++i) {
    const GuestSlot* other = FindOverlap(slots, sources[i].ua, sources[i].size);
    if (other != nullptr) {
      return ErrnoStatus(EINVAL,
                         absl::StrCat(SlotName(i, sources[i]), " overlaps ", SlotRange(*other)));
    }
  }
  return absl::OkStatus();
}

void Unmap(const std::vector<GuestSlot>& slots) {
  for (const GuestSlot& slot : slots) {
    ::munmap(reinterpret_cast<void*>(static_cast<uintptr_t>(slot.agent_ua)), slot.size);
  }
}

}  // namespace

GuestMemory::~GuestMemory() {
  MutexLock lock(&mu_);
  Unmap(slots_);
}

absl::Status GuestMemory::Detach(uint64_t ua) {
  std::vector<GuestSlot> removed;
  {
    MutexLock lock(&mu_);
    auto it = std::find_if(slots_.begin(), slots_.end(),
                           [ua](const GuestSlot& slot) { return slot.ua == ua; });
    if (it == slots_.end()) {
      return ErrnoStatus(ENOENT, absl::StrFormat("no memory slot starts at 0x%x", ua));
    }
    removed.push_back(*it);
    slots_.erase(it);
  }
  Unmap(removed);
  return absl::OkStatus();
}

absl::Status GuestMemory::Attach(absl::Span<const SlotSource> sources) {
  if (page_size_ == 0) return ErrnoStatus(EINVAL, "page size 0");
  for (size_t i = 0; i < sources.size(); ++i) {
    absl::Status status = CheckShape(i, sources[i], page_size_);
    if (!status.ok()) return status;
  }
  // Overlaps among the new slots: neighbours in ua order.
  std::vector<size_t> order(sources.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return sources[a].ua < sources[b].ua; });
  for (size_t k = 1; k < order.size(); ++k) {
    const SlotSource& low = sources[order[k - 1]];
    const SlotSource& high = sources[order[k]];
    if (low.ua + low.size > high.ua) {
      return ErrnoStatus(EINVAL, absl::StrCat(SlotName(order[k], high), " overlaps ",
                                              SlotName(order[k - 1], low)));
    }
  }
  // An early refusal that maps nothing; the check that counts is under the lock below.
  {
    MutexLock lock(&mu_);
    absl::Status status = CheckAgainstSlots(slots_, sources);
    if (!status.ok()) return status;
  }

  // mmap outside the lock: Resolve (the DMA path) must not wait for page-table setup.
  std::vector<GuestSlot> mapped;
  mapped.reserve(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) {
    GuestSlot slot;
    absl::Status status = MapSource(i, sources[i], &slot);
    if (!status.ok()) {
      Unmap(mapped);
      return status;
    }
    mapped.push_back(std::move(slot));
  }

  MutexLock lock(&mu_);
  // Another Attach may have added slots since the early check.
  absl::Status status = CheckAgainstSlots(slots_, sources);
  if (!status.ok()) {
    Unmap(mapped);
    return status;
  }
  for (GuestSlot& slot : mapped) slots_.push_back(std::move(slot));
  std::sort(slots_.begin(), slots_.end(),
            [](const GuestSlot& a, const GuestSlot& b) { return a.ua < b.ua; });
  return absl::OkStatus();
}

absl::Status GuestMemory::Resolve(uint64_t ua, uint64_t size,
                                  std::vector<GuestPiece>* pieces) const {
  pieces->clear();
  if (size == 0) return ErrnoStatus(EINVAL, absl::StrCat("resolve ", Hex(ua), ": size 0"));
  if (Wraps(ua, size)) {
    return ErrnoStatus(EINVAL, absl::StrCat("resolve ", Hex(ua), " size ", Hex(size), ": wraps"));
  }
  const uint64_t end = ua + size;
  MutexLock lock(&mu_);
  // The last slot starting at or below ua; then its successors while they continue the range.
  auto it = std::upper_bound(slots_.begin(), slots_.end(), ua,
                             [](uint64_t a, const GuestSlot& slot) { return a < slot.ua; });
  uint64_t at = ua;
  if (it != slots_.begin()) --it;
  while (at < end) {
    if (it == slots_.end() || it->ua > at || it->ua + it->size <= at) {
      pieces->clear();
      return ErrnoStatus(EFAULT, absl::StatusCode::kOutOfRange,
                         absl::StrCat(Hex(at), " is not in any memory slot of the VMM"));
    }
    const uint64_t piece_end = std::min(end, it->ua + it->size);
    pieces->push_back(GuestPiece{at, it->agent_ua + (at - it->ua), piece_end - at});
    at = piece_end;
    ++it;
  }
  return absl::OkStatus();
}

std::vector<GuestSlot> GuestMemory::slots() const {
  MutexLock lock(&mu_);
  return slots_;
}

uint64_t GuestMemory::bytes() const {
  MutexLock lock(&mu_);
  uint64_t total = 0;
  for (const GuestSlot& slot : slots_) total += slot.size;
  return total;
}

// --- OpenProcessSlots -------------------------------------------------------------------------

namespace {

// One line of /proc/<pid>/maps, without its path.
struct MapsLine {
  uint64_t start = 0;
  uint64_t end = 0;
  bool shared = false;
  uint64_t offset = 0;
  unsigned dev_major = 0;
  unsigned dev_minor = 0;
  uint64_t inode = 0;
};

bool ParseMapsLine(const char* text, MapsLine* line) {
  char perms[8] = {};
  uint64_t start, end, offset, inode;
  unsigned major_dev, minor_dev;
  if (std::sscanf(text, "%" SCNx64 "-%" SCNx64 " %7s %" SCNx64 " %x:%x %" SCNu64, &start, &end,
                  perms, &offset, &major_dev, &minor_dev, &inode) != 7) {
    return false;
  }
  line->start = start;
  line->end = end;
  line->shared = std::strchr(perms, 's') != nullptr;
  line->offset = offset;
  line->dev_major = major_dev;
  line->dev_minor = minor_dev;
  line->inode = inode;
  return true;
}

// The mappings that cover one range so far, as /proc/<pid>/maps streams by.
struct RangeCover {
  uint64_t ua = 0;
  uint64_t size = 0;
  bool started = false;
  MapsLine first;            // the mapping holding ua: its map_files entry is opened
  uint64_t covered_to = 0;   // the end of the covering mappings so far
  uint64_t next_offset = 0;  // the file offset a continuing mapping must start at
  bool gap = false;          // a hole follows covered_to: the final check names it
  absl::Status error;
};

std::string RangeName(size_t index, uint64_t ua, uint64_t size) {
  return absl::StrCat("range ", index, " ", Range(ua, size));
}

// Adds `line` to `cover` if it holds the range's next byte. A range may span adjacent mappings
// of the same object at contiguous offsets (a VMA split by mprotect or madvise); the object is
// opened once, through the first.
void Extend(size_t index, const MapsLine& line, RangeCover* cover) {
  if (!cover->error.ok() || cover->gap) return;
  const uint64_t end = cover->ua + cover->size;
  if (!cover->started) {
    if (line.start > cover->ua || line.end <= cover->ua) return;
    cover->started = true;
    cover->first = line;
  } else {
    if (cover->covered_to >= end || line.end <= cover->covered_to) return;
    if (line.start > cover->covered_to) {
      cover->gap = true;
      return;
    }
    const MapsLine& first = cover->first;
    if (line.inode != first.inode || line.dev_major != first.dev_major ||
        line.dev_minor != first.dev_minor || line.offset != cover->next_offset) {
      cover->error = ErrnoStatus(
          EFAULT,
          absl::StrCat(RangeName(index, cover->ua, cover->size), ": ", Hex(cover->covered_to),
                       " is not in the same memory object at the next offset as ", Hex(cover->ua),
                       " (the range spans different mappings)"));
      return;
    }
  }
  if (!line.shared) {
    cover->error = ErrnoStatus(
        EINVAL, absl::StrCat(RangeName(index, cover->ua, cover->size), ": mapping ",
                             Range(line.start, line.end - line.start),
                             " is a private mapping: anonymous or MAP_PRIVATE memory cannot be "
                             "shared with the agent"));
    return;
  }
  cover->covered_to = line.end;
  cover->next_offset = line.offset + (line.end - line.start);
}

}  // namespace

absl::StatusOr<std::vector<ProcessSlot>> OpenProcessSlots(
    pid_t pid, absl::Span<const std::pair<uint64_t, uint64_t>> ranges) {
  std::vector<RangeCover> covers(ranges.size());
  for (size_t i = 0; i < ranges.size(); ++i) {
    const auto [ua, size] = ranges[i];
    if (size == 0 || Wraps(ua, size)) {
      return ErrnoStatus(EINVAL, absl::StrCat("range ", i, " (ua ", Hex(ua), ", size ", Hex(size),
                                              "): ", size == 0 ? "size 0" : "wraps"));
    }
    covers[i].ua = ua;
    covers[i].size = size;
  }
  const std::string proc = absl::StrCat("/proc/", pid);
  auto no_process = [&]() {
    // ESRCH is not in errno_status's table: give it its code explicitly.
    return ErrnoStatus(ESRCH, absl::StatusCode::kNotFound, absl::StrCat("no process ", pid));
  };
  if (pid <= 0) return no_process();
  const std::string maps_path = proc + "/maps";
  FILE* maps = std::fopen(maps_path.c_str(), "re");
  if (maps == nullptr) {
    const int err = errno;
    if (err == ENOENT) return no_process();
    return ErrnoStatus(err, absl::StrCat(maps_path, ": ", std::strerror(err)));
  }
  // Line by line through a fixed buffer: only a line's head matters, the rest (a long path) is
  // skipped, so a process with many or long mappings costs no memory.
  char buffer[512];
  bool at_line_start = true;
  while (std::fgets(buffer, sizeof(buffer), maps) != nullptr) {
    const bool head = at_line_start;
    at_line_start = std::strchr(buffer, '\n') != nullptr;
    MapsLine line;
    if (!head || !ParseMapsLine(buffer, &line)) continue;
    for (size_t i = 0; i < covers.size(); ++i) Extend(i, line, &covers[i]);
  }
  const bool read_error = std::ferror(maps) != 0;
  std::fclose(maps);
  if (read_error) {
    // The process exiting mid-read shows as a read error (ESRCH from the kernel).
    if (::access(proc.c_str(), F_OK) != 0) return no_process();
    return ErrnoStatus(EIO, absl::StrCat(maps_path, ": read error"));
  }

  std::vector<ProcessSlot> slots;
  slots.reserve(covers.size());
  for (size_t i = 0; i < covers.size(); ++i) {
    const RangeCover& cover = covers[i];
    const std::string name = RangeName(i, cover.ua, cover.size);
    if (!cover.error.ok()) return cover.error;
    if (!cover.started || cover.covered_to < cover.ua + cover.size) {
      return ErrnoStatus(EFAULT,
                         absl::StrCat(name, ": ", Hex(cover.started ? cover.covered_to : cover.ua),
                                      " is not in any mapping of process ", pid));
    }
    // map_files names are "%lx-%lx": no 0x and, unlike maps, no zero padding.
    const std::string path = absl::StrCat(proc, "/map_files/", absl::Hex(cover.first.start), "-",
                                          absl::Hex(cover.first.end));
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    if (!fd.valid()) {
      const int err = errno;
      if (err == ENOENT) {
        if (::access(proc.c_str(), F_OK) != 0) return no_process();
        return ErrnoStatus(EFAULT, absl::StrCat(name, ": the mapping went away (", path, ")"));
      }
      return ErrnoStatus(
          err,
          absl::StrCat(name, ": open ", path, ": ", std::strerror(err),
                       err == EPERM || err == EACCES ? " (map_files needs CAP_SYS_ADMIN)" : ""));
    }
    // The address may have been remapped between reading maps and the open.
    struct stat st;
    if (::fstat(fd.get(), &st) != 0 || static_cast<uint64_t>(st.st_ino) != cover.first.inode) {
      return ErrnoStatus(EFAULT, absl::StrCat(name, ": the mapping changed while it was opened"));
    }
    ProcessSlot slot;
    slot.source.ua = cover.ua;
    slot.source.size = cover.size;
    slot.source.offset = cover.first.offset + (cover.ua - cover.first.start);
    slot.source.fd = fd.get();
    slot.fd = std::move(fd);
    slots.push_back(std::move(slot));
  }
  return slots;
}

}  // namespace dmapin::agent
