// The guest side of the agent-restart experiment on ppc64 pseries (run_qemu_vfio.sh
// ppc64-survive): what does a VFIO_SPAPR_TCE_v2_IOMMU container keep when the process that set it
// up (the "agent") dies while another process (the "VMM") holds the device fd and a duplicate of
// the container fd, and what can a second agent do with that container? SURVIVE.md has the
// answers; unlike survive_guest.cc (x86-64 type1) every answer is asserted: a PASS/FAIL line that
// names what the kernel said and what was expected, so a kernel that answers otherwise fails.
//
// It is the initramfs's /init (PID 1), statically linked, and plays the VMM itself. Three runs,
// each with its own 16 MiB memfd that every process maps MAP_SHARED at its own address:
//   kill   agent 1 (a forked child) opens the container and the group, SET_IOMMU(SPAPR_TCE_v2),
//          REGISTER_MEMORY of its whole mapping, MAP_DMA of three 4 MiB regions in the default
//          32-bit window, gets the device fd, passes container + device fd over SCM_RIGHTS and is
//          SIGKILLed;
//   exit   the same, but agent 1 exits 0 by itself;
//   holder as kill, but during its setup agent 1 starts a "holder": a process that shares its mm
//          (clone(CLONE_VM), not a thread) and outlives it. After agent 1's SIGKILL the holder
//          MAPs, UNMAPs, REGISTERs and UNREGISTERs on the container: the one way found to change
//          it afterwards.
// Then the edu device DMAs through the old IOVAs; agent 2 (another child) receives the container
// fd back from the VMM and tries GET_INFO, REGISTER, MAP, UNMAP and UNREGISTER; the VMM lets go of
// the memfd, the device fd and the container fd in turn, and the kernel's count of pinned pages
// and the free memory show when the pins go.
#include <fcntl.h>
#include <linux/vfio.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "tests/qemu_vfio/guest_support.h"

namespace dmapin::agent {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kKiB = 1024;
constexpr uint64_t kMemSize = 16 << 20;
constexpr int64_t kMemKb = kMemSize / kKiB;
constexpr uint64_t kRegion = 4 << 20;
// Region i: IOVA kIova[i] onto memfd offset i * kRegion. 0..2 are agent 1's, 3 is what agent 2
// tries to map. All in the default 32-bit window ([0, 1 GiB)) and below edu's 28-bit DMA mask.
constexpr uint64_t kIova[4] = {0x1000000, 0x2000000, 0x3000000, 0x4000000};
// The default window's IOMMU page size (4 KiB TCEs, whatever the CPU page size) and the size of
// one TCE: the table the kernel charges to locked_vm at the first MAP_DMA.
constexpr uint64_t kTcePage = 4096;
constexpr uint64_t kTceBytes = 8;
constexpr uint32_t kBytes = 1024;

std::map<std::string, std::string> g_results;  // question -> summary (the VMM's)
int g_sock = -1;                               // in a child: its socket to the VMM

void Note(const std::string& q, const std::string& text) {
  std::string& r = g_results[q];
  absl::StrAppend(&r, r.empty() ? "" : "; ", text);
}

// In the VMM a line of its own; in a child a line sent to the VMM, which prints and counts it.
bool Assert(bool ok, const std::string& step, const std::string& detail) {
  if (g_sock < 0) return Check(ok, step, detail);
  SendLine(g_sock, ok ? "PASS" : "FAIL", step, detail);
  return ok;
}
void Observe(const std::string& step, const std::string& detail) {
  if (g_sock < 0) {
    Line("OBSERVE", step, detail);
  } else {
    SendLine(g_sock, "OBSERVE", step, detail);
  }
}
// A kernel answer against the one this kernel gave when the experiment was written.
bool ExpectErr(const std::string& step, const std::string& what, int got, int want) {
  return Assert(got == want, step,
                absl::StrFormat("%s: kernel %s, expected %s", what, Errno(got), Errno(want)));
}

// ---------------------------------------------------------------------------------------------
// VFIO ioctls, raw (this is about what the kernel does, not about the project's drivers).

int Ioctl(int fd, unsigned long request, void* arg) {  // NOLINT(runtime/int)
  return ::ioctl(fd, request, arg) == 0 ? 0 : errno;
}

int GetInfo(int container, struct vfio_iommu_spapr_tce_info* info) {
  std::memset(info, 0, sizeof(*info));
  info->argsz = sizeof(*info);
  return Ioctl(container, VFIO_IOMMU_SPAPR_TCE_GET_INFO, info);
}
int GetInfo(int container) {
  struct vfio_iommu_spapr_tce_info info;
  return GetInfo(container, &info);
}

int Register(int container, uint64_t vaddr, uint64_t size, bool unregister = false) {
  struct vfio_iommu_spapr_register_memory reg = {};
  reg.argsz = sizeof(reg);
  reg.vaddr = vaddr;
  reg.size = size;
  return Ioctl(container,
               unregister ? VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY : VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
               &reg);
}

int MapDma(int container, uint64_t iova, uint64_t vaddr, uint64_t size) {
  struct vfio_iommu_type1_dma_map map = {};
  map.argsz = sizeof(map);
  map.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
  map.vaddr = vaddr;
  map.iova = iova;
  map.size = size;
  return Ioctl(container, VFIO_IOMMU_MAP_DMA, &map);
}

int UnmapDma(int container, uint64_t iova, uint64_t size) {
  struct vfio_iommu_type1_dma_unmap unmap = {};
  unmap.argsz = sizeof(unmap);
  unmap.iova = iova;
  unmap.size = size;
  return Ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap);
}

