// Transport security of dmapin's gRPC TCP listeners and clients, shared by the binaries: mutual
// TLS with certificates that reload from their files without a restart, or plaintext only when
// asked for with --insecure.
//
// Flags (defined in tls_credentials.cc, shown in every binary's --help):
//   --tls_cert_file, --tls_key_file  this process's certificate chain and private key (PEM)
//   --tls_ca_file                    the CA bundle peers' certificates must chain to (PEM)
//   --tls_refresh_interval_s         how often the three files are read again (rotation)
//   --tls_server_name                clients: the name the server's certificate must carry, when
//                                    it is not the host of the address dialled
//   --insecure                       plaintext, no authentication, no authorization (a WARNING
//                                    at start and <binary>_insecure 1 in /metrics)
// With neither the three files nor --insecure a binary refuses to start (secure by default).
//
// Servers require and verify a client certificate
// (GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY); clients verify the server's
// certificate and its name. gRPC's FileWatcherCertificateProvider re-reads the files every
// refresh interval: new handshakes use the new certificate, open connections keep theirs.
#ifndef DMAPIN_COMMON_TLS_CREDENTIALS_H_
#define DMAPIN_COMMON_TLS_CREDENTIALS_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/security/tls_certificate_verifier.h"

namespace dmapin {

struct TransportSecurity {
  bool insecure = false;
  std::string cert_file;
  std::string key_file;
  std::string ca_file;
  unsigned int refresh_interval_s = 60;
  std::string server_name;  // clients: expected server certificate name ("" = the dialled host)
};

// The flags above, checked (CheckTransportSecurity).
absl::StatusOr<TransportSecurity> TransportSecurityFromFlags();
// Whether --insecure was given (for a binary that has nothing on TCP and so checks nothing).
bool InsecureFlag();

// OK for --insecure alone, or for the three files set and readable PEM. Otherwise
// INVALID_ARGUMENT (EINVAL) saying what to pass; --insecure with files is refused too (which one
// was meant?).
absl::Status CheckTransportSecurity(const TransportSecurity& security);

// Credentials for a listening port / a channel. Insecure ones with `insecure`.
std::shared_ptr<grpc::ServerCredentials> ServerCredentialsFor(const TransportSecurity& security);
// `verifier` (may be null: gRPC's host name check) decides on the server's certificate after its
// chain was verified against the CA (AuthGate::ServerVerifier: the server's identity).
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentialsFor(
    const TransportSecurity& security,
    std::shared_ptr<grpc::experimental::CertificateVerifier> verifier = nullptr);
// Adds what the channel needs beside its credentials (the expected server name).
void AddChannelArguments(const TransportSecurity& security, grpc::ChannelArguments& args);

// Logs the mode: a WARNING for plaintext, naming what it leaves open; the files otherwise.
void LogTransportSecurity(const TransportSecurity& security, absl::string_view binary);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_TLS_CREDENTIALS_H_
