#include "agent/conformance/runner.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "common/errno_status.h"

namespace dmapin::agent::conformance {
namespace {

std::string Hex(uint64_t value) { return absl::StrFormat("0x%x", value); }

std::string ShowRange(const Range& range) {
  return absl::StrCat("region ", Hex(range.ua), "+", Hex(range.size));
}

// How an answer reads in a failure line: "OK", or the errno with the status message.
std::string Answer(const absl::Status& status) {
  if (status.ok()) return "OK";
  const std::string name = ErrnoName(ErrnoOf(status));
  if (absl::StartsWith(status.message(), absl::StrCat(name, ":"))) {
    return std::string(status.message());
  }
  return absl::StrCat(name, " (", status.ToString(), ")");
}

// What a step wanted and what it got, when they differ.
struct Mismatch {
  std::string wanted;
  std::string got;
};

std::optional<Mismatch> CompareStatus(int expect, const absl::Status& status) {
  if (ErrnoOf(status) == expect) return std::nullopt;
  return Mismatch{ExpectName(expect), Answer(status)};
}

// Accumulates field comparisons of one step ("used=2" against "used=1").
class Comparison {
 public:
  void Add(absl::string_view field, const std::string& wanted, const std::string& got) {
    wanted_.push_back(absl::StrCat(field, wanted));
    got_.push_back(absl::StrCat(field, got));
    if (wanted != got) mismatch_ = true;
  }
  void Fail(const std::string& wanted, const std::string& got) {
    wanted_.push_back(wanted);
    got_.push_back(got);
    mismatch_ = true;
  }
  std::optional<Mismatch> Result() const {
    if (!mismatch_) return std::nullopt;
    return Mismatch{absl::StrJoin(wanted_, " "), absl::StrJoin(got_, " ")};
  }

