#include "common/server_limits.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "grpcpp/resource_quota.h"
#include "grpcpp/server_posix.h"

ABSL_FLAG(uint64_t, max_connections, 0,
          "Most gRPC connections open at once; a connection beyond it is closed at once. 0: the "
          "file descriptor limit (raised to its hard limit at start) less a reserve of a tenth "
          "(at least 64) for the process's own files; a larger value is lowered to that.");
ABSL_FLAG(uint32_t, connection_idle_timeout_ms, 300000,
          "A gRPC connection without a call for this long is closed (GOAWAY); clients reconnect "
          "by themselves.");
ABSL_FLAG(uint32_t, keepalive_time_ms, 60000,
          "Ping each gRPC connection after this long without traffic, so that a vanished peer "
          "(its connection half-open) is found and closed.");
ABSL_FLAG(uint32_t, keepalive_timeout_ms, 20000,
          "Close a gRPC connection whose keepalive ping is unanswered this long.");
ABSL_FLAG(uint32_t, max_receive_message_bytes, 4 << 20,
          "Largest gRPC request message accepted; a larger one is refused with "
          "RESOURCE_EXHAUSTED. Responses are not limited.");
ABSL_FLAG(uint32_t, max_concurrent_streams, 1000,
          "Most calls in flight on one gRPC connection (HTTP/2 streams); more wait on the "
          "client.");
ABSL_FLAG(uint64_t, grpc_memory_quota_bytes, 256ull << 20,
          "Memory gRPC may use for its buffers (reads, calls) altogether. Past it gRPC closes "
          "idle connections and cancels streams instead of buffering on: this bounds what "
          "oversized or unread requests cost.");

namespace dmapin {
namespace {

int Millis(absl::Duration duration) {
  return static_cast<int>(
      std::min<int64_t>(absl::ToInt64Milliseconds(duration), std::numeric_limits<int>::max()));
}

absl::Status ErrnoError(absl::string_view what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

int InodeOf(int fd, uint64_t* inode) {
  struct stat st = {};
  if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return -1;
  *inode = st.st_ino;
  return 0;
}

}  // namespace

ServerLimits ServerLimitsFromFlags() {
  ServerLimits limits;
  limits.max_connections = absl::GetFlag(FLAGS_max_connections);
  limits.connection_idle_timeout =
      absl::Milliseconds(absl::GetFlag(FLAGS_connection_idle_timeout_ms));
  limits.keepalive_time = absl::Milliseconds(absl::GetFlag(FLAGS_keepalive_time_ms));
  limits.keepalive_timeout = absl::Milliseconds(absl::GetFlag(FLAGS_keepalive_timeout_ms));
  limits.max_receive_message_bytes = static_cast<int>(std::min<uint32_t>(
      absl::GetFlag(FLAGS_max_receive_message_bytes), std::numeric_limits<int>::max()));
  limits.max_concurrent_streams = static_cast<int>(std::min<uint32_t>(
      absl::GetFlag(FLAGS_max_concurrent_streams), std::numeric_limits<int>::max()));
  limits.grpc_memory_quota_bytes = absl::GetFlag(FLAGS_grpc_memory_quota_bytes);
  return limits;
}

uint64_t RaiseFdLimit() {
  rlimit limit = {};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return 0;
  if (limit.rlim_cur < limit.rlim_max) {
    rlimit raised = {limit.rlim_max, limit.rlim_max};
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
  }
  return limit.rlim_cur == RLIM_INFINITY ? std::numeric_limits<uint64_t>::max() : limit.rlim_cur;
}

size_t MaxConnectionsFor(size_t requested, uint64_t fd_limit) {
  const uint64_t reserve = std::max<uint64_t>(64, fd_limit / 10);
  const uint64_t most = fd_limit > reserve ? fd_limit - reserve : 1;
  const uint64_t chosen = requested == 0 ? most : std::min<uint64_t>(requested, most);
  return static_cast<size_t>(std::min<uint64_t>(chosen, std::numeric_limits<size_t>::max()));
}

void ApplyServerLimits(const ServerLimits& limits, grpc::ServerBuilder& builder) {
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                             Millis(limits.connection_idle_timeout));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, Millis(limits.keepalive_time));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, Millis(limits.keepalive_timeout));
  // Keepalive pings go on even when no data flows (an idle WatchEvents or control stream).
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // Agents ping every 30 s on a stream the server rarely writes to; accept that instead of
  // answering with GOAWAY (too_many_pings), and pings on connections without calls too.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams);
  builder.SetMaxReceiveMessageSize(limits.max_receive_message_bytes);
  grpc::ResourceQuota quota("dmapin-server-limits");
  quota.Resize(static_cast<size_t>(limits.grpc_memory_quota_bytes));
  builder.SetResourceQuota(quota);  // the builder keeps its own reference
}

