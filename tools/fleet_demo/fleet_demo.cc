// fleet_demo: a local dmapin fleet on 127.0.0.1, for `./run demo`.
//
// Starts dmapin-server and --nodes dmapin-agent processes (sim backend; node-1 and node-2 in pool
// a, the others in pool b), each agent with its own state directory, Unix socket, TCP port and
// metrics port, all reporting to the server. Then, like a fleet operator and the VMMs would:
//  - on every node a VMM creates memory contexts vm-1 and vm-2 and a VFIO container for each,
//    over the agent's Unix socket;
//  - policies are applied through dmapin.v1.Admin/SetPolicy (pool-a: a pinned-bytes budget,
//    a region cap per node, tenant=blocked denied);
//  - registrations are requested through Admin/CreateIntent; one asks for more than pool-a's
//    budget has left (RESOURCE_EXHAUSTED) and one comes from tenant=blocked (PERMISSION_DENIED);
//  - one simulated VMM thread per node maps and unmaps random pages of its registered regions
//    (MapDma/UnmapDma over the Unix socket);
//  - every few seconds an UNREGISTER intent hits a region the VMM still has mapped: the agent
//    answers EBUSY, the server retries with backoff, and once the VMM unmaps (a hot-unplug) the
//    intent is satisfied; the region is then registered again.
// Every --interval seconds it prints a table of the nodes from Admin/ListNodes and the intents by
// state. It runs for --duration seconds (0: until Ctrl-C or SIGTERM), then stops the processes
// with SIGTERM and exits 0. It exits 1 when something fails to start or a process dies.
//
// --backend=memlock (root only) pins real memory: the agents run the memlock backend and the
// simulated VMMs are replaced by one dmapin-reference-vmm process per node (memfd guest RAM
// attached over the memory socket, its own context and container, a DMA workload on a
// DmaSession). The demo is not their owner: it reads their contexts (open reads), asks the server
// for a registration inside each VMM's guest RAM, shows the policy refusals, kills one VMM with
// SIGKILL to show the agent's cleanup and the server's "vmm_exited" event, and at the end stops
// the others with SIGTERM and prints their summary lines. There is no EBUSY demonstration then:
// the demo cannot make a real VMM unmap on command.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/flags.h"
#include "common/tls_credentials.h"
#include "dmapin/v1/admin.grpc.pb.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "testing/agent_process.h"

ABSL_FLAG(std::string, agent_binary, "",
          "The dmapin-agent executable (default: the one in this binary's runfiles, or beside it "
          "in bazel-bin).");
ABSL_FLAG(std::string, server_binary, "",
          "The dmapin-server executable (default: the one in this binary's runfiles, or beside "
          "it in bazel-bin).");
ABSL_FLAG(std::string, make_dev_certs, "",
          "tools/certs/make_dev_certs.sh, which makes the fleet's CA and certificates with "
          "openssl (default: the one in this binary's runfiles). Not used with --insecure, which "
          "runs the whole fleet plaintext.");
ABSL_FLAG(int, nodes, 3, "Number of node agents, 1 to 9 (node-1 and node-2 are pool=a).");
ABSL_FLAG(int, base_port, 7470,
          "Port base on 127.0.0.1: the server's gRPC port is base+10 (7480), the agents' TCP "
          "ports base+1.. (7471..), each metrics port its gRPC port + 2000 (9480, 9471..). Change "
          "it when those ports are taken.");
ABSL_FLAG(int, server_port, 0, "The server's gRPC port (0: --base_port + 10, i.e. 7480).");
ABSL_FLAG(int, server_metrics_port, 0,
          "The server's metrics port (0: the server's gRPC port + 2000, i.e. 9480).");
ABSL_FLAG(std::string, state_dir, "",
          "Directory for the server's and agents' state, sockets and logs, kept afterwards "
          "(default: a fresh directory under /tmp, removed at exit).");
ABSL_FLAG(double, duration, 0,
          "Seconds the workload runs before everything is stopped (0: until Ctrl-C or SIGTERM).");
ABSL_FLAG(double, interval, 2, "Seconds between two tables.");
ABSL_FLAG(double, ebusy_period, 5,
          "Seconds between two EBUSY demonstrations (an UNREGISTER of a mapped region); 0: none.");
ABSL_FLAG(int, vmm_ops_per_sec, 200,
          "MapDma/UnmapDma calls per second of each simulated VMM (0: as fast as possible).");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the VMMs' random choices.");
ABSL_FLAG(std::string, backend, "sim",
          "The agents' backend: sim (simulated VMMs in this process) or memlock (pins real "
          "memory, needs root: one dmapin-reference-vmm process per node).");
ABSL_FLAG(std::string, reference_vmm_binary, "",
          "--backend=memlock: the dmapin-reference-vmm executable (default: the one in this "
          "binary's runfiles, or beside it in bazel-bin).");
ABSL_FLAG(double, kill_vmm_at, -1,
          "--backend=memlock: seconds into the workload when one VMM is killed with SIGKILL "
          "(-1: at 2/3 of --duration, or after 10 s without one; 0: never).");

namespace dmapin {
namespace {

using harness::AgentProcess;
using harness::AgentProcessOptions;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;
constexpr absl::Duration kRpcTimeout = absl::Seconds(5);
constexpr absl::Duration kIntentTimeout = absl::Seconds(20);
// Where each VM's guest RAM sits in its (simulated) address space.
constexpr uint64_t kVm1Base = uint64_t{4} << 30;
constexpr uint64_t kVm2Base = uint64_t{8} << 30;
// The VMMs' IOVA slots per container; each mapping covers 1..kMaxMapPages pages of one slot.
constexpr int kSlotsPerContainer = 64;
constexpr uint64_t kMaxMapPages = 4;
// pool-a's policy.
constexpr uint64_t kPoolABudget = 512 * kMiB;
constexpr uint64_t kPoolAMaxRegions = 8;
// How long an UNREGISTER keeps hitting EBUSY before the VMM unmaps.
constexpr absl::Duration kEbusyHold = absl::Seconds(2);
// --backend=memlock: each reference VMM's guest RAM and DMA mapping size, and pool-a's budget
// (two VMMs' RAM and a half of another's fit; the refusal asks for more).
constexpr uint64_t kVmmGuestRam = 64 * kMiB;
constexpr uint64_t kVmmMapBytes = 64 * 1024;
constexpr uint64_t kMemlockPoolABudget = 160 * kMiB;
constexpr uint64_t kMemlockPoolBBudget = 256 * kMiB;

// --- Output ------------------------------------------------------------------------------------

absl::Mutex print_mutex;
absl::Time demo_start = absl::Now();

void Say(const std::string& line) {
  absl::MutexLock lock(&print_mutex);
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

// "[  4.0s] " since the workload started.
std::string Stamp() {
  return absl::StrFormat("[%5.1fs] ", absl::ToDoubleSeconds(absl::Now() - demo_start));
}

std::string Human(uint64_t bytes) {
  if (bytes == 0) return "0";
  if (bytes < kMiB) return absl::StrFormat("%.0fK", bytes / 1024.0);
  if (bytes < kGiB) return absl::StrFormat("%.1fM", bytes / static_cast<double>(kMiB));
  return absl::StrFormat("%.2fG", bytes / static_cast<double>(kGiB));
}

std::string Hex(uint64_t value) { return absl::StrFormat("0x%x", value); }

std::string StateName(v1::IntentState state) {
  return std::string(absl::StripPrefix(v1::IntentState_Name(state), "INTENT_STATE_"));
}

std::string Describe(const grpc::Status& status) {
  static const char* const kCodes[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int code = status.error_code();
  const std::string name = code >= 0 && code < 17 ? kCodes[code] : absl::StrCat("code ", code);
  if (status.ok()) return name;
  return absl::StrCat(name, ": ", status.error_message());
}

std::unique_ptr<grpc::ClientContext> Call() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(kRpcTimeout));
  return context;
}

std::string DescribeWait(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exit status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return absl::StrFormat("killed by signal %d (%s)", WTERMSIG(status),
                           strsignal(WTERMSIG(status)));
  }
  return absl::StrCat("wait status ", status);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// --- Reference VMM processes (--backend=memlock) -----------------------------------------------

// A dmapin-reference-vmm child: stdout (its summary line) and stderr go to files. Killed with
// SIGKILL by the destructor if it still runs.
class VmmChild {
 public:
  static absl::StatusOr<std::unique_ptr<VmmChild>> Spawn(std::vector<std::string> argv,
                                                         std::string out_path,
                                                         std::string log_path) {
    // After fork() only async-signal-safe calls: everything is prepared here.
    std::vector<char*> args;
    for (std::string& arg : argv) args.push_back(arg.data());
    args.push_back(nullptr);
    const int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) return absl::InternalError(absl::StrCat("open ", out_path, ": ", strerror(errno)));
    const int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log < 0) {
      close(out);
      return absl::InternalError(absl::StrCat("open ", log_path, ": ", strerror(errno)));
    }
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid == 0) {
      // Never outlive the demo; SIGTERM is blocked here (sigtimedwait), not in the VMM. Niced:
      // the reference VMM has no rate limit, and the demo, server and agents come first.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      setpriority(PRIO_PROCESS, 0, 10);
      dup2(out, STDOUT_FILENO);
      dup2(log, STDERR_FILENO);
      execv(args[0], args.data());
      static constexpr char kExecFailed[] = "fleet_demo: execv failed\n";
      (void)!write(STDERR_FILENO, kExecFailed, sizeof(kExecFailed) - 1);
      _exit(127);
    }
    const int fork_errno = errno;
    close(out);
    close(log);
    if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", strerror(fork_errno)));
    return std::unique_ptr<VmmChild>(new VmmChild(pid, std::move(out_path), std::move(log_path)));
  }

  VmmChild(const VmmChild&) = delete;
  VmmChild& operator=(const VmmChild&) = delete;
  ~VmmChild() {
    if (!Exited()) {
      kill(pid_, SIGKILL);
      Wait(absl::InfiniteDuration());
    }
  }

  pid_t pid() const { return pid_; }
  // Reaps without blocking; true once it has exited (status() is then set).
  bool Exited() {
    if (status_.has_value()) return true;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) status_ = status;
    return status_.has_value();
  }
  // Waits up to `timeout` for the exit; true when it exited.
  bool Wait(absl::Duration timeout) {
    const absl::Time end = absl::Now() + timeout;
    while (!Exited()) {
      if (absl::Now() >= end) return false;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return true;
  }
  void Signal(int signo) {
    if (!Exited()) kill(pid_, signo);
  }
  std::optional<int> status() const { return status_; }
  std::string Output() const { return ReadFile(out_path_); }
  std::string LogTail(size_t max_bytes = 2000) const {
    const std::string log = ReadFile(log_path_);
    return log.size() > max_bytes ? log.substr(log.size() - max_bytes) : log;
  }

 private:
  VmmChild(pid_t pid, std::string out_path, std::string log_path)
      : pid_(pid), out_path_(std::move(out_path)), log_path_(std::move(log_path)) {}

  const pid_t pid_;
  const std::string out_path_;
  const std::string log_path_;
  std::optional<int> status_;
};

// --- The fleet's parts -------------------------------------------------------------------------

