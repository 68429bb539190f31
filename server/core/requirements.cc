#include "server/core/requirements.h"

#include <limits>

#include "server/policy/policy.h"

namespace dmapin::server {
namespace {

uint64_t Saturate(absl::uint128 value) {
  return value > std::numeric_limits<uint64_t>::max() ? std::numeric_limits<uint64_t>::max()
                                                      : absl::Uint128Low64(value);
}

}  // namespace

void Requirements::SetPolicies(absl::Span<const v1::Policy> policies) {
  pools_.clear();
  for (const v1::Policy& policy : policies) pools_[policy.name()].policy = policy;
  for (auto& [name, node] : nodes_) {
    MatchPools(node);
    for (Pool* pool : node.pools) pool->bytes += node.bytes;
  }
}

void Requirements::SetLabels(const std::string& name,
                             const std::map<std::string, std::string>& labels) {
  Node& node = NodeFor(name);
  if (node.labels == labels) return;
  for (Pool* pool : node.pools) pool->bytes -= node.bytes;
  node.labels = labels;
  MatchPools(node);
  for (Pool* pool : node.pools) pool->bytes += node.bytes;
}

void Requirements::MatchPools(Node& node) {
  node.pools.clear();
  for (auto& [name, pool] : pools_) {
    if (PolicyMatchesNode(pool.policy, node.labels)) node.pools.push_back(&pool);
  }
}

void Requirements::Count(Node& node, const RegionKey& key, int sign) {
  const absl::uint128 size = key.size;
  absl::uint128& context = node.context_bytes[key.context];
  if (sign > 0) {
    node.bytes += size;
    ++node.regions;
    context += size;
    for (Pool* pool : node.pools) pool->bytes += size;
  } else {
    node.bytes -= size;
    --node.regions;
    context -= size;
    if (context == 0) node.context_bytes.erase(key.context);
    for (Pool* pool : node.pools) pool->bytes -= size;
  }
}

Requirements::Node& Requirements::NodeFor(const std::string& name) {
  auto [it, added] = nodes_.try_emplace(name);
  if (added) MatchPools(it->second);  // no labels yet: the pools that select every node
  return it->second;
}

void Requirements::Reported(const std::string& name, const RegionKey& key) {
  Node& node = NodeFor(name);
  auto it = node.requested.find(key);
  if (it != node.requested.end()) {
    it->second.reported = true;  // counted already, for its intents
    return;
  }
  Count(node, key, +1);
}

void Requirements::Unreported(const std::string& name, const RegionKey& key) {
  Node& node = NodeFor(name);
  auto it = node.requested.find(key);
  if (it != node.requested.end()) {
    it->second.reported = false;  // still counted, for its intents
    return;
  }
  Count(node, key, -1);
}

void Requirements::Require(const std::string& name, const RegionKey& key, bool reported) {
  Node& node = NodeFor(name);
  auto [it, added] = node.requested.try_emplace(key);
  if (added) {
    it->second.reported = reported;
    if (!reported) Count(node, key, +1);
  }
  ++it->second.intents;
}

void Requirements::Release(const std::string& name, const RegionKey& key) {
  Node& node = NodeFor(name);
  auto it = node.requested.find(key);
  if (it == node.requested.end()) return;
  if (--it->second.intents > 0) return;
  if (!it->second.reported) Count(node, key, -1);
  node.requested.erase(it);
}

const Requirements::Node* Requirements::Find(const std::string& name) const {
  auto it = nodes_.find(name);
  return it == nodes_.end() ? nullptr : &it->second;
}

uint64_t Requirements::RequiredBytes(const std::string& name) const {
  const Node* node = Find(name);
  return node == nullptr ? 0 : Saturate(node->bytes);
}

uint64_t Requirements::Regions(const std::string& name) const {
  const Node* node = Find(name);
  return node == nullptr ? 0 : node->regions;
}

uint64_t Requirements::ContextBytes(const std::string& name, const std::string& context) const {
  const Node* node = Find(name);
  if (node == nullptr) return 0;
  auto it = node->context_bytes.find(context);
  return it == node->context_bytes.end() ? 0 : Saturate(it->second);
}

bool Requirements::Requested(const std::string& name, const RegionKey& key) const {
  const Node* node = Find(name);
  return node != nullptr && node->requested.count(key) > 0;
}

uint64_t Requirements::PoolBytes(const std::string& policy) const {
  auto it = pools_.find(policy);
  return it == pools_.end() ? 0 : Saturate(it->second.bytes);
}

Requirements::NodeFigures Requirements::Figures(const std::string& name) const {
  NodeFigures figures;
  std::vector<PoolUse> uses;
  const Node* node = Find(name);
  if (node != nullptr) {
    figures.required_bytes = Saturate(node->bytes);
    for (const Pool* pool : node->pools) uses.push_back({&pool->policy, Saturate(pool->bytes)});
  } else {
    // Known only by name (admin state from before a restart): no labels, nothing required.
    for (const auto& [policy, pool] : pools_) {
      if (PolicyMatchesNode(pool.policy, {})) uses.push_back({&pool.policy, Saturate(pool.bytes)});
    }
  }
  figures.budget = TightestBudget(uses);
  return figures;
}

std::map<std::string, uint64_t> Requirements::PoolTotals() const {
  std::map<std::string, uint64_t> totals;
  for (const auto& [name, pool] : pools_)
    totals.emplace_hint(totals.end(), name, Saturate(pool.bytes));
  return totals;
}

}  // namespace dmapin::server
