#include "server/store/sqlite_server_store.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <set>
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

namespace dmapin::server {
namespace {

v1::Policy Policy(const std::string& name, uint64_t budget) {
  v1::Policy policy;
  policy.set_name(name);
  (*policy.mutable_node_selector())["pool"] = "a";
  policy.set_pinned_bytes_budget(budget);
  v1::LabelRequirement* allow = policy.add_allow();
  allow->set_key("tenant");
  allow->add_values("blue");
  policy.mutable_ebusy_retry()->set_initial_backoff_ms(10);
  policy.set_revision(1);
  return policy;
}

v1::Intent Intent(const std::string& id, const std::string& node,
                  v1::IntentState state = v1::INTENT_STATE_PENDING) {
  v1::Intent intent;
  intent.set_id(id);
  intent.set_kind(v1::INTENT_KIND_REGISTER);
  intent.set_node(node);
  intent.set_context("vm");
  intent.set_container("c1");
  intent.set_ua(0x10000);
  intent.set_size(0x20000);
  (*intent.mutable_labels())["tenant"] = "blue";
  intent.set_state(state);
  return intent;
}

v1::DecisionRecord Decision(const std::string& id, const std::string& node,
                            const std::string& intent_id, const std::string& sent_time,
                            const std::string& result = "OK") {
  v1::DecisionRecord decision;
  decision.set_id(id);
  decision.set_epoch(1);
  decision.set_intent_id(intent_id);
  decision.set_node(node);
  decision.set_kind("REGISTER");
  decision.set_sent_time(sent_time);
  decision.set_result(result);
  return decision;
}

// "2024-05-01T00:00:<second>Z".
std::string At(int second) {
  return absl::FormatTime(absl::RFC3339_full, absl::FromUnixSeconds(1714521600 + second),
                          absl::UTCTimeZone());
}

std::vector<std::string> Ids(const std::vector<v1::DecisionRecord>& decisions) {
  std::vector<std::string> ids;
  for (const v1::DecisionRecord& d : decisions) ids.push_back(d.id());
  return ids;
}

std::vector<std::string> Ids(const std::vector<v1::Intent>& intents) {
  std::vector<std::string> ids;
  for (const v1::Intent& i : intents) ids.push_back(i.id());
  return ids;
}

// The messages here have at most one map entry, so serialization is deterministic.
bool SameProto(const google::protobuf::MessageLite& a, const google::protobuf::MessageLite& b) {
  return a.SerializeAsString() == b.SerializeAsString();
}

class SqliteServerStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ =
        absl::StrCat(::testing::TempDir(), "/sqlite_server_store_test/", info->name(), "/server");
    std::filesystem::remove_all(dir_);
    Reopen();
  }

  void Reopen(SqliteServerStoreOptions options = {}) {
    store_.reset();
    absl::StatusOr<std::unique_ptr<SqliteServerStore>> store =
        SqliteServerStore::Open(dir_, std::move(options));
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
  }

  void Commit(const ServerMutation& mutation) {
    absl::Status status = store_->Commit(mutation);
    ASSERT_TRUE(status.ok()) << status;
  }

  std::vector<v1::Policy> Policies() {
    absl::StatusOr<std::vector<v1::Policy>> policies = store_->LoadPolicies();
    EXPECT_TRUE(policies.ok()) << policies.status();
    return policies.ok() ? *std::move(policies) : std::vector<v1::Policy>{};
  }

  std::vector<v1::Intent> Intents() {
    absl::StatusOr<std::vector<v1::Intent>> intents = store_->LoadIntents();
    EXPECT_TRUE(intents.ok()) << intents.status();
    return intents.ok() ? *std::move(intents) : std::vector<v1::Intent>{};
  }

  DecisionPage List(DecisionQuery query) {
    absl::StatusOr<DecisionPage> page = store_->ListDecisions(query);
    EXPECT_TRUE(page.ok()) << page.status();
    return page.ok() ? *std::move(page) : DecisionPage{};
  }

  // Every page of `query`, concatenated.
  std::vector<std::string> ListAll(DecisionQuery query, int* pages = nullptr) {
    std::vector<std::string> ids;
    int n = 0;
    do {
      DecisionPage page = List(query);
      ++n;
      for (const v1::DecisionRecord& d : page.decisions) ids.push_back(d.id());
      query.page_token = page.next_page_token;
      if (n > 1000) break;
    } while (!query.page_token.empty());
    if (pages != nullptr) *pages = n;
    return ids;
  }

