// A libFuzzer target for the central service's gRPC handlers: the Admin service
// (dmapin.v1.Admin) and the Control stream handler (dmapin.v1.Control/Connect).
//
// Every input gets a fresh ServerCore on a SqliteServerStore in a new directory under $TMPDIR,
// behind AdminService and ControlService, reached through an in-process gRPC channel. The
// reconcile loop's own passes are pushed out of reach (reconcile_interval of an hour): passes run
// only when the input asks (ReconcileNow), so a run depends on its input alone. The input is a
// sequence of records, one step each:
//
//   [method] [arg] [len lo] [len hi] [len bytes: a serialized message]
//
// method % 20: 0-15 an Admin call, the bytes parsed as its request (kAdmin order below; a
// record that does not parse is skipped); 16 ServerCore::ReconcileNow(); 17 an AgentMessage on
// Control stream arg % 2 (opened on first use, so two streams may claim one node); 18 closes
// stream arg % 2; 19 a DecisionResult sent on stream arg % 2, answering the last decision that
// stream received when its decision_id is empty. An intent id "$" (GetIntent, WithdrawIntent)
// stands for the last intent CreateIntent answered. At most kMaxRecords records of at most
// kMaxRequestBytes each.
//
// Checks (a failure prints why and traps):
//  - every Admin error, and every end of a Control stream that is not OK, follows README
//    "Errors": the message starts with an errno name and a colon, and the dmapin-errno trailer
//    names the same errno; a call that hangs (5 s deadline) fails the same check;
//  - at the end of the input: every intent ListIntents pages through answers GetIntent with the
//    same intent, every node ListNodes lists answers GetNode;
//  - what was acknowledged is durable: after the core is destroyed and created again on the same
//    store, ListPolicies is the same, and ListIntents lists the same intents (ids, kinds, nodes,
//    ranges) in the same order.
// ASan and UBSan (run_service_fuzz.sh) catch the rest. tests/fuzz/make_service_seeds.py writes
// the seed corpus (tests/fuzz/corpus/server_service/). SERVER_FUZZ_VERBOSE=1 prints every step.
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/errno_status.h"
#include "common/grpc_status.h"
#include "dmapin/v1/admin.grpc.pb.h"
#include "dmapin/v1/control.grpc.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "grpcpp/grpcpp.h"
#include "server/core/server_core.h"
#include "server/service/admin_service.h"
#include "server/service/control_service.h"
#include "server/store/sqlite_server_store.h"

namespace dmapin::server {
namespace {

constexpr int kMaxRecords = 48;
constexpr size_t kMaxRequestBytes = 1024;
// How long a step may take before the harness calls it hung.
constexpr absl::Duration kStepDeadline = absl::Seconds(5);

bool Verbose() {
  static const bool verbose = std::getenv("SERVER_FUZZ_VERBOSE") != nullptr;
  return verbose;
}

[[noreturn]] void Fail(const std::string& why) {
  std::fprintf(stderr, "server_service_fuzz: %s\n", why.c_str());
  std::fflush(stderr);
  __builtin_trap();
}

std::string TrailerOf(const grpc::ClientContext& context) {
  auto it = context.GetServerTrailingMetadata().find(kErrnoTrailer);
  if (it == context.GetServerTrailingMetadata().end()) return "(none)";
  return std::string(it->second.data(), it->second.size());
}

// README "Errors" for one finished call.
void CheckStatus(absl::string_view what, const grpc::Status& status,
                 const grpc::ClientContext& context) {
  if (status.ok()) return;
  const std::string& message = status.error_message();
  const size_t colon = message.find(':');
  const std::string name = colon == std::string::npos ? "" : message.substr(0, colon);
  if (name.empty() || !ErrnoFromName(name).has_value()) {
    Fail(absl::StrCat(what, ": error (code ", status.error_code(), ") without an errno name: \"",
                      message, "\""));
  }
  const std::string trailer = TrailerOf(context);
  if (trailer != name) {
    Fail(absl::StrCat(what, ": trailer ", kErrnoTrailer, "=\"", trailer, "\" but message \"",
                      message, "\""));
  }
}

void SetDeadline(grpc::ClientContext* context) {
  context->set_deadline(std::chrono::system_clock::now() +
                        absl::ToChronoMilliseconds(kStepDeadline));
}

// One Control stream as an agent sees it: the harness writes, a reader thread collects what the
// server sends until the stream ends.
class AgentStream {
 public:
  explicit AgentStream(v1::Control::Stub* stub) : stream_(stub->Connect(&context_)) {
    reader_ = std::thread([this] { ReadAll(); });
  }
  ~AgentStream() {
    if (reader_.joinable()) Close("~AgentStream");
  }

