// Requirements: running totals of what admission counts, kept as reports and intents change so
// that no read (ListNodes, GetNode, CreateIntent, /metrics) recomputes them over the fleet.
//
// A node requires a region (context, ua, size) when its agent reports it or a live REGISTER
// intent asks for it; each region counts once however many sources name it (a second container
// registering the same region pins nothing more). Per node: the bytes, the number of regions and
// the bytes per context of its required regions. Per policy: the bytes its pool requires (the sum
// over the nodes its selector matches, by their labels).
//
// Updates cost O(policies) each (O(nodes x policies) for SetPolicies, which only admins cause).
// Only the regions named by intents are stored here (reported ones are counted, not copied): the
// caller says whether such a region is reported when an intent starts requiring it.
// Not thread-safe: ServerCore owns it under its lock.
#ifndef DMAPIN_SERVER_CORE_REQUIREMENTS_H_
#define DMAPIN_SERVER_CORE_REQUIREMENTS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/numeric/int128.h"
#include "absl/types/span.h"
#include "dmapin/v1/admin.pb.h"
#include "server/fleet/fleet_state.h"
#include "server/policy/policy.h"

namespace dmapin::server {

class Requirements {
 public:
  // The policies changed: every pool is recomputed.
  void SetPolicies(absl::Span<const v1::Policy> policies);
  // The node's labels (from its Hello): moves its bytes between pools.
  void SetLabels(const std::string& node, const std::map<std::string, std::string>& labels);

  // A region appeared in, or went from, the node's report.
  void Reported(const std::string& node, const RegionKey& key);
  void Unreported(const std::string& node, const RegionKey& key);
  // One more / one fewer live REGISTER intent asks for the region; `reported`: whether the
  // node's report holds it now.
  void Require(const std::string& node, const RegionKey& key, bool reported);
  void Release(const std::string& node, const RegionKey& key);

  // Saturated at 2^64 - 1.
  uint64_t RequiredBytes(const std::string& node) const;
  uint64_t Regions(const std::string& node) const;
  uint64_t ContextBytes(const std::string& node, const std::string& context) const;
  // Whether an intent asks for the region (a reported region may be required without that).
  bool Requested(const std::string& node, const RegionKey& key) const;
  // The bytes the pool of `policy` requires (0 for a policy not set).
  uint64_t PoolBytes(const std::string& policy) const;
  // Every policy's pool bytes, by name.
  std::map<std::string, uint64_t> PoolTotals() const;
  // What a node view shows, in one lookup: the node's required bytes and the tightest budget
  // among the pools it is in (TightestBudget), without matching labels or summing anything.
  struct NodeFigures {
    uint64_t required_bytes = 0;
    BudgetUse budget;
  };
  NodeFigures Figures(const std::string& node) const;

 private:
  struct Pool {
    v1::Policy policy;  // its selector
    absl::uint128 bytes = 0;
  };
  struct IntentRefs {
    uint32_t intents = 0;
    bool reported = false;
  };
  struct Node {
    std::map<std::string, std::string> labels;
    std::vector<Pool*> pools;  // those whose selector matches the labels
    absl::uint128 bytes = 0;
    uint64_t regions = 0;
    std::map<std::string, absl::uint128> context_bytes;
    std::map<RegionKey, IntentRefs> requested;
  };
  // Counts (sign +1) or uncounts (-1) a region on the node and its pools.
  void Count(Node& node, const RegionKey& key, int sign);
  void MatchPools(Node& node);
  Node& NodeFor(const std::string& node);
  const Node* Find(const std::string& node) const;

  std::map<std::string, Pool> pools_;
  std::map<std::string, Node> nodes_;
};

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_CORE_REQUIREMENTS_H_
