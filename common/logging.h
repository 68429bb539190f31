// dmapin's one logging facility: glog (libgoogle-glog-dev), to stderr only. LOG(INFO),
// LOG(WARNING) and LOG(ERROR) each write one line with the severity, the time, the thread and
// file:line, whole (concurrent lines do not interleave). Code that must not allocate or lock checks
// its invariants with DMAPIN_RAW_CHECK (common/raw_check.h). Binaries call InitLogging at the start
// of main (InitBinary in common/flags.h does); before it, glog still writes to stderr.
#ifndef DMAPIN_COMMON_LOGGING_H_
#define DMAPIN_COMMON_LOGGING_H_

#include "glog/logging.h"  // IWYU pragma: export

namespace dmapin {

// Sends every severity to stderr (no log files: the agents and the server run under a supervisor
// that keeps stderr) and names the program in glog's records. Once per process; later calls do
// nothing. `argv0` must outlive the process (argv[0] does).
void InitLogging(const char* argv0);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_LOGGING_H_
