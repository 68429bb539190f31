// A libFuzzer target for the node agent's gRPC service (dmapin.v1.NodeAgent).
//
// Every input gets a fresh NodeAgent (sim backend, 4 KiB pages, no store: nothing durable, so
// nothing to clean up between inputs) behind a NodeAgentService, reached through an in-process
// gRPC channel: requests take the real path (serialization, the callback handlers, the errno
// trailers). The input is a sequence of records, one call each:
//
//   [method] [caller] [len lo] [len hi] [len bytes: the serialized request]
//
// `method` % kMethods picks the RPC (kMethodNames); the bytes are parsed as its request message
// (a record that does not parse is skipped). `caller` picks who the CallerResolver says is
// calling (Caller::Internal, Remote, or Local with one of a few pids and uids, one of them a
// manager), so the ownership checks are fuzzed too. At most kMaxRecords records of at most
// kMaxRequestBytes each.
//
// After every call the harness checks, and traps with a description when one fails:
//  - NodeAgent::CheckInvariants();
//  - the wire contract of README "Errors": an error's message starts with an errno name and a
//    colon, and the dmapin-errno trailer names the same errno (DmaSession: errno_name and the
//    message of the response);
//  - after the agent is destroyed, the backend has no page pinned.
// ASan and UBSan (run_service_fuzz.sh) catch the rest. tests/fuzz/make_service_seeds.py writes
// the seed corpus (tests/fuzz/corpus/agent_service/). AGENT_FUZZ_VERBOSE=1 prints every call.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "agent/node/node_agent.h"
#include "agent/registry/sim_backend.h"
#include "agent/service/node_agent_service.h"
#include "common/errno_status.h"
#include "common/grpc_status.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "grpcpp/grpcpp.h"

namespace dmapin::agent {
namespace {

constexpr int kMaxRecords = 48;
constexpr size_t kMaxRequestBytes = 1024;
constexpr uint64_t kPageSize = 4096;
constexpr uid_t kManagerUid = 4242;

// Small limits: registrations stay cheap for the sim backend, and the ENOMEM paths are reachable.
const RegistryLimits kLimits = {.max_region_bytes = 64 * kPageSize,
                                .max_pinned_bytes = 256 * kPageSize};

// The caller byte of the call in flight, for the resolver (which runs on gRPC's thread). Calls
// are made one at a time, so one variable is enough.
std::atomic<uint8_t> g_caller{0};

[[noreturn]] void Fail(const std::string& why) {
  std::fprintf(stderr, "agent_service_fuzz: %s\n", why.c_str());
  std::fflush(stderr);
  __builtin_trap();
}

// caller % 4: 0 the agent, 1 a TCP peer, 2-3 a local process: ourselves, our parent, init or a
// pid that does not exist, with uid root, the manager or an ordinary user.
Caller ResolveCaller(const std::string& /*peer*/) {
  const uint8_t b = g_caller.load(std::memory_order_acquire);
  switch (b % 4) {
    case 0:
      return Caller::Internal();
    case 1:
      return Caller::Remote();
    default: {
      const pid_t pids[] = {getpid(), getppid(), 1, 0x3ffffff0};
      const uid_t uids[] = {0, kManagerUid, 1000};
      return Caller::Local(pids[(b >> 2) % 4], uids[(b >> 4) % 3]);
    }
  }
}

// The README "Errors" contract for one failed status: "<ERRNO>: ..." with the same errno in
// `trailer` (nullptr: no trailer to compare, e.g. a DmaSession response).
void CheckError(absl::string_view method, int code, absl::string_view message,
                const std::string* trailer, absl::string_view errno_field) {
  const size_t colon = message.find(':');
  const absl::string_view name =
      colon == absl::string_view::npos ? absl::string_view() : message.substr(0, colon);
  if (name.empty() || !ErrnoFromName(name).has_value()) {
    Fail(
        absl::StrCat(method, ": error (code ", code, ") without an errno name: \"", message, "\""));
  }
  if (trailer != nullptr && *trailer != name) {
    Fail(absl::StrCat(method, ": trailer ", kErrnoTrailer, "=\"", *trailer, "\" but message \"",
                      message, "\""));
  }
  if (trailer == nullptr && errno_field != name) {
    Fail(absl::StrCat(method, ": errno_name \"", errno_field, "\" but message \"", message, "\""));
  }
}

class Harness {
 public:
  Harness() : verbose_(std::getenv("AGENT_FUZZ_VERBOSE") != nullptr) {
    absl::StatusOr<std::unique_ptr<SimBackend>> sim = SimBackend::Create({.page_size = kPageSize});
    if (!sim.ok()) Fail(absl::StrCat("SimBackend::Create: ", sim.status().ToString()));
    sim_ = std::move(*sim);
    absl::StatusOr<std::unique_ptr<NodeAgent>> agent =
        NodeAgent::Create({.node_name = "fuzz-node",
                           .backend = sim_.get(),
                           .limits = kLimits,
                           .max_translate_uas = 256,
                           .max_listed_hpas = 1024,
                           .manager_uids = {kManagerUid},
                           // No pidfd watches: no threads and no teardowns the input did not ask.
                           .watch_owners = false});
    if (!agent.ok()) Fail(absl::StrCat("NodeAgent::Create: ", agent.status().ToString()));
    agent_ = std::move(*agent);
    service_ = std::make_unique<NodeAgentService>(agent_.get(), nullptr, ResolveCaller);
    grpc::ServerBuilder builder;
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    if (server_ == nullptr) Fail("BuildAndStart failed");
    stub_ = v1::NodeAgent::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }

