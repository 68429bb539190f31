#include "common/grpc_status.h"

#include <string>

#include "agent/registry/errno_status.h"

namespace dmapin {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status) {
  // Only statuses that carry an errno name one: a policy denial is not a kernel error.
  if (!status.ok() && status.GetPayload(kErrnoPayloadUrl).has_value()) {
    context->AddTrailingMetadata(kErrnoTrailer, ErrnoName(ErrnoOf(status)));
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace dmapin
