// VmmClient against the real dmapin-agent binary (--agent_binary), across processes:
//  - sim backend: contexts, containers, simulated registrations, DmaSession, Translate, and the
//    error contract as the library hands it on (code, "EXXX:" message, ErrnoOf);
//  - memlock backend (root): memfd guest RAM attached through the memory socket, the frames the
//    agent pins are this process's own (/proc/self/pagemap), another process may not map or
//    translate on the context, and a VMM's exit tears its context down and unpins everything;
//  - the reference VMM (--reference_vmm_binary) runs its workload against both backends.
// Children that must be other processes are this binary run again (/proc/self/exe) with
// DMAPIN_VMM_CLIENT_TEST_ROLE set, or the reference VMM.
#include "client/vmm_client.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/memory_socket_client.h"
#include "common/errno_status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/agent_process.h"
#include "testing/eventually.h"
#include "testing/proc_info.h"

namespace dmapin::client {
namespace {

using ::dmapin::harness::AgentProcess;
using ::dmapin::harness::AgentProcessOptions;
using ::dmapin::harness::ScratchDir;
using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr char kRoleEnv[] = "DMAPIN_VMM_CLIENT_TEST_ROLE";
constexpr uint64_t kSimPage = 65536;
constexpr uint64_t kSimUa = 0x10000000;
const uint64_t kPage = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));

std::string& AgentBinary() {
  static std::string* binary = new std::string("agent/dmapin-agent");
  return *binary;
}
std::string& ReferenceVmmBinary() {
  static std::string* binary = new std::string("client/dmapin-reference-vmm");
  return *binary;
}

// A failed status with `code`, a message "<errno>: ..." and ErrnoOf == err.
testing::AssertionResult FailsWith(const absl::Status& status, absl::StatusCode code, int err) {
  const std::string name = ErrnoName(err);
  if (status.code() != code || !absl::StartsWith(status.message(), name + ":") ||
      ErrnoOf(status) != err) {
    return testing::AssertionFailure()
           << "wanted " << absl::StatusCodeToString(code) << " / " << name << ", got " << status
           << " (ErrnoOf " << ErrnoName(ErrnoOf(status)) << ")";
  }
  return testing::AssertionSuccess();
}

// The frame (as a physical address) of this process's page at `ua`; 0 when the kernel hides
// frame numbers (no CAP_SYS_ADMIN) or the page is not present.
absl::StatusOr<uint64_t> OwnFrame(uint64_t ua) {
  absl::StatusOr<uint64_t> frame = harness::PageFrame(getpid(), ua);
  if (!frame.ok()) return frame.status();
  return *frame * kPage;
}

using ::dmapin::harness::Eventually;

// A child process with its stdout on a pipe (stderr is the test's).
class Child {
 public:
  // Runs `argv` with `env` added to this process's environment.
  static absl::StatusOr<Child> Spawn(const std::vector<std::string>& argv,
                                     const std::vector<std::string>& env = {}) {
    // Everything is built before fork(): the test is multi-threaded (gRPC).
    std::vector<std::string> environment = env;
    for (char** e = environ; *e != nullptr; ++e) environment.emplace_back(*e);
    std::vector<char*> args, envp;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    for (const std::string& e : environment) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) return ErrnoStatus(errno, "pipe2");
    const pid_t pid = fork();
    if (pid < 0) return ErrnoStatus(errno, "fork");
    if (pid == 0) {
      dup2(pipe_fds[1], STDOUT_FILENO);
      execve(args[0], args.data(), envp.data());
      _exit(127);
    }
    close(pipe_fds[1]);
    return Child(pid, pipe_fds[0]);
  }

  Child(Child&& other) noexcept
      : pid_(std::exchange(other.pid_, -1)), out_(std::exchange(other.out_, -1)) {}
  Child& operator=(Child&&) = delete;
  ~Child() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) close(out_);
  }

  pid_t pid() const { return pid_; }

  // Reads stdout until EOF or `timeout`, then waits for the exit (SIGKILL past the timeout).
  // Returns the wait status; the output is in output().
  int Finish(absl::Duration timeout) {
    const absl::Time end = absl::Now() + timeout;
    char buffer[4096];
    while (out_ >= 0) {
      const int left =
          static_cast<int>(std::max<int64_t>(absl::ToInt64Milliseconds(end - absl::Now()), 0));
      pollfd pfd{out_, POLLIN, 0};
      if (poll(&pfd, 1, left) <= 0) break;
      const ssize_t n = read(out_, buffer, sizeof(buffer));
      if (n <= 0) {
        close(out_);
        out_ = -1;
        break;
      }
      output_.append(buffer, static_cast<size_t>(n));
    }
    if (absl::Now() >= end) kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }

  void Signal(int signo) const { kill(pid_, signo); }
  const std::string& output() const { return output_; }

 private:
  Child(pid_t pid, int out) : pid_(pid), out_(out) {}
  pid_t pid_ = -1;
  int out_ = -1;
  std::string output_;
};

