// End to end: dmapin-server and three dmapin-agent processes (sim backend) on loopback, with
// ephemeral ports. Admin calls go through the generated C++ Admin client, VMM calls through the
// agents' Unix sockets, metrics are scraped from /metrics.
//
//   bazel test //tests/fleet_e2e:fleet_e2e_test
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "dmapin/v1/admin.grpc.pb.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "testing/agent_process.h"

namespace dmapin {
namespace {

using harness::AgentProcess;
using harness::AgentProcessOptions;
using harness::MetricValue;
using harness::PortFromLog;
using harness::ScrapeMetrics;
using harness::ScratchDir;

constexpr uint64_t kPage = 65536;  // the agents' sim page size
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kBase = 0x10000000;
constexpr absl::Duration kWait = absl::Seconds(20);

std::string& AgentBinary() {
  static std::string path;
  return path;
}
std::string& ServerBinary() {
  static std::string path;
  return path;
}

// A TCP port that was free a moment ago (the server must come back on the same one after a
// restart, where the agents look for it).
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address = {};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
    port = ntohs(address.sin_port);
  }
  close(fd);
  return port;
}

// Polls `done` until it holds or `timeout` passes.
bool Eventually(const std::function<bool()>& done, absl::Duration timeout = kWait) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return done();
}

struct Agent {
  std::string name;
  std::string labels;
  std::unique_ptr<ScratchDir> dir;
  std::unique_ptr<AgentProcess> process;
  std::unique_ptr<v1::NodeAgent::Stub> vmm;  // over the Unix socket
  int metrics_port = 0;
};

