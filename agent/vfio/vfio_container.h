// VFIO container drivers: the node agent's real pinning path (spec §11).
//
// A driver owns one VFIO container (/dev/vfio/vfio) and the IOMMU groups attached to it, and turns
// the registry's four operations into ioctls:
//
//   registry            SpaprTceV2Driver (ppc64)               Type1Driver (x86, arm)
//   RegisterMemory      VFIO_IOMMU_SPAPR_REGISTER_MEMORY       VFIO_IOMMU_MAP_DMA into the reserved
//                                                              pin range (pins once)
//   UnregisterMemory    VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY     VFIO_IOMMU_UNMAP_DMA of that range
//   MapDma              VFIO_IOMMU_MAP_DMA (writes TCEs only)  VFIO_IOMMU_MAP_DMA at the guest iova
//   UnmapDma            VFIO_IOMMU_UNMAP_DMA                   VFIO_IOMMU_UNMAP_DMA
//
// The drivers are deliberately thin: they do not re-implement the registry's rules (spec §2, §3,
// §7) and keep no counters of their own beyond what they need to talk to the kernel. The registry's
// counters are the source of truth; the kernel's answers are passed through unchanged as
// ErrnoStatus values naming the ioctl and its arguments.
//
// Thread safety: every public method may be called from any thread; one container's ioctls are
// serialized by the driver's mutex (the kernel serializes them per container too, and the guest's
// DMA hot path runs in KVM, not through here).
#ifndef DMAPIN_AGENT_VFIO_VFIO_CONTAINER_H_
#define DMAPIN_AGENT_VFIO_VFIO_CONTAINER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "agent/vfio/vfio_kernel.h"
#include "common/mutex.h"

namespace dmapin::agent {

// The path of the VFIO container device.
inline constexpr char kVfioContainerPath[] = "/dev/vfio/vfio";

// Backend names shared with DetectVfioBackends() and the agent's configuration.
inline constexpr char kVfioSpaprV2Backend[] = "vfio-spapr-v2";
inline constexpr char kVfioType1Backend[] = "vfio-type1";

// The DMA window a container offers to guest mappings (spec §1, §7.3), as the kernel reports it.
struct VfioDmaWindow {
  uint64_t start = 0;             // first bus address
  uint64_t size = 0;              // bytes; [start, start + size)
  uint64_t iommu_page_size = 0;   // the IOMMU page size MapDma must be aligned to
  uint64_t page_size_bitmap = 0;  // every IOMMU page size the kernel reports (bit n = 2^n bytes)
};

// An inclusive IOVA range, as in struct vfio_iova_range.
struct VfioIovaRange {
  uint64_t start = 0;
  uint64_t last = 0;  // inclusive
};

// A descriptor a VfioKernel handed out, closed through it (a fake kernel's are not the
// process's). Move-only.
class VfioFd {
 public:
  VfioFd() = default;
  VfioFd(VfioKernel* kernel, int fd) : kernel_(kernel), fd_(fd) {}
  VfioFd(VfioFd&& other) noexcept : kernel_(other.kernel_), fd_(other.release()) {}
  VfioFd& operator=(VfioFd&& other) noexcept {
    if (this != &other) {
      reset();
      kernel_ = other.kernel_;
      fd_ = other.release();
    }
    return *this;
  }
  VfioFd(const VfioFd&) = delete;
  VfioFd& operator=(const VfioFd&) = delete;
  ~VfioFd() { reset(); }

  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset() {
    if (fd_ >= 0) kernel_->Close(fd_);
    fd_ = -1;
  }

 private:
  VfioKernel* kernel_ = nullptr;
  int fd_ = -1;
};

class VfioContainerDriver {
 public:
  VfioContainerDriver(const VfioContainerDriver&) = delete;
  VfioContainerDriver& operator=(const VfioContainerDriver&) = delete;
  // Closes the container if it is still open.
  virtual ~VfioContainerDriver();

