#include "common/grpc_auth.h"

#include <optional>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/metrics_util.h"
#include "grpc/grpc_security_constants.h"

ABSL_FLAG(std::string, tls_trust_domain, "dmapin",
          "The SPIFFE trust domain of the default identity mapping: spiffe://<domain>/node/<n> "
          "is node <n>, /server the server, /admin/<name> an admin, /viewer/<name> a viewer.");
ABSL_FLAG(std::vector<std::string>, tls_roles, {},
          "Explicit identity -> role entries, comma-separated IDENTITY=ROLE, taking precedence "
          "over the SPIFFE paths: IDENTITY a URI SAN or dns:<DNS SAN>, ROLE admin, viewer, "
          "server or node:<name>. E.g. dns:ops.example.com=admin,spiffe://corp/ci=viewer");

namespace dmapin {
namespace {

constexpr const char* kCheckNames[AuthGate::kNumChecks] = {"admin_read", "admin_write", "control",
                                                           "control_node_mismatch", "agent_tcp"};

std::vector<std::string> Values(const grpc::AuthContext& auth, const char* property) {
  std::vector<std::string> out;
  for (const grpc::string_ref& value : auth.FindPropertyValues(property)) {
    out.emplace_back(value.data(), value.size());
  }
  return out;
}

class AuthCollectable final : public prometheus::Collectable {
 public:
  AuthCollectable(const AuthGate* gate, std::string prefix)
      : gate_(gate), prefix_(std::move(prefix)) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    AddScalar(out, prefix_ + "_insecure",
              "1 when gRPC on TCP is plaintext without authentication or authorization "
              "(--insecure), 0 with mutual TLS.",
              prometheus::MetricType::Gauge, gate_->insecure() ? 1 : 0);
    FamilyBuilder refused(prefix_ + "_auth_refused_total",
                          "Calls refused PERMISSION_DENIED by the peer's certificate identity, by "
                          "check.",
                          prometheus::MetricType::Counter);
    for (int check = 0; check < AuthGate::kNumChecks; ++check) {
      refused.Add(static_cast<double>(gate_->refused(static_cast<AuthGate::Check>(check))),
                  {{"check", kCheckNames[check]}});
    }
    refused.MoveTo(out);
    return out;
  }

 private:
  const AuthGate* const gate_;
  const std::string prefix_;
};

}  // namespace

PeerNames PeerNamesOf(const grpc::ServerContextBase& context) {
  PeerNames names;
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return names;
  names.uris = Values(*auth, GRPC_PEER_URI_PROPERTY_NAME);
  if (names.uris.empty()) names.uris = Values(*auth, GRPC_PEER_SPIFFE_ID_PROPERTY_NAME);
  names.dns = Values(*auth, GRPC_PEER_DNS_PROPERTY_NAME);
  return names;
}

std::unique_ptr<AuthGate> AuthGate::Insecure() { return std::unique_ptr<AuthGate>(new AuthGate()); }

absl::StatusOr<std::unique_ptr<AuthGate>> AuthGate::FromFlags(const TransportSecurity& security) {
  if (security.insecure) return Insecure();
  absl::StatusOr<IdentityPolicy> policy =
      IdentityPolicy::Create(absl::GetFlag(FLAGS_tls_trust_domain), absl::GetFlag(FLAGS_tls_roles));
  if (!policy.ok()) return policy.status();
  return std::make_unique<AuthGate>(*std::move(policy));
}

Principal AuthGate::PrincipalOf(const grpc::ServerContextBase& context) const {
  if (insecure_) return Principal{};
  return policy_->Resolve(PeerNamesOf(context));
}

absl::Status AuthGate::Count(Check check, absl::Status status) {
  if (!status.ok()) refused_[check].fetch_add(1, std::memory_order_relaxed);
  return status;
}

absl::Status AuthGate::Admin(const grpc::ServerContextBase& context, AdminAccess access,
                             absl::string_view method) {
  if (insecure_) return absl::OkStatus();
  return Count(access == AdminAccess::kRead ? kAdminRead : kAdminWrite,
               AuthorizeAdmin(PrincipalOf(context), access, method));
}

absl::Status AuthGate::Control(const grpc::ServerContextBase& context,
                               absl::string_view hello_node) {
  if (insecure_) return absl::OkStatus();
  const Principal peer = PrincipalOf(context);
  return Count(peer.role == PeerRole::kNode ? kControlNodeMismatch : kControl,
               AuthorizeControl(peer, hello_node));
}

absl::Status AuthGate::AgentRemote(const grpc::ServerContextBase& context,
                                   absl::string_view method) {
  if (insecure_) return absl::OkStatus();
  return Count(kAgentTcp, AuthorizeAgentRemote(PrincipalOf(context), method));
}

std::shared_ptr<prometheus::Collectable> AuthGate::Collectable(std::string prefix) const {
  return std::make_shared<AuthCollectable>(this, std::move(prefix));
}

namespace {

// Resolves the server's certificate names after gRPC verified its chain; only role server passes.
class ServerIdentityVerifier final : public grpc::experimental::ExternalCertificateVerifier {
 public:
  explicit ServerIdentityVerifier(IdentityPolicy policy) : policy_(std::move(policy)) {}

  bool Verify(grpc::experimental::TlsCustomVerificationCheckRequest* request,
              std::function<void(grpc::Status)> callback, grpc::Status* sync_status) override {
    PeerNames names;
    for (const grpc::string_ref& uri : request->uri_names()) {
      names.uris.emplace_back(uri.data(), uri.size());
    }
    for (const grpc::string_ref& dns : request->dns_names()) {
      names.dns.emplace_back(dns.data(), dns.size());
    }
    const absl::Status status = AuthorizeServer(policy_.Resolve(names));
    *sync_status = status.ok() ? grpc::Status::OK
                               : grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                              std::string(status.message()));
    return true;  // synchronous
  }
  void Cancel(grpc::experimental::TlsCustomVerificationCheckRequest*) override {}

 private:
  const IdentityPolicy policy_;
};

}  // namespace

std::shared_ptr<grpc::experimental::CertificateVerifier> AuthGate::ServerVerifier() const {
  if (insecure_ || !policy_.has_value()) return nullptr;
  return grpc::experimental::ExternalCertificateVerifier::Create<ServerIdentityVerifier>(*policy_);
}

}  // namespace dmapin