  std::string dir_;
  std::unique_ptr<SqliteServerStore> store_;
};

// --- Policies -----------------------------------------------------------------------------------

TEST_F(SqliteServerStoreTest, CreatesTheDatabaseInTheDirectory) {
  EXPECT_EQ(store_->path(), dir_ + "/server.db");
  EXPECT_TRUE(std::filesystem::exists(store_->path()));
  EXPECT_EQ(SqliteServerStore::CurrentSchemaVersion(), 1);
  EXPECT_TRUE(Policies().empty());
  EXPECT_TRUE(Intents().empty());
}

TEST_F(SqliteServerStoreTest, PoliciesRoundTripAndUpsertByName) {
  ASSERT_TRUE(store_->PutPolicy(Policy("pool-b", 100)).ok());
  ASSERT_TRUE(store_->PutPolicy(Policy("pool-a", 200)).ok());
  v1::Policy changed = Policy("pool-b", 300);
  changed.set_revision(2);
  changed.clear_allow();
  ASSERT_TRUE(store_->PutPolicy(changed).ok());

  Reopen();
  std::vector<v1::Policy> policies = Policies();
  ASSERT_EQ(policies.size(), 2u);
  EXPECT_TRUE(SameProto(policies[0], Policy("pool-a", 200)));
  EXPECT_TRUE(SameProto(policies[1], changed)) << policies[1].DebugString();
}

TEST_F(SqliteServerStoreTest, DeletePolicy) {
  ASSERT_TRUE(store_->PutPolicy(Policy("p1", 1)).ok());
  ASSERT_TRUE(store_->PutPolicy(Policy("p2", 2)).ok());
  ASSERT_TRUE(store_->DeletePolicy("p1").ok());
  absl::Status again = store_->DeletePolicy("p1");
  EXPECT_EQ(again.code(), absl::StatusCode::kNotFound) << again;
  EXPECT_EQ(ErrnoOf(again), ENOENT);
  EXPECT_TRUE(absl::StrContains(again.message(), "\"p1\"")) << again;
  ASSERT_EQ(Policies().size(), 1u);
  EXPECT_EQ(Policies()[0].name(), "p2");

  // A NOT_FOUND delete rolls back the rest of its mutation.
  absl::Status status =
      store_->Commit(ServerMutation().PutPolicy(Policy("p3", 3)).DeletePolicy("nope"));
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  ASSERT_EQ(Policies().size(), 1u);
}

// --- Intents ------------------------------------------------------------------------------------

TEST_F(SqliteServerStoreTest, IntentsKeepFirstInsertionOrderAcrossUpserts) {
  std::vector<v1::Intent> batch = {Intent("7", "n1"), Intent("10", "n2"), Intent("2", "n1")};
  ASSERT_TRUE(store_->PutIntents(batch).ok());
  v1::Intent changed = Intent("7", "n1", v1::INTENT_STATE_RETRYING);
  changed.set_attempts(3);
  changed.set_last_errno(EBUSY);
  changed.set_last_errno_name("EBUSY");
  changed.set_retrying_since(At(1));
  ASSERT_TRUE(store_->PutIntents({changed, Intent("1", "n3")}).ok());

  Reopen();
  std::vector<v1::Intent> intents = Intents();
  EXPECT_EQ(Ids(intents), (std::vector<std::string>{"7", "10", "2", "1"}));
  ASSERT_EQ(intents.size(), 4u);
  EXPECT_TRUE(SameProto(intents[0], changed)) << intents[0].DebugString();
  EXPECT_TRUE(SameProto(intents[1], Intent("10", "n2")));

  Commit(ServerMutation().DeleteIntent("10").DeleteIntent("never-stored"));
  EXPECT_EQ(Ids(Intents()), (std::vector<std::string>{"7", "2", "1"}));
}

TEST_F(SqliteServerStoreTest, PutIntentsIsAllOrNothing) {
  ASSERT_TRUE(store_->PutIntents({Intent("1", "n1")}).ok());
  // An invalid intent (empty id) rejects the whole batch before anything is written.
  absl::Status status = store_->PutIntents({Intent("2", "n1"), Intent("", "n1")});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_TRUE(absl::StartsWith(status.message(), "EINVAL: ")) << status;
  EXPECT_EQ(Ids(Intents()), (std::vector<std::string>{"1"}));
  EXPECT_TRUE(store_->PutIntents({}).ok());  // empty: a no-op
}

