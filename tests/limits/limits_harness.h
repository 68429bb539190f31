// What the resource-limit tests share: a dmapin-agent child (the server comes from
// tests/fleet's ServerUnderTest), floods of idle TCP connections, and "does it serve" with a
// fresh connection.
#ifndef DMAPIN_TESTS_LIMITS_LIMITS_HARNESS_H_
#define DMAPIN_TESTS_LIMITS_LIMITS_HARNESS_H_

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "testing/agent_process.h"

namespace dmapin {
namespace limits {

// dmapin-agent (sim backend) in a scratch directory, on 127.0.0.1 with ephemeral ports.
class AgentUnderTest {
 public:
  static absl::StatusOr<std::unique_ptr<AgentUnderTest>> Start(
      const std::string& binary, const std::vector<std::string>& extra_args);
  pid_t pid() const { return process_->pid(); }
  int tcp_port() const { return process_->tcp_port(); }
  std::string target() const { return process_->tcp_target(); }
  int metrics_port() const { return metrics_port_; }
  harness::AgentProcess* process() { return process_.get(); }

 private:
  AgentUnderTest() = default;
  std::unique_ptr<harness::ScratchDir> dir_;
  std::unique_ptr<harness::AgentProcess> process_;
  int metrics_port_ = 0;
};

// A channel of its own (its own connection, not one shared through gRPC's subchannel pool).
std::shared_ptr<grpc::Channel> FreshChannel(const std::string& target,
                                            grpc::ChannelArguments args = {});

// Whether a health check on a fresh connection answers SERVING within `timeout` (retrying).
bool ServesWithin(const std::string& target, absl::Duration timeout);

// Opens up to `n` TCP connections to 127.0.0.1:`port` (fewer if connect() fails) that send the
// HTTP/2 client preface and an empty SETTINGS frame, then nothing. The caller closes them.
std::vector<int> OpenIdleConnections(int port, int n);
void CloseAll(std::vector<int>& fds);
// How many of `fds` the peer has closed (EOF or reset; data before it is skipped).
int ClosedByPeer(const std::vector<int>& fds);

// RLIMIT_NOFILE of process `pid` set to `limit` (soft and hard).
absl::Status SetFdLimit(pid_t pid, uint64_t limit);

// One sample's value in the /metrics of the process on `metrics_port`; -1 when absent.
double Metric(int metrics_port, const std::string& name,
              const std::map<std::string, std::string>& labels = {});

}  // namespace limits
}  // namespace dmapin

#endif  // DMAPIN_TESTS_LIMITS_LIMITS_HARNESS_H_
