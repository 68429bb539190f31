// A real, unmodified QEMU as the VMM of the real dmapin-agent binary (a data dependency,
// --agent_binary). QEMU runs stopped (-S, TCG, no guest OS) with its guest RAM in a shared memfd;
// the test, as the node's management daemon (root, --manager_uids=0), creates a context owned by
// QEMU's pid, attaches QEMU's RAM by the fd-less path (AttachMemory: the agent opens
// /proc/<qemu>/map_files), registers 2 MiB of it and proves that:
//   - the agent's pinned frames are QEMU's (pagemap of both processes, page by page), and bytes
//     written through the agent's mapping are guest-physical memory (HMP `xp`);
//   - DMA calls belong to the owner: Translate and MapDma by the manager or a TCP peer are
//     PERMISSION_DENIED;
//   - QEMU's death (SIGKILL) tears the context and its container down and unpins (VmLck);
//   - QEMU with private guest RAM (plain -m) is refused with EINVAL and nothing changes.
// Skips only when qemu-system-x86_64 is missing or the test is not root.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/unique_fd.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "testing/agent_process.h"
#include "testing/proc_info.h"

namespace dmapin::harness {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr char kContext[] = "qemu";
constexpr char kContainer[] = "qemu/c";
// Generous: QEMU and the agent share two slow cores with whatever else the build runs.
constexpr absl::Duration kStartTimeout = absl::Seconds(60);
constexpr absl::Duration kCommandTimeout = absl::Seconds(30);
constexpr absl::Duration kTeardownTimeout = absl::Seconds(30);

const uint64_t kPage = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));

std::string& AgentBinary() {
  static std::string* binary = new std::string("agent/dmapin-agent");
  return *binary;
}

absl::Status ErrnoError(absl::string_view what) {
  const int err = errno;
  return absl::UnknownError(absl::StrCat(what, ": ", std::strerror(err)));
}

