#include "agent/service/node_agent_service.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "agent/service/proto_convert.h"
#include "agent/service/version.h"
#include "common/errno_status.h"
#include "common/grpc_status.h"

namespace dmapin::agent {

void NodeAgentService::Record(RpcMethod method, AgentMetrics::Clock::time_point start,
                              const absl::Status& status) {
  if (metrics_ != nullptr) {
    metrics_->RecordRpc(method, AgentMetrics::Clock::now() - start,
                        status.ok() ? 0 : ErrnoOf(status));
  }
}

// Every error on the wire names an errno (README "Errors"), one from below that carries none too
// (an internal failure nothing classified): WithErrno makes it EIO.
grpc::ServerUnaryReactor* NodeAgentService::Finish(grpc::CallbackServerContext* context,
                                                   const absl::Status& status, RpcMethod method,
                                                   AgentMetrics::Clock::time_point start) {
  const absl::Status named = WithErrno(status);
  Record(method, start, named);
  return FinishUnary(context, named);
}

Caller NodeAgentService::CallerOf(grpc::CallbackServerContext* context) const {
  if (resolve_caller_ == nullptr) return Caller::Remote();
  return resolve_caller_(context->peer());
}

absl::Status NodeAgentService::Authorize(grpc::CallbackServerContext* context,
                                         absl::string_view method) const {
  if (authorize_ == nullptr) return absl::OkStatus();
  return authorize_(context, method);
}

absl::Status NodeAgentService::Serve(const v1::MapDmaRequest& request, const Caller& caller) {
  const AgentMetrics::Clock::time_point start = Start();
  absl::Status status = WithErrno(
      agent_->MapDma(request.container(), request.iova(), request.ua(), request.size(), caller));
  Record(RpcMethod::kMapDma, start, status);
  return status;
}

absl::Status NodeAgentService::Serve(const v1::UnmapDmaRequest& request, const Caller& caller) {
  const AgentMetrics::Clock::time_point start = Start();
  absl::Status status =
      WithErrno(agent_->UnmapDma(request.container(), request.iova(), request.size(), caller));
  Record(RpcMethod::kUnmapDma, start, status);
  return status;
}

// One DmaSession stream: reads a request, serves it, writes its response, reads the next. One
// request at a time keeps the responses in order without a queue; a client wanting more in
// flight opens more streams.
class NodeAgentService::DmaSessionReactor final
    : public grpc::ServerBidiReactor<v1::DmaSessionRequest, v1::DmaSessionResponse> {
 public:
  // The caller is the stream's: one connection, one peer.
  DmaSessionReactor(NodeAgentService* service, Caller caller) : service_(service), caller_(caller) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The client closed its side (or the call was cancelled): nothing is half-served.
      Finish(grpc::Status::OK);
      return;
    }
    absl::Status status;
    switch (request_.op_case()) {
      case v1::DmaSessionRequest::kMap:
        status = service_->Serve(request_.map(), caller_);
        break;
      case v1::DmaSessionRequest::kUnmap:
        status = service_->Serve(request_.unmap(), caller_);
        break;
      default:
        status = ErrnoStatus(EINVAL, absl::StrCat("DmaSession request tag ", request_.tag(),
                                                  " has neither map nor unmap"));
        break;
    }
    response_.Clear();
    response_.set_tag(request_.tag());
    if (!status.ok()) {
      response_.set_code(static_cast<int32_t>(status.code()));
      if (status.GetPayload(kErrnoPayloadUrl).has_value()) {
        response_.set_errno_name(ErrnoName(ErrnoOf(status)));
      }
      response_.set_message(std::string(status.message()));
    }
    StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "DmaSession: the response could not be "
                          "sent (the client went away)"));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  NodeAgentService* const service_;
  const Caller caller_;
  v1::DmaSessionRequest request_;
  v1::DmaSessionResponse response_;
};

