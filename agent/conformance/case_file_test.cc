#include "agent/conformance/case_file.h"

#include <cerrno>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin::agent::conformance {
namespace {

using ::testing::HasSubstr;

// A file with one case whose steps are `steps` (a JSON list body) and extra case fields.
std::string OneCase(const std::string& steps, const std::string& extra = "") {
  return absl::StrCat(R"({"format": "dmapin-conformance/1", "cases": [{"name": "c", )", extra,
                      R"("steps": [)", steps, "]}]}");
}

absl::StatusOr<Step> OneStep(const std::string& step) {
  absl::StatusOr<CaseFile> file = ParseCaseFile(OneCase(step), "test.json");
  if (!file.ok()) return file.status();
  return file->cases.at(0).steps.at(0);
}

void ExpectError(const std::string& text, const std::string& message_part) {
  absl::StatusOr<CaseFile> file = ParseCaseFile(text, "test.json");
  ASSERT_FALSE(file.ok()) << text;
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(message_part));
}

TEST(ParseCNumberTest, AcceptsCNotation) {
  EXPECT_EQ(ParseCNumber("0"), 0u);
  EXPECT_EQ(ParseCNumber("65536"), 65536u);
  EXPECT_EQ(ParseCNumber("0x10000"), 0x10000u);
  EXPECT_EQ(ParseCNumber("0XfFfF"), 0xffffu);
  EXPECT_EQ(ParseCNumber("0200000"), 0200000u);
  EXPECT_EQ(ParseCNumber("0xffffffffffffffff"), UINT64_MAX);
  EXPECT_EQ(ParseCNumber("18446744073709551615"), UINT64_MAX);
}

TEST(ParseCNumberTest, RejectsOthers) {
  for (const char* text : {"", "0x", "-1", "+1", " 1", "1 ", "0x10000000000000000",
                           "18446744073709551616", "09", "12a", "0xg", "1e3", "1.0", "0b101"}) {
    EXPECT_EQ(ParseCNumber(text), std::nullopt) << text;
  }
}

TEST(CaseFileTest, CaseDefaults) {
  absl::StatusOr<CaseFile> file =
      ParseCaseFile(OneCase(R"({"op": "check", "regions": 0})"), "test.json");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->source, "test.json");
  ASSERT_EQ(file->cases.size(), 1u);
  const Case& c = file->cases[0];
  EXPECT_EQ(c.name, "c");
  EXPECT_EQ(c.spec, "");
  EXPECT_EQ(c.page_size, 65536u);
  EXPECT_EQ(c.memlock_limit, std::nullopt);
  EXPECT_FALSE(c.cap_ipc_lock);
  EXPECT_TRUE(c.holes.empty());
  EXPECT_TRUE(c.readonly.empty());
  EXPECT_TRUE(c.huge.empty());
  ASSERT_EQ(c.steps.size(), 1u);
  EXPECT_EQ(c.steps[0].context, "default");
}

TEST(CaseFileTest, CaseNodeSettings) {
  absl::StatusOr<CaseFile> file =
      ParseCaseFile(OneCase("", R"("spec": "2.2 8", "page_size": "0x1000", "memlock_limit": 1048576,
                     "cap_ipc_lock": true,
                     "holes": [{"ua": "0x10050000", "size": 65536}],
                     "readonly": [{"ua": 4096, "size": "0x2000"}],
                     "huge": [{"ua": "0x40000000", "size": "0x2000000", "page_size": "0x1000000"}],
                     )"),
                    "test.json");
  ASSERT_TRUE(file.ok()) << file.status();
  const Case& c = file->cases[0];
  EXPECT_EQ(c.spec, "2.2 8");
  EXPECT_EQ(c.page_size, 4096u);
  EXPECT_EQ(c.memlock_limit, 1048576u);
  EXPECT_TRUE(c.cap_ipc_lock);
  ASSERT_EQ(c.holes.size(), 1u);
  EXPECT_EQ(c.holes[0], (Range{0x10050000, 0x10000}));
  ASSERT_EQ(c.readonly.size(), 1u);
  EXPECT_EQ(c.readonly[0], (Range{0x1000, 0x2000}));
  ASSERT_EQ(c.huge.size(), 1u);
  EXPECT_EQ(c.huge[0].ua, 0x40000000u);
  EXPECT_EQ(c.huge[0].size, 0x2000000u);
  EXPECT_EQ(c.huge[0].page_size, 0x1000000u);
  EXPECT_TRUE(c.steps.empty());
}

TEST(CaseFileTest, MemlockLimitNullIsUnlimited) {
  absl::StatusOr<CaseFile> file = ParseCaseFile(OneCase("", R"("memlock_limit": null,)"), "t");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->cases[0].memlock_limit, std::nullopt);
}

