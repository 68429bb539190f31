#include "agent/store/state_store.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin::agent {

// Found by gtest through ADL, hence outside the anonymous namespace.
std::ostream& operator<<(std::ostream& os, const StoredMapping& m) {
  return os << "{" << m.container << " iova=0x" << std::hex << m.iova << " size=0x" << m.size
            << " ua=0x" << m.ua << std::dec << "}";
}

std::ostream& operator<<(std::ostream& os, const StoredHold& h) {
  return os << "{" << h.container << "/" << h.context << " ua=0x" << std::hex << h.ua << " size=0x"
            << h.size << std::dec << " seq=" << h.seq << "}";
}

std::ostream& operator<<(std::ostream& os, const StoredPending& p) {
  return os << "{" << p.context << " ua=0x" << std::hex << p.ua << " size=0x" << p.size << std::dec
            << "}";
}

std::ostream& operator<<(std::ostream& os, const StoredContext& c) {
  return os << "{" << c.name << " id=" << c.id << "}";
}

std::ostream& operator<<(std::ostream& os, const StoredContainer& c) {
  return os << "{" << c.name << " id=" << c.id << "}";
}

std::ostream& operator<<(std::ostream& os, const StoredDecision& d) {
  return os << "{" << d.decision_id << " epoch=" << d.epoch << " result=" << d.result << "}";
}

namespace {

constexpr uint64_t kPage = 0x1000;
constexpr uint64_t kHigh = uint64_t{1} << 63;

void ExpectSameState(const PersistedState& a, const PersistedState& b) {
  EXPECT_EQ(a.contexts, b.contexts);
  EXPECT_EQ(a.containers, b.containers);
  EXPECT_EQ(a.holds, b.holds);
  EXPECT_EQ(a.pending, b.pending);
  EXPECT_EQ(a.mappings, b.mappings);
  EXPECT_EQ(a.decisions, b.decisions);
  EXPECT_EQ(a.meta, b.meta);
}

StoredContext Context(const std::string& name, uint64_t id) {
  StoredContext context;
  context.name = name;
  context.id = id;
  return context;
}

StoredContainer Container(const std::string& name, uint64_t id) {
  StoredContainer container;
  container.name = name;
  container.id = id;
  container.iommu_page_size = kPage;
  container.window_start = 0;
  container.window_size = uint64_t{1} << 40;
  return container;
}

StoredMapping Mapping(const std::string& container, uint64_t iova, uint64_t size, uint64_t ua) {
  return StoredMapping{container, iova, size, ua};
}

class StateStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = absl::StrCat(::testing::TempDir(), "/state_store_test/", info->name(), "/agent");
    std::filesystem::remove_all(dir_);
    Reopen();
  }

  void Reopen(StateStoreOptions options = {}) {
    store_.reset();
    absl::StatusOr<std::unique_ptr<StateStore>> store = StateStore::Open(dir_, std::move(options));
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
  }

  PersistedState Load() {
    absl::StatusOr<PersistedState> state = store_->Load();
    EXPECT_TRUE(state.ok()) << state.status();
    return state.ok() ? *std::move(state) : PersistedState{};
  }

  void Commit(const Mutation& mutation) {
    absl::Status status = store_->Commit(mutation);
    ASSERT_TRUE(status.ok()) << status;
  }

  // A context "vm" with containers "c1", "c2" (ids 1, 2).
  void Basic() {
    Commit(Mutation()
               .PutContext(Context("vm", 10))
               .PutContainer(Container("c1", 1))
               .PutContainer(Container("c2", 2)));
  }

  std::vector<StoredMapping> Mappings() { return Load().mappings; }

  void RunCrashRounds(int rounds, const std::function<void(const std::string&, int)>& child,
                      const std::function<uint32_t(uint32_t max_acked)>& verify);

  std::string dir_;
  std::unique_ptr<StateStore> store_;
};

TEST_F(StateStoreTest, FreshStoreHasSchemaVersionOnly) {
  PersistedState state = Load();
  EXPECT_TRUE(state.contexts.empty());
  EXPECT_TRUE(state.holds.empty());
  ASSERT_EQ(state.meta.size(), 2u);
  EXPECT_EQ(state.meta["schema_version"], absl::StrCat(StateStore::CurrentSchemaVersion()));
  EXPECT_EQ(state.meta[std::string(kMetaJournalFileSeq)], "1");  // the journal's first file
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/state.db"));
  EXPECT_EQ(store_->path(), dir_ + "/state.db");
}

TEST_F(StateStoreTest, RoundTripsEveryTable) {
  StoredContext limited{"vm-a", 7, uint64_t{64} << 20, false, 2, 0x7f0000000000, 0x40000000};
  // Values >= 2^63 check the signed storage of uint64 columns.
  StoredContext unlimited{"vm-b", ~uint64_t{0}, std::nullopt, true, 0, kHigh | 0x1000, 0};
  StoredContainer small{"c-small", 3, 0x10000, 0x100000, 0x40000000};
  StoredContainer top{"c-top", kHigh + 5, 0x1000000, kHigh, kHigh};
  const absl::Time before = absl::Now() - absl::Milliseconds(1);
  Commit(Mutation()
             .PutContext(limited)
             .PutContext(unlimited)
             .PutContainer(small)
             .PutContainer(top)
             .AddHold("c-small", "vm-a", 0x7f0000000000, 0x200000)
             .AddHold("c-top", "vm-b", kHigh | 0x1000, 0x1000000)
             .AddHold("c-small", "vm-a", 0x7f0000400000, 0x10000)
             .PutPending("vm-b", 0x5000, 0x1000)
             .PutPending("vm-a", 0x9000, 0x2000)
             .SetMapping("c-top", ~uint64_t{0} - 0xffffff, 0x1000000, kHigh | 0x1000)
             .SetMapping("c-top", kHigh, 0x1000000, 0x4000)
             .SetMapping("c-small", 0x200000, 0x10000, 0x7f0000400000)
             .SetMapping("c-small", 0x100000, 0x100000, 0x7f0000000000)
             .RecordDecision("d-2", 9, EBUSY)
             .RecordDecision("d-1", 8, 0)
             .PutMeta(kMetaNodeName, "node-17")
             .PutMeta(kMetaNextId, "42"));
  const absl::Time after = absl::Now() + absl::Milliseconds(1);

  PersistedState state = Load();
  EXPECT_EQ(state.contexts, (std::vector<StoredContext>{limited, unlimited}));
  EXPECT_EQ(state.containers, (std::vector<StoredContainer>{small, top}));
  ASSERT_EQ(state.holds.size(), 3u);
  EXPECT_EQ(state.holds[0].container, "c-small");
  EXPECT_EQ(state.holds[0].ua, 0x7f0000000000u);
  EXPECT_EQ(state.holds[1].container, "c-top");
  EXPECT_EQ(state.holds[1].context, "vm-b");
  EXPECT_EQ(state.holds[1].ua, kHigh | 0x1000);
  EXPECT_EQ(state.holds[1].size, 0x1000000u);
  EXPECT_EQ(state.holds[2].ua, 0x7f0000400000u);
  EXPECT_LT(state.holds[0].seq, state.holds[1].seq);
  EXPECT_LT(state.holds[1].seq, state.holds[2].seq);
  EXPECT_EQ(state.pending,
            (std::vector<StoredPending>{{"vm-a", 0x9000, 0x2000}, {"vm-b", 0x5000, 0x1000}}));
  // By container, then unsigned iova.
  EXPECT_EQ(state.mappings,
            (std::vector<StoredMapping>{
                Mapping("c-small", 0x100000, 0x100000, 0x7f0000000000),
                Mapping("c-small", 0x200000, 0x10000, 0x7f0000400000),
                Mapping("c-top", kHigh, 0x1000000, 0x4000),
                Mapping("c-top", ~uint64_t{0} - 0xffffff, 0x1000000, kHigh | 0x1000),
            }));
  ASSERT_EQ(state.decisions.size(), 2u);
  EXPECT_EQ(state.decisions[0].decision_id, "d-1");
  EXPECT_EQ(state.decisions[0].epoch, 8u);
  EXPECT_EQ(state.decisions[0].result, 0);
  EXPECT_EQ(state.decisions[1].decision_id, "d-2");
  EXPECT_EQ(state.decisions[1].result, EBUSY);
  for (const StoredDecision& decision : state.decisions) {
    EXPECT_GE(decision.applied_at, before);
    EXPECT_LE(decision.applied_at, after);
  }
  EXPECT_EQ(state.meta["node_name"], "node-17");
  EXPECT_EQ(state.meta["next_id"], "42");

  // Upserts change the row in place and cascade nothing.
  limited.memlock_limit_bytes = std::nullopt;
  limited.cap_ipc_lock = true;
  small.window_size = 0x80000000;
  Commit(Mutation().PutContext(limited).PutContainer(small).PutMeta(kMetaNextId, "43"));
  PersistedState updated = Load();
  EXPECT_EQ(updated.contexts[0], limited);
  EXPECT_EQ(updated.containers[0], small);
  EXPECT_EQ(updated.holds, state.holds);
  EXPECT_EQ(updated.pending, state.pending);
  EXPECT_EQ(updated.mappings, state.mappings);
  EXPECT_EQ(updated.meta["next_id"], "43");
}

