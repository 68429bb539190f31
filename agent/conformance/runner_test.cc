#include "agent/conformance/runner.h"

#include <cerrno>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_split.h"
#include "agent/conformance/case_file.h"
#include "agent/conformance/in_process_target.h"
#include "agent/conformance/target.h"
#include "common/errno_status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin::agent::conformance {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// Two passing cases and one with a deliberately wrong expectation (step 1 wants OK, the registry
// answers EBUSY) and a wrong check (step 2).
constexpr char kInlineFile[] = R"({
  "format": "dmapin-conformance/1",
  "cases": [
    {"name": "passes", "spec": "2.1", "steps": [
      {"op": "register", "container": "c1", "ua": "0x10000000", "size": "0x100000", "expect": "OK"},
      {"op": "check", "region": {"ua": "0x10000000", "size": "0x100000"}, "used": 1, "mapped": 1}
    ]},
    {"name": "register-twice-wrongly-expects-ok", "spec": "2.2", "steps": [
      {"op": "register", "container": "c1", "ua": "0x10000000", "size": "0x100000", "expect": "OK"},
      {"op": "register", "container": "c1", "ua": "0x10000000", "size": "0x100000", "expect": "OK"},
      {"op": "check", "locked_bytes": 1048576, "regions": 2},
      {"op": "check", "regions": 1}
    ]},
    {"name": "also-passes", "spec": "6", "page_size": 4096, "steps": [
      {"op": "register", "container": "c1", "ua": "0x10001000", "size": "0x2000", "expect": "OK"},
      {"op": "translate", "ua": "0x10001123", "expect": "OK", "page_offset": "0x123",
       "same_page_as": "0x10001000", "distinct_page_from": "0x10002000"},
      {"op": "lookup", "ua": "0x10002000", "size": "0x1000",
       "expect_region": {"ua": "0x10001000", "size": "0x2000"}}
    ]}
  ]
})";

