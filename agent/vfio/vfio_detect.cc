#include "agent/vfio/vfio_detect.h"

#include <fcntl.h>
#include <linux/vfio.h>

#include "agent/vfio/vfio_container.h"

namespace dmapin::agent {

std::vector<std::string> DetectVfioBackends(VfioKernel& kernel) {
  std::vector<std::string> backends;
  const int fd = kernel.Open(kVfioContainerPath, O_RDWR | O_CLOEXEC);
  if (fd < 0) return backends;
  if (kernel.Ioctl(fd, VFIO_GET_API_VERSION, nullptr) == VFIO_API_VERSION) {
    // A container without an IOMMU driver asks every registered driver
    // (vfio_ioctl_check_extension).
    if (kernel.Ioctl(fd, VFIO_CHECK_EXTENSION, IoctlIntArg(VFIO_SPAPR_TCE_v2_IOMMU)) > 0) {
      backends.push_back(kVfioSpaprV2Backend);
    }
    if (kernel.Ioctl(fd, VFIO_CHECK_EXTENSION, IoctlIntArg(VFIO_TYPE1v2_IOMMU)) > 0) {
      backends.push_back(kVfioType1Backend);
    }
  }
  kernel.Close(fd);
  return backends;
}

}  // namespace dmapin::agent