// A VMM's context: its owner and the slots of its memory, replaced as a whole by PutContext and
// gone with the context.
TEST_F(StateStoreTest, OwnersAndMemorySlotsRoundTrip) {
  StoredContext vm = Context("vm", 10);
  vm.owner_pid = 4242;
  vm.owner_uid = 107;
  vm.owner_start_time = 123456789;
  vm.slots = {{.ua = 0x7f0000000000, .size = 1 << 20, .offset = 0, .dev = 1, .ino = 77},
              {.ua = 0x7f0000200000, .size = 2 << 20, .offset = 1 << 20, .dev = 1, .ino = 77}};
  StoredContainer c1 = Container("c1", 1);
  c1.creator_pid = 4242;
  c1.creator_start_time = 123456789;
  Commit(Mutation().PutContext(vm).PutContainer(c1));
  PersistedState state = Load();
  ASSERT_EQ(state.contexts.size(), 1u);
  EXPECT_EQ(state.contexts[0], vm);
  ASSERT_EQ(state.containers.size(), 1u);
  EXPECT_EQ(state.containers[0], c1);

  vm.slots.pop_back();
  Commit(Mutation().PutContext(vm));
  EXPECT_EQ(Load().contexts[0].slots, vm.slots);

  Commit(Mutation().DeleteContext("vm"));
  store_.reset();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir_ + "/state.db").c_str(), &db), SQLITE_OK);
  sqlite3_stmt* count = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT COUNT(*) FROM memory_slots", -1, &count, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(count), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(count, 0), 0) << "the slots went with their context";
  sqlite3_finalize(count);
  sqlite3_close(db);
}

TEST_F(StateStoreTest, ReopenPreservesEverything) {
  Basic();
  Commit(Mutation()
             .AddHold("c1", "vm", 0x10000, 0x10000)
             .AddHold("c2", "vm", 0x10000, 0x10000)
             .PutPending("vm", 0x40000, 0x1000)
             .SetMapping("c1", 0x0, 0x10000, 0x10000)
             .RecordDecision("d", 1, 0)
             .PutMeta(kMetaNodeName, "n"));
  PersistedState before = Load();
  Reopen();
  ExpectSameState(Load(), before);
  // Seq keeps growing across reopen.
  Commit(Mutation().AddHold("c1", "vm", 0x80000, 0x1000));
  PersistedState after = Load();
  ASSERT_EQ(after.holds.size(), 3u);
  EXPECT_GT(after.holds[2].seq, before.holds[1].seq);
  // And with synchronous=FULL.
  Reopen({.sync_full = true});
  ExpectSameState(Load(), after);
}

TEST_F(StateStoreTest, SeqNeverGoesBackwards) {
  Basic();
  Commit(Mutation().AddHold("c1", "vm", 0x1000, 0x1000).AddHold("c2", "vm", 0x1000, 0x1000));
  const int64_t newest = Load().holds[1].seq;
  Commit(Mutation().RemoveHold("c2", "vm", 0x1000, 0x1000));
  Commit(Mutation().AddHold("c2", "vm", 0x1000, 0x1000));
  std::vector<StoredHold> holds = Load().holds;
  ASSERT_EQ(holds.size(), 2u);
  EXPECT_EQ(holds[0].container, "c1");
  EXPECT_EQ(holds[1].container, "c2");
  EXPECT_GT(holds[1].seq, newest);
}

TEST_F(StateStoreTest, DeleteContainerCascadesItsHoldsAndMappings) {
  Basic();
  Commit(Mutation()
             .AddHold("c1", "vm", 0x10000, 0x10000)
             .AddHold("c2", "vm", 0x10000, 0x10000)
             .AddHold("c1", "vm", 0x40000, 0x10000)
             .PutPending("vm", 0x80000, 0x1000)
             .SetMapping("c1", 0x0, 0x10000, 0x10000)
             .SetMapping("c2", 0x0, 0x10000, 0x10000));
  Commit(Mutation().DeleteContainer("c1"));
  PersistedState state = Load();
  EXPECT_EQ(state.contexts.size(), 1u);
  ASSERT_EQ(state.containers.size(), 1u);
  EXPECT_EQ(state.containers[0].name, "c2");
  ASSERT_EQ(state.holds.size(), 1u);
  EXPECT_EQ(state.holds[0].container, "c2");
  EXPECT_EQ(state.pending.size(), 1u);
  EXPECT_EQ(state.mappings, (std::vector<StoredMapping>{Mapping("c2", 0x0, 0x10000, 0x10000)}));
}

TEST_F(StateStoreTest, DeleteContextCascadesToItsContainers) {
  Basic();
  Commit(Mutation()
             .PutContext(Context("other", 11))
             .PutContainer(Container("c3", 3))
             .PutContainer(Container("idle", 4))
             .PutContainer(Container("bound-idle", 5))
             .BindContainer("c1", "vm")
             .BindContainer("c2", "vm")
             .BindContainer("c3", "other")
             .BindContainer("bound-idle", "vm")  // bound, but holds nothing now
             .AddHold("c1", "vm", 0x10000, 0x10000)
             .AddHold("c2", "vm", 0x10000, 0x10000)
             .AddHold("c3", "other", 0x10000, 0x10000)
             .PutPending("vm", 0x80000, 0x1000)
             .PutPending("other", 0x80000, 0x1000)
             .SetMapping("c1", 0x0, 0x10000, 0x10000)
             .SetMapping("c2", 0x0, 0x10000, 0x10000)
             .SetMapping("c3", 0x0, 0x10000, 0x10000));
  Commit(Mutation().DeleteContext("vm"));
  PersistedState state = Load();
  EXPECT_EQ(state.contexts, (std::vector<StoredContext>{Context("other", 11)}));
  StoredContainer c3 = Container("c3", 3);
  c3.context = "other";
  EXPECT_EQ(state.containers, (std::vector<StoredContainer>{c3, Container("idle", 4)}));
  ASSERT_EQ(state.holds.size(), 1u);
  EXPECT_EQ(state.holds[0].container, "c3");
  EXPECT_EQ(state.pending, (std::vector<StoredPending>{{"other", 0x80000, 0x1000}}));
  EXPECT_EQ(state.mappings, (std::vector<StoredMapping>{Mapping("c3", 0x0, 0x10000, 0x10000)}));
}

