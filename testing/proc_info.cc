#include "testing/proc_info.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/errno_status.h"
#include "common/unique_fd.h"

namespace dmapin::harness {

absl::StatusOr<uint64_t> VmLckBytes(pid_t pid) {
  const std::string path = absl::StrCat("/proc/", pid, "/status");
  std::ifstream status(path);
  if (!status) return ErrnoStatus(ESRCH, absl::StrCat("cannot read ", path));
  std::string line;
  while (std::getline(status, line)) {
    absl::string_view rest = line;
    if (!absl::ConsumePrefix(&rest, "VmLck:")) continue;
    rest = absl::StripAsciiWhitespace(rest);
    uint64_t kib = 0;
    if (!absl::ConsumeSuffix(&rest, "kB") ||
        !absl::SimpleAtoi(absl::StripAsciiWhitespace(rest), &kib)) {
      return ErrnoStatus(EIO, absl::StrCat("bad VmLck line in ", path));
    }
    return kib * 1024;
  }
  return ErrnoStatus(ENOENT, absl::StrCat("no VmLck line in ", path));
}

absl::StatusOr<uint64_t> PageFrame(pid_t pid, uint64_t ua) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const std::string path = absl::StrCat("/proc/", pid, "/pagemap");
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(errno, absl::StrCat("open ", path));
  uint64_t entry = 0;
  const off_t at = static_cast<off_t>(ua / page * sizeof(entry));
  if (pread(fd.get(), &entry, sizeof(entry), at) != sizeof(entry)) {
    return ErrnoStatus(errno, absl::StrCat("pread ", path));
  }
  const bool present = (entry >> 63) & 1;
  return present ? entry & ((uint64_t{1} << 55) - 1) : 0;
}

}  // namespace dmapin::harness
