#include "agent/vfio/vfio_container.h"

#include <fcntl.h>
#include <linux/vfio.h>

#include <cerrno>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "agent/vfio/fake_vfio_kernel.h"
#include "agent/vfio/vfio_kernel.h"
#include "common/errno_status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmapin::agent {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::SizeIs;

constexpr char kGroup7[] = "/dev/vfio/7";
constexpr char kGroup8[] = "/dev/vfio/8";
constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;
constexpr uint64_t k64K = 64 * kKiB;

enum class Kind { kSpapr, kType1 };

std::string KindName(Kind kind) { return kind == Kind::kSpapr ? "Spapr" : "Type1"; }

// ppc64-like: 64 KiB kernel pages. x86-like: 4 KiB.
FakeVfioKernelOptions OptionsFor(Kind kind) {
  FakeVfioKernelOptions options = FakeVfioKernelOptions::Default();
  options.page_size = kind == Kind::kSpapr ? k64K : 4 * kKiB;
  return options;
}

std::unique_ptr<VfioContainerDriver> MakeDriver(Kind kind, VfioKernel* kernel,
                                                Type1Options type1 = {}) {
  if (kind == Kind::kSpapr) return std::make_unique<SpaprTceV2Driver>(kernel);
  return std::make_unique<Type1Driver>(kernel, type1);
}

uint32_t IommuType(Kind kind) {
  return kind == Kind::kSpapr ? VFIO_SPAPR_TCE_v2_IOMMU : VFIO_TYPE1v2_IOMMU;
}

// Every descriptor the fake handed out was closed again, exactly once.
void ExpectNoFdLeak(const FakeVfioKernel& kernel) {
  EXPECT_THAT(kernel.OpenFds(), IsEmpty());
  int opened = 0;
  int closed = 0;
  for (const FakeVfioCall& call : kernel.calls()) {
    if (call.kind == FakeVfioCall::Kind::kOpen && call.result >= 0) ++opened;
    if (call.kind == FakeVfioCall::Kind::kClose) {
      EXPECT_EQ(call.result, 0) << call.ToString();
      ++closed;
    }
  }
  EXPECT_EQ(opened, closed);
}

// ---------------------------------------------------------------------------------------------
// Open: the happy path, call by call.

TEST(SpaprTceV2DriverTest, OpenSequenceAndWindow) {
  FakeVfioKernel kernel(OptionsFor(Kind::kSpapr));
  SpaprTceV2Driver driver(&kernel);
  ASSERT_TRUE(driver.Open({kGroup7}).ok());
  EXPECT_TRUE(driver.is_open());
  EXPECT_EQ(driver.container_fd(), 3);
  EXPECT_EQ(driver.name(), "vfio-spapr-v2");
  EXPECT_EQ(driver.iommu_type(), static_cast<uint32_t>(VFIO_SPAPR_TCE_v2_IOMMU));

  // No VFIO_IOMMU_ENABLE: the v2 IOMMU answers ENOTTY to it.
  EXPECT_THAT(
      kernel.CallLog(),
      ElementsAre("open(/dev/vfio/vfio)=3", "ioctl(3, VFIO_GET_API_VERSION)=0",
                  "ioctl(3, VFIO_CHECK_EXTENSION, 7)=1", "open(/dev/vfio/7)=4",
                  "ioctl(4, VFIO_GROUP_GET_STATUS)=0", "ioctl(4, VFIO_GROUP_SET_CONTAINER)=0",
                  "ioctl(3, VFIO_SET_IOMMU, 7)=0", "ioctl(3, VFIO_IOMMU_SPAPR_TCE_GET_INFO)=0"));
  const std::vector<FakeVfioCall> calls = kernel.calls();
  EXPECT_EQ(calls[0].flags, O_RDWR | O_CLOEXEC);
  EXPECT_EQ(calls[3].flags, O_RDWR | O_CLOEXEC);
  EXPECT_EQ(calls[4].ArgAs<vfio_group_status>().argsz, sizeof(vfio_group_status));
  EXPECT_EQ(calls[5].ArgAs<int>(), 3);
  const auto info = calls[7].ArgAs<vfio_iommu_spapr_tce_info>();
  EXPECT_EQ(info.argsz, sizeof(vfio_iommu_spapr_tce_info));
  EXPECT_EQ(info.flags, 0u);

  absl::StatusOr<VfioDmaWindow> window = driver.DmaWindow();
  ASSERT_TRUE(window.ok()) << window.status();
  EXPECT_EQ(window->start, 0u);
  EXPECT_EQ(window->size, 1 * kGiB);
  EXPECT_EQ(window->iommu_page_size, 4 * kKiB);
  EXPECT_EQ(window->page_size_bitmap, 4 * kKiB | k64K | 16 * kMiB);

  kernel.ClearCalls();
  EXPECT_TRUE(driver.Close().ok());
  EXPECT_FALSE(driver.is_open());
  EXPECT_THAT(kernel.CallLog(), ElementsAre("close(4)=0", "close(3)=0"));
  EXPECT_THAT(kernel.OpenFds(), IsEmpty());
  EXPECT_TRUE(driver.Close().ok());  // idempotent
}

TEST(SpaprTceV2DriverTest, WindowWithoutDdwReportsOnlyTheDefaultPage) {
  FakeVfioKernelOptions options = OptionsFor(Kind::kSpapr);
  options.ddw_pgsizes = 0;
  options.dma32_window_start = 0x80000000u;
  options.dma32_window_size = 0x40000000u;
  FakeVfioKernel kernel(options);
  SpaprTceV2Driver driver(&kernel);
  ASSERT_TRUE(driver.Open({kGroup7}).ok());
  absl::StatusOr<VfioDmaWindow> window = driver.DmaWindow();
  ASSERT_TRUE(window.ok());
  EXPECT_EQ(window->start, 0x80000000u);
  EXPECT_EQ(window->size, 0x40000000u);
  EXPECT_EQ(window->page_size_bitmap, 4 * kKiB);
}

TEST(SpaprTceV2DriverTest, EmptyWindowIsAnError) {
  FakeVfioKernelOptions options = OptionsFor(Kind::kSpapr);
  options.dma32_window_size = 0;
  FakeVfioKernel kernel(options);
  SpaprTceV2Driver driver(&kernel);
  absl::Status status = driver.Open({kGroup7});
  EXPECT_EQ(ErrnoOf(status), ENODEV) << status;
  ExpectNoFdLeak(kernel);
}

