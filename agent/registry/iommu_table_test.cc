#include "agent/registry/iommu_table.h"

#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

TEST(IommuTableTest, ExchangeInstallsAndClears) {
  IommuTable<int> table(uint64_t{1} << 28);
  int a = 1, b = 2;
  EXPECT_EQ(table.Exchange(5, &a), nullptr);
  EXPECT_EQ(table.Get(5), &a);
  EXPECT_EQ(table.Exchange(5, &b), &a);
  EXPECT_EQ(table.Exchange((uint64_t{1} << 28) - 1, &a), nullptr);
  EXPECT_EQ(table.Exchange(5, nullptr), &b);
  EXPECT_EQ(table.Get(5), nullptr);
  // Clearing a never-allocated entry allocates nothing and finds nothing.
  EXPECT_EQ(table.Exchange(12345678, nullptr), nullptr);
}

TEST(IommuTableTest, AlternatingLeavesFindTheirOwnEntries) {
  // Each switch of leaf replaces the remembered one; entries must never land in the wrong leaf.
  IommuTable<int> table(uint64_t{1} << 28);
  int a = 1, b = 2;
  for (uint64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(table.Exchange(i, &a), nullptr);
    EXPECT_EQ(table.Exchange((uint64_t{1} << 20) + i, &b), nullptr);
  }
  EXPECT_EQ(table.Get(512 + 1), nullptr);  // same low bits, another (absent) leaf
  for (uint64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(table.Get(i), &a);
    EXPECT_EQ(table.Get((uint64_t{1} << 20) + i), &b);
    EXPECT_EQ(table.Get((uint64_t{1} << 21) + i), nullptr);
  }
}

TEST(IommuTableTest, ForEachInstalledVisitsInOrder) {
  IommuTable<int> table(1 << 20);
  int a = 1;
  for (uint64_t index : {7ull, 3ull, 600000ull, 512ull}) table.Exchange(index, &a);
  std::vector<uint64_t> seen;
  table.ForEachInstalled([&](uint64_t index, std::atomic<int*>&) { seen.push_back(index); });
  EXPECT_EQ(seen, (std::vector<uint64_t>{3, 7, 512, 600000}));
}

TEST(IommuTableTest, SmallAndHugeTables) {
  IommuTable<int> one(1);
  int a = 1;
  EXPECT_EQ(one.Exchange(0, &a), nullptr);
  EXPECT_EQ(one.Get(0), &a);
  IommuTable<int> huge(~uint64_t{0});
  EXPECT_EQ(huge.Exchange(~uint64_t{0} - 1, &a), nullptr);
  EXPECT_EQ(huge.Get(~uint64_t{0} - 1), &a);
}

TEST(IommuTableTest, ClearRangeVisitsOnlyInstalledEntries) {
  // A range of 2^64 - 1 entries: a per-entry loop would never finish.
  IommuTable<int> table(~uint64_t{0});
  int a = 1, b = 2;
  for (uint64_t index :
       {uint64_t{3}, uint64_t{511}, uint64_t{512}, uint64_t{1} << 40, ~uint64_t{0} - 1}) {
    table.Exchange(index, &a);
  }
  table.Exchange(uint64_t{1} << 63, &b);
  std::vector<int*> cleared;
  table.ClearRange(4, (uint64_t{1} << 63) - 4, [&](int* old) { cleared.push_back(old); });
  EXPECT_EQ(cleared, (std::vector<int*>{&a, &a, &a}));  // 511, 512, 2^40; not 3, not 2^63
  EXPECT_EQ(table.Get(3), &a);
  EXPECT_EQ(table.Get(511), nullptr);
  EXPECT_EQ(table.Get(uint64_t{1} << 63), &b);
  cleared.clear();
  table.ClearRange(0, ~uint64_t{0}, [&](int* old) { cleared.push_back(old); });
  EXPECT_EQ(cleared, (std::vector<int*>{&a, &b, &a}));
  size_t left = 0;
  table.ForEachInstalled([&](uint64_t, std::atomic<int*>&) { ++left; });
  EXPECT_EQ(left, 0u);
  // Within one leaf (the remembered one).
  table.Exchange(100, &a);
  table.Exchange(101, &b);
  cleared.clear();
  table.ClearRange(101, 1, [&](int* old) { cleared.push_back(old); });
  EXPECT_EQ(cleared, std::vector<int*>{&b});
  EXPECT_EQ(table.Get(100), &a);
}

TEST(IommuTableTest, ConcurrentInstallsInOneLeafAllLand) {
  IommuTable<int> table(1 << 24);
  std::vector<int> values(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t i = t; i < 4096; i += 4) table.Exchange(i, &values[t]);
    });
  }
  for (auto& thread : threads) thread.join();
  for (uint64_t i = 0; i < 4096; ++i) ASSERT_EQ(table.Get(i), &values[i % 4]) << i;
}

}  // namespace
}  // namespace dmapin::agent
