#include "tests/qemu_vfio/guest_support.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

constexpr char kEduId[] = "1234 11e8";

std::string g_mode = "?";
int g_passed = 0;
int g_failed = 0;

}  // namespace

// ---------------------------------------------------------------------------------------------
// Reporting

void SetMode(const std::string& mode) { g_mode = mode.empty() ? "?" : mode; }
const std::string& Mode() { return g_mode; }
int Failed() { return g_failed; }

void Line(const char* tag, const std::string& step, const std::string& detail) {
  std::printf("%s %s %s: %s\n", tag, g_mode.c_str(), step.c_str(), detail.c_str());
  std::fflush(stdout);
}

bool Check(bool ok, const std::string& step, const std::string& detail) {
  Line(ok ? "PASS" : "FAIL", step, detail);
  ++(ok ? g_passed : g_failed);
  return ok;
}

void Info(const std::string& step, const std::string& detail) { Line("INFO", step, detail); }

std::string Errno(int err) { return err == 0 ? "OK" : ErrnoName(err); }

int Finish(std::chrono::steady_clock::time_point start, bool init) {
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("RESULT %s passed=%d failed=%d test_seconds=%.1f\n", g_mode.c_str(), g_passed,
              g_failed, seconds);
  std::printf("%s\n", kDoneMarker);
  std::fflush(stdout);
  if (init) {
    ::sync();
    ::reboot(RB_AUTOBOOT);  // QEMU runs with -no-reboot: this ends it
  }
  return g_failed == 0 ? 0 : 1;
}

// ---------------------------------------------------------------------------------------------
// Small system helpers

std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string text = buffer.str();
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

bool WriteFile(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  return ok;
}

std::string ReadLink(const std::string& path) {
  char buf[512];
  const ssize_t n = ::readlink(path.c_str(), buf, sizeof(buf) - 1);
  if (n < 0) return "";
  return std::string(buf, n);
}

