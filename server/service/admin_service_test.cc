// AdminService.WatchEvents over a real gRPC channel: a watcher that falls behind is dropped with a
// status that says so (and its stream is cancelled if it reads nothing at all), and watchers
// beyond the limit are refused, each with the errno in the message and the trailer.
#include "server/service/admin_service.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_status.h"
#include "dmapin/v1/admin.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/core/server_core.h"
#include "server/store/sqlite_server_store.h"

namespace dmapin::server {
namespace {

std::string Trailer(const grpc::ClientContext& context) {
  auto it = context.GetServerTrailingMetadata().find(kErrnoTrailer);
  if (it == context.GetServerTrailingMetadata().end()) return "";
  return std::string(it->second.data(), it->second.size());
}

class AdminServiceTest : public ::testing::Test {
 protected:
  void Start(const std::function<void(ServerCoreOptions&)>& tweak) {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/admin_service_test.", getpid(), ".",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    absl::StatusOr<std::unique_ptr<SqliteServerStore>> store = SqliteServerStore::Open(dir_);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    ServerCoreOptions options;
    options.store = store_.get();
    tweak(options);
    absl::StatusOr<std::unique_ptr<ServerCore>> core = ServerCore::Create(options);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = std::move(*core);
    service_ = std::make_unique<AdminService>(core_.get());
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::Admin::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
    core_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  // Waits until the core counts `n` open watchers.
  bool AwaitWatchers(uint64_t n) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (core_->MetricsSnapshot(0).counters.watchers != n) {
      if (absl::Now() > deadline) return false;
      absl::SleepFor(absl::Milliseconds(5));
    }
    return true;
  }

  // `n` events of about 400 bytes each (a rejected intent names the unknown node it asked for),
  // none of which touches the store.
  void EmitEvents(int n) {
    v1::CreateIntentRequest request;
    request.set_kind(v1::INTENT_KIND_RELEASE_CONTAINER);
    request.set_container("c1");
    for (int i = 0; i < n; ++i) {
      request.set_node(absl::StrCat(std::string(250, 'n'), i));
      ASSERT_EQ(core_->CreateIntent(request).status().code(), absl::StatusCode::kNotFound);
    }
  }

  // Emits until the core dropped a watcher (false after 10 s).
  bool EmitUntilDropped() {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (absl::Now() < deadline) {
      EmitEvents(100);
      const ServerCounters counters = core_->MetricsSnapshot(0).counters;
      auto it = counters.watchers_dropped.find("lag");
      if (it != counters.watchers_dropped.end() && it->second > 0) return true;
    }
    return false;
  }

  std::string dir_;
  std::unique_ptr<SqliteServerStore> store_;
  std::unique_ptr<ServerCore> core_;
  std::unique_ptr<AdminService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::unique_ptr<v1::Admin::Stub> stub_;
};

TEST_F(AdminServiceTest, AWatcherThatFallsBehindEndsWithENOBUFSAfterWhatItWasSent) {
  Start([](ServerCoreOptions& options) { options.watch_max_lag_events = 50; });
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::Event>> reader =
      stub_->WatchEvents(&context, v1::WatchEventsRequest());
  ASSERT_TRUE(AwaitWatchers(1));
  // Not reading: the stream's flow-control window fills, then the server's queue.
  ASSERT_TRUE(EmitUntilDropped());
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.watchers, 0u);
  EXPECT_EQ(core_->MetricsSnapshot(0).counters.watch_buffered_bytes, 0u);

  // Reading now: what was already on its way, then the status.
  v1::Event event;
  int read = 0;
  while (reader->Read(&event)) ++read;
  EXPECT_GT(read, 0);
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_TRUE(
      absl::StartsWith(status.error_message(), "ENOBUFS: the watcher fell 50 events behind"))
      << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "reconnect")) << status.error_message();
  EXPECT_EQ(Trailer(context), "ENOBUFS");
}

TEST_F(AdminServiceTest, ADroppedWatcherThatReadsNothingIsCancelled) {
  // More than its window holds: the watcher is dropped while a write waits on it.
  Start([](ServerCoreOptions& options) { options.watch_max_lag_events = 2000; });
  // A client whose window stays at HTTP/2's initial 64 KiB (no BDP probing): the server's writes
  // block on it early, as they do on any client that stopped reading.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  std::unique_ptr<v1::Admin::Stub> stub = v1::Admin::NewStub(grpc::CreateCustomChannel(
      absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::Event>> reader =
      stub->WatchEvents(&context, v1::WatchEventsRequest());
  ASSERT_TRUE(AwaitWatchers(1));
  ASSERT_TRUE(EmitUntilDropped());
  // Its status cannot reach it behind the data it does not read: the server cancels the stream
  // after a grace period, which frees the write it held.
  absl::SleepFor(absl::Seconds(3));
  v1::Event event;
  while (reader->Read(&event)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

TEST_F(AdminServiceTest, WatchersBeyondTheLimitAreRefusedWithENOSPC) {
  Start([](ServerCoreOptions& options) { options.max_watchers = 1; });
  grpc::ClientContext first_context;
  std::unique_ptr<grpc::ClientReader<v1::Event>> first =
      stub_->WatchEvents(&first_context, v1::WatchEventsRequest());
  ASSERT_TRUE(AwaitWatchers(1));

  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::Event>> second =
      stub_->WatchEvents(&context, v1::WatchEventsRequest());
  v1::Event event;
  EXPECT_FALSE(second->Read(&event));
  const grpc::Status status = second->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(absl::StartsWith(status.error_message(), "ENOSPC: already 1 WatchEvents streams"))
      << status.error_message();
  EXPECT_EQ(Trailer(context), "ENOSPC");

  // The first leaves: its place is free again.
  first_context.TryCancel();
  while (first->Read(&event)) {
  }
  first->Finish();
  ASSERT_TRUE(AwaitWatchers(0));
  grpc::ClientContext third_context;
  std::unique_ptr<grpc::ClientReader<v1::Event>> third =
      stub_->WatchEvents(&third_context, v1::WatchEventsRequest());
  EXPECT_TRUE(AwaitWatchers(1));
  third_context.TryCancel();
}

}  // namespace
}  // namespace dmapin::server
