// The gRPC face of the central service's admin API (dmapin.v1.Admin): translates calls to
// ServerCore and absl::Status errors to gRPC statuses. Callback API: no thread per call.
#ifndef DMAPIN_SERVER_SERVICE_ADMIN_SERVICE_H_
#define DMAPIN_SERVER_SERVICE_ADMIN_SERVICE_H_

#include "common/grpc_auth.h"
#include "dmapin/v1/admin.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/core/server_core.h"

namespace dmapin::server {

class AdminService final : public v1::Admin::CallbackService {
 public:
  // `core` must outlive the service, and so must `auth` when given. Every call is checked by
  // `auth` first (role admin for writes, viewer or admin for reads and WatchEvents); nullptr
  // checks nothing (in-process tests and fuzzers).
  explicit AdminService(ServerCore* core, AuthGate* auth = nullptr) : core_(core), auth_(auth) {}

  grpc::ServerUnaryReactor* SetPolicy(grpc::CallbackServerContext* context,
                                      const v1::SetPolicyRequest* request,
                                      v1::Policy* response) override;
  grpc::ServerUnaryReactor* GetPolicy(grpc::CallbackServerContext* context,
                                      const v1::GetPolicyRequest* request,
                                      v1::Policy* response) override;
  grpc::ServerUnaryReactor* ListPolicies(grpc::CallbackServerContext* context,
                                         const v1::ListPoliciesRequest* request,
                                         v1::ListPoliciesResponse* response) override;
  grpc::ServerUnaryReactor* DeletePolicy(grpc::CallbackServerContext* context,
                                         const v1::DeletePolicyRequest* request,
                                         v1::DeletePolicyResponse* response) override;
  grpc::ServerUnaryReactor* CreateIntent(grpc::CallbackServerContext* context,
                                         const v1::CreateIntentRequest* request,
                                         v1::CreateIntentResponse* response) override;
  grpc::ServerUnaryReactor* GetIntent(grpc::CallbackServerContext* context,
                                      const v1::GetIntentRequest* request,
                                      v1::Intent* response) override;
  grpc::ServerUnaryReactor* ListIntents(grpc::CallbackServerContext* context,
                                        const v1::ListIntentsRequest* request,
                                        v1::ListIntentsResponse* response) override;
  grpc::ServerUnaryReactor* WithdrawIntent(grpc::CallbackServerContext* context,
                                           const v1::WithdrawIntentRequest* request,
                                           v1::Intent* response) override;
  grpc::ServerUnaryReactor* ListNodes(grpc::CallbackServerContext* context,
                                      const v1::ListNodesRequest* request,
                                      v1::ListNodesResponse* response) override;
  grpc::ServerUnaryReactor* GetNode(grpc::CallbackServerContext* context,
                                    const v1::GetNodeRequest* request, v1::Node* response) override;
  grpc::ServerUnaryReactor* CordonNode(grpc::CallbackServerContext* context,
                                       const v1::CordonNodeRequest* request,
                                       v1::Node* response) override;
  grpc::ServerUnaryReactor* UncordonNode(grpc::CallbackServerContext* context,
                                         const v1::UncordonNodeRequest* request,
                                         v1::Node* response) override;
  grpc::ServerUnaryReactor* DrainNode(grpc::CallbackServerContext* context,
                                      const v1::DrainNodeRequest* request,
                                      v1::Node* response) override;
  grpc::ServerUnaryReactor* ListRegions(grpc::CallbackServerContext* context,
                                        const v1::ListRegionsFleetRequest* request,
                                        v1::ListRegionsFleetResponse* response) override;
  grpc::ServerUnaryReactor* GetRegion(grpc::CallbackServerContext* context,
                                      const v1::GetRegionFleetRequest* request,
                                      v1::FleetRegion* response) override;
  grpc::ServerUnaryReactor* ListDecisions(grpc::CallbackServerContext* context,
                                          const v1::ListDecisionsRequest* request,
                                          v1::ListDecisionsResponse* response) override;
  // Streams events until the client cancels or the server shuts down; a subscriber that falls
  // behind loses the oldest events (EventSubscription), never slows the server.
  grpc::ServerWriteReactor<v1::Event>* WatchEvents(grpc::CallbackServerContext* context,
                                                   const v1::WatchEventsRequest* request) override;

 private:
  absl::Status Authorize(grpc::CallbackServerContext* context, AdminAccess access,
                         absl::string_view method) const;

  ServerCore* const core_;
  AuthGate* const auth_;
};

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_SERVICE_ADMIN_SERVICE_H_
