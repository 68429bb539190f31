// Transport security across processes: dmapin-server and dmapin-agent with mutual TLS, from
// certificates this test makes with openssl (tools/certs/make_dev_certs.sh): handshakes refused
// (wrong CA, expired, no client certificate), the authorization matrix (Admin roles, Control node
// identity, the agent's TCP API), certificate rotation under open streams, secure by default.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/tls_credentials.h"
#include "dmapin/v1/admin.grpc.pb.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "dmapin/v1/control.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "testing/agent_process.h"
#include "testing/eventually.h"
#include "tests/fleet/fleetsim.h"

namespace dmapin {
namespace {

using fleetsim::FleetSim;
using fleetsim::FleetSimOptions;
using harness::AgentProcess;
using harness::Eventually;
using harness::MetricValue;
using harness::PortFromLog;
using harness::ScrapeMetrics;
using harness::ScratchDir;

std::string& AgentBinary() {
  static std::string path;
  return path;
}
std::string& ServerBinary() {
  static std::string path;
  return path;
}
std::string& CertsScript() {
  static std::string path;
  return path;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Runs make_dev_certs.sh with `args`; fails the test when it fails.
void Certs(const std::string& args) {
  const std::string command = absl::StrCat("'", CertsScript(), "' ", args, " >/dev/null");
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
}

std::chrono::system_clock::time_point In(absl::Duration d) {
  return std::chrono::system_clock::now() + absl::ToChronoMilliseconds(d);
}

std::string Trailer(const grpc::ClientContext& context, const std::string& key) {
  auto it = context.GetServerTrailingMetadata().find(key);
  return it == context.GetServerTrailingMetadata().end()
             ? ""
             : std::string(it->second.data(), it->second.size());
}

// One fleet for all tests (certificates, a server, agents node-1 and node-2), made once.
class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<ScratchDir>> dir = ScratchDir::Create("dmapin-tls-");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = dir->release();
    certs_ = dir_->Join("certs");
    // The fleet's CA: server, node-1, node-2, admin, viewer.
    Certs(absl::StrCat(certs_, " node-1 node-2"));
    // Another CA's admin, an expired admin, a valid certificate with an unknown identity.
    Certs(absl::StrCat("ca ", certs_, " other-ca"));
    Certs(absl::StrCat("issue ", certs_, " other-ca rogue URI:spiffe://dmapin/admin/admin"));
    Certs(absl::StrCat("issue ", certs_,
                       " ca expired URI:spiffe://dmapin/admin/admin 20200101000000Z "
                       "20200201000000Z"));
    Certs(absl::StrCat("issue ", certs_, " ca stranger URI:spiffe://dmapin/intruder/mallory"));

    absl::StatusOr<std::unique_ptr<AgentProcess>> server = AgentProcess::Start(
        {.binary = ServerBinary(),
         .args = {"--grpc_address=127.0.0.1:0", "--metrics_address=127.0.0.1:0",
                  "--state_dir=" + dir_->Join("server"), "--report_interval_ms=100",
                  "--tls_refresh_interval_s=1", "--health_address=127.0.0.1:0",
                  TlsFlag("cert", "server"), TlsFlag("key", "server"), TlsFlag("ca", "server")},
         .log_path = dir_->Join("server.log"),
         .tcp = true,
         .insecure = false,
         .credentials = Credentials("admin")});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    server_metrics_ = PortFromLog(ReadFile(dir_->Join("server.log")), "metrics");
    for (const char* node : {"node-1", "node-2"}) {
      ASSERT_NO_FATAL_FAILURE(StartAgent(node, &agents_[node]));
    }
    ASSERT_TRUE(Eventually([] { return ConnectedNodes() == 2; })) << server_->LogTail();
  }

  static void TearDownTestSuite() {
    for (auto& [name, agent] : agents_) {
      if (agent != nullptr) {
        EXPECT_TRUE(agent->Terminate().ok()) << agent->LogTail();
      }
      delete agent;
    }
    agents_.clear();
    if (server_ != nullptr) {
      EXPECT_TRUE(server_->Terminate().ok()) << server_->LogTail();
    }
    delete server_;
    delete dir_;
  }

