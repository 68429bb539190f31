// The guest side of the QEMU VFIO test (run_qemu_vfio.sh): runs dmapin's real VFIO container
// drivers (agent/vfio/vfio_container.cc over RealVfioKernel) against the real Linux VFIO code of a
// kernel booted under QEMU, and the registry (agent/registry/registry.cc on the sim backend) on the
// same sequences, so every answer of the kernel is compared with the spec's.
//
// It is the initramfs's /init (PID 1): it mounts /proc, /sys and /dev, loads the modules found in
// /modules (in name order, with finit_module), binds the emulated `edu` devices (1234:11e8) to
// vfio-pci, runs the steps of its mode and reboots (QEMU runs with -no-reboot, so it exits).
// Run as a normal process (not PID 1) it skips the boot part.
//
// Usage: vfio_guest_test type1|spapr   (as PID 1 the kernel passes dmapin_mode=... in the
// environment instead).
//
// Output, on the console, one line per step:
//   PASS <mode> <step>: <detail>     FAIL <mode> <step>: <detail>     INFO <mode> ...
//   DIFF <mode> <step>: kernel=<errno> registry=<errno>: <why>   (an expected kernel-vs-spec
//                                                                  difference; also a PASS line)
// and finally "RESULT <mode> passed=N failed=M" and the marker line "DMAPIN-QEMU-VFIO-DONE".
#include <fcntl.h>
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
#include "agent/vfio/vfio_container.h"
#include "agent/vfio/vfio_detect.h"
#include "agent/vfio/vfio_kernel.h"
#include "common/errno_status.h"
#include "tests/qemu_vfio/guest_support.h"

