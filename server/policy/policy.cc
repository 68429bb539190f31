#include "server/policy/policy.h"

#include <algorithm>
#include <cerrno>
#include <limits>
#include <utility>

#include "absl/numeric/int128.h"
#include "absl/random/distributions.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/errno_status.h"

namespace dmapin::server {
namespace {

constexpr size_t kMaxPolicyName = 128;
constexpr size_t kMaxLabelName = 63;
constexpr size_t kMaxLabelPrefix = 253;
constexpr size_t kMaxObjectName = 256;

uint64_t SaturatingAdd(uint64_t a, uint64_t b) {
  return a > std::numeric_limits<uint64_t>::max() - b ? std::numeric_limits<uint64_t>::max()
                                                      : a + b;
}

// "\"name\"" with anything unprintable escaped.
std::string Quote(absl::string_view s) { return absl::StrCat("\"", absl::CHexEscape(s), "\""); }

std::string Hex(uint64_t v) { return absl::StrCat("0x", absl::Hex(v)); }

// Map entries in key order (proto maps iterate in an unspecified order): the first error
// reported is deterministic.
template <typename Map>
std::vector<std::pair<std::string, std::string>> Sorted(const Map& map) {
  std::vector<std::pair<std::string, std::string>> entries(map.begin(), map.end());
  std::sort(entries.begin(), entries.end());
  return entries;
}

// --- Label syntax -------------------------------------------------------------------------------

bool IsAlnum(char c) { return absl::ascii_isalnum(static_cast<unsigned char>(c)); }

// The name rule shared by key names and values; `what` is "name" or "value".
std::string LabelNameProblem(absl::string_view name, absl::string_view what) {
  if (name.size() > kMaxLabelName) {
    return absl::StrCat(what, " is ", name.size(), " characters, more than ", kMaxLabelName);
  }
  for (char c : name) {
    if (!IsAlnum(c) && c != '-' && c != '_' && c != '.') {
      return absl::StrCat(what, " may contain only [A-Za-z0-9], '-', '_' and '.' (found ",
                          Quote(absl::string_view(&c, 1)), ")");
    }
  }
  if (!IsAlnum(name.front()) || !IsAlnum(name.back())) {
    return absl::StrCat(what, " must begin and end with an alphanumeric character");
  }
  return "";
}

// A lowercase RFC 1123 DNS subdomain.
std::string DnsSubdomainProblem(absl::string_view prefix) {
  if (prefix.empty()) return "prefix before '/' is empty";
  if (prefix.size() > kMaxLabelPrefix) {
    return absl::StrCat("prefix is ", prefix.size(), " characters, more than ", kMaxLabelPrefix);
  }
  for (absl::string_view part : absl::StrSplit(prefix, '.')) {
    bool ok = !part.empty() && IsAlnum(part.front()) && IsAlnum(part.back());
    for (char c : part) {
      ok = ok && ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-');
    }
    if (!ok) {
      return absl::StrCat("prefix ", Quote(prefix),
                          " must be a lowercase DNS subdomain (RFC 1123: [a-z0-9-] labels "
                          "separated by '.', each beginning and ending with [a-z0-9])");
    }
  }
  return "";
}

// --- Intent helpers -----------------------------------------------------------------------------

std::string KindName(v1::IntentKind kind) {
  return std::string(absl::StripPrefix(v1::IntentKind_Name(kind), "INTENT_KIND_"));
}

absl::Status BadIntent(absl::string_view field, absl::string_view reason) {
  return ErrnoStatus(EINVAL, absl::StrCat("intent.", field, ": ", reason));
}

absl::Status BadPolicy(absl::string_view field, absl::string_view reason) {
  return ErrnoStatus(EINVAL, absl::StrCat("policy.", field, ": ", reason));
}

// Whether a kind needs a name field.
enum class Use { kRequired, kOptional, kForbidden };

// A node, context or container name.
absl::Status CheckObjectName(absl::string_view field, absl::string_view value, Use use,
                             v1::IntentKind kind) {
  if (value.empty()) {
    if (use == Use::kRequired) {
      return BadIntent(field, absl::StrCat("empty (", KindName(kind), " needs it)"));
    }
    return absl::OkStatus();
  }
  if (use == Use::kForbidden) {
    return BadIntent(field, absl::StrCat("must be empty for ", KindName(kind)));
  }
  if (value.size() > kMaxObjectName) {
    return BadIntent(field,
                     absl::StrCat("is ", value.size(), " bytes, more than ", kMaxObjectName));
  }
  for (char c : value) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      return BadIntent(field, absl::StrCat(Quote(value), " contains a control character"));
    }
  }
  return absl::OkStatus();
}