// --- ConnectionListener -----------------------------------------------------------------------

ConnectionListener::~ConnectionListener() {
  Stop();
  for (const Socket& socket : sockets_) close(socket.fd);
  if (wake_fd_ >= 0) close(wake_fd_);
  if (spare_fd_ >= 0) close(spare_fd_);
}

absl::StatusOr<int> ConnectionListener::Listen(const std::string& address) {
  if (absl::StartsWith(address, "unix:")) {
    const std::string path(absl::StripPrefix(address, "unix:"));
    sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
      return absl::InvalidArgumentError(absl::StrCat(address, ": a Unix socket path needs 1-",
                                                     sizeof(addr.sun_path) - 1, " bytes"));
    }
    std::memcpy(addr.sun_path, path.data(), path.size());
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return ErrnoError(absl::StrCat(address, ": socket"));
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(fd, SOMAXCONN) != 0) {
      absl::Status status = ErrnoError(absl::StrCat(address, ": bind/listen"));
      close(fd);
      return status;
    }
    sockets_.push_back({fd, false});
    return 0;
  }

  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(address, ": expected host:port"));
  }
  std::string host = address.substr(0, colon);
  if (absl::StartsWith(host, "[") && absl::EndsWith(host, "]")) {
    host = host.substr(1, host.size() - 2);
  }
  // Like gRPC: a wildcard host listens on every address, IPv6 and IPv4 on one socket when the
  // machine has IPv6.
  std::vector<std::pair<sockaddr_storage, socklen_t>> addresses;
  if (host.empty() || host == "0.0.0.0" || host == "::") {
    sockaddr_storage any6 = {};
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&any6);
    in6->sin6_family = AF_INET6;
    in6->sin6_addr = in6addr_any;
    sockaddr_storage any4 = {};
    auto* in4 = reinterpret_cast<sockaddr_in*>(&any4);
    in4->sin_family = AF_INET;
    in4->sin_addr.s_addr = htonl(INADDR_ANY);
    addresses.push_back({any6, sizeof(sockaddr_in6)});
    addresses.push_back({any4, sizeof(sockaddr_in)});
  } else {
    addrinfo hints = {};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* found = nullptr;
    const int rc = getaddrinfo(host.c_str(), "0", &hints, &found);
    if (rc != 0) {
      return absl::InvalidArgumentError(absl::StrCat(address, ": ", gai_strerror(rc)));
    }
    for (addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
      sockaddr_storage storage = {};
      std::memcpy(&storage, ai->ai_addr, ai->ai_addrlen);
      addresses.push_back({storage, ai->ai_addrlen});
    }
    freeaddrinfo(found);
  }

  const bool wildcard = host.empty() || host == "0.0.0.0" || host == "::";
  absl::Status first_error;
  size_t bound = 0;
  for (auto& [storage, length] : addresses) {
    const int family = storage.ss_family;
    if (family == AF_INET6) {
      reinterpret_cast<sockaddr_in6*>(&storage)->sin6_port = htons(port);
    } else {
      reinterpret_cast<sockaddr_in*>(&storage)->sin_port = htons(port);
    }
    const int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
      if (first_error.ok()) first_error = ErrnoError(absl::StrCat(address, ": socket"));
      continue;
    }
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (family == AF_INET6) {
      // The IPv6 wildcard takes IPv4 too; specific addresses keep to their own family.
      const int v6only = wildcard ? 0 : 1;
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
    }
    if (bind(fd, reinterpret_cast<sockaddr*>(&storage), length) != 0 ||
        listen(fd, SOMAXCONN) != 0) {
      if (first_error.ok()) first_error = ErrnoError(absl::StrCat(address, ": bind/listen"));
      close(fd);
      continue;
    }
    if (port == 0) {  // the rest take the port the kernel picked for the first
      sockaddr_storage chosen = {};
      socklen_t chosen_length = sizeof(chosen);
      getsockname(fd, reinterpret_cast<sockaddr*>(&chosen), &chosen_length);
      port =
          ntohs(chosen.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&chosen)->sin6_port
                                             : reinterpret_cast<sockaddr_in*>(&chosen)->sin_port);
    }
    sockets_.push_back({fd, true});
    ++bound;
    // A dual-stack wildcard covers IPv4 as well.
    if (wildcard && family == AF_INET6) break;
  }
  if (bound == 0) {
    return first_error.ok() ? absl::InvalidArgumentError(absl::StrCat(address, ": no address"))
                            : first_error;
  }
  return port;
}

void ConnectionListener::Start(grpc::Server* server) {
  server_ = server;
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  spare_fd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
  thread_ = std::thread([this] { Loop(); });
}

