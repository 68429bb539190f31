#include "tests/soak/soak_stats.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace dmapin {
namespace soak {
namespace {

TEST(LatencyHistogramTest, PercentilesAreWithinTenPercent) {
  LatencyHistogram h;
  for (int i = 1; i <= 1000; ++i) h.Add(i * 0.1);  // 0.1 .. 100 ms
  EXPECT_NEAR(h.Percentile(50), 50, 5);
  EXPECT_NEAR(h.Percentile(99), 99, 10);
  EXPECT_DOUBLE_EQ(h.Percentile(100), 100);
  EXPECT_EQ(h.count(), 1000u);
  LatencyHistogram other;
  other.Add(5000);
  h.Merge(other);
  EXPECT_DOUBLE_EQ(h.max_ms(), 5000);
  EXPECT_EQ(LatencyHistogram().Percentile(99), 0);
}

TEST(MemorySeriesTest, StaysBoundedAndKeepsTheEnds) {
  MemorySeries series;
  for (uint64_t i = 0; i < 100000; ++i) series.Add(i);
  EXPECT_LT(series.samples().size(), MemorySeries::kMaxSamples);
  EXPECT_GT(series.samples().size(), MemorySeries::kMaxSamples / 4);
  EXPECT_EQ(series.first(), 0u);
  EXPECT_EQ(series.last(), 99999u);
  EXPECT_EQ(series.peak(), 99999u);
}

TEST(CheckGrowthTest, FlatNoisyAndWarmUpAreNotGrowthButASteadyClimbIs) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  std::vector<uint64_t> warm_up_then_flat;
  for (int i = 0; i < 30; ++i) {
    warm_up_then_flat.push_back(i < 10 ? (100 + 50 * i) * kMiB : (600 + (i % 3)) * kMiB);
  }
  EXPECT_FALSE(CheckGrowth(warm_up_then_flat, 0.2, 32 * kMiB).growing);
  std::vector<uint64_t> climbing;
  for (int i = 0; i < 30; ++i) climbing.push_back((100 + 10 * i) * kMiB);
  const GrowthVerdict verdict = CheckGrowth(climbing, 0.2, 32 * kMiB);
  EXPECT_TRUE(verdict.growing) << verdict.Describe();
  EXPECT_FALSE(CheckGrowth({1, 2, 3}, 0.2, 0).growing);  // too few samples
}

}  // namespace
}  // namespace soak
}  // namespace dmapin