TEST(Type1DriverTest, OpenSequenceReadsCapabilitiesAndReservesTheTop) {
  FakeVfioKernel kernel(OptionsFor(Kind::kType1));
  Type1Driver driver(&kernel);
  ASSERT_TRUE(driver.Open({kGroup7, kGroup8}).ok());
  // Both groups join before VFIO_SET_IOMMU; GET_INFO is asked again with room for the caps.
  EXPECT_THAT(
      kernel.CallLog(),
      ElementsAre("open(/dev/vfio/vfio)=3", "ioctl(3, VFIO_GET_API_VERSION)=0",
                  "ioctl(3, VFIO_CHECK_EXTENSION, 3)=1", "open(/dev/vfio/7)=4",
                  "ioctl(4, VFIO_GROUP_GET_STATUS)=0", "ioctl(4, VFIO_GROUP_SET_CONTAINER)=0",
                  "open(/dev/vfio/8)=5", "ioctl(5, VFIO_GROUP_GET_STATUS)=0",
                  "ioctl(5, VFIO_GROUP_SET_CONTAINER)=0", "ioctl(3, VFIO_SET_IOMMU, 3)=0",
                  "ioctl(3, VFIO_IOMMU_GET_INFO)=0", "ioctl(3, VFIO_IOMMU_GET_INFO)=0"));
  const std::vector<FakeVfioCall> info_calls = kernel.IoctlCalls(VFIO_IOMMU_GET_INFO);
  ASSERT_THAT(info_calls, SizeIs(2));
  EXPECT_EQ(info_calls[0].ArgAs<vfio_iommu_type1_info>().argsz, sizeof(vfio_iommu_type1_info));
  // 24 + DMA_AVAIL (16) + IOVA_RANGE header (16) + 2 ranges (32).
  EXPECT_EQ(info_calls[1].ArgAs<vfio_iommu_type1_info>().argsz, 24u + 16u + 16u + 32u);

  absl::StatusOr<std::vector<VfioIovaRange>> usable = driver.UsableIovaRanges();
  ASSERT_TRUE(usable.ok());
  ASSERT_THAT(*usable, SizeIs(2));
  EXPECT_EQ((*usable)[1].start, 0xfef00000u);
  EXPECT_EQ((*usable)[1].last, (uint64_t{1} << 39) - 1);

  // Default: the upper half of the highest range [0xfef00000, 2^39).
  const uint64_t top = uint64_t{1} << 39;
  const uint64_t half = ((top - 0xfef00000u) / 2) & ~(4 * kKiB - 1);
  absl::StatusOr<VfioIovaRange> reserved = driver.ReservedIovaRange();
  ASSERT_TRUE(reserved.ok());
  EXPECT_EQ(reserved->start, top - half);
  EXPECT_EQ(reserved->last, top - 1);

  absl::StatusOr<VfioDmaWindow> window = driver.DmaWindow();
  ASSERT_TRUE(window.ok());
  EXPECT_EQ(window->start, 0u);
  EXPECT_EQ(window->size, top - half);
  EXPECT_EQ(window->iommu_page_size, 4 * kKiB);
  EXPECT_EQ(window->page_size_bitmap, 4 * kKiB | 2 * kMiB | 1 * kGiB);

  ASSERT_TRUE(driver.Close().ok());
  ExpectNoFdLeak(kernel);
}

TEST(Type1DriverTest, WithoutIovaCapabilityUsesTheConfiguredFallback) {
  FakeVfioKernelOptions options = OptionsFor(Kind::kType1);
  options.type1_iova_ranges.clear();
  FakeVfioKernel kernel(options);
  Type1Options type1;
  type1.reserved_iova_size = uint64_t{1} << 40;
  Type1Driver driver(&kernel, type1);
  ASSERT_TRUE(driver.Open({kGroup7}).ok());
  absl::StatusOr<VfioIovaRange> reserved = driver.ReservedIovaRange();
  ASSERT_TRUE(reserved.ok());
  EXPECT_EQ(reserved->start, (uint64_t{1} << 47) - (uint64_t{1} << 40));
  EXPECT_EQ(reserved->last, (uint64_t{1} << 47) - 1);
  EXPECT_EQ(driver.DmaWindow()->size, reserved->start);
}

TEST(Type1DriverTest, ReservedRangeThatDoesNotFitFailsOpenCleanly) {
  FakeVfioKernel kernel(OptionsFor(Kind::kType1));
  Type1Options type1;
  type1.reserved_iova_size = uint64_t{1} << 40;  // more than [0xfef00000, 2^39)
  Type1Driver driver(&kernel, type1);
  absl::Status status = driver.Open({kGroup7});
  EXPECT_EQ(ErrnoOf(status), ENOSPC) << status;
  EXPECT_FALSE(driver.is_open());
  ExpectNoFdLeak(kernel);
}

TEST(Type1DriverTest, IovaRangeUpToTheTopOf64Bits) {
  FakeVfioKernelOptions options = OptionsFor(Kind::kType1);
  options.type1_iova_ranges = {{0, ~uint64_t{0}}};
  FakeVfioKernel kernel(options);
  Type1Driver driver(&kernel);
  ASSERT_TRUE(driver.Open({kGroup7}).ok());
  absl::StatusOr<VfioIovaRange> reserved = driver.ReservedIovaRange();
  ASSERT_TRUE(reserved.ok());
  EXPECT_EQ(reserved->start, uint64_t{1} << 62);
  EXPECT_EQ(reserved->last, (uint64_t{1} << 63) - 1);
}

// ---------------------------------------------------------------------------------------------
// Open: every failure point, for both drivers. Each must answer the right errno and leave no
// descriptor open; the driver must be reusable afterwards.

struct OpenFailure {
  std::string name;
  std::function<void(FakeVfioKernelOptions&)> configure;  // before the kernel exists
  std::function<void(FakeVfioKernel&)> script;            // on the kernel
  std::vector<std::string> groups;
  int err;
  std::string message;  // a substring of the status message
};

std::vector<OpenFailure> OpenFailures(Kind kind) {
  const std::string type = kind == Kind::kSpapr ? "VFIO_SPAPR_TCE_v2_IOMMU" : "VFIO_TYPE1v2_IOMMU";
  const std::string info =
      kind == Kind::kSpapr ? "VFIO_IOMMU_SPAPR_TCE_GET_INFO" : "VFIO_IOMMU_GET_INFO";
  auto none = [](FakeVfioKernelOptions&) {};
  auto nothing = [](FakeVfioKernel&) {};
  auto inject = [](unsigned long request, int nth, int err) {  // NOLINT(runtime/int)
    return [=](FakeVfioKernel& kernel) { kernel.InjectIoctlErrno(request, nth, err); };
  };
  return {
      {"NoVfioDevice",
       [](FakeVfioKernelOptions& o) { o.container_device_present = false; },
       nothing,
       {kGroup7},
       ENOENT,
       "open /dev/vfio/vfio"},
      {"VfioDeviceEacces",
       none,
       [](FakeVfioKernel& k) { k.SetOpenErrno("/dev/vfio/vfio", EACCES); },
       {kGroup7},
       EACCES,
       "open /dev/vfio/vfio"},
      {"ApiVersionIoctlFails",
       none,
       inject(VFIO_GET_API_VERSION, 1, ENOTTY),
       {kGroup7},
       ENOTTY,
       "VFIO_GET_API_VERSION on container fd 3"},
      {"WrongApiVersion",
       [](FakeVfioKernelOptions& o) { o.api_version = 1; },
       nothing,
       {kGroup7},
       EINVAL,
       "VFIO_GET_API_VERSION on /dev/vfio/vfio is 1"},
      {"ExtensionMissing",
       [](FakeVfioKernelOptions& o) { o.iommu_types.clear(); },
       nothing,
       {kGroup7},
       ENOTTY,
       "VFIO_CHECK_EXTENSION(" + type + ") = 0"},
      {"CheckExtensionFails",
       none,
       inject(VFIO_CHECK_EXTENSION, 1, EINVAL),
       {kGroup7},
       EINVAL,
       "VFIO_CHECK_EXTENSION(" + type + ") on container fd 3"},
      {"NoSuchGroup", none, nothing, {"/dev/vfio/99"}, ENOENT, "open VFIO group /dev/vfio/99"},
      {"GroupEacces",
       none,
       [](FakeVfioKernel& k) { k.SetOpenErrno(kGroup7, EACCES); },
       {kGroup7},
       EACCES,
       "open VFIO group /dev/vfio/7"},
      {"SecondGroupEnoent",
       none,
       nothing,
       {kGroup7, "/dev/vfio/99"},
       ENOENT,
       "open VFIO group /dev/vfio/99"},
      {"GroupOpenedTwice", none, nothing, {kGroup7, kGroup7}, EBUSY, "open VFIO group /dev/vfio/7"},
      {"GroupStatusFails",
       none,
       inject(VFIO_GROUP_GET_STATUS, 1, EFAULT),
       {kGroup7},
       EFAULT,
       "VFIO_GROUP_GET_STATUS on /dev/vfio/7 (fd 4)"},
      {"GroupNotViable",
       [](FakeVfioKernelOptions& o) { o.groups[0].viable = false; },
       nothing,
       {kGroup7},
       EPERM,
       "VFIO group /dev/vfio/7 is not viable"},
      {"SecondGroupNotViable",
       [](FakeVfioKernelOptions& o) { o.groups[1].viable = false; },
       nothing,
       {kGroup7, kGroup8},
       EPERM,
       "VFIO group /dev/vfio/8 is not viable"},
      {"SetContainerEbusy",
       none,
       inject(VFIO_GROUP_SET_CONTAINER, 1, EBUSY),
       {kGroup7},
       EBUSY,
       "VFIO_GROUP_SET_CONTAINER(container fd 3) on /dev/vfio/7 (fd 4)"},
      {"SecondSetContainerEinval",
       none,
       inject(VFIO_GROUP_SET_CONTAINER, 2, EINVAL),
       {kGroup7, kGroup8},
       EINVAL,
       "on /dev/vfio/8 (fd 5)"},
      {"SetIommuEperm",
       none,
       inject(VFIO_SET_IOMMU, 1, EPERM),
       {kGroup7},
       EPERM,
       "VFIO_SET_IOMMU(" + type + ") on container fd 3"},
      {"SetIommuEnodev",
       none,
       inject(VFIO_SET_IOMMU, 1, ENODEV),
       {kGroup7},
       ENODEV,
       "VFIO_SET_IOMMU(" + type + ")"},
      {"InfoFails", none, inject(VFIO_IOMMU_GET_INFO, 1, ENOTTY), {kGroup7}, ENOTTY, info},
      {"NoGroups", none, nothing, {}, EINVAL, "no IOMMU group"},
  };
}

