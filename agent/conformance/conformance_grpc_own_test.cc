// Runs the project's own conformance cases (cases/*.json) over gRPC, each against a freshly
// started dmapin-agent (--agent_binary, passed by the BUILD rule).
#include "agent/conformance/grpc_target.h"
#include "agent/conformance/test_support.h"
#include "gtest/gtest.h"

namespace dmapin::agent::conformance {
namespace {

TEST(ConformanceGrpcOwnTest, EveryOwnCasePasses) {
  GrpcTargetOptions options;
  options.agent_binary = AgentBinary();
  ExpectEveryOwnCasePasses(GrpcTargetFactory(options));
}

}  // namespace
}  // namespace dmapin::agent::conformance

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  dmapin::agent::conformance::SetAgentBinaryFromArgs(&argc, argv);
  return RUN_ALL_TESTS();
}
