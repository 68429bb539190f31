#include "agent/service/agent_metrics.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "agent/node/node_agent.h"
#include "agent/registry/sim_backend.h"
#include "agent/service/node_agent_service.h"
#include "agent/store/state_store.h"
#include "common/errno_status.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "testing/exposition_parser.h"

namespace dmapin::agent {
namespace {

constexpr uint64_t k64K = 0x10000;
constexpr uint64_t kBase = 0x10000000;

using exposition::Labels;
using exposition::Parse;
using exposition::Sample;
using exposition::Value;

// Whether any series of `name` carries label `key` = `value`.
bool HasSeriesWith(absl::string_view text, absl::string_view name, absl::string_view key,
                   absl::string_view value) {
  for (const Sample& sample : Parse(text)) {
    if (sample.name != name) continue;
    auto it = sample.labels.find(std::string(key));
    if (it != sample.labels.end() && it->second == value) return true;
  }
  return false;
}

class AgentMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           absl::StrCat("agent_metrics_test_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    sim_ = *SimBackend::Create({.page_size = k64K});
    auto store = StateStore::Open(dir_.string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    auto agent =
        // In-process channel: no local peer to own contexts, so the calls are let through.
        NodeAgent::Create({.node_name = "node-a",
                           .backend = sim_.get(),
                           .store = store_.get(),
                           .dma_from_any_peer = true});
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = std::move(*agent);
    metrics_ = std::make_unique<AgentMetrics>(
        AgentMetricsOptions{.agent = agent_.get(), .store = store_.get()});
    service_ = std::make_unique<NodeAgentService>(agent_.get(), metrics_.get());
    grpc::ServerBuilder builder;
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::NodeAgent::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }

  void TearDown() override {
    server_->Shutdown();
    server_.reset();
    service_.reset();
    metrics_.reset();
    agent_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  // The errno of a call's status ("" for OK), from the trailers.
  static std::string ErrnoOfCall(const grpc::Status& status, const grpc::ClientContext& context) {
    if (status.ok()) return "";
    auto it = context.GetServerTrailingMetadata().find(kErrnoTrailer);
    if (it == context.GetServerTrailingMetadata().end()) return "?";
    return std::string(it->second.data(), it->second.size());
  }

  std::string CreateContext(const std::string& name, std::optional<uint64_t> memlock_limit) {
    grpc::ClientContext context;
    v1::CreateContextRequest request;
    request.set_name(name);
    request.set_memlock_unlimited(!memlock_limit.has_value());
    request.set_memlock_limit_bytes(memlock_limit.value_or(0));
    v1::Context response;
    return ErrnoOfCall(stub_->CreateContext(&context, request, &response), context);
  }

  std::string CreateContainer(const std::string& name) {
    grpc::ClientContext context;
    v1::CreateContainerRequest request;
    request.set_name(name);
    request.set_iommu_page_size(k64K);
    v1::Container response;
    return ErrnoOfCall(stub_->CreateContainer(&context, request, &response), context);
  }

  std::string Register(const std::string& container, const std::string& context_name, uint64_t ua,
                       uint64_t size) {
    grpc::ClientContext context;
    v1::RegisterRegionRequest request;
    request.set_container(container);
    request.set_context(context_name);
    request.set_ua(ua);
    request.set_size(size);
    v1::Region response;
    return ErrnoOfCall(stub_->RegisterRegion(&context, request, &response), context);
  }

  std::string Unregister(const std::string& container, uint64_t ua, uint64_t size) {
    grpc::ClientContext context;
    v1::UnregisterRegionRequest request;
    request.set_container(container);
    request.set_ua(ua);
    request.set_size(size);
    v1::UnregisterRegionResponse response;
    return ErrnoOfCall(stub_->UnregisterRegion(&context, request, &response), context);
  }

  std::string Map(const std::string& container, uint64_t iova, uint64_t ua, uint64_t size) {
    grpc::ClientContext context;
    v1::MapDmaRequest request;
    request.set_container(container);
    request.set_iova(iova);
    request.set_ua(ua);
    request.set_size(size);
    v1::MapDmaResponse response;
    return ErrnoOfCall(stub_->MapDma(&context, request, &response), context);
  }

  std::string Teardown(const std::string& name) {
    grpc::ClientContext context;
    v1::TeardownContextRequest request;
    request.set_name(name);
    v1::TeardownContextResponse response;
    return ErrnoOfCall(stub_->TeardownContext(&context, request, &response), context);
  }

  v1::Context GetContext(const std::string& name) {
    grpc::ClientContext context;
    v1::GetContextRequest request;
    request.set_name(name);
    v1::Context response;
    EXPECT_TRUE(stub_->GetContext(&context, request, &response).ok());
    return response;
  }

  // A small workload: two contexts (one limited, one unlimited), three containers, two regions,
  // three mapped pages, one EBUSY unregister and one ENOENT map.
  void Workload() {
    ASSERT_EQ(CreateContext("vm-1", 64 * k64K), "");
    ASSERT_EQ(CreateContext("vm-2", std::nullopt), "");
    ASSERT_EQ(CreateContainer("vm-1/vfio-0"), "");
    ASSERT_EQ(CreateContainer("vm-1/vfio-1"), "");
    ASSERT_EQ(CreateContainer("vm-2/vfio-0"), "");
    ASSERT_EQ(Register("vm-1/vfio-0", "vm-1", kBase, 8 * k64K), "");
    ASSERT_EQ(Register("vm-1/vfio-1", "vm-1", kBase, 8 * k64K), "");  // shares the region
    ASSERT_EQ(Register("vm-2/vfio-0", "vm-2", kBase, 4 * k64K), "");
    ASSERT_EQ(Map("vm-1/vfio-0", 0, kBase, 2 * k64K), "");
    ASSERT_EQ(Map("vm-2/vfio-0", 0, kBase + k64K, k64K), "");
    ASSERT_EQ(Unregister("vm-2/vfio-0", kBase, 4 * k64K), "EBUSY");  // still mapped
    ASSERT_EQ(Map("no-such-container", 0, kBase, k64K), "ENOENT");
  }

  std::filesystem::path dir_;
  std::unique_ptr<SimBackend> sim_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<NodeAgent> agent_;
  std::unique_ptr<AgentMetrics> metrics_;
  std::unique_ptr<NodeAgentService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::NodeAgent::Stub> stub_;
};

TEST_F(AgentMetricsTest, PerContextAndContainerSeriesMatchTheAgent) {
  ASSERT_NO_FATAL_FAILURE(Workload());
  const std::string text = metrics_->TextExposition();
  SCOPED_TRACE(text);

  const v1::Context vm1 = GetContext("vm-1");
  const v1::Context vm2 = GetContext("vm-2");
  ASSERT_EQ(vm1.locked_bytes(), 8 * k64K);
  EXPECT_EQ(Value(text, "dmapin_agent_context_locked_bytes", {{"context", "vm-1"}}),
            static_cast<double>(vm1.locked_bytes()));
  EXPECT_EQ(Value(text, "dmapin_agent_context_locked_bytes", {{"context", "vm-2"}}),
            static_cast<double>(vm2.locked_bytes()));
  EXPECT_EQ(Value(text, "dmapin_agent_context_regions", {{"context", "vm-1"}}), 1);
  // vm-1's one region is held by both containers.
  EXPECT_EQ(Value(text, "dmapin_agent_context_region_users", {{"context", "vm-1"}}), 2);
  EXPECT_EQ(Value(text, "dmapin_agent_context_installed_mappings", {{"context", "vm-1"}}), 2);
  EXPECT_EQ(Value(text, "dmapin_agent_context_installed_mappings", {{"context", "vm-2"}}), 1);
  EXPECT_EQ(Value(text, "dmapin_agent_context_containers", {{"context", "vm-1"}}), 2);
  EXPECT_EQ(Value(text, "dmapin_agent_context_memlock_limit_bytes", {{"context", "vm-1"}}),
            64.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_agent_context_memlock_unlimited", {{"context", "vm-1"}}), 0);
  // Unlimited: no limit series, the flag instead.
  EXPECT_EQ(Value(text, "dmapin_agent_context_memlock_limit_bytes", {{"context", "vm-2"}}),
            std::nullopt);
  EXPECT_EQ(Value(text, "dmapin_agent_context_memlock_unlimited", {{"context", "vm-2"}}), 1);

  const Labels c10 = {{"container", "vm-1/vfio-0"}, {"context", "vm-1"}};
  const Labels c11 = {{"container", "vm-1/vfio-1"}, {"context", "vm-1"}};
  const Labels c20 = {{"container", "vm-2/vfio-0"}, {"context", "vm-2"}};
  EXPECT_EQ(Value(text, "dmapin_agent_container_pinned_bytes", c10), 8.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_agent_container_pinned_bytes", c11), 8.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_agent_container_pinned_bytes", c20), 4.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_agent_container_regions", c10), 1);
  EXPECT_EQ(Value(text, "dmapin_agent_container_region_users", c10), 2);
  EXPECT_EQ(Value(text, "dmapin_agent_container_installed_mappings", c10), 2);
  EXPECT_EQ(Value(text, "dmapin_agent_container_installed_mappings", c11), 0);
  EXPECT_EQ(Value(text, "dmapin_agent_container_installed_mappings", c20), 1);

  // Node totals and the registry's counters.
  EXPECT_EQ(Value(text, "dmapin_agent_contexts"), 2);
  EXPECT_EQ(Value(text, "dmapin_agent_containers"), 3);
  EXPECT_EQ(Value(text, "dmapin_agent_regions"), 2);
  EXPECT_EQ(Value(text, "dmapin_agent_locked_bytes"), 12.0 * k64K);
  EXPECT_EQ(Value(text, "dmapin_agent_installed_mappings"), 3);
  EXPECT_EQ(Value(text, "dmapin_agent_page_size_bytes"), static_cast<double>(k64K));
  EXPECT_EQ(Value(text, "dmapin_agent_store_failed"), 0);
  EXPECT_EQ(Value(text, "dmapin_agent_refused_change_undo_failures_total"), 0);
  EXPECT_EQ(Value(text, "dmapin_agent_info",
                  {{"backend", "sim"}, {"node", "node-a"}, {"version", "dmapin-agent 0.1"}}),
            1);
  EXPECT_EQ(Value(text, "dmapin_agent_registers_total"), 3);
  EXPECT_EQ(Value(text, "dmapin_agent_unregister_ebusy_total"), 1);
  EXPECT_EQ(Value(text, "dmapin_agent_unregister_failures_total"), 1);
  EXPECT_EQ(Value(text, "dmapin_agent_maps_total"), 2);
  EXPECT_EQ(Value(text, "dmapin_agent_unmaps_total"), 0);
  const StoreStats store = store_->stats();
  EXPECT_GT(store.commits, 0u);
  EXPECT_EQ(Value(text, "dmapin_agent_store_commits_total"), static_cast<double>(store.commits));
  EXPECT_EQ(Value(text, "dmapin_agent_store_failed_commits_total"), 0);
  EXPECT_EQ(Value(text, "dmapin_agent_store_transactions_total"),
            static_cast<double>(store.transactions));
  EXPECT_GT(store.transactions, 0u);
  EXPECT_TRUE(Value(text, "process_cpu_seconds_total").has_value());
}

TEST_F(AgentMetricsTest, RpcLatencyAndErrorsByMethodAndErrno) {
  ASSERT_NO_FATAL_FAILURE(Workload());
  const std::string text = metrics_->TextExposition();
  SCOPED_TRACE(text);

  EXPECT_EQ(Value(text, "dmapin_agent_rpc_errors_total",
                  {{"errno", "EBUSY"}, {"method", "UnregisterRegion"}}),
            1);
  EXPECT_EQ(
      Value(text, "dmapin_agent_rpc_errors_total", {{"errno", "ENOENT"}, {"method", "MapDma"}}), 1);
  // No series for errors that never happened.
  EXPECT_FALSE(HasSeriesWith(text, "dmapin_agent_rpc_errors_total", "method", "RegisterRegion"));

  // Every call is in its method's histogram: 3 MapDma calls (one failed), 3 registrations.
  EXPECT_EQ(Value(text, "dmapin_agent_rpc_duration_seconds_count", {{"method", "MapDma"}}), 3);
  EXPECT_EQ(Value(text, "dmapin_agent_rpc_duration_seconds_count", {{"method", "RegisterRegion"}}),
            3);
  EXPECT_EQ(
      Value(text, "dmapin_agent_rpc_duration_seconds_count", {{"method", "UnregisterRegion"}}), 1);
  // Pre-created: methods never called are there with zero calls.
  EXPECT_EQ(Value(text, "dmapin_agent_rpc_duration_seconds_count", {{"method", "Translate"}}), 0);
  EXPECT_EQ(Value(text, "dmapin_agent_rpc_duration_seconds_bucket",
                  {{"le", "+Inf"}, {"method", "MapDma"}}),
            3);
  const std::optional<double> sum =
      Value(text, "dmapin_agent_rpc_duration_seconds_sum", {{"method", "MapDma"}});
  ASSERT_TRUE(sum.has_value());
  EXPECT_GT(*sum, 0);
  EXPECT_LT(*sum, 10);
  // 16 finite buckets from 10 us to 1 s, plus +Inf.
  int buckets = 0;
  for (const Sample& sample : Parse(text)) {
    if (sample.name == "dmapin_agent_rpc_duration_seconds_bucket" &&
        sample.labels.at("method") == "MapDma") {
      ++buckets;
    }
  }
  EXPECT_EQ(buckets, 17);
  EXPECT_EQ(AgentMetrics::LatencyBuckets().front(), 10e-6);
  EXPECT_EQ(AgentMetrics::LatencyBuckets().back(), 1.0);

  // A second EBUSY counts on the same series.
  ASSERT_EQ(Unregister("vm-2/vfio-0", kBase, 4 * k64K), "EBUSY");
  EXPECT_EQ(Value(metrics_->TextExposition(), "dmapin_agent_rpc_errors_total",
                  {{"errno", "EBUSY"}, {"method", "UnregisterRegion"}}),
            2);
}

TEST_F(AgentMetricsTest, TornDownContextsVanish) {
  ASSERT_NO_FATAL_FAILURE(Workload());
  std::string text = metrics_->TextExposition();
  ASSERT_TRUE(HasSeriesWith(text, "dmapin_agent_context_locked_bytes", "context", "vm-1"));
  ASSERT_EQ(Teardown("vm-1"), "");
  text = metrics_->TextExposition();
  SCOPED_TRACE(text);
  for (absl::string_view name :
       {"dmapin_agent_context_locked_bytes", "dmapin_agent_context_regions",
        "dmapin_agent_context_region_users", "dmapin_agent_context_installed_mappings",
        "dmapin_agent_context_containers", "dmapin_agent_context_memlock_limit_bytes",
        "dmapin_agent_context_memlock_unlimited", "dmapin_agent_container_pinned_bytes",
        "dmapin_agent_container_regions", "dmapin_agent_container_region_users",
        "dmapin_agent_container_installed_mappings"}) {
    EXPECT_FALSE(HasSeriesWith(text, name, "context", "vm-1")) << name;
  }
  EXPECT_FALSE(
      HasSeriesWith(text, "dmapin_agent_container_pinned_bytes", "container", "vm-1/vfio-0"));
  EXPECT_TRUE(HasSeriesWith(text, "dmapin_agent_context_locked_bytes", "context", "vm-2"));
  EXPECT_EQ(Value(text, "dmapin_agent_contexts"), 1);
  EXPECT_EQ(Value(text, "dmapin_agent_locked_bytes"), 4.0 * k64K);
}

TEST_F(AgentMetricsTest, WithoutStoreHasNoStoreCounters) {
  AgentMetrics metrics({.agent = agent_.get()});
  const std::string text = metrics.TextExposition();
  EXPECT_EQ(Value(text, "dmapin_agent_store_commits_total"), std::nullopt);
  EXPECT_EQ(Value(text, "dmapin_agent_store_failed"), 0);
}

// Direct use of the hot-path hook: errnos outside the table share one series.
TEST_F(AgentMetricsTest, RecordRpcDirectly) {
  AgentMetrics metrics({.agent = agent_.get()});
  metrics.RecordRpc(RpcMethod::kTranslate, std::chrono::microseconds(30), 0);
  metrics.RecordRpc(RpcMethod::kTranslate, std::chrono::microseconds(30), EFAULT);
  metrics.RecordRpc(RpcMethod::kTranslate, std::chrono::microseconds(30), 100000);
  const std::string text = metrics.TextExposition();
  EXPECT_EQ(Value(text, "dmapin_agent_rpc_duration_seconds_count", {{"method", "Translate"}}), 3);
  EXPECT_EQ(Value(text, "dmapin_agent_rpc_duration_seconds_bucket",
                  {{"le", "2.5e-05"}, {"method", "Translate"}}),
            0);
  EXPECT_EQ(Value(text, "dmapin_agent_rpc_duration_seconds_bucket",
                  {{"le", "5e-05"}, {"method", "Translate"}}),
            3);
  EXPECT_EQ(
      Value(text, "dmapin_agent_rpc_errors_total", {{"errno", "EFAULT"}, {"method", "Translate"}}),
      1);
  EXPECT_EQ(Value(text, "dmapin_agent_rpc_errors_total",
                  {{"errno", "EUNKNOWN"}, {"method", "Translate"}}),
            1);
  EXPECT_EQ(RpcMethodName(RpcMethod::kMapDma), "MapDma");
  EXPECT_EQ(RpcMethodName(RpcMethod::kGetNodeStatus), "GetNodeStatus");
}

// Lints the exposition with Prometheus's own checker when Debian's `promtool` (package prometheus)
// is installed.
TEST_F(AgentMetricsTest, PromtoolCheckMetrics) {
  const std::string promtool = exposition::FindPromtool();
  if (promtool.empty()) {
    GTEST_SKIP() << "promtool not found (apt-get install prometheus); exposition not linted";
  }
  ASSERT_NO_FATAL_FAILURE(Workload());
  const std::string text = metrics_->TextExposition();
  const absl::Status lint = exposition::PromtoolCheck(promtool, text, dir_);
  EXPECT_TRUE(lint.ok()) << lint.message() << "\nexposition:\n" << text;
}

}  // namespace
}  // namespace dmapin::agent
