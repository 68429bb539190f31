// The guest side of the QEMU restart test (run_qemu_vfio.sh x86_64-restart): the device keeps its
// DMA while the agent restarts. The real, dynamically linked dmapin-agent (--backend=vfio-type1)
// and a VMM on it (restart_vmm.cc) run inside a Linux guest with an emulated Intel IOMMU. The VMM
// holds its edu device and a duplicate of its container (the device handoff) and runs edu DMA
// transfers through the IOVAs it mapped, all the time; the agent is killed and restarted under
// it:
//   1. mounts, loads the modules, binds edu to vfio-pci (guest_support.h);
//   2. starts /bin/dmapin-agent and /bin/vfio-test-vmm (restart_vmm.cc), reads its READY line;
//   3. ten times kill -9 of the agent, then ten times SIGTERM (a planned exit: exit status 0):
//      while the agent is down the VMM's transfers go on; the agent is started again, the VMM's
//      next map gives the container back, and then: no failed transfer, the agent took the
//      container back with no inconsistency, the agent's VmLck is what the registry holds (the
//      kernel moved every mapping's charge to the new process: VFIO_UPDATE_VADDR), and every IOVA
//      the VMM mapped is still in the kernel's container (probed through a duplicate of the VMM's
//      container descriptor) while one it never mapped is not;
//   4. the VMM killed while the agent is down: the restarted agent tears its context down, its
//      VmLck is back to nothing, and the group opens again (the kernel dropped the container);
//   5. no DMAR fault in the guest kernel's log, at any point (and, to show that a fault would be
//      seen, one when the VMM is asked for a DMA to an IOVA nobody mapped); the agent stopped
//      with SIGTERM.
// Output: PASS/FAIL/INFO lines, "RESULT restart passed=N failed=M" and the end marker.
#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "tests/qemu_vfio/guest_support.h"

namespace dmapin::agent {
namespace {

constexpr char kAgent[] = "/bin/dmapin-agent";
constexpr char kVmm[] = "/bin/vfio-test-vmm";
constexpr char kSocket[] = "/run/dmapin/agent.sock";
constexpr char kStateDir[] = "/var/lib/dmapin";
constexpr char kAgentLog[] = "/agent.log";
constexpr int kRounds = 10;  // of each kind of exit
// Guest RAM and mappings of the VMM (its defaults): 4 MiB, 4 pairs + 1 churn range of 64 KiB.
constexpr int64_t kRamKb = 4096;
constexpr int64_t kMapKb = 64;
constexpr int kMappings = 8;
constexpr uint64_t kNeverMapped = 0x8000000;
// The VMM maps and unmaps this range all the time (its churn): the one a kill -9 can catch
// between the kernel's answer and the agent's record.
constexpr char kChurnIova[] = "iova=0x180000 ";

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The VMM's output: the READY line, then a STATS line every 200 ms (kept, latest first) and
// FAILED / CHURN-ERROR lines (echoed).
class VmmOutput {
 public:
  explicit VmmOutput(int fd) : fd_(fd) { ::fcntl(fd_, F_SETFL, O_NONBLOCK); }

  // Reads what is there; false at EOF.
  bool Poll() {
    char chunk[4096];
    for (;;) {
      const ssize_t n = ::read(fd_, chunk, sizeof(chunk));
      if (n == 0) return false;
      if (n < 0) return errno == EAGAIN || errno == EINTR;
      buffer_.append(chunk, static_cast<size_t>(n));
      for (size_t nl = buffer_.find('\n'); nl != std::string::npos; nl = buffer_.find('\n')) {
        Line(buffer_.substr(0, nl));
        buffer_.erase(0, nl + 1);
      }
    }
  }