TEST_F(SqliteServerStoreTest, CombinedMutationOfAnIntentAndItsDecision) {
  v1::Intent intent = Intent("i1", "n1", v1::INTENT_STATE_APPLYING);
  intent.set_last_decision_id("d1");
  Commit(ServerMutation()
             .PutIntent(intent)
             .PutDecision(Decision("d1", "n1", "i1", At(0), ""))
             .PutNodeState({"n1", true, false, ""}));
  Reopen();
  ASSERT_EQ(Intents().size(), 1u);
  EXPECT_EQ(Intents()[0].last_decision_id(), "d1");
  absl::StatusOr<std::vector<v1::DecisionRecord>> in_flight = store_->LoadInFlightDecisions();
  ASSERT_TRUE(in_flight.ok()) << in_flight.status();
  EXPECT_EQ(Ids(*in_flight), (std::vector<std::string>{"d1"}));
  absl::StatusOr<std::vector<NodeAdminState>> nodes = store_->LoadNodeStates();
  ASSERT_TRUE(nodes.ok());
  ASSERT_EQ(nodes->size(), 1u);
  EXPECT_TRUE((*nodes)[0].cordoned);
}

// --- Node admin state ---------------------------------------------------------------------------

TEST_F(SqliteServerStoreTest, NodeStatesRoundTrip) {
  ASSERT_TRUE(store_->PutNodeState({"n2", true, true, At(5)}).ok());
  ASSERT_TRUE(store_->PutNodeState({"n1", true, false, ""}).ok());
  ASSERT_TRUE(store_->PutNodeState({"n1", false, false, ""}).ok());  // uncordon
  Reopen();
  absl::StatusOr<std::vector<NodeAdminState>> nodes = store_->LoadNodeStates();
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  EXPECT_EQ(*nodes,
            (std::vector<NodeAdminState>{{"n1", false, false, ""}, {"n2", true, true, At(5)}}));
  Commit(ServerMutation().DeleteNodeState("n2").DeleteNodeState("n9"));
  nodes = store_->LoadNodeStates();
  ASSERT_TRUE(nodes.ok());
  EXPECT_EQ(nodes->size(), 1u);
  EXPECT_FALSE(store_->PutNodeState({"", true, false, ""}).ok());
}

// --- Decisions ----------------------------------------------------------------------------------

TEST_F(SqliteServerStoreTest, DecisionsAreOrderedBySentTimeThenId) {
  // RFC 3339 strings with different fraction digits and offsets: not in text order.
  ASSERT_TRUE(store_
                  ->PutDecisions({
                      Decision("a", "n1", "i1", "2024-05-01T00:00:01Z"),
                      Decision("b", "n1", "i1", "2024-05-01T00:00:00.5Z"),
                      Decision("c", "n1", "i1", "2024-05-01T01:00:00.25+02:00"),  // 23:00 UTC
                      Decision("e", "n1", "i1", "2024-05-01T00:00:01Z"),
                      Decision("d", "n1", "i1", "2024-05-01T00:00:01.000Z"),
                  })
                  .ok());
  EXPECT_EQ(Ids(List({}).decisions), (std::vector<std::string>{"c", "b", "a", "d", "e"}));
  EXPECT_TRUE(List({}).next_page_token.empty());
}

TEST_F(SqliteServerStoreTest, DecisionUpsertReplacesTheRecord) {
  ASSERT_TRUE(store_->PutDecisions({Decision("d1", "n1", "i1", At(1), "")}).ok());
  v1::DecisionRecord done = Decision("d1", "n1", "i1", At(1), "EBUSY");
  done.set_result_time(At(2));
  done.set_message("region still mapped");
  ASSERT_TRUE(store_->PutDecisions({done}).ok());
  DecisionPage page = List({});
  ASSERT_EQ(page.decisions.size(), 1u);
  EXPECT_TRUE(SameProto(page.decisions[0], done));
  absl::StatusOr<std::vector<v1::DecisionRecord>> in_flight = store_->LoadInFlightDecisions();
  ASSERT_TRUE(in_flight.ok());
  EXPECT_TRUE(in_flight->empty());
}

