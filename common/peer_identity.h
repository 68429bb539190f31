// Who a TLS peer is and what it may do: the authorization policy of dmapin's gRPC services, kept
// free of gRPC (common/grpc_auth.h translates a call's AuthContext into PeerNames and a refusal
// into the call's status).
//
// Identities come from the peer certificate's subject alternative names (SANs):
//  - URI SANs in SPIFFE form, spiffe://<trust domain>/<path>, with the default mapping
//      spiffe://<td>/node/<name>    role node, for node <name> (the agent of that node)
//      spiffe://<td>/server         role server (dmapin-server)
//      spiffe://<td>/admin/<name>   role admin
//      spiffe://<td>/viewer/<name>  role viewer
//    (<td> is --tls_trust_domain, "dmapin" by default; other trust domains and paths map to
//    nothing).
//  - explicit entries (--tls_roles), which take precedence over the default mapping, each
//    IDENTITY=ROLE with IDENTITY a URI SAN ("spiffe://corp/ops/alice") or a DNS SAN written
//    "dns:<name>" ("dns:ops.example.com"), and ROLE one of admin, viewer, server or node:<name>.
//    DNS SANs map only through explicit entries: a DNS name says where a host is, not who it is.
// A certificate whose SANs map to two different principals is ambiguous and gets none.
//
// Rules (README "Security"):
//  - Admin service: admin may call everything; viewer only reads (Get*, List*) and WatchEvents.
//  - Control service: only role node, and only for the node its certificate names.
//  - NodeAgent over TCP: only role server and admin (the Unix socket is governed by SO_PEERCRED).
//  - the agent's control stream: the peer it dials must be role server.
//  - everything else: PERMISSION_DENIED (EACCES).
#ifndef DMAPIN_COMMON_PEER_IDENTITY_H_
#define DMAPIN_COMMON_PEER_IDENTITY_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dmapin {

enum class PeerRole { kNone, kNode, kServer, kAdmin, kViewer };

absl::string_view PeerRoleName(PeerRole role);

// The SANs of a verified peer certificate.
struct PeerNames {
  std::vector<std::string> uris;
  std::vector<std::string> dns;
};

// Who the peer is: a role and, for kNode, the node it may speak for (for admin and viewer, the
// name from the SPIFFE path; informational).
struct Principal {
  PeerRole role = PeerRole::kNone;
  std::string name;
  std::string identity;  // the SAN it came from ("spiffe://dmapin/node/node-1", "dns:x"); or ""

  bool operator==(const Principal& other) const { return role == other.role && name == other.name; }
  // "node node-1 (spiffe://dmapin/node/node-1)", "no known identity (SANs: ...)".
  std::string Describe() const;
};

// Maps certificate names to principals.
class IdentityPolicy {
 public:
  // `trust_domain` non-empty; each of `roles` "IDENTITY=ROLE" as above. INVALID_ARGUMENT (EINVAL)
  // naming the first bad entry.
  static absl::StatusOr<IdentityPolicy> Create(absl::string_view trust_domain,
                                               const std::vector<std::string>& roles);

  Principal Resolve(const PeerNames& names) const;

  const std::string& trust_domain() const { return trust_domain_; }

 private:
  IdentityPolicy() = default;
  // The principal of one identity ("spiffe://..." or "dns:..."), or role kNone.
  Principal ResolveOne(const std::string& identity) const;

  std::string trust_domain_;
  std::map<std::string, Principal> explicit_;
};

enum class AdminAccess { kRead, kWrite };

// OK, or PERMISSION_DENIED (EACCES) naming the principal and what it lacks.
absl::Status AuthorizeAdmin(const Principal& peer, AdminAccess access, absl::string_view method);
absl::Status AuthorizeControl(const Principal& peer, absl::string_view hello_node);
absl::Status AuthorizeAgentRemote(const Principal& peer, absl::string_view method);
// The other way round: an agent dialling the central service accepts only a server's
// certificate (role server), not any certificate of the CA that carries the dialled name.
absl::Status AuthorizeServer(const Principal& peer);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_PEER_IDENTITY_H_
