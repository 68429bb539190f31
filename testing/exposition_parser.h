// For tests: reads the Prometheus text exposition format back into samples, and lints it with
// Prometheus's own checker.
#ifndef DMAPIN_TESTING_EXPOSITION_PARSER_H_
#define DMAPIN_TESTING_EXPOSITION_PARSER_H_

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace dmapin::exposition {

using Labels = std::map<std::string, std::string>;

struct Sample {
  std::string name;
  Labels labels;
  double value = 0;
};

// Parses the text exposition format as prometheus-cpp's TextSerializer writes it (our label
// values hold no escaped quotes) into samples. A malformed sample line is a test failure
// (ADD_FAILURE) and is skipped.
std::vector<Sample> Parse(absl::string_view text);

// The value of the series `name{labels}` (labels matched exactly), or nullopt.
std::optional<double> Value(absl::string_view text, absl::string_view name,
                            const Labels& labels = {});

// Debian's `promtool` (package prometheus): its path, or "" when it is not installed.
std::string FindPromtool();

// Runs `promtool check metrics` on `text`, with its input and report in `scratch_dir`. OK when
// promtool accepts it; otherwise an error holding promtool's report.
absl::Status PromtoolCheck(const std::string& promtool, absl::string_view text,
                           const std::filesystem::path& scratch_dir);

}  // namespace dmapin::exposition

#endif  // DMAPIN_TESTING_EXPOSITION_PARSER_H_