  // The latest value of a STATS field; -1 before the first.
  int64_t Stat(const std::string& key) const {
    auto it = stats_.find(key);
    return it == stats_.end() ? -1 : it->second;
  }
  // Polls until `done` holds or `timeout_s` passed; false on timeout or EOF.
  template <typename Done>
  bool WaitFor(Done done, double timeout_s) {
    const Clock::time_point start = Clock::now();
    while (SecondsSince(start) < timeout_s) {
      if (!Poll()) return false;
      if (done()) return true;
      SleepMs(50);
    }
    return false;
  }
  const std::string& ready() const { return ready_; }
  const std::string& probe() const { return probe_; }
  uint64_t stats_lines() const { return stats_lines_; }

 private:
  void Line(const std::string& line) {
    if (line.rfind("READY ", 0) == 0) {
      ready_ = line;
    } else if (line.rfind("PROBE ", 0) == 0) {
      probe_ = line;
    } else if (line.rfind("STATS ", 0) == 0) {
      for (absl::string_view field : absl::StrSplit(line.substr(6), ' ')) {
        std::pair<std::string, std::string> kv = absl::StrSplit(field, '=');
        int64_t value = 0;
        if (absl::SimpleAtoi(kv.second, &value)) stats_[kv.first] = value;
      }
      ++stats_lines_;
    } else {
      Info("vmm-output", line);
    }
  }

  const int fd_;
  std::string buffer_;
  std::string ready_;
  std::string probe_;
  std::map<std::string, int64_t> stats_;
  uint64_t stats_lines_ = 0;
};

// DMAR fault reports in the kernel's log since the last call (/dev/kmsg, read without blocking).
class KernelLog {
 public:
  KernelLog() : fd_(::open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC)) {
    if (fd_ >= 0) ::lseek(fd_, 0, SEEK_END);
  }
  bool ok() const { return fd_ >= 0; }
  std::vector<std::string> DmarFaults() {
    std::vector<std::string> faults;
    char record[8192];
    for (;;) {
      const ssize_t n = ::read(fd_, record, sizeof(record) - 1);
      if (n < 0 && errno == EPIPE) continue;  // overwritten records: go on with the next
      if (n <= 0) break;
      record[n] = '\0';
      const std::string text(record);
      if (text.find("DMAR") != std::string::npos &&
          (text.find("fault") != std::string::npos || text.find("Fault") != std::string::npos)) {
        faults.push_back(text.substr(0, text.find('\n')));
      }
    }
    return faults;
  }

