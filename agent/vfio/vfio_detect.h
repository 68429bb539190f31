// Which VFIO pinning backends this node offers.
#ifndef DMAPIN_AGENT_VFIO_VFIO_DETECT_H_
#define DMAPIN_AGENT_VFIO_VFIO_DETECT_H_

#include <string>
#include <vector>

#include "agent/vfio/vfio_kernel.h"

namespace dmapin::agent {

// "vfio-spapr-v2" and/or "vfio-type1" (in that order), for each IOMMU type that
// VFIO_CHECK_EXTENSION on a fresh /dev/vfio/vfio reports. Empty when the device cannot be opened
// (no vfio module, no permission), when the VFIO API version is not VFIO_API_VERSION, or when no
// IOMMU driver is loaded. Opens and closes one descriptor; needs no IOMMU group.
std::vector<std::string> DetectVfioBackends(VfioKernel& kernel);

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_VFIO_VFIO_DETECT_H_
