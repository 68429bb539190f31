// The guest side of the QEMU agent test (run_qemu_vfio.sh x86_64-agent): the real, dynamically
// linked dmapin-agent (--backend=vfio-type1) and a VMM on it (vfio_test_vmm.cc) run inside a
// Linux guest with an emulated Intel IOMMU; the emulated `edu` device DMAs through the IOVAs the
// VMM mapped, and the bytes must land in the VMM process's own memory. When the VMM is killed,
// the agent must tear its context down: the container released, its VmLck back where it was.
//
// It is the initramfs's /init (PID 1), statically linked (it cannot link gRPC; it only watches
// the two processes through /proc and drives the device):
//   1. mounts, loads the modules, binds edu to vfio-pci (guest_support.h);
//   2. starts /bin/dmapin-agent, waits for its sockets, records its VmLck;
//   3. starts /bin/vfio-test-vmm and reads its READY line (pid, addresses, IOVAs);
//   4. takes a duplicate of the agent's descriptor of the edu's group (pidfd_getfd: a group can
//      be open in one process only), opens the device from it and runs two DMAs: the VMM's
//      pattern (IOVA src) into edu's buffer, and back to IOVA dst; then reads /proc/<vmm>/mem at
//      the VMM's address of dst;
//   5. closes the device and the duplicate (a device fd would keep the container alive), kills
//      the VMM (SIGKILL), and waits for the agent's VmLck to return and the group to be free;
//   6. stops the agent (SIGTERM) and prints its log.
// Output: PASS/FAIL/INFO lines, "RESULT agent passed=N failed=M" and the end marker, as
// vfio_guest_test.cc prints them.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "tests/qemu_vfio/guest_support.h"