// qemu-system-x86_64 on $PATH (Bazel's test PATH is short: the usual directories too), or "".
std::string FindQemu() {
  std::vector<std::string> dirs;
  if (const char* path = std::getenv("PATH"); path != nullptr) {
    dirs = absl::StrSplit(path, ':', absl::SkipEmpty());
  }
  for (const char* dir : {"/usr/bin", "/usr/local/bin", "/bin"}) dirs.push_back(dir);
  for (const std::string& dir : dirs) {
    const std::string candidate = absl::StrCat(dir, "/qemu-system-x86_64");
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoError(absl::StrCat("open ", path));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The /proc/<pid>/maps line of the mapping holding `va`, or "".
std::string MapsLineOf(pid_t pid, uint64_t va) {
  absl::StatusOr<std::string> maps = ReadFile(absl::StrCat("/proc/", pid, "/maps"));
  if (!maps.ok()) return "";
  for (absl::string_view line : absl::StrSplit(*maps, '\n')) {
    std::pair<absl::string_view, absl::string_view> range = absl::StrSplit(line, ' ');
    std::pair<absl::string_view, absl::string_view> ends = absl::StrSplit(range.first, '-');
    uint64_t start = 0;
    uint64_t end = 0;
    if (absl::SimpleHexAtoi(ends.first, &start) && absl::SimpleHexAtoi(ends.second, &end) &&
        start <= va && va < end) {
      return std::string(line);
    }
  }
  return "";
}

// "dev inode" of a maps line ("00:01 4729"), or "" for anonymous memory.
std::string ObjectOf(absl::string_view maps_line) {
  std::vector<absl::string_view> fields = absl::StrSplit(maps_line, ' ', absl::SkipEmpty());
  if (fields.size() < 5 || fields[4] == "0") return "";
  return absl::StrCat(fields[3], " ", fields[4]);
}

// The lines of /proc/<pid>/maps that map `object` ("dev inode"), joined by newlines.
std::string MapsLinesOfObject(pid_t pid, absl::string_view object) {
  absl::StatusOr<std::string> maps = ReadFile(absl::StrCat("/proc/", pid, "/maps"));
  if (!maps.ok()) return maps.status().ToString();
  std::vector<absl::string_view> lines;
  for (absl::string_view line : absl::StrSplit(*maps, '\n', absl::SkipEmpty())) {
    if (ObjectOf(line) == object) lines.push_back(line);
  }
  return absl::StrJoin(lines, "\n");
}

// --- QEMU and its human monitor ----------------------------------------------------------------

// A QEMU child process; killed (SIGKILL) and reaped by the destructor.
class QemuProcess {
 public:
  static absl::StatusOr<std::unique_ptr<QemuProcess>> Start(const std::string& binary,
                                                            const std::vector<std::string>& args,
                                                            const std::string& log_path) {
    // Everything the child needs is prepared before fork().
    std::vector<std::string> argv_strings = {binary};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& arg : argv_strings) argv.push_back(arg.data());
    argv.push_back(nullptr);
    UniqueFd log(open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    if (!log.valid()) return ErrnoError(absl::StrCat("open ", log_path));
    UniqueFd null(open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (!null.valid()) return ErrnoError("open /dev/null");
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) return ErrnoError("fork");
    if (pid == 0) {
      // Dies with the test, whatever happens to it.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(126);
      dup2(null.get(), STDIN_FILENO);
      dup2(log.get(), STDOUT_FILENO);
      dup2(log.get(), STDERR_FILENO);
      execv(argv[0], argv.data());
      _exit(127);
    }
    return std::unique_ptr<QemuProcess>(new QemuProcess(pid, log_path));
  }

  QemuProcess(const QemuProcess&) = delete;
  QemuProcess& operator=(const QemuProcess&) = delete;
  ~QemuProcess() {
    if (!reaped_) Kill();
  }

  pid_t pid() const { return pid_; }

  // OK while it runs; else how it ended and its log.
  absl::Status CheckRunning() {
    if (!reaped_) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        reaped_ = true;
        status_ = status;
      }
    }
    if (!reaped_) return absl::OkStatus();
    absl::StatusOr<std::string> log = ReadFile(log_path_);
    return absl::FailedPreconditionError(
        absl::StrCat("QEMU (pid ", pid_, ") exited, wait status ", status_,
                     "; its output: ", log.ok() ? *log : log.status().ToString()));
  }

  // SIGKILL and reap.
  void Kill() {
    if (reaped_) return;
    kill(pid_, SIGKILL);
    int status = 0;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    reaped_ = true;
    status_ = status;
  }

 private:
  QemuProcess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}

  const pid_t pid_;
  const std::string log_path_;
  bool reaped_ = false;
  int status_ = 0;
};

// QEMU's human monitor (HMP) on a Unix socket: one command line in, its output back. QEMU's
// readline echoes every keystroke with terminal escapes; the echo line is dropped.
class HmpMonitor {
 public:
  static constexpr absl::string_view kPrompt = "(qemu) ";