enum RegionState : int {
  // Registered; the VMM maps and unmaps pages in it.
  kActive = 0,
  // An UNREGISTER is pending: the VMM keeps its mappings there (DMA in flight) and adds none.
  kHeld = 1,
  // The VMM is asked to unmap everything in it (the hot-unplug completes).
  kEvacuate = 2,
  // Unmapped by the VMM; not to be used until registered again.
  kGone = 3,
};

struct DemoRegion {
  std::string context;
  std::string container;
  uint64_t ua = 0;
  uint64_t size = 0;
  std::atomic<int> state{kGone};
  // Pages the VMM has mapped in it.
  std::atomic<int64_t> mapped_pages{0};
  // When the VMM finished unmapping it (absl::ToUnixNanos).
  std::atomic<int64_t> evacuated_at{0};
};

struct Slot {
  DemoRegion* region = nullptr;  // null: the slot is not mapped
  uint64_t pages = 0;
};

struct DemoContainer {
  std::string name;
  std::string context;
  std::vector<DemoRegion*> regions;
  std::vector<Slot> slots;  // owned by the VMM thread
};

struct DemoNode {
  std::string name;
  std::string pool;
  int tcp_port = 0;
  int metrics_port = 0;
  std::string dir;
  std::string uds;
  std::unique_ptr<AgentProcess> process;
  std::unique_ptr<v1::NodeAgent::Stub> vmm;  // over the Unix socket
  uint64_t page_size = 65536;
  std::vector<std::unique_ptr<DemoRegion>> regions;
  std::vector<DemoContainer> containers;

  std::atomic<uint64_t> maps{0};
  std::atomic<uint64_t> unmaps{0};
  std::atomic<uint64_t> errors{0};
  absl::Mutex error_mutex;
  std::string last_error ABSL_GUARDED_BY(error_mutex);

  // --backend=memlock: the node's reference VMM, its context as the agent reports it (the VMM's
  // own addresses), the second container the demo creates in it, the fleet's intent there.
  std::unique_ptr<VmmChild> ref_vmm;
  std::string vmm_context;
  uint64_t ram_ua = 0;
  uint64_t ram_bytes = 0;
  std::string fleet_container;
  std::string fleet_intent;
  bool vmm_killed = false;
  uint64_t last_dma_calls = 0;  // the agent's maps_ok + unmaps at the last table
};

struct RegionSpec {
  const char* context;
  uint64_t ua;
  uint64_t size;
};

// What each node registers: node-1 and pool b nodes 320 MiB, node-2 160 MiB (pool-a: 480 MiB of
// its 512 MiB budget).
std::vector<RegionSpec> RegionsOf(int index) {
  if (index == 1) {
    return {{"vm-1", kVm1Base, 64 * kMiB},
            {"vm-1", kVm1Base + 64 * kMiB, 64 * kMiB},
            {"vm-2", kVm2Base, 32 * kMiB}};
  }
  return {{"vm-1", kVm1Base, 128 * kMiB},
          {"vm-1", kVm1Base + 128 * kMiB, 128 * kMiB},
          {"vm-2", kVm2Base, 64 * kMiB}};
}

std::string ContainerOf(absl::string_view context) { return absl::StrCat(context, "/vfio-0"); }

// --- Finding the binaries ----------------------------------------------------------------------

