#include "agent/service/memory_socket.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "client/memory_socket_client.h"
#include "common/errno_status.h"
#include "common/mutex.h"
#include "common/unique_fd.h"
#include "dmapin/v1/agent.pb.h"
#include "gtest/gtest.h"
#include "testing/open_fds.h"

namespace dmapin::agent {
namespace {

using client::MemorySocketClient;

constexpr uint64_t kSlotBytes = 64 << 10;

UniqueFd MakeMemfd() {
  UniqueFd fd(::memfd_create("guest-ram", MFD_CLOEXEC));
  if (fd.valid() && ::ftruncate(fd.get(), 4 * kSlotBytes) != 0) fd.reset();
  return fd;
}

ino_t InodeOf(int fd) {
  struct stat st;
  return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
}

// A request whose slot i uses descriptor i.
v1::AttachMemoryRequest Request(const std::string& context, int slots) {
  v1::AttachMemoryRequest request;
  request.set_context(context);
  for (int i = 0; i < slots; ++i) {
    v1::MemorySlot* slot = request.add_slots();
    slot->set_ua(0x7f0000000000 + i * kSlotBytes);
    slot->set_size(kSlotBytes);
    slot->set_fd_index(i);
  }
  return request;
}

// One record with its descriptors, as a client other than ours would send it; -1 and errno on
// failure.
ssize_t SendRecord(int fd, const std::string& bytes, absl::Span<const int> fds) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(fds.size() * sizeof(int)));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), fds.data(), fds.size() * sizeof(int));
  }
  return ::sendmsg(fd, &msg, MSG_NOSIGNAL);
}

v1::MemorySocketReply RecvReply(int fd) {
  std::string buffer(1 << 16, '\0');
  const ssize_t n = ::recv(fd, buffer.data(), buffer.size(), 0);
  v1::MemorySocketReply reply;
  EXPECT_GT(n, 0) << strerror(errno);
  if (n > 0) {
    EXPECT_TRUE(reply.ParseFromArray(buffer.data(), static_cast<int>(n)));
  }
  return reply;
}

UniqueFd RawConnect(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) fd.reset();
  return fd;
}

// What the handler saw of one request.
struct Call {
  PeerCredentials peer;
  v1::AttachMemoryRequest request;
  std::vector<ino_t> inodes;
  bool regular_and_cloexec = true;
  int open_fds = 0;  // the process's, while the handler ran
};

class MemorySocketTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // sun_path holds 107 bytes; Bazel's TEST_TMPDIR can be longer.
    const char* tmp = std::getenv("TEST_TMPDIR");
    std::string base = tmp != nullptr && std::strlen(tmp) < 70 ? tmp : "/tmp";
    std::string dir = base + "/memsock.XXXXXX";
    ASSERT_NE(::mkdtemp(dir.data()), nullptr) << strerror(errno);
    dir_ = dir;
    path_ = dir_ + "/memory.sock";
    absl::StatusOr<std::unique_ptr<MemorySocketServer>> server = MemorySocketServer::Start(
        path_, [this](const PeerCredentials& peer, const v1::MemorySocketRequest& request,
                      std::vector<UniqueFd>& fds, std::vector<UniqueFd>* reply_fds) {
          return Handle(peer, request, fds, reply_fds);
        });
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    baseline_fds_ = harness::CountOpenFds();
  }

  void TearDown() override {
    server_.reset();
    ::rmdir(dir_.c_str());
  }

  // The fake handler: records the call, refuses the context "missing", and answers the others
  // with the context and its slots as the agent would.
  // open_devices answers with two memfds; adopt_container with its descriptor's inode as the
  // adoption's `registrations`.
  v1::MemorySocketReply Handle(const PeerCredentials& peer, const v1::MemorySocketRequest& envelope,
                               std::vector<UniqueFd>& fds, std::vector<UniqueFd>* reply_fds) {
    if (envelope.has_open_devices()) {
      reply_fds->push_back(MakeMemfd());
      reply_fds->push_back(MakeMemfd());
      v1::MemorySocketReply reply;
      reply.mutable_container()->set_name(envelope.open_devices().container());
      return reply;
    }
    if (envelope.has_adopt_container()) {
      struct stat st;
      v1::MemorySocketReply reply;
      if (::fstat(fds[0].get(), &st) == 0) reply.mutable_adoption()->set_registrations(st.st_ino);
      return reply;
    }
    v1::AttachMemoryRequest request;
    request.set_context(envelope.context());
    *request.mutable_slots() = envelope.slots();
    Call call;
    call.peer = peer;
    call.request = request;
    for (const UniqueFd& fd : fds) {
      struct stat st;
      const int flags = ::fcntl(fd.get(), F_GETFD);
      if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) || flags < 0 ||
          (flags & FD_CLOEXEC) == 0) {
        call.regular_and_cloexec = false;
      }
      call.inodes.push_back(st.st_ino);
    }
    call.open_fds = harness::CountOpenFds();
    {
      MutexLock lock(&mu_);
      calls_.push_back(std::move(call));
    }
    if (request.context() == "missing") {
      return ReplyFor(ErrnoStatus(ENOENT, "no context \"missing\""));
    }
    v1::MemorySocketReply reply;
    reply.mutable_context()->set_name(request.context());
    for (const v1::MemorySlot& slot : request.slots()) {
      v1::MemorySlot* out = reply.mutable_context()->add_slots();
      *out = slot;
      out->set_agent_ua(0x7e0000000000 + slot.ua() - 0x7f0000000000);
      out->set_object("memfd:guest-ram");
    }
    return reply;
  }

  std::vector<Call> Calls() {
    MutexLock lock(&mu_);
    return calls_;
  }

  // Connects and waits until the server has accepted (or refused) the connection, so that its
  // descriptor is in the counts that follow.
  std::unique_ptr<MemorySocketClient> Connect() {
    const MemorySocketStats before = server_->stats();
    absl::StatusOr<std::unique_ptr<MemorySocketClient>> client = MemorySocketClient::Connect(path_);
    EXPECT_TRUE(client.ok()) << client.status();
    EXPECT_TRUE(WaitFor([&](const MemorySocketStats& s) {
      return s.connections + s.refused_connections >
             before.connections + before.refused_connections;
    }));
    return client.ok() ? std::move(*client) : nullptr;
  }

  // Waits (up to 10 s) until `done` holds of the server's stats.
  bool WaitFor(const std::function<bool(const MemorySocketStats&)>& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!done(server_->stats())) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
  }

  // A good request with two memfds on `client`: the handler gets both, the reply is the context.
  void ExpectGoodAttach(MemorySocketClient& client) {
    UniqueFd a = MakeMemfd();
    UniqueFd b = MakeMemfd();
    ASSERT_TRUE(a.valid() && b.valid());
    const size_t calls_before = Calls().size();
    const int fds_before = harness::CountOpenFds();
    const int fds[] = {a.get(), b.get()};
    absl::StatusOr<v1::Context> context = client.Attach(Request("vm-1", 2), fds);
    ASSERT_TRUE(context.ok()) << context.status();
    EXPECT_EQ(context->name(), "vm-1");
    ASSERT_EQ(context->slots_size(), 2);
    EXPECT_EQ(context->slots(1).fd_index(), 1u);
    EXPECT_EQ(context->slots(1).agent_ua(), 0x7e0000000000 + kSlotBytes);
    EXPECT_EQ(context->slots(1).object(), "memfd:guest-ram");

    std::vector<Call> calls = Calls();
    ASSERT_EQ(calls.size(), calls_before + 1);
    const Call& call = calls.back();
    EXPECT_EQ(call.peer.pid, ::getpid());
    EXPECT_EQ(call.peer.uid, ::getuid());
    EXPECT_EQ(call.peer.gid, ::getgid());
    EXPECT_EQ(call.request.context(), "vm-1");
    EXPECT_EQ(call.request.slots_size(), 2);
    EXPECT_TRUE(call.regular_and_cloexec);
    ASSERT_EQ(call.inodes.size(), 2u);
    EXPECT_EQ(call.inodes[0], InodeOf(a.get()));
    EXPECT_EQ(call.inodes[1], InodeOf(b.get()));
    // The agent's two copies were open while the handler ran and were closed before the reply.
    EXPECT_EQ(call.open_fds, fds_before + 2);
    EXPECT_EQ(harness::CountOpenFds(), fds_before);
  }

  // `reply` refuses with INVALID_ARGUMENT, `errno_name`, and a message starting with `prefix`.
  static void ExpectRefusal(const absl::StatusOr<v1::MemorySocketReply>& reply,
                            const std::string& errno_name, const std::string& prefix) {
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_EQ(reply->errno_name(), errno_name);
    EXPECT_TRUE(absl::StartsWith(reply->message(), prefix)) << reply->message();
    EXPECT_FALSE(reply->has_context());
  }

  // With every client gone and the server running, the process has the descriptors it had when
  // the server had started.
  void ExpectNoLeaks() {
    EXPECT_TRUE(WaitFor([](const MemorySocketStats& s) { return s.open_connections == 0; }));
    EXPECT_EQ(harness::CountOpenFds(), baseline_fds_);
  }

  // The bad inputs, each answered on `client`, each followed by a good request on it.
  void BadInputs(MemorySocketClient& client) {
    UniqueFd memfd = MakeMemfd();
    ASSERT_TRUE(memfd.valid());
    std::string good;
    ASSERT_TRUE(Request("vm-1", 1).SerializeToString(&good));

    // Not a protobuf at all ('G' is field 8 with wire type 7, which does not exist).
    ExpectRefusal(client.SendRaw("GET / HTTP/1.1\r\n\r\n", {}), "EINVAL",
                  "EINVAL: record of 18 bytes is not a serialized dmapin.v1.MemorySocketRequest");
    ExpectGoodAttach(client);

    // A valid request cut short: a truncated field.
    ExpectRefusal(client.SendRaw(good.substr(0, good.size() - 1), {memfd.get()}), "EINVAL",
                  "EINVAL: record of");
    ExpectGoodAttach(client);

    ExpectRefusal(client.SendRaw("", {}), "EINVAL", "EINVAL: empty record");
    ExpectGoodAttach(client);

    ExpectRefusal(client.SendRaw(std::string(MemorySocketServer::kMaxRequestBytes + 1, 'x'), {}),
                  "EMSGSIZE", "EMSGSIZE: record of 65537 bytes; at most 65536 per message");
    ExpectGoodAttach(client);

    ExpectRefusal(client.SendRaw(std::string(100000, 'x'), {memfd.get()}), "EMSGSIZE",
                  "EMSGSIZE: record of 100000 bytes");
    ExpectGoodAttach(client);

    // 200 descriptors (all the same memfd, which the kernel installs 200 times).
    const std::vector<int> many(200, memfd.get());
    ExpectRefusal(client.SendRaw(good, many), "E2BIG", "E2BIG: at most 64 descriptors per message");
    ExpectGoodAttach(client);

    // Through Attach, the refusal is a status with the errno name as payload.
    absl::StatusOr<v1::Context> refused = client.Attach(Request("vm-1", 1), many);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(refused.status().message(), "E2BIG: at most 64 descriptors per message");
    EXPECT_EQ(refused.status().GetPayload(kErrnoPayloadUrl).value_or(absl::Cord()), "E2BIG");
    ExpectGoodAttach(client);

    v1::AttachMemoryRequest out_of_range = Request("vm-1", 2);
    out_of_range.mutable_slots(1)->set_fd_index(5);
    const int two[] = {memfd.get(), memfd.get()};
    refused = client.Attach(out_of_range, two);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(refused.status().message(),
              "EBADF: slot 1: fd_index 5 but the record has 2 descriptor(s)");
    EXPECT_EQ(ErrnoOf(refused.status()), EBADF);
    ExpectGoodAttach(client);

    // A slot and no descriptor at all.
    ExpectRefusal(client.SendRaw(good, {}), "EBADF", "EBADF: slot 0: fd_index 0");
    ExpectGoodAttach(client);

    // A descriptor that no slot names.
    const int three[] = {memfd.get(), memfd.get(), memfd.get()};
    refused = client.Attach(Request("vm-1", 2), three);
    EXPECT_EQ(refused.status().message(),
              "EINVAL: descriptor 2 of 3 is named by no slot's fd_index");
    EXPECT_EQ(ErrnoOf(refused.status()), EINVAL);
    ExpectGoodAttach(client);

    // The handler's refusal comes back as it gave it.
    const int one[] = {memfd.get()};
    refused = client.Attach(Request("missing", 1), one);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(refused.status().message(), "ENOENT: no context \"missing\"");
    EXPECT_EQ(ErrnoOf(refused.status()), ENOENT);
    ExpectGoodAttach(client);
  }

  // 1,000 descriptors "at once": the kernel takes at most 253 (SCM_MAX_FD) in one message, so
  // one sendmsg of 1,000 fails on the client, and four of 250 sent back to back, before any
  // reply is read, are each refused by the agent.
  void ThousandDescriptors(MemorySocketClient& client) {
    UniqueFd memfd = MakeMemfd();
    ASSERT_TRUE(memfd.valid());
    std::string good;
    ASSERT_TRUE(Request("vm-1", 1).SerializeToString(&good));
    const uint64_t requests = server_->stats().requests;

    const std::vector<int> thousand(1000, memfd.get());
    absl::StatusOr<v1::MemorySocketReply> reply = client.SendRaw(good, thousand);
    EXPECT_EQ(reply.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StartsWith(reply.status().message(), "EINVAL: sendmsg")) << reply.status();
    EXPECT_EQ(server_->stats().requests, requests);  // the agent saw nothing
    ExpectGoodAttach(client);

    const std::vector<int> quarter(250, memfd.get());
    for (int i = 0; i < 4; ++i) {
      ASSERT_GT(SendRecord(client.fd(), good, quarter), 0) << strerror(errno);
    }
    for (int i = 0; i < 4; ++i) {
      ExpectRefusal(RecvReply(client.fd()), "E2BIG", "E2BIG: at most 64 descriptors per message");
    }
    ExpectGoodAttach(client);
  }

  // Peers that go away: before sending anything, and right after sending, before the reply.
  void PeersThatLeave() {
    const uint64_t connections = server_->stats().connections;
    { UniqueFd silent = RawConnect(path_); }
    EXPECT_TRUE(WaitFor([&](const MemorySocketStats& s) {
      return s.connections == connections + 1 && s.open_connections == 0;
    }));

    UniqueFd memfd = MakeMemfd();
    std::string good;
    ASSERT_TRUE(Request("vm-1", 1).SerializeToString(&good));
    {
      UniqueFd hasty = RawConnect(path_);
      ASSERT_TRUE(hasty.valid());
      const int one[] = {memfd.get()};
      ASSERT_GT(SendRecord(hasty.get(), good, one), 0);
    }
    EXPECT_TRUE(WaitFor([&](const MemorySocketStats& s) {
      return s.connections == connections + 2 && s.open_connections == 0;
    }));
    std::unique_ptr<MemorySocketClient> client = Connect();
    ASSERT_NE(client, nullptr);
    ExpectGoodAttach(*client);
  }

  // kMaxConnections served; those past it closed at once and counted; the others unaffected.
  void TooManyConnections() {
    const uint64_t refused = server_->stats().refused_connections;
    std::vector<std::unique_ptr<MemorySocketClient>> clients;
    for (size_t i = 0; i < MemorySocketServer::kMaxConnections; ++i) {
      clients.push_back(Connect());
      ASSERT_NE(clients.back(), nullptr);
    }
    ASSERT_TRUE(WaitFor([](const MemorySocketStats& s) {
      return s.open_connections == MemorySocketServer::kMaxConnections;
    }));
    UniqueFd memfd = MakeMemfd();
    const int one[] = {memfd.get()};
    for (int i = 0; i < 10; ++i) {
      std::unique_ptr<MemorySocketClient> extra = Connect();  // connect succeeds: the backlog
      ASSERT_NE(extra, nullptr);
      absl::StatusOr<v1::Context> context = extra->Attach(Request("vm-1", 1), one);
      EXPECT_EQ(context.status().code(), absl::StatusCode::kUnavailable) << context.status();
    }
    EXPECT_TRUE(
        WaitFor([&](const MemorySocketStats& s) { return s.refused_connections == refused + 10; }));
    EXPECT_EQ(server_->stats().open_connections, MemorySocketServer::kMaxConnections);
    ExpectGoodAttach(*clients.front());
    ExpectGoodAttach(*clients.back());

    // A place freed is a place taken.
    clients.erase(clients.begin());
    ASSERT_TRUE(WaitFor([](const MemorySocketStats& s) {
      return s.open_connections == MemorySocketServer::kMaxConnections - 1;
    }));
    std::unique_ptr<MemorySocketClient> late = Connect();
    ASSERT_NE(late, nullptr);
    ExpectGoodAttach(*late);
    EXPECT_EQ(server_->stats().refused_connections, refused + 10);
  }

  std::string dir_;
  std::string path_;
  std::unique_ptr<MemorySocketServer> server_;
  int baseline_fds_ = 0;
  Mutex mu_;
  std::vector<Call> calls_ ABSL_GUARDED_BY(mu_);
};

