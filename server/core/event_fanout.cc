#include "server/core/event_fanout.h"

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"
#include "common/errno_status.h"

namespace dmapin::server {

// --- EventSubscription ------------------------------------------------------------------------

EventSubscription::~EventSubscription() { End(absl::OkStatus()); }

std::optional<v1::Event> EventSubscription::Next(absl::Duration timeout) {
  EventPtr event;
  {
    MutexLock lock(&mu_);
    const absl::Time deadline = absl::Now() + timeout;
    while (queue_.empty() && !closed_) {
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) return std::nullopt;
      cv_.wait_for(mu_, absl::ToChronoNanoseconds(left));
    }
    if (queue_.empty()) return std::nullopt;
    event = std::move(queue_.front().event);
    queued_bytes_ -= queue_.front().bytes;
    backlog_->bytes.fetch_sub(queue_.front().bytes, std::memory_order_relaxed);
    queue_.pop_front();
  }
  return *event;
}

EventSubscription::EventPtr EventSubscription::TryNext() {
  MutexLock lock(&mu_);
  if (queue_.empty()) return nullptr;
  EventPtr event = std::move(queue_.front().event);
  queued_bytes_ -= queue_.front().bytes;
  backlog_->bytes.fetch_sub(queue_.front().bytes, std::memory_order_relaxed);
  queue_.pop_front();
  return event;
}

void EventSubscription::Close() { End(absl::OkStatus()); }

size_t EventSubscription::End(absl::Status why) {
  std::deque<Queued> discarded;
  std::function<void()> listener;
  {
    MutexLock lock(&mu_);
    if (!closed_) end_status_ = std::move(why);
    closed_ = true;
    discarded.swap(queue_);
    backlog_->bytes.fetch_sub(queued_bytes_, std::memory_order_relaxed);
    queued_bytes_ = 0;
    listener.swap(listener_);
    cv_.notify_all();
  }
  // Wakes the writer once more so that it ends its stream; the events go with `discarded`.
  if (listener) listener();
  return discarded.size();
}

bool EventSubscription::closed() const {
  MutexLock lock(&mu_);
  return closed_;
}

absl::Status EventSubscription::end_status() const {
  MutexLock lock(&mu_);
  return end_status_;
}

size_t EventSubscription::queued() const {
  MutexLock lock(&mu_);
  return queue_.size();
}

std::pair<size_t, uint64_t> EventSubscription::Backlog() const {
  MutexLock lock(&mu_);
  return {queue_.size(), queued_bytes_};
}

uint64_t EventSubscription::queued_bytes() const {
  MutexLock lock(&mu_);
  return queued_bytes_;
}

void EventSubscription::Push(const EventPtr& event, uint64_t bytes) {
  std::function<void()> listener;
  {
    MutexLock lock(&mu_);
    if (closed_) return;
    // The writer drains the queue by itself after each write: only an empty queue needs a wake.
    if (queue_.empty()) listener = listener_;
    queue_.push_back(Queued{event, bytes});
    queued_bytes_ += bytes;
    backlog_->bytes.fetch_add(bytes, std::memory_order_relaxed);
    cv_.notify_one();
  }
  if (listener) listener();
}

void EventSubscription::SetListener(std::function<void()> listener) {
  MutexLock lock(&mu_);
  if (!closed_) listener_ = std::move(listener);
}

// --- EventFanout --------------------------------------------------------------------------------

EventFanout::~EventFanout() {
  MutexLock lock(&mu_);
  for (auto& weak : subscribers_) {
    if (auto subscription = weak.lock()) subscription->Close();
  }
}