  static std::string TlsFlag(absl::string_view what, absl::string_view name) {
    if (what == "cert") return absl::StrCat("--tls_cert_file=", certs_, "/", name, ".pem");
    if (what == "key") return absl::StrCat("--tls_key_file=", certs_, "/", name, ".key");
    return absl::StrCat("--tls_ca_file=", certs_, "/ca.pem");
  }

  static void StartAgent(const std::string& node, AgentProcess** out) {
    const std::string uds = dir_->Join(node + ".sock");
    absl::StatusOr<std::unique_ptr<AgentProcess>> agent = AgentProcess::Start(
        {.binary = AgentBinary(),
         .args = {"--node_name=" + node, "--backend=sim", "--server=" + server_->tcp_target(),
                  "--report_interval_ms=100", "--state_dir=" + dir_->Join(node),
                  "--uds_path=" + uds, "--tcp_address=127.0.0.1:0", "--metrics_address=127.0.0.1:0",
                  "--health_address=127.0.0.1:0", TlsFlag("cert", node), TlsFlag("key", node),
                  TlsFlag("ca", node)},
         .log_path = dir_->Join(node + ".log"),
         .uds_path = uds,
         .tcp = true,
         .insecure = false});
    ASSERT_TRUE(agent.ok()) << agent.status();
    *out = agent->release();
  }

  // Client credentials of certs_/<name>.pem, trusting the fleet's CA.
  static std::shared_ptr<grpc::ChannelCredentials> Credentials(absl::string_view name) {
    return ChannelCredentialsFor(
        TransportSecurity{.cert_file = absl::StrCat(certs_, "/", name, ".pem"),
                          .key_file = absl::StrCat(certs_, "/", name, ".key"),
                          .ca_file = certs_ + "/ca.pem"});
  }

  // A channel of its own (a new connection, a new handshake) to `target`.
  static std::shared_ptr<grpc::Channel> Channel(const std::string& target,
                                                std::shared_ptr<grpc::ChannelCredentials> creds) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    return grpc::CreateCustomChannel(target, std::move(creds), args);
  }

  static std::unique_ptr<v1::Admin::Stub> Admin(absl::string_view cert) {
    return v1::Admin::NewStub(Channel(server_->tcp_target(), Credentials(cert)));
  }

  static int ConnectedNodes() {
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(5)));
    v1::ListNodesResponse nodes;
    if (!Admin("admin")->ListNodes(&context, {}, &nodes).ok()) return -1;
    int connected = 0;
    for (const v1::Node& node : nodes.nodes()) {
      connected += node.connection() == v1::CONNECTION_STATE_CONNECTED;
    }
    return connected;
  }

  static std::optional<v1::Node> NodeView(const std::string& name) {
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(5)));
    v1::GetNodeRequest request;
    request.set_name(name);
    v1::Node node;
    if (!Admin("admin")->GetNode(&context, request, &node).ok()) return std::nullopt;
    return node;
  }

  static double ServerMetric(const std::string& name,
                             const std::map<std::string, std::string>& labels = {}) {
    absl::StatusOr<std::string> text = ScrapeMetrics(server_metrics_);
    if (!text.ok()) return -1;
    return MetricValue(*text, name, labels).value_or(-1);
  }

  static grpc::Status ListPolicies(v1::Admin::Stub& admin, v1::ListPoliciesResponse* out) {
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(5)));
    return admin.ListPolicies(&context, {}, out);
  }

  static v1::SetPolicyRequest Policy(const std::string& name) {
    v1::SetPolicyRequest request;
    request.mutable_policy()->set_name(name);
    (*request.mutable_policy()->mutable_node_selector())["pool"] = "tls";
    request.mutable_policy()->set_pinned_bytes_budget(1 << 30);
    return request;
  }

  static ScratchDir* dir_;
  static std::string certs_;
  static AgentProcess* server_;
  static int server_metrics_;
  static std::map<std::string, AgentProcess*> agents_;
};

ScratchDir* TlsTest::dir_ = nullptr;
std::string TlsTest::certs_;
AgentProcess* TlsTest::server_ = nullptr;
int TlsTest::server_metrics_ = 0;
std::map<std::string, AgentProcess*> TlsTest::agents_;

