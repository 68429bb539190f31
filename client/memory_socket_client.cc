#include "client/memory_socket_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "common/errno_status.h"

namespace dmapin::client {
namespace {

// Bounds the reply's record: a Context of 512 slots is some 50 KiB.
constexpr size_t kMaxReplyBytes = 1 << 20;
// The agent sends at most this many descriptors with a reply (a container and 16 devices).
constexpr size_t kMaxReplyFds = 64;

bool BrokenConnection(int err) {
  return err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ECONNREFUSED;
}

// The agent's refusal as a status: its code, message and errno name (payload) as they came.
absl::Status StatusOfReply(const v1::MemorySocketReply& reply) {
  absl::StatusCode code = static_cast<absl::StatusCode>(reply.code());
  if (reply.code() < 1 || reply.code() > 16) code = absl::StatusCode::kUnknown;
  absl::Status status(code, reply.message());
  if (!reply.errno_name().empty()) {
    status.SetPayload(kErrnoPayloadUrl, absl::Cord(reply.errno_name()));
  }
  return status;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MemorySocketClient>> MemorySocketClient::Connect(
    const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return ErrnoStatus(EINVAL, absl::StrCat("memory socket path \"", path, "\": empty or over ",
                                            sizeof(addr.sun_path) - 1, " bytes"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    const int err = errno;
    return ErrnoStatus(err, absl::StatusCode::kUnavailable,
                       absl::StrCat("socket for memory socket ", path, ": ", strerror(err)));
  }
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    return ErrnoStatus(err, absl::StatusCode::kUnavailable,
                       absl::StrCat("connect to memory socket ", path, ": ", strerror(err)));
  }
  return std::unique_ptr<MemorySocketClient>(new MemorySocketClient(std::move(fd)));
}

absl::StatusOr<v1::Context> MemorySocketClient::Attach(const v1::AttachMemoryRequest& request,
                                                       absl::Span<const int> fds) {
  // A serialized AttachMemoryRequest is an attach MemorySocketRequest (the same fields).
  std::string bytes;
  if (!request.SerializeToString(&bytes)) {
    return ErrnoStatus(EINVAL, "AttachMemoryRequest does not serialize");
  }
  absl::StatusOr<v1::MemorySocketReply> reply = SendRaw(bytes, fds);
  if (!reply.ok()) return reply.status();
  if (reply->code() != 0) return StatusOfReply(*reply);
  return std::move(*reply->mutable_context());
}

absl::StatusOr<std::vector<UniqueFd>> MemorySocketClient::OpenDevices(
    const v1::OpenDevicesRequest& request, v1::Container* container) {
  v1::MemorySocketRequest envelope;
  *envelope.mutable_open_devices() = request;
  std::vector<UniqueFd> fds;
  absl::StatusOr<v1::MemorySocketReply> reply = SendRaw(envelope.SerializeAsString(), {}, &fds);
  if (!reply.ok()) return reply.status();
  if (reply->code() != 0) return StatusOfReply(*reply);
  if (fds.size() != static_cast<size_t>(request.devices_size()) + 1 ||
      reply->descriptors() != fds.size()) {
    return ErrnoStatus(
        EIO, absl::StatusCode::kInternal,
        absl::StrCat("the agent's device handoff carried ", fds.size(), " descriptor(s) (it says ",
                     reply->descriptors(), "); ", request.devices_size() + 1, " expected"));
  }
  if (container != nullptr) *container = std::move(*reply->mutable_container());
  return fds;
}

absl::StatusOr<v1::MemorySocketReply> MemorySocketClient::AdoptContainer(
    const std::string& container, int container_fd) {
  v1::MemorySocketRequest envelope;
  envelope.mutable_adopt_container()->set_container(container);
  const int fds[] = {container_fd};
  absl::StatusOr<v1::MemorySocketReply> reply = SendRaw(envelope.SerializeAsString(), fds);
  if (!reply.ok()) return reply.status();
  if (reply->code() != 0) return StatusOfReply(*reply);
  return reply;
}

absl::StatusOr<v1::MemorySocketReply> MemorySocketClient::SendRaw(const std::string& bytes,
                                                                  absl::Span<const int> fds,
                                                                  std::vector<UniqueFd>* received) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  // operator new's alignment suffices for cmsghdr.
  std::vector<char> control;
  if (!fds.empty()) {
    control.resize(CMSG_SPACE(fds.size() * sizeof(int)));
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), fds.data(), fds.size() * sizeof(int));
  }
  ssize_t sent;
  do {
    sent = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) {
    const int err = errno;
    std::string what = absl::StrCat("sendmsg of ", bytes.size(), " bytes and ", fds.size(),
                                    " descriptor(s) to the memory socket: ", strerror(err));
    if (BrokenConnection(err)) {
      return ErrnoStatus(err, absl::StatusCode::kUnavailable, what);
    }
    // The kernel's own limits (EINVAL: more than SCM_MAX_FD, 253, descriptors; EMSGSIZE: over
    // the send buffer; EBADF: not a descriptor) are the caller's mistakes; the rest is the
    // node's resources.
    const bool invalid = err == EINVAL || err == EMSGSIZE || err == EBADF;
    return ErrnoStatus(
        err, invalid ? absl::StatusCode::kInvalidArgument : absl::StatusCode::kResourceExhausted,
        what);
  }