int CheckV2(int container) {
  return ::ioctl(container, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_v2_IOMMU);
}

std::string GroupStatus(int group) {
  struct vfio_group_status status = {};
  status.argsz = sizeof(status);
  if (::ioctl(group, VFIO_GROUP_GET_STATUS, &status) != 0) {
    return absl::StrCat("GET_STATUS ", Errno(errno));
  }
  return absl::StrFormat("GET_STATUS flags=0x%x", status.flags);
}

// open() of the group: 0 or the errno; *status: its GET_STATUS if it opened.
int OpenGroup(const EduDevice& edu, std::string* status = nullptr) {
  const int fd = ::open(edu.group.c_str(), O_RDWR | O_CLOEXEC);
  const int err = fd < 0 ? errno : 0;
  if (fd >= 0 && status != nullptr) *status = GroupStatus(fd);
  if (fd >= 0) ::close(fd);
  return err;
}

// Pages pinned with pin_user_pages() (FOLL_PIN) system-wide, as /proc/vmstat counts them:
// nr_foll_pin_acquired - nr_foll_pin_released. REGISTER_MEMORY pins through it
// (arch/powerpc/mm/book3s64/iommu_api.c), in CPU pages; nothing else in this guest pins. The
// counters are kept per CPU and folded now and then: /proc/sys/vm/stat_refresh folds them first.
int64_t PinnedPages() {
  WriteFile("/proc/sys/vm/stat_refresh", "1");
  const std::optional<std::string> text = ReadFile("/proc/vmstat");
  if (!text) return -1;
  int64_t acquired = -1;
  int64_t released = -1;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    if (absl::ConsumePrefix(&line, "nr_foll_pin_acquired ")) {
      acquired = std::strtoll(std::string(line).c_str(), nullptr, 10);
    } else if (absl::ConsumePrefix(&line, "nr_foll_pin_released ")) {
      released = std::strtoll(std::string(line).c_str(), nullptr, 10);
    }
  }
  return acquired < 0 || released < 0 ? -1 : acquired - released;
}

// Free memory in kB including the per-CPU page lists (/proc/zoneinfo: each zone's "pages free"
// plus its pagesets' "count"). MemFree leaves those lists out, and on this kernel freed pages
// stay in them (a 16 MiB memfd comes and goes without MemFree moving).
int64_t FreeKbWithPcp() {
  const std::optional<std::string> text = ReadFile("/proc/zoneinfo");
  if (!text) return -1;
  int64_t pages = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    line = absl::StripLeadingAsciiWhitespace(line);
    if (absl::ConsumePrefix(&line, "pages free") || absl::ConsumePrefix(&line, "count:")) {
      pages += std::strtoll(std::string(line).c_str(), nullptr, 10);
    }
  }
  return pages * ::sysconf(_SC_PAGESIZE) / kKiB;
}

// Polls PinnedPages() for up to 2 s until it is `want` (the unpin runs after an RCU grace period:
// mm_iommu_release -> call_rcu(mm_iommu_free)); returns the last value.
int64_t PinnedPagesSettled(int64_t want) {
  int64_t got = PinnedPages();
  for (int i = 0; i < 100 && got != want; ++i) {
    SleepMs(20);
    got = PinnedPages();
  }
  return got;
}