// --- Admission helpers --------------------------------------------------------------------------

std::string DescribeRequirement(const v1::LabelRequirement& requirement) {
  if (requirement.values().empty()) return absl::StrCat(requirement.key(), " present");
  return absl::StrCat(requirement.key(), " in [", absl::StrJoin(requirement.values(), ", "), "]");
}

bool RequirementMatches(const v1::LabelRequirement& requirement,
                        const google::protobuf::Map<std::string, std::string>& labels) {
  auto it = labels.find(requirement.key());
  if (it == labels.end()) return false;
  if (requirement.values().empty()) return true;
  return std::find(requirement.values().begin(), requirement.values().end(), it->second) !=
         requirement.values().end();
}

std::string DescribeSelector(const v1::Policy& policy) {
  if (policy.node_selector().empty()) return "every node";
  std::vector<std::string> parts;
  for (const auto& [key, value] : Sorted(policy.node_selector())) {
    parts.push_back(absl::StrCat(key, "=", value));
  }
  return absl::StrCat("nodes ", absl::StrJoin(parts, ","));
}

std::string PolicyLabel(const v1::Policy& policy) {
  return absl::StrCat("policy ", Quote(policy.name()), " (", DescribeSelector(policy), ")");
}

// PERMISSION_DENIED when `policy` does not allow the labels; OK otherwise.
absl::Status CheckLabels(const v1::Policy& policy,
                         const google::protobuf::Map<std::string, std::string>& labels) {
  auto label_of = [&labels](const std::string& key) {
    auto it = labels.find(key);
    if (it == labels.end()) return absl::StrCat("has no label ", key);
    return absl::StrCat("has ", key, "=", it->second);
  };
  for (int i = 0; i < policy.deny_size(); ++i) {
    const v1::LabelRequirement& rule = policy.deny(i);
    if (RequirementMatches(rule, labels)) {
      return ErrnoStatus(EPERM, absl::StrCat(PolicyLabel(policy), " denies the intent: deny[", i,
                                             "] (", DescribeRequirement(rule),
                                             ") matches; the intent ", label_of(rule.key())));
    }
  }
  for (int i = 0; i < policy.allow_size(); ++i) {
    const v1::LabelRequirement& rule = policy.allow(i);
    if (!RequirementMatches(rule, labels)) {
      return ErrnoStatus(
          EPERM,
          absl::StrCat(PolicyLabel(policy), " does not allow the intent: allow[", i, "] requires ",
                       DescribeRequirement(rule), "; the intent ", label_of(rule.key())));
    }
  }
  return absl::OkStatus();
}

std::string Percent(uint64_t used, uint64_t budget) {
  if (budget == 0) return "";
  return absl::StrFormat(" (%.1f%%)",
                         100.0 * static_cast<double>(used) / static_cast<double>(budget));
}