std::string DescribeWait(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exit status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("signal ", WTERMSIG(status));
  return absl::StrCat("wait status ", status);
}

// Sends one record of half a request with `fd` attached (a truncated message), as a peer that
// dies mid-message would leave it.
ssize_t sendmsg_fd(int socket, int fd) {
  char half[] = {0x0a, 0x40, 'v'};  // a field 1 string of 64 bytes, cut after one
  iovec iov{half, sizeof(half)};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  message.msg_control = control;
  message.msg_controllen = sizeof(control);
  cmsghdr* cmsg = CMSG_FIRSTHDR(&message);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
  return sendmsg(socket, &message, MSG_NOSIGNAL);
}

// --- The child roles ----------------------------------------------------------------------------

std::string Env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : "";
}

// Another process of the same uid trying the owner-only calls on someone else's context; prints
// "map <code> <errno>" and "translate <code> <errno>".
int RunIntruder() {
  // Another uid too: drop to it, keeping group 0 so the sockets (root:root, 0660) still let it in.
  if (const std::string uid_text = Env("DMAPIN_TEST_AS_UID"); !uid_text.empty()) {
    uint32_t uid = 0;
    const gid_t groups[] = {0};
    if (!absl::SimpleAtoi(uid_text, &uid) || setgroups(1, groups) != 0 || setgid(uid) != 0 ||
        setuid(uid) != 0) {
      std::cerr << "intruder: cannot become uid " << uid_text << ": " << strerror(errno) << "\n";
      return 2;
    }
  }
  absl::StatusOr<std::unique_ptr<VmmClient>> client =
      VmmClient::Connect({.uds_path = Env("DMAPIN_TEST_UDS")});
  if (!client.ok()) {
    std::cerr << "intruder: " << client.status() << "\n";
    return 1;
  }
  uint64_t ua = 0;
  if (!absl::SimpleAtoi(Env("DMAPIN_TEST_UA"), &ua)) return 2;
  absl::StatusOr<std::unique_ptr<DmaSession>> session = (*client)->StartDmaSession();
  if (!session.ok()) return 1;
  const absl::Status map = (*session)->Map(Env("DMAPIN_TEST_CONTAINER"), 0x100000, ua, kPage);
  const absl::StatusOr<std::vector<uint64_t>> translate =
      (*client)->Translate(Env("DMAPIN_TEST_CONTEXT"), {ua});
  // Nor through a container of its own: registering another's context is refused to a
  // non-manager (the test's agent has no --manager_uids, so root is none), which leaves the
  // container empty: a map on it is EPERM too ("map before any register").
  const std::string own = "intruder/c";
  const absl::Status created = (*client)->CreateContainer(own).status();
  const absl::Status registered =
      (*client)->RegisterRegion(own, Env("DMAPIN_TEST_CONTEXT"), ua, kPage).status();
  const absl::Status own_map = (*session)->Map(own, 0, ua, kPage);
  if (created.ok()) (*client)->ReleaseContainer(own).IgnoreError();
  std::cout << "own_container " << static_cast<int>(created.code()) << " register "
            << static_cast<int>(registered.code()) << " map " << static_cast<int>(own_map.code())
            << " " << ErrnoName(ErrnoOf(own_map)) << "\n";
  // Nor attach memory of its own to it (the memory socket knows it by SO_PEERCRED).
  absl::StatusOr<GuestRam> ram = GuestRam::CreateMemfd("intruder-ram", kPage);
  if (!ram.ok()) return 1;
  const GuestRamSlot slot = SlotOf(*ram);
  const absl::Status attach =
      (*client)->AttachMemory(Env("DMAPIN_TEST_CONTEXT"), {&slot, 1}).status();
  std::cout << "attach " << static_cast<int>(attach.code()) << " " << ErrnoName(ErrnoOf(attach))
            << "\n";
  // Nor change anything of the owner's by the control calls: each answers EPERM.
  const std::string container = Env("DMAPIN_TEST_CONTAINER");
  const std::string context = Env("DMAPIN_TEST_CONTEXT");
  const std::pair<const char*, absl::Status> control[] = {
      {"unary_unmap", (*client)->UnmapDma(container, 0, kPage)},
      {"unregister", (*client)->UnregisterRegion(container, ua, 16 * kPage)},
      {"release", (*client)->ReleaseContainer(container)},
      {"teardown", (*client)->TeardownContext(context)},
  };
  // Nor take its devices, nor give it a container back (the memory socket's device handoff).
  const std::string device = "0000:00:03.0";
  absl::StatusOr<std::unique_ptr<MemorySocketClient>> socket =
      MemorySocketClient::Connect(Env("DMAPIN_TEST_UDS") + ".memory");
  if (!socket.ok()) return 1;
  v1::OpenDevicesRequest open;
  open.set_container(container);
  open.add_devices(device);
  const absl::Status devices = (*socket)->OpenDevices(open, nullptr).status();
  const absl::Status adopt = (*socket)->AdoptContainer(container, ram->fd()).status();
  std::cout << "open_devices " << static_cast<int>(devices.code()) << " "
            << ErrnoName(ErrnoOf(devices)) << "\n"
            << "adopt " << static_cast<int>(adopt.code()) << " " << ErrnoName(ErrnoOf(adopt))
            << "\n";
  for (const auto& [call, status] : control) {
    std::cout << call << " " << static_cast<int>(status.code()) << " " << ErrnoName(ErrnoOf(status))
              << "\n";
  }
  std::cout << "map " << static_cast<int>(map.code()) << " " << ErrnoName(ErrnoOf(map)) << "\n"
            << "translate " << static_cast<int>(translate.status().code()) << " "
            << ErrnoName(ErrnoOf(translate.status())) << "\n"
            << "map_message " << map.message() << "\n";
  std::cout.flush();
  return 0;
}