  // Connects (retrying while QEMU starts) and reads the banner up to the first prompt.
  static absl::StatusOr<std::unique_ptr<HmpMonitor>> Connect(const std::string& path,
                                                             QemuProcess& qemu,
                                                             absl::Duration timeout) {
    sockaddr_un address = {};
    address.sun_family = AF_UNIX;
    if (path.size() >= sizeof(address.sun_path)) {
      return absl::InvalidArgumentError(absl::StrCat("socket path too long: ", path));
    }
    std::memcpy(address.sun_path, path.data(), path.size());
    const absl::Time deadline = absl::Now() + timeout;
    while (true) {
      if (absl::Status running = qemu.CheckRunning(); !running.ok()) return running;
      UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      if (!fd.valid()) return ErrnoError("socket");
      if (connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0) {
        auto monitor = std::unique_ptr<HmpMonitor>(new HmpMonitor(std::move(fd)));
        absl::StatusOr<std::string> banner = monitor->ReadUntilPrompt(deadline);
        if (!banner.ok()) return banner.status();
        return monitor;
      }
      if (absl::Now() > deadline) {
        return ErrnoError(absl::StrCat("connect ", path, " (QEMU's monitor) for ",
                                       absl::FormatDuration(timeout)));
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
  }

  // Runs one command; its output without the echo, the prompt and '\r's, trimmed.
  absl::StatusOr<std::string> Command(absl::string_view line,
                                      absl::Duration timeout = kCommandTimeout) {
    const std::string text = absl::StrCat(line, "\n");
    size_t sent = 0;
    while (sent < text.size()) {
      const ssize_t n = send(fd_.get(), text.data() + sent, text.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return ErrnoError(absl::StrCat("HMP send \"", line, "\""));
      sent += static_cast<size_t>(n);
    }
    absl::StatusOr<std::string> reply = ReadUntilPrompt(absl::Now() + timeout);
    if (!reply.ok()) {
      return absl::Status(reply.status().code(),
                          absl::StrCat("HMP \"", line, "\": ", reply.status().message()));
    }
    const std::string plain = StripTerminalEscapes(*reply);
    // The first line is the echo of what was typed.
    const size_t echo_end = plain.find('\n');
    absl::string_view output =
        echo_end == std::string::npos ? "" : absl::string_view(plain).substr(echo_end + 1);
    return std::string(absl::StripAsciiWhitespace(output));
  }

 private:
  explicit HmpMonitor(UniqueFd fd) : fd_(std::move(fd)) {}

  // Reads until the text ends with the prompt; returns it without the prompt.
  absl::StatusOr<std::string> ReadUntilPrompt(absl::Time deadline) {
    std::string text;
    while (!absl::EndsWith(text, kPrompt)) {
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) {
        return absl::DeadlineExceededError(
            absl::StrCat("no \"(qemu) \" prompt; read so far: \"", absl::CEscape(text), "\""));
      }
      pollfd pfd = {.fd = fd_.get(), .events = POLLIN, .revents = 0};
      const int ready = poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
      if (ready < 0 && errno == EINTR) continue;
      if (ready < 0) return ErrnoError("poll HMP");
      if (ready == 0) continue;
      char buffer[4096];
      const ssize_t n = recv(fd_.get(), buffer, sizeof(buffer), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return ErrnoError("recv HMP");
      if (n == 0) {
        return absl::UnavailableError(
            absl::StrCat("QEMU closed the monitor; read: \"", absl::CEscape(text), "\""));
      }
      text.append(buffer, static_cast<size_t>(n));
    }
    text.resize(text.size() - kPrompt.size());
    return text;
  }

  // Drops CSI sequences (ESC '[' parameters final-byte) and '\r'.
  static std::string StripTerminalEscapes(absl::string_view text) {
    std::string out;
    for (size_t i = 0; i < text.size(); ++i) {
      if (text[i] == '\x1b' && i + 1 < text.size() && text[i + 1] == '[') {
        i += 2;
        while (i < text.size() && !(text[i] >= 0x40 && text[i] <= 0x7e)) ++i;
        continue;
      }
      if (text[i] != '\r') out.push_back(text[i]);
    }
    return out;
  }

  UniqueFd fd_;
};

// "Host virtual address for 0x1000 (ram0) is 0x7f1663fff000" -> 0x7f1663fff000.
absl::StatusOr<uint64_t> Gpa2Hva(HmpMonitor& monitor, uint64_t gpa) {
  absl::StatusOr<std::string> reply = monitor.Command(absl::StrCat("gpa2hva 0x", absl::Hex(gpa)));
  if (!reply.ok()) return reply.status();
  const std::string kMarker = " is 0x";
  const size_t at = reply->rfind(kMarker);
  uint64_t hva = 0;
  if (!absl::StartsWith(*reply, "Host virtual address for") || at == std::string::npos ||
      !absl::SimpleHexAtoi(absl::StripAsciiWhitespace(reply->substr(at + kMarker.size())), &hva)) {
    return absl::DataLossError(absl::StrCat("gpa2hva 0x", absl::Hex(gpa), ": \"", *reply, "\""));
  }
  return hva;
}

// `xp /<count>xw <gpa>`: "0000000000001000: 0x64636261 0x68676665 ..." -> the words.
absl::StatusOr<std::vector<uint32_t>> ReadGuestWords(HmpMonitor& monitor, uint64_t gpa, int count) {
  const std::string command = absl::StrCat("xp /", count, "xw 0x", absl::Hex(gpa));
  absl::StatusOr<std::string> reply = monitor.Command(command);
  if (!reply.ok()) return reply.status();
  std::vector<uint32_t> words;
  for (absl::string_view line : absl::StrSplit(*reply, '\n', absl::SkipWhitespace())) {
    std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.empty() || !absl::EndsWith(fields[0], ":")) {
      return absl::DataLossError(absl::StrCat(command, ": \"", *reply, "\""));
    }
    for (size_t i = 1; i < fields.size(); ++i) {
      uint32_t word = 0;
      if (!absl::SimpleHexAtoi(fields[i], &word)) {
        return absl::DataLossError(absl::StrCat(command, ": \"", *reply, "\""));
      }
      words.push_back(word);
    }
  }
  if (words.size() != static_cast<size_t>(count)) {
    return absl::DataLossError(absl::StrCat(command, ": \"", *reply, "\""));
  }
  return words;
}

// --- The test ----------------------------------------------------------------------------------

std::unique_ptr<grpc::ClientContext> NewContext() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return context;
}

std::string Describe(const grpc::Status& status) {
  return absl::StrCat("code ", status.error_code(), " \"", status.error_message(), "\"");
}

class QemuVmmTest : public testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) {
      GTEST_SKIP() << "needs root: the agent opens QEMU's /proc/<pid>/map_files (CAP_SYS_ADMIN) "
                      "and the test reads frame numbers from pagemap";
    }
    qemu_binary_ = FindQemu();
    if (qemu_binary_.empty()) {
      GTEST_SKIP() << "qemu-system-x86_64 not found (install the Debian package qemu-system-x86)";
    }
    absl::StatusOr<std::unique_ptr<ScratchDir>> dir = ScratchDir::Create("dmapin-qvmm-");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *std::move(dir);
  }

  void TearDown() override {
    // Channels first: an idle client would make the agent's graceful shutdown wait.
    stub_.reset();
    tcp_stub_.reset();
    if (agent_ != nullptr) {
      const absl::Status stopped = agent_->Terminate(absl::Seconds(20));
      EXPECT_TRUE(stopped.ok()) << stopped;
    }
    monitor_.reset();
    qemu_.reset();
  }

  // QEMU stopped before its first instruction (-S): no guest OS, only its RAM and monitor.
  void StartQemu(bool shared_memfd) {
    std::vector<std::string> args = {"-machine", "q35", "-accel", "tcg", "-m", "128M"};
    if (shared_memfd) {
      args.insert(args.end(), {"-object", "memory-backend-memfd,id=ram0,size=128M,share=on",
                               "-machine", "memory-backend=ram0"});
    }
    const std::string monitor_path = dir_->Join("mon.sock");
    args.insert(args.end(), {"-S", "-nographic", "-display", "none", "-nodefaults", "-monitor",
                             absl::StrCat("unix:", monitor_path, ",server,nowait")});
    absl::StatusOr<std::unique_ptr<QemuProcess>> qemu =
        QemuProcess::Start(qemu_binary_, args, dir_->Join("qemu.log"));
    ASSERT_TRUE(qemu.ok()) << qemu.status();
    qemu_ = *std::move(qemu);
    absl::StatusOr<std::unique_ptr<HmpMonitor>> monitor =
        HmpMonitor::Connect(monitor_path, *qemu_, kStartTimeout);
    ASSERT_TRUE(monitor.ok()) << monitor.status();
    monitor_ = *std::move(monitor);
    absl::StatusOr<uint64_t> hva0 = Gpa2Hva(*monitor_, 0);
    ASSERT_TRUE(hva0.ok()) << hva0.status();
    hva0_ = *hva0;
    std::cout << "QEMU pid " << qemu_->pid() << ", guest-physical 0 at 0x"
              << absl::StrCat(absl::Hex(hva0_)) << ": " << MapsLineOf(qemu_->pid(), hva0_)
              << std::endl;
  }

  void StartAgent() {
    AgentProcessOptions options;
    options.binary = AgentBinary();
    options.args = {
        "--backend=memlock",
        absl::StrCat("--state_dir=", dir_->Join("state")),
        absl::StrCat("--uds_path=", dir_->Join("agent.sock")),
        "--tcp_address=127.0.0.1:0",
        "--manager_uids=0",
        "--metrics_address=127.0.0.1:0",
        "--node_name=qemu-vmm-node",
    };
    options.log_path = dir_->Join("agent.log");
    options.uds_path = dir_->Join("agent.sock");
    options.tcp = true;
    options.start_timeout = kStartTimeout;
    absl::StatusOr<std::unique_ptr<AgentProcess>> agent = AgentProcess::Start(std::move(options));
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = *std::move(agent);
    stub_ = v1::NodeAgent::NewStub(MakeChannel(agent_->uds_target()));
    tcp_stub_ = v1::NodeAgent::NewStub(MakeChannel(agent_->tcp_target()));
  }

  // The manager creates QEMU's context (QEMU owns it) and names its guest RAM [hva0, +16 MiB).
  grpc::Status CreateQemuContext() {
    v1::CreateContextRequest request;
    request.set_name(kContext);
    request.set_owner_pid(qemu_->pid());
    request.set_memlock_unlimited(true);
    v1::Context context;
    grpc::Status status = stub_->CreateContext(NewContext().get(), request, &context);
    if (status.ok()) {
      EXPECT_EQ(context.owner().pid(), qemu_->pid());
    }
    return status;
  }

  grpc::Status AttachGuestRam(v1::Context* context, grpc::ClientContext* call) {
    v1::AttachMemoryRequest request;
    request.set_context(kContext);
    v1::MemorySlot* slot = request.add_slots();
    slot->set_ua(hva0_);
    slot->set_size(16 * kMiB);
    return stub_->AttachMemory(call, request, context);
  }

  absl::StatusOr<v1::Context> GetContext() {
    v1::GetContextRequest request;
    request.set_name(kContext);
    v1::Context context;
    grpc::Status status = stub_->GetContext(NewContext().get(), request, &context);
    if (!status.ok()) return FromGrpcStatus(status);
    return context;
  }

  // The `mapped` counter of the context's only region (1 while unmapped, as in the kernel's
  // SPAPR pre-registration).
  absl::StatusOr<uint64_t> MappedCount() {
    v1::ListRegionsRequest request;
    request.set_context(kContext);
    v1::ListRegionsResponse response;
    grpc::Status status = stub_->ListRegions(NewContext().get(), request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    if (response.regions_size() != 1) {
      return absl::FailedPreconditionError(
          absl::StrCat(response.regions_size(), " regions, wanted 1"));
    }
    return response.regions(0).mapped();
  }

  std::string AgentLog() const {
    absl::StatusOr<std::string> log = ReadFile(dir_->Join("agent.log"));
    return log.ok() ? *log : log.status().ToString();
  }

  std::string qemu_binary_;
  std::unique_ptr<ScratchDir> dir_;
  std::unique_ptr<QemuProcess> qemu_;
  std::unique_ptr<HmpMonitor> monitor_;
  uint64_t hva0_ = 0;
  std::unique_ptr<AgentProcess> agent_;
  std::unique_ptr<v1::NodeAgent::Stub> stub_;
  std::unique_ptr<v1::NodeAgent::Stub> tcp_stub_;
};

