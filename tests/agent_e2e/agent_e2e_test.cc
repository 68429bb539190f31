// End-to-end test of the dmapin-agent binary (a data dependency, --agent_binary): starts it on a
// Unix socket and a TCP loopback port and talks to it as a VMM, the central service and an
// operator would: health and reflection on both listeners, a VMM's DMA sequence, the error
// contract of bad input (code, "<ERRNO>:" message prefix, "dmapin-errno" trailer), the size
// limits (a huge register is ENOMEM and leaves the agent serving, its memory bounded),
// durability across SIGTERM and SIGKILL restarts, and --help.
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "gmock/gmock.h"
#include "google/protobuf/unknown_field_set.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "testing/agent_process.h"

namespace dmapin::agent {
namespace {

using ::dmapin::harness::AgentProcess;
using ::dmapin::harness::AgentProcessOptions;
using ::dmapin::harness::HealthCheck;
using ::dmapin::harness::kHealthServing;
using ::dmapin::harness::MakeChannel;
using ::dmapin::harness::RawBidiCall;
using ::dmapin::harness::ScratchDir;

constexpr uint64_t kPage = 65536;
constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr char kErrnoTrailer[] = "dmapin-errno";
constexpr char kReflectionMethod[] =
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

std::string& AgentBinary() {
  static std::string* binary = new std::string("agent/dmapin-agent");
  return *binary;
}

std::unique_ptr<grpc::ClientContext> NewContext() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return context;
}

std::string TrailerOf(const grpc::ClientContext& context) {
  const auto& trailers = context.GetServerTrailingMetadata();
  auto it = trailers.find(kErrnoTrailer);
  return it == trailers.end() ? "(none)" : std::string(it->second.data(), it->second.size());
}

// A failed call carries `code`, a message "<errno>: ..." and the trailer naming `errno_name`.
testing::AssertionResult FailsWith(const grpc::Status& status, const grpc::ClientContext& context,
                                   grpc::StatusCode code, const std::string& errno_name) {
  const std::string trailer = TrailerOf(context);
  const std::string got = absl::StrCat("code ", status.error_code(), " message \"",
                                       status.error_message(), "\" trailer ", trailer);
  if (status.error_code() != code) {
    return testing::AssertionFailure() << "wanted code " << code << ", got " << got;
  }
  if (!absl::StartsWith(status.error_message(), errno_name + ":")) {
    return testing::AssertionFailure()
           << "wanted a message starting \"" << errno_name << ":\", got " << got;
  }
  if (trailer != errno_name) {
    return testing::AssertionFailure() << "wanted trailer " << errno_name << ", got " << got;
  }
  return testing::AssertionSuccess();
}

testing::AssertionResult Ok(const grpc::Status& status, const grpc::ClientContext& context) {
  if (status.ok()) return testing::AssertionSuccess();
  return testing::AssertionFailure()
         << "code " << status.error_code() << " \"" << status.error_message() << "\" trailer "
         << TrailerOf(context);
}

// The service names in a grpc.reflection.v1alpha ServerReflectionResponse
// { list_services_response = 6 { repeated ServiceResponse service = 1 { string name = 1 } } }.
absl::StatusOr<std::vector<std::string>> ServiceNames(const std::string& response) {
  google::protobuf::UnknownFieldSet top;
  if (!top.ParseFromString(response)) return absl::DataLossError("bad ServerReflectionResponse");
  std::vector<std::string> names;
  for (int i = 0; i < top.field_count(); ++i) {
    const google::protobuf::UnknownField& list = top.field(i);
    if (list.number() == 7) return absl::InternalError("reflection answered an error_response");
    if (list.number() != 6 ||
        list.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) {
      continue;
    }
    google::protobuf::UnknownFieldSet services;
    if (!services.ParseFromString(list.length_delimited())) {
      return absl::DataLossError("bad ListServiceResponse");
    }
    for (int j = 0; j < services.field_count(); ++j) {
      if (services.field(j).number() != 1) continue;
      google::protobuf::UnknownFieldSet service;
      if (!service.ParseFromString(services.field(j).length_delimited())) {
        return absl::DataLossError("bad ServiceResponse");
      }
      for (int k = 0; k < service.field_count(); ++k) {
        if (service.field(k).number() == 1) names.push_back(service.field(k).length_delimited());
      }
    }
  }
  return names;
}

// Everything a restart must keep, as the API shows it.
struct Snapshot {
  v1::ListContextsResponse contexts;
  v1::ListContainersResponse containers;
  v1::ListRegionsResponse regions;  // with hpas
  v1::NodeStatus totals;            // the counts only (counters restart from zero)
};

class AgentE2eTest : public testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<ScratchDir>> dir = ScratchDir::Create("dmapin-e2e-");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *std::move(dir);
    StartAgent();
  }

  void TearDown() override {
    if (agent_ != nullptr) {
      const absl::Status stopped = StopAgent(/*drop_clients=*/true, absl::Seconds(5));
      EXPECT_TRUE(stopped.ok()) << stopped;
    }
  }

  // (Re)starts the agent on the same state directory and socket, with a fresh TCP port.
  void StartAgent() {
    AgentProcessOptions options;
    options.binary = AgentBinary();
    options.args = {
        "--backend=sim",
        "--sim_page_size=65536",
        absl::StrCat("--state_dir=", dir_->Join("state")),
        absl::StrCat("--uds_path=", dir_->Join("agent.sock")),
        "--tcp_address=127.0.0.1:0",
        "--node_name=e2e-node",
        // The test picks memlock limits and the waiver, the node's decision: it is the manager.
        absl::StrCat("--manager_uids=", getuid()),
        // No metrics server (fixed default port; slow to stop); tolerated by agents without it.
        "--metrics_address=",
        "--undefok=metrics_address",
    };
    options.args.insert(options.args.end(), extra_args_.begin(), extra_args_.end());
    options.log_path = dir_->Join("agent.log");
    options.uds_path = dir_->Join("agent.sock");
    options.tcp = true;
    absl::StatusOr<std::unique_ptr<AgentProcess>> agent = AgentProcess::Start(std::move(options));
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = *std::move(agent);
    uds_ = MakeChannel(agent_->uds_target());
    tcp_ = MakeChannel(agent_->tcp_target());
    stub_ = v1::NodeAgent::NewStub(uds_);
    tcp_stub_ = v1::NodeAgent::NewStub(tcp_);
  }

  // SIGTERM; OK when the agent exits with status 0 within `grace`. With `drop_clients` the test's
  // channels are closed first: an idle client that keeps its connection makes the agent wait for
  // the whole deadline of its graceful shutdown (5 s), see
  // RestartKeepsRegionsContextsAndContainers.
  absl::Status StopAgent(bool drop_clients, absl::Duration grace) {
    if (drop_clients) {
      stub_.reset();
      tcp_stub_.reset();
      uds_.reset();
      tcp_.reset();
    }
    absl::Status stopped = agent_->Terminate(grace);
    agent_.reset();
    return stopped;
  }

  grpc::Status CreateContext(const std::string& name, std::optional<uint64_t> limit,
                             bool cap_ipc_lock = false) {
    v1::CreateContextRequest request;
    request.set_name(name);
    if (limit.has_value()) {
      request.set_memlock_limit_bytes(*limit);
    } else {
      request.set_memlock_unlimited(true);
    }
    request.set_cap_ipc_lock(cap_ipc_lock);
    v1::Context response;
    auto context = NewContext();
    return stub_->CreateContext(context.get(), request, &response);
  }

  grpc::Status CreateContainer(const std::string& name, uint64_t iommu_page_size = 0,
                               uint64_t window_start = 0, uint64_t window_size = 0) {
    v1::CreateContainerRequest request;
    request.set_name(name);
    request.set_iommu_page_size(iommu_page_size);
    request.set_window_start(window_start);
    request.set_window_size(window_size);
    v1::Container response;
    auto context = NewContext();
    return stub_->CreateContainer(context.get(), request, &response);
  }

  grpc::Status Register(const std::string& container, const std::string& context_name, uint64_t ua,
                        uint64_t size, v1::Region* region = nullptr) {
    v1::RegisterRegionRequest request;
    request.set_container(container);
    request.set_context(context_name);
    request.set_ua(ua);
    request.set_size(size);
    v1::Region response;
    auto context = NewContext();
    return stub_->RegisterRegion(context.get(), request, region != nullptr ? region : &response);
  }

  grpc::Status Map(const std::string& container, uint64_t iova, uint64_t ua, uint64_t size) {
    v1::MapDmaRequest request;
    request.set_container(container);
    request.set_iova(iova);
    request.set_ua(ua);
    request.set_size(size);
    v1::MapDmaResponse response;
    auto context = NewContext();
    return stub_->MapDma(context.get(), request, &response);
  }

  grpc::Status Unmap(const std::string& container, uint64_t iova, uint64_t size) {
    v1::UnmapDmaRequest request;
    request.set_container(container);
    request.set_iova(iova);
    request.set_size(size);
    v1::UnmapDmaResponse response;
    auto context = NewContext();
    return stub_->UnmapDma(context.get(), request, &response);
  }

  grpc::Status ReleaseContainer(const std::string& name) {
    v1::ReleaseContainerRequest request;
    request.set_name(name);
    v1::ReleaseContainerResponse response;
    auto context = NewContext();
    return stub_->ReleaseContainer(context.get(), request, &response);
  }

  std::vector<v1::Region> Regions(const std::string& context_name) {
    v1::ListRegionsRequest request;
    request.set_context(context_name);
    v1::ListRegionsResponse response;
    auto context = NewContext();
    const grpc::Status status = stub_->ListRegions(context.get(), request, &response);
    EXPECT_TRUE(Ok(status, *context));
    return {response.regions().begin(), response.regions().end()};
  }

  v1::Context GetContext(const std::string& name) {
    v1::GetContextRequest request;
    request.set_name(name);
    v1::Context response;
    auto context = NewContext();
    EXPECT_TRUE(Ok(stub_->GetContext(context.get(), request, &response), *context));
    return response;
  }

  Snapshot TakeSnapshot() {
    Snapshot snapshot;
    auto c1 = NewContext();
    EXPECT_TRUE(Ok(stub_->ListContexts(c1.get(), {}, &snapshot.contexts), *c1));
    auto c2 = NewContext();
    EXPECT_TRUE(Ok(stub_->ListContainers(c2.get(), {}, &snapshot.containers), *c2));
    v1::ListRegionsRequest regions;
    regions.set_with_hpas(true);
    auto c3 = NewContext();
    EXPECT_TRUE(Ok(stub_->ListRegions(c3.get(), regions, &snapshot.regions), *c3));
    v1::NodeStatus status;
    auto c4 = NewContext();
    EXPECT_TRUE(Ok(stub_->GetNodeStatus(c4.get(), {}, &status), *c4));
    snapshot.totals.set_page_size(status.page_size());
    snapshot.totals.set_contexts(status.contexts());
    snapshot.totals.set_containers(status.containers());
    snapshot.totals.set_regions(status.regions());
    snapshot.totals.set_locked_bytes(status.locked_bytes());
    snapshot.totals.set_installed_entries(status.installed_entries());
    return snapshot;
  }

  // The agent's resident memory (VmRSS), in bytes.
  uint64_t AgentRss() {
    std::ifstream status(absl::StrCat("/proc/", agent_->pid(), "/status"));
    std::string line;
    while (std::getline(status, line)) {
      absl::string_view rest = line;
      uint64_t kib = 0;
      if (absl::ConsumePrefix(&rest, "VmRSS:") &&
          absl::SimpleAtoi(absl::StripSuffix(absl::StripAsciiWhitespace(rest), " kB"), &kib)) {
        return kib << 10;
      }
    }
    ADD_FAILURE() << "no VmRSS for agent pid " << agent_->pid();
    return 0;
  }

  // The agent still runs and answers.
  void ExpectServing() {
    ASSERT_TRUE(agent_->CheckRunning().ok()) << agent_->CheckRunning();
    absl::StatusOr<int> health = HealthCheck(uds_, "", absl::Seconds(5));
    ASSERT_TRUE(health.ok()) << health.status();
    EXPECT_EQ(*health, kHealthServing);
  }

  // Flags StartAgent adds after its own.
  std::vector<std::string> extra_args_;
  std::unique_ptr<ScratchDir> dir_;
  std::unique_ptr<AgentProcess> agent_;
  std::shared_ptr<grpc::Channel> uds_;
  std::shared_ptr<grpc::Channel> tcp_;
  std::unique_ptr<v1::NodeAgent::Stub> stub_;
  std::unique_ptr<v1::NodeAgent::Stub> tcp_stub_;
};