// --- Fixture ------------------------------------------------------------------------------------

class VmmClientTest : public testing::Test {
 protected:
  void StartAgent(const std::string& backend) {
    absl::StatusOr<std::unique_ptr<ScratchDir>> dir = ScratchDir::Create("dmapin-vc-");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *std::move(dir);
    uds_ = dir_->Join("a.sock");
    AgentProcessOptions options;
    options.binary = AgentBinary();
    options.args = {
        absl::StrCat("--backend=", backend),
        absl::StrCat("--sim_page_size=", kSimPage),
        absl::StrCat("--state_dir=", dir_->Join("state")),
        absl::StrCat("--uds_path=", uds_),
        "--tcp_address=",
        "--metrics_address=",
        "--node_name=vc-node",
    };
    options.log_path = dir_->Join("agent.log");
    options.uds_path = uds_;
    absl::StatusOr<std::unique_ptr<AgentProcess>> agent = AgentProcess::Start(std::move(options));
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = *std::move(agent);
    absl::StatusOr<std::unique_ptr<VmmClient>> client = VmmClient::Connect({.uds_path = uds_});
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
  }

  void TearDown() override {
    client_.reset();
    if (agent_ != nullptr) {
      const absl::Status stopped = agent_->Terminate(absl::Seconds(10));
      EXPECT_TRUE(stopped.ok()) << stopped;
    }
  }

  // The reference VMM with `flags` after its --uds_path.
  absl::StatusOr<Child> StartReferenceVmm(const std::vector<std::string>& flags) {
    std::vector<std::string> argv = {ReferenceVmmBinary(), absl::StrCat("--uds_path=", uds_)};
    argv.insert(argv.end(), flags.begin(), flags.end());
    return Child::Spawn(argv);
  }

  // Runs the reference VMM for 2 s and checks its exit and summary; no context is left.
  void RunReferenceVmm(const std::string& backend) {
    absl::StatusOr<Child> vmm =
        StartReferenceVmm({"--duration_seconds=2", "--guest_ram_bytes=8388608", "--name=ref-vmm"});
    ASSERT_TRUE(vmm.ok()) << vmm.status();
    const int status = vmm->Finish(absl::Seconds(60));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << DescribeWait(status) << "; stdout: " << vmm->output();
    EXPECT_THAT(
        vmm->output(),
        StartsWith(absl::StrCat("dmapin-reference-vmm: summary context=ref-vmm backend=", backend,
                                " simulated=", backend == "sim" ? "true" : "false", " maps=")));
    EXPECT_THAT(vmm->output(), HasSubstr(" errors=0 "));
    EXPECT_THAT(vmm->output(), HasSubstr("calls_per_second="));
    EXPECT_EQ(std::count(vmm->output().begin(), vmm->output().end(), '\n'), 1) << vmm->output();
    EXPECT_TRUE(
        FailsWith(client_->GetContext("ref-vmm").status(), absl::StatusCode::kNotFound, ENOENT));
  }

  std::unique_ptr<ScratchDir> dir_;
  std::string uds_;
  std::unique_ptr<AgentProcess> agent_;
  std::unique_ptr<VmmClient> client_;
};

// --- sim backend --------------------------------------------------------------------------------