class OpenFailureTest : public ::testing::TestWithParam<std::tuple<Kind, int>> {};

TEST_P(OpenFailureTest, AnswersTheErrnoAndClosesEverything) {
  const Kind kind = std::get<0>(GetParam());
  const OpenFailure failure = OpenFailures(kind)[std::get<1>(GetParam())];
  SCOPED_TRACE(KindName(kind) + "/" + failure.name);
  FakeVfioKernelOptions options = OptionsFor(kind);
  failure.configure(options);
  FakeVfioKernel kernel(options);
  failure.script(kernel);
  std::unique_ptr<VfioContainerDriver> driver = MakeDriver(kind, &kernel);

  absl::Status status = driver->Open(failure.groups);
  EXPECT_EQ(ErrnoOf(status), failure.err) << status;
  EXPECT_EQ(status.code(), StatusCodeForErrno(failure.err)) << status;
  EXPECT_THAT(status.message(), HasSubstr(failure.message));
  EXPECT_THAT(std::string(status.message()), HasSubstr(ErrnoName(failure.err) + ": "));
  EXPECT_FALSE(driver->is_open());
  EXPECT_EQ(driver->container_fd(), -1);
  ExpectNoFdLeak(kernel);
  EXPECT_EQ(ErrnoOf(driver->DmaWindow().status()), EBADF);
  EXPECT_EQ(ErrnoOf(driver->RegisterMemory(0, k64K)), EBADF);
}

std::string OpenFailureName(const ::testing::TestParamInfo<std::tuple<Kind, int>>& info) {
  return KindName(std::get<0>(info.param)) +
         OpenFailures(std::get<0>(info.param))[std::get<1>(info.param)].name;
}

INSTANTIATE_TEST_SUITE_P(AllPoints, OpenFailureTest,
                         ::testing::Combine(::testing::Values(Kind::kSpapr, Kind::kType1),
                                            ::testing::Range(0, 19)),
                         OpenFailureName);

TEST(OpenFailureListTest, CoversEveryCase) {
  EXPECT_THAT(OpenFailures(Kind::kSpapr), SizeIs(19));  // keep in step with Range(0, 19)
}

class BothDriversTest : public ::testing::TestWithParam<Kind> {};

TEST_P(BothDriversTest, ReopenAfterFailureAndTwiceOpenIsEbusy) {
  FakeVfioKernel kernel(OptionsFor(GetParam()));
  kernel.InjectIoctlErrno(VFIO_SET_IOMMU, 1, EPERM);
  std::unique_ptr<VfioContainerDriver> driver = MakeDriver(GetParam(), &kernel);
  EXPECT_EQ(ErrnoOf(driver->Open({kGroup7})), EPERM);
  ASSERT_TRUE(driver->Open({kGroup7}).ok());  // the group was released by the failed attempt
  absl::Status again = driver->Open({kGroup8});
  EXPECT_EQ(ErrnoOf(again), EBUSY) << again;
  EXPECT_THAT(kernel.OpenFds(), SizeIs(2));
  driver.reset();  // the destructor closes
  ExpectNoFdLeak(kernel);
}

TEST_P(BothDriversTest, OperationsNeedAnOpenContainer) {
  FakeVfioKernel kernel(OptionsFor(GetParam()));
  std::unique_ptr<VfioContainerDriver> driver = MakeDriver(GetParam(), &kernel);
  for (const absl::Status& status :
       {driver->RegisterMemory(0, k64K), driver->UnregisterMemory(0, k64K),
        driver->MapDma(0, 0, k64K), driver->UnmapDma(0, k64K), driver->DmaWindow().status()}) {
    EXPECT_EQ(ErrnoOf(status), EBADF) << status;
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  }
  EXPECT_THAT(kernel.calls(), IsEmpty());
}

TEST_P(BothDriversTest, CloseReportsTheFirstCloseErrorButClosesEverything) {
  FakeVfioKernel kernel(OptionsFor(GetParam()));
  std::unique_ptr<VfioContainerDriver> driver = MakeDriver(GetParam(), &kernel);
  ASSERT_TRUE(driver->Open({kGroup7, kGroup8}).ok());
  kernel.InjectCloseErrno(2, EIO);
  absl::Status status = driver->Close();
  EXPECT_EQ(ErrnoOf(status), EIO) << status;
  EXPECT_THAT(status.message(), HasSubstr("close VFIO group fd 4"));
  EXPECT_THAT(kernel.OpenFds(), IsEmpty());
  EXPECT_FALSE(driver->is_open());
}

TEST_P(BothDriversTest, CloseReleasesTheKernelState) {
  const Kind kind = GetParam();
  FakeVfioKernel kernel(OptionsFor(kind));
  std::unique_ptr<VfioContainerDriver> driver = MakeDriver(kind, &kernel);
  ASSERT_TRUE(driver->Open({kGroup7}).ok());
  ASSERT_TRUE(driver->RegisterMemory(0x10000000, 16 * k64K).ok());
  ASSERT_TRUE(driver->MapDma(0x100000, 0x10000000, 4 * 4 * kKiB).ok());
  EXPECT_GT(kernel.locked_pages(), 0u);
  ASSERT_TRUE(driver->Close().ok());
  EXPECT_EQ(kernel.locked_pages(), 0u);
  EXPECT_THAT(kernel.SpaprRegions(), IsEmpty());
  EXPECT_THAT(kernel.SpaprTces(), IsEmpty());
  EXPECT_THAT(kernel.Type1Dmas(), IsEmpty());
  ExpectNoFdLeak(kernel);
}

TEST_P(BothDriversTest, FactoryByBackendName) {
  FakeVfioKernel kernel(OptionsFor(GetParam()));
  const std::string name = GetParam() == Kind::kSpapr ? "vfio-spapr-v2" : "vfio-type1";
  std::unique_ptr<VfioContainerDriver> driver = NewVfioContainerDriver(name, &kernel);
  ASSERT_NE(driver, nullptr);
  EXPECT_EQ(driver->name(), name);
  EXPECT_EQ(driver->iommu_type(), IommuType(GetParam()));
  EXPECT_EQ(NewVfioContainerDriver("memlock", &kernel), nullptr);
}

