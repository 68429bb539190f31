#include "common/peer_identity.h"

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin {
namespace {

using ::testing::HasSubstr;

IdentityPolicy Default() {
  absl::StatusOr<IdentityPolicy> policy = IdentityPolicy::Create("dmapin", {});
  EXPECT_TRUE(policy.ok()) << policy.status();
  return *policy;
}

Principal Uri(const IdentityPolicy& policy, const std::string& uri) {
  return policy.Resolve(PeerNames{.uris = {uri}});
}

TEST(PeerIdentityTest, SpiffePathsMapToRoles) {
  const IdentityPolicy policy = Default();
  EXPECT_EQ(Uri(policy, "spiffe://dmapin/node/node-1").role, PeerRole::kNode);
  EXPECT_EQ(Uri(policy, "spiffe://dmapin/node/node-1").name, "node-1");
  EXPECT_EQ(Uri(policy, "spiffe://dmapin/server").role, PeerRole::kServer);
  EXPECT_EQ(Uri(policy, "spiffe://dmapin/admin/alice").role, PeerRole::kAdmin);
  EXPECT_EQ(Uri(policy, "spiffe://dmapin/viewer/bob").role, PeerRole::kViewer);
}

TEST(PeerIdentityTest, OtherDomainsPathsAndShapesMapToNothing) {
  const IdentityPolicy policy = Default();
  for (const char* uri :
       {"spiffe://other/admin/alice", "spiffe://dmapin/admin", "spiffe://dmapin/admin/",
        "spiffe://dmapin/admin/a/b", "spiffe://dmapin/root/alice", "spiffe://dmapin/server/x",
        "spiffe://dmapinx/admin/alice", "https://dmapin/admin/alice", "spiffe://dmapin/node/"}) {
    EXPECT_EQ(Uri(policy, uri).role, PeerRole::kNone) << uri;
  }
  EXPECT_EQ(policy.Resolve(PeerNames{}).role, PeerRole::kNone);
  // DNS names map only through explicit entries.
  EXPECT_EQ(policy.Resolve(PeerNames{.dns = {"admin.dmapin"}}).role, PeerRole::kNone);
}

TEST(PeerIdentityTest, ExplicitEntriesWinAndCoverDnsNames) {
  absl::StatusOr<IdentityPolicy> policy = IdentityPolicy::Create(
      "dmapin", {"spiffe://dmapin/admin/eve=viewer", "dns:ops.example.com=admin",
                 "dns:host-7.example.com=node:node-7", "spiffe://corp/ci=server"});
  ASSERT_TRUE(policy.ok()) << policy.status();
  EXPECT_EQ(Uri(*policy, "spiffe://dmapin/admin/eve").role, PeerRole::kViewer);
  EXPECT_EQ(Uri(*policy, "spiffe://dmapin/admin/alice").role, PeerRole::kAdmin);
  EXPECT_EQ(Uri(*policy, "spiffe://corp/ci").role, PeerRole::kServer);
  EXPECT_EQ(policy->Resolve(PeerNames{.dns = {"ops.example.com"}}).role, PeerRole::kAdmin);
  const Principal node = policy->Resolve(PeerNames{.dns = {"host-7.example.com"}});
  EXPECT_EQ(node.role, PeerRole::kNode);
  EXPECT_EQ(node.name, "node-7");
}

TEST(PeerIdentityTest, TwoPrincipalsInOneCertificateAreAmbiguous) {
  const IdentityPolicy policy = Default();
  const Principal both = policy.Resolve(
      PeerNames{.uris = {"spiffe://dmapin/node/node-1", "spiffe://dmapin/admin/alice"}});
  EXPECT_EQ(both.role, PeerRole::kNone);
  EXPECT_THAT(both.identity, HasSubstr("ambiguous"));
  // The same principal twice, or an unmapped name beside a mapped one, is fine.
  EXPECT_EQ(policy
                .Resolve(PeerNames{.uris = {"spiffe://dmapin/node/node-1"},
                                   .dns = {"localhost", "node-1.example.com"}})
                .role,
            PeerRole::kNode);
}

TEST(PeerIdentityTest, BadConfigurationIsRefused) {
  EXPECT_FALSE(IdentityPolicy::Create("", {}).ok());
  EXPECT_FALSE(IdentityPolicy::Create("a/b", {}).ok());
  for (const char* entry :
       {"admin", "=admin", "spiffe://x/y=root", "alice=admin", "dns:x=node:", "dns:x=node:a/b"}) {
    absl::StatusOr<IdentityPolicy> policy = IdentityPolicy::Create("dmapin", {entry});
    EXPECT_EQ(policy.status().code(), absl::StatusCode::kInvalidArgument) << entry;
  }
  EXPECT_FALSE(IdentityPolicy::Create("dmapin", {"dns:x=admin", "dns:x=viewer"}).ok());
}

TEST(PeerIdentityTest, AdminRules) {
  const IdentityPolicy policy = Default();
  const Principal admin = Uri(policy, "spiffe://dmapin/admin/alice");
  const Principal viewer = Uri(policy, "spiffe://dmapin/viewer/bob");
  const Principal node = Uri(policy, "spiffe://dmapin/node/node-1");
  const Principal server = Uri(policy, "spiffe://dmapin/server");
  const Principal nobody = Uri(policy, "spiffe://dmapin/who");
  EXPECT_TRUE(AuthorizeAdmin(admin, AdminAccess::kWrite, "SetPolicy").ok());
  EXPECT_TRUE(AuthorizeAdmin(admin, AdminAccess::kRead, "ListNodes").ok());
  EXPECT_TRUE(AuthorizeAdmin(viewer, AdminAccess::kRead, "ListNodes").ok());
  const absl::Status refused = AuthorizeAdmin(viewer, AdminAccess::kWrite, "SetPolicy");
  EXPECT_EQ(refused.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(refused.message(), HasSubstr("EACCES: SetPolicy needs role admin"));
  EXPECT_THAT(refused.message(), HasSubstr("spiffe://dmapin/viewer/bob"));
  for (const Principal& other : {node, server, nobody}) {
    EXPECT_EQ(AuthorizeAdmin(other, AdminAccess::kRead, "ListNodes").code(),
              absl::StatusCode::kPermissionDenied);
    EXPECT_EQ(AuthorizeAdmin(other, AdminAccess::kWrite, "SetPolicy").code(),
              absl::StatusCode::kPermissionDenied);
  }
}

TEST(PeerIdentityTest, ControlRules) {
  const IdentityPolicy policy = Default();
  const Principal node1 = Uri(policy, "spiffe://dmapin/node/node-1");
  EXPECT_TRUE(AuthorizeControl(node1, "node-1").ok());
  const absl::Status other_node = AuthorizeControl(node1, "node-2");
  EXPECT_EQ(other_node.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(other_node.message(), HasSubstr("names node node-2"));
  EXPECT_EQ(AuthorizeControl(Uri(policy, "spiffe://dmapin/admin/node-1"), "node-1").code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(AuthorizeControl(Principal{}, "node-1").code(), absl::StatusCode::kPermissionDenied);
}

TEST(PeerIdentityTest, AgentRemoteRules) {
  const IdentityPolicy policy = Default();
  EXPECT_TRUE(AuthorizeServer(Uri(policy, "spiffe://dmapin/server")).ok());
  for (const char* uri : {"spiffe://dmapin/admin/alice", "spiffe://dmapin/node/node-1",
                          "spiffe://other/server", "spiffe://dmapin/server/x"}) {
    EXPECT_EQ(AuthorizeServer(Uri(policy, uri)).code(), absl::StatusCode::kPermissionDenied) << uri;
  }
  EXPECT_TRUE(AuthorizeAgentRemote(Uri(policy, "spiffe://dmapin/server"), "ListContexts").ok());
  EXPECT_TRUE(
      AuthorizeAgentRemote(Uri(policy, "spiffe://dmapin/admin/alice"), "ListContexts").ok());
  for (const char* uri : {"spiffe://dmapin/viewer/bob", "spiffe://dmapin/node/node-1",
                          "spiffe://dmapin/node/node-2", "spiffe://elsewhere/admin/alice"}) {
    EXPECT_EQ(AuthorizeAgentRemote(Uri(policy, uri), "TeardownContext").code(),
              absl::StatusCode::kPermissionDenied)
        << uri;
  }
}

}  // namespace
}  // namespace dmapin