class FleetTest : public testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<ScratchDir>> dir = ScratchDir::Create("dmapin-fleet");
    ASSERT_TRUE(dir.ok()) << dir.status();
    server_dir_ = std::move(*dir);
    server_port_ = FreePort();
    ASSERT_NE(server_port_, 0);
    ASSERT_TRUE(StartServer().ok());
    const std::pair<const char*, const char*> nodes[] = {
        {"node-a", "pool=a,zone=z1"}, {"node-b", "pool=a,zone=z2"}, {"node-c", "pool=b"}};
    for (const auto& [name, labels] : nodes) {
      auto agent = std::make_unique<Agent>();
      agent->name = name;
      agent->labels = labels;
      absl::StatusOr<std::unique_ptr<ScratchDir>> agent_dir = ScratchDir::Create(name);
      ASSERT_TRUE(agent_dir.ok()) << agent_dir.status();
      agent->dir = std::move(*agent_dir);
      ASSERT_TRUE(StartAgent(*agent).ok());
      agents_[name] = std::move(agent);
    }
    ASSERT_TRUE(Eventually([&] { return ConnectedNodes() == 3; }))
        << "agents did not connect; server log:\n"
        << server_->LogTail();
    // What a VMM does on each node before the central service may register anything.
    for (auto& [name, agent] : agents_) {
      grpc::ClientContext context;
      v1::CreateContextRequest request;
      request.set_name("vm1");
      request.set_memlock_unlimited(true);
      v1::Context created;
      ASSERT_TRUE(agent->vmm->CreateContext(&context, request, &created).ok());
      grpc::ClientContext context2;
      v1::CreateContainerRequest container;
      container.set_name("c1");
      v1::Container made;
      ASSERT_TRUE(agent->vmm->CreateContainer(&context2, container, &made).ok());
    }
  }

  absl::Status StartServer() {
    absl::StatusOr<std::unique_ptr<AgentProcess>> server = AgentProcess::Start(
        {.binary = ServerBinary(),
         .args = {absl::StrCat("--grpc_address=127.0.0.1:", server_port_),
                  "--metrics_address=127.0.0.1:0", "--state_dir=" + server_dir_->Join("state"),
                  "--report_interval_ms=100", "--reconcile_interval_ms=10"},
         .log_path = server_dir_->Join("server.log"),
         .tcp = true});
    if (!server.ok()) return server.status();
    server_ = std::move(*server);
    server_metrics_port_ = PortFromLog(server_->LogTail(100000), "metrics");
    admin_ = v1::Admin::NewStub(harness::MakeChannel(server_->tcp_target()));
    return absl::OkStatus();
  }

  absl::Status StartAgent(Agent& agent) {
    const std::string uds = agent.dir->Join("agent.sock");
    absl::StatusOr<std::unique_ptr<AgentProcess>> process = AgentProcess::Start(
        {.binary = AgentBinary(),
         .args = {"--node_name=" + agent.name, "--node_labels=" + agent.labels,
                  absl::StrCat("--server=127.0.0.1:", server_port_), "--report_interval_ms=100",
                  "--state_dir=" + agent.dir->Join("state"), "--uds_path=" + uds,
                  "--tcp_address=", "--metrics_address=127.0.0.1:0"},
         .log_path = agent.dir->Join("agent.log"),
         .uds_path = uds});
    if (!process.ok()) return process.status();
    agent.process = std::move(*process);
    agent.metrics_port = PortFromLog(agent.process->LogTail(100000), "metrics");
    agent.vmm = v1::NodeAgent::NewStub(harness::MakeChannel(agent.process->uds_target()));
    return absl::OkStatus();
  }

  int ConnectedNodes() {
    grpc::ClientContext context;
    v1::ListNodesResponse nodes;
    if (!admin_->ListNodes(&context, {}, &nodes).ok()) return -1;
    int connected = 0;
    for (const v1::Node& node : nodes.nodes()) {
      connected += node.connection() == v1::CONNECTION_STATE_CONNECTED;
    }
    return connected;
  }

  grpc::Status CreateIntent(v1::IntentKind kind, const std::string& node, uint64_t ua,
                            uint64_t size, v1::Intent* intent,
                            const std::map<std::string, std::string>& labels = {}) {
    grpc::ClientContext context;
    v1::CreateIntentRequest request;
    request.set_kind(kind);
    request.set_node(node);
    request.set_context("vm1");
    request.set_container("c1");
    request.set_ua(ua);
    request.set_size(size);
    for (const auto& [key, value] : labels) (*request.mutable_labels())[key] = value;
    v1::CreateIntentResponse response;
    grpc::Status status = admin_->CreateIntent(&context, request, &response);
    if (intent != nullptr) *intent = response.intent();
    return status;
  }

  std::optional<v1::Intent> GetIntent(const std::string& id) {
    grpc::ClientContext context;
    v1::GetIntentRequest request;
    request.set_id(id);
    v1::Intent intent;
    if (!admin_->GetIntent(&context, request, &intent).ok()) return std::nullopt;
    return intent;
  }

  bool IntentReaches(const std::string& id, v1::IntentState state) {
    return Eventually([&] {
      std::optional<v1::Intent> intent = GetIntent(id);
      return intent.has_value() && intent->state() == state;
    });
  }

  std::vector<v1::Region> AgentRegions(Agent& agent) {
    grpc::ClientContext context;
    v1::ListRegionsResponse response;
    EXPECT_TRUE(agent.vmm->ListRegions(&context, {}, &response).ok());
    return {response.regions().begin(), response.regions().end()};
  }

  v1::Node GetNode(const std::string& name) {
    grpc::ClientContext context;
    v1::GetNodeRequest request;
    request.set_name(name);
    v1::Node node;
    EXPECT_TRUE(admin_->GetNode(&context, request, &node).ok());
    return node;
  }

  grpc::Status Map(Agent& agent, uint64_t iova, uint64_t ua, uint64_t size) {
    grpc::ClientContext context;
    v1::MapDmaRequest request;
    request.set_container("c1");
    request.set_iova(iova);
    request.set_ua(ua);
    request.set_size(size);
    v1::MapDmaResponse response;
    return agent.vmm->MapDma(&context, request, &response);
  }

  grpc::Status Unmap(Agent& agent, uint64_t iova, uint64_t size) {
    grpc::ClientContext context;
    v1::UnmapDmaRequest request;
    request.set_container("c1");
    request.set_iova(iova);
    request.set_size(size);
    v1::UnmapDmaResponse response;
    return agent.vmm->UnmapDma(&context, request, &response);
  }

  // Registers [ua, ua + size) on `node` through the server and waits until it holds.
  void RegisterThroughServer(const std::string& node, uint64_t ua, uint64_t size) {
    v1::Intent intent;
    grpc::Status status = CreateIntent(v1::INTENT_KIND_REGISTER, node, ua, size, &intent);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_TRUE(IntentReaches(intent.id(), v1::INTENT_STATE_SATISFIED))
        << GetIntent(intent.id())->DebugString();
  }

  std::unique_ptr<ScratchDir> server_dir_;
  int server_port_ = 0;
  int server_metrics_port_ = 0;
  std::unique_ptr<AgentProcess> server_;
  std::unique_ptr<v1::Admin::Stub> admin_;
  std::map<std::string, std::unique_ptr<Agent>> agents_;
};

