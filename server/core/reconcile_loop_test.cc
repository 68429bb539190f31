#include "server/core/reconcile_loop.h"

#include <atomic>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace dmapin::server {
namespace {

// Polls `done` for up to 10 s (generous: a loaded CI machine).
template <typename Done>
bool Eventually(Done done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

TEST(ReconcileLoopTest, AWakeRunsAPassWithoutWaitingForTheTick) {
  std::atomic<int> passes{0};
  ReconcileLoop loop(
      absl::Hours(1), [&] { ++passes; }, absl::Hours(1), [] {});
  loop.Wake();
  EXPECT_TRUE(Eventually([&] { return passes.load() >= 1; }));
}

TEST(ReconcileLoopTest, PassesAndHousekeepingRunOnTheirIntervals) {
  std::atomic<int> passes{0};
  std::atomic<int> housekeeping{0};
  {
    ReconcileLoop loop(
        absl::Milliseconds(1), [&] { ++passes; }, absl::Milliseconds(5), [&] { ++housekeeping; });
    EXPECT_TRUE(Eventually([&] { return passes.load() >= 20 && housekeeping.load() >= 2; }));
  }
  // Destroyed: no pass runs after it.
  const int after = passes.load();
  absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(passes.load(), after);
}

}  // namespace
}  // namespace dmapin::server
