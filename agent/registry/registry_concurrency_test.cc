// Readers and mappers racing writers. Run under --config=tsan and --config=asan as well: a
// reader that saw a freed region or a lost count shows up there or in CheckInvariants().
#include <atomic>
#include <cerrno>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

constexpr uint64_t k64K = 0x10000;
constexpr uint64_t kBase = 0x10000000;
constexpr ContextId kCtx = 1;

class RegistryConcurrencyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sim_ = *SimBackend::Create({.page_size = k64K});
    registry_ = std::make_unique<Registry>(sim_.get());
    ASSERT_TRUE(registry_->CreateContext(kCtx, {}).ok());
    for (ContainerId id = 1; id <= 4; ++id) {
      ASSERT_TRUE(registry_->CreateContainer(id, {.iommu_page_size = k64K}).ok());
    }
  }
  std::unique_ptr<SimBackend> sim_;
  std::unique_ptr<Registry> registry_;
};

TEST_F(RegistryConcurrencyTest, TranslateDuringRegisterUnregisterChurn) {
  // Stable regions readers always find, and churned ones they may or may not find.
  for (uint64_t i = 0; i < 64; ++i) {
    ASSERT_TRUE(registry_->Register(1, kCtx, kBase + i * 32 * k64K, 16 * k64K).ok());
  }
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> translations{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t) {
    readers.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      while (!stop.load(std::memory_order_relaxed)) {
        Registry::ReadSession session(*registry_, kCtx);
        for (int k = 0; k < 64; ++k) {
          const uint64_t slot = rng() % 64;
          const uint64_t offset = rng() % (32 * k64K);
          const uint64_t ua = kBase + slot * 32 * k64K + offset;
          uint64_t hpa = 0;
          const bool found = session.TryTranslate(ua, &hpa);
          if (offset < 16 * k64K) {
            ASSERT_TRUE(found) << "stable region vanished at 0x" << std::hex << ua;
          }
          if (found) {
            ASSERT_EQ(hpa, sim_->FakeHpa(kCtx, ua & ~(k64K - 1)) | (ua & (k64K - 1)));
          }
        }
        translations.fetch_add(64, std::memory_order_relaxed);
      }
    });
  }
  while (translations.load() == 0) std::this_thread::yield();
  // Writer: churn regions in the gaps.
  for (int round = 0; round < 300; ++round) {
    const uint64_t slot = round % 64;
    const uint64_t ua = kBase + slot * 32 * k64K + 16 * k64K + (round % 3) * k64K;
    ASSERT_TRUE(registry_->Register(2, kCtx, ua, 8 * k64K).ok());
    ASSERT_TRUE(registry_->Unregister(2, ua, 8 * k64K).ok());
  }
  stop = true;
  for (auto& reader : readers) reader.join();
  EXPECT_GT(translations.load(), 0u);
  absl::Status invariants = registry_->CheckInvariants();
  EXPECT_TRUE(invariants.ok()) << invariants;
}

TEST_F(RegistryConcurrencyTest, MappersRaceUnregisterAndNeverLoseACount) {
  ASSERT_TRUE(registry_->Register(1, kCtx, kBase, 64 * k64K).ok());
  ASSERT_TRUE(registry_->Register(2, kCtx, kBase, 64 * k64K).ok());
  std::atomic<bool> stop{false};
  std::vector<std::thread> mappers;
  for (ContainerId container : {1, 2}) {
    mappers.emplace_back([&, container] {
      std::mt19937_64 rng(container);
      while (!stop.load(std::memory_order_relaxed)) {
        const uint64_t page = rng() % 64;
        const uint64_t iova = (rng() % 128) * k64K;
        absl::Status status = registry_->Map(container, iova, kBase + page * k64K, k64K);
        // ENXIO when the region was released under us; ENOENT once the container is gone.
        if (!status.ok()) {
          const int err = ErrnoOf(status);
          ASSERT_TRUE(err == ENXIO || err == EINVAL || err == ENOENT) << status;
        }
        registry_->Unmap(container, iova, k64K).IgnoreError();
      }
    });
  }
  // Container 2 drops its use; container 1 tries to unregister until it wins (EBUSY meanwhile).
  ASSERT_TRUE(registry_->Unregister(2, kBase, 64 * k64K).ok());
  int busy = 0;
  for (;;) {
    absl::Status status = registry_->Unregister(1, kBase, 64 * k64K);
    if (status.ok()) break;
    ASSERT_EQ(ErrnoOf(status), EBUSY) << status;
    ++busy;
    std::this_thread::yield();
  }
  stop = true;
  for (auto& mapper : mappers) mapper.join();
  // Whatever the mappers installed after the release attempt failed with ENXIO/EINVAL.
  EXPECT_TRUE(registry_->ListRegions().empty());
  absl::Status invariants = registry_->CheckInvariants();
  EXPECT_TRUE(invariants.ok()) << invariants;
  EXPECT_EQ(*sim_->TotalPinnedPages(), 0u);
  RecordProperty("ebusy_retries", busy);
}

