#include "agent/vfio/vfio_container.h"

#include <fcntl.h>
#include <linux/vfio.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <utility>

#include "absl/numeric/bits.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

constexpr int kOpenFlags = O_RDWR | O_CLOEXEC;
constexpr uint32_t kMapFlags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
// The default 32-bit window of a v2 container is created with 4 KiB TCEs (IOMMU_PAGE_SHIFT_4K in
// vfio_iommu_spapr_tce.c); TCE_GET_INFO has no field for it.
constexpr uint64_t kSpaprDefaultWindowPageSize = 4096;

const char* IommuTypeName(uint32_t type) {
  switch (type) {
    case VFIO_TYPE1v2_IOMMU:
      return "VFIO_TYPE1v2_IOMMU";
    case VFIO_SPAPR_TCE_v2_IOMMU:
      return "VFIO_SPAPR_TCE_v2_IOMMU";
    default:
      return "unknown IOMMU type";
  }
}

// The errno of a kernel result, never 0 (a negative result is always -errno).
absl::Status KernelError(int result, absl::string_view reason) {
  return ErrnoStatus(-result, reason);
}

bool RangesOverlap(uint64_t a, uint64_t a_size, uint64_t b, uint64_t b_size) {
  return a < b + b_size && b < a + a_size;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// VfioContainerDriver

VfioContainerDriver::VfioContainerDriver(VfioKernel* kernel, uint32_t iommu_type, std::string name)
    : kernel_(kernel), iommu_type_(iommu_type), name_(std::move(name)) {}

VfioContainerDriver::~VfioContainerDriver() {
  // Subclasses close in their own destructors (ResetState is virtual); this is a backstop.
  MutexLock lock(&mu_);
  if (container_fd_ >= 0) CloseLocked().IgnoreError();
}

absl::Status VfioContainerDriver::Open(absl::Span<const std::string> group_paths) {
  MutexLock lock(&mu_);
  if (container_fd_ >= 0) {
    return ErrnoStatus(EBUSY,
                       absl::StrFormat("%s container already open (fd %d)", name_, container_fd_));
  }
  if (group_paths.empty()) {
    return ErrnoStatus(EINVAL, absl::StrCat(name_,
                                            ": no IOMMU group to attach; the kernel "
                                            "refuses VFIO_SET_IOMMU on an empty container"));
  }

  // Every failure closes what was opened so far.
  absl::Status status = OpenLocked(group_paths);
  if (!status.ok()) CloseLocked().IgnoreError();  // The open error is the one that matters.
  return status;
}

absl::Status VfioContainerDriver::OpenLocked(absl::Span<const std::string> group_paths) {
  const int fd = kernel_->Open(kVfioContainerPath, kOpenFlags);
  if (fd < 0) return KernelError(fd, absl::StrCat("open ", kVfioContainerPath));
  container_fd_ = fd;

  absl::StatusOr<int> version =
      ContainerIoctl(VFIO_GET_API_VERSION, nullptr, "VFIO_GET_API_VERSION");
  if (!version.ok()) return version.status();
  if (*version != VFIO_API_VERSION) {
    return ErrnoStatus(EINVAL, absl::StrFormat("VFIO_GET_API_VERSION on %s is %d, this build "
                                               "speaks %d",
                                               kVfioContainerPath, *version, VFIO_API_VERSION));
  }
  const std::string check = absl::StrFormat("VFIO_CHECK_EXTENSION(%s)", IommuTypeName(iommu_type_));
  absl::StatusOr<int> supported =
      ContainerIoctl(VFIO_CHECK_EXTENSION, IoctlIntArg(iommu_type_), check);
  if (!supported.ok()) return supported.status();
  if (*supported <= 0) {
    return ErrnoStatus(ENOTTY, absl::StrFormat("%s = 0: no VFIO IOMMU driver for %s is loaded "
                                               "(vfio_iommu_spapr_tce / vfio_iommu_type1)",
                                               check, IommuTypeName(iommu_type_)));
  }

  for (const std::string& path : group_paths) {
    const int group_fd = kernel_->Open(path.c_str(), kOpenFlags);
    if (group_fd < 0) return KernelError(group_fd, absl::StrCat("open VFIO group ", path));
    group_fds_.push_back(group_fd);
    group_paths_.push_back(path);

    struct vfio_group_status group_status;
    std::memset(&group_status, 0, sizeof(group_status));
    group_status.argsz = sizeof(group_status);
    int result = kernel_->Ioctl(group_fd, VFIO_GROUP_GET_STATUS, &group_status);
    if (result < 0) {
      return KernelError(result,
                         absl::StrFormat("VFIO_GROUP_GET_STATUS on %s (fd %d)", path, group_fd));
    }
    if ((group_status.flags & VFIO_GROUP_FLAGS_VIABLE) == 0) {
      // The kernel would answer EPERM to SET_CONTAINER; say why before it does.
      return ErrnoStatus(EPERM, absl::StrFormat("VFIO group %s is not viable (flags 0x%x): "
                                                "bind every device of the IOMMU group to "
                                                "vfio-pci or unbind it from its host driver",
                                                path, group_status.flags));
    }
    int container = container_fd_;
    result = kernel_->Ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, &container);
    if (result < 0) {
      return KernelError(result, absl::StrFormat("VFIO_GROUP_SET_CONTAINER(container fd %d) on "
                                                 "%s (fd %d)",
                                                 container_fd_, path, group_fd));
    }
  }

  absl::StatusOr<int> set =
      ContainerIoctl(VFIO_SET_IOMMU, IoctlIntArg(iommu_type_),
                     absl::StrFormat("VFIO_SET_IOMMU(%s)", IommuTypeName(iommu_type_)));
  if (!set.ok()) return set.status();

  absl::StatusOr<VfioDmaWindow> window = QueryWindow();
  if (!window.ok()) return window.status();
  window_ = *window;
  return absl::OkStatus();
}

