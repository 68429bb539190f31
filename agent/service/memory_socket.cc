#include "agent/service/memory_socket.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

// How long accepting pauses when the process is out of descriptors (the listening socket stays
// readable, so polling it would spin).
constexpr std::chrono::milliseconds kAcceptPause(100);

// At most this many connections are accepted per wake-up, so a flood of connects cannot starve
// the connections already open.
constexpr int kAcceptBurst = 64;

// A malformed record: the peer's mistake, which retrying cannot mend.
absl::Status Refusal(int err, absl::string_view reason) {
  return ErrnoStatus(err, absl::StatusCode::kInvalidArgument, reason);
}

// A failed call of Start.
absl::Status SystemError(int err, absl::string_view what, absl::string_view path) {
  absl::StatusCode code = StatusCodeForErrno(err);
  if (code == absl::StatusCode::kUnknown) code = absl::StatusCode::kInternal;
  return ErrnoStatus(err, code,
                     absl::StrCat("memory socket ", path, ": ", what, ": ", strerror(err)));
}

// Every descriptor of every SCM_RIGHTS message, owned at once so that none can leak.
std::vector<UniqueFd> TakeDescriptors(msghdr& msg) {
  std::vector<UniqueFd> fds;
  for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg != nullptr; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
    if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* data = CMSG_DATA(cmsg);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, data + i * sizeof(int), sizeof(fd));  // CMSG_DATA may be unaligned
      fds.emplace_back(fd);
    }
  }
  return fds;
}

// Whether the peer has hung up: recvmsg returns 0 both for an empty record and at the end.
bool PeerHungUp(int fd) {
  pollfd pfd{fd, POLLRDHUP, 0};
  const int ready = ::poll(&pfd, 1, 0);
  return ready < 0 || (ready == 1 && (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0);
}

// One kind of request per record, with the descriptors it takes. Slot i must name one of the
// record's descriptors, and every descriptor must be named: an unnamed one is a client's
// off-by-one more often than not.
absl::Status CheckDescriptors(const v1::MemorySocketRequest& request, size_t count) {
  const bool attach = !request.context().empty() || request.slots_size() > 0;
  if (attach + request.has_open_devices() + request.has_adopt_container() != 1) {
    return Refusal(EINVAL,
                   "one request per record: an attach (context, slots), open_devices or "
                   "adopt_container");
  }
  if (request.has_open_devices() && count != 0) {
    return Refusal(EINVAL,
                   absl::StrCat("open_devices takes no descriptor; the record has ", count));
  }
  if (request.has_adopt_container() && count != 1) {
    return ErrnoStatus(EBADF, absl::StatusCode::kInvalidArgument,
                       absl::StrCat("adopt_container takes exactly one descriptor (the "
                                    "container's); the record has ",
                                    count));
  }
  if (!attach) return absl::OkStatus();
  std::vector<bool> named(count, false);
  for (int i = 0; i < request.slots_size(); ++i) {
    const uint32_t index = request.slots(i).fd_index();
    if (index >= count) {
      return ErrnoStatus(EBADF, absl::StatusCode::kInvalidArgument,
                         absl::StrCat("slot ", i, ": fd_index ", index, " but the record has ",
                                      count, " descriptor(s)"));
    }
    named[index] = true;
  }
  for (size_t i = 0; i < count; ++i) {
    if (!named[i]) {
      return Refusal(
          EINVAL, absl::StrCat("descriptor ", i, " of ", count, " is named by no slot's fd_index"));
    }
  }
  return absl::OkStatus();
}

// Sends `reply` with `fds` without blocking the loop; false when the connection is to be dropped
// (the peer does not read its replies, or is gone).
bool SendReply(int fd, v1::MemorySocketReply reply, const std::vector<UniqueFd>& fds) {
  // Never an empty record, which the peer could not tell from the end of the connection.
  if (reply.code() == 0) reply.mutable_context();
  reply.set_descriptors(static_cast<uint32_t>(fds.size()));
  std::string bytes = reply.SerializeAsString();
  alignas(cmsghdr) char control[CMSG_SPACE(MemorySocketServer::kMaxFds * sizeof(int))];
  for (;;) {
    iovec iov{bytes.data(), bytes.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (!fds.empty()) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(fds.size() * sizeof(int));
      cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
      cmsg->cmsg_level = SOL_SOCKET;
      cmsg->cmsg_type = SCM_RIGHTS;
      cmsg->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
      for (size_t i = 0; i < fds.size(); ++i) {
        const int one = fds[i].get();
        std::memcpy(CMSG_DATA(cmsg) + i * sizeof(int), &one, sizeof(one));
      }
    }
    if (::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0) return true;
    if (errno == EINTR) continue;
    if (errno == EMSGSIZE && reply.code() == 0) {
      // Larger than the socket's send buffer can ever hold: say so instead.
      reply = ReplyFor(ErrnoStatus(
          EMSGSIZE, absl::StatusCode::kResourceExhausted,
          absl::StrCat("reply of ", bytes.size(), " bytes is too large for the memory socket")));
      return SendReply(fd, std::move(reply), {});
    }
    return false;
  }
}

}  // namespace

