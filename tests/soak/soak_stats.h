// The soak's bounded bookkeeping: latency histograms of fixed size (log-scale buckets, so a
// p99 costs nothing to keep for hours), per-operation counters, and memory series that thin
// themselves out past a fixed number of samples.
#ifndef DMAPIN_TESTS_SOAK_SOAK_STATS_H_
#define DMAPIN_TESTS_SOAK_SOAK_STATS_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace dmapin {
namespace soak {

// Latencies from 1 us to ~17 min in buckets 10 % apart (the percentile is a bucket's upper
// edge: at most 10 % high).
class LatencyHistogram {
 public:
  static constexpr int kBuckets = 220;
  void Add(double ms);
  void Merge(const LatencyHistogram& other);
  void Clear() { *this = LatencyHistogram(); }
  uint64_t count() const { return count_; }
  double max_ms() const { return max_ms_; }
  // The p-th percentile (0..100) in ms; 0 when empty.
  double Percentile(double p) const;

 private:
  std::array<uint64_t, kBuckets> buckets_{};
  uint64_t count_ = 0;
  double max_ms_ = 0;
};

// A process's RSS over time, at most kMaxSamples values: when full, every other sample is
// dropped and only every stride-th later one is kept, so a long soak keeps an even spread.
class MemorySeries {
 public:
  static constexpr size_t kMaxSamples = 4096;
  void Add(uint64_t rss_bytes);
  const std::vector<uint64_t>& samples() const { return samples_; }
  uint64_t first() const { return first_; }
  uint64_t last() const { return last_; }
  uint64_t peak() const { return peak_; }

 private:
  std::vector<uint64_t> samples_;
  uint64_t stride_ = 1;
  uint64_t seen_ = 0;
  uint64_t first_ = 0;
  uint64_t last_ = 0;
  uint64_t peak_ = 0;
};

// "Memory that keeps growing": the median of the last third of the samples against the median
// of the middle third (the first third is warm-up), allowed to grow by the larger of
// `relative` (0.2 = 20 %) and `absolute_bytes`. Fewer than 6 samples: never growing.
struct GrowthVerdict {
  bool growing = false;
  uint64_t middle_median = 0;
  uint64_t last_median = 0;
  uint64_t allowed = 0;  // the last third's median may be up to this
  std::string Describe() const;
};
GrowthVerdict CheckGrowth(const std::vector<uint64_t>& samples, double relative,
                          uint64_t absolute_bytes);

}  // namespace soak
}  // namespace dmapin

#endif  // DMAPIN_TESTS_SOAK_SOAK_STATS_H_