TEST_F(TlsTest, AdminWithTheFleetsCertificateIsServed) {
  v1::ListPoliciesResponse policies;
  EXPECT_TRUE(ListPolicies(*Admin("admin"), &policies).ok());
  EXPECT_EQ(ServerMetric("dmapin_server_insecure"), 0);
}

// The plaintext health-only port (for probes that do not speak TLS) serves health and nothing
// else: no dmapin service, no reflection.
TEST_F(TlsTest, TheHealthPortServesOnlyHealth) {
  for (const char* log : {"server.log", "node-1.log"}) {
    const int port = PortFromLog(ReadFile(dir_->Join(log)), "health");
    ASSERT_GT(port, 0) << log;
    const std::string target = absl::StrCat("127.0.0.1:", port);
    absl::StatusOr<int> health =
        harness::HealthCheck(harness::MakeChannel(target), "", absl::Seconds(5));
    ASSERT_TRUE(health.ok()) << log << ": " << health.status();
    EXPECT_EQ(*health, harness::kHealthServing) << log;
    auto admin = v1::Admin::NewStub(harness::MakeChannel(target));
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(5)));
    v1::ListNodesResponse nodes;
    EXPECT_EQ(admin->ListNodes(&context, {}, &nodes).error_code(), grpc::StatusCode::UNIMPLEMENTED)
        << log;
    auto agent = v1::NodeAgent::NewStub(harness::MakeChannel(target));
    grpc::ClientContext agent_context;
    agent_context.set_deadline(In(absl::Seconds(5)));
    v1::ListContextsResponse contexts;
    EXPECT_EQ(agent->ListContexts(&agent_context, {}, &contexts).error_code(),
              grpc::StatusCode::UNIMPLEMENTED)
        << log;
    absl::StatusOr<std::vector<std::string>> reflection =
        harness::RawBidiCall(harness::MakeChannel(target),
                             "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                             {std::string("\x3a\x00", 2)}, absl::Seconds(5));  // list_services = ""
    EXPECT_EQ(reflection.status().code(), absl::StatusCode::kUnimplemented)
        << log << ": " << reflection.status();
  }
  // The same reflection request on the TLS port, with a certificate, is served.
  absl::StatusOr<std::vector<std::string>> served =
      harness::RawBidiCall(Channel(server_->tcp_target(), Credentials("admin")),
                           "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                           {std::string("\x3a\x00", 2)}, absl::Seconds(5));
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_EQ(served->size(), 1u);
}

