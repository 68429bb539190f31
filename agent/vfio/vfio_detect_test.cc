#include "agent/vfio/vfio_detect.h"

#include <linux/vfio.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <vector>

#include "agent/vfio/fake_vfio_kernel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

FakeVfioKernelOptions WithTypes(std::vector<uint32_t> types) {
  FakeVfioKernelOptions options = FakeVfioKernelOptions::Default();
  options.iommu_types = std::move(types);
  return options;
}

TEST(DetectVfioBackendsTest, ReportsBothTypesInOrderAndClosesTheContainer) {
  FakeVfioKernel kernel(WithTypes({VFIO_TYPE1v2_IOMMU, VFIO_SPAPR_TCE_v2_IOMMU}));
  EXPECT_THAT(DetectVfioBackends(kernel), ElementsAre("vfio-spapr-v2", "vfio-type1"));
  EXPECT_THAT(kernel.OpenFds(), IsEmpty());
  EXPECT_THAT(kernel.CallLog(),
              ElementsAre("open(/dev/vfio/vfio)=3", "ioctl(3, VFIO_GET_API_VERSION)=0",
                          "ioctl(3, VFIO_CHECK_EXTENSION, 7)=1",
                          "ioctl(3, VFIO_CHECK_EXTENSION, 3)=1", "close(3)=0"));
}

TEST(DetectVfioBackendsTest, Type1Only) {
  FakeVfioKernel kernel(WithTypes({VFIO_TYPE1v2_IOMMU}));
  EXPECT_THAT(DetectVfioBackends(kernel), ElementsAre("vfio-type1"));
}

TEST(DetectVfioBackendsTest, SpaprOnly) {
  FakeVfioKernel kernel(WithTypes({VFIO_SPAPR_TCE_v2_IOMMU}));
  EXPECT_THAT(DetectVfioBackends(kernel), ElementsAre("vfio-spapr-v2"));
}

TEST(DetectVfioBackendsTest, SpaprV1OrType1V1AloneDoNotCount) {
  FakeVfioKernel kernel(WithTypes({VFIO_SPAPR_TCE_IOMMU, VFIO_TYPE1_IOMMU}));
  EXPECT_THAT(DetectVfioBackends(kernel), IsEmpty());
  EXPECT_THAT(kernel.OpenFds(), IsEmpty());
}

TEST(DetectVfioBackendsTest, NoContainerDevice) {
  FakeVfioKernelOptions options = FakeVfioKernelOptions::Default();
  options.container_device_present = false;
  FakeVfioKernel kernel(options);
  EXPECT_THAT(DetectVfioBackends(kernel), IsEmpty());
}

TEST(DetectVfioBackendsTest, PermissionDenied) {
  FakeVfioKernel kernel;
  kernel.SetOpenErrno("/dev/vfio/vfio", EACCES);
  EXPECT_THAT(DetectVfioBackends(kernel), IsEmpty());
}

TEST(DetectVfioBackendsTest, WrongApiVersionClosesAndReportsNothing) {
  FakeVfioKernelOptions options = FakeVfioKernelOptions::Default();
  options.api_version = 1;
  FakeVfioKernel kernel(options);
  EXPECT_THAT(DetectVfioBackends(kernel), IsEmpty());
  EXPECT_THAT(kernel.OpenFds(), IsEmpty());
}

TEST(DetectVfioBackendsTest, CheckExtensionErrorMeansUnsupported) {
  FakeVfioKernel kernel;
  kernel.InjectIoctlErrno(VFIO_CHECK_EXTENSION, 1, ENOTTY);
  EXPECT_THAT(DetectVfioBackends(kernel), ElementsAre("vfio-type1"));
}

// This machine (and CI) has no /dev/vfio: the real kernel seam must say so, not crash.
TEST(DetectVfioBackendsTest, RealKernelHere) {
  RealVfioKernel kernel;
  const std::vector<std::string> backends = DetectVfioBackends(kernel);
  if (access("/dev/vfio/vfio", F_OK) != 0) {
    EXPECT_THAT(backends, IsEmpty());
  } else {
    for (const std::string& backend : backends) {
      EXPECT_TRUE(backend == "vfio-spapr-v2" || backend == "vfio-type1") << backend;
    }
  }
}

TEST(RealVfioKernelTest, ReturnsNegativeErrnoWithoutTouchingErrno) {
  RealVfioKernel kernel;
  errno = 0;
  EXPECT_EQ(kernel.Open("/nonexistent/dmapin/vfio", 0), -ENOENT);
  EXPECT_EQ(kernel.Close(-1), -EBADF);
  EXPECT_EQ(kernel.Ioctl(-1, VFIO_GET_API_VERSION, nullptr), -EBADF);
}

}  // namespace
}  // namespace dmapin::agent
