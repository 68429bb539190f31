#include "common/tls_credentials.h"

#include <cerrno>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/errno_status.h"
#include "common/logging.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"

ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate chain of this process for mutual TLS on its gRPC TCP listener and its "
          "gRPC TCP clients (with --tls_key_file and --tls_ca_file). Reloaded every "
          "--tls_refresh_interval_s.");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file.");
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM CA bundle that peers' certificates must chain to (clients must present one).");
ABSL_FLAG(uint32_t, tls_refresh_interval_s, 60,
          "How often the TLS files are read again: a rotated certificate is used for new "
          "handshakes without a restart.");
ABSL_FLAG(std::string, tls_server_name, "",
          "Clients: the name the server's certificate must carry when it is not the host of the "
          "address dialled (e.g. dmapin-server when dialling an IP address).");
ABSL_FLAG(bool, insecure, false,
          "Plaintext gRPC on TCP without authentication or authorization: anyone who reaches the "
          "port may call anything. For tests and local experiments only; logged as a WARNING "
          "and exported as <binary>_insecure 1. Without it the TLS files are required.");

namespace dmapin {
namespace {

absl::Status CheckPemFile(absl::string_view flag, const std::string& path,
                          absl::string_view expect) {
  std::ifstream in(path);
  if (!in) {
    return ErrnoStatus(ENOENT,
                       absl::StrCat("--", flag, "=", path, ": cannot read it: ", strerror(errno)));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (!absl::StrContains(text.str(), "-----BEGIN ") || !absl::StrContains(text.str(), expect)) {
    return ErrnoStatus(EINVAL,
                       absl::StrCat("--", flag, "=", path, ": not a PEM file with ", expect));
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::experimental::CertificateProviderInterface> Provider(
    const TransportSecurity& security) {
  return std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      security.key_file, security.cert_file, security.ca_file, security.refresh_interval_s);
}

}  // namespace

absl::Status CheckTransportSecurity(const TransportSecurity& security) {
  const bool any_file =
      !security.cert_file.empty() || !security.key_file.empty() || !security.ca_file.empty();
  if (security.insecure) {
    if (any_file) {
      return ErrnoStatus(EINVAL,
                         "--insecure and TLS files (--tls_cert_file, --tls_key_file, "
                         "--tls_ca_file) together: pass one or the other");
    }
    return absl::OkStatus();
  }
  if (security.cert_file.empty() || security.key_file.empty() || security.ca_file.empty()) {
    return ErrnoStatus(
        EINVAL,
        "refusing to start without transport security: pass --tls_cert_file, --tls_key_file "
        "and --tls_ca_file (mutual TLS), or --insecure to run plaintext gRPC without "
        "authentication");
  }
  if (security.refresh_interval_s == 0) {
    return ErrnoStatus(EINVAL, "--tls_refresh_interval_s must be at least 1");
  }
  if (absl::Status s = CheckPemFile("tls_cert_file", security.cert_file, "CERTIFICATE"); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckPemFile("tls_key_file", security.key_file, "PRIVATE KEY"); !s.ok()) {
    return s;
  }
  return CheckPemFile("tls_ca_file", security.ca_file, "CERTIFICATE");
}

absl::StatusOr<TransportSecurity> TransportSecurityFromFlags() {
  TransportSecurity security{.insecure = absl::GetFlag(FLAGS_insecure),
                             .cert_file = absl::GetFlag(FLAGS_tls_cert_file),
                             .key_file = absl::GetFlag(FLAGS_tls_key_file),
                             .ca_file = absl::GetFlag(FLAGS_tls_ca_file),
                             .refresh_interval_s = absl::GetFlag(FLAGS_tls_refresh_interval_s),
                             .server_name = absl::GetFlag(FLAGS_tls_server_name)};
  if (absl::Status status = CheckTransportSecurity(security); !status.ok()) return status;
  return security;
}

bool InsecureFlag() { return absl::GetFlag(FLAGS_insecure); }

std::shared_ptr<grpc::ServerCredentials> ServerCredentialsFor(const TransportSecurity& security) {
  if (security.insecure) return grpc::InsecureServerCredentials();
  grpc::experimental::TlsServerCredentialsOptions options(Provider(security));
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  return grpc::experimental::TlsServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentialsFor(
    const TransportSecurity& security,
    std::shared_ptr<grpc::experimental::CertificateVerifier> verifier) {
  if (security.insecure) return grpc::InsecureChannelCredentials();
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(Provider(security));
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_verify_server_certs(true);
  if (verifier != nullptr) options.set_certificate_verifier(std::move(verifier));
  return grpc::experimental::TlsCredentials(options);
}

void AddChannelArguments(const TransportSecurity& security, grpc::ChannelArguments& args) {
  if (!security.insecure && !security.server_name.empty()) {
    args.SetSslTargetNameOverride(security.server_name);
  }
}

void LogTransportSecurity(const TransportSecurity& security, absl::string_view binary) {
  if (security.insecure) {
    LOG(WARNING) << absl::StrFormat(
        "%s: --insecure: gRPC on TCP is PLAINTEXT, with no authentication and no "
        "authorization: anyone who reaches the port may call anything. Use TLS "
        "(--tls_cert_file, --tls_key_file, --tls_ca_file) outside tests.",
        std::string(binary).c_str());
    return;
  }
  LOG(INFO) << absl::StrFormat(
      "%s: mutual TLS: certificate %s, key %s, CA %s (read again every %u s)",
      std::string(binary).c_str(), security.cert_file.c_str(), security.key_file.c_str(),
      security.ca_file.c_str(), security.refresh_interval_s);
}

}  // namespace dmapin
