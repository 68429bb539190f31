// Waiting in tests for something another thread or process does, without a timed assertion: poll
// until it holds or a generous timeout passes.
#ifndef DMAPIN_TESTING_EVENTUALLY_H_
#define DMAPIN_TESTING_EVENTUALLY_H_

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace dmapin::harness {

// Whether `done()` held within `timeout` (polled every `poll`, and once more at the end).
template <typename Done>
bool Eventually(Done done, absl::Duration timeout = absl::Seconds(30),
                absl::Duration poll = absl::Milliseconds(10)) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    if (done()) return true;
    absl::SleepFor(poll);
  }
  return done();
}

}  // namespace dmapin::harness

#endif  // DMAPIN_TESTING_EVENTUALLY_H_