namespace {

// A DmaSession refused before it started.
class RefusedDmaSession final
    : public grpc::ServerBidiReactor<v1::DmaSessionRequest, v1::DmaSessionResponse> {
 public:
  RefusedDmaSession(grpc::CallbackServerContext* context, const absl::Status& status) {
    Finish(ServerStatus(context, status));
  }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerBidiReactor<v1::DmaSessionRequest, v1::DmaSessionResponse>*
NodeAgentService::DmaSession(grpc::CallbackServerContext* context) {
  if (absl::Status denied = Authorize(context, "NodeAgent.DmaSession"); !denied.ok()) {
    return new RefusedDmaSession(context, denied);
  }
  return new DmaSessionReactor(this, CallerOf(context));
}

grpc::ServerUnaryReactor* NodeAgentService::CreateContext(grpc::CallbackServerContext* context,
                                                          const v1::CreateContextRequest* request,
                                                          v1::Context* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.CreateContext"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kCreateContext, start);
  }
  ContextSpec spec{.name = request->name(),
                   .cap_ipc_lock = request->cap_ipc_lock(),
                   .backing = FromProto(request->backing()),
                   .memory_bytes = request->memory_bytes()};
  if (!request->memlock_unlimited()) spec.memlock_limit_bytes = request->memlock_limit_bytes();
  if (request->owner_pid() < 0 || request->owner_pid() > std::numeric_limits<pid_t>::max()) {
    return Finish(
        context,
        ErrnoStatus(EINVAL, absl::StrCat("owner_pid ", request->owner_pid(), " is not a pid")),
        RpcMethod::kCreateContext, start);
  }
  spec.owner_pid = static_cast<pid_t>(request->owner_pid());
  absl::StatusOr<ContextView> view = agent_->CreateContext(spec, CallerOf(context));
  if (view.ok()) Fill(*view, response);
  return Finish(context, view.status(), RpcMethod::kCreateContext, start);
}

grpc::ServerUnaryReactor* NodeAgentService::GetContext(grpc::CallbackServerContext* context,
                                                       const v1::GetContextRequest* request,
                                                       v1::Context* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.GetContext"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kGetContext, start);
  }
  absl::StatusOr<ContextView> view = agent_->GetContext(request->name());
  if (view.ok()) Fill(*view, response);
  return Finish(context, view.status(), RpcMethod::kGetContext, start);
}

grpc::ServerUnaryReactor* NodeAgentService::ListContexts(grpc::CallbackServerContext* context,
                                                         const v1::ListContextsRequest*,
                                                         v1::ListContextsResponse* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.ListContexts"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kListContexts, start);
  }
  for (const ContextView& view : agent_->ListContexts()) Fill(view, response->add_contexts());
  return Finish(context, absl::OkStatus(), RpcMethod::kListContexts, start);
}

grpc::ServerUnaryReactor* NodeAgentService::TeardownContext(
    grpc::CallbackServerContext* context, const v1::TeardownContextRequest* request,
    v1::TeardownContextResponse*) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.TeardownContext"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kTeardownContext, start);
  }
  return Finish(context, agent_->TeardownContext(request->name(), nullptr, CallerOf(context)),
                RpcMethod::kTeardownContext, start);
}

grpc::ServerUnaryReactor* NodeAgentService::AttachMemory(grpc::CallbackServerContext* context,
                                                         const v1::AttachMemoryRequest* request,
                                                         v1::Context* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.AttachMemory"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kAttachMemory, start);
  }
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  ranges.reserve(std::min<size_t>(request->slots_size(), GuestMemory::kMaxSlots + 1));
  for (const v1::MemorySlot& slot : request->slots()) {
    if (ranges.size() > GuestMemory::kMaxSlots) break;  // Attach refuses it, naming the limit
    ranges.emplace_back(slot.ua(), slot.size());
  }
  absl::StatusOr<ContextView> view =
      agent_->AttachOwnerMemory(request->context(), ranges, CallerOf(context));
  if (view.ok()) Fill(*view, response);
  return Finish(context, view.status(), RpcMethod::kAttachMemory, start);
}

grpc::ServerUnaryReactor* NodeAgentService::CreateContainer(
    grpc::CallbackServerContext* context, const v1::CreateContainerRequest* request,
    v1::Container* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.CreateContainer"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kCreateContainer, start);
  }
  absl::StatusOr<ContainerView> view = agent_->CreateContainer(
      {.name = request->name(),
       .iommu_page_size = request->iommu_page_size(),
       .window_start = request->window_start(),
       .window_size = request->window_size(),
       .vfio_groups = {request->vfio_groups().begin(), request->vfio_groups().end()}},
      CallerOf(context));
  if (view.ok()) Fill(*view, response);
  return Finish(context, view.status(), RpcMethod::kCreateContainer, start);
}

grpc::ServerUnaryReactor* NodeAgentService::GetContainer(grpc::CallbackServerContext* context,
                                                         const v1::GetContainerRequest* request,
                                                         v1::Container* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.GetContainer"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kGetContainer, start);
  }
  absl::StatusOr<ContainerView> view = agent_->GetContainer(request->name());
  if (view.ok()) Fill(*view, response);
  return Finish(context, view.status(), RpcMethod::kGetContainer, start);
}

grpc::ServerUnaryReactor* NodeAgentService::ListContainers(grpc::CallbackServerContext* context,
                                                           const v1::ListContainersRequest*,
                                                           v1::ListContainersResponse* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.ListContainers"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kListContainers, start);
  }
  for (const ContainerView& view : agent_->ListContainers()) {
    Fill(view, response->add_containers());
  }
  return Finish(context, absl::OkStatus(), RpcMethod::kListContainers, start);
}

grpc::ServerUnaryReactor* NodeAgentService::ReleaseContainer(
    grpc::CallbackServerContext* context, const v1::ReleaseContainerRequest* request,
    v1::ReleaseContainerResponse*) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.ReleaseContainer"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kReleaseContainer, start);
  }
  return Finish(context, agent_->ReleaseContainer(request->name(), nullptr, CallerOf(context)),
                RpcMethod::kReleaseContainer, start);
}