TEST_F(StateStoreTest, RemovingMissingRowsIsANoOp) {
  Basic();
  PersistedState before = Load();
  const StoreStats stats = store_->stats();
  Commit(Mutation()
             .DeleteContext("nope")
             .DeleteContainer("nope")
             .RemoveHold("c1", "vm", 0x1000, 0x1000)
             .RemovePending("vm", 0x1000, 0x1000)
             .ClearMappings("c1", 0, 0x100000)
             .ClearMappings("nope", 0, 0x100000));
  ExpectSameState(Load(), before);
  EXPECT_EQ(store_->stats().commits, stats.commits + 1);
  EXPECT_EQ(store_->stats().rows_written, stats.rows_written);
}

TEST_F(StateStoreTest, PutPendingIsIdempotent) {
  Basic();
  Commit(Mutation().PutPending("vm", 0x1000, 0x1000));
  Commit(Mutation().PutPending("vm", 0x1000, 0x1000));
  EXPECT_EQ(Load().pending.size(), 1u);
  Commit(Mutation().RemovePending("vm", 0x1000, 0x1000));
  EXPECT_TRUE(Load().pending.empty());
}

// --- Mapping trim/split ----------------------------------------------------------------------

TEST_F(StateStoreTest, RemapOfTheMiddleSplitsIntoThree) {
  Basic();
  Commit(Mutation().SetMapping("c1", 0x10000, 0x30000, 0x100000));
  Commit(Mutation().SetMapping("c1", 0x20000, 0x10000, 0x900000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{
                            Mapping("c1", 0x10000, 0x10000, 0x100000),
                            Mapping("c1", 0x20000, 0x10000, 0x900000),
                            Mapping("c1", 0x30000, 0x10000, 0x120000),
                        }));
}

// What the agent reads to put back entries whose change the store refused: folded rows and the
// journal's unfolded records, clipped to the range, even from a store that refuses transactions.
TEST_F(StateStoreTest, AcknowledgedMappingsAreRowsAndUnfoldedRecordsClipped) {
  Reopen({.fail_commit_hook =
              [](int number) {
                return number > 2 ? absl::UnavailableError("disk unplugged") : absl::OkStatus();
              },
          .journal_fold_interval = absl::Hours(1)});
  Basic();
  Commit(Mutation().SetMapping("c1", 0x10000, 0x30000, 0x100000).SetMapping("c2", 0, 0x40000, 0));
  ASSERT_TRUE(store_->RecordMap(1, 0x20000, 0x10000, 0x900000).ok());
  ASSERT_TRUE(store_->RecordClear(1, 0x38000, 0x8000).ok());
  ASSERT_TRUE(store_->RecordMap(1, 0x80000, 0x10000, 0x700000).ok());
  absl::StatusOr<std::vector<StoredMapping>> rows =
      store_->AcknowledgedMappings(1, 0x18000, 0x70000);
  ASSERT_TRUE(rows.ok()) << rows.status();
  EXPECT_EQ(*rows, (std::vector<StoredMapping>{
                       Mapping("c1", 0x18000, 0x8000, 0x108000),
                       Mapping("c1", 0x20000, 0x10000, 0x900000),
                       Mapping("c1", 0x30000, 0x8000, 0x120000),
                       Mapping("c1", 0x80000, 0x8000, 0x700000),
                   }));
  EXPECT_EQ(*store_->AcknowledgedMappings(1, 0, ~uint64_t{0}),
            (std::vector<StoredMapping>{
                Mapping("c1", 0x10000, 0x10000, 0x100000),
                Mapping("c1", 0x20000, 0x10000, 0x900000),
                Mapping("c1", 0x30000, 0x8000, 0x120000),
                Mapping("c1", 0x80000, 0x10000, 0x700000),
            }));
  EXPECT_EQ(ErrnoOf(store_->AcknowledgedMappings(9, 0, 0x1000).status()), ENOENT);
  // Folded, the same rows come from the table alone.
  ASSERT_TRUE(store_->FoldJournal().ok());
  EXPECT_EQ(*store_->AcknowledgedMappings(1, 0x18000, 0x70000), *rows);
}

TEST_F(StateStoreTest, ClearOfPartialRanges) {
  Basic();
  Commit(Mutation().SetMapping("c1", 0x10000, 0x40000, 0x100000));
  // Head.
  Commit(Mutation().ClearMappings("c1", 0x0, 0x18000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{Mapping("c1", 0x18000, 0x38000, 0x108000)}));
  // Tail.
  Commit(Mutation().ClearMappings("c1", 0x48000, 0x100000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{Mapping("c1", 0x18000, 0x30000, 0x108000)}));
  // Middle: two rows.
  Commit(Mutation().ClearMappings("c1", 0x20000, 0x8000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{
                            Mapping("c1", 0x18000, 0x8000, 0x108000),
                            Mapping("c1", 0x28000, 0x20000, 0x118000),
                        }));
  // Across both rows, trimming each.
  Commit(Mutation().ClearMappings("c1", 0x1c000, 0x10000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{
                            Mapping("c1", 0x18000, 0x4000, 0x108000),
                            Mapping("c1", 0x2c000, 0x1c000, 0x11c000),
                        }));
  // Exactly one row.
  Commit(Mutation().ClearMappings("c1", 0x18000, 0x4000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{Mapping("c1", 0x2c000, 0x1c000, 0x11c000)}));
}

TEST_F(StateStoreTest, ClearSpanningManyRowsRemovesTheInnerOnes) {
  Basic();
  Mutation mutation;
  for (uint64_t i = 0; i < 10; ++i) mutation.SetMapping("c1", i * 0x10000, 0x8000, i * 0x100000);
  Commit(mutation);
  Commit(Mutation().ClearMappings("c1", 0x14000, 0x70000));
  std::vector<StoredMapping> rows = Mappings();
  EXPECT_EQ(rows, (std::vector<StoredMapping>{
                      Mapping("c1", 0x0, 0x8000, 0x0),
                      Mapping("c1", 0x10000, 0x4000, 0x100000),
                      Mapping("c1", 0x84000, 0x4000, 0x804000),
                      Mapping("c1", 0x90000, 0x8000, 0x900000),
                  }));
}

TEST_F(StateStoreTest, AdjacentRangesStaySeparateRows) {
  Basic();
  Commit(Mutation()
             .SetMapping("c1", 0x0, 0x1000, 0xa000)
             .SetMapping("c1", 0x1000, 0x1000, 0xb000)
             .SetMapping("c1", 0x2000, 0x1000, 0xc000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{
                            Mapping("c1", 0x0, 0x1000, 0xa000),
                            Mapping("c1", 0x1000, 0x1000, 0xb000),
                            Mapping("c1", 0x2000, 0x1000, 0xc000),
                        }));
  // Remapping exactly one of them touches only it.
  Commit(Mutation().SetMapping("c1", 0x1000, 0x1000, 0xf000));
  EXPECT_EQ(Mappings()[1], Mapping("c1", 0x1000, 0x1000, 0xf000));
  EXPECT_EQ(Mappings().size(), 3u);
}

TEST_F(StateStoreTest, ClearOfNothingIsANoOp) {
  Basic();
  Commit(Mutation().SetMapping("c1", 0x10000, 0x10000, 0x0).SetMapping("c2", 0x0, 0x100000, 0x0));
  std::vector<StoredMapping> before = Mappings();
  const uint64_t rows = store_->stats().rows_written;
  // Gaps before, between and after; just touching either end.
  Commit(Mutation()
             .ClearMappings("c1", 0x0, 0x10000)
             .ClearMappings("c1", 0x20000, 0x10000)
             .ClearMappings("c1", ~uint64_t{0} - 0xfff, 0x1000));
  EXPECT_EQ(Mappings(), before);
  EXPECT_EQ(store_->stats().rows_written, rows);
}