  bool Write(const v1::AgentMessage& message) { return stream_->Write(message); }

  // Half-closes, waits for the end and checks its status.
  void Close(absl::string_view what) {
    stream_->WritesDone();
    reader_.join();
    CheckStatus(what, stream_->Finish(), context_);
  }

  // Waits until `n` Welcomes came or the stream ended; false on a timeout.
  bool AwaitWelcomesOrEnd(uint64_t n) {
    absl::MutexLock lock(&mu_);
    const auto done = [this, n]()
                          ABSL_NO_THREAD_SAFETY_ANALYSIS { return ended_ || welcomes_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&done), kStepDeadline);
  }
  bool AwaitEnd() { return AwaitWelcomesOrEnd(UINT64_MAX); }

  uint64_t welcomes() const {
    absl::MutexLock lock(&mu_);
    return welcomes_;
  }
  bool ended() const {
    absl::MutexLock lock(&mu_);
    return ended_;
  }
  // The last decision received (empty id: none).
  v1::Decision last_decision() const {
    absl::MutexLock lock(&mu_);
    return last_decision_;
  }

  std::string node;  // of the last Hello written

 private:
  void ReadAll() {
    v1::ServerMessage message;
    while (stream_->Read(&message)) {
      absl::MutexLock lock(&mu_);
      if (message.has_welcome()) ++welcomes_;
      if (message.has_decision()) last_decision_ = message.decision();
    }
    absl::MutexLock lock(&mu_);
    ended_ = true;
  }

  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AgentMessage, v1::ServerMessage>> stream_;
  std::thread reader_;
  mutable absl::Mutex mu_;
  uint64_t welcomes_ ABSL_GUARDED_BY(mu_) = 0;
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  v1::Decision last_decision_ ABSL_GUARDED_BY(mu_);
};

class Harness {
 public:
  Harness() {
    const char* tmp = std::getenv("TMPDIR");
    std::string dir = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/server_fuzz.XXXXXX");
    if (mkdtemp(dir.data()) == nullptr) Fail("mkdtemp failed");
    dir_ = dir;
    Open();
  }

