// What the QEMU VFIO guest programs (vfio_guest_test.cc, agent_guest_test.cc, survive_guest.cc,
// survive_spapr_guest.cc) share: the console report the harness parses, small file helpers,
// messages with descriptors between the guest's processes, the boot of an initramfs /init,
// binding the emulated `edu` devices to vfio-pci, and edu's DMA engine through a VFIO device fd.
//
// Everything here must link statically (the programs are /init): Abseil and libc only.
#ifndef DMAPIN_TESTS_QEMU_VFIO_GUEST_SUPPORT_H_
#define DMAPIN_TESTS_QEMU_VFIO_GUEST_SUPPORT_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dmapin::agent {

// ---------------------------------------------------------------------------------------------
// The report, one line per step on stdout:
//   PASS <mode> <step>: <detail>    FAIL <mode> <step>: <detail>    INFO <mode> <step>: <detail>
// and at the end "RESULT <mode> passed=N failed=M test_seconds=S" and the end marker.

inline constexpr char kDoneMarker[] = "DMAPIN-QEMU-VFIO-DONE";

void SetMode(const std::string& mode);
const std::string& Mode();
int Failed();
void Line(const char* tag, const std::string& step, const std::string& detail);
bool Check(bool ok, const std::string& step, const std::string& detail);
void Info(const std::string& step, const std::string& detail);
// "OK" for 0, else the errno's name.
std::string Errno(int err);
// Prints the RESULT line and the end marker; as PID 1 syncs and reboots (QEMU runs with
// -no-reboot, so that ends it). Returns the exit status otherwise.
int Finish(std::chrono::steady_clock::time_point start, bool init);

// ---------------------------------------------------------------------------------------------
// Small system helpers

// The file's text without trailing newlines and blanks; nullopt if it cannot be read.
std::optional<std::string> ReadFile(const std::string& path);
bool WriteFile(const std::string& path, const std::string& text);
std::string ReadLink(const std::string& path);  // "" on error
std::string Basename(const std::string& path);
// The names in `path` without the dot entries, sorted.
std::vector<std::string> ListDir(const std::string& path);
void SleepMs(int ms);
// A "<field>: <n> kB" line of /proc/<pid>/status (pid 0: self), in KiB; -1 if absent.
int64_t StatusKb(pid_t pid, const char* field);

// A "<field>: <n> kB" line of /proc/meminfo ("MemFree"), in KiB; -1 if absent.
int64_t MemInfoKb(const char* field);

// ---------------------------------------------------------------------------------------------
// Messages between the guest program's processes, over a SOCK_SEQPACKET socketpair: text plus up
// to 4 descriptors (SCM_RIGHTS). A forked child reports its steps to the parent (PID 1, which
// counts PASS/FAIL) as "LINE <tag> <step>\t<detail>" messages.

bool SendFds(int sock, const std::string& text, const std::vector<int>& fds = {});
// One message; false on timeout (ms), error or EOF. Received descriptors are close-on-exec.
bool RecvFds(int sock, std::string* text, std::vector<int>* fds, int timeout_ms = 60000);
// In a child: one report line, sent to the parent.
void SendLine(int sock, const char* tag, const std::string& step, const std::string& detail);
// In the parent: prints (PASS/FAIL: counts) every LINE message and returns the first other one.
bool RecvPrintingLines(int sock, std::string* text, std::vector<int>* fds);

// ---------------------------------------------------------------------------------------------
// Boot (PID 1 only): mounts /proc, /sys and /dev, quiets the kernel's console messages and sends
// stdout and stderr to /dev/console.
void Boot();
// Loads every module file in `dir`, in name order (finit_module); one PASS or FAIL line.
bool LoadModules(const std::string& dir);

struct EduDevice {
  std::string bdf;    // "0000:00:03.0"
  std::string group;  // "/dev/vfio/3"
};

// Binds every edu device (1234:11e8) to vfio-pci and waits for its group node; one PASS line,
// or a FAIL line and nothing.
std::vector<EduDevice> BindEduDevices();

