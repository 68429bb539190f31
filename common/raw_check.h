// DMAPIN_RAW_CHECK(condition, message): when `condition` is false, writes
// "[file:line] RAW: Check <condition> failed: <message>" to stderr and aborts. For invariants of
// code that must not allocate or lock (the registry's lock-free paths, its epochs): it uses
// write(2) only. Header-only and without glog, so the registry sources also build where only
// Abseil is linked (the statically linked guest program of tests/qemu_vfio). Everything else logs
// with common/logging.h.
#ifndef DMAPIN_COMMON_RAW_CHECK_H_
#define DMAPIN_COMMON_RAW_CHECK_H_

#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "absl/base/attributes.h"
#include "absl/base/optimization.h"

#define DMAPIN_RAW_CHECK(condition, message)                                         \
  do {                                                                               \
    if (ABSL_PREDICT_FALSE(!(condition))) {                                          \
      ::dmapin::raw_check_internal::Fail(__FILE__, __LINE__, #condition, (message)); \
    }                                                                                \
  } while (0)

namespace dmapin {
namespace raw_check_internal {

inline void Write(const char* text) {
  size_t left = std::strlen(text);
  while (left > 0) {
    const ssize_t n = ::write(STDERR_FILENO, text, left);
    if (n <= 0) return;  // nothing more can be done on the way to abort()
    text += n;
    left -= static_cast<size_t>(n);
  }
}

[[noreturn]] ABSL_ATTRIBUTE_NOINLINE inline void Fail(const char* file, int line,
                                                      const char* condition, const char* message) {
  const char* slash = std::strrchr(file, '/');
  char digits[16];
  char* at = digits + sizeof(digits);
  *--at = '\0';
  unsigned value = line > 0 ? static_cast<unsigned>(line) : 0;
  do {
    *--at = static_cast<char>('0' + value % 10);
    value /= 10;
  } while (value != 0 && at > digits);
  Write("[");
  Write(slash != nullptr ? slash + 1 : file);
  Write(":");
  Write(at);
  Write("] RAW: Check ");
  Write(condition);
  Write(" failed: ");
  Write(message);
  Write("\n");
  std::abort();
}

}  // namespace raw_check_internal
}  // namespace dmapin

#endif  // DMAPIN_COMMON_RAW_CHECK_H_