TEST_F(MemorySocketTest, GoodRequestReachesTheHandlerWithItsDescriptorsAndPeer) {
  {
    std::unique_ptr<MemorySocketClient> client = Connect();
    ASSERT_NE(client, nullptr);
    ExpectGoodAttach(*client);
    ExpectGoodAttach(*client);  // and the connection serves again
  }
  const MemorySocketStats stats = server_->stats();
  EXPECT_EQ(stats.connections, 1u);
  EXPECT_EQ(stats.requests, 2u);
  EXPECT_EQ(stats.bad_requests, 0u);
  ExpectNoLeaks();
}

TEST_F(MemorySocketTest, DevicesComeWithTheReplyAndAContainerGoesBackAlone) {
  {
    std::unique_ptr<MemorySocketClient> client = Connect();
    ASSERT_NE(client, nullptr);
    v1::OpenDevicesRequest open;
    open.set_container("vm-1/vfio");
    open.add_devices("0000:00:03.0");
    v1::Container container;
    absl::StatusOr<std::vector<UniqueFd>> fds = client->OpenDevices(open, &container);
    ASSERT_TRUE(fds.ok()) << fds.status();
    ASSERT_EQ(fds->size(), 2u);
    EXPECT_EQ(container.name(), "vm-1/vfio");
    struct stat st;
    ASSERT_EQ(::fstat((*fds)[0].get(), &st), 0);
    EXPECT_TRUE(S_ISREG(st.st_mode));  // a real descriptor, the handler's memfd
    EXPECT_TRUE((::fcntl((*fds)[0].get(), F_GETFD) & FD_CLOEXEC) != 0);

    // adopt_container: exactly one descriptor.
    absl::StatusOr<v1::MemorySocketReply> adopted =
        client->AdoptContainer("vm-1/vfio", (*fds)[0].get());
    ASSERT_TRUE(adopted.ok()) << adopted.status();
    EXPECT_EQ(adopted->adoption().registrations(), st.st_ino);
    v1::MemorySocketRequest envelope;
    envelope.mutable_adopt_container()->set_container("vm-1/vfio");
    const int two[] = {(*fds)[0].get(), (*fds)[1].get()};
    ExpectRefusal(client->SendRaw(envelope.SerializeAsString(), two), "EBADF",
                  "EBADF: adopt_container takes exactly one descriptor");
    ExpectRefusal(client->SendRaw(envelope.SerializeAsString(), {}), "EBADF",
                  "EBADF: adopt_container takes exactly one descriptor");
    // open_devices: none; and one kind of request per record.
    v1::MemorySocketRequest devices;
    *devices.mutable_open_devices() = open;
    const int one[] = {(*fds)[1].get()};
    ExpectRefusal(client->SendRaw(devices.SerializeAsString(), one), "EINVAL",
                  "EINVAL: open_devices takes no descriptor");
    devices.set_context("vm-1");
    ExpectRefusal(client->SendRaw(devices.SerializeAsString(), {}), "EINVAL",
                  "EINVAL: one request per record");
    ExpectGoodAttach(*client);
  }
  ExpectNoLeaks();
}

