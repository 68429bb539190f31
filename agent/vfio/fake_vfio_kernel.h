// FakeVfioKernel: a scripted, in-memory VFIO for unit tests of the container drivers.
//
// It models /dev/vfio/vfio containers and /dev/vfio/<N> groups, and the ioctls the drivers use,
// following the kernel code closely enough for the tests (vfio_container.c,
// vfio_iommu_spapr_tce.c + arch/powerpc/mm/book3s64/iommu_api.c, vfio_iommu_type1.c):
//   - container: GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU (EINVAL without a group or when
//     already set, ENODEV for an unknown type); other ioctls before SET_IOMMU are EINVAL.
//   - group: GET_STATUS, SET_CONTAINER (EPERM not viable, EINVAL already set, EBADF not a
//     container), UNSET_CONTAINER, GET_DEVICE_FD (EINVAL before the container has an IOMMU,
//     ENODEV for a name not in the group); opening a group while it or one of its device fds is
//     open is EBUSY; the group detaches when its fd and every device fd are closed, and the last
//     detach releases the container's IOMMU state (mappings, registrations). A container lives
//     while any of its fds (Dup) or groups does: the kernel's open-file references, one fd table
//     for every "process" of a test.
//   - SPAPR TCE v2: TCE_GET_INFO; REGISTER_MEMORY (EINVAL misaligned/overlap/flags, EBUSY same
//     region in the same container, ENOMEM memlock; a region of the process shared by containers
//     counts `used`); UNREGISTER_MEMORY (EPERM before any register, ENOENT unknown/not held; the
//     last unregister of a mapped region answers 0 and orphans it, as Linux 5.1+ does, unless
//     `unregister_mapped_ebusy`); MAP_DMA (EPERM before any register, ENXIO outside the window,
//     EINVAL misaligned or not inside registered memory) counting `mapped` per TCE;
//     UNMAP_DMA; ENABLE/DISABLE are ENOTTY on v2.
//   - Type1 v2: GET_INFO with a DMA_AVAIL and an optional IOVA_RANGE capability (and the argsz
//     growing protocol); MAP_DMA (EINVAL flags/alignment/outside the IOVA ranges, EEXIST overlap,
//     ENOSPC entry limit, ENOMEM memlock, accounted per mapping as type1 does); UNMAP_DMA (EINVAL
//     when bisecting a mapping, writes back the unmapped size); VFIO_UPDATE_VADDR (Linux 5.12+):
//     CHECK_EXTENSION answers 1 once the IOMMU is set, UNMAP_DMA(FLAG_VADDR) invalidates the
//     vaddrs of the mappings inside the range (EINVAL, and nothing changed, if one already is),
//     MAP_DMA(FLAG_VADDR) sets the vaddr of exactly one invalidated mapping (ENOENT none there,
//     EINVAL another iova or size, or not invalidated).
// Every call is recorded (with a copy of its argument struct as passed in), and a test can make
// the n-th call of an ioctl fail with any errno without running it.
#ifndef DMAPIN_AGENT_VFIO_FAKE_VFIO_KERNEL_H_
#define DMAPIN_AGENT_VFIO_FAKE_VFIO_KERNEL_H_

#include <linux/vfio.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "agent/vfio/vfio_kernel.h"
#include "common/mutex.h"

namespace dmapin::agent {

struct FakeVfioGroupSpec {
  std::string path;  // e.g. "/dev/vfio/7"
  bool viable = true;
  std::vector<std::string> devices;  // what GET_DEVICE_FD opens, e.g. "0000:00:07.0"
};

struct FakeVfioKernelOptions {
  bool container_device_present = true;  // false: /dev/vfio/vfio is ENOENT
  int api_version = 0;                   // what VFIO_GET_API_VERSION answers
  std::vector<uint32_t> iommu_types;     // what VFIO_CHECK_EXTENSION / SET_IOMMU accept
  std::vector<FakeVfioGroupSpec> groups;
  uint64_t page_size = 65536;  // kernel PS: REGISTER_MEMORY alignment, locked_vm unit
  uint64_t memlock_limit_pages = ~uint64_t{0};  // RLIMIT_MEMLOCK / PS (no CAP_IPC_LOCK)

