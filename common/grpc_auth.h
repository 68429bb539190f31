// The gRPC side of authorization: reads a call's peer certificate names from its AuthContext,
// resolves them with an IdentityPolicy (common/peer_identity.h, where the rules are) and counts
// every refusal. With --insecure there is no certificate and every check passes (the behaviour
// before TLS), which /metrics shows as <prefix>_insecure 1.
//
// Flags (defined in grpc_auth.cc): --tls_trust_domain (default "dmapin"), --tls_roles (explicit
// IDENTITY=ROLE entries, comma-separated; see peer_identity.h).
//
// Metrics (Collectable, prefix dmapin_server or dmapin_agent):
//   <prefix>_insecure                   gauge, 1 when serving plaintext without authorization
//   <prefix>_auth_refused_total{check}  counter; check = admin_read, admin_write, control,
//                                       control_node_mismatch, agent_tcp (all always present)
#ifndef DMAPIN_COMMON_GRPC_AUTH_H_
#define DMAPIN_COMMON_GRPC_AUTH_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/peer_identity.h"
#include "common/tls_credentials.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/security/tls_certificate_verifier.h"
#include "prometheus/collectable.h"

namespace dmapin {

// The names of a call's verified peer certificate (empty without TLS).
PeerNames PeerNamesOf(const grpc::ServerContextBase& context);

class AuthGate {
 public:
  enum Check { kAdminRead, kAdminWrite, kControl, kControlNodeMismatch, kAgentTcp, kNumChecks };

  // Everything allowed (no TLS).
  static std::unique_ptr<AuthGate> Insecure();
  explicit AuthGate(IdentityPolicy policy) : insecure_(false), policy_(std::move(policy)) {}

  // From `security` and --tls_trust_domain, --tls_roles.
  static absl::StatusOr<std::unique_ptr<AuthGate>> FromFlags(const TransportSecurity& security);

  bool insecure() const { return insecure_; }
  // The caller's principal (role kNone without a certificate, or with --insecure).
  Principal PrincipalOf(const grpc::ServerContextBase& context) const;

  // OK or PERMISSION_DENIED (EACCES), counted.
  absl::Status Admin(const grpc::ServerContextBase& context, AdminAccess access,
                     absl::string_view method);
  absl::Status Control(const grpc::ServerContextBase& context, absl::string_view hello_node);
  absl::Status AgentRemote(const grpc::ServerContextBase& context, absl::string_view method);

  uint64_t refused(Check check) const { return refused_[check].load(std::memory_order_relaxed); }

  // For a client of the central service (the agent's control stream): a verifier that accepts
  // the server's certificate only when it resolves to role server (AuthorizeServer), checked
  // after gRPC verified its chain against the CA. It replaces gRPC's host name check: the
  // identity, not the name dialled, is what is trusted. Null with --insecure.
  std::shared_ptr<grpc::experimental::CertificateVerifier> ServerVerifier() const;

  // The metrics above, with `prefix` ("dmapin_server"). Must not outlive the gate; keep it (an
  // exposer holds its collectables weakly).
  std::shared_ptr<prometheus::Collectable> Collectable(std::string prefix) const;

 private:
  AuthGate() : insecure_(true) {}
  absl::Status Count(Check check, absl::Status status);

  const bool insecure_;
  std::optional<IdentityPolicy> policy_;
  std::array<std::atomic<uint64_t>, kNumChecks> refused_{};
};

}  // namespace dmapin

#endif  // DMAPIN_COMMON_GRPC_AUTH_H_
