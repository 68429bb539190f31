// The gRPC face of the node agent: translates dmapin.v1.NodeAgent calls to NodeAgent (the core)
// and absl::Status errors to gRPC statuses. Callback API: no thread per call.
#ifndef DMAPIN_AGENT_SERVICE_NODE_AGENT_SERVICE_H_
#define DMAPIN_AGENT_SERVICE_NODE_AGENT_SERVICE_H_

#include <functional>
#include <string>

#include "absl/status/status.h"
#include "agent/node/node_agent.h"
#include "agent/service/agent_metrics.h"
#include "common/grpc_status.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dmapin::agent {

class NodeAgentService final : public v1::NodeAgent::CallbackService {
 public:
  // `agent` must outlive the service; so must `metrics` when given (nullptr: no metrics). With
  // metrics, every call records its method, handler latency and errno (AgentMetrics::RecordRpc).
  // Who is calling, from the call's peer string: dmapin-agent accepts connections itself and
  // hands them to gRPC, so a peer is "fd:<n>", whose SO_PEERCRED says which local process it is
  // (a TCP peer, or no resolver: Caller::Remote()).
  using CallerResolver = std::function<Caller(const std::string& peer)>;

  // Whether a call may proceed at all, before its handler runs (the agent: a TCP caller must
  // hold the server's or an admin's certificate, common/peer_identity.h); an error ends the call
  // with it. `method` is "NodeAgent.<Method>". nullptr: every call proceeds.
  using Authorizer =
      std::function<absl::Status(grpc::CallbackServerContext* context, absl::string_view method)>;

  explicit NodeAgentService(NodeAgent* agent, AgentMetrics* metrics = nullptr,
                            CallerResolver resolve_caller = nullptr, Authorizer authorize = nullptr)
      : agent_(agent),
        metrics_(metrics),
        resolve_caller_(std::move(resolve_caller)),
        authorize_(std::move(authorize)) {}

  grpc::ServerUnaryReactor* AttachMemory(grpc::CallbackServerContext* context,
                                         const v1::AttachMemoryRequest* request,
                                         v1::Context* response) override;

  grpc::ServerUnaryReactor* CreateContext(grpc::CallbackServerContext* context,
                                          const v1::CreateContextRequest* request,
                                          v1::Context* response) override;
  grpc::ServerUnaryReactor* GetContext(grpc::CallbackServerContext* context,
                                       const v1::GetContextRequest* request,
                                       v1::Context* response) override;
  grpc::ServerUnaryReactor* ListContexts(grpc::CallbackServerContext* context,
                                         const v1::ListContextsRequest* request,
                                         v1::ListContextsResponse* response) override;
  grpc::ServerUnaryReactor* TeardownContext(grpc::CallbackServerContext* context,
                                            const v1::TeardownContextRequest* request,
                                            v1::TeardownContextResponse* response) override;
  grpc::ServerUnaryReactor* CreateContainer(grpc::CallbackServerContext* context,
                                            const v1::CreateContainerRequest* request,
                                            v1::Container* response) override;
  grpc::ServerUnaryReactor* GetContainer(grpc::CallbackServerContext* context,
                                         const v1::GetContainerRequest* request,
                                         v1::Container* response) override;
  grpc::ServerUnaryReactor* ListContainers(grpc::CallbackServerContext* context,
                                           const v1::ListContainersRequest* request,
                                           v1::ListContainersResponse* response) override;
  grpc::ServerUnaryReactor* ReleaseContainer(grpc::CallbackServerContext* context,
                                             const v1::ReleaseContainerRequest* request,
                                             v1::ReleaseContainerResponse* response) override;
  grpc::ServerUnaryReactor* RegisterRegion(grpc::CallbackServerContext* context,
                                           const v1::RegisterRegionRequest* request,
                                           v1::Region* response) override;
  grpc::ServerUnaryReactor* UnregisterRegion(grpc::CallbackServerContext* context,
                                             const v1::UnregisterRegionRequest* request,
                                             v1::UnregisterRegionResponse* response) override;
  grpc::ServerUnaryReactor* MapDma(grpc::CallbackServerContext* context,
                                   const v1::MapDmaRequest* request,
                                   v1::MapDmaResponse* response) override;
  grpc::ServerUnaryReactor* UnmapDma(grpc::CallbackServerContext* context,
                                     const v1::UnmapDmaRequest* request,
                                     v1::UnmapDmaResponse* response) override;
  grpc::ServerBidiReactor<v1::DmaSessionRequest, v1::DmaSessionResponse>* DmaSession(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* Translate(grpc::CallbackServerContext* context,
                                      const v1::TranslateRequest* request,
                                      v1::TranslateResponse* response) override;
  grpc::ServerUnaryReactor* Lookup(grpc::CallbackServerContext* context,
                                   const v1::LookupRequest* request,
                                   v1::LookupResponse* response) override;
  grpc::ServerUnaryReactor* ListRegions(grpc::CallbackServerContext* context,
                                        const v1::ListRegionsRequest* request,
                                        v1::ListRegionsResponse* response) override;
  grpc::ServerUnaryReactor* GetNodeStatus(grpc::CallbackServerContext* context,
                                          const v1::GetNodeStatusRequest* request,
                                          v1::NodeStatus* response) override;

 private:
  // When the handler started (read only with metrics: the clock costs nothing otherwise).
  AgentMetrics::Clock::time_point Start() const {
    return metrics_ != nullptr ? AgentMetrics::Clock::now() : AgentMetrics::Clock::time_point();
  }
  class DmaSessionReactor;

  // The DMA hot path, shared by the unary handlers and DmaSession: runs the call and records it
  // in the metrics.
  absl::Status Serve(const v1::MapDmaRequest& request, const Caller& caller);
  absl::Status Serve(const v1::UnmapDmaRequest& request, const Caller& caller);
  Caller CallerOf(grpc::CallbackServerContext* context) const;
  absl::Status Authorize(grpc::CallbackServerContext* context, absl::string_view method) const;
  void Record(RpcMethod method, AgentMetrics::Clock::time_point start, const absl::Status& status);

  // Finishes the call with `status` (naming the errno in the trailers too) and records it.
  grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context, const absl::Status& status,
                                   RpcMethod method, AgentMetrics::Clock::time_point start);

  NodeAgent* const agent_;
  AgentMetrics* const metrics_;
  const CallerResolver resolve_caller_;
  const Authorizer authorize_;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_SERVICE_NODE_AGENT_SERVICE_H_
