#include "agent/vfio/fake_vfio_kernel.h"

#include <linux/vfio.h>

#include <cerrno>
#include <cstddef>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

constexpr uint64_t kTcePage = 4096;  // the default SPAPR window's IOMMU page
constexpr uint32_t kRw = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
constexpr uint32_t kType1InfoSize = sizeof(struct vfio_iommu_type1_info);

bool IsSpapr(uint32_t type) {
  return type == VFIO_SPAPR_TCE_IOMMU || type == VFIO_SPAPR_TCE_v2_IOMMU;
}
bool IsType1(uint32_t type) { return type == VFIO_TYPE1_IOMMU || type == VFIO_TYPE1v2_IOMMU; }

// copy_from_user / copy_to_user.
template <typename T>
bool CopyIn(T* out, const void* arg, size_t bytes = sizeof(T)) {
  if (arg == nullptr) return false;
  std::memset(out, 0, sizeof(T));
  std::memcpy(out, arg, std::min(bytes, sizeof(T)));
  return true;
}

}  // namespace

FakeVfioKernelOptions FakeVfioKernelOptions::Default() {
  FakeVfioKernelOptions options;
  options.api_version = VFIO_API_VERSION;
  options.iommu_types = {VFIO_TYPE1v2_IOMMU, VFIO_SPAPR_TCE_v2_IOMMU};
  options.groups = {{"/dev/vfio/7", true, {"0000:00:07.0"}},
                    {"/dev/vfio/8", true, {"0000:00:08.0"}}};
  options.type1_iova_ranges = {{0, 0xfedfffff}, {0xfef00000, (uint64_t{1} << 39) - 1}};
  return options;
}

std::string FakeVfioCall::ToString() const {
  const std::string result_text = result < 0 ? "-" + ErrnoName(-result) : absl::StrCat(result);
  switch (kind) {
    case Kind::kOpen:
      return absl::StrCat("open(", path, ")=", result_text);
    case Kind::kClose:
      return absl::StrCat("close(", fd, ")=", result_text);
    case Kind::kDup:
      return absl::StrCat("dup(", fd, ")=", result_text);
    case Kind::kIoctl:
      break;
  }
  if (request == VFIO_CHECK_EXTENSION || request == VFIO_SET_IOMMU) {
    return absl::StrCat("ioctl(", fd, ", ", name, ", ", int_arg, ")=", result_text);
  }
  return absl::StrCat("ioctl(", fd, ", ", name, ")=", result_text);
}

std::string FakeVfioKernel::IoctlName(unsigned long request, uint32_t iommu_type) {  // NOLINT
  switch (request) {
    case VFIO_GET_API_VERSION:
      return "VFIO_GET_API_VERSION";
    case VFIO_CHECK_EXTENSION:
      return "VFIO_CHECK_EXTENSION";
    case VFIO_SET_IOMMU:
      return "VFIO_SET_IOMMU";
    case VFIO_GROUP_GET_STATUS:
      return "VFIO_GROUP_GET_STATUS";
    case VFIO_GROUP_SET_CONTAINER:
      return "VFIO_GROUP_SET_CONTAINER";
    case VFIO_GROUP_UNSET_CONTAINER:
      return "VFIO_GROUP_UNSET_CONTAINER";
    case VFIO_GROUP_GET_DEVICE_FD:
      return "VFIO_GROUP_GET_DEVICE_FD";
    case VFIO_IOMMU_GET_INFO:  // == VFIO_IOMMU_SPAPR_TCE_GET_INFO
      if (IsSpapr(iommu_type)) return "VFIO_IOMMU_SPAPR_TCE_GET_INFO";
      if (IsType1(iommu_type)) return "VFIO_IOMMU_GET_INFO";
      return "VFIO_IOMMU_GET_INFO|VFIO_IOMMU_SPAPR_TCE_GET_INFO";
    case VFIO_IOMMU_MAP_DMA:
      return "VFIO_IOMMU_MAP_DMA";
    case VFIO_IOMMU_UNMAP_DMA:
      return "VFIO_IOMMU_UNMAP_DMA";
    case VFIO_IOMMU_ENABLE:
      return "VFIO_IOMMU_ENABLE";
    case VFIO_IOMMU_DISABLE:
      return "VFIO_IOMMU_DISABLE";
    case VFIO_IOMMU_SPAPR_REGISTER_MEMORY:  // == VFIO_IOMMU_DIRTY_PAGES
      if (IsType1(iommu_type)) return "VFIO_IOMMU_DIRTY_PAGES";
      return "VFIO_IOMMU_SPAPR_REGISTER_MEMORY";
    case VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY:
      return "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY";
    default:
      return absl::StrFormat("ioctl(0x%x)", request);
  }
}

