// Tests of the gRPC target against real dmapin-agent processes (--agent_binary).
#include "agent/conformance/grpc_target.h"

#include <signal.h>

#include <cerrno>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "agent/conformance/case_file.h"
#include "agent/conformance/in_process_target.h"
#include "agent/conformance/runner.h"
#include "agent/conformance/test_support.h"
#include "common/errno_status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin::agent::conformance {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;

GrpcTargetOptions Options() {
  GrpcTargetOptions options;
  options.agent_binary = AgentBinary();
  return options;
}

std::vector<Case> ParseInline(const std::string& text) {
  absl::StatusOr<CaseFile> file = ParseCaseFile(text, "inline.json");
  EXPECT_TRUE(file.ok()) << file.status();
  return file.ok() ? file->cases : std::vector<Case>();
}

// Two passing cases and one with a wrong expectation (step 1) and a wrong check (step 2).
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

TEST(GrpcTargetTest, ReportsLikeTheInProcessTarget) {
  std::ostringstream grpc_out;
  const RunCounts counts =
      RunCases(ParseInline(kInlineFile), GrpcTargetFactory(Options()), grpc_out);
  EXPECT_EQ(counts.passed, 2);
  EXPECT_EQ(counts.failed, 1);
  std::ostringstream in_process_out;
  RunCases(ParseInline(kInlineFile), InProcessTargetFactory(), in_process_out);
  const std::vector<std::string> lines = absl::StrSplit(grpc_out.str(), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 3u) << grpc_out.str();
  EXPECT_THAT(lines[0], StartsWith("FAIL register-twice-wrongly-expects-ok step 1 (register): "
                                   "wanted OK, got EBUSY: "));
  EXPECT_EQ(lines[1],
            "FAIL register-twice-wrongly-expects-ok step 2 (check): wanted locked_bytes=1048576 "
            "regions=2, got locked_bytes=1048576 regions=1");
  EXPECT_EQ(lines[2], "2 passed, 1 failed");
  // The same failures as in-process.
  const std::vector<std::string> in_process =
      absl::StrSplit(in_process_out.str(), '\n', absl::SkipEmpty());
  ASSERT_EQ(in_process.size(), 3u);
  EXPECT_EQ(lines[1], in_process[1]);
}

TEST(DecodeWireAnswerTest, CleanErrorCarriesTheTrailersErrno) {
  const std::multimap<grpc::string_ref, grpc::string_ref> trailers = {{"dmapin-errno", "EBUSY"}};
  const WireAnswer answer = DecodeWireAnswer(
      "UnregisterRegion",
      grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "EBUSY: region still mapped"), trailers);
  EXPECT_EQ(ErrnoOf(answer.status), EBUSY);
  EXPECT_EQ(answer.status.message(), "EBUSY: region still mapped");
  EXPECT_TRUE(answer.violations.empty());
  EXPECT_FALSE(answer.no_trailer);
  EXPECT_TRUE(DecodeWireAnswer("MapDma", grpc::Status::OK, {}).status.ok());
}

TEST(DecodeWireAnswerTest, EfaultMayBeOutOfRangeOrInternal) {
  for (grpc::StatusCode code : {grpc::StatusCode::OUT_OF_RANGE, grpc::StatusCode::INTERNAL}) {
    const WireAnswer answer = DecodeWireAnswer("Translate", grpc::Status(code, "EFAULT: outside"),
                                               {{"dmapin-errno", "EFAULT"}});
    EXPECT_EQ(ErrnoOf(answer.status), EFAULT);
    EXPECT_TRUE(answer.violations.empty()) << code;
  }
}

TEST(DecodeWireAnswerTest, ProtocolViolations) {
  // No trailer.
  WireAnswer answer = DecodeWireAnswer(
      "RegisterRegion", grpc::Status(grpc::StatusCode::UNAVAILABLE, "Socket closed"), {});
  EXPECT_TRUE(answer.no_trailer);
  EXPECT_EQ(ErrnoOf(answer.status), EIO);
  EXPECT_THAT(answer.violations, ElementsAre(HasSubstr("no \"dmapin-errno\" trailer")));
  // Unknown errno name.
  answer = DecodeWireAnswer("MapDma", grpc::Status(grpc::StatusCode::INTERNAL, "EWHAT: x"),
                            {{"dmapin-errno", "EWHAT"}});
  EXPECT_THAT(answer.violations, ElementsAre(HasSubstr("unknown errno \"EWHAT\"")));
  // Trailer and message disagree.
  answer = DecodeWireAnswer("MapDma", grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "EINVAL: x"),
                            {{"dmapin-errno", "ENXIO"}});
  EXPECT_EQ(ErrnoOf(answer.status), ENXIO);
  EXPECT_THAT(answer.violations,
              testing::Contains(HasSubstr("the trailer says ENXIO but the message does not")));
  // A code other than spec §9's.
  answer = DecodeWireAnswer("UnregisterRegion",
                            grpc::Status(grpc::StatusCode::UNAVAILABLE, "EBUSY: mapped"),
                            {{"dmapin-errno", "EBUSY"}});
  EXPECT_THAT(answer.violations, ElementsAre(HasSubstr("EBUSY came with gRPC code UNAVAILABLE")));
}