 private:
  std::vector<std::string> wanted_;
  std::vector<std::string> got_;
  bool mismatch_ = false;
};

std::optional<Mismatch> RunTranslate(ConformanceTarget& target, const Case& test_case,
                                     const Step& step) {
  absl::StatusOr<uint64_t> hpa = target.Translate(step.context, step.ua);
  if (std::optional<Mismatch> mismatch = CompareStatus(step.expect, hpa.status())) {
    return mismatch;
  }
  if (!hpa.ok()) return std::nullopt;
  const uint64_t page_mask = test_case.page_size - 1;
  Comparison comparison;
  if (step.page_offset.has_value()) {
    comparison.Add("page_offset=", Hex(*step.page_offset), Hex(*hpa & page_mask));
  }
  auto compare_page = [&](uint64_t other_ua, bool same) {
    const std::string what =
        absl::StrCat(same ? "same page as " : "other page than ", Hex(other_ua));
    absl::StatusOr<uint64_t> other = target.Translate(step.context, other_ua);
    if (!other.ok()) {
      comparison.Fail(what,
                      absl::StrCat("translate ", Hex(other_ua), ": ", Answer(other.status())));
      return;
    }
    const bool is_same = (*other & ~page_mask) == (*hpa & ~page_mask);
    if (is_same != same) {
      comparison.Fail(what, absl::StrCat("hpa ", Hex(*hpa), " vs ", Hex(*other)));
    }
  };
  if (step.same_page_as.has_value()) compare_page(*step.same_page_as, true);
  if (step.distinct_page_from.has_value()) compare_page(*step.distinct_page_from, false);
  return comparison.Result();
}

std::optional<Mismatch> RunLookup(ConformanceTarget& target, const Step& step) {
  absl::StatusOr<std::optional<Range>> found = target.Lookup(step.context, step.ua, step.size);
  const std::string wanted =
      step.expect_region.has_value() ? ShowRange(*step.expect_region) : "null";
  if (!found.ok()) return Mismatch{wanted, Answer(found.status())};
  const std::string got = found->has_value() ? ShowRange(**found) : "null";
  if (got == wanted) return std::nullopt;
  return Mismatch{wanted, got};
}

std::optional<Mismatch> RunCheck(ConformanceTarget& target, const Step& step) {
  Comparison comparison;
  if (step.region.has_value()) {
    const std::string region = ShowRange(*step.region);
    absl::StatusOr<std::optional<RegionState>> state =
        target.FindRegion(step.context, step.region->ua, step.region->size);
    if (!state.ok()) {
      comparison.Fail(region, absl::StrCat(region, ": ", Answer(state.status())));
    } else if (step.absent) {
      comparison.Add(absl::StrCat(region, " "), "absent",
                     state->has_value() ? absl::StrCat("present used=", (*state)->used,
                                                       " mapped=", (*state)->mapped)
                                        : "absent");
    } else if (!state->has_value()) {
      std::vector<std::string> wanted = {region};
      if (step.used.has_value()) wanted.push_back(absl::StrCat("used=", *step.used));
      if (step.mapped.has_value()) wanted.push_back(absl::StrCat("mapped=", *step.mapped));
      comparison.Fail(absl::StrJoin(wanted, " "), absl::StrCat(region, " absent"));
    } else {
      comparison.Add("", region, region);
      if (step.used.has_value()) {
        comparison.Add("used=", absl::StrCat(*step.used), absl::StrCat((*state)->used));
      }
      if (step.mapped.has_value()) {
        comparison.Add("mapped=", absl::StrCat(*step.mapped), absl::StrCat((*state)->mapped));
      }
    }
  }
  if (step.locked_bytes.has_value() || step.regions.has_value()) {
    absl::StatusOr<ContextState> state = target.GetContextState(step.context);
    if (!state.ok()) {
      comparison.Fail(absl::StrCat("context ", step.context),
                      absl::StrCat("context ", step.context, ": ", Answer(state.status())));
    } else {
      if (step.locked_bytes.has_value()) {
        comparison.Add("locked_bytes=", absl::StrCat(*step.locked_bytes),
                       absl::StrCat(state->locked_bytes));
      }
      if (step.regions.has_value()) {
        comparison.Add("regions=", absl::StrCat(*step.regions), absl::StrCat(state->regions));
      }
    }
  }
  return comparison.Result();
}

// A failure entry: lines after the first (an agent's log, ...) are indented by four spaces, so
// that every entry starts with "FAIL" and nothing else does.
std::string OneEntry(absl::string_view text) {
  absl::string_view trimmed = absl::StripTrailingAsciiWhitespace(text);
  return absl::StrReplaceAll(trimmed, {{"\n", "\n    "}});
}

std::optional<Mismatch> RunStep(ConformanceTarget& target, const Case& test_case,
                                const Step& step) {
  switch (step.op) {
    case Op::kCreateContainer: {
      ContainerSettings settings;
      settings.iommu_page_size = step.iommu_page_size;
      settings.window_start = step.window_start;
      settings.window_size = step.window_size;
      return CompareStatus(step.expect, target.CreateContainer(step.container, settings));
    }
    case Op::kRegister:
      return CompareStatus(step.expect,
                           target.Register(step.context, step.container, step.ua, step.size));
    case Op::kUnregister:
      return CompareStatus(step.expect,
                           target.Unregister(step.context, step.container, step.ua, step.size));
    case Op::kMap:
      return CompareStatus(step.expect,
                           target.Map(step.context, step.container, step.iova, step.ua, step.size));
    case Op::kUnmap:
      return CompareStatus(step.expect,
                           target.Unmap(step.context, step.container, step.iova, step.size));
    case Op::kReleaseContainer:
      return CompareStatus(step.expect, target.ReleaseContainer(step.container));
    case Op::kTeardownContext:
      return CompareStatus(step.expect, target.TeardownContext(step.context));
    case Op::kTranslate:
      return RunTranslate(target, test_case, step);
    case Op::kLookup:
      return RunLookup(target, step);
    case Op::kCheck:
      return RunCheck(target, step);
  }
  return Mismatch{"a known op", "an unknown op"};
}

}  // namespace

std::vector<std::string> RunCase(const Case& test_case, const TargetFactory& factory) {
  std::vector<std::string> failures;
  absl::StatusOr<std::unique_ptr<ConformanceTarget>> target = factory(test_case);
  if (!target.ok() || *target == nullptr) {
    failures.push_back(
        OneEntry(absl::StrCat("FAIL ", test_case.name, " setup: wanted a target, got ",
                              target.ok() ? std::string("none") : target.status().ToString())));
    return failures;
  }
  for (size_t i = 0; i < test_case.steps.size(); ++i) {
    const Step& step = test_case.steps[i];
    std::optional<Mismatch> mismatch = RunStep(**target, test_case, step);
    const absl::Status invariants = (*target)->CheckInvariants();
    if (!invariants.ok()) {
      const std::string violation = absl::StrCat("invariant violation: ", invariants.ToString());
      if (mismatch.has_value()) {
        absl::StrAppend(&mismatch->got, "; ", violation);
      } else {
        mismatch = Mismatch{"invariants to hold", violation};
      }
    }
    if (mismatch.has_value()) {
      failures.push_back(
          OneEntry(absl::StrCat("FAIL ", test_case.name, " step ", i, " (", OpName(step.op),
                                "): wanted ", mismatch->wanted, ", got ", mismatch->got)));
    }
  }
  const absl::Status closed = (*target)->Close();
  if (!closed.ok()) {
    failures.push_back(OneEntry(absl::StrCat(
        "FAIL ", test_case.name, " close: wanted a clean end, got ", closed.ToString())));
  }
  return failures;
}

Runner::Runner(TargetFactory factory, std::ostream* out, RunOptions options)
    : factory_(std::move(factory)), out_(out), options_(options) {}

bool Runner::Run(const Case& test_case) {
  const std::vector<std::string> failures = RunCase(test_case, factory_);
  for (const std::string& line : failures) *out_ << line << "\n";
  const bool passed = failures.empty();
  if (options_.verbose) *out_ << (passed ? "PASS " : "FAIL ") << test_case.name << "\n";
  ++(passed ? counts_.passed : counts_.failed);
  return passed;
}

void Runner::Run(const CaseFile& file) {
  for (const Case& test_case : file.cases) Run(test_case);
}

void Runner::PrintSummary() const {
  *out_ << counts_.passed << " passed, " << counts_.failed << " failed" << std::endl;
}

RunCounts RunCases(const std::vector<Case>& cases, const TargetFactory& factory, std::ostream& out,
                   const RunOptions& options) {
  Runner runner(factory, &out, options);
  for (const Case& test_case : cases) runner.Run(test_case);
  runner.PrintSummary();
  return runner.counts();
}

}  // namespace dmapin::agent::conformance
