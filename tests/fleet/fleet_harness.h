// What the fleet bench and the fleet scale test share: dmapin-server as a child process on
// loopback with a fresh state directory, /proc readings of a process, summing a metric over its
// series, and the decision burst (many Admin.CreateIntent calls in flight, each timed until the
// server reports the intent satisfied on WatchEvents).
#ifndef DMAPIN_TESTS_FLEET_FLEET_HARNESS_H_
#define DMAPIN_TESTS_FLEET_FLEET_HARNESS_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "dmapin/v1/admin.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "testing/agent_process.h"

namespace dmapin {
namespace fleetsim {

// Raises RLIMIT_NOFILE's soft limit to `want` (or the hard limit, if lower; raises the hard limit
// too when running as root). Returns the soft limit now in force.
uint64_t RaiseNofileLimit(uint64_t want);

// dmapin-server in a scratch directory on 127.0.0.1 with ephemeral ports.
class ServerUnderTest {
 public:
  // `extra_args` come after the address and state flags.
  static absl::StatusOr<std::unique_ptr<ServerUnderTest>> Start(
      const std::string& binary, const std::vector<std::string>& extra_args);
  ~ServerUnderTest();

  pid_t pid() const { return process_->pid(); }
  std::string target() const { return process_->tcp_target(); }
  int metrics_port() const { return metrics_port_; }
  v1::Admin::Stub* admin() { return admin_.get(); }
  harness::AgentProcess* process() { return process_.get(); }
  // SIGTERM and wait.
  absl::Status Stop();

 private:
  ServerUnderTest() = default;
  std::unique_ptr<harness::ScratchDir> dir_;
  std::unique_ptr<harness::AgentProcess> process_;
  int metrics_port_ = 0;
  std::unique_ptr<v1::Admin::Stub> admin_;
};

// CPU (user + system) and resident memory of a process, from /proc/<pid>/stat and status.
struct ProcUsage {
  double cpu_seconds = 0;
  uint64_t rss_bytes = 0;
  uint64_t rss_peak_bytes = 0;  // VmHWM
  uint64_t threads = 0;
};
ProcUsage ReadProcUsage(pid_t pid);  // pid 0: this process

// One GET /metrics, timed.
struct Scrape {
  std::string text;
  absl::Duration took;
};
absl::StatusOr<Scrape> TimedScrape(int port);

// The sum of every series of `name` (exactly that name, any labels) in an exposition.
double SumMetric(absl::string_view exposition, absl::string_view name);
// The number of series (sample lines) in an exposition.
uint64_t CountSeries(absl::string_view exposition);

// The decision burst.
struct BurstResult {
  uint64_t created = 0;
  uint64_t create_errors = 0;
  std::string first_error;
  uint64_t satisfied = 0;          // seen satisfied on the event stream (timed)
  uint64_t unobserved = 0;         // created but not seen satisfied before the timeout
  std::vector<double> latency_ms;  // CreateIntent call start -> intent_satisfied event
  std::vector<double> create_ms;   // CreateIntent call start -> its answer
  absl::Duration issue_time;       // first call to last answer
  absl::Duration total_time;       // first call to the last intent satisfied
  uint64_t events = 0;
  std::vector<std::string> intent_ids;
};
// Sends `requests` with at most `concurrency` CreateIntent calls in flight on `channel`, watching
// WatchEvents (opened first) for each intent's "intent_satisfied", and waits up to `timeout`.
BurstResult RunDecisionBurst(const std::shared_ptr<grpc::Channel>& channel,
                             const std::vector<v1::CreateIntentRequest>& requests, int concurrency,
                             absl::Duration timeout);

// The p-th percentile (0..100) of `values` (sorted copy; 0 when empty).
double Percentile(std::vector<double> values, double p);

}  // namespace fleetsim
}  // namespace dmapin

#endif  // DMAPIN_TESTS_FLEET_FLEET_HARNESS_H_
