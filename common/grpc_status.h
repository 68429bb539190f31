// absl::Status -> grpc::Status for dmapin's gRPC services, with the errno named in a trailer.
#ifndef DMAPIN_COMMON_GRPC_STATUS_H_
#define DMAPIN_COMMON_GRPC_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"

namespace dmapin {

// The trailing-metadata key carrying the errno name of a failed call (e.g. "EBUSY").
inline constexpr char kErrnoTrailer[] = "dmapin-errno";

// The gRPC status for an errno status: same code, same message ("EBUSY: ...").
grpc::Status ToGrpcStatus(const absl::Status& status);

// Finishes a unary callback call with `status`, naming its errno (when it has one) in the
// kErrnoTrailer trailer. Returns the reactor to hand back to gRPC.
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_GRPC_STATUS_H_
