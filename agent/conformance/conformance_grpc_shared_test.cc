// Runs the shared conformance cases (../shared/spec/conformance-cases.json, outside the
// workspace) over gRPC, each against a freshly started dmapin-agent (--agent_binary, passed by
// the BUILD rule). Found like the in-process shared test (FindSharedCases() in test_support.h);
// skipped when the file is not there.
#include "agent/conformance/grpc_target.h"
#include "agent/conformance/test_support.h"
#include "gtest/gtest.h"

namespace dmapin::agent::conformance {
namespace {

TEST(ConformanceGrpcSharedTest, EverySharedCasePasses) {
  GrpcTargetOptions options;
  options.agent_binary = AgentBinary();
  ExpectEverySharedCasePasses(GrpcTargetFactory(options));
}

}  // namespace
}  // namespace dmapin::agent::conformance

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  dmapin::agent::conformance::SetAgentBinaryFromArgs(&argc, argv);
  return RUN_ALL_TESTS();
}