TEST_F(MemorySocketTest, TheMostDescriptorsOfOneMessage) {
  {
    std::unique_ptr<MemorySocketClient> client = Connect();
    ASSERT_NE(client, nullptr);
    UniqueFd memfd = MakeMemfd();
    const std::vector<int> fds(MemorySocketServer::kMaxFds, memfd.get());
    absl::StatusOr<v1::Context> context =
        client->Attach(Request("vm-1", MemorySocketServer::kMaxFds), fds);
    ASSERT_TRUE(context.ok()) << context.status();
    EXPECT_EQ(context->slots_size(), MemorySocketServer::kMaxFds);
    ASSERT_EQ(Calls().size(), 1u);
    EXPECT_EQ(Calls()[0].inodes.size(), MemorySocketServer::kMaxFds);
    EXPECT_TRUE(Calls()[0].regular_and_cloexec);
  }
  ExpectNoLeaks();
}

TEST_F(MemorySocketTest, BadInputsAreRefusedAndTheConnectionKeepsServing) {
  {
    std::unique_ptr<MemorySocketClient> client = Connect();
    ASSERT_NE(client, nullptr);
    BadInputs(*client);
  }
  EXPECT_EQ(server_->stats().bad_requests, 10u);
  EXPECT_EQ(server_->stats().connections, 1u);
  ExpectNoLeaks();
}