std::string DescribeRequest(const v1::CreateIntentRequest& request) {
  switch (request.kind()) {
    case v1::INTENT_KIND_REGISTER:
    case v1::INTENT_KIND_UNREGISTER:
      return absl::StrCat(KindName(request.kind()), " of container ", Quote(request.container()),
                          " on context ", Quote(request.context()), " ua=", Hex(request.ua()),
                          " size=", FormatBytes(request.size()), " on node ",
                          Quote(request.node()));
    case v1::INTENT_KIND_RELEASE_CONTAINER:
      return absl::StrCat("RELEASE_CONTAINER of ", Quote(request.container()), " on node ",
                          Quote(request.node()));
    case v1::INTENT_KIND_TEARDOWN_CONTEXT:
      return absl::StrCat("TEARDOWN_CONTEXT of ", Quote(request.context()), " on node ",
                          Quote(request.node()));
    default:
      return absl::StrCat(KindName(request.kind()), " on node ", Quote(request.node()));
  }
}

}  // namespace

// --- Label syntax -------------------------------------------------------------------------------

std::string LabelKeyProblem(absl::string_view key) {
  if (key.empty()) return "empty";
  absl::string_view name = key;
  const size_t slash = key.find('/');
  if (slash != absl::string_view::npos) {
    if (std::string problem = DnsSubdomainProblem(key.substr(0, slash)); !problem.empty()) {
      return problem;
    }
    name = key.substr(slash + 1);
    if (name.find('/') != absl::string_view::npos) return "more than one '/'";
  }
  if (name.empty()) return "name after the prefix is empty";
  return LabelNameProblem(name, "name");
}

std::string LabelValueProblem(absl::string_view value) {
  if (value.empty()) return "";
  return LabelNameProblem(value, "value");
}

// --- Validation ---------------------------------------------------------------------------------

absl::Status ValidatePolicy(const v1::Policy& policy) {
  const std::string& name = policy.name();
  bool name_ok = !name.empty() && name.size() <= kMaxPolicyName;
  for (char c : name) name_ok = name_ok && (IsAlnum(c) || c == '.' || c == '_' || c == '-');
  if (!name_ok) return BadPolicy("name", "must be 1-128 chars [A-Za-z0-9._-]");
  if (policy.node_selector_size() > kMaxSelectorLabels) {
    return BadPolicy("node_selector", absl::StrCat(policy.node_selector_size(), " labels; at most ",
                                                   kMaxSelectorLabels));
  }
  for (const auto* list : {&policy.allow(), &policy.deny()}) {
    const char* list_name = list == &policy.allow() ? "allow" : "deny";
    if (list->size() > kMaxRules) {
      return BadPolicy(list_name, absl::StrCat(list->size(), " rules; at most ", kMaxRules));
    }
    for (int i = 0; i < list->size(); ++i) {
      if (list->Get(i).values_size() > kMaxRuleValues) {
        return BadPolicy(
            absl::StrCat(list_name, "[", i, "].values"),
            absl::StrCat(list->Get(i).values_size(), " values; at most ", kMaxRuleValues));
      }
    }
  }

  for (const auto& [key, value] : Sorted(policy.node_selector())) {
    const std::string field = absl::StrCat("node_selector[", Quote(key), "]");
    if (std::string problem = LabelKeyProblem(key); !problem.empty()) {
      return BadPolicy(field, absl::StrCat("key: ", problem));
    }
    if (std::string problem = LabelValueProblem(value); !problem.empty()) {
      return BadPolicy(field, absl::StrCat(problem));
    }
  }
  for (const auto* list : {&policy.allow(), &policy.deny()}) {
    const char* list_name = list == &policy.allow() ? "allow" : "deny";
    for (int i = 0; i < list->size(); ++i) {
      const v1::LabelRequirement& rule = list->Get(i);
      if (std::string problem = LabelKeyProblem(rule.key()); !problem.empty()) {
        return BadPolicy(absl::StrCat(list_name, "[", i, "].key"), problem);
      }
      for (int j = 0; j < rule.values_size(); ++j) {
        if (std::string problem = LabelValueProblem(rule.values(j)); !problem.empty()) {
          return BadPolicy(absl::StrCat(list_name, "[", i, "].values[", j, "]"), problem);
        }
      }
    }
  }
  // The limits are uint64 on the wire, where a client's -1 (int64, or a JSON "-1" that its
  // library wraps) arrives as 2^64 - 1: beyond 2^63 nothing is a real limit, it is a sign error.
  for (const auto& [field, value] :
       {std::pair<const char*, uint64_t>{"pinned_bytes_budget", policy.pinned_bytes_budget()},
        {"max_regions_per_node", policy.max_regions_per_node()},
        {"context_quota_bytes", policy.context_quota_bytes()}}) {
    if (value > kMaxPolicyLimit) {
      return BadPolicy(field, absl::StrCat(value, " is beyond 2^63-1: a negative number (-",
                                           0 - value, " as a 64-bit integer)? 0 means no limit"));
    }
  }
  const v1::EbusyRetry& retry = policy.ebusy_retry();
  if (retry.initial_backoff_ms() > kBackoffLimitMs) {
    return BadPolicy("ebusy_retry.initial_backoff_ms",
                     absl::StrCat("must be <= ", kBackoffLimitMs, " (one day)"));
  }
  if (retry.max_backoff_ms() > kBackoffLimitMs) {
    return BadPolicy("ebusy_retry.max_backoff_ms",
                     absl::StrCat("must be <= ", kBackoffLimitMs, " (one day)"));
  }
  const uint64_t initial =
      retry.initial_backoff_ms() != 0 ? retry.initial_backoff_ms() : kDefaultInitialBackoffMs;
  const uint64_t max = retry.max_backoff_ms() != 0 ? retry.max_backoff_ms() : kDefaultMaxBackoffMs;
  if (max < initial) {
    return BadPolicy("ebusy_retry.max_backoff_ms",
                     absl::StrCat("must be >= initial_backoff_ms (", max, " < ", initial,
                                  "; 0 means the default, ", kDefaultInitialBackoffMs, " and ",
                                  kDefaultMaxBackoffMs, ")"));
  }
  if (retry.jitter_percent() > 100) {
    return BadPolicy("ebusy_retry.jitter_percent",
                     absl::StrCat("must be <= 100 (got ", retry.jitter_percent(), ")"));
  }
  return absl::OkStatus();
}

