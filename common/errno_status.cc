#include "common/errno_status.h"

#include <cerrno>
#include <cstring>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace dmapin {
namespace {

struct ErrnoEntry {
  int err;
  absl::string_view name;
  absl::StatusCode code;
};

constexpr ErrnoEntry kErrnos[] = {
    {EINVAL, "EINVAL", absl::StatusCode::kInvalidArgument},
    {EBUSY, "EBUSY", absl::StatusCode::kFailedPrecondition},
    {ENOENT, "ENOENT", absl::StatusCode::kNotFound},
    {ENOMEM, "ENOMEM", absl::StatusCode::kResourceExhausted},
    {EFAULT, "EFAULT", absl::StatusCode::kInternal},
    {EPERM, "EPERM", absl::StatusCode::kPermissionDenied},
    {ENXIO, "ENXIO", absl::StatusCode::kFailedPrecondition},
    {EEXIST, "EEXIST", absl::StatusCode::kAlreadyExists},
    {ENOTTY, "ENOTTY", absl::StatusCode::kUnimplemented},
    {ENODEV, "ENODEV", absl::StatusCode::kUnavailable},
    {EIO, "EIO", absl::StatusCode::kInternal},
    {EAGAIN, "EAGAIN", absl::StatusCode::kUnavailable},
    {EACCES, "EACCES", absl::StatusCode::kPermissionDenied},
    {EBADF, "EBADF", absl::StatusCode::kNotFound},
    {ENOSPC, "ENOSPC", absl::StatusCode::kResourceExhausted},
    {ENOBUFS, "ENOBUFS", absl::StatusCode::kResourceExhausted},
    {EOVERFLOW, "EOVERFLOW", absl::StatusCode::kOutOfRange},
    {ENOSYS, "ENOSYS", absl::StatusCode::kUnimplemented},
    // The VMM's process and its memory: a process that is gone, too many descriptors or bytes.
    {ESRCH, "ESRCH", absl::StatusCode::kNotFound},
    {EMFILE, "EMFILE", absl::StatusCode::kResourceExhausted},
    {E2BIG, "E2BIG", absl::StatusCode::kInvalidArgument},
    {EMSGSIZE, "EMSGSIZE", absl::StatusCode::kInvalidArgument},
    // The device handoff: a container the kernel will not let another process take back.
    {EOPNOTSUPP, "EOPNOTSUPP", absl::StatusCode::kUnimplemented},
};

const ErrnoEntry* FindEntry(int err) {
  for (const ErrnoEntry& entry : kErrnos) {
    if (entry.err == err) return &entry;
  }
  return nullptr;
}

}  // namespace

absl::StatusCode StatusCodeForErrno(int err) {
  const ErrnoEntry* entry = FindEntry(err);
  return entry != nullptr ? entry->code : absl::StatusCode::kUnknown;
}

absl::Status ErrnoStatus(int err, absl::string_view reason) {
  return ErrnoStatus(err, StatusCodeForErrno(err), reason);
}

absl::Status ErrnoStatus(int err, absl::StatusCode code, absl::string_view reason) {
  std::string name = ErrnoName(err);
  absl::Status status(code, absl::StrCat(name, ": ", reason));
  status.SetPayload(kErrnoPayloadUrl, absl::Cord(name));
  return status;
}

int ErrnoOf(const absl::Status& status) {
  if (status.ok()) return 0;
  absl::optional<absl::Cord> payload = status.GetPayload(kErrnoPayloadUrl);
  if (payload.has_value()) {
    std::optional<int> err = ErrnoFromName(std::string(*payload));
    if (err.has_value()) return *err;
  }
  return EIO;
}

std::string ErrnoName(int err) {
  const ErrnoEntry* entry = FindEntry(err);
  if (entry != nullptr) return std::string(entry->name);
  // Not one of the contract's errnos: glibc's name for it (EADDRINUSE, ...), else E<number>.
  if (const char* name = strerrorname_np(err); name != nullptr) return name;
  return absl::StrCat("E", err);
}

std::optional<int> ErrnoFromName(absl::string_view name) {
  for (const ErrnoEntry& entry : kErrnos) {
    if (entry.name == name) return entry.err;
  }
  return std::nullopt;
}

absl::Status AppendToMessage(const absl::Status& status, absl::string_view more) {
  if (status.ok()) return status;
  absl::Status out(status.code(), absl::StrCat(status.message(), more));
  status.ForEachPayload(
      [&out](absl::string_view url, const absl::Cord& payload) { out.SetPayload(url, payload); });
  return out;
}

}  // namespace dmapin
