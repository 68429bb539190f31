#include "common/peer_identity.h"

#include <cerrno>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/errno_status.h"

namespace dmapin {
namespace {

// A name as the policy accepts it: non-empty, printable, no '/' (one path segment).
bool ValidName(absl::string_view name) {
  if (name.empty() || name.size() > 253) return false;
  for (char c : name) {
    if (c <= ' ' || c > '~' || c == '/') return false;
  }
  return true;
}

absl::StatusOr<Principal> ParseRole(absl::string_view role, absl::string_view identity) {
  Principal principal{.identity = std::string(identity)};
  if (role == "admin") {
    principal.role = PeerRole::kAdmin;
  } else if (role == "viewer") {
    principal.role = PeerRole::kViewer;
  } else if (role == "server") {
    principal.role = PeerRole::kServer;
  } else if (absl::StartsWith(role, "node:") && ValidName(role.substr(5))) {
    principal.role = PeerRole::kNode;
    principal.name = std::string(role.substr(5));
  } else {
    return ErrnoStatus(
        EINVAL, absl::StrCat("role \"", role, "\" is none of admin, viewer, server, node:<name>"));
  }
  return principal;
}

}  // namespace

absl::string_view PeerRoleName(PeerRole role) {
  switch (role) {
    case PeerRole::kNone:
      return "none";
    case PeerRole::kNode:
      return "node";
    case PeerRole::kServer:
      return "server";
    case PeerRole::kAdmin:
      return "admin";
    case PeerRole::kViewer:
      return "viewer";
  }
  return "none";
}

std::string Principal::Describe() const {
  if (role == PeerRole::kNone) {
    return identity.empty() ? "a peer with no known identity"
                            : absl::StrCat("a peer with no known identity (", identity, ")");
  }
  std::string out(PeerRoleName(role));
  if (!name.empty()) absl::StrAppend(&out, " ", name);
  if (!identity.empty()) absl::StrAppend(&out, " (", identity, ")");
  return out;
}

absl::StatusOr<IdentityPolicy> IdentityPolicy::Create(absl::string_view trust_domain,
                                                      const std::vector<std::string>& roles) {
  if (!ValidName(trust_domain)) {
    return ErrnoStatus(EINVAL, absl::StrCat("trust domain \"", trust_domain, "\" is not a name"));
  }
  IdentityPolicy policy;
  policy.trust_domain_ = std::string(trust_domain);
  for (const std::string& entry : roles) {
    const size_t eq = entry.rfind('=');
    if (eq == std::string::npos || eq == 0) {
      return ErrnoStatus(EINVAL, absl::StrCat("role entry \"", entry, "\" is not IDENTITY=ROLE"));
    }
    const std::string identity = entry.substr(0, eq);
    if (!absl::StartsWith(identity, "dns:") && !absl::StrContains(identity, "://")) {
      return ErrnoStatus(EINVAL, absl::StrCat("role entry \"", entry,
                                              "\": the identity must be a URI (spiffe://...) or "
                                              "dns:<name>"));
    }
    absl::StatusOr<Principal> principal = ParseRole(entry.substr(eq + 1), identity);
    if (!principal.ok()) {
      return ErrnoStatus(
          EINVAL, absl::StrCat("role entry \"", entry, "\": ", principal.status().message()));
    }
    if (!policy.explicit_.emplace(identity, *std::move(principal)).second) {
      return ErrnoStatus(EINVAL, absl::StrCat("identity ", identity, " is mapped twice"));
    }
  }
  return policy;
}

Principal IdentityPolicy::ResolveOne(const std::string& identity) const {
  if (auto it = explicit_.find(identity); it != explicit_.end()) return it->second;
  Principal principal{.identity = identity};
  const std::string prefix = absl::StrCat("spiffe://", trust_domain_, "/");
  if (!absl::StartsWith(identity, prefix)) return principal;
  const std::vector<absl::string_view> path =
      absl::StrSplit(absl::string_view(identity).substr(prefix.size()), '/');
  if (path.size() == 1 && path[0] == "server") {
    principal.role = PeerRole::kServer;
  } else if (path.size() == 2 && ValidName(path[1])) {
    if (path[0] == "node") principal.role = PeerRole::kNode;
    if (path[0] == "admin") principal.role = PeerRole::kAdmin;
    if (path[0] == "viewer") principal.role = PeerRole::kViewer;
    if (principal.role != PeerRole::kNone) principal.name = std::string(path[1]);
  }
  return principal;
}

Principal IdentityPolicy::Resolve(const PeerNames& names) const {
  std::vector<std::string> identities = names.uris;
  for (const std::string& dns : names.dns) identities.push_back(absl::StrCat("dns:", dns));
  Principal found;
  for (const std::string& identity : identities) {
    Principal one = ResolveOne(identity);
    if (one.role == PeerRole::kNone) continue;
    if (found.role == PeerRole::kNone) {
      found = std::move(one);
    } else if (!(found == one)) {
      // Two principals in one certificate: refuse rather than pick one.
      return Principal{.identity =
                           absl::StrCat("ambiguous: ", found.identity, " and ", one.identity)};
    }
  }
  if (found.role == PeerRole::kNone && !identities.empty()) {
    found.identity = absl::StrJoin(identities, ", ");
  }
  return found;
}

absl::Status AuthorizeAdmin(const Principal& peer, AdminAccess access, absl::string_view method) {
  if (peer.role == PeerRole::kAdmin) return absl::OkStatus();
  if (peer.role == PeerRole::kViewer && access == AdminAccess::kRead) return absl::OkStatus();
  return ErrnoStatus(EACCES,
                     absl::StrCat(method, " needs role ",
                                  access == AdminAccess::kRead ? "viewer or admin" : "admin", "; ",
                                  peer.Describe(), " has ",
                                  peer.role == PeerRole::kNone ? "none" : PeerRoleName(peer.role)));
}

absl::Status AuthorizeControl(const Principal& peer, absl::string_view hello_node) {
  if (peer.role != PeerRole::kNode) {
    return ErrnoStatus(EACCES, absl::StrCat("Control.Connect is for node agents; ", peer.Describe(),
                                            " is not one"));
  }
  if (peer.name != hello_node) {
    return ErrnoStatus(EACCES,
                       absl::StrCat("the Hello names node ", hello_node, " but the certificate is ",
                                    peer.Describe(), ": an agent speaks only for its own node"));
  }
  return absl::OkStatus();
}

absl::Status AuthorizeServer(const Principal& peer) {
  if (peer.role == PeerRole::kServer) return absl::OkStatus();
  return ErrnoStatus(EACCES, absl::StrCat("the central service's certificate must be the "
                                          "server's; ",
                                          peer.Describe(), " is not"));
}

absl::Status AuthorizeAgentRemote(const Principal& peer, absl::string_view method) {
  if (peer.role == PeerRole::kServer || peer.role == PeerRole::kAdmin) return absl::OkStatus();
  return ErrnoStatus(EACCES, absl::StrCat(method, " over TCP is for the server and admins; ",
                                          peer.Describe(), " is neither"));
}

}  // namespace dmapin
