// Policies and admission: pure logic, no I/O, no clock. Every refusal is an errno status
// (README "Errors"):
//
//  - Validation of policies (SetPolicy) and intent requests (CreateIntent): INVALID_ARGUMENT,
//    EINVAL, naming the offending field ("EINVAL: policy.allow[1].key: empty",
//    "EINVAL: intent.size: ...").
//  - Admission of an intent against the policies whose node selector matches its node, before any
//    decision is sent: NOT_FOUND/ENOENT (unknown node), PERMISSION_DENIED/EPERM (allow/deny by
//    label), FAILED_PRECONDITION/EBUSY (cordoned node, REGISTER only), RESOURCE_EXHAUSTED with
//    ENOMEM (pool budget, context quota) or ENOSPC (regions per node), each naming the policy and
//    the numbers.
//  - EBUSY retry backoff: exponential with jitter, from a few milliseconds up to minutes.
#ifndef DMAPIN_SERVER_POLICY_POLICY_H_
#define DMAPIN_SERVER_POLICY_POLICY_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/random/bit_gen_ref.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/region_key.h"
#include "dmapin/v1/admin.pb.h"

namespace dmapin::server {

// --- Validation ---------------------------------------------------------------------------------

// EbusyRetry defaults (a field of 0 means the default) and the largest accepted backoff.
inline constexpr uint64_t kDefaultInitialBackoffMs = 5;
inline constexpr uint64_t kDefaultMaxBackoffMs = 5 * 60 * 1000;
inline constexpr uint32_t kDefaultJitterPercent = 20;
inline constexpr uint64_t kBackoffLimitMs = 24 * 60 * 60 * 1000;
// The largest pinned_bytes_budget, max_regions_per_node or context_quota_bytes accepted.
inline constexpr uint64_t kMaxPolicyLimit = (uint64_t{1} << 63) - 1;
// How much one policy or intent may say (EINVAL beyond): no caller decides how large the server's
// policy table and its matching work grow. Label names and values are also bounded in size (63,
// prefixes 253), as Kubernetes bounds them.
inline constexpr int kMaxSelectorLabels = 32;  // policy.node_selector, intent labels
inline constexpr int kMaxRules = 64;           // policy.allow and policy.deny, each
inline constexpr int kMaxRuleValues = 256;     // values of one rule

// Kubernetes label syntax. A key is an optional DNS-subdomain prefix (lowercase, <= 253
// characters) and '/', then a name of 1-63 characters [A-Za-z0-9-_.] beginning and ending with
// an alphanumeric. A value is empty or follows the name rule. The empty string when valid, else
// what is wrong.
std::string LabelKeyProblem(absl::string_view key);
std::string LabelValueProblem(absl::string_view value);

// INVALID_ARGUMENT with errno EINVAL ("EINVAL: policy.<field>: ...") naming the first bad field:
// policy.name (1-128 characters [A-Za-z0-9._-]), policy.node_selector, policy.allow[i] /
// policy.deny[i] (key non-empty, keys and values in label syntax), the limits (<=
// kMaxPolicyLimit: a client's -1 arrives as 2^64-1), policy.ebusy_retry (backoffs <=
// kBackoffLimitMs, the effective max >= the effective initial, jitter_percent <= 100). revision and
// update_time belong to the server: not checked.
absl::Status ValidatePolicy(const v1::Policy& policy);

// INVALID_ARGUMENT with errno EINVAL ("EINVAL: intent.<field>: ...") naming the first bad field:
//  - kind: one of the four kinds;
//  - node: always; context: REGISTER, UNREGISTER, TEARDOWN_CONTEXT; container: REGISTER,
//    UNREGISTER, RELEASE_CONTAINER (names: 1-256 bytes without control characters;
//    RELEASE_CONTAINER may name the context, TEARDOWN_CONTEXT must not name a container);
//  - REGISTER / UNREGISTER: size > 0, ua and size multiples of `node_page_size` when it is known
//    (non-zero), [ua, ua + size) not wrapping past 2^64;
//  - RELEASE_CONTAINER / TEARDOWN_CONTEXT: ua and size 0; TEARDOWN_CONTEXT: container empty
//    (a field the kind does not use is a mistake, not something to ignore);
//  - labels: label syntax.
absl::Status ValidateIntentRequest(const v1::CreateIntentRequest& request, uint64_t node_page_size);

// --- Admission ----------------------------------------------------------------------------------

// What admission needs to know about a node. required_bytes, regions and context_bytes describe
// required_regions; AddRequiredRegion keeps them consistent. Admit only looks up the request's
// region in required_regions and its context in context_bytes: a caller keeping running totals
// (ServerCore) fills those two entries only, and the sums from its totals.
struct NodeFacts {
  std::string name;
  std::map<std::string, std::string> labels;
  bool known = false;  // an agent by this name has connected (now or before)
  bool cordoned = false;
  uint64_t required_bytes = 0;                    // sum of the sizes of required_regions
  uint64_t regions = 0;                           // required_regions.size()
  std::map<std::string, uint64_t> context_bytes;  // per context, sum of sizes
  // The regions admitted REGISTER intents need: the same region registered by a second
  // container pins nothing more, so regions are counted once per RegionKey.
  std::set<RegionKey> required_regions;
  // What the node can ever hold (0: unknown, or no limit): from the agent's Hello, and per
  // context the memlock limit where one applies (limited and without CAP_IPC_LOCK, as the agent
  // reports the context; Admit looks up the request's context only).
  uint64_t page_size = 0;
  uint64_t physical_memory_bytes = 0;
  uint64_t max_region_bytes = 0;
  uint64_t max_pinned_bytes = 0;
  std::map<std::string, uint64_t> context_memlock_limit_bytes;