namespace dmapin::agent {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

// ---------------------------------------------------------------------------------------------
// Reporting (guest_support.h prints the lines)

// One operation's answer: `got` must be `want` (an errno, 0 for OK).
bool Expect(const std::string& step, const absl::Status& got, int want) {
  const int err = ErrnoOf(got);
  std::string detail = absl::StrCat("got ", Errno(err), ", want ", Errno(want));
  if (!got.ok()) absl::StrAppend(&detail, " (", got.message(), ")");
  return Check(err == want, step, detail);
}

// The same operation on the kernel (through the driver) and on the registry. Both must answer as
// expected; when the expectations differ, the difference is a known one and `why` explains it.
bool Compare(const std::string& step, const absl::Status& kernel, int want_kernel,
             const absl::Status& registry, int want_registry, const std::string& why = "") {
  const int k = ErrnoOf(kernel);
  const int r = ErrnoOf(registry);
  std::string detail =
      absl::StrFormat("kernel=%s registry=%s (want kernel=%s registry=%s)", Errno(k), Errno(r),
                      Errno(want_kernel), Errno(want_registry));
  if (!kernel.ok() && k != want_kernel) absl::StrAppend(&detail, " kernel: ", kernel.message());
  if (!registry.ok() && r != want_registry) {
    absl::StrAppend(&detail, " registry: ", registry.message());
  }
  const bool ok = Check(k == want_kernel && r == want_registry, step, detail);
  if (want_kernel != want_registry) {
    Line("DIFF", step, absl::StrFormat("kernel=%s registry=%s: %s", Errno(k), Errno(r), why));
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Small system helpers

int64_t LockedKb() { return StatusKb(0, "VmLck"); }

// Expects VmLck - base == want_kb.
bool ExpectLocked(const std::string& step, int64_t base_kb, int64_t want_kb,
                  const std::string& why) {
  const int64_t now = LockedKb();
  return Check(now - base_kb == want_kb, step,
               absl::StrFormat("VmLck %d kB = baseline %+d kB (want %+d kB: %s); VmPin %d kB", now,
                               now - base_kb, want_kb, why, StatusKb(0, "VmPin")));
}

// CAP_IPC_LOCK in the effective set on or off (the permitted set keeps it, so it can come back).
bool SetIpcLock(bool on) {
  struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capget, &header, data) != 0) return false;
  if (on) {
    data[0].effective |= 1u << CAP_IPC_LOCK;
  } else {
    data[0].effective &= ~(1u << CAP_IPC_LOCK);
  }
  return ::syscall(SYS_capset, &header, data) == 0;
}

bool SetMemlockLimit(rlim_t bytes) {
  struct rlimit limit = {bytes, bytes};
  return ::setrlimit(RLIMIT_MEMLOCK, &limit) == 0;
}

// Anonymous, populated memory, aligned to the base page (mmap).
class Buffer {
 public:
  explicit Buffer(uint64_t size) : size_(size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
    if (data_ != nullptr) std::memset(data_, 0, size);
  }
  ~Buffer() {
    if (data_ != nullptr) ::munmap(data_, size_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  uint8_t* data() const { return data_; }
  uint64_t ua() const { return reinterpret_cast<uintptr_t>(data_); }

 private:
  uint64_t size_;
  uint8_t* data_;
};

// Writes a pattern at ua, DMAs it RAM -> device from `iova`, then device -> RAM to `iova_back`
// (which must map `ua_back`), and checks the bytes arrived. `expect_arrival` false: the second
// IOVA is not mapped, the bytes must NOT arrive.
bool DmaRoundTrip(const std::string& step, const Edu& edu, uint8_t* src, uint64_t iova,
                  uint8_t* back, uint64_t iova_back, uint8_t seed, bool expect_arrival = true) {
  constexpr uint32_t kCount = 1024;
  for (uint32_t i = 0; i < kCount; ++i) src[i] = static_cast<uint8_t>(seed + i * 7);
  std::memset(back, 0, kCount);
  absl::Status status = edu.Dma(iova, kCount, /*to_ram=*/false);
  if (status.ok()) status = edu.Dma(iova_back, kCount, /*to_ram=*/true);
  if (!status.ok()) return Check(false, step, status.ToString());
  const bool arrived = std::memcmp(src, back, kCount) == 0;
  const bool untouched = std::all_of(back, back + kCount, [](uint8_t b) { return b == 0; });
  const std::string detail = absl::StrFormat(
      "RAM(iova 0x%x) -> edu -> RAM(iova 0x%x), %u bytes: %s", iova, iova_back, kCount,
      arrived ? "arrived intact" : (untouched ? "did not arrive" : "arrived CORRUPTED"));
  return Check(expect_arrival ? arrived : untouched, step, detail);
}

// ---------------------------------------------------------------------------------------------
// The registry on the same sequence (sim backend with this kernel's page size).

class Mirror {
 public:
  Mirror(uint64_t page_size, const VfioDmaWindow& window) {
    SimBackendOptions options;
    options.page_size = page_size;
    backend_ = std::move(SimBackend::Create(options)).value();
    registry_ = std::make_unique<Registry>(backend_.get());
    container_options_.iommu_page_size = window.iommu_page_size;
    container_options_.window_start = window.start;
    container_options_.window_size = window.size;
  }
  Registry& reg() { return *registry_; }
  absl::Status NewContext(ContextId id, const ContextOptions& options) {
    return registry_->CreateContext(id, options);
  }
  absl::Status NewContainer(ContainerId id) {
    return registry_->CreateContainer(id, container_options_);
  }
  uint64_t LockedBytes(ContextId id) {
    absl::StatusOr<ContextInfo> info = registry_->GetContext(id);
    return info.ok() ? info->locked_bytes : ~uint64_t{0};
  }

 private:
  std::unique_ptr<SimBackend> backend_;
  std::unique_ptr<Registry> registry_;
  ContainerOptions container_options_;
};

// ---------------------------------------------------------------------------------------------
// x86-64 / arm64: VFIO_TYPE1v2_IOMMU through Type1Driver

void RunType1(const std::vector<EduDevice>& edus) {
  RealVfioKernel kernel;
  const uint64_t ps = ::sysconf(_SC_PAGESIZE);
  std::vector<std::string> backends = DetectVfioBackends(kernel);
  Check(std::find(backends.begin(), backends.end(), kVfioType1Backend) != backends.end(), "detect",
        absl::StrCat("DetectVfioBackends: ", absl::StrJoin(backends, ",")));
  if (edus.size() < 2) {
    Check(false, "devices", "need two edu devices (two IOMMU groups, two containers)");
    return;
  }

  const int64_t base = LockedKb();
  Info("baseline", absl::StrFormat("page size %u, VmLck %d kB", ps, base));
  Type1Driver a(&kernel);
  if (!Expect("open-container", a.Open({edus[0].group}), 0)) return;
  const VfioDmaWindow window = a.DmaWindow().value();
  const VfioIovaRange pin = a.ReservedIovaRange().value();
  std::string ranges;
  const std::vector<VfioIovaRange> usable = a.UsableIovaRanges().value();
  for (const VfioIovaRange& r : usable) {
    absl::StrAppend(&ranges, absl::StrFormat("[0x%x,0x%x] ", r.start, r.last));
  }
  Info("window", absl::StrFormat("guest window [0x%x, +0x%x) iommu page 0x%x pgsizes 0x%x; usable "
                                 "%s; pin range [0x%x, 0x%x]",
                                 window.start, window.size, window.iommu_page_size,
                                 window.page_size_bitmap, ranges, pin.start, pin.last));
  Check(window.iommu_page_size == ps && pin.start > window.start && window.size > 0, "window",
        "IOMMU page is the base page; the pin range lies above the guest window");

  Mirror mirror(ps, window);
  mirror.NewContext(1, {}).IgnoreError();
  mirror.NewContainer(1).IgnoreError();
  mirror.NewContainer(2).IgnoreError();
  Registry& reg = mirror.reg();

  Buffer buffer(2 * kMiB);
  const uint64_t ua = buffer.ua();
  const uint64_t size = 1 * kMiB;
  const uint64_t iova = 0x100000;  // edu's DMA mask is 28 bits: stay below 256 MiB

  // Registration.
  Compare("register", a.RegisterMemory(ua, size), 0, reg.Register(1, 1, ua, size), 0);
  ExpectLocked("register-locked-vm", base, 1024, "the pin-range MAP_DMA pins 1 MiB");
  Compare("register-same-again", a.RegisterMemory(ua, size), EBUSY, reg.Register(1, 1, ua, size),
          EBUSY);
  Compare("register-overlap", a.RegisterMemory(ua + size / 2, size), EINVAL,
          reg.Register(1, 1, ua + size / 2, size), EINVAL);
  Compare("register-misaligned", a.RegisterMemory(ua + 1, ps), EINVAL,
          reg.Register(1, 1, ua + 1, ps), EINVAL);
  Compare("register-size-0", a.RegisterMemory(ua + size, 0), EINVAL,
          reg.Register(1, 1, ua + size, 0), EINVAL);
  Compare("unregister-unknown", a.UnregisterMemory(ua + size, ps), ENOENT,
          reg.Unregister(1, ua + size, ps), ENOENT);

  // Guest mappings and a real DMA.
  Compare("map-dma", a.MapDma(iova, ua, size), 0, reg.Map(1, iova, ua, size), 0);
  ExpectLocked("map-dma-locked-vm", base, 2048,
               "type1 accounts every vfio_dma: registered + mapped (the registry counts 1 MiB)");
  Check(mirror.LockedBytes(1) == size, "registry-locked",
        absl::StrFormat("registry locked_bytes %u (register pins, map does not)",
                        mirror.LockedBytes(1)));
  Expect("map-dma-pin-range", a.MapDma(pin.start, ua, ps), ENXIO);
  // The kernel answers EEXIST to a map over a mapped IOVA; the driver unmaps and maps back the
  // rest, so a remap replaces as in the spec (§7.4).
  Compare("remap-same-iova", a.MapDma(iova, ua, ps), 0, reg.Map(1, iova, ua, ps), 0);

  Edu edu;
  absl::Status opened = edu.Open(edus[0].group, edus[0].bdf);
  bool have_edu = Check(opened.ok(), "edu-open", opened.ok() ? edus[0].bdf : opened.ToString());
  if (have_edu) {
    have_edu = edu.DetectEndianness();
    Check(
        have_edu, "edu-ident",
        absl::StrFormat("0x%08x%s", edu.Read(Edu::kIdent),
                        edu.swapped() ? " (registers big-endian: QEMU's native endianness)" : ""));
  }
  uint8_t* low = buffer.data();
  uint8_t* high = buffer.data() + size / 2;
  if (have_edu) DmaRoundTrip("dma-round-trip", edu, low, iova, high, iova + size / 2, 0x11);
  // Remap one page of the middle of the mapping to other memory: the device's writes follow.
  uint8_t* other = buffer.data() + 3 * size / 4;
  const uint64_t mid = iova + size / 2;
  Compare("remap-other-ua", a.MapDma(mid, ua + 3 * size / 4, ps), 0,
          reg.Map(1, mid, ua + 3 * size / 4, ps), 0);
  if (have_edu) DmaRoundTrip("dma-after-remap", edu, low, iova, other, mid, 0x55);
  // Unmap that page only (the kernel refuses to bisect a mapping; the driver splits it).
  Compare("unmap-bisect", a.UnmapDma(mid, ps), 0, reg.Unmap(1, mid, ps), 0);
  if (have_edu) {
    DmaRoundTrip("dma-after-unmap-bisect-blocked", edu, low, iova, other, mid, 0x66,
                 /*expect_arrival=*/false);
    DmaRoundTrip("dma-beside-unmapped-page", edu, low, iova, high + ps, mid + ps, 0x77);
  }
  Compare("map-back", a.MapDma(mid, ua + size / 2, ps), 0, reg.Map(1, mid, ua + size / 2, ps), 0);
  ExpectLocked("map-back-locked-vm", base, 2048, "the same 1 MiB registered + 1 MiB mapped");

  // Unregister while mapped: the type1 driver says OK (the guest mapping keeps its own pin); the
  // registry (spec §3.4) says EBUSY, and it is the registry the agent asks first.
  Compare("unregister-while-mapped", a.UnregisterMemory(ua, size), 0, reg.Unregister(1, ua, size),
          EBUSY,
          "type1 has no pre-registration: the guest MAP_DMA holds its own pins, so dropping the "
          "pin range is harmless; spec §3.4 EBUSY is enforced by the registry before the driver");
  ExpectLocked("unregister-while-mapped-locked-vm", base, 1024, "only the guest mapping remains");
  if (have_edu) {
    DmaRoundTrip("dma-after-unregister", edu, low, iova, high, iova + size / 2, 0x22);
  }
  // Back in step with the registry (which still holds the region).
  Expect("re-register", a.RegisterMemory(ua, size), 0);

  Compare("unmap-dma", a.UnmapDma(iova, size), 0, reg.Unmap(1, iova, size), 0);
  ExpectLocked("unmap-dma-locked-vm", base, 1024, "the pin range still pins 1 MiB");
  if (have_edu) {
    DmaRoundTrip("dma-after-unmap-blocked", edu, low, iova, high, iova + size / 2, 0x33,
                 /*expect_arrival=*/false);
  }
  Compare("unregister", a.UnregisterMemory(ua, size), 0, reg.Unregister(1, ua, size), 0);
  ExpectLocked("unregister-locked-vm", base, 0, "nothing pinned");
  Compare("unregister-again", a.UnregisterMemory(ua, size), ENOENT, reg.Unregister(1, ua, size),
          ENOENT);

  // Two containers, the same region: the spec shares one pinned region (used = 2); type1 pins it
  // once per container.
  Type1Driver b(&kernel);
  Expect("open-second-container", b.Open({edus[1].group}), 0);
  Compare("register-first-container", a.RegisterMemory(ua, size), 0, reg.Register(1, 1, ua, size),
          0);
  Compare("register-second-container", b.RegisterMemory(ua, size), 0, reg.Register(2, 1, ua, size),
          0);
  ExpectLocked("two-containers-locked-vm", base, 2048,
               "type1 pins per container (the registry shares the region: locked stays 1 MiB)");
  Check(mirror.LockedBytes(1) == size, "registry-two-containers-locked",
        absl::StrFormat("registry locked_bytes %u", mirror.LockedBytes(1)));
  Compare("map-dma-second-container", b.MapDma(iova, ua, size), 0, reg.Map(2, iova, ua, size), 0);

  // Release: closing the container drops every mapping and pin of it, once no device fd of its
  // groups is open (a device fd holds its group, and so the container, in the kernel).
  Compare("release-second-container", b.Close(), 0, reg.ReleaseContainer(2), 0);
  ExpectLocked("release-second-locked-vm", base, 1024, "container A still pins 1 MiB");
  Compare("release-first-container", a.Close(), 0, reg.ReleaseContainer(1), 0);
  if (have_edu) {
    ExpectLocked("release-with-device-fd-open-locked-vm", base, 1024,
                 "the open edu device fd keeps the group attached and the container alive");
  }
  edu.Close();
  ExpectLocked("release-locked-vm", base, 0, "nothing pinned after release");
  Check(mirror.LockedBytes(1) == 0, "registry-release-locked",
        absl::StrFormat("registry locked_bytes %u", mirror.LockedBytes(1)));

  // RLIMIT_MEMLOCK without CAP_IPC_LOCK.
  Type1Driver c(&kernel);
  if (!Expect("open-container-memlock", c.Open({edus[0].group}), 0)) return;
  ContextOptions limited;
  limited.memlock_limit_bytes = 512 * kKiB;
  mirror.NewContext(2, limited).IgnoreError();
  mirror.NewContainer(3).IgnoreError();
  struct rlimit saved;
  ::getrlimit(RLIMIT_MEMLOCK, &saved);
  if (!Check(SetIpcLock(false) && SetMemlockLimit(512 * kKiB), "drop-cap-ipc-lock",
             "CAP_IPC_LOCK off, RLIMIT_MEMLOCK 512 KiB")) {
    return;
  }
  Compare("register-over-memlock", c.RegisterMemory(ua, size), ENOMEM, reg.Register(3, 2, ua, size),
          ENOMEM);
  Compare("register-under-memlock", c.RegisterMemory(ua, 384 * kKiB), 0,
          reg.Register(3, 2, ua, 384 * kKiB), 0);
  Compare("map-dma-over-memlock", c.MapDma(iova, ua, 384 * kKiB), ENOMEM,
          reg.Map(3, iova, ua, 384 * kKiB), 0,
          "type1 accounts guest mappings in locked_vm again: RLIMIT_MEMLOCK must cover registered "
          "+ mapped bytes; the spec counts registered bytes only");
  Compare("map-dma-under-memlock", c.MapDma(iova, ua, 128 * kKiB), 0,
          reg.Map(3, iova + 384 * kKiB, ua, 128 * kKiB), 0);
  Check(SetIpcLock(true), "restore-cap-ipc-lock", "CAP_IPC_LOCK back on");
  Expect("register-over-memlock-with-cap", c.RegisterMemory(ua + size, size), 0);
  SetMemlockLimit(saved.rlim_cur);
  Expect("release-memlock-container", c.Close(), 0);
  ExpectLocked("final-locked-vm", base, 0, "nothing pinned at the end");
}

// ---------------------------------------------------------------------------------------------
// ppc64: VFIO_SPAPR_TCE_v2_IOMMU through SpaprTceV2Driver

void RunSpapr(const std::vector<EduDevice>& edus) {
  RealVfioKernel kernel;
  const uint64_t ps = ::sysconf(_SC_PAGESIZE);
  std::vector<std::string> backends = DetectVfioBackends(kernel);
  Check(std::find(backends.begin(), backends.end(), kVfioSpaprV2Backend) != backends.end(),
        "detect", absl::StrCat("DetectVfioBackends: ", absl::StrJoin(backends, ",")));
  if (edus.size() < 2) {
    Check(false, "devices", "need two edu devices (two IOMMU groups, two containers)");
    return;
  }
  const int64_t base = LockedKb();
  Info("baseline", absl::StrFormat("page size %u, VmLck %d kB", ps, base));

  SpaprTceV2Driver a(&kernel);
  if (!Expect("open-container", a.Open({edus[0].group}), 0)) return;
  const VfioDmaWindow window = a.DmaWindow().value();
  Info("window", absl::StrFormat("[0x%x, +0x%x) iommu page 0x%x pgsizes 0x%x", window.start,
                                 window.size, window.iommu_page_size, window.page_size_bitmap));
  Mirror mirror(ps, window);
  mirror.NewContext(1, {}).IgnoreError();
  mirror.NewContainer(1).IgnoreError();
  mirror.NewContainer(2).IgnoreError();
  Registry& reg = mirror.reg();

  const uint64_t size = 16 * ps;
  Buffer buffer(3 * size);
  const uint64_t ua = buffer.ua();
  const uint64_t iova = 0x100000;
  const int64_t size_kb = static_cast<int64_t>(size / kKiB);

  Compare("map-before-register", a.MapDma(iova, ua, window.iommu_page_size), EPERM,
          reg.Map(1, iova, ua, window.iommu_page_size), EPERM);
  Compare("register", a.RegisterMemory(ua, size), 0, reg.Register(1, 1, ua, size), 0);
  ExpectLocked("register-locked-vm", base, size_kb, "REGISTER_MEMORY pins 16 pages");
  Compare("register-same-again", a.RegisterMemory(ua, size), EBUSY, reg.Register(1, 1, ua, size),
          EBUSY);
  Compare("register-overlap", a.RegisterMemory(ua + size / 2, size), EINVAL,
          reg.Register(1, 1, ua + size / 2, size), EINVAL);
  Compare("register-misaligned", a.RegisterMemory(ua + 4096, ps), EINVAL,
          reg.Register(1, 1, ua + 4096, ps), EINVAL);
  Compare("register-size-0", a.RegisterMemory(ua + 2 * size, 0), ENOMEM,
          reg.Register(1, 1, ua + 2 * size, 0), EINVAL,
          "the kernel's zero-entry allocation fails first (spec §2.1 note)");
  Compare("unregister-unknown", a.UnregisterMemory(ua + size, ps), ENOENT,
          reg.Unregister(1, ua + size, ps), ENOENT);
  Compare("unregister-bisect", a.UnregisterMemory(ua, ps), ENOENT, reg.Unregister(1, ua, ps),
          ENOENT);

  // The same region from a second container: shared, not pinned again.
  SpaprTceV2Driver b(&kernel);
  Expect("open-second-container", b.Open({edus[1].group}), 0);
  Compare("register-second-container", b.RegisterMemory(ua, size), 0, reg.Register(2, 1, ua, size),
          0);
  ExpectLocked("register-second-locked-vm", base, size_kb, "shared region: not pinned again");
  Compare("unregister-second-container", b.UnregisterMemory(ua, size), 0,
          reg.Unregister(2, ua, size), 0);
  ExpectLocked("unregister-second-locked-vm", base, size_kb, "the first container still holds it");

  // Mappings and DMA through the TCE table.
  const uint64_t map_size = 4 * window.iommu_page_size;
  Compare("map-dma", a.MapDma(iova, ua, map_size), 0, reg.Map(1, iova, ua, map_size), 0);
  Compare("map-dma-unregistered", a.MapDma(iova, ua + 2 * size, window.iommu_page_size), EINVAL,
          reg.Map(1, iova, ua + 2 * size, window.iommu_page_size), EINVAL);
  Compare("map-dma-outside-window", a.MapDma(window.start + window.size, ua, 4096), ENXIO,
          reg.Map(1, window.start + window.size, ua, 4096), ENXIO);
  // The first MAP_DMA creates the default window's TCE table, which the kernel charges to
  // locked_vm too (8 bytes per IOMMU page of the window); the spec does not count it.
  const int64_t table_kb = static_cast<int64_t>(window.size / window.iommu_page_size * 8 / kKiB);
  ExpectLocked("map-dma-locked-vm", base, size_kb + table_kb,
               absl::StrFormat("MAP_DMA only writes TCEs, but the first one allocates the "
                               "%d kB TCE table of the default window, charged to locked_vm",
                               table_kb));
  Edu edu;
  absl::Status opened = edu.Open(edus[0].group, edus[0].bdf);
  bool have_edu = Check(opened.ok(), "edu-open", opened.ok() ? edus[0].bdf : opened.ToString());
  if (have_edu) {
    have_edu = edu.DetectEndianness();
    Check(
        have_edu, "edu-ident",
        absl::StrFormat("0x%08x%s", edu.Read(Edu::kIdent),
                        edu.swapped() ? " (registers big-endian: QEMU's native endianness)" : ""));
  }
  if (have_edu) {
    DmaRoundTrip("dma-round-trip", edu, buffer.data(), iova, buffer.data() + 2048, iova + 2048,
                 0x44);
  }
  // A map over an installed TCE replaces it: the device's writes follow to the new memory.
  const uint64_t page = window.iommu_page_size;
  Compare("remap-other-ua", a.MapDma(iova + page, ua + size / 2, page), 0,
          reg.Map(1, iova + page, ua + size / 2, page), 0);
  if (have_edu) {
    DmaRoundTrip("dma-after-remap", edu, buffer.data(), iova, buffer.data() + size / 2, iova + page,
                 0x45);
  }

  // Unregister while mapped: Linux 5.1+ answers 0 and orphans the region; the spec's EBUSY comes
  // from the registry, which the agent asks before the driver.
  Compare("unregister-while-mapped", a.UnregisterMemory(ua, size), 0, reg.Unregister(1, ua, size),
          EBUSY,
          "Linux 5.1+ drops the container's reference and leaves the region orphaned while TCEs "
          "map it; spec §3.4 EBUSY is enforced by the registry before the driver");
  ExpectLocked("orphaned-locked-vm", base, size_kb + table_kb, "the orphaned region stays pinned");
  Compare("unmap-dma", a.UnmapDma(iova, map_size), 0, reg.Unmap(1, iova, map_size), 0);
  if (have_edu) {
    DmaRoundTrip("dma-after-unmap-blocked", edu, buffer.data(), iova, buffer.data() + 2048,
                 iova + 2048, 0x46, /*expect_arrival=*/false);
  }
  ExpectLocked("orphan-after-unmap-locked-vm", base, size_kb + table_kb,
               "the orphaned region is not freed by the unmap either");
  Compare("unregister-after-orphan", a.UnregisterMemory(ua, size), ENOENT,
          reg.Unregister(1, ua, size), 0,
          "the kernel already dropped the container's reference at the EBUSY-less unregister; "
          "the registry kept it and drops it now");
  ExpectLocked("orphan-leaked-locked-vm", base, size_kb + table_kb,
               "no container can drop the orphan: it stays pinned until the process exits");

  // A fresh registration and a release with mappings still installed.
  Buffer second(size);
  Compare("register-fresh", a.RegisterMemory(second.ua(), size), 0,
          reg.Register(1, 1, second.ua(), size), 0);
  Compare("map-dma-fresh", a.MapDma(iova, second.ua(), map_size), 0,
          reg.Map(1, iova, second.ua(), map_size), 0);
  edu.Close();  // a device fd would keep the group, and the container, alive
  const int64_t before_release = LockedKb();
  Compare("release-second-container", b.Close(), 0, reg.ReleaseContainer(2), 0);
  Compare("release-container", a.Close(), 0, reg.ReleaseContainer(1), 0);
  Info("before-release", absl::StrFormat("VmLck %d kB", before_release));
  ExpectLocked("release-locked-vm", base, size_kb,
               "release frees the TCE table and the fresh region; the orphan stays until exit");

  // RLIMIT_MEMLOCK without CAP_IPC_LOCK. The limit leaves room for 4 more pages over what this
  // process has locked now (the orphan included); the registry's fresh context gets the same room.
  SpaprTceV2Driver c(&kernel);
  if (!Expect("open-container-memlock", c.Open({edus[0].group}), 0)) return;
  const uint64_t locked_now = static_cast<uint64_t>(std::max<int64_t>(LockedKb(), 0)) * kKiB;
  ContextOptions limited;
  limited.memlock_limit_bytes = 4 * ps;
  mirror.NewContext(2, limited).IgnoreError();
  mirror.NewContainer(3).IgnoreError();
  Buffer third(size);
  struct rlimit saved;
  ::getrlimit(RLIMIT_MEMLOCK, &saved);
  if (!Check(SetIpcLock(false) && SetMemlockLimit(locked_now + 4 * ps), "drop-cap-ipc-lock",
             absl::StrFormat("CAP_IPC_LOCK off, RLIMIT_MEMLOCK %u (VmLck + 4 pages)",
                             locked_now + 4 * ps))) {
    return;
  }
  Compare("register-over-memlock", c.RegisterMemory(third.ua(), size), ENOMEM,
          reg.Register(3, 2, third.ua(), size), ENOMEM);
  Compare("register-under-memlock", c.RegisterMemory(third.ua(), 4 * ps), 0,
          reg.Register(3, 2, third.ua(), 4 * ps), 0);
  Compare("map-dma-tce-table-over-memlock", c.MapDma(iova, third.ua(), 4096), ENOMEM,
          reg.Map(3, iova, third.ua(), 4096), 0,
          absl::StrFormat("the container's first MAP_DMA allocates the %d kB TCE table and charges "
                          "it to locked_vm: RLIMIT_MEMLOCK must cover the TCE tables as well as "
                          "the registered memory; the spec counts registered pages only",
                          table_kb));
  Check(SetIpcLock(true), "restore-cap-ipc-lock", "CAP_IPC_LOCK back on");
  Expect("map-dma-with-cap", c.MapDma(iova, third.ua(), 4096), 0);
  Expect("register-over-memlock-with-cap", c.RegisterMemory(third.ua() + 4 * ps, 8 * ps), 0);
  SetMemlockLimit(saved.rlim_cur);
  Expect("release-memlock-container", c.Close(), 0);
  ExpectLocked("final-locked-vm", base, size_kb,
               "only the orphan is left, until the process exits");
}

int Main(int argc, char** argv) {
  const bool init = ::getpid() == 1;
  if (init) Boot();
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::string mode = argc > 1 ? argv[1] : "";
  if (mode.empty() && std::getenv("dmapin_mode") != nullptr) mode = std::getenv("dmapin_mode");
  SetMode(mode);
  const auto start = std::chrono::steady_clock::now();

  Info("start", absl::StrCat("kernel ", ReadFile("/proc/sys/kernel/osrelease").value_or("?"),
                             init ? ", as /init" : ""));
  if (mode != "type1" && mode != "spapr") {
    Check(false, "mode", "usage: vfio_guest_test type1|spapr (or dmapin_mode=... as /init)");
  } else if (!init || LoadModules("/modules")) {
    std::vector<EduDevice> edus = BindEduDevices();
    if (!edus.empty()) {
      if (mode == "type1") {
        RunType1(edus);
      } else {
        RunSpapr(edus);
      }
    }
  }
  return Finish(start, init);
}

}  // namespace
}  // namespace dmapin::agent

int main(int argc, char** argv) { return dmapin::agent::Main(argc, argv); }