void ExpectSameMessage(const google::protobuf::Message& before,
                       const google::protobuf::Message& after, const std::string& what) {
  google::protobuf::util::MessageDifferencer differencer;
  std::string differences;
  differencer.ReportDifferencesToString(&differences);
  EXPECT_TRUE(differencer.Compare(before, after)) << what << " changed across the restart:\n"
                                                  << differences << "before:\n"
                                                  << before.DebugString() << "after:\n"
                                                  << after.DebugString();
}

void ExpectSameSnapshot(const Snapshot& before, const Snapshot& after, const std::string& when) {
  ExpectSameMessage(before.contexts, after.contexts, absl::StrCat("ListContexts (", when, ")"));
  ExpectSameMessage(before.containers, after.containers,
                    absl::StrCat("ListContainers (", when, ")"));
  ExpectSameMessage(before.regions, after.regions, absl::StrCat("ListRegions (", when, ")"));
  ExpectSameMessage(before.totals, after.totals, absl::StrCat("GetNodeStatus totals (", when, ")"));
}

// (a) and (b).
TEST_F(AgentE2eTest, HealthAndReflectionOnBothListeners) {
  ASSERT_GT(agent_->tcp_port(), 0);
  for (const auto& [name, channel] : {std::make_pair("unix", uds_), std::make_pair("tcp", tcp_)}) {
    SCOPED_TRACE(name);
    absl::StatusOr<int> health = HealthCheck(channel, "", absl::Seconds(5));
    ASSERT_TRUE(health.ok()) << health.status();
    EXPECT_EQ(*health, kHealthServing);

    // ServerReflectionRequest { list_services = 7: "" }
    absl::StatusOr<std::vector<std::string>> responses =
        RawBidiCall(channel, kReflectionMethod, {std::string("\x3a\x00", 2)}, absl::Seconds(5));
    ASSERT_TRUE(responses.ok()) << responses.status();
    ASSERT_EQ(responses->size(), 1u);
    absl::StatusOr<std::vector<std::string>> services = ServiceNames(responses->front());
    ASSERT_TRUE(services.ok()) << services.status();
    EXPECT_THAT(*services, testing::Contains("dmapin.v1.NodeAgent"));
    EXPECT_THAT(*services, testing::Contains("grpc.reflection.v1alpha.ServerReflection"));
  }
  // The API answers on TCP too.
  v1::NodeStatus status;
  auto context = NewContext();
  ASSERT_TRUE(Ok(tcp_stub_->GetNodeStatus(context.get(), {}, &status), *context));
  EXPECT_EQ(status.node_name(), "e2e-node");
  EXPECT_EQ(status.backend(), "sim");
  EXPECT_EQ(status.page_size(), kPage);
}