TEST_F(FleetTest, DecisionsAreAppliedAndMetricsEqualTheAgentsCounters) {
  RegisterThroughServer("node-a", kBase, 4 * kMiB);
  RegisterThroughServer("node-a", kBase + 8 * kMiB, kMiB);
  RegisterThroughServer("node-b", kBase, 2 * kMiB);
  std::vector<v1::Region> regions = AgentRegions(*agents_["node-a"]);
  ASSERT_EQ(regions.size(), 2u);
  EXPECT_EQ(regions[0].used(), 1u);
  EXPECT_EQ(regions[0].containers(0), "c1");
  ASSERT_TRUE(Map(*agents_["node-a"], 0, kBase, 3 * kPage).ok());

  // The server's per-node numbers converge to the agents' own (reports every 100 ms).
  for (auto& entry : agents_) {
    // Named copies, not structured bindings: C++17 lambdas cannot capture those.
    const std::string& name = entry.first;
    const auto& agent = entry.second;
    SCOPED_TRACE(name);
    double agent_pinned = -1;
    double agent_mappings = -1;
    const bool converged = Eventually([&] {
      absl::StatusOr<std::string> agent_text = ScrapeMetrics(agent->metrics_port);
      absl::StatusOr<std::string> server_text = ScrapeMetrics(server_metrics_port_);
      if (!agent_text.ok() || !server_text.ok()) return false;
      agent_pinned = MetricValue(*agent_text, "dmapin_agent_locked_bytes").value_or(-1);
      agent_mappings = MetricValue(*agent_text, "dmapin_agent_installed_mappings").value_or(-1);
      const v1::Node node = GetNode(name);
      const std::optional<double> server_pinned =
          MetricValue(*server_text, "dmapin_fleet_node_pinned_bytes", {{"node", name}});
      const std::optional<double> server_mappings =
          MetricValue(*server_text, "dmapin_fleet_node_installed_mappings", {{"node", name}});
      return agent_pinned >= 0 && server_pinned == agent_pinned &&
             static_cast<double>(node.pinned_bytes()) == agent_pinned &&
             server_mappings == agent_mappings &&
             static_cast<double>(node.installed_mappings()) == agent_mappings;
    });
    EXPECT_TRUE(converged) << "agent pinned " << agent_pinned << ", mappings " << agent_mappings
                           << "; server sees " << GetNode(name).DebugString();
  }
  EXPECT_EQ(GetNode("node-a").pinned_bytes(), 5 * kMiB);
  EXPECT_EQ(GetNode("node-a").installed_mappings(), 3u);
  EXPECT_EQ(GetNode("node-c").pinned_bytes(), 0u);
  absl::StatusOr<std::string> server_text = ScrapeMetrics(server_metrics_port_);
  ASSERT_TRUE(server_text.ok());
  EXPECT_EQ(MetricValue(*server_text, "dmapin_server_agents_connected"), 3);
}

TEST_F(FleetTest, EbusyIsRetriedUntilTheVmmUnmaps) {
  Agent& agent = *agents_["node-a"];
  RegisterThroughServer("node-a", kBase, kMiB);
  ASSERT_TRUE(Map(agent, 0, kBase, kPage).ok());

  v1::Intent intent;
  ASSERT_TRUE(CreateIntent(v1::INTENT_KIND_UNREGISTER, "node-a", kBase, kMiB, &intent).ok());
  ASSERT_TRUE(IntentReaches(intent.id(), v1::INTENT_STATE_RETRYING));
  std::optional<v1::Intent> retrying = GetIntent(intent.id());
  ASSERT_TRUE(retrying.has_value());
  EXPECT_EQ(retrying->last_errno_name(), "EBUSY");
  EXPECT_FALSE(retrying->retrying_since().empty());
  // The region stays while mapped, and the server keeps trying.
  ASSERT_TRUE(Eventually([&] {
    std::optional<v1::Intent> now = GetIntent(intent.id());
    return now.has_value() && now->attempts() >= 3;
  })) << GetIntent(intent.id())->DebugString();
  EXPECT_EQ(AgentRegions(agent).size(), 1u);

  ASSERT_TRUE(Unmap(agent, 0, kPage).ok());
  ASSERT_TRUE(IntentReaches(intent.id(), v1::INTENT_STATE_SATISFIED))
      << GetIntent(intent.id())->DebugString();
  EXPECT_TRUE(AgentRegions(agent).empty());
  absl::StatusOr<std::string> text = ScrapeMetrics(server_metrics_port_);
  ASSERT_TRUE(text.ok());
  EXPECT_GE(MetricValue(*text, "dmapin_server_ebusy_retries_total").value_or(0), 2);
}