  ~Harness() {
    stub_.reset();
    server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
    service_.reset();
    agent_.reset();
    // Destroying the agent unpins everything its registry held.
    absl::StatusOr<uint64_t> left = sim_->TotalPinnedPages();
    if (!left.ok() || *left != 0) {
      Fail(absl::StrCat("pages still pinned after ~NodeAgent: ",
                        left.ok() ? absl::StrCat(*left) : left.status().ToString()));
    }
  }

  // One call.
  void Step(uint8_t method, uint8_t caller, absl::string_view bytes) {
    g_caller.store(caller, std::memory_order_release);
    switch (method % 18) {
      case 0:
        Call<v1::CreateContextRequest, v1::Context>("CreateContext",
                                                    &v1::NodeAgent::Stub::CreateContext, bytes);
        break;
      case 1:
        Call<v1::GetContextRequest, v1::Context>("GetContext", &v1::NodeAgent::Stub::GetContext,
                                                 bytes);
        break;
      case 2:
        Call<v1::ListContextsRequest, v1::ListContextsResponse>(
            "ListContexts", &v1::NodeAgent::Stub::ListContexts, bytes);
        break;
      case 3:
        Call<v1::TeardownContextRequest, v1::TeardownContextResponse>(
            "TeardownContext", &v1::NodeAgent::Stub::TeardownContext, bytes);
        break;
      case 4:
        Call<v1::AttachMemoryRequest, v1::Context>("AttachMemory",
                                                   &v1::NodeAgent::Stub::AttachMemory, bytes);
        break;
      case 5:
        Call<v1::CreateContainerRequest, v1::Container>(
            "CreateContainer", &v1::NodeAgent::Stub::CreateContainer, bytes);
        break;
      case 6:
        Call<v1::GetContainerRequest, v1::Container>("GetContainer",
                                                     &v1::NodeAgent::Stub::GetContainer, bytes);
        break;
      case 7:
        Call<v1::ListContainersRequest, v1::ListContainersResponse>(
            "ListContainers", &v1::NodeAgent::Stub::ListContainers, bytes);
        break;
      case 8:
        Call<v1::ReleaseContainerRequest, v1::ReleaseContainerResponse>(
            "ReleaseContainer", &v1::NodeAgent::Stub::ReleaseContainer, bytes);
        break;
      case 9:
        Call<v1::RegisterRegionRequest, v1::Region>("RegisterRegion",
                                                    &v1::NodeAgent::Stub::RegisterRegion, bytes);
        break;
      case 10:
        Call<v1::UnregisterRegionRequest, v1::UnregisterRegionResponse>(
            "UnregisterRegion", &v1::NodeAgent::Stub::UnregisterRegion, bytes);
        break;
      case 11:
        Call<v1::MapDmaRequest, v1::MapDmaResponse>("MapDma", &v1::NodeAgent::Stub::MapDma, bytes);
        break;
      case 12:
        Call<v1::UnmapDmaRequest, v1::UnmapDmaResponse>("UnmapDma", &v1::NodeAgent::Stub::UnmapDma,
                                                        bytes);
        break;
      case 13:
        Session(bytes);
        break;
      case 14:
        Call<v1::TranslateRequest, v1::TranslateResponse>("Translate",
                                                          &v1::NodeAgent::Stub::Translate, bytes);
        break;
      case 15:
        Call<v1::LookupRequest, v1::LookupResponse>("Lookup", &v1::NodeAgent::Stub::Lookup, bytes);
        break;
      case 16:
        Call<v1::ListRegionsRequest, v1::ListRegionsResponse>(
            "ListRegions", &v1::NodeAgent::Stub::ListRegions, bytes);
        break;
      default:
        Call<v1::GetNodeStatusRequest, v1::NodeStatus>("GetNodeStatus",
                                                       &v1::NodeAgent::Stub::GetNodeStatus, bytes);
        break;
    }
  }

