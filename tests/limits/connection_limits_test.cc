// Connections against the real binaries: a flood of idle connections that exhausts a process's
// file descriptors must not stop it from accepting once they close (gRPC 1.51's own listener
// stops for good on EMFILE), and connections beyond --max_connections are refused while idle
// ones are closed after --connection_idle_timeout_ms, so new clients get in again.
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "testing/agent_process.h"
#include "tests/fleet/fleet_harness.h"
#include "tests/limits/limits_harness.h"

ABSL_FLAG(std::string, agent_binary, "", "dmapin-agent");
ABSL_FLAG(std::string, server_binary, "", "dmapin-server");

namespace dmapin {
namespace limits {
namespace {

// A running agent or server, as the tests need it.
struct Process {
  pid_t pid;
  int port;
  std::string target;
  int metrics_port;
  std::string metrics_prefix;
};

// Exhausts the process's descriptors (128 allowed, many more connections), closes the flood,
// and expects the process to serve again, having counted what it refused.
void FloodPastTheFdLimitThenServe(const Process& p) {
  ASSERT_TRUE(ServesWithin(p.target, absl::Seconds(5)));
  ASSERT_TRUE(SetFdLimit(p.pid, 128).ok());
  std::vector<int> flood = OpenIdleConnections(p.port, 400);
  EXPECT_EQ(flood.size(), 400u);
  absl::SleepFor(absl::Milliseconds(500));  // let it accept what it can
  CloseAll(flood);
  EXPECT_TRUE(ServesWithin(p.target, absl::Seconds(10)))
      << "no longer serves after a flood that exhausted its file descriptors";
  EXPECT_GT(Metric(p.metrics_port, p.metrics_prefix + "grpc_connections_refused_total",
                   {{"reason", "fds"}}),
            0);
}

// --max_connections=16, --connection_idle_timeout_ms=2000: a flood of 40 idle connections (kept
// open by the client) fills the limit and is refused beyond it; after the idle timeout the
// server has closed the idle ones and serves new clients again.
void FloodPastTheConnectionLimitThenServe(const Process& p) {
  std::vector<int> flood = OpenIdleConnections(p.port, 40);
  ASSERT_EQ(flood.size(), 40u);
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (Metric(p.metrics_port, p.metrics_prefix + "grpc_connections") < 16 &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(Metric(p.metrics_port, p.metrics_prefix + "grpc_connections"), 16);
  EXPECT_EQ(Metric(p.metrics_port, p.metrics_prefix + "grpc_connections_limit"), 16);
  // Full: a new client is turned away.
  absl::StatusOr<int> health =
      harness::HealthCheck(FreshChannel(p.target), "", absl::Milliseconds(300));
  EXPECT_FALSE(health.ok());
  EXPECT_GE(Metric(p.metrics_port, p.metrics_prefix + "grpc_connections_refused_total",
                   {{"reason", "limit"}}),
            24);
  // The idle ones go after 2 s, though the client still holds them.
  EXPECT_TRUE(ServesWithin(p.target, absl::Seconds(10)));
  // Serving again can come a moment before the last idle close (each has its own timer).
  const absl::Time closed_by = absl::Now() + absl::Seconds(10);
  while (ClosedByPeer(flood) < 40 && absl::Now() < closed_by) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(ClosedByPeer(flood), 40);
  CloseAll(flood);
}

TEST(ConnectionLimitsTest, TheServerAcceptsAgainAfterItsDescriptorsRanOut) {
  absl::StatusOr<std::unique_ptr<fleetsim::ServerUnderTest>> server =
      fleetsim::ServerUnderTest::Start(absl::GetFlag(FLAGS_server_binary), {});
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->process()->tcp_port();
  FloodPastTheFdLimitThenServe(
      {(*server)->pid(), port, (*server)->target(), (*server)->metrics_port(), "dmapin_server_"});
  EXPECT_TRUE((*server)->Stop().ok());
}

TEST(ConnectionLimitsTest, TheAgentAcceptsAgainAfterItsDescriptorsRanOut) {
  absl::StatusOr<std::unique_ptr<AgentUnderTest>> agent =
      AgentUnderTest::Start(absl::GetFlag(FLAGS_agent_binary), {});
  ASSERT_TRUE(agent.ok()) << agent.status();
  FloodPastTheFdLimitThenServe({(*agent)->pid(), (*agent)->tcp_port(), (*agent)->target(),
                                (*agent)->metrics_port(), "dmapin_agent_"});
  EXPECT_TRUE((*agent)->process()->Terminate().ok());
}

const std::vector<std::string> kSmallLimits = {"--max_connections=16",
                                               "--connection_idle_timeout_ms=2000"};

TEST(ConnectionLimitsTest, TheServerRefusesConnectionsBeyondItsLimitAndClosesIdleOnes) {
  absl::StatusOr<std::unique_ptr<fleetsim::ServerUnderTest>> server =
      fleetsim::ServerUnderTest::Start(absl::GetFlag(FLAGS_server_binary), kSmallLimits);
  ASSERT_TRUE(server.ok()) << server.status();
  FloodPastTheConnectionLimitThenServe({(*server)->pid(), (*server)->process()->tcp_port(),
                                        (*server)->target(), (*server)->metrics_port(),
                                        "dmapin_server_"});
  EXPECT_TRUE((*server)->Stop().ok());
}

TEST(ConnectionLimitsTest, TheAgentRefusesConnectionsBeyondItsLimitAndClosesIdleOnes) {
  absl::StatusOr<std::unique_ptr<AgentUnderTest>> agent =
      AgentUnderTest::Start(absl::GetFlag(FLAGS_agent_binary), kSmallLimits);
  ASSERT_TRUE(agent.ok()) << agent.status();
  FloodPastTheConnectionLimitThenServe({(*agent)->pid(), (*agent)->tcp_port(), (*agent)->target(),
                                        (*agent)->metrics_port(), "dmapin_agent_"});
  EXPECT_TRUE((*agent)->process()->Terminate().ok());
}

}  // namespace
}  // namespace limits
}  // namespace dmapin

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  absl::ParseCommandLine(argc, argv);
  return RUN_ALL_TESTS();
}
