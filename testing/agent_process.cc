#include "testing/agent_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "google/protobuf/unknown_field_set.h"
#include "grpcpp/generic/generic_stub.h"

namespace dmapin::harness {
namespace {

// Longest directory we put a socket under: "<dir>/agent.sock" must fit sockaddr_un.sun_path
// (108 bytes with the NUL) with room for a file name.
constexpr size_t kMaxScratchBase = 60;

absl::Status ErrnoError(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", strerror(errno)));
}

std::chrono::system_clock::time_point DeadlineAfter(absl::Duration timeout) {
  return std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout);
}

std::string ToString(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& slice : slices) {
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return out;
}

grpc::ByteBuffer ToByteBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// Reads the file from `offset` on (empty when it cannot be read).
std::string ReadFrom(const std::string& path, uint64_t offset) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  in.seekg(static_cast<std::streamoff>(offset));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

uint64_t FileSize(const std::string& path) {
  std::error_code error;
  const uintmax_t size = std::filesystem::file_size(path, error);
  return error ? 0 : size;
}

// Blocks until the completion queue returns `expected`; false when the operation failed.
bool Await(grpc::CompletionQueue& cq, void* expected) {
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
    if (tag == expected) return ok;
  }
  return false;
}

void Drain(grpc::CompletionQueue& cq) {
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
}

std::string EncodeVarint(uint64_t value) {
  std::string out;
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
  return out;
}

}  // namespace

// --- ScratchDir -------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<ScratchDir>> ScratchDir::Create(absl::string_view prefix) {
  std::string base = "/tmp";
  if (const char* dir = std::getenv("TEST_TMPDIR");
      dir != nullptr && *dir != '\0' && strlen(dir) <= kMaxScratchBase) {
    base = dir;
  }
  std::string templ = absl::StrCat(base, "/", prefix, "XXXXXX");
  if (mkdtemp(templ.data()) == nullptr) return ErrnoError(absl::StrCat("mkdtemp ", templ));
  return std::unique_ptr<ScratchDir>(new ScratchDir(std::move(templ)));
}

ScratchDir::~ScratchDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

std::string ScratchDir::Join(absl::string_view name) const {
  return absl::StrCat(path_, "/", name);
}

// --- AgentProcess -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<AgentProcess>> AgentProcess::Start(AgentProcessOptions options) {
  if (options.binary.empty()) return absl::InvalidArgumentError("no agent binary given");
  if (access(options.binary.c_str(), X_OK) != 0) {
    return ErrnoError(absl::StrCat("agent binary ", options.binary));
  }
  if (options.uds_path.empty() && !options.tcp) {
    return absl::InvalidArgumentError("the agent needs a Unix socket or TCP to be checked");
  }
  // Everything the child needs is prepared before fork(): after it, only async-signal-safe calls.
  std::vector<std::string> argv_storage;
  argv_storage.push_back(options.binary);
  argv_storage.insert(argv_storage.end(), options.args.begin(), options.args.end());
  if (options.insecure &&
      std::none_of(options.args.begin(), options.args.end(), [](const std::string& arg) {
        return absl::StartsWith(arg, "--insecure") || absl::StartsWith(arg, "--tls_cert_file");
      })) {
    argv_storage.push_back("--insecure");
  }
  std::vector<char*> argv;
  for (std::string& arg : argv_storage) argv.push_back(arg.data());
  argv.push_back(nullptr);
  const int log_fd =
      open(options.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return ErrnoError(absl::StrCat("open ", options.log_path));
  const int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null_fd < 0) {
    close(log_fd);
    return ErrnoError("open /dev/null");
  }
  const uint64_t log_start = FileSize(options.log_path);
  const pid_t parent = getpid();

  const pid_t pid = fork();
  if (pid == 0) {
    // The child: never outlive the test process that started it (the signal comes when the
    // forking thread exits, which is the thread running the cases).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    dup2(null_fd, STDIN_FILENO);
    dup2(log_fd, STDOUT_FILENO);
    dup2(log_fd, STDERR_FILENO);
    execv(argv[0], argv.data());
    static constexpr char kExecFailed[] = "agent_process: execv failed\n";
    (void)!write(STDERR_FILENO, kExecFailed, sizeof(kExecFailed) - 1);
    _exit(127);
  }
  close(log_fd);
  close(null_fd);
  if (pid < 0) return ErrnoError("fork");

  std::unique_ptr<AgentProcess> process(new AgentProcess(std::move(options), pid));
  process->log_start_ = log_start;
  if (absl::Status status = process->AwaitServing(); !status.ok()) {
    if (!process->Reaped()) {
      kill(pid, SIGKILL);
      process->WaitForExit(absl::InfiniteDuration());
    }
    return absl::Status(status.code(),
                        absl::StrCat(status.message(), "; the agent's log:\n", process->LogTail()));
  }
  return process;
}