namespace dmapin::agent {
namespace {

constexpr char kAgent[] = "/bin/dmapin-agent";
constexpr char kVmm[] = "/bin/vfio-test-vmm";
constexpr char kSocket[] = "/run/dmapin/agent.sock";
constexpr char kStateDir[] = "/var/lib/dmapin";
constexpr char kAgentLog[] = "/agent.log";

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The VMM's READY line.
struct Ready {
  pid_t pid = 0;
  uint64_t ua = 0, size = 0, src_iova = 0, src_ua = 0, dst_iova = 0, dst_ua = 0, map_bytes = 0,
           agent_ua = 0;
  uint32_t bytes = 0, seed = 0;
};

std::optional<Ready> ParseReady(const std::string& line) {
  Ready r;
  unsigned long long ua, size, src_iova, src_ua, dst_iova, dst_ua, map_bytes, agent_ua;
  int pid = 0;
  unsigned bytes = 0, seed = 0;
  if (std::sscanf(line.c_str(),
                  "READY pid=%d ua=0x%llx size=0x%llx src_iova=0x%llx src_ua=0x%llx "
                  "dst_iova=0x%llx dst_ua=0x%llx bytes=%u seed=%u map_bytes=0x%llx "
                  "agent_ua=0x%llx",
                  &pid, &ua, &size, &src_iova, &src_ua, &dst_iova, &dst_ua, &bytes, &seed,
                  &map_bytes, &agent_ua) != 11) {
    return std::nullopt;
  }
  r.pid = pid;
  r.ua = ua;
  r.size = size;
  r.src_iova = src_iova;
  r.src_ua = src_ua;
  r.dst_iova = dst_iova;
  r.dst_ua = dst_ua;
  r.bytes = bytes;
  r.seed = seed;
  r.map_bytes = map_bytes;
  r.agent_ua = agent_ua;
  return r;
}

// Reads the VMM's output until its READY line (echoing the other lines as INFO), EOF or the
// deadline.
std::optional<Ready> AwaitReady(int fd, pid_t vmm, int timeout_s) {
  const Clock::time_point start = Clock::now();
  std::string buffer;
  while (SecondsSince(start) < timeout_s) {
    struct pollfd p = {fd, POLLIN, 0};
    if (::poll(&p, 1, 500) <= 0) continue;
    char chunk[4096];
    const ssize_t n = ::read(fd, chunk, sizeof(chunk));
    if (n <= 0) {
      if (!buffer.empty()) Info("vmm-output", buffer);
      std::string how;
      Running(vmm, &how);
      Check(false, "vmm-ready", absl::StrCat("the VMM's output ended without READY: ", how));
      return std::nullopt;
    }
    buffer.append(chunk, n);
    for (size_t nl = buffer.find('\n'); nl != std::string::npos; nl = buffer.find('\n')) {
      const std::string line = buffer.substr(0, nl);
      buffer.erase(0, nl + 1);
      if (line.rfind("READY ", 0) != 0) {
        Info("vmm-output", line);
        continue;
      }
      std::optional<Ready> ready = ParseReady(line);
      Check(ready.has_value() && ready->pid == vmm, "vmm-ready",
            absl::StrFormat("after %.1f s: %s", SecondsSince(start), line));
      return ready;
    }
  }
  Check(false, "vmm-ready", absl::StrFormat("no READY line in %d s", timeout_s));
  return std::nullopt;
}

void PrintAgentLog() {
  std::ifstream in(kAgentLog);
  std::string line;
  while (std::getline(in, line)) Info("agent-log", line);
}

void Run(const EduDevice& edu_device) {
  MakeDirs("/run/dmapin");
  MakeDirs(kStateDir);
  MakeDirs("/tmp");
  const int log = ::open(kAgentLog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  Clock::time_point t = Clock::now();
  const pid_t agent =
      Spawn({kAgent, "--backend=vfio-type1", absl::StrCat("--uds_path=", kSocket),
             absl::StrCat("--state_dir=", kStateDir), "--tcp_address=", "--metrics_address="},
            log);
  if (log >= 0) ::close(log);
  if (!Check(agent > 0, "agent-start", absl::StrCat(kAgent, " pid ", agent))) return;

  // Up once both sockets exist (the VMM's connect then waits for the gRPC server to serve).
  struct stat st;
  const std::string memory_socket = absl::StrCat(kSocket, ".memory");
  std::string how;
  bool up = false;
  while (!up && SecondsSince(t) < 120 && Running(agent, &how)) {
    up = ::stat(kSocket, &st) == 0 && ::stat(memory_socket.c_str(), &st) == 0;
    if (!up) SleepMs(100);
  }
  if (!Check(up, "agent-sockets",
             up ? absl::StrFormat("%s and %s after %.1f s", kSocket, memory_socket, SecondsSince(t))
                : absl::StrCat("not there after 120 s; agent ", how.empty() ? "running" : how))) {
    PrintAgentLog();
    if (how.empty()) ::kill(agent, SIGKILL);
    return;
  }
  const int64_t base_kb = LockedKb(agent);
  Info("agent-baseline", absl::StrFormat("agent pid %d VmLck %d kB", agent, base_kb));

  // The VMM, its stdout and stderr on a pipe.
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) {
    Check(false, "pipe", std::strerror(errno));
    return;
  }
  t = Clock::now();
  const pid_t vmm = Spawn(
      {kVmm, absl::StrCat("--uds_path=", kSocket), absl::StrCat("--vfio_group=", edu_device.group)},
      out[1]);
  ::close(out[1]);
  std::optional<Ready> ready = AwaitReady(out[0], vmm, 180);
  bool ok = ready.has_value();

  const int64_t mapped_kb = LockedKb(agent);
  if (ok) {
    // All in the agent's mm: registration mlocks the RAM (memlock backend) and MAP_DMAs it into
    // type1's pin range, which locked_vm counts again; each guest mapping counts once more
    // (README, "Kernel vs spec" 2). The VMM itself pins nothing.
    const int64_t ram_kb = static_cast<int64_t>(ready->size / 1024);
    const int64_t map_kb = static_cast<int64_t>(ready->map_bytes / 1024);
    const int64_t want_kb = 2 * ram_kb + 2 * map_kb;
    Check(mapped_kb - base_kb == want_kb && LockedKb(vmm) == 0, "agent-locked-vm-after-map",
          absl::StrFormat("agent VmLck %d kB = baseline %+d kB (want %+d kB: mlock %d kB + pin "
                          "range %d kB + 2 mappings of %d kB); VMM VmLck %d kB (want 0)",
                          mapped_kb, mapped_kb - base_kb, want_kb, ram_kb, ram_kb, map_kb,
                          LockedKb(vmm)));
  }

  // The agent's descriptor of the group, duplicated into this process.
  const int agent_group_fd = ok ? FdOf(agent, edu_device.group) : -1;
  if (ok) {
    ok = Check(agent_group_fd >= 0, "agent-holds-group",
               absl::StrFormat("%s is fd %d of the agent", edu_device.group, agent_group_fd));
  }
  int group_fd = -1;
  if (ok) {
    group_fd = DupFdOf(agent, agent_group_fd);
    const int err = errno;
    ok = Check(group_fd >= 0, "pidfd-getfd-group",
               group_fd >= 0 ? absl::StrFormat("fd %d here", group_fd)
                             : absl::StrCat("pidfd_open/pidfd_getfd: ", Errno(err)));
  }
  Edu edu;
  if (ok) {
    const absl::Status opened = edu.OpenFromGroup(group_fd, edu_device.bdf);
    ok = Check(opened.ok(), "edu-open",
               opened.ok() ? absl::StrCat(edu_device.bdf, " from the agent's group descriptor")
                           : opened.ToString());
  }
  if (ok) {
    ok = Check(edu.DetectEndianness(), "edu-ident",
               absl::StrFormat("0x%08x", edu.Read(Edu::kIdent)));
  }

  // The device reads the VMM's bytes at src_iova and writes them to dst_iova.
  if (ok) {
    const std::string want = Pattern(ready->seed, ready->bytes);
    const std::optional<std::string> src = ReadMemory(vmm, ready->src_ua, ready->bytes);
    const std::optional<std::string> before = ReadMemory(vmm, ready->dst_ua, ready->bytes);
    ok = Check(src == want && before == std::string(ready->bytes, '\0'), "vmm-memory-before",
               absl::StrFormat(
                   "/proc/%d/mem: source at 0x%x %s; destination at 0x%x %s", vmm, ready->src_ua,
                   src ? Compared(*src, want) : "unreadable", ready->dst_ua,
                   before ? (*before == std::string(ready->bytes, '\0') ? "all zero" : "NOT zero")
                          : "unreadable"));
  }
  if (ok) {
    absl::Status status = edu.Dma(ready->src_iova, ready->bytes, /*to_ram=*/false);
    if (status.ok()) status = edu.Dma(ready->dst_iova, ready->bytes, /*to_ram=*/true);
    ok = Check(status.ok(), "edu-dma",
               status.ok() ? absl::StrFormat("iova 0x%x -> edu -> iova 0x%x, %d bytes",
                                             ready->src_iova, ready->dst_iova, ready->bytes)
                           : status.ToString());
  }
  if (ok) {
    const std::string want = Pattern(ready->seed, ready->bytes);
    const std::optional<std::string> got = ReadMemory(vmm, ready->dst_ua, ready->bytes);
    Check(got == want, "dma-landed-in-vmm-memory",
          absl::StrFormat("/proc/%d/mem at the VMM's 0x%x (iova 0x%x): %s", vmm, ready->dst_ua,
                          ready->dst_iova, got ? Compared(*got, want) : "unreadable"));
    // The agent registered the VMM's address; what it mapped is the same memfd elsewhere in its
    // own address space.
    const uint64_t agent_dst = ready->agent_ua + (ready->dst_ua - ready->ua);
    const std::optional<std::string> shared = ReadMemory(agent, agent_dst, ready->bytes);
    Check(shared == want && ready->agent_ua != ready->ua, "agent-mapping-shares-vmm-memory",
          absl::StrFormat("/proc/%d/mem at the agent's 0x%x (its mapping of the VMM's 0x%x): %s",
                          agent, agent_dst, ready->dst_ua,
                          shared ? Compared(*shared, want) : "unreadable"));
  }
  // A device fd holds its group, and the group its container: let go before the VMM exits.
  edu.Close();
  if (group_fd >= 0) ::close(group_fd);

  // The VMM's exit: the agent tears its context down and releases its container.
  if (vmm > 0) {
    t = Clock::now();
    ::kill(vmm, SIGKILL);
    ::waitpid(vmm, nullptr, 0);
    ::close(out[0]);
    int64_t now_kb = LockedKb(agent);
    while (now_kb != base_kb && SecondsSince(t) < 120 && Running(agent)) {
      SleepMs(100);
      now_kb = LockedKb(agent);
    }
    Check(now_kb == base_kb, "vmm-exit-unpins",
          absl::StrFormat("agent VmLck %d kB %.1f s after SIGKILL to the VMM (baseline %d kB, "
                          "%d kB while mapped)",
                          now_kb, SecondsSince(t), base_kb, mapped_kb));
    int fd = FdOf(agent, edu_device.group);
    while (fd >= 0 && SecondsSince(t) < 120) {
      SleepMs(100);
      fd = FdOf(agent, edu_device.group);
    }
    Check(
        fd < 0, "vmm-exit-releases-container",
        absl::StrFormat("the agent %s %s after %.1f s", fd < 0 ? "no longer holds" : "STILL holds",
                        edu_device.group, SecondsSince(t)));
    // Only one process can hold a group open: now this one can.
    const int again = ::open(edu_device.group.c_str(), O_RDWR | O_CLOEXEC);
    const int err = errno;
    Check(again >= 0, "group-free",
          again >= 0 ? absl::StrCat(edu_device.group, " opens here")
                     : absl::StrCat("open: ", Errno(err)));
    if (again >= 0) ::close(again);
  }

  CheckGracefulStop(agent);
  PrintAgentLog();
}

int Main(int argc, char** argv) {
  const bool init = ::getpid() == 1;
  if (init) Boot();
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  SetMode("agent");
  const Clock::time_point start = Clock::now();
  Info("start", absl::StrCat("kernel ", ReadFile("/proc/sys/kernel/osrelease").value_or("?"),
                             init ? ", as /init" : ""));
  if (!init) {
    Check(false, "init", "runs as the guest's /init only (it binds devices and starts daemons)");
  } else if (LoadModules("/modules")) {
    std::vector<EduDevice> edus = BindEduDevices();
    if (!edus.empty()) Run(edus.front());
  }
  return Finish(start, init);
}

}  // namespace
}  // namespace dmapin::agent

int main(int argc, char** argv) { return dmapin::agent::Main(argc, argv); }
