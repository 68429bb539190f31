// A child process standing in for a VMM in tests: it keeps guest RAM in a memfd it maps shared
// (as QEMU's memory-backend-memfd,share=on does), fills page i with the byte i, and waits to be
// killed. Also the other kinds of memory a VMM might offer (private anonymous, which cannot be
// shared). Test-only.
#ifndef DMAPIN_TESTING_FAKE_VMM_H_
#define DMAPIN_TESTING_FAKE_VMM_H_

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace dmapin::harness {

class FakeVmm {
 public:
  enum class Memory { kSharedMemfd, kPrivateAnonymous };

  // Forks the VMM with `pages` pages of guest RAM; returns once its memory is mapped and filled.
  static absl::StatusOr<FakeVmm> Start(uint64_t pages, Memory memory = Memory::kSharedMemfd);
  FakeVmm(FakeVmm&& other) noexcept;
  FakeVmm& operator=(FakeVmm&&) = delete;
  ~FakeVmm();  // kills and reaps it if it still runs

  pid_t pid() const { return pid_; }
  uint64_t ua() const { return ua_; }  // the VMM's address of its guest RAM
  uint64_t bytes() const { return bytes_; }
  // Kills it (SIGKILL) and reaps it.
  void Kill();
  // Reads `size` bytes of the VMM's memory at its address `ua` (/proc/<pid>/mem).
  absl::StatusOr<std::string> Read(uint64_t ua, size_t size) const;
  // The host physical address of the VMM's page at `ua` (/proc/<pid>/pagemap; 0 when the
  // page is not present or the kernel hides frame numbers).
  absl::StatusOr<uint64_t> Hpa(uint64_t ua) const;

 private:
  FakeVmm(pid_t pid, uint64_t ua, uint64_t bytes) : pid_(pid), ua_(ua), bytes_(bytes) {}
  pid_t pid_ = -1;
  uint64_t ua_ = 0;
  uint64_t bytes_ = 0;
};

}  // namespace dmapin::harness

#endif  // DMAPIN_TESTING_FAKE_VMM_H_