AgentProcess::~AgentProcess() {
  if (!Reaped()) {
    kill(pid_, SIGKILL);
    WaitForExit(absl::InfiniteDuration());
  }
}

std::string AgentProcess::tcp_target() const { return absl::StrCat("127.0.0.1:", tcp_port_); }

bool AgentProcess::Reaped() {
  if (exit_status_.has_value()) return true;
  int status = 0;
  const pid_t reaped = waitpid(pid_, &status, WNOHANG);
  if (reaped == pid_) {
    exit_status_ = status;
    return true;
  }
  if (reaped < 0 && errno == ECHILD) {
    // Someone else reaped it; treat it as gone with an unknown status.
    exit_status_ = -1;
    return true;
  }
  return false;
}

bool AgentProcess::WaitForExit(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!Reaped()) {
    if (absl::Now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

std::string AgentProcess::DescribeExit() const {
  if (!exit_status_.has_value()) return "is running";
  const int status = *exit_status_;
  if (status == -1) return "was reaped elsewhere (exit status unknown)";
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    return absl::StrCat("was killed by signal ", sig, " (", strsignal(sig), ")");
  }
  return absl::StrCat("ended with wait status ", status);
}

absl::Status AgentProcess::AwaitServing() {
  const absl::Time deadline = absl::Now() + options_.start_timeout;
  bool announced = false;
  std::shared_ptr<grpc::Channel> channel;
  std::string last_error = "no \"serving on\" line in its log yet";
  while (absl::Now() < deadline) {
    if (Reaped()) {
      return absl::UnavailableError(
          absl::StrCat("the agent (pid ", pid_, ") ", DescribeExit(), " before serving"));
    }
    if (!announced) {
      // "dmapin-agent: node N, backend B, state S, serving on A, B (tcp port P)"
      const std::string log = ReadFrom(options_.log_path, log_start_);
      const size_t serving = log.find("serving on ");
      const size_t line_end = serving == std::string::npos ? serving : log.find('\n', serving);
      if (line_end != std::string::npos) {
        const std::string line = log.substr(serving, line_end - serving);
        if (options_.tcp) {
          const size_t port_at = line.rfind("(tcp port ");
          const size_t port_end = line.rfind(')');
          int port = 0;
          if (port_at == std::string::npos || port_end == std::string::npos ||
              !absl::SimpleAtoi(line.substr(port_at + 10, port_end - port_at - 10), &port) ||
              port <= 0 || port > 65535) {
            return absl::InternalError(
                absl::StrCat("no TCP port in the agent's line \"", line, "\""));
          }
          tcp_port_ = port;
        }
        announced = true;
        channel = options_.uds_path.empty()
                      ? MakeChannel(tcp_target(), options_.credentials, options_.tls_server_name)
                      : MakeChannel(uds_target());
      }
    }
    if (announced) {
      absl::StatusOr<int> health = HealthCheck(channel, "", absl::Seconds(1));
      if (health.ok() && *health == kHealthServing) return absl::OkStatus();
      last_error = health.ok() ? absl::StrCat("health status ", *health)
                               : std::string(health.status().ToString());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("the agent (pid ", pid_, ") did not serve within ",
                   absl::FormatDuration(options_.start_timeout), ": ", last_error));
}

absl::Status AgentProcess::CheckRunning() {
  if (!Reaped()) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("the agent (pid ", pid_, ") ", DescribeExit(), "; its log ends:\n", LogTail()));
}

absl::Status AgentProcess::Terminate(absl::Duration grace) {
  if (Reaped()) {
    return absl::UnavailableError(absl::StrCat("the agent (pid ", pid_, ") ", DescribeExit(),
                                               " before SIGTERM; its log ends:\n", LogTail()));
  }
  kill(pid_, SIGTERM);
  if (!WaitForExit(grace)) {
    kill(pid_, SIGKILL);
    WaitForExit(absl::InfiniteDuration());
    return absl::DeadlineExceededError(
        absl::StrCat("the agent (pid ", pid_, ") did not exit within ", absl::FormatDuration(grace),
                     " of SIGTERM and was killed; its log ends:\n", LogTail()));
  }
  if (!WIFEXITED(*exit_status_) || WEXITSTATUS(*exit_status_) != 0) {
    return absl::InternalError(absl::StrCat("the agent (pid ", pid_, ") ", DescribeExit(),
                                            " after SIGTERM; its log ends:\n", LogTail()));
  }
  return absl::OkStatus();
}

absl::Status AgentProcess::Kill() {
  if (Reaped()) {
    return absl::UnavailableError(absl::StrCat("the agent (pid ", pid_, ") ", DescribeExit(),
                                               " before SIGKILL; its log ends:\n", LogTail()));
  }
  kill(pid_, SIGKILL);
  WaitForExit(absl::InfiniteDuration());
  if (!WIFSIGNALED(*exit_status_) || WTERMSIG(*exit_status_) != SIGKILL) {
    return absl::InternalError(absl::StrCat("the agent (pid ", pid_, ") ", DescribeExit(),
                                            " instead of dying of SIGKILL"));
  }
  return absl::OkStatus();
}

std::string AgentProcess::LogTail(size_t max_bytes) const {
  std::string log = ReadFrom(options_.log_path, log_start_);
  if (log.size() > max_bytes) log = absl::StrCat("...", log.substr(log.size() - max_bytes));
  return log;
}

// --- Raw gRPC ---------------------------------------------------------------------------------

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target) {
  return grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
}