absl::Status ValidateIntentRequest(const v1::CreateIntentRequest& request,
                                   uint64_t node_page_size) {
  const v1::IntentKind kind = request.kind();
  bool region = false;
  Use context = Use::kForbidden;
  Use container = Use::kForbidden;
  switch (kind) {
    case v1::INTENT_KIND_REGISTER:
    case v1::INTENT_KIND_UNREGISTER:
      region = true;
      context = container = Use::kRequired;
      break;
    case v1::INTENT_KIND_RELEASE_CONTAINER:
      container = Use::kRequired;
      context = Use::kOptional;  // the container's context, for the record
      break;
    case v1::INTENT_KIND_TEARDOWN_CONTEXT:
      context = Use::kRequired;
      break;
    default:
      return BadIntent("kind", absl::StrCat("must be REGISTER, UNREGISTER, RELEASE_CONTAINER or "
                                            "TEARDOWN_CONTEXT (got ",
                                            static_cast<int>(kind), ")"));
  }
  if (absl::Status s = CheckObjectName("node", request.node(), Use::kRequired, kind); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckObjectName("context", request.context(), context, kind); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckObjectName("container", request.container(), container, kind);
      !s.ok()) {
    return s;
  }
  const uint64_t ua = request.ua();
  const uint64_t size = request.size();
  if (!region) {
    if (ua != 0) return BadIntent("ua", absl::StrCat("must be 0 for ", KindName(kind)));
    if (size != 0) return BadIntent("size", absl::StrCat("must be 0 for ", KindName(kind)));
  } else {
    if (size == 0) return BadIntent("size", "must be > 0");
    if (node_page_size != 0) {
      if (ua % node_page_size != 0) {
        return BadIntent("ua", absl::StrCat(Hex(ua), " is not a multiple of the node's page size ",
                                            Hex(node_page_size)));
      }
      if (size % node_page_size != 0) {
        return BadIntent("size",
                         absl::StrCat(Hex(size), " is not a multiple of the node's page size ",
                                      Hex(node_page_size)));
      }
    }
    if (ua + (size - 1) < ua) {
      return BadIntent("size",
                       absl::StrCat("ua=", Hex(ua), " size=", Hex(size), " wraps past 2^64"));
    }
  }
  if (request.labels_size() > kMaxSelectorLabels) {
    return BadIntent("labels",
                     absl::StrCat(request.labels_size(), " labels; at most ", kMaxSelectorLabels));
  }
  for (const auto& [key, value] : Sorted(request.labels())) {
    const std::string field = absl::StrCat("labels[", Quote(key), "]");
    if (std::string problem = LabelKeyProblem(key); !problem.empty()) {
      return BadIntent(field, absl::StrCat("key: ", problem));
    }
    if (std::string problem = LabelValueProblem(value); !problem.empty()) {
      return BadIntent(field, problem);
    }
  }
  return absl::OkStatus();
}

