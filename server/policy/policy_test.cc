#include "server/policy/policy.h"

#include <cerrno>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin::server {
namespace {

constexpr uint64_t kKiB = uint64_t{1} << 10;
constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;
constexpr uint64_t kPage = 4 * kKiB;
constexpr uint64_t kMax64 = std::numeric_limits<uint64_t>::max();

// --- Label syntax -------------------------------------------------------------------------------

TEST(LabelSyntaxTest, Keys) {
  struct Case {
    std::string key;
    std::string problem;  // substring; empty: valid
  };
  const Case cases[] = {
      {"tenant", ""},
      {"a", ""},
      {"Tenant_1.x-y", ""},
      {"example.com/tenant", ""},
      {"a-b.c0/x", ""},
      {std::string(63, 'k'), ""},
      {std::string(253, 'p') + "/k", ""},
      {"", "empty"},
      {std::string(64, 'k'), "more than 63"},
      {"te nant", "may contain only"},
      {"tenant!", "may contain only"},
      {"-tenant", "begin and end with an alphanumeric"},
      {"tenant.", "begin and end with an alphanumeric"},
      {"/tenant", "prefix before '/' is empty"},
      {"example.com/", "name after the prefix is empty"},
      {"a/b/c", "more than one '/'"},
      {"Example.com/tenant", "lowercase DNS subdomain"},
      {"example..com/tenant", "lowercase DNS subdomain"},
      {"-example.com/tenant", "lowercase DNS subdomain"},
      {"exa_mple.com/tenant", "lowercase DNS subdomain"},
      {std::string(254, 'p') + "/k", "more than 253"},
  };
  for (const Case& c : cases) {
    const std::string problem = LabelKeyProblem(c.key);
    if (c.problem.empty()) {
      EXPECT_EQ(problem, "") << c.key;
    } else {
      EXPECT_TRUE(absl::StrContains(problem, c.problem)) << c.key << ": " << problem;
    }
  }
}

TEST(LabelSyntaxTest, Values) {
  struct Case {
    std::string value;
    std::string problem;
  };
  const Case cases[] = {
      {"", ""},
      {"blue", ""},
      {"v1.2_3-x", ""},
      {"9", ""},
      {std::string(63, 'v'), ""},
      {std::string(64, 'v'), "more than 63"},
      {"a/b", "may contain only"},
      {"_x", "begin and end"},
      {"x-", "begin and end"},
      {"sp ace", "may contain only"},
  };
  for (const Case& c : cases) {
    const std::string problem = LabelValueProblem(c.value);
    if (c.problem.empty()) {
      EXPECT_EQ(problem, "") << c.value;
    } else {
      EXPECT_TRUE(absl::StrContains(problem, c.problem)) << c.value << ": " << problem;
    }
  }
}

// --- ValidatePolicy -----------------------------------------------------------------------------

v1::Policy GoodPolicy() {
  v1::Policy policy;
  policy.set_name("pool-a");
  (*policy.mutable_node_selector())["pool"] = "a";
  (*policy.mutable_node_selector())["example.com/zone"] = "";
  policy.set_pinned_bytes_budget(64 * kGiB);
  policy.set_max_regions_per_node(100);
  policy.set_context_quota_bytes(16 * kGiB);
  v1::LabelRequirement* allow = policy.add_allow();
  allow->set_key("tenant");
  allow->add_values("blue");
  allow->add_values("green");
  policy.add_allow()->set_key("team");
  v1::LabelRequirement* deny = policy.add_deny();
  deny->set_key("tenant");
  deny->add_values("red");
  policy.mutable_ebusy_retry()->set_initial_backoff_ms(10);
  policy.mutable_ebusy_retry()->set_max_backoff_ms(60000);
  policy.mutable_ebusy_retry()->set_jitter_percent(30);
  return policy;
}

TEST(ValidatePolicyTest, Table) {
  struct Case {
    std::string name;
    std::function<void(v1::Policy*)> change;
    std::string error;  // the whole message's prefix; empty: valid
  };
  const std::string kNameRule = "policy.name: must be 1-128 chars [A-Za-z0-9._-]";
  const Case cases[] = {
      {"good", [](v1::Policy*) {}, ""},
      {"minimal",
       [](v1::Policy* p) {
         *p = v1::Policy();
         p->set_name("p");
       },
       ""},
      {"name 128", [](v1::Policy* p) { p->set_name(std::string(128, 'n')); }, ""},
      {"name chars", [](v1::Policy* p) { p->set_name("A.b_c-9"); }, ""},
      {"name empty", [](v1::Policy* p) { p->clear_name(); }, kNameRule},
      {"name 129", [](v1::Policy* p) { p->set_name(std::string(129, 'n')); }, kNameRule},
      {"name space", [](v1::Policy* p) { p->set_name("pool a"); }, kNameRule},
      {"name slash", [](v1::Policy* p) { p->set_name("pool/a"); }, kNameRule},
      {"selector labels at the limit",
       [](v1::Policy* p) {
         p->clear_node_selector();
         for (int i = 0; i < kMaxSelectorLabels; ++i) {
           (*p->mutable_node_selector())[absl::StrCat("k", i)] = "v";
         }
       },
       ""},
      {"selector labels over the limit",
       [](v1::Policy* p) {
         p->clear_node_selector();
         for (int i = 0; i <= kMaxSelectorLabels; ++i) {
           (*p->mutable_node_selector())[absl::StrCat("k", i)] = "v";
         }
       },
       "policy.node_selector: 33 labels; at most 32"},
      {"deny rules over the limit",
       [](v1::Policy* p) {
         p->clear_deny();
         for (int i = 0; i <= kMaxRules; ++i) p->add_deny()->set_key("tenant");
       },
       "policy.deny: 65 rules; at most 64"},
      {"rule values over the limit",
       [](v1::Policy* p) {
         p->clear_allow();
         v1::LabelRequirement* rule = p->add_allow();
         rule->set_key("tenant");
         for (int i = 0; i <= kMaxRuleValues; ++i) rule->add_values(absl::StrCat("t", i));
       },
       "policy.allow[0].values: 257 values; at most 256"},
      {"selector key", [](v1::Policy* p) { (*p->mutable_node_selector())["bad key"] = "x"; },
       "policy.node_selector[\"bad key\"]: key: name may contain only"},
      {"selector empty key", [](v1::Policy* p) { (*p->mutable_node_selector())[""] = "x"; },
       "policy.node_selector[\"\"]: key: empty"},
      {"selector value", [](v1::Policy* p) { (*p->mutable_node_selector())["pool"] = "a!"; },
       "policy.node_selector[\"pool\"]: value may contain only"},
      {"allow key empty", [](v1::Policy* p) { p->mutable_allow(1)->clear_key(); },
       "policy.allow[1].key: empty"},
      {"allow key syntax", [](v1::Policy* p) { p->mutable_allow(0)->set_key("Ex.com/t"); },
       "policy.allow[0].key: prefix \"Ex.com\" must be a lowercase DNS subdomain"},
      {"allow value", [](v1::Policy* p) { p->mutable_allow(0)->set_values(1, "gr een"); },
       "policy.allow[0].values[1]: value may contain only"},
      {"allow empty value ok", [](v1::Policy* p) { p->mutable_allow(0)->add_values(""); }, ""},
      {"deny key empty", [](v1::Policy* p) { p->add_deny(); }, "policy.deny[1].key: empty"},
      {"deny value", [](v1::Policy* p) { p->mutable_deny(0)->add_values("-red"); },
       "policy.deny[0].values[1]: value must begin and end"},
      {"max < initial",
       [](v1::Policy* p) {
         p->mutable_ebusy_retry()->set_initial_backoff_ms(100);
         p->mutable_ebusy_retry()->set_max_backoff_ms(50);
       },
       "policy.ebusy_retry.max_backoff_ms: must be >= initial_backoff_ms"},
      {"max = initial",
       [](v1::Policy* p) {
         p->mutable_ebusy_retry()->set_initial_backoff_ms(100);
         p->mutable_ebusy_retry()->set_max_backoff_ms(100);
       },
       ""},
      {"default max < initial",
       [](v1::Policy* p) {
         p->mutable_ebusy_retry()->set_initial_backoff_ms(400000);
         p->mutable_ebusy_retry()->clear_max_backoff_ms();
       },
       "policy.ebusy_retry.max_backoff_ms: must be >= initial_backoff_ms (300000 < 400000"},
      {"max < default initial",
       [](v1::Policy* p) {
         p->mutable_ebusy_retry()->clear_initial_backoff_ms();
         p->mutable_ebusy_retry()->set_max_backoff_ms(3);
       },
       "policy.ebusy_retry.max_backoff_ms: must be >= initial_backoff_ms (3 < 5"},
      {"initial over a day",
       [](v1::Policy* p) { p->mutable_ebusy_retry()->set_initial_backoff_ms(kBackoffLimitMs + 1); },
       "policy.ebusy_retry.initial_backoff_ms: must be <= 86400000"},
      {"max over a day",
       [](v1::Policy* p) { p->mutable_ebusy_retry()->set_max_backoff_ms(kMax64); },
       "policy.ebusy_retry.max_backoff_ms: must be <= 86400000"},
      {"max a day",
       [](v1::Policy* p) { p->mutable_ebusy_retry()->set_max_backoff_ms(kBackoffLimitMs); }, ""},
      {"jitter 100", [](v1::Policy* p) { p->mutable_ebusy_retry()->set_jitter_percent(100); }, ""},
      {"jitter 101", [](v1::Policy* p) { p->mutable_ebusy_retry()->set_jitter_percent(101); },
       "policy.ebusy_retry.jitter_percent: must be <= 100 (got 101)"},
      {"budget -1", [](v1::Policy* p) { p->set_pinned_bytes_budget(kMax64); },
       "policy.pinned_bytes_budget: 18446744073709551615 is beyond 2^63-1: a negative number (-1 "
       "as a 64-bit integer)?"},
      {"budget 2^63-1", [](v1::Policy* p) { p->set_pinned_bytes_budget(kMaxPolicyLimit); }, ""},
      {"regions -5", [](v1::Policy* p) { p->set_max_regions_per_node(kMax64 - 4); },
       "policy.max_regions_per_node: 18446744073709551611 is beyond 2^63-1: a negative number "
       "(-5 "},
      {"quota 2^63", [](v1::Policy* p) { p->set_context_quota_bytes(kMaxPolicyLimit + 1); },
       "policy.context_quota_bytes: 9223372036854775808 is beyond 2^63-1"},
      {"server fields ignored",
       [](v1::Policy* p) {
         p->set_revision(7);
         p->set_update_time("whenever");
       },
       ""},
  };
  for (const Case& c : cases) {
    v1::Policy policy = GoodPolicy();
    c.change(&policy);
    const absl::Status status = ValidatePolicy(policy);
    if (c.error.empty()) {
      EXPECT_TRUE(status.ok()) << c.name << ": " << status;
    } else {
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.name << ": " << status;
      EXPECT_EQ(ErrnoOf(status), EINVAL) << c.name << ": " << status;
      EXPECT_TRUE(absl::StartsWith(status.message(), "EINVAL: " + c.error))
          << c.name << ": " << status;
    }
  }
}

// --- ValidateIntentRequest ----------------------------------------------------------------------

v1::CreateIntentRequest Request(v1::IntentKind kind, const std::string& node,
                                const std::string& context, const std::string& container,
                                uint64_t ua, uint64_t size) {
  v1::CreateIntentRequest request;
  request.set_kind(kind);
  request.set_node(node);
  request.set_context(context);
  request.set_container(container);
  request.set_ua(ua);
  request.set_size(size);
  return request;
}

v1::CreateIntentRequest Register(uint64_t size, const std::string& context = "vm",
                                 uint64_t ua = 0x100000, const std::string& node = "n1") {
  v1::CreateIntentRequest request =
      Request(v1::INTENT_KIND_REGISTER, node, context, "c1", ua, size);
  (*request.mutable_labels())["tenant"] = "blue";
  return request;
}

TEST(ValidateIntentRequestTest, Table) {
  using R = v1::CreateIntentRequest;
  constexpr auto kReg = v1::INTENT_KIND_REGISTER;
  constexpr auto kUnreg = v1::INTENT_KIND_UNREGISTER;
  constexpr auto kRelease = v1::INTENT_KIND_RELEASE_CONTAINER;
  constexpr auto kTeardown = v1::INTENT_KIND_TEARDOWN_CONTEXT;
  const uint64_t kTop = kMax64 - kPage + 1;  // the last page of the address space
  auto with_label = [](R r, const std::string& key, const std::string& value) {
    (*r.mutable_labels())[key] = value;
    return r;
  };
  struct Case {
    std::string name;
    R request;
    uint64_t page_size;
    std::string error;  // message prefix; empty: valid
  };
  const Case cases[] = {
      {"register", Request(kReg, "n1", "vm", "c1", 0x10000, 0x20000), kPage, ""},
      {"register, page size unknown", Request(kReg, "n1", "vm", "c1", 0x10001, 3), 0, ""},
      {"register 64 KiB pages", Request(kReg, "n1", "vm", "c1", 0x10000, 0x10000), 0x10000, ""},
      {"register to the top", Request(kReg, "n1", "vm", "c1", kTop, kPage), kPage, ""},
      {"unregister", Request(kUnreg, "n1", "vm", "c1", 0x10000, 0x1000), kPage, ""},
      {"release", Request(kRelease, "n1", "", "c1", 0, 0), kPage, ""},
      {"release naming its context", Request(kRelease, "n1", "vm", "c1", 0, 0), kPage, ""},
      {"teardown", Request(kTeardown, "n1", "vm", "", 0, 0), kPage, ""},
      {"labels", with_label(Request(kReg, "n1", "vm", "c1", 0, kPage), "example.com/t", "b"), kPage,
       ""},
      {"kind unspecified", Request(v1::INTENT_KIND_UNSPECIFIED, "n1", "vm", "c1", 0, kPage), kPage,
       "EINVAL: intent.kind: must be REGISTER, UNREGISTER"},
      {"kind unknown", Request(static_cast<v1::IntentKind>(42), "n1", "vm", "c1", 0, kPage), kPage,
       "EINVAL: intent.kind: must be"},
      {"node empty", Request(kReg, "", "vm", "c1", 0, kPage), kPage,
       "EINVAL: intent.node: empty (REGISTER needs it)"},
      {"node empty teardown", Request(kTeardown, "", "vm", "", 0, 0), kPage,
       "EINVAL: intent.node: empty"},
      {"node control char", Request(kReg, "n\n1", "vm", "c1", 0, kPage), kPage,
       "EINVAL: intent.node: \"n\\n1\" contains a control character"},
      {"node too long", Request(kReg, std::string(257, 'n'), "vm", "c1", 0, kPage), kPage,
       "EINVAL: intent.node: is 257 bytes, more than 256"},
      {"context empty", Request(kReg, "n1", "", "c1", 0, kPage), kPage,
       "EINVAL: intent.context: empty (REGISTER needs it)"},
      {"container empty", Request(kReg, "n1", "vm", "", 0, kPage), kPage,
       "EINVAL: intent.container: empty (REGISTER needs it)"},
      {"unregister context empty", Request(kUnreg, "n1", "", "c1", 0, kPage), kPage,
       "EINVAL: intent.context: empty (UNREGISTER needs it)"},
      {"size 0", Request(kReg, "n1", "vm", "c1", 0, 0), kPage, "EINVAL: intent.size: must be > 0"},
      {"size 0 unknown page", Request(kUnreg, "n1", "vm", "c1", 0, 0), 0,
       "EINVAL: intent.size: must be > 0"},
      {"ua unaligned", Request(kReg, "n1", "vm", "c1", 0x10800, kPage), kPage,
       "EINVAL: intent.ua: 0x10800 is not a multiple of the node's page size 0x1000"},
      {"size unaligned", Request(kReg, "n1", "vm", "c1", 0x10000, 0x1800), kPage,
       "EINVAL: intent.size: 0x1800 is not a multiple of the node's page size 0x1000"},
      {"size unaligned 64K", Request(kReg, "n1", "vm", "c1", 0x10000, kPage), 0x10000,
       "EINVAL: intent.size: 0x1000 is not a multiple"},
      {"wraps", Request(kReg, "n1", "vm", "c1", kTop, 2 * kPage), kPage,
       "EINVAL: intent.size: ua=0xfffffffffffff000 size=0x2000 wraps past 2^64"},
      {"wraps, page unknown", Request(kReg, "n1", "vm", "c1", kMax64, 2), 0,
       "EINVAL: intent.size: ua=0xffffffffffffffff size=0x2 wraps"},
      {"release without container", Request(kRelease, "n1", "vm", "", 0, 0), kPage,
       "EINVAL: intent.container: empty (RELEASE_CONTAINER needs it)"},
      {"release with ua", Request(kRelease, "n1", "", "c1", 0x1000, 0), kPage,
       "EINVAL: intent.ua: must be 0 for RELEASE_CONTAINER"},
      {"release with size", Request(kRelease, "n1", "", "c1", 0, 0x1000), kPage,
       "EINVAL: intent.size: must be 0 for RELEASE_CONTAINER"},
      {"teardown without context", Request(kTeardown, "n1", "", "", 0, 0), kPage,
       "EINVAL: intent.context: empty (TEARDOWN_CONTEXT needs it)"},
      {"teardown with container", Request(kTeardown, "n1", "vm", "c1", 0, 0), kPage,
       "EINVAL: intent.container: must be empty for TEARDOWN_CONTEXT"},
      {"teardown with size", Request(kTeardown, "n1", "vm", "", 0, kPage), kPage,
       "EINVAL: intent.size: must be 0 for TEARDOWN_CONTEXT"},
      {"label key", with_label(Request(kReg, "n1", "vm", "c1", 0, kPage), "Bad Key", "x"), kPage,
       "EINVAL: intent.labels[\"Bad Key\"]: key: name may contain only"},
      {"label value", with_label(Request(kReg, "n1", "vm", "c1", 0, kPage), "tenant", "blue!"),
       kPage, "EINVAL: intent.labels[\"tenant\"]: value may contain only"},
      {"label on release", with_label(Request(kRelease, "n1", "", "c1", 0, 0), "", "x"), kPage,
       "EINVAL: intent.labels[\"\"]: key: empty"},
  };
  for (const Case& c : cases) {
    const absl::Status status = ValidateIntentRequest(c.request, c.page_size);
    if (c.error.empty()) {
      EXPECT_TRUE(status.ok()) << c.name << ": " << status;
    } else {
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.name << ": " << status;
      EXPECT_EQ(ErrnoOf(status), EINVAL) << c.name;
      EXPECT_TRUE(absl::StartsWith(status.message(), c.error)) << c.name << ": " << status;
    }
  }
}

// --- Admission ----------------------------------------------------------------------------------

NodeFacts Node(const std::string& name, const std::string& pool) {
  NodeFacts node;
  node.name = name;
  node.labels = {{"pool", pool}, {"zone", "z1"}};
  node.known = true;
  return node;
}

v1::Policy PoolPolicy(const std::string& name, const std::string& pool, uint64_t budget) {
  v1::Policy policy;
  policy.set_name(name);
  if (!pool.empty()) (*policy.mutable_node_selector())["pool"] = pool;
  policy.set_pinned_bytes_budget(budget);
  return policy;
}

// Pool a: n1 (40 GiB required in 2 regions of context "vm" and 1 of "db"), n2 (20 GiB). Pool b:
// n3 (100 GiB).
struct Fleet {
  Fleet() {
    n1.AddRequiredRegion("vm", 0x100000000, 16 * kGiB);
    n1.AddRequiredRegion("vm", 0x800000000, 8 * kGiB);
    n1.AddRequiredRegion("db", 0x100000000, 16 * kGiB);
    n2.AddRequiredRegion("vm", 0, 20 * kGiB);
    n3.AddRequiredRegion("vm", 0, 100 * kGiB);
    fleet.nodes = {n1, n2, n3};
  }
  NodeFacts n1 = Node("n1", "a");
  NodeFacts n2 = Node("n2", "a");
  NodeFacts n3 = Node("n3", "b");
  FleetFacts fleet;
};

TEST(NodeFactsTest, AddRequiredRegionCountsEachRegionOnce) {
  NodeFacts node = Node("n", "a");
  EXPECT_TRUE(node.AddRequiredRegion("vm", 0, kGiB));
  EXPECT_FALSE(node.AddRequiredRegion("vm", 0, kGiB));  // a second container: nothing more
  EXPECT_TRUE(node.AddRequiredRegion("vm", 0, 2 * kGiB));
  EXPECT_TRUE(node.AddRequiredRegion("db", 0, kGiB));
  EXPECT_EQ(node.required_bytes, 4 * kGiB);
  EXPECT_EQ(node.regions, 3u);
  EXPECT_EQ(node.context_bytes, (std::map<std::string, uint64_t>{{"db", kGiB}, {"vm", 3 * kGiB}}));
}

TEST(AdmissionTest, PoolRequiredBytes) {
  Fleet f;
  EXPECT_EQ(f.n1.required_bytes, 40 * kGiB);
  EXPECT_EQ(PoolRequiredBytes(PoolPolicy("a", "a", 0), f.n1, f.fleet), 60 * kGiB);
  EXPECT_EQ(PoolRequiredBytes(PoolPolicy("all", "", 0), f.n1, f.fleet), 160 * kGiB);
  EXPECT_EQ(PoolRequiredBytes(PoolPolicy("b", "b", 0), f.n3, f.fleet), 100 * kGiB);
  // The node argument stands in for the fleet's (stale) entry, and counts when missing.
  NodeFacts fresh = f.n1;
  fresh.AddRequiredRegion("vm", 0, 4 * kGiB);
  EXPECT_EQ(PoolRequiredBytes(PoolPolicy("a", "a", 0), fresh, f.fleet), 64 * kGiB);
  FleetFacts without_n1{{f.n2, f.n3}};
  EXPECT_EQ(PoolRequiredBytes(PoolPolicy("a", "a", 0), f.n1, without_n1), 60 * kGiB);
  // Saturates.
  NodeFacts huge = Node("huge", "a");
  huge.required_bytes = kMax64 - 1;
  EXPECT_EQ(PoolRequiredBytes(PoolPolicy("a", "a", 0), huge, f.fleet), kMax64);
  // Running totals, where given, are the figure (no sum over the nodes).
  FleetFacts totals;
  totals.pool_required_bytes["a"] = 7 * kGiB;
  EXPECT_EQ(PoolRequiredBytes(PoolPolicy("a", "a", 0), f.n1, totals), 7 * kGiB);
  EXPECT_EQ(PoolRequiredBytes(PoolPolicy("b", "a", 0), f.n1, totals), 40 * kGiB)
      << "a policy without a total sums the nodes given (here only n1 itself)";
  EXPECT_EQ(Admit(Register(2 * kGiB, "vm", 0x1000000000, "n1"), f.n1, totals,
                  {PoolPolicy("a", "a", 8 * kGiB)})
                .status.code(),
            absl::StatusCode::kResourceExhausted)
      << "7 GiB required by the pool + 2 GiB > 8 GiB";
}

TEST(AdmissionTest, Table) {
  using R = v1::CreateIntentRequest;
  v1::Policy tenants = PoolPolicy("tenants", "", 0);  // every node
  {
    v1::LabelRequirement* allow = tenants.add_allow();
    allow->set_key("tenant");
    allow->add_values("blue");
    allow->add_values("green");
    v1::LabelRequirement* deny = tenants.add_deny();
    deny->set_key("tenant");
    deny->add_values("green");
    tenants.add_deny()->set_key("quarantine");
  }
  v1::Policy pool_a = PoolPolicy("pool-a", "a", 64 * kGiB);
  v1::Policy regions = PoolPolicy("regions", "a", 0);
  regions.set_max_regions_per_node(4);
  v1::Policy quota = PoolPolicy("quota", "a", 0);
  quota.set_context_quota_bytes(24 * kGiB);
  v1::Policy zone = PoolPolicy("zone-z1", "", 200 * kGiB);
  (*zone.mutable_node_selector())["zone"] = "z1";
  v1::Policy other_pool = PoolPolicy("pool-b", "b", 1);

  auto labeled = [](R r, const std::string& key, const std::string& value) {
    (*r.mutable_labels())[key] = value;
    return r;
  };
  auto unlabeled = [](R r) {
    r.clear_labels();
    return r;
  };
  const R unregister = [] {
    R r = Request(v1::INTENT_KIND_UNREGISTER, "n1", "vm", "c1", 0x100000000, 16 * kGiB);
    (*r.mutable_labels())["tenant"] = "blue";
    return r;
  }();
  const R teardown = [] {
    R r = Request(v1::INTENT_KIND_TEARDOWN_CONTEXT, "n1", "vm", "", 0, 0);
    (*r.mutable_labels())["tenant"] = "blue";
    return r;
  }();

  struct Case {
    std::string name;
    R request;
    std::function<void(NodeFacts*)> node_change;
    std::vector<v1::Policy> policies;
    absl::StatusCode code;
    std::vector<std::string> message;      // substrings of the status message
    std::vector<std::string> admitted_by;  // when OK
    std::vector<std::string> explanation;  // substrings
  };
  auto none = [](NodeFacts*) {};
  const absl::StatusCode kOk = absl::StatusCode::kOk;
  const Case cases[] = {
      {"unknown node",
       Register(kGiB),
       [](NodeFacts* n) { n->known = false; },
       {pool_a},
       absl::StatusCode::kNotFound,
       {"node \"n1\" is not known"},
       {},
       {"would be refused"}},
      {"no policies",
       Register(kGiB),
       none,
       {},
       kOk,
       {},
       {},
       {"would be admitted; a new region: 1 GiB, 1 region; no policy matches the node"}},
      {"only another pool's policy",
       Register(kGiB),
       none,
       {other_pool},
       kOk,
       {},
       {},
       {"no policy matches the node"}},
      {"within budget",
       Register(4 * kGiB),
       none,
       {pool_a, other_pool},
       kOk,
       {},
       {"pool-a"},
       {"would be admitted by pool-a",
        "policy \"pool-a\": pool budget 64 GiB: 60 GiB used + 4 GiB = 64 GiB (100.0%)"}},
      {"over budget",
       Register(8 * kGiB),
       none,
       {pool_a},
       absl::StatusCode::kResourceExhausted,
       {"policy \"pool-a\" (nodes pool=a): pool budget 64 GiB: 60 GiB used + 8 GiB requested = "
        "68 GiB, over by 4 GiB"},
       {},
       {"would be refused"}},
      {"over budget by a byte",
       Register(4 * kGiB + kPage),
       none,
       {pool_a},
       absl::StatusCode::kResourceExhausted,
       {"60 GiB used + 4.00 GiB (4294971392 bytes) requested", "over by 4 KiB"},
       {},
       {}},
      {"region already required costs nothing",
       Register(16 * kGiB, "vm", 0x100000000),
       none,
       {pool_a, regions, quota},
       kOk,
       {},
       {"pool-a", "quota", "regions"},
       {"already required", "60 GiB used + 0 bytes = 60 GiB",
        "regions on node \"n1\": 3 + 0 = 3 of 4"}},
      {"already required, pool over budget",
       Register(16 * kGiB, "vm", 0x100000000),
       none,
       {PoolPolicy("tiny", "a", kGiB)},
       kOk,
       {},
       {"tiny"},
       {}},
      {"same range, other context is a new region",
       Register(16 * kGiB, "db2", 0x100000000),
       none,
       {pool_a},
       absl::StatusCode::kResourceExhausted,
       {"+ 16 GiB requested"},
       {},
       {}},
      {"max regions",
       Register(kGiB),
       [](NodeFacts* n) { n->AddRequiredRegion("x", 0, kPage); },
       {regions},
       absl::StatusCode::kResourceExhausted,
       {"policy \"regions\" (nodes pool=a): at most 4 regions per node: node \"n1\" requires 4 "
        "+ 1 requested"},
       {},
       {}},
      {"regions within",
       Register(kGiB),
       none,
       {regions},
       kOk,
       {},
       {"regions"},
       {"regions on node \"n1\": 3 + 1 = 4 of 4"}},
      {"context quota",
       Register(8 * kGiB, "vm", 0x1000000000),
       none,
       {quota},
       absl::StatusCode::kResourceExhausted,
       {"policy \"quota\" (nodes pool=a): context quota 24 GiB for context \"vm\" on node "
        "\"n1\": 24 GiB used + 8 GiB requested = 32 GiB, over by 8 GiB"},
       {},
       {}},
      {"context quota, other context",
       Register(8 * kGiB, "db", 0x1000000000),
       none,
       {quota},
       kOk,
       {},
       {"quota"},
       {"context \"db\" quota 24 GiB: 16 GiB + 8 GiB = 24 GiB (100.0%)"}},
      {"context quota, new context",
       Register(24 * kGiB, "fresh", 0),
       none,
       {quota},
       kOk,
       {},
       {"quota"},
       {"context \"fresh\" quota 24 GiB: 0 bytes + 24 GiB = 24 GiB"}},
      {"second policy's budget",
       Register(2 * kGiB),
       [](NodeFacts*) {},
       {pool_a, PoolPolicy("zone-z1", "", 161 * kGiB)},
       absl::StatusCode::kResourceExhausted,
       {"policy \"zone-z1\" (every node): pool budget 161 GiB: 160 GiB used + 2 GiB requested"},
       {},
       {}},
      {"selector on two labels",
       Register(2 * kGiB),
       none,
       {zone, pool_a},
       kOk,
       {},
       {"pool-a", "zone-z1"},
       {"would be admitted by pool-a, zone-z1",
        "policy \"zone-z1\": pool budget 200 GiB: 160 GiB"}},
      {"allowed",
       Register(kGiB),
       none,
       {tenants},
       kOk,
       {},
       {"tenants"},
       {"policy \"tenants\": no limits apply"}},
      {"not allowed: no label",
       unlabeled(Register(kGiB)),
       none,
       {tenants},
       absl::StatusCode::kPermissionDenied,
       {"policy \"tenants\" (every node) does not allow the intent: allow[0] requires tenant in "
        "[blue, green]; the intent has no label tenant"},
       {},
       {}},
      {"not allowed: other value",
       labeled(Register(kGiB), "tenant", "red"),
       none,
       {tenants},
       absl::StatusCode::kPermissionDenied,
       {"allow[0] requires", "the intent has tenant=red"},
       {},
       {}},
      {"denied by value",
       labeled(Register(kGiB), "tenant", "green"),
       none,
       {tenants},
       absl::StatusCode::kPermissionDenied,
       {"policy \"tenants\" (every node) denies the intent: deny[0] (tenant in [green]) "
        "matches; the intent has tenant=green"},
       {},
       {}},
      {"denied by presence",
       labeled(Register(kGiB), "quarantine", ""),
       none,
       {tenants},
       absl::StatusCode::kPermissionDenied,
       {"deny[1] (quarantine present) matches"},
       {},
       {}},
      {"permission before budget",
       labeled(Register(100 * kGiB), "tenant", "red"),
       none,
       {pool_a, tenants},
       absl::StatusCode::kPermissionDenied,
       {"tenants"},
       {},
       {}},
      {"unregister is checked against labels",
       labeled(unregister, "tenant", "red"),
       none,
       {tenants},
       absl::StatusCode::kPermissionDenied,
       {"allow[0]"},
       {},
       {}},
      {"unregister consumes nothing",
       unregister,
       none,
       {PoolPolicy("tiny", "a", 1), regions, quota},
       kOk,
       {},
       {"quota", "regions", "tiny"},
       {"consumes no budget"}},
      {"teardown on a cordoned node",
       teardown,
       [](NodeFacts* n) { n->cordoned = true; },
       {pool_a},
       kOk,
       {},
       {"pool-a"},
       {"TEARDOWN_CONTEXT of \"vm\" on node \"n1\""}},
      {"register on a cordoned node",
       Register(kGiB),
       [](NodeFacts* n) { n->cordoned = true; },
       {pool_a},
       absl::StatusCode::kFailedPrecondition,
       {"node \"n1\" is cordoned: it takes no new registrations"},
       {},
       {}},
      {"cordoned node checks permission first",
       labeled(Register(kGiB), "tenant", "red"),
       [](NodeFacts* n) { n->cordoned = true; },
       {tenants},
       absl::StatusCode::kPermissionDenied,
       {},
       {},
       {}},
  };
  Fleet f;
  for (const Case& c : cases) {
    NodeFacts node = f.n1;
    c.node_change(&node);
    const AdmissionResult result = Admit(c.request, node, f.fleet, c.policies);
    EXPECT_EQ(result.status.code(), c.code) << c.name << ": " << result.status;
    for (const std::string& part : c.message) {
      EXPECT_TRUE(absl::StrContains(result.status.message(), part))
          << c.name << ": " << result.status << "\n  missing: " << part;
    }
    EXPECT_EQ(result.admitted_by, c.admitted_by) << c.name;
    for (const std::string& part : c.explanation) {
      EXPECT_TRUE(absl::StrContains(result.explanation, part))
          << c.name << ": " << result.explanation << "\n  missing: " << part;
    }
    if (!result.status.ok()) {
      EXPECT_TRUE(absl::StrContains(result.explanation, result.status.message())) << c.name;
      // Every refusal names its errno (README "Errors").
      EXPECT_TRUE(result.status.GetPayload(kErrnoPayloadUrl).has_value()) << c.name;
      EXPECT_TRUE(
          absl::StartsWith(result.status.message(), ErrnoName(ErrnoOf(result.status)) + ": "))
          << c.name << ": " << result.status;
    }
  }
}

TEST(AdmissionTest, PrintsExplanations) {
  Fleet f;
  v1::Policy pool_a = PoolPolicy("pool-a", "a", 64 * kGiB);
  pool_a.set_max_regions_per_node(10);
  pool_a.set_context_quota_bytes(32 * kGiB);
  for (uint64_t size : {4 * kGiB, 8 * kGiB}) {
    const AdmissionResult result = Admit(Register(size), f.n1, f.fleet, {pool_a});
    std::printf("%s\n  %s\n", result.status.ToString().c_str(), result.explanation.c_str());
  }
}

TEST(AdmissionTest, FillingAPoolOneIntentAtATime) {
  // Two nodes share a 10 GiB pool; intents of 1 GiB each, alternating nodes, each admitted one
  // recorded with AddRequiredRegion as the server would.
  v1::Policy pool = PoolPolicy("pool", "a", 10 * kGiB);
  FleetFacts fleet{{Node("x", "a"), Node("y", "a")}};
  int admitted = 0;
  for (int i = 0; i < 14; ++i) {
    NodeFacts& node = fleet.nodes[i % 2];
    v1::CreateIntentRequest request = Register(kGiB, "vm", uint64_t(i) * kGiB, node.name);
    AdmissionResult result = Admit(request, node, fleet, {pool});
    if (result.status.ok()) {
      ++admitted;
      node.AddRequiredRegion("vm", request.ua(), request.size());
      // A second container registering the same region is free, even at the limit.
      request.set_container("c2");
      EXPECT_TRUE(Admit(request, node, fleet, {pool}).status.ok());
    } else {
      EXPECT_EQ(result.status.code(), absl::StatusCode::kResourceExhausted);
    }
  }
  EXPECT_EQ(admitted, 10);
  const BudgetUse use = TightestBudget(fleet.nodes[0], fleet, {pool});
  EXPECT_EQ(use.policy, "pool");
  EXPECT_EQ(use.used_bytes, 10 * kGiB);
  EXPECT_DOUBLE_EQ(use.used_ratio, 1.0);
}

// Even with no policy, a registration larger than the node can ever hold is refused with ENOMEM
// naming the limit, and so is one that, with what the node requires already, exceeds it.
TEST(AdmissionTest, NodeCapacityRefusesWhatTheNodeCannotHold) {
  constexpr uint64_t kPage = 64 * 1024;
  NodeFacts node = Node("n1", "a");
  node.page_size = kPage;
  node.physical_memory_bytes = 64 * kGiB;
  node.max_region_bytes = 16 * kGiB;
  node.max_pinned_bytes = 32 * kGiB;
  // 1 GiB minus half a page: the registry counts whole pages, so 1 GiB - 1 page fits.
  node.context_memlock_limit_bytes["small"] = kGiB - kPage / 2;
  struct Case {
    uint64_t size;
    std::string context;
    std::string message;  // empty: admitted
  } cases[] = {
      {16 * kGiB, "vm", ""},
      {16 * kGiB + kPage, "vm",
       "ENOMEM: node \"n1\" can never hold this region: 16.00 GiB (17179934720 bytes) > the "
       "agent's --max_region_bytes (16 GiB)"},
      {kGiB - kPage, "small", ""},
      {kGiB, "small",
       "ENOMEM: node \"n1\" can never hold this region: 1 GiB > the memlock limit of context "
       "\"small\" (1023.94 MiB (1073676288 bytes))"},
  };
  for (const Case& c : cases) {
    const AdmissionResult result = Admit(Register(c.size, c.context), node, FleetFacts(), {});
    if (c.message.empty()) {
      EXPECT_TRUE(result.status.ok()) << c.size << ": " << result.status;
    } else {
      EXPECT_EQ(result.status.code(), absl::StatusCode::kResourceExhausted) << c.size;
      EXPECT_EQ(ErrnoOf(result.status), ENOMEM);
      EXPECT_EQ(result.status.message(), c.message);
      EXPECT_TRUE(absl::StrContains(result.explanation, "would be refused")) << "dry_run says so";
    }
  }
  // With what the node requires already.
  node.AddRequiredRegion("vm", 0, 16 * kGiB);
  node.AddRequiredRegion("vm", 16 * kGiB, 12 * kGiB);
  AdmissionResult result = Admit(Register(8 * kGiB, "vm", 32 * kGiB), node, FleetFacts(), {});
  EXPECT_EQ(result.status.message(),
            "ENOMEM: node \"n1\": the agent's --max_pinned_bytes 32 GiB: 28 GiB required + 8 GiB "
            "requested = 36 GiB, over by 4 GiB");
  EXPECT_TRUE(Admit(Register(4 * kGiB, "vm", 32 * kGiB), node, FleetFacts(), {}).status.ok());
  // The same region again (another container) costs nothing, so it is admitted.
  v1::CreateIntentRequest again = Register(16 * kGiB, "vm", 0);
  again.set_container("c2");
  EXPECT_TRUE(Admit(again, node, FleetFacts(), {}).status.ok());
  // The physical memory, and a context's memlock limit, count what is required there.
  node.max_pinned_bytes = 0;
  node.max_region_bytes = 0;
  result = Admit(Register(40 * kGiB, "vm", 32 * kGiB), node, FleetFacts(), {});
  EXPECT_TRUE(absl::StrContains(result.status.message(),
                                "the node's physical memory 64 GiB: 28 GiB required + 40 GiB"))
      << result.status;
  EXPECT_EQ(Admit(Register(40 * kGiB, "db", 0), node, FleetFacts(), {}).status.code(),
            absl::StatusCode::kResourceExhausted)
      << "the node's memory is shared by its contexts";
  node.AddRequiredRegion("small", 0, kGiB / 2);
  result = Admit(Register(kGiB / 2, "small", kGiB), node, FleetFacts(), {});
  EXPECT_TRUE(absl::StrContains(result.status.message(),
                                "the memlock limit of context \"small\" 1023.94 MiB"))
      << result.status;
  // Unregisters consume nothing.
  EXPECT_TRUE(Admit(Request(v1::INTENT_KIND_UNREGISTER, "n1", "vm", "c1", 0, 64 * kGiB), node,
                    FleetFacts(), {})
                  .status.ok());
  // Unknown limits (0) limit nothing.
  EXPECT_TRUE(Admit(Register(1024 * kGiB), Node("n1", "a"), FleetFacts(), {}).status.ok());
}

TEST(AdmissionTest, TightestBudget) {
  Fleet f;
  // pool-a: 60 of 64 GiB (93.75%); all: 160 of 1024 GiB; zone: 160 of 160 GiB; no budget: none.
  const std::vector<v1::Policy> policies = {
      PoolPolicy("pool-a", "a", 64 * kGiB), PoolPolicy("all", "", 1024 * kGiB),
      PoolPolicy("unlimited", "a", 0), PoolPolicy("pool-b", "b", kGiB)};
  BudgetUse use = TightestBudget(f.n1, f.fleet, policies);
  EXPECT_EQ(use.policy, "pool-a");
  EXPECT_EQ(use.budget_bytes, 64 * kGiB);
  EXPECT_EQ(use.used_bytes, 60 * kGiB);
  EXPECT_DOUBLE_EQ(use.used_ratio, 60.0 / 64.0);
  use = TightestBudget(f.n3, f.fleet, policies);
  EXPECT_EQ(use.policy, "pool-b");
  EXPECT_DOUBLE_EQ(use.used_ratio, 100.0);
  use = TightestBudget(f.n1, f.fleet, {PoolPolicy("unlimited", "", 0)});
  EXPECT_EQ(use.policy, "");
  EXPECT_EQ(use.budget_bytes, 0u);
  // Equal ratios: the smaller budget.
  use = TightestBudget(f.n1, f.fleet,
                       {PoolPolicy("big", "", 320 * kGiB), PoolPolicy("small", "a", 120 * kGiB)});
  EXPECT_EQ(use.policy, "small");
}

TEST(AdmissionTest, MatchingPoliciesSortedByName) {
  const std::vector<v1::Policy> policies = {PoolPolicy("z", "", 0), PoolPolicy("b", "b", 0),
                                            PoolPolicy("a", "a", 0), PoolPolicy("m", "a", 0)};
  std::vector<std::string> names;
  for (const v1::Policy* p : MatchingPolicies(policies, Node("n", "a").labels)) {
    names.push_back(p->name());
  }
  EXPECT_EQ(names, (std::vector<std::string>{"a", "m", "z"}));
  v1::Policy two = PoolPolicy("two", "a", 0);
  (*two.mutable_node_selector())["zone"] = "z2";
  EXPECT_FALSE(PolicyMatchesNode(two, Node("n", "a").labels));
  (*two.mutable_node_selector())["zone"] = "z1";
  EXPECT_TRUE(PolicyMatchesNode(two, Node("n", "a").labels));
  EXPECT_FALSE(PolicyMatchesNode(two, {}));
  EXPECT_TRUE(PolicyMatchesNode(PoolPolicy("all", "", 0), {}));
}

TEST(AdmissionTest, RetrySettingsOfTheMatchingPolicies) {
  Fleet f;
  v1::Policy slow = PoolPolicy("slow", "a", 0);
  slow.mutable_ebusy_retry()->set_initial_backoff_ms(50);
  v1::Policy elsewhere = PoolPolicy("elsewhere", "b", 0);
  elsewhere.mutable_ebusy_retry()->set_max_backoff_ms(kBackoffLimitMs);
  const AdmissionResult result = Admit(Register(kGiB), f.n1, f.fleet, {slow, elsewhere});
  ASSERT_TRUE(result.status.ok()) << result.status;
  EXPECT_EQ(result.retry.initial_backoff_ms(), 50u);
  EXPECT_EQ(result.retry.max_backoff_ms(), kDefaultMaxBackoffMs);
  EXPECT_EQ(result.retry.jitter_percent(), kDefaultJitterPercent);
}

TEST(FormatBytesTest, Table) {
  const std::pair<uint64_t, std::string> cases[] = {
      {0, "0 bytes"},
      {1, "1 byte"},
      {1023, "1023 bytes"},
      {kKiB, "1 KiB"},
      {1536, "1.50 KiB (1536 bytes)"},
      {kMiB - 1, "1024.00 KiB (1048575 bytes)"},
      {kMiB, "1 MiB"},
      {64 * kGiB, "64 GiB"},
      {1024 * kGiB, "1 TiB"},
      {3 * kGiB + 512 * kMiB, "3.50 GiB (3758096384 bytes)"},
      {uint64_t{1} << 63, "8 EiB"},
      {kMax64, "16.00 EiB (18446744073709551615 bytes)"},
  };
  for (const auto& [bytes, want] : cases) EXPECT_EQ(FormatBytes(bytes), want) << bytes;
}

// --- EBUSY backoff ------------------------------------------------------------------------------

v1::EbusyRetry Retry(uint64_t initial, uint64_t max, uint32_t jitter) {
  v1::EbusyRetry retry;
  retry.set_initial_backoff_ms(initial);
  retry.set_max_backoff_ms(max);
  retry.set_jitter_percent(jitter);
  return retry;
}

constexpr uint64_t kMiddle = uint64_t{1} << 63;  // u = 0.5: no jitter

TEST(EbusyBackoffTest, EffectiveRetry) {
  struct Case {
    v1::EbusyRetry in;
    uint64_t initial, max;
    uint32_t jitter;
  };
  const Case cases[] = {
      {Retry(0, 0, 0), 5, 300000, 20},
      {Retry(100, 0, 0), 100, 300000, 20},
      {Retry(0, 1000, 5), 5, 1000, 5},
      {Retry(100, 50, 0), 100, 100, 20},  // max raised to initial
      {Retry(kMax64, kMax64, 1000), kBackoffLimitMs, kBackoffLimitMs, 100},
  };
  for (const Case& c : cases) {
    const v1::EbusyRetry e = EffectiveRetry(c.in);
    EXPECT_EQ(e.initial_backoff_ms(), c.initial) << c.in.ShortDebugString();
    EXPECT_EQ(e.max_backoff_ms(), c.max) << c.in.ShortDebugString();
    EXPECT_EQ(e.jitter_percent(), c.jitter) << c.in.ShortDebugString();
  }
}

TEST(EbusyBackoffTest, DoublesUpToTheMax) {
  const v1::EbusyRetry defaults;
  struct Case {
    uint32_t attempt;
    absl::Duration want;
  };
  const Case cases[] = {
      {0, absl::Milliseconds(5)},       {1, absl::Milliseconds(5)},
      {2, absl::Milliseconds(10)},      {3, absl::Milliseconds(20)},
      {10, absl::Milliseconds(2560)},   {16, absl::Milliseconds(163840)},
      {17, absl::Milliseconds(300000)}, {18, absl::Minutes(5)},
      {1000, absl::Minutes(5)},         {std::numeric_limits<uint32_t>::max(), absl::Minutes(5)},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(EbusyBackoff(defaults, c.attempt, kMiddle), c.want) << c.attempt;
  }
  const v1::EbusyRetry custom = Retry(100, 1000, 10);
  EXPECT_EQ(EbusyBackoff(custom, 1, kMiddle), absl::Milliseconds(100));
  EXPECT_EQ(EbusyBackoff(custom, 4, kMiddle), absl::Milliseconds(800));
  EXPECT_EQ(EbusyBackoff(custom, 5, kMiddle), absl::Milliseconds(1000));
  // A day-long cap is reached without overflowing.
  EXPECT_EQ(EbusyBackoff(Retry(kBackoffLimitMs, kBackoffLimitMs, 0), 100, kMiddle),
            absl::Hours(24));
}

TEST(EbusyBackoffTest, Jitter) {
  const v1::EbusyRetry defaults;
  EXPECT_EQ(EbusyBackoff(defaults, 1, 0), absl::Milliseconds(4));       // -20 %
  EXPECT_EQ(EbusyBackoff(defaults, 17, 0), absl::Minutes(4));           // -20 % at the cap
  EXPECT_LT(EbusyBackoff(defaults, 1, kMax64), absl::Milliseconds(6));  // just under +20 %
  EXPECT_GT(EbusyBackoff(defaults, 1, kMax64), absl::Microseconds(5999));
  EXPECT_EQ(EbusyBackoff(Retry(100, 100, 100), 1, 0), absl::ZeroDuration());
  EXPECT_EQ(EbusyBackoff(Retry(100, 100, 50), 1, uint64_t{3} << 62), absl::Milliseconds(125));

  // Random draws stay within +-20 % and spread over the range.
  absl::BitGen gen;
  absl::Duration lo = absl::InfiniteDuration(), hi = absl::ZeroDuration(), sum;
  constexpr int kDraws = 10000;
  for (int i = 0; i < kDraws; ++i) {
    const absl::Duration d = EbusyBackoff(defaults, 3, gen);
    lo = std::min(lo, d);
    hi = std::max(hi, d);
    sum += d;
  }
  EXPECT_GE(lo, absl::Milliseconds(16));
  EXPECT_LT(hi, absl::Milliseconds(24));
  EXPECT_LT(lo, absl::Milliseconds(16.5));
  EXPECT_GT(hi, absl::Milliseconds(23.5));
  const absl::Duration mean = sum / kDraws;
  EXPECT_GT(mean, absl::Milliseconds(19.7));
  EXPECT_LT(mean, absl::Milliseconds(20.3));
}

TEST(EbusyBackoffTest, MergeTakesTheLargestValues) {
  v1::Policy a = PoolPolicy("a", "", 0);
  *a.mutable_ebusy_retry() = Retry(10, 0, 0);  // 10 ms, 5 min, 20 %
  v1::Policy b = PoolPolicy("b", "", 0);
  *b.mutable_ebusy_retry() = Retry(0, 600000, 50);  // 5 ms, 10 min, 50 %
  v1::Policy c = PoolPolicy("c", "", 0);
  *c.mutable_ebusy_retry() = Retry(1, 2, 1);
  const v1::EbusyRetry merged = MergeRetrySettings({a, b, c});
  EXPECT_EQ(merged.initial_backoff_ms(), 10u);
  EXPECT_EQ(merged.max_backoff_ms(), 600000u);
  EXPECT_EQ(merged.jitter_percent(), 50u);
  const v1::EbusyRetry alone = MergeRetrySettings({c});
  EXPECT_EQ(alone.initial_backoff_ms(), 1u);
  EXPECT_EQ(alone.max_backoff_ms(), 2u);
  EXPECT_EQ(alone.jitter_percent(), 1u);
  const v1::EbusyRetry none = MergeRetrySettings(absl::Span<const v1::Policy>());
  EXPECT_EQ(none.initial_backoff_ms(), kDefaultInitialBackoffMs);
  EXPECT_EQ(none.max_backoff_ms(), kDefaultMaxBackoffMs);
  EXPECT_EQ(none.jitter_percent(), kDefaultJitterPercent);
}

}  // namespace
}  // namespace dmapin::server
