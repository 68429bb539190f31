// What /proc says about another process, for tests that check pins and frames from outside.
#ifndef DMAPIN_TESTING_PROC_INFO_H_
#define DMAPIN_TESTING_PROC_INFO_H_

#include <sys/types.h>

#include <cstdint>

#include "absl/status/statusor.h"

namespace dmapin::harness {

// The VmLck of process `pid` (/proc/<pid>/status), in bytes.
absl::StatusOr<uint64_t> VmLckBytes(pid_t pid);

// The page frame number behind `ua` in process `pid` (/proc/<pid>/pagemap); 0 when the page is
// not present or the kernel hides frame numbers (it shows them to CAP_SYS_ADMIN).
absl::StatusOr<uint64_t> PageFrame(pid_t pid, uint64_t ua);

}  // namespace dmapin::harness

#endif  // DMAPIN_TESTING_PROC_INFO_H_
