// The guest side of the agent-restart experiment (run_qemu_vfio.sh x86_64-survive): does a VFIO
// type1 container keep its DMA mappings when the process that set it up (the "agent") dies while
// another process (the "VMM") holds the device fd and a duplicate of the container fd? What can a
// second agent do with that container afterwards? See SURVIVE.md.
//
// It is the initramfs's /init (PID 1), statically linked, and plays the VMM itself. Two runs, each
// with its own 16 MiB memfd shared MAP_SHARED by every process:
//   crash    agent 1 (a forked child) opens the container and the group, maps three 4 MiB
//            regions, gets the device fd, passes container + device fd over SCM_RIGHTS and
//            is SIGKILLed; the edu device DMAs through the old IOVAs; agent 2 (another child)
//            receives the container fd back and tries MAP, UNMAP and the VADDR pair.
//   planned  agent 1 invalidates its vaddrs (VFIO_DMA_UNMAP_FLAG_VADDR) and exits normally;
//            agent 2 updates them (VFIO_DMA_MAP_FLAG_VADDR).
// Every answer is printed: "OBSERVE survive <step>: <detail>" for what the kernel said, PASS/FAIL
// only where the outcome is certain (setup, DMA bytes the question does not depend on), and one
// "OBSERVE survive RESULT-qN: ..." summary line per question.
#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "tests/qemu_vfio/guest_support.h"

namespace dmapin::agent {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kMemSize = 16 << 20;
constexpr uint64_t kRegion = 4 << 20;
// Region i: IOVA kIova[i] onto memfd offset i * kRegion. 0..2 are agent 1's, 3 is agent 2's.
constexpr uint64_t kIova[4] = {0x1000000, 0x2000000, 0x3000000, 0x4000000};
constexpr uint32_t kBytes = 1024;

std::map<std::string, std::string> g_results;  // question -> summary

void Observe(const std::string& step, const std::string& detail) { Line("OBSERVE", step, detail); }
void Note(const std::string& q, const std::string& text) {
  std::string& r = g_results[q];
  absl::StrAppend(&r, r.empty() ? "" : "; ", text);
}

// A child reports with "LINE <tag> <step>\t<detail>" messages; the VMM prints them, and answers
// the child's other messages in its own code. Returns the first message that is not a LINE.
bool RecvSkippingLines(int sock, std::string* text, std::vector<int>* fds) {
  while (RecvFds(sock, text, fds)) {
    if (!absl::StartsWith(*text, "LINE ")) return true;
    std::vector<std::string> parts = absl::StrSplit(text->substr(5), absl::MaxSplits('\t', 1));
    const std::string tag_step = parts[0];
    const size_t space = tag_step.find(' ');
    const std::string tag = tag_step.substr(0, space);
    const std::string step = tag_step.substr(space + 1);
    const std::string detail = parts.size() > 1 ? parts[1] : "";
    if (tag == "PASS" || tag == "FAIL") {
      Check(tag == "PASS", step, detail);
    } else {
      Line(tag.c_str(), step, detail);
    }
  }
  return false;
}

// In a child: its report to the VMM.
int g_sock = -1;
void ChildLine(const char* tag, const std::string& step, const std::string& detail) {
  SendFds(g_sock, absl::StrCat("LINE ", tag, " ", step, "\t", detail));
}

// ---------------------------------------------------------------------------------------------
// VFIO ioctls, raw (this is about what the kernel does, not about the project's drivers).

int MapDma(int container, uint64_t iova, uint64_t vaddr, uint64_t size, uint32_t flags) {
  struct vfio_iommu_type1_dma_map map = {};
  map.argsz = sizeof(map);
  map.flags = flags;
  map.vaddr = vaddr;
  map.iova = iova;
  map.size = size;
  return ::ioctl(container, VFIO_IOMMU_MAP_DMA, &map) == 0 ? 0 : errno;
}

// Returns the errno; *unmapped: the size the kernel reports back.
int UnmapDma(int container, uint64_t iova, uint64_t size, uint32_t flags, uint64_t* unmapped) {
  struct vfio_iommu_type1_dma_unmap unmap = {};
  unmap.argsz = sizeof(unmap);
  unmap.flags = flags;
  unmap.iova = iova;
  unmap.size = size;
  const int err = ::ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) == 0 ? 0 : errno;
  *unmapped = unmap.size;
  return err;
}