TEST_F(StateStoreTest, MappingsAtTheTopOfTheAddressSpace) {
  Basic();
  const uint64_t top = ~uint64_t{0} - 0x3fff;  // last 4 pages
  Commit(Mutation()
             .SetMapping("c1", top, 0x4000, 0x100000)
             .SetMapping("c1", kHigh - 0x1000, 0x2000, 0x200000));  // straddles 2^63
  Commit(Mutation().ClearMappings("c1", top + 0x3000, 0x1000).ClearMappings("c1", kHigh, 0x1000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{
                            Mapping("c1", kHigh - 0x1000, 0x1000, 0x200000),
                            Mapping("c1", top, 0x3000, 0x100000),
                        }));
  Commit(Mutation().SetMapping("c1", top + 0x1000, 0x3000, 0x900000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{
                            Mapping("c1", kHigh - 0x1000, 0x1000, 0x200000),
                            Mapping("c1", top, 0x1000, 0x100000),
                            Mapping("c1", top + 0x1000, 0x3000, 0x900000),
                        }));
}

TEST_F(StateStoreTest, MappingsOfOtherContainersAreUntouched) {
  Basic();
  Commit(Mutation().SetMapping("c1", 0x0, 0x10000, 0x0).SetMapping("c2", 0x0, 0x10000, 0x0));
  Commit(Mutation().SetMapping("c1", 0x4000, 0x1000, 0x99000).ClearMappings("c1", 0x0, 0x1000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{
                            Mapping("c1", 0x1000, 0x3000, 0x1000),
                            Mapping("c1", 0x4000, 0x1000, 0x99000),
                            Mapping("c1", 0x5000, 0xb000, 0x5000),
                            Mapping("c2", 0x0, 0x10000, 0x0),
                        }));
}

// --- Failures ------------------------------------------------------------------------------------

TEST_F(StateStoreTest, ConstraintFailureRollsBackTheWholeCommit) {
  Basic();
  PersistedState before = Load();
  absl::Status status = store_->Commit(Mutation()
                                           .PutMeta("k", "v")
                                           .AddHold("c1", "vm", 0x1000, 0x1000)
                                           .AddHold("no-such-container", "vm", 0x1000, 0x1000));
  EXPECT_EQ(ErrnoOf(status), EIO) << status;
  EXPECT_TRUE(absl::StartsWith(status.message(), "EIO: ")) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "FOREIGN KEY constraint failed")) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "SQLITE_CONSTRAINT")) << status;
  std::printf("constraint failure: %s\n", status.ToString().c_str());
  ExpectSameState(Load(), before);

  Commit(Mutation().RecordDecision("d", 1, 0));
  status = store_->Commit(Mutation().PutMeta("k", "v").RecordDecision("d", 2, 0));
  EXPECT_EQ(ErrnoOf(status), EIO) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "UNIQUE constraint failed")) << status;
  EXPECT_EQ(Load().meta.count("k"), 0u);

  status = store_->Commit(
      Mutation().AddHold("c1", "vm", 0x1000, 0x1000).AddHold("c1", "vm", 0x1000, 0x1000));
  EXPECT_EQ(ErrnoOf(status), EIO) << status;
  EXPECT_TRUE(Load().holds.empty());
  EXPECT_EQ(store_->stats().failed_commits, 3u);
  // The connection is still usable.
  Commit(Mutation().PutMeta("k", "v"));
  EXPECT_EQ(Load().meta["k"], "v");
}

TEST_F(StateStoreTest, MalformedOperationsAreRejectedUpFront) {
  Basic();
  PersistedState before = Load();
  const Mutation bad[] = {
      Mutation().PutMeta("k", "v").AddHold("c1", "vm", 0x1000, 0),
      Mutation().PutMeta("k", "v").SetMapping("c1", ~uint64_t{0} - 0xfff, 0x2000, 0),
      Mutation().PutMeta("k", "v").SetMapping("c1", 0, 0x2000, ~uint64_t{0}),
      Mutation().PutMeta("k", "v").ClearMappings("c1", 0, 0),
      Mutation().PutMeta("k", "v").PutPending("", 0x1000, 0x1000),
      Mutation().PutMeta(kMetaSchemaVersion, "7"),
      Mutation().PutMeta("", "v"),
      Mutation().RecordDecision("", 1, 0),
      Mutation().PutContext(Context("", 1)),
      Mutation().PutMeta("k", "v").BindContainer("c1", ""),
  };
  for (const Mutation& mutation : bad) {
    absl::Status status = store_->Commit(mutation);
    EXPECT_EQ(ErrnoOf(status), EINVAL) << status;
  }
  ExpectSameState(Load(), before);
  EXPECT_EQ(store_->stats().failed_commits, std::size(bad));
}

TEST_F(StateStoreTest, InjectedCommitFailureLeavesTheDatabaseUnchanged) {
  std::vector<int> seen;
  Reopen({.fail_commit_hook = [&seen](int number) {
    seen.push_back(number);
    return number == 3 ? absl::UnavailableError("disk unplugged") : absl::OkStatus();
  }});
  Basic();                                                                                     // 1
  Commit(Mutation().AddHold("c1", "vm", 0x1000, 0x1000).SetMapping("c1", 0, 0x4000, 0x1000));  // 2
  PersistedState before = Load();
  const StoreStats stats = store_->stats();

  // 3: a bit of every table, including cascades and splits.
  absl::Status status = store_->Commit(Mutation()
                                           .PutContext(Context("vm2", 20))
                                           .AddHold("c2", "vm", 0x1000, 0x1000)
                                           .RemoveHold("c1", "vm", 0x1000, 0x1000)
                                           .PutPending("vm", 0x1000, 0x1000)
                                           .SetMapping("c1", 0x1000, 0x1000, 0x9000)
                                           .DeleteContainer("c2")
                                           .RecordDecision("d", 1, 0)
                                           .PutMeta("k", "v"));
  EXPECT_EQ(ErrnoOf(status), EIO) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "disk unplugged")) << status;
  ExpectSameState(Load(), before);
  EXPECT_EQ(store_->stats().commits, stats.commits);
  EXPECT_EQ(store_->stats().failed_commits, stats.failed_commits + 1);
  EXPECT_EQ(store_->stats().rows_written, stats.rows_written);
  absl::StatusOr<std::optional<int>> decision = store_->DecisionResult("d");
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_FALSE(decision->has_value());

  // 4 succeeds; the failed one is gone after a reopen too.
  Commit(Mutation().PutMeta("k", "w"));
  EXPECT_EQ(seen, (std::vector<int>{1, 2, 3, 4}));
  PersistedState expected = before;
  expected.meta["k"] = "w";
  Reopen();
  ExpectSameState(Load(), expected);
}

TEST_F(StateStoreTest, DecisionResult) {
  Commit(Mutation().RecordDecision("ok", 3, 0).RecordDecision("busy", 3, EBUSY));
  absl::StatusOr<std::optional<int>> ok = store_->DecisionResult("ok");
  absl::StatusOr<std::optional<int>> busy = store_->DecisionResult("busy");
  absl::StatusOr<std::optional<int>> unknown = store_->DecisionResult("unknown");
  ASSERT_TRUE(ok.ok() && busy.ok() && unknown.ok());
  EXPECT_EQ(*ok, std::optional<int>(0));
  EXPECT_EQ(*busy, std::optional<int>(EBUSY));
  EXPECT_EQ(*unknown, std::nullopt);
}