INSTANTIATE_TEST_SUITE_P(Drivers, BothDriversTest, ::testing::Values(Kind::kSpapr, Kind::kType1),
                         [](const ::testing::TestParamInfo<Kind>& info) {
                           return KindName(info.param);
                         });

// ---------------------------------------------------------------------------------------------
// SPAPR: the argument structs, and the kernel's answers passed through.

class SpaprTest : public ::testing::Test {
 protected:
  explicit SpaprTest(FakeVfioKernelOptions options = OptionsFor(Kind::kSpapr))
      : kernel_(options), driver_(&kernel_) {}
  void SetUp() override {
    ASSERT_TRUE(driver_.Open({kGroup7}).ok());
    kernel_.ClearCalls();
  }

  FakeVfioCall LastCall() const { return kernel_.calls().back(); }

  static constexpr uint64_t kUa = 0x7fff00000000;
  FakeVfioKernel kernel_;
  SpaprTceV2Driver driver_;
};

TEST_F(SpaprTest, PassesTheExactStructs) {
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 16 * k64K).ok());
  FakeVfioCall call = LastCall();
  EXPECT_EQ(call.ToString(), "ioctl(3, VFIO_IOMMU_SPAPR_REGISTER_MEMORY)=0");
  auto reg = call.ArgAs<vfio_iommu_spapr_register_memory>();
  EXPECT_EQ(reg.argsz, 24u);
  EXPECT_EQ(reg.flags, 0u);
  EXPECT_EQ(reg.vaddr, kUa);
  EXPECT_EQ(reg.size, 16 * k64K);

  ASSERT_TRUE(driver_.MapDma(0x20000, kUa + k64K, 8 * 4 * kKiB).ok());
  call = LastCall();
  EXPECT_EQ(call.ToString(), "ioctl(3, VFIO_IOMMU_MAP_DMA)=0");
  auto map = call.ArgAs<vfio_iommu_type1_dma_map>();
  EXPECT_EQ(map.argsz, 32u);
  EXPECT_EQ(map.flags, static_cast<uint32_t>(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE));
  EXPECT_EQ(map.vaddr, kUa + k64K);
  EXPECT_EQ(map.iova, 0x20000u);
  EXPECT_EQ(map.size, 8 * 4 * kKiB);

  ASSERT_TRUE(driver_.UnmapDma(0x20000, 8 * 4 * kKiB).ok());
  call = LastCall();
  EXPECT_EQ(call.ToString(), "ioctl(3, VFIO_IOMMU_UNMAP_DMA)=0");
  auto unmap = call.ArgAs<vfio_iommu_type1_dma_unmap>();
  EXPECT_EQ(unmap.argsz, 24u);
  EXPECT_EQ(unmap.flags, 0u);
  EXPECT_EQ(unmap.iova, 0x20000u);
  EXPECT_EQ(unmap.size, 8 * 4 * kKiB);

  ASSERT_TRUE(driver_.UnregisterMemory(kUa, 16 * k64K).ok());
  call = LastCall();
  EXPECT_EQ(call.ToString(), "ioctl(3, VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY)=0");
  reg = call.ArgAs<vfio_iommu_spapr_register_memory>();
  EXPECT_EQ(reg.argsz, 24u);
  EXPECT_EQ(reg.flags, 0u);
  EXPECT_EQ(reg.vaddr, kUa);
  EXPECT_EQ(reg.size, 16 * k64K);
  EXPECT_THAT(kernel_.calls(), SizeIs(4));  // one ioctl per operation, nothing else
}

// The sequence seen on a real 6.12 ppc64 kernel (notes/vfio-under-qemu.md), through the driver.
TEST_F(SpaprTest, KernelAnswersPassThrough) {
  EXPECT_EQ(ErrnoOf(driver_.MapDma(0, kUa, 4 * kKiB)), EPERM);  // before any register
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 16 * k64K).ok());
  EXPECT_EQ(kernel_.locked_pages(), 16u);

  absl::Status twice = driver_.RegisterMemory(kUa, 16 * k64K);
  EXPECT_EQ(ErrnoOf(twice), EBUSY) << twice;
  EXPECT_THAT(twice.message(),
              HasSubstr("VFIO_IOMMU_SPAPR_REGISTER_MEMORY(vaddr=0x7fff00000000, size=0x100000) "
                        "on container fd 3"));
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemory(kUa + k64K, 16 * k64K)), EINVAL);  // overlap
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemory(kUa + 4096, k64K)), EINVAL);       // misaligned
  EXPECT_TRUE(driver_.RegisterMemory(kUa + 16 * k64K, k64K).ok());            // adjacent

  ASSERT_TRUE(driver_.MapDma(0, kUa, 4 * 4 * kKiB).ok());
  EXPECT_THAT(kernel_.SpaprTces(), SizeIs(4));
  EXPECT_EQ(kernel_.SpaprRegions()[0].mapped, 5u);
  EXPECT_EQ(ErrnoOf(driver_.MapDma(2 * kGiB, kUa, 4 * kKiB)), ENXIO);      // outside the window
  EXPECT_EQ(ErrnoOf(driver_.MapDma(0x100000, 0x1000, 4 * kKiB)), EINVAL);  // not registered
  EXPECT_EQ(ErrnoOf(driver_.MapDma(0x100000, kUa + 17 * k64K - 4096, 8 * kKiB)),
            EINVAL);  // runs past the registered memory: rolled back
  EXPECT_THAT(kernel_.SpaprTces(), SizeIs(4));

  // Linux 5.1+: the last unregister of a mapped region answers 0 and orphans the region. The
  // driver passes that on; the registry must have refused earlier (spec §3.4).
  EXPECT_TRUE(driver_.UnregisterMemory(kUa, 16 * k64K).ok());
  ASSERT_THAT(kernel_.SpaprRegions(), SizeIs(2));
  EXPECT_EQ(kernel_.SpaprRegions()[0].holders, 0);
  EXPECT_EQ(kernel_.SpaprRegions()[0].used, 1u);
  ASSERT_TRUE(driver_.UnmapDma(0, 4 * 4 * kKiB).ok());
  EXPECT_EQ(ErrnoOf(driver_.UnregisterMemory(kUa, 16 * k64K)), ENOENT);
  EXPECT_EQ(kernel_.locked_pages(), 17u);  // the orphan stays pinned
}

class SpaprLegacyTest : public SpaprTest {
 protected:
  static FakeVfioKernelOptions Legacy() {
    FakeVfioKernelOptions options = OptionsFor(Kind::kSpapr);
    options.unregister_mapped_ebusy = true;
    return options;
  }
  SpaprLegacyTest() : SpaprTest(Legacy()) {}
};

TEST_F(SpaprLegacyTest, PreLinux51AnswersEbusy) {
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 16 * k64K).ok());
  ASSERT_TRUE(driver_.MapDma(0, kUa, 4 * kKiB).ok());
  absl::Status busy = driver_.UnregisterMemory(kUa, 16 * k64K);
  EXPECT_EQ(ErrnoOf(busy), EBUSY) << busy;
  EXPECT_EQ(busy.code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(driver_.UnmapDma(0, 4 * kKiB).ok());
  EXPECT_TRUE(driver_.UnregisterMemory(kUa, 16 * k64K).ok());
  EXPECT_EQ(kernel_.locked_pages(), 0u);
}