std::string GroupStatus(int group) {
  struct vfio_group_status status = {};
  status.argsz = sizeof(status);
  if (::ioctl(group, VFIO_GROUP_GET_STATUS, &status) != 0) {
    return absl::StrCat("GET_STATUS ", Errno(errno));
  }
  return absl::StrFormat("GET_STATUS flags=0x%x (%s%s)", status.flags,
                         (status.flags & VFIO_GROUP_FLAGS_VIABLE) ? "VIABLE " : "",
                         (status.flags & VFIO_GROUP_FLAGS_CONTAINER_SET) ? "CONTAINER_SET" : "");
}

uint8_t* MapMem(int memfd) {
  void* p = ::mmap(nullptr, kMemSize, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  return p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
}

// ---------------------------------------------------------------------------------------------
// Agent 1: sets the container up, maps regions 0..2 from its own mapping of the memfd, sends the
// container and device fds. crash: then waits to be killed; planned: invalidates its vaddrs,
// says so and exits 0.

[[noreturn]] void Agent1(int sock, int memfd, const EduDevice& edu, bool planned) {
  g_sock = sock;
  const std::string p = planned ? "planned-" : "crash-";
  uint8_t* mem = MapMem(memfd);
  const int container = ::open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
  const int group = ::open(edu.group.c_str(), O_RDWR | O_CLOEXEC);
  if (mem == nullptr || container < 0 || group < 0) {
    ChildLine("FAIL", p + "agent1-setup", absl::StrCat("mmap/open: ", Errno(errno)));
    ::_exit(1);
  }
  ChildLine("OBSERVE", p + "agent1-check-extension",
            absl::StrFormat("TYPE1v2=%d UPDATE_VADDR=%d",
                            ::ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU),
                            ::ioctl(container, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR)));
  int err = ::ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) == 0 ? 0 : errno;
  if (err == 0) err = ::ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) == 0 ? 0 : errno;
  for (int i = 0; i < 3 && err == 0; ++i) {
    err = MapDma(container, kIova[i], reinterpret_cast<uint64_t>(mem) + i * kRegion, kRegion,
                 VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE);
  }
  const int device = err == 0 ? ::ioctl(group, VFIO_GROUP_GET_DEVICE_FD, edu.bdf.c_str()) : -1;
  if (err == 0 && device < 0) err = errno;
  ChildLine(err == 0 ? "PASS" : "FAIL", p + "agent1-setup",
            absl::StrFormat("%s; SET_CONTAINER, SET_IOMMU TYPE1v2, 3 x MAP_DMA 4 MiB, device fd: "
                            "%s; VmLck %d kB",
                            GroupStatus(group), Errno(err), StatusKb(0, "VmLck")));
  if (err != 0) ::_exit(1);
  SendFds(sock, absl::StrFormat("READY vaddr=%d", reinterpret_cast<uint64_t>(mem)),
          {container, device});
  ::close(device);  // the VMM has its own copies now
  if (!planned) {
    for (;;) ::pause();
  }
  std::string go;
  RecvFds(sock, &go, nullptr);  // the VMM has checked its copies
  for (int i = 0; i < 3; ++i) {
    uint64_t size = 0;
    const int e = UnmapDma(container, kIova[i], kRegion, VFIO_DMA_UNMAP_FLAG_VADDR, &size);
    ChildLine("OBSERVE", absl::StrCat(p, "agent1-unmap-flag-vaddr-", i),
              absl::StrFormat("UNMAP_DMA(FLAG_VADDR) iova 0x%x: %s, size back 0x%x", kIova[i],
                              Errno(e), size));
  }
  SendFds(sock, absl::StrCat("EXITING VmLck=", StatusKb(0, "VmLck")));
  ::_exit(0);
}