  // Opens /dev/vfio/vfio, checks VFIO_GET_API_VERSION == VFIO_API_VERSION and that
  // VFIO_CHECK_EXTENSION knows this driver's IOMMU type, then for each group path (e.g.
  // "/dev/vfio/26") opens it, requires VFIO_GROUP_GET_STATUS to report VIABLE and attaches it with
  // VFIO_GROUP_SET_CONTAINER; finally VFIO_SET_IOMMU and the driver's window query. On failure
  // every descriptor opened so far is closed and the driver stays closed. At least one group is
  // needed (the kernel refuses VFIO_SET_IOMMU on an empty container). EBUSY if already open.
  absl::Status Open(absl::Span<const std::string> group_paths);

  // Pre-registers (pins) [ua, ua + size) for this container (spec §2 / §11).
  virtual absl::Status RegisterMemory(uint64_t ua, uint64_t size) = 0;
  // Drops the pre-registration made with exactly this ua and size (spec §3).
  virtual absl::Status UnregisterMemory(uint64_t ua, uint64_t size) = 0;
  // Maps [iova, iova + size) of the DMA window to [ua, ua + size), device read and write.
  virtual absl::Status MapDma(uint64_t iova, uint64_t ua, uint64_t size) = 0;
  // Clears the IOMMU entries of [iova, iova + size).
  virtual absl::Status UnmapDma(uint64_t iova, uint64_t size) = 0;

  // Where a registration of `size` bytes would go in the container's IOVA space (type1: the pin
  // range; 0 for a driver that needs no IOVA for it, SPAPR), and the same registration at that
  // IOVA (`device_iova` is ignored when 0): a registration split in pieces asks once for all of
  // them and registers each at its offset, so one IOVA, stored with the hold, says where all of it
  // is after a restart.
  virtual absl::StatusOr<uint64_t> FreeDeviceIova(uint64_t size) const { return uint64_t{0}; }
  virtual absl::Status RegisterMemoryAt(uint64_t ua, uint64_t size, uint64_t device_iova) {
    return RegisterMemory(ua, size);
  }

  // The window guest mappings may use, as read from the kernel by Open().
  absl::StatusOr<VfioDmaWindow> DmaWindow() const;

  // --- The device handoff (README, "What happens when the agent dies") ------------------------
  // The device `name` (e.g. "0000:00:03.0") of one of the container's groups, opened with
  // VFIO_GROUP_GET_DEVICE_FD for the VMM. While a device fd is open its group stays attached and
  // the container keeps its IOMMU state, whatever happens to the agent. ENODEV when no group of
  // the container has the device. The caller owns the descriptor (close it with kernel()).
  absl::StatusOr<int> OpenDevice(absl::string_view name);
  // Another descriptor of the container (F_DUPFD_CLOEXEC), for the VMM to keep and to give back
  // to a restarted agent. The caller owns it.
  absl::StatusOr<int> DupContainer();
  // Whether Adopt can work for this IOMMU type (type1: VFIO_UPDATE_VADDR; SPAPR binds a container
  // to the mm of its first user, so another process cannot change it).
  virtual bool can_adopt() const { return false; }
  // Takes over `container_fd` (always: closed on failure, or by Close), a container this driver's
  // IOMMU type configured in an earlier agent process and that its VMM kept: checks it is one
  // (VFIO_GET_API_VERSION, the IOMMU type, and for type1 VFIO_CHECK_EXTENSION(VFIO_UPDATE_VADDR),
  // which answers 1 only while a group is attached) and reads its window. No group is opened
  // (the VMM's device fds hold them: opening one is EBUSY). Then AdoptRegistration and
  // AdoptMapping for everything the store says the container holds. EOPNOTSUPP unless
  // can_adopt(); EBUSY if already open.
  absl::Status Adopt(int container_fd);
  // The kernel objects an earlier agent process made, now known by this process's address `ua`
  // (type1: VFIO_DMA_MAP_FLAG_VADDR, after VFIO_DMA_UNMAP_FLAG_VADDR unless the old process did
  // that before its planned exit). ENOENT when the kernel has no mapping there (it is not that
  // container, or the earlier agent died before the kernel call), EINVAL when its size differs.
  virtual absl::Status AdoptRegistration(uint64_t ua, uint64_t size, uint64_t device_iova);
  virtual absl::Status AdoptMapping(uint64_t iova, uint64_t ua, uint64_t size);
  // Before a planned exit with the VMM holding the container: the kernel forgets this process's
  // addresses (VFIO_DMA_UNMAP_FLAG_VADDR of every mapping), so nothing uses them once it is gone;
  // the device keeps its IOMMU entries. Type1 only (OK and nothing done otherwise). Returns the
  // first error, after trying every mapping.
  virtual absl::Status InvalidateAddresses() { return absl::OkStatus(); }
  // Unmaps and unregisters everything the driver made or adopted: a release while the VMM still
  // holds the devices (closing the descriptors would then drop nothing). Returns the first
  // error, after trying everything.
  virtual absl::Status ClearAll() = 0;
  VfioKernel* kernel() const { return kernel_; }