std::vector<std::string> Lines(const std::string& text) {
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

std::vector<Case> ParseInline(const std::string& text) {
  absl::StatusOr<CaseFile> file = ParseCaseFile(text, "inline.json");
  EXPECT_TRUE(file.ok()) << file.status();
  return file.ok() ? file->cases : std::vector<Case>();
}

TEST(RunnerTest, CountsAndFailureLines) {
  std::ostringstream out;
  RunCounts counts = RunCases(ParseInline(kInlineFile), InProcessTargetFactory(), out);
  EXPECT_EQ(counts.passed, 2);
  EXPECT_EQ(counts.failed, 1);
  const std::vector<std::string> lines = Lines(out.str());
  ASSERT_EQ(lines.size(), 3u) << out.str();
  EXPECT_THAT(lines[0], StartsWith("FAIL register-twice-wrongly-expects-ok step 1 (register): "
                                   "wanted OK, got EBUSY"));
  EXPECT_EQ(lines[1],
            "FAIL register-twice-wrongly-expects-ok step 2 (check): wanted locked_bytes=1048576 "
            "regions=2, got locked_bytes=1048576 regions=1");
  EXPECT_EQ(lines[2], "2 passed, 1 failed");
}

TEST(RunnerTest, VerbosePrintsEveryCase) {
  std::ostringstream out;
  RunOptions options;
  options.verbose = true;
  RunCases(ParseInline(kInlineFile), InProcessTargetFactory(), out, options);
  const std::vector<std::string> lines = Lines(out.str());
  ASSERT_EQ(lines.size(), 6u) << out.str();
  EXPECT_EQ(lines[0], "PASS passes");
  EXPECT_THAT(lines[1], StartsWith("FAIL register-twice-wrongly-expects-ok step 1 (register)"));
  EXPECT_THAT(lines[2], StartsWith("FAIL register-twice-wrongly-expects-ok step 2 (check)"));
  EXPECT_EQ(lines[3], "FAIL register-twice-wrongly-expects-ok");
  EXPECT_EQ(lines[4], "PASS also-passes");
  EXPECT_EQ(lines[5], "2 passed, 1 failed");
}

TEST(RunnerTest, RunnerAccumulatesOverFiles) {
  std::ostringstream out;
  Runner runner(InProcessTargetFactory(), &out);
  const std::vector<Case> cases = ParseInline(kInlineFile);
  for (const Case& c : cases) runner.Run(c);
  for (const Case& c : cases) runner.Run(c);
  EXPECT_FALSE(runner.all_passed());
  runner.PrintSummary();
  EXPECT_EQ(Lines(out.str()).back(), "4 passed, 2 failed");
}

TEST(RunnerTest, TranslateLookupAndRegionMismatches) {
  const std::vector<Case> cases = ParseInline(R"({"format": "dmapin-conformance/1", "cases": [
    {"name": "wrong", "steps": [
      {"op": "register", "container": "c1", "ua": "0x10000000", "size": "0x100000", "expect": "OK"},
      {"op": "translate", "ua": "0x10031234", "expect": "OK", "page_offset": "0x1000"},
      {"op": "translate", "ua": "0x10031234", "expect": "OK", "same_page_as": "0x10040000"},
      {"op": "translate", "ua": "0x10031234", "expect": "OK", "distinct_page_from": "0x10030000"},
      {"op": "translate", "ua": "0x10031234", "expect": "EFAULT"},
      {"op": "lookup", "ua": "0x10000000", "size": "0x10000", "expect_region": null},
      {"op": "lookup", "ua": "0x10000000", "size": "0x200000",
       "expect_region": {"ua": "0x10000000", "size": "0x100000"}},
      {"op": "check", "region": {"ua": "0x10000000", "size": "0x100000"}, "absent": true},
      {"op": "check", "region": {"ua": "0x20000000", "size": "0x100000"}, "used": 1},
      {"op": "unregister", "container": "c1", "ua": "0x10000000", "size": "0x100000",
       "expect": "ENOENT"}
    ]}]})");
  std::vector<std::string> failures = RunCase(cases.at(0), InProcessTargetFactory());
  ASSERT_EQ(failures.size(), 9u);
  EXPECT_EQ(failures[0],
            "FAIL wrong step 1 (translate): wanted page_offset=0x1000, got "
            "page_offset=0x1234");
  EXPECT_THAT(failures[1], StartsWith("FAIL wrong step 2 (translate): wanted same page as "
                                      "0x10040000, got hpa 0x"));
  EXPECT_THAT(failures[2], StartsWith("FAIL wrong step 3 (translate): wanted other page than "
                                      "0x10030000, got hpa 0x"));
  EXPECT_EQ(failures[3], "FAIL wrong step 4 (translate): wanted EFAULT, got OK");
  EXPECT_EQ(failures[4],
            "FAIL wrong step 5 (lookup): wanted null, got region "
            "0x10000000+0x100000");
  EXPECT_EQ(failures[5],
            "FAIL wrong step 6 (lookup): wanted region 0x10000000+0x100000, got "
            "null");
  EXPECT_EQ(failures[6],
            "FAIL wrong step 7 (check): wanted region 0x10000000+0x100000 absent, "
            "got region 0x10000000+0x100000 present used=1 mapped=1");
  EXPECT_EQ(failures[7],
            "FAIL wrong step 8 (check): wanted region 0x20000000+0x100000 used=1, "
            "got region 0x20000000+0x100000 absent");
  EXPECT_EQ(failures[8], "FAIL wrong step 9 (unregister): wanted ENOENT, got OK");
}

// A target that answers every op with a fixed status and can report an invariant violation.
class FakeTarget : public ConformanceTarget {
 public:
  FakeTarget(absl::Status answer, absl::Status invariants, absl::Status close = absl::OkStatus())
      : answer_(std::move(answer)), invariants_(std::move(invariants)), close_(std::move(close)) {}

  std::string name() const override { return "fake"; }
  absl::Status CreateContainer(absl::string_view, const ContainerSettings&) override {
    return answer_;
  }
  absl::Status ReleaseContainer(absl::string_view) override { return answer_; }
  absl::Status TeardownContext(absl::string_view) override { return answer_; }
  absl::Status Register(absl::string_view, absl::string_view, uint64_t, uint64_t) override {
    return answer_;
  }
  absl::Status Unregister(absl::string_view, absl::string_view, uint64_t, uint64_t) override {
    return answer_;
  }
  absl::Status Map(absl::string_view, absl::string_view, uint64_t, uint64_t, uint64_t) override {
    return answer_;
  }
  absl::Status Unmap(absl::string_view, absl::string_view, uint64_t, uint64_t) override {
    return answer_;
  }
  absl::StatusOr<uint64_t> Translate(absl::string_view, uint64_t) override { return answer_; }
  absl::StatusOr<std::optional<Range>> Lookup(absl::string_view, uint64_t, uint64_t) override {
    return answer_;
  }
  absl::StatusOr<std::optional<RegionState>> FindRegion(absl::string_view, uint64_t,
                                                        uint64_t) override {
    return answer_;
  }
  absl::StatusOr<ContextState> GetContextState(absl::string_view) override { return answer_; }
  absl::Status CheckInvariants() override { return invariants_; }
  absl::Status Close() override { return close_; }

 private:
  absl::Status answer_;
  absl::Status invariants_;
  absl::Status close_;
};

