#include "server/core/event_fanout.h"

#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin::server {
namespace {

std::shared_ptr<const v1::Event> Event(const std::string& node, const std::string& type = "t") {
  auto event = std::make_shared<v1::Event>();
  event->set_node(node);
  event->set_type(type);
  return event;
}

TEST(EventFanoutTest, EventsReachTheSubscriptionsTheyMatchInOrder) {
  EventFanout fanout({});
  EXPECT_FALSE(fanout.HasSubscribers());
  auto all = fanout.Subscribe("");
  auto one = fanout.Subscribe("n1");
  ASSERT_TRUE(all.ok() && one.ok());
  EXPECT_TRUE(fanout.HasSubscribers());
  fanout.Publish(Event("n1", "a"));
  fanout.Publish(Event("n2", "b"));
  EXPECT_EQ((*all)->Next(absl::ZeroDuration())->type(), "a");
  EXPECT_EQ((*all)->Next(absl::ZeroDuration())->type(), "b");
  EXPECT_EQ((*one)->Next(absl::ZeroDuration())->type(), "a");
  EXPECT_FALSE((*one)->Next(absl::ZeroDuration()).has_value());
  (*all)->Close();
  (*one)->Close();
  EXPECT_EQ(fanout.stats().watchers, 0u);
}

TEST(EventFanoutTest, TooManySubscriptionsAreRefused) {
  EventFanout fanout({.max_watchers = 1});
  auto first = fanout.Subscribe("");
  ASSERT_TRUE(first.ok());
  auto second = fanout.Subscribe("");
  EXPECT_EQ(ErrnoOf(second.status()), ENOSPC) << second.status();
  EXPECT_EQ(fanout.stats().watchers_refused, 1u);
  (*first)->Close();  // its place is free again
  EXPECT_TRUE(fanout.Subscribe("").ok());
}

TEST(EventFanoutTest, AWatcherTooFarBehindIsDroppedAndItsQueueReleased) {
  EventFanout fanout({.watch_max_lag_events = 3});
  auto slow = fanout.Subscribe("");
  ASSERT_TRUE(slow.ok());
  for (int i = 0; i < 4; ++i) fanout.Publish(Event("n"));
  EXPECT_TRUE((*slow)->closed());
  EXPECT_EQ(ErrnoOf((*slow)->end_status()), ENOBUFS);
  EXPECT_TRUE(absl::StrContains((*slow)->end_status().message(), "--watch_max_lag_events=3"));
  const EventFanoutStats stats = fanout.stats();
  EXPECT_EQ(stats.watchers_dropped.at("lag"), 1u);
  EXPECT_EQ(stats.events_dropped, 3u);
  EXPECT_EQ(stats.buffered_bytes, 0u);
}

TEST(EventFanoutTest, WhenTheSharedBufferIsFullTheWatcherFurthestBehindGoes) {
  const uint64_t one = sizeof(v1::Event) + Event("n")->ByteSizeLong();
  EventFanout fanout({.watch_buffer_bytes = 5 * one});
  auto slow = fanout.Subscribe("");
  auto fast = fanout.Subscribe("");
  ASSERT_TRUE(slow.ok() && fast.ok());
  for (int i = 0; i < 6; ++i) {
    fanout.Publish(Event("n"));
    ASSERT_TRUE((*fast)->TryNext() != nullptr);  // keeps up
  }
  EXPECT_TRUE((*slow)->closed());
  EXPECT_FALSE((*fast)->closed());
  EXPECT_EQ(fanout.stats().watchers_dropped.at("buffer"), 1u);
  EXPECT_LE(fanout.stats().buffered_bytes, 5 * one);
}

}  // namespace
}  // namespace dmapin::server