struct MemorySocketServer::Connection {
  UniqueFd fd;
  PeerCredentials peer;
};

v1::MemorySocketReply ReplyFor(const absl::Status& status) {
  v1::MemorySocketReply reply;
  if (status.ok()) return reply;
  reply.set_code(static_cast<int>(status.code()));
  // The payload's name as it is: ErrnoOf would turn the names errno_status does not know (E2BIG,
  // EMSGSIZE) into EIO.
  absl::optional<absl::Cord> payload = status.GetPayload(kErrnoPayloadUrl);
  std::string name =
      payload.has_value() && !payload->empty() ? std::string(*payload) : ErrnoName(ErrnoOf(status));
  if (absl::StartsWith(status.message(), absl::StrCat(name, ":"))) {
    reply.set_message(std::string(status.message()));
  } else {
    reply.set_message(absl::StrCat(name, ": ", status.message()));
  }
  reply.set_errno_name(std::move(name));
  return reply;
}

absl::StatusOr<std::unique_ptr<MemorySocketServer>> MemorySocketServer::Start(
    const std::string& path, Handler handler) {
  if (!handler) return ErrnoStatus(EINVAL, "memory socket: no handler");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return ErrnoStatus(EINVAL, absl::StrCat("memory socket path \"", path, "\": empty or over ",
                                            sizeof(addr.sun_path) - 1, " bytes"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  const auto* sa = reinterpret_cast<const sockaddr*>(&addr);

  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake.valid()) return SystemError(errno, "eventfd", path);
  // Non-blocking so that accept4 never waits when a connecting peer is already gone.
  UniqueFd listen_fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!listen_fd.valid()) return SystemError(errno, "socket", path);

  // A socket file left by an agent that died is replaced; a live server's or anything else at
  // the path is not ours to remove.
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return ErrnoStatus(EEXIST, absl::StrCat("memory socket ", path, ": exists, not a socket"));
    }
    UniqueFd probe(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!probe.valid()) return SystemError(errno, "socket", path);
    if (::connect(probe.get(), sa, sizeof(addr)) == 0 || errno == EAGAIN) {
      return SystemError(EADDRINUSE, "another server listens there", path);
    }
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return SystemError(errno, "unlink", path);
  } else if (errno != ENOENT) {
    return SystemError(errno, "lstat", path);
  }

  if (::bind(listen_fd.get(), sa, sizeof(addr)) != 0) return SystemError(errno, "bind", path);
  auto fail = [&path](absl::string_view what) {
    absl::Status status = SystemError(errno, what, path);
    ::unlink(path.c_str());
    return status;
  };
  // Before listen, while nobody can connect: no peer ever sees the umask's mode.
  if (::chmod(path.c_str(), 0660) != 0) return fail("chmod");
  if (::lstat(path.c_str(), &st) != 0) return fail("lstat");
  if (::listen(listen_fd.get(), SOMAXCONN) != 0) return fail("listen");

  std::unique_ptr<MemorySocketServer> server(
      new MemorySocketServer(path, std::move(listen_fd), std::move(handler)));
  server->wake_ = std::move(wake);
  server->socket_dev_ = st.st_dev;
  server->socket_ino_ = st.st_ino;
  server->thread_ = std::thread([s = server.get()] { s->Loop(); });
  return server;
}

MemorySocketServer::MemorySocketServer(std::string path, UniqueFd listen_fd, Handler handler)
    : path_(std::move(path)), listen_fd_(std::move(listen_fd)), handler_(std::move(handler)) {}

MemorySocketServer::~MemorySocketServer() {
  const uint64_t one = 1;
  // Cannot fail short of a bad descriptor: an eventfd counter takes 2^64-2 writes of 1.
  ssize_t written = ::write(wake_.get(), &one, sizeof(one));
  (void)written;
  if (thread_.joinable()) thread_.join();
  // Only our own file: a server started since at the same path keeps its socket. (A replacement
  // between lstat and unlink would still lose its file; servers of one path do not race so.)
  struct stat st;
  if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == socket_dev_ && st.st_ino == socket_ino_) {
    ::unlink(path_.c_str());
  }
}

MemorySocketStats MemorySocketServer::stats() const {
  MemorySocketStats stats;
  stats.connections = connections_.load(std::memory_order_relaxed);
  stats.open_connections = open_connections_.load(std::memory_order_relaxed);
  stats.requests = requests_.load(std::memory_order_relaxed);
  stats.bad_requests = bad_requests_.load(std::memory_order_relaxed);
  stats.refused_connections = refused_connections_.load(std::memory_order_relaxed);
  return stats;
}

