// conformance_runner: runs conformance case files (format "dmapin-conformance/1") against a
// target and prints one line per failing step and a final "N passed, M failed".
//
//   bazel run //agent/conformance:conformance_runner --
//   --cases=../shared/spec/conformance-cases.json
//       --cases=agent/conformance/cases/dma_map.json,agent/conformance/cases/lifecycle.json
//
// --target=grpc runs every case against a freshly started dmapin-agent over its Unix socket
// (--agent_binary; under `bazel run` the agent among the runner's runfiles is the default):
//
//   bazel run //agent/conformance:conformance_runner -- --target=grpc
//       --cases=agent/conformance/cases/lifecycle.json
//
// Exit status: 0 when every case passed, 1 when some failed, 2 for a bad command line or a case
// file that cannot be read or parsed.
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "agent/conformance/case_file.h"
#include "agent/conformance/grpc_target.h"
#include "agent/conformance/in_process_target.h"
#include "agent/conformance/runner.h"

ABSL_FLAG(std::vector<std::string>, cases, {},
          "Case files to run (format dmapin-conformance/1); repeat the flag or give a comma "
          "separated list. Relative paths are taken from the directory `bazel run` started in.");
ABSL_FLAG(std::string, target, "in-process",
          "What to run the cases against: \"in-process\" (a Registry over a SimBackend, fresh "
          "for every case) or \"grpc\" (a freshly started dmapin-agent per case, over its Unix "
          "socket).");
ABSL_FLAG(std::string, agent_binary, "",
          "--target=grpc: the dmapin-agent executable. Default: $DMAPIN_AGENT_BINARY, else the "
          "agent among this runner's runfiles (bazel run).");
ABSL_FLAG(bool, verbose, false, "Print every case's name with PASS or FAIL.");

namespace {

constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;

// absl flags keep only the last occurrence of a flag; --cases may be repeated, so collect every
// occurrence from the command line itself (flags end at "--").
std::vector<std::string> CollectCaseArgs(int argc, char** argv) {
  std::vector<std::string> values;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (absl::StartsWith(arg, "--")) {
      arg.remove_prefix(2);
    } else if (absl::StartsWith(arg, "-")) {
      arg.remove_prefix(1);
    } else {
      continue;
    }
    if (absl::ConsumePrefix(&arg, "cases=")) {
      values.emplace_back(arg);
    } else if (arg == "cases" && i + 1 < argc) {
      values.emplace_back(argv[++i]);
    }
  }
  return values;
}

std::string ResolvePath(const std::string& path) {
  const char* working_dir = std::getenv("BUILD_WORKING_DIRECTORY");
  if (path.empty() || path[0] == '/' || working_dir == nullptr || *working_dir == '\0') {
    return path;
  }
  return absl::StrCat(working_dir, "/", path);
}

// The agent for --target=grpc: the flag (relative to where `bazel run` started), else
// $DMAPIN_AGENT_BINARY, else the runfiles' agent/dmapin-agent (bazel run starts in the runfiles
// tree of the workspace; argv[0].runfiles otherwise). Empty when none is found.
std::string FindAgentBinary(const char* argv0) {
  const std::string flag = absl::GetFlag(FLAGS_agent_binary);
  if (!flag.empty()) return ResolvePath(flag);
  if (const char* env = std::getenv("DMAPIN_AGENT_BINARY"); env != nullptr && *env != '\0') {
    return ResolvePath(env);
  }
  const std::string candidates[] = {
      "agent/dmapin-agent",
      absl::StrCat(argv0, ".runfiles/dmapin/agent/dmapin-agent"),
  };
  for (const std::string& candidate : candidates) {
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  // --help lists this file's flags (absl would look for a file named after the binary).
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "agent/conformance/");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  absl::SetProgramUsageMessage(
      "Runs dmapin conformance case files against a registry target.\n"
      "  conformance_runner --cases=FILE[,FILE...] [--cases=FILE] [--target=in-process|grpc] "
      "[--agent_binary=PATH] [--verbose]");
  const std::vector<std::string> case_args = CollectCaseArgs(argc, argv);
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    std::cerr << "conformance_runner: unexpected argument \"" << positional[1]
              << "\" (case files go in --cases)\n";
    return kExitUsage;
  }

  std::vector<std::string> paths;
  for (const std::string& arg : case_args) {
    for (absl::string_view path : absl::StrSplit(arg, ',', absl::SkipEmpty())) {
      paths.push_back(ResolvePath(std::string(path)));
    }
  }
  if (paths.empty()) {
    std::cerr << "conformance_runner: no case files; pass --cases=FILE\n";
    return kExitUsage;
  }

  dmapin::agent::conformance::TargetFactory factory;
  const std::string target = absl::GetFlag(FLAGS_target);
  if (target == "in-process") {
    factory = dmapin::agent::conformance::InProcessTargetFactory();
  } else if (target == "grpc") {
    dmapin::agent::conformance::GrpcTargetOptions grpc_options;
    grpc_options.agent_binary = FindAgentBinary(argv[0]);
    if (grpc_options.agent_binary.empty()) {
      std::cerr << "conformance_runner: --target=grpc needs --agent_binary=PATH (no agent found "
                   "in $DMAPIN_AGENT_BINARY or the runfiles)\n";
      return kExitUsage;
    }
    if (access(grpc_options.agent_binary.c_str(), X_OK) != 0) {
      std::cerr << "conformance_runner: --agent_binary=" << grpc_options.agent_binary
                << " is not an executable\n";
      return kExitUsage;
    }
    factory = dmapin::agent::conformance::GrpcTargetFactory(grpc_options);
  } else {
    std::cerr << "conformance_runner: unknown --target=" << target
              << " (\"in-process\" or \"grpc\")\n";
    return kExitUsage;
  }

  // Read every file before running anything: a bad file is a usage error, not a failure.
  std::vector<dmapin::agent::conformance::CaseFile> files;
  for (const std::string& path : paths) {
    absl::StatusOr<dmapin::agent::conformance::CaseFile> file =
        dmapin::agent::conformance::LoadCaseFile(path);
    if (!file.ok()) {
      std::cerr << "conformance_runner: " << file.status().message() << "\n";
      return kExitUsage;
    }
    files.push_back(*std::move(file));
  }

  dmapin::agent::conformance::RunOptions options;
  options.verbose = absl::GetFlag(FLAGS_verbose);
  dmapin::agent::conformance::Runner runner(factory, &std::cout, options);
  for (const dmapin::agent::conformance::CaseFile& file : files) runner.Run(file);
  runner.PrintSummary();
  return runner.all_passed() ? 0 : kExitFailed;
}
