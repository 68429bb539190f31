// Runs the project's own conformance cases (cases/*.json, data of this test) in-process.
#include <algorithm>
#include <filesystem>
#include <iostream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "agent/conformance/case_file.h"
#include "agent/conformance/in_process_target.h"
#include "agent/conformance/runner.h"
#include "gtest/gtest.h"

namespace dmapin {
namespace conformance {
namespace {

// Tests run in the runfiles root of the workspace, where the data files keep their paths.
constexpr char kCasesDir[] = "agent/conformance/cases";

std::vector<std::string> OwnCaseFiles() {
  std::vector<std::string> paths;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(kCasesDir, error)) {
    if (entry.path().extension() == ".json") paths.push_back(entry.path().string());
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

TEST(ConformanceOwnTest, EveryOwnCasePasses) {
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
    const RunCounts counts = RunCases(file->cases, InProcessTargetFactory(), out, options);
    std::cout << path << ":\n" << out.str();
    EXPECT_EQ(counts.failed, 0) << out.str();
    EXPECT_EQ(counts.passed, static_cast<int>(file->cases.size()));
    total += counts.passed + counts.failed;
  }
  EXPECT_GE(total, 25);
}

}  // namespace
}  // namespace conformance
}  // namespace dmapin