// `relative` ("agent/dmapin-agent") from the runfiles of this binary, for `bazel run` and for
// running bazel-bin/tools/fleet_demo/fleet_demo directly (from any directory), else beside it in
// bazel-bin. Empty when none is there.
std::string FindBinary(const std::string& flag, absl::string_view relative, const char* argv0) {
  if (!flag.empty()) return flag;
  std::vector<std::string> candidates;
  if (const char* runfiles = std::getenv("RUNFILES_DIR"); runfiles != nullptr && *runfiles) {
    candidates.push_back(absl::StrCat(runfiles, "/dmapin/", relative));
  }
  std::error_code error;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  if (!error) {
    candidates.push_back(absl::StrCat(self.string(), ".runfiles/dmapin/", relative));
  }
  candidates.push_back(absl::StrCat(argv0, ".runfiles/dmapin/", relative));
  candidates.push_back(std::string(relative));  // the cwd of `bazel run`: the runfiles tree
  if (!error) {
    // bazel-bin/tools/fleet_demo/fleet_demo -> bazel-bin/agent/dmapin-agent
    candidates.push_back(
        (self.parent_path().parent_path().parent_path() / std::string(relative)).string());
  }
  for (const std::string& candidate : candidates) {
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// Whether 127.0.0.1:port can be bound right now (as the gRPC and HTTP servers will, with
// SO_REUSEADDR).
bool PortFree(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return true;  // let the server report it
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in address = {};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(static_cast<uint16_t>(port));
  const bool free = bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  close(fd);
  return free;
}

// --- The demo ----------------------------------------------------------------------------------

class FleetDemo {
 public:
  FleetDemo(std::string agent_binary, std::string server_binary, std::string vmm_binary,
            std::string backend, std::string make_certs)
      : agent_binary_(std::move(agent_binary)),
        server_binary_(std::move(server_binary)),
        vmm_binary_(std::move(vmm_binary)),
        backend_(std::move(backend)),
        memlock_(backend_ == "memlock"),
        pool_a_budget_(memlock_ ? kMemlockPoolABudget : kPoolABudget),
        pool_b_budget_(memlock_ ? kMemlockPoolBBudget : kGiB),
        make_certs_(std::move(make_certs)),
        insecure_(InsecureFlag()) {}

  // Everything; the exit status.
  int Run(const sigset_t& signals);

 private:
  absl::Status PreparePorts();
  absl::Status PrepareDirs();
  // Secure by default: a CA and certificates for the server, every node, an admin and a viewer
  // (make_dev_certs.sh), in root_/certs.
  absl::Status MakeCertificates();
  // The --tls_* flags of a process whose certificate is certs_/<name>.pem, or --insecure.
  std::vector<std::string> TlsFlags(absl::string_view name) const;
  // Channel credentials of the certificate certs_/<name>.pem (nullptr with --insecure).
  std::shared_ptr<grpc::ChannelCredentials> CredentialsOf(absl::string_view name) const;
  absl::Status StartServer();
  absl::Status StartAgent(DemoNode& node);
  absl::Status AwaitConnected();
  void PrintBanner();
  absl::Status SetUpNode(DemoNode& node);
  absl::Status ApplyPolicies();
  absl::Status RequestRegistrations();

  grpc::Status CreateIntent(v1::IntentKind kind, const std::string& node, const DemoRegion& region,
                            const std::map<std::string, std::string>& labels,
                            v1::CreateIntentResponse* response);
  std::optional<v1::Intent> GetIntent(const std::string& id);
  // Polls the intent until its state is one of `states`, the timeout passes or the demo stops;
  // the last state seen.
  std::optional<v1::Intent> AwaitIntent(const std::string& id,
                                        const std::vector<v1::IntentState>& states,
                                        absl::Duration timeout);

  // Polls the agent's ListRegions until `region` is there for its container (at most 10 s).
  bool AwaitHeldByAgent(DemoNode& node, const DemoRegion& region);

  void RunVmm(DemoNode& node, uint64_t seed);
  bool Map(DemoNode& node, DemoContainer& container, int slot, DemoRegion* region, uint64_t ua,
           uint64_t pages);
  void Unmap(DemoNode& node, DemoContainer& container, int slot);
  void NoteError(DemoNode& node, absl::string_view what, const grpc::Status& status);

  void RunOperator();
  // One UNREGISTER of a mapped region, through EBUSY, then its registration again.
  void EbusyCycle(DemoNode& node, DemoRegion& region);

  void PrintTable(absl::Duration window);

  // --backend=memlock.
  // Starts the node's reference VMM and reads its context once it has registered its RAM.
  absl::Status StartVmm(DemoNode& node, int index);
  // The fleet's registration inside each VMM's guest RAM, and the two refusals.
  absl::Status RequestVmmRegistrations();
  void PrintVmmTable(absl::Duration window);
  // SIGKILL to the last node's VMM; shows the agent's cleanup and the server's event.
  void KillOneVmm();
  // UNREGISTER intents for the fleet's registrations in the VMMs still running: otherwise they
  // would see the regions go with the VMMs' own cleanup and fail when sent again.
  void WithdrawRegistrations();
  // SIGTERM to the VMMs still running; prints their summaries. True when all exited with 0.
  bool StopVmms();
  // Collects the server's "vmm_exited" events (WatchEvents) until watch_context_ is cancelled.
  void WatchEvents();
  // OK while the server and every agent run.
  absl::Status CheckProcesses();
  // SIGTERM to the agents, then the server; true when all exited cleanly.
  bool StopProcesses();

  bool Stopping() const { return stop_.HasBeenNotified(); }
  // Sleeps `duration`; false when the demo stops meanwhile.
  bool Sleep(absl::Duration duration) { return !stop_.WaitForNotificationWithTimeout(duration); }

  const std::string agent_binary_;
  const std::string server_binary_;
  const std::string vmm_binary_;
  const std::string backend_;
  const bool memlock_;
  const uint64_t pool_a_budget_;
  const uint64_t pool_b_budget_;
  int server_port_ = 0;
  int server_metrics_port_ = 0;
  std::string root_;
  const std::string make_certs_;
  const bool insecure_;
  std::string certs_;                             // root_/certs
  std::unique_ptr<harness::ScratchDir> scratch_;  // when no --state_dir was given
  std::unique_ptr<AgentProcess> server_;
  std::unique_ptr<v1::Admin::Stub> admin_;
  std::vector<std::unique_ptr<DemoNode>> nodes_;
  absl::Notification stop_;
  std::atomic<int> ebusy_started_{0};
  std::atomic<int> ebusy_completed_{0};
  // For the rates in the table.
  std::vector<uint64_t> last_ops_;
  // --backend=memlock: the WatchEvents stream and the "vmm_exited" events it brought.
  std::unique_ptr<grpc::ClientContext> watch_context_;
  absl::Mutex events_mutex_;
  std::vector<v1::Event> vmm_exits_ ABSL_GUARDED_BY(events_mutex_);
};

absl::Status FleetDemo::PreparePorts() {
  const int base = absl::GetFlag(FLAGS_base_port);
  const int count = absl::GetFlag(FLAGS_nodes);
  if (count < 1 || count > 9) return absl::InvalidArgumentError("--nodes must be 1 to 9");
  server_port_ = absl::GetFlag(FLAGS_server_port);
  if (server_port_ == 0) server_port_ = base + 10;
  server_metrics_port_ = absl::GetFlag(FLAGS_server_metrics_port);
  if (server_metrics_port_ == 0) server_metrics_port_ = server_port_ + 2000;
  std::vector<std::pair<int, std::string>> ports = {
      {server_port_, "dmapin-server gRPC (--server_port)"},
      {server_metrics_port_, "dmapin-server metrics (--server_metrics_port)"}};
  for (int i = 0; i < count; ++i) {
    auto node = std::make_unique<DemoNode>();
    node->name = absl::StrCat("node-", i + 1);
    node->pool = i < 2 ? "a" : "b";
    node->tcp_port = base + 1 + i;
    node->metrics_port = node->tcp_port + 2000;
    ports.emplace_back(node->tcp_port, absl::StrCat(node->name, " gRPC"));
    ports.emplace_back(node->metrics_port, absl::StrCat(node->name, " metrics"));
    nodes_.push_back(std::move(node));
  }
  std::vector<std::string> taken;
  for (const auto& [port, what] : ports) {
    if (port <= 0 || port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("port ", port, " for ", what, " is out of range; check --base_port"));
    }
    if (!PortFree(port)) taken.push_back(absl::StrCat(port, " (", what, ")"));
  }
  if (!taken.empty()) {
    return absl::UnavailableError(absl::StrCat(
        "127.0.0.1 port(s) already in use: ", absl::StrJoin(taken, ", "),
        ". Is another fleet demo or dmapin process running? Pick other ports with --base_port, "
        "e.g. --base_port=",
        base + 100, " (server gRPC on ", base + 110, ")"));
  }
  return absl::OkStatus();
}

absl::Status FleetDemo::PrepareDirs() {
  const std::string flag = absl::GetFlag(FLAGS_state_dir);
  if (flag.empty()) {
    absl::StatusOr<std::unique_ptr<harness::ScratchDir>> dir =
        harness::ScratchDir::Create("dmapin-fleet-");
    if (!dir.ok()) return dir.status();
    scratch_ = std::move(*dir);
    root_ = scratch_->path();
  } else {
    std::error_code error;
    root_ = std::filesystem::absolute(flag, error).string();
    if (error) root_ = flag;
  }
  std::vector<std::string> dirs = {root_ + "/server"};
  for (auto& node : nodes_) {
    node->dir = absl::StrCat(root_, "/", node->name);
    node->uds = node->dir + "/agent.sock";
    dirs.push_back(node->dir);
    // sockaddr_un.sun_path holds 108 bytes with the NUL.
    if (node->uds.size() > 107) {
      return absl::InvalidArgumentError(absl::StrCat("the Unix socket path ", node->uds,
                                                     " is too long; use a shorter --state_dir"));
    }
  }
  for (const std::string& dir : dirs) {
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    if (error) return absl::InternalError(absl::StrCat("mkdir ", dir, ": ", error.message()));
  }
  return absl::OkStatus();
}

absl::Status FleetDemo::MakeCertificates() {
  certs_ = root_ + "/certs";
  if (insecure_) return absl::OkStatus();
  if (make_certs_.empty()) {
    return absl::NotFoundError(
        "tools/certs/make_dev_certs.sh not found: pass --make_dev_certs, or --insecure to run "
        "the fleet plaintext");
  }
  std::string command = absl::StrCat("'", make_certs_, "' '", certs_, "'");
  for (const auto& node : nodes_) absl::StrAppend(&command, " ", node->name);
  absl::StrAppend(&command, " > '", root_, "/certs.log' 2>&1");
  if (const int status = std::system(command.c_str()); status != 0) {
    return absl::InternalError(absl::StrCat("making the fleet's certificates failed (", command,
                                            ", status ", status, ")"));
  }
  return absl::OkStatus();
}

std::vector<std::string> FleetDemo::TlsFlags(absl::string_view name) const {
  if (insecure_) return {"--insecure"};
  return {absl::StrCat("--tls_cert_file=", certs_, "/", name, ".pem"),
          absl::StrCat("--tls_key_file=", certs_, "/", name, ".key"),
          absl::StrCat("--tls_ca_file=", certs_, "/ca.pem")};
}

std::shared_ptr<grpc::ChannelCredentials> FleetDemo::CredentialsOf(absl::string_view name) const {
  if (insecure_) return nullptr;
  return ChannelCredentialsFor(
      TransportSecurity{.cert_file = absl::StrCat(certs_, "/", name, ".pem"),
                        .key_file = absl::StrCat(certs_, "/", name, ".key"),
                        .ca_file = certs_ + "/ca.pem"});
}

absl::Status FleetDemo::StartServer() {
  std::vector<std::string> args = {
      absl::StrCat("--grpc_address=127.0.0.1:", server_port_),
      absl::StrCat("--metrics_address=127.0.0.1:", server_metrics_port_),
      "--state_dir=" + root_ + "/server/state", "--report_interval_ms=500",
      "--reconcile_interval_ms=20"};
  for (std::string& flag : TlsFlags("server")) args.push_back(std::move(flag));
  absl::StatusOr<std::unique_ptr<AgentProcess>> server =
      AgentProcess::Start({.binary = server_binary_,
                           .args = std::move(args),
                           .log_path = root_ + "/server/server.log",
                           .tcp = true,
                           .insecure = insecure_,
                           .credentials = CredentialsOf("admin")});
  if (!server.ok()) {
    return absl::Status(server.status().code(),
                        absl::StrCat("dmapin-server (", server_binary_,
                                     ") did not start: ", server.status().message()));
  }
  server_ = std::move(*server);
  admin_ = v1::Admin::NewStub(harness::MakeChannel(server_->tcp_target(), CredentialsOf("admin")));
  return absl::OkStatus();
}

absl::Status FleetDemo::StartAgent(DemoNode& node) {
  std::vector<std::string> args = {"--node_name=" + node.name,
                                   "--node_labels=pool=" + node.pool,
                                   absl::StrCat("--server=127.0.0.1:", server_port_),
                                   "--report_interval_ms=500",
                                   "--backend=" + backend_,
                                   "--state_dir=" + node.dir + "/state",
                                   "--uds_path=" + node.uds,
                                   absl::StrCat("--tcp_address=127.0.0.1:", node.tcp_port),
                                   absl::StrCat("--metrics_address=127.0.0.1:", node.metrics_port)};
  for (std::string& flag : TlsFlags(node.name)) args.push_back(std::move(flag));
  absl::StatusOr<std::unique_ptr<AgentProcess>> process =
      AgentProcess::Start({.binary = agent_binary_,
                           .args = std::move(args),
                           .log_path = node.dir + "/agent.log",
                           .uds_path = node.uds,
                           .tcp = true,
                           .insecure = insecure_});
  if (!process.ok()) {
    return absl::Status(process.status().code(),
                        absl::StrCat("dmapin-agent ", node.name, " (", agent_binary_,
                                     ") did not start: ", process.status().message()));
  }
  node.process = std::move(*process);
  node.vmm = v1::NodeAgent::NewStub(harness::MakeChannel(node.process->uds_target()));
  return absl::OkStatus();
}

absl::Status FleetDemo::AwaitConnected() {
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  size_t connected = 0;
  while (absl::Now() < deadline) {
    v1::ListNodesResponse response;
    if (admin_->ListNodes(Call().get(), {}, &response).ok()) {
      connected = 0;
      for (const v1::Node& node : response.nodes()) {
        connected += node.connection() == v1::CONNECTION_STATE_CONNECTED;
      }
      if (connected >= nodes_.size()) return absl::OkStatus();
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "only ", connected, " of ", nodes_.size(),
      " agents connected to the server within 20 s; the server's log ends:\n", server_->LogTail()));
}

void FleetDemo::PrintBanner() {
  const std::string server = absl::StrCat("127.0.0.1:", server_port_);
  const DemoNode& first = *nodes_.front();
  const DemoNode& last = *nodes_.back();
  const std::string agent = absl::StrCat("127.0.0.1:", first.tcp_port);
  std::vector<std::string> lines;
  lines.push_back(absl::StrFormat(
      "dmapin local fleet: 1 server + %d agents (%s backend) on 127.0.0.1; state and logs in %s%s",
      nodes_.size(), backend_, root_,
      scratch_ != nullptr ? " (removed at exit; --state_dir keeps them)" : ""));
  lines.push_back(absl::StrFormat("  %-8s pid %-7d gRPC %-16s metrics http://127.0.0.1:%d/metrics",
                                  "server", server_->pid(), server, server_metrics_port_));
  for (const auto& node : nodes_) {
    lines.push_back(absl::StrFormat(
        "  %-8s pid %-7d gRPC 127.0.0.1:%-6d metrics http://127.0.0.1:%d/metrics  pool=%s  %s",
        node->name, node->process->pid(), node->tcp_port, node->metrics_port, node->pool,
        node->process->uds_target()));
  }
  if (insecure_) {
    lines.push_back("PLAINTEXT (--insecure): no TLS, no authentication, no authorization");
  } else {
    lines.push_back(absl::StrFormat(
        "mutual TLS: CA and certificates (server, %s, admin, viewer) in %s; the server and the "
        "agents refuse callers without one",
        absl::StrJoin(nodes_, ", ",
                      [](std::string* out, const auto& node) { out->append(node->name); }),
        certs_));
  }
  lines.push_back("Try while it runs (grpcurl uses the servers' reflection):");
  const std::string g =
      insecure_
          ? std::string("  grpcurl -plaintext ")
          : absl::StrFormat("  grpcurl -cacert %s/ca.pem -cert %s/admin.pem -key %s/admin.key ",
                            certs_, certs_, certs_);
  lines.push_back(absl::StrCat(g, server, " list"));
  lines.push_back(absl::StrCat(g, server, " describe dmapin.v1.Admin"));
  lines.push_back(absl::StrCat(g, server, " dmapin.v1.Admin/ListNodes"));
  lines.push_back(absl::StrCat(g, "-d '{\"state\":\"INTENT_STATE_RETRYING\"}' ", server,
                               " dmapin.v1.Admin/ListIntents"));
  lines.push_back(absl::StrCat(
      g,
      "-d '{\"policy\":{\"name\":\"pool-b\",\"node_selector\":{\"pool\":\"b\"},"
      "\"pinned_bytes_budget\":\"",
      2 * kGiB, "\",\"max_regions_per_node\":\"16\"}}' ", server, " dmapin.v1.Admin/SetPolicy"));
  if (memlock_) {
    // The reference VMMs' contexts: open reads, over TCP too.
    lines.push_back(absl::StrCat(g, agent, " dmapin.v1.NodeAgent/ListContexts"));
    lines.push_back(
        absl::StrCat(g, "-d '{\"name\":\"vmm-1\"}' ", agent, " dmapin.v1.NodeAgent/GetContext"));
  } else {
    lines.push_back(absl::StrCat(g, "-d '{\"kind\":\"INTENT_KIND_REGISTER\",\"node\":\"", last.name,
                                 "\",\"context\":\"vm-2\",\"container\":\"vm-2/vfio-0\",\"ua\":\"",
                                 kVm2Base + 256 * kMiB, "\",\"size\":\"", 16 * kMiB,
                                 "\",\"labels\":{\"tenant\":\"demo\"}}' ", server,
                                 " dmapin.v1.Admin/CreateIntent"));
  }
  lines.push_back(absl::StrCat(g, "-d '{}' ", server, " dmapin.v1.Admin/WatchEvents"));
  lines.push_back(absl::StrCat(g, agent, " dmapin.v1.NodeAgent/ListRegions"));
  if (!memlock_) {
    lines.push_back(
        absl::StrCat(g, "-d '{\"container\":\"vm-2/vfio-0\",\"context\":\"vm-2\",\"ua\":\"",
                     kVm2Base + 512 * kMiB, "\",\"size\":\"", kMiB, "\"}' ", agent,
                     " dmapin.v1.NodeAgent/RegisterRegion"));
  }
  lines.push_back(absl::StrFormat("  curl -s http://127.0.0.1:%d/metrics | grep ^dmapin_fleet_node",
                                  server_metrics_port_));
  lines.push_back(absl::StrFormat("  curl -s http://127.0.0.1:%d/metrics | grep ^dmapin_agent",
                                  first.metrics_port));
  Say(absl::StrJoin(lines, "\n"));
}

absl::Status FleetDemo::SetUpNode(DemoNode& node) {
  v1::NodeStatus status;
  grpc::Status result = node.vmm->GetNodeStatus(Call().get(), {}, &status);
  if (!result.ok()) {
    return absl::UnavailableError(
        absl::StrCat(node.name, ": GetNodeStatus over ", node.uds, ": ", Describe(result)));
  }
  if (status.page_size() != 0) node.page_size = status.page_size();
  for (const char* context : {"vm-1", "vm-2"}) {
    v1::CreateContextRequest create;
    create.set_name(context);
    create.set_memlock_limit_bytes(kGiB);
    v1::Context made;
    result = node.vmm->CreateContext(Call().get(), create, &made);
    if (result.error_code() == grpc::StatusCode::ALREADY_EXISTS) {
      // Left in --state_dir by an earlier run, with that run's mappings: start afresh (this
      // releases the context's regions and the containers bound to it).
      v1::TeardownContextRequest teardown;
      teardown.set_name(context);
      v1::TeardownContextResponse torn_down;
      result = node.vmm->TeardownContext(Call().get(), teardown, &torn_down);
      if (result.ok()) result = node.vmm->CreateContext(Call().get(), create, &made);
      if (result.ok()) {
        Say(absl::StrFormat("  %s: context %s was left by an earlier run: torn down, created again",
                            node.name, context));
      }
    }
    if (!result.ok()) {
      return absl::InternalError(
          absl::StrCat(node.name, ": CreateContext ", context, ": ", Describe(result)));
    }
    v1::CreateContainerRequest container;
    container.set_name(ContainerOf(context));
    v1::Container made_container;
    result = node.vmm->CreateContainer(Call().get(), container, &made_container);
    if (result.error_code() == grpc::StatusCode::ALREADY_EXISTS) {
      v1::ReleaseContainerRequest release;
      release.set_name(container.name());
      v1::ReleaseContainerResponse released;
      result = node.vmm->ReleaseContainer(Call().get(), release, &released);
      if (result.ok()) result = node.vmm->CreateContainer(Call().get(), container, &made_container);
    }
    if (!result.ok()) {
      return absl::InternalError(
          absl::StrCat(node.name, ": CreateContainer ", container.name(), ": ", Describe(result)));
    }
    DemoContainer demo_container;
    demo_container.name = ContainerOf(context);
    demo_container.context = context;
    demo_container.slots.resize(kSlotsPerContainer);
    node.containers.push_back(std::move(demo_container));
  }
  return absl::OkStatus();
}

absl::Status FleetDemo::ApplyPolicies() {
  v1::SetPolicyRequest request;
  v1::Policy* policy = request.mutable_policy();
  policy->set_name("pool-a");
  (*policy->mutable_node_selector())["pool"] = "a";
  policy->set_pinned_bytes_budget(pool_a_budget_);
  policy->set_max_regions_per_node(kPoolAMaxRegions);
  v1::LabelRequirement* deny = policy->add_deny();
  deny->set_key("tenant");
  deny->add_values("blocked");
  policy->mutable_ebusy_retry()->set_initial_backoff_ms(50);
  policy->mutable_ebusy_retry()->set_max_backoff_ms(400);
  v1::Policy stored;
  grpc::Status status = admin_->SetPolicy(Call().get(), request, &stored);
  if (!status.ok()) return absl::InternalError("SetPolicy pool-a: " + Describe(status));
  Say(absl::StrFormat(
      "policy pool-a (revision %d): nodes pool=a, budget %s pinned, max %d regions/node, deny "
      "tenant=blocked, EBUSY backoff 50..400 ms",
      stored.revision(), Human(pool_a_budget_), kPoolAMaxRegions));

  request.Clear();
  policy = request.mutable_policy();
  policy->set_name("pool-b");
  (*policy->mutable_node_selector())["pool"] = "b";
  policy->set_pinned_bytes_budget(pool_b_budget_);
  policy->mutable_ebusy_retry()->set_initial_backoff_ms(50);
  policy->mutable_ebusy_retry()->set_max_backoff_ms(400);
  status = admin_->SetPolicy(Call().get(), request, &stored);
  if (!status.ok()) return absl::InternalError("SetPolicy pool-b: " + Describe(status));
  Say(absl::StrFormat("policy pool-b (revision %d): nodes pool=b, budget %s pinned",
                      stored.revision(), Human(pool_b_budget_)));
  return absl::OkStatus();
}

grpc::Status FleetDemo::CreateIntent(v1::IntentKind kind, const std::string& node,
                                     const DemoRegion& region,
                                     const std::map<std::string, std::string>& labels,
                                     v1::CreateIntentResponse* response) {
  v1::CreateIntentRequest request;
  request.set_kind(kind);
  request.set_node(node);
  request.set_context(region.context);
  request.set_container(region.container);
  request.set_ua(region.ua);
  request.set_size(region.size);
  for (const auto& [key, value] : labels) (*request.mutable_labels())[key] = value;
  return admin_->CreateIntent(Call().get(), request, response);
}

std::optional<v1::Intent> FleetDemo::GetIntent(const std::string& id) {
  v1::GetIntentRequest request;
  request.set_id(id);
  v1::Intent intent;
  if (!admin_->GetIntent(Call().get(), request, &intent).ok()) return std::nullopt;
  return intent;
}

std::optional<v1::Intent> FleetDemo::AwaitIntent(const std::string& id,
                                                 const std::vector<v1::IntentState>& states,
                                                 absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  std::optional<v1::Intent> intent;
  while (true) {
    std::optional<v1::Intent> now = GetIntent(id);
    if (now.has_value()) intent = std::move(now);
    if (intent.has_value() &&
        std::find(states.begin(), states.end(), intent->state()) != states.end()) {
      return intent;
    }
    if (absl::Now() >= deadline || !Sleep(absl::Milliseconds(25))) return intent;
  }
}

bool FleetDemo::AwaitHeldByAgent(DemoNode& node, const DemoRegion& region) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  do {
    v1::ListRegionsRequest request;
    request.set_context(region.context);
    v1::ListRegionsResponse response;
    if (node.vmm->ListRegions(Call().get(), request, &response).ok()) {
      for (const v1::Region& held : response.regions()) {
        if (held.ua() != region.ua || held.size() != region.size) continue;
        for (const std::string& container : held.containers()) {
          if (container == region.container) return true;
        }
      }
    }
  } while (absl::Now() < deadline && Sleep(absl::Milliseconds(25)));
  return false;
}