TEST_F(TlsTest, HandshakesWithoutAValidClientCertificateAreRefused) {
  v1::ListPoliciesResponse policies;
  // Another CA, an expired certificate of the right CA, no client certificate at all: no TLS
  // session, so no call reaches a handler.
  grpc::SslCredentialsOptions no_cert;
  no_cert.pem_root_certs = ReadFile(certs_ + "/ca.pem");
  for (const auto& [what, creds] :
       std::vector<std::pair<std::string, std::shared_ptr<grpc::ChannelCredentials>>>{
           {"wrong CA", Credentials("rogue")},
           {"expired", Credentials("expired")},
           {"no client certificate", grpc::SslCredentials(no_cert)}}) {
    auto admin = v1::Admin::NewStub(Channel(server_->tcp_target(), creds));
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(5)));
    v1::Policy response;
    const grpc::Status status = admin->SetPolicy(&context, Policy("from-" + what), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE)
        << what << ": " << status.error_message();
    // The agents' TCP port refuses them the same way.
    auto agent = v1::NodeAgent::NewStub(Channel(agents_["node-1"]->tcp_target(), creds));
    grpc::ClientContext agent_context;
    agent_context.set_deadline(In(absl::Seconds(5)));
    v1::ListContextsResponse contexts;
    EXPECT_EQ(agent->ListContexts(&agent_context, {}, &contexts).error_code(),
              grpc::StatusCode::UNAVAILABLE)
        << what;
  }
  // Plaintext on the TLS port: refused too.
  auto plain =
      v1::Admin::NewStub(Channel(server_->tcp_target(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(In(absl::Seconds(5)));
  EXPECT_EQ(plain->ListPolicies(&context, {}, &policies).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // Nothing changed.
  ASSERT_TRUE(ListPolicies(*Admin("admin"), &policies).ok());
  for (const v1::Policy& policy : policies.policies()) {
    EXPECT_FALSE(absl::StartsWith(policy.name(), "from-")) << policy.name();
  }
}

TEST_F(TlsTest, ViewerReadsButCannotWrite) {
  const double refused_before =
      ServerMetric("dmapin_server_auth_refused_total", {{"check", "admin_write"}});
  auto viewer = Admin("viewer");
  v1::ListPoliciesResponse before;
  ASSERT_TRUE(ListPolicies(*viewer, &before).ok());

  grpc::ClientContext context;
  context.set_deadline(In(absl::Seconds(5)));
  v1::Policy response;
  const grpc::Status status = viewer->SetPolicy(&context, Policy("by-viewer"), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_TRUE(absl::StartsWith(status.error_message(), "EACCES: Admin.SetPolicy needs role admin"))
      << status.error_message();
  EXPECT_EQ(Trailer(context, "dmapin-errno"), "EACCES");

  v1::ListPoliciesResponse after;
  ASSERT_TRUE(ListPolicies(*Admin("admin"), &after).ok());
  EXPECT_EQ(after.policies_size(), before.policies_size());
  for (const v1::Policy& policy : after.policies()) EXPECT_NE(policy.name(), "by-viewer");
  EXPECT_EQ(ServerMetric("dmapin_server_auth_refused_total", {{"check", "admin_write"}}),
            refused_before + 1);

  // Reads and WatchEvents are a viewer's: the watch stays open until its deadline.
  grpc::ClientContext watch;
  watch.set_deadline(In(absl::Milliseconds(700)));
  auto reader = viewer->WatchEvents(&watch, {});
  v1::Event event;
  while (reader->Read(&event)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);

  // An admin may write.
  grpc::ClientContext admin_context;
  admin_context.set_deadline(In(absl::Seconds(5)));
  EXPECT_TRUE(Admin("admin")->SetPolicy(&admin_context, Policy("by-admin"), &response).ok());
}

TEST_F(TlsTest, AgentServerAndUnknownCertificatesCannotCallAdmin) {
  for (const char* cert : {"node-1", "server", "stranger"}) {
    auto admin = Admin(cert);
    v1::ListNodesResponse nodes;
    grpc::ClientContext read;
    read.set_deadline(In(absl::Seconds(5)));
    const grpc::Status status = admin->ListNodes(&read, {}, &nodes);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << cert << ": " << status.error_message();
    grpc::ClientContext write;
    write.set_deadline(In(absl::Seconds(5)));
    v1::CordonNodeRequest cordon;
    cordon.set_name("node-2");
    v1::Node node;
    EXPECT_EQ(admin->CordonNode(&write, cordon, &node).error_code(),
              grpc::StatusCode::PERMISSION_DENIED)
        << cert;
    grpc::ClientContext watch;
    watch.set_deadline(In(absl::Seconds(5)));
    auto reader = admin->WatchEvents(&watch, {});
    v1::Event event;
    EXPECT_FALSE(reader->Read(&event));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED) << cert;
  }
  std::optional<v1::Node> node2 = NodeView("node-2");
  ASSERT_TRUE(node2.has_value());
  EXPECT_FALSE(node2->cordoned());
}

// One Control stream: Hello as `claimed` with certificate `cert`; the stream's status.
grpc::Status ClaimNode(const std::shared_ptr<grpc::Channel>& channel, const std::string& claimed) {
  auto control = v1::Control::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(In(absl::Seconds(5)));
  auto stream = control->Connect(&context);
  v1::AgentMessage hello;
  hello.mutable_hello()->set_node_name(claimed);
  hello.mutable_hello()->set_incarnation("impostor");
  hello.mutable_hello()->set_backend("sim");
  stream->Write(hello);
  v1::ServerMessage reply;
  bool welcomed = stream->Read(&reply) && reply.has_welcome();
  stream->WritesDone();
  while (stream->Read(&reply)) {
  }
  grpc::Status status = stream->Finish();
  if (welcomed && status.ok()) return grpc::Status(grpc::StatusCode::OK, "welcomed");
  return status;
}

TEST_F(TlsTest, AControlStreamForAnotherNodeIsRefusedAndTheRealSessionUntouched) {
  std::optional<v1::Node> before = NodeView("node-2");
  ASSERT_TRUE(before.has_value());
  ASSERT_EQ(before->connection(), v1::CONNECTION_STATE_CONNECTED);
  const double connects = ServerMetric("dmapin_server_agent_connects_total");
  const double disconnects = ServerMetric("dmapin_server_agent_disconnects_total");
  const double mismatches =
      ServerMetric("dmapin_server_auth_refused_total", {{"check", "control_node_mismatch"}});
  const double others = ServerMetric("dmapin_server_auth_refused_total", {{"check", "control"}});

  // node-1's certificate claiming node-2 (node-2 is connected).
  grpc::Status status = ClaimNode(Channel(server_->tcp_target(), Credentials("node-1")), "node-2");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "names node node-2"))
      << status.error_message();
  // Admins and unknown identities are no agents.
  for (const char* cert : {"admin", "stranger"}) {
    status = ClaimNode(Channel(server_->tcp_target(), Credentials(cert)), "node-2");
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << cert;
  }

  EXPECT_EQ(ServerMetric("dmapin_server_auth_refused_total", {{"check", "control_node_mismatch"}}),
            mismatches + 1);
  EXPECT_EQ(ServerMetric("dmapin_server_auth_refused_total", {{"check", "control"}}), others + 2);
  // The real session: still connected, the same agent process, no reconnect.
  absl::SleepFor(absl::Milliseconds(300));  // a few reports
  std::optional<v1::Node> after = NodeView("node-2");
  ASSERT_TRUE(after.has_value());
  EXPECT_EQ(after->connection(), v1::CONNECTION_STATE_CONNECTED);
  EXPECT_EQ(after->incarnation(), before->incarnation());
  EXPECT_EQ(ServerMetric("dmapin_server_agent_connects_total"), connects);
  EXPECT_EQ(ServerMetric("dmapin_server_agent_disconnects_total"), disconnects);
}

// The other direction: an agent dials only the server's identity. A process serving with a valid
// certificate of the CA that carries the dialled address but names a node (here node-1's) is no
// central service: the agent's handshake fails and it never says Hello there.
TEST_F(TlsTest, AnAgentSpeaksOnlyToTheServersIdentity) {
  absl::StatusOr<std::unique_ptr<AgentProcess>> impostor = AgentProcess::Start(
      {.binary = ServerBinary(),
       .args = {"--grpc_address=127.0.0.1:0",
                "--metrics_address=", "--state_dir=" + dir_->Join("impostor"),
                TlsFlag("cert", "node-1"), TlsFlag("key", "node-1"), TlsFlag("ca", "node-1")},
       .log_path = dir_->Join("impostor.log"),
       .tcp = true,
       .insecure = false,
       .credentials = Credentials("admin")});
  ASSERT_TRUE(impostor.ok()) << impostor.status();
  const std::string uds = dir_->Join("fooled.sock");
  absl::StatusOr<std::unique_ptr<AgentProcess>> agent = AgentProcess::Start(
      {.binary = AgentBinary(),
       .args = {"--node_name=node-2", "--backend=sim", "--server=" + (*impostor)->tcp_target(),
                "--report_interval_ms=100", "--state_dir=" + dir_->Join("fooled"),
                "--uds_path=" + uds, "--tcp_address=", "--metrics_address=",
                TlsFlag("cert", "node-2"), TlsFlag("key", "node-2"), TlsFlag("ca", "node-2")},
       .log_path = dir_->Join("fooled.log"),
       .uds_path = uds,
       .insecure = false});
  ASSERT_TRUE(agent.ok()) << agent.status();
  // The refusal is the agent's, naming what the certificate is.
  EXPECT_TRUE(Eventually([&] {
    return absl::StrContains(ReadFile(dir_->Join("fooled.log")),
                             "must be the server's; node node-1");
  })) << ReadFile(dir_->Join("fooled.log"));
  grpc::ClientContext context;
  context.set_deadline(In(absl::Seconds(5)));
  v1::ListNodesResponse nodes;
  const grpc::Status listed =
      v1::Admin::NewStub(Channel((*impostor)->tcp_target(), Credentials("admin")))
          ->ListNodes(&context, {}, &nodes);
  ASSERT_TRUE(listed.ok()) << listed.error_message();
  EXPECT_EQ(nodes.nodes_size(), 0) << "the agent said Hello to a node's certificate";
  EXPECT_TRUE((*agent)->Terminate().ok());
  EXPECT_TRUE((*impostor)->Terminate().ok());
}

TEST_F(TlsTest, TheAgentsTcpApiIsForTheServerAndAdminsOnly) {
  const std::string target = agents_["node-1"]->tcp_target();
  const int agent_metrics = PortFromLog(ReadFile(dir_->Join("node-1.log")), "metrics");
  absl::StatusOr<std::string> metrics_before = ScrapeMetrics(agent_metrics);
  ASSERT_TRUE(metrics_before.ok());
  const double refused_before =
      MetricValue(*metrics_before, "dmapin_agent_auth_refused_total", {{"check", "agent_tcp"}})
          .value_or(-1);
  for (const char* cert : {"admin", "server"}) {
    auto agent = v1::NodeAgent::NewStub(Channel(target, Credentials(cert)));
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(5)));
    v1::ListContextsResponse contexts;
    const grpc::Status status = agent->ListContexts(&context, {}, &contexts);
    EXPECT_TRUE(status.ok()) << cert << ": " << status.error_message();
  }
  // The VMM data path never over TCP, even for an admin: a context and container made on the
  // Unix socket (this process owns them), then MapDma on them over TCP.
  {
    auto local = v1::NodeAgent::NewStub(harness::MakeChannel(agents_["node-1"]->uds_target()));
    grpc::ClientContext create;
    v1::CreateContextRequest context_request;
    context_request.set_name("vm-tls");
    v1::Context created;
    ASSERT_TRUE(local->CreateContext(&create, context_request, &created).ok());
    grpc::ClientContext create_container;
    v1::CreateContainerRequest container_request;
    container_request.set_name("vm-tls/c");
    v1::Container container;
    ASSERT_TRUE(local->CreateContainer(&create_container, container_request, &container).ok());

    auto agent = v1::NodeAgent::NewStub(Channel(target, Credentials("admin")));
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(5)));
    v1::MapDmaRequest map;
    map.set_container("vm-tls/c");
    map.set_size(65536);
    v1::MapDmaResponse mapped;
    const grpc::Status status = agent->MapDma(&context, map, &mapped);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  }
  for (const char* cert : {"stranger", "viewer", "node-2", "node-1"}) {
    auto agent = v1::NodeAgent::NewStub(Channel(target, Credentials(cert)));
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(5)));
    v1::ListContextsResponse contexts;
    const grpc::Status status = agent->ListContexts(&context, {}, &contexts);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << cert << ": " << status.error_message();
    EXPECT_TRUE(absl::StrContains(status.error_message(), "is for the server and admins"))
        << status.error_message();
    grpc::ClientContext teardown;
    teardown.set_deadline(In(absl::Seconds(5)));
    v1::TeardownContextRequest request;
    request.set_name("vm-1");
    v1::TeardownContextResponse torn;
    EXPECT_EQ(agent->TeardownContext(&teardown, request, &torn).error_code(),
              grpc::StatusCode::PERMISSION_DENIED)
        << cert;
  }
  absl::StatusOr<std::string> metrics = ScrapeMetrics(agent_metrics);
  ASSERT_TRUE(metrics.ok());
  EXPECT_EQ(MetricValue(*metrics, "dmapin_agent_auth_refused_total", {{"check", "agent_tcp"}}),
            refused_before + 8);
  EXPECT_EQ(MetricValue(*metrics, "dmapin_agent_insecure"), 0);
}