FakeVfioKernel::FakeVfioKernel(FakeVfioKernelOptions options) : options_(std::move(options)) {
  MutexLock lock(&mu_);
  for (const FakeVfioGroupSpec& spec : options_.groups) {
    groups_[spec.path].viable = spec.viable;
    groups_[spec.path].devices = spec.devices;
  }
}

// ---------------------------------------------------------------------------------------------
// Scripting and inspection

void FakeVfioKernel::InjectIoctlErrno(unsigned long request, int nth, int err) {  // NOLINT
  MutexLock lock(&mu_);
  injections_.push_back(Injection{request, nth - 1, err});
}

void FakeVfioKernel::SetOpenErrno(const std::string& path, int err) {
  MutexLock lock(&mu_);
  if (err == 0) {
    open_errnos_.erase(path);
  } else {
    open_errnos_[path] = err;
  }
}

void FakeVfioKernel::InjectCloseErrno(int nth, int err) {
  MutexLock lock(&mu_);
  close_injections_.emplace_back(nth - 1, err);
}

void FakeVfioKernel::SetGroupViable(const std::string& path, bool viable) {
  MutexLock lock(&mu_);
  groups_[path].viable = viable;
}

std::vector<FakeVfioCall> FakeVfioKernel::calls() const {
  MutexLock lock(&mu_);
  return calls_;
}

std::vector<FakeVfioCall> FakeVfioKernel::IoctlCalls(unsigned long request) const {  // NOLINT
  MutexLock lock(&mu_);
  std::vector<FakeVfioCall> out;
  for (const FakeVfioCall& call : calls_) {
    if (call.kind == FakeVfioCall::Kind::kIoctl && call.request == request) out.push_back(call);
  }
  return out;
}

std::vector<std::string> FakeVfioKernel::CallLog() const {
  MutexLock lock(&mu_);
  std::vector<std::string> out;
  out.reserve(calls_.size());
  for (const FakeVfioCall& call : calls_) out.push_back(call.ToString());
  return out;
}

void FakeVfioKernel::ClearCalls() {
  MutexLock lock(&mu_);
  calls_.clear();
}

std::vector<int> FakeVfioKernel::OpenFds() const {
  MutexLock lock(&mu_);
  std::vector<int> out;
  for (const auto& [fd, entry] : fds_) out.push_back(fd);
  return out;
}

uint64_t FakeVfioKernel::locked_pages() const {
  MutexLock lock(&mu_);
  return locked_pages_;
}

std::vector<FakeSpaprRegion> FakeVfioKernel::SpaprRegions() const {
  MutexLock lock(&mu_);
  std::vector<FakeSpaprRegion> out;
  for (const auto& [id, region] : regions_) {
    FakeSpaprRegion view{region.ua, region.size, region.used, region.mapped, 0};
    for (const auto& [cid, container] : containers_) view.holders += container.held.count(id);
    out.push_back(view);
  }
  return out;
}

std::map<uint64_t, uint64_t> FakeVfioKernel::SpaprTces() const {
  MutexLock lock(&mu_);
  std::map<uint64_t, uint64_t> out;
  for (const auto& [cid, container] : containers_) {
    for (const auto& [page, ua] : container.tce_ua) out[page * kTcePage] = ua;
  }
  return out;
}