TEST_F(RegistryConcurrencyTest, ReleaseContainerWhileItsMappersRun) {
  ASSERT_TRUE(registry_->Register(3, kCtx, kBase, 64 * k64K).ok());
  ASSERT_TRUE(registry_->Register(4, kCtx, kBase + 64 * k64K, 64 * k64K).ok());
  std::atomic<bool> stop{false};
  std::vector<std::thread> mappers;
  for (ContainerId container : {3, 4}) {
    mappers.emplace_back([&, container] {
      std::mt19937_64 rng(container);
      while (!stop.load(std::memory_order_relaxed)) {
        const uint64_t page = rng() % 128;  // either region
        registry_->Map(container, (rng() % 64) * k64K, kBase + page * k64K, k64K).IgnoreError();
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(registry_->ReleaseContainer(3).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  stop = true;
  for (auto& mapper : mappers) mapper.join();
  absl::Status invariants = registry_->CheckInvariants();
  EXPECT_TRUE(invariants.ok()) << invariants;
  // Region 3 may be pending release (container 4 maps it); releasing 4 finishes everything.
  ASSERT_TRUE(registry_->ReleaseContainer(4).ok());
  EXPECT_TRUE(registry_->ListRegions().empty());
  EXPECT_EQ(*sim_->TotalPinnedPages(), 0u);
}

// Map remembers each thread's last region; a writer that keeps replacing the region under the
// mappers (sizes alternate, so a new region may reuse the freed one's memory with other bounds)
// must never leave a mapper on a freed region or a count on the wrong one.
TEST_F(RegistryConcurrencyTest, MapHintsRaceRegionChurn) {
  ASSERT_TRUE(registry_->BindContainer(1, kCtx).ok());
  ASSERT_TRUE(registry_->BindContainer(2, kCtx).ok());
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> mapped{0};
  std::vector<std::thread> mappers;
  for (ContainerId container : {1, 2}) {
    mappers.emplace_back([&, container] {
      std::mt19937_64 rng(container);
      while (!stop.load(std::memory_order_relaxed)) {
        const uint64_t page = rng() % 8;
        const uint64_t iova = page * k64K;
        absl::Status status = registry_->Map(container, iova, kBase + page * k64K, k64K);
        if (status.ok()) {
          mapped.fetch_add(1, std::memory_order_relaxed);
        } else {
          const int err = ErrnoOf(status);
          ASSERT_TRUE(err == ENXIO || err == EINVAL) << status;
        }
        registry_->Unmap(container, iova, k64K).IgnoreError();
      }
    });
  }
  // At least 300 replacements, and until the mappers got some maps in (however they are scheduled).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (int round = 0;
       round < 300 || (mapped.load() < 1000 && std::chrono::steady_clock::now() < deadline);
       ++round) {
    const uint64_t size = (round % 2 == 0 ? 8 : 4) * k64K;
    ASSERT_TRUE(registry_->Register(3, kCtx, kBase, size).ok());
    for (;;) {
      absl::Status status = registry_->Unregister(3, kBase, size);
      if (status.ok()) break;
      ASSERT_EQ(ErrnoOf(status), EBUSY) << status;
      std::this_thread::yield();
    }
  }
  stop = true;
  for (auto& mapper : mappers) mapper.join();
  EXPECT_GT(mapped.load(), 0u);
  EXPECT_TRUE(registry_->ListRegions().empty());
  absl::Status invariants = registry_->CheckInvariants();
  EXPECT_TRUE(invariants.ok()) << invariants;
  EXPECT_EQ(*sim_->TotalPinnedPages(), 0u);
  RecordProperty("maps", static_cast<int>(mapped.load()));
}

TEST_F(RegistryConcurrencyTest, ConcurrentWritersAndTeardown) {
  ASSERT_TRUE(registry_->CreateContext(2, {}).ok());
  std::vector<std::thread> writers;
  for (ContainerId container : {1, 2, 3}) {
    writers.emplace_back([&, container] {
      for (int i = 0; i < 200; ++i) {
        const uint64_t ua = kBase + (container * 1000 + i) * k64K;
        ASSERT_TRUE(registry_->Register(container, kCtx, ua, k64K).ok());
        ASSERT_TRUE(registry_->Map(container, i * k64K, ua, k64K).ok());
      }
    });
  }
  for (auto& writer : writers) writer.join();
  absl::Status invariants = registry_->CheckInvariants();
  ASSERT_TRUE(invariants.ok()) << invariants;
  EXPECT_EQ(registry_->ListRegions().size(), 600u);
  ASSERT_TRUE(registry_->TeardownContext(kCtx).ok());
  EXPECT_EQ(*sim_->TotalPinnedPages(), 0u);
}

}  // namespace
}  // namespace dmapin::agent