TEST_F(StateStoreTest, StatsCountCommitsAndRows) {
  Basic();                                            // 3 rows
  Commit(Mutation().SetMapping("c1", 0, 0x3000, 0));  // 1 row
  // Split: the row is trimmed (1), the right part inserted (1), the new row inserted (1).
  Commit(Mutation().SetMapping("c1", 0x1000, 0x1000, 0x9000));
  Commit(Mutation());  // empty: nothing happens
  StoreStats stats = store_->stats();
  EXPECT_EQ(stats.commits, 3u);
  EXPECT_EQ(stats.failed_commits, 0u);
  EXPECT_EQ(stats.rows_written, 7u);
}

// --- Open ------------------------------------------------------------------------------------

// Overwrites `length` bytes at `offset` of `path` with a pattern.
void Scribble(const std::string& path, uint64_t offset, size_t length) {
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(file.is_open());
  file.seekp(static_cast<std::streamoff>(offset));
  std::string junk(length, '\0');
  for (size_t i = 0; i < length; ++i) junk[i] = static_cast<char>(0xa5 ^ (i * 37));
  file.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  ASSERT_TRUE(file.good());
}

TEST_F(StateStoreTest, CorruptedFileFailsToOpenWithAClearError) {
  Basic();
  for (int batch = 0; batch < 10; ++batch) {
    Mutation mutation;
    for (uint64_t i = 0; i < 200; ++i) {
      const uint64_t n = batch * 200 + i;
      mutation.AddHold("c1", "vm", n * kPage, kPage).SetMapping("c1", n * kPage, kPage, n * kPage);
    }
    Commit(mutation);
  }
  const std::string path = store_->path();
  store_.reset();  // checkpoints the WAL into state.db
  const uint64_t size = std::filesystem::file_size(path);
  ASSERT_GE(size, 16 * 4096u) << "too small to have a middle";
  Scribble(path, (size / 2) & ~uint64_t{4095}, 4096);

  absl::StatusOr<std::unique_ptr<StateStore>> store = StateStore::Open(dir_, {});
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
  EXPECT_EQ(ErrnoOf(store.status()), EIO);
  EXPECT_TRUE(absl::StrContains(store.status().message(), path)) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "damaged")) << store.status();
  std::printf("corrupt page: %s\n", store.status().ToString().c_str());

  // A scribbled header is caught too.
  Scribble(path, 0, 64);
  store = StateStore::Open(dir_, {});
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
  std::printf("corrupt header: %s\n", store.status().ToString().c_str());
}

TEST_F(StateStoreTest, RefusesASchemaNewerThanItKnows) {
  const std::string path = store_->path();
  store_.reset();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "UPDATE meta SET value = '99' WHERE key = 'schema_version'", nullptr,
                         nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  absl::StatusOr<std::unique_ptr<StateStore>> store = StateStore::Open(dir_, {});
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "schema version 99")) << store.status();
}

// Schema version 1 as the first release wrote it (state_store.cc's first migration).
constexpr const char* kSchemaV1 = R"sql(
CREATE TABLE meta (
  key TEXT PRIMARY KEY NOT NULL,
  value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE contexts (
  name TEXT PRIMARY KEY NOT NULL,
  id INTEGER NOT NULL UNIQUE,
  memlock_limit_bytes INTEGER,  -- NULL: unlimited
  cap_ipc_lock INTEGER NOT NULL CHECK (cap_ipc_lock IN (0, 1)),
  backing INTEGER NOT NULL,
  mem_ua INTEGER NOT NULL,
  mem_size INTEGER NOT NULL
);

CREATE TABLE containers (
  name TEXT PRIMARY KEY NOT NULL,
  id INTEGER NOT NULL UNIQUE,
  iommu_page_size INTEGER NOT NULL,
  window_start INTEGER NOT NULL,
  window_size INTEGER NOT NULL
);

-- AUTOINCREMENT: seq never goes backwards, even after the newest hold is removed.
CREATE TABLE holds (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  container TEXT NOT NULL REFERENCES containers (name) ON DELETE CASCADE,
  context TEXT NOT NULL REFERENCES contexts (name) ON DELETE CASCADE,
  ua INTEGER NOT NULL,
  size INTEGER NOT NULL,
  UNIQUE (container, context, ua, size)
);
CREATE INDEX holds_by_context ON holds (context);

CREATE TABLE pending (
  context TEXT NOT NULL REFERENCES contexts (name) ON DELETE CASCADE,
  ua INTEGER NOT NULL,
  size INTEGER NOT NULL,
  PRIMARY KEY (context, ua, size)
) WITHOUT ROWID;

-- iova: 8-byte big-endian, so that BLOB order (memcmp) is unsigned 64-bit order.
CREATE TABLE mappings (
  container TEXT NOT NULL REFERENCES containers (name) ON DELETE CASCADE,
  iova BLOB NOT NULL CHECK (typeof(iova) = 'blob' AND length(iova) = 8),
  size INTEGER NOT NULL,
  ua INTEGER NOT NULL,
  PRIMARY KEY (container, iova)
) WITHOUT ROWID;

CREATE TABLE applied_decisions (
  decision_id TEXT PRIMARY KEY NOT NULL,
  epoch INTEGER NOT NULL,
  result INTEGER NOT NULL,  -- errno, 0 = success
  applied_at INTEGER NOT NULL  -- Unix time, milliseconds
) WITHOUT ROWID;
)sql";

TEST_F(StateStoreTest, MigratesAVersion1DatabaseAndBackfillsBindings) {
  store_.reset();
  std::filesystem::remove_all(dir_);
  std::filesystem::create_directories(dir_);
  const std::string path = dir_ + "/state.db";
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  const std::string v1_rows = absl::StrCat(
      kSchemaV1,
      "INSERT INTO meta VALUES ('schema_version', '1');"
      "INSERT INTO contexts VALUES ('vm', 1, NULL, 0, 0, 0, 0);"
      "INSERT INTO containers VALUES ('held', 2, 65536, 0, 1099511627776);"
      "INSERT INTO containers VALUES ('idle', 3, 65536, 0, 1099511627776);"
      "INSERT INTO holds (container, context, ua, size) VALUES ('held', 'vm', 65536, 65536);");
  char* error = nullptr;
  ASSERT_EQ(sqlite3_exec(db, v1_rows.c_str(), nullptr, nullptr, &error), SQLITE_OK) << error;
  sqlite3_close(db);

  absl::StatusOr<std::unique_ptr<StateStore>> store = StateStore::Open(dir_, {});
  ASSERT_TRUE(store.ok()) << store.status();
  absl::StatusOr<PersistedState> state = (*store)->Load();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(state->meta.at(std::string(kMetaSchemaVersion)),
            absl::StrCat(StateStore::CurrentSchemaVersion()));
  ASSERT_EQ(state->containers.size(), 2u);
  EXPECT_EQ(state->containers[0].name, "held");
  EXPECT_EQ(state->containers[0].context, "vm") << "the binding comes from the holds";
  EXPECT_EQ(state->containers[1].context, "");
  EXPECT_TRUE(state->containers[0].vfio_groups.empty());
  ASSERT_EQ(state->holds.size(), 1u);
}

TEST_F(StateStoreTest, OpenCreatesNestedDirectories) {
  const std::string nested = dir_ + "/a/b/c";
  absl::StatusOr<std::unique_ptr<StateStore>> store = StateStore::Open(nested, {});
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_TRUE(std::filesystem::exists(nested + "/state.db"));
}

// --- Concurrency -------------------------------------------------------------------------------