TEST_F(SpaprTest, TwoContainersShareARegion) {
  SpaprTceV2Driver other(&kernel_);
  ASSERT_TRUE(other.Open({kGroup8}).ok());
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 16 * k64K).ok());
  ASSERT_TRUE(other.RegisterMemory(kUa, 16 * k64K).ok());
  ASSERT_THAT(kernel_.SpaprRegions(), SizeIs(1));
  EXPECT_EQ(kernel_.SpaprRegions()[0].used, 2u);
  EXPECT_EQ(kernel_.locked_pages(), 16u);  // pinned once
  ASSERT_TRUE(other.Close().ok());
  EXPECT_EQ(kernel_.SpaprRegions()[0].used, 1u);
  ASSERT_TRUE(driver_.UnregisterMemory(kUa, 16 * k64K).ok());
  EXPECT_THAT(kernel_.SpaprRegions(), IsEmpty());
}

// ---------------------------------------------------------------------------------------------
// Type1: pinning through the reserved range.

class Type1Test : public ::testing::Test {
 protected:
  explicit Type1Test(FakeVfioKernelOptions options = OptionsFor(Kind::kType1),
                     Type1Options type1 = {})
      : kernel_(options), driver_(&kernel_, type1) {}
  void SetUp() override {
    ASSERT_TRUE(driver_.Open({kGroup7}).ok());
    reserved_ = *driver_.ReservedIovaRange();
    kernel_.ClearCalls();
  }

  FakeVfioCall LastCall() const { return kernel_.calls().back(); }

  static constexpr uint64_t kUa = 0x7f0000000000;
  FakeVfioKernel kernel_;
  Type1Driver driver_;
  VfioIovaRange reserved_;
};

TEST_F(Type1Test, RegisterUnregisterRoundTripInTheReservedRange) {
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  FakeVfioCall call = LastCall();
  EXPECT_EQ(call.ToString(), "ioctl(3, VFIO_IOMMU_MAP_DMA)=0");
  auto map = call.ArgAs<vfio_iommu_type1_dma_map>();
  EXPECT_EQ(map.argsz, 32u);
  EXPECT_EQ(map.flags, static_cast<uint32_t>(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE));
  EXPECT_EQ(map.vaddr, kUa);
  EXPECT_EQ(map.iova, reserved_.start);
  EXPECT_EQ(map.size, 2 * kMiB);
  EXPECT_EQ(*driver_.PinIova(kUa, 2 * kMiB), reserved_.start);
  EXPECT_EQ(kernel_.locked_pages(), 512u);

  // A second region goes right after the first.
  ASSERT_TRUE(driver_.RegisterMemory(kUa + 4 * kMiB, 1 * kMiB).ok());
  EXPECT_EQ(*driver_.PinIova(kUa + 4 * kMiB, 1 * kMiB), reserved_.start + 2 * kMiB);
  ASSERT_THAT(kernel_.Type1Dmas(), SizeIs(2));

  ASSERT_TRUE(driver_.UnregisterMemory(kUa, 2 * kMiB).ok());
  call = LastCall();
  EXPECT_EQ(call.ToString(), "ioctl(3, VFIO_IOMMU_UNMAP_DMA)=0");
  auto unmap = call.ArgAs<vfio_iommu_type1_dma_unmap>();
  EXPECT_EQ(unmap.argsz, 24u);
  EXPECT_EQ(unmap.flags, 0u);
  EXPECT_EQ(unmap.iova, reserved_.start);
  EXPECT_EQ(unmap.size, 2 * kMiB);
  EXPECT_EQ(ErrnoOf(driver_.PinIova(kUa, 2 * kMiB).status()), ENOENT);
  EXPECT_EQ(kernel_.locked_pages(), 256u);

  // First fit: the freed hole is reused.
  ASSERT_TRUE(driver_.RegisterMemory(kUa + 8 * kMiB, 2 * kMiB).ok());
  EXPECT_EQ(*driver_.PinIova(kUa + 8 * kMiB, 2 * kMiB), reserved_.start);

  ASSERT_TRUE(driver_.UnregisterMemory(kUa + 4 * kMiB, 1 * kMiB).ok());
  ASSERT_TRUE(driver_.UnregisterMemory(kUa + 8 * kMiB, 2 * kMiB).ok());
  EXPECT_THAT(kernel_.Type1Dmas(), IsEmpty());
  EXPECT_EQ(kernel_.locked_pages(), 0u);
}

// ---------------------------------------------------------------------------------------------
// The device handoff and a restarted agent taking the container back (one fake fd table plays
// the agent and the VMM; destroying a driver is the agent's exit: its descriptors close).

TEST_F(Type1Test, RegisterMemoryAtPutsThePinWhereAsked) {
  const uint64_t at = *driver_.FreeDeviceIova(2 * kMiB);
  EXPECT_EQ(at, reserved_.start);
  ASSERT_TRUE(driver_.RegisterMemoryAt(kUa, 1 * kMiB, at + 1 * kMiB).ok());
  ASSERT_TRUE(driver_.RegisterMemoryAt(kUa + 1 * kMiB, 1 * kMiB, at).ok());
  EXPECT_EQ(*driver_.PinIova(kUa, 1 * kMiB), at + 1 * kMiB);
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemoryAt(kUa + 4 * kMiB, 1 * kMiB, at)), ENOSPC);  // taken
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemoryAt(kUa + 4 * kMiB, 1 * kMiB, 0x100000)), ENOSPC);
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemoryAt(kUa + 4 * kMiB, 1 * kMiB, at + 100)), EINVAL);
  EXPECT_EQ(*driver_.FreeDeviceIova(4096), at + 2 * kMiB);
}

TEST_F(Type1Test, DevicesAndAContainerDuplicateKeepTheMappingsAfterTheAgentIsGone) {
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  ASSERT_TRUE(driver_.MapDma(0x100000, kUa, 64 * kKiB).ok());
  EXPECT_EQ(ErrnoOf(driver_.OpenDevice("0000:00:08.0").status()), ENODEV);  // group 8's
  EXPECT_EQ(ErrnoOf(driver_.OpenDevice("").status()), EINVAL);
  const int device = *driver_.OpenDevice("0000:00:07.0");
  const int container = *driver_.DupContainer();
  // The agent exits: its group and container descriptors close.
  ASSERT_TRUE(driver_.Close().ok());
  EXPECT_THAT(kernel_.Type1Dmas(), SizeIs(2));       // kept for the device
  EXPECT_EQ(kernel_.Open(kGroup7, O_RDWR), -EBUSY);  // the device holds it
  EXPECT_EQ(kernel_.Close(device), 0);               // the VMM lets go
  EXPECT_THAT(kernel_.Type1Dmas(), IsEmpty());       // and the mappings go
  EXPECT_EQ(kernel_.Close(container), 0);
}

