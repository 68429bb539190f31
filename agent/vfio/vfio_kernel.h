// VfioKernel: the thin seam between the VFIO drivers and the kernel's open/close/ioctl.
//
// The drivers never call the syscalls directly, so unit tests can run them against a scripted fake
// kernel (fake_vfio_kernel.h) on machines without /dev/vfio, and every failure path is reachable.
// All methods return a negative errno on failure and never touch the thread's errno.
#ifndef DMAPIN_AGENT_VFIO_VFIO_KERNEL_H_
#define DMAPIN_AGENT_VFIO_VFIO_KERNEL_H_

#include <cstdint>

namespace dmapin::agent {

class VfioKernel {
 public:
  virtual ~VfioKernel() = default;

  // open(2): a file descriptor >= 0, or -errno.
  virtual int Open(const char* path, int flags) = 0;
  // close(2): 0, or -errno.
  virtual int Close(int fd) = 0;
  // fcntl(fd, F_DUPFD_CLOEXEC): another descriptor of the same open file (a container handed to
  // a VMM stays one container), or -errno.
  virtual int Dup(int fd) = 0;
  // ioctl(2): the kernel's non-negative result, or -errno. VFIO ioctls that take an integer
  // (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU) receive it as the pointer value: see IoctlIntArg().
  virtual int Ioctl(int fd, unsigned long request, void* arg) = 0;  // NOLINT(runtime/int)
};

// The argument of an ioctl that takes an integer by value (the kernel reads `arg` as unsigned
// long).
inline void* IoctlIntArg(uint64_t value) {
  return reinterpret_cast<void*>(static_cast<uintptr_t>(value));
}

// The integer an IoctlIntArg() carries, for fake kernels.
inline uint64_t IoctlIntValue(const void* arg) {
  return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(arg));
}

// The real syscalls. Stateless; one instance can serve every driver.
class RealVfioKernel final : public VfioKernel {
 public:
  int Open(const char* path, int flags) override;
  int Close(int fd) override;
  int Dup(int fd) override;
  int Ioctl(int fd, unsigned long request, void* arg) override;  // NOLINT(runtime/int)
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_VFIO_VFIO_KERNEL_H_