  // SPAPR: the default 32-bit window (4 KiB TCEs) and the DDW page sizes (0: no DDW).
  uint32_t dma32_window_start = 0;
  uint32_t dma32_window_size = 1u << 30;
  uint64_t ddw_pgsizes = (uint64_t{1} << 12) | (uint64_t{1} << 16) | (uint64_t{1} << 24);
  bool unregister_mapped_ebusy = false;  // true: the pre-5.1 EBUSY instead of orphaning

  // Type1: IOMMU page sizes, usable IOVA ranges (inclusive; empty = no IOVA_RANGE capability, as
  // before Linux 5.4) and the per-container mapping limit (dma_entry_limit).
  uint64_t type1_pgsizes = (uint64_t{1} << 12) | (uint64_t{1} << 21) | (uint64_t{1} << 30);
  std::vector<std::pair<uint64_t, uint64_t>> type1_iova_ranges;
  uint32_t type1_dma_entry_limit = 65535;

  // Two groups (devices 0000:00:07.0 and 0000:00:08.0), both viable, both IOMMU types, an x86-like
  // IOVA space [0, 2^39) without the MSI window; SPAPR window [0, 1 GiB).
  static FakeVfioKernelOptions Default();
};

struct FakeVfioCall {
  enum class Kind { kOpen, kClose, kDup, kIoctl };
  Kind kind = Kind::kIoctl;
  std::string path;           // kOpen
  int flags = 0;              // kOpen
  int fd = -1;                // kClose, kDup, kIoctl
  unsigned long request = 0;  // NOLINT(runtime/int): kIoctl
  std::string name;           // kIoctl: e.g. "VFIO_IOMMU_SPAPR_TCE_GET_INFO"
  uint64_t int_arg = 0;       // kIoctl with an integer argument
  std::vector<uint8_t> arg;   // kIoctl: the argument struct as the caller passed it
  int result = 0;             // what the call returned (fd, value or -errno)
  bool injected = false;      // the result came from InjectIoctlErrno / InjectCloseErrno

  // The recorded argument as a T (zero-filled past what was recorded).
  template <typename T>
  T ArgAs() const {
    T value;
    std::memset(&value, 0, sizeof(value));
    std::memcpy(&value, arg.data(), std::min(arg.size(), sizeof(value)));
    return value;
  }
  // "open(/dev/vfio/vfio)=3", "ioctl(3, VFIO_GET_API_VERSION)=0", "close(4)=-EBADF".
  std::string ToString() const;
};

struct FakeSpaprRegion {
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t used = 0;
  uint64_t mapped = 0;  // biased: 1 = no TCE uses it
  int holders = 0;      // containers that hold it (0 with used > 0: orphaned)
};

struct FakeType1Dma {
  uint64_t iova = 0;
  uint64_t vaddr = 0;
  uint64_t size = 0;
  bool vaddr_invalid = false;  // UNMAP_DMA(FLAG_VADDR) since the last MAP_DMA(FLAG_VADDR)
};

class FakeVfioKernel final : public VfioKernel {
 public:
  explicit FakeVfioKernel(FakeVfioKernelOptions options = FakeVfioKernelOptions::Default());

  int Open(const char* path, int flags) override;
  int Close(int fd) override;
  int Dup(int fd) override;
  int Ioctl(int fd, unsigned long request, void* arg) override;  // NOLINT(runtime/int)

  // The `nth` (1-based) call of `request` from now on fails with `err` and changes nothing.
  // Several injections may be pending.
  void InjectIoctlErrno(unsigned long request, int nth, int err);  // NOLINT(runtime/int)
  // Opening `path` fails with `err` (0 clears).
  void SetOpenErrno(const std::string& path, int err);
  // The `nth` close from now on returns `err` (the descriptor is released anyway, as on Linux).
  void InjectCloseErrno(int nth, int err);
  void SetGroupViable(const std::string& path, bool viable);

  std::vector<FakeVfioCall> calls() const;
  std::vector<FakeVfioCall> IoctlCalls(unsigned long request) const;  // NOLINT(runtime/int)
  // calls() as strings, for exact sequence assertions.
  std::vector<std::string> CallLog() const;
  void ClearCalls();