// --- Admission ----------------------------------------------------------------------------------

bool NodeFacts::AddRequiredRegion(absl::string_view context, uint64_t ua, uint64_t size) {
  if (!required_regions.insert(RegionKey{std::string(context), ua, size}).second) {
    return false;
  }
  required_bytes = SaturatingAdd(required_bytes, size);
  ++regions;
  uint64_t& bytes = context_bytes[std::string(context)];
  bytes = SaturatingAdd(bytes, size);
  return true;
}

bool PolicyMatchesNode(const v1::Policy& policy, const std::map<std::string, std::string>& labels) {
  for (const auto& [key, value] : policy.node_selector()) {
    auto it = labels.find(key);
    if (it == labels.end() || it->second != value) return false;
  }
  return true;
}

std::vector<const v1::Policy*> MatchingPolicies(absl::Span<const v1::Policy> policies,
                                                const std::map<std::string, std::string>& labels) {
  std::vector<const v1::Policy*> matching;
  for (const v1::Policy& policy : policies) {
    if (PolicyMatchesNode(policy, labels)) matching.push_back(&policy);
  }
  std::sort(matching.begin(), matching.end(),
            [](const v1::Policy* a, const v1::Policy* b) { return a->name() < b->name(); });
  return matching;
}

uint64_t PoolRequiredBytes(const v1::Policy& policy, const NodeFacts& node,
                           const FleetFacts& fleet) {
  if (auto it = fleet.pool_required_bytes.find(policy.name());
      it != fleet.pool_required_bytes.end()) {
    return it->second;
  }
  uint64_t used = PolicyMatchesNode(policy, node.labels) ? node.required_bytes : 0;
  for (const NodeFacts& other : fleet.nodes) {
    if (other.name == node.name) continue;
    if (PolicyMatchesNode(policy, other.labels)) used = SaturatingAdd(used, other.required_bytes);
  }
  return used;
}

namespace {

// Bytes as a whole number of pages (down), when the page size is known: the registry compares
// page counts (limit_pages = RLIMIT_MEMLOCK / PS).
uint64_t FloorToPages(uint64_t bytes, uint64_t page_size) {
  return page_size == 0 ? bytes : bytes / page_size * page_size;
}

// A limit a node's pinned bytes are held to (bytes 0: none): the node's, or one context's.
struct CapacityLimit {
  std::string name;
  uint64_t bytes = 0;
  bool per_context = false;
};
std::vector<CapacityLimit> CapacityLimits(absl::string_view context, const NodeFacts& node) {
  std::vector<CapacityLimit> limits = {{"the agent's --max_pinned_bytes", node.max_pinned_bytes},
                                       {"the node's physical memory", node.physical_memory_bytes}};
  if (auto it = node.context_memlock_limit_bytes.find(std::string(context));
      it != node.context_memlock_limit_bytes.end()) {
    limits.push_back({absl::StrCat("the memlock limit of context ", Quote(context)),
                      FloorToPages(it->second, node.page_size), true});
  }
  return limits;
}

}  // namespace