TEST_F(VmmClientTest, SimulatedVmmRegistersMapsTranslatesAndGetsErrnos) {
  ASSERT_NO_FATAL_FAILURE(StartAgent("sim"));
  absl::StatusOr<v1::NodeStatus> node = client_->GetNodeStatus();
  ASSERT_TRUE(node.ok()) << node.status();
  EXPECT_EQ(node->backend(), "sim");
  EXPECT_EQ(node->page_size(), kSimPage);

  absl::StatusOr<v1::Context> context = client_->CreateContext("vm-a");
  ASSERT_TRUE(context.ok()) << context.status();
  EXPECT_EQ(context->owner().pid(), getpid());
  EXPECT_TRUE(context->memlock_unlimited());
  EXPECT_TRUE(
      FailsWith(client_->CreateContext("vm-a").status(), absl::StatusCode::kAlreadyExists, EEXIST));
  // Simulated addresses: nothing to attach.
  absl::StatusOr<GuestRam> ram = GuestRam::CreateMemfd("sim-ram", kSimPage);
  ASSERT_TRUE(ram.ok()) << ram.status();
  const GuestRamSlot slot = SlotOf(*ram);
  EXPECT_TRUE(FailsWith(client_->AttachMemory("vm-a", {&slot, 1}).status(),
                        absl::StatusCode::kInvalidArgument, EINVAL));

  absl::StatusOr<v1::Container> container = client_->CreateContainer("vm-a/c");
  ASSERT_TRUE(container.ok()) << container.status();
  EXPECT_EQ(container->iommu_page_size(), kSimPage);
  absl::StatusOr<v1::Region> region =
      client_->RegisterRegion("vm-a/c", "vm-a", kSimUa, 16 * kSimPage);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(region->size(), 16 * kSimPage);
  EXPECT_EQ(region->context(), "vm-a");

  absl::StatusOr<std::unique_ptr<DmaSession>> session = client_->StartDmaSession();
  ASSERT_TRUE(session.ok()) << session.status();
  DmaSession& dma = **session;
  EXPECT_TRUE(dma.Map("vm-a/c", 0, kSimUa, kSimPage).ok());
  EXPECT_TRUE(dma.Map("vm-a/c", kSimPage, kSimUa + kSimPage, 2 * kSimPage).ok());

  absl::StatusOr<std::vector<uint64_t>> hpas =
      client_->Translate("vm-a", {kSimUa, kSimUa + kSimPage + 5});
  ASSERT_TRUE(hpas.ok()) << hpas.status();
  ASSERT_EQ(hpas->size(), 2u);
  EXPECT_NE((*hpas)[0], 0u);
  EXPECT_EQ((*hpas)[1] % kSimPage, 5u);  // the offset in the page is kept

  // Errors as the contract names them (README "Errors"); the session survives each.
  EXPECT_TRUE(FailsWith(client_->Translate("vm-a", {kSimUa + 64 * kSimPage}).status(),
                        absl::StatusCode::kOutOfRange, EFAULT));
  EXPECT_TRUE(FailsWith(dma.Map("vm-a/c", 8 * kSimPage, 0x40000000, kSimPage),
                        absl::StatusCode::kInvalidArgument, EINVAL));
  EXPECT_TRUE(
      FailsWith(dma.Map("vm-a/nope", 0, kSimUa, kSimPage), absl::StatusCode::kNotFound, ENOENT));
  EXPECT_TRUE(FailsWith(dma.Map("vm-a/c", 8 * kSimPage, kSimUa + 1, kSimPage),  // misaligned
                        absl::StatusCode::kInvalidArgument, EINVAL));
  // A map over a mapped IOVA replaces its entry (H_PUT_TCE semantics), not an error.
  EXPECT_TRUE(dma.Map("vm-a/c", 0, kSimUa + 4 * kSimPage, kSimPage).ok());
  EXPECT_TRUE(FailsWith(dma.Unmap("vm-a/nope", 0, kSimPage), absl::StatusCode::kNotFound, ENOENT));
  EXPECT_TRUE(FailsWith(client_->UnregisterRegion("vm-a/c", kSimUa, 16 * kSimPage),
                        absl::StatusCode::kFailedPrecondition, EBUSY));
  EXPECT_TRUE(FailsWith(client_->Translate("vm-nope", {kSimUa}).status(),
                        absl::StatusCode::kNotFound, ENOENT));

  EXPECT_TRUE(dma.Unmap("vm-a/c", 0, kSimPage).ok());
  EXPECT_TRUE(dma.Unmap("vm-a/c", kSimPage, 2 * kSimPage).ok());
  // The unary calls, same semantics.
  EXPECT_TRUE(client_->MapDma("vm-a/c", 0, kSimUa, kSimPage).ok());
  EXPECT_TRUE(FailsWith(client_->MapDma("vm-a/nope", 0, kSimUa, kSimPage),
                        absl::StatusCode::kNotFound, ENOENT));
  EXPECT_TRUE(client_->UnmapDma("vm-a/c", 0, kSimPage).ok());
  EXPECT_TRUE(dma.Close().ok());
  EXPECT_FALSE(dma.Map("vm-a/c", 0, kSimUa, kSimPage).ok());  // closed

  EXPECT_TRUE(client_->UnregisterRegion("vm-a/c", kSimUa, 16 * kSimPage).ok());
  EXPECT_TRUE(client_->ReleaseContainer("vm-a/c").ok());
  EXPECT_TRUE(client_->TeardownContext("vm-a").ok());
  EXPECT_TRUE(FailsWith(client_->GetContext("vm-a").status(), absl::StatusCode::kNotFound, ENOENT));
  EXPECT_TRUE(FailsWith(client_->ReleaseContainer("vm-a/c"), absl::StatusCode::kNotFound, ENOENT));
}

