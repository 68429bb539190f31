// ReconcileLoop: when ServerCore reconciles. One thread of its own runs `pass` every `interval`,
// at once when woken (a change that needs a decision should not wait for the tick), and
// `housekeeping` every `housekeeping_interval`, until the loop is destroyed. What a pass does is
// the core's (server_core_reconcile.cc).
#ifndef DMAPIN_SERVER_CORE_RECONCILE_LOOP_H_
#define DMAPIN_SERVER_CORE_RECONCILE_LOOP_H_

#include <condition_variable>
#include <functional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/time/time.h"
#include "common/mutex.h"

namespace dmapin::server {

class ReconcileLoop {
 public:
  ReconcileLoop(absl::Duration interval, std::function<void()> pass,
                absl::Duration housekeeping_interval, std::function<void()> housekeeping);
  // Stops the thread after the pass it may be running.
  ~ReconcileLoop();
  ReconcileLoop(const ReconcileLoop&) = delete;
  ReconcileLoop& operator=(const ReconcileLoop&) = delete;

  // The next pass starts now, or right after the running one.
  void Wake();

 private:
  void Run();

  // Constant after construction.
  const absl::Duration interval_;
  const std::function<void()> pass_;
  const absl::Duration housekeeping_interval_;
  const std::function<void()> housekeeping_;

  Mutex mu_;
  std::condition_variable_any cv_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: starts once the rest is constructed
};

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_CORE_RECONCILE_LOOP_H_