void ConnectionListener::Stop() {
  if (!thread_.joinable()) return;
  const uint64_t one = 1;
  if (write(wake_fd_, &one, sizeof(one)) < 0) {
    // An eventfd write fails only on counter overflow: the loop is awake anyway.
  }
  thread_.join();
  for (const Socket& socket : sockets_) close(socket.fd);
  sockets_.clear();
}

ListenerStats ConnectionListener::stats() const {
  ListenerStats stats;
  {
    MutexLock lock(&mu_);
    SweepClosedLocked();
    stats.open = open_.size();
  }
  stats.accepted = accepted_.load(std::memory_order_relaxed);
  stats.refused = refused_.load(std::memory_order_relaxed);
  stats.fd_exhausted = fd_exhausted_.load(std::memory_order_relaxed);
  return stats;
}

int FdOfGrpcPeer(absl::string_view peer) {
  int fd = -1;
  if (!absl::ConsumePrefix(&peer, "fd:") || !absl::SimpleAtoi(peer, &fd) || fd < 0) return -1;
  return fd;
}

std::optional<UnixPeer> ConnectionListener::UnixPeerOf(int fd) const {
  if (fd < 0) return std::nullopt;
  // No fstat to check the inode: this is on every DMA call, and during a call its connection's
  // entry is the one written when it was accepted (a reused descriptor is rewritten at accept).
  MutexLock lock(&mu_);
  auto it = open_.find(fd);
  if (it == open_.end()) return std::nullopt;
  return it->second.peer;
}

void ConnectionListener::SweepClosedLocked() const {
  for (auto it = open_.begin(); it != open_.end();) {
    uint64_t inode = 0;
    if (InodeOf(it->first, &inode) != 0 || inode != it->second.inode) {
      it = open_.erase(it);
    } else {
      ++it;
    }
  }
  last_sweep_ = absl::Now();
}

void ConnectionListener::Loop() {
  std::vector<pollfd> polled;
  polled.push_back({wake_fd_, POLLIN, 0});
  for (const Socket& socket : sockets_) polled.push_back({socket.fd, POLLIN, 0});
  for (;;) {
    // Without a spare descriptor (the system ran out) EMFILE cannot be cleared: retry shortly.
    const int timeout_ms = spare_fd_ < 0 ? 100 : -1;
    const int ready = poll(polled.data(), polled.size(), timeout_ms);
    if (ready < 0 && errno != EINTR) return;
    if (polled[0].revents != 0) return;  // Stop()
    if (spare_fd_ < 0) spare_fd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
    for (size_t i = 1; i < polled.size(); ++i) {
      if (polled[i].revents != 0 || ready == 0) AcceptFrom(sockets_[i - 1]);
    }
  }
}

void ConnectionListener::AcceptFrom(const Socket& socket) {
  for (;;) {
    const int fd = accept4(socket.fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      switch (errno) {
        case EINTR:
        case ECONNABORTED:
        case EPROTO:
          continue;
        case EMFILE:
        case ENFILE:
        case ENOBUFS:
        case ENOMEM:
          // Out of descriptors: take the waiting connection with the spare one and close it, so
          // the backlog drains and the loop does not spin; serving resumes as descriptors free.
          fd_exhausted_.fetch_add(1, std::memory_order_relaxed);
          if (spare_fd_ >= 0) {
            close(spare_fd_);
            const int dropped = accept4(socket.fd, nullptr, nullptr, SOCK_CLOEXEC);
            if (dropped >= 0) close(dropped);
            spare_fd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
          }
          return;
        default:  // EAGAIN: nothing more waiting
          return;
      }
    }
    uint64_t inode = 0;
    bool admit = InodeOf(fd, &inode) == 0;
    if (admit) {
      MutexLock lock(&mu_);
      // Sweeping is O(connections): at the limit, at most every 50 ms.
      if (open_.size() >= max_connections_ && absl::Now() - last_sweep_ > absl::Milliseconds(50)) {
        SweepClosedLocked();
      }
      // A descriptor the kernel hands out again was closed by gRPC: not open any more.
      open_.erase(fd);
      admit = open_.size() < max_connections_;
      if (admit) {
        Connection& connection = open_[fd];
        connection.inode = inode;
        if (!socket.tcp) {
          ucred cred{};
          socklen_t length = sizeof(cred);
          if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &length) == 0) {
            connection.peer = UnixPeer{.pid = cred.pid, .uid = cred.uid, .gid = cred.gid};
          }
        }
      }
    }
    if (!admit) {
      refused_.fetch_add(1, std::memory_order_relaxed);
      close(fd);
      continue;
    }
    if (socket.tcp) {
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    accepted_.fetch_add(1, std::memory_order_relaxed);
    grpc::AddInsecureChannelFromFd(server_, fd);
  }
}

}  // namespace dmapin