TEST_F(VmmClientTest, ConnectToNoAgentIsUnavailable) {
  absl::StatusOr<std::unique_ptr<ScratchDir>> dir = ScratchDir::Create("dmapin-vc-");
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<std::unique_ptr<VmmClient>> client = VmmClient::Connect(
      {.uds_path = (*dir)->Join("none.sock"), .connect_timeout = absl::Milliseconds(300)});
  EXPECT_EQ(client.status().code(), absl::StatusCode::kUnavailable) << client.status();
  EXPECT_THAT(std::string(client.status().message()),
              StartsWith("ENOENT: no dmapin agent serving on unix:"));
  EXPECT_EQ(VmmClient::Connect({.uds_path = std::string(200, 'x')}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(VmmClientTest, DmaSessionOfAGoneAgentIsUnavailable) {
  ASSERT_NO_FATAL_FAILURE(StartAgent("sim"));
  ASSERT_TRUE(client_->CreateContext("vm-b").ok());
  ASSERT_TRUE(client_->CreateContainer("vm-b/c").ok());
  ASSERT_TRUE(client_->RegisterRegion("vm-b/c", "vm-b", kSimUa, 4 * kSimPage).ok());
  absl::StatusOr<std::unique_ptr<DmaSession>> session = client_->StartDmaSession();
  ASSERT_TRUE(session.ok());
  ASSERT_TRUE((*session)->Map("vm-b/c", 0, kSimUa, kSimPage).ok());
  ASSERT_TRUE(agent_->Kill().ok());
  agent_.reset();
  const absl::Status broken = (*session)->Unmap("vm-b/c", 0, kSimPage);
  EXPECT_EQ(broken.code(), absl::StatusCode::kUnavailable) << broken;
  // Every later call answers the same, without blocking.
  EXPECT_EQ((*session)->Unmap("vm-b/c", 0, kSimPage).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*session)->Close().code(), absl::StatusCode::kUnavailable);
}

TEST_F(VmmClientTest, ReferenceVmmOnSimAgent) {
  ASSERT_NO_FATAL_FAILURE(StartAgent("sim"));
  RunReferenceVmm("sim");
}

TEST_F(VmmClientTest, ReferenceVmmEndsCleanlyOnSigterm) {
  ASSERT_NO_FATAL_FAILURE(StartAgent("sim"));
  absl::StatusOr<Child> vmm =
      StartReferenceVmm({"--duration_seconds=0", "--name=ref-term", "--map_bytes=65536"});
  ASSERT_TRUE(vmm.ok()) << vmm.status();
  ASSERT_TRUE(Eventually([&] {
    absl::StatusOr<v1::Context> context = client_->GetContext("ref-term");
    return context.ok() && context->regions() > 0;
  }));
  absl::SleepFor(absl::Milliseconds(300));
  vmm->Signal(SIGTERM);
  const int status = vmm->Finish(absl::Seconds(30));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << DescribeWait(status);
  EXPECT_THAT(vmm->output(), HasSubstr("summary context=ref-term backend=sim"));
  // It cleaned up itself (--teardown_on_exit defaults to true).
  EXPECT_TRUE(
      FailsWith(client_->GetContext("ref-term").status(), absl::StatusCode::kNotFound, ENOENT));
}

// --- memlock backend ----------------------------------------------------------------------------

class MemlockVmmClientTest : public VmmClientTest {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "the memlock backend needs root (euid " << geteuid() << ")";
    void* probe = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(probe, MAP_FAILED);
    const bool locked = mlock(probe, kPage) == 0;
    const int err = errno;
    munmap(probe, kPage);
    if (!locked) GTEST_SKIP() << "mlock unavailable: " << strerror(err);
    ASSERT_NO_FATAL_FAILURE(StartAgent("memlock"));
    absl::StatusOr<uint64_t> vmlck = harness::VmLckBytes(agent_->pid());
    ASSERT_TRUE(vmlck.ok()) << vmlck.status();
    vmlck_before_ = *vmlck;
  }

  // The agent's open descriptors.
  size_t AgentFds() {
    size_t count = 0;
    std::error_code error;
    for (auto it = std::filesystem::directory_iterator(absl::StrCat("/proc/", agent_->pid(), "/fd"),
                                                       error);
         !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
      ++count;
    }
    return count;
  }

  uint64_t AgentVmLck() {
    absl::StatusOr<uint64_t> vmlck = harness::VmLckBytes(agent_->pid());
    EXPECT_TRUE(vmlck.ok()) << vmlck.status();
    return vmlck.ok() ? *vmlck : 0;
  }

  uint64_t vmlck_before_ = 0;
};

TEST_F(MemlockVmmClientTest, AttachedGuestRamIsPinnedInTheVmmsOwnFramesAndOwnerOnly) {
  constexpr uint64_t kPages = 64;
  absl::StatusOr<GuestRam> ram = GuestRam::CreateMemfd("guest-ram", kPages * kPage);
  ASSERT_TRUE(ram.ok()) << ram.status();
  std::memset(ram->data(), 0x5a, ram->size());  // present, for pagemap

  ASSERT_TRUE(client_->CreateContext("vm-m").ok());
  const GuestRamSlot slot = SlotOf(*ram);
  absl::StatusOr<v1::Context> attached = client_->AttachMemory("vm-m", {&slot, 1});
  ASSERT_TRUE(attached.ok()) << attached.status();
  ASSERT_EQ(attached->slots_size(), 1);
  EXPECT_EQ(attached->slots(0).ua(), ram->ua());
  EXPECT_EQ(attached->slots(0).size(), ram->size());
  EXPECT_THAT(attached->slots(0).object(), HasSubstr("memfd:guest-ram"));
  // The same memory twice overlaps.
  EXPECT_TRUE(FailsWith(client_->AttachMemory("vm-m", {&slot, 1}).status(),
                        absl::StatusCode::kInvalidArgument, EINVAL));

  ASSERT_TRUE(client_->CreateContainer("vm-m/c").ok());
  absl::StatusOr<v1::Region> region =
      client_->RegisterRegion("vm-m/c", "vm-m", ram->ua(), 16 * kPage);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(AgentVmLck() - vmlck_before_, 16 * kPage);
  // Memory never attached cannot be registered.
  EXPECT_EQ(
      ErrnoOf(
          client_->RegisterRegion("vm-m/c", "vm-m", ram->ua() + kPages * kPage, kPage).status()),
      EFAULT);

  absl::StatusOr<std::unique_ptr<DmaSession>> session = client_->StartDmaSession();
  ASSERT_TRUE(session.ok());
  ASSERT_TRUE((*session)->Map("vm-m/c", 0, ram->ua(), 4 * kPage).ok());

  // The agent pinned this process's own pages: Translate is what our pagemap shows.
  const uint64_t ua = ram->ua() + 3 * kPage;
  absl::StatusOr<std::vector<uint64_t>> hpas = client_->Translate("vm-m", {ua});
  ASSERT_TRUE(hpas.ok()) << hpas.status();
  absl::StatusOr<uint64_t> frame = OwnFrame(ua);
  ASSERT_TRUE(frame.ok()) << frame.status();
  if (*frame == 0) {
    std::cout << "note: /proc/self/pagemap hides frame numbers (no CAP_SYS_ADMIN): Translate "
                 "not compared with the page's frame\n";
  } else {
    EXPECT_EQ(hpas->front(), *frame);
  }

  // Another process, of the same uid and of another, may neither map on the context nor
  // translate it, nor change anything of it.
  // The scratch directory is the test's (0700): the other uid must reach the sockets in it.
  ASSERT_EQ(chmod(std::string(uds_.substr(0, uds_.rfind('/'))).c_str(), 0711), 0);
  for (const char* as_uid : {"", "65534"}) {
    SCOPED_TRACE(absl::StrCat("intruder uid ", *as_uid == '\0' ? "the same" : as_uid));
    absl::StatusOr<Child> intruder = Child::Spawn(
        {"/proc/self/exe"},
        {absl::StrCat(kRoleEnv, "=intruder"), "DMAPIN_TEST_UDS=" + uds_, "DMAPIN_TEST_CONTEXT=vm-m",
         "DMAPIN_TEST_CONTAINER=vm-m/c", absl::StrCat("DMAPIN_TEST_UA=", ram->ua()),
         absl::StrCat("DMAPIN_TEST_AS_UID=", as_uid)});
    ASSERT_TRUE(intruder.ok()) << intruder.status();
    const int status = intruder->Finish(absl::Seconds(60));
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << DescribeWait(status) << ": " << intruder->output();
    const int denied = static_cast<int>(absl::StatusCode::kPermissionDenied);
    for (const char* call : {"map", "translate", "attach", "unary_unmap", "unregister", "release",
                             "teardown", "open_devices", "adopt"}) {
      EXPECT_THAT(intruder->output(), HasSubstr(absl::StrCat(call, " ", denied, " EPERM\n")));
    }
    EXPECT_THAT(intruder->output(), HasSubstr("map_message EPERM: "));
    EXPECT_THAT(intruder->output(), HasSubstr(absl::StrCat("own_container 0 register ", denied,
                                                           " map ", denied, " EPERM\n")));
    // Nothing changed for the owner.
    absl::StatusOr<v1::Context> after = client_->GetContext("vm-m");
    ASSERT_TRUE(after.ok()) << after.status();
    EXPECT_EQ(after->slots_size(), 1);
    EXPECT_EQ(after->regions(), 1u);
    EXPECT_EQ(after->locked_bytes(), 16 * kPage);
    EXPECT_EQ(AgentVmLck() - vmlck_before_, 16 * kPage);
  }
  EXPECT_TRUE((*session)->Unmap("vm-m/c", 0, 4 * kPage).ok());

  EXPECT_TRUE(client_->TeardownContext("vm-m").ok());
  EXPECT_TRUE(Eventually([&] { return AgentVmLck() == vmlck_before_; }));
  EXPECT_EQ(AgentVmLck(), vmlck_before_);
}

// Bad input on the memory socket, against the real agent: each a clear error, the agent keeps
// serving, nothing changes, and the agent holds no descriptor more afterwards.
TEST_F(MemlockVmmClientTest, BadInputOnTheMemorySocketIsRefusedAndLeaksNothing) {
  ASSERT_TRUE(client_->CreateContext("vm-bad").ok());
  absl::StatusOr<std::unique_ptr<MemorySocketClient>> socket =
      MemorySocketClient::Connect(uds_ + ".memory");
  ASSERT_TRUE(socket.ok()) << socket.status();
  const size_t agent_fds_before = AgentFds();
  absl::StatusOr<GuestRam> ram = GuestRam::CreateMemfd("bad-ram", 4 * kPage);
  ASSERT_TRUE(ram.ok()) << ram.status();

  auto attach = [&](uint64_t ua, uint64_t size, uint64_t offset, int fd) {
    v1::AttachMemoryRequest request;
    request.set_context("vm-bad");
    v1::MemorySlot* slot = request.add_slots();
    slot->set_ua(ua);
    slot->set_size(size);
    slot->set_offset(offset);
    slot->set_fd_index(0);
    return (*socket)->Attach(request, {&fd, 1}).status();
  };
  int sockets[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sockets), 0);
  int pipe_fds[2];
  ASSERT_EQ(pipe2(pipe_fds, O_CLOEXEC), 0);
  const int directory = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(directory, 0);
  const uint64_t ua = ram->ua();
  const struct {
    const char* what;
    absl::Status status;
    int err;
  } cases[] = {
      {"a socket", attach(ua, kPage, 0, sockets[0]), EINVAL},
      {"a pipe", attach(ua, kPage, 0, pipe_fds[0]), EINVAL},
      {"a directory", attach(ua, kPage, 0, directory), EINVAL},
      {"a file smaller than the slot", attach(ua, 8 * kPage, 0, ram->fd()), ENXIO},
      {"an offset past the end", attach(ua, kPage, 16 * kPage, ram->fd()), ENXIO},
      {"a slot that wraps", attach(~uint64_t{0} - kPage + 1, 2 * kPage, 0, ram->fd()), EINVAL},
      {"a misaligned slot", attach(ua + 1, kPage, 0, ram->fd()), EINVAL},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(ErrnoOf(c.status), c.err) << c.what << ": " << c.status;
    EXPECT_THAT(std::string(c.status.message()), StartsWith(ErrnoName(c.err) + ": ")) << c.what;
  }
  // Overlapping slots in one request.
  {
    v1::AttachMemoryRequest request;
    request.set_context("vm-bad");
    for (int i = 0; i < 2; ++i) {
      v1::MemorySlot* slot = request.add_slots();
      slot->set_ua(ua + i * kPage);
      slot->set_size(2 * kPage);
      slot->set_offset(0);
      slot->set_fd_index(0);
    }
    const int fd = ram->fd();
    EXPECT_EQ(ErrnoOf((*socket)->Attach(request, {&fd, 1}).status()), EINVAL);
  }
  // 1,000 descriptors: more than one message may carry (the kernel refuses over 253), and 250 in
  // one message, over the agent's 64.
  {
    std::vector<int> many(1000, ram->fd());
    EXPECT_FALSE((*socket)->SendRaw("x", many).ok());
    std::vector<int> some(250, ram->fd());
    absl::StatusOr<v1::MemorySocketReply> reply = (*socket)->SendRaw("x", some);
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->errno_name(), "E2BIG") << reply->message();
  }
  // A peer that goes away in the middle: connects, sends half a request's worth and leaves.
  {
    absl::StatusOr<std::unique_ptr<MemorySocketClient>> gone =
        MemorySocketClient::Connect(uds_ + ".memory");
    ASSERT_TRUE(gone.ok());
    const int fd = ram->fd();
    ASSERT_GE(sendmsg_fd((*gone)->fd(), fd), 0);
    gone->reset();
  }
  close(sockets[0]);
  close(sockets[1]);
  close(pipe_fds[0]);
  close(pipe_fds[1]);
  close(directory);

  // Nothing was attached, and the agent still serves: the good request succeeds.
  absl::StatusOr<v1::Context> context = client_->GetContext("vm-bad");
  ASSERT_TRUE(context.ok());
  EXPECT_EQ(context->slots_size(), 0);
  EXPECT_TRUE(attach(ua, 4 * kPage, 0, ram->fd()).ok());
  EXPECT_TRUE(client_->TeardownContext("vm-bad").ok());
  // The attach's mapping holds no descriptor; what the refusals received is closed. (Fewer is
  // fine: the agent's own files come and go, e.g. a connection gRPC closed meanwhile.)
  EXPECT_TRUE(Eventually([&] { return AgentFds() <= agent_fds_before; }))
      << AgentFds() << " descriptors, " << agent_fds_before << " before";
}