absl::Status CheckNodeCapacity(absl::string_view context, uint64_t size, const NodeFacts& node) {
  std::vector<CapacityLimit> limits = CapacityLimits(context, node);
  limits.insert(limits.begin(), {"the agent's --max_region_bytes", node.max_region_bytes});
  for (const CapacityLimit& limit : limits) {
    if (limit.bytes != 0 && size > limit.bytes) {
      return ErrnoStatus(ENOMEM,
                         absl::StrCat("node ", Quote(node.name),
                                      " can never hold this region: ", FormatBytes(size), " > ",
                                      limit.name, " (", FormatBytes(limit.bytes), ")"));
    }
  }
  return absl::OkStatus();
}

AdmissionResult Admit(const v1::CreateIntentRequest& request, const NodeFacts& node,
                      const FleetFacts& fleet, absl::Span<const v1::Policy> policies) {
  AdmissionResult result;
  const std::string what = DescribeRequest(request);
  auto deny = [&](absl::Status status) {
    result.explanation = absl::StrCat(what, ": would be refused: ", status.message());
    result.status = std::move(status);
    return result;
  };
  if (!node.known) {
    return deny(ErrnoStatus(
        ENOENT, absl::StrCat("node ", Quote(node.name.empty() ? request.node() : node.name),
                             " is not known (no agent by that name has connected)")));
  }
  const std::vector<const v1::Policy*> matching = MatchingPolicies(policies, node.labels);
  result.retry = MergeRetrySettings(matching);

  for (const v1::Policy* policy : matching) {
    if (absl::Status s = CheckLabels(*policy, request.labels()); !s.ok()) return deny(s);
  }
  const bool registers = request.kind() == v1::INTENT_KIND_REGISTER;
  if (registers && node.cordoned) {
    return deny(ErrnoStatus(
        EBUSY, absl::StrCat("node ", Quote(node.name),
                            " is cordoned: it takes no new registrations (uncordon it first)")));
  }

  // What the intent costs on this node.
  const RegionKey key{request.context(), request.ua(), request.size()};
  const bool new_region = registers && node.required_regions.count(key) == 0;
  const uint64_t bytes = new_region ? request.size() : 0;
  const uint64_t regions = new_region ? 1 : 0;
  uint64_t context_used = 0;
  if (auto it = node.context_bytes.find(request.context()); it != node.context_bytes.end()) {
    context_used = it->second;
  }

  if (new_region) {
    if (absl::Status s = CheckNodeCapacity(request.context(), bytes, node); !s.ok()) return deny(s);
    // With what the node requires already (pinned, or admitted to pin).
    for (const CapacityLimit& limit : CapacityLimits(request.context(), node)) {
      const uint64_t used = limit.per_context ? context_used : node.required_bytes;
      const uint64_t after = SaturatingAdd(used, bytes);
      if (limit.bytes != 0 && after > limit.bytes) {
        return deny(ErrnoStatus(
            ENOMEM, absl::StrCat("node ", Quote(node.name), ": ", limit.name, " ",
                                 FormatBytes(limit.bytes), ": ", FormatBytes(used), " required",
                                 limit.per_context ? " in the context" : "", " + ",
                                 FormatBytes(bytes), " requested = ", FormatBytes(after),
                                 ", over by ", FormatBytes(after - limit.bytes))));
      }
    }
  }

  std::vector<std::string> notes;
  if (!registers) {
    notes.push_back("consumes no budget");
  } else if (!new_region) {
    notes.push_back(
        "the region is already required on the node (another container): costs "
        "nothing more");
  } else {
    notes.push_back(absl::StrCat("a new region: ", FormatBytes(bytes), ", 1 region"));
  }
  for (const v1::Policy* policy : matching) {
    std::vector<std::string> uses;
    if (policy->pinned_bytes_budget() != 0 && registers) {
      const uint64_t budget = policy->pinned_bytes_budget();
      const uint64_t used = PoolRequiredBytes(*policy, node, fleet);
      const uint64_t after = SaturatingAdd(used, bytes);
      if (bytes != 0 && after > budget) {
        return deny(ErrnoStatus(
            ENOMEM, absl::StrCat(PolicyLabel(*policy), ": pool budget ", FormatBytes(budget), ": ",
                                 FormatBytes(used), " used + ", FormatBytes(bytes), " requested = ",
                                 FormatBytes(after), ", over by ", FormatBytes(after - budget))));
      }
      uses.push_back(absl::StrCat("pool budget ", FormatBytes(budget), ": ", FormatBytes(used),
                                  " used + ", FormatBytes(bytes), " = ", FormatBytes(after),
                                  Percent(after, budget)));
    }
    if (policy->max_regions_per_node() != 0 && registers) {
      const uint64_t max = policy->max_regions_per_node();
      const uint64_t after = SaturatingAdd(node.regions, regions);
      if (regions != 0 && after > max) {
        return deny(ErrnoStatus(
            ENOSPC, absl::StrCat(PolicyLabel(*policy), ": at most ", max,
                                 " regions per node: node ", Quote(node.name), " requires ",
                                 node.regions, " + ", regions, " requested")));
      }
      uses.push_back(absl::StrCat("regions on node ", Quote(node.name), ": ", node.regions, " + ",
                                  regions, " = ", after, " of ", max));
    }
    if (policy->context_quota_bytes() != 0 && registers) {
      const uint64_t quota = policy->context_quota_bytes();
      const uint64_t after = SaturatingAdd(context_used, bytes);
      if (bytes != 0 && after > quota) {
        return deny(ErrnoStatus(
            ENOMEM, absl::StrCat(PolicyLabel(*policy), ": context quota ", FormatBytes(quota),
                                 " for context ", Quote(request.context()), " on node ",
                                 Quote(node.name), ": ", FormatBytes(context_used), " used + ",
                                 FormatBytes(bytes), " requested = ", FormatBytes(after),
                                 ", over by ", FormatBytes(after - quota))));
      }
      uses.push_back(absl::StrCat("context ", Quote(request.context()), " quota ",
                                  FormatBytes(quota), ": ", FormatBytes(context_used), " + ",
                                  FormatBytes(bytes), " = ", FormatBytes(after),
                                  Percent(after, quota)));
    }
    if (uses.empty()) uses.push_back("no limits apply");
    notes.push_back(
        absl::StrCat("policy ", Quote(policy->name()), ": ", absl::StrJoin(uses, ", ")));
  }

  for (const v1::Policy* policy : matching) result.admitted_by.push_back(policy->name());
  if (matching.empty()) notes.push_back("no policy matches the node: no limits apply");
  result.explanation = absl::StrCat(
      what, ": would be admitted",
      matching.empty() ? "" : absl::StrCat(" by ", absl::StrJoin(result.admitted_by, ", ")), "; ",
      absl::StrJoin(notes, "; "));
  result.status = absl::OkStatus();
  return result;
}