// ---------------------------------------------------------------------------------------------
// The edu device's DMA engine (QEMU docs/specs/edu.txt), through a VFIO device fd.

class Edu {
 public:
  static constexpr uint64_t kIdent = 0x00;
  static constexpr uint64_t kDmaSrc = 0x80;
  static constexpr uint64_t kDmaDst = 0x88;
  static constexpr uint64_t kDmaCount = 0x90;
  static constexpr uint64_t kDmaCmd = 0x98;
  static constexpr uint32_t kCmdRun = 1;
  static constexpr uint32_t kCmdToRam = 2;  // device buffer -> bus address
  static constexpr uint64_t kDeviceBuffer = 0x40000;

  Edu() = default;
  Edu(const Edu&) = delete;
  Edu& operator=(const Edu&) = delete;
  ~Edu() { Close(); }
  void Close();

  // Opens the device through the group descriptor the driver attached (a group can be open
  // only once, so it is found in /proc/self/fd).
  absl::Status Open(const std::string& group_path, const std::string& bdf);
  // Opens the device through `group_fd`, a descriptor of its group (whoever attached it to a
  // container), and enables memory space and bus mastering.
  absl::Status OpenFromGroup(int group_fd, const std::string& bdf);
  // Takes over `device_fd`, a device fd got elsewhere (e.g. received over SCM_RIGHTS), and
  // enables memory space and bus mastering.
  absl::Status Adopt(int device_fd);

  // edu's registers are "native endian" in QEMU: big-endian under qemu-system-ppc64 whatever the
  // guest runs. The identification register (0x010000ed for edu 1.0) tells which.
  bool DetectEndianness();
  bool swapped() const { return swap_; }

  uint32_t Read(uint64_t reg) const;
  bool Write(uint64_t reg, uint32_t value) const;

  // One DMA transfer; `bus` is the IOVA, `count` at most 4095 bytes (QEMU 7.2's edu aborts on
  // 4096: an off-by-one in its range check).
  absl::Status Dma(uint64_t bus, uint32_t count, bool to_ram) const;

 private:
  absl::StatusOr<uint64_t> RegionOffset(uint32_t index) const;

  int fd_ = -1;
  uint64_t bar0_ = 0;
  bool swap_ = false;
};

// ---------------------------------------------------------------------------------------------
// Processes of the guest (the agent and VMM tests)

// Makes every directory of `path` (mkdir -p).
void MakeDirs(const std::string& path);
// fork + execve of `argv` with stdout and stderr on `out_fd` (-1: this process's).
pid_t Spawn(const std::vector<std::string>& argv, int out_fd);
// Whether `pid` (a child) still runs; reaps it and says how it ended otherwise.
bool Running(pid_t pid, std::string* how = nullptr);
// Whether `pid` (a child) ended within `timeout_s`; how it ended in `*how`.
bool Reaped(pid_t pid, double timeout_s, std::string* how);
// The agent's graceful stop: "agent-alive" (it still runs), SIGTERM, then "agent-sigterm" (it
// exited with 0 within 30 s; SIGKILL otherwise).
void CheckGracefulStop(pid_t agent);
int64_t LockedKb(pid_t pid);
// The descriptor number under which `pid` holds `path` open; -1 if none.
int FdOf(pid_t pid, const std::string& path);
// A duplicate in this process of `pid`'s descriptor `remote_fd` (pidfd_getfd: the same open
// file, e.g. a group that can be open only once); -1 and errno on failure.
int DupFdOf(pid_t pid, int remote_fd);
// `size` bytes of `pid`'s memory at its address `ua`.
std::optional<std::string> ReadMemory(pid_t pid, uint64_t ua, size_t size);
// Byte i is seed + 7 * i.
std::string Pattern(uint32_t seed, uint32_t bytes);
// Where the first difference is, for the report.
std::string Compared(const std::string& got, const std::string& want);

}  // namespace dmapin::agent

#endif  // DMAPIN_TESTS_QEMU_VFIO_GUEST_SUPPORT_H_
