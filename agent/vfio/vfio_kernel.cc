#include "agent/vfio/vfio_kernel.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>

namespace dmapin::agent {

int RealVfioKernel::Open(const char* path, int flags) {
  int fd;
  do {
    fd = ::open(path, flags);
  } while (fd < 0 && errno == EINTR);
  return fd >= 0 ? fd : -errno;
}

int RealVfioKernel::Close(int fd) {
  // Never retry close on EINTR: Linux has already released the descriptor.
  return ::close(fd) == 0 ? 0 : -errno;
}

int RealVfioKernel::Dup(int fd) {
  const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  return copy >= 0 ? copy : -errno;
}

int RealVfioKernel::Ioctl(int fd, unsigned long request, void* arg) {  // NOLINT(runtime/int)
  const int result = ::ioctl(fd, request, arg);
  return result >= 0 ? result : -errno;
}

}  // namespace dmapin::agent
