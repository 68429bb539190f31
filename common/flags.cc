#include "common/flags.h"

#include <cstdlib>
#include <iostream>
#include <string>

#include "absl/flags/internal/parse.h"
#include "absl/flags/internal/usage.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"

namespace dmapin {

std::vector<char*> ParseFlagsOrExit(int argc, char** argv) {
  namespace fi = absl::flags_internal;
  std::vector<char*> positional = fi::ParseCommandLineImpl(
      argc, argv, fi::ArgvListAction::kRemoveParsedArgs, fi::UsageFlagsAction::kIgnoreUsage,
      fi::OnUndefinedFlag::kAbortIfUndefined);
  // -1: no usage flag given; otherwise it printed what was asked for.
  const int usage = fi::HandleUsageFlags(std::cout, absl::ProgramUsageMessage());
  if (usage != -1) {
    std::cout.flush();
    std::exit(0);
  }
  return positional;
}

std::vector<char*> InitBinary(int argc, char** argv, absl::string_view usage,
                              absl::string_view flags_file) {
  absl::SetProgramUsageMessage(usage);
  absl::FlagsUsageConfig config;
  // Flags defined in common/ (e.g. the server limits) are the binaries' own too.
  config.contains_help_flags = [file = std::string(flags_file)](absl::string_view path) {
    return absl::StrContains(path, file) || absl::StartsWith(path, "common/");
  };
  absl::SetFlagsUsageConfig(config);
  std::vector<char*> positional = ParseFlagsOrExit(argc, argv);
  InitLogging(argv[0]);
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return positional;
}

}  // namespace dmapin