absl::StatusOr<VfioDmaWindow> VfioContainerDriver::DmaWindow() const {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("DmaWindow");
  if (!open.ok()) return open;
  return window_;
}

absl::Status VfioContainerDriver::Close() {
  MutexLock lock(&mu_);
  return CloseLocked();
}

absl::Status VfioContainerDriver::CloseLocked() {
  absl::Status first;
  // Groups first: closing a group detaches it from the container; the container then goes with
  // its last reference and the kernel unmaps and unpins everything it still holds.
  for (auto it = group_fds_.rbegin(); it != group_fds_.rend(); ++it) {
    const int result = kernel_->Close(*it);
    if (result < 0 && first.ok()) {
      first = KernelError(result, absl::StrFormat("close VFIO group fd %d", *it));
    }
  }
  group_fds_.clear();
  group_paths_.clear();
  if (container_fd_ >= 0) {
    const int result = kernel_->Close(container_fd_);
    if (result < 0 && first.ok()) {
      first = KernelError(result, absl::StrFormat("close VFIO container fd %d", container_fd_));
    }
    container_fd_ = -1;
  }
  window_ = VfioDmaWindow();
  adopted_ = false;
  ResetState();
  return first;
}

absl::StatusOr<int> VfioContainerDriver::OpenDevice(absl::string_view name) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("OpenDevice");
  if (!open.ok()) return open;
  if (name.empty() || name.size() > 64 || name.find('\0') != absl::string_view::npos) {
    return ErrnoStatus(EINVAL, absl::StrFormat("OpenDevice: \"%s\" is not a device name (e.g. "
                                               "0000:00:03.0)",
                                               absl::CEscape(name.substr(0, 64))));
  }
  std::string buffer(name);
  for (size_t i = 0; i < group_fds_.size(); ++i) {
    const int fd = kernel_->Ioctl(group_fds_[i], VFIO_GROUP_GET_DEVICE_FD, buffer.data());
    if (fd >= 0) return fd;
    // ENODEV: not in this group; try the next one.
    if (fd != -ENODEV) {
      return KernelError(fd, absl::StrFormat("VFIO_GROUP_GET_DEVICE_FD(%s) on %s (fd %d)", name,
                                             group_paths_[i], group_fds_[i]));
    }
  }
  if (group_fds_.empty()) {
    return ErrnoStatus(ENODEV, absl::StrFormat("OpenDevice(%s): the %s container was taken back "
                                               "from its VMM, which holds its groups and devices",
                                               name, name_));
  }
  return ErrnoStatus(ENODEV, absl::StrFormat("OpenDevice: device %s is in none of the container's "
                                             "IOMMU groups (%s)",
                                             name, absl::StrJoin(group_paths_, ", ")));
}

absl::StatusOr<int> VfioContainerDriver::DupContainer() {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("DupContainer");
  if (!open.ok()) return open;
  const int fd = kernel_->Dup(container_fd_);
  if (fd < 0) return KernelError(fd, absl::StrFormat("dup of container fd %d", container_fd_));
  return fd;
}

absl::Status VfioContainerDriver::Adopt(int container_fd) {
  MutexLock lock(&mu_);
  if (container_fd_ >= 0) {
    kernel_->Close(container_fd);
    return ErrnoStatus(EBUSY,
                       absl::StrFormat("%s container already open (fd %d)", name_, container_fd_));
  }
  if (!can_adopt()) {
    kernel_->Close(container_fd);
    return ErrnoStatus(EOPNOTSUPP,
                       absl::StrFormat("%s: a restarted agent cannot take a container back (the "
                                       "kernel binds it to the process that first used it)",
                                       name_));
  }
  absl::Status status = AdoptLocked(container_fd);
  if (!status.ok()) CloseLocked().IgnoreError();  // The adopt error is the one that matters.
  return status;
}

absl::Status VfioContainerDriver::AdoptLocked(int container_fd) {
  container_fd_ = container_fd;
  absl::StatusOr<int> version =
      ContainerIoctl(VFIO_GET_API_VERSION, nullptr, "VFIO_GET_API_VERSION (not a VFIO container?)");
  if (!version.ok()) return version.status();
  if (*version != VFIO_API_VERSION) {
    return ErrnoStatus(EINVAL, absl::StrFormat("VFIO_GET_API_VERSION on the received fd is %d, "
                                               "this build speaks %d",
                                               *version, VFIO_API_VERSION));
  }
  const std::string check = absl::StrFormat("VFIO_CHECK_EXTENSION(%s)", IommuTypeName(iommu_type_));
  absl::StatusOr<int> supported =
      ContainerIoctl(VFIO_CHECK_EXTENSION, IoctlIntArg(iommu_type_), check);
  if (!supported.ok()) return supported.status();
  if (*supported <= 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("%s = 0 on the received container fd %d: not a "
                                               "container of this IOMMU type",
                                               check, container_fd_));
  }
  if (iommu_type_ == VFIO_TYPE1v2_IOMMU) {
    // Answers 1 only on a container whose IOMMU is set and that still has a group (SURVIVE.md).
    absl::StatusOr<int> vaddr = ContainerIoctl(VFIO_CHECK_EXTENSION, IoctlIntArg(VFIO_UPDATE_VADDR),
                                               "VFIO_CHECK_EXTENSION(VFIO_UPDATE_VADDR)");
    if (!vaddr.ok()) return vaddr.status();
    if (*vaddr <= 0) {
      return ErrnoStatus(ENODEV, absl::StrFormat("VFIO_CHECK_EXTENSION(VFIO_UPDATE_VADDR) = 0 on "
                                                 "the received container fd %d: it has no IOMMU "
                                                 "group any more (the VMM closed its devices) or "
                                                 "the kernel predates Linux 5.12",
                                                 container_fd_));
    }
  }
  absl::StatusOr<VfioDmaWindow> window = QueryWindow();
  if (!window.ok()) return window.status();
  window_ = *window;
  adopted_ = true;
  return absl::OkStatus();
}