// The device handoff against the real agent without VFIO: ENODEV naming why, the container
// served as before; a container fd given back that the agent does not wait for is refused and
// closed (the agent's descriptors do not grow).
TEST_F(MemlockVmmClientTest, DeviceHandoffWithoutVfioIsEnodevAndAStrayAdoptionIsRefused) {
  ASSERT_TRUE(client_->CreateContext("vm-dev").ok());
  ASSERT_TRUE(client_->CreateContainer("vm-dev/c").ok());
  const std::string device = "0000:00:03.0";
  absl::StatusOr<std::vector<OpenedDevice>> devices =
      client_->OpenDevices("vm-dev/c", {&device, 1});
  EXPECT_EQ(ErrnoOf(devices.status()), ENODEV) << devices.status();
  EXPECT_THAT(std::string(devices.status().message()), HasSubstr("not VFIO"));
  EXPECT_EQ(client_->container_fd("vm-dev/c"), -1);
  EXPECT_TRUE(client_->AdoptContainers().ok());  // it holds none
  EXPECT_EQ(ErrnoOf(client_->OpenDevices("missing", {&device, 1}).status()), ENOENT);

  absl::StatusOr<std::unique_ptr<MemorySocketClient>> socket =
      MemorySocketClient::Connect(uds_ + ".memory");
  ASSERT_TRUE(socket.ok()) << socket.status();
  const size_t agent_fds_before = AgentFds();
  absl::StatusOr<GuestRam> ram = GuestRam::CreateMemfd("not-a-container", kPage);
  ASSERT_TRUE(ram.ok()) << ram.status();
  absl::StatusOr<v1::MemorySocketReply> adopted = (*socket)->AdoptContainer("vm-dev/c", ram->fd());
  EXPECT_EQ(ErrnoOf(adopted.status()), EINVAL) << adopted.status();
  EXPECT_EQ(AgentFds(), agent_fds_before);
}