  std::string buffer(kMaxReplyBytes, '\0');
  alignas(cmsghdr) char reply_control[CMSG_SPACE(kMaxReplyFds * sizeof(int))];
  ssize_t n;
  msghdr reply_msg{};
  do {
    iovec reply_iov{buffer.data(), buffer.size()};
    reply_msg = msghdr{};
    reply_msg.msg_iov = &reply_iov;
    reply_msg.msg_iovlen = 1;
    reply_msg.msg_control = reply_control;
    reply_msg.msg_controllen = sizeof(reply_control);
    // MSG_TRUNC: the record's real length, to tell an oversized reply.
    n = ::recvmsg(fd_.get(), &reply_msg, MSG_TRUNC | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) {
    std::vector<UniqueFd> came;
    for (cmsghdr* cmsg = CMSG_FIRSTHDR(&reply_msg); cmsg != nullptr;
         cmsg = CMSG_NXTHDR(&reply_msg, cmsg)) {
      if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int one;
        std::memcpy(&one, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(one));
        came.emplace_back(one);
      }
    }
    if (received != nullptr) *received = std::move(came);
  }
  if (n < 0) {
    const int err = errno;
    return ErrnoStatus(err, absl::StatusCode::kUnavailable,
                       absl::StrCat("recv of the reply from the memory socket: ", strerror(err)));
  }
  if (n == 0) {
    // The end of the connection or an empty record (which the agent never sends, and which
    // would be an OK reply).
    pollfd pfd{fd_.get(), POLLRDHUP, 0};
    const int ready = ::poll(&pfd, 1, 0);
    if (ready < 0 || (ready == 1 && (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0)) {
      return ErrnoStatus(ECONNRESET, absl::StatusCode::kUnavailable,
                         "the agent closed the memory socket connection (over its "
                         "connection limit, or stopping)");
    }
  }
  if (static_cast<size_t>(n) > buffer.size()) {
    return ErrnoStatus(EMSGSIZE, absl::StatusCode::kInternal,
                       absl::StrCat("reply of ", n, " bytes; at most ", kMaxReplyBytes));
  }
  v1::MemorySocketReply reply;
  if (!reply.ParseFromArray(buffer.data(), static_cast<int>(n))) {
    return ErrnoStatus(EIO, absl::StatusCode::kInternal,
                       absl::StrCat("reply of ", n, " bytes is not a dmapin.v1.MemorySocketReply"));
  }
  return reply;
}

}  // namespace dmapin::client