// The PEM certificate the server presents on a new connection, and its SANs.
std::string ServedCertificate(const std::shared_ptr<grpc::Channel>& channel,
                              std::vector<std::string>* sans) {
  auto admin = v1::Admin::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(In(absl::Seconds(5)));
  v1::ListPoliciesResponse policies;
  if (!admin->ListPolicies(&context, {}, &policies).ok()) return "";
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr) return "";
  sans->clear();
  for (const grpc::string_ref& san : auth->FindPropertyValues("x509_subject_alternative_name")) {
    sans->emplace_back(san.data(), san.size());
  }
  std::vector<grpc::string_ref> pem = auth->FindPropertyValues("x509_pem_cert");
  return pem.empty() ? "" : std::string(pem[0].data(), pem[0].size());
}

TEST_F(TlsTest, RotatedCertificatesServeNewHandshakesWhileOpenStreamsGoOn) {
  // Open streams: an admin's WatchEvents and both agents' control streams.
  auto admin = Admin("admin");
  grpc::ClientContext watch;
  watch.set_deadline(In(absl::Seconds(60)));
  std::unique_ptr<grpc::ClientReader<v1::Event>> events = admin->WatchEvents(&watch, {});
  std::vector<std::string> sans;
  const std::string old_pem = ReadFile(certs_ + "/server.pem");
  ASSERT_EQ(ServedCertificate(Channel(server_->tcp_target(), Credentials("admin")), &sans),
            old_pem);
  std::optional<v1::Node> node1 = NodeView("node-1");
  ASSERT_TRUE(node1.has_value());
  const double connects = ServerMetric("dmapin_server_agent_connects_total");
  const double disconnects = ServerMetric("dmapin_server_agent_disconnects_total");

  // A new server certificate (the next serial, one more DNS name) in place of the old one.
  Certs(absl::StrCat("issue ", certs_,
                     " ca server "
                     "URI:spiffe://dmapin/server,DNS:localhost,DNS:rotated.dmapin,IP:127.0.0.1"));
  const std::string new_pem = ReadFile(certs_ + "/server.pem");
  ASSERT_NE(new_pem, old_pem);
  EXPECT_TRUE(Eventually(
      [&] {
        return ServedCertificate(Channel(server_->tcp_target(), Credentials("admin")), &sans) ==
               new_pem;
      },
      absl::Seconds(20), absl::Milliseconds(200)))
      << "the server still presents its old certificate";
  EXPECT_NE(std::find(sans.begin(), sans.end(), "rotated.dmapin"), sans.end());

  // A new agent's handshake verifies the new certificate; the watch opened before the rotation
  // sees it connect.
  Certs(absl::StrCat("issue ", certs_,
                     " ca node-3 URI:spiffe://dmapin/node/node-3,DNS:localhost,IP:127.0.0.1"));
  ASSERT_NO_FATAL_FAILURE(StartAgent("node-3", &agents_["node-3"]));
  v1::Event event;
  bool seen = false;
  while (!seen && events->Read(&event)) {
    seen = event.type() == "node_connected" && event.node() == "node-3";
  }
  EXPECT_TRUE(seen) << "the watch stream opened before the rotation ended";
  watch.TryCancel();
  events->Finish();

  // The agents' streams were never interrupted.
  EXPECT_TRUE(Eventually([] { return ConnectedNodes() == 3; }));
  EXPECT_EQ(ServerMetric("dmapin_server_agent_connects_total"), connects + 1);
  EXPECT_EQ(ServerMetric("dmapin_server_agent_disconnects_total"), disconnects);
  std::optional<v1::Node> node1_after = NodeView("node-1");
  ASSERT_TRUE(node1_after.has_value());
  EXPECT_EQ(node1_after->incarnation(), node1->incarnation());
  EXPECT_EQ(node1_after->connection(), v1::CONNECTION_STATE_CONNECTED);
}