// (c) A VMM's sequence over the Unix socket.
// A DmaSession request mapping one page.
v1::DmaSessionRequest SessionMap(uint64_t tag, const std::string& container, uint64_t iova,
                                 uint64_t ua) {
  v1::DmaSessionRequest request;
  request.set_tag(tag);
  request.mutable_map()->set_container(container);
  request.mutable_map()->set_iova(iova);
  request.mutable_map()->set_ua(ua);
  request.mutable_map()->set_size(kPage);
  return request;
}

// DmaSession: map/unmap requests on one stream, each answered in order with its tag and the
// status the unary call would have returned; a failed request leaves the stream open, and what
// it acknowledged survives a kill -9.
TEST_F(AgentE2eTest, DmaSessionAnswersInOrderAndSurvivesBadRequests) {
  ASSERT_TRUE(CreateContext("vm", std::nullopt).ok());
  ASSERT_TRUE(CreateContainer("vm/dev").ok());
  const uint64_t ua = uint64_t{1} << 32;
  ASSERT_TRUE(Register("vm/dev", "vm", ua, 16 * kPage).ok());

  auto context = NewContext();
  std::unique_ptr<grpc::ClientReaderWriter<v1::DmaSessionRequest, v1::DmaSessionResponse>> stream =
      stub_->DmaSession(context.get());
  v1::DmaSessionRequest unmap;
  unmap.set_tag(6);
  unmap.mutable_unmap()->set_container("vm/dev");
  unmap.mutable_unmap()->set_iova(kPage);
  unmap.mutable_unmap()->set_size(kPage);
  v1::DmaSessionRequest empty;
  empty.set_tag(5);
  const std::vector<v1::DmaSessionRequest> requests = {
      SessionMap(1, "vm/dev", 0, ua),
      SessionMap(2, "vm/dev", kPage, ua + kPage),
      SessionMap(3, "vm/nothing", 0, ua),          // unknown container
      SessionMap(4, "vm/dev", 2 * kPage + 1, ua),  // misaligned iova
      empty,                                       // neither map nor unmap
      unmap,
  };
  // code, errno of each answer, in order.
  const std::vector<std::pair<int, std::string>> expected = {
      {0, ""},
      {0, ""},
      {static_cast<int>(grpc::StatusCode::NOT_FOUND), "ENOENT"},
      {static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT), "EINVAL"},
      {static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT), "EINVAL"},
      {0, ""},
  };
  for (size_t i = 0; i < requests.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("request tag ", requests[i].tag()));
    ASSERT_TRUE(stream->Write(requests[i]));
    v1::DmaSessionResponse response;
    ASSERT_TRUE(stream->Read(&response));
    EXPECT_EQ(response.tag(), requests[i].tag());
    EXPECT_EQ(response.code(), expected[i].first) << response.message();
    EXPECT_EQ(response.errno_name(), expected[i].second);
    if (!expected[i].second.empty()) {
      EXPECT_TRUE(absl::StartsWith(response.message(), expected[i].second + ": "))
          << response.message();
    }
  }
  ASSERT_TRUE(stream->WritesDone());
  const grpc::Status finished = stream->Finish();
  EXPECT_TRUE(finished.ok()) << finished.error_message();

  // One page stays mapped: mapped = 1 (the bias) + 1.
  std::vector<v1::Region> regions = Regions("vm");
  ASSERT_EQ(regions.size(), 1u);
  EXPECT_EQ(regions[0].mapped(), 2u);
  const absl::Status killed = agent_->Kill();
  ASSERT_TRUE(killed.ok()) << killed;
  StartAgent();
  regions = Regions("vm");
  ASSERT_EQ(regions.size(), 1u);
  EXPECT_EQ(regions[0].mapped(), 2u);
  // The page still mapped is the one at iova 0: unmapping it drops the count to the bias.
  ASSERT_TRUE(Unmap("vm/dev", 0, kPage).ok());
  EXPECT_EQ(Regions("vm")[0].mapped(), 1u);
}

