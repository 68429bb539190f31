#include "testing/fake_vmm.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/errno_status.h"
#include "common/unique_fd.h"
#include "testing/proc_info.h"

namespace dmapin::harness {

absl::StatusOr<FakeVmm> FakeVmm::Start(uint64_t pages, Memory memory) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t bytes = pages * page;
  int ready[2];
  if (pipe2(ready, O_CLOEXEC) != 0) return ErrnoStatus(errno, "pipe2");
  UniqueFd read_end(ready[0]);
  UniqueFd write_end(ready[1]);
  const pid_t pid = fork();
  if (pid < 0) return ErrnoStatus(errno, "fork");
  if (pid == 0) {
    // The child: only system calls from here on (the parent has threads).
    void* ram = MAP_FAILED;
    if (memory == Memory::kSharedMemfd) {
      const int fd = memfd_create("guest-ram", MFD_CLOEXEC);
      if (fd >= 0 && ftruncate(fd, static_cast<off_t>(bytes)) == 0) {
        ram = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      }
    } else {
      ram = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    uint64_t address = 0;
    if (ram != MAP_FAILED) {
      for (uint64_t i = 0; i < pages; ++i) {
        memset(static_cast<char*>(ram) + i * page, static_cast<int>(i & 0xff), page);
      }
      address = reinterpret_cast<uint64_t>(ram);
    }
    if (write(ready[1], &address, sizeof(address)) != sizeof(address)) _exit(1);
    for (;;) pause();
  }
  write_end.reset();
  uint64_t address = 0;
  FakeVmm vmm(pid, 0, bytes);
  if (read(read_end.get(), &address, sizeof(address)) != sizeof(address) || address == 0) {
    return absl::InternalError("the fake VMM could not map its memory");
  }
  vmm.ua_ = address;
  return vmm;
}

FakeVmm::FakeVmm(FakeVmm&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)), ua_(other.ua_), bytes_(other.bytes_) {}

FakeVmm::~FakeVmm() { Kill(); }

void FakeVmm::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  int status = 0;
  while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

absl::StatusOr<std::string> FakeVmm::Read(uint64_t ua, size_t size) const {
  UniqueFd mem(open(absl::StrCat("/proc/", pid_, "/mem").c_str(), O_RDONLY | O_CLOEXEC));
  if (!mem.valid()) return ErrnoStatus(errno, "open /proc/<vmm>/mem");
  std::string bytes(size, '\0');
  if (pread(mem.get(), bytes.data(), size, static_cast<off_t>(ua)) != static_cast<ssize_t>(size)) {
    return ErrnoStatus(errno, "pread /proc/<vmm>/mem");
  }
  return bytes;
}

absl::StatusOr<uint64_t> FakeVmm::Hpa(uint64_t ua) const {
  absl::StatusOr<uint64_t> frame = PageFrame(pid_, ua);
  if (!frame.ok()) return frame.status();
  return *frame * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace dmapin::harness