TEST_F(MemorySocketTest, AThousandDescriptors) {
  {
    std::unique_ptr<MemorySocketClient> client = Connect();
    ASSERT_NE(client, nullptr);
    ThousandDescriptors(*client);
  }
  EXPECT_EQ(server_->stats().bad_requests, 4u);
  ExpectNoLeaks();
}

TEST_F(MemorySocketTest, PeersThatLeaveAreDropped) {
  PeersThatLeave();
  ExpectNoLeaks();
}

TEST_F(MemorySocketTest, APeerThatDoesNotReadItsRepliesIsDropped) {
  UniqueFd fd = RawConnect(path_);
  ASSERT_TRUE(fd.valid());
  ASSERT_TRUE(WaitFor([](const MemorySocketStats& s) { return s.open_connections == 1; }));
  // Until the agent's send buffer is full of unread replies and it hangs up.
  bool dropped = false;
  for (int i = 0; i < 1000000 && !dropped; ++i) {
    dropped = SendRecord(fd.get(), "garbage", {}) < 0;
  }
  EXPECT_TRUE(dropped);
  EXPECT_TRUE(errno == EPIPE || errno == ECONNRESET) << strerror(errno);
  fd.reset();
  std::unique_ptr<MemorySocketClient> client = Connect();
  ASSERT_NE(client, nullptr);
  ExpectGoodAttach(*client);
  client.reset();
  ExpectNoLeaks();
}