// SIGTERM while a VMM keeps a DmaSession open: the agent ends the stream and exits cleanly, and
// the stream's acknowledged map is there after the restart.
TEST_F(AgentE2eTest, SigtermWithAnOpenDmaSession) {
  ASSERT_TRUE(CreateContext("vm", std::nullopt).ok());
  ASSERT_TRUE(CreateContainer("vm/dev").ok());
  const uint64_t ua = uint64_t{1} << 32;
  ASSERT_TRUE(Register("vm/dev", "vm", ua, 4 * kPage).ok());
  auto context = NewContext();
  auto stream = stub_->DmaSession(context.get());
  ASSERT_TRUE(stream->Write(SessionMap(1, "vm/dev", 0, ua)));
  v1::DmaSessionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_EQ(response.code(), 0) << response.message();

  const absl::Status terminated = StopAgent(/*drop_clients=*/false, absl::Seconds(10));
  ASSERT_TRUE(terminated.ok()) << terminated;
  EXPECT_FALSE(stream->Read(&response));  // the stream ended with the agent
  StartAgent();
  const std::vector<v1::Region> regions = Regions("vm");
  ASSERT_EQ(regions.size(), 1u);
  EXPECT_EQ(regions[0].mapped(), 2u);
}

TEST_F(AgentE2eTest, VmmSequenceOverUnixSocket) {
  const std::string vm = "vm-42";
  const std::string dev0 = "vm-42/vfio-0";
  const std::string dev1 = "vm-42/vfio-1";
  const uint64_t ua = 0x10000000;
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(CreateContext(vm, 64 * kMiB).ok());
  {
    v1::CreateContainerRequest request;
    request.set_name(dev0);
    v1::Container container;
    auto context = NewContext();
    ASSERT_TRUE(Ok(stub_->CreateContainer(context.get(), request, &container), *context));
    EXPECT_EQ(container.iommu_page_size(), kPage);  // the node's page size
    EXPECT_EQ(container.window_start(), 0u);
    EXPECT_EQ(container.window_size(), uint64_t{1} << 40);
  }
  ASSERT_TRUE(CreateContainer(dev1).ok());

  v1::Region region;
  {
    auto context = NewContext();
    v1::RegisterRegionRequest request;
    request.set_container(dev0);
    request.set_context(vm);
    request.set_ua(ua);
    request.set_size(size);
    ASSERT_TRUE(Ok(stub_->RegisterRegion(context.get(), request, &region), *context));
  }
  EXPECT_EQ(region.context(), vm);
  EXPECT_EQ(region.ua(), ua);
  EXPECT_EQ(region.size(), size);
  EXPECT_EQ(region.entries(), size / kPage);
  EXPECT_EQ(region.used(), 1u);
  EXPECT_EQ(region.mapped(), 1u);
  EXPECT_EQ(region.page_size(), kPage);
  EXPECT_THAT(region.containers(), testing::ElementsAre(dev0));
  ASSERT_TRUE(Register(dev1, vm, ua, size, &region).ok());
  EXPECT_EQ(region.used(), 2u);
  EXPECT_EQ(GetContext(vm).locked_bytes(), size);  // the second user pins nothing

  // Map 4 IOMMU pages and translate.
  ASSERT_TRUE(Map(dev0, 0x0, ua, 4 * kPage).ok());
  ASSERT_EQ(Regions(vm).size(), 1u);
  EXPECT_EQ(Regions(vm)[0].mapped(), 5u);
  {
    v1::TranslateRequest request;
    request.set_context(vm);
    request.add_uas(ua + 0x123);
    request.add_uas(ua + kPage);
    v1::TranslateResponse response;
    auto context = NewContext();
    ASSERT_TRUE(Ok(stub_->Translate(context.get(), request, &response), *context));
    ASSERT_EQ(response.hpas_size(), 2);
    EXPECT_EQ(response.hpas(0) % kPage, 0x123u);
    EXPECT_NE(response.hpas(0) / kPage, response.hpas(1) / kPage);
  }
  {
    v1::LookupRequest request;
    request.set_context(vm);
    request.set_ua(ua + 0x1000);
    request.set_size(0x1000);
    v1::LookupResponse response;
    auto context = NewContext();
    ASSERT_TRUE(Ok(stub_->Lookup(context.get(), request, &response), *context));
    ASSERT_TRUE(response.has_region());
    EXPECT_EQ(response.region().ua(), ua);
    EXPECT_EQ(response.region().size(), size);
    request.set_ua(ua + size - 0x1000);
    request.set_size(0x2000);  // runs past the end
    response.Clear();
    auto past = NewContext();
    ASSERT_TRUE(Ok(stub_->Lookup(past.get(), request, &response), *past));
    EXPECT_FALSE(response.has_region());
  }
  {
    v1::TranslateRequest request;
    request.set_context(vm);
    request.add_uas(ua + size);
    v1::TranslateResponse response;
    auto context = NewContext();
    EXPECT_TRUE(FailsWith(stub_->Translate(context.get(), request, &response), *context,
                          grpc::StatusCode::OUT_OF_RANGE, "EFAULT"));
  }

  // The other device lets go; the last unregister while mapped is EBUSY.
  auto unregister = [&](const std::string& container, grpc::ClientContext* context) {
    v1::UnregisterRegionRequest request;
    request.set_container(container);
    request.set_ua(ua);
    request.set_size(size);
    v1::UnregisterRegionResponse response;
    return stub_->UnregisterRegion(context, request, &response);
  };
  auto first = NewContext();
  ASSERT_TRUE(Ok(unregister(dev1, first.get()), *first));
  auto busy = NewContext();
  EXPECT_TRUE(FailsWith(unregister(dev0, busy.get()), *busy, grpc::StatusCode::FAILED_PRECONDITION,
                        "EBUSY"));
  ASSERT_EQ(Regions(vm).size(), 1u);
  EXPECT_EQ(Regions(vm)[0].used(), 1u);
  EXPECT_EQ(Regions(vm)[0].mapped(), 5u);
  EXPECT_THAT(Regions(vm)[0].containers(), testing::ElementsAre(dev0));

  ASSERT_TRUE(Unmap(dev0, 0x0, 4 * kPage).ok());
  EXPECT_EQ(Regions(vm)[0].mapped(), 1u);
  auto last = NewContext();
  ASSERT_TRUE(Ok(unregister(dev0, last.get()), *last));
  EXPECT_TRUE(Regions(vm).empty());
  EXPECT_EQ(GetContext(vm).locked_bytes(), 0u);
  EXPECT_EQ(GetContext(vm).regions(), 0u);

  // The VM goes away.
  ASSERT_TRUE(ReleaseContainer(dev0).ok());
  ASSERT_TRUE(ReleaseContainer(dev1).ok());
  v1::TeardownContextRequest teardown;
  teardown.set_name(vm);
  v1::TeardownContextResponse torn;
  auto context = NewContext();
  ASSERT_TRUE(Ok(stub_->TeardownContext(context.get(), teardown, &torn), *context));
  v1::NodeStatus status;
  auto status_context = NewContext();
  ASSERT_TRUE(Ok(stub_->GetNodeStatus(status_context.get(), {}, &status), *status_context));
  EXPECT_EQ(status.contexts(), 0u);
  EXPECT_EQ(status.containers(), 0u);
  EXPECT_EQ(status.locked_bytes(), 0u);
}

