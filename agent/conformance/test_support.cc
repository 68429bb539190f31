#include "agent/conformance/test_support.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "agent/conformance/case_file.h"
#include "agent/conformance/runner.h"
#include "gtest/gtest.h"

namespace dmapin::agent::conformance {
namespace {

namespace fs = std::filesystem;

// Tests run in the runfiles root of the workspace, where the data files keep their paths.
constexpr char kCasesDir[] = "agent/conformance/cases";
constexpr char kSharedFile[] = "conformance-cases.json";
// A data file of the tests that lives in the source tree.
constexpr char kOwnCaseFile[] = "agent/conformance/cases/lifecycle.json";
// The agent binary among the runfiles (data dependency //agent:dmapin-agent).
constexpr char kRunfilesAgent[] = "agent/dmapin-agent";

std::vector<fs::path> SharedCandidates() {
  std::vector<fs::path> candidates;
  if (const char* dir = std::getenv("DMAPIN_SHARED_DIR"); dir != nullptr && *dir != '\0') {
    const fs::path shared(dir);
    candidates.push_back(shared / "spec" / kSharedFile);
    candidates.push_back(shared / kSharedFile);
    candidates.push_back(shared);
  }
  std::error_code error;
  const fs::path own = fs::canonical(kOwnCaseFile, error);
  if (!error) {
    // <root>/agent/conformance/cases/lifecycle.json
    const fs::path root = own.parent_path().parent_path().parent_path().parent_path();
    candidates.push_back(root.parent_path() / "shared" / "spec" / kSharedFile);
  }
  if (const char* dir = std::getenv("BUILD_WORKSPACE_DIRECTORY"); dir != nullptr && *dir != '\0') {
    candidates.push_back(fs::path(dir).parent_path() / "shared" / "spec" / kSharedFile);
  }
  return candidates;
}

std::string& AgentBinaryStorage() {
  static std::string* binary = new std::string();
  return *binary;
}

}  // namespace

std::vector<std::string> OwnCaseFiles() {
  std::vector<std::string> paths;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(kCasesDir, error)) {
    if (entry.path().extension() == ".json") paths.push_back(entry.path().string());
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

std::optional<std::string> FindSharedCases(std::string* tried) {
  std::vector<std::string> paths;
  for (const fs::path& candidate : SharedCandidates()) {
    std::error_code error;
    if (fs::is_regular_file(candidate, error)) return candidate.string();
    paths.push_back(candidate.string());
  }
  *tried = paths.empty() ? "(no candidate; set DMAPIN_SHARED_DIR)" : absl::StrJoin(paths, ", ");
  return std::nullopt;
}

void ExpectEveryOwnCasePasses(const TargetFactory& factory, int min_cases) {
  const std::vector<std::string> paths = OwnCaseFiles();
  ASSERT_FALSE(paths.empty()) << "no case files in " << kCasesDir;
  std::set<std::string> names;
  int total = 0;
  for (const std::string& path : paths) {
    SCOPED_TRACE(path);
    absl::StatusOr<CaseFile> file = LoadCaseFile(path);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_FALSE(file->cases.empty());
    for (const Case& c : file->cases) {
      EXPECT_TRUE(names.insert(c.name).second) << "duplicate case name " << c.name;
      EXPECT_FALSE(c.spec.empty()) << c.name << " names no spec section";
    }
    std::ostringstream out;
    RunOptions options;
    options.verbose = true;
    const RunCounts counts = RunCases(file->cases, factory, out, options);
    std::cout << path << ":\n" << out.str();
    EXPECT_EQ(counts.failed, 0) << out.str();
    EXPECT_EQ(counts.passed, static_cast<int>(file->cases.size()));
    total += counts.passed + counts.failed;
  }
  EXPECT_GE(total, min_cases);
}

void ExpectEverySharedCasePasses(const TargetFactory& factory) {
  std::string tried;
  const std::optional<std::string> path = FindSharedCases(&tried);
  if (!path.has_value()) {
    GTEST_SKIP() << "shared conformance cases not found at " << tried << "; skipped";
  }
  absl::StatusOr<CaseFile> file = LoadCaseFile(*path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_FALSE(file->cases.empty()) << *path;
  std::ostringstream out;
  RunOptions options;
  options.verbose = true;
  const RunCounts counts = RunCases(file->cases, factory, out, options);
  std::cout << *path << ":\n" << out.str();
  EXPECT_EQ(counts.failed, 0) << out.str();
  EXPECT_EQ(counts.passed, static_cast<int>(file->cases.size()));
}

void SetAgentBinaryFromArgs(int* argc, char** argv) {
  std::string binary;
  int kept = 1;
  for (int i = 1; i < *argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--agent_binary=")) {
      binary = std::string(arg);
    } else {
      argv[kept++] = argv[i];
    }
  }
  *argc = kept;
  argv[kept] = nullptr;
  if (binary.empty()) {
    if (const char* env = std::getenv("DMAPIN_AGENT_BINARY"); env != nullptr && *env != '\0') {
      binary = env;
    } else {
      binary = kRunfilesAgent;
    }
  }
  std::error_code error;
  const fs::path absolute = fs::absolute(binary, error);
  AgentBinaryStorage() = error ? binary : absolute.string();
}

const std::string& AgentBinary() { return AgentBinaryStorage(); }

}  // namespace dmapin::agent::conformance