TEST_F(StateStoreTest, ConcurrentCommitsAndReads) {
  Basic();
  constexpr int kThreads = 4;
  constexpr int kPerThread = 100;
  std::atomic<bool> done{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([this, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const uint64_t ua = (uint64_t(t) << 32) + uint64_t(i) * kPage;
        absl::Status status = store_->Commit(
            Mutation().AddHold("c1", "vm", ua, kPage).SetMapping("c1", ua, kPage, ua));
        EXPECT_TRUE(status.ok()) << status;
      }
    });
  }
  std::thread reader([this, &done] {
    while (!done.load()) {
      absl::StatusOr<PersistedState> state = store_->Load();
      EXPECT_TRUE(state.ok()) << state.status();
      // Each commit is all or nothing, as seen by a reader too.
      if (state.ok()) {
        EXPECT_EQ(state->holds.size(), state->mappings.size());
      }
      (void)store_->stats();
    }
  });
  for (std::thread& thread : threads) thread.join();
  done.store(true);
  reader.join();
  PersistedState state = Load();
  EXPECT_EQ(state.holds.size(), size_t{kThreads * kPerThread});
  for (size_t i = 1; i < state.holds.size(); ++i) {
    EXPECT_LT(state.holds[i - 1].seq, state.holds[i].seq);
  }
  EXPECT_EQ(store_->stats().commits, uint64_t{kThreads * kPerThread} + 1);
}

TEST_F(StateStoreTest, ConcurrentCommitsAreGroupedAndABadOneFailsAlone) {
  Basic();
  constexpr int kThreads = 8;
  constexpr int kPerThread = 200;
  std::vector<std::thread> threads;
  std::atomic<int> bad_failed{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([this, t, &bad_failed] {
      for (int i = 0; i < kPerThread; ++i) {
        const uint64_t ua = (uint64_t(t) << 32) + uint64_t(i) * kPage;
        if (t == 0 && i % 50 == 0) {
          // Names a container that does not exist: this commit alone must fail.
          absl::Status status = store_->Commit(Mutation().AddHold("no-such", "vm", ua, kPage));
          if (!status.ok()) bad_failed.fetch_add(1);
          continue;
        }
        absl::Status status = store_->Commit(Mutation().AddHold("c1", "vm", ua, kPage));
        EXPECT_TRUE(status.ok()) << status;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(bad_failed.load(), kPerThread / 50);
  PersistedState state = Load();
  EXPECT_EQ(state.holds.size(), size_t{kThreads * kPerThread - kPerThread / 50});
  const StoreStats stats = store_->stats();
  // Grouping is opportunistic; with 8 writers some transactions must have carried several.
  EXPECT_LT(stats.transactions, stats.commits);
  RecordProperty("commits", static_cast<int>(stats.commits));
  RecordProperty("transactions", static_cast<int>(stats.transactions));
}

// --- Crash safety ------------------------------------------------------------------------------

constexpr char kCounter[] = "crash_counter";

// The child: commits hold + mapping + counter together, forever, and reports each acknowledged
// commit on `fd`. Never returns.
[[noreturn]] void CrashChild(const std::string& dir, int fd) {
  absl::StatusOr<std::unique_ptr<StateStore>> store = StateStore::Open(dir, {});
  if (!store.ok()) _exit(10);
  absl::StatusOr<PersistedState> state = (*store)->Load();
  if (!state.ok()) _exit(11);
  uint32_t n = 0;
  if (auto it = state->meta.find(kCounter); it != state->meta.end()) {
    if (!absl::SimpleAtoi(it->second, &n)) _exit(12);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(5);  // in case nobody kills us
  while (absl::Now() < deadline) {
    ++n;
    const uint64_t ua = uint64_t{n} * kPage;
    absl::Status status = (*store)->Commit(Mutation()
                                               .AddHold("c1", "vm", ua, kPage)
                                               .SetMapping("c1", ua, kPage, ua)
                                               .PutMeta(kCounter, absl::StrCat(n)));
    if (!status.ok()) _exit(13);
    // Only now is the commit acknowledged. 4 bytes: atomic on a pipe.
    if (write(fd, &n, sizeof(n)) != sizeof(n)) _exit(14);
  }
  _exit(0);
}

// Reads acknowledgements from `fd` until `deadline`, or until EOF without one.
void ReadAcks(int fd, std::optional<absl::Time> deadline, uint32_t* max_acked, bool* eof) {
  while (!*eof) {
    int timeout_ms = -1;
    if (deadline.has_value()) {
      const absl::Duration left = *deadline - absl::Now();
      if (left <= absl::ZeroDuration()) return;
      timeout_ms = std::max<int>(1, static_cast<int>(absl::ToInt64Milliseconds(left)));
    }
    pollfd p{fd, POLLIN, 0};
    const int ready = poll(&p, 1, timeout_ms);
    if (ready < 0 && errno == EINTR) continue;
    ASSERT_GE(ready, 0);
    if (ready == 0) continue;
    uint32_t acks[1024];
    const ssize_t got = read(fd, acks, sizeof(acks));
    if (got == 0) {
      *eof = true;
      return;
    }
    ASSERT_GT(got, 0);
    ASSERT_EQ(got % sizeof(uint32_t), 0u);
    for (ssize_t i = 0; i < got / static_cast<ssize_t>(sizeof(uint32_t)); ++i) {
      EXPECT_GT(acks[i], *max_acked) << "acknowledgements out of order";
      *max_acked = std::max(*max_acked, acks[i]);
    }
  }
}

// Runs `rounds` children (`child(dir, ack_fd)`, which never returns), each killed with SIGKILL
// at a random moment, and after each calls `verify(max_acked)`, which checks the reopened store and
// returns how far the next child continues from.
void StateStoreTest::RunCrashRounds(int rounds,
                                    const std::function<void(const std::string&, int)>& child,
                                    const std::function<uint32_t(uint32_t max_acked)>& verify) {
  store_.reset();  // the child opens its own
  const unsigned seed = std::random_device{}();
  std::printf("crash test seed %u\n", seed);
  std::mt19937 rng(seed);
  const absl::Time start = absl::Now();
  uint32_t max_acked = 0;
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round, ", seed ", seed));
    // Mostly 10-150 ms; every fifth round within the first 3 ms, during Open.
    const absl::Duration delay =
        round % 5 == 0 ? absl::Microseconds(std::uniform_int_distribution<int>(0, 3000)(rng))
                       : absl::Milliseconds(std::uniform_int_distribution<int>(10, 150)(rng));
    int fds[2];
    ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(fds[0]);
      child(dir_, fds[1]);
      _exit(15);
    }
    close(fds[1]);
    bool eof = false;
    ReadAcks(fds[0], absl::Now() + delay, &max_acked, &eof);
    kill(pid, SIGKILL);
    int wstatus = 0;
    ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
    ReadAcks(fds[0], std::nullopt, &max_acked, &eof);  // drain to EOF
    close(fds[0]);
    ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL)
        << "child failed on its own: status " << wstatus;
    Reopen();
    max_acked = verify(max_acked);
    if (HasFatalFailure()) return;
    store_.reset();
  }
  std::printf("crash test: %d kills, %u acknowledged changes survived, %.2f s\n", rounds, max_acked,
              absl::ToDoubleSeconds(absl::Now() - start));
  EXPECT_GT(max_acked, 0u) << "no child got to acknowledge anything";
}

TEST_F(StateStoreTest, Kill9NeverLosesAnAcknowledgedCommit) {
  Basic();
  RunCrashRounds(20, CrashChild, [this](uint32_t max_acked) -> uint32_t {
    PersistedState state = Load();
    uint32_t counter = 0;
    if (auto it = state.meta.find(kCounter); it != state.meta.end()) {
      EXPECT_TRUE(absl::SimpleAtoi(it->second, &counter));
    }
    // Every acknowledged commit is there (one more may be, committed but not yet acknowledged)...
    EXPECT_GE(counter, max_acked);
    // ...and each commit is all there or not at all: holds and mappings 1..counter, nothing more.
    EXPECT_EQ(state.holds.size(), counter);
    EXPECT_EQ(state.mappings.size(), counter);
    for (uint32_t i = 1; i <= counter && i <= state.holds.size() && i <= state.mappings.size();
         ++i) {
      EXPECT_EQ(state.holds[i - 1].ua, uint64_t{i} * kPage);
      EXPECT_EQ(state.mappings[i - 1],
                Mapping("c1", uint64_t{i} * kPage, kPage, uint64_t{i} * kPage));
    }
    return counter;  // the next child continues from here
  });
}