 private:
  template <typename Request, typename Response>
  void Call(const char* method,
            grpc::Status (v1::NodeAgent::Stub::*rpc)(grpc::ClientContext*, const Request&,
                                                     Response*),
            absl::string_view bytes) {
    Request request;
    if (!request.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) return;
    grpc::ClientContext context;
    Response response;
    const grpc::Status status = (stub_.get()->*rpc)(&context, request, &response);
    Log(method, request.ShortDebugString(), status.error_message());
    if (!status.ok()) {
      auto it = context.GetServerTrailingMetadata().find(kErrnoTrailer);
      const std::string trailer = it == context.GetServerTrailingMetadata().end()
                                      ? "(none)"
                                      : std::string(it->second.data(), it->second.size());
      CheckError(method, status.error_code(), status.error_message(), &trailer, "");
    }
    CheckAgent(method);
  }

  // One DmaSession stream carrying the one request (the unary paths' twin).
  void Session(absl::string_view bytes) {
    v1::DmaSessionRequest request;
    if (!request.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) return;
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReaderWriter<v1::DmaSessionRequest, v1::DmaSessionResponse>>
        stream = stub_->DmaSession(&context);
    v1::DmaSessionResponse response;
    const bool written = stream->Write(request);
    const bool read = written && stream->Read(&response);
    stream->WritesDone();
    const grpc::Status status = stream->Finish();
    Log("DmaSession", request.ShortDebugString(), response.ShortDebugString());
    if (!status.ok()) Fail(absl::StrCat("DmaSession ended with ", status.error_message()));
    if (!read) Fail("DmaSession: no response to a request");
    if (response.tag() != request.tag()) Fail("DmaSession: response tag differs");
    if (response.code() != 0) {
      CheckError("DmaSession", response.code(), response.message(), nullptr, response.errno_name());
    }
    CheckAgent("DmaSession");
  }

  void CheckAgent(const char* method) {
    const absl::Status invariants = agent_->CheckInvariants();
    if (!invariants.ok()) {
      Fail(absl::StrCat("after ", method, ": CheckInvariants: ", invariants.ToString()));
    }
  }

  void Log(const char* method, const std::string& request, const std::string& answer) {
    if (!verbose_) return;
    std::fprintf(stderr, "  caller=%u %s {%s} -> %s\n", g_caller.load(), method, request.c_str(),
                 answer.empty() ? "OK" : answer.c_str());
  }

  const bool verbose_;
  std::unique_ptr<SimBackend> sim_;
  std::unique_ptr<NodeAgent> agent_;
  std::unique_ptr<NodeAgentService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::NodeAgent::Stub> stub_;
};

}  // namespace
}  // namespace dmapin::agent

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Requests with invalid UTF-8 in string fields do not parse, and protobuf logs each one.
  static const bool quiet = [] {
    google::protobuf::SetLogHandler(nullptr);
    return true;
  }();
  (void)quiet;
  dmapin::agent::Harness harness;
  size_t pos = 0;
  for (int i = 0; i < dmapin::agent::kMaxRecords && pos + 4 <= size; ++i) {
    const uint8_t method = data[pos];
    const uint8_t caller = data[pos + 1];
    size_t len = data[pos + 2] | (size_t{data[pos + 3]} << 8);
    pos += 4;
    len = std::min({len, dmapin::agent::kMaxRequestBytes, size - pos});
    harness.Step(method, caller, absl::string_view(reinterpret_cast<const char*>(data + pos), len));
    pos += len;
  }
  return 0;
}