// The fleet simulator's agents under mutual TLS, each with its own node's certificate; one that
// dials with another node's certificate is never welcomed.
TEST_F(TlsTest, SimulatedAgentsEachNeedTheirOwnNodesCertificate) {
  static constexpr int kHonest = 3;
  for (int i = 0; i < kHonest; ++i) {
    const std::string node = absl::StrFormat("tls-sim-%05d", i);
    Certs(absl::StrCat("issue ", certs_, " ca ", node, " URI:spiffe://dmapin/node/", node));
  }
  const double mismatches =
      ServerMetric("dmapin_server_auth_refused_total", {{"check", "control_node_mismatch"}});
  FleetSimOptions options{.server_address = server_->tcp_target(),
                          .agents = kHonest + 1,
                          .name_prefix = "tls-sim-",
                          .regions_per_node = 2};
  options.credentials_for = [](const std::string& node) {
    // The last agent holds the first one's certificate.
    const std::string cert = node == absl::StrFormat("tls-sim-%05d", kHonest)
                                 ? absl::StrFormat("tls-sim-%05d", 0)
                                 : node;
    return Credentials(cert);
  };
  FleetSim sim(options);
  sim.Start();
  EXPECT_TRUE(sim.AwaitWelcomed(kHonest, absl::Seconds(20)));
  EXPECT_TRUE(Eventually([&] {
    return ServerMetric("dmapin_server_auth_refused_total", {{"check", "control_node_mismatch"}}) >
           mismatches;
  }));
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(sim.Stats().welcomed, static_cast<uint64_t>(kHonest));
  EXPECT_EQ(sim.AgentStats(kHonest).welcomed, 0u);
  std::optional<v1::Node> impostor = NodeView(absl::StrFormat("tls-sim-%05d", kHonest));
  EXPECT_FALSE(impostor.has_value() && impostor->connection() == v1::CONNECTION_STATE_CONNECTED);
  sim.Stop();
}

