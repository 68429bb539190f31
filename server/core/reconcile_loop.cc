#include "server/core/reconcile_loop.h"

#include <utility>

#include "absl/time/clock.h"

namespace dmapin::server {

ReconcileLoop::ReconcileLoop(absl::Duration interval, std::function<void()> pass,
                             absl::Duration housekeeping_interval,
                             std::function<void()> housekeeping)
    : interval_(interval),
      pass_(std::move(pass)),
      housekeeping_interval_(housekeeping_interval),
      housekeeping_(std::move(housekeeping)),
      thread_([this] { Run(); }) {}

ReconcileLoop::~ReconcileLoop() {
  {
    MutexLock lock(&mu_);
    stopping_ = true;
    cv_.notify_all();
  }
  thread_.join();
}

void ReconcileLoop::Wake() {
  MutexLock lock(&mu_);
  wake_ = true;
  cv_.notify_all();
}

void ReconcileLoop::Run() {
  absl::Time next_housekeeping = absl::Now() + housekeeping_interval_;
  for (;;) {
    {
      MutexLock lock(&mu_);
      if (!stopping_ && !wake_) cv_.wait_for(mu_, absl::ToChronoNanoseconds(interval_));
      if (stopping_) return;
      wake_ = false;
    }
    pass_();
    if (absl::Now() >= next_housekeeping) {
      housekeeping_();
      next_housekeeping = absl::Now() + housekeeping_interval_;
    }
  }
}

}  // namespace dmapin::server