absl::Status FleetDemo::RequestRegistrations() {
  const std::map<std::string, std::string> tenant = {{"tenant", "demo"}};
  std::vector<std::pair<DemoNode*, std::string>> pending;  // node, intent id
  uint64_t pool_a_bytes = 0;
  DemoNode* last_pool_a = nullptr;
  for (size_t i = 0; i < nodes_.size(); ++i) {
    DemoNode& node = *nodes_[i];
    for (const RegionSpec& spec : RegionsOf(static_cast<int>(i))) {
      auto region = std::make_unique<DemoRegion>();
      region->context = spec.context;
      region->container = ContainerOf(spec.context);
      region->ua = spec.ua;
      region->size = spec.size;
      v1::CreateIntentResponse response;
      grpc::Status status =
          CreateIntent(v1::INTENT_KIND_REGISTER, node.name, *region, tenant, &response);
      if (!status.ok()) {
        return absl::InternalError(absl::StrFormat("REGISTER %s %s [%s +%s): %s", node.name,
                                                   spec.context, Hex(spec.ua), Human(spec.size),
                                                   Describe(status)));
      }
      pending.emplace_back(&node, response.intent().id());
      for (DemoContainer& container : node.containers) {
        if (container.context == spec.context) container.regions.push_back(region.get());
      }
      node.regions.push_back(std::move(region));
      if (node.pool == "a") {
        pool_a_bytes += spec.size;
        last_pool_a = &node;
      }
    }
  }
  Say(
      absl::StrFormat("requested %d registrations (Admin/CreateIntent REGISTER, tenant=demo); "
                      "pool-a asks for %s of its %s",
                      pending.size(), Human(pool_a_bytes), Human(kPoolABudget)));
  size_t index = 0;
  for (auto& node : nodes_) {
    std::vector<std::string> parts;
    for (const auto& region : node->regions) {
      const std::string& id = pending[index++].second;
      std::optional<v1::Intent> intent =
          AwaitIntent(id, {v1::INTENT_STATE_SATISFIED, v1::INTENT_STATE_FAILED}, kIntentTimeout);
      if (!intent.has_value() || intent->state() != v1::INTENT_STATE_SATISFIED) {
        return absl::InternalError(
            absl::StrCat("REGISTER intent ", id, " on ", node->name, " did not become SATISFIED: ",
                         intent.has_value() ? intent->ShortDebugString() : "no answer",
                         "\n; the server's log ends:\n", server_->LogTail()));
      }
      // SATISFIED is the server's view from the agents' reports; the VMM maps once the agent
      // itself has the region for this container.
      if (!AwaitHeldByAgent(*node, *region)) {
        return absl::InternalError(absl::StrFormat(
            "intent %s on %s is SATISFIED, but the agent does not list %s [%s +%s) for %s", id,
            node->name, region->context, Hex(region->ua), Human(region->size), region->container));
      }
      region->state.store(kActive);
      parts.push_back(
          absl::StrFormat("%s [%s +%s)", region->context, Hex(region->ua), Human(region->size)));
    }
    Say(absl::StrFormat("  %s: SATISFIED %s", node->name, absl::StrJoin(parts, ", ")));
  }

  // Over pool-a's budget: refused at admission, nothing stored.
  if (last_pool_a != nullptr) {
    DemoRegion extra;
    extra.context = "vm-2";
    extra.container = ContainerOf("vm-2");
    extra.ua = kVm2Base + 256 * kMiB;
    extra.size = kPoolABudget - pool_a_bytes + 64 * kMiB;
    v1::CreateIntentResponse response;
    grpc::Status status =
        CreateIntent(v1::INTENT_KIND_REGISTER, last_pool_a->name, extra, tenant, &response);
    Say(absl::StrFormat("REGISTER %s vm-2 [%s +%s) over pool-a's budget -> %s", last_pool_a->name,
                        Hex(extra.ua), Human(extra.size), Describe(status)));
    // Denied by label.
    extra.size = 16 * kMiB;
    status = CreateIntent(v1::INTENT_KIND_REGISTER, nodes_.front()->name, extra,
                          {{"tenant", "blocked"}}, &response);
    Say(absl::StrFormat("REGISTER %s vm-2 [%s +%s) as tenant=blocked -> %s", nodes_.front()->name,
                        Hex(extra.ua), Human(extra.size), Describe(status)));
  }
  return absl::OkStatus();
}

// --- The simulated VMMs ------------------------------------------------------------------------