// The child of the journal's crash test: maps page n of container c1 through the journal and
// acknowledges n, forever. Every 7th page it also maps and clears a scratch page (never left
// mapped) and every 10th it commits a transaction (which folds the journal first); the background
// fold runs every millisecond. Never returns.
[[noreturn]] void JournalCrashChild(const std::string& dir, int fd) {
  absl::StatusOr<std::unique_ptr<StateStore>> store =
      StateStore::Open(dir, {.journal_fold_interval = absl::Milliseconds(1)});
  if (!store.ok()) _exit(10);
  absl::StatusOr<PersistedState> state = (*store)->Load();
  if (!state.ok()) _exit(11);
  constexpr uint64_t kScratch = uint64_t{1} << 39;  // above every page
  // The pages mapped so far; the scratch page is still mapped if a kill fell between its map and
  // its clear.
  uint32_t n = 0;
  for (const StoredMapping& mapping : state->mappings) n += mapping.iova != kScratch ? 1 : 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(5);  // in case nobody kills us
  while (absl::Now() < deadline) {
    ++n;
    const uint64_t ua = uint64_t{n} * kPage;
    if (n % 7 == 0) {
      if (!(*store)->RecordMap(1, kScratch, kPage, ua).ok()) _exit(12);
      if (!(*store)->RecordClear(1, kScratch, kPage).ok()) _exit(12);
    }
    if (!(*store)->RecordMap(1, ua, kPage, ua).ok()) _exit(13);
    if (n % 10 == 0 && !(*store)->Commit(Mutation().PutMeta(kCounter, absl::StrCat(n))).ok()) {
      _exit(14);
    }
    if (write(fd, &n, sizeof(n)) != sizeof(n)) _exit(15);
  }
  _exit(0);
}

TEST_F(StateStoreTest, Kill9NeverLosesAnAcknowledgedJournalRecord) {
  Basic();
  RunCrashRounds(20, JournalCrashChild, [this](uint32_t max_acked) -> uint32_t {
    std::vector<StoredMapping> mappings = Mappings();
    // The scratch page stays mapped only when the kill fell between its map and its clear (it
    // sorts last: its iova is above every page's).
    if (!mappings.empty() && mappings.back().iova == uint64_t{1} << 39) mappings.pop_back();
    // Every acknowledged record is there (one more may be), in order.
    EXPECT_GE(mappings.size(), max_acked);
    EXPECT_LE(mappings.size(), max_acked + 1);
    for (uint32_t i = 1; i <= mappings.size(); ++i) {
      EXPECT_EQ(mappings[i - 1], Mapping("c1", uint64_t{i} * kPage, kPage, uint64_t{i} * kPage));
    }
    // The journal was folded at Open and the files it no longer needs are gone.
    EXPECT_LE(std::distance(std::filesystem::directory_iterator(dir_),
                            std::filesystem::directory_iterator()),
              5);
    return static_cast<uint32_t>(mappings.size());
  });
}

// --- The mapping journal through the store ---------------------------------------------------

TEST_F(StateStoreTest, JournalRecordsReachTheMappingsTable) {
  Basic();
  ASSERT_TRUE(store_->RecordMap(1, 0, 4 * kPage, 0x100000).ok());
  ASSERT_TRUE(store_->RecordClear(1, kPage, kPage).ok());
  ASSERT_TRUE(store_->RecordMap(2, kPage, kPage, 0x200000).ok());
  const std::vector<StoredMapping> expected = {Mapping("c1", 0, kPage, 0x100000),
                                               Mapping("c1", 2 * kPage, 2 * kPage, 0x102000),
                                               Mapping("c2", kPage, kPage, 0x200000)};
  EXPECT_EQ(Mappings(), expected);  // Load folds
  EXPECT_EQ(Load().meta[std::string(kMetaJournalFoldedSeq)], "3");
  Reopen();
  EXPECT_EQ(Mappings(), expected);
  const StoreStats stats = store_->stats();
  EXPECT_EQ(stats.journal_records_folded, 0u);  // nothing left to fold after the reopen
}

TEST_F(StateStoreTest, RecordsLeftByACrashAreFoldedAtOpen) {
  Basic();
  store_.reset();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    absl::StatusOr<std::unique_ptr<StateStore>> store =
        StateStore::Open(dir_, {.journal_fold_interval = absl::Hours(1)});
    if (!store.ok() || !(*store)->RecordMap(1, 0, kPage, 0x5000).ok()) _exit(1);
    if (!(*store)->RecordMap(1, kPage, kPage, 0x6000).ok()) _exit(1);
    _exit(0);  // no destructor: the records are only in the journal
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
  Reopen();
  EXPECT_EQ(store_->stats().journal_records_folded, 2u);
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{Mapping("c1", 0, kPage, 0x5000),
                                                    Mapping("c1", kPage, kPage, 0x6000)}));
}

// --- Damage: never an empty or shorter state without a word ------------------------------------

// What a crash leaves: three acknowledged maps of c1 only in the journal (no fold, no destructor).
void CrashAfterThreeRecords(const std::string& dir) {
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    absl::StatusOr<std::unique_ptr<StateStore>> store =
        StateStore::Open(dir, {.journal_fold_interval = absl::Hours(1)});
    if (!store.ok()) _exit(1);
    for (uint64_t i = 0; i < 3; ++i) {
      if (!(*store)->RecordMap(1, i * kPage, kPage, 0x5000 + i * kPage).ok()) _exit(1);
    }
    _exit(0);
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
}

void ExpectDataLoss(const absl::StatusOr<std::unique_ptr<StateStore>>& store,
                    const std::string& mentions) {
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
  EXPECT_EQ(ErrnoOf(store.status()), EIO);
  EXPECT_TRUE(absl::StrContains(store.status().message(), mentions)) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "--recover_damaged_state"))
      << store.status();
}