  // Counts a region of an admitted REGISTER intent; false (and nothing changes) when it is
  // already counted.
  bool AddRequiredRegion(absl::string_view context, uint64_t ua, uint64_t size);
};

// Every node the server knows, for pool budgets. The node being admitted may or may not be among
// them: Admit uses its own NodeFacts argument for that name either way.
struct FleetFacts {
  std::vector<NodeFacts> nodes;
  // Running totals instead of `nodes`: the bytes each policy's pool requires, by policy name,
  // already counting the node being admitted as its NodeFacts describe it. A policy found here
  // takes its figure from here (summing `nodes` would be O(fleet) per call).
  std::map<std::string, uint64_t> pool_required_bytes;
};

struct AdmissionResult {
  // OK, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION or RESOURCE_EXHAUSTED with the reason.
  absl::Status status;
  // When admitted: the names of the policies whose node selector matches the node, sorted.
  std::vector<std::string> admitted_by;
  // For humans and dry_run: what would happen, with the budget use it leads to.
  std::string explanation;
  // The EBUSY retry settings for the intent: MergeRetrySettings of the matching policies.
  v1::EbusyRetry retry;
};

// Whether every label of `policy.node_selector` is among `labels` (an empty selector matches
// every node).
bool PolicyMatchesNode(const v1::Policy& policy, const std::map<std::string, std::string>& labels);

// The policies matching `labels`, sorted by name.
std::vector<const v1::Policy*> MatchingPolicies(absl::Span<const v1::Policy> policies,
                                                const std::map<std::string, std::string>& labels);

// Bytes the nodes of `policy`'s pool require: fleet.pool_required_bytes[policy.name()] when
// present, else required_bytes summed over the nodes of `fleet` matching the selector, with
// `node` standing in for the fleet's entry of the same name (and counted even when the fleet lacks
// it, if it matches). Saturates at 2^64 - 1.
uint64_t PoolRequiredBytes(const v1::Policy& policy, const NodeFacts& node,
                           const FleetFacts& fleet);

// Admits `request` (already validated with ValidateIntentRequest) on `node`. Every policy whose
// selector matches the node applies, in name order; no matching policy means no limits.
//  1. Unknown node: NOT_FOUND.
//  2. Any matching policy's deny matches the intent's labels, or one of its allow requirements
//     does not: PERMISSION_DENIED naming the policy and the rule. (Every kind.)
//  3. REGISTER on a cordoned node: FAILED_PRECONDITION.
//  4. REGISTER of a region not yet required on the node (same context, ua, size) costs its size
//     and one region: over a pool budget, max_regions_per_node or context_quota_bytes is
//     RESOURCE_EXHAUSTED naming the policy and the numbers. A region already required costs
//     nothing and is admitted even if the pool is over budget now.
//    Before the policies, whatever they say (even with none): a new region the node can never
//    hold (CheckNodeCapacity), or one that with what the node requires already exceeds the
//    agent's max_pinned_bytes, its physical memory or the context's memlock limit, is
//    RESOURCE_EXHAUSTED with errno ENOMEM naming the limit.
// UNREGISTER, RELEASE_CONTAINER and TEARDOWN_CONTEXT consume nothing.
AdmissionResult Admit(const v1::CreateIntentRequest& request, const NodeFacts& node,
                      const FleetFacts& fleet, absl::Span<const v1::Policy> policies);

// Whether the node could ever hold a region of `size` bytes in `context`, whatever else it holds:
// OK, or RESOURCE_EXHAUSTED with errno ENOMEM naming the limit it exceeds: the agent's
// max_region_bytes or max_pinned_bytes, the node's physical memory, or the context's memlock
// limit (in whole pages, as the registry counts it).
absl::Status CheckNodeCapacity(absl::string_view context, uint64_t size, const NodeFacts& node);

// For Node.budget_bytes / budget_used_ratio: among the matching policies with a pool budget, the
// one whose pool is fullest (highest used / budget; ties: the smaller budget, then the name).
struct BudgetUse {
  std::string policy;         // empty: no matching policy has a budget
  uint64_t budget_bytes = 0;  // 0: none
  uint64_t used_bytes = 0;
  double used_ratio = 0;
};
BudgetUse TightestBudget(const NodeFacts& node, const FleetFacts& fleet,
                         absl::Span<const v1::Policy> policies);
// The same choice among pools whose use is known (`pools` in policy name order; those without a
// budget are skipped): what a caller with running totals (ServerCore) uses.
struct PoolUse {
  const v1::Policy* policy = nullptr;
  uint64_t used_bytes = 0;
};
BudgetUse TightestBudget(absl::Span<const PoolUse> pools);

// "64 GiB", "1.50 MiB (1572864 bytes)", "4095 bytes": exact when it is a whole number of a unit.
std::string FormatBytes(uint64_t bytes);

// --- EBUSY retry --------------------------------------------------------------------------------

// `settings` with the defaults filled in (0 = default), values clamped to kBackoffLimitMs and
// 100 %, and max_backoff_ms raised to initial_backoff_ms if below it.
v1::EbusyRetry EffectiveRetry(const v1::EbusyRetry& settings);

// The most conservative settings of `policies` (pass the matching ones): the largest effective
// initial backoff, max backoff and jitter. The defaults when `policies` is empty.
v1::EbusyRetry MergeRetrySettings(absl::Span<const v1::Policy> policies);
v1::EbusyRetry MergeRetrySettings(absl::Span<const v1::Policy* const> policies);

// The wait before retrying after the `attempt`-th EBUSY answer (1 for the first; 0 counts as 1):
// base = min(initial * 2^(attempt - 1), max), then jitter: base * (1 + j * (2u - 1)) where
// u = random / 2^64 (uniform in [0, 1)) and j = jitter_percent / 100, in whole nanoseconds. With
// the defaults (5 ms, 5 min, 20 %) the wait lies in [0.8, 1.2) * base: it may exceed max by the
// jitter, so that retries at the cap stay spread out. `settings` go through EffectiveRetry first.
absl::Duration EbusyBackoff(const v1::EbusyRetry& settings, uint32_t attempt, uint64_t random);
absl::Duration EbusyBackoff(const v1::EbusyRetry& settings, uint32_t attempt, absl::BitGenRef gen);

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_POLICY_POLICY_H_