std::string Basename(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::vector<std::string> ListDir(const std::string& path) {
  std::vector<std::string> names;
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) return names;
  while (struct dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') names.push_back(entry->d_name);
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

void SleepMs(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

int64_t StatusKb(pid_t pid, const char* field) {
  std::ifstream in(pid == 0 ? std::string("/proc/self/status")
                            : absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  const std::string prefix = absl::StrCat(field, ":");
  while (std::getline(in, line)) {
    if (line.compare(0, prefix.size(), prefix) == 0) {
      return std::strtoll(line.c_str() + prefix.size(), nullptr, 10);
    }
  }
  return -1;
}

int64_t MemInfoKb(const char* field) {
  std::ifstream in("/proc/meminfo");
  std::string line;
  const std::string prefix = absl::StrCat(field, ":");
  while (std::getline(in, line)) {
    if (line.compare(0, prefix.size(), prefix) == 0) {
      return std::strtoll(line.c_str() + prefix.size(), nullptr, 10);
    }
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------
// Messages between the guest's processes

bool SendFds(int sock, const std::string& text, const std::vector<int>& fds) {
  if (fds.size() > 4) return false;
  struct iovec iov = {const_cast<char*>(text.data()), text.size()};
  char control[CMSG_SPACE(4 * sizeof(int))] = {};
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(fds.size() * sizeof(int));
    struct cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), fds.data(), fds.size() * sizeof(int));
  }
  return ::sendmsg(sock, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(text.size());
}

bool RecvFds(int sock, std::string* text, std::vector<int>* fds, int timeout_ms) {
  struct pollfd p = {sock, POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) != 1) return false;
  char buf[4096];
  char control[CMSG_SPACE(4 * sizeof(int))] = {};
  struct iovec iov = {buf, sizeof(buf)};
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  if (n <= 0) return false;
  text->assign(buf, n);
  if (fds != nullptr) fds->clear();
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (fds != nullptr) {
        fds->push_back(fd);
      } else {
        ::close(fd);
      }
    }
  }
  return true;
}

void SendLine(int sock, const char* tag, const std::string& step, const std::string& detail) {
  SendFds(sock, absl::StrCat("LINE ", tag, " ", step, "\t", detail));
}

bool RecvPrintingLines(int sock, std::string* text, std::vector<int>* fds) {
  while (RecvFds(sock, text, fds)) {
    if (text->compare(0, 5, "LINE ") != 0) return true;
    const std::string body = text->substr(5);
    const size_t tab = body.find('\t');
    const std::string tag_step = body.substr(0, tab);
    const std::string detail = tab == std::string::npos ? "" : body.substr(tab + 1);
    const size_t space = tag_step.find(' ');
    const std::string tag = tag_step.substr(0, space);
    const std::string step = space == std::string::npos ? "" : tag_step.substr(space + 1);
    if (tag == "PASS" || tag == "FAIL") {
      Check(tag == "PASS", step, detail);
    } else {
      Line(tag.c_str(), step, detail);
    }
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Boot (PID 1 only)

void Boot() {
  ::mkdir("/proc", 0755);
  ::mkdir("/sys", 0755);
  ::mkdir("/dev", 0755);
  ::mount("proc", "/proc", "proc", 0, nullptr);
  ::mount("sysfs", "/sys", "sysfs", 0, nullptr);
  ::mount("devtmpfs", "/dev", "devtmpfs", 0, nullptr);
  // Keep kernel messages (DMAR faults, say) off the console lines the harness parses.
  WriteFile("/proc/sys/kernel/printk", "1 4 1 7");
  const int console = ::open("/dev/console", O_RDWR);
  if (console >= 0) {
    ::dup2(console, 1);
    ::dup2(console, 2);
    if (console > 2) ::close(console);
  }
}

bool LoadModules(const std::string& dir) {
  bool ok = true;
  for (const std::string& name : ListDir(dir)) {
    const std::string path = absl::StrCat(dir, "/", name);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    const long result = fd < 0 ? -1 : ::syscall(SYS_finit_module, fd, "", 0);  // NOLINT
    const int err = errno;
    if (fd >= 0) ::close(fd);
    if (result != 0 && err != EEXIST) {
      Check(false, "load-module", absl::StrCat(name, ": ", Errno(err)));
      ok = false;
    }
  }
  if (ok) Check(true, "load-modules", absl::StrJoin(ListDir(dir), " "));
  return ok;
}

std::vector<EduDevice> BindEduDevices() {
  std::vector<EduDevice> devices;
  for (const std::string& bdf : ListDir("/sys/bus/pci/devices")) {
    const std::string base = absl::StrCat("/sys/bus/pci/devices/", bdf);
    if (ReadFile(base + "/vendor").value_or("") == "0x1234" &&
        ReadFile(base + "/device").value_or("") == "0x11e8") {
      devices.push_back(EduDevice{bdf, ""});
    }
  }
  if (devices.empty()) {
    Check(false, "find-edu", "no PCI device 1234:11e8 in /sys/bus/pci/devices");
    return devices;
  }
  if (!WriteFile("/sys/bus/pci/drivers/vfio-pci/new_id", kEduId)) {
    Check(false, "bind-vfio-pci",
          absl::StrCat("write /sys/bus/pci/drivers/vfio-pci/new_id: ", Errno(errno)));
    return {};
  }
  std::string detail;
  for (EduDevice& device : devices) {
    const std::string base = absl::StrCat("/sys/bus/pci/devices/", device.bdf);
    bool bound = false;
    for (int i = 0; i < 100 && !bound; ++i) {
      bound = Basename(ReadLink(base + "/driver")) == "vfio-pci";
      if (!bound) SleepMs(50);
    }
    const std::string group = Basename(ReadLink(base + "/iommu_group"));
    device.group = absl::StrCat("/dev/vfio/", group);
    struct stat st;
    bool node = false;
    for (int i = 0; i < 100 && bound && !group.empty() && !node; ++i) {
      node = ::stat(device.group.c_str(), &st) == 0;
      if (!node) SleepMs(50);
    }
    if (!bound || group.empty() || !node) {
      Check(false, "bind-vfio-pci",
            absl::StrFormat("%s: driver=%s group=%s node=%d", device.bdf,
                            Basename(ReadLink(base + "/driver")), group, node));
      return {};
    }
    absl::StrAppend(&detail, device.bdf, " -> ", device.group, " ");
  }
  Check(true, "bind-vfio-pci", detail);
  return devices;
}

// ---------------------------------------------------------------------------------------------
// Edu

void Edu::Close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

absl::Status Edu::Open(const std::string& group_path, const std::string& bdf) {
  int group_fd = -1;
  for (const std::string& fd : ListDir("/proc/self/fd")) {
    if (ReadLink(absl::StrCat("/proc/self/fd/", fd)) == group_path) {
      group_fd = std::atoi(fd.c_str());
    }
  }
  if (group_fd < 0) return ErrnoStatus(ENOENT, absl::StrCat(group_path, " is not open"));
  return OpenFromGroup(group_fd, bdf);
}

absl::Status Edu::OpenFromGroup(int group_fd, const std::string& bdf) {
  const int fd = ::ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, bdf.c_str());
  if (fd < 0) return ErrnoStatus(errno, "VFIO_GROUP_GET_DEVICE_FD " + bdf);
  return Adopt(fd);
}

absl::Status Edu::Adopt(int device_fd) {
  Close();
  fd_ = device_fd;
  absl::StatusOr<uint64_t> bar0 = RegionOffset(VFIO_PCI_BAR0_REGION_INDEX);
  if (!bar0.ok()) return bar0.status();
  bar0_ = *bar0;
  absl::StatusOr<uint64_t> config = RegionOffset(VFIO_PCI_CONFIG_REGION_INDEX);
  if (!config.ok()) return config.status();
  // Bus master on, through the config region (PCI_COMMAND at 0x4, bit 2).
  uint16_t command = 0;
  if (::pread(fd_, &command, 2, *config + 4) != 2) return ErrnoStatus(errno, "read PCI_COMMAND");
  command |= 0x6;  // memory space + bus master
  if (::pwrite(fd_, &command, 2, *config + 4) != 2) {
    return ErrnoStatus(errno, "write PCI_COMMAND");
  }
  return absl::OkStatus();
}

bool Edu::DetectEndianness() {
  swap_ = false;
  const uint32_t ident = Read(kIdent);
  if ((ident & 0xff) == 0xed) return true;
  swap_ = (ident >> 24) == 0xed;
  return swap_;
}

uint32_t Edu::Read(uint64_t reg) const {
  uint32_t value = 0xffffffff;
  if (::pread(fd_, &value, 4, bar0_ + reg) != 4) return 0xffffffff;
  return swap_ ? __builtin_bswap32(value) : value;
}

bool Edu::Write(uint64_t reg, uint32_t value) const {
  if (swap_) value = __builtin_bswap32(value);
  return ::pwrite(fd_, &value, 4, bar0_ + reg) == 4;
}

absl::Status Edu::Dma(uint64_t bus, uint32_t count, bool to_ram) const {
  const uint64_t src = to_ram ? kDeviceBuffer : bus;
  const uint64_t dst = to_ram ? bus : kDeviceBuffer;
  if (!Write(kDmaSrc, static_cast<uint32_t>(src)) ||
      !Write(kDmaSrc + 4, static_cast<uint32_t>(src >> 32)) ||
      !Write(kDmaDst, static_cast<uint32_t>(dst)) ||
      !Write(kDmaDst + 4, static_cast<uint32_t>(dst >> 32)) || !Write(kDmaCount, count) ||
      !Write(kDmaCmd, kCmdRun | (to_ram ? kCmdToRam : 0))) {
    return ErrnoStatus(errno, "write edu DMA registers");
  }
  for (int i = 0; i < 400; ++i) {  // the transfer runs 100 ms (virtual) after the command
    if ((Read(kDmaCmd) & kCmdRun) == 0) return absl::OkStatus();
    SleepMs(25);
  }
  return ErrnoStatus(ETIMEDOUT, "edu DMA did not complete in 10 s");
}

absl::StatusOr<uint64_t> Edu::RegionOffset(uint32_t index) const {
  struct vfio_region_info info;
  std::memset(&info, 0, sizeof(info));
  info.argsz = sizeof(info);
  info.index = index;
  if (::ioctl(fd_, VFIO_DEVICE_GET_REGION_INFO, &info) != 0) {
    return ErrnoStatus(errno, absl::StrCat("VFIO_DEVICE_GET_REGION_INFO ", index));
  }
  return info.offset;
}

// ---------------------------------------------------------------------------------------------
// Processes of the guest

// Makes every directory of `path` (mkdir -p).
void MakeDirs(const std::string& path) {
  for (size_t slash = path.find('/', 1);; slash = path.find('/', slash + 1)) {
    ::mkdir(path.substr(0, slash).c_str(), 0755);
    if (slash == std::string::npos) break;
  }
}

// fork + execve of `argv` with stdout and stderr on `out_fd` (-1: this process's).
pid_t Spawn(const std::vector<std::string>& argv, int out_fd) {
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  char* env[] = {const_cast<char*>("PATH=/bin"), const_cast<char*>("HOME=/"), nullptr};
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (out_fd >= 0) {
      ::dup2(out_fd, 1);
      ::dup2(out_fd, 2);
    }
    ::execve(args[0], args.data(), env);
    std::fprintf(stderr, "execve %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  return pid;
}

// Whether `pid` (a child) still runs; reaps it and says how it ended otherwise.
bool Running(pid_t pid, std::string* how) {
  int status = 0;
  const pid_t got = ::waitpid(pid, &status, WNOHANG);
  if (got == 0) return true;
  if (how != nullptr) {
    if (got < 0) {
      *how = absl::StrCat("waitpid: ", std::strerror(errno));
    } else if (WIFEXITED(status)) {
      *how = absl::StrCat("exited with ", WEXITSTATUS(status));
    } else {
      *how = absl::StrCat("killed by signal ", WTERMSIG(status));
    }
  }
  return false;
}

int64_t LockedKb(pid_t pid) { return StatusKb(pid, "VmLck"); }

// The descriptor number under which `pid` holds `path` open; -1 if none.
int FdOf(pid_t pid, const std::string& path) {
  const std::string dir = absl::StrCat("/proc/", pid, "/fd");
  for (const std::string& fd : ListDir(dir)) {
    if (ReadLink(absl::StrCat(dir, "/", fd)) == path) return std::atoi(fd.c_str());
  }
  return -1;
}

int DupFdOf(pid_t pid, int remote_fd) {
  if (remote_fd < 0) return -1;
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) return -1;
  const int fd = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, remote_fd, 0));
  const int err = errno;
  ::close(pidfd);
  errno = err;
  return fd;
}