// Agent 2: gets the container fd back from the VMM and tries what a restarted agent would.
[[noreturn]] void Agent2(int sock, int memfd, const EduDevice& edu, bool planned) {
  g_sock = sock;
  const std::string p = planned ? "planned-" : "crash-";
  std::string text;
  std::vector<int> fds;
  SendFds(sock, "HELLO");
  if (!RecvFds(sock, &text, &fds) || fds.size() != 1) {
    ChildLine("FAIL", p + "agent2-receive", "no container fd from the VMM");
    ::_exit(1);
  }
  const int container = fds[0];
  // Q5: the group again.
  const int group = ::open(edu.group.c_str(), O_RDWR | O_CLOEXEC);
  const int open_err = group < 0 ? errno : 0;
  ChildLine("OBSERVE", p + "q5-agent2-open-group",
            absl::StrCat("open ", edu.group, ": ", Errno(open_err),
                         group >= 0 ? absl::StrCat("; ", GroupStatus(group)) : ""));
  SendFds(sock, absl::StrCat("Q5 open=", Errno(open_err),
                             group >= 0 ? absl::StrCat(" ", GroupStatus(group)) : ""));
  if (group >= 0) ::close(group);
  // Q3: the extension, on the received container fd.
  const int ext = ::ioctl(container, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR);
  const int ext_v2 = ::ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU);
  uint8_t* mem = MapMem(memfd);
  const uint64_t base = reinterpret_cast<uint64_t>(mem);
  const int64_t lck0 = StatusKb(0, "VmLck");
  // Q2: a new mapping, region 3, from agent 2's own address.
  const int map_err = MapDma(container, kIova[3], base + 3 * kRegion, kRegion,
                             VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE);
  const int64_t lck1 = StatusKb(0, "VmLck");
  std::string vaddr_report;
  if (!planned) {
    // Q3 after a crash: invalidate region 2's dead vaddr, then give it agent 2's.
    uint64_t size = 0;
    const int inv = UnmapDma(container, kIova[2], kRegion, VFIO_DMA_UNMAP_FLAG_VADDR, &size);
    const int upd =
        MapDma(container, kIova[2], base + 2 * kRegion, kRegion, VFIO_DMA_MAP_FLAG_VADDR);
    // And a VADDR update without the invalidation (region 1), for comparison.
    const int upd1 =
        MapDma(container, kIova[1], base + 1 * kRegion, kRegion, VFIO_DMA_MAP_FLAG_VADDR);
    vaddr_report = absl::StrFormat(
        "UNMAP(FLAG_VADDR) r2=%s size_back=0x%x; MAP(FLAG_VADDR) r2=%s; MAP(FLAG_VADDR) r1 without "
        "invalidation=%s",
        Errno(inv), size, Errno(upd), Errno(upd1));
  } else {
    // Q3 planned: agent 1 invalidated regions 0..2; give them agent 2's addresses.
    for (int i = 0; i < 3; ++i) {
      const int upd =
          MapDma(container, kIova[i], base + i * kRegion, kRegion, VFIO_DMA_MAP_FLAG_VADDR);
      absl::StrAppend(&vaddr_report, i == 0 ? "" : " ",
                      absl::StrFormat("MAP(FLAG_VADDR) r%d=%s", i, Errno(upd)));
    }
  }
  const int64_t lck_vaddr = StatusKb(0, "VmLck");
  // Q2: unmap an old mapping (region 0, agent 1's).
  uint64_t unmapped = 0;
  const int unmap_err = UnmapDma(container, kIova[0], kRegion, 0, &unmapped);
  // And the new one of its own (region 3), in a second call after a re-map check below.
  const int64_t lck2 = StatusKb(0, "VmLck");
  SendFds(sock, absl::StrFormat(
                    "REPORT ext_update_vaddr=%d ext_type1v2=%d | map_new_r3=%s VmLck %d->%d kB | "
                    "%s VmLck after=%d kB | unmap_old_r0=%s size_back=0x%x VmLck after=%d kB",
                    ext, ext_v2, Errno(map_err), lck0, lck1, vaddr_report, lck_vaddr,
                    Errno(unmap_err), unmapped, lck2));
  // Wait for the VMM's DMA checks, then unmap region 3 (own) and exit.
  RecvFds(sock, &text, nullptr);
  const int unmap3 = UnmapDma(container, kIova[3], kRegion, 0, &unmapped);
  SendFds(sock, absl::StrFormat("BYE unmap_own_r3=%s size_back=0x%x VmLck=%d kB", Errno(unmap3),
                                unmapped, StatusKb(0, "VmLck")));
  RecvFds(sock, &text, nullptr);
  ::_exit(0);
}