TargetFactory FakeFactory(absl::Status answer, absl::Status invariants,
                          absl::Status close = absl::OkStatus()) {
  return [answer, invariants,
          close](const Case&) -> absl::StatusOr<std::unique_ptr<ConformanceTarget>> {
    return std::unique_ptr<ConformanceTarget>(new FakeTarget(answer, invariants, close));
  };
}

constexpr char kOneRegister[] = R"({"format": "dmapin-conformance/1", "cases": [
  {"name": "one", "steps": [
    {"op": "register", "container": "c1", "ua": "0x10000000", "size": "0x100000", "expect": "OK"}
  ]}]})";

TEST(RunnerTest, InvariantViolationIsAFailure) {
  std::ostringstream out;
  RunCounts counts =
      RunCases(ParseInline(kOneRegister),
               FakeFactory(absl::OkStatus(), absl::InternalError("invariant 3: off by one")), out);
  EXPECT_EQ(counts.passed, 0);
  EXPECT_EQ(counts.failed, 1);
  EXPECT_THAT(Lines(out.str()),
              ElementsAre("FAIL one step 0 (register): wanted invariants to hold, got invariant "
                          "violation: INTERNAL: invariant 3: off by one",
                          "0 passed, 1 failed"));
}

TEST(RunnerTest, WrongAnswerAndInvariantViolationShareOneLine) {
  std::ostringstream out;
  RunCases(ParseInline(kOneRegister),
           FakeFactory(ErrnoStatus(EBUSY, "busy"), absl::InternalError("broken")), out);
  EXPECT_THAT(Lines(out.str()),
              ElementsAre("FAIL one step 0 (register): wanted OK, got EBUSY: busy; invariant "
                          "violation: INTERNAL: broken",
                          "0 passed, 1 failed"));
}

TEST(RunnerTest, StatusWithoutErrnoIsShownWhole) {
  std::ostringstream out;
  RunCases(ParseInline(kOneRegister),
           FakeFactory(absl::UnavailableError("agent is down"), absl::OkStatus()), out);
  EXPECT_THAT(Lines(out.str()),
              ElementsAre("FAIL one step 0 (register): wanted OK, got EIO (UNAVAILABLE: agent is "
                          "down)",
                          "0 passed, 1 failed"));
}

TEST(RunnerTest, CloseFailureIsAFailureWithIndentedContinuationLines) {
  std::ostringstream out;
  RunCounts counts = RunCases(
      ParseInline(kOneRegister),
      FakeFactory(absl::OkStatus(), absl::OkStatus(),
                  absl::UnavailableError("the agent died; its log ends:\nline 1\nline 2\n")),
      out);
  EXPECT_EQ(counts.failed, 1);
  EXPECT_THAT(Lines(out.str()),
              ElementsAre("FAIL one close: wanted a clean end, got UNAVAILABLE: the agent died; "
                          "its log ends:",
                          "    line 1", "    line 2", "0 passed, 1 failed"));
}

TEST(RunnerTest, SetupFailureIsAFailure) {
  std::ostringstream out;
  TargetFactory factory = [](const Case&) -> absl::StatusOr<std::unique_ptr<ConformanceTarget>> {
    return absl::UnavailableError("no agent");
  };
  RunCounts counts = RunCases(ParseInline(kOneRegister), factory, out);
  EXPECT_EQ(counts.failed, 1);
  EXPECT_THAT(Lines(out.str()), ElementsAre("FAIL one setup: wanted a target, got UNAVAILABLE: "
                                            "no agent",
                                            "0 passed, 1 failed"));
}

TEST(RunnerTest, BadNodeSettingsFailSetup) {
  // A hole that is not page aligned is refused by the simulated backend.
  const std::vector<Case> cases = ParseInline(R"({"format": "dmapin-conformance/1", "cases": [
    {"name": "bad-hole", "holes": [{"ua": "0x1000", "size": "0x1000"}], "steps": []}]})");
  std::vector<std::string> failures = RunCase(cases.at(0), InProcessTargetFactory());
  ASSERT_EQ(failures.size(), 1u);
  EXPECT_THAT(failures[0], StartsWith("FAIL bad-hole setup: wanted a target, got"));
  EXPECT_THAT(failures[0], HasSubstr("hole"));
}

TEST(RunnerTest, EmptyRunPrintsZeroCounts) {
  std::ostringstream out;
  RunCounts counts = RunCases({}, InProcessTargetFactory(), out);
  EXPECT_EQ(counts.passed, 0);
  EXPECT_EQ(counts.failed, 0);
  EXPECT_EQ(out.str(), "0 passed, 0 failed\n");
}

}  // namespace
}  // namespace dmapin::agent::conformance