  // Descriptors handed out and not closed (a driver that leaks leaves some here).
  std::vector<int> OpenFds() const;
  // Pages accounted in the fake process's locked_vm (SPAPR regions + type1 mappings).
  uint64_t locked_pages() const;
  std::vector<FakeSpaprRegion> SpaprRegions() const;
  // Installed TCEs of every container, as iova -> ua of each 4 KiB IOMMU page.
  std::map<uint64_t, uint64_t> SpaprTces() const;
  std::vector<FakeType1Dma> Type1Dmas() const;

  // A readable name for a VFIO ioctl; SPAPR and type1 share two numbers (TCE_GET_INFO ==
  // GET_INFO, REGISTER_MEMORY == DIRTY_PAGES), so the container's IOMMU type picks the name.
  static std::string IoctlName(unsigned long request, uint32_t iommu_type);  // NOLINT

 private:
  struct Region {
    uint64_t ua = 0;
    uint64_t size = 0;
    uint64_t used = 0;
    uint64_t mapped = 1;
  };
  struct Container {
    int fd_refs = 1;          // descriptors of the container (Dup adds one)
    uint32_t iommu_type = 0;  // 0 until SET_IOMMU
    std::set<std::string> groups;
    bool mm_set = false;                // SPAPR: bound to the process by the first REGISTER_MEMORY
    bool enabled = false;               // SPAPR v2: enabled by the first REGISTER_MEMORY
    std::set<uint64_t> held;            // SPAPR: region ids this container holds
    std::map<uint64_t, uint64_t> tces;  // SPAPR: iova page -> region id
    std::map<uint64_t, uint64_t> tce_ua;    // SPAPR: iova page -> ua
    std::map<uint64_t, FakeType1Dma> dmas;  // type1: iova -> mapping
  };
  struct Group {
    bool viable = true;
    int fd = -1;  // -1: not open
    int container = -1;
    std::vector<std::string> devices;
    int device_fds = 0;  // open device descriptors: they keep the group's file, and so its
                         // container
  };
  enum class FdKind { kContainer, kGroup, kDevice };
  struct FdEntry {
    FdKind kind;
    int container = -1;  // kContainer
    std::string group;   // kGroup, kDevice
  };
  struct Injection {
    unsigned long request;  // NOLINT(runtime/int)
    int remaining;          // calls of `request` to let through before failing
    int err;
  };

  int AllocateFd() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int OpenLocked(const std::string& path) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  size_t ArgSize(unsigned long request, const FdEntry& entry) const  // NOLINT(runtime/int)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int Dispatch(const FdEntry& entry, unsigned long request, void* arg)  // NOLINT(runtime/int)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int ContainerIoctl(int id, unsigned long request, void* arg)  // NOLINT(runtime/int)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int GroupIoctl(const std::string& path, unsigned long request, void* arg)  // NOLINT
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int SpaprIoctl(Container& c, unsigned long request, void* arg)  // NOLINT(runtime/int)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int Type1Ioctl(Container& c, unsigned long request, void* arg)  // NOLINT(runtime/int)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int SpaprRegister(Container& c, uint64_t ua, uint64_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int SpaprUnregister(Container& c, uint64_t ua, uint64_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int SpaprMap(Container& c, uint64_t iova, uint64_t ua, uint64_t size)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SpaprClearTce(Container& c, uint64_t page) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DetachGroup(const std::string& path) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Detaches the group once neither its fd nor a device fd keeps its file open.
  void MaybeDetachGroup(const std::string& path) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int Type1UnmapVaddr(Container& c, struct vfio_iommu_type1_dma_unmap& unmap)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int Type1MapVaddr(Container& c, const struct vfio_iommu_type1_dma_map& map)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseIommu(Container& c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeDestroyContainer(int id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const FakeVfioKernelOptions options_;
  mutable Mutex mu_;
  std::map<int, FdEntry> fds_ ABSL_GUARDED_BY(mu_);
  std::map<int, Container> containers_ ABSL_GUARDED_BY(mu_);
  int next_container_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<std::string, Group> groups_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, Region> regions_ ABSL_GUARDED_BY(mu_);  // SPAPR, per process (the mm)
  uint64_t next_region_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t locked_pages_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, int> open_errnos_ ABSL_GUARDED_BY(mu_);
  std::vector<Injection> injections_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<int, int>> close_injections_ ABSL_GUARDED_BY(mu_);  // remaining, err
  std::vector<FakeVfioCall> calls_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_VFIO_FAKE_VFIO_KERNEL_H_