// ---------------------------------------------------------------------------------------------
// The VMM

// Fills `bytes` at `dst` with a pattern of `seed`.
void Fill(uint8_t* dst, uint32_t seed) {
  for (uint32_t i = 0; i < kBytes; ++i) dst[i] = static_cast<uint8_t>(seed * 31 + i * 7 + 1);
}
bool Matches(const uint8_t* p, uint32_t seed) {
  for (uint32_t i = 0; i < kBytes; ++i) {
    if (p[i] != static_cast<uint8_t>(seed * 31 + i * 7 + 1)) return false;
  }
  return true;
}

// Round trip through region i's IOVA: a fresh pattern at its start goes to the device and back
// 64 KiB further into the same region. "read+write ok", "nothing written" or "stale bytes".
std::string RoundTrip(const Edu& edu, uint8_t* mem, int i, uint32_t seed) {
  uint8_t* src = mem + i * kRegion;
  uint8_t* dst = src + 0x10000;
  Fill(src, seed);
  std::memset(dst, 0, kBytes);
  absl::Status s = edu.Dma(kIova[i], kBytes, false);
  if (s.ok()) s = edu.Dma(kIova[i] + 0x10000, kBytes, true);
  if (!s.ok()) return s.ToString();
  if (Matches(dst, seed)) return "read+write ok";
  bool zero = true;
  for (uint32_t k = 0; k < kBytes; ++k) zero = zero && dst[k] == 0;
  return zero ? "nothing written (blocked)" : "stale bytes (the read was blocked)";
}

bool GroupOpenable(const EduDevice& edu, int* err, std::string* status = nullptr) {
  const int fd = ::open(edu.group.c_str(), O_RDWR | O_CLOEXEC);
  *err = fd < 0 ? errno : 0;
  if (fd >= 0 && status != nullptr) *status = GroupStatus(fd);
  if (fd >= 0) ::close(fd);
  return fd >= 0;
}