absl::Status VfioContainerDriver::AdoptRegistration(uint64_t ua, uint64_t size,
                                                    uint64_t device_iova) {
  return ErrnoStatus(EOPNOTSUPP, absl::StrCat(name_, ": AdoptRegistration"));
}

absl::Status VfioContainerDriver::AdoptMapping(uint64_t iova, uint64_t ua, uint64_t size) {
  return ErrnoStatus(EOPNOTSUPP, absl::StrCat(name_, ": AdoptMapping"));
}

bool VfioContainerDriver::is_open() const {
  MutexLock lock(&mu_);
  return container_fd_ >= 0;
}

int VfioContainerDriver::container_fd() const {
  MutexLock lock(&mu_);
  return container_fd_;
}

absl::StatusOr<int> VfioContainerDriver::ContainerIoctl(unsigned long request,  // NOLINT
                                                        void* arg, absl::string_view what) {
  const int result = kernel_->Ioctl(container_fd_, request, arg);
  if (result < 0) {
    return KernelError(result, absl::StrFormat("%s on container fd %d", what, container_fd_));
  }
  return result;
}

absl::Status VfioContainerDriver::CheckOpen(absl::string_view operation) const {
  if (container_fd_ >= 0) return absl::OkStatus();
  return ErrnoStatus(EBADF, absl::StatusCode::kFailedPrecondition,
                     absl::StrFormat("%s: %s container is not open", operation, name_));
}

// ---------------------------------------------------------------------------------------------
// SpaprTceV2Driver

SpaprTceV2Driver::SpaprTceV2Driver(VfioKernel* kernel)
    : VfioContainerDriver(kernel, VFIO_SPAPR_TCE_v2_IOMMU, kVfioSpaprV2Backend) {}

SpaprTceV2Driver::~SpaprTceV2Driver() { Close().IgnoreError(); }

absl::StatusOr<VfioDmaWindow> SpaprTceV2Driver::QueryWindow() {
  struct vfio_iommu_spapr_tce_info info;
  std::memset(&info, 0, sizeof(info));
  info.argsz = sizeof(info);  // Large enough for the ddw part: the kernel fills it when it can.
  absl::StatusOr<int> result =
      ContainerIoctl(VFIO_IOMMU_SPAPR_TCE_GET_INFO, &info,
                     absl::StrFormat("VFIO_IOMMU_SPAPR_TCE_GET_INFO(argsz=%u)", info.argsz));
  if (!result.ok()) return result.status();
  if (info.dma32_window_size == 0) {
    return ErrnoStatus(ENODEV, absl::StrFormat("VFIO_IOMMU_SPAPR_TCE_GET_INFO on container fd %d "
                                               "reports an empty 32-bit DMA window",
                                               container_fd_));
  }
  VfioDmaWindow window;
  window.start = info.dma32_window_start;
  window.size = info.dma32_window_size;
  window.iommu_page_size = kSpaprDefaultWindowPageSize;
  window.page_size_bitmap = kSpaprDefaultWindowPageSize;
  if ((info.flags & VFIO_IOMMU_SPAPR_INFO_DDW) != 0) window.page_size_bitmap |= info.ddw.pgsizes;
  return window;
}

absl::Status SpaprTceV2Driver::RegisterMemory(uint64_t ua, uint64_t size) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("RegisterMemory");
  if (!open.ok()) return open;
  struct vfio_iommu_spapr_register_memory reg;
  std::memset(&reg, 0, sizeof(reg));
  reg.argsz = sizeof(reg);
  reg.flags = 0;  // The kernel rejects any flag (EINVAL).
  reg.vaddr = ua;
  reg.size = size;
  absl::Status status =
      ContainerIoctl(
          VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg,
          absl::StrFormat("VFIO_IOMMU_SPAPR_REGISTER_MEMORY(vaddr=0x%x, size=0x%x)", ua, size))
          .status();
  if (status.ok()) registered_.emplace(ua, size);
  return status;
}

absl::Status SpaprTceV2Driver::UnregisterMemory(uint64_t ua, uint64_t size) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("UnregisterMemory");
  if (!open.ok()) return open;
  // No EBUSY check here on purpose: see the header. The registry refuses the last unregister of a
  // mapped region (spec §3.4) before it gets this far; a 0 from the kernel is not proof that no
  // TCE still points into the region.
  absl::Status status = UnregisterLocked(ua, size);
  if (status.ok()) registered_.erase({ua, size});
  return status;
}

absl::Status SpaprTceV2Driver::UnregisterLocked(uint64_t ua, uint64_t size) {
  struct vfio_iommu_spapr_register_memory reg;
  std::memset(&reg, 0, sizeof(reg));
  reg.argsz = sizeof(reg);
  reg.flags = 0;
  reg.vaddr = ua;
  reg.size = size;
  return ContainerIoctl(
             VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY, &reg,
             absl::StrFormat("VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY(vaddr=0x%x, size=0x%x)", ua, size))
      .status();
}