TEST_F(StateStoreTest, ADamagedJournalRecordIsDataLossUnlessRecoveryIsAsked) {
  Basic();
  store_.reset();
  CrashAfterThreeRecords(dir_);
  const std::vector<std::string> files = ListJournalFiles(dir_);
  ASSERT_EQ(files.size(), 1u);
  {
    std::fstream file(files[0], std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(48 + 20);  // the first record; two good ones follow it
    file.put('\x77');
  }
  ExpectDataLoss(StateStore::Open(dir_, {}), absl::StrCat(files[0], " at offset 48"));
  // Recovery starts, says what it dropped, and counts it.
  Reopen({.recover_damaged_state = true});
  EXPECT_TRUE(Mappings().empty());
  EXPECT_EQ(store_->stats().journal_damaged_records_dropped, 2u);
  EXPECT_EQ(store_->stats().journal_damaged_files, 1u);
  ASSERT_EQ(store_->recovery_report().size(), 1u);
  EXPECT_TRUE(absl::StrContains(store_->recovery_report()[0], "dropped 2 well-formed records"))
      << store_->recovery_report()[0];
  // The next start is clean, and the journal works.
  ASSERT_TRUE(store_->RecordMap(1, 0, kPage, 0x9000).ok());
  Reopen();
  EXPECT_EQ(Mappings(), std::vector<StoredMapping>{Mapping("c1", 0, kPage, 0x9000)});
}

TEST_F(StateStoreTest, ADeletedOrTruncatedJournalIsDataLoss) {
  Basic();
  store_.reset();
  CrashAfterThreeRecords(dir_);
  const std::vector<std::string> files = ListJournalFiles(dir_);
  ASSERT_EQ(files.size(), 1u);
  const std::string kept = dir_ + "/../kept.log";
  std::filesystem::copy_file(files[0], kept);
  std::filesystem::resize_file(files[0], 48 * 3);  // two records left, at a record boundary
  ExpectDataLoss(StateStore::Open(dir_, {}), absl::StrCat(files[0], " holds 144 bytes"));
  std::filesystem::remove(files[0]);
  ExpectDataLoss(StateStore::Open(dir_, {}), absl::StrCat(files[0], " is missing"));
  // Put back, everything acknowledged is there.
  std::filesystem::copy_file(kept, files[0]);
  Reopen();
  EXPECT_EQ(Mappings().size(), 3u);
}

TEST_F(StateStoreTest, AnEmptyOrMissingDatabaseBesideAJournalIsLostStateNotAFirstStart) {
  Basic();
  const std::string path = store_->path();
  store_.reset();
  std::filesystem::resize_file(path, 0);
  ExpectDataLoss(StateStore::Open(dir_, {}), path + " is empty");
  std::filesystem::remove(path);
  ExpectDataLoss(StateStore::Open(dir_, {}), path + " is missing");
  Reopen({.recover_damaged_state = true});
  EXPECT_TRUE(Load().contexts.empty());
  EXPECT_EQ(store_->stats().state_set_aside, 1u);
  ASSERT_EQ(store_->recovery_report().size(), 1u);
  EXPECT_TRUE(absl::StrContains(store_->recovery_report()[0], "moved aside"));
  // A directory with nothing in it is a first start.
  store_.reset();
  std::filesystem::remove_all(dir_);
  Reopen();
  EXPECT_EQ(store_->stats().state_set_aside, 0u);
}

// A stale index: an entry for a row that is gone, which quick_check does not see. Built by hiding
// the index from the schema while a row is deleted, then putting it back.
void StaleIndex(const std::string& path, const char* index, const char* delete_sql) {
  auto exec = [&](const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    char* error = nullptr;
    EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error), SQLITE_OK)
        << (error != nullptr ? error : "") << " in " << sql;
    sqlite3_free(error);
    sqlite3_close(db);
  };
  std::string sql;
  int64_t rootpage = 0;
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT sql, rootpage FROM sqlite_master WHERE name = ?", -1,
                                 &stmt, nullptr),
              SQLITE_OK);
    sqlite3_bind_text(stmt, 1, index, -1, SQLITE_STATIC);
    ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
    sql = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    rootpage = sqlite3_column_int64(stmt, 1);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
  }
  exec(absl::StrCat("PRAGMA writable_schema = ON; DELETE FROM sqlite_master WHERE name = '", index,
                    "';"));
  exec(delete_sql);
  exec(absl::StrCat("PRAGMA writable_schema = ON; INSERT INTO sqlite_master VALUES ('index', '",
                    index, "', 'holds', ", rootpage, ", '", sql, "');"));
}

TEST_F(StateStoreTest, ADamagedIndexIsCaughtAtOpen) {
  Basic();
  Commit(Mutation().AddHold("c1", "vm", 0, kPage).AddHold("c2", "vm", kPage, kPage));
  const std::string path = store_->path();
  store_.reset();
  // The release of one hold, with the index not told.
  StaleIndex(path, "holds_by_context", "DELETE FROM holds WHERE container = 'c1'");
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA quick_check", -1, &stmt, nullptr), SQLITE_OK);
    ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
    EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0)), "ok")
        << "the damage must be one that quick_check misses";
    sqlite3_finalize(stmt);
    sqlite3_close(db);
  }
  ExpectDataLoss(StateStore::Open(dir_, {}), "integrity_check");
}

TEST_F(StateStoreTest, CommitIsOrderedAfterEarlierRecords) {
  Basic();
  Reopen({.journal_fold_interval = absl::Hours(1)});
  ASSERT_TRUE(store_->RecordMap(1, 0, 2 * kPage, 0x100000).ok());
  Commit(Mutation().ClearMappings("c1", 0, kPage));
  ASSERT_TRUE(store_->RecordClear(1, kPage, kPage).ok());
  Commit(Mutation().SetMapping("c1", 4 * kPage, kPage, 0x300000));
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{Mapping("c1", 4 * kPage, kPage, 0x300000)}));
}

TEST_F(StateStoreTest, RecordsOfADeletedContainerAreSkipped) {
  Basic();
  Reopen({.journal_fold_interval = absl::Hours(1)});
  ASSERT_TRUE(store_->RecordMap(2, 0, kPage, 0x100000).ok());
  ASSERT_TRUE(store_->FoldJournal().ok());
  // A record of container 2 written after the fold; the container's row then goes.
  ASSERT_TRUE(store_->RecordMap(2, kPage, kPage, 0x101000).ok());
  ASSERT_TRUE(store_->RecordMap(1, kPage, kPage, 0x101000).ok());
  store_->FoldJournal().IgnoreError();
  Commit(Mutation().DeleteContainer("c2"));
  ASSERT_TRUE(store_->RecordMap(2, 2 * kPage, kPage, 0x102000).ok());  // id 2 is gone
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{Mapping("c1", kPage, kPage, 0x101000)}));
  EXPECT_EQ(store_->stats().journal_records_skipped, 1u);
}

TEST_F(StateStoreTest, BadRecordsAreRejectedAndAFailedJournalStopsTheStore) {
  Basic();
  EXPECT_TRUE(absl::StrContains(store_->RecordMap(1, 0, 0, 0x1000).message(), "EINVAL"));
  EXPECT_TRUE(
      absl::StrContains(store_->RecordClear(1, ~uint64_t{0} - 10, kPage).message(), "EINVAL"));
  Reopen({.fail_journal_append_hook = [](uint64_t seq) {
    return seq >= 2 ? absl::InternalError("injected") : absl::OkStatus();
  }});
  ASSERT_TRUE(store_->RecordMap(1, 0, kPage, 0x1000).ok());
  EXPECT_TRUE(absl::StrContains(store_->RecordMap(1, kPage, kPage, 0x2000).message(), "EIO"));
  EXPECT_EQ(store_->stats().journal_failed_records, 1u);
  EXPECT_EQ(Mappings(), (std::vector<StoredMapping>{Mapping("c1", 0, kPage, 0x1000)}));
}

TEST_F(StateStoreTest, TheFoldedSeqBelongsToTheStore) {
  Basic();
  absl::Status status = store_->Commit(Mutation().PutMeta(kMetaJournalFoldedSeq, "7"));
  EXPECT_TRUE(absl::StrContains(status.message(), "EINVAL")) << status;
}

// --- Throughput (reported, not asserted) -------------------------------------------------------

double CommitsPerSecond(StateStore* store, int commits, uint64_t base) {
  const absl::Time start = absl::Now();
  for (int i = 0; i < commits; ++i) {
    absl::Status status =
        store->Commit(Mutation().AddHold("c1", "vm", base + uint64_t(i) * kPage, kPage));
    EXPECT_TRUE(status.ok()) << status;
  }
  return commits / absl::ToDoubleSeconds(absl::Now() - start);
}

TEST_F(StateStoreTest, SingleRowCommitThroughput) {
  Basic();
  const double normal = CommitsPerSecond(store_.get(), 2000, 0);
  std::printf("2000 single-row commits, synchronous=NORMAL: %.0f commits/s\n", normal);
  Reopen({.sync_full = true});
  const double full = CommitsPerSecond(store_.get(), 200, uint64_t{1} << 40);
  std::printf("200 single-row commits, synchronous=FULL: %.0f commits/s\n", full);
  EXPECT_EQ(Load().holds.size(), 2200u);
}

}  // namespace
}  // namespace dmapin::agent