void Scenario(const EduDevice& edu_device, bool planned) {
  const std::string p = planned ? "planned-" : "crash-";
  const std::string q = planned ? "planned " : "crash ";
  const int64_t free0 = MemInfoKb("MemFree");
  const int memfd = static_cast<int>(::syscall(SYS_memfd_create, "guest-ram", 0));
  if (memfd < 0 || ::ftruncate(memfd, kMemSize) != 0) {
    Check(false, p + "memfd", Errno(errno));
    return;
  }
  uint8_t* mem = MapMem(memfd);
  std::memset(mem, 0, kMemSize);  // populate: the pages exist before anyone pins them
  int sv[2];
  ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv);
  const pid_t agent1 = ::fork();
  if (agent1 == 0) {
    ::close(sv[0]);
    Agent1(sv[1], memfd, edu_device, planned);
  }
  ::close(sv[1]);
  std::string text;
  std::vector<int> fds;
  if (!RecvSkippingLines(sv[0], &text, &fds) || fds.size() != 2) {
    Check(false, p + "agent1-ready", absl::StrCat("got: ", text));
    ::kill(agent1, SIGKILL);
    ::waitpid(agent1, nullptr, 0);
    return;
  }
  const int container = fds[0];
  const int device = fds[1];
  const int64_t a1_lck = StatusKb(agent1, "VmLck");
  const int64_t vmm_lck = StatusKb(0, "VmLck");
  Observe(p + "q4-before",
          absl::StrFormat("agent1 VmLck %d kB, VMM VmLck %d kB, MemFree %d kB (before memfd %d)",
                          a1_lck, vmm_lck, MemInfoKb("MemFree"), free0));
  Note("q4", absl::StrFormat("%sagent1 VmLck %d kB / VMM %d kB while mapped", q, a1_lck, vmm_lck));
  Edu edu;
  absl::Status s = edu.Adopt(device);
  Check(s.ok() && edu.DetectEndianness(), p + "vmm-adopts-device",
        s.ok() ? absl::StrFormat("ident 0x%08x", edu.Read(Edu::kIdent)) : s.ToString());
  Check(RoundTrip(edu, mem, 0, 1) == "read+write ok", p + "dma-before-agent-exit",
        "round trip through iova 0x1000000 while agent 1 lives");

  if (!planned) {
    ::kill(agent1, SIGKILL);
    int status = 0;
    ::waitpid(agent1, &status, 0);
    Info(p + "agent1-killed", absl::StrFormat("SIGKILL, status 0x%x", status));
  } else {
    SendFds(sv[0], "GO");
    RecvSkippingLines(sv[0], &text, nullptr);
    Info(p + "agent1-exiting", text);
    int status = 0;
    ::waitpid(agent1, &status, 0);
    Info(p + "agent1-exited", absl::StrFormat("status 0x%x", status));
  }
  ::close(sv[0]);
  Observe(p + "q4-after-agent1-exit", absl::StrFormat("VMM VmLck %d kB, MemFree %d kB",
                                                      StatusKb(0, "VmLck"), MemInfoKb("MemFree")));
  // Q1
  std::string r[3];
  for (int i = 0; i < 3; ++i) {
    r[i] = RoundTrip(edu, mem, i, 10 + i);
    Observe(absl::StrCat(p, "q1-dma-after-agent1-exit-r", i),
            absl::StrFormat("iova 0x%x: %s", kIova[i], r[i]));
  }
  Note("q1", absl::StrFormat("%safter agent 1's exit: r0 %s, r1 %s, r2 %s", q, r[0], r[1], r[2]));
  {
    int err = 0;
    GroupOpenable(edu_device, &err);
    Observe(p + "q5-vmm-open-group", absl::StrCat("open in the VMM: ", Errno(err)));
  }

  // Agent 2
  ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv);
  const pid_t agent2 = ::fork();
  if (agent2 == 0) {
    ::close(sv[0]);
    ::close(container);  // a fresh agent gets it back over the socket, not by inheritance
    edu.Close();
    Agent2(sv[1], memfd, edu_device, planned);
  }
  ::close(sv[1]);
  if (!RecvSkippingLines(sv[0], &text, nullptr) || text != "HELLO") {
    Check(false, p + "agent2-hello", text);
  }
  SendFds(sv[0], "CONTAINER", {container});
  RecvSkippingLines(sv[0], &text, nullptr);
  Observe(p + "q5", text);
  Note("q5", absl::StrCat(q, text.substr(3)));
  RecvSkippingLines(sv[0], &text, nullptr);
  Observe(p + "q2-q3-agent2", text);
  Note("q2q3", absl::StrCat(q, text.substr(7)));
  const int64_t a2_lck = StatusKb(agent2, "VmLck");
  for (int i = 0; i < 4; ++i) {
    const std::string res = RoundTrip(edu, mem, i, 20 + i);
    Observe(absl::StrCat(p, "q2-q3-dma-after-agent2-r", i),
            absl::StrFormat("iova 0x%x: %s", kIova[i], res));
    Note("q2q3dma", absl::StrFormat("%sr%d %s", q, i, res));
  }
  SendFds(sv[0], "DONE");
  RecvSkippingLines(sv[0], &text, nullptr);
  Observe(p + "agent2-own-unmap", text);
  Note("q2q3", absl::StrCat(q, text.substr(4)));
  Note("q4", absl::StrFormat("%sagent2 VmLck %d kB after its map (read by the VMM)", q, a2_lck));
  SendFds(sv[0], "EXIT");
  ::waitpid(agent2, nullptr, 0);
  ::close(sv[0]);
  {
    const std::string res = RoundTrip(edu, mem, 1, 30);
    Observe(p + "dma-after-agent2-exit-r1", res);
    Note("q1", absl::StrCat(q, "after agent 2's exit too: r1 ", res));
  }

  // Q4: the VMM lets go.
  int err = 0;
  const bool open_while_held = GroupOpenable(edu_device, &err);
  const int64_t free_held = MemInfoKb("MemFree");
  edu.Close();
  std::string status_after_device = "not opened";
  const bool open_after_device = GroupOpenable(edu_device, &err, &status_after_device);
  const int err_after_device = err;
  // The container fd alone, without the device fd: is anything left in it?
  {
    uint64_t size = 0;
    const int unmap_err = UnmapDma(container, kIova[1], kRegion, 0, &size);
    const int map_err = MapDma(container, kIova[3], reinterpret_cast<uint64_t>(mem), kRegion,
                               VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE);
    const int ext = ::ioctl(container, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR);
    const std::string text = absl::StrFormat(
        "after the VMM closed the device fd, keeping the container fd: the group opens in the VMM "
        "(%s, %s); on the container: UNMAP r1 %s size_back=0x%x, MAP_DMA %s, "
        "CHECK_EXTENSION(UPDATE_VADDR)=%d; MemFree %d kB",
        Errno(err_after_device), status_after_device, Errno(unmap_err), size, Errno(map_err), ext,
        MemInfoKb("MemFree"));
    Observe(p + "q4-container-fd-alone", text);
    Note("q4", absl::StrCat(q, text));
  }
  ::close(container);
  bool open_after_all = false;
  for (int i = 0; i < 50 && !open_after_all; ++i) {
    open_after_all = GroupOpenable(edu_device, &err);
    if (!open_after_all) SleepMs(20);
  }
  const int err_after_all = err;
  ::munmap(mem, kMemSize);
  ::close(memfd);
  SleepMs(200);
  const int64_t free_end = MemInfoKb("MemFree");
  const std::string q4 = absl::StrFormat(
      "group openable: with device+container held %s, after closing the device fd %s (%s), after "
      "closing the container too %s (%s); MemFree %d kB before the memfd, %d kB with everything "
      "held, %d kB after the VMM closed all and the memfd went (%+d kB vs start)",
      open_while_held ? "yes" : "no", open_after_device ? "yes" : "no", Errno(err_after_device),
      open_after_all ? "yes" : "no", Errno(err_after_all), free0, free_held, free_end,
      free_end - free0);
  Observe(p + "q4-after-vmm-close", q4);
  Note("q4", absl::StrCat(q, q4));
  Check(open_after_all, p + "group-free-at-end", "the group opens again once the VMM closed both");
}

int Main() {
  const bool init = ::getpid() == 1;
  if (init) Boot();
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  SetMode("survive");
  const Clock::time_point start = Clock::now();
  Info("start", absl::StrCat("kernel ", ReadFile("/proc/sys/kernel/osrelease").value_or("?"),
                             init ? ", as /init" : ""));
  if (!init) {
    Check(false, "init", "runs as the guest's /init only");
  } else if (LoadModules("/modules")) {
    std::vector<EduDevice> edus = BindEduDevices();
    if (!edus.empty()) {
      Scenario(edus.front(), false);
      Scenario(edus.front(), true);
    }
  }
  for (const auto& [question, text] : g_results) {
    std::printf("RESULT survive %s: %s\n", question.c_str(), text.c_str());
  }
  return Finish(start, init);
}

}  // namespace
}  // namespace dmapin::agent

int main() { return dmapin::agent::Main(); }
