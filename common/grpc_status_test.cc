#include "common/grpc_status.h"

#include <cerrno>

#include "absl/status/status.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin {
namespace {

TEST(WithErrnoTest, KeepsAStatusThatNamesItsErrno) {
  const absl::Status busy = ErrnoStatus(EBUSY, "region still mapped");
  EXPECT_EQ(WithErrno(busy), busy);
  EXPECT_TRUE(WithErrno(absl::OkStatus()).ok());
}

TEST(WithErrnoTest, NamesTheErrnoOfTheCodeInFrontOfTheMessage) {
  const struct {
    absl::Status status;
    int err;
  } cases[] = {
      {absl::InvalidArgumentError("bad"), EINVAL},
      {absl::NotFoundError("bad"), ENOENT},
      {absl::AlreadyExistsError("bad"), EEXIST},
      {absl::PermissionDeniedError("bad"), EPERM},
      {absl::ResourceExhaustedError("bad"), ENOMEM},
      {absl::FailedPreconditionError("bad"), EBUSY},
      {absl::UnavailableError("bad"), EAGAIN},
      {absl::InternalError("bad"), EIO},
      {absl::UnknownError("bad"), EIO},
  };
  for (const auto& c : cases) {
    const absl::Status named = WithErrno(c.status);
    EXPECT_EQ(named.code(), c.status.code()) << c.status;
    EXPECT_EQ(ErrnoOf(named), c.err) << c.status;
    EXPECT_EQ(named.message(), ErrnoName(c.err) + ": bad") << c.status;
  }
}

TEST(WithErrnoTest, AMessageThatAlreadyStartsWithAnErrnoKeepsIt) {
  const absl::Status named = WithErrno(absl::UnavailableError("EIO: disk on fire"));
  EXPECT_EQ(named.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ErrnoOf(named), EIO);
  EXPECT_EQ(named.message(), "EIO: disk on fire");
  // Not an errno name: the code's errno goes in front.
  EXPECT_EQ(WithErrno(absl::NotFoundError("node: gone")).message(), "ENOENT: node: gone");
}

TEST(ServerStatusTest, AnErrorCarriesItsErrnoInTheTrailer) {
  grpc::ServerContext context;
  const grpc::Status status = ServerStatus(&context, absl::PermissionDeniedError("denied"));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(status.error_message(), "EPERM: denied");
  EXPECT_TRUE(ServerStatus(&context, absl::OkStatus()).ok());
}

}  // namespace
}  // namespace dmapin