// (d) Every bad input gives the right code, message prefix and trailer, and changes nothing.
TEST_F(AgentE2eTest, BadInputsGiveTheRightCodeAndErrno) {
  const std::string vm = "vm-1";
  const std::string dev = "vm-1/vfio-0";
  const uint64_t ua = 0x10000000;
  const uint64_t size = kMiB;
  ASSERT_TRUE(CreateContext(vm, std::nullopt).ok());
  ASSERT_TRUE(CreateContainer(dev).ok());
  ASSERT_TRUE(Register(dev, vm, ua, size).ok());
  ASSERT_TRUE(Map(dev, 0x0, ua, kPage).ok());

  struct BadCall {
    std::string what;
    grpc::StatusCode code;
    std::string errno_name;
    std::function<grpc::Status(grpc::ClientContext*)> call;
  };
  auto v1_stub = stub_.get();
  auto reg = [v1_stub](std::string container, std::string context_name, uint64_t at,
                       uint64_t length) {
    return [=](grpc::ClientContext* context) {
      v1::RegisterRegionRequest request;
      request.set_container(container);
      request.set_context(context_name);
      request.set_ua(at);
      request.set_size(length);
      v1::Region response;
      return v1_stub->RegisterRegion(context, request, &response);
    };
  };
  auto unreg = [v1_stub](std::string container, uint64_t at, uint64_t length) {
    return [=](grpc::ClientContext* context) {
      v1::UnregisterRegionRequest request;
      request.set_container(container);
      request.set_ua(at);
      request.set_size(length);
      v1::UnregisterRegionResponse response;
      return v1_stub->UnregisterRegion(context, request, &response);
    };
  };
  auto map = [v1_stub](std::string container, uint64_t iova, uint64_t at, uint64_t length) {
    return [=](grpc::ClientContext* context) {
      v1::MapDmaRequest request;
      request.set_container(container);
      request.set_iova(iova);
      request.set_ua(at);
      request.set_size(length);
      v1::MapDmaResponse response;
      return v1_stub->MapDma(context, request, &response);
    };
  };
  auto unmap = [v1_stub](std::string container, uint64_t iova, uint64_t length) {
    return [=](grpc::ClientContext* context) {
      v1::UnmapDmaRequest request;
      request.set_container(container);
      request.set_iova(iova);
      request.set_size(length);
      v1::UnmapDmaResponse response;
      return v1_stub->UnmapDma(context, request, &response);
    };
  };
  auto create_context = [v1_stub](std::string name) {
    return [=](grpc::ClientContext* context) {
      v1::CreateContextRequest request;
      request.set_name(name);
      request.set_memlock_unlimited(true);
      v1::Context response;
      return v1_stub->CreateContext(context, request, &response);
    };
  };
  auto create_container = [v1_stub](std::string name) {
    return [=](grpc::ClientContext* context) {
      v1::CreateContainerRequest request;
      request.set_name(name);
      v1::Container response;
      return v1_stub->CreateContainer(context, request, &response);
    };
  };
  const uint64_t top = ~uint64_t{0} - kPage + 1;  // the last page of the address space
  const grpc::StatusCode kInvalid = grpc::StatusCode::INVALID_ARGUMENT;
  const grpc::StatusCode kNotFound = grpc::StatusCode::NOT_FOUND;
  const grpc::StatusCode kExists = grpc::StatusCode::ALREADY_EXISTS;
  const std::vector<BadCall> calls = {
      // Misaligned, empty, wrapping, overlapping (spec §2.1, §2.4, §3.1, §7).
      {"register misaligned ua", kInvalid, "EINVAL", reg(dev, vm, 0x20000100, size)},
      {"register misaligned size", kInvalid, "EINVAL", reg(dev, vm, 0x20000000, 0x10100)},
      {"register zero size", kInvalid, "EINVAL", reg(dev, vm, 0x20000000, 0)},
      {"register wrapping", kInvalid, "EINVAL", reg(dev, vm, top, 2 * kPage)},
      {"register overlapping", kInvalid, "EINVAL", reg(dev, vm, ua + size / 2, size)},
      {"register overlapping by one page", kInvalid, "EINVAL", reg(dev, vm, ua - kPage, 2 * kPage)},
      {"unregister misaligned", kInvalid, "EINVAL", unreg(dev, ua + 0x100, size)},
      {"unregister zero size", kInvalid, "EINVAL", unreg(dev, ua, 0)},
      {"unregister wrapping", kInvalid, "EINVAL", unreg(dev, top, 2 * kPage)},
      {"map misaligned iova", kInvalid, "EINVAL", map(dev, 0x100, ua, kPage)},
      {"map zero size", kInvalid, "EINVAL", map(dev, 0x10000, ua, 0)},
      {"map unregistered memory", kInvalid, "EINVAL", map(dev, 0x10000, 0x50000000, kPage)},
      {"unmap misaligned", kInvalid, "EINVAL", unmap(dev, 0x100, kPage)},
      // Unknown containers and contexts.
      {"register in an unknown container", kNotFound, "ENOENT", reg("nope", vm, ua, size)},
      {"register in an unknown context", kNotFound, "ENOENT", reg(dev, "nope", ua, size)},
      {"unregister from an unknown container", kNotFound, "ENOENT", unreg("nope", ua, size)},
      {"unregister of no registration", kNotFound, "ENOENT", unreg(dev, 0x50000000, size)},
      {"map in an unknown container", kNotFound, "ENOENT", map("nope", 0x0, ua, kPage)},
      {"unmap in an unknown container", kNotFound, "ENOENT", unmap("nope", 0x0, kPage)},
      {"release an unknown container", kNotFound, "ENOENT",
       [v1_stub](grpc::ClientContext* context) {
         v1::ReleaseContainerRequest request;
         request.set_name("nope");
         v1::ReleaseContainerResponse response;
         return v1_stub->ReleaseContainer(context, request, &response);
       }},
      {"get an unknown container", kNotFound, "ENOENT",
       [v1_stub](grpc::ClientContext* context) {
         v1::GetContainerRequest request;
         request.set_name("nope");
         v1::Container response;
         return v1_stub->GetContainer(context, request, &response);
       }},
      {"get an unknown context", kNotFound, "ENOENT",
       [v1_stub](grpc::ClientContext* context) {
         v1::GetContextRequest request;
         request.set_name("nope");
         v1::Context response;
         return v1_stub->GetContext(context, request, &response);
       }},
      {"tear down an unknown context", kNotFound, "ENOENT",
       [v1_stub](grpc::ClientContext* context) {
         v1::TeardownContextRequest request;
         request.set_name("nope");
         v1::TeardownContextResponse response;
         return v1_stub->TeardownContext(context, request, &response);
       }},
      {"translate in an unknown context", kNotFound, "ENOENT",
       [v1_stub](grpc::ClientContext* context) {
         v1::TranslateRequest request;
         request.set_context("nope");
         request.add_uas(0x10000000);
         v1::TranslateResponse response;
         return v1_stub->Translate(context, request, &response);
       }},
      {"lookup in an unknown context", kNotFound, "ENOENT",
       [v1_stub](grpc::ClientContext* context) {
         v1::LookupRequest request;
         request.set_context("nope");
         request.set_ua(0x10000000);
         request.set_size(0x1000);
         v1::LookupResponse response;
         return v1_stub->Lookup(context, request, &response);
       }},
      {"list regions of an unknown context", kNotFound, "ENOENT",
       [v1_stub](grpc::ClientContext* context) {
         v1::ListRegionsRequest request;
         request.set_context("nope");
         v1::ListRegionsResponse response;
         return v1_stub->ListRegions(context, request, &response);
       }},
      // Bad names: 1-128 characters from [A-Za-z0-9._/-].
      {"context named \"\"", kInvalid, "EINVAL", create_context("")},
      {"context named with 129 characters", kInvalid, "EINVAL",
       create_context(std::string(129, 'a'))},
      {"context named \"vm 2\"", kInvalid, "EINVAL", create_context("vm 2")},
      {"context named \"vm:2\"", kInvalid, "EINVAL", create_context("vm:2")},
      {"context named \"vm\\n\"", kInvalid, "EINVAL", create_context("vm\n")},
      {"context named with UTF-8", kInvalid, "EINVAL", create_context("vm-\xc3\xa9")},
      {"container named \"\"", kInvalid, "EINVAL", create_container("")},
      {"container named with 129 characters", kInvalid, "EINVAL",
       create_container(std::string(129, 'c'))},
      {"container named \"dev 0\"", kInvalid, "EINVAL", create_container("dev 0")},
      {"container named \"dev*\"", kInvalid, "EINVAL", create_container("dev*")},
      // Duplicate names.
      {"duplicate context", kExists, "EEXIST", create_context(vm)},
      {"duplicate container", kExists, "EEXIST", create_container(dev)},
  };
  for (const BadCall& bad : calls) {
    auto context = NewContext();
    const grpc::Status status = bad.call(context.get());
    EXPECT_TRUE(FailsWith(status, *context, bad.code, bad.errno_name)) << bad.what;
  }
  // The longest valid names are accepted.
  EXPECT_TRUE(CreateContext(std::string(128, 'a'), std::nullopt).ok());
  EXPECT_TRUE(CreateContainer(std::string(128, 'c')).ok());

  // Nothing changed.
  const std::vector<v1::Region> regions = Regions(vm);
  ASSERT_EQ(regions.size(), 1u);
  EXPECT_EQ(regions[0].ua(), ua);
  EXPECT_EQ(regions[0].size(), size);
  EXPECT_EQ(regions[0].used(), 1u);
  EXPECT_EQ(regions[0].mapped(), 2u);
  EXPECT_EQ(GetContext(vm).locked_bytes(), size);
}