// `size` bytes of `pid`'s memory at its address `ua`.
std::optional<std::string> ReadMemory(pid_t pid, uint64_t ua, size_t size) {
  const int fd = ::open(absl::StrCat("/proc/", pid, "/mem").c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::string bytes(size, '\0');
  const ssize_t n = ::pread(fd, bytes.data(), size, static_cast<off_t>(ua));
  ::close(fd);
  if (n != static_cast<ssize_t>(size)) return std::nullopt;
  return bytes;
}

std::string Pattern(uint32_t seed, uint32_t bytes) {
  std::string pattern(bytes, '\0');
  for (uint32_t i = 0; i < bytes; ++i) pattern[i] = static_cast<char>(seed + 7 * i);
  return pattern;
}

// Where the first difference is, for the report.
std::string Compared(const std::string& got, const std::string& want) {
  if (got == want) return "identical";
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  size_t zeros = 0;
  for (char c : got) zeros += c == '\0';
  return absl::StrFormat("differ from byte %d (got 0x%02x, want 0x%02x; %d of %d bytes zero)", i,
                         i < got.size() ? static_cast<uint8_t>(got[i]) : 0,
                         i < want.size() ? static_cast<uint8_t>(want[i]) : 0, zeros, got.size());
}

bool Reaped(pid_t pid, double timeout_s, std::string* how) {
  const auto start = std::chrono::steady_clock::now();
  while (Running(pid, how)) {
    if (std::chrono::steady_clock::now() - start > std::chrono::duration<double>(timeout_s)) {
      return false;
    }
    SleepMs(20);
  }
  return true;
}

void CheckGracefulStop(pid_t agent) {
  std::string how;
  if (!Check(Running(agent, &how), "agent-alive", how.empty() ? "still serving" : how)) return;
  ::kill(agent, SIGTERM);
  if (!Reaped(agent, 30, &how)) {
    ::kill(agent, SIGKILL);
    ::waitpid(agent, nullptr, 0);
    how = "did not stop in 30 s: killed";
  }
  Check(how == "exited with 0", "agent-sigterm", how);
}

}  // namespace dmapin::agent
