#include "tests/limits/limits_harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace dmapin {
namespace limits {

absl::StatusOr<std::unique_ptr<AgentUnderTest>> AgentUnderTest::Start(
    const std::string& binary, const std::vector<std::string>& extra_args) {
  std::unique_ptr<AgentUnderTest> agent(new AgentUnderTest());
  absl::StatusOr<std::unique_ptr<harness::ScratchDir>> dir =
      harness::ScratchDir::Create("dmapin-limits");
  if (!dir.ok()) return dir.status();
  agent->dir_ = std::move(*dir);
  std::vector<std::string> args = {"--backend=sim",
                                   "--tcp_address=127.0.0.1:0",
                                   "--metrics_address=127.0.0.1:0",
                                   "--uds_path=" + agent->dir_->Join("agent.sock"),
                                   "--state_dir=" + agent->dir_->Join("state"),
                                   "--node_name=limits"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  absl::StatusOr<std::unique_ptr<harness::AgentProcess>> process =
      harness::AgentProcess::Start({.binary = binary,
                                    .args = args,
                                    .log_path = agent->dir_->Join("agent.log"),
                                    .uds_path = agent->dir_->Join("agent.sock"),
                                    .tcp = true});
  if (!process.ok()) return process.status();
  agent->process_ = std::move(*process);
  agent->metrics_port_ = harness::PortFromLog(agent->process_->LogTail(100000), "metrics");
  if (agent->metrics_port_ == 0) {
    return absl::InternalError(
        absl::StrCat("no metrics port in the agent's log:\n", agent->process_->LogTail()));
  }
  return agent;
}

std::shared_ptr<grpc::Channel> FreshChannel(const std::string& target,
                                            grpc::ChannelArguments args) {
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

bool ServesWithin(const std::string& target, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  do {
    absl::StatusOr<int> health =
        harness::HealthCheck(FreshChannel(target), "", absl::Milliseconds(500));
    if (health.ok() && *health == harness::kHealthServing) return true;
    absl::SleepFor(absl::Milliseconds(50));
  } while (absl::Now() < deadline);
  return false;
}

std::vector<int> OpenIdleConnections(int port, int n) {
  static constexpr char kPreface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
  static constexpr char kEmptySettings[] = {0, 0, 0, 4, 0, 0, 0, 0, 0};
  std::vector<int> fds;
  for (int i = 0; i < n; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) break;
    sockaddr_in address = {};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
      close(fd);
      break;
    }
    // Into the kernel's buffer: fails only if the server already reset the connection.
    if (send(fd, kPreface, sizeof(kPreface) - 1, MSG_NOSIGNAL) < 0 ||
        send(fd, kEmptySettings, sizeof(kEmptySettings), MSG_NOSIGNAL) < 0) {
      // Counted as closed by ClosedByPeer.
    }
    fds.push_back(fd);
  }
  return fds;
}

void CloseAll(std::vector<int>& fds) {
  for (int fd : fds) close(fd);
  fds.clear();
}

int ClosedByPeer(const std::vector<int>& fds) {
  int closed = 0;
  for (int fd : fds) {
    char buffer[4096];
    for (;;) {
      pollfd polled = {fd, POLLIN, 0};
      if (poll(&polled, 1, 0) <= 0) break;
      const ssize_t got = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
      if (got <= 0) {
        if (got < 0 && (errno == EAGAIN || errno == EINTR)) break;
        ++closed;
        break;
      }
    }
  }
  return closed;
}

absl::Status SetFdLimit(pid_t pid, uint64_t limit) {
  const rlimit wanted = {limit, limit};
  if (prlimit(pid, RLIMIT_NOFILE, &wanted, nullptr) != 0) {
    return absl::InternalError(absl::StrCat("prlimit(", pid, "): ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

double Metric(int metrics_port, const std::string& name,
              const std::map<std::string, std::string>& labels) {
  absl::StatusOr<std::string> text = harness::ScrapeMetrics(metrics_port);
  if (!text.ok()) return -1;
  std::optional<double> value = harness::MetricValue(*text, name, labels);
  return value.has_value() ? *value : -1;
}

}  // namespace limits
}  // namespace dmapin