// Issue 11: a RegisterRegion of 2^63 bytes (unlimited context, a window that allows it) made the
// agent allocate 2^50 bytes; gRPC swallowed the std::bad_alloc and answered UNIMPLEMENTED with an
// empty message (the same request as a server decision aborted the agent), and a 1 TiB register
// cost ~1 GB. With the default limits (the node's memory) both are a clean ENOMEM.
TEST_F(AgentE2eTest, HugeRegisterIsResourceExhaustedAndTheAgentKeepsServing) {
  ASSERT_TRUE(CreateContext("vm", std::nullopt).ok());
  ASSERT_TRUE(CreateContainer("vm/dev", kPage, 0, uint64_t{1} << 63).ok());
  const uint64_t rss_before = AgentRss();
  const uint64_t tib = uint64_t{1} << 40;
  std::vector<std::pair<uint64_t, uint64_t>> huge = {{0, uint64_t{1} << 63}};
  const uint64_t memory =
      static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  if (memory < tib) huge.emplace_back(uint64_t{1} << 44, tib);  // over the default limit here
  for (const auto& [ua, size] : huge) {
    SCOPED_TRACE(absl::StrCat("size 0x", absl::Hex(size)));
    v1::RegisterRegionRequest request;
    request.set_container("vm/dev");
    request.set_context("vm");
    request.set_ua(ua);
    request.set_size(size);
    v1::Region response;
    auto context = NewContext();
    const grpc::Status status = stub_->RegisterRegion(context.get(), request, &response);
    EXPECT_TRUE(FailsWith(status, *context, grpc::StatusCode::RESOURCE_EXHAUSTED, "ENOMEM"));
    EXPECT_THAT(status.error_message(), testing::HasSubstr("--max_region_bytes"));
  }
  ExpectServing();
  EXPECT_TRUE(Regions("vm").empty());
  EXPECT_LT(AgentRss(), rss_before + 32 * kMiB)
      << "before: " << rss_before << " bytes, after: " << AgentRss();
  // The node still registers what fits.
  ASSERT_TRUE(Register("vm/dev", "vm", uint64_t{1} << 32, kMiB).ok());
  EXPECT_EQ(Regions("vm").size(), 1u);
}

