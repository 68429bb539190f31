// Runs conformance cases against targets and reports the failures.
//
// Every case runs on a fresh target from the factory. After each step the runner compares the
// answer with the case's expectation and asks the target to check its invariants (spec §10);
// after the last step it closes the target (ConformanceTarget::Close).
// Output, one line per failing step:
//   FAIL <case> step <i> (<op>): wanted <expected>, got <actual>
// (steps count from 0; a message that spans lines, such as an agent's log, continues on lines
// indented by four spaces), a `FAIL <case> setup: ...` line when no target could be built, a
// `FAIL <case> close: ...` line when closing the target failed, with
// `verbose` a `PASS <case>` / `FAIL <case>` line per case, and finally `N passed, M failed`
// (counted in cases).
#ifndef DMAPIN_AGENT_CONFORMANCE_RUNNER_H_
#define DMAPIN_AGENT_CONFORMANCE_RUNNER_H_

#include <ostream>
#include <string>
#include <vector>

#include "agent/conformance/case_file.h"
#include "agent/conformance/target.h"

namespace dmapin::agent::conformance {

struct RunOptions {
  // Print every case's name with PASS or FAIL.
  bool verbose = false;
};

struct RunCounts {
  int passed = 0;
  int failed = 0;
};

// The failure lines of one case (empty when it passed), without trailing newlines.
std::vector<std::string> RunCase(const Case& test_case, const TargetFactory& factory);

// Runs cases one after another, printing to `out`; call PrintSummary() at the end.
class Runner {
 public:
  Runner(TargetFactory factory, std::ostream* out, RunOptions options = {});

  // Runs one case; true when it passed.
  bool Run(const Case& test_case);
  void Run(const CaseFile& file);

  const RunCounts& counts() const { return counts_; }
  bool all_passed() const { return counts_.failed == 0; }

  // Prints "N passed, M failed".
  void PrintSummary() const;

 private:
  TargetFactory factory_;
  std::ostream* out_;
  RunOptions options_;
  RunCounts counts_;
};

// Runs every case, prints failures and the summary line, and returns the counts.
RunCounts RunCases(const std::vector<Case>& cases, const TargetFactory& factory, std::ostream& out,
                   const RunOptions& options = {});

}  // namespace dmapin::agent::conformance

#endif  // DMAPIN_AGENT_CONFORMANCE_RUNNER_H_