  // Closes the groups (which detaches them from the container) and then the container. Once no
  // device fd of the groups is open either (a VMM holds those), the kernel drops every mapping
  // and pre-registration of the container; until then they, and their pins, stay (seen under
  // QEMU, tests/qemu_vfio). Returns the first close error, but closes everything regardless. OK
  // if already closed.
  absl::Status Close();

  bool is_open() const;
  // The container descriptor (e.g. for KVM_DEV_VFIO_GROUP bookkeeping), -1 when closed.
  int container_fd() const;
  // The VFIO IOMMU type passed to VFIO_SET_IOMMU.
  uint32_t iommu_type() const { return iommu_type_; }
  // kVfioSpaprV2Backend or kVfioType1Backend.
  const std::string& name() const { return name_; }

 protected:
  VfioContainerDriver(VfioKernel* kernel, uint32_t iommu_type, std::string name);

  // Called by Open() after VFIO_SET_IOMMU succeeded: reads the IOMMU's geometry.
  virtual absl::StatusOr<VfioDmaWindow> QueryWindow() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // Called by Close() before the descriptors go: forget driver-specific state.
  virtual void ResetState() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {}

  // Issues an ioctl on the container; a failure becomes an ErrnoStatus whose reason is
  // "<what> on container fd N". Requires an open container.
  absl::StatusOr<int> ContainerIoctl(unsigned long request, void* arg,  // NOLINT(runtime/int)
                                     absl::string_view what) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // EBADF (FAILED_PRECONDITION) unless Open() succeeded.
  absl::Status CheckOpen(absl::string_view operation) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  VfioKernel* const kernel_;
  mutable Mutex mu_;
  int container_fd_ ABSL_GUARDED_BY(mu_) = -1;
  VfioDmaWindow window_ ABSL_GUARDED_BY(mu_);
  // Taken over from an earlier agent process (Adopt): the kernel may hold what no record says.
  bool adopted_ ABSL_GUARDED_BY(mu_) = false;

 private:
  absl::Status OpenLocked(absl::Span<const std::string> group_paths)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CloseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status AdoptLocked(int container_fd) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint32_t iommu_type_;
  const std::string name_;
  std::vector<int> group_fds_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> group_paths_ ABSL_GUARDED_BY(mu_);  // of group_fds_
};

// VFIO_SPAPR_TCE_v2_IOMMU (ppc64, Linux 4.2+): the kernel's own pre-registration cache.
//
// VFIO_IOMMU_ENABLE is not issued: the v2 IOMMU answers ENOTTY to it; a v2 container becomes
// enabled by its first REGISTER_MEMORY (until then MAP_DMA is EPERM). The window reported is the
// default 32-bit window of VFIO_IOMMU_SPAPR_TCE_GET_INFO (dma32_window_start/size); the kernel
// creates it with 4 KiB TCEs (IOMMU_PAGE_SHIFT_4K), which is what iommu_page_size says. Dynamic
// DMA windows (VFIO_IOMMU_SPAPR_TCE_CREATE) are not used; their page sizes (ddw.pgsizes) are only
// reported in page_size_bitmap.
class SpaprTceV2Driver final : public VfioContainerDriver {
 public:
  // `kernel` must outlive the driver.
  explicit SpaprTceV2Driver(VfioKernel* kernel);
  ~SpaprTceV2Driver() override;

  absl::Status RegisterMemory(uint64_t ua, uint64_t size) override;
  // Linux 5.1+ answers 0 (not EBUSY) to the last UNREGISTER_MEMORY of a region whose TCEs are
  // still installed, and leaves the region orphaned and pinned until it is unmapped. So this
  // driver must not be relied on for the EBUSY of spec §3.4: the agent enforces that rule in the
  // registry, before it calls here.
  absl::Status UnregisterMemory(uint64_t ua, uint64_t size) override;
  absl::Status MapDma(uint64_t iova, uint64_t ua, uint64_t size) override;
  absl::Status UnmapDma(uint64_t iova, uint64_t size) override;
  // Clears the whole window's TCEs, then unregisters every region.
  absl::Status ClearAll() override;

