// Request sizes against the real binaries: a request over --max_receive_message_bytes is refused
// with RESOURCE_EXHAUSTED, and refusing six parallel 100 MB requests costs about
// --grpc_memory_quota_bytes, not the 600 MB gRPC 1.51 would otherwise buffer before it checks the
// size; the process serves normally afterwards.
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "testing/agent_process.h"
#include "tests/fleet/fleet_harness.h"
#include "tests/limits/limits_harness.h"

ABSL_FLAG(std::string, agent_binary, "", "dmapin-agent");
ABSL_FLAG(std::string, server_binary, "", "dmapin-server");

namespace dmapin {
namespace limits {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr char kHealthCheck[] = "/grpc.health.v1.Health/Check";

void RefusesOversizedRequestsCheaply(const std::string& target, pid_t pid) {
  auto channel = FreshChannel(target);
  // Under the limit: served.
  EXPECT_TRUE(harness::RawUnaryCall(channel, kHealthCheck, harness::PaddedHealthCheckRequest(kMiB),
                                    absl::Seconds(10))
                  .ok());
  // Over it (--max_receive_message_bytes=4 MiB): refused by gRPC.
  absl::StatusOr<std::string> big = harness::RawUnaryCall(
      channel, kHealthCheck, harness::PaddedHealthCheckRequest(8 * kMiB), absl::Seconds(10));
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted) << big.status();
  EXPECT_TRUE(absl::StrContains(big.status().message(), "Received message larger than max"))
      << big.status();

  // Six at once of 100 MB, each on its own connection.
  const uint64_t before = fleetsim::ReadProcUsage(pid).rss_peak_bytes;
  const std::string huge = harness::PaddedHealthCheckRequest(100 * kMiB);
  std::vector<absl::Status> results(6);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < results.size(); ++i) {
    threads.emplace_back([&, i] {
      results[i] =
          harness::RawUnaryCall(FreshChannel(target), kHealthCheck, huge, absl::Seconds(30))
              .status();
    });
  }
  for (std::thread& thread : threads) thread.join();
  // Each is refused: RESOURCE_EXHAUSTED, or, when their sum presses gRPC's memory quota, the
  // connection closed under it (gRPC 1.51 answers quota pressure with GOAWAY). Either way nothing
  // was buffered whole, which the RSS bound below checks.
  for (const absl::Status& status : results) {
    const bool refused = status.code() == absl::StatusCode::kResourceExhausted ||
                         (status.code() == absl::StatusCode::kUnavailable &&
                          absl::StrContains(status.message(), "GOAWAY"));
    EXPECT_TRUE(refused) << status;
  }
  const uint64_t after = fleetsim::ReadProcUsage(pid).rss_peak_bytes;
  // The quota is 64 MiB here; gRPC overshoots it somewhat before its reclaimers catch up.
  EXPECT_LT(after - before, 200 * kMiB)
      << "peak RSS grew from " << before / kMiB << " to " << after / kMiB << " MiB";
  std::printf("peak RSS %llu -> %llu MiB for 6 x 100 MB refused\n",
              static_cast<unsigned long long>(before / kMiB),
              static_cast<unsigned long long>(after / kMiB));
  EXPECT_TRUE(ServesWithin(target, absl::Seconds(10)));
}

const std::vector<std::string> kLimits = {"--max_receive_message_bytes=4194304",
                                          "--grpc_memory_quota_bytes=67108864"};

TEST(MessageLimitsTest, TheAgentRefusesOversizedRequestsWithoutBufferingThem) {
  absl::StatusOr<std::unique_ptr<AgentUnderTest>> agent =
      AgentUnderTest::Start(absl::GetFlag(FLAGS_agent_binary), kLimits);
  ASSERT_TRUE(agent.ok()) << agent.status();
  RefusesOversizedRequestsCheaply((*agent)->target(), (*agent)->pid());
  EXPECT_TRUE((*agent)->process()->Terminate().ok());
}

TEST(MessageLimitsTest, TheServerRefusesOversizedRequestsWithoutBufferingThem) {
  absl::StatusOr<std::unique_ptr<fleetsim::ServerUnderTest>> server =
      fleetsim::ServerUnderTest::Start(absl::GetFlag(FLAGS_server_binary), kLimits);
  ASSERT_TRUE(server.ok()) << server.status();
  RefusesOversizedRequestsCheaply((*server)->target(), (*server)->pid());
  EXPECT_TRUE((*server)->Stop().ok());
}

}  // namespace
}  // namespace limits
}  // namespace dmapin

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  absl::ParseCommandLine(argc, argv);
  return RUN_ALL_TESTS();
}