TEST_F(SqliteServerStoreTest, DecisionSentTimeMustBeRfc3339) {
  for (const std::string bad : {"", "yesterday", "2024-05-01 00:00:00", "1714521600"}) {
    absl::Status status =
        store_->PutDecisions({Decision("ok", "n1", "i1", At(0)), Decision("bad", "n1", "i1", bad)});
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad << ": " << status;
    EXPECT_TRUE(absl::StrContains(status.message(), "sent_time")) << status;
  }
  EXPECT_TRUE(List({}).decisions.empty());
  EXPECT_FALSE(store_->PutDecisions({Decision("", "n1", "i1", At(0))}).ok());
}

TEST_F(SqliteServerStoreTest, PaginationWithFilters) {
  // 60 records over 3 nodes and 4 intents; ids not in time order.
  std::vector<v1::DecisionRecord> records;
  std::vector<std::string> all, on_n1, of_i2, n1_i2;
  for (int i = 0; i < 60; ++i) {
    const std::string id = absl::StrCat("d", 1000 - i * 7);
    const std::string node = absl::StrCat("n", i % 3);
    const std::string intent = absl::StrCat("i", i % 4);
    records.push_back(Decision(id, node, intent, At(i)));
    all.push_back(id);
    if (node == "n1") on_n1.push_back(id);
    if (intent == "i2") of_i2.push_back(id);
    if (node == "n1" && intent == "i2") n1_i2.push_back(id);
  }
  std::shuffle(records.begin(), records.end(), std::mt19937(42));
  ASSERT_TRUE(store_->PutDecisions(records).ok());

  struct Case {
    std::string node, intent;
    uint32_t page_size;
    const std::vector<std::string>* want;
    int pages;
  };
  const Case cases[] = {
      {"", "", 0, &all, 1},        {"", "", 7, &all, 9},       {"", "", 60, &all, 1},
      {"", "", 59, &all, 2},       {"n1", "", 6, &on_n1, 4},   {"", "i2", 5, &of_i2, 3},
      {"n1", "i2", 2, &n1_i2, 3},  {"n1", "i2", 1, &n1_i2, 5}, {"n9", "", 3, nullptr, 1},
      {"n1", "i9", 3, nullptr, 1},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrCat("node=", c.node, " intent=", c.intent, " size=", c.page_size));
    int pages = 0;
    std::vector<std::string> got = ListAll({c.node, c.intent, c.page_size, ""}, &pages);
    EXPECT_EQ(got, c.want != nullptr ? *c.want : std::vector<std::string>{});
    EXPECT_EQ(pages, c.pages);
  }
  // The page size is capped at 1000 and defaults to 100.
  std::vector<v1::DecisionRecord> more;
  for (int i = 60; i < 1100; ++i) more.push_back(Decision(absl::StrCat("x", i), "n", "i", At(i)));
  ASSERT_TRUE(store_->PutDecisions(more).ok());
  EXPECT_EQ(List({"", "", 0, ""}).decisions.size(), 100u);
  EXPECT_EQ(List({"", "", 5000, ""}).decisions.size(), 1000u);
}