void MemorySocketServer::Loop() {
  std::vector<Connection> connections;
  std::vector<pollfd> pfds;
  std::vector<char> record(kMaxRequestBytes + 1);  // one byte more: a longer record shows
  std::chrono::steady_clock::time_point resume_accept;
  for (;;) {
    const auto now = std::chrono::steady_clock::now();
    const bool accepting = now >= resume_accept;
    pfds.clear();
    pfds.push_back({wake_.get(), POLLIN, 0});
    // poll skips a negative descriptor: the listening socket while accepting is paused.
    pfds.push_back({accepting ? listen_fd_.get() : -1, POLLIN, 0});
    for (const Connection& connection : connections) {
      pfds.push_back({connection.fd.get(), POLLIN, 0});
    }
    int timeout_ms = -1;
    if (!accepting) {
      timeout_ms = static_cast<int>(
          std::chrono::ceil<std::chrono::milliseconds>(resume_accept - now).count());
    }
    if (::poll(pfds.data(), pfds.size(), timeout_ms) < 0) {
      if (errno != EINTR) ::usleep(10000);  // ENOMEM: wait rather than spin
      continue;
    }
    if (pfds[0].revents != 0) break;

    size_t dropped = 0;
    for (size_t i = 0; i < connections.size(); ++i) {
      const short revents = pfds[i + 2].revents;
      if (revents == 0) continue;
      // With POLLIN a pending record is served even when the peer has hung up since.
      const bool keep = (revents & POLLIN) != 0 && Serve(connections[i], record);
      if (!keep) {
        connections[i].fd.reset();
        ++dropped;
      }
    }
    if (dropped > 0) {
      connections.erase(std::remove_if(connections.begin(), connections.end(),
                                       [](const Connection& c) { return !c.fd.valid(); }),
                        connections.end());
      open_connections_.fetch_sub(dropped, std::memory_order_relaxed);
    }
    if ((pfds[1].revents & POLLIN) != 0) AcceptPending(&connections, &resume_accept);
  }
  open_connections_.store(0, std::memory_order_relaxed);
  // `connections` goes now and closes every connection.
}

void MemorySocketServer::AcceptPending(std::vector<Connection>* connections,
                                       std::chrono::steady_clock::time_point* resume) {
  for (int i = 0; i < kAcceptBurst; ++i) {
    UniqueFd fd(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!fd.valid()) {
      if (errno == EINTR) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        *resume = std::chrono::steady_clock::now() + kAcceptPause;
      }
      return;  // EAGAIN: nothing left
    }
    if (connections->size() >= kMaxConnections) {
      // Accepted only to be closed: the peer sees the end of the connection at once rather than
      // waiting in the backlog.
      refused_connections_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) continue;
    connections->push_back(
        Connection{std::move(fd), PeerCredentials{cred.pid, cred.uid, cred.gid}});
    connections_.fetch_add(1, std::memory_order_relaxed);
    open_connections_.fetch_add(1, std::memory_order_relaxed);
  }
}

bool MemorySocketServer::Serve(Connection& connection, std::vector<char>& record) {
  const int fd = connection.fd.get();
  alignas(cmsghdr) char control[CMSG_SPACE(kMaxFds * sizeof(int))];
  iovec iov{record.data(), record.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  // MSG_TRUNC: the record's real length, for the EMSGSIZE message (the rest is discarded).
  const ssize_t n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT | MSG_TRUNC);
  if (n < 0) return errno == EAGAIN || errno == EINTR;
  v1::MemorySocketReply reply;
  std::vector<UniqueFd> reply_fds;
  {
    std::vector<UniqueFd> fds = TakeDescriptors(msg);
    const size_t size = static_cast<size_t>(n);
    v1::MemorySocketRequest request;
    absl::Status refusal;
    if ((msg.msg_flags & MSG_CTRUNC) != 0) {
      // The kernel closed the descriptors past kMaxFds; those that arrived close with `fds`.
      refusal = Refusal(E2BIG, absl::StrCat("at most ", kMaxFds, " descriptors per message"));
    } else if ((msg.msg_flags & MSG_TRUNC) != 0 || size > kMaxRequestBytes) {
      refusal = Refusal(EMSGSIZE, absl::StrCat("record of ", size, " bytes; at most ",
                                               kMaxRequestBytes, " per message"));
    } else if (size == 0) {
      if (fds.empty() && PeerHungUp(fd)) return false;
      refusal =
          Refusal(EINVAL, "empty record; expected a serialized dmapin.v1.MemorySocketRequest");
    } else if (!request.ParseFromArray(record.data(), static_cast<int>(size))) {
      refusal =
          Refusal(EINVAL, absl::StrCat("record of ", size,
                                       " bytes is not a serialized dmapin.v1.MemorySocketRequest"));
    } else {
      refusal = CheckDescriptors(request, fds.size());
    }
    if (refusal.ok()) {
      reply = handler_(connection.peer, request, fds, &reply_fds);
      if (reply_fds.size() > kMaxFds) {
        reply_fds.clear();
        reply = ReplyFor(
            ErrnoStatus(E2BIG, absl::StrCat("a reply carries at most ", kMaxFds, " descriptors")));
      }
    } else {
      bad_requests_.fetch_add(1, std::memory_order_relaxed);
      reply = ReplyFor(refusal);
    }
    // `fds` close here, before the reply: a peer holding the reply knows the agent holds only
    // what the handler kept.
  }
  if (!SendReply(fd, std::move(reply), reply_fds)) return false;
  requests_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace dmapin::agent
