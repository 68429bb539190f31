#include "common/logging.h"

#include "absl/base/call_once.h"

namespace dmapin {

void InitLogging(const char* argv0) {
  static absl::once_flag once;
  absl::call_once(once, [argv0] {
    FLAGS_logtostderr = true;
    google::InitGoogleLogging(argv0);
  });
}

}  // namespace dmapin