TEST_F(SqliteServerStoreTest, PageTokensAreStableAcrossInsertsAndPrunes) {
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(store_->PutDecisions({Decision(absl::StrCat("d", i), "n1", "i1", At(i))}).ok());
  }
  DecisionPage first = List({"n1", "", 4, ""});
  EXPECT_EQ(Ids(first.decisions), (std::vector<std::string>{"d0", "d1", "d2", "d3"}));
  ASSERT_FALSE(first.next_page_token.empty());
  // Later records, a record on another node, a new result for a record already listed.
  ASSERT_TRUE(
      store_
          ->PutDecisions({Decision("d10", "n1", "i1", At(10)), Decision("z", "n2", "i1", At(3)),
                          Decision("d1", "n1", "i1", At(1), "EBUSY")})
          .ok());
  Reopen();  // tokens survive a restart
  DecisionPage second = List({"n1", "", 4, first.next_page_token});
  EXPECT_EQ(Ids(second.decisions), (std::vector<std::string>{"d4", "d5", "d6", "d7"}));
  // Pruning what was already listed does not disturb the cursor.
  absl::StatusOr<uint64_t> pruned = store_->PruneDecisions(7);
  ASSERT_TRUE(pruned.ok()) << pruned.status();
  EXPECT_EQ(*pruned, 5u);  // d0, d1, d2, d3, z
  DecisionPage third = List({"n1", "", 4, second.next_page_token});
  EXPECT_EQ(Ids(third.decisions), (std::vector<std::string>{"d8", "d9", "d10"}));
  EXPECT_TRUE(third.next_page_token.empty());

  // A token is tied to its filters; garbage is INVALID_ARGUMENT.
  absl::StatusOr<DecisionPage> other = store_->ListDecisions({"n2", "", 4, first.next_page_token});
  EXPECT_EQ(other.status().code(), absl::StatusCode::kInvalidArgument) << other.status();
  EXPECT_TRUE(absl::StrContains(other.status().message(), "page_token")) << other.status();
  for (const std::string bad : {"!!!", "ZDE6", "bm9wZQ"}) {
    absl::StatusOr<DecisionPage> page = store_->ListDecisions({"n1", "", 4, bad});
    EXPECT_EQ(page.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST_F(SqliteServerStoreTest, PruneKeepsTheNewestAndEverythingInFlight) {
  std::vector<v1::DecisionRecord> records;
  for (int i = 0; i < 10; ++i) records.push_back(Decision(absl::StrCat("d", i), "n1", "i", At(i)));
  records.push_back(Decision("f-old", "n1", "i", At(-5), ""));  // in flight, oldest of all
  records.push_back(Decision("f-new", "n1", "i", At(20), ""));
  ASSERT_TRUE(store_->PutDecisions(records).ok());

  absl::StatusOr<uint64_t> pruned = store_->PruneDecisions(3);
  ASSERT_TRUE(pruned.ok()) << pruned.status();
  EXPECT_EQ(*pruned, 7u);
  EXPECT_EQ(ListAll({}), (std::vector<std::string>{"f-old", "d7", "d8", "d9", "f-new"}));
  pruned = store_->PruneDecisions(3);
  ASSERT_TRUE(pruned.ok());
  EXPECT_EQ(*pruned, 0u);
  pruned = store_->PruneDecisions(0);
  ASSERT_TRUE(pruned.ok());
  EXPECT_EQ(*pruned, 3u);
  EXPECT_EQ(ListAll({}), (std::vector<std::string>{"f-old", "f-new"}));
  absl::StatusOr<std::vector<v1::DecisionRecord>> in_flight = store_->LoadInFlightDecisions();
  ASSERT_TRUE(in_flight.ok());
  EXPECT_EQ(Ids(*in_flight), (std::vector<std::string>{"f-old", "f-new"}));
  pruned = store_->PruneDecisions(~uint64_t{0});
  ASSERT_TRUE(pruned.ok()) << pruned.status();
  EXPECT_EQ(*pruned, 0u);
}

// --- Epoch and ids ------------------------------------------------------------------------------

TEST_F(SqliteServerStoreTest, EpochIncrementsDurably) {
  absl::StatusOr<uint64_t> epoch = store_->BumpEpoch();
  ASSERT_TRUE(epoch.ok()) << epoch.status();
  EXPECT_EQ(*epoch, 1u);
  epoch = store_->BumpEpoch();
  ASSERT_TRUE(epoch.ok());
  EXPECT_EQ(*epoch, 2u);
  Reopen();
  epoch = store_->BumpEpoch();
  ASSERT_TRUE(epoch.ok());
  EXPECT_EQ(*epoch, 3u);
}

TEST_F(SqliteServerStoreTest, IdsNeverRepeatAcrossReopen) {
  Reopen({.id_block_size = 10});
  std::set<uint64_t> seen;
  auto take = [&](uint64_t n) {
    absl::StatusOr<uint64_t> first = store_->NextIds(n);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_GE(*first, 1u);
    for (uint64_t id = *first; id < *first + n; ++id) {
      ASSERT_TRUE(seen.insert(id).second) << "id " << id << " handed out twice";
    }
  };
  for (int i = 0; i < 25; ++i) take(1);
  EXPECT_EQ(*seen.begin(), 1u);
  EXPECT_EQ(*seen.rbegin(), 25u);  // consecutive within a process
  EXPECT_EQ(store_->stats().id_blocks, 3u);
  take(4);
  take(37);  // larger than a block
  Reopen({.id_block_size = 10});
  take(1);
  EXPECT_GT(*seen.rbegin(), 25u + 4 + 37);
  Reopen({.id_block_size = 1000});
  for (int i = 0; i < 50; ++i) take(3);
  absl::StatusOr<uint64_t> zero = store_->NextIds(0);
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SqliteServerStoreTest, ConcurrentIdsAreUnique) {
  Reopen({.id_block_size = 16});
  constexpr int kThreads = 8;
  constexpr int kPerThread = 500;
  std::vector<std::vector<uint64_t>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        absl::StatusOr<uint64_t> id = store_->NextIds(1 + i % 3);
        if (!id.ok()) return;
        for (int k = 0; k < 1 + i % 3; ++k) got[t].push_back(*id + k);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::set<uint64_t> all;
  size_t total = 0;
  for (const auto& ids : got) {
    total += ids.size();
    all.insert(ids.begin(), ids.end());
  }
  EXPECT_EQ(total, kThreads * (kPerThread / 3 * 6 + 1 + 2));  // 500 = 166 * 3 + 2
  EXPECT_EQ(all.size(), total);
}

// --- Failures -----------------------------------------------------------------------------------

TEST_F(SqliteServerStoreTest, InjectedCommitFailureLeavesNothing) {
  int fail_at = -1;
  Reopen({.fail_commit_hook = [&fail_at](int n) {
    return n == fail_at ? absl::UnavailableError("disk on fire") : absl::OkStatus();
  }});
  ASSERT_TRUE(store_->PutPolicy(Policy("p0", 1)).ok());  // transaction 1
  fail_at = 2;
  absl::Status status = store_->Commit(ServerMutation()
                                           .PutPolicy(Policy("p1", 1))
                                           .DeletePolicy("p0")
                                           .PutIntent(Intent("i1", "n1"))
                                           .PutDecision(Decision("d1", "n1", "i1", At(0)))
                                           .PutNodeState({"n1", true, false, ""}));
  EXPECT_EQ(ErrnoOf(status), EIO) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "disk on fire")) << status;
  Reopen();
  ASSERT_EQ(Policies().size(), 1u);
  EXPECT_EQ(Policies()[0].name(), "p0");
  EXPECT_TRUE(Intents().empty());
  EXPECT_TRUE(List({}).decisions.empty());
  absl::StatusOr<std::vector<NodeAdminState>> nodes = store_->LoadNodeStates();
  ASSERT_TRUE(nodes.ok());
  EXPECT_TRUE(nodes->empty());

  // Epoch and id blocks roll back too, and a failed block hands out nothing.
  Reopen({.id_block_size = 5, .fail_commit_hook = [&fail_at](int n) {
            return n == fail_at ? absl::UnavailableError("injected") : absl::OkStatus();
          }});
  fail_at = 1;
  EXPECT_FALSE(store_->BumpEpoch().ok());
  absl::StatusOr<uint64_t> epoch = store_->BumpEpoch();
  ASSERT_TRUE(epoch.ok());
  EXPECT_EQ(*epoch, 1u);
  fail_at = 3;
  absl::StatusOr<uint64_t> id = store_->NextIds(1);  // transaction 3 fails
  EXPECT_FALSE(id.ok());
  id = store_->NextIds(1);
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(*id, 1u);
}

