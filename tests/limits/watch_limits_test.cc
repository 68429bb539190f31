// WatchEvents against the real dmapin-server: 200 watchers that never read, while 20,000 events
// go out, cost the server about --watch_buffer_bytes (64 MiB by default) instead of 10,000 copies
// of every event each; the laggiest are dropped and counted, and once the clients leave nothing
// stays queued.
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "dmapin/v1/admin.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/fleet/fleet_harness.h"
#include "tests/limits/limits_harness.h"

ABSL_FLAG(std::string, server_binary, "", "dmapin-server");

namespace dmapin {
namespace limits {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;

// `n` events of about 400 bytes (a CreateIntent for an unknown node is rejected and announced),
// from four threads.
void EmitEvents(const std::string& target, int n) {
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::unique_ptr<v1::Admin::Stub> admin = v1::Admin::NewStub(FreshChannel(target));
      v1::CreateIntentRequest request;
      request.set_kind(v1::INTENT_KIND_RELEASE_CONTAINER);
      request.set_container("c1");
      for (int i = t; i < n; i += 4) {
        request.set_node(absl::StrCat(std::string(250, 'n'), i));
        grpc::ClientContext context;
        v1::CreateIntentResponse response;
        const grpc::Status status = admin->CreateIntent(&context, request, &response);
        EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
}

TEST(WatchLimitsTest, WatchersThatNeverReadCostTheServerABoundedBuffer) {
  absl::StatusOr<std::unique_ptr<fleetsim::ServerUnderTest>> server =
      fleetsim::ServerUnderTest::Start(absl::GetFlag(FLAGS_server_binary), {});
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string target = (*server)->target();
  const int metrics = (*server)->metrics_port();

  // Clients whose windows stay at 64 KiB (no BDP probing), 50 streams per connection.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  std::vector<std::unique_ptr<v1::Admin::Stub>> stubs;
  for (int i = 0; i < 4; ++i) stubs.push_back(v1::Admin::NewStub(FreshChannel(target, args)));
  constexpr int kWatchers = 200;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::Event>>> readers;
  for (int i = 0; i < kWatchers; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    readers.push_back(stubs[i % stubs.size()]->WatchEvents(contexts.back().get(), {}));
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (Metric(metrics, "dmapin_server_watchers") < kWatchers && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(Metric(metrics, "dmapin_server_watchers"), kWatchers);

  const uint64_t before = fleetsim::ReadProcUsage((*server)->pid()).rss_peak_bytes;
  const absl::Time start = absl::Now();
  EmitEvents(target, 20000);
  const absl::Duration took = absl::Now() - start;
  const uint64_t after = fleetsim::ReadProcUsage((*server)->pid()).rss_peak_bytes;
  std::printf(
      "20000 events to %d watchers that never read: %.0f calls/s, peak RSS %llu -> %llu "
      "MiB\n",
      kWatchers, 20000 / absl::ToDoubleSeconds(took),
      static_cast<unsigned long long>(before / kMiB),
      static_cast<unsigned long long>(after / kMiB));
  // 64 MiB of queues, plus what the transports hold for 200 blocked streams.
  EXPECT_LT(after - before, 160 * kMiB);
  EXPECT_LE(Metric(metrics, "dmapin_server_watch_buffered_bytes"), 64 * kMiB);
  EXPECT_GT(Metric(metrics, "dmapin_server_watchers_dropped_total", {{"reason", "buffer"}}), 0);

  // The clients leave: nothing of theirs stays queued.
  for (auto& context : contexts) context->TryCancel();
  readers.clear();
  const absl::Time gone = absl::Now() + absl::Seconds(10);
  while (Metric(metrics, "dmapin_server_watchers") != 0 && absl::Now() < gone) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(Metric(metrics, "dmapin_server_watchers"), 0);
  EXPECT_EQ(Metric(metrics, "dmapin_server_watch_buffered_bytes"), 0);
  EXPECT_TRUE(ServesWithin(target, absl::Seconds(5)));
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
