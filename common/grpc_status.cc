#include "common/grpc_status.h"

#include <cerrno>
#include <optional>
#include <string>

#include "absl/strings/string_view.h"
#include "common/errno_status.h"

namespace dmapin {
namespace {

// The errno a status of `code` stands for when nothing more precise is known.
int ErrnoForCode(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
      return EINVAL;
    case absl::StatusCode::kNotFound:
      return ENOENT;
    case absl::StatusCode::kAlreadyExists:
      return EEXIST;
    case absl::StatusCode::kPermissionDenied:
      return EPERM;
    case absl::StatusCode::kResourceExhausted:
      return ENOMEM;
    case absl::StatusCode::kFailedPrecondition:
      return EBUSY;
    case absl::StatusCode::kOutOfRange:
      return EFAULT;
    case absl::StatusCode::kUnimplemented:
      return ENOSYS;
    case absl::StatusCode::kUnavailable:
      return EAGAIN;
    default:
      return EIO;
  }
}

}  // namespace

absl::Status WithErrno(const absl::Status& status) {
  if (status.ok() || status.GetPayload(kErrnoPayloadUrl).has_value()) return status;
  absl::string_view message = status.message();
  const size_t colon = message.find(": ");
  if (colon != absl::string_view::npos) {
    if (std::optional<int> named = ErrnoFromName(message.substr(0, colon)); named.has_value()) {
      return ErrnoStatus(*named, status.code(), message.substr(colon + 2));
    }
  }
  return ErrnoStatus(ErrnoForCode(status.code()), status.code(), message);
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status ServerStatus(grpc::ServerContextBase* context, const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const absl::Status named = WithErrno(status);
  context->AddTrailingMetadata(kErrnoTrailer, ErrnoName(ErrnoOf(named)));
  return ToGrpcStatus(named);
}

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ServerStatus(context, status));
  return reactor;
}

}  // namespace dmapin
