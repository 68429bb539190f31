// Kernel-errno-carrying statuses (spec §9).
//
// Every failure the registry reports is an absl::Status whose message starts with the errno name
// ("EBUSY: ...") and whose payload carries that name, so the gRPC layer and the conformance runner
// can recover the exact errno without parsing prose.
#ifndef DMAPIN_COMMON_ERRNO_STATUS_H_
#define DMAPIN_COMMON_ERRNO_STATUS_H_

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace dmapin {

// The payload type URL under which the errno name is stored.
inline constexpr absl::string_view kErrnoPayloadUrl = "type.dmapin.dev/errno";

// The status code spec §9 assigns to `err` (EFAULT maps to INTERNAL: a pin failure).
absl::StatusCode StatusCodeForErrno(int err);

// A status for `err` with the code of spec §9; the message is "<ERRNO>: <reason>".
absl::Status ErrnoStatus(int err, absl::string_view reason);

// As above with an explicit code, for the few places §9 assigns one by context
// (EFAULT from translate is OUT_OF_RANGE).
absl::Status ErrnoStatus(int err, absl::StatusCode code, absl::string_view reason);

// `status` with `more` appended to its message, its code and payloads (the errno) kept; OK stays
// OK.
absl::Status AppendToMessage(const absl::Status& status, absl::string_view more);

// The errno carried by `status`: 0 for OK, the payload's errno when present, else EIO.
int ErrnoOf(const absl::Status& status);

// "EINVAL" for EINVAL; "E<number>" for errnos this project never produces.
std::string ErrnoName(int err);

// The errno for a name such as "EBUSY"; nullopt for names not known here.
std::optional<int> ErrnoFromName(absl::string_view name);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_ERRNO_STATUS_H_