std::vector<FakeType1Dma> FakeVfioKernel::Type1Dmas() const {
  MutexLock lock(&mu_);
  std::vector<FakeType1Dma> out;
  for (const auto& [cid, container] : containers_) {
    for (const auto& [iova, dma] : container.dmas) out.push_back(dma);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Syscalls

int FakeVfioKernel::AllocateFd() {
  int fd = 3;
  while (fds_.count(fd) != 0) ++fd;
  return fd;
}

int FakeVfioKernel::OpenLocked(const std::string& path) {
  auto injected = open_errnos_.find(path);
  if (injected != open_errnos_.end()) return -injected->second;
  if (path == "/dev/vfio/vfio") {
    if (!options_.container_device_present) return -ENOENT;
    const int fd = AllocateFd();
    const int id = next_container_id_++;
    containers_[id] = Container();
    fds_[fd] = FdEntry{FdKind::kContainer, id, ""};
    return fd;
  }
  auto group = groups_.find(path);
  if (group == groups_.end()) return -ENOENT;
  // A group is opened once at a time, and its device fds keep that open file.
  if (group->second.fd >= 0 || group->second.device_fds > 0) return -EBUSY;
  const int fd = AllocateFd();
  group->second.fd = fd;
  fds_[fd] = FdEntry{FdKind::kGroup, -1, path};
  return fd;
}

int FakeVfioKernel::Open(const char* path, int flags) {
  MutexLock lock(&mu_);
  FakeVfioCall call;
  call.kind = FakeVfioCall::Kind::kOpen;
  call.path = path;
  call.flags = flags;
  call.result = OpenLocked(call.path);
  calls_.push_back(call);
  return call.result;
}

int FakeVfioKernel::Close(int fd) {
  MutexLock lock(&mu_);
  FakeVfioCall call;
  call.kind = FakeVfioCall::Kind::kClose;
  call.fd = fd;
  int injected = 0;
  for (auto it = close_injections_.begin(); it != close_injections_.end(); ++it) {
    if (it->first-- == 0) {
      injected = it->second;
      close_injections_.erase(it);
      break;
    }
  }
  auto entry = fds_.find(fd);
  if (entry == fds_.end()) {
    call.result = -EBADF;
  } else {
    const FdEntry closed = entry->second;
    fds_.erase(entry);
    if (closed.kind == FdKind::kGroup) {
      groups_[closed.group].fd = -1;
      MaybeDetachGroup(closed.group);
    } else if (closed.kind == FdKind::kDevice) {
      --groups_[closed.group].device_fds;
      MaybeDetachGroup(closed.group);
    } else {
      --containers_[closed.container].fd_refs;
      MaybeDestroyContainer(closed.container);
    }
    call.result = 0;
  }
  if (injected != 0) {
    call.result = -injected;
    call.injected = true;
  }
  calls_.push_back(call);
  return call.result;
}

int FakeVfioKernel::Dup(int fd) {
  MutexLock lock(&mu_);
  FakeVfioCall call;
  call.kind = FakeVfioCall::Kind::kDup;
  call.fd = fd;
  auto entry = fds_.find(fd);
  if (entry == fds_.end()) {
    call.result = -EBADF;
  } else if (entry->second.kind == FdKind::kGroup) {
    call.result = -EINVAL;  // not modelled: nothing dups a group
  } else {
    const FdEntry copy = entry->second;
    call.result = AllocateFd();
    fds_[call.result] = copy;
    if (copy.kind == FdKind::kContainer) {
      ++containers_[copy.container].fd_refs;
    } else {
      ++groups_[copy.group].device_fds;
    }
  }
  calls_.push_back(call);
  return call.result;
}

size_t FakeVfioKernel::ArgSize(unsigned long request, const FdEntry& entry) const {  // NOLINT
  if (entry.kind == FdKind::kDevice) return 0;
  if (entry.kind == FdKind::kGroup) {
    if (request == VFIO_GROUP_GET_STATUS) return sizeof(struct vfio_group_status);
    if (request == VFIO_GROUP_SET_CONTAINER) return sizeof(int);
    return 0;
  }
  auto container = containers_.find(entry.container);
  const uint32_t type = container == containers_.end() ? 0 : container->second.iommu_type;
  switch (request) {
    case VFIO_IOMMU_GET_INFO:
      return IsSpapr(type) ? sizeof(struct vfio_iommu_spapr_tce_info) : kType1InfoSize;
    case VFIO_IOMMU_MAP_DMA:
      return sizeof(struct vfio_iommu_type1_dma_map);
    case VFIO_IOMMU_UNMAP_DMA:
      return sizeof(struct vfio_iommu_type1_dma_unmap);
    case VFIO_IOMMU_SPAPR_REGISTER_MEMORY:
    case VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY:
      return IsType1(type) ? 8 : sizeof(struct vfio_iommu_spapr_register_memory);
    default:
      return 0;
  }
}

int FakeVfioKernel::Ioctl(int fd, unsigned long request, void* arg) {  // NOLINT(runtime/int)
  MutexLock lock(&mu_);
  FakeVfioCall call;
  call.kind = FakeVfioCall::Kind::kIoctl;
  call.fd = fd;
  call.request = request;
  auto entry_it = fds_.find(fd);
  uint32_t type = 0;
  if (entry_it != fds_.end() && entry_it->second.kind == FdKind::kContainer) {
    type = containers_[entry_it->second.container].iommu_type;
  }
  call.name = IoctlName(request, type);
  if (request == VFIO_CHECK_EXTENSION || request == VFIO_SET_IOMMU) {
    call.int_arg = IoctlIntValue(arg);
  } else if (entry_it != fds_.end() && arg != nullptr) {
    const size_t size = ArgSize(request, entry_it->second);
    const auto* bytes = static_cast<const uint8_t*>(arg);
    call.arg.assign(bytes, bytes + size);
  }

  int injected = 0;
  for (auto it = injections_.begin(); it != injections_.end(); ++it) {
    if (it->request != request) continue;
    if (it->remaining-- == 0) {
      injected = it->err;
      injections_.erase(it);
      break;
    }
  }
  if (injected != 0) {
    call.result = -injected;
    call.injected = true;
  } else if (entry_it == fds_.end()) {
    call.result = -EBADF;
  } else {
    const FdEntry entry = entry_it->second;
    call.result = Dispatch(entry, request, arg);
  }
  calls_.push_back(call);
  return call.result;
}

int FakeVfioKernel::Dispatch(const FdEntry& entry, unsigned long request, void* arg) {  // NOLINT
  if (entry.kind == FdKind::kDevice) return -ENOTTY;  // device ioctls are not modelled
  if (entry.kind == FdKind::kGroup) return GroupIoctl(entry.group, request, arg);
  return ContainerIoctl(entry.container, request, arg);
}

// ---------------------------------------------------------------------------------------------
// Groups and containers (vfio_group.c, vfio_container.c)

int FakeVfioKernel::GroupIoctl(const std::string& path, unsigned long request,  // NOLINT
                               void* arg) {
  Group& group = groups_[path];
  switch (request) {
    case VFIO_GROUP_GET_STATUS: {
      struct vfio_group_status status;
      if (!CopyIn(&status, arg)) return -EFAULT;
      if (status.argsz < sizeof(status)) return -EINVAL;
      status.flags = (group.viable ? VFIO_GROUP_FLAGS_VIABLE : 0) |
                     (group.container >= 0 ? VFIO_GROUP_FLAGS_CONTAINER_SET : 0);
      std::memcpy(arg, &status, sizeof(status));
      return 0;
    }
    case VFIO_GROUP_SET_CONTAINER: {
      int container_fd;
      if (!CopyIn(&container_fd, arg)) return -EFAULT;
      auto it = fds_.find(container_fd);
      if (it == fds_.end() || it->second.kind != FdKind::kContainer) return -EBADF;
      if (group.container >= 0) return -EINVAL;
      if (!group.viable) return -EPERM;
      group.container = it->second.container;
      containers_[group.container].groups.insert(path);
      return 0;
    }
    case VFIO_GROUP_UNSET_CONTAINER:
      if (group.container < 0) return -EINVAL;
      DetachGroup(path);
      return 0;
    case VFIO_GROUP_GET_DEVICE_FD: {
      if (arg == nullptr) return -EFAULT;
      if (group.container < 0 || containers_[group.container].iommu_type == 0) return -EINVAL;
      const std::string name(static_cast<const char*>(arg));
      if (std::find(group.devices.begin(), group.devices.end(), name) == group.devices.end()) {
        return -ENODEV;
      }
      const int fd = AllocateFd();
      fds_[fd] = FdEntry{FdKind::kDevice, -1, path};
      ++group.device_fds;
      return fd;
    }
    default:
      return -ENOTTY;
  }
}

void FakeVfioKernel::DetachGroup(const std::string& path) {
  Group& group = groups_[path];
  const int id = group.container;
  group.container = -1;
  Container& container = containers_[id];
  container.groups.erase(path);
  // Detaching the last group deprivileges the container: its IOMMU state goes.
  if (container.groups.empty() && container.iommu_type != 0) ReleaseIommu(container);
  MaybeDestroyContainer(id);
}

void FakeVfioKernel::MaybeDetachGroup(const std::string& path) {
  const Group& group = groups_[path];
  if (group.fd < 0 && group.device_fds == 0 && group.container >= 0) DetachGroup(path);
}

void FakeVfioKernel::MaybeDestroyContainer(int id) {
  auto it = containers_.find(id);
  if (it == containers_.end() || it->second.fd_refs > 0 || !it->second.groups.empty()) return;
  if (it->second.iommu_type != 0) ReleaseIommu(it->second);
  containers_.erase(it);
}

void FakeVfioKernel::ReleaseIommu(Container& c) {
  // SPAPR (tce_iommu_release): clear the TCEs, then drop each held registration.
  while (!c.tces.empty()) SpaprClearTce(c, c.tces.begin()->first);
  for (uint64_t id : c.held) {
    auto it = regions_.find(id);
    if (it == regions_.end()) continue;
    Region& region = it->second;
    if (--region.used > 0) continue;
    if (region.mapped != 1) {  // still mapped by another container: the kernel warns and leaks
      region.used = 1;
      continue;
    }
    locked_pages_ -= region.size / options_.page_size;
    regions_.erase(it);
  }
  c.held.clear();
  // Type1 (vfio_iommu_type1_release): unmap and unpin everything.
  for (const auto& [iova, dma] : c.dmas) {
    locked_pages_ -= (dma.size + options_.page_size - 1) / options_.page_size;
  }
  c.dmas.clear();
  c.iommu_type = 0;
  c.enabled = false;
  c.mm_set = false;
}

int FakeVfioKernel::ContainerIoctl(int id, unsigned long request, void* arg) {  // NOLINT
  Container& c = containers_[id];
  switch (request) {
    case VFIO_GET_API_VERSION:
      return options_.api_version;
    case VFIO_CHECK_EXTENSION: {
      const uint64_t type = IoctlIntValue(arg);
      if (type == VFIO_UPDATE_VADDR) return IsType1(c.iommu_type) ? 1 : 0;
      if (IsSpapr(c.iommu_type)) return IsSpapr(static_cast<uint32_t>(type)) ? 1 : 0;
      if (IsType1(c.iommu_type)) return IsType1(static_cast<uint32_t>(type)) ? 1 : 0;
      for (uint32_t known : options_.iommu_types) {
        if (known == type) return 1;
      }
      return 0;
    }
    case VFIO_SET_IOMMU: {
      if (c.groups.empty() || c.iommu_type != 0) return -EINVAL;
      const uint64_t type = IoctlIntValue(arg);
      for (uint32_t known : options_.iommu_types) {
        if (known == type) {
          c.iommu_type = known;
          return 0;
        }
      }
      return -ENODEV;  // no IOMMU driver accepted the type
    }
    default:
      if (c.iommu_type == 0) return -EINVAL;  // vfio_fops_unl_ioctl without a driver
      return IsSpapr(c.iommu_type) ? SpaprIoctl(c, request, arg) : Type1Ioctl(c, request, arg);
  }
}

// ---------------------------------------------------------------------------------------------
// SPAPR TCE v2 (vfio_iommu_spapr_tce.c, book3s64/iommu_api.c)

int FakeVfioKernel::SpaprIoctl(Container& c, unsigned long request, void* arg) {  // NOLINT
  const uint64_t window_start = options_.dma32_window_start;
  const uint64_t window_end = window_start + options_.dma32_window_size;
  switch (request) {
    case VFIO_IOMMU_SPAPR_TCE_GET_INFO: {
      struct vfio_iommu_spapr_tce_info info;
      const size_t minsz = offsetof(struct vfio_iommu_spapr_tce_info, ddw);
      if (!CopyIn(&info, arg, minsz)) return -EFAULT;
      if (info.argsz < minsz) return -EINVAL;
      info.flags = 0;
      info.dma32_window_start = options_.dma32_window_start;
      info.dma32_window_size = options_.dma32_window_size;
      std::memset(&info.ddw, 0, sizeof(info.ddw));
      if (options_.ddw_pgsizes != 0) {
        info.flags |= VFIO_IOMMU_SPAPR_INFO_DDW;
        info.ddw.pgsizes = options_.ddw_pgsizes;
        info.ddw.max_dynamic_windows_supported = 1;
        info.ddw.levels = 5;
      }
      std::memcpy(arg, &info, info.argsz >= sizeof(info) ? sizeof(info) : minsz);
      return 0;
    }
    case VFIO_IOMMU_MAP_DMA: {
      if (!c.enabled) return -EPERM;
      struct vfio_iommu_type1_dma_map map;
      if (!CopyIn(&map, arg)) return -EFAULT;
      if (map.argsz < sizeof(map)) return -EINVAL;
      if ((map.flags & ~kRw) != 0) return -EINVAL;
      if (map.iova < window_start || map.iova >= window_end) return -ENXIO;
      if (((map.size | map.vaddr) & (kTcePage - 1)) != 0) return -EINVAL;
      if ((map.flags & kRw) == 0) return -EINVAL;
      if ((map.iova & (kTcePage - 1)) != 0 || map.size > window_end - map.iova) return -EINVAL;
      return SpaprMap(c, map.iova, map.vaddr, map.size);
    }
    case VFIO_IOMMU_UNMAP_DMA: {
      if (!c.enabled) return -EPERM;
      struct vfio_iommu_type1_dma_unmap unmap;
      if (!CopyIn(&unmap, arg)) return -EFAULT;
      if (unmap.argsz < sizeof(unmap)) return -EINVAL;
      if (unmap.flags != 0) return -EINVAL;
      if (unmap.iova < window_start || unmap.iova >= window_end) return -ENXIO;
      if ((unmap.size & (kTcePage - 1)) != 0) return -EINVAL;
      if ((unmap.iova & (kTcePage - 1)) != 0 || unmap.size > window_end - unmap.iova) {
        return -EINVAL;
      }
      for (uint64_t page = unmap.iova / kTcePage; page < (unmap.iova + unmap.size) / kTcePage;
           ++page) {
        SpaprClearTce(c, page);
      }
      return 0;
    }
    case VFIO_IOMMU_SPAPR_REGISTER_MEMORY: {
      struct vfio_iommu_spapr_register_memory reg;
      c.mm_set = true;  // tce_iommu_mm_set() comes before the argument checks
      if (!CopyIn(&reg, arg)) return -EFAULT;
      if (reg.argsz < sizeof(reg)) return -EINVAL;
      if (reg.flags != 0) return -EINVAL;
      return SpaprRegister(c, reg.vaddr, reg.size);
    }
    case VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY: {
      if (!c.mm_set) return -EPERM;
      struct vfio_iommu_spapr_register_memory reg;
      if (!CopyIn(&reg, arg)) return -EFAULT;
      if (reg.argsz < sizeof(reg)) return -EINVAL;
      if (reg.flags != 0) return -EINVAL;
      return SpaprUnregister(c, reg.vaddr, reg.size);
    }
    case VFIO_IOMMU_ENABLE:
    case VFIO_IOMMU_DISABLE:
      return -ENOTTY;  // v1 only
    default:
      return -ENOTTY;
  }
}

int FakeVfioKernel::SpaprRegister(Container& c, uint64_t ua, uint64_t size) {
  const uint64_t ps = options_.page_size;
  if (ua % ps != 0 || size % ps != 0 || ua + size < ua) return -EINVAL;
  // size 0: mm_iommu_new() fails its zero-length allocation (the spec §2.1 quirk).
  if (size == 0) return -ENOMEM;
  for (const auto& [id, region] : regions_) {
    if (region.ua == ua && region.size == size) {
      if (c.held.count(id) != 0) return -EBUSY;
      ++regions_[id].used;
      c.held.insert(id);
      c.enabled = true;
      return 0;
    }
  }
  for (const auto& [id, region] : regions_) {
    if (ua < region.ua + region.size && region.ua < ua + size) return -EINVAL;
  }
  const uint64_t entries = size / ps;
  if (locked_pages_ + entries > options_.memlock_limit_pages) return -ENOMEM;
  const uint64_t id = next_region_id_++;
  regions_[id] = Region{ua, size, 1, 1};
  locked_pages_ += entries;
  c.held.insert(id);
  c.enabled = true;
  return 0;
}

int FakeVfioKernel::SpaprUnregister(Container& c, uint64_t ua, uint64_t size) {
  const uint64_t ps = options_.page_size;
  if (ua % ps != 0 || size % ps != 0) return -EINVAL;
  auto it = regions_.begin();
  while (it != regions_.end() && !(it->second.ua == ua && it->second.size == size)) ++it;
  if (it == regions_.end() || c.held.count(it->first) == 0) return -ENOENT;
  Region& region = it->second;
  c.held.erase(it->first);
  if (--region.used > 0) return 0;
  if (region.mapped != 1) {
    region.used = 1;
    if (options_.unregister_mapped_ebusy) {  // Linux 4.2 - 5.0
      c.held.insert(it->first);
      return -EBUSY;
    }
    // Linux 5.1+: the container's reference is gone, the EBUSY of the final put is dropped and
    // the region stays, pinned and held by nobody.
    return 0;
  }
  locked_pages_ -= size / ps;
  regions_.erase(it);
  return 0;
}

int FakeVfioKernel::SpaprMap(Container& c, uint64_t iova, uint64_t ua, uint64_t size) {
  const uint64_t first = iova / kTcePage;
  const uint64_t pages = size / kTcePage;
  for (uint64_t i = 0; i < pages; ++i) {
    const uint64_t t = ua + i * kTcePage;
    uint64_t found = 0;
    for (const auto& [id, region] : regions_) {  // any region of the process (mm_iommu_lookup)
      if (t >= region.ua && t + kTcePage <= region.ua + region.size) {
        found = id;
        break;
      }
    }
    if (found == 0) {
      for (uint64_t j = 0; j < i; ++j) SpaprClearTce(c, first + j);
      return -EINVAL;
    }
    SpaprClearTce(c, first + i);  // a remap moves the count
    ++regions_[found].mapped;
    c.tces[first + i] = found;
    c.tce_ua[first + i] = t;
  }
  return 0;
}

void FakeVfioKernel::SpaprClearTce(Container& c, uint64_t page) {
  auto it = c.tces.find(page);
  if (it == c.tces.end()) return;
  auto region = regions_.find(it->second);
  if (region != regions_.end() && region->second.mapped > 1) --region->second.mapped;
  c.tces.erase(it);
  c.tce_ua.erase(page);
}

// ---------------------------------------------------------------------------------------------
// Type1 v2 (vfio_iommu_type1.c)

int FakeVfioKernel::Type1Ioctl(Container& c, unsigned long request, void* arg) {  // NOLINT
  const uint64_t pgsizes = options_.type1_pgsizes;
  const uint64_t mask = (pgsizes & (~pgsizes + 1)) - 1;
  switch (request) {
    case VFIO_IOMMU_GET_INFO: {
      struct vfio_iommu_type1_info info;
      const size_t minsz = offsetof(struct vfio_iommu_type1_info, cap_offset);
      if (!CopyIn(&info, arg, minsz)) return -EFAULT;
      if (info.argsz < minsz) return -EINVAL;
      info.flags = VFIO_IOMMU_INFO_PGSIZES;
      info.iova_pgsizes = pgsizes;
      info.cap_offset = 0;
      // The capability chain: DMA_AVAIL (always, 5.10+), then IOVA_RANGE (5.4+) if configured.
      std::vector<uint8_t> caps(16, 0);
      struct vfio_iommu_type1_info_dma_avail avail;
      std::memset(&avail, 0, sizeof(avail));
      avail.header.id = VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL;
      avail.header.version = 1;
      avail.avail = options_.type1_dma_entry_limit - static_cast<uint32_t>(c.dmas.size());
      if (!options_.type1_iova_ranges.empty()) {
        avail.header.next = kType1InfoSize + 16;
        struct vfio_iommu_type1_info_cap_iova_range head;
        std::memset(&head, 0, sizeof(head));
        head.header.id = VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE;
        head.header.version = 1;
        head.nr_iovas = static_cast<uint32_t>(options_.type1_iova_ranges.size());
        const size_t at = caps.size();
        caps.resize(at + sizeof(head) + head.nr_iovas * sizeof(struct vfio_iova_range), 0);
        std::memcpy(caps.data() + at, &head, sizeof(head));
        for (size_t i = 0; i < head.nr_iovas; ++i) {
          struct vfio_iova_range range {
            options_.type1_iova_ranges[i].first, options_.type1_iova_ranges[i].second
          };
          std::memcpy(caps.data() + at + sizeof(head) + i * sizeof(range), &range, sizeof(range));
        }
      }
      std::memcpy(caps.data(), &avail, sizeof(avail));
      info.flags |= VFIO_IOMMU_INFO_CAPS;
      if (info.argsz < kType1InfoSize + caps.size()) {
        info.argsz = static_cast<uint32_t>(kType1InfoSize + caps.size());  // ask for more room
      } else {
        info.cap_offset = kType1InfoSize;
        std::memcpy(static_cast<uint8_t*>(arg) + kType1InfoSize, caps.data(), caps.size());
      }
      std::memcpy(arg, &info, std::min<size_t>(info.argsz, kType1InfoSize));
      return 0;
    }
    case VFIO_IOMMU_MAP_DMA: {
      struct vfio_iommu_type1_dma_map map;
      if (!CopyIn(&map, arg)) return -EFAULT;
      if (map.argsz < sizeof(map)) return -EINVAL;
      if ((map.flags & ~(kRw | VFIO_DMA_MAP_FLAG_VADDR)) != 0) return -EINVAL;
      if ((map.flags & VFIO_DMA_MAP_FLAG_VADDR) != 0) {
        // A new address for an existing mapping takes no protection flags.
        if ((map.flags & kRw) != 0) return -EINVAL;
        return Type1MapVaddr(c, map);
      }
      if ((map.flags & kRw) == 0 || map.size == 0 || ((map.size | map.iova | map.vaddr) & mask)) {
        return -EINVAL;
      }
      if (map.iova + map.size - 1 < map.iova || map.vaddr + map.size - 1 < map.vaddr) {
        return -EINVAL;
      }
      if (!options_.type1_iova_ranges.empty()) {
        bool inside = false;
        for (const auto& [start, last] : options_.type1_iova_ranges) {
          if (map.iova >= start && map.iova + map.size - 1 <= last) inside = true;
        }
        if (!inside) return -EINVAL;
      }
      for (const auto& [iova, dma] : c.dmas) {
        if (map.iova < iova + dma.size && iova < map.iova + map.size) return -EEXIST;
      }
      if (c.dmas.size() >= options_.type1_dma_entry_limit) return -ENOSPC;
      // Type1 accounts locked_vm per vfio_dma, even when another mapping already pins the pages.
      const uint64_t pages = (map.size + options_.page_size - 1) / options_.page_size;
      if (locked_pages_ + pages > options_.memlock_limit_pages) return -ENOMEM;
      locked_pages_ += pages;
      c.dmas[map.iova] = FakeType1Dma{map.iova, map.vaddr, map.size};
      return 0;
    }
    case VFIO_IOMMU_UNMAP_DMA: {
      struct vfio_iommu_type1_dma_unmap unmap;
      if (!CopyIn(&unmap, arg)) return -EFAULT;
      if (unmap.argsz < sizeof(unmap)) return -EINVAL;
      if ((unmap.flags & ~VFIO_DMA_UNMAP_FLAG_VADDR) != 0) return -EINVAL;  // no other flag
      if ((unmap.iova & mask) != 0 || unmap.size == 0 || (unmap.size & mask) != 0) return -EINVAL;
      if (unmap.iova + unmap.size - 1 < unmap.iova) return -EINVAL;
      const uint64_t end = unmap.iova + unmap.size;
      for (const auto& [iova, dma] : c.dmas) {
        // v2 refuses to bisect a mapping at either end of the range.
        if (unmap.iova > iova && unmap.iova < iova + dma.size) return -EINVAL;
        if (end > iova && end < iova + dma.size) return -EINVAL;
      }
      if ((unmap.flags & VFIO_DMA_UNMAP_FLAG_VADDR) != 0) {
        const int result = Type1UnmapVaddr(c, unmap);
        if (result == 0) std::memcpy(arg, &unmap, sizeof(unmap));
        return result;
      }
      uint64_t unmapped = 0;
      for (auto it = c.dmas.begin(); it != c.dmas.end();) {
        if (it->first >= unmap.iova && it->first + it->second.size <= end) {
          unmapped += it->second.size;
          locked_pages_ -= (it->second.size + options_.page_size - 1) / options_.page_size;
          it = c.dmas.erase(it);
        } else {
          ++it;
        }
      }
      unmap.size = unmapped;
      std::memcpy(arg, &unmap, sizeof(unmap));
      return 0;
    }
    case VFIO_IOMMU_DIRTY_PAGES:  // == SPAPR_REGISTER_MEMORY: no dirty tracking flag set
      return -EINVAL;
    default:
      return -ENOTTY;
  }
}

int FakeVfioKernel::Type1UnmapVaddr(Container& c, struct vfio_iommu_type1_dma_unmap& unmap) {
  const uint64_t end = unmap.iova + unmap.size;
  uint64_t invalidated = 0;
  for (const auto& [iova, dma] : c.dmas) {
    if (iova >= unmap.iova && iova + dma.size <= end && dma.vaddr_invalid) return -EINVAL;
  }
  for (auto& [iova, dma] : c.dmas) {
    if (iova >= unmap.iova && iova + dma.size <= end) {
      dma.vaddr_invalid = true;
      invalidated += dma.size;
    }
  }
  unmap.size = invalidated;
  return 0;
}

int FakeVfioKernel::Type1MapVaddr(Container& c, const struct vfio_iommu_type1_dma_map& map) {
  // vfio_find_dma: any mapping overlapping the range.
  for (auto& [iova, dma] : c.dmas) {
    if (!(map.iova < iova + dma.size && iova < map.iova + map.size)) continue;
    if (!dma.vaddr_invalid || iova != map.iova || dma.size != map.size) return -EINVAL;
    dma.vaddr = map.vaddr;
    dma.vaddr_invalid = false;
    return 0;
  }
  return -ENOENT;
}

}  // namespace dmapin::agent
