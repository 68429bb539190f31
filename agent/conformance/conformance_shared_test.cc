// Runs the shared conformance cases (../shared/spec/conformance-cases.json, outside the
// workspace) in-process. Where the file is looked for: FindSharedCases() in test_support.h; when
// it is not found the test is skipped, not failed.
#include "agent/conformance/in_process_target.h"
#include "agent/conformance/test_support.h"
#include "gtest/gtest.h"

namespace dmapin::agent::conformance {
namespace {

TEST(ConformanceSharedTest, EverySharedCasePasses) {
  ExpectEverySharedCasePasses(InProcessTargetFactory());
}

}  // namespace
}  // namespace dmapin::agent::conformance
