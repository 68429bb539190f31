#include "common/errno_status.h"

#include <cerrno>

#include "gtest/gtest.h"

namespace dmapin {
namespace {

TEST(ErrnoStatusTest, CodesFollowSpecSection9) {
  EXPECT_EQ(ErrnoStatus(EINVAL, "x").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ErrnoStatus(EBUSY, "x").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrnoStatus(ENOENT, "x").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ErrnoStatus(ENOMEM, "x").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(ErrnoStatus(EFAULT, "x").code(), absl::StatusCode::kInternal);
  EXPECT_EQ(ErrnoStatus(EPERM, "x").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ErrnoStatus(ENXIO, "x").code(), absl::StatusCode::kFailedPrecondition);
}

TEST(ErrnoStatusTest, MessageNamesErrnoAndPayloadRoundTrips) {
  absl::Status status = ErrnoStatus(EBUSY, "region still mapped");
  EXPECT_EQ(status.message(), "EBUSY: region still mapped");
  EXPECT_EQ(ErrnoOf(status), EBUSY);
  absl::Status translate = ErrnoStatus(EFAULT, absl::StatusCode::kOutOfRange, "outside");
  EXPECT_EQ(translate.code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(ErrnoOf(translate), EFAULT);
}

TEST(ErrnoStatusTest, OkAndForeignStatuses) {
  EXPECT_EQ(ErrnoOf(absl::OkStatus()), 0);
  EXPECT_EQ(ErrnoOf(absl::InternalError("no payload")), EIO);
}

TEST(ErrnoStatusTest, AppendToMessageKeepsCodeAndErrno) {
  const absl::Status damaged = ErrnoStatus(EIO, absl::StatusCode::kDataLoss, "bad page");
  const absl::Status more = AppendToMessage(damaged, " (at open)");
  EXPECT_EQ(more.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(more.message(), "EIO: bad page (at open)");
  EXPECT_EQ(ErrnoOf(more), EIO);
  EXPECT_TRUE(AppendToMessage(absl::OkStatus(), " (ignored)").ok());
}

TEST(ErrnoStatusTest, NamesRoundTrip) {
  for (int err : {EINVAL, EBUSY, ENOENT, ENOMEM, EFAULT, EPERM, ENXIO, EEXIST}) {
    EXPECT_EQ(ErrnoFromName(ErrnoName(err)), err) << ErrnoName(err);
  }
  EXPECT_EQ(ErrnoFromName("OK"), std::nullopt);
  EXPECT_EQ(ErrnoName(12345), "E12345");
}

}  // namespace
}  // namespace dmapin