TEST_F(Type1Test, AdoptAfterACrashMovesEveryMappingToTheNewAddresses) {
  const uint64_t pin = *driver_.FreeDeviceIova(2 * kMiB);
  ASSERT_TRUE(driver_.RegisterMemoryAt(kUa, 2 * kMiB, pin).ok());
  ASSERT_TRUE(driver_.MapDma(0x100000, kUa, 64 * kKiB).ok());
  ASSERT_TRUE(driver_.MapDma(0x200000, kUa + 64 * kKiB, 64 * kKiB).ok());
  const int device = *driver_.OpenDevice("0000:00:07.0");
  const int kept = *driver_.DupContainer();
  ASSERT_TRUE(driver_.Close().ok());  // kill -9: nothing invalidated

  constexpr uint64_t kNewUa = 0x7e0000000000;
  Type1Driver restarted(&kernel_);
  ASSERT_TRUE(restarted.Adopt(kernel_.Dup(kept)).ok());
  EXPECT_EQ(restarted.ReservedIovaRange()->start, reserved_.start);
  EXPECT_EQ(restarted.ReservedIovaRange()->last, reserved_.last);
  ASSERT_TRUE(restarted.AdoptRegistration(kNewUa, 2 * kMiB, pin).ok());
  ASSERT_TRUE(restarted.AdoptMapping(0x100000, kNewUa, 64 * kKiB).ok());
  // Not this container's mapping: ENOENT, and nothing changed.
  EXPECT_EQ(ErrnoOf(restarted.AdoptMapping(0x300000, kNewUa, 64 * kKiB)), ENOENT);
  // Another size than the kernel's: EINVAL.
  EXPECT_EQ(ErrnoOf(restarted.AdoptMapping(0x200000, kNewUa + 64 * kKiB, 128 * kKiB)), EINVAL);
  for (const FakeType1Dma& dma : kernel_.Type1Dmas()) {
    if (dma.iova == 0x200000) {
      EXPECT_TRUE(dma.vaddr_invalid);  // the failed adopt left it invalid, still mapped
    } else {
      EXPECT_FALSE(dma.vaddr_invalid) << dma.iova;
      EXPECT_EQ(dma.vaddr, kNewUa);
    }
  }
  // The restarted agent maps and unmaps as before, and its release clears what it adopted.
  ASSERT_TRUE(restarted.MapDma(0x400000, kNewUa + 128 * kKiB, 64 * kKiB).ok());
  ASSERT_TRUE(restarted.UnmapDma(0x100000, 64 * kKiB).ok());
  EXPECT_EQ(ErrnoOf(restarted.OpenDevice("0000:00:07.0").status()), ENODEV);  // the VMM's
  ASSERT_TRUE(restarted.ClearAll().ok());
  std::vector<uint64_t> left;
  for (const FakeType1Dma& dma : kernel_.Type1Dmas()) left.push_back(dma.iova);
  EXPECT_THAT(left, ElementsAre(0x200000));  // what it could not adopt
  ASSERT_TRUE(restarted.Close().ok());
  EXPECT_EQ(kernel_.Close(device), 0);
  EXPECT_EQ(kernel_.Close(kept), 0);
  EXPECT_THAT(kernel_.Type1Dmas(), IsEmpty());
  EXPECT_THAT(kernel_.OpenFds(), IsEmpty());
}

TEST_F(Type1Test, AMappingTheRecordsMissAfterACrashIsReplacedByTheNextMapThere) {
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  ASSERT_TRUE(driver_.MapDma(0x100000, kUa, 64 * kKiB).ok());  // the agent died before recording it
  const int device = *driver_.OpenDevice("0000:00:07.0");
  const int kept = *driver_.DupContainer();
  ASSERT_TRUE(driver_.Close().ok());
  Type1Driver restarted(&kernel_);
  ASSERT_TRUE(restarted.Adopt(kernel_.Dup(kept)).ok());
  ASSERT_TRUE(restarted.MapDma(0x100000, kUa + 64 * kKiB, 64 * kKiB).ok());
  EXPECT_EQ(restarted.unrecorded_mappings_replaced(), 1u);
  ASSERT_TRUE(restarted.Close().ok());
  EXPECT_EQ(kernel_.Close(device), 0);
  EXPECT_EQ(kernel_.Close(kept), 0);
}

TEST_F(Type1Test, AdoptAfterAPlannedExitSetsTheInvalidatedAddresses) {
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  ASSERT_TRUE(driver_.MapDma(0x100000, kUa, 64 * kKiB).ok());
  const uint64_t pin = *driver_.PinIova(kUa, 2 * kMiB);
  const int device = *driver_.OpenDevice("0000:00:07.0");
  const int kept = *driver_.DupContainer();
  ASSERT_TRUE(driver_.InvalidateAddresses().ok());
  for (const FakeType1Dma& dma : kernel_.Type1Dmas()) EXPECT_TRUE(dma.vaddr_invalid);
  ASSERT_TRUE(driver_.Close().ok());

  Type1Driver restarted(&kernel_);
  ASSERT_TRUE(restarted.Adopt(kept).ok());
  kernel_.ClearCalls();
  ASSERT_TRUE(restarted.AdoptRegistration(kUa + 4 * kMiB, 2 * kMiB, pin).ok());
  // One call: the address was invalid already.
  EXPECT_THAT(kernel_.CallLog(), ElementsAre(::testing::EndsWith(", VFIO_IOMMU_MAP_DMA)=0")));
  EXPECT_EQ(kernel_.calls().back().ArgAs<vfio_iommu_type1_dma_map>().flags,
            static_cast<uint32_t>(VFIO_DMA_MAP_FLAG_VADDR));
  ASSERT_TRUE(restarted.AdoptMapping(0x100000, kUa + 4 * kMiB, 64 * kKiB).ok());
  for (const FakeType1Dma& dma : kernel_.Type1Dmas()) EXPECT_FALSE(dma.vaddr_invalid);
  ASSERT_TRUE(restarted.Close().ok());
  EXPECT_EQ(kernel_.Close(device), 0);
}

TEST_F(Type1Test, AdoptRefusesWhatIsNotALiveContainer) {
  const int device = *driver_.OpenDevice("0000:00:07.0");
  const int kept = *driver_.DupContainer();
  // Not a container: a device fd answers ENOTTY.
  Type1Driver restarted(&kernel_);
  EXPECT_EQ(ErrnoOf(restarted.Adopt(kernel_.Dup(device))), ENOTTY);
  EXPECT_FALSE(restarted.is_open());
  // A container that lost its groups (the VMM closed its devices): ENODEV.
  ASSERT_TRUE(driver_.Close().ok());
  EXPECT_EQ(kernel_.Close(device), 0);
  EXPECT_EQ(ErrnoOf(restarted.Adopt(kept)), ENODEV);
  EXPECT_FALSE(restarted.is_open());
  EXPECT_THAT(kernel_.OpenFds(), IsEmpty());  // every descriptor given to Adopt was closed
}

TEST(SpaprAdoptTest, ContainersCannotBeTakenBackButDevicesCanBeHandedOff) {
  FakeVfioKernel kernel(OptionsFor(Kind::kSpapr));
  SpaprTceV2Driver driver(&kernel);
  ASSERT_TRUE(driver.Open({kGroup7}).ok());
  ASSERT_TRUE(driver.RegisterMemory(0x7f0000000000, 1 * kMiB).ok());
  ASSERT_TRUE(driver.MapDma(0, 0x7f0000000000, 64 * kKiB).ok());
  const int device = *driver.OpenDevice("0000:00:07.0");
  EXPECT_FALSE(driver.can_adopt());
  SpaprTceV2Driver other(&kernel);
  EXPECT_EQ(ErrnoOf(other.Adopt(*driver.DupContainer())), EOPNOTSUPP);
  // A release while the VMM holds the device clears the TCEs and the registration itself.
  ASSERT_TRUE(driver.ClearAll().ok());
  EXPECT_THAT(kernel.SpaprTces(), IsEmpty());
  EXPECT_THAT(kernel.SpaprRegions(), IsEmpty());
  ASSERT_TRUE(driver.Close().ok());
  EXPECT_EQ(kernel.Close(device), 0);
  EXPECT_THAT(kernel.OpenFds(), IsEmpty());
}

TEST_F(Type1Test, PerContainerRulesAnsweredWithoutTheKernel) {
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  kernel_.ClearCalls();
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemory(kUa, 2 * kMiB)), EBUSY);
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemory(kUa + 1 * kMiB, 2 * kMiB)), EINVAL);   // overlap
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemory(kUa + 100, 4096)), EINVAL);            // misaligned
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemory(kUa + 8 * kMiB, 0)), EINVAL);          // empty
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemory(~uint64_t{0} - 4095, 8192)), EINVAL);  // wraps
  EXPECT_EQ(ErrnoOf(driver_.UnregisterMemory(kUa, 1 * kMiB)), ENOENT);            // no bisecting
  EXPECT_EQ(ErrnoOf(driver_.UnregisterMemory(kUa + 8 * kMiB, 4096)), ENOENT);
  EXPECT_EQ(ErrnoOf(driver_.UnregisterMemory(kUa + 1, 4096)), EINVAL);
  EXPECT_THAT(kernel_.calls(), IsEmpty());
  EXPECT_TRUE(driver_.RegisterMemory(kUa + 2 * kMiB, 4096).ok());  // adjacent
}