absl::Status SpaprTceV2Driver::ClearAll() {
  MutexLock lock(&mu_);
  if (container_fd_ < 0) return absl::OkStatus();
  absl::Status first;
  struct vfio_iommu_type1_dma_unmap unmap;
  std::memset(&unmap, 0, sizeof(unmap));
  unmap.argsz = sizeof(unmap);
  unmap.iova = window_.start;
  unmap.size = window_.size;
  first = ContainerIoctl(VFIO_IOMMU_UNMAP_DMA, &unmap,
                         absl::StrFormat("VFIO_IOMMU_UNMAP_DMA(iova=0x%x, size=0x%x) [all]",
                                         window_.start, window_.size))
              .status();
  for (auto it = registered_.begin(); it != registered_.end(); it = registered_.erase(it)) {
    absl::Status status = UnregisterLocked(it->first, it->second);
    if (!status.ok() && first.ok()) first = status;
  }
  return first;
}

absl::Status SpaprTceV2Driver::MapDma(uint64_t iova, uint64_t ua, uint64_t size) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("MapDma");
  if (!open.ok()) return open;
  struct vfio_iommu_type1_dma_map map;
  std::memset(&map, 0, sizeof(map));
  map.argsz = sizeof(map);
  map.flags = kMapFlags;
  map.vaddr = ua;
  map.iova = iova;
  map.size = size;
  return ContainerIoctl(VFIO_IOMMU_MAP_DMA, &map,
                        absl::StrFormat("VFIO_IOMMU_MAP_DMA(iova=0x%x, vaddr=0x%x, size=0x%x)",
                                        iova, ua, size))
      .status();
}

absl::Status SpaprTceV2Driver::UnmapDma(uint64_t iova, uint64_t size) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("UnmapDma");
  if (!open.ok()) return open;
  struct vfio_iommu_type1_dma_unmap unmap;
  std::memset(&unmap, 0, sizeof(unmap));
  unmap.argsz = sizeof(unmap);
  unmap.flags = 0;  // SPAPR supports no unmap flag.
  unmap.iova = iova;
  unmap.size = size;
  return ContainerIoctl(VFIO_IOMMU_UNMAP_DMA, &unmap,
                        absl::StrFormat("VFIO_IOMMU_UNMAP_DMA(iova=0x%x, size=0x%x)", iova, size))
      .status();
}

// ---------------------------------------------------------------------------------------------
// Type1Driver

Type1Driver::Type1Driver(VfioKernel* kernel, Type1Options options)
    : VfioContainerDriver(kernel, VFIO_TYPE1v2_IOMMU, kVfioType1Backend), options_(options) {}

Type1Driver::~Type1Driver() { Close().IgnoreError(); }

void Type1Driver::ResetState() {
  reserved_ = VfioIovaRange();
  usable_.clear();
  pins_by_iova_.clear();
  guest_maps_.clear();
}

absl::Status Type1Driver::ReadIommuInfo(uint64_t* pgsizes, std::vector<VfioIovaRange>* ranges,
                                        bool* have_ranges) {
  // uint64_t storage keeps the struct and the capability chain naturally aligned.
  std::vector<uint64_t> buffer((sizeof(struct vfio_iommu_type1_info) + 7) / 8, 0);
  auto* info = reinterpret_cast<struct vfio_iommu_type1_info*>(buffer.data());
  info->argsz = sizeof(struct vfio_iommu_type1_info);
  for (int attempt = 0;; ++attempt) {
    const uint32_t argsz = info->argsz;
    absl::StatusOr<int> result = ContainerIoctl(
        VFIO_IOMMU_GET_INFO, info, absl::StrFormat("VFIO_IOMMU_GET_INFO(argsz=%u)", argsz));
    if (!result.ok()) return result.status();
    // The kernel raises argsz when the capabilities do not fit; ask once more with room for them.
    if (info->argsz <= argsz || attempt > 0) break;
    const uint32_t wanted = info->argsz;
    buffer.assign((wanted + 7) / 8, 0);
    info = reinterpret_cast<struct vfio_iommu_type1_info*>(buffer.data());
    info->argsz = wanted;
  }
  if ((info->flags & VFIO_IOMMU_INFO_PGSIZES) == 0 || info->iova_pgsizes == 0) {
    return ErrnoStatus(ENODEV, absl::StrFormat("VFIO_IOMMU_GET_INFO on container fd %d reports no "
                                               "IOMMU page sizes (flags 0x%x)",
                                               container_fd_, info->flags));
  }
  *pgsizes = info->iova_pgsizes;
  *have_ranges = false;
  ranges->clear();
  if ((info->flags & VFIO_IOMMU_INFO_CAPS) == 0 || info->cap_offset == 0) return absl::OkStatus();

  // Walk the capability chain; offsets are from the start of the info struct.
  const size_t total = std::min<size_t>(info->argsz, buffer.size() * 8);
  const auto* base = reinterpret_cast<const uint8_t*>(buffer.data());
  uint32_t offset = info->cap_offset;
  for (int hops = 0; offset != 0 && hops < 64; ++hops) {
    if (offset < sizeof(struct vfio_iommu_type1_info) ||
        offset + sizeof(struct vfio_info_cap_header) > total || offset % 4 != 0) {
      return ErrnoStatus(EINVAL, absl::StrFormat("VFIO_IOMMU_GET_INFO capability at offset %u "
                                                 "lies outside the %u-byte answer",
                                                 offset, total));
    }
    struct vfio_info_cap_header header;
    std::memcpy(&header, base + offset, sizeof(header));
    if (header.id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
      struct vfio_iommu_type1_info_cap_iova_range cap;
      const size_t head = offsetof(struct vfio_iommu_type1_info_cap_iova_range, iova_ranges);
      if (offset + head > total) break;
      std::memcpy(&cap, base + offset, head);
      const size_t need = head + static_cast<size_t>(cap.nr_iovas) * sizeof(struct vfio_iova_range);
      if (offset + need > total) {
        return ErrnoStatus(EINVAL, absl::StrFormat("VFIO_IOMMU_GET_INFO IOVA range capability "
                                                   "claims %u ranges past the answer's end",
                                                   cap.nr_iovas));
      }
      for (uint32_t i = 0; i < cap.nr_iovas; ++i) {
        struct vfio_iova_range range;
        std::memcpy(&range, base + offset + head + i * sizeof(range), sizeof(range));
        ranges->push_back(VfioIovaRange{range.start, range.end});
      }
      *have_ranges = true;
    }
    offset = header.next;
  }
  return absl::OkStatus();
}