uint8_t* MapMem(int memfd) {
  void* p = ::mmap(nullptr, kMemSize, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  return p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
}

// ---------------------------------------------------------------------------------------------
// The holder: a process that shares agent 1's mm (clone(CLONE_VM) without CLONE_THREAD, so
// agent 1's SIGKILL does not take it along). It shares agent 1's memory, globals and TLS
// included (clone() without CLONE_SETTLS: errno, malloc's per-thread cache), so it waits in
// poll() until the VMM's first request, sent once agent 1 is dead, before it touches any of them;
// it answers over its own socket with plain numbers, and the VMM reports.

struct HolderArgs {
  int sock = -1;
  int container = -1;
  int memfd = -1;
  uint64_t ua = 0;  // agent 1's mapping of the memfd, in the shared mm
};
HolderArgs g_holder;
alignas(16) char g_holder_stack[256 << 10];

int Holder(void* arg) {
  const HolderArgs a = *static_cast<HolderArgs*>(arg);
  std::string text;
  if (!RecvFds(a.sock, &text, nullptr, 120000)) ::_exit(1);  // "GO": agent 1 is dead
  const int map3 = MapDma(a.container, kIova[3], a.ua + 3 * kRegion, kRegion);
  const int unmap0 = UnmapDma(a.container, kIova[0], kRegion);
  // A registration of its own: a new mapping of the memfd, in the shared mm.
  uint8_t* fresh = MapMem(a.memfd);
  const uint64_t fua = reinterpret_cast<uint64_t>(fresh);
  const int reg = fresh == nullptr ? ENOMEM : Register(a.container, fua, kMemSize);
  const int unreg = fresh == nullptr ? ENOMEM : Register(a.container, fua, kMemSize, true);
  SendFds(a.sock, absl::StrFormat("DID %d %d %d %d", map3, unmap0, reg, unreg));
  if (!RecvFds(a.sock, &text, nullptr, 120000)) ::_exit(1);  // "RESTORE"
  const int unmap3 = UnmapDma(a.container, kIova[3], kRegion);
  const int map0 = MapDma(a.container, kIova[0], a.ua, kRegion);
  SendFds(a.sock, absl::StrFormat("RESTORED %d %d", unmap3, map0));
  RecvFds(a.sock, &text, nullptr, 120000);  // "EXIT"
  ::_exit(0);
}

// ---------------------------------------------------------------------------------------------
// Agent 1: sets the container up, registers its whole mapping of the memfd and maps regions 0..2,
// sends the container and device fds. kill, holder: waits to be killed; exit: exits 0 when told.

[[noreturn]] void Agent1(int sock, int memfd, const EduDevice& edu, const std::string& p,
                         int holder_sock) {
  g_sock = sock;
  uint8_t* mem = MapMem(memfd);
  const int container = ::open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
  const int group = ::open(edu.group.c_str(), O_RDWR | O_CLOEXEC);
  if (mem == nullptr || container < 0 || group < 0) {
    Assert(false, p + "agent1-setup", absl::StrCat("mmap/open: ", Errno(errno)));
    ::_exit(1);
  }
  const uint64_t ua = reinterpret_cast<uint64_t>(mem);
  const int64_t lck0 = StatusKb(0, "VmLck");
  std::string steps;
  int err = Ioctl(group, VFIO_GROUP_SET_CONTAINER, const_cast<int*>(&container));
  absl::StrAppend(&steps, "SET_CONTAINER ", Errno(err));
  if (err == 0) {
    err = ::ioctl(container, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_v2_IOMMU) == 0 ? 0 : errno;
    absl::StrAppend(&steps, ", SET_IOMMU(SPAPR_TCE_v2) ", Errno(err));
  }
  struct vfio_iommu_spapr_tce_info info = {};
  if (err == 0) {
    err = GetInfo(container, &info);
    absl::StrAppend(&steps, absl::StrFormat(", GET_INFO %s (window [0x%x, +0x%x))", Errno(err),
                                            info.dma32_window_start, info.dma32_window_size));
  }
  if (err == 0) {
    err = Register(container, ua, kMemSize);
    absl::StrAppend(&steps, ", REGISTER_MEMORY 16 MiB ", Errno(err));
  }
  const int64_t lck_reg = StatusKb(0, "VmLck");
  pid_t holder = 0;
  if (err == 0 && holder_sock >= 0) {
    g_holder = HolderArgs{holder_sock, container, memfd, ua};
    holder =
        ::clone(Holder, g_holder_stack + sizeof(g_holder_stack), CLONE_VM | SIGCHLD, &g_holder);
    if (holder < 0) err = errno;
    absl::StrAppend(&steps, ", clone(CLONE_VM) holder ", holder > 0 ? "OK" : Errno(err));
  }
  for (int i = 0; i < 3 && err == 0; ++i) {
    err = MapDma(container, kIova[i], ua + i * kRegion, kRegion);
    absl::StrAppend(&steps, absl::StrFormat(", MAP_DMA 0x%x %s", kIova[i], Errno(err)));
  }
  const int device = err == 0 ? ::ioctl(group, VFIO_GROUP_GET_DEVICE_FD, edu.bdf.c_str()) : -1;
  if (err == 0 && device < 0) err = errno;
  absl::StrAppend(&steps, ", GET_DEVICE_FD ", device >= 0 ? "OK" : Errno(err), "; ",
                  GroupStatus(group));
  if (!Assert(err == 0, p + "agent1-setup", steps)) ::_exit(1);
  // locked_vm: the registration, then the default window's TCE table at the first MAP_DMA.
  const int64_t lck = StatusKb(0, "VmLck");
  const int64_t table_kb = info.dma32_window_size / kTcePage * kTceBytes / kKiB;
  Assert(lck_reg - lck0 == kMemKb && lck - lck_reg == table_kb, p + "agent1-locked-vm",
         absl::StrFormat("VmLck %d kB -> %d kB after REGISTER_MEMORY -> %d kB after MAP_DMA; "
                         "expected +%d kB (registered) and +%d kB (TCE table)",
                         lck0, lck_reg, lck, kMemKb, table_kb));
  SendFds(sock, absl::StrFormat("READY ua=0x%x holder=%d", ua, holder), {container, device});
  ::close(device);  // the VMM has its own copy now
  if (p != "exit-") {
    for (;;) ::pause();
  }
  std::string go;
  RecvFds(sock, &go, nullptr);  // the VMM has checked its copies
  ::_exit(0);  // with the container, group and memfd still open: the kernel closes them
}

// Agent 2: gets the container fd back from the VMM and tries what a restarted agent would.
// `agent1_ua`: where agent 1 had registered the memfd.
[[noreturn]] void Agent2(int sock, int memfd, const EduDevice& edu, const std::string& p,
                         uint64_t agent1_ua) {
  g_sock = sock;
  std::string text;
  std::vector<int> fds;
  SendFds(sock, "HELLO");
  if (!RecvFds(sock, &text, &fds) || fds.size() != 1) {
    Assert(false, p + "agent2-receive", "no container fd from the VMM");
    ::_exit(1);
  }
  const int container = fds[0];
  uint8_t* mem = MapMem(memfd);
  const uint64_t ua = reinterpret_cast<uint64_t>(mem);
  ExpectErr(p + "q4-agent2-open-group", "open " + edu.group, OpenGroup(edu), EBUSY);
  const int v2 = CheckV2(container);
  Assert(v2 == 1, p + "q2-agent2-check-extension",
         absl::StrFormat("CHECK_EXTENSION(SPAPR_TCE_v2): kernel %d, expected 1", v2));
  // No way to hand a mapping to another process, as type1's VFIO_UPDATE_VADDR does.
  const int vaddr = ::ioctl(container, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR);
  Assert(vaddr == 0, p + "q5-agent2-check-update-vaddr",
         absl::StrFormat("CHECK_EXTENSION(VFIO_UPDATE_VADDR): kernel %d, expected 0", vaddr));
  ExpectErr(p + "q2-agent2-get-info", "SPAPR_TCE_GET_INFO", GetInfo(container), EPERM);
  ExpectErr(p + "q2-agent2-register", "REGISTER_MEMORY of its own mapping (16 MiB)",
            Register(container, ua, kMemSize), EPERM);
  ExpectErr(p + "q2-agent2-map-new", "MAP_DMA iova 0x4000000 (4 MiB, its own address)",
            MapDma(container, kIova[3], ua + 3 * kRegion, kRegion), EPERM);
  ExpectErr(p + "q2-agent2-map-over-old", "MAP_DMA iova 0x1000000 (agent 1's r0) again",
            MapDma(container, kIova[0], ua, kRegion), EPERM);
  ExpectErr(p + "q2-agent2-unmap-old", "UNMAP_DMA iova 0x1000000 (agent 1's r0)",
            UnmapDma(container, kIova[0], kRegion), EPERM);
  ExpectErr(p + "q2-agent2-unregister-own", "UNREGISTER_MEMORY of its own mapping",
            Register(container, ua, kMemSize, /*unregister=*/true), EPERM);
  ExpectErr(p + "q2-agent2-unregister-old", "UNREGISTER_MEMORY of agent 1's address",
            Register(container, agent1_ua, kMemSize, /*unregister=*/true), EPERM);
  const int64_t lck = StatusKb(0, "VmLck");
  Assert(lck == 0, p + "q3-agent2-locked-vm",
         absl::StrFormat("agent 2's VmLck %d kB, expected 0 (nothing it asked for was done)", lck));
  SendFds(sock, "DONE");
  RecvFds(sock, &text, nullptr);
  ::_exit(0);
}

// ---------------------------------------------------------------------------------------------
// The VMM

void Fill(uint8_t* dst, uint32_t seed) {
  for (uint32_t i = 0; i < kBytes; ++i) dst[i] = static_cast<uint8_t>(seed * 31 + i * 7 + 1);
}
bool Matches(const uint8_t* p, uint32_t seed) {
  for (uint32_t i = 0; i < kBytes; ++i) {
    if (p[i] != static_cast<uint8_t>(seed * 31 + i * 7 + 1)) return false;
  }
  return true;
}

constexpr char kRoundTripOk[] = "read+write ok";
constexpr char kBlocked[] = "nothing written (blocked)";

// Round trip through region i's IOVA: a fresh pattern at its start (in the VMM's mapping of the
// memfd) goes to the device and back 64 KiB further into the same region.
std::string RoundTrip(const Edu& edu, uint8_t* mem, int i, uint32_t seed) {
  uint8_t* src = mem + i * kRegion;
  uint8_t* dst = src + 0x10000;
  Fill(src, seed);
  std::memset(dst, 0, kBytes);
  absl::Status s = edu.Dma(kIova[i], kBytes, false);
  if (s.ok()) s = edu.Dma(kIova[i] + 0x10000, kBytes, true);
  if (!s.ok()) return s.ToString();
  if (Matches(dst, seed)) return kRoundTripOk;
  bool zero = true;
  for (uint32_t k = 0; k < kBytes; ++k) zero = zero && dst[k] == 0;
  return zero ? kBlocked : "stale bytes (the read was blocked)";
}

bool ExpectDma(const std::string& step, const Edu& edu, uint8_t* mem, int i, uint32_t seed,
               const std::string& want) {
  const std::string got = RoundTrip(edu, mem, i, seed);
  return Check(
      got == want, step,
      absl::StrFormat("round trip through iova 0x%x: %s, expected %s", kIova[i], got, want));
}

// The VMM's own container ioctls (its mm is not the container's).
void VmmIoctls(const std::string& step, int container, uint8_t* mem) {
  ExpectErr(step + "-get-info", "the VMM's SPAPR_TCE_GET_INFO", GetInfo(container), EPERM);
  ExpectErr(step + "-map", "the VMM's MAP_DMA iova 0x4000000",
            MapDma(container, kIova[3], reinterpret_cast<uint64_t>(mem) + 3 * kRegion, kRegion),
            EPERM);
}

// What the memory looks like: free kB (with the per-CPU lists), MemFree, pinned pages.
struct Mem {
  int64_t free_kb = FreeKbWithPcp();
  int64_t memfree_kb = MemInfoKb("MemFree");
  int64_t pinned = PinnedPages();
  std::string Text() const {
    return absl::StrFormat("free %d kB (MemFree %d kB), pinned pages %d", free_kb, memfree_kb,
                           pinned);
  }
};

enum class Way { kKill, kExit, kHolder };

void Scenario(const EduDevice& edu_device, Way way) {
  const bool kill = way != Way::kExit;
  const std::string name = way == Way::kKill ? "kill" : way == Way::kExit ? "exit" : "holder";
  const std::string p = name + "-";
  const std::string q = name + ": ";
  const int64_t mem_pages = kMemSize / ::sysconf(_SC_PAGESIZE);
  const Mem m0;
  const int memfd = static_cast<int>(::syscall(SYS_memfd_create, "guest-ram", 0));
  if (memfd < 0 || ::ftruncate(memfd, kMemSize) != 0) {
    Check(false, p + "memfd", Errno(errno));
    return;
  }
  uint8_t* mem = MapMem(memfd);
  if (mem == nullptr) {
    Check(false, p + "memfd", absl::StrCat("mmap: ", Errno(errno)));
    return;
  }
  std::memset(mem, 0, kMemSize);  // populate: the pages exist before anyone pins them
  const Mem m_populated;
  Observe(p + "q3-memfd",
          absl::StrFormat("before the memfd: %s; populated: %s (%+d kB free)", m0.Text(),
                          m_populated.Text(), m_populated.free_kb - m0.free_kb));
  int sv[2];
  ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv);
  int hv[2] = {-1, -1};  // the VMM's socket to the holder, and the holder's
  if (way == Way::kHolder) ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, hv);
  const pid_t agent1 = ::fork();
  if (agent1 == 0) {
    ::close(sv[0]);
    if (hv[0] >= 0) ::close(hv[0]);
    Agent1(sv[1], memfd, edu_device, p, hv[1]);
  }
  ::close(sv[1]);
  if (hv[1] >= 0) ::close(hv[1]);
  std::string text;
  std::vector<int> fds;
  if (!RecvPrintingLines(sv[0], &text, &fds) || fds.size() != 2) {
    Check(false, p + "agent1-ready", absl::StrCat("got: ", text));
    ::kill(agent1, SIGKILL);
    ::waitpid(agent1, nullptr, 0);
    return;
  }
  const uint64_t agent1_ua = std::strtoull(text.c_str() + text.find("0x"), nullptr, 16);
  const pid_t holder = static_cast<pid_t>(std::atoi(text.c_str() + text.find("holder=") + 7));
  const int container = fds[0];
  const int device = fds[1];
  const int64_t a1_lck = StatusKb(agent1, "VmLck");
  const Mem m_live;
  Check(m_live.pinned - m0.pinned == mem_pages, p + "q3-pinned-while-agent1-lives",
        absl::StrFormat("pinned pages %+d, expected %+d (the 16 MiB registration); agent 1 VmLck "
                        "%d kB, VMM VmLck %d kB; %s",
                        m_live.pinned - m0.pinned, mem_pages, a1_lck, StatusKb(0, "VmLck"),
                        m_live.Text()));
  Note("q3", absl::StrFormat("%sagent 1 VmLck %d kB while it lives, pinned pages %+d", q, a1_lck,
                             m_live.pinned - m0.pinned));
  VmmIoctls(p + "q2-vmm-while-agent1-lives", container, mem);
  Edu edu;
  absl::Status s = edu.Adopt(device);
  Check(s.ok() && edu.DetectEndianness(), p + "vmm-adopts-device",
        s.ok() ? absl::StrFormat("ident 0x%08x", edu.Read(Edu::kIdent)) : s.ToString());
  ExpectDma(p + "dma-before-agent1-exit", edu, mem, 0, 1, kRoundTripOk);

  int status = 0;
  if (kill) {
    ::kill(agent1, SIGKILL);
    ::waitpid(agent1, &status, 0);
    Check(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, p + "agent1-gone",
          absl::StrFormat("SIGKILL, wait status 0x%x", status));
  } else {
    SendFds(sv[0], "GO");
    ::waitpid(agent1, &status, 0);
    Check(WIFEXITED(status) && WEXITSTATUS(status) == 0, p + "agent1-gone",
          absl::StrFormat("exit 0, wait status 0x%x", status));
  }
  ::close(sv[0]);

  // Q1: the old IOVAs, after agent 1's death.
  for (int i = 0; i < 3; ++i) {
    ExpectDma(absl::StrCat(p, "q1-dma-after-agent1-exit-r", i), edu, mem, i, 10 + i, kRoundTripOk);
  }
  if (way == Way::kHolder) {
    // Q5: the holder shares the dead agent's mm: the container is still its own.
    const int64_t holder_lck = StatusKb(holder, "VmLck");
    Check(holder_lck == a1_lck, p + "q5-holder-locked-vm",
          absl::StrFormat("the holder's VmLck %d kB, expected agent 1's %d kB (the same mm)",
                          holder_lck, a1_lck));
    SendFds(hv[0], "GO");
    int map3 = -1, unmap0 = -1, reg = -1, unreg = -1, unmap3 = -1, map0 = -1;
    if (RecvFds(hv[0], &text, nullptr)) {
      std::sscanf(text.c_str(), "DID %d %d %d %d", &map3, &unmap0, &reg, &unreg);
    }
    ExpectErr(p + "q5-holder-map-new", "the holder's MAP_DMA iova 0x4000000 (agent 1's address)",
              map3, 0);
    ExpectErr(p + "q5-holder-unmap-old", "the holder's UNMAP_DMA iova 0x1000000", unmap0, 0);
    ExpectErr(p + "q5-holder-register", "the holder's REGISTER_MEMORY of a new mapping (16 MiB)",
              reg, 0);
    ExpectErr(p + "q5-holder-unregister", "the holder's UNREGISTER_MEMORY of it", unreg, 0);
    ExpectDma(p + "q5-dma-holder-r3", edu, mem, 3, 40, kRoundTripOk);
    ExpectDma(p + "q5-dma-holder-r0-unmapped", edu, mem, 0, 41, kBlocked);
    SendFds(hv[0], "RESTORE");
    if (RecvFds(hv[0], &text, nullptr)) {
      std::sscanf(text.c_str(), "RESTORED %d %d", &unmap3, &map0);
    }
    ExpectErr(p + "q5-holder-unmap-new", "the holder's UNMAP_DMA iova 0x4000000", unmap3, 0);
    ExpectErr(p + "q5-holder-map-old-again", "the holder's MAP_DMA iova 0x1000000 again", map0, 0);
    ExpectDma(p + "q5-dma-holder-r0-again", edu, mem, 0, 42, kRoundTripOk);
    SendFds(hv[0], "EXIT");
    ::waitpid(holder, &status, 0);  // reparented to PID 1, the VMM
    Check(WIFEXITED(status) && WEXITSTATUS(status) == 0, p + "holder-gone",
          absl::StrFormat("exit 0, wait status 0x%x; the mm has no user left now", status));
    ::close(hv[0]);
  }
  // Q3: still pinned, and nobody alive is charged.
  const Mem m_dead;
  const int64_t vmm_lck = StatusKb(0, "VmLck");
  Check(m_dead.pinned == m_live.pinned && vmm_lck == 0, p + "q3-pinned-after-agent1-exit",
        absl::StrFormat("pinned pages %+d vs agent 1 alive, expected +0; VMM VmLck %d kB, "
                        "expected 0; %s",
                        m_dead.pinned - m_live.pinned, vmm_lck, m_dead.Text()));
  // Q4: the group, and the VMM's own ioctls.
  ExpectErr(p + "q4-vmm-open-group-after-agent1-exit",
            "open " + edu_device.group + " in the VMM, device fd held", OpenGroup(edu_device),
            EBUSY);
  VmmIoctls(p + "q2-vmm-after-agent1-exit", container, mem);

  // Agent 2
  ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv);
  const pid_t agent2 = ::fork();
  if (agent2 == 0) {
    ::close(sv[0]);
    ::close(container);  // a fresh agent gets it back over the socket, not by inheritance
    edu.Close();
    Agent2(sv[1], memfd, edu_device, p, agent1_ua);
  }
  ::close(sv[1]);
  if (!RecvPrintingLines(sv[0], &text, nullptr) || text != "HELLO") {
    Check(false, p + "agent2-hello", text);
  }
  SendFds(sv[0], "CONTAINER", {container});
  if (!RecvPrintingLines(sv[0], &text, nullptr) || text != "DONE") {
    Check(false, p + "agent2-done", text);
  }
  SendFds(sv[0], "EXIT");
  ::waitpid(agent2, nullptr, 0);
  ::close(sv[0]);
  // Agent 2's refused UNMAP left r0 mapped, and its refused MAP mapped nothing.
  for (int i = 0; i < 3; ++i) {
    ExpectDma(absl::StrCat(p, "q1-dma-after-agent2-r", i), edu, mem, i, 20 + i, kRoundTripOk);
  }
  ExpectDma(p + "q2-dma-agent2-r3-not-mapped", edu, mem, 3, 23, kBlocked);

  // Q3: the VMM lets go of the memfd first, keeping the device and container fds: the pages stay
  // pinned by the dead agent's registration, so they are not freed.
  const Mem m_held;
  ::munmap(mem, kMemSize);
  ::close(memfd);
  SleepMs(200);
  const Mem m_no_memfd;
  Check(m_no_memfd.pinned == m_live.pinned && m_no_memfd.free_kb - m_held.free_kb < kMemKb / 2,
        p + "q3-pinned-without-memfd",
        absl::StrFormat("after the VMM closed the memfd, device and container fds held: pinned "
                        "pages %+d vs agent 1 alive (expected +0), free %+d kB (expected less "
                        "than +%d kB); %s",
                        m_no_memfd.pinned - m_live.pinned, m_no_memfd.free_kb - m_held.free_kb,
                        kMemKb / 2, m_no_memfd.Text()));

  // Q4: the device fd goes; the container fd stays.
  edu.Close();
  PinnedPagesSettled(m0.pinned);
  const Mem m_no_device;
  std::string group_status = "not opened";
  const int open_err = OpenGroup(edu_device, &group_status);
  ExpectErr(p + "q4-open-group-after-device-close",
            absl::StrCat("open ", edu_device.group, " in the VMM, container fd still held (",
                         group_status, ")"),
            open_err, 0);
  Check(
      m_no_device.pinned == m0.pinned && m_no_device.free_kb - m_no_memfd.free_kb > kMemKb * 3 / 4,
      p + "q3-unpinned-at-device-close",
      absl::StrFormat("after the VMM closed the device fd: pinned pages %+d vs the start "
                      "(expected +0), free %+d kB (expected more than +%d kB: the registration "
                      "goes with the group, and the closed memfd's pages with it); %s",
                      m_no_device.pinned - m0.pinned, m_no_device.free_kb - m_no_memfd.free_kb,
                      kMemKb * 3 / 4, m_no_device.Text()));
  {
    // The container fd alone: it lost its only group and with it the SPAPR IOMMU.
    void* scratch =
        ::mmap(nullptr, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    const uint64_t sua = reinterpret_cast<uint64_t>(scratch);
    ExpectErr(p + "q4-container-alone-get-info", "SPAPR_TCE_GET_INFO", GetInfo(container), EINVAL);
    ExpectErr(p + "q4-container-alone-register", "REGISTER_MEMORY 1 MiB",
              Register(container, sua, 1 << 20), EINVAL);
    ExpectErr(p + "q4-container-alone-map", "MAP_DMA iova 0x1000000",
              MapDma(container, kIova[0], sua, 1 << 20), EINVAL);
    ExpectErr(p + "q4-container-alone-unmap", "UNMAP_DMA iova 0x1000000",
              UnmapDma(container, kIova[0], kRegion), EINVAL);
    const int v2 = CheckV2(container);
    Check(v2 == 1, p + "q4-container-alone-check-extension",
          absl::StrFormat("CHECK_EXTENSION(SPAPR_TCE_v2): kernel %d, expected 1", v2));
    ::munmap(scratch, 1 << 20);
  }
  ::close(container);
  SleepMs(200);
  const Mem m_end;
  ExpectErr(p + "q4-open-group-at-end", "open " + edu_device.group + " with nothing held",
            OpenGroup(edu_device), 0);
  const std::string figures = absl::StrFormat(
      "free kB (MemFree kB) / pinned pages: start %d (%d) / %d; memfd populated %d (%d) / %d; "
      "agent 1 set up %d (%d) / %d; agent 1 gone %d (%d) / %d; memfd closed %d (%d) / %d; "
      "device fd closed %d (%d) / %d; container fd closed %d (%d) / %d; %+d kB free vs start",
      m0.free_kb, m0.memfree_kb, m0.pinned, m_populated.free_kb, m_populated.memfree_kb,
      m_populated.pinned, m_live.free_kb, m_live.memfree_kb, m_live.pinned, m_dead.free_kb,
      m_dead.memfree_kb, m_dead.pinned, m_no_memfd.free_kb, m_no_memfd.memfree_kb,
      m_no_memfd.pinned, m_no_device.free_kb, m_no_device.memfree_kb, m_no_device.pinned,
      m_end.free_kb, m_end.memfree_kb, m_end.pinned, m_end.free_kb - m0.free_kb);
  Check(m_end.pinned == m0.pinned && std::abs(m_end.free_kb - m0.free_kb) < kMemKb / 4,
        p + "q3-all-back", figures);
  Note("q3", absl::StrCat(q, figures));
}

int Main() {
  const bool init = ::getpid() == 1;
  if (init) Boot();
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  SetMode("spapr-survive");
  const Clock::time_point start = Clock::now();
  Info("start", absl::StrCat("kernel ", ReadFile("/proc/sys/kernel/osrelease").value_or("?"),
                             init ? ", as /init" : ""));
  if (!init) {
    Check(false, "init", "runs as the guest's /init only");
  } else if (LoadModules("/modules")) {
    std::vector<EduDevice> edus = BindEduDevices();
    if (!edus.empty()) {
      Info("page-size", absl::StrCat(::sysconf(_SC_PAGESIZE)));
      Scenario(edus.front(), Way::kKill);
      Scenario(edus.front(), Way::kExit);
      Scenario(edus.front(), Way::kHolder);
    }
  }
  for (const auto& [question, text] : g_results) {
    std::printf("RESULT spapr-survive %s: %s\n", question.c_str(), text.c_str());
  }
  return Finish(start, init);
}

}  // namespace
}  // namespace dmapin::agent

int main() { return dmapin::agent::Main(); }