TEST_F(Type1Test, GuestMapPinsTheSameUaAgainOutsideTheReservedRange) {
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  ASSERT_TRUE(driver_.MapDma(0x100000, kUa + 64 * kKiB, 64 * kKiB).ok());
  auto map = LastCall().ArgAs<vfio_iommu_type1_dma_map>();
  EXPECT_EQ(map.iova, 0x100000u);
  EXPECT_EQ(map.vaddr, kUa + 64 * kKiB);
  EXPECT_EQ(map.size, 64 * kKiB);
  EXPECT_EQ(map.flags, static_cast<uint32_t>(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE));
  // Type1 accounts every vfio_dma: the guest mapping counts again in locked_vm.
  EXPECT_EQ(kernel_.locked_pages(), 512u + 16u);

  kernel_.ClearCalls();
  EXPECT_EQ(ErrnoOf(driver_.MapDma(reserved_.start, kUa, 4096)), ENXIO);
  EXPECT_EQ(ErrnoOf(driver_.MapDma(reserved_.start - 4096, kUa, 8192)), ENXIO);
  EXPECT_EQ(ErrnoOf(driver_.UnmapDma(reserved_.start, 2 * kMiB)), ENXIO);
  EXPECT_EQ(ErrnoOf(driver_.UnmapDma(0, ~uint64_t{0})), ENXIO);
  EXPECT_THAT(kernel_.calls(), IsEmpty());  // a guest request never reaches the pin range

  // Kernel answers passed through.
  EXPECT_EQ(ErrnoOf(driver_.MapDma(0x200000, kUa, 100)), EINVAL);
  EXPECT_EQ(ErrnoOf(driver_.MapDma(0xfee00000, kUa, 4096)), EINVAL);  // the MSI hole

  // A remap replaces (spec §7.4) although the kernel would answer EEXIST: the driver unmaps the
  // old mapping and maps back the part the new one does not cover.
  ASSERT_TRUE(driver_.MapDma(0x100000, kUa, 4096).ok());
  auto guest_dmas = [&] {
    std::vector<std::pair<uint64_t, uint64_t>> dmas;  // (iova, size) below the pin range
    for (const FakeType1Dma& dma : kernel_.Type1Dmas()) {
      if (dma.iova < reserved_.start) dmas.emplace_back(dma.iova, dma.size);
    }
    return dmas;
  };
  using Dmas = std::vector<std::pair<uint64_t, uint64_t>>;
  EXPECT_EQ(guest_dmas(), (Dmas{{0x100000, 4096}, {0x101000, 60 * kKiB}}));
  // Unmapping part of a mapping, which type1 refuses (EINVAL), unmaps it and maps the rest back.
  kernel_.ClearCalls();
  ASSERT_TRUE(driver_.UnmapDma(0x101000, 4096).ok());
  EXPECT_EQ(guest_dmas(), (Dmas{{0x100000, 4096}, {0x102000, 56 * kKiB}}));
  auto remap = LastCall().ArgAs<vfio_iommu_type1_dma_map>();
  EXPECT_EQ(remap.iova, 0x102000u);
  EXPECT_EQ(remap.vaddr, kUa + 64 * kKiB + 8 * kKiB);

  ASSERT_TRUE(driver_.UnmapDma(0x100000, 64 * kKiB).ok());
  auto unmap = LastCall().ArgAs<vfio_iommu_type1_dma_unmap>();
  EXPECT_EQ(unmap.argsz, 24u);
  EXPECT_EQ(unmap.flags, 0u);
  EXPECT_EQ(unmap.iova, 0x102000u);
  EXPECT_EQ(unmap.size, 56 * kKiB);
  EXPECT_THAT(guest_dmas(), IsEmpty());
  EXPECT_TRUE(driver_.UnmapDma(0x100000, 64 * kKiB).ok());  // nothing there: OK, as in §7
  EXPECT_EQ(kernel_.locked_pages(), 512u);
  // The pin survived the guest unmaps.
  ASSERT_THAT(kernel_.Type1Dmas(), SizeIs(1));
  EXPECT_EQ(kernel_.Type1Dmas()[0].iova, reserved_.start);
}

TEST_F(Type1Test, UnregisterWhileMappedIsNotEbusyHere) {
  // Spec §3.4 lives in the registry: type1 guest mappings hold their own pins.
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  ASSERT_TRUE(driver_.MapDma(0x100000, kUa, 64 * kKiB).ok());
  EXPECT_TRUE(driver_.UnregisterMemory(kUa, 2 * kMiB).ok());
  ASSERT_THAT(kernel_.Type1Dmas(), SizeIs(1));
  EXPECT_EQ(kernel_.Type1Dmas()[0].iova, 0x100000u);
}

