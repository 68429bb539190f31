// For tests: reads the Prometheus text exposition format back into samples.
#ifndef DMAPIN_COMMON_EXPOSITION_PARSER_H_
#define DMAPIN_COMMON_EXPOSITION_PARSER_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

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

}  // namespace dmapin::exposition

#endif  // DMAPIN_COMMON_EXPOSITION_PARSER_H_