 private:
  absl::StatusOr<VfioDmaWindow> QueryWindow() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ResetState() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { registered_.clear(); }
  absl::Status UnregisterLocked(uint64_t ua, uint64_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // The regions registered, for ClearAll.
  std::set<std::pair<uint64_t, uint64_t>> registered_ ABSL_GUARDED_BY(mu_);
};

struct Type1Options {
  // Size of the reserved "pin range" at the top of the highest usable IOVA range, where
  // RegisterMemory maps whole regions. 0: the upper half of that range (rounded to the IOMMU page).
  // It must hold the sum of all regions registered at once in this container.
  uint64_t reserved_iova_size = 0;
  // Where the IOVA space is assumed to end when the kernel does not report the
  // VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE capability (kernels before 5.4): [0, limit).
  // 2^47 fits the 48-bit address width of current VT-d / AMD-Vi / SMMUv3 page tables.
  uint64_t fallback_iova_limit = uint64_t{1} << 47;
};

// VFIO_TYPE1v2_IOMMU (x86, arm64): the kernel has no pre-registration, MAP_DMA pins.
//
// RegisterMemory pins a region by mapping all of it, once, into a reserved IOVA range at the top
// of the container's IOVA space (the "pin range"). The guest-visible window (DmaWindow) ends where
// the pin range begins, so the agent never hands those IOVAs to a guest, and MapDma / UnmapDma
// refuse them (ENXIO): a guest unmap must never drop a pin. The pin range comes from the kernel's
// IOVA range capability when present (reserved regions such as the x86 MSI window are already cut
// out of it), else from Type1Options::fallback_iova_limit.
//
// MapDma maps the guest iova to the same ua again. Type1 keeps one vfio_dma per map and pins per
// vfio_dma, so the kernel takes another page reference for each mapping; the pages are already
// resident and locked by the pin-range mapping, so this costs only bookkeeping. But it is also
// accounted again in the process's locked_vm: without CAP_IPC_LOCK, RLIMIT_MEMLOCK must cover
// registered plus mapped bytes, or MAP_DMA fails with ENOMEM. The registry's counters stay the
// source of truth; the kernel's locked_vm is not.
//
// The kernel answers MAP_DMA over an IOVA that is already mapped with EEXIST (a TCE would simply
// be overwritten) and refuses an UNMAP_DMA that bisects an earlier mapping (EINVAL). The driver
// hides both so its MapDma/UnmapDma behave like SPAPR's (spec §7: a remap replaces, any aligned
// range unmaps): it remembers its guest mappings, unmaps what a new map overlaps first, and maps
// back the parts of a bisected mapping that lie outside the range. Those parts are briefly
// unmapped, so a device doing DMA into them at that moment faults; VMMs do not bisect in
// practice. The type1 kernel does not check that `ua` is registered (the registry's lookup, spec
// §7.4, is the gate), and does not give the EBUSY of spec §3.4 either (the guest mappings hold
// their own pins, so unregistering only drops the pin-range mapping).
class Type1Driver final : public VfioContainerDriver {
 public:
  // `kernel` must outlive the driver.
  explicit Type1Driver(VfioKernel* kernel, Type1Options options = {});
  ~Type1Driver() override;

  // Mirrors SPAPR's per-container answers without asking the kernel: EINVAL for a zero, wrapping
  // or misaligned (to the IOMMU page) range or one overlapping a region of this container, EBUSY
  // for the same region twice; ENOSPC when the pin range is full.
  absl::Status RegisterMemory(uint64_t ua, uint64_t size) override;
  // EINVAL misaligned, ENOENT unless exactly this region is registered here.
  absl::Status UnregisterMemory(uint64_t ua, uint64_t size) override;
  absl::Status MapDma(uint64_t iova, uint64_t ua, uint64_t size) override;
  absl::Status UnmapDma(uint64_t iova, uint64_t size) override;
  // First fit in the pin range; RegisterMemoryAt: ENOSPC outside the pin range or over another
  // registration, EINVAL misaligned.
  absl::StatusOr<uint64_t> FreeDeviceIova(uint64_t size) const override;
  absl::Status RegisterMemoryAt(uint64_t ua, uint64_t size, uint64_t device_iova) override;