absl::StatusOr<VfioDmaWindow> Type1Driver::QueryWindow() {
  uint64_t pgsizes = 0;
  bool have_ranges = false;
  std::vector<VfioIovaRange> ranges;
  absl::Status status = ReadIommuInfo(&pgsizes, &ranges, &have_ranges);
  if (!status.ok()) return status;
  const uint64_t page = pgsizes & (~pgsizes + 1);  // the smallest IOMMU page
  const uint64_t mask = page - 1;

  if (!have_ranges) {
    if (options_.fallback_iova_limit < 2 * page) {
      return ErrnoStatus(EINVAL, absl::StrFormat("fallback IOVA limit 0x%x is too small",
                                                 options_.fallback_iova_limit));
    }
    ranges.push_back(VfioIovaRange{0, options_.fallback_iova_limit - 1});
  }
  if (ranges.empty()) {
    return ErrnoStatus(ENODEV, absl::StrFormat("VFIO_IOMMU_GET_INFO on container fd %d reports no "
                                               "usable IOVA range",
                                               container_fd_));
  }
  // The pin range sits at the top of the highest range. IOVAs at or above 2^63 are never used,
  // which keeps the exclusive ends below in 64 bits.
  const VfioIovaRange* top = &ranges[0];
  for (const VfioIovaRange& range : ranges) {
    if (range.last > top->last) top = &range;
  }
  const uint64_t kIovaCeiling = uint64_t{1} << 63;
  const uint64_t top_start = (top->start + mask) & ~mask;
  const uint64_t top_end = (std::min(top->last, kIovaCeiling - 1) + 1) & ~mask;  // exclusive
  if (top_end <= top_start) {
    return ErrnoStatus(ENOSPC, absl::StrFormat("highest usable IOVA range [0x%x, 0x%x] holds no "
                                               "IOMMU page",
                                               top->start, top->last));
  }
  const uint64_t wanted = options_.reserved_iova_size != 0
                              ? (options_.reserved_iova_size + mask) & ~mask
                              : ((top_end - top_start) / 2) & ~mask;
  if (wanted == 0 || wanted > top_end - top_start || options_.reserved_iova_size > kIovaCeiling) {
    return ErrnoStatus(ENOSPC, absl::StrFormat("reserved pin range of 0x%x bytes does not fit in "
                                               "the highest usable IOVA range [0x%x, 0x%x]",
                                               options_.reserved_iova_size, top->start, top->last));
  }
  reserved_ = VfioIovaRange{top_end - wanted, top_end - 1};
  usable_ = ranges;

  // The guest window: from the lowest usable IOVA up to the pin range. Holes inside it (e.g.
  // the x86 MSI window) stay holes: MAP_DMA there fails with the kernel's EINVAL.
  uint64_t low = top_start;
  for (const VfioIovaRange& range : ranges) low = std::min(low, (range.start + mask) & ~mask);
  VfioDmaWindow window;
  window.start = low;
  window.size = reserved_.start - low;
  window.iommu_page_size = page;
  window.page_size_bitmap = pgsizes;
  return window;
}

absl::StatusOr<uint64_t> Type1Driver::AllocatePinIova(uint64_t size) const {
  const uint64_t mask = window_.iommu_page_size - 1;
  const uint64_t rounded = (size + mask) & ~mask;
  uint64_t candidate = reserved_.start;
  for (const auto& [iova, pin] : pins_by_iova_) {
    if (iova >= candidate && iova - candidate >= rounded) break;
    candidate = std::max(candidate, (iova + pin.size + mask) & ~mask);
  }
  if (candidate > reserved_.last || reserved_.last - candidate + 1 < rounded) {
    return ErrnoStatus(ENOSPC, absl::StrFormat("reserved pin range [0x%x, 0x%x] has no room for "
                                               "0x%x more bytes",
                                               reserved_.start, reserved_.last, size));
  }
  return candidate;
}

absl::Status Type1Driver::CheckGuestRange(absl::string_view what, uint64_t iova,
                                          uint64_t size) const {
  const uint64_t end = iova + size;
  if (end < iova || iova < window_.start || end > window_.start + window_.size) {
    return ErrnoStatus(
        ENXIO, absl::StrFormat("%s(iova=0x%x, size=0x%x): outside the guest DMA "
                               "window [0x%x, 0x%x) (the pin range above it is "
                               "reserved)",
                               what, iova, size, window_.start, window_.start + window_.size));
  }
  return absl::OkStatus();
}

