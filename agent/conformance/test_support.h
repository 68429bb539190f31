// What the conformance tests share: where the case files are, how every case of a file is run
// and reported through gtest, and the agent binary the gRPC tests start.
#ifndef DMAPIN_AGENT_CONFORMANCE_TEST_SUPPORT_H_
#define DMAPIN_AGENT_CONFORMANCE_TEST_SUPPORT_H_

#include <optional>
#include <string>
#include <vector>

#include "agent/conformance/target.h"

namespace dmapin::agent::conformance {

// The project's own case files (cases/*.json among the test's runfiles), sorted.
std::vector<std::string> OwnCaseFiles();

// The shared case file (../shared/spec/conformance-cases.json, outside the workspace). Looked
// for, in order:
//  1. $DMAPIN_SHARED_DIR: the shared directory (…/shared), its spec/ directory, or the file;
//     bazel test --test_env=DMAPIN_SHARED_DIR=$(realpath ../shared) ...
//  2. Next to the workspace: the own case files among the test's runfiles are symlinks into the
//     source tree, which gives the workspace root; then <root>/../shared/spec/.
//  3. $BUILD_WORKSPACE_DIRECTORY/../shared/spec/ (bazel run).
// nullopt when none exists; `tried` then lists the candidates.
std::optional<std::string> FindSharedCases(std::string* tried);

// Runs every own case file against `factory`: each case must pass, names must be unique and
// name a spec section, and there must be at least `min_cases` cases.
void ExpectEveryOwnCasePasses(const TargetFactory& factory, int min_cases = 25);

// Runs the shared case file against `factory` (every case must pass); skips the test with a
// message when the file is not found.
void ExpectEverySharedCasePasses(const TargetFactory& factory);

// The dmapin-agent binary for the gRPC tests: the value of --agent_binary=PATH (removed from
// argv; Bazel passes $(rootpath //agent:dmapin-agent)), else $DMAPIN_AGENT_BINARY, else
// agent/dmapin-agent among the runfiles. Call from main() after testing::InitGoogleTest().
void SetAgentBinaryFromArgs(int* argc, char** argv);
const std::string& AgentBinary();

}  // namespace dmapin::agent::conformance

#endif  // DMAPIN_AGENT_CONFORMANCE_TEST_SUPPORT_H_