std::shared_ptr<grpc::Channel> MakeChannel(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const std::string& tls_server_name) {
  if (credentials == nullptr) return MakeChannel(target);
  grpc::ChannelArguments args;
  if (!tls_server_name.empty()) args.SetSslTargetNameOverride(tls_server_name);
  return grpc::CreateCustomChannel(target, credentials, args);
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

std::string PaddedHealthCheckRequest(uint64_t bytes) {
  std::string request = "\x7a";  // field 15, length-delimited
  uint64_t length = bytes;
  do {
    uint8_t byte = length & 0x7f;
    length >>= 7;
    if (length != 0) byte |= 0x80;
    request.push_back(static_cast<char>(byte));
  } while (length != 0);
  request.append(bytes, 'x');
  return request;
}

absl::StatusOr<std::string> RawUnaryCall(const std::shared_ptr<grpc::Channel>& channel,
                                         const std::string& method, const std::string& request,
                                         absl::Duration timeout) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(DeadlineAfter(timeout));
  grpc::CompletionQueue cq;
  const grpc::ByteBuffer request_buffer = ToByteBuffer(request);
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
      stub.PrepareUnaryCall(&context, method, request_buffer, &cq);
  call->StartCall();
  grpc::ByteBuffer response;
  grpc::Status status;
  int done_tag = 0;
  call->Finish(&response, &status, &done_tag);
  Await(cq, &done_tag);
  Drain(cq);
  if (!status.ok()) return FromGrpcStatus(status);
  return ToString(response);
}

