// The WatchEvents fan-out: every open subscription, the bounds on what they may queue, and the
// counters of what those bounds dropped. Separate from ServerCore's state and lock: publishing an
// event costs the core one call, and what a slow watcher does never reaches the core's data.
//
// Threading: every method is thread-safe. Lock order: a publisher's own locks, then the fan-out's,
// then a subscription's.
#ifndef DMAPIN_SERVER_CORE_EVENT_FANOUT_H_
#define DMAPIN_SERVER_CORE_EVENT_FANOUT_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "dmapin/v1/admin.pb.h"

namespace dmapin::server {

// What all WatchEvents subscriptions have queued together, in bytes (shared with them: a
// subscription may outlive the core by the length of its stream).
struct EventBacklog {
  std::atomic<uint64_t> bytes{0};
};

// A WatchEvents subscriber's queue. Events are shared by every subscription they go to, so a
// watcher costs a pointer per queued event. Bounded: a subscriber that falls behind is dropped
// (ServerCore ends it with a status saying so, and its queue is released at once), never slows the
// server and never holds memory without bound.
class EventSubscription {
 public:
  using EventPtr = std::shared_ptr<const v1::Event>;

  EventSubscription(std::string node_filter, std::shared_ptr<EventBacklog> backlog)
      : node_filter_(std::move(node_filter)), backlog_(std::move(backlog)) {}
  ~EventSubscription();
  // The next event, waiting up to `timeout`; nullopt on timeout or once closed.
  std::optional<v1::Event> Next(absl::Duration timeout);
  // The next event if one is queued, else null.
  EventPtr TryNext();
  // Called (outside the subscription's lock, on the emitting thread) when an event is queued
  // while the queue was empty, and once when the server drops the subscription, so a streaming
  // reactor can write without a thread of its own (it drains the queue itself after each
  // write). Cleared once closed.
  void SetListener(std::function<void()> listener);
  // The subscriber went away: ends the subscription and releases its queue.
  void Close();
  bool closed() const;
  // Why the server ended the subscription (ENOBUFS when it fell behind); OK while open or when it
  // was closed by its subscriber or the core's shutdown.
  absl::Status end_status() const;
  size_t queued() const;
  uint64_t queued_bytes() const;

 private:
  friend class EventFanout;
  struct Queued {
    EventPtr event;
    uint64_t bytes = 0;
  };
  // Queues `event` (of `bytes`, charged to the backlog) unless closed or filtered out.
  void Push(const EventPtr& event, uint64_t bytes);
  bool Matches(const v1::Event& event) const {
    return node_filter_.empty() || event.node() == node_filter_;
  }
  // queued() and queued_bytes() at one instant.
  std::pair<size_t, uint64_t> Backlog() const;
  // Ends the subscription with `why`; returns how many queued events were discarded.
  size_t End(absl::Status why);

  const std::string node_filter_;
  const std::shared_ptr<EventBacklog> backlog_;
  mutable Mutex mu_;
  std::condition_variable_any cv_;
  std::deque<Queued> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status end_status_ ABSL_GUARDED_BY(mu_);
  std::function<void()> listener_ ABSL_GUARDED_BY(mu_);
};

struct EventFanoutOptions {
  // Subscriptions open at once (more are refused with ENOSPC); events one subscriber may have
  // queued before it is dropped; bytes queued for all subscribers together (when full, the
  // subscriber furthest behind is dropped). A dropped subscriber's stream ends with
  // RESOURCE_EXHAUSTED "ENOBUFS: ... fell N events behind; reconnect".
  size_t max_watchers = 256;
  size_t watch_max_lag_events = 10000;
  uint64_t watch_buffer_bytes = 64ull << 20;
};

struct EventFanoutStats {
  // Subscriptions dropped for falling behind, by reason: "lag" (past watch_max_lag_events) or
  // "buffer" (all queues together were full); the events their queues held then.
  std::map<std::string, uint64_t> watchers_dropped;
  uint64_t events_dropped = 0;
  uint64_t watchers_refused = 0;  // beyond max_watchers
  uint64_t watchers = 0;          // open now
  uint64_t buffered_bytes = 0;    // queued for them now
};

class EventFanout {
 public:
  explicit EventFanout(EventFanoutOptions options) : options_(options) {}
  // Ends every open subscription.
  ~EventFanout();
  EventFanout(const EventFanout&) = delete;
  EventFanout& operator=(const EventFanout&) = delete;

  // ENOSPC beyond options.max_watchers open subscriptions.
  absl::StatusOr<std::shared_ptr<EventSubscription>> Subscribe(const std::string& node_filter);
  // Whether anyone may be listening: publishers skip building events nobody reads.
  bool HasSubscribers() const { return subscribed_.load(std::memory_order_acquire) > 0; }
  // Queues `event` for every subscription it matches, within the bounds.
  void Publish(std::shared_ptr<const v1::Event> event);
  EventFanoutStats stats() const;

 private:
  // Drops `subscription` (fell behind for `reason`), counting it.
  void DropLocked(EventSubscription& subscription, const std::string& reason, absl::string_view why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets subscriptions that ended; returns how many are open.
  size_t PruneLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const EventFanoutOptions options_;
  const std::shared_ptr<EventBacklog> backlog_ = std::make_shared<EventBacklog>();

  mutable Mutex mu_;
  std::vector<std::weak_ptr<EventSubscription>> subscribers_ ABSL_GUARDED_BY(mu_);
  EventFanoutStats stats_ ABSL_GUARDED_BY(mu_);
  // subscribers_.size(), readable without mu_.
  std::atomic<size_t> subscribed_{0};
};

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_CORE_EVENT_FANOUT_H_