 private:
  int fd_;
};

pid_t StartAgent() {
  const int log = ::open(kAgentLog, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  const pid_t agent =
      Spawn({kAgent, "--backend=vfio-type1", absl::StrCat("--uds_path=", kSocket),
             absl::StrCat("--state_dir=", kStateDir), "--tcp_address=", "--metrics_address="},
            log);
  if (log >= 0) ::close(log);
  return agent;
}

// Lines of the agents' log (every agent of the run appends to it) that contain `text`.
int AgentLogCount(const std::string& text) {
  std::ifstream in(kAgentLog);
  std::string line;
  int count = 0;
  while (std::getline(in, line)) count += line.find(text) != std::string::npos;
  return count;
}

void PrintAgentLogTail(size_t lines) {
  std::ifstream in(kAgentLog);
  std::vector<std::string> all;
  std::string line;
  while (std::getline(in, line)) all.push_back(line);
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) {
    Info("agent-log", all[i]);
  }
}

// What the agent's locked_vm should be with the VMM's container served: its mlock of the guest
// RAM (memlock backend), the pin range mapping of it and every guest mapping (each vfio_dma
// charges its own pages: README, "Kernel vs spec" 2).
bool LockedAsRegistered(int64_t kb) {
  const int64_t base = 2 * kRamKb + kMappings * kMapKb;
  return kb == base || kb == base + kMapKb;  // + the churn range, when it is mapped
}

// Probes the kernel's container through `container_fd` without changing it: MAP_DMA with
// FLAG_VADDR answers EINVAL where a mapping with a valid address covers the IOVA, ENOENT where
// none does (only ever called while every address is valid: after the container was taken back).
int ProbeIova(int container_fd, uint64_t iova, uint64_t size) {
  struct vfio_iommu_type1_dma_map map = {};
  map.argsz = sizeof(map);
  map.flags = VFIO_DMA_MAP_FLAG_VADDR;
  map.vaddr = 0x1000;
  map.iova = iova;
  map.size = size;
  return ::ioctl(container_fd, VFIO_IOMMU_MAP_DMA, &map) == 0 ? 0 : errno;
}

struct Round {
  int number = 0;
  bool planned = false;
};

void Run(const EduDevice& edu_device) {
  MakeDirs("/run/dmapin");
  MakeDirs(kStateDir);
  MakeDirs("/tmp");
  KernelLog kmsg;
  Check(kmsg.ok(), "kmsg", "/dev/kmsg opened for DMAR fault reports");
  pid_t agent = StartAgent();
  if (!Check(agent > 0, "agent-start", absl::StrCat(kAgent, " pid ", agent))) return;

  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) {
    Check(false, "pipe", std::strerror(errno));
    return;
  }
  const pid_t vmm = Spawn(
      {kVmm, absl::StrCat("--uds_path=", kSocket), absl::StrCat("--vfio_group=", edu_device.group),
       absl::StrCat("--device=", edu_device.bdf)},
      out[1]);
  ::close(out[1]);
  VmmOutput output(out[0]);
  Clock::time_point t = Clock::now();
  bool ok = output.WaitFor([&] { return !output.ready().empty(); }, 180);
  ok = Check(ok, "vmm-ready",
             ok ? absl::StrFormat("after %.1f s: %s", SecondsSince(t), output.ready())
                : "no READY line in 180 s");
  std::vector<uint64_t> iovas;
  if (ok) {
    const size_t at = output.ready().find("iovas=");
    const std::string list = output.ready().substr(at + 6, output.ready().find(' ', at) - at - 6);
    for (absl::string_view text : absl::StrSplit(list, ',')) {
      uint64_t iova = 0;
      if (absl::SimpleHexAtoi(text, &iova)) iovas.push_back(iova);
    }
    ok = Check(iovas.size() == kMappings, "vmm-iovas", absl::StrCat(iovas.size(), " mappings"));
  }
  if (ok) {
    ok = output.WaitFor(
        [&] { return output.Stat("transfers") >= 20 && output.Stat("churn_ok") >= 2; }, 120);
    ok = Check(
        ok && output.Stat("failed") == 0, "vmm-transfers",
        absl::StrFormat("%d transfers, %d failed, %d churn maps/unmaps before the first "
                        "restart",
                        output.Stat("transfers"), output.Stat("failed"), output.Stat("churn_ok")));
  }
  const int container = ok ? DupFdOf(vmm, FdOf(vmm, "/dev/vfio/vfio")) : -1;
  if (ok) {
    ok = Check(
        container >= 0, "vmm-holds-container",
        absl::StrFormat("a duplicate of the VMM's container descriptor: fd %d here", container));
  }
  if (ok) {
    const int64_t kb = LockedKb(agent);
    Check(LockedAsRegistered(kb) && LockedKb(vmm) == 0, "agent-locked-vm",
          absl::StrFormat("agent VmLck %d kB (want %d or %d kB); VMM VmLck %d kB", kb,
                          2 * kRamKb + kMappings * kMapKb, 2 * kRamKb + (kMappings + 1) * kMapKb,
                          LockedKb(vmm)));
  }

