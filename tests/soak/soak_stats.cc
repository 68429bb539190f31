#include "tests/soak/soak_stats.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"

namespace dmapin {
namespace soak {
namespace {

constexpr double kFirstEdgeMs = 0.001;
constexpr double kRatio = 1.1;

double UpperEdge(int bucket) { return kFirstEdgeMs * std::pow(kRatio, bucket); }

uint64_t Median(std::vector<uint64_t> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace

void LatencyHistogram::Add(double ms) {
  int bucket = 0;
  if (ms > kFirstEdgeMs) {
    bucket = static_cast<int>(std::ceil(std::log(ms / kFirstEdgeMs) / std::log(kRatio)));
  }
  bucket = std::clamp(bucket, 0, kBuckets - 1);
  ++buckets_[bucket];
  ++count_;
  max_ms_ = std::max(max_ms_, ms);
}

void LatencyHistogram::Merge(const LatencyHistogram& other) {
  for (int i = 0; i < kBuckets; ++i) buckets_[i] += other.buckets_[i];
  count_ += other.count_;
  max_ms_ = std::max(max_ms_, other.max_ms_);
}

double LatencyHistogram::Percentile(double p) const {
  if (count_ == 0) return 0;
  const uint64_t rank = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(p / 100.0 * count_)));
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += buckets_[i];
    if (seen >= rank) return std::min(UpperEdge(i), max_ms_);
  }
  return max_ms_;
}

void MemorySeries::Add(uint64_t rss_bytes) {
  if (seen_ == 0) first_ = rss_bytes;
  last_ = rss_bytes;
  peak_ = std::max(peak_, rss_bytes);
  if (seen_++ % stride_ != 0) return;
  samples_.push_back(rss_bytes);
  if (samples_.size() >= kMaxSamples) {
    std::vector<uint64_t> kept;
    kept.reserve(kMaxSamples / 2);
    for (size_t i = 0; i < samples_.size(); i += 2) kept.push_back(samples_[i]);
    samples_ = std::move(kept);
    stride_ *= 2;
  }
}

std::string GrowthVerdict::Describe() const {
  constexpr double kMiB = 1 << 20;
  return absl::StrFormat("median %.1f MiB (middle third) -> %.1f MiB (last third), limit %.1f MiB",
                         middle_median / kMiB, last_median / kMiB, allowed / kMiB);
}

GrowthVerdict CheckGrowth(const std::vector<uint64_t>& samples, double relative,
                          uint64_t absolute_bytes) {
  GrowthVerdict verdict;
  if (samples.size() < 6) return verdict;
  const size_t third = samples.size() / 3;
  verdict.middle_median = Median({samples.begin() + third, samples.begin() + 2 * third});
  verdict.last_median = Median({samples.begin() + 2 * third, samples.end()});
  const uint64_t slack =
      std::max(absolute_bytes, static_cast<uint64_t>(relative * verdict.middle_median));
  verdict.allowed = verdict.middle_median + slack;
  verdict.growing = verdict.last_median > verdict.allowed;
  return verdict;
}

}  // namespace soak
}  // namespace dmapin