// The flags set the limits; within them a large region costs its 8-byte addresses per page while
// registered and nothing after (the sim backend's per-page pin table cost ~50 bytes per page and
// kept most of it after the unregister).
TEST_F(AgentE2eTest, LimitFlagsBoundRegistrationsAndALargeRegionLeavesNoMemoryBehind) {
  ASSERT_TRUE(StopAgent(/*drop_clients=*/true, absl::Seconds(5)).ok());
  extra_args_ = {"--max_region_bytes=1099511627776", "--max_pinned_bytes=1374389534720"};
  StartAgent();  // 1 TiB per region, 1.25 TiB per node
  ASSERT_TRUE(CreateContext("vm", std::nullopt).ok());
  ASSERT_TRUE(CreateContainer("vm/dev").ok());
  const uint64_t tib = uint64_t{1} << 40;
  const uint64_t large = uint64_t{1} << 38;  // 256 GiB: 4 Mi pages of 64 KiB, 32 MiB of hpas
  grpc::Status status = Register("vm/dev", "vm", 0, tib + kPage);
  EXPECT_THAT(status.error_message(), testing::HasSubstr("--max_region_bytes"));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  const uint64_t rss_before = AgentRss();
  ASSERT_TRUE(Register("vm/dev", "vm", tib, tib).ok());
  status = Register("vm/dev", "vm", 4 * tib, large + kPage);
  EXPECT_THAT(status.error_message(), testing::HasSubstr("--max_pinned_bytes"));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  ASSERT_TRUE(Register("vm/dev", "vm", 4 * tib, large).ok());  // exactly at the node limit
  const uint64_t rss_registered = AgentRss();
  {
    v1::UnregisterRegionRequest request;
    request.set_container("vm/dev");
    for (uint64_t ua : {tib, 4 * tib}) {
      request.set_ua(ua);
      request.set_size(ua == tib ? tib : large);
      v1::UnregisterRegionResponse response;
      auto context = NewContext();
      ASSERT_TRUE(Ok(stub_->UnregisterRegion(context.get(), request, &response), *context));
    }
  }
  const uint64_t rss_after = AgentRss();
  std::cout << "agent RSS: " << (rss_before >> 20) << " MiB before, " << (rss_registered >> 20)
            << " MiB with 1.25 TiB registered, " << (rss_after >> 20)
            << " MiB after the unregisters" << std::endl;
  // 1.25 TiB of 64 KiB pages is 160 MiB of addresses; the rest of the agent is small.
  EXPECT_LT(rss_registered, rss_before + 224 * kMiB);
  EXPECT_LT(rss_after, rss_before + 32 * kMiB);
  ExpectServing();
}