TEST_F(MemlockVmmClientTest, VmmExitTearsItsContextDownAndUnpins) {
  absl::StatusOr<Child> vmm = StartReferenceVmm({"--duration_seconds=0", "--teardown_on_exit=false",
                                                 "--name=vm-exit", "--guest_ram_bytes=4194304"});
  ASSERT_TRUE(vmm.ok()) << vmm.status();
  const pid_t pid = vmm->pid();
  ASSERT_TRUE(Eventually([&] {
    absl::StatusOr<v1::Context> context = client_->GetContext("vm-exit");
    return context.ok() && context->regions() > 0;
  })) << "the reference VMM did not register; agent log:\n"
      << agent_->LogTail();
  absl::StatusOr<v1::Context> context = client_->GetContext("vm-exit");
  ASSERT_TRUE(context.ok());
  EXPECT_EQ(context->owner().pid(), pid);
  EXPECT_EQ(context->slots_size(), 1);
  EXPECT_EQ(AgentVmLck() - vmlck_before_, uint64_t{4} << 20);
  absl::SleepFor(absl::Milliseconds(300));  // mid-workload: mappings are installed

  vmm->Signal(SIGKILL);
  const int status = vmm->Finish(absl::Seconds(30));
  EXPECT_TRUE(WIFSIGNALED(status)) << DescribeWait(status);
  EXPECT_TRUE(Eventually([&] {
    return client_->GetContext("vm-exit").status().code() == absl::StatusCode::kNotFound;
  })) << "context still there: agent log:\n"
      << agent_->LogTail();
  EXPECT_TRUE(
      FailsWith(client_->GetContext("vm-exit").status(), absl::StatusCode::kNotFound, ENOENT));
  EXPECT_TRUE(Eventually([&] { return AgentVmLck() == vmlck_before_; }));
  EXPECT_EQ(AgentVmLck(), vmlck_before_);
  absl::StatusOr<v1::NodeStatus> node = client_->GetNodeStatus();
  ASSERT_TRUE(node.ok());
  EXPECT_EQ(node->contexts(), 0u);
  EXPECT_EQ(node->containers(), 0u);
  EXPECT_EQ(node->locked_bytes(), 0u);
}

TEST_F(MemlockVmmClientTest, ReferenceVmmOnMemlockAgent) { RunReferenceVmm("memlock"); }

}  // namespace
}  // namespace dmapin::client

int main(int argc, char** argv) {
  if (const char* role = std::getenv(dmapin::client::kRoleEnv); role != nullptr) {
    if (std::string(role) == "intruder") return dmapin::client::RunIntruder();
    std::cerr << "unknown role " << role << "\n";
    return 2;
  }
  testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--agent_binary=")) {
      dmapin::client::AgentBinary() = std::string(arg);
    } else if (absl::ConsumePrefix(&arg, "--reference_vmm_binary=")) {
      dmapin::client::ReferenceVmmBinary() = std::string(arg);
    }
  }
  return RUN_ALL_TESTS();
}
