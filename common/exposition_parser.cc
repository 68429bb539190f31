#include "common/exposition_parser.h"

#include <cmath>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace dmapin::exposition {

std::vector<Sample> Parse(absl::string_view text) {
  std::vector<Sample> samples;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (line.front() == '#') continue;
    Sample sample;
    const size_t brace = line.find('{');
    const size_t space = line.rfind(' ');
    if (space == absl::string_view::npos) {
      ADD_FAILURE() << "sample line without a value: " << line;
      continue;
    }
    if (brace != absl::string_view::npos && brace < space) {
      sample.name = std::string(line.substr(0, brace));
      const size_t close = line.rfind('}');
      absl::string_view labels = line.substr(brace + 1, close - brace - 1);
      for (absl::string_view pair : absl::StrSplit(labels, "\",", absl::SkipEmpty())) {
        const size_t eq = pair.find('=');
        absl::string_view value = pair.substr(eq + 1);
        if (!value.empty() && value.front() == '"') value.remove_prefix(1);
        if (!value.empty() && value.back() == '"') value.remove_suffix(1);
        sample.labels[std::string(pair.substr(0, eq))] = std::string(value);
      }
    } else {
      sample.name = std::string(line.substr(0, space));
    }
    absl::string_view value = line.substr(space + 1);
    if (value == "+Inf") {
      sample.value = HUGE_VAL;
    } else if (!absl::SimpleAtod(value, &sample.value)) {
      ADD_FAILURE() << "unparsable sample line: " << line;
      continue;
    }
    samples.push_back(std::move(sample));
  }
  return samples;
}

std::optional<double> Value(absl::string_view text, absl::string_view name, const Labels& labels) {
  for (const Sample& sample : Parse(text)) {
    if (sample.name == name && sample.labels == labels) return sample.value;
  }
  return std::nullopt;
}

}  // namespace dmapin::exposition