  std::vector<Round> rounds;
  for (int i = 1; i <= kRounds; ++i) rounds.push_back({i, false});
  for (int i = 1; i <= kRounds; ++i) rounds.push_back({i, true});
  uint64_t transfers_while_down = 0;
  double longest_down = 0;
  for (const Round& round : rounds) {
    if (!ok) break;
    const std::string step =
        absl::StrFormat("%s-%d", round.planned ? "sigterm" : "kill9", round.number);
    output.Poll();
    const int64_t failed_before = output.Stat("failed");
    const int details_before = AgentLogCount("not as recorded: ");
    const int churn_details_before = AgentLogCount(kChurnIova);
    t = Clock::now();
    ::kill(agent, round.planned ? SIGTERM : SIGKILL);
    std::string how;
    const bool reaped = Reaped(agent, 30, &how);
    const std::string want = round.planned ? "exited with 0" : "killed by signal 9";
    if (!Check(reaped && how == want, step + "-agent-exit",
               reaped ? how : "did not exit in 30 s")) {
      ok = false;
      break;
    }
    // The device goes on while no agent runs (edu takes 100 ms per DMA: 200 ms per transfer).
    // A STATS line printed after the exit: what the old agent served is in it.
    uint64_t lines = output.stats_lines();
    output.WaitFor([&] { return output.stats_lines() > lines + 1; }, 2);
    const int64_t at_exit = output.Stat("transfers");
    const int64_t churn_before = output.Stat("churn_ok");
    SleepMs(700);
    output.Poll();
    const int64_t down = output.Stat("transfers") - at_exit;
    transfers_while_down += static_cast<uint64_t>(std::max<int64_t>(down, 0));
    Check(down > 0 && output.Stat("failed") == failed_before, step + "-dma-while-down",
          absl::StrFormat("%d transfers in 700 ms with no agent, %d failed", down,
                          output.Stat("failed") - failed_before));

    agent = StartAgent();
    // Back once the VMM's churn went through the new agent twice: its first map gave the
    // container back, and the GetNodeStatus after it (the churn asks after each op, before the
    // next) came from the new agent.
    const bool back = output.WaitFor(
        [&] { return output.Stat("churn_ok") >= churn_before + 2 && output.Stat("adopted") == 1; },
        60);
    const double seconds = SecondsSince(t);
    longest_down = std::max(longest_down, seconds);
    if (!Check(back, step + "-adopted",
               absl::StrFormat("the new agent (pid %d) took the container back and served the "
                               "VMM %.2f s after the old one was signalled",
                               agent, seconds))) {
      ok = false;
      break;
    }
    lines = output.stats_lines();
    output.WaitFor([&] { return output.stats_lines() > lines + 1; }, 2);  // a complete STATS line
    // What the new agent found not as recorded when it took the container back (each made
    // again): nothing after a planned exit (it drains its calls first); after a kill -9 at most
    // the churn range, when the kill caught its map or unmap between the kernel and the record.
    const int details = AgentLogCount("not as recorded: ") - details_before;
    const int churn_details = AgentLogCount(kChurnIova) - churn_details_before;
    const bool explained = round.planned ? details == 0 : details == churn_details;
    if (details > 0)
      Info(step + "-repaired", absl::StrCat(details, " not as recorded, in the log"));
    Check(
        output.Stat("failed") == failed_before && output.Stat("inconsistencies") == details &&
            explained && output.Stat("vfio_inconsistencies") == 0 && output.Stat("awaiting") == 0 &&
            output.Stat("churn_errors") == 0,
        step + "-consistent",
        absl::StrFormat("failed transfers %d, adoption inconsistencies %d (%d of the churn "
                        "range), vfio inconsistencies %d, awaiting %d, churn errors %d; "
                        "installed entries %d",
                        output.Stat("failed") - failed_before, output.Stat("inconsistencies"),
                        churn_details, output.Stat("vfio_inconsistencies"), output.Stat("awaiting"),
                        output.Stat("churn_errors"), output.Stat("entries")));
    const int64_t kb = LockedKb(agent);
    Check(LockedAsRegistered(kb), step + "-locked-vm",
          absl::StrFormat("new agent VmLck %d kB: every pin is charged to it again", kb));
    std::string probes;
    bool present = true;
    for (uint64_t iova : iovas) {
      const int err = ProbeIova(container, iova, kMapKb * 1024);
      present = present && err == EINVAL;
      absl::StrAppend(&probes, absl::StrFormat("0x%x:%s ", iova, Errno(err)));
    }
    const int never = ProbeIova(container, kNeverMapped, kMapKb * 1024);
    Check(present && never == ENOENT, step + "-kernel-mappings",
          absl::StrFormat("%s; never mapped 0x%x:%s", probes, kNeverMapped, Errno(never)));
    const std::vector<std::string> faults = kmsg.DmarFaults();
    Check(faults.empty(), step + "-no-dmar-fault",
          faults.empty() ? "none in the kernel log" : faults.front());
  }
  if (ok) {
    output.Poll();
    Check(output.Stat("failed") == 0, "all-transfers",
          absl::StrFormat("%d transfers, %d failed, %d while no agent ran; %d agent restarts, "
                          "the longest until served again %.2f s",
                          output.Stat("transfers"), output.Stat("failed"), transfers_while_down,
                          rounds.size(), longest_down));
  }
  if (container >= 0) ::close(container);
  // The fault check can fail: a DMA to an IOVA nobody mapped is a DMAR fault in the kernel's log.
  if (ok) {
    ::kill(vmm, SIGUSR1);
    const bool probed = output.WaitFor([&] { return !output.probe().empty(); }, 10);
    std::vector<std::string> faults;
    const Clock::time_point start = Clock::now();
    while (probed && faults.empty() && SecondsSince(start) < 5) {
      SleepMs(100);
      faults = kmsg.DmarFaults();
    }
    Check(probed && !faults.empty(), "dmar-fault-seen",
          absl::StrFormat("%s; the kernel log: %s", probed ? output.probe() : "no PROBE line",
                          faults.empty() ? "no DMAR fault" : faults.front()));
    output.Poll();
    Check(output.Stat("failed") == 0, "probe-not-a-transfer",
          absl::StrFormat("%d failed transfers", output.Stat("failed")));
  }

