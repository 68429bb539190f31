// absl::Status -> grpc::Status for dmapin's gRPC services, with the errno named in a trailer.
//
// The wire contract (README "Errors"): every error a dmapin service answers is a gRPC status whose
// message starts with an errno name ("EBUSY: ...") and whose `dmapin-errno` trailer names it
// again. Services end every call through FinishUnary or ServerStatus, which hold to that even for
// a status that was built without an errno (WithErrno).
#ifndef DMAPIN_COMMON_GRPC_STATUS_H_
#define DMAPIN_COMMON_GRPC_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"

namespace dmapin {

// The trailing-metadata key carrying the errno name of a failed call (e.g. "EBUSY").
inline constexpr char kErrnoTrailer[] = "dmapin-errno";

// `status` if it carries an errno (or is OK); otherwise the same code with the errno its message
// already starts with ("EIO: ..."), else the errno of its code (INVALID_ARGUMENT: EINVAL,
// NOT_FOUND: ENOENT, ...; EIO for codes without one) named in front of its message.
absl::Status WithErrno(const absl::Status& status);

// The gRPC status for an errno status: same code, same message ("EBUSY: ...").
grpc::Status ToGrpcStatus(const absl::Status& status);

// The gRPC status to end a call of `context` with: ToGrpcStatus(WithErrno(status)), and for an
// error the errno in the kErrnoTrailer trailer. For streams (Finish(ServerStatus(context, s))).
grpc::Status ServerStatus(grpc::ServerContextBase* context, const absl::Status& status);

// Finishes a unary callback call with ServerStatus(context, status). Returns the reactor to hand
// back to gRPC.
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_GRPC_STATUS_H_