absl::StatusOr<std::vector<std::string>> RawBidiCall(const std::shared_ptr<grpc::Channel>& channel,
                                                     const std::string& method,
                                                     const std::vector<std::string>& requests,
                                                     absl::Duration timeout) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(DeadlineAfter(timeout));
  grpc::CompletionQueue cq;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> stream =
      stub.PrepareCall(&context, method, &cq);
  int tag = 0;
  std::vector<std::string> responses;
  stream->StartCall(&tag);
  if (Await(cq, &tag)) {
    bool writable = true;
    for (const std::string& request : requests) {
      stream->Write(ToByteBuffer(request), &tag);
      if (!Await(cq, &tag)) {
        writable = false;
        break;
      }
    }
    if (writable) {
      stream->WritesDone(&tag);
      Await(cq, &tag);
    }
    for (;;) {
      grpc::ByteBuffer response;
      stream->Read(&response, &tag);
      if (!Await(cq, &tag)) break;
      responses.push_back(ToString(response));
    }
  }
  grpc::Status status;
  stream->Finish(&status, &tag);
  Await(cq, &tag);
  Drain(cq);
  if (!status.ok()) return FromGrpcStatus(status);
  return responses;
}

absl::StatusOr<std::string> ScrapeMetrics(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", strerror(errno)));
  sockaddr_in address = {};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("cannot connect to metrics port ", port));
  }
  const std::string request = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::UnavailableError("cannot send the metrics request");
  }
  std::string response;
  char buffer[16384];
  ssize_t n = 0;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (body == std::string::npos) return absl::UnavailableError("malformed metrics response");
  return response.substr(body + 4);
}

std::optional<double> MetricValue(absl::string_view exposition, absl::string_view name,
                                  const std::map<std::string, std::string>& labels) {
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!absl::ConsumePrefix(&line, name) || line.empty()) continue;
    absl::string_view label_text;
    if (line[0] == '{') {
      const size_t close = line.find('}');
      if (close == absl::string_view::npos) continue;
      label_text = line.substr(1, close - 1);
      line.remove_prefix(close + 1);
    }
    if (line.empty() || line[0] != ' ') continue;  // a longer name with this prefix
    bool all = true;
    for (const auto& [key, value] : labels) {
      all = all && absl::StrContains(label_text, absl::StrCat(key, "=\"", value, "\""));
    }
    double number = 0;
    if (all && absl::SimpleAtod(absl::StripAsciiWhitespace(line), &number)) return number;
  }
  return std::nullopt;
}

int PortFromLog(absl::string_view log, absl::string_view what) {
  const std::string marker = absl::StrCat("(", what, " port ");
  const size_t at = log.find(marker);
  if (at == absl::string_view::npos) return 0;
  absl::string_view rest = log.substr(at + marker.size());
  int port = 0;
  return absl::SimpleAtoi(rest.substr(0, rest.find(')')), &port) ? port : 0;
}

absl::StatusOr<int> HealthCheck(const std::shared_ptr<grpc::Channel>& channel,
                                absl::string_view service, absl::Duration timeout) {
  // HealthCheckRequest { string service = 1; }
  std::string request;
  if (!service.empty()) {
    request = absl::StrCat("\x0a", EncodeVarint(service.size()), service);
  }
  absl::StatusOr<std::string> response =
      RawUnaryCall(channel, "/grpc.health.v1.Health/Check", request, timeout);
  if (!response.ok()) return response.status();
  // HealthCheckResponse { ServingStatus status = 1; }
  google::protobuf::UnknownFieldSet fields;
  if (!fields.ParseFromString(*response)) {
    return absl::DataLossError("unparsable grpc.health.v1.HealthCheckResponse");
  }
  int status = 0;  // UNKNOWN when the field is absent
  for (int i = 0; i < fields.field_count(); ++i) {
    const google::protobuf::UnknownField& field = fields.field(i);
    if (field.number() == 1 && field.type() == google::protobuf::UnknownField::TYPE_VARINT) {
      status = static_cast<int>(field.varint());
    }
  }
  return status;
}

}  // namespace dmapin::harness