grpc::ServerUnaryReactor* NodeAgentService::RegisterRegion(grpc::CallbackServerContext* context,
                                                           const v1::RegisterRegionRequest* request,
                                                           v1::Region* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.RegisterRegion"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kRegisterRegion, start);
  }
  absl::StatusOr<RegionView> view =
      agent_->RegisterRegion(request->container(), request->context(), request->ua(),
                             request->size(), nullptr, CallerOf(context));
  if (view.ok()) Fill(*view, agent_->page_size(), response);
  return Finish(context, view.status(), RpcMethod::kRegisterRegion, start);
}

grpc::ServerUnaryReactor* NodeAgentService::UnregisterRegion(
    grpc::CallbackServerContext* context, const v1::UnregisterRegionRequest* request,
    v1::UnregisterRegionResponse*) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.UnregisterRegion"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kUnregisterRegion, start);
  }
  return Finish(context,
                agent_->UnregisterRegion(request->container(), request->ua(), request->size(),
                                         nullptr, CallerOf(context)),
                RpcMethod::kUnregisterRegion, start);
}

grpc::ServerUnaryReactor* NodeAgentService::MapDma(grpc::CallbackServerContext* context,
                                                   const v1::MapDmaRequest* request,
                                                   v1::MapDmaResponse*) {
  if (absl::Status denied = Authorize(context, "NodeAgent.MapDma"); !denied.ok()) {
    return FinishUnary(context, WithErrno(denied));
  }
  return FinishUnary(context, Serve(*request, CallerOf(context)));
}

grpc::ServerUnaryReactor* NodeAgentService::UnmapDma(grpc::CallbackServerContext* context,
                                                     const v1::UnmapDmaRequest* request,
                                                     v1::UnmapDmaResponse*) {
  if (absl::Status denied = Authorize(context, "NodeAgent.UnmapDma"); !denied.ok()) {
    return FinishUnary(context, WithErrno(denied));
  }
  return FinishUnary(context, Serve(*request, CallerOf(context)));
}

grpc::ServerUnaryReactor* NodeAgentService::Translate(grpc::CallbackServerContext* context,
                                                      const v1::TranslateRequest* request,
                                                      v1::TranslateResponse* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.Translate"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kTranslate, start);
  }
  absl::StatusOr<std::vector<uint64_t>> hpas = agent_->Translate(
      request->context(), absl::MakeConstSpan(request->uas().data(), request->uas().size()),
      CallerOf(context));
  if (hpas.ok()) {
    response->mutable_hpas()->Add(hpas->begin(), hpas->end());
  }
  return Finish(context, hpas.status(), RpcMethod::kTranslate, start);
}

grpc::ServerUnaryReactor* NodeAgentService::Lookup(grpc::CallbackServerContext* context,
                                                   const v1::LookupRequest* request,
                                                   v1::LookupResponse* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.Lookup"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kLookup, start);
  }
  absl::StatusOr<std::optional<RegionView>> view =
      agent_->Lookup(request->context(), request->ua(), request->size());
  if (view.ok() && view->has_value()) {
    Fill(**view, agent_->page_size(), response->mutable_region());
  }
  return Finish(context, view.status(), RpcMethod::kLookup, start);
}

grpc::ServerUnaryReactor* NodeAgentService::ListRegions(grpc::CallbackServerContext* context,
                                                        const v1::ListRegionsRequest* request,
                                                        v1::ListRegionsResponse* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.ListRegions"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kListRegions, start);
  }
  absl::StatusOr<std::vector<RegionView>> views =
      agent_->ListRegions(request->context(), request->with_hpas(), CallerOf(context));
  if (views.ok()) {
    for (const RegionView& view : *views) {
      Fill(view, agent_->page_size(), response->add_regions());
    }
  }
  return Finish(context, views.status(), RpcMethod::kListRegions, start);
}

grpc::ServerUnaryReactor* NodeAgentService::GetNodeStatus(grpc::CallbackServerContext* context,
                                                          const v1::GetNodeStatusRequest*,
                                                          v1::NodeStatus* response) {
  const AgentMetrics::Clock::time_point start = Start();
  if (absl::Status denied = Authorize(context, "NodeAgent.GetNodeStatus"); !denied.ok()) {
    return Finish(context, denied, RpcMethod::kGetNodeStatus, start);
  }
  NodeStatusView status = agent_->Status();
  response->set_node_name(status.node_name);
  response->set_backend(status.backend);
  for (const std::string& backend : status.available_backends) {
    response->add_available_backends(backend);
  }
  response->set_page_size(status.page_size);
  response->set_contexts(status.contexts);
  response->set_containers(status.containers);
  response->set_regions(status.regions);
  response->set_locked_bytes(status.locked_bytes);
  response->set_installed_entries(status.installed_entries);
  response->set_version(kAgentVersion);
  Fill(status, response->mutable_counters());
  response->set_store_failed(status.store_failed);
  return Finish(context, absl::OkStatus(), RpcMethod::kGetNodeStatus, start);
}

}  // namespace dmapin::agent
