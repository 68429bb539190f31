#include "testing/exposition_parser.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
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

std::string FindPromtool() {
  for (const char* candidate : {"/usr/bin/promtool", "/usr/local/bin/promtool"}) {
    if (access(candidate, X_OK) == 0) return candidate;
  }
  return "";
}

absl::Status PromtoolCheck(const std::string& promtool, absl::string_view text,
                           const std::filesystem::path& scratch_dir) {
  const std::filesystem::path input = scratch_dir / "metrics.txt";
  const std::filesystem::path output = scratch_dir / "promtool.out";
  FILE* file = std::fopen(input.c_str(), "w");
  if (file == nullptr) return absl::InternalError(absl::StrCat("cannot write ", input.string()));
  const bool written = std::fwrite(text.data(), 1, text.size(), file) == text.size();
  std::fclose(file);
  if (!written) return absl::InternalError(absl::StrCat("cannot write ", input.string()));
  const std::string command =
      absl::StrCat(promtool, " check metrics < ", input.string(), " > ", output.string(), " 2>&1");
  const int rc = std::system(command.c_str());
  std::string report;
  if (FILE* out = std::fopen(output.c_str(), "r")) {
    char buffer[4096];
    size_t n = 0;
    while ((n = std::fread(buffer, 1, sizeof(buffer), out)) > 0) report.append(buffer, n);
    std::fclose(out);
  }
  if (rc != 0)
    return absl::FailedPreconditionError(absl::StrCat("promtool check metrics:\n", report));
  return absl::OkStatus();
}

}  // namespace dmapin::exposition