absl::Status Type1Driver::RegisterMemory(uint64_t ua, uint64_t size) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("RegisterMemory");
  if (!open.ok()) return open;
  const uint64_t mask = window_.iommu_page_size - 1;
  if (size == 0 || ua + size < ua || ((ua | size) & mask) != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("RegisterMemory(vaddr=0x%x, size=0x%x): not a "
                                               "non-empty range aligned to the IOMMU page 0x%x",
                                               ua, size, window_.iommu_page_size));
  }
  for (const auto& [iova, pin] : pins_by_iova_) {
    if (pin.ua == ua && pin.size == size) {
      return ErrnoStatus(EBUSY, absl::StrFormat("RegisterMemory(vaddr=0x%x, size=0x%x): already "
                                                "registered in this container (pin iova 0x%x)",
                                                ua, size, iova));
    }
    if (RangesOverlap(ua, size, pin.ua, pin.size)) {
      return ErrnoStatus(EINVAL, absl::StrFormat("RegisterMemory(vaddr=0x%x, size=0x%x): overlaps "
                                                 "the registered region vaddr=0x%x size=0x%x",
                                                 ua, size, pin.ua, pin.size));
    }
  }
  absl::StatusOr<uint64_t> iova = AllocatePinIova(size);
  if (!iova.ok()) return iova.status();
  return RegisterLocked(ua, size, *iova);
}

absl::StatusOr<uint64_t> Type1Driver::FreeDeviceIova(uint64_t size) const {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("FreeDeviceIova");
  if (!open.ok()) return open;
  return AllocatePinIova(size);
}

absl::Status Type1Driver::RegisterMemoryAt(uint64_t ua, uint64_t size, uint64_t device_iova) {
  if (device_iova == 0) return RegisterMemory(ua, size);
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("RegisterMemory");
  if (!open.ok()) return open;
  const uint64_t mask = window_.iommu_page_size - 1;
  if (size == 0 || ua + size < ua || ((ua | size | device_iova) & mask) != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("RegisterMemory(vaddr=0x%x, size=0x%x) at pin iova "
                                               "0x%x: not aligned to the IOMMU page 0x%x",
                                               ua, size, device_iova, window_.iommu_page_size));
  }
  if (device_iova < reserved_.start || device_iova > reserved_.last ||
      reserved_.last - device_iova + 1 < size) {
    return ErrnoStatus(ENOSPC,
                       absl::StrFormat("RegisterMemory(vaddr=0x%x, size=0x%x): pin iova "
                                       "0x%x is outside the pin range [0x%x, 0x%x]",
                                       ua, size, device_iova, reserved_.start, reserved_.last));
  }
  for (const auto& [iova, pin] : pins_by_iova_) {
    if (RangesOverlap(device_iova, size, iova, pin.size)) {
      return ErrnoStatus(ENOSPC, absl::StrFormat("RegisterMemory(vaddr=0x%x, size=0x%x): pin iova "
                                                 "0x%x overlaps the registration at 0x%x",
                                                 ua, size, device_iova, iova));
    }
    if (RangesOverlap(ua, size, pin.ua, pin.size)) {
      return ErrnoStatus(EINVAL, absl::StrFormat("RegisterMemory(vaddr=0x%x, size=0x%x): overlaps "
                                                 "the registered region vaddr=0x%x size=0x%x",
                                                 ua, size, pin.ua, pin.size));
    }
  }
  return RegisterLocked(ua, size, device_iova);
}

absl::Status Type1Driver::RegisterLocked(uint64_t ua, uint64_t size, uint64_t iova) {
  absl::Status status = MapIoctlLocked(iova, ua, size, " [pin range]");
  if (status.ok()) pins_by_iova_[iova] = Pin{ua, size};
  return status;
}

absl::Status Type1Driver::MapIoctlLocked(uint64_t iova, uint64_t ua, uint64_t size,
                                         absl::string_view what) {
  struct vfio_iommu_type1_dma_map map;
  std::memset(&map, 0, sizeof(map));
  map.argsz = sizeof(map);
  map.flags = kMapFlags;
  map.vaddr = ua;
  map.iova = iova;
  map.size = size;
  return ContainerIoctl(VFIO_IOMMU_MAP_DMA, &map,
                        absl::StrFormat("VFIO_IOMMU_MAP_DMA(iova=0x%x, vaddr=0x%x, size=0x%x)%s",
                                        iova, ua, size, what))
      .status();
}

absl::Status Type1Driver::UnmapLocked(uint64_t iova, uint64_t size, uint32_t flags,
                                      absl::string_view what, uint64_t* unmapped) {
  struct vfio_iommu_type1_dma_unmap unmap;
  std::memset(&unmap, 0, sizeof(unmap));
  unmap.argsz = sizeof(unmap);
  unmap.flags = flags;
  unmap.iova = iova;
  unmap.size = size;
  absl::Status status =
      ContainerIoctl(VFIO_IOMMU_UNMAP_DMA, &unmap,
                     absl::StrFormat("VFIO_IOMMU_UNMAP_DMA(%siova=0x%x, size=0x%x)%s",
                                     flags != 0 ? "FLAG_VADDR, " : "", iova, size, what))
          .status();
  *unmapped = status.ok() ? unmap.size : 0;
  return status;
}