BudgetUse TightestBudget(const NodeFacts& node, const FleetFacts& fleet,
                         absl::Span<const v1::Policy> policies) {
  std::vector<PoolUse> pools;
  for (const v1::Policy* policy : MatchingPolicies(policies, node.labels)) {
    if (policy->pinned_bytes_budget() != 0) {
      pools.push_back({policy, PoolRequiredBytes(*policy, node, fleet)});
    }
  }
  return TightestBudget(pools);
}

BudgetUse TightestBudget(absl::Span<const PoolUse> pools) {
  const PoolUse* best = nullptr;
  double best_ratio = 0;
  for (const PoolUse& pool : pools) {
    const uint64_t budget = pool.policy->pinned_bytes_budget();
    if (budget == 0) continue;
    const double ratio = static_cast<double>(pool.used_bytes) / static_cast<double>(budget);
    // Policies come in name order: on a full tie the first name stays.
    if (best == nullptr || ratio > best_ratio ||
        (ratio == best_ratio && budget < best->policy->pinned_bytes_budget())) {
      best = &pool;
      best_ratio = ratio;
    }
  }
  BudgetUse use;
  if (best == nullptr) return use;
  use.policy = best->policy->name();
  use.budget_bytes = best->policy->pinned_bytes_budget();
  use.used_bytes = best->used_bytes;
  use.used_ratio = best_ratio;
  return use;
}