// (e) State survives a SIGTERM restart and a SIGKILL restart exactly.
TEST_F(AgentE2eTest, RestartKeepsRegionsContextsAndContainers) {
  ASSERT_TRUE(CreateContext("vm-a", 16 * kMiB).ok());
  ASSERT_TRUE(CreateContext("vm-b", std::nullopt, /*cap_ipc_lock=*/true).ok());
  ASSERT_TRUE(CreateContainer("vm-a/dev0").ok());
  ASSERT_TRUE(CreateContainer("vm-a/dev1").ok());
  ASSERT_TRUE(CreateContainer("vm-a/dev2").ok());
  ASSERT_TRUE(CreateContainer("vm-b/dev0", kPage, 0x100000, 0x10000000).ok());
  // vm-a: R1 held by dev0 and dev2; R2 held and mapped by dev0; R4 held by dev1, mapped by dev0.
  ASSERT_TRUE(Register("vm-a/dev0", "vm-a", 0x10000000, kMiB).ok());
  ASSERT_TRUE(Register("vm-a/dev2", "vm-a", 0x10000000, kMiB).ok());
  ASSERT_TRUE(Register("vm-a/dev0", "vm-a", 0x20000000, 2 * kMiB).ok());
  ASSERT_TRUE(Register("vm-a/dev1", "vm-a", 0x40000000, kMiB).ok());
  ASSERT_TRUE(Map("vm-a/dev0", 0x0, 0x20000000, 4 * kPage).ok());
  ASSERT_TRUE(Map("vm-a/dev0", 0x100000, 0x40000000, 2 * kPage).ok());
  // Releasing dev1 leaves R4 pending release (dev0 still maps it).
  ASSERT_TRUE(ReleaseContainer("vm-a/dev1").ok());
  // vm-b: R3 in a custom window.
  ASSERT_TRUE(Register("vm-b/dev0", "vm-b", 0x30000000, kMiB).ok());
  ASSERT_TRUE(Map("vm-b/dev0", 0x100000, 0x30000000, kPage).ok());

  const Snapshot before = TakeSnapshot();
  ASSERT_EQ(before.regions.regions_size(), 4);
  bool saw_pending = false;
  for (const v1::Region& region : before.regions.regions()) {
    saw_pending = saw_pending || region.pending_release();
  }
  EXPECT_TRUE(saw_pending) << before.regions.DebugString();

  // SIGTERM while the clients stay connected, as VMMs do: the agent must still exit cleanly. It
  // waits for its 5 s shutdown deadline then (idle clients never close their connections), so
  // give it more than that.
  const absl::Time stop_start = absl::Now();
  const absl::Status terminated = StopAgent(/*drop_clients=*/false, absl::Seconds(10));
  ASSERT_TRUE(terminated.ok()) << terminated;
  std::cout << "SIGTERM with connected clients: the agent exited after "
            << absl::FormatDuration(absl::Now() - stop_start) << "\n";
  StartAgent();
  ExpectSameSnapshot(before, TakeSnapshot(), "after SIGTERM");

  const absl::Status killed = agent_->Kill();
  ASSERT_TRUE(killed.ok()) << killed;
  StartAgent();
  ExpectSameSnapshot(before, TakeSnapshot(), "after SIGKILL");

  // The restored state works: unmapping R4 completes its release; R2 can be let go.
  ASSERT_TRUE(Unmap("vm-a/dev0", 0x100000, 2 * kPage).ok());
  ASSERT_TRUE(Unmap("vm-a/dev0", 0x0, 4 * kPage).ok());
  auto context = NewContext();
  v1::UnregisterRegionRequest request;
  request.set_container("vm-a/dev0");
  request.set_ua(0x20000000);
  request.set_size(2 * kMiB);
  v1::UnregisterRegionResponse response;
  ASSERT_TRUE(Ok(stub_->UnregisterRegion(context.get(), request, &response), *context));
  const std::vector<v1::Region> left = Regions("vm-a");
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0].ua(), 0x10000000u);
  EXPECT_EQ(left[0].used(), 2u);
  EXPECT_EQ(GetContext("vm-a").locked_bytes(), kMiB);
}

// (f) --help exits 0 and documents every flag.
TEST(AgentHelpTest, HelpExitsZeroAndMentionsEveryFlag) {
  const std::string command = absl::StrCat("'", AgentBinary(), "' --help 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[4096];
  for (size_t n; (n = fread(buffer, 1, sizeof(buffer), pipe)) > 0;) output.append(buffer, n);
  const int status = pclose(pipe);
  ASSERT_TRUE(WIFEXITED(status)) << "wait status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "dmapin-agent --help exited with " << WEXITSTATUS(status) << "; output:\n"
      << output;
  for (const char* flag :
       {"--state_dir", "--uds_path", "--tcp_address", "--backend", "--sim_page_size", "--sim_holes",
        "--sim_readonly", "--sim_huge", "--node_name", "--state_sync_full", "--max_connections",
        "--connection_idle_timeout_ms", "--max_receive_message_bytes",
        "--grpc_memory_quota_bytes"}) {
    EXPECT_TRUE(absl::StrContains(output, absl::StrCat(flag, " ")) ||
                absl::StrContains(output, absl::StrCat(flag, "=")) ||
                absl::StrContains(output, absl::StrCat(flag, "\n")))
        << flag << " is not in the --help output:\n"
        << output;
  }
}

}  // namespace
}  // namespace dmapin::agent

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--agent_binary="))
      dmapin::agent::AgentBinary() = std::string(arg);
  }
  return RUN_ALL_TESTS();
}
