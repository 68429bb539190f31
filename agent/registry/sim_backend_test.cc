#include "agent/registry/sim_backend.h"

#include <cerrno>
#include <set>

#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

TEST(SimBackendTest, RejectsBadOptions) {
  EXPECT_EQ(ErrnoOf(SimBackend::Create({.page_size = 3000}).status()), EINVAL);
  EXPECT_EQ(ErrnoOf(SimBackend::Create({.page_size = 4096, .holes = {{0x1000, 0x800}}}).status()),
            EINVAL);
  EXPECT_EQ(
      ErrnoOf(SimBackend::Create({.page_size = 65536, .huge = {{0x10000, 0x1000000, 0x1000000}}})
                  .status()),
      EINVAL);
}

TEST(SimBackendTest, FramesAreDeterministicDistinctAndAligned) {
  auto sim = SimBackend::Create({.page_size = 4096});
  ASSERT_TRUE(sim.ok());
  std::set<uint64_t> frames;
  for (uint64_t page = 0; page < 100000; ++page) {
    const uint64_t hpa = (*sim)->FakeHpa(1, page << 12);
    ASSERT_EQ(hpa % 4096, 0u);
    ASSERT_TRUE(frames.insert(hpa).second) << "duplicate frame at page " << page;
  }
  EXPECT_EQ((*sim)->FakeHpa(1, 0x5000), (*sim)->FakeHpa(1, 0x5000));
  EXPECT_NE((*sim)->FakeHpa(1, 0x5000), (*sim)->FakeHpa(2, 0x5000));
}

TEST(SimBackendTest, HolesFailAtTheRightPageAndCountsTrackPins) {
  auto sim = SimBackend::Create({.page_size = 65536, .holes = {{0x30000, 0x10000}}});
  ASSERT_TRUE(sim.ok());
  std::vector<uint64_t> hpas(8);
  uint64_t pinned = 99;
  uint32_t shift = 0;
  absl::Status status = (*sim)->PinPages(1, 0, absl::MakeSpan(hpas), &pinned, &shift);
  EXPECT_EQ(ErrnoOf(status), EFAULT);
  EXPECT_EQ(pinned, 3u);
  EXPECT_EQ(*(*sim)->TotalPinnedPages(), 3u);
  (*sim)->UnpinPages(1, 0, absl::MakeConstSpan(hpas.data(), pinned));
  EXPECT_EQ(*(*sim)->TotalPinnedPages(), 0u);
  ASSERT_TRUE((*sim)->PinPages(1, 0x40000, absl::MakeSpan(hpas), &pinned, &shift).ok());
  EXPECT_EQ(shift, 16u);
  EXPECT_EQ(*(*sim)->PinCount(1, 0x40000), 1u);
  EXPECT_EQ(*(*sim)->PinCount(2, 0x40000), 0u);
}

TEST(SimBackendTest, HugeRangesReportTheirPageSize) {
  auto sim = SimBackend::Create({.page_size = 65536, .huge = {{0x1000000, 0x2000000, 0x1000000}}});
  ASSERT_TRUE(sim.ok());
  std::vector<uint64_t> hpas(256);
  uint64_t pinned = 0;
  uint32_t shift = 0;
  ASSERT_TRUE((*sim)->PinPages(1, 0x1000000, absl::MakeSpan(hpas), &pinned, &shift).ok());
  EXPECT_EQ(shift, 24u);
  for (size_t i = 1; i < hpas.size(); ++i) EXPECT_EQ(hpas[i], hpas[0] + i * 65536);
}

}  // namespace
}  // namespace dmapin::agent
