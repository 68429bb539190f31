#include "agent/registry/epoch.h"

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

TEST(EpochTest, SynchronizeWaitsForAnActiveReader) {
  std::atomic<bool> reader_inside{false};
  std::atomic<bool> release_reader{false};
  std::atomic<bool> synchronized{false};
  std::thread reader([&] {
    EpochReadLock lock;
    reader_inside = true;
    while (!release_reader) std::this_thread::yield();
  });
  while (!reader_inside) std::this_thread::yield();
  std::thread writer([&] {
    EpochDomain::Global().Synchronize();
    synchronized = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(synchronized) << "Synchronize returned while a reader was inside";
  release_reader = true;
  reader.join();
  writer.join();
  EXPECT_TRUE(synchronized);
}

TEST(EpochTest, ReadersThatStartAfterDoNotBlockSynchronize) {
  EpochDomain::Global().Synchronize();  // no readers: returns at once
  {
    EpochReadLock outer;
    EpochReadLock inner;  // nesting
    EXPECT_TRUE(EpochDomain::InReadSection());
  }
  EXPECT_FALSE(EpochDomain::InReadSection());
  EpochDomain::Global().Synchronize();
}

// A writer swaps a pointer and frees the old object after Synchronize while readers keep
// dereferencing; under ASan/TSan a premature free is reported.
TEST(EpochTest, NoReaderSeesAFreedObject) {
  struct Box {
    std::atomic<uint64_t> value;
    explicit Box(uint64_t v) : value(v) {}
  };
  std::atomic<Box*> current{new Box(1)};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t) {
    readers.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        EpochReadLock lock;
        Box* box = current.load(std::memory_order_acquire);
        const uint64_t v = box->value.load(std::memory_order_relaxed);
        ASSERT_NE(v, 0u) << "read a freed (poisoned) box";
        reads.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  while (reads.load() == 0) std::this_thread::yield();
  for (uint64_t i = 2; i < 20000; ++i) {
    Box* old = current.exchange(new Box(i), std::memory_order_acq_rel);
    EpochDomain::Global().Synchronize();
    old->value.store(0, std::memory_order_relaxed);  // poison before freeing
    delete old;
  }
  stop = true;
  for (auto& reader : readers) reader.join();
  delete current.load();
  EXPECT_GT(reads.load(), 0u);
}

TEST(EpochTest, ManyShortLivedThreadsReuseSlots) {
  for (int round = 0; round < 3 * EpochDomain::kMaxSlots / 64; ++round) {
    std::vector<std::thread> threads;
    for (int t = 0; t < 64; ++t) {
      threads.emplace_back([] { EpochReadLock lock; });
    }
    for (auto& thread : threads) thread.join();
  }
  EpochDomain::Global().Synchronize();
}

}  // namespace
}  // namespace dmapin::agent