TEST_F(MemorySocketTest, ConnectionsOverTheLimitAreClosedAndCounted) {
  TooManyConnections();
  ExpectNoLeaks();
}

// All the cases above against one server, which ends with what it started with.
TEST_F(MemorySocketTest, NothingLeaksAcrossEveryCase) {
  {
    std::unique_ptr<MemorySocketClient> client = Connect();
    ASSERT_NE(client, nullptr);
    ExpectGoodAttach(*client);
    BadInputs(*client);
    ThousandDescriptors(*client);
  }
  PeersThatLeave();
  TooManyConnections();
  ExpectNoLeaks();
}

TEST(MemorySocketStartTest, ReplacesAStaleSocketAndRemovesItsOwnAtTheEnd) {
  std::string dir = ::testing::TempDir().size() < 70 ? ::testing::TempDir() : "/tmp/";
  dir += "memsock.XXXXXX";
  ASSERT_NE(::mkdtemp(dir.data()), nullptr);
  const std::string path = dir + "/memory.sock";
  auto handler = [](const PeerCredentials&, const v1::MemorySocketRequest&, std::vector<UniqueFd>&,
                    std::vector<UniqueFd>*) { return v1::MemorySocketReply(); };
  {
    // A socket file nobody listens on, as an agent that died leaves it.
    UniqueFd stale(::socket(AF_UNIX, SOCK_SEQPACKET, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    ASSERT_EQ(::bind(stale.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0);
  }
  {
    absl::StatusOr<std::unique_ptr<MemorySocketServer>> server =
        MemorySocketServer::Start(path, handler);
    ASSERT_TRUE(server.ok()) << server.status();
    struct stat st;
    ASSERT_EQ(::lstat(path.c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0660u);

    // A live server's socket is not taken over.
    absl::StatusOr<std::unique_ptr<MemorySocketServer>> second =
        MemorySocketServer::Start(path, handler);
    EXPECT_TRUE(absl::StartsWith(second.status().message(), "EADDRINUSE:")) << second.status();

    // An OK reply is never an empty record.
    absl::StatusOr<std::unique_ptr<MemorySocketClient>> client = MemorySocketClient::Connect(path);
    ASSERT_TRUE(client.ok()) << client.status();
    absl::StatusOr<v1::Context> context = (*client)->Attach(Request("vm", 0), {});
    EXPECT_TRUE(context.ok()) << context.status();
  }
  struct stat st;
  EXPECT_NE(::lstat(path.c_str(), &st), 0);  // removed

  // Something else at the path is left alone.
  { UniqueFd file(::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600)); }
  absl::StatusOr<std::unique_ptr<MemorySocketServer>> server =
      MemorySocketServer::Start(path, handler);
  EXPECT_TRUE(absl::StartsWith(server.status().message(), "EEXIST:")) << server.status();
  EXPECT_EQ(::lstat(path.c_str(), &st), 0);
  ::unlink(path.c_str());

  absl::StatusOr<std::unique_ptr<MemorySocketClient>> client = MemorySocketClient::Connect(path);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(client.status().message(), path)) << client.status();
  ::rmdir(dir.c_str());
}

TEST(ReplyForTest, CodeErrnoNameAndMessage) {
  v1::MemorySocketReply ok = ReplyFor(absl::OkStatus());
  EXPECT_EQ(ok.code(), 0);
  EXPECT_EQ(ok.errno_name(), "");

  v1::MemorySocketReply enoent = ReplyFor(ErrnoStatus(ENOENT, "no context \"vm\""));
  EXPECT_EQ(enoent.code(), static_cast<int>(absl::StatusCode::kNotFound));
  EXPECT_EQ(enoent.errno_name(), "ENOENT");
  EXPECT_EQ(enoent.message(), "ENOENT: no context \"vm\"");

  // Without an errno: EIO, named in the message too.
  v1::MemorySocketReply plain = ReplyFor(absl::InternalError("boom"));
  EXPECT_EQ(plain.code(), static_cast<int>(absl::StatusCode::kInternal));
  EXPECT_EQ(plain.errno_name(), "EIO");
  EXPECT_EQ(plain.message(), "EIO: boom");
}

}  // namespace
}  // namespace dmapin::agent