// Secure by default: without certificates or --insecure neither binary starts; --insecure is
// logged and exported.
TEST(TlsStartTest, BinariesRefuseToStartWithoutCertificatesOrInsecure) {
  absl::StatusOr<std::unique_ptr<ScratchDir>> dir = ScratchDir::Create("dmapin-tls-start-");
  ASSERT_TRUE(dir.ok());
  absl::StatusOr<std::unique_ptr<AgentProcess>> server =
      AgentProcess::Start({.binary = ServerBinary(),
                           .args = {"--grpc_address=127.0.0.1:0",
                                    "--metrics_address=", "--state_dir=" + (*dir)->Join("server")},
                           .log_path = (*dir)->Join("server.log"),
                           .tcp = true,
                           .start_timeout = absl::Seconds(10),
                           .insecure = false});
  ASSERT_FALSE(server.ok());
  EXPECT_TRUE(absl::StrContains(ReadFile((*dir)->Join("server.log")),
                                "refusing to start without transport security"))
      << ReadFile((*dir)->Join("server.log"));

  absl::StatusOr<std::unique_ptr<AgentProcess>> agent = AgentProcess::Start(
      {.binary = AgentBinary(),
       .args = {"--node_name=n", "--backend=sim", "--state_dir=" + (*dir)->Join("agent"),
                "--uds_path=" + (*dir)->Join("a.sock"), "--tcp_address=127.0.0.1:0",
                "--metrics_address="},
       .log_path = (*dir)->Join("agent.log"),
       .uds_path = (*dir)->Join("a.sock"),
       .tcp = true,
       .start_timeout = absl::Seconds(10),
       .insecure = false});
  ASSERT_FALSE(agent.ok());
  EXPECT_TRUE(absl::StrContains(ReadFile((*dir)->Join("agent.log")),
                                "refusing to start without transport security"))
      << ReadFile((*dir)->Join("agent.log"));

  // --insecure: serves, says so in the log and in /metrics.
  absl::StatusOr<std::unique_ptr<AgentProcess>> plain =
      AgentProcess::Start({.binary = ServerBinary(),
                           .args = {"--grpc_address=127.0.0.1:0", "--metrics_address=127.0.0.1:0",
                                    "--state_dir=" + (*dir)->Join("plain"), "--insecure"},
                           .log_path = (*dir)->Join("plain.log"),
                           .tcp = true,
                           .insecure = false});
  ASSERT_TRUE(plain.ok()) << plain.status();
  const std::string log = ReadFile((*dir)->Join("plain.log"));
  EXPECT_TRUE(absl::StrContains(log, "--insecure: gRPC on TCP is PLAINTEXT")) << log;
  absl::StatusOr<std::string> metrics = ScrapeMetrics(PortFromLog(log, "metrics"));
  ASSERT_TRUE(metrics.ok());
  EXPECT_EQ(MetricValue(*metrics, "dmapin_server_insecure"), 1);
  EXPECT_TRUE((*plain)->Terminate().ok());
}

}  // namespace
}  // namespace dmapin

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--agent_binary=")) dmapin::AgentBinary() = std::string(arg);
    if (absl::ConsumePrefix(&arg, "--server_binary=")) dmapin::ServerBinary() = std::string(arg);
    if (absl::ConsumePrefix(&arg, "--make_dev_certs=")) dmapin::CertsScript() = std::string(arg);
  }
  return RUN_ALL_TESTS();
}
