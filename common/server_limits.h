// What dmapin-agent and dmapin-server do alike to keep a gRPC server's resources bounded, each
// limit a flag (README, "Server limits"):
//
//  - connections: the binaries accept them themselves (ConnectionListener) and hand them to
//    gRPC, because gRPC 1.51 has no connection limit and its own listener stops for good the
//    first time accept() fails with EMFILE. At most --max_connections are open (by default the
//    fd limit, raised to its hard limit at start, less a reserve for the process's own files);
//    beyond that a new connection is closed at once, and EMFILE never stops the accept loop.
//  - idle and dead connections: closed after --connection_idle_timeout_ms without a call, and
//    by keepalive pings (--keepalive_time_ms, --keepalive_timeout_ms) when the peer vanished.
//  - requests: at most --max_receive_message_bytes each (responses are not limited: a large
//    listing is legitimate), at most --max_concurrent_streams calls per connection, and at most
//    --grpc_memory_quota_bytes buffered by gRPC altogether. gRPC 1.51 reads a request whole before
//    it checks its size, so the quota is what makes refusing an oversized one cheap: past it,
//    gRPC cancels streams instead of buffering on.
#ifndef DMAPIN_COMMON_SERVER_LIMITS_H_
#define DMAPIN_COMMON_SERVER_LIMITS_H_

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "grpcpp/grpcpp.h"

namespace dmapin {

struct ServerLimits {
  size_t max_connections = 0;  // 0: MaxConnectionsFor's default
  absl::Duration connection_idle_timeout = absl::Minutes(5);
  absl::Duration keepalive_time = absl::Minutes(1);
  absl::Duration keepalive_timeout = absl::Seconds(20);
  int max_receive_message_bytes = 4 << 20;
  int max_concurrent_streams = 1000;
  uint64_t grpc_memory_quota_bytes = 256ull << 20;
};

// The limits the command line sets (the flags of server_limits.cc).
ServerLimits ServerLimitsFromFlags();

// Raises RLIMIT_NOFILE's soft limit to its hard limit. Returns the soft limit now in force.
uint64_t RaiseFdLimit();

// The connection limit for a process allowed `fd_limit` descriptors: `requested` (0: as many as
// possible), never more than the fd limit less a reserve for the process's own files (a tenth,
// at least 64), so that accepting a connection never takes the last descriptor.
size_t MaxConnectionsFor(size_t requested, uint64_t fd_limit);

// The connection, keepalive, message-size and memory settings of `limits` on `builder`.
void ApplyServerLimits(const ServerLimits& limits, grpc::ServerBuilder& builder);

struct ListenerStats {
  uint64_t open = 0;          // connections handed to gRPC and not closed since
  uint64_t accepted = 0;      // handed to gRPC, in all
  uint64_t refused = 0;       // closed at once: max_connections were open
  uint64_t fd_exhausted = 0;  // closed at once: accept() failed for want of a descriptor
};

// The local process at the other end of a Unix-socket connection (SO_PEERCRED when it connected).
struct UnixPeer {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

// The descriptor of a connection handed to gRPC, from a call's peer string ("fd:<n>"), or -1.
int FdOfGrpcPeer(absl::string_view peer);

// Accepts connections on its own sockets and hands each to a grpc::Server that was built without
// listening ports (grpc::AddInsecureChannelFromFd). One thread.
class ConnectionListener {
 public:
  explicit ConnectionListener(size_t max_connections) : max_connections_(max_connections) {}
  ConnectionListener(const ConnectionListener&) = delete;
  ConnectionListener& operator=(const ConnectionListener&) = delete;
  ~ConnectionListener();

  // Binds and listens on "host:port" (port 0 picks a free one; 0.0.0.0, [::] or an empty host:
  // every address, IPv6 and IPv4) or "unix:/path". Returns the port (0 for a Unix socket).
  absl::StatusOr<int> Listen(const std::string& address);
  // Starts handing connections to `server`, which must outlive Stop().
  void Start(grpc::Server* server);
  // Stops accepting and closes the listening sockets; accepted connections stay with the server.
  void Stop();

  size_t max_connections() const { return max_connections_; }
  ListenerStats stats() const;
  // Who is at the other end of connection `fd` (FdOfGrpcPeer of a call's peer) when it is a
  // Unix-socket connection this listener handed to gRPC. Only meaningful during a call on that
  // connection: gRPC keeps a connection's descriptor open while any of its calls runs (the
  // streams hold the transport, which holds the endpoint), so the descriptor cannot have been
  // reused for another connection meanwhile.
  std::optional<UnixPeer> UnixPeerOf(int fd) const;

 private:
  struct Socket {
    int fd = -1;
    bool tcp = false;
  };
  void Loop();
  void AcceptFrom(const Socket& socket);
  // Forgets connections gRPC has closed (their descriptor is gone or is another file now).
  void SweepClosedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const size_t max_connections_;
  std::vector<Socket> sockets_;
  grpc::Server* server_ = nullptr;
  int wake_fd_ = -1;   // eventfd: Stop() wakes the loop
  int spare_fd_ = -1;  // given up on EMFILE to accept and close the connection that hit it
  std::thread thread_;

  mutable Mutex mu_;
  // Descriptor -> inode of each connection handed to gRPC: the kernel reusing a descriptor, or a
  // different inode behind it, means gRPC closed that connection.
  // mutable: stats() sweeps too.
  struct Connection {
    uint64_t inode = 0;
    std::optional<UnixPeer> peer;  // Unix-socket connections
  };
  mutable std::map<int, Connection> open_ ABSL_GUARDED_BY(mu_);
  mutable absl::Time last_sweep_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> refused_{0};
  std::atomic<uint64_t> fd_exhausted_{0};
};

}  // namespace dmapin

#endif  // DMAPIN_COMMON_SERVER_LIMITS_H_
