#include "common/tls_credentials.h"

#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin {
namespace {

using ::testing::HasSubstr;

std::string Write(const std::string& name, const std::string& text) {
  const std::string path = std::string(::testing::TempDir()) + "/" + name;
  std::ofstream(path) << text;
  return path;
}

TransportSecurity Files() {
  return TransportSecurity{
      .cert_file = Write("cert.pem", "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"),
      .key_file = Write("key.pem", "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"),
      .ca_file = Write("ca.pem", "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")};
}

TEST(TlsCredentialsTest, NothingGivenRefusesToStart) {
  const absl::Status status = CheckTransportSecurity(TransportSecurity{});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("refusing to start without transport security"));
  EXPECT_THAT(status.message(), HasSubstr("--insecure"));
}

TEST(TlsCredentialsTest, InsecureAloneIsAllowed) {
  EXPECT_TRUE(CheckTransportSecurity(TransportSecurity{.insecure = true}).ok());
}

TEST(TlsCredentialsTest, InsecureWithFilesIsRefused) {
  TransportSecurity both = Files();
  both.insecure = true;
  EXPECT_THAT(CheckTransportSecurity(both).message(), HasSubstr("one or the other"));
}

TEST(TlsCredentialsTest, AllThreeFilesAreNeeded) {
  EXPECT_TRUE(CheckTransportSecurity(Files()).ok());
  for (int missing = 0; missing < 3; ++missing) {
    TransportSecurity partial = Files();
    (missing == 0 ? partial.cert_file : missing == 1 ? partial.key_file : partial.ca_file) = "";
    EXPECT_EQ(CheckTransportSecurity(partial).code(), absl::StatusCode::kInvalidArgument)
        << missing;
  }
}

TEST(TlsCredentialsTest, UnreadableOrNonPemFilesAreRefused) {
  TransportSecurity absent = Files();
  absent.key_file = "/nonexistent/key.pem";
  const absl::Status status = CheckTransportSecurity(absent);
  EXPECT_THAT(status.message(), HasSubstr("--tls_key_file=/nonexistent/key.pem"));

  TransportSecurity swapped = Files();
  swapped.key_file = swapped.cert_file;  // a certificate where the key should be
  EXPECT_THAT(CheckTransportSecurity(swapped).message(), HasSubstr("PRIVATE KEY"));

  TransportSecurity garbage = Files();
  garbage.ca_file = Write("garbage.pem", "not pem");
  EXPECT_EQ(CheckTransportSecurity(garbage).code(), absl::StatusCode::kInvalidArgument);

  TransportSecurity no_refresh = Files();
  no_refresh.refresh_interval_s = 0;
  EXPECT_FALSE(CheckTransportSecurity(no_refresh).ok());
}

TEST(TlsCredentialsTest, CredentialsAreBuiltForBothModes) {
  EXPECT_NE(ServerCredentialsFor(TransportSecurity{.insecure = true}), nullptr);
  EXPECT_NE(ChannelCredentialsFor(TransportSecurity{.insecure = true}), nullptr);
  EXPECT_NE(ServerCredentialsFor(Files()), nullptr);
  EXPECT_NE(ChannelCredentialsFor(Files()), nullptr);
}

}  // namespace
}  // namespace dmapin
