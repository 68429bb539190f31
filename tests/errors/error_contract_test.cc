// The error contract of README "Errors", over the wire against the real binaries: every error path
// of the Admin, Control and NodeAgent APIs this test can reach answers with a gRPC code and errno
// that are a row of the README's table, a message that starts with the errno name and the
// `dmapin-errno` trailer naming it again; the one exception (a request refused by gRPC itself
// for its size) is the table's row without an errno. (tests/agent_e2e walks the agent's
// validation errors in more detail.)
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "dmapin/v1/admin.grpc.pb.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "dmapin/v1/control.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/fleet/fleet_harness.h"
#include "tests/limits/limits_harness.h"

ABSL_FLAG(std::string, agent_binary, "", "dmapin-agent");
ABSL_FLAG(std::string, server_binary, "", "dmapin-server");
ABSL_FLAG(std::string, readme, "", "the README.md whose errors table is the contract");

namespace dmapin {
namespace {

constexpr uint64_t kPage = 65536;
constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr char kNoErrno[] = "-";  // the table's errno cell for gRPC's own refusals

// The (errno, code) pairs of the README's "## Errors" table.
std::set<std::pair<std::string, std::string>> ReadmeErrorTable(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  std::set<std::pair<std::string, std::string>> rows;
  bool in_errors = false;
  for (absl::string_view line : absl::StrSplit(text.str(), '\n')) {
    if (absl::StartsWith(line, "## ")) in_errors = line == "## Errors";
    if (!in_errors || !absl::StartsWith(line, "| ")) continue;
    std::vector<std::string> cells = absl::StrSplit(line, '|');
    if (cells.size() < 4) continue;
    std::string err(absl::StripAsciiWhitespace(cells[1]));
    std::string code(absl::StripAsciiWhitespace(cells[2]));
    err = absl::StrReplaceAll(err, {{"`", ""}});
    code = absl::StrReplaceAll(code, {{"`", ""}});
    if (err == "errno" || absl::StartsWith(err, "---")) continue;
    rows.insert({err, code});
  }
  return rows;
}

std::string CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

std::string Trailer(const grpc::ClientContext& context) {
  auto it = context.GetServerTrailingMetadata().find("dmapin-errno");
  if (it == context.GetServerTrailingMetadata().end()) return "";
  return std::string(it->second.data(), it->second.size());
}

// One error path: what it does, the errno and code it must answer with.
struct ErrorCase {
  std::string what;
  std::string errno_name;  // kNoErrno: refused by gRPC itself, no trailer
  grpc::StatusCode code;
  std::function<grpc::Status(grpc::ClientContext*)> call;
};

class ErrorContractTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<fleetsim::ServerUnderTest>> server =
        fleetsim::ServerUnderTest::Start(absl::GetFlag(FLAGS_server_binary),
                                         {"--max_watchers=1", "--reconcile_interval_ms=5"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    absl::StatusOr<std::unique_ptr<limits::AgentUnderTest>> agent = limits::AgentUnderTest::Start(
        absl::GetFlag(FLAGS_agent_binary),
        {"--server=" + server_->target(), "--node_labels=pool=a", "--report_interval_ms=50",
         "--sim_holes=0x30000000:0x10000"});
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = std::move(*agent);
    admin_ = v1::Admin::NewStub(limits::FreshChannel(server_->target()));
    control_ = v1::Control::NewStub(limits::FreshChannel(server_->target()));
    // As a VMM calls the agent: over its Unix socket, owning the contexts it creates. TCP is the
    // central service's and admins' (no DMA calls).
    node_ = v1::NodeAgent::NewStub(limits::FreshChannel(agent_->process()->uds_target()));
    node_tcp_ = v1::NodeAgent::NewStub(limits::FreshChannel(agent_->target()));
    // The server knows the node once the agent's control stream is up.
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (absl::Now() < deadline) {
      grpc::ClientContext context;
      v1::GetNodeRequest request;
      request.set_name("limits");
      v1::Node node;
      if (admin_->GetNode(&context, request, &node).ok() &&
          node.connection() == v1::CONNECTION_STATE_CONNECTED) {
        return;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    FAIL() << "the agent never connected to the server";
  }

  // Runs `c` and checks it against the contract and the README's table.
  void Check(const ErrorCase& c, const std::set<std::pair<std::string, std::string>>& table) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    const grpc::Status status = c.call(&context);
    const std::string got =
        absl::StrCat(CodeName(status.error_code()), " \"", status.error_message(), "\" trailer \"",
                     Trailer(context), "\"");
    EXPECT_EQ(status.error_code(), c.code) << c.what << ": " << got;
    if (c.errno_name == kNoErrno) {
      EXPECT_EQ(Trailer(context), "") << c.what << ": " << got;
    } else {
      EXPECT_TRUE(absl::StartsWith(status.error_message(), c.errno_name + ": "))
          << c.what << ": " << got;
      EXPECT_EQ(Trailer(context), c.errno_name) << c.what << ": " << got;
    }
    EXPECT_EQ(table.count({c.errno_name, CodeName(c.code)}), 1u)
        << c.what << ": (" << c.errno_name << ", " << CodeName(c.code)
        << ") is not a row of README's errors table";
  }

  // --- Call builders ---------------------------------------------------------------------------
  std::function<grpc::Status(grpc::ClientContext*)> SetPolicy(v1::Policy policy) {
    return [this, policy](grpc::ClientContext* context) {
      v1::SetPolicyRequest request;
      *request.mutable_policy() = policy;
      v1::Policy response;
      return admin_->SetPolicy(context, request, &response);
    };
  }
  std::function<grpc::Status(grpc::ClientContext*)> CreateIntent(v1::CreateIntentRequest request) {
    return [this, request](grpc::ClientContext* context) {
      v1::CreateIntentResponse response;
      return admin_->CreateIntent(context, request, &response);
    };
  }
  static v1::CreateIntentRequest Register(const std::string& node, uint64_t ua, uint64_t size) {
    v1::CreateIntentRequest request;
    request.set_kind(v1::INTENT_KIND_REGISTER);
    request.set_node(node);
    request.set_context("vm-9");
    request.set_container("vm-9/dev");
    request.set_ua(ua);
    request.set_size(size);
    return request;
  }
  std::function<grpc::Status(grpc::ClientContext*)> RegisterRegion(const std::string& container,
                                                                   const std::string& context_name,
                                                                   uint64_t ua, uint64_t size) {
    return [=](grpc::ClientContext* context) {
      v1::RegisterRegionRequest request;
      request.set_container(container);
      request.set_context(context_name);
      request.set_ua(ua);
      request.set_size(size);
      v1::Region response;
      return node_->RegisterRegion(context, request, &response);
    };
  }
  std::function<grpc::Status(grpc::ClientContext*)> MapDma(const std::string& container,
                                                           uint64_t iova, uint64_t ua,
                                                           uint64_t size) {
    return [=](grpc::ClientContext* context) {
      v1::MapDmaRequest request;
      request.set_container(container);
      request.set_iova(iova);
      request.set_ua(ua);
      request.set_size(size);
      v1::MapDmaResponse response;
      return node_->MapDma(context, request, &response);
    };
  }
  grpc::Status MustSucceed(const std::function<grpc::Status(grpc::ClientContext*)>& call) {
    grpc::ClientContext context;
    const grpc::Status status = call(&context);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return status;
  }

  std::unique_ptr<fleetsim::ServerUnderTest> server_;
  std::unique_ptr<limits::AgentUnderTest> agent_;
  std::unique_ptr<v1::Admin::Stub> admin_;
  std::unique_ptr<v1::Control::Stub> control_;
  std::unique_ptr<v1::NodeAgent::Stub> node_;
  std::unique_ptr<v1::NodeAgent::Stub> node_tcp_;
};

TEST_F(ErrorContractTest, EveryErrorPathAnswersAsTheReadmeTableSays) {
  const auto table = ReadmeErrorTable(absl::GetFlag(FLAGS_readme));
  ASSERT_FALSE(table.empty()) << "no errors table in " << absl::GetFlag(FLAGS_readme);
  const grpc::StatusCode kInvalid = grpc::StatusCode::INVALID_ARGUMENT;
  const grpc::StatusCode kNotFound = grpc::StatusCode::NOT_FOUND;
  const grpc::StatusCode kExhausted = grpc::StatusCode::RESOURCE_EXHAUSTED;
  const grpc::StatusCode kPrecondition = grpc::StatusCode::FAILED_PRECONDITION;
  const grpc::StatusCode kDenied = grpc::StatusCode::PERMISSION_DENIED;

  // The agent's side: vm-1 with dev-1 holding a mapped region; vm-2 limited to 1 MiB; vm-9 for
  // the server's decisions.
  auto create_context = [this](const std::string& name, uint64_t limit) {
    return [=](grpc::ClientContext* context) {
      v1::CreateContextRequest request;
      request.set_name(name);
      if (limit == 0) {
        request.set_memlock_unlimited(true);
      } else {
        request.set_memlock_limit_bytes(limit);
      }
      v1::Context response;
      return node_->CreateContext(context, request, &response);
    };
  };
  auto create_container = [this](const std::string& name, uint64_t window_size) {
    return [=](grpc::ClientContext* context) {
      v1::CreateContainerRequest request;
      request.set_name(name);
      request.set_window_size(window_size);
      v1::Container response;
      return node_->CreateContainer(context, request, &response);
    };
  };
  MustSucceed(create_context("vm-1", 0));
  MustSucceed(create_context("vm-2", kMiB));
  MustSucceed(create_container("dev-1", 16 * kMiB));
  MustSucceed(create_container("dev-2", 0));
  MustSucceed(create_container("dev-3", 0));
  MustSucceed(create_container("dev-idle", 0));
  MustSucceed(create_context("vm-9", 0));
  MustSucceed(create_container("vm-9/dev", 0));
  MustSucceed(RegisterRegion("dev-1", "vm-1", 0x10000000, kMiB));
  MustSucceed(MapDma("dev-1", 0, 0x10000000, kPage));

  // What the refusals below refuse against: pool a has 4 MiB and two regions per node, no
  // tenant "blocked"; the node has two regions, 1.5 MiB (the one above, and one the server
  // decided).
  v1::Policy pool;
  pool.set_name("pool-a");
  (*pool.mutable_node_selector())["pool"] = "a";
  pool.set_pinned_bytes_budget(4 * kMiB);
  pool.set_max_regions_per_node(2);
  pool.add_deny()->set_key("tenant");
  pool.mutable_deny(0)->add_values("blocked");
  MustSucceed(SetPolicy(pool));

  MustSucceed(CreateIntent(Register("limits", 0x40000000, kMiB / 2)));
  const absl::Time reported = absl::Now() + absl::Seconds(20);
  for (;;) {
    grpc::ClientContext context;
    v1::GetNodeRequest request;
    request.set_name("limits");
    v1::Node node;
    ASSERT_TRUE(admin_->GetNode(&context, request, &node).ok());
    if (node.regions() == 2 && node.pinned_bytes() == kMiB + kMiB / 2) break;
    ASSERT_LT(absl::Now(), reported) << "the server never saw the node's regions";
    absl::SleepFor(absl::Milliseconds(20));
  }

  // One open watcher: the server allows one (--max_watchers=1).
  grpc::ClientContext watch_context;
  std::unique_ptr<grpc::ClientReader<v1::Event>> watcher =
      admin_->WatchEvents(&watch_context, v1::WatchEventsRequest());
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (limits::Metric(server_->metrics_port(), "dmapin_server_watchers") < 1 &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }

  v1::Policy bad_name = pool;
  bad_name.set_name("pool a");
  v1::Policy negative_budget = pool;
  negative_budget.set_pinned_bytes_budget(~uint64_t{0});  // a client's -1
  v1::CreateIntentRequest zero_size = Register("limits", 0x40000000, 0);
  v1::CreateIntentRequest blocked = Register("limits", 0x50000000, kPage);
  (*blocked.mutable_labels())["tenant"] = "blocked";
  // A request of 5 MiB, over the default --max_receive_message_bytes of 4 MiB.
  v1::CreateIntentRequest oversized = Register("limits", 0x40000000, kPage);
  (*oversized.mutable_labels())["padding"] = std::string(5 * kMiB, 'x');

  const std::vector<ErrorCase> cases = {
      // --- Admin: validation
      {"SetPolicy with a bad name", "EINVAL", kInvalid, SetPolicy(bad_name)},
      {"SetPolicy with a budget of -1", "EINVAL", kInvalid, SetPolicy(negative_budget)},
      {"CreateIntent of size 0", "EINVAL", kInvalid, CreateIntent(zero_size)},
      {"ListIntents with a bad page token", "EINVAL", kInvalid,
       [this](grpc::ClientContext* context) {
         v1::ListIntentsRequest request;
         request.set_page_token("not-a-token");
         v1::ListIntentsResponse response;
         return admin_->ListIntents(context, request, &response);
       }},
      {"ListRegions with a bad page token", "EINVAL", kInvalid,
       [this](grpc::ClientContext* context) {
         v1::ListRegionsFleetRequest request;
         request.set_page_token("not-a-token");
         v1::ListRegionsFleetResponse response;
         return admin_->ListRegions(context, request, &response);
       }},
      {"ListDecisions with a bad page token", "EINVAL", kInvalid,
       [this](grpc::ClientContext* context) {
         v1::ListDecisionsRequest request;
         request.set_page_token("not-a-token");
         v1::ListDecisionsResponse response;
         return admin_->ListDecisions(context, request, &response);
       }},
      // --- Admin: unknown names
      {"GetPolicy of an unknown policy", "ENOENT", kNotFound,
       [this](grpc::ClientContext* context) {
         v1::GetPolicyRequest request;
         request.set_name("nope");
         v1::Policy response;
         return admin_->GetPolicy(context, request, &response);
       }},
      {"DeletePolicy of an unknown policy", "ENOENT", kNotFound,
       [this](grpc::ClientContext* context) {
         v1::DeletePolicyRequest request;
         request.set_name("nope");
         v1::DeletePolicyResponse response;
         return admin_->DeletePolicy(context, request, &response);
       }},
      {"CreateIntent for an unknown node", "ENOENT", kNotFound,
       CreateIntent(Register("nope", 0x40000000, kPage))},
      {"GetIntent of an unknown intent", "ENOENT", kNotFound,
       [this](grpc::ClientContext* context) {
         v1::GetIntentRequest request;
         request.set_id("i-nope");
         v1::Intent response;
         return admin_->GetIntent(context, request, &response);
       }},
      {"WithdrawIntent of an unknown intent", "ENOENT", kNotFound,
       [this](grpc::ClientContext* context) {
         v1::WithdrawIntentRequest request;
         request.set_id("i-nope");
         v1::Intent response;
         return admin_->WithdrawIntent(context, request, &response);
       }},
      {"GetNode of an unknown node", "ENOENT", kNotFound,
       [this](grpc::ClientContext* context) {
         v1::GetNodeRequest request;
         request.set_name("nope");
         v1::Node response;
         return admin_->GetNode(context, request, &response);
       }},
      {"CordonNode of an unknown node", "ENOENT", kNotFound,
       [this](grpc::ClientContext* context) {
         v1::CordonNodeRequest request;
         request.set_name("nope");
         v1::Node response;
         return admin_->CordonNode(context, request, &response);
       }},
      {"DrainNode of an unknown node", "ENOENT", kNotFound,
       [this](grpc::ClientContext* context) {
         v1::DrainNodeRequest request;
         request.set_name("nope");
         v1::Node response;
         return admin_->DrainNode(context, request, &response);
       }},
      {"GetRegion of an unknown region", "ENOENT", kNotFound,
       [this](grpc::ClientContext* context) {
         v1::GetRegionFleetRequest request;
         request.set_node("limits");
         request.set_context("vm-1");
         request.set_ua(0x70000000);
         request.set_size(kPage);
         v1::FleetRegion response;
         return admin_->GetRegion(context, request, &response);
       }},
      // --- Admin: policy refusals
      {"CreateIntent denied by a label rule", "EPERM", kDenied, CreateIntent(blocked)},
      {"CreateIntent over the pool budget", "ENOMEM", kExhausted,
       CreateIntent(Register("limits", 0x50000000, 4 * kMiB))},
      {"CreateIntent over the regions per node", "ENOSPC", kExhausted,
       CreateIntent(Register("limits", 0x50000000, kPage))},
      {"CreateIntent REGISTER on a cordoned node", "EBUSY", kPrecondition,
       [this](grpc::ClientContext* context) {
         grpc::ClientContext cordon_context;
         v1::CordonNodeRequest cordon;
         cordon.set_name("limits");
         v1::Node node;
         EXPECT_TRUE(admin_->CordonNode(&cordon_context, cordon, &node).ok());
         v1::CreateIntentResponse response;
         const grpc::Status status =
             admin_->CreateIntent(context, Register("limits", 0x40000000, kMiB / 2), &response);
         grpc::ClientContext uncordon_context;
         v1::UncordonNodeRequest uncordon;
         uncordon.set_name("limits");
         EXPECT_TRUE(admin_->UncordonNode(&uncordon_context, uncordon, &node).ok());
         return status;
       }},
      // --- Admin: streams
      {"WatchEvents beyond --max_watchers", "ENOSPC", kExhausted,
       [this](grpc::ClientContext* context) {
         std::unique_ptr<grpc::ClientReader<v1::Event>> reader =
             admin_->WatchEvents(context, v1::WatchEventsRequest());
         v1::Event event;
         while (reader->Read(&event)) {
         }
         return reader->Finish();
       }},
      {"Control.Connect without a Hello first", "EINVAL", kInvalid,
       [this](grpc::ClientContext* context) {
         auto stream = control_->Connect(context);
         v1::AgentMessage heartbeat;
         heartbeat.mutable_heartbeat()->set_sequence(1);
         stream->Write(heartbeat);
         stream->WritesDone();
         v1::ServerMessage message;
         while (stream->Read(&message)) {
         }
         return stream->Finish();
       }},
      // --- gRPC's own refusal: no errno
      {"an Admin request over --max_receive_message_bytes", kNoErrno, kExhausted,
       CreateIntent(oversized)},
      // --- NodeAgent
      {"CreateContext with a bad name", "EINVAL", kInvalid, create_context("vm 3", 0)},
      {"CreateContext of a taken name", "EEXIST", grpc::StatusCode::ALREADY_EXISTS,
       create_context("vm-1", 0)},
      {"RegisterRegion in an unknown context", "ENOENT", kNotFound,
       RegisterRegion("dev-2", "nope", 0x20000000, kMiB)},
      {"UnregisterRegion while DMA mappings remain", "EBUSY", kPrecondition,
       [this](grpc::ClientContext* context) {
         v1::UnregisterRegionRequest request;
         request.set_container("dev-1");
         request.set_ua(0x10000000);
         request.set_size(kMiB);
         v1::UnregisterRegionResponse response;
         return node_->UnregisterRegion(context, request, &response);
       }},
      {"RegisterRegion twice in one container", "EBUSY", kPrecondition,
       RegisterRegion("dev-1", "vm-1", 0x10000000, kMiB)},
      {"MapDma before any register", "EPERM", kDenied, MapDma("dev-idle", 0, 0x10000000, kPage)},
      {"RegisterRegion of a container bound to another context", "EPERM", kDenied,
       RegisterRegion("dev-1", "vm-2", 0x20000000, kPage)},
      {"RegisterRegion over the context's memlock limit", "ENOMEM", kExhausted,
       RegisterRegion("dev-2", "vm-2", 0x20000000, 2 * kMiB)},
      {"MapDma outside the DMA window", "ENXIO", kPrecondition,
       MapDma("dev-1", 32 * kMiB, 0x10000000, kPage)},
      {"Translate of an address no region covers", "EFAULT", grpc::StatusCode::OUT_OF_RANGE,
       [this](grpc::ClientContext* context) {
         v1::TranslateRequest request;
         request.set_context("vm-1");
         request.add_uas(0x60000000);
         v1::TranslateResponse response;
         return node_->Translate(context, request, &response);
       }},
      {"RegisterRegion over memory that cannot be pinned", "EFAULT", grpc::StatusCode::INTERNAL,
       RegisterRegion("dev-3", "vm-1", 0x30000000, kPage)},
      {"MapDma over TCP (DMA calls are the owning VMM's)", "EPERM", kDenied,
       [this](grpc::ClientContext* context) {
         v1::MapDmaRequest request;
         request.set_container("dev-1");
         request.set_iova(0x100000);
         request.set_ua(0x10000000);
         request.set_size(kPage);
         v1::MapDmaResponse response;
         return node_tcp_->MapDma(context, request, &response);
       }},
      {"CreateContext for another process over TCP", "EPERM", kDenied,
       [this](grpc::ClientContext* context) {
         v1::CreateContextRequest request;
         request.set_name("vm-other");
         request.set_owner_pid(1);
         v1::Context response;
         return node_tcp_->CreateContext(context, request, &response);
       }},
      {"AttachMemory on the sim backend (nothing to attach)", "EINVAL", kInvalid,
       [this](grpc::ClientContext* context) {
         v1::AttachMemoryRequest request;
         request.set_context("vm-1");
         request.add_slots()->set_size(kPage);
         v1::Context response;
         return node_->AttachMemory(context, request, &response);
       }},
      {"a NodeAgent request over --max_receive_message_bytes", kNoErrno, kExhausted,
       create_context(std::string(5 * kMiB, 'v'), 0)},
  };
  for (const ErrorCase& c : cases) Check(c, table);

  watch_context.TryCancel();
  v1::Event event;
  while (watcher->Read(&event)) {
  }
  watcher->Finish();
}

}  // namespace
}  // namespace dmapin

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  absl::ParseCommandLine(argc, argv);
  return RUN_ALL_TESTS();
}