std::string FormatBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return absl::StrCat(bytes, bytes == 1 ? " byte" : " bytes");
  int unit = 0;
  uint64_t scale = 1024;
  while (unit + 1 < 6 && bytes / scale >= 1024) {
    scale *= 1024;
    ++unit;
  }
  if (bytes % scale == 0) return absl::StrCat(bytes / scale, " ", kUnits[unit]);
  return absl::StrFormat("%.2f %s (%d bytes)",
                         static_cast<double>(bytes) / static_cast<double>(scale), kUnits[unit],
                         bytes);
}

// --- EBUSY retry --------------------------------------------------------------------------------

v1::EbusyRetry EffectiveRetry(const v1::EbusyRetry& settings) {
  v1::EbusyRetry effective;
  uint64_t initial =
      settings.initial_backoff_ms() != 0 ? settings.initial_backoff_ms() : kDefaultInitialBackoffMs;
  uint64_t max = settings.max_backoff_ms() != 0 ? settings.max_backoff_ms() : kDefaultMaxBackoffMs;
  initial = std::min(initial, kBackoffLimitMs);
  max = std::max(std::min(max, kBackoffLimitMs), initial);
  effective.set_initial_backoff_ms(initial);
  effective.set_max_backoff_ms(max);
  effective.set_jitter_percent(std::min<uint32_t>(
      settings.jitter_percent() != 0 ? settings.jitter_percent() : kDefaultJitterPercent, 100));
  return effective;
}

v1::EbusyRetry MergeRetrySettings(absl::Span<const v1::Policy* const> policies) {
  if (policies.empty()) return EffectiveRetry(v1::EbusyRetry());
  v1::EbusyRetry merged;
  for (const v1::Policy* policy : policies) {
    const v1::EbusyRetry e = EffectiveRetry(policy->ebusy_retry());
    merged.set_initial_backoff_ms(std::max(merged.initial_backoff_ms(), e.initial_backoff_ms()));
    merged.set_max_backoff_ms(std::max(merged.max_backoff_ms(), e.max_backoff_ms()));
    merged.set_jitter_percent(std::max(merged.jitter_percent(), e.jitter_percent()));
  }
  return merged;
}

v1::EbusyRetry MergeRetrySettings(absl::Span<const v1::Policy> policies) {
  std::vector<const v1::Policy*> pointers;
  for (const v1::Policy& policy : policies) pointers.push_back(&policy);
  return MergeRetrySettings(absl::MakeConstSpan(pointers));
}

absl::Duration EbusyBackoff(const v1::EbusyRetry& settings, uint32_t attempt, uint64_t random) {
  const v1::EbusyRetry e = EffectiveRetry(settings);
  uint64_t base_ms = e.initial_backoff_ms();
  for (uint32_t i = 1; i < attempt && base_ms < e.max_backoff_ms(); ++i) base_ms *= 2;
  base_ms = std::min(base_ms, e.max_backoff_ms());
  // In integer nanoseconds, exact at both ends: base - span + 2 * span * random / 2^64.
  const uint64_t base_ns = base_ms * 1000000;  // <= 1 day: no overflow
  const uint64_t span_ns = base_ns / 100 * e.jitter_percent();
  const uint64_t offset_ns = absl::Uint128High64(absl::uint128(2 * span_ns) * random);
  return absl::Nanoseconds(static_cast<int64_t>(base_ns - span_ns + offset_ns));
}

absl::Duration EbusyBackoff(const v1::EbusyRetry& settings, uint32_t attempt, absl::BitGenRef gen) {
  return EbusyBackoff(settings, attempt,
                      absl::Uniform<uint64_t>(absl::IntervalClosedClosed, gen, 0, ~uint64_t{0}));
}

}  // namespace dmapin::server
