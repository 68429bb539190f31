// Runs the project's own conformance cases (cases/*.json, data of this test) in-process.
#include "agent/conformance/in_process_target.h"
#include "agent/conformance/test_support.h"
#include "gtest/gtest.h"

namespace dmapin::agent::conformance {
namespace {

TEST(ConformanceOwnTest, EveryOwnCasePasses) { ExpectEveryOwnCasePasses(InProcessTargetFactory()); }

}  // namespace
}  // namespace dmapin::agent::conformance