  ~Harness() {
    Close();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  void Step(uint8_t method, uint8_t arg, absl::string_view bytes) {
    switch (method % 20) {
      case 0:
        Call<v1::SetPolicyRequest, v1::Policy>("SetPolicy", &v1::Admin::Stub::SetPolicy, bytes);
        break;
      case 1:
        Call<v1::GetPolicyRequest, v1::Policy>("GetPolicy", &v1::Admin::Stub::GetPolicy, bytes);
        break;
      case 2:
        Call<v1::ListPoliciesRequest, v1::ListPoliciesResponse>(
            "ListPolicies", &v1::Admin::Stub::ListPolicies, bytes);
        break;
      case 3:
        Call<v1::DeletePolicyRequest, v1::DeletePolicyResponse>(
            "DeletePolicy", &v1::Admin::Stub::DeletePolicy, bytes);
        break;
      case 4:
        Call<v1::CreateIntentRequest, v1::CreateIntentResponse>(
            "CreateIntent", &v1::Admin::Stub::CreateIntent, bytes);
        break;
      case 5:
        Call<v1::GetIntentRequest, v1::Intent>("GetIntent", &v1::Admin::Stub::GetIntent, bytes);
        break;
      case 6:
        Call<v1::ListIntentsRequest, v1::ListIntentsResponse>("ListIntents",
                                                              &v1::Admin::Stub::ListIntents, bytes);
        break;
      case 7:
        Call<v1::WithdrawIntentRequest, v1::Intent>("WithdrawIntent",
                                                    &v1::Admin::Stub::WithdrawIntent, bytes);
        break;
      case 8:
        Call<v1::ListNodesRequest, v1::ListNodesResponse>("ListNodes", &v1::Admin::Stub::ListNodes,
                                                          bytes);
        break;
      case 9:
        Call<v1::GetNodeRequest, v1::Node>("GetNode", &v1::Admin::Stub::GetNode, bytes);
        break;
      case 10:
        Call<v1::CordonNodeRequest, v1::Node>("CordonNode", &v1::Admin::Stub::CordonNode, bytes);
        break;
      case 11:
        Call<v1::UncordonNodeRequest, v1::Node>("UncordonNode", &v1::Admin::Stub::UncordonNode,
                                                bytes);
        break;
      case 12:
        Call<v1::DrainNodeRequest, v1::Node>("DrainNode", &v1::Admin::Stub::DrainNode, bytes);
        break;
      case 13:
        Call<v1::ListRegionsFleetRequest, v1::ListRegionsFleetResponse>(
            "ListRegions", &v1::Admin::Stub::ListRegions, bytes);
        break;
      case 14:
        Call<v1::GetRegionFleetRequest, v1::FleetRegion>("GetRegion", &v1::Admin::Stub::GetRegion,
                                                         bytes);
        break;
      case 15:
        Call<v1::ListDecisionsRequest, v1::ListDecisionsResponse>(
            "ListDecisions", &v1::Admin::Stub::ListDecisions, bytes);
        break;
      case 16:
        if (Verbose()) std::fprintf(stderr, "  ReconcileNow\n");
        core_->ReconcileNow();
        break;
      case 17: {
        v1::AgentMessage message;
        if (!message.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) return;
        Send(arg % 2, message);
        break;
      }
      case 18:
        CloseStream(arg % 2, "Control stream close");
        break;
      default: {
        v1::AgentMessage message;
        if (!message.mutable_result()->ParseFromArray(bytes.data(),
                                                      static_cast<int>(bytes.size()))) {
          return;
        }
        if (message.result().decision_id().empty() && streams_[arg % 2] != nullptr) {
          const v1::Decision last = streams_[arg % 2]->last_decision();
          message.mutable_result()->set_decision_id(last.id());
          if (message.result().epoch() == 0) message.mutable_result()->set_epoch(last.epoch());
        }
        Send(arg % 2, message);
        break;
      }
    }
  }

  // The end-of-input checks (see the file comment).
  void Finish() {
    for (int s = 0; s < 2; ++s) CloseStream(s, "Control stream close");
    const std::vector<v1::Intent> intents = AllIntents();
    for (const v1::Intent& intent : intents) {
      grpc::ClientContext context;
      SetDeadline(&context);
      v1::GetIntentRequest request;
      request.set_id(intent.id());
      v1::Intent got;
      const grpc::Status status = admin_->GetIntent(&context, request, &got);
      if (!status.ok())
        Fail(absl::StrCat("listed intent ", intent.id(), ": GetIntent ", status.error_message()));
      if (got.SerializeAsString() != intent.SerializeAsString()) {
        Fail(absl::StrCat("GetIntent ", intent.id(), " differs from ListIntents:\n  ",
                          got.ShortDebugString(), "\n  ", intent.ShortDebugString()));
      }
    }
    const std::vector<v1::Node> nodes = AllNodes();
    for (const v1::Node& node : nodes) {
      grpc::ClientContext context;
      SetDeadline(&context);
      v1::GetNodeRequest request;
      request.set_name(node.name());
      v1::Node got;
      const grpc::Status status = admin_->GetNode(&context, request, &got);
      if (!status.ok())
        Fail(absl::StrCat("listed node ", node.name(), ": GetNode ", status.error_message()));
    }

    // Durability: a new core on the same store sees what the old one acknowledged.
    const std::vector<v1::Policy> policies = AllPolicies();
    Close();
    Open();
    const std::vector<v1::Policy> policies_after = AllPolicies();
    if (Describe(policies) != Describe(policies_after)) {
      Fail(absl::StrCat("policies differ after a restart:\n", Describe(policies), "\nvs\n",
                        Describe(policies_after)));
    }
    const std::vector<v1::Intent> intents_after = AllIntents();
    if (Describe(intents) != Describe(intents_after)) {
      Fail(absl::StrCat("intents differ after a restart:\n", Describe(intents), "\nvs\n",
                        Describe(intents_after)));
    }
  }

 private:
  void Open() {
    absl::StatusOr<std::unique_ptr<SqliteServerStore>> store = SqliteServerStore::Open(dir_);
    if (!store.ok()) Fail(absl::StrCat("SqliteServerStore::Open: ", store.status().ToString()));
    store_ = std::move(*store);
    ServerCoreOptions options;
    options.store = store_.get();
    options.reconcile_interval = absl::Hours(1);
    options.prune_interval = absl::Hours(1);
    options.random_seed = 1;
    options.list_nodes_chunk = 3;  // several chunks with a few nodes
    absl::StatusOr<std::unique_ptr<ServerCore>> core = ServerCore::Create(options);
    if (!core.ok()) Fail(absl::StrCat("ServerCore::Create: ", core.status().ToString()));
    core_ = std::move(*core);
    admin_service_ = std::make_unique<AdminService>(core_.get());
    control_service_ = std::make_unique<ControlService>(core_.get());
    grpc::ServerBuilder builder;
    builder.RegisterService(admin_service_.get());
    builder.RegisterService(control_service_.get());
    server_ = builder.BuildAndStart();
    if (server_ == nullptr) Fail("BuildAndStart failed");
    std::shared_ptr<grpc::Channel> channel = server_->InProcessChannel(grpc::ChannelArguments());
    admin_ = v1::Admin::NewStub(channel);
    control_ = v1::Control::NewStub(channel);
  }

  void Close() {
    for (std::unique_ptr<AgentStream>& stream : streams_) stream.reset();
    current_.clear();
    admin_.reset();
    control_.reset();
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
    control_service_.reset();
    admin_service_.reset();
    core_.reset();
    store_.reset();
  }

  template <typename Request, typename Response>
  void Call(const char* method,
            grpc::Status (v1::Admin::Stub::*rpc)(grpc::ClientContext*, const Request&, Response*),
            absl::string_view bytes) {
    Request request;
    if (!request.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) return;
    if constexpr (std::is_same_v<Request, v1::GetIntentRequest> ||
                  std::is_same_v<Request, v1::WithdrawIntentRequest>) {
      if (request.id() == "$") request.set_id(last_intent_id_);
    }
    grpc::ClientContext context;
    SetDeadline(&context);
    Response response;
    const grpc::Status status = (admin_.get()->*rpc)(&context, request, &response);
    if (Verbose()) {
      std::fprintf(stderr, "  %s {%s} -> %s\n", method, request.ShortDebugString().c_str(),
                   status.ok() ? "OK" : status.error_message().c_str());
    }
    CheckStatus(method, status, context);
    if constexpr (std::is_same_v<Response, v1::CreateIntentResponse>) {
      if (status.ok() && !response.intent().id().empty()) last_intent_id_ = response.intent().id();
    }
  }

  // Writes `message` on stream `s` (a new one if there is none or it ended) and waits until the
  // server has handled it, where the stream lets the harness tell.
  void Send(int s, const v1::AgentMessage& message) {
    if (streams_[s] != nullptr && streams_[s]->ended()) CloseStream(s, "Control stream end");
    if (streams_[s] == nullptr) streams_[s] = std::make_unique<AgentStream>(control_.get());
    AgentStream& stream = *streams_[s];
    if (Verbose()) {
      std::fprintf(stderr, "  stream %d: %s\n", s, message.ShortDebugString().c_str());
    }
    const uint64_t welcomes = stream.welcomes();
    const ServerCounters before = core_->MetricsSnapshot(0).counters;
    const uint64_t received = before.stream_messages_received;
    if (!stream.Write(message)) return;  // the server ended the stream already
    if (message.has_hello()) {
      // Answered with a Welcome, or (a second Hello, no node name) by the end of the stream.
      if (!stream.AwaitWelcomesOrEnd(welcomes + 1)) Fail("Control: a Hello got no answer");
      if (stream.ended()) {
        AwaitDisconnect(s, before.agent_disconnects);
      } else {
        stream.node = message.hello().node_name();
        current_[stream.node] = s;
      }
    } else if (welcomes == 0) {
      // Not a Hello first: the server ends the stream (EINVAL).
      if (!stream.AwaitEnd()) Fail("Control: a stream that did not start with Hello goes on");
    } else if (auto it = current_.find(stream.node); it != current_.end() && it->second == s) {
      // The node's current session: the core counts the message once it has handled it.
      const absl::Time deadline = absl::Now() + kStepDeadline;
      while (core_->MetricsSnapshot(0).counters.stream_messages_received == received &&
             !stream.ended()) {
        if (absl::Now() > deadline) Fail("Control: a message was not handled in time");
        std::this_thread::yield();
      }
    }
    // Else a replaced session's message, which the core ignores: nothing to wait for.
  }

  // Whether stream `s` is its node's current session in the core.
  bool IsCurrent(int s) const {
    if (streams_[s] == nullptr || streams_[s]->welcomes() == 0) return false;
    auto it = current_.find(streams_[s]->node);
    return it != current_.end() && it->second == s;
  }

  // Stream `s` ended: when it was its node's current session, waits until the core has seen the
  // end (the reactor's OnDone runs after the client's Finish returns), so the next step sees the
  // node disconnected.
  void AwaitDisconnect(int s, uint64_t disconnects_before) {
    if (!IsCurrent(s)) return;
    const absl::Time deadline = absl::Now() + kStepDeadline;
    while (core_->MetricsSnapshot(0).counters.agent_disconnects == disconnects_before) {
      if (absl::Now() > deadline) Fail("Control: the end of a stream was not seen in time");
      std::this_thread::yield();
    }
    current_.erase(streams_[s]->node);
  }

  void CloseStream(int s, absl::string_view what) {
    if (streams_[s] == nullptr) return;
    if (Verbose()) std::fprintf(stderr, "  stream %d: close\n", s);
    const uint64_t disconnects = core_->MetricsSnapshot(0).counters.agent_disconnects;
    streams_[s]->Close(what);
    AwaitDisconnect(s, disconnects);
    streams_[s].reset();
  }

  std::vector<v1::Intent> AllIntents() {
    std::vector<v1::Intent> all;
    v1::ListIntentsRequest request;
    request.set_page_size(1000);
    for (int page = 0; page < 1000; ++page) {
      grpc::ClientContext context;
      SetDeadline(&context);
      v1::ListIntentsResponse response;
      const grpc::Status status = admin_->ListIntents(&context, request, &response);
      if (!status.ok()) Fail(absl::StrCat("ListIntents: ", status.error_message()));
      all.insert(all.end(), response.intents().begin(), response.intents().end());
      if (response.next_page_token().empty()) return all;
      request.set_page_token(response.next_page_token());
    }
    Fail("ListIntents: more than 1000 pages");
  }

  std::vector<v1::Node> AllNodes() {
    grpc::ClientContext context;
    SetDeadline(&context);
    v1::ListNodesResponse response;
    const grpc::Status status = admin_->ListNodes(&context, v1::ListNodesRequest(), &response);
    if (!status.ok()) Fail(absl::StrCat("ListNodes: ", status.error_message()));
    return {response.nodes().begin(), response.nodes().end()};
  }

  std::vector<v1::Policy> AllPolicies() {
    grpc::ClientContext context;
    SetDeadline(&context);
    v1::ListPoliciesResponse response;
    const grpc::Status status =
        admin_->ListPolicies(&context, v1::ListPoliciesRequest(), &response);
    if (!status.ok()) Fail(absl::StrCat("ListPolicies: ", status.error_message()));
    return {response.policies().begin(), response.policies().end()};
  }

  static std::string Describe(const std::vector<v1::Policy>& policies) {
    std::string out;
    for (const v1::Policy& p : policies) absl::StrAppend(&out, "  ", p.ShortDebugString(), "\n");
    return out;
  }
  // The fields of an intent a restart must keep (its state may move on: in-flight decisions are
  // re-evaluated).
  static std::string Describe(const std::vector<v1::Intent>& intents) {
    std::string out;
    for (const v1::Intent& i : intents) {
      absl::StrAppend(&out, "  ", i.id(), " ", v1::IntentKind_Name(i.kind()), " node=", i.node(),
                      " ctx=", i.context(), " ctr=", i.container(), " ua=", i.ua(),
                      " size=", i.size(), "\n");
    }
    return out;
  }

  std::string dir_;
  std::unique_ptr<SqliteServerStore> store_;
  std::unique_ptr<ServerCore> core_;
  std::unique_ptr<AdminService> admin_service_;
  std::unique_ptr<ControlService> control_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Admin::Stub> admin_;
  std::unique_ptr<v1::Control::Stub> control_;
  std::unique_ptr<AgentStream> streams_[2];
  // Node -> the stream whose Hello made the node's current session.
  std::map<std::string, int> current_;
  std::string last_intent_id_;
};

}  // namespace
}  // namespace dmapin::server

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Requests with invalid UTF-8 in string fields do not parse, and protobuf logs each one.
  static const bool quiet = [] {
    google::protobuf::SetLogHandler(nullptr);
    return true;
  }();
  (void)quiet;
  dmapin::server::Harness harness;
  size_t pos = 0;
  for (int i = 0; i < dmapin::server::kMaxRecords && pos + 4 <= size; ++i) {
    const uint8_t method = data[pos];
    const uint8_t arg = data[pos + 1];
    size_t len = data[pos + 2] | (size_t{data[pos + 3]} << 8);
    pos += 4;
    len = std::min({len, dmapin::server::kMaxRequestBytes, size - pos});
    harness.Step(method, arg, absl::string_view(reinterpret_cast<const char*>(data + pos), len));
    pos += len;
  }
  harness.Finish();
  return 0;
}