void FleetDemo::NoteError(DemoNode& node, absl::string_view what, const grpc::Status& status) {
  if (Stopping()) return;
  node.errors.fetch_add(1, std::memory_order_relaxed);
  absl::MutexLock lock(&node.error_mutex);
  node.last_error = absl::StrCat(what, ": ", Describe(status));
}

bool FleetDemo::Map(DemoNode& node, DemoContainer& container, int slot, DemoRegion* region,
                    uint64_t ua, uint64_t pages) {
  v1::MapDmaRequest request;
  request.set_container(container.name);
  request.set_iova(static_cast<uint64_t>(slot) * kMaxMapPages * node.page_size);
  request.set_ua(ua);
  request.set_size(pages * node.page_size);
  v1::MapDmaResponse response;
  grpc::Status status = node.vmm->MapDma(Call().get(), request, &response);
  if (!status.ok()) {
    NoteError(node, "MapDma", status);
    return false;
  }
  container.slots[slot] = {region, pages};
  region->mapped_pages.fetch_add(static_cast<int64_t>(pages));
  node.maps.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void FleetDemo::Unmap(DemoNode& node, DemoContainer& container, int slot) {
  Slot& mapped = container.slots[slot];
  v1::UnmapDmaRequest request;
  request.set_container(container.name);
  request.set_iova(static_cast<uint64_t>(slot) * kMaxMapPages * node.page_size);
  request.set_size(mapped.pages * node.page_size);
  v1::UnmapDmaResponse response;
  grpc::Status status = node.vmm->UnmapDma(Call().get(), request, &response);
  if (status.ok()) {
    node.unmaps.fetch_add(1, std::memory_order_relaxed);
  } else {
    NoteError(node, "UnmapDma", status);
  }
  // Forgotten either way: a failed unmap is reported, not retried forever.
  mapped.region->mapped_pages.fetch_sub(static_cast<int64_t>(mapped.pages));
  mapped = Slot{};
}

void FleetDemo::RunVmm(DemoNode& node, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int rate = absl::GetFlag(FLAGS_vmm_ops_per_sec);
  const absl::Duration pace = rate > 0 ? absl::Seconds(1.0 / rate) : absl::ZeroDuration();
  absl::Time next = absl::Now();
  while (!Stopping()) {
    // Hot-unplugs first: unmap everything in the regions being evacuated.
    for (auto& region : node.regions) {
      if (region->state.load() != kEvacuate) continue;
      for (DemoContainer& container : node.containers) {
        for (int slot = 0; slot < kSlotsPerContainer; ++slot) {
          if (container.slots[slot].region == region.get()) Unmap(node, container, slot);
        }
      }
      region->evacuated_at.store(absl::ToUnixNanos(absl::Now()));
      int expected = kEvacuate;
      region->state.compare_exchange_strong(expected, kGone);
    }
    DemoContainer& container = node.containers[rng() % node.containers.size()];
    const int slot = static_cast<int>(rng() % kSlotsPerContainer);
    DemoRegion* mapped = container.slots[slot].region;
    if (mapped != nullptr) {
      // Mappings in a region with an UNREGISTER pending stay (DMA in flight) until evacuated.
      if (mapped->state.load() == kActive) Unmap(node, container, slot);
    } else {
      std::vector<DemoRegion*> active;
      for (DemoRegion* region : container.regions) {
        if (region->state.load() == kActive) active.push_back(region);
      }
      if (!active.empty()) {
        DemoRegion* region = active[rng() % active.size()];
        const uint64_t pages = 1 + rng() % kMaxMapPages;
        const uint64_t region_pages = region->size / node.page_size;
        const uint64_t offset = rng() % (region_pages - pages + 1);
        Map(node, container, slot, region, region->ua + offset * node.page_size, pages);
      }
    }
    if (pace > absl::ZeroDuration()) {
      next += pace;
      const absl::Time now = absl::Now();
      if (next > now) {
        if (!Sleep(next - now)) break;
      } else if (now - next > absl::Seconds(1)) {
        next = now;  // fell behind (a slow call): do not burst to catch up
      }
    }
  }
}

// --- The operator: EBUSY demonstrations --------------------------------------------------------

void FleetDemo::RunOperator() {
  const double period = absl::GetFlag(FLAGS_ebusy_period);
  if (period <= 0) return;
  absl::Duration delay = absl::Seconds(std::min(2.0, period));
  for (int cycle = 0; Sleep(delay); ++cycle) {
    DemoNode& node = *nodes_[cycle % nodes_.size()];
    // vm-1's two regions in turn.
    DemoRegion& region = *node.regions[(cycle / nodes_.size()) % 2];
    EbusyCycle(node, region);
    delay = absl::Seconds(period);
  }
}

void FleetDemo::EbusyCycle(DemoNode& node, DemoRegion& region) {
  const std::string where = absl::StrFormat("%s %s [%s +%s)", node.name, region.context,
                                            Hex(region.ua), Human(region.size));
  if (region.state.load() != kActive) return;
  // Freeze the region's mappings (the device still does DMA there), then make sure there are
  // some: otherwise the unregister would simply succeed.
  region.state.store(kHeld);
  for (int i = 0; region.mapped_pages.load() == 0; ++i) {
    region.state.store(kActive);
    if (i == 40 || !Sleep(absl::Milliseconds(50))) return;
    region.state.store(kHeld);
  }
  const int64_t held = region.mapped_pages.load();
  v1::CreateIntentResponse response;
  grpc::Status status =
      CreateIntent(v1::INTENT_KIND_UNREGISTER, node.name, region, {{"tenant", "demo"}}, &response);
  if (!status.ok()) {
    Say(absl::StrCat(Stamp(), "UNREGISTER ", where, " -> ", Describe(status)));
    region.state.store(kActive);
    return;
  }
  ebusy_started_.fetch_add(1);
  const std::string id = response.intent().id();
  Say(absl::StrFormat("%sUNREGISTER %s while its VMM has %d pages mapped there -> intent %s",
                      Stamp(), where, held, id));
  std::optional<v1::Intent> intent = AwaitIntent(
      id, {v1::INTENT_STATE_RETRYING, v1::INTENT_STATE_SATISFIED, v1::INTENT_STATE_FAILED},
      absl::Seconds(10));
  if (Stopping()) return;
  if (intent.has_value() && intent->state() == v1::INTENT_STATE_RETRYING) {
    Say(absl::StrFormat("%s  intent %s RETRYING: agent said %s (%s); server retries with backoff",
                        Stamp(), id, intent->last_errno_name(), intent->last_message()));
  } else {
    Say(absl::StrFormat("%s  intent %s is %s, expected RETRYING: %s", Stamp(), id,
                        intent.has_value() ? StateName(intent->state()) : "unknown",
                        intent.has_value() ? intent->ShortDebugString() : ""));
  }
  if (!Sleep(kEbusyHold)) return;
  intent = GetIntent(id);
  Say(absl::StrFormat("%s  intent %s still %s after %d attempts; now the VMM unmaps its %d pages",
                      Stamp(), id, intent.has_value() ? StateName(intent->state()) : "?",
                      intent.has_value() ? intent->attempts() : 0, region.mapped_pages.load()));
  region.state.store(kEvacuate);
  intent =
      AwaitIntent(id, {v1::INTENT_STATE_SATISFIED, v1::INTENT_STATE_FAILED}, absl::Seconds(15));
  if (Stopping()) return;
  if (!intent.has_value() || intent->state() != v1::INTENT_STATE_SATISFIED) {
    Say(absl::StrFormat("%s  intent %s did not become SATISFIED: %s", Stamp(), id,
                        intent.has_value() ? intent->ShortDebugString() : "no answer"));
    return;
  }
  const int64_t unmapped_at = region.evacuated_at.load();
  absl::Duration after = absl::ZeroDuration();
  if (unmapped_at != 0) after = absl::Now() - absl::FromUnixNanos(unmapped_at);
  ebusy_completed_.fetch_add(1);
  Say(
      absl::StrFormat("%s  intent %s SATISFIED after %d attempts (<= %d ms after the unmap): "
                      "region unregistered, pages unpinned",
                      Stamp(), id, intent->attempts(), absl::ToInt64Milliseconds(after)));

  // The VM gets its memory back: register the region again.
  if (!Sleep(absl::Seconds(1))) return;
  status =
      CreateIntent(v1::INTENT_KIND_REGISTER, node.name, region, {{"tenant", "demo"}}, &response);
  if (!status.ok()) {
    Say(absl::StrCat(Stamp(), "REGISTER ", where, " again -> ", Describe(status)));
    return;
  }
  intent = AwaitIntent(response.intent().id(),
                       {v1::INTENT_STATE_SATISFIED, v1::INTENT_STATE_FAILED}, kIntentTimeout);
  if (Stopping()) return;
  if (intent.has_value() && intent->state() == v1::INTENT_STATE_SATISFIED) {
    region.state.store(kActive);
    Say(absl::StrFormat("%sREGISTER %s again -> intent %s SATISFIED; the VMM maps it again",
                        Stamp(), where, response.intent().id()));
  } else {
    Say(absl::StrFormat("%sREGISTER %s again -> %s", Stamp(), where,
                        intent.has_value() ? intent->ShortDebugString() : "no answer"));
  }
}

// --- The table ---------------------------------------------------------------------------------

void FleetDemo::PrintTable(absl::Duration window) {
  v1::ListNodesResponse nodes;
  grpc::Status status = admin_->ListNodes(Call().get(), {}, &nodes);
  if (!status.ok()) {
    Say(absl::StrCat(Stamp(), "Admin/ListNodes: ", Describe(status)));
    return;
  }
  std::map<std::string, int> states;
  v1::ListIntentsRequest list;
  list.set_page_size(1000);
  while (true) {
    v1::ListIntentsResponse intents;
    status = admin_->ListIntents(Call().get(), list, &intents);
    if (!status.ok()) break;
    for (const v1::Intent& intent : intents.intents()) ++states[StateName(intent.state())];
    if (intents.next_page_token().empty()) break;
    list.set_page_token(intents.next_page_token());
  }
  std::vector<std::string> lines;
  lines.push_back(absl::StrFormat("%s%-7s %-4s %-5s %8s %7s %5s %8s %-22s %7s %6s", Stamp(), "NODE",
                                  "POOL", "CONN", "PINNED", "REGIONS", "USED", "MAPPINGS",
                                  "BUDGET (pool use)", "VMM op/s", "ERRORS"));
  if (last_ops_.size() != nodes_.size()) last_ops_.assign(nodes_.size(), 0);
  const double seconds = std::max(absl::ToDoubleSeconds(window), 1e-3);
  for (const v1::Node& node : nodes.nodes()) {
    std::string rate = "-";
    std::string errors = "-";
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (nodes_[i]->name != node.name()) continue;
      const uint64_t ops = nodes_[i]->maps.load() + nodes_[i]->unmaps.load();
      rate = absl::StrFormat("%.0f", (ops - last_ops_[i]) / seconds);
      last_ops_[i] = ops;
      errors = absl::StrCat(nodes_[i]->errors.load());
    }
    const auto pool = node.labels().find("pool");
    std::string budget = "-";
    if (node.budget_bytes() != 0) {
      budget = absl::StrFormat("%s (%.0f%%)", Human(node.budget_bytes()),
                               node.budget_used_ratio() * 100);
    }
    const char* connection = node.connection() == v1::CONNECTION_STATE_CONNECTED      ? "up"
                             : node.connection() == v1::CONNECTION_STATE_DISCONNECTED ? "DOWN"
                                                                                      : "?";
    lines.push_back(absl::StrFormat(
        "         %-7s %-4s %-5s %8s %7d %5d %8d %-22s %7s %6s", node.name(),
        pool != node.labels().end() ? pool->second : "-", connection, Human(node.pinned_bytes()),
        node.regions(), node.used_sum(), node.installed_mappings(), budget, rate, errors));
  }
  std::vector<std::string> counts;
  for (const auto& [state, count] : states) counts.push_back(absl::StrCat(count, " ", state));
  lines.push_back(absl::StrFormat("         intents: %s; EBUSY demos: %d started, %d satisfied",
                                  counts.empty() ? "none" : absl::StrJoin(counts, ", "),
                                  ebusy_started_.load(), ebusy_completed_.load()));
  for (const auto& node : nodes_) {
    absl::MutexLock lock(&node->error_mutex);
    if (!node->last_error.empty()) {
      lines.push_back(absl::StrCat("         ", node->name, " last VMM error: ", node->last_error));
      node->last_error.clear();
    }
  }
  Say(absl::StrJoin(lines, "\n"));
}