TEST_F(SqliteServerStoreTest, ConcurrentCommitsAreGroupedAndABadOneFailsAlone) {
  ASSERT_TRUE(store_->PutPolicy(Policy("keep", 1)).ok());
  constexpr int kThreads = 8;
  constexpr int kPerThread = 100;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  std::atomic<int> not_found{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        ServerMutation mutation;
        mutation.PutIntent(Intent(absl::StrCat("t", t, "-", i), absl::StrCat("n", t)));
        if (i % 10 == 0) mutation.DeletePolicy(absl::StrCat("absent-", t, "-", i));
        absl::Status status = store_->Commit(mutation);
        if (i % 10 == 0) {
          if (status.code() == absl::StatusCode::kNotFound) ++not_found;
        } else if (!status.ok()) {
          ++failures;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(not_found.load(), kThreads * kPerThread / 10);
  EXPECT_EQ(Intents().size(), size_t{kThreads * kPerThread * 9 / 10});
  const ServerStoreStats stats = store_->stats();
  EXPECT_EQ(stats.commits, 1u + kThreads * kPerThread * 9 / 10);
  EXPECT_EQ(stats.failed_commits, uint64_t{kThreads * kPerThread / 10});
  std::printf("group commit: %llu commits in %llu transactions\n",
              static_cast<unsigned long long>(stats.commits),
              static_cast<unsigned long long>(stats.transactions));
}

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

TEST_F(SqliteServerStoreTest, CorruptedFileFailsToOpenWithDataLoss) {
  for (int batch = 0; batch < 10; ++batch) {
    std::vector<v1::DecisionRecord> records;
    for (int i = 0; i < 200; ++i) {
      const int n = batch * 200 + i;
      records.push_back(Decision(absl::StrCat("d", n), "n1", absl::StrCat("i", n), At(n)));
    }
    ASSERT_TRUE(store_->PutDecisions(records).ok());
  }
  const std::string path = store_->path();
  store_.reset();  // checkpoints the WAL into server.db
  const uint64_t size = std::filesystem::file_size(path);
  ASSERT_GE(size, 16 * 4096u) << "too small to have a middle";
  Scribble(path, (size / 2) & ~uint64_t{4095}, 4096);

  absl::StatusOr<std::unique_ptr<SqliteServerStore>> store = SqliteServerStore::Open(dir_, {});
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
  EXPECT_EQ(ErrnoOf(store.status()), EIO);
  EXPECT_TRUE(absl::StrContains(store.status().message(), path)) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "damaged")) << store.status();
  std::printf("corrupt page: %s\n", store.status().ToString().c_str());

  Scribble(path, 0, 64);
  store = SqliteServerStore::Open(dir_, {});
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
  std::printf("corrupt header: %s\n", store.status().ToString().c_str());
}

