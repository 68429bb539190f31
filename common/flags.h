// Command-line parsing shared by dmapin's binaries.
#ifndef DMAPIN_COMMON_FLAGS_H_
#define DMAPIN_COMMON_FLAGS_H_

#include <vector>

namespace dmapin {

// absl::ParseCommandLine, except that an explicit --help (--helpfull, --helpshort, ...) prints
// to stdout and exits 0: asking for help is not an error. Debian's Abseil 20220623 exits 1 there.
// Returns the positional arguments, argv[0] first. Call absl::SetProgramUsageMessage first.
std::vector<char*> ParseFlagsOrExit(int argc, char** argv);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_FLAGS_H_