// --- The reference VMMs (--backend=memlock) ----------------------------------------------------

absl::Status FleetDemo::StartVmm(DemoNode& node, int index) {
  node.vmm_context = absl::StrCat("vmm-", index + 1);
  const uint64_t seed = absl::GetFlag(FLAGS_seed) * 1000003 + index + 1;
  absl::StatusOr<std::unique_ptr<VmmChild>> child =
      VmmChild::Spawn({vmm_binary_, "--uds_path=" + node.uds, "--name=" + node.vmm_context,
                       absl::StrCat("--guest_ram_bytes=", kVmmGuestRam), "--duration_seconds=0",
                       absl::StrCat("--map_bytes=", kVmmMapBytes), absl::StrCat("--seed=", seed)},
                      node.dir + "/vmm.out", node.dir + "/vmm.log");
  if (!child.ok()) return child.status();
  node.ref_vmm = std::move(*child);
  // Up once the agent reports its context with its RAM attached and registered.
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  v1::Context context;
  while (true) {
    v1::GetContextRequest request;
    request.set_name(node.vmm_context);
    context.Clear();
    if (node.vmm->GetContext(Call().get(), request, &context).ok() && context.regions() > 0 &&
        context.slots_size() > 0) {
      break;
    }
    if (node.ref_vmm->Exited() || absl::Now() >= deadline) {
      return absl::InternalError(
          absl::StrCat(node.name, ": dmapin-reference-vmm (", vmm_binary_, ") ",
                       node.ref_vmm->Exited() ? DescribeWait(*node.ref_vmm->status())
                                              : "registered no guest RAM within 30 s",
                       "; its log ends:\n", node.ref_vmm->LogTail()));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  const v1::MemorySlot& slot = context.slots(0);
  node.ram_ua = slot.ua();
  node.ram_bytes = slot.size();
  Say(absl::StrFormat(
      "  %s: VMM pid %d owns context %s (owner pid %d): slot [%s +%s) %s, %s pinned, containers "
      "%s",
      node.name, node.ref_vmm->pid(), context.name(), context.owner().pid(), Hex(slot.ua()),
      Human(slot.size()), slot.object(), Human(context.locked_bytes()),
      absl::StrJoin(context.containers(), ", ")));

  // A second device of the VM, which the fleet (not the VMM) gives DMA access to guest RAM.
  node.fleet_container = node.vmm_context + "/vfio-1";
  v1::CreateContainerRequest create;
  create.set_name(node.fleet_container);
  v1::Container made;
  grpc::Status result = node.vmm->CreateContainer(Call().get(), create, &made);
  if (result.error_code() == grpc::StatusCode::ALREADY_EXISTS) {
    v1::ReleaseContainerRequest release;
    release.set_name(create.name());
    v1::ReleaseContainerResponse released;
    result = node.vmm->ReleaseContainer(Call().get(), release, &released);
    if (result.ok()) result = node.vmm->CreateContainer(Call().get(), create, &made);
  }
  if (!result.ok()) {
    return absl::InternalError(
        absl::StrCat(node.name, ": CreateContainer ", create.name(), ": ", Describe(result)));
  }
  return absl::OkStatus();
}

absl::Status FleetDemo::RequestVmmRegistrations() {
  const std::map<std::string, std::string> tenant = {{"tenant", "demo"}};
  Say("The fleet's registrations: for each VM's second device (container vmm-N/vfio-1), its "
      "guest RAM as the VMM's context reports it. The VMM registered all of its slot itself and a "
      "context's regions never overlap (spec 2.4), so the range is the slot's: a second user of "
      "the VMM's region, which pins nothing more (spec 2.3) but counts in the pool's budget");
  uint64_t pool_a_bytes = 0;
  DemoNode* last_pool_a = nullptr;
  for (auto& node : nodes_) {
    auto region = std::make_unique<DemoRegion>();
    region->context = node->vmm_context;
    region->container = node->fleet_container;
    region->ua = node->ram_ua;
    region->size = node->ram_bytes;
    v1::CreateIntentResponse response;
    grpc::Status status =
        CreateIntent(v1::INTENT_KIND_REGISTER, node->name, *region, tenant, &response);
    if (!status.ok()) {
      return absl::InternalError(absl::StrFormat("REGISTER %s %s [%s +%s): %s", node->name,
                                                 region->context, Hex(region->ua),
                                                 Human(region->size), Describe(status)));
    }
    node->fleet_intent = response.intent().id();
    node->regions.push_back(std::move(region));
    if (node->pool == "a") {
      pool_a_bytes += node->ram_bytes;
      last_pool_a = node.get();
    }
  }
  Say(
      absl::StrFormat("requested %d registrations (Admin/CreateIntent REGISTER, tenant=demo); "
                      "pool-a asks for %s of its %s",
                      nodes_.size(), Human(pool_a_bytes), Human(pool_a_budget_)));
  for (auto& node : nodes_) {
    const DemoRegion& region = *node->regions.front();
    std::optional<v1::Intent> intent = AwaitIntent(
        node->fleet_intent, {v1::INTENT_STATE_SATISFIED, v1::INTENT_STATE_FAILED}, kIntentTimeout);
    if (!intent.has_value() || intent->state() != v1::INTENT_STATE_SATISFIED) {
      return absl::InternalError(absl::StrCat(
          "REGISTER intent ", node->fleet_intent, " on ", node->name,
          " did not become SATISFIED: ", intent.has_value() ? intent->ShortDebugString() : "none",
          "\n; the server's log ends:\n", server_->LogTail()));
    }
    if (!AwaitHeldByAgent(*node, region)) {
      return absl::InternalError(absl::StrFormat(
          "intent %s on %s is SATISFIED, but the agent does not list %s [%s +%s) for %s",
          node->fleet_intent, node->name, region.context, Hex(region.ua), Human(region.size),
          region.container));
    }
    // What the agent holds now: the region's users and what the context pins.
    std::string users = "?";
    v1::ListRegionsRequest list;
    list.set_context(region.context);
    v1::ListRegionsResponse regions;
    if (node->vmm->ListRegions(Call().get(), list, &regions).ok()) {
      for (const v1::Region& held : regions.regions()) {
        if (held.ua() != region.ua || held.size() != region.size) continue;
        users =
            absl::StrFormat("used %d by %s", held.used(), absl::StrJoin(held.containers(), ", "));
      }
    }
    v1::GetContextRequest get;
    get.set_name(region.context);
    v1::Context context;
    const grpc::Status read = node->vmm->GetContext(Call().get(), get, &context);
    Say(
        absl::StrFormat("  %s: intent %s SATISFIED: %s [%s +%s) for %s; the agent's region: %s; "
                        "%s pins %s",
                        node->name, node->fleet_intent, region.context, Hex(region.ua),
                        Human(region.size), region.container, users, region.context,
                        read.ok() ? Human(context.locked_bytes()) : Describe(read)));
  }

  // Refused at admission, before any agent is asked: inside the VMM's slot, over the budget.
  if (last_pool_a != nullptr) {
    DemoRegion extra;
    extra.context = last_pool_a->vmm_context;
    extra.container = last_pool_a->fleet_container;
    extra.ua = last_pool_a->ram_ua;
    extra.size = pool_a_budget_ - std::min(pool_a_bytes, pool_a_budget_) + 16 * kMiB;
    v1::CreateIntentResponse response;
    grpc::Status status =
        CreateIntent(v1::INTENT_KIND_REGISTER, last_pool_a->name, extra, tenant, &response);
    Say(absl::StrFormat("REGISTER %s %s [%s +%s) over pool-a's budget -> %s", last_pool_a->name,
                        extra.context, Hex(extra.ua), Human(extra.size), Describe(status)));
    // Denied by label.
    DemoNode& first = *nodes_.front();
    extra.context = first.vmm_context;
    extra.container = first.fleet_container;
    extra.ua = first.ram_ua;
    extra.size = 16 * kMiB;
    status = CreateIntent(v1::INTENT_KIND_REGISTER, first.name, extra, {{"tenant", "blocked"}},
                          &response);
    Say(absl::StrFormat("REGISTER %s %s [%s +%s) as tenant=blocked -> %s", first.name,
                        extra.context, Hex(extra.ua), Human(extra.size), Describe(status)));
  }
  return absl::OkStatus();
}

void FleetDemo::PrintVmmTable(absl::Duration window) {
  v1::ListNodesResponse nodes;
  grpc::Status status = admin_->ListNodes(Call().get(), {}, &nodes);
  if (!status.ok()) {
    Say(absl::StrCat(Stamp(), "Admin/ListNodes: ", Describe(status)));
    return;
  }
  std::vector<std::string> lines;
  lines.push_back(absl::StrFormat("%s%-7s %-4s %-4s %8s %9s %8s %7s %8s %-18s %10s %7s", Stamp(),
                                  "NODE", "POOL", "CONN", "VMM PID", "GUEST RAM", "PINNED",
                                  "REGIONS", "MAPPINGS", "BUDGET (pool use)", "DMA CALLS", "op/s"));
  const double seconds = std::max(absl::ToDoubleSeconds(window), 1e-3);
  for (const v1::Node& row : nodes.nodes()) {
    DemoNode* node = nullptr;
    for (auto& candidate : nodes_) {
      if (candidate->name == row.name()) node = candidate.get();
    }
    if (node == nullptr) continue;
    // The agent's own view over its Unix socket (open reads: the demo owns no context there).
    std::string pid = "-", ram = "-", pinned = "?", calls = "?", rate = "?";
    if (node->ref_vmm != nullptr) {
      pid = node->vmm_killed ? "killed" : absl::StrCat(node->ref_vmm->pid());
    }
    v1::GetContextRequest get;
    get.set_name(node->vmm_context);
    v1::Context context;
    if (node->vmm->GetContext(Call().get(), get, &context).ok()) {
      uint64_t attached = 0;
      for (const v1::MemorySlot& slot : context.slots()) attached += slot.size();
      ram = Human(attached);
    }
    v1::NodeStatus agent;
    if (node->vmm->GetNodeStatus(Call().get(), {}, &agent).ok()) {
      pinned = Human(agent.locked_bytes());
      const uint64_t total = agent.counters().maps_ok() + agent.counters().unmaps();
      calls = absl::StrCat(total);
      rate = absl::StrFormat("%.0f", (total - std::min(total, node->last_dma_calls)) / seconds);
      node->last_dma_calls = total;
    }
    std::string budget = "-";
    if (row.budget_bytes() != 0) {
      budget =
          absl::StrFormat("%s (%.0f%%)", Human(row.budget_bytes()), row.budget_used_ratio() * 100);
    }
    const char* connection = row.connection() == v1::CONNECTION_STATE_CONNECTED      ? "up"
                             : row.connection() == v1::CONNECTION_STATE_DISCONNECTED ? "DOWN"
                                                                                     : "?";
    lines.push_back(absl::StrFormat("         %-7s %-4s %-4s %8s %9s %8s %7d %8d %-18s %10s %7s",
                                    row.name(), node->pool, connection, pid, ram, pinned,
                                    row.regions(), row.installed_mappings(), budget, calls, rate));
  }
  Say(absl::StrJoin(lines, "\n"));
}

void FleetDemo::WatchEvents() {
  v1::Event event;
  std::unique_ptr<grpc::ClientReader<v1::Event>> stream =
      admin_->WatchEvents(watch_context_.get(), {});
  while (stream->Read(&event)) {
    if (event.type() != "vmm_exited") continue;
    absl::MutexLock lock(&events_mutex_);
    vmm_exits_.push_back(event);
  }
  stream->Finish().ok();  // cancelled at the end, or the server went away
}

void FleetDemo::KillOneVmm() {
  DemoNode& node = *nodes_.back();
  if (node.ref_vmm == nullptr || node.ref_vmm->Exited()) return;
  v1::NodeStatus before;
  grpc::Status status = node.vmm->GetNodeStatus(Call().get(), {}, &before);
  v1::GetContextRequest get;
  get.set_name(node.vmm_context);
  v1::Context context;
  grpc::Status read = node.vmm->GetContext(Call().get(), get, &context);
  Say(absl::StrFormat(
      "%sSIGKILL to %s's VMM (pid %d): its context %s pins %s of the agent's %s, containers %s; "
      "the VMM cleans nothing up, the agent's watch of its exit must",
      Stamp(), node.name, node.ref_vmm->pid(), node.vmm_context,
      read.ok() ? Human(context.locked_bytes()) : Describe(read),
      status.ok() ? Human(before.locked_bytes()) : Describe(status),
      absl::StrJoin(context.containers(), ", ")));
  const absl::Time killed_at = absl::Now();
  node.ref_vmm->Signal(SIGKILL);
  node.vmm_killed = true;
  node.ref_vmm->Wait(absl::Seconds(5));
  // The agent tears the context down once its pidfd says the VMM is gone.
  const absl::Time deadline = killed_at + absl::Seconds(10);
  do {
    read = node.vmm->GetContext(Call().get(), get, &context);
  } while (read.error_code() != grpc::StatusCode::NOT_FOUND && absl::Now() < deadline &&
           Sleep(absl::Milliseconds(10)));
  if (Stopping()) return;
  const absl::Duration took = absl::Now() - killed_at;
  v1::NodeStatus after;
  status = node.vmm->GetNodeStatus(Call().get(), {}, &after);
  v1::ListContainersResponse containers;
  std::vector<std::string> left;
  if (node.vmm->ListContainers(Call().get(), {}, &containers).ok()) {
    for (const v1::Container& container : containers.containers()) {
      left.push_back(container.name());
    }
  }
  Say(absl::StrFormat(
      "%s  %s: the VMM was %s; %d ms later: GetContext %s -> %s; agent pins %s -> %s (-%s); "
      "containers left: %s; owner-exit teardowns %d",
      Stamp(), node.name,
      node.ref_vmm->status().has_value() ? DescribeWait(*node.ref_vmm->status()) : "not reaped",
      absl::ToInt64Milliseconds(took), node.vmm_context, Describe(read),
      Human(before.locked_bytes()), status.ok() ? Human(after.locked_bytes()) : Describe(status),
      Human(before.locked_bytes() - std::min(before.locked_bytes(), after.locked_bytes())),
      left.empty() ? "none" : absl::StrJoin(left, ", "), after.counters().owner_exit_teardowns()));
  // The server hears of it in the agent's next delta.
  std::optional<v1::Event> event;
  const absl::Time event_deadline = absl::Now() + absl::Seconds(10);
  while (!event.has_value() && absl::Now() < event_deadline && Sleep(absl::Milliseconds(20))) {
    absl::MutexLock lock(&events_mutex_);
    for (const v1::Event& candidate : vmm_exits_) {
      if (candidate.node() == node.name) event = candidate;
    }
  }
  if (Stopping()) return;
  if (event.has_value()) {
    Say(absl::StrFormat("%s  server WatchEvents: %s %s node=%s: %s", Stamp(), event->time(),
                        event->type(), event->node(), event->message()));
  } else {
    Say(absl::StrFormat("%s  server WatchEvents: no vmm_exited event for %s within 10 s", Stamp(),
                        node.name));
  }
  // The fleet's registration there went with the context.
  if (!Sleep(absl::Seconds(1))) return;
  std::optional<v1::Intent> intent = GetIntent(node.fleet_intent);
  if (intent.has_value()) {
    Say(absl::StrFormat("%s  intent %s (%s [%s +%s) for %s) is now %s%s", Stamp(),
                        node.fleet_intent, node.vmm_context, Hex(node.ram_ua),
                        Human(node.ram_bytes), node.fleet_container, StateName(intent->state()),
                        intent->last_message().empty() ? "" : ": " + intent->last_message()));
  }
}

void FleetDemo::WithdrawRegistrations() {
  std::vector<DemoNode*> running;
  for (auto& node : nodes_) {
    if (node->ref_vmm != nullptr && !node->vmm_killed && !node->regions.empty()) {
      running.push_back(node.get());
    }
  }
  std::vector<std::pair<DemoNode*, std::string>> withdrawals;
  for (DemoNode* node : running) {
    v1::CreateIntentResponse response;
    grpc::Status status = CreateIntent(v1::INTENT_KIND_UNREGISTER, node->name,
                                       *node->regions.front(), {{"tenant", "demo"}}, &response);
    if (status.ok()) {
      withdrawals.emplace_back(node, response.intent().id());
    } else {
      Say(absl::StrCat("UNREGISTER on ", node->name, " -> ", Describe(status)));
    }
  }
  std::vector<std::string> parts;
  for (const auto& [node, id] : withdrawals) {
    std::optional<v1::Intent> intent =
        AwaitIntent(id, {v1::INTENT_STATE_SATISFIED, v1::INTENT_STATE_FAILED}, kIntentTimeout);
    parts.push_back(absl::StrFormat("%s %s %s", node->name, id,
                                    intent.has_value() ? StateName(intent->state()) : "?"));
  }
  if (withdrawals.empty()) return;
  // The VMMs' own registrations stay: what the agents pin does not change.
  std::vector<std::string> pinned;
  for (DemoNode* node : running) {
    v1::NodeStatus status;
    grpc::Status read = node->vmm->GetNodeStatus(Call().get(), {}, &status);
    pinned.push_back(
        absl::StrCat(node->name, " ", read.ok() ? Human(status.locked_bytes()) : Describe(read)));
  }
  Say(absl::StrFormat(
      "%sThe fleet withdraws its registrations (UNREGISTER of vmm-N/vfio-1's): %s; the VMMs' own "
      "stay: agents pin %s",
      Stamp(), absl::StrJoin(parts, ", "), absl::StrJoin(pinned, ", ")));
}

bool FleetDemo::StopVmms() {
  std::vector<DemoNode*> running;
  for (auto& node : nodes_) {
    if (node->ref_vmm != nullptr && !node->vmm_killed) running.push_back(node.get());
  }
  Say(absl::StrFormat(
      "Stopping %d VMMs (SIGTERM): each unmaps, unregisters, releases its container and tears its "
      "context down, then prints its summary",
      running.size()));
  for (DemoNode* node : running) node->ref_vmm->Signal(SIGTERM);
  bool clean = true;
  for (DemoNode* node : running) {
    if (!node->ref_vmm->Wait(absl::Seconds(20))) {
      node->ref_vmm->Signal(SIGKILL);
      node->ref_vmm->Wait(absl::Seconds(5));
    }
    const std::optional<int> wait = node->ref_vmm->status();
    const bool ok = wait.has_value() && WIFEXITED(*wait) && WEXITSTATUS(*wait) == 0;
    clean = clean && ok;
    std::string summary = "(no summary line)";
    for (absl::string_view line : absl::StrSplit(node->ref_vmm->Output(), '\n')) {
      if (absl::StrContains(line, " summary ")) summary = std::string(line);
    }
    Say(absl::StrFormat("  %s pid %d, %s: %s", node->name, node->ref_vmm->pid(),
                        wait.has_value() ? DescribeWait(*wait) : "still running", summary));
    if (!ok) Say(absl::StrCat("  its log ends:\n", node->ref_vmm->LogTail()));
  }
  std::vector<std::string> pinned;
  for (auto& node : nodes_) {
    v1::NodeStatus status;
    grpc::Status read = node->vmm->GetNodeStatus(Call().get(), {}, &status);
    pinned.push_back(absl::StrCat(node->name, " ",
                                  read.ok() ? Human(status.locked_bytes()) : Describe(read), " (",
                                  status.contexts(), " contexts)"));
  }
  Say(absl::StrCat("agents now pin: ", absl::StrJoin(pinned, ", ")));
  // Every intent of the demo, by state.
  std::map<std::string, int> states;
  v1::ListIntentsRequest list;
  list.set_page_size(1000);
  v1::ListIntentsResponse intents;
  if (admin_->ListIntents(Call().get(), list, &intents).ok()) {
    for (const v1::Intent& intent : intents.intents()) ++states[StateName(intent.state())];
  }
  std::vector<std::string> counts;
  for (const auto& [state, count] : states) counts.push_back(absl::StrCat(count, " ", state));
  Say(absl::StrCat("intents: ", counts.empty() ? "none" : absl::StrJoin(counts, ", ")));
  return clean;
}

// --- Processes ---------------------------------------------------------------------------------

absl::Status FleetDemo::CheckProcesses() {
  if (absl::Status status = server_->CheckRunning(); !status.ok()) {
    return absl::Status(status.code(), absl::StrCat("dmapin-server: ", status.message()));
  }
  for (const auto& node : nodes_) {
    if (absl::Status status = node->process->CheckRunning(); !status.ok()) {
      return absl::Status(status.code(),
                          absl::StrCat("dmapin-agent ", node->name, ": ", status.message()));
    }
    if (node->ref_vmm != nullptr && !node->vmm_killed && node->ref_vmm->Exited()) {
      return absl::InternalError(absl::StrCat("dmapin-reference-vmm on ", node->name, " ",
                                              DescribeWait(*node->ref_vmm->status()),
                                              "; its log ends:\n", node->ref_vmm->LogTail()));
    }
  }
  return absl::OkStatus();
}

bool FleetDemo::StopProcesses() {
  // Close this process's connections first: a gRPC server's graceful shutdown waits for its
  // open connections to go (up to its deadline), not only for calls in flight.
  admin_.reset();
  for (auto& node : nodes_) {
    node->vmm.reset();
    // After a failure: no VMM outlives its agent.
    node->ref_vmm.reset();
  }
  std::atomic<bool> clean{true};
  auto stop = [&](AgentProcess* process, const std::string& what) {
    if (process == nullptr) return;
    absl::Status status = process->Terminate();
    // Ctrl-C in a terminal reaches the whole process group: the child may have stopped already.
    if (!status.ok() && !absl::StrContains(status.message(), "exited with status 0 before")) {
      Say(absl::StrCat(what, ": ", status.message()));
      clean = false;
    }
  };
  // The agents together (each takes about a second), then the server.
  std::vector<std::thread> stoppers;
  for (auto& node : nodes_) {
    stoppers.emplace_back(stop, node->process.get(), "dmapin-agent " + node->name);
  }
  for (std::thread& thread : stoppers) thread.join();
  stop(server_.get(), "dmapin-server");
  return clean.load();
}

int FleetDemo::Run(const sigset_t& signals) {
  auto fail = [&](const absl::Status& status) {
    std::fprintf(stderr, "fleet_demo: %s\n", std::string(status.message()).c_str());
    StopProcesses();
    return 1;
  };
  if (memlock_ && vmm_binary_.empty()) {
    return fail(absl::NotFoundError(
        "no dmapin-reference-vmm binary found beside this one (--backend=memlock runs one per "
        "node); build //tools/fleet_demo:fleet_demo or pass --reference_vmm_binary=PATH"));
  }
  if (agent_binary_.empty() || server_binary_.empty()) {
    return fail(absl::NotFoundError(absl::StrCat(
        "no ", agent_binary_.empty() ? "dmapin-agent" : "dmapin-server",
        " binary found beside this one; build with `bazel build //tools/fleet_demo:fleet_demo` "
        "and run it from bazel-bin, or pass --agent_binary=PATH --server_binary=PATH")));
  }
  if (absl::Status status = PreparePorts(); !status.ok()) return fail(status);
  if (absl::Status status = PrepareDirs(); !status.ok()) return fail(status);
  if (absl::Status status = MakeCertificates(); !status.ok()) return fail(status);
  if (absl::Status status = StartServer(); !status.ok()) return fail(status);
  for (auto& node : nodes_) {
    if (absl::Status status = StartAgent(*node); !status.ok()) return fail(status);
  }
  if (absl::Status status = AwaitConnected(); !status.ok()) return fail(status);
  PrintBanner();
  const double duration = absl::GetFlag(FLAGS_duration);
  const absl::Duration interval = absl::Seconds(std::max(0.1, absl::GetFlag(FLAGS_interval)));
  const double ebusy_period = absl::GetFlag(FLAGS_ebusy_period);
  double kill_at = absl::GetFlag(FLAGS_kill_vmm_at);
  if (kill_at < 0) kill_at = duration > 0 ? duration * 2 / 3 : 10;
  if (memlock_) {
    Say(absl::StrFormat(
        "Setting up: on each node a reference VMM process (dmapin-reference-vmm) keeps %s of "
        "guest RAM in a memfd, creates its context vmm-N and container vmm-N/dma, attaches the "
        "RAM over the agent's memory socket and registers it",
        Human(kVmmGuestRam)));
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (absl::Status status = StartVmm(*nodes_[i], static_cast<int>(i)); !status.ok()) {
        return fail(status);
      }
    }
    if (absl::Status status = ApplyPolicies(); !status.ok()) return fail(status);
    if (absl::Status status = RequestVmmRegistrations(); !status.ok()) return fail(status);
    Say(absl::StrFormat(
        "Workload: %d reference VMMs map/unmap %s chunks of their RAM on a DmaSession as fast as "
        "they can (niced: the reference VMM has no rate flag); no EBUSY demonstration (it needs "
        "a VMM that unmaps on command); %s; %s",
        nodes_.size(), Human(kVmmMapBytes),
        kill_at > 0 && (duration <= 0 || kill_at < duration)
            ? absl::StrFormat("%s's VMM is killed (SIGKILL) at %.0f s", nodes_.back()->name,
                              kill_at)
            : "no VMM is killed",
        duration > 0 ? absl::StrFormat("stops after %.0f s", duration) : "Ctrl-C stops"));
  } else {
    Say("Setting up: on each node a VMM creates contexts vm-1, vm-2 and containers vm-1/vfio-0, "
        "vm-2/vfio-0 over the agent's Unix socket");
    for (auto& node : nodes_) {
      if (absl::Status status = SetUpNode(*node); !status.ok()) return fail(status);
    }
    if (absl::Status status = ApplyPolicies(); !status.ok()) return fail(status);
    if (absl::Status status = RequestRegistrations(); !status.ok()) return fail(status);
    Say(absl::StrFormat(
        "Workload: %d VMMs map/unmap random pages over the Unix sockets (%d op/s each); %s; %s",
        nodes_.size(), absl::GetFlag(FLAGS_vmm_ops_per_sec),
        ebusy_period > 0
            ? absl::StrFormat("an UNREGISTER of a mapped region every %.0f s", ebusy_period)
            : "no UNREGISTERs",
        duration > 0 ? absl::StrFormat("stops after %.0f s", duration) : "Ctrl-C stops"));
  }
  demo_start = absl::Now();
  std::vector<std::thread> threads;
  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  if (memlock_) {
    watch_context_ = std::make_unique<grpc::ClientContext>();
    threads.emplace_back([this] { WatchEvents(); });
  } else {
    for (size_t i = 0; i < nodes_.size(); ++i) {
      threads.emplace_back([this, i, seed] { RunVmm(*nodes_[i], seed * 1000003 + i); });
    }
    threads.emplace_back([this] { RunOperator(); });
  }

  const absl::Time end =
      duration > 0 ? demo_start + absl::Seconds(duration) : absl::InfiniteFuture();
  const absl::Time kill_time =
      memlock_ && kill_at > 0 ? demo_start + absl::Seconds(kill_at) : absl::InfiniteFuture();
  bool killed = false;
  absl::Time last_table = demo_start;
  absl::Time next_table = demo_start + interval;
  int rc = 0;
  bool signaled = false;
  while (true) {
    const absl::Time now = absl::Now();
    if (now >= end) break;
    const absl::Duration wait =
        std::min({next_table, end, killed ? absl::InfiniteFuture() : kill_time}) - now;
    const timespec timeout = absl::ToTimespec(std::max(wait, absl::Milliseconds(1)));
    const int signal = sigtimedwait(&signals, nullptr, &timeout);
    if (signal > 0) {
      Say(absl::StrFormat("%sgot %s, stopping", Stamp(), strsignal(signal)));
      signaled = true;
      break;
    }
    if (absl::Status status = CheckProcesses(); !status.ok()) {
      std::fprintf(stderr, "fleet_demo: %s\n", std::string(status.message()).c_str());
      rc = 1;
      break;
    }
    if (absl::Now() >= end) break;  // the last table follows
    if (!killed && absl::Now() >= kill_time) {
      killed = true;
      KillOneVmm();
      continue;
    }
    if (absl::Now() >= next_table) {
      if (memlock_) {
        PrintVmmTable(absl::Now() - last_table);
      } else {
        PrintTable(absl::Now() - last_table);
      }
      last_table = absl::Now();
      next_table += interval;
      if (next_table < last_table) next_table = last_table + interval;
    }
  }
  // After Ctrl-C the children got the SIGINT too and are on their way out: no last table then.
  if (rc == 0 && !signaled) {
    if (memlock_) {
      PrintVmmTable(absl::Now() - last_table);
      WithdrawRegistrations();
    } else {
      PrintTable(absl::Now() - last_table);
    }
  }
  stop_.Notify();
  if (watch_context_ != nullptr) watch_context_->TryCancel();
  for (std::thread& thread : threads) thread.join();
  // The context holds the call, and with it the connection the server's shutdown waits for.
  watch_context_.reset();
  if (memlock_) {
    if (!StopVmms()) rc = 1;
    Say("Stopping the agents and the server (SIGTERM)");
    if (!StopProcesses()) rc = 1;
    if (rc == 0) Say("done: every process exited cleanly");
    return rc;
  }
  uint64_t maps = 0, unmaps = 0, errors = 0;
  for (const auto& node : nodes_) {
    maps += node->maps.load();
    unmaps += node->unmaps.load();
    errors += node->errors.load();
  }
  Say(
      absl::StrFormat("VMMs: %d maps, %d unmaps, %d errors; EBUSY demos: %d started, %d "
                      "satisfied. Stopping the agents and the server (SIGTERM)",
                      maps, unmaps, errors, ebusy_started_.load(), ebusy_completed_.load()));
  if (!StopProcesses()) rc = 1;
  if (rc == 0) Say("done: every process exited cleanly");
  return rc;
}

}  // namespace
}  // namespace dmapin