TEST(CaseFileTest, RegisterAndFriends) {
  absl::StatusOr<Step> step = OneStep(
      R"({"op": "register", "container": "c1", "ua": "0x10000000", "size": 1048576,
          "expect": "EBUSY", "context": "vm-a"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kRegister);
  EXPECT_EQ(step->container, "c1");
  EXPECT_EQ(step->context, "vm-a");
  EXPECT_EQ(step->ua, 0x10000000u);
  EXPECT_EQ(step->size, 0x100000u);
  EXPECT_EQ(step->expect, EBUSY);

  step = OneStep(
      R"({"op": "unregister", "container": "c1", "ua": "0", "size": "0x10000", "expect": "OK"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kUnregister);
  EXPECT_EQ(step->expect, 0);

  step = OneStep(
      R"({"op": "map", "container": "c1", "iova": "0x20000", "ua": 18446744073709486080,
          "size": "0x10000", "expect": "ENXIO"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kMap);
  EXPECT_EQ(step->iova, 0x20000u);
  EXPECT_EQ(step->ua, 0xffffffffffff0000u);
  EXPECT_EQ(step->expect, ENXIO);

  step = OneStep(R"({"op": "unmap", "container": "c1", "iova": 0, "size": "0x10000",
                     "expect": "EINVAL"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kUnmap);
  EXPECT_EQ(step->expect, EINVAL);
}

TEST(CaseFileTest, ContainerAndContextOps) {
  absl::StatusOr<Step> step = OneStep(R"({"op": "create_container", "container": "c1"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kCreateContainer);
  EXPECT_EQ(step->iommu_page_size, std::nullopt);
  EXPECT_EQ(step->window_start, std::nullopt);
  EXPECT_EQ(step->window_size, std::nullopt);
  EXPECT_EQ(step->expect, 0);

  step = OneStep(
      R"({"op": "create_container", "container": "c1", "iommu_page_size": "0x1000000",
          "window_start": "0x80000000", "window_size": "0x10000000"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->iommu_page_size, 0x1000000u);
  EXPECT_EQ(step->window_start, 0x80000000u);
  EXPECT_EQ(step->window_size, 0x10000000u);

  step = OneStep(R"({"op": "release_container", "container": "c2"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kReleaseContainer);
  EXPECT_EQ(step->container, "c2");
  EXPECT_EQ(step->expect, 0);

  step = OneStep(R"({"op": "teardown_context", "context": "vm-a"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kTeardownContext);
  EXPECT_EQ(step->context, "vm-a");
}

TEST(CaseFileTest, TranslateAndLookup) {
  absl::StatusOr<Step> step = OneStep(
      R"({"op": "translate", "ua": "0x10031234", "expect": "OK", "page_offset": "0x1234",
          "same_page_as": "0x10030000", "distinct_page_from": "0x10040000"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kTranslate);
  EXPECT_EQ(step->page_offset, 0x1234u);
  EXPECT_EQ(step->same_page_as, 0x10030000u);
  EXPECT_EQ(step->distinct_page_from, 0x10040000u);

  step = OneStep(R"({"op": "translate", "ua": "0x10100000", "expect": "EFAULT"})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->expect, EFAULT);
  EXPECT_EQ(step->page_offset, std::nullopt);

  step = OneStep(R"({"op": "lookup", "ua": "0x10000000", "size": "0x10000",
                     "expect_region": {"ua": "0x10000000", "size": "0x100000"}})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kLookup);
  EXPECT_EQ(step->expect_region, (Range{0x10000000, 0x100000}));

  step = OneStep(R"({"op": "lookup", "ua": 1, "size": 2, "expect_region": null})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->expect_region, std::nullopt);
}

TEST(CaseFileTest, Checks) {
  absl::StatusOr<Step> step = OneStep(
      R"({"op": "check", "region": {"ua": "0x10000000", "size": "0x100000"}, "used": 1,
          "mapped": 3, "locked_bytes": "0x100000", "regions": 1})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->op, Op::kCheck);
  EXPECT_EQ(step->region, (Range{0x10000000, 0x100000}));
  EXPECT_EQ(step->used, 1u);
  EXPECT_EQ(step->mapped, 3u);
  EXPECT_FALSE(step->absent);
  EXPECT_EQ(step->locked_bytes, 0x100000u);
  EXPECT_EQ(step->regions, 1u);

  step = OneStep(
      R"({"op": "check", "region": {"ua": "0x10000000", "size": "0x100000"}, "absent": true})");
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_TRUE(step->absent);
  EXPECT_EQ(step->used, std::nullopt);
}

TEST(CaseFileTest, FileLevelErrors) {
  ExpectError("{", "test.json: not valid JSON");
  ExpectError("[]", "want a JSON object");
  ExpectError(R"({"cases": []})", "field 'format': missing required field");
  ExpectError(R"({"format": "dmapin-conformance/2", "cases": []})",
              "field 'format': unsupported format \"dmapin-conformance/2\"");
  ExpectError(R"({"format": "dmapin-conformance/1"})", "field 'cases': missing required field");
  ExpectError(R"({"format": "dmapin-conformance/1", "cases": {}})", "field 'cases': want a list");
  ExpectError(R"({"format": "dmapin-conformance/1", "cases": [{"steps": []}]})",
              "case #0: field 'name': missing required field");
}

TEST(CaseFileTest, CaseLevelErrors) {
  ExpectError(OneCase("", R"("page_size": 5000,)"), "case 'c': field 'page_size'");
  ExpectError(OneCase("", R"("page_size": "64k",)"), "case 'c': field 'page_size': bad number");
  ExpectError(OneCase("", R"("cap_ipc_lock": 1,)"), "case 'c': field 'cap_ipc_lock'");
  ExpectError(OneCase("", R"("holes": [{"ua": 0}],)"), "case 'c': field 'holes[0].size'");
  ExpectError(OneCase("", R"("huge": [{"ua": 0, "size": 0}],)"),
              "case 'c': field 'huge[0].page_size': missing required field");
  ExpectError(R"({"format": "dmapin-conformance/1", "cases": [{"name": "c"}]})",
              "case 'c': field 'steps': missing required field");
}

TEST(CaseFileTest, StepErrorsNameCaseStepAndField) {
  const std::string ok_step = R"({"op": "check", "regions": 0}, )";
  ExpectError(OneCase(ok_step + R"({"op": "frobnicate"})"),
              "test.json: case 'c' step 1: field 'op': unknown op \"frobnicate\"");
  ExpectError(OneCase(ok_step + R"({"container": "c1"})"),
              "case 'c' step 1: field 'op': missing required field");
  ExpectError(OneCase(ok_step + R"({"op": "register", "container": "c1", "size": 1,
                                    "expect": "OK"})"),
              "case 'c' step 1 (register): field 'ua': missing required field");
  ExpectError(OneCase(R"({"op": "register", "container": "c1", "ua": "0x1g", "size": 1,
                          "expect": "OK"})"),
              "case 'c' step 0 (register): field 'ua': bad number \"0x1g\"");
  ExpectError(OneCase(R"({"op": "register", "container": "c1", "ua": -4096, "size": 1,
                          "expect": "OK"})"),
              "step 0 (register): field 'ua': bad number -4096");
  ExpectError(OneCase(R"({"op": "register", "container": "c1", "ua": 1.5, "size": 1,
                          "expect": "OK"})"),
              "step 0 (register): field 'ua': bad number 1.5");
  ExpectError(OneCase(R"({"op": "register", "container": "c1", "ua": 0, "size": 1})"),
              "step 0 (register): field 'expect': missing required field");
  ExpectError(OneCase(R"({"op": "register", "container": "c1", "ua": 0, "size": 1,
                          "expect": "EWHATEVER"})"),
              "step 0 (register): field 'expect': unknown answer \"EWHATEVER\"");
  ExpectError(OneCase(R"({"op": "register", "ua": 0, "size": 1, "expect": "OK"})"),
              "step 0 (register): field 'container': missing required field");
  ExpectError(OneCase(R"({"op": "map", "container": "c1", "ua": 0, "size": 1, "expect": "OK"})"),
              "step 0 (map): field 'iova': missing required field");
  ExpectError(OneCase(R"({"op": "teardown_context"})"),
              "step 0 (teardown_context): field 'context': missing required field");
  ExpectError(OneCase(R"({"op": "lookup", "ua": 0, "size": 1})"),
              "step 0 (lookup): field 'expect_region': missing required field");
  ExpectError(OneCase(R"({"op": "lookup", "ua": 0, "size": 1, "expect_region": {"ua": 0}})"),
              "step 0 (lookup): field 'expect_region.size': missing required field");
  ExpectError(OneCase(R"({"op": "check", "used": 1})"), "step 0 (check): field 'used'");
  ExpectError(OneCase(R"({"op": "check"})"), "step 0 (check): field 'region'");
  ExpectError(OneCase(R"({"op": "check", "region": {"ua": 0, "size": 1}})"),
              "step 0 (check): field 'region': needs");
  ExpectError(OneCase(R"({"op": "translate", "ua": 0, "expect": "EFAULT", "page_offset": 0})"),
              "step 0 (translate): field 'expect'");
  ExpectError(OneCase(R"({"op": "check", "regions": 0, "context": 7})"),
              "step 0 (check): field 'context': want a string");
  ExpectError(OneCase(R"("not a step")"), "case 'c' step 0: want an object");
}

TEST(CaseFileTest, LoadMissingFileIsNotFound) {
  absl::StatusOr<CaseFile> file = LoadCaseFile("/nonexistent/cases.json");
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("/nonexistent/cases.json"));
}

TEST(CaseFileTest, OpNamesRoundTrip) {
  for (const char* name :
       {"create_container", "register", "unregister", "map", "unmap", "release_container",
        "teardown_context", "translate", "lookup", "check"}) {
    std::optional<Op> op = OpFromName(name);
    ASSERT_TRUE(op.has_value()) << name;
    EXPECT_EQ(OpName(*op), name);
  }
  EXPECT_EQ(OpFromName("Register"), std::nullopt);
  EXPECT_EQ(ExpectName(0), "OK");
  EXPECT_EQ(ExpectName(EBUSY), "EBUSY");
}

}  // namespace
}  // namespace dmapin::agent::conformance
