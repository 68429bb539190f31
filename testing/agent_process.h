// Runs a dmapin-agent binary as a child process for tests and the gRPC conformance target:
// start it, wait until it serves, watch that it stays alive, stop it (SIGTERM, then SIGKILL).
// dmapin-server logs the same "serving on ... (tcp port N)" line, so it runs the server too.
//
// Also the small raw-gRPC helpers the tests need without generated stubs: Debian ships no C++
// code for grpc.health.v1 or grpc.reflection, so those calls go through grpc::GenericStub with
// hand-encoded protobuf bytes.
#ifndef DMAPIN_TESTING_AGENT_PROCESS_H_
#define DMAPIN_TESTING_AGENT_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"

namespace dmapin::harness {

// A fresh directory for one agent's state, socket and log, removed with everything in it by the
// destructor. It lives under $TEST_TMPDIR when that is short enough for a Unix socket path
// (108 bytes), else under /tmp.
class ScratchDir {
 public:
  static absl::StatusOr<std::unique_ptr<ScratchDir>> Create(absl::string_view prefix);
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  ~ScratchDir();

  const std::string& path() const { return path_; }
  // path() + "/" + name.
  std::string Join(absl::string_view name) const;

 private:
  explicit ScratchDir(std::string path) : path_(std::move(path)) {}
  const std::string path_;
};

struct AgentProcessOptions {
  // The dmapin-agent executable.
  std::string binary;
  // Its command line after argv[0] (every flag; nothing is added but --insecure, below).
  std::vector<std::string> args;
  // The agent's stdout and stderr are appended to this file.
  std::string log_path;
  // Where Start() checks health: the --uds_path given in `args`, or empty to use TCP.
  std::string uds_path;
  // Whether the agent listens on TCP; Start() then reads the port from its log line
  // "... (tcp port N)".
  bool tcp = false;
  // How long Start() waits for the agent to serve.
  absl::Duration start_timeout = absl::Seconds(30);
  // Plaintext gRPC: adds --insecure to `args` unless they carry --insecure or --tls_cert_file
  // themselves. The tests of everything but transport security run plaintext; tests/tls sets it
  // false and passes the --tls_* flags (the binaries refuse to start with neither).
  bool insecure = true;
  // Credentials of the health-check channel when it goes over TCP (the binary's own TLS
  // --tls_* flags); nullptr: plaintext. With TLS, `tls_server_name` overrides the name checked
  // in the server's certificate (empty: 127.0.0.1).
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::string tls_server_name;
};

class AgentProcess {
 public:
  // Spawns the agent and waits until grpc.health.v1 reports SERVING (on the Unix socket when
  // there is one, else on TCP). On failure the child is killed and the error quotes its log.
  static absl::StatusOr<std::unique_ptr<AgentProcess>> Start(AgentProcessOptions options);

  AgentProcess(const AgentProcess&) = delete;
  AgentProcess& operator=(const AgentProcess&) = delete;
  // Kills the agent (SIGKILL) if it still runs.
  ~AgentProcess();

  pid_t pid() const { return pid_; }
  // The TCP port the agent chose (0 without TCP).
  int tcp_port() const { return tcp_port_; }
  // "unix:<uds_path>" and "127.0.0.1:<port>": gRPC targets of the agent's listeners.
  std::string uds_target() const { return "unix:" + options_.uds_path; }
  std::string tcp_target() const;

  // OK while the process runs; an error (with the exit status and the log's end) once it has
  // exited or was reaped.
  absl::Status CheckRunning();

  // Waits up to `timeout` for the process to exit; true when it has (e.g. after a call failed
  // because the connection broke, to tell a dead agent from a transient error).
  bool AwaitExit(absl::Duration timeout) { return WaitForExit(timeout); }

  // SIGTERM, then waits up to `grace` for the exit (SIGKILL after that). OK only when the agent
  // was still running and exited with status 0 by itself.
  absl::Status Terminate(absl::Duration grace = absl::Seconds(5));

  // SIGKILL and reap. OK when the agent was running and died of the SIGKILL.
  absl::Status Kill();

  // The last `max_bytes` of the agent's log.
  std::string LogTail(size_t max_bytes = 2000) const;

 private:
  AgentProcess(AgentProcessOptions options, pid_t pid) : options_(std::move(options)), pid_(pid) {}

  // Reaps the child without blocking; true once it has exited (exit_status_ is then set).
  bool Reaped();
  // Blocks until the child exits or `timeout` passes; true when it exited.
  bool WaitForExit(absl::Duration timeout);
  // Waits for the "serving on" log line (and the TCP port) and for health SERVING.
  absl::Status AwaitServing();
  std::string DescribeExit() const;

  const AgentProcessOptions options_;
  const pid_t pid_;
  int tcp_port_ = 0;
  // Where this run's output starts in the log (restarts may append to one file).
  uint64_t log_start_ = 0;
  // The wait status once reaped.
  std::optional<int> exit_status_;
};

// A channel to `target` ("unix:/path", "127.0.0.1:7470"), plaintext or with `credentials` (and
// then `tls_server_name` as the name the server's certificate must carry, when not empty).
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target);
std::shared_ptr<grpc::Channel> MakeChannel(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const std::string& tls_server_name = "");

// A serialized grpc.health.v1.HealthCheckRequest of about `bytes`: the padding is an unknown
// field 15, which the server skips. For tests of request-size limits (RawUnaryCall sends it).
std::string PaddedHealthCheckRequest(uint64_t bytes);

// One unary call of `method` ("/pkg.Service/Method") with raw protobuf bytes.
absl::StatusOr<std::string> RawUnaryCall(const std::shared_ptr<grpc::Channel>& channel,
                                         const std::string& method, const std::string& request,
                                         absl::Duration timeout);

// A bidi-streaming call that writes `requests`, half-closes and reads every response.
absl::StatusOr<std::vector<std::string>> RawBidiCall(const std::shared_ptr<grpc::Channel>& channel,
                                                     const std::string& method,
                                                     const std::vector<std::string>& requests,
                                                     absl::Duration timeout);

// grpc.health.v1.Health/Check for `service` ("" = the whole server): the ServingStatus number
// (1 = SERVING, 2 = NOT_SERVING, ...), or the call's error.
absl::StatusOr<int> HealthCheck(const std::shared_ptr<grpc::Channel>& channel,
                                absl::string_view service, absl::Duration timeout);
inline constexpr int kHealthServing = 1;

// The body of GET http://127.0.0.1:<port>/metrics (a dmapin-agent's or dmapin-server's metrics).
absl::StatusOr<std::string> ScrapeMetrics(int port);

// The value of the series `name` whose labels include every pair of `labels`, in a Prometheus
// text exposition; nullopt when no such series is there. With several matches, the first.
std::optional<double> MetricValue(absl::string_view exposition, absl::string_view name,
                                  const std::map<std::string, std::string>& labels = {});

// The port N of the first "(<what> port N)" in `log` (e.g. what = "metrics"), or 0.
int PortFromLog(absl::string_view log, absl::string_view what);

// The absl status of a gRPC status (same code and message).
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace dmapin::harness

#endif  // DMAPIN_TESTING_AGENT_PROCESS_H_