int main(int argc, char** argv) {
  const std::vector<char*> positional = dmapin::InitBinary(
      argc, argv,
      "A local dmapin fleet: dmapin-server and node agents (sim backend, or memlock with a "
      "reference VMM process per node) on 127.0.0.1, simulated "
      "VMMs mapping DMA, policies and intents through the Admin API, EBUSY retries, and a live "
      "table of the nodes.\n"
      "Usage: fleet_demo [--backend=sim|memlock] [--duration=SECONDS] [--interval=SECONDS] "
      "[--nodes=N] [--base_port=PORT] [--state_dir=DIR]",
      "fleet_demo");
  if (positional.size() > 1) {
    std::fprintf(stderr, "fleet_demo: unexpected argument: %s\n", positional[1]);
    return 2;
  }
  // SIGTERM/SIGINT are taken by sigtimedwait in Run; blocked before any thread starts. The child
  // processes unblock them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  const std::string backend = absl::GetFlag(FLAGS_backend);
  if (backend != "sim" && backend != "memlock") {
    std::fprintf(stderr, "fleet_demo: --backend=%s: sim or memlock\n", backend.c_str());
    return 2;
  }
  if (backend == "memlock" && geteuid() != 0) {
    // mlock of every VMM's guest RAM needs CAP_IPC_LOCK (or a large RLIMIT_MEMLOCK).
    std::fprintf(stderr,
                 "fleet_demo: --backend=memlock pins real memory (mlock) and needs root (euid "
                 "%d); run it as root, or use the default --backend=sim\n",
                 static_cast<int>(geteuid()));
    return 2;
  }
  dmapin::FleetDemo demo(
      dmapin::FindBinary(absl::GetFlag(FLAGS_agent_binary), "agent/dmapin-agent", argv[0]),
      dmapin::FindBinary(absl::GetFlag(FLAGS_server_binary), "server/dmapin-server", argv[0]),
      backend == "memlock" ? dmapin::FindBinary(absl::GetFlag(FLAGS_reference_vmm_binary),
                                                "client/dmapin-reference-vmm", argv[0])
                           : "",
      backend,
      dmapin::FindBinary(absl::GetFlag(FLAGS_make_dev_certs), "tools/certs/make_dev_certs.sh",
                         argv[0]));
  return demo.Run(signals);
}