TEST_F(SqliteServerStoreTest, UnparsableBlobIsDataLoss) {
  ASSERT_TRUE(store_->PutPolicy(Policy("p", 1)).ok());
  ASSERT_TRUE(store_->PutIntents({Intent("i", "n")}).ok());
  const std::string path = store_->path();
  store_.reset();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db,
                         "UPDATE policies SET body = x'ffffffff'; "
                         "UPDATE intents SET body = x'0a'; "
                         "UPDATE meta SET value = 'x' WHERE key = 'epoch'; "
                         "INSERT INTO meta VALUES ('epoch', 'seven')",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  Reopen();
  absl::StatusOr<std::vector<v1::Policy>> policies = store_->LoadPolicies();
  EXPECT_EQ(policies.status().code(), absl::StatusCode::kDataLoss) << policies.status();
  EXPECT_TRUE(absl::StrContains(policies.status().message(), "policy \"p\"")) << policies.status();
  absl::StatusOr<std::vector<v1::Intent>> intents = store_->LoadIntents();
  EXPECT_EQ(intents.status().code(), absl::StatusCode::kDataLoss) << intents.status();
  absl::StatusOr<uint64_t> epoch = store_->BumpEpoch();
  EXPECT_EQ(epoch.status().code(), absl::StatusCode::kDataLoss) << epoch.status();
}

TEST_F(SqliteServerStoreTest, RefusesASchemaNewerThanItKnows) {
  const std::string path = store_->path();
  store_.reset();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "UPDATE meta SET value = '99' WHERE key = 'schema_version'", nullptr,
                         nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  absl::StatusOr<std::unique_ptr<SqliteServerStore>> store = SqliteServerStore::Open(dir_, {});
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "schema version 99")) << store.status();
}

// --- Crash safety -------------------------------------------------------------------------------

// The child: forever takes an id, commits an intent under it, and reports the id on `fd` once
// acknowledged (odd rounds also report ids it took but never committed). Never returns.
[[noreturn]] void CrashChild(const std::string& dir, int fd) {
  absl::StatusOr<std::unique_ptr<SqliteServerStore>> store = SqliteServerStore::Open(dir, {});
  if (!store.ok()) _exit(10);
  if (!(*store)->BumpEpoch().ok()) _exit(11);
  const absl::Time deadline = absl::Now() + absl::Seconds(5);  // in case nobody kills us
  while (absl::Now() < deadline) {
    absl::StatusOr<uint64_t> id = (*store)->NextIds(1);
    if (!id.ok()) _exit(12);
    // Reported before the commit, tagged (bit 63 = taken, not yet committed): a kill between the
    // commit and the second report must still leave the id known. 8 bytes: atomic on a pipe.
    const uint64_t taken = *id | (uint64_t{1} << 63);
    if (write(fd, &taken, sizeof(taken)) != sizeof(taken)) _exit(13);
    if (!(*store)->PutIntents({Intent(absl::StrCat(*id), "n1")}).ok()) _exit(14);
    if (write(fd, &*id, sizeof(*id)) != sizeof(*id)) _exit(15);
  }
  _exit(0);
}