absl::Status Type1Driver::UpdateVaddrLocked(uint64_t iova, uint64_t ua, uint64_t size,
                                            absl::string_view what) {
  struct vfio_iommu_type1_dma_map map;
  std::memset(&map, 0, sizeof(map));
  map.argsz = sizeof(map);
  map.flags = VFIO_DMA_MAP_FLAG_VADDR;  // a new address takes no protection flags
  map.vaddr = ua;
  map.iova = iova;
  map.size = size;
  const std::string call = absl::StrFormat(
      "VFIO_IOMMU_MAP_DMA(FLAG_VADDR, iova=0x%x, vaddr=0x%x, size=0x%x)%s", iova, ua, size, what);
  int result = kernel_->Ioctl(container_fd_, VFIO_IOMMU_MAP_DMA, &map);
  if (result >= 0) return absl::OkStatus();  // the old process invalidated it before it exited
  if (result != -EINVAL)
    return KernelError(result, absl::StrCat(call, " on container fd ", container_fd_));
  // EINVAL: the mapping still has the dead process's address (it crashed), or is not exactly
  // this one. Invalidate it, then set ours.
  uint64_t invalidated = 0;
  absl::Status status = UnmapLocked(iova, size, VFIO_DMA_UNMAP_FLAG_VADDR, what, &invalidated);
  if (!status.ok()) return status;
  if (invalidated != size) {
    return ErrnoStatus(EINVAL, absl::StrFormat("%s: the kernel's mappings inside the range cover "
                                               "0x%x bytes, not 0x%x (a different layout; their "
                                               "addresses stay invalid until they are unmapped)",
                                               call, invalidated, size));
  }
  result = kernel_->Ioctl(container_fd_, VFIO_IOMMU_MAP_DMA, &map);
  if (result < 0)
    return KernelError(result, absl::StrCat(call, " on container fd ", container_fd_));
  return absl::OkStatus();
}

absl::Status Type1Driver::AdoptRegistration(uint64_t ua, uint64_t size, uint64_t device_iova) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("AdoptRegistration");
  if (!open.ok()) return open;
  if (device_iova < reserved_.start || device_iova > reserved_.last) {
    return ErrnoStatus(ENXIO,
                       absl::StrFormat("AdoptRegistration(vaddr=0x%x, size=0x%x): pin iova "
                                       "0x%x is outside the pin range [0x%x, 0x%x]",
                                       ua, size, device_iova, reserved_.start, reserved_.last));
  }
  absl::Status status = UpdateVaddrLocked(device_iova, ua, size, " [pin range]");
  if (status.ok()) pins_by_iova_[device_iova] = Pin{ua, size};
  return status;
}

absl::Status Type1Driver::AdoptMapping(uint64_t iova, uint64_t ua, uint64_t size) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("AdoptMapping");
  if (!open.ok()) return open;
  absl::Status range = CheckGuestRange("AdoptMapping", iova, size);
  if (!range.ok()) return range;
  absl::Status status = UpdateVaddrLocked(iova, ua, size, "");
  if (status.ok()) guest_maps_[iova] = GuestMapping{.size = size, .ua = ua};
  return status;
}

absl::Status Type1Driver::InvalidateAddresses() {
  MutexLock lock(&mu_);
  if (container_fd_ < 0) return absl::OkStatus();
  std::vector<std::pair<uint64_t, uint64_t>> mappings;  // (iova, size): guest maps, then pins
  for (const auto& [iova, mapping] : guest_maps_) mappings.emplace_back(iova, mapping.size);
  for (const auto& [iova, pin] : pins_by_iova_) mappings.emplace_back(iova, pin.size);
  absl::Status first;
  for (const auto& [iova, size] : mappings) {
    uint64_t invalidated = 0;
    absl::Status status = UnmapLocked(iova, size, VFIO_DMA_UNMAP_FLAG_VADDR, "", &invalidated);
    if (status.ok() && invalidated != size) {
      status = ErrnoStatus(EIO, absl::StrFormat("VFIO_IOMMU_UNMAP_DMA(FLAG_VADDR, iova=0x%x, "
                                                "size=0x%x) invalidated 0x%x bytes",
                                                iova, size, invalidated));
    }
    if (!status.ok() && first.ok()) first = status;
  }
  return first;
}

absl::Status Type1Driver::ClearAll() {
  MutexLock lock(&mu_);
  if (container_fd_ < 0) return absl::OkStatus();
  absl::Status first;
  // Guest mappings first: the device must not reach pages whose pin goes next.
  for (auto it = guest_maps_.begin(); it != guest_maps_.end(); it = guest_maps_.erase(it)) {
    uint64_t unmapped = 0;
    absl::Status status = UnmapLocked(it->first, it->second.size, 0, "", &unmapped);
    if (!status.ok() && first.ok()) first = status;
  }
  for (auto it = pins_by_iova_.begin(); it != pins_by_iova_.end(); it = pins_by_iova_.erase(it)) {
    uint64_t unmapped = 0;
    absl::Status status = UnmapLocked(it->first, it->second.size, 0, " [pin range]", &unmapped);
    if (!status.ok() && first.ok()) first = status;
  }
  return first;
}

