#include "agent/registry/pin_runs.h"

#include <cstdint>
#include <map>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

TEST(PinRunsTest, AHugeRangeCostsOneRunAndNothingAfterItsUnpin) {
  PinRuns runs;
  const uint64_t pages = uint64_t{1} << 40;  // far more pages than any per-page table could hold
  runs.Increment(5, pages);
  EXPECT_EQ(runs.runs(), 1u);
  EXPECT_EQ(runs.Count(5), 1u);
  EXPECT_EQ(runs.Count(5 + pages - 1), 1u);
  EXPECT_EQ(runs.Count(4), 0u);
  EXPECT_EQ(runs.Count(5 + pages), 0u);
  EXPECT_EQ(runs.covered_pages(), pages);
  EXPECT_EQ(runs.Decrement(5, pages), pages);
  EXPECT_TRUE(runs.empty());
  EXPECT_EQ(runs.total(), 0u);
}

TEST(PinRunsTest, OverlapsSplitAndMergeBack) {
  PinRuns runs;
  runs.Increment(0, 10);
  runs.Increment(4, 2);
  EXPECT_EQ(runs.runs(), 3u);
  EXPECT_EQ(runs.Count(3), 1u);
  EXPECT_EQ(runs.Count(4), 2u);
  EXPECT_EQ(runs.Count(6), 1u);
  EXPECT_EQ(runs.total(), 12u);
  EXPECT_EQ(runs.covered_pages(), 10u);
  std::vector<std::tuple<uint64_t, uint64_t, uint64_t>> decremented;
  EXPECT_EQ(runs.Decrement(2, 20,
                           [&](uint64_t first, uint64_t count, uint64_t value) {
                             decremented.emplace_back(first, count, value);
                           }),
            8u);  // pages 10..21 were never pinned
  const std::vector<std::tuple<uint64_t, uint64_t, uint64_t>> want = {
      {2, 2, 0}, {4, 2, 1}, {6, 4, 0}};
  EXPECT_EQ(decremented, want);
  EXPECT_EQ(runs.runs(), 2u);  // [0, 2) and [4, 6), both at 1: not adjacent
  std::vector<std::pair<uint64_t, uint64_t>> unpinned;
  runs.ForEachUnpinnedRun(
      1, 8, [&](uint64_t first, uint64_t count) { unpinned.emplace_back(first, count); });
  const std::vector<std::pair<uint64_t, uint64_t>> gaps = {{2, 2}, {6, 3}};
  EXPECT_EQ(unpinned, gaps);
  runs.Increment(2, 2);
  EXPECT_EQ(runs.runs(), 1u) << "equal neighbours merge";
}

// Random operations against a page-by-page model.
TEST(PinRunsTest, AgreesWithAPerPageModel) {
  std::mt19937_64 random(42);
  PinRuns runs;
  std::map<uint64_t, uint64_t> model;
  constexpr uint64_t kSpace = 64;
  for (int step = 0; step < 20000; ++step) {
    const uint64_t first = random() % kSpace;
    const uint64_t count = random() % (kSpace - first + 1);
    if (random() % 2 == 0) {
      runs.Increment(first, count);
      for (uint64_t page = first; page < first + count; ++page) ++model[page];
    } else {
      uint64_t want = 0;
      for (uint64_t page = first; page < first + count; ++page) {
        auto it = model.find(page);
        if (it == model.end()) continue;
        ++want;
        if (--it->second == 0) model.erase(it);
      }
      uint64_t reported = 0;
      ASSERT_EQ(
          runs.Decrement(first, count,
                         [&](uint64_t, uint64_t run_count, uint64_t) { reported += run_count; }),
          want);
      ASSERT_EQ(reported, want);
    }
    uint64_t total = 0;
    for (uint64_t page = 0; page < kSpace; ++page) {
      auto it = model.find(page);
      const uint64_t expected = it == model.end() ? 0 : it->second;
      ASSERT_EQ(runs.Count(page), expected) << "page " << page << " at step " << step;
      total += expected;
    }
    ASSERT_EQ(runs.total(), total);
    ASSERT_EQ(runs.covered_pages(), model.size());
    uint64_t unpinned = 0;
    runs.ForEachUnpinnedRun(0, kSpace, [&](uint64_t first_page, uint64_t run_count) {
      for (uint64_t page = first_page; page < first_page + run_count; ++page) {
        ASSERT_EQ(model.count(page), 0u);
      }
      unpinned += run_count;
    });
    ASSERT_EQ(unpinned, kSpace - model.size());
    // Runs are maximal: no two touching runs have the same count.
    uint64_t previous_end = ~uint64_t{0};
    uint64_t previous_value = 0;
    runs.ForEachPinnedRun([&](uint64_t run_first, uint64_t run_count, uint64_t value) {
      EXPECT_FALSE(run_first == previous_end && value == previous_value) << "at step " << step;
      previous_end = run_first + run_count;
      previous_value = value;
    });
  }
}

}  // namespace
}  // namespace dmapin::agent