// Reads reports from `fd` until `deadline` (or EOF when there is none).
void ReadReports(int fd, std::optional<absl::Time> deadline, std::vector<uint64_t>* reports) {
  while (true) {
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
    uint64_t buffer[512];
    const ssize_t got = read(fd, buffer, sizeof(buffer));
    if (got == 0) return;
    ASSERT_GT(got, 0);
    ASSERT_EQ(got % sizeof(uint64_t), 0u);
    reports->insert(reports->end(), buffer, buffer + got / sizeof(uint64_t));
  }
}

TEST_F(SqliteServerStoreTest, Kill9LosesNoAcknowledgedIntentAndRepeatsNoId) {
  absl::StatusOr<uint64_t> first_epoch = store_->BumpEpoch();
  ASSERT_TRUE(first_epoch.ok());
  store_.reset();  // the child opens its own
  const unsigned seed = std::random_device{}();
  std::printf("crash test seed %u\n", seed);
  std::mt19937 rng(seed);
  std::set<uint64_t> ids_seen;  // taken by any child, committed or not
  std::set<std::string> acked;
  uint64_t epoch = *first_epoch;
  for (int round = 0; round < 12; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round, ", seed ", seed));
    const absl::Duration delay =
        round % 4 == 0 ? absl::Microseconds(std::uniform_int_distribution<int>(0, 3000)(rng))
                       : absl::Milliseconds(std::uniform_int_distribution<int>(10, 120)(rng));
    int fds[2];
    ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(fds[0]);
      CrashChild(dir_, fds[1]);
    }
    close(fds[1]);
    std::vector<uint64_t> reports;
    ReadReports(fds[0], absl::Now() + delay, &reports);
    kill(pid, SIGKILL);
    int wstatus = 0;
    ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
    ReadReports(fds[0], std::nullopt, &reports);  // drain to EOF
    close(fds[0]);
    ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL)
        << "child failed on its own: status " << wstatus;

    std::set<uint64_t> round_ids;
    for (uint64_t report : reports) {
      const uint64_t id = report & ~(uint64_t{1} << 63);
      round_ids.insert(id);
      if ((report >> 63) == 0) acked.insert(absl::StrCat(id));
    }
    for (uint64_t id : round_ids) {
      ASSERT_TRUE(ids_seen.insert(id).second) << "id " << id << " handed out by two children";
    }

    Reopen();
    const std::vector<std::string> intent_ids = Ids(Intents());
    const std::set<std::string> stored(intent_ids.begin(), intent_ids.end());
    for (const std::string& id : acked) {
      ASSERT_TRUE(stored.count(id)) << "acknowledged intent " << id << " lost";
    }
    // Nothing is stored under an id a child did not take.
    for (const std::string& id : stored) {
      uint64_t n = 0;
      ASSERT_TRUE(absl::SimpleAtoi(id, &n));
      ASSERT_TRUE(ids_seen.count(n)) << id;
    }
    // The parent, too, gets ids no child had. (A killed child may have bumped the epoch.)
    absl::StatusOr<uint64_t> id = store_->NextIds(1);
    ASSERT_TRUE(id.ok()) << id.status();
    ASSERT_TRUE(ids_seen.insert(*id).second) << "id " << *id << " repeated after a crash";
    absl::StatusOr<uint64_t> next_epoch = store_->BumpEpoch();
    ASSERT_TRUE(next_epoch.ok());
    ASSERT_GT(*next_epoch, epoch);
    epoch = *next_epoch;
    store_.reset();
  }
  std::printf("crash test: %zu ids, %zu acknowledged intents survived\n", ids_seen.size(),
              acked.size());
  EXPECT_GT(acked.size(), 0u) << "no child got to commit anything";
}

}  // namespace
}  // namespace dmapin::server