absl::Status Type1Driver::UnregisterMemory(uint64_t ua, uint64_t size) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("UnregisterMemory");
  if (!open.ok()) return open;
  const uint64_t mask = window_.iommu_page_size - 1;
  if (size == 0 || ua + size < ua || ((ua | size) & mask) != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("UnregisterMemory(vaddr=0x%x, size=0x%x): not a "
                                               "non-empty range aligned to the IOMMU page 0x%x",
                                               ua, size, window_.iommu_page_size));
  }
  auto it = pins_by_iova_.begin();
  while (it != pins_by_iova_.end() && !(it->second.ua == ua && it->second.size == size)) ++it;
  if (it == pins_by_iova_.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("UnregisterMemory(vaddr=0x%x, size=0x%x): not "
                                               "registered in this container",
                                               ua, size));
  }
  // No EBUSY while guest mappings use the region: they hold their own pins in type1, so this only
  // drops the pin-range mapping. The registry enforces spec §3.4 before calling.
  const uint64_t pin_iova = it->first;
  const std::string what = absl::StrFormat(" [pin range of vaddr=0x%x]", ua);
  uint64_t unmapped = 0;
  if (absl::Status status = UnmapLocked(pin_iova, size, 0, what, &unmapped); !status.ok()) {
    return status;
  }
  pins_by_iova_.erase(it);
  // The kernel writes back how much it unmapped; anything but the whole region means the kernel's
  // view and ours disagreed (the record is dropped either way: the kernel no longer has it).
  if (unmapped != size) {
    return ErrnoStatus(EIO, absl::StrFormat("VFIO_IOMMU_UNMAP_DMA(iova=0x%x, size=0x%x)%s on "
                                            "container fd %d unmapped 0x%x bytes",
                                            pin_iova, size, what, container_fd_, unmapped));
  }
  return absl::OkStatus();
}

absl::Status Type1Driver::MapLocked(uint64_t iova, uint64_t ua, uint64_t size) {
  absl::Status status = MapIoctlLocked(iova, ua, size, "");
  if (status.ok()) guest_maps_[iova] = GuestMapping{.size = size, .ua = ua};
  return status;
}

absl::Status Type1Driver::ClearGuestRangeLocked(uint64_t iova, uint64_t size) {
  const uint64_t end = iova + size;  // inside the guest window: no wrap
  auto it = guest_maps_.upper_bound(iova);
  if (it != guest_maps_.begin() && std::prev(it)->first + std::prev(it)->second.size > iova) --it;
  while (it != guest_maps_.end() && it->first < end) {
    const uint64_t map_iova = it->first;
    const GuestMapping mapping = it->second;
    uint64_t unmapped = 0;
    if (absl::Status status = UnmapLocked(map_iova, mapping.size, 0, "", &unmapped); !status.ok()) {
      return status;
    }
    it = guest_maps_.erase(it);
    // Type1 cannot unmap part of a mapping: map back what lies outside [iova, end).
    if (map_iova < iova) {
      if (absl::Status s = MapLocked(map_iova, mapping.ua, iova - map_iova); !s.ok()) return s;
    }
    const uint64_t map_end = map_iova + mapping.size;
    if (map_end > end) {
      absl::Status s = MapLocked(end, mapping.ua + (end - map_iova), map_end - end);
      if (!s.ok()) return s;
    }
    // The next mapping after this one (a left part put back at map_iova is behind us, a right
    // part at `end` ends the loop).
    it = guest_maps_.upper_bound(map_iova);
  }
  return absl::OkStatus();
}

absl::Status Type1Driver::MapDma(uint64_t iova, uint64_t ua, uint64_t size) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("MapDma");
  if (!open.ok()) return open;
  absl::Status range = CheckGuestRange("MapDma", iova, size);
  if (!range.ok()) return range;
  // A remap replaces what was there (spec §7.4), which type1 answers EEXIST to: clear first.
  if (absl::Status cleared = ClearGuestRangeLocked(iova, size); !cleared.ok()) return cleared;
  absl::Status mapped = MapLocked(iova, ua, size);
  if (ErrnoOf(mapped) == EEXIST && adopted_) {
    // A mapping this driver does not know: one an earlier agent process made just before it
    // died, before its record (the container was taken back from the VMM). It goes, as any
    // mapping a new one replaces, if it lies inside the range (the kernel refuses a bisection).
    uint64_t unmapped = 0;
    if (UnmapLocked(iova, size, 0, " [not recorded]", &unmapped).ok() && unmapped > 0) {
      ++unrecorded_mappings_replaced_;
      mapped = MapLocked(iova, ua, size);
    }
  }
  return mapped;
}

absl::Status Type1Driver::UnmapDma(uint64_t iova, uint64_t size) {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("UnmapDma");
  if (!open.ok()) return open;
  absl::Status range = CheckGuestRange("UnmapDma", iova, size);
  if (!range.ok()) return range;
  return ClearGuestRangeLocked(iova, size);
}

absl::StatusOr<VfioIovaRange> Type1Driver::ReservedIovaRange() const {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("ReservedIovaRange");
  if (!open.ok()) return open;
  return reserved_;
}

absl::StatusOr<std::vector<VfioIovaRange>> Type1Driver::UsableIovaRanges() const {
  MutexLock lock(&mu_);
  absl::Status open = CheckOpen("UsableIovaRanges");
  if (!open.ok()) return open;
  return usable_;
}

absl::StatusOr<uint64_t> Type1Driver::PinIova(uint64_t ua, uint64_t size) const {
  MutexLock lock(&mu_);
  for (const auto& [iova, pin] : pins_by_iova_) {
    if (pin.ua == ua && pin.size == size) return iova;
  }
  return ErrnoStatus(ENOENT, absl::StrFormat("vaddr=0x%x size=0x%x is not registered", ua, size));
}

std::unique_ptr<VfioContainerDriver> NewVfioContainerDriver(absl::string_view backend,
                                                            VfioKernel* kernel,
                                                            Type1Options type1_options) {
  if (backend == kVfioSpaprV2Backend) return std::make_unique<SpaprTceV2Driver>(kernel);
  if (backend == kVfioType1Backend) {
    return std::make_unique<Type1Driver>(kernel, type1_options);
  }
  return nullptr;
}

}  // namespace dmapin::agent