TEST_F(FleetTest, PolicyDenialsAndBadInputChangeNothing) {
  grpc::ClientContext set_context;
  v1::SetPolicyRequest set;
  v1::Policy* policy = set.mutable_policy();
  policy->set_name("pool-a");
  (*policy->mutable_node_selector())["pool"] = "a";
  policy->set_pinned_bytes_budget(4 * kMiB);
  v1::LabelRequirement* deny = policy->add_deny();
  deny->set_key("tenant");
  deny->add_values("red");
  v1::Policy stored;
  grpc::Status status = admin_->SetPolicy(&set_context, set, &stored);
  ASSERT_TRUE(status.ok()) << status.error_message();

  status = CreateIntent(v1::INTENT_KIND_REGISTER, "node-a", kBase, 8 * kMiB, nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  status =
      CreateIntent(v1::INTENT_KIND_REGISTER, "node-a", kBase, kMiB, nullptr, {{"tenant", "red"}});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  status = CreateIntent(v1::INTENT_KIND_REGISTER, "node-a", kBase + 1, kMiB, nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  status = CreateIntent(v1::INTENT_KIND_UNSPECIFIED, "node-a", kBase, kMiB, nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  // The other pool has no budget: admitted.
  RegisterThroughServer("node-c", kBase, 8 * kMiB);

  grpc::ClientContext list_context;
  v1::ListIntentsResponse intents;
  ASSERT_TRUE(admin_->ListIntents(&list_context, {}, &intents).ok());
  EXPECT_EQ(intents.intents_size(), 1) << "a refused intent was stored";
  EXPECT_TRUE(AgentRegions(*agents_["node-a"]).empty());

  grpc::ClientContext bad_context;
  v1::SetPolicyRequest bad;
  bad.mutable_policy()->set_name("");
  status = admin_->SetPolicy(&bad_context, bad, &stored);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "name")) << status.error_message();
}

TEST_F(FleetTest, DrainUnregistersEverythingWaitingThroughEbusy) {
  Agent& agent = *agents_["node-b"];
  RegisterThroughServer("node-b", kBase, kMiB);
  RegisterThroughServer("node-b", kBase + 4 * kMiB, kMiB);
  ASSERT_TRUE(Map(agent, 0, kBase, kPage).ok());

  grpc::ClientContext context;
  v1::DrainNodeRequest request;
  request.set_name("node-b");
  v1::Node node;
  ASSERT_TRUE(admin_->DrainNode(&context, request, &node).ok());
  EXPECT_TRUE(node.cordoned());
  EXPECT_TRUE(node.drain().active());
  EXPECT_EQ(node.drain().regions_total(), 2u);
  // The unmapped region goes; the mapped one waits through EBUSY.
  ASSERT_TRUE(Eventually([&] {
    const v1::Node now = GetNode("node-b");
    return now.drain().regions_remaining() == 1 && now.drain().regions_retrying() == 1;
  })) << GetNode("node-b").DebugString();
  EXPECT_EQ(AgentRegions(agent).size(), 1u);
  ASSERT_TRUE(Unmap(agent, 0, kPage).ok());
  ASSERT_TRUE(Eventually([&] { return !GetNode("node-b").drain().active(); }))
      << GetNode("node-b").DebugString();
  EXPECT_TRUE(AgentRegions(agent).empty());
  EXPECT_FALSE(GetNode("node-b").drain().finished().empty());
  // Cordoned: no new registrations there.
  grpc::Status status = CreateIntent(v1::INTENT_KIND_REGISTER, "node-b", kBase, kMiB, nullptr);
  EXPECT_FALSE(status.ok());
}

TEST_F(FleetTest, AgentKilledAndRestartedResynchronises) {
  Agent& agent = *agents_["node-a"];
  RegisterThroughServer("node-a", kBase, kMiB);
  const std::string incarnation = GetNode("node-a").incarnation();
  ASSERT_TRUE(agent.process->Kill().ok());
  ASSERT_TRUE(Eventually(
      [&] { return GetNode("node-a").connection() == v1::CONNECTION_STATE_DISCONNECTED; }));
  ASSERT_TRUE(StartAgent(agent).ok());
  ASSERT_TRUE(Eventually([&] {
    const v1::Node node = GetNode("node-a");
    return node.connection() == v1::CONNECTION_STATE_CONNECTED &&
           node.incarnation() != incarnation && node.pinned_bytes() == kMiB;
  })) << GetNode("node-a").DebugString();
  EXPECT_EQ(AgentRegions(agent).size(), 1u);
  RegisterThroughServer("node-a", kBase + 4 * kMiB, kMiB);
  EXPECT_EQ(AgentRegions(agent).size(), 2u);
}

TEST_F(FleetTest, ServerKilledAndRestartedKeepsIntentsAndPolicies) {
  grpc::ClientContext set_context;
  v1::SetPolicyRequest set;
  set.mutable_policy()->set_name("everyone");
  set.mutable_policy()->set_max_regions_per_node(10);
  v1::Policy stored;
  ASSERT_TRUE(admin_->SetPolicy(&set_context, set, &stored).ok());
  RegisterThroughServer("node-a", kBase, kMiB);
  // An intent the server is still pursuing when it dies: node-b's region is mapped.
  RegisterThroughServer("node-b", kBase, kMiB);
  ASSERT_TRUE(Map(*agents_["node-b"], 0, kBase, kPage).ok());
  v1::Intent busy;
  ASSERT_TRUE(CreateIntent(v1::INTENT_KIND_UNREGISTER, "node-b", kBase, kMiB, &busy).ok());
  ASSERT_TRUE(IntentReaches(busy.id(), v1::INTENT_STATE_RETRYING));

  ASSERT_TRUE(server_->Kill().ok());
  ASSERT_TRUE(StartServer().ok()) << server_->LogTail();
  ASSERT_TRUE(Eventually([&] { return ConnectedNodes() == 3; }));
  grpc::ClientContext get_context;
  v1::GetPolicyRequest get;
  get.set_name("everyone");
  ASSERT_TRUE(admin_->GetPolicy(&get_context, get, &stored).ok());
  EXPECT_EQ(stored.max_regions_per_node(), 10u);
  // The retry goes on in the new epoch and completes once the VMM unmaps.
  std::optional<v1::Intent> after = GetIntent(busy.id());
  ASSERT_TRUE(after.has_value());
  ASSERT_TRUE(Unmap(*agents_["node-b"], 0, kPage).ok());
  ASSERT_TRUE(IntentReaches(busy.id(), v1::INTENT_STATE_SATISFIED))
      << GetIntent(busy.id())->DebugString();
  EXPECT_TRUE(AgentRegions(*agents_["node-b"]).empty());
  EXPECT_EQ(AgentRegions(*agents_["node-a"]).size(), 1u);
  // Nothing was applied twice: each node's agent saw each decision once.
  grpc::ClientContext decisions_context;
  v1::ListDecisionsRequest decisions_request;
  decisions_request.set_node("node-a");
  v1::ListDecisionsResponse decisions;
  ASSERT_TRUE(admin_->ListDecisions(&decisions_context, decisions_request, &decisions).ok());
  ASSERT_EQ(decisions.decisions_size(), 1) << decisions.DebugString();
  EXPECT_EQ(decisions.decisions(0).result(), "OK");
}

}  // namespace
}  // namespace dmapin

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--agent_binary=")) dmapin::AgentBinary() = std::string(arg);
    if (absl::ConsumePrefix(&arg, "--server_binary=")) dmapin::ServerBinary() = std::string(arg);
  }
  return RUN_ALL_TESTS();
}