TEST_F(QemuVmmTest, PinsQemusGuestRamAndReleasesItWhenQemuDies) {
  ASSERT_NO_FATAL_FAILURE(StartQemu(/*shared_memfd=*/true));
  ASSERT_NO_FATAL_FAILURE(StartAgent());
  const pid_t agent_pid = agent_->pid();
  const pid_t qemu_pid = qemu_->pid();

  ASSERT_TRUE(CreateQemuContext().ok());
  v1::Context attached;
  {
    auto call = NewContext();
    grpc::Status status = AttachGuestRam(&attached, call.get());
    ASSERT_TRUE(status.ok()) << Describe(status)
                             << "; QEMU's mapping: " << MapsLineOf(qemu_pid, hva0_);
  }
  ASSERT_EQ(attached.slots_size(), 1);
  const v1::MemorySlot& slot = attached.slots(0);
  EXPECT_EQ(slot.ua(), hva0_);
  EXPECT_EQ(slot.size(), 16 * kMiB);
  EXPECT_TRUE(absl::StrContains(slot.object(), "memfd")) << slot.object();
  const uint64_t agent_ua = slot.agent_ua();
  ASSERT_NE(agent_ua, 0u);
  const std::string ram_object = ObjectOf(MapsLineOf(qemu_pid, hva0_));
  ASSERT_FALSE(ram_object.empty());
  EXPECT_EQ(MapsLinesOfObject(agent_pid, ram_object), MapsLineOf(agent_pid, agent_ua));
  std::cout << "agent pid " << agent_pid << " maps it at 0x" << absl::StrCat(absl::Hex(agent_ua))
            << " (" << slot.object() << "): " << MapsLineOf(agent_pid, agent_ua) << std::endl;

  absl::StatusOr<uint64_t> vmlck_before = harness::VmLckBytes(agent_pid);
  ASSERT_TRUE(vmlck_before.ok()) << vmlck_before.status();
  {
    v1::CreateContainerRequest request;
    request.set_name(kContainer);
    v1::Container container;
    grpc::Status status = stub_->CreateContainer(NewContext().get(), request, &container);
    ASSERT_TRUE(status.ok()) << Describe(status);
  }
  {
    v1::RegisterRegionRequest request;
    request.set_container(kContainer);
    request.set_context(kContext);
    request.set_ua(hva0_);
    request.set_size(2 * kMiB);
    v1::Region region;
    grpc::Status status = stub_->RegisterRegion(NewContext().get(), request, &region);
    ASSERT_TRUE(status.ok()) << Describe(status);
    EXPECT_EQ(region.ua(), hva0_);
    EXPECT_EQ(region.size(), 2 * kMiB);
  }
  // The agent pinned (mlock) exactly the registered 2 MiB of its view of QEMU's RAM.
  absl::StatusOr<uint64_t> vmlck_registered = harness::VmLckBytes(agent_pid);
  ASSERT_TRUE(vmlck_registered.ok()) << vmlck_registered.status();
  EXPECT_EQ(*vmlck_registered - *vmlck_before, 2 * kMiB);
  std::cout << "agent VmLck " << *vmlck_before / 1024 << " kB before the registration, "
            << *vmlck_registered / 1024 << " kB after" << std::endl;

  // (1) Frames: Translate is the owner's (QEMU's), so the manager is refused; the agent's frames
  // are read from its own pagemap instead.
  {
    v1::TranslateRequest request;
    request.set_context(kContext);
    request.add_uas(hva0_);
    v1::TranslateResponse response;
    grpc::Status status = stub_->Translate(NewContext().get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << Describe(status);
    EXPECT_TRUE(absl::StartsWith(status.error_message(), "EPERM:")) << Describe(status);
  }
  {
    v1::ListRegionsRequest request;
    request.set_context(kContext);
    request.set_with_hpas(true);
    v1::ListRegionsResponse response;
    grpc::Status status = stub_->ListRegions(NewContext().get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << Describe(status);
  }
  // Pages at 0, 4 KiB, 1 MiB and the last one (gpa 0xc0000-0xfffff is shadowed by ROM, so
  // nothing between 768 KiB and 1 MiB: `xp` there would read the BIOS, not RAM).
  for (const uint64_t k : {uint64_t{0}, uint64_t{1}, uint64_t{256}, 2 * kMiB / kPage - 1}) {
    const uint64_t gpa = k * kPage;
    SCOPED_TRACE(absl::StrCat("gpa 0x", absl::Hex(gpa)));
    // Guest RAM is linear in QEMU's address space.
    absl::StatusOr<uint64_t> hva = Gpa2Hva(*monitor_, gpa);
    ASSERT_TRUE(hva.ok()) << hva.status();
    EXPECT_EQ(*hva, hva0_ + gpa);
    // QEMU itself reads the page, so that its page table maps it (pagemap shows only present
    // pages).
    ASSERT_TRUE(ReadGuestWords(*monitor_, gpa, 1).ok());
    absl::StatusOr<uint64_t> agent_pfn = harness::PageFrame(agent_pid, agent_ua + gpa);
    absl::StatusOr<uint64_t> qemu_pfn = harness::PageFrame(qemu_pid, hva0_ + gpa);
    ASSERT_TRUE(agent_pfn.ok()) << agent_pfn.status();
    ASSERT_TRUE(qemu_pfn.ok()) << qemu_pfn.status();
    EXPECT_NE(*agent_pfn, 0u);
    EXPECT_EQ(*agent_pfn, *qemu_pfn);
    std::cout << "page " << k << ": frame 0x" << absl::StrCat(absl::Hex(*agent_pfn))
              << " in the agent, 0x" << absl::StrCat(absl::Hex(*qemu_pfn)) << " in QEMU"
              << std::endl;
  }

  // (2) Bytes written through the agent's view are guest-physical memory.
  {
    const std::string pattern = "dmapin<->qemu!!";  // 16 bytes with the NUL
    const std::string mem = absl::StrCat("/proc/", agent_pid, "/mem");
    UniqueFd fd(open(mem.c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_TRUE(fd.valid()) << ErrnoError(absl::StrCat("open ", mem));
    ASSERT_EQ(pwrite(fd.get(), pattern.c_str(), 16, static_cast<off_t>(agent_ua + 0x1000)), 16)
        << ErrnoError(absl::StrCat("pwrite ", mem));
    absl::StatusOr<std::vector<uint32_t>> words = ReadGuestWords(*monitor_, 0x1000, 4);
    ASSERT_TRUE(words.ok()) << words.status();
    for (int i = 0; i < 4; ++i) {
      uint32_t expected = 0;
      std::memcpy(&expected, pattern.c_str() + 4 * i, 4);  // x86: little-endian words
      EXPECT_EQ((*words)[i], expected) << "word " << i;
    }
  }

  // (3) DMA calls are the owner's: the manager (over the Unix socket, not QEMU's pid) and a TCP
  // peer are refused, and the region's map count does not move.
  absl::StatusOr<uint64_t> mapped_before = MappedCount();
  ASSERT_TRUE(mapped_before.ok()) << mapped_before.status();
  for (v1::NodeAgent::Stub* stub : {stub_.get(), tcp_stub_.get()}) {
    const char* who = stub == stub_.get() ? "manager over the Unix socket" : "TCP peer";
    v1::MapDmaRequest request;
    request.set_container(kContainer);
    request.set_iova(0);
    request.set_ua(hva0_);
    request.set_size(kPage);
    v1::MapDmaResponse response;
    grpc::Status status = stub->MapDma(NewContext().get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << who << ": " << Describe(status);
    EXPECT_TRUE(absl::StartsWith(status.error_message(), "EPERM:")) << Describe(status);
  }
  absl::StatusOr<uint64_t> mapped_after = MappedCount();
  ASSERT_TRUE(mapped_after.ok()) << mapped_after.status();
  EXPECT_EQ(*mapped_after, *mapped_before);

  // (4) QEMU dies: the agent sees it (pidfd) and releases the context, its container and pins.
  qemu_->Kill();
  const absl::Time killed = absl::Now();
  const absl::Time deadline = killed + kTeardownTimeout;
  absl::StatusOr<v1::Context> context = GetContext();
  while (context.ok() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(100));
    context = GetContext();
  }
  ASSERT_TRUE(absl::IsNotFound(context.status()))
      << "context still there " << absl::FormatDuration(kTeardownTimeout)
      << " after QEMU's SIGKILL: " << context.status() << "\nagent log:\n"
      << agent_->LogTail();
  // For the record only: no assertion on speed.
  std::cout << "context gone " << absl::FormatDuration(absl::Now() - killed)
            << " after QEMU's SIGKILL (polled every 100 ms)" << std::endl;
  {
    v1::GetContainerRequest request;
    request.set_name(kContainer);
    v1::Container container;
    grpc::Status status = stub_->GetContainer(NewContext().get(), request, &container);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << Describe(status);
  }
  absl::StatusOr<uint64_t> vmlck_after = harness::VmLckBytes(agent_pid);
  while (vmlck_after.ok() && *vmlck_after != *vmlck_before && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(100));
    vmlck_after = harness::VmLckBytes(agent_pid);
  }
  ASSERT_TRUE(vmlck_after.ok()) << vmlck_after.status();
  EXPECT_EQ(*vmlck_after, *vmlck_before);
  std::cout << "agent VmLck " << *vmlck_after / 1024 << " kB after the teardown" << std::endl;
  // The agent's mapping of QEMU's RAM is gone too (looked up by the memfd's device and inode:
  // the address itself may be reused). It goes with the context's last reference, which the
  // exit watch's thread may hold a moment after the context left the name table.
  std::string still_mapped = MapsLinesOfObject(agent_pid, ram_object);
  while (!still_mapped.empty() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
    still_mapped = MapsLinesOfObject(agent_pid, ram_object);
  }
  EXPECT_EQ(still_mapped, "");

  // The agent still serves, and reports an empty node.
  ASSERT_TRUE(agent_->CheckRunning().ok()) << agent_->CheckRunning();
  {
    v1::NodeStatus node;
    grpc::Status status =
        stub_->GetNodeStatus(NewContext().get(), v1::GetNodeStatusRequest(), &node);
    ASSERT_TRUE(status.ok()) << Describe(status);
    EXPECT_EQ(node.contexts(), 0u);
    EXPECT_EQ(node.containers(), 0u);
    EXPECT_EQ(node.regions(), 0u);
    EXPECT_EQ(node.locked_bytes(), 0u);
  }
  const int metrics_port = PortFromLog(AgentLog(), "metrics");
  ASSERT_NE(metrics_port, 0) << "no \"(metrics port N)\" in the agent's log";
  absl::StatusOr<std::string> metrics = ScrapeMetrics(metrics_port);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_EQ(MetricValue(*metrics, "dmapin_agent_contexts").value_or(-1), 0.0);
  EXPECT_EQ(MetricValue(*metrics, "dmapin_agent_locked_bytes").value_or(-1), 0.0);
}

TEST_F(QemuVmmTest, RefusesQemusPrivateGuestRam) {
  ASSERT_NO_FATAL_FAILURE(StartQemu(/*shared_memfd=*/false));
  ASSERT_NO_FATAL_FAILURE(StartAgent());
  const std::string maps_line = MapsLineOf(qemu_->pid(), hva0_);
  ASSERT_FALSE(maps_line.empty());
  EXPECT_TRUE(absl::StrContains(maps_line, " rw-p ")) << maps_line;  // private anonymous

  ASSERT_TRUE(CreateQemuContext().ok());
  absl::StatusOr<uint64_t> vmlck_before = VmLckBytes(agent_->pid());
  ASSERT_TRUE(vmlck_before.ok()) << vmlck_before.status();
  v1::Context attached;
  auto call = NewContext();
  grpc::Status status = AttachGuestRam(&attached, call.get());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << Describe(status);
  EXPECT_TRUE(absl::StartsWith(status.error_message(), "EINVAL:")) << Describe(status);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "private mapping")) << Describe(status);
  const auto& trailers = call->GetServerTrailingMetadata();
  auto errno_trailer = trailers.find("dmapin-errno");
  ASSERT_NE(errno_trailer, trailers.end());
  EXPECT_EQ(std::string(errno_trailer->second.data(), errno_trailer->second.size()), "EINVAL");
  std::cout << "AttachMemory of private RAM: " << Describe(status) << std::endl;

  // Nothing changed: the context is there, without slots, and nothing is mapped or locked.
  absl::StatusOr<v1::Context> context = GetContext();
  ASSERT_TRUE(context.ok()) << context.status();
  EXPECT_EQ(context->slots_size(), 0);
  EXPECT_EQ(context->owner().pid(), qemu_->pid());
  EXPECT_EQ(*VmLckBytes(agent_->pid()), *vmlck_before);

  // QEMU keeps running; the context goes with it.
  ASSERT_TRUE(qemu_->CheckRunning().ok()) << qemu_->CheckRunning();
  qemu_->Kill();
  const absl::Time deadline = absl::Now() + kTeardownTimeout;
  while (GetContext().ok() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(100));
  EXPECT_TRUE(absl::IsNotFound(GetContext().status())) << GetContext().status();
}

}  // namespace
}  // namespace dmapin::harness

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--agent_binary=")) {
      dmapin::harness::AgentBinary() = std::string(arg);
    }
  }
  return RUN_ALL_TESTS();
}
