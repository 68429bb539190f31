#include "agent/service/node_agent_service.h"

#include <string>
#include <utility>

#include "agent/registry/errno_status.h"

namespace dmapin {
namespace {

// Finishes the call with `status`, naming the errno in the trailers too.
grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context, const absl::Status& status) {
  if (!status.ok()) context->AddTrailingMetadata(kErrnoTrailer, ErrnoName(ErrnoOf(status)));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

void Fill(const ContextView& view, v1::Context* out) {
  out->set_name(view.name);
  out->set_memlock_unlimited(!view.spec.memlock_limit_bytes.has_value());
  out->set_memlock_limit_bytes(view.spec.memlock_limit_bytes.value_or(0));
  out->set_cap_ipc_lock(view.spec.cap_ipc_lock);
  out->set_backing(static_cast<v1::MemoryBacking>(view.spec.backing));
  out->set_locked_bytes(view.locked_bytes);
  out->set_regions(view.regions);
  out->set_memory_ua(view.memory_ua);
  out->set_memory_bytes(view.spec.memory_bytes);
  for (const std::string& container : view.containers) out->add_containers(container);
}

void Fill(const ContainerView& view, v1::Container* out) {
  out->set_name(view.name);
  out->set_iommu_page_size(view.options.iommu_page_size);
  out->set_window_start(view.options.window_start);
  out->set_window_size(view.options.window_size);
  out->set_context(view.context);
  out->set_held_regions(view.held_regions);
  out->set_installed_entries(view.installed_entries);
}

void Fill(const RegionView& view, uint64_t page_size, v1::Region* out) {
  out->set_context(view.context);
  out->set_ua(view.info.ua);
  out->set_size(view.info.size);
  out->set_entries(view.info.entries);
  out->set_used(view.info.used);
  out->set_mapped(view.info.mapped);
  out->set_page_size(page_size);
  out->set_max_iommu_page_size(view.info.max_iommu_page_size);
  out->set_pending_release(view.info.pending_release);
  for (const std::string& container : view.containers) out->add_containers(container);
  for (uint64_t hpa : view.info.hpas) out->add_hpas(hpa);
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::ServerUnaryReactor* NodeAgentService::CreateContext(grpc::CallbackServerContext* context,
                                                          const v1::CreateContextRequest* request,
                                                          v1::Context* response) {
  ContextSpec spec{.name = request->name(),
                   .cap_ipc_lock = request->cap_ipc_lock(),
                   .backing = request->backing(),
                   .memory_bytes = request->memory_bytes()};
  if (!request->memlock_unlimited()) spec.memlock_limit_bytes = request->memlock_limit_bytes();
  absl::StatusOr<ContextView> view = agent_->CreateContext(spec);
  if (view.ok()) Fill(*view, response);
  return Finish(context, view.status());
}

grpc::ServerUnaryReactor* NodeAgentService::GetContext(grpc::CallbackServerContext* context,
                                                       const v1::GetContextRequest* request,
                                                       v1::Context* response) {
  absl::StatusOr<ContextView> view = agent_->GetContext(request->name());
  if (view.ok()) Fill(*view, response);
  return Finish(context, view.status());
}

grpc::ServerUnaryReactor* NodeAgentService::ListContexts(grpc::CallbackServerContext* context,
                                                         const v1::ListContextsRequest*,
                                                         v1::ListContextsResponse* response) {
  for (const ContextView& view : agent_->ListContexts()) Fill(view, response->add_contexts());
  return Finish(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* NodeAgentService::TeardownContext(
    grpc::CallbackServerContext* context, const v1::TeardownContextRequest* request,
    v1::TeardownContextResponse*) {
  return Finish(context, agent_->TeardownContext(request->name()));
}

grpc::ServerUnaryReactor* NodeAgentService::CreateContainer(
    grpc::CallbackServerContext* context, const v1::CreateContainerRequest* request,
    v1::Container* response) {
  absl::StatusOr<ContainerView> view =
      agent_->CreateContainer({.name = request->name(),
                               .iommu_page_size = request->iommu_page_size(),
                               .window_start = request->window_start(),
                               .window_size = request->window_size()});
  if (view.ok()) Fill(*view, response);
  return Finish(context, view.status());
}

grpc::ServerUnaryReactor* NodeAgentService::GetContainer(grpc::CallbackServerContext* context,
                                                         const v1::GetContainerRequest* request,
                                                         v1::Container* response) {
  absl::StatusOr<ContainerView> view = agent_->GetContainer(request->name());
  if (view.ok()) Fill(*view, response);
  return Finish(context, view.status());
}

grpc::ServerUnaryReactor* NodeAgentService::ListContainers(grpc::CallbackServerContext* context,
                                                           const v1::ListContainersRequest*,
                                                           v1::ListContainersResponse* response) {
  for (const ContainerView& view : agent_->ListContainers()) {
    Fill(view, response->add_containers());
  }
  return Finish(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* NodeAgentService::ReleaseContainer(
    grpc::CallbackServerContext* context, const v1::ReleaseContainerRequest* request,
    v1::ReleaseContainerResponse*) {
  return Finish(context, agent_->ReleaseContainer(request->name()));
}

grpc::ServerUnaryReactor* NodeAgentService::RegisterRegion(grpc::CallbackServerContext* context,
                                                           const v1::RegisterRegionRequest* request,
                                                           v1::Region* response) {
  absl::StatusOr<RegionView> view = agent_->RegisterRegion(request->container(), request->context(),
                                                           request->ua(), request->size());
  if (view.ok()) Fill(*view, agent_->registry().page_size(), response);
  return Finish(context, view.status());
}

grpc::ServerUnaryReactor* NodeAgentService::UnregisterRegion(
    grpc::CallbackServerContext* context, const v1::UnregisterRegionRequest* request,
    v1::UnregisterRegionResponse*) {
  return Finish(context,
                agent_->UnregisterRegion(request->container(), request->ua(), request->size()));
}

grpc::ServerUnaryReactor* NodeAgentService::MapDma(grpc::CallbackServerContext* context,
                                                   const v1::MapDmaRequest* request,
                                                   v1::MapDmaResponse*) {
  return Finish(context, agent_->MapDma(request->container(), request->iova(), request->ua(),
                                        request->size()));
}

grpc::ServerUnaryReactor* NodeAgentService::UnmapDma(grpc::CallbackServerContext* context,
                                                     const v1::UnmapDmaRequest* request,
                                                     v1::UnmapDmaResponse*) {
  return Finish(context, agent_->UnmapDma(request->container(), request->iova(), request->size()));
}

grpc::ServerUnaryReactor* NodeAgentService::Translate(grpc::CallbackServerContext* context,
                                                      const v1::TranslateRequest* request,
                                                      v1::TranslateResponse* response) {
  absl::StatusOr<std::vector<uint64_t>> hpas = agent_->Translate(
      request->context(), absl::MakeConstSpan(request->uas().data(), request->uas().size()));
  if (hpas.ok()) {
    response->mutable_hpas()->Add(hpas->begin(), hpas->end());
  }
  return Finish(context, hpas.status());
}

grpc::ServerUnaryReactor* NodeAgentService::Lookup(grpc::CallbackServerContext* context,
                                                   const v1::LookupRequest* request,
                                                   v1::LookupResponse* response) {
  absl::StatusOr<std::optional<RegionView>> view =
      agent_->Lookup(request->context(), request->ua(), request->size());
  if (view.ok() && view->has_value()) {
    Fill(**view, agent_->registry().page_size(), response->mutable_region());
  }
  return Finish(context, view.status());
}

grpc::ServerUnaryReactor* NodeAgentService::ListRegions(grpc::CallbackServerContext* context,
                                                        const v1::ListRegionsRequest* request,
                                                        v1::ListRegionsResponse* response) {
  absl::StatusOr<std::vector<RegionView>> views =
      agent_->ListRegions(request->context(), request->with_hpas());
  if (views.ok()) {
    for (const RegionView& view : *views) {
      Fill(view, agent_->registry().page_size(), response->add_regions());
    }
  }
  return Finish(context, views.status());
}

grpc::ServerUnaryReactor* NodeAgentService::GetNodeStatus(grpc::CallbackServerContext* context,
                                                          const v1::GetNodeStatusRequest*,
                                                          v1::NodeStatus* response) {
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
  response->set_version("dmapin-agent 0.1");
  v1::RegistryCounters* counters = response->mutable_counters();
  counters->set_registers_ok(status.counters.registers_ok);
  counters->set_registers_failed(status.counters.registers_failed);
  counters->set_unregisters_ok(status.counters.unregisters_ok);
  counters->set_unregisters_failed(status.counters.unregisters_failed);
  counters->set_unregister_ebusy(status.counters.unregister_ebusy);
  counters->set_pin_failures(status.counters.pin_failures);
  counters->set_maps_ok(status.counters.maps_ok);
  counters->set_maps_failed(status.counters.maps_failed);
  counters->set_map_rollbacks(status.counters.map_rollbacks);
  counters->set_unmaps(status.counters.unmaps);
  counters->set_pending_releases_started(status.counters.pending_releases_started);
  counters->set_pending_releases_completed(status.counters.pending_releases_completed);
  counters->set_store_commit_failures(status.store_commit_failures);
  response->set_store_failed(status.store_failed);
  return Finish(context, absl::OkStatus());
}

}  // namespace dmapin
