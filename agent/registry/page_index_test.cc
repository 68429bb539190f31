#include "agent/registry/page_index.h"

#include <map>
#include <random>

#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

struct alignas(8) Value {
  int id;
};

TEST(PageIndexTest, EmptyIndexFindsNothing) {
  PageIndex<Value> index(48);
  EXPECT_EQ(index.Lookup(0), nullptr);
  EXPECT_EQ(index.Lookup((uint64_t{1} << 48) - 1), nullptr);
  EXPECT_EQ(index.NodeCount(), 0u);
}

TEST(PageIndexTest, AssignAndClearRanges) {
  PageIndex<Value> index(52);
  Value a{1}, b{2};
  PageIndex<Value>::Garbage garbage;
  index.Assign(100, 10, &a, &garbage);
  index.Assign(110, 1, &b, &garbage);
  EXPECT_EQ(index.Lookup(99), nullptr);
  EXPECT_EQ(index.Lookup(100), &a);
  EXPECT_EQ(index.Lookup(109), &a);
  EXPECT_EQ(index.Lookup(110), &b);
  EXPECT_EQ(index.Lookup(111), nullptr);
  index.Assign(100, 10, nullptr, &garbage);
  index.Assign(110, 1, nullptr, &garbage);
  EXPECT_EQ(index.Lookup(105), nullptr);
  // Clearing everything collapses the tree back to nothing.
  EXPECT_EQ(index.NodeCount(), 0u);
}

TEST(PageIndexTest, LargeAlignedRangesUseFewNodes) {
  PageIndex<Value> index(48);
  Value a{1};
  PageIndex<Value>::Garbage garbage;
  // 2^24 pages aligned to a level-3 slot: stored as a few high-level entries.
  index.Assign(uint64_t{1} << 30, uint64_t{1} << 24, &a, &garbage);
  EXPECT_LE(index.NodeCount(), 4u);
  EXPECT_EQ(index.Lookup((uint64_t{1} << 30) + 12345), &a);
  EXPECT_EQ(index.Lookup((uint64_t{1} << 30) - 1), nullptr);
  EXPECT_EQ(index.Lookup((uint64_t{1} << 30) + (uint64_t{1} << 24)), nullptr);
}

TEST(PageIndexTest, TopOfKeySpace) {
  PageIndex<Value> index(52);
  Value a{1};
  PageIndex<Value>::Garbage garbage;
  const uint64_t last = (uint64_t{1} << 52) - 1;
  index.Assign(last - 15, 16, &a, &garbage);
  EXPECT_EQ(index.Lookup(last), &a);
  EXPECT_EQ(index.Lookup(last - 16), nullptr);
}

TEST(PageIndexTest, OldVersionsStayReadableUntilGarbageIsFreed) {
  PageIndex<Value> index(48);
  Value a{1}, b{2};
  PageIndex<Value>::Garbage first;
  index.Assign(1000, 5, &a, &first);
  PageIndex<Value>::Garbage second;
  index.Assign(1003, 1, &b, &second);
  // The update copied the nodes on its path; the copies are the garbage.
  EXPECT_GT(second.size(), 0u);
  EXPECT_EQ(index.Lookup(1003), &b);
  EXPECT_EQ(index.Lookup(1002), &a);
}

TEST(PageIndexTest, RandomizedAgainstMap) {
  PageIndex<Value> index(36);
  std::vector<Value> values(64);
  for (int i = 0; i < 64; ++i) values[i].id = i;
  std::map<uint64_t, int> model;  // page -> value id
  std::mt19937_64 rng(42);
  PageIndex<Value>::Garbage garbage;
  for (int step = 0; step < 2000; ++step) {
    const uint64_t first = rng() % 5000;
    const uint64_t count = 1 + rng() % 700;
    const int id = static_cast<int>(rng() % 65) - 1;  // -1: clear
    index.Assign(first, count, id < 0 ? nullptr : &values[id], &garbage);
    for (uint64_t p = first; p < first + count; ++p) {
      if (id < 0) {
        model.erase(p);
      } else {
        model[p] = id;
      }
    }
    garbage.Free();
    for (int probe = 0; probe < 20; ++probe) {
      const uint64_t page = rng() % 6000;
      auto it = model.find(page);
      const Value* want = it == model.end() ? nullptr : &values[it->second];
      ASSERT_EQ(index.Lookup(page), want) << "step " << step << " page " << page;
    }
  }
}

}  // namespace
}  // namespace dmapin::agent