  bool can_adopt() const override { return true; }
  absl::Status AdoptRegistration(uint64_t ua, uint64_t size, uint64_t device_iova) override;
  absl::Status AdoptMapping(uint64_t iova, uint64_t ua, uint64_t size) override;
  absl::Status InvalidateAddresses() override;
  absl::Status ClearAll() override;

  // The pin range (valid after Open()).
  absl::StatusOr<VfioIovaRange> ReservedIovaRange() const;
  // The usable IOVA ranges as reported by the kernel (or the fallback).
  absl::StatusOr<std::vector<VfioIovaRange>> UsableIovaRanges() const;
  // Where RegisterMemory put [ua, ua + size), or ENOENT.
  absl::StatusOr<uint64_t> PinIova(uint64_t ua, uint64_t size) const;
  // Kernel mappings MapDma found where it maps and did not know (EEXIST), and replaced.
  uint64_t unrecorded_mappings_replaced() const {
    MutexLock lock(&mu_);
    return unrecorded_mappings_replaced_;
  }

 private:
  struct Pin {
    uint64_t ua = 0;
    uint64_t size = 0;
  };

  absl::StatusOr<VfioDmaWindow> QueryWindow() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ResetState() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reads VFIO_IOMMU_GET_INFO, growing the buffer when the kernel asks for room for capabilities.
  absl::Status ReadIommuInfo(uint64_t* pgsizes, std::vector<VfioIovaRange>* ranges,
                             bool* have_ranges) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // First fit in the pin range, aligned to the IOMMU page.
  absl::StatusOr<uint64_t> AllocatePinIova(uint64_t size) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // MAP_DMA of one guest mapping, remembered in guest_maps_.
  absl::Status MapLocked(uint64_t iova, uint64_t ua, uint64_t size)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Unmaps every guest mapping overlapping [iova, iova + size) and maps back their parts outside
  // it.
  absl::Status ClearGuestRangeLocked(uint64_t iova, uint64_t size)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ENXIO unless [iova, iova + size) lies inside the guest window (and so outside the pin range).
  absl::Status CheckGuestRange(absl::string_view what, uint64_t iova, uint64_t size) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RegisterLocked(uint64_t ua, uint64_t size, uint64_t iova)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // VFIO_IOMMU_MAP_DMA of [iova, iova + size) -> ua, read and write; `what` ends the message.
  absl::Status MapIoctlLocked(uint64_t iova, uint64_t ua, uint64_t size, absl::string_view what)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Points the kernel's mapping [iova, iova + size) at `ua` of this process (VFIO_UPDATE_VADDR).
  absl::Status UpdateVaddrLocked(uint64_t iova, uint64_t ua, uint64_t size, absl::string_view what)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status UnmapLocked(uint64_t iova, uint64_t size, uint32_t flags, absl::string_view what,
                           uint64_t* unmapped) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Type1Options options_;
  VfioIovaRange reserved_ ABSL_GUARDED_BY(mu_);
  std::vector<VfioIovaRange> usable_ ABSL_GUARDED_BY(mu_);
  // Pin-range iova -> region registered there.
  std::map<uint64_t, Pin> pins_by_iova_ ABSL_GUARDED_BY(mu_);
  // Guest iova -> the kernel mapping that starts there (they never overlap).
  struct GuestMapping {
    uint64_t size = 0;
    uint64_t ua = 0;
  };
  std::map<uint64_t, GuestMapping> guest_maps_ ABSL_GUARDED_BY(mu_);
  uint64_t unrecorded_mappings_replaced_ ABSL_GUARDED_BY(mu_) = 0;
};

// A driver for a backend name from DetectVfioBackends() ("vfio-spapr-v2", "vfio-type1"), or
// nullptr for any other name. `kernel` must outlive it.
std::unique_ptr<VfioContainerDriver> NewVfioContainerDriver(absl::string_view backend,
                                                            VfioKernel* kernel,
                                                            Type1Options type1_options = {});

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_VFIO_VFIO_CONTAINER_H_
