#include "server/core/requirements.h"

#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/policy/policy.h"

namespace dmapin::server {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

v1::Policy Pool(const std::string& name, const std::string& pool, uint64_t budget = 0) {
  v1::Policy policy;
  policy.set_name(name);
  if (!pool.empty()) (*policy.mutable_node_selector())["pool"] = pool;
  policy.set_pinned_bytes_budget(budget);
  return policy;
}

TEST(RequirementsTest, EachRegionCountsOnceWhateverNamesIt) {
  Requirements r;
  r.SetPolicies({Pool("a", "a"), Pool("all", "")});
  r.SetLabels("n1", {{"pool", "a"}});
  const RegionKey x{"vm", 0, kGiB};
  r.Reported("n1", x);
  r.Require("n1", x, /*reported=*/true);  // the intent that registered it
  r.Require("n1", x, true);               // a second container
  EXPECT_EQ(r.RequiredBytes("n1"), kGiB);
  EXPECT_EQ(r.Regions("n1"), 1u);
  // The agent unregisters it behind the server's back: the intents still require it.
  r.Unreported("n1", x);
  EXPECT_EQ(r.RequiredBytes("n1"), kGiB);
  r.Release("n1", x);
  r.Release("n1", x);
  EXPECT_EQ(r.RequiredBytes("n1"), 0u);
  EXPECT_EQ(r.Regions("n1"), 0u);
  EXPECT_EQ(r.PoolBytes("a"), 0u);
}

TEST(RequirementsTest, PoolsFollowLabelsAndPolicies) {
  Requirements r;
  r.SetPolicies({Pool("a", "a"), Pool("all", "")});
  r.Require("n1", {"vm", 0, kGiB}, false);  // known before its Hello: no labels yet
  EXPECT_EQ(r.PoolBytes("a"), 0u);
  EXPECT_EQ(r.PoolBytes("all"), kGiB);
  r.SetLabels("n1", {{"pool", "a"}});
  r.Reported("n2", {"vm", 0, 2 * kGiB});
  r.SetLabels("n2", {{"pool", "b"}});
  EXPECT_EQ(r.PoolBytes("a"), kGiB);
  EXPECT_EQ(r.PoolBytes("all"), 3 * kGiB);
  r.SetLabels("n1", {{"pool", "b"}});
  EXPECT_EQ(r.PoolBytes("a"), 0u);
  r.SetPolicies({Pool("b", "b")});
  EXPECT_EQ(r.PoolTotals(), (std::map<std::string, uint64_t>{{"b", 3 * kGiB}}));
  EXPECT_EQ(r.PoolBytes("a"), 0u) << "a deleted policy has no pool";
}

TEST(RequirementsTest, SaturatesInsteadOfWrapping) {
  Requirements r;
  r.SetPolicies({Pool("all", "")});
  const uint64_t half = uint64_t{1} << 63;
  r.Reported("n1", {"vm", 0, half});
  r.Reported("n1", {"vm", half, half});
  r.Reported("n2", {"vm", 0, half});
  EXPECT_EQ(r.RequiredBytes("n1"), ~uint64_t{0});
  EXPECT_EQ(r.PoolBytes("all"), ~uint64_t{0});
  r.Unreported("n1", {"vm", half, half});
  EXPECT_EQ(r.RequiredBytes("n1"), half);
  EXPECT_EQ(r.PoolBytes("all"), ~uint64_t{0});
  r.Unreported("n2", {"vm", 0, half});
  EXPECT_EQ(r.PoolBytes("all"), half);
}

// Random reports, intents, labels and policies against a recomputation from scratch (what the
// server did on every read before): the running totals always agree.
TEST(RequirementsTest, RunningTotalsEqualARecomputation) {
  std::mt19937_64 rng(11);
  const std::vector<std::string> nodes = {"n1", "n2", "n3"};
  const std::vector<std::string> pools = {"a", "b"};
  const std::vector<RegionKey> keys = {
      {"vm", 0, kGiB}, {"vm", kGiB, 2 * kGiB}, {"db", 0, kGiB}, {"db", 0, 4 * kGiB}};
  std::map<std::string, std::set<RegionKey>> reported;
  std::map<std::string, std::multiset<RegionKey>> requested;
  std::map<std::string, std::map<std::string, std::string>> labels;
  std::vector<v1::Policy> policies = {Pool("pa", "a", 8 * kGiB), Pool("all", "", 32 * kGiB)};
  Requirements r;
  r.SetPolicies(policies);
  for (int step = 0; step < 20000; ++step) {
    const std::string& node = nodes[rng() % nodes.size()];
    const RegionKey& key = keys[rng() % keys.size()];
    switch (rng() % 6) {
      case 0:
        if (reported[node].insert(key).second) r.Reported(node, key);
        break;
      case 1:
        if (reported[node].erase(key) > 0) r.Unreported(node, key);
        break;
      case 2:
        requested[node].insert(key);
        r.Require(node, key, reported[node].count(key) > 0);
        break;
      case 3:
        if (auto it = requested[node].find(key); it != requested[node].end()) {
          requested[node].erase(it);
          r.Release(node, key);
        }
        break;
      case 4:
        labels[node] = {{"pool", pools[rng() % pools.size()]}};
        r.SetLabels(node, labels[node]);
        break;
      default:
        if (rng() % 50 == 0) {
          policies = {Pool("pa", pools[rng() % 2], 8 * kGiB), Pool("pb", "b"),
                      Pool("all", "", (rng() % 64 + 1) * kGiB)};
          r.SetPolicies(policies);
        }
        break;
    }
    FleetFacts fleet;
    for (const std::string& name : nodes) {
      NodeFacts facts;
      facts.name = name;
      facts.labels = labels[name];
      for (const RegionKey& k : reported[name]) facts.AddRequiredRegion(k.context, k.ua, k.size);
      for (const RegionKey& k : requested[name]) facts.AddRequiredRegion(k.context, k.ua, k.size);
      ASSERT_EQ(r.RequiredBytes(name), facts.required_bytes) << "step " << step;
      ASSERT_EQ(r.Regions(name), facts.regions) << "step " << step;
      for (const std::string context : {"vm", "db"}) {
        auto it = facts.context_bytes.find(context);
        ASSERT_EQ(r.ContextBytes(name, context), it == facts.context_bytes.end() ? 0 : it->second)
            << "step " << step;
      }
      fleet.nodes.push_back(std::move(facts));
    }
    for (const v1::Policy& policy : policies) {
      ASSERT_EQ(r.PoolBytes(policy.name()), PoolRequiredBytes(policy, fleet.nodes[0], fleet))
          << "step " << step << " policy " << policy.name();
    }
    // A node view's figures: the node's bytes and its tightest budget, as recomputed.
    for (const NodeFacts& facts : fleet.nodes) {
      const Requirements::NodeFigures figures = r.Figures(facts.name);
      const BudgetUse budget = TightestBudget(facts, fleet, policies);
      ASSERT_EQ(figures.required_bytes, facts.required_bytes) << "step " << step;
      ASSERT_EQ(figures.budget.policy, budget.policy) << "step " << step << " " << facts.name;
      ASSERT_EQ(figures.budget.used_bytes, budget.used_bytes) << "step " << step;
      ASSERT_EQ(figures.budget.budget_bytes, budget.budget_bytes) << "step " << step;
    }
  }
}

}  // namespace
}  // namespace dmapin::server