void EventFanout::Publish(std::shared_ptr<const v1::Event> event) {
  // What one queued copy costs: the event is shared, but each subscriber is charged in full, so
  // the budget bounds memory however many subscribers share it.
  const uint64_t bytes = sizeof(v1::Event) + event->ByteSizeLong();
  const EventSubscription::EventPtr shared = std::move(event);
  MutexLock lock(&mu_);
  struct Target {
    std::shared_ptr<EventSubscription> subscription;
    uint64_t queued_bytes = 0;
  };
  std::vector<Target> targets;
  uint64_t wanted = 0;  // what the event adds to the queues that are not empty
  auto it = subscribers_.begin();
  while (it != subscribers_.end()) {
    std::shared_ptr<EventSubscription> subscription = it->lock();
    if (subscription == nullptr || subscription->closed()) {
      it = subscribers_.erase(it);
      continue;
    }
    ++it;
    if (!subscription->Matches(*shared)) continue;
    const auto [queued, queued_bytes] = subscription->Backlog();
    if (queued >= options_.watch_max_lag_events) {
      DropLocked(*subscription, "lag",
                 absl::StrCat("the watcher fell ", queued,
                              " events behind (the limit is --watch_max_lag_events=",
                              options_.watch_max_lag_events, "); reconnect"));
      continue;
    }
    if (queued_bytes > 0) wanted += bytes;
    targets.push_back(Target{std::move(subscription), queued_bytes});
  }
  // All queues together stay within the budget: the subscriber furthest behind goes first. One
  // with nothing queued always takes the event (a writer needs one to make progress).
  while (wanted > 0) {
    const uint64_t buffered = backlog_->bytes.load(std::memory_order_relaxed);
    if (buffered + wanted <= options_.watch_buffer_bytes) break;
    auto laggiest = std::max_element(
        targets.begin(), targets.end(),
        [](const Target& a, const Target& b) { return a.queued_bytes < b.queued_bytes; });
    EventSubscription& dropped = *laggiest->subscription;
    DropLocked(dropped, "buffer",
               absl::StrCat("the watcher fell ", dropped.queued(),
                            " events behind while the watchers' buffers were full (", buffered,
                            " bytes queued; the limit is --watch_buffer_bytes=",
                            options_.watch_buffer_bytes, "); reconnect"));
    wanted -= bytes;
    targets.erase(laggiest);
  }
  for (const Target& target : targets) target.subscription->Push(shared, bytes);
  subscribed_.store(subscribers_.size(), std::memory_order_release);
}

void EventFanout::DropLocked(EventSubscription& subscription, const std::string& reason,
                             absl::string_view why) {
  ++stats_.watchers_dropped[reason];
  stats_.events_dropped += subscription.End(ErrnoStatus(ENOBUFS, why));
}

size_t EventFanout::PruneLocked() {
  subscribers_.erase(std::remove_if(subscribers_.begin(), subscribers_.end(),
                                    [](const std::weak_ptr<EventSubscription>& weak) {
                                      std::shared_ptr<EventSubscription> alive = weak.lock();
                                      return alive == nullptr || alive->closed();
                                    }),
                     subscribers_.end());
  subscribed_.store(subscribers_.size(), std::memory_order_release);
  return subscribers_.size();
}

absl::StatusOr<std::shared_ptr<EventSubscription>> EventFanout::Subscribe(
    const std::string& node_filter) {
  MutexLock lock(&mu_);
  if (PruneLocked() >= options_.max_watchers) {
    ++stats_.watchers_refused;
    return ErrnoStatus(ENOSPC, absl::StrCat("already ", subscribers_.size(),
                                            " WatchEvents streams open (the limit is "
                                            "--max_watchers=",
                                            options_.max_watchers, "); retry later"));
  }
  auto subscription = std::make_shared<EventSubscription>(node_filter, backlog_);
  subscribers_.push_back(subscription);
  subscribed_.store(subscribers_.size(), std::memory_order_release);
  return subscription;
}

EventFanoutStats EventFanout::stats() const {
  MutexLock lock(&mu_);
  EventFanoutStats stats = stats_;
  for (const auto& weak : subscribers_) {
    if (auto subscription = weak.lock(); subscription != nullptr && !subscription->closed()) {
      ++stats.watchers;
    }
  }
  stats.buffered_bytes = backlog_->bytes.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace dmapin::server
