// Runs the shared conformance cases (../shared/spec/conformance-cases.json, outside the
// workspace) in-process.
//
// Where the file is looked for, in order:
//  1. $DMAPIN_SHARED_DIR: the shared directory (…/shared), its spec/ directory, or the file;
//     bazel test --test_env=DMAPIN_SHARED_DIR=$(realpath ../shared) ...
//  2. Next to the workspace: the own case files among this test's runfiles are symlinks into the
//     source tree, which gives the workspace root; then <root>/../shared/spec/.
//  3. $BUILD_WORKSPACE_DIRECTORY/../shared/spec/ (bazel run).
// When none exists the test is skipped, not failed.
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "agent/conformance/case_file.h"
#include "agent/conformance/in_process_target.h"
#include "agent/conformance/runner.h"
#include "gtest/gtest.h"

namespace dmapin {
namespace conformance {
namespace {

namespace fs = std::filesystem;

constexpr char kSharedFile[] = "conformance-cases.json";
// A data file of this test that lives in the source tree.
constexpr char kOwnCaseFile[] = "agent/conformance/cases/lifecycle.json";

std::vector<fs::path> Candidates() {
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

std::optional<std::string> FindSharedCases(std::string* tried) {
  std::vector<std::string> paths;
  for (const fs::path& candidate : Candidates()) {
    std::error_code error;
    if (fs::is_regular_file(candidate, error)) return candidate.string();
    paths.push_back(candidate.string());
  }
  *tried = paths.empty() ? "(no candidate; set DMAPIN_SHARED_DIR)" : absl::StrJoin(paths, ", ");
  return std::nullopt;
}

TEST(ConformanceSharedTest, EverySharedCasePasses) {
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
  const RunCounts counts = RunCases(file->cases, InProcessTargetFactory(), out, options);
  std::cout << *path << ":\n" << out.str();
  EXPECT_EQ(counts.failed, 0) << out.str();
  EXPECT_EQ(counts.passed, static_cast<int>(file->cases.size()));
}

}  // namespace
}  // namespace conformance
}  // namespace dmapin
