// Small helpers for the binaries' listening addresses.
#ifndef DMAPIN_COMMON_NET_H_
#define DMAPIN_COMMON_NET_H_

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace dmapin {

// "host:port" with the port replaced (e.g. the one the kernel picked for port 0).
inline std::string WithPort(absl::string_view host_port, int port) {
  const size_t colon = host_port.rfind(':');
  return absl::StrCat(colon == absl::string_view::npos ? host_port : host_port.substr(0, colon),
                      ":", port);
}

}  // namespace dmapin

#endif  // DMAPIN_COMMON_NET_H_
