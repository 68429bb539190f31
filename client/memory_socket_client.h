// The VMM's end of the agent's memory socket (agent/service/memory_socket.h, api/README.md "The
// memory socket"): sends an AttachMemoryRequest with its descriptors, returns the reply as a
// Status. One call at a time per client (replies are matched to requests by their order).
#ifndef DMAPIN_CLIENT_MEMORY_SOCKET_CLIENT_H_
#define DMAPIN_CLIENT_MEMORY_SOCKET_CLIENT_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/unique_fd.h"
#include "dmapin/v1/agent.pb.h"

namespace dmapin::client {

class MemorySocketClient {
 public:
  // Connects to the agent's memory socket at `path`.
  static absl::StatusOr<std::unique_ptr<MemorySocketClient>> Connect(const std::string& path);

  // Sends `request` with `fds` (slot i names fds[request.slots(i).fd_index]) and waits for the
  // reply. The agent's refusal comes back as its status (code and "EINVAL: ..." message, errno
  // name as payload as common/errno_status, kept as sent even for names errno_status does not
  // know, such as E2BIG); a broken connection is UNAVAILABLE; the kernel's refusal to send (more
  // than 253 descriptors: EINVAL) is INVALID_ARGUMENT.
  absl::StatusOr<v1::Context> Attach(const v1::AttachMemoryRequest& request,
                                     absl::Span<const int> fds);

  // The device handoff: the container's devices and a duplicate of the container's descriptor
  // (descriptor 0 of the result; i + 1 is request.devices(i)); `*container` the container.
  absl::StatusOr<std::vector<UniqueFd>> OpenDevices(const v1::OpenDevicesRequest& request,
                                                    v1::Container* container);
  // After the agent restarted: gives it `container_fd` (a descriptor OpenDevices handed out; it
  // stays the caller's) back for `container`. The reply says what the agent found.
  absl::StatusOr<v1::MemorySocketReply> AdoptContainer(const std::string& container,
                                                       int container_fd);

  // Sends raw bytes and descriptors as one record and returns the reply, whatever its code
  // (tests of bad input); the descriptors that came with it go to `received` (closed when null).
  absl::StatusOr<v1::MemorySocketReply> SendRaw(const std::string& bytes, absl::Span<const int> fds,
                                                std::vector<UniqueFd>* received = nullptr);

  int fd() const { return fd_.get(); }

 private:
  explicit MemorySocketClient(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

}  // namespace dmapin::client

#endif  // DMAPIN_CLIENT_MEMORY_SOCKET_CLIENT_H_