TEST_F(Type1Test, MemlockLimitIsEnomem) {
  FakeVfioKernelOptions options = OptionsFor(Kind::kType1);
  options.memlock_limit_pages = 600;
  FakeVfioKernel kernel(options);
  Type1Driver driver(&kernel);
  ASSERT_TRUE(driver.Open({kGroup7}).ok());
  ASSERT_TRUE(driver.RegisterMemory(kUa, 2 * kMiB).ok());  // 512 pages
  // 128 more pages of accounting for already pinned memory exceed the limit.
  absl::Status status = driver.MapDma(0x100000, kUa, 512 * kKiB);
  EXPECT_EQ(ErrnoOf(status), ENOMEM) << status;
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(Type1Test, KernelRejectedPinLeavesNoRecord) {
  kernel_.InjectIoctlErrno(VFIO_IOMMU_MAP_DMA, 1, EFAULT);
  absl::Status status = driver_.RegisterMemory(kUa, 2 * kMiB);
  EXPECT_EQ(ErrnoOf(status), EFAULT) << status;
  EXPECT_THAT(status.message(), HasSubstr("[pin range]"));
  EXPECT_EQ(ErrnoOf(driver_.PinIova(kUa, 2 * kMiB).status()), ENOENT);
  EXPECT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  EXPECT_EQ(*driver_.PinIova(kUa, 2 * kMiB), reserved_.start);
}

TEST_F(Type1Test, KernelRejectedUnpinKeepsTheRecord) {
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  kernel_.InjectIoctlErrno(VFIO_IOMMU_UNMAP_DMA, 1, EPERM);
  EXPECT_EQ(ErrnoOf(driver_.UnregisterMemory(kUa, 2 * kMiB)), EPERM);
  EXPECT_TRUE(driver_.PinIova(kUa, 2 * kMiB).ok());
  EXPECT_TRUE(driver_.UnregisterMemory(kUa, 2 * kMiB).ok());
}

class SmallReservedType1Test : public Type1Test {
 protected:
  static Type1Options Small() {
    Type1Options options;
    options.reserved_iova_size = 3 * kMiB;
    return options;
  }
  SmallReservedType1Test() : Type1Test(OptionsFor(Kind::kType1), Small()) {}
};

TEST_F(SmallReservedType1Test, FullPinRangeIsEnospc) {
  EXPECT_EQ(reserved_.last - reserved_.start + 1, 3 * kMiB);
  EXPECT_EQ(reserved_.last, (uint64_t{1} << 39) - 1);
  ASSERT_TRUE(driver_.RegisterMemory(kUa, 2 * kMiB).ok());
  absl::Status full = driver_.RegisterMemory(kUa + 4 * kMiB, 2 * kMiB);
  EXPECT_EQ(ErrnoOf(full), ENOSPC) << full;
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(driver_.RegisterMemory(kUa + 4 * kMiB, 1 * kMiB).ok());  // exactly fills it
  EXPECT_EQ(ErrnoOf(driver_.RegisterMemory(kUa + 8 * kMiB, 4096)), ENOSPC);
}

// ---------------------------------------------------------------------------------------------
// Every errno the kernel may give, on every operation of both drivers, comes back as an
// ErrnoStatus with that errno, its spec §9 code, and a message naming the ioctl and arguments.

struct OpCase {
  std::string name;
  unsigned long request;  // NOLINT(runtime/int)
  std::function<absl::Status(VfioContainerDriver&)> run;
  std::string message;
};

constexpr uint64_t kOpUa = 0x7e0000000000;

std::vector<OpCase> OpCases(Kind kind) {
  if (kind == Kind::kSpapr) {
    return {
        {"Register", VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
         [](VfioContainerDriver& d) { return d.RegisterMemory(kOpUa + 32 * k64K, k64K); },
         "VFIO_IOMMU_SPAPR_REGISTER_MEMORY(vaddr=0x7e0000200000, size=0x10000) on container fd 3"},
        {"Unregister", VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY,
         [](VfioContainerDriver& d) { return d.UnregisterMemory(kOpUa, 16 * k64K); },
         "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY(vaddr=0x7e0000000000, size=0x100000) on container "
         "fd 3"},
        {"Map", VFIO_IOMMU_MAP_DMA,
         [](VfioContainerDriver& d) { return d.MapDma(0x20000, kOpUa, 8192); },
         "VFIO_IOMMU_MAP_DMA(iova=0x20000, vaddr=0x7e0000000000, size=0x2000) on container fd 3"},
        {"Unmap", VFIO_IOMMU_UNMAP_DMA,
         [](VfioContainerDriver& d) { return d.UnmapDma(0x10000, 8192); },
         "VFIO_IOMMU_UNMAP_DMA(iova=0x10000, size=0x2000) on container fd 3"},
    };
  }
  return {
      {"Register", VFIO_IOMMU_MAP_DMA,
       [](VfioContainerDriver& d) { return d.RegisterMemory(kOpUa + 32 * k64K, k64K); },
       "vaddr=0x7e0000200000, size=0x10000) [pin range] on container fd 3"},
      {"Unregister", VFIO_IOMMU_UNMAP_DMA,
       [](VfioContainerDriver& d) { return d.UnregisterMemory(kOpUa, 16 * k64K); },
       "size=0x100000) [pin range of vaddr=0x7e0000000000] on container fd 3"},
      {"Map", VFIO_IOMMU_MAP_DMA,
       [](VfioContainerDriver& d) { return d.MapDma(0x20000, kOpUa, 8192); },
       "VFIO_IOMMU_MAP_DMA(iova=0x20000, vaddr=0x7e0000000000, size=0x2000) on container fd 3"},
      {"Unmap", VFIO_IOMMU_UNMAP_DMA,
       [](VfioContainerDriver& d) { return d.UnmapDma(0x10000, 8192); },
       "VFIO_IOMMU_UNMAP_DMA(iova=0x10000, size=0x2000) on container fd 3"},
  };
}

constexpr int kKernelErrnos[] = {ENOTTY, EPERM,  EINVAL, ENOMEM, EFAULT, EBUSY,
                                 ENOENT, ENODEV, ENXIO,  EEXIST, ENOSPC};

class InjectedErrnoTest : public ::testing::TestWithParam<std::tuple<Kind, int, int>> {};

TEST_P(InjectedErrnoTest, SurfacesWithThatErrno) {
  const auto [kind, op_index, err] = GetParam();
  const OpCase op = OpCases(kind)[op_index];
  FakeVfioKernel kernel(OptionsFor(kind));
  std::unique_ptr<VfioContainerDriver> driver = MakeDriver(kind, &kernel);
  ASSERT_TRUE(driver->Open({kGroup7}).ok());
  // State under which the operation would succeed, so only the injection can fail it.
  ASSERT_TRUE(driver->RegisterMemory(kOpUa, 16 * k64K).ok());
  ASSERT_TRUE(driver->MapDma(0x10000, kOpUa, 8192).ok());
  kernel.InjectIoctlErrno(op.request, 1, err);
  kernel.ClearCalls();

  absl::Status status = op.run(*driver);
  EXPECT_EQ(ErrnoOf(status), err) << status;
  EXPECT_EQ(status.code(), StatusCodeForErrno(err)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(ErrnoName(err) + ": "));
  EXPECT_THAT(status.message(), HasSubstr(op.message));
  ASSERT_THAT(kernel.calls(), SizeIs(1));
  EXPECT_TRUE(kernel.calls()[0].injected);
  // The driver stays usable: the same operation now reaches the kernel and succeeds.
  EXPECT_TRUE(op.run(*driver).ok());
}

INSTANTIATE_TEST_SUITE_P(AllOps, InjectedErrnoTest,
                         ::testing::Combine(::testing::Values(Kind::kSpapr, Kind::kType1),
                                            ::testing::Range(0, 4),
                                            ::testing::ValuesIn(kKernelErrnos)),
                         [](const ::testing::TestParamInfo<std::tuple<Kind, int, int>>& info) {
                           const Kind kind = std::get<0>(info.param);
                           return KindName(kind) + OpCases(kind)[std::get<1>(info.param)].name +
                                  ErrnoName(std::get<2>(info.param));
                         });

TEST(InjectionTest, NthCallOfTheIoctl) {
  FakeVfioKernel kernel(OptionsFor(Kind::kSpapr));
  SpaprTceV2Driver driver(&kernel);
  ASSERT_TRUE(driver.Open({kGroup7}).ok());
  kernel.InjectIoctlErrno(VFIO_IOMMU_SPAPR_REGISTER_MEMORY, 3, ENOMEM);
  EXPECT_TRUE(driver.RegisterMemory(0x10000000, k64K).ok());
  EXPECT_TRUE(driver.RegisterMemory(0x20000000, k64K).ok());
  EXPECT_EQ(ErrnoOf(driver.RegisterMemory(0x30000000, k64K)), ENOMEM);
  EXPECT_TRUE(driver.RegisterMemory(0x30000000, k64K).ok());
}

// Concurrent callers on one container (run under --config=tsan too): the driver serializes them.
TEST(ConcurrencyTest, ParallelMapUnmapAndRegister) {
  FakeVfioKernel kernel(OptionsFor(Kind::kSpapr));
  SpaprTceV2Driver driver(&kernel);
  ASSERT_TRUE(driver.Open({kGroup7}).ok());
  ASSERT_TRUE(driver.RegisterMemory(0x10000000, 64 * k64K).ok());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&driver, t] {
      const uint64_t iova = static_cast<uint64_t>(t) * kMiB;
      const uint64_t ua = 0x20000000 + static_cast<uint64_t>(t) * k64K;
      for (int i = 0; i < 200; ++i) {
        EXPECT_TRUE(driver.MapDma(iova, 0x10000000, 16 * kKiB).ok());
        EXPECT_TRUE(driver.UnmapDma(iova, 16 * kKiB).ok());
        EXPECT_TRUE(driver.RegisterMemory(ua, k64K).ok());
        EXPECT_TRUE(driver.UnregisterMemory(ua, k64K).ok());
        EXPECT_TRUE(driver.DmaWindow().ok());
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_THAT(kernel.SpaprTces(), IsEmpty());
  ASSERT_THAT(kernel.SpaprRegions(), SizeIs(1));
  EXPECT_EQ(kernel.SpaprRegions()[0].mapped, 1u);
}

}  // namespace
}  // namespace dmapin::agent
