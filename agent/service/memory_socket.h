// The memory socket: the side channel next to the agent's gRPC socket through which a VMM hands
// the agent descriptors of its guest memory (gRPC cannot carry file descriptors). Modelled on
// vhost-user's SET_MEM_TABLE and vfio-user's DMA_MAP; the protocol is in api/README.md ("The
// memory socket"):
//
//  - a SOCK_SEQPACKET Unix socket (--memory_socket_path): every message is one record, so a
//    message arrives whole or not at all, with its descriptors;
//  - request: one record holding a serialized dmapin.v1.MemorySocketRequest (at most
//    kMaxRequestBytes): an attach (a serialized AttachMemoryRequest is one) with the slots'
//    descriptors as SCM_RIGHTS (at most kMaxFds; slot i uses descriptor slots[i].fd_index, and
//    every descriptor sent must be named by a slot), an open_devices without descriptors, or an
//    adopt_container with exactly one;
//  - reply: one record holding a serialized dmapin.v1.MemorySocketReply, never empty (an empty
//    record cannot be told from the end of the connection), with the descriptors the handler
//    gives (open_devices) as SCM_RIGHTS;
//  - the peer is identified by SO_PEERCRED (pid, uid, gid) when it connects.
// The server only frames: a Handler does the work. Every malformed record gets a reply with a
// clear error (EINVAL, EBADF, E2BIG, EMSGSIZE; code INVALID_ARGUMENT) and the connection stays
// usable; every descriptor received is closed once the handler returns and before the reply is
// sent, whatever happened. A peer that does not read its replies, or hangs up, is dropped.
#ifndef DMAPIN_AGENT_SERVICE_MEMORY_SOCKET_H_
#define DMAPIN_AGENT_SERVICE_MEMORY_SOCKET_H_

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/unique_fd.h"
#include "dmapin/v1/agent.pb.h"

namespace dmapin::agent {

struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

struct MemorySocketStats {
  uint64_t connections = 0;          // accepted and served, in all
  uint64_t open_connections = 0;     // now
  uint64_t requests = 0;             // records answered (the reply was sent)
  uint64_t bad_requests = 0;         // records refused before the handler (framing, descriptors)
  uint64_t refused_connections = 0;  // over kMaxConnections: accepted and closed at once
};

class MemorySocketServer {
 public:
  // What to do with one well-formed request: exactly one kind, with the descriptors it takes
  // (every slot's fd_index names one of `fds`; the server refused the record otherwise). `fds`
  // are the record's descriptors in order; the server closes what is left of them after the
  // handler returns (the handler takes, dups or maps what it keeps). The descriptors in
  // `*reply_fds` go with the reply, and are closed once sent.
  using Handler = std::function<v1::MemorySocketReply(
      const PeerCredentials& peer, const v1::MemorySocketRequest& request,
      std::vector<UniqueFd>& fds, std::vector<UniqueFd>* reply_fds)>;

  static constexpr size_t kMaxRequestBytes = 64 << 10;
  static constexpr size_t kMaxFds = 64;
  static constexpr size_t kMaxConnections = 256;

  // Binds and listens on `path` (mode 0660 unless the caller changes it) and serves on one
  // thread, which also runs the handler. A stale socket file at `path` (nobody listening) is
  // replaced; a live one is EADDRINUSE and anything else there EEXIST.
  static absl::StatusOr<std::unique_ptr<MemorySocketServer>> Start(const std::string& path,
                                                                   Handler handler);
  // Stops, closes every connection, removes the socket file (unless another server has replaced
  // it since).
  ~MemorySocketServer();

  MemorySocketStats stats() const;

 private:
  struct Connection;  // only the loop thread has any

  MemorySocketServer(std::string path, UniqueFd listen_fd, Handler handler);
  void Loop();
  // Accepts what is pending; on running out of descriptors, pauses accepting until `*resume`.
  void AcceptPending(std::vector<Connection>* connections,
                     std::chrono::steady_clock::time_point* resume);
  // Reads and answers one record; false when the connection is to be dropped.
  bool Serve(Connection& connection, std::vector<char>& record);

  // Constant after construction.
  const std::string path_;
  const UniqueFd listen_fd_;
  const Handler handler_;
  // Set by Start before the thread starts.
  UniqueFd wake_;         // eventfd for the destructor
  dev_t socket_dev_ = 0;  // the socket file bound, so the destructor removes only its own
  ino_t socket_ino_ = 0;
  std::thread thread_;

  std::atomic<uint64_t> connections_{0};
  std::atomic<uint64_t> open_connections_{0};
  std::atomic<uint64_t> requests_{0};
  std::atomic<uint64_t> bad_requests_{0};
  std::atomic<uint64_t> refused_connections_{0};
};

// The reply a handler gives for `status`: code as a number, the errno name of its payload (EIO when
// it has none), the message, prefixed with the errno name when it does not start with it. OK is
// code 0 and nothing else.
v1::MemorySocketReply ReplyFor(const absl::Status& status);

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_SERVICE_MEMORY_SOCKET_H_
