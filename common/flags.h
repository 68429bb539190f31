// Command-line parsing shared by dmapin's binaries.
#ifndef DMAPIN_COMMON_FLAGS_H_
#define DMAPIN_COMMON_FLAGS_H_

#include <vector>

#include "absl/strings/string_view.h"

namespace dmapin {

// absl::ParseCommandLine, except that an explicit --help (--helpfull, --helpshort, ...) prints
// to stdout and exits 0: asking for help is not an error. Debian's Abseil 20220623 exits 1 there.
// Returns the positional arguments, argv[0] first. Call absl::SetProgramUsageMessage first.
std::vector<char*> ParseFlagsOrExit(int argc, char** argv);

// The start of every dmapin binary's main(): sets the usage message, shows in --help the flags
// of source files whose path contains `flags_file` (e.g. "dmapin_agent") and those of common/
// (shared by the binaries, e.g. common/server_limits.cc), parses the command line
// (ParseFlagsOrExit), starts logging (InitLogging, common/logging.h), and turns off Abseil's mutex
// deadlock detection, which Debian's build has on: it updates a global lock graph under a global
// lock on every nested lock, and gRPC takes absl::Mutexes on every call (our own code uses
// dmapin::Mutex). Returns the positional arguments, argv[0] first.
std::vector<char*> InitBinary(int argc, char** argv, absl::string_view usage,
                              absl::string_view flags_file);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_FLAGS_H_