  // The VMM exits while the agent is down: its descriptors close, the kernel drops the
  // container, and the restarted agent tears its context down.
  if (ok) {
    ::kill(agent, SIGKILL);
    std::string how;
    Reaped(agent, 30, &how);
    ::kill(vmm, SIGKILL);
    ::waitpid(vmm, nullptr, 0);
    ::close(out[0]);
    const int serving = AgentLogCount("serving on unix:");
    const int torn_down = AgentLogCount("exited while the agent was down; torn down");
    agent = StartAgent();
    t = Clock::now();
    while (AgentLogCount("serving on unix:") == serving && SecondsSince(t) < 60 && Running(agent)) {
      SleepMs(100);
    }
    const bool up = AgentLogCount("serving on unix:") > serving;
    const int64_t kb = LockedKb(agent);
    Check(up && kb == 0 && AgentLogCount("exited while the agent was down; torn down") > torn_down,
          "vmm-exit-while-down-unpins",
          absl::StrFormat("the restarted agent serves after %.1f s, tore the VMM's context down "
                          "at recovery, and has VmLck %d kB",
                          SecondsSince(t), kb));
    const int again = ::open(edu_device.group.c_str(), O_RDWR | O_CLOEXEC);
    const int err = errno;
    Check(again >= 0, "vmm-exit-while-down-group-free",
          again >= 0 ? absl::StrCat(edu_device.group, " opens here: the container is gone")
                     : absl::StrCat("open: ", Errno(err)));
    if (again >= 0) ::close(again);
    const std::vector<std::string> faults = kmsg.DmarFaults();
    Check(faults.empty(), "no-dmar-fault", faults.empty() ? "none" : faults.front());
  } else if (vmm > 0) {
    ::kill(vmm, SIGKILL);
    ::waitpid(vmm, nullptr, 0);
  }

  CheckGracefulStop(agent);
  PrintAgentLogTail(Failed() > 0 ? 200 : 30);
}

int Main(int argc, char** argv) {
  const bool init = ::getpid() == 1;
  if (init) Boot();
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  SetMode("restart");
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
