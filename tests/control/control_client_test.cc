#include "agent/control/control_client.h"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/node/node_agent.h"
#include "agent/registry/sim_backend.h"
#include "agent/store/state_store.h"
#include "common/errno_status.h"
#include "common/mutex.h"
#include "dmapin/v1/control.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/fleet/fleet_state.h"
#include "testing/fake_vmm.h"

namespace dmapin::agent {
namespace {

// The server side of the stream, in this process.
using server::FleetState;
using server::NodeReport;

using Clock = std::chrono::steady_clock;
using Match = std::function<bool(const v1::AgentMessage&)>;

constexpr uint64_t k64K = 0x10000;
constexpr uint64_t kBase = 0x10000000;
constexpr char kContext[] = "vm-1";
constexpr char kContainer[] = "vm-1/vfio-0";
// Generous: under TSan everything is slower. Polls return as soon as the condition holds.
constexpr std::chrono::seconds kWait{5};

// Polls `done` until it holds or `timeout` passes.
bool PollUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout = kWait) {
  const Clock::time_point deadline = Clock::now() + timeout;
  while (!done()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// A Control service that records what each stream received and lets the test send to the most
// recent stream. Welcomes every stream with its epoch and report interval.
class FakeControl final : public v1::Control::Service {
 public:
  FakeControl(uint64_t epoch, uint64_t report_interval_ms)
      : epoch_(epoch), report_interval_ms_(report_interval_ms) {}

  grpc::Status Connect(grpc::ServerContext*,
                       grpc::ServerReaderWriter<v1::ServerMessage, v1::AgentMessage>* rw) override {
    auto stream = std::make_shared<Stream>();
    {
      MutexLock lock(&stream->write_mu);
      stream->rw = rw;
    }
    {
      MutexLock lock(&mu_);
      streams_.push_back(stream);
      cv_.notify_all();
    }
    v1::ServerMessage welcome;
    welcome.mutable_welcome()->set_server_epoch(epoch_);
    welcome.mutable_welcome()->set_report_interval_ms(report_interval_ms_);
    Send(*stream, welcome);
    v1::AgentMessage message;
    while (rw->Read(&message)) {
      MutexLock lock(&mu_);
      stream->received.push_back(message);
      cv_.notify_all();
    }
    {
      MutexLock lock(&stream->write_mu);
      stream->rw = nullptr;
    }
    MutexLock lock(&mu_);
    stream->open = false;
    cv_.notify_all();
    return grpc::Status::OK;
  }

  // Sends to the latest stream; false if there is none or it is closed.
  bool Send(const v1::ServerMessage& message) {
    std::shared_ptr<Stream> stream;
    {
      MutexLock lock(&mu_);
      if (streams_.empty()) return false;
      stream = streams_.back();
    }
    return Send(*stream, message);
  }

  bool SendDecision(const std::string& id, uint64_t epoch, v1::DecisionKind kind, uint64_t ua,
                    uint64_t size) {
    v1::ServerMessage message;
    v1::Decision* decision = message.mutable_decision();
    decision->set_id(id);
    decision->set_epoch(epoch);
    decision->set_kind(kind);
    decision->set_context(kContext);
    decision->set_container(kContainer);
    decision->set_ua(ua);
    decision->set_size(size);
    return Send(message);
  }

  // Waits for a message on stream `index` at position >= *cursor that satisfies `match`, and
  // moves the cursor past it.
  std::optional<v1::AgentMessage> Next(size_t index, size_t* cursor, const Match& match) {
    MutexLock lock(&mu_);
    const Clock::time_point deadline = Clock::now() + kWait;
    for (;;) {
      if (index < streams_.size()) {
        const std::vector<v1::AgentMessage>& received = streams_[index]->received;
        for (size_t i = *cursor; i < received.size(); ++i) {
          if (match(received[i])) {
            *cursor = i + 1;
            return received[i];
          }
        }
      }
      if (Clock::now() >= deadline) return std::nullopt;
      cv_.wait_until(mu_, deadline);
    }
  }

  // Everything stream `index` received so far.
  std::vector<v1::AgentMessage> Received(size_t index) {
    MutexLock lock(&mu_);
    return index < streams_.size() ? streams_[index]->received : std::vector<v1::AgentMessage>();
  }

  size_t streams() {
    MutexLock lock(&mu_);
    return streams_.size();
  }

  bool WaitClosed(size_t index) {
    MutexLock lock(&mu_);
    const Clock::time_point deadline = Clock::now() + kWait;
    while (index >= streams_.size() || streams_[index]->open) {
      if (Clock::now() >= deadline) return false;
      cv_.wait_until(mu_, deadline);
    }
    return true;
  }

 private:
  struct Stream {
    Mutex write_mu;
    grpc::ServerReaderWriter<v1::ServerMessage, v1::AgentMessage>* rw ABSL_GUARDED_BY(write_mu) =
        nullptr;
    // Guarded by FakeControl::mu_.
    std::vector<v1::AgentMessage> received;
    bool open = true;
  };

  static bool Send(Stream& stream, const v1::ServerMessage& message) {
    MutexLock lock(&stream.write_mu);
    return stream.rw != nullptr && stream.rw->Write(message);
  }

  const uint64_t epoch_;
  const uint64_t report_interval_ms_;
  Mutex mu_;
  std::condition_variable_any cv_;
  std::vector<std::shared_ptr<Stream>> streams_ ABSL_GUARDED_BY(mu_);
};

Match IsHello() {
  return [](const v1::AgentMessage& m) { return m.has_hello(); };
}
Match IsSnapshot() {
  return [](const v1::AgentMessage& m) { return m.has_snapshot(); };
}
Match IsHeartbeat() {
  return [](const v1::AgentMessage& m) { return m.has_heartbeat(); };
}
Match IsResult(const std::string& id) {
  return
      [id](const v1::AgentMessage& m) { return m.has_result() && m.result().decision_id() == id; };
}
Match IsDelta() {
  return [](const v1::AgentMessage& m) { return m.has_delta(); };
}
// A Delta that upserts the region at `ua` and whose upserted region satisfies `check`.
Match DeltaWithRegion(uint64_t ua, std::function<bool(const v1::Region&)> check) {
  return [ua, check](const v1::AgentMessage& m) {
    if (!m.has_delta()) return false;
    for (const v1::Region& region : m.delta().upserted_regions()) {
      if (region.ua() == ua && check(region)) return true;
    }
    return false;
  };
}

// The node as a server would see it after applying everything `messages` reported.
NodeReport Mirror(const std::vector<v1::AgentMessage>& messages) {
  FleetState fleet;
  const absl::Time now = absl::Now();
  std::string node;
  for (const v1::AgentMessage& message : messages) {
    if (message.has_hello()) {
      node = message.hello().node_name();
      fleet.Connect(message.hello(), now);
    } else if (message.has_snapshot()) {
      fleet.ApplySnapshot(node, message.snapshot(), now);
    } else if (message.has_delta()) {
      fleet.ApplyDelta(node, message.delta(), now);
    }
  }
  const NodeReport* report = fleet.Find(node);
  return report != nullptr ? *report : NodeReport();
}

class ControlClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           absl::StrCat("control_client_test_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    sim_ = *SimBackend::Create({.page_size = k64K});
    auto store = StateStore::Open(dir_.string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    auto agent = NodeAgent::Create({.node_name = "node-a",
                                    .backend = sim_.get(),
                                    .store = store_.get(),
                                    .available_backends = {"sim", "memlock"}});
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = std::move(*agent);
    ASSERT_TRUE(agent_->CreateContext({.name = kContext}).ok());
    ASSERT_TRUE(agent_->CreateContainer({.name = kContainer}).ok());
    StartServer(/*epoch=*/1);
  }

  void TearDown() override {
    client_.reset();
    StopServer();
    agent_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  // Starts a fake server on port_ (any free port the first time).
  void StartServer(uint64_t epoch) {
    fake_ = std::make_unique<FakeControl>(epoch, /*report_interval_ms=*/50);
    grpc::ServerBuilder builder;
    builder.AddListeningPort(absl::StrCat("127.0.0.1:", port_), grpc::InsecureServerCredentials(),
                             &port_);
    builder.RegisterService(fake_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(port_, 0);
  }

  void StopServer() {
    if (server_ == nullptr) return;
    // The deadline cancels the open streams (their handlers block in Read).
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
    server_.reset();
    fake_.reset();
  }

  ControlClientOptions Options() const {
    return {.server_address = absl::StrCat("127.0.0.1:", port_),
            .labels = {{"rack", "r7"}, {"zone", "z1"}},
            // Long, so the periodic reports of these tests prove the Welcome's 50 ms took over.
            .report_interval = std::chrono::seconds(10),
            .backoff_initial = std::chrono::milliseconds(20),
            .backoff_max = std::chrono::milliseconds(200)};
  }

  void StartClient() {
    client_ = std::make_unique<ControlClient>(agent_.get(), Options());
    ASSERT_TRUE(client_->Start().ok());
  }

  // Starts the client and waits for Hello and Snapshot on the fake's stream `index`.
  v1::Snapshot ConnectAndAwaitSnapshot(size_t index = 0) {
    if (client_ == nullptr) StartClient();
    size_t cursor = 0;
    EXPECT_TRUE(fake_->Next(index, &cursor, IsHello()).has_value());
    std::optional<v1::AgentMessage> snapshot = fake_->Next(index, &cursor, IsSnapshot());
    EXPECT_TRUE(snapshot.has_value());
    cursor_ = cursor;
    return snapshot.has_value() ? snapshot->snapshot() : v1::Snapshot();
  }

  RegionView AgentRegion(uint64_t ua) {
    auto regions = agent_->ListRegions(kContext, false);
    EXPECT_TRUE(regions.ok());
    for (const RegionView& region : *regions) {
      if (region.info.ua == ua) return region;
    }
    ADD_FAILURE() << "no region at " << ua;
    return RegionView();
  }

  std::filesystem::path dir_;
  std::unique_ptr<SimBackend> sim_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<NodeAgent> agent_;
  int port_ = 0;
  std::unique_ptr<FakeControl> fake_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<ControlClient> client_;
  size_t cursor_ = 0;  // past the first Snapshot of stream 0
};

TEST_F(ControlClientTest, StartChecksItsOptions) {
  ControlClient no_address(agent_.get(), {});
  EXPECT_EQ(no_address.Start().code(), absl::StatusCode::kInvalidArgument);
  ControlClient twice(agent_.get(), Options());
  EXPECT_TRUE(twice.Start().ok());
  EXPECT_EQ(twice.Start().code(), absl::StatusCode::kFailedPrecondition);
}

// What the node can hold goes in Hello, for the server's admission.
TEST_F(ControlClientTest, HelloSaysWhatTheNodeCanHold) {
  ControlClientOptions options = Options();
  options.max_region_bytes = 64 * k64K;
  options.max_pinned_bytes = 1024 * k64K;
  options.physical_memory_bytes = uint64_t{16} << 30;
  client_ = std::make_unique<ControlClient>(agent_.get(), options);
  ASSERT_TRUE(client_->Start().ok());
  size_t cursor = 0;
  std::optional<v1::AgentMessage> hello = fake_->Next(0, &cursor, IsHello());
  ASSERT_TRUE(hello.has_value());
  EXPECT_EQ(hello->hello().max_region_bytes(), 64 * k64K);
  EXPECT_EQ(hello->hello().max_pinned_bytes(), 1024 * k64K);
  EXPECT_EQ(hello->hello().physical_memory_bytes(), uint64_t{16} << 30);
}

// (a)
TEST_F(ControlClientTest, SendsHelloThenSnapshot) {
  ASSERT_TRUE(agent_->RegisterRegion(kContainer, kContext, kBase, 2 * k64K).ok());
  StartClient();

  const std::vector<v1::AgentMessage> first = [&] {
    size_t cursor = 0;
    EXPECT_TRUE(fake_->Next(0, &cursor, IsSnapshot()).has_value());
    return fake_->Received(0);
  }();
  ASSERT_GE(first.size(), 2u);
  ASSERT_TRUE(first[0].has_hello());
  const v1::Hello& hello = first[0].hello();
  EXPECT_EQ(hello.node_name(), "node-a");
  EXPECT_EQ(hello.labels().size(), 2);
  EXPECT_EQ(hello.labels().at("rack"), "r7");
  EXPECT_EQ(hello.labels().at("zone"), "z1");
  EXPECT_EQ(hello.page_size(), k64K);
  EXPECT_EQ(hello.backend(), "sim");
  ASSERT_EQ(hello.available_backends_size(), 2);
  EXPECT_EQ(hello.available_backends(0), "sim");
  EXPECT_EQ(hello.available_backends(1), "memlock");
  EXPECT_FALSE(hello.agent_version().empty());
  EXPECT_FALSE(hello.incarnation().empty());
  EXPECT_EQ(hello.incarnation(), client_->incarnation());
  EXPECT_EQ(hello.physical_memory_bytes(), 0u) << "the sim backend's memory is not the host's";
  EXPECT_EQ(hello.max_region_bytes(), 0u);
  EXPECT_EQ(hello.max_pinned_bytes(), 0u);

  ASSERT_TRUE(first[1].has_snapshot());
  const v1::Snapshot& snapshot = first[1].snapshot();
  EXPECT_GE(snapshot.version(), 1u);
  ASSERT_EQ(snapshot.contexts_size(), 1);
  EXPECT_EQ(snapshot.contexts(0).name(), kContext);
  EXPECT_EQ(snapshot.contexts(0).regions(), 1u);
  ASSERT_EQ(snapshot.containers_size(), 1);
  EXPECT_EQ(snapshot.containers(0).name(), kContainer);
  EXPECT_EQ(snapshot.containers(0).context(), kContext);
  EXPECT_EQ(snapshot.containers(0).held_regions(), 1u);
  ASSERT_EQ(snapshot.regions_size(), 1);
  const v1::Region& region = snapshot.regions(0);
  EXPECT_EQ(region.context(), kContext);
  EXPECT_EQ(region.ua(), kBase);
  EXPECT_EQ(region.size(), 2 * k64K);
  EXPECT_EQ(region.entries(), 2u);
  EXPECT_EQ(region.used(), 1u);
  EXPECT_EQ(region.page_size(), k64K);
  ASSERT_EQ(region.containers_size(), 1);
  EXPECT_EQ(region.containers(0), kContainer);
  EXPECT_EQ(region.hpas_size(), 0);
  EXPECT_EQ(snapshot.counters().registers_ok(), 1u);

  EXPECT_TRUE(PollUntil([&] { return client_->connected(); }));
  // Idle: heartbeats, at the Welcome's interval (the options' 10 s would time this out).
  size_t cursor = 2;
  ASSERT_TRUE(fake_->Next(0, &cursor, IsHeartbeat()).has_value());
  ASSERT_TRUE(fake_->Next(0, &cursor, IsHeartbeat()).has_value());
  EXPECT_TRUE(PollUntil([&] { return client_->stats().server_epoch == 1; }));

  // A snapshot request is answered with a full snapshot, at a newer version.
  v1::ServerMessage request;
  request.mutable_snapshot_request();
  ASSERT_TRUE(fake_->Send(request));
  std::optional<v1::AgentMessage> again = fake_->Next(0, &cursor, IsSnapshot());
  ASSERT_TRUE(again.has_value());
  EXPECT_GT(again->snapshot().version(), snapshot.version());
  EXPECT_EQ(again->snapshot().regions_size(), 1);

  // The client counts a message once its Write returns, which may be after the server has it.
  EXPECT_TRUE(PollUntil([&] { return client_->stats().snapshots_sent == 2; }));
  const ControlClientStats stats = client_->stats();
  EXPECT_EQ(stats.connects, 1u);
  EXPECT_EQ(stats.disconnects, 0u);
  EXPECT_GE(stats.heartbeats_sent, 2u);
  EXPECT_GE(stats.messages_received, 2u);  // welcome, snapshot request
}

// (b)
TEST_F(ControlClientTest, AppliesDecisionOnceAndReportsItsEffect) {
  ConnectAndAwaitSnapshot();
  size_t cursor = cursor_;
  ASSERT_TRUE(fake_->SendDecision("d-1", 7, v1::DECISION_KIND_REGISTER, kBase, 2 * k64K));
  std::optional<v1::AgentMessage> result = fake_->Next(0, &cursor, IsResult("d-1"));
  ASSERT_TRUE(result.has_value());
  EXPECT_EQ(result->result().epoch(), 7u);
  EXPECT_EQ(result->result().errno_value(), 0);
  EXPECT_EQ(result->result().errno_name(), "OK");
  EXPECT_FALSE(result->result().duplicate());
  // The effect follows the result, without waiting for an interval.
  ASSERT_TRUE(fake_
                  ->Next(0, &cursor,
                         DeltaWithRegion(kBase,
                                         [](const v1::Region& region) {
                                           return region.used() == 1 &&
                                                  region.containers_size() == 1;
                                         }))
                  .has_value());

  // The same id again: answered from the record, not applied twice.
  ASSERT_TRUE(fake_->SendDecision("d-1", 7, v1::DECISION_KIND_REGISTER, kBase, 2 * k64K));
  result = fake_->Next(0, &cursor, IsResult("d-1"));
  ASSERT_TRUE(result.has_value());
  EXPECT_TRUE(result->result().duplicate());
  EXPECT_EQ(result->result().errno_value(), 0);
  EXPECT_EQ(result->result().errno_name(), "OK");
  // A report follows the duplicate's result too (an empty delta: nothing changed).
  ASSERT_TRUE(fake_->Next(0, &cursor, IsDelta()).has_value());
  EXPECT_EQ(AgentRegion(kBase).info.used, 1u);
  const NodeReport mirror = Mirror(fake_->Received(0));
  ASSERT_EQ(mirror.regions.size(), 1u);
  EXPECT_EQ(mirror.regions.begin()->second.used(), 1u);

  const ControlClientStats stats = client_->stats();
  EXPECT_EQ(stats.decisions_applied, 1u);
  EXPECT_EQ(stats.decisions_refused, 0u);
  EXPECT_EQ(stats.duplicates, 1u);
}

// (c)
TEST_F(ControlClientTest, UnregisterWhileMappedAnswersEbusy) {
  ASSERT_TRUE(agent_->RegisterRegion(kContainer, kContext, kBase, 2 * k64K).ok());
  ASSERT_TRUE(agent_->MapDma(kContainer, 0, kBase, 2 * k64K).ok());
  ConnectAndAwaitSnapshot();
  size_t cursor = cursor_;
  ASSERT_TRUE(fake_->SendDecision("d-2", 3, v1::DECISION_KIND_UNREGISTER, kBase, 2 * k64K));
  std::optional<v1::AgentMessage> result = fake_->Next(0, &cursor, IsResult("d-2"));
  ASSERT_TRUE(result.has_value());
  EXPECT_EQ(result->result().errno_value(), EBUSY);
  EXPECT_EQ(result->result().errno_name(), "EBUSY");
  EXPECT_NE(result->result().message().find("EBUSY"), std::string::npos)
      << result->result().message();
  EXPECT_FALSE(result->result().duplicate());
  EXPECT_EQ(AgentRegion(kBase).info.used, 1u);
  // The refusal shows in the counters of the next report.
  ASSERT_TRUE(fake_
                  ->Next(0, &cursor,
                         [](const v1::AgentMessage& m) {
                           return m.has_delta() && m.delta().counters().unregister_ebusy() == 1;
                         })
                  .has_value());
  EXPECT_EQ(client_->stats().decisions_refused, 1u);
}

// (d)
TEST_F(ControlClientTest, LocalChangesShowUpAsDeltas) {
  ASSERT_TRUE(agent_->RegisterRegion(kContainer, kContext, kBase, 2 * k64K).ok());
  const v1::Snapshot snapshot = ConnectAndAwaitSnapshot();
  ASSERT_EQ(snapshot.regions_size(), 1);
  const uint64_t unmapped = snapshot.regions(0).mapped();
  size_t cursor = cursor_;

  ASSERT_TRUE(agent_->MapDma(kContainer, 0, kBase, 2 * k64K).ok());
  const uint64_t mapped = AgentRegion(kBase).info.mapped;
  ASSERT_NE(mapped, unmapped);
  std::optional<v1::AgentMessage> delta = fake_->Next(
      0, &cursor,
      DeltaWithRegion(kBase, [&](const v1::Region& r) { return r.mapped() == mapped; }));
  ASSERT_TRUE(delta.has_value());
  EXPECT_EQ(delta->delta().counters().maps_ok(), 1u);
  EXPECT_GT(delta->delta().version(), snapshot.version());

  ASSERT_TRUE(agent_->UnmapDma(kContainer, 0, 2 * k64K).ok());
  ASSERT_TRUE(fake_
                  ->Next(0, &cursor,
                         DeltaWithRegion(
                             kBase, [&](const v1::Region& r) { return r.mapped() == unmapped; }))
                  .has_value());

  ASSERT_TRUE(agent_->UnregisterRegion(kContainer, kBase, 2 * k64K).ok());
  ASSERT_TRUE(fake_
                  ->Next(0, &cursor,
                         [](const v1::AgentMessage& m) {
                           return m.has_delta() && m.delta().removed_regions_size() == 1 &&
                                  m.delta().removed_regions(0).ua() == kBase &&
                                  m.delta().removed_regions(0).size() == 2 * k64K;
                         })
                  .has_value());

  // What a server rebuilds from the stream is the agent's state.
  ASSERT_TRUE(agent_->TeardownContext(kContext).ok());
  ASSERT_TRUE(fake_
                  ->Next(0, &cursor,
                         [](const v1::AgentMessage& m) {
                           return m.has_delta() && m.delta().removed_contexts_size() == 1;
                         })
                  .has_value());
  const NodeReport mirror = Mirror(fake_->Received(0));
  EXPECT_TRUE(mirror.regions.empty());
  EXPECT_TRUE(mirror.contexts.empty());
  EXPECT_EQ(mirror.containers.size(), agent_->ListContainers().size());
  EXPECT_EQ(mirror.counters.unregisters_ok(), agent_->Status().counters.unregisters_ok);
  // Versions only grow.
  uint64_t version = 0;
  for (const v1::AgentMessage& m : fake_->Received(0)) {
    const uint64_t v = m.has_snapshot() ? m.snapshot().version()
                       : m.has_delta()  ? m.delta().version()
                                        : version;
    EXPECT_GE(v, version);
    version = v;
  }
}

// A VMM that exits: the agent tears its context down and the next delta says why, for the
// server's "vmm_exited" event.
TEST_F(ControlClientTest, AVmmThatExitsIsReportedAsAnEndedContext) {
  absl::StatusOr<harness::FakeVmm> vmm = harness::FakeVmm::Start(1);
  ASSERT_TRUE(vmm.ok()) << vmm.status();
  ASSERT_TRUE(agent_->CreateContext({.name = "vm-exits", .owner_pid = vmm->pid()}).ok());
  ASSERT_TRUE(agent_->CreateContainer({.name = "vm-exits/c"}).ok());
  ASSERT_TRUE(agent_->RegisterRegion("vm-exits/c", "vm-exits", kBase, 2 * k64K).ok());
  ConnectAndAwaitSnapshot();
  size_t cursor = cursor_;
  const pid_t pid = vmm->pid();
  vmm->Kill();
  std::optional<v1::AgentMessage> delta = fake_->Next(0, &cursor, [](const v1::AgentMessage& m) {
    return m.has_delta() && m.delta().ended_contexts_size() == 1;
  });
  ASSERT_TRUE(delta.has_value());
  const v1::EndedContext& ended = delta->delta().ended_contexts(0);
  EXPECT_EQ(ended.context(), "vm-exits");
  EXPECT_EQ(ended.owner_pid(), pid);
  EXPECT_EQ(ended.unpinned_bytes(), 2 * k64K);
  ASSERT_EQ(delta->delta().removed_contexts_size(), 1);
  EXPECT_EQ(delta->delta().removed_contexts(0), "vm-exits");
  EXPECT_EQ(delta->delta().counters().owner_exit_teardowns(), 1u);
}

// (e)
TEST_F(ControlClientTest, ReconnectsAfterServerRestart) {
  const v1::Snapshot first = ConnectAndAwaitSnapshot();
  ASSERT_TRUE(PollUntil([&] { return client_->connected(); }));
  const int port = port_;

  StopServer();
  ASSERT_TRUE(PollUntil([&] { return !client_->connected(); }));
  EXPECT_EQ(client_->stats().disconnects, 1u);
  // Let a few attempts fail against the closed port.
  const uint64_t attempts = client_->stats().connect_attempts;
  ASSERT_TRUE(PollUntil([&] { return client_->stats().connect_attempts >= attempts + 2; }));

  ASSERT_TRUE(agent_->RegisterRegion(kContainer, kContext, kBase, k64K).ok());
  StartServer(/*epoch=*/2);
  ASSERT_EQ(port_, port);
  size_t cursor = 0;
  std::optional<v1::AgentMessage> hello = fake_->Next(0, &cursor, IsHello());
  ASSERT_TRUE(hello.has_value());
  EXPECT_EQ(hello->hello().incarnation(), client_->incarnation());
  std::optional<v1::AgentMessage> snapshot = fake_->Next(0, &cursor, IsSnapshot());
  ASSERT_TRUE(snapshot.has_value());
  EXPECT_EQ(snapshot->snapshot().regions_size(), 1);  // what changed while disconnected
  EXPECT_GT(snapshot->snapshot().version(), first.version());
  EXPECT_TRUE(PollUntil([&] { return client_->stats().server_epoch == 2; }));
  EXPECT_TRUE(PollUntil([&] { return client_->connected(); }));
  EXPECT_EQ(client_->stats().connects, 2u);
}

// (f)
TEST_F(ControlClientTest, StopIsPromptWhileDisconnected) {
  StopServer();  // nothing listens on port_ now
  StartClient();
  ASSERT_TRUE(PollUntil([&] { return client_->stats().connect_attempts >= 3; }));
  const Clock::time_point start = Clock::now();
  client_->Stop();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(1));
  EXPECT_FALSE(client_->connected());
  EXPECT_EQ(client_->stats().connects, 0u);
  client_->Stop();  // idempotent
}

TEST_F(ControlClientTest, StopIsPromptAndCleanWhileConnected) {
  ConnectAndAwaitSnapshot();
  ASSERT_TRUE(PollUntil([&] { return client_->connected(); }));
  const Clock::time_point start = Clock::now();
  client_->Stop();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(1));
  EXPECT_FALSE(client_->connected());
  EXPECT_TRUE(fake_->WaitClosed(0));
  EXPECT_EQ(client_->stats().disconnects, 1u);
  EXPECT_EQ(client_->stats().last_error, "stopped");
}

}  // namespace
}  // namespace dmapin::agent