TEST(GrpcTargetTest, AgentArgsCarryTheNodeSettingsInCNotation) {
  Case node;
  node.page_size = 4096;
  node.holes = {Range{0x10050000, 0x10000}, Range{0x20000000, 0x1000}};
  node.readonly = {Range{0x30000000, 0x2000}};
  node.huge = {HugeRange{0x40000000, 0x2000000, 0x1000000}};
  const std::vector<std::string> args = GrpcTarget::AgentArgs(node, "/tmp/x");
  EXPECT_THAT(args, testing::IsSupersetOf({
                        "--backend=sim",
                        "--sim_page_size=0x1000",
                        "--sim_holes=0x10050000:0x10000,0x20000000:0x1000",
                        "--sim_readonly=0x30000000:0x2000",
                        "--sim_huge=0x40000000:0x2000000:0x1000000",
                        "--state_dir=/tmp/x/state",
                        "--tcp_address=",
                        "--uds_path=/tmp/x/agent.sock",
                    }));
}

TEST(GrpcTargetTest, BadNodeSettingsFailSetupWithTheAgentsLog) {
  const std::vector<Case> cases = ParseInline(R"({"format": "dmapin-conformance/1", "cases": [
    {"name": "bad-hole", "holes": [{"ua": "0x1000", "size": "0x1000"}], "steps": []}]})");
  const std::vector<std::string> failures = RunCase(cases.at(0), GrpcTargetFactory(Options()));
  ASSERT_EQ(failures.size(), 1u);
  EXPECT_THAT(failures[0], StartsWith("FAIL bad-hole setup: wanted a target, got"));
  EXPECT_THAT(failures[0], HasSubstr("before serving"));
  EXPECT_THAT(failures[0], HasSubstr("hole"));
}

TEST(GrpcTargetTest, DetectsAnAgentThatDies) {
  absl::StatusOr<std::unique_ptr<GrpcTarget>> target = GrpcTarget::Create(Case(), Options());
  ASSERT_TRUE(target.ok()) << target.status();
  ASSERT_TRUE((*target)->Register("default", "c1", 0x10000000, 0x100000).ok());
  ASSERT_TRUE((*target)->CheckInvariants().ok());
  ASSERT_EQ(kill((*target)->agent()->pid(), SIGKILL), 0);
  EXPECT_FALSE((*target)->Register("default", "c1", 0x20000000, 0x100000).ok());
  const absl::Status invariants = (*target)->CheckInvariants();
  EXPECT_THAT(std::string(invariants.message()), HasSubstr("killed by signal 9"));
  const absl::Status closed = (*target)->Close();
  EXPECT_FALSE(closed.ok());
  EXPECT_THAT(std::string(closed.message()), HasSubstr("before SIGTERM"));
}

TEST(GrpcTargetTest, CleanCloseIsOk) {
  absl::StatusOr<std::unique_ptr<GrpcTarget>> target = GrpcTarget::Create(Case(), Options());
  ASSERT_TRUE(target.ok()) << target.status();
  ASSERT_TRUE((*target)->Register("default", "c1", 0x10000000, 0x100000).ok());
  EXPECT_TRUE((*target)->Close().ok());
  EXPECT_TRUE((*target)->Close().ok());  // once only
}

TEST(GrpcTargetTest, NamesFollowTheRulesOfTargetH) {
  absl::StatusOr<std::unique_ptr<GrpcTarget>> made = GrpcTarget::Create(Case(), Options());
  ASSERT_TRUE(made.ok()) << made.status();
  GrpcTarget& target = **made;
  // Names the agent would refuse still work, and stay distinct.
  ASSERT_TRUE(target.Register("vm a", "dev 0", 0x10000000, 0x100000).ok());
  ASSERT_TRUE(target.Register("vm_a", "dev_0", 0x10000000, 0x200000).ok());
  absl::StatusOr<ContextState> a = target.GetContextState("vm a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->locked_bytes, 0x100000u);
  absl::StatusOr<ContextState> b = target.GetContextState("vm_a");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->locked_bytes, 0x200000u);

  // After teardown, checks see what is left of the context (nothing), its containers are gone,
  // and any other use of the name creates a fresh context.
  ASSERT_TRUE(target.TeardownContext("vm a").ok());
  absl::StatusOr<ContextState> left = target.GetContextState("vm a");
  ASSERT_TRUE(left.ok()) << left.status();
  EXPECT_EQ(left->locked_bytes, 0u);
  EXPECT_EQ(left->regions, 0u);
  absl::StatusOr<std::optional<RegionState>> region =
      target.FindRegion("vm a", 0x10000000, 0x100000);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_FALSE(region->has_value());
  // "dev 0" was bound to the torn-down context: a new container that never registered.
  EXPECT_EQ(ErrnoOf(target.Map("vm a", "dev 0", 0x0, 0x10000000, 0x10000)), EPERM);
  ASSERT_TRUE(target.Register("vm a", "dev 0", 0x10000000, 0x100000).ok());
  absl::StatusOr<ContextState> fresh = target.GetContextState("vm a");
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->regions, 1u);

  // A released container's name names a new container.
  ASSERT_TRUE(target.ReleaseContainer("dev_0").ok());
  EXPECT_EQ(ErrnoOf(target.Map("vm_a", "dev_0", 0x0, 0x10000000, 0x10000)), EPERM);
  // An explicitly created name in use is EEXIST from the agent.
  EXPECT_EQ(ErrnoOf(target.CreateContainer("dev 0", ContainerSettings())), EEXIST);
  EXPECT_TRUE(target.CheckInvariants().ok()) << target.CheckInvariants();
  EXPECT_TRUE(target.Close().ok());
}

}  // namespace
}  // namespace dmapin::agent::conformance

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  dmapin::agent::conformance::SetAgentBinaryFromArgs(&argc, argv);
  return RUN_ALL_TESTS();
}
