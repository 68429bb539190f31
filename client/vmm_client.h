// The hypervisor's (VMM's) client of the dmapin node agent: its own memory context and
// containers, its guest RAM attached through the memory socket, the DMA hot path on a
// DmaSession stream, and Translate.
//
// The model (api/dmapin/v1/agent.proto, api/README.md): a context belongs to the local process
// that creates it over the agent's Unix socket, and only that process may map, unmap and
// translate on it (PERMISSION_DENIED, "EPERM: ..." otherwise). Every `ua` is the VMM's own
// address. With a real backend (memlock, vfio-*) the VMM attaches its guest memory (shared
// memfd, hugetlbfs or shm mappings: GuestRam) before it registers it; with the sim backend the
// addresses are simulated and there is nothing to attach. When the VMM exits, the agent tears
// its contexts down.
//
// Errors: every agent error comes back as an absl::Status with the gRPC code and message
// ("EBUSY: region still mapped ...") and the errno name as the payload common/errno_status
// reads, so ErrnoOf(status) == EBUSY. Failures of the transport (agent unreachable, deadline)
// carry no errno payload (ErrnoOf: EIO).
//
//   // (error checks and StatusOr unwrapping left out)
//   auto client = VmmClient::Connect({.uds_path = "/run/dmapin/agent.sock"});
//   auto ram = GuestRam::CreateMemfd("guest-ram", 64 << 20);
//   client->CreateContext("vm-42", {});
//   const GuestRamSlot slot = SlotOf(*ram);
//   client->AttachMemory("vm-42", {&slot, 1});
//   client->CreateContainer("vm-42/vfio-0", {});
//   client->RegisterRegion("vm-42/vfio-0", "vm-42", ram->ua(), ram->size());
//   auto session = client->StartDmaSession();
//   (*session)->Map("vm-42/vfio-0", /*iova=*/0, ram->ua(), 65536);
#ifndef DMAPIN_CLIENT_VMM_CLIENT_H_
#define DMAPIN_CLIENT_VMM_CLIENT_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/memory_socket_client.h"
#include "common/mutex.h"
#include "common/unique_fd.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dmapin::client {

// The absl::Status of a finished call: the same code and message, and the errno named by the
// "dmapin-errno" trailer of `context` (else by the message's "EXXX:" prefix) as the errno
// payload. OK stays OK.
absl::Status FromGrpcStatus(const grpc::Status& status, const grpc::ClientContext& context);

// Guest RAM a VMM can share with the agent: a memfd mapped MAP_SHARED in this process. Unmapped
// and closed on destruction. Move-only.
class GuestRam {
 public:
  // memfd_create(name) + ftruncate(bytes) + mmap(MAP_SHARED). `bytes` must be a multiple of the
  // page size (of the huge page size with `hugetlb`: MFD_HUGETLB, the default huge page size).
  // The memory is not touched (populated) here.
  static absl::StatusOr<GuestRam> CreateMemfd(absl::string_view name, uint64_t bytes,
                                              bool hugetlb = false);

  GuestRam(GuestRam&& other) noexcept;
  GuestRam& operator=(GuestRam&& other) noexcept;
  GuestRam(const GuestRam&) = delete;
  GuestRam& operator=(const GuestRam&) = delete;
  ~GuestRam();

  uint64_t ua() const { return reinterpret_cast<uint64_t>(base_); }
  uint64_t size() const { return size_; }
  int fd() const { return fd_.get(); }
  void* data() const { return base_; }

 private:
  GuestRam(UniqueFd fd, void* base, uint64_t size) : fd_(std::move(fd)), base_(base), size_(size) {}
  void Unmap();

  UniqueFd fd_;
  void* base_ = nullptr;
  uint64_t size_ = 0;
};

// One piece of guest memory to attach: [ua, ua + size) of this process is [offset, offset +
// size) of the shared object `fd` (page multiples). The descriptor stays the caller's.
struct GuestRamSlot {
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t offset = 0;
  int fd = -1;
};

// All of `ram` as one slot.
GuestRamSlot SlotOf(const GuestRam& ram);

struct VmmClientOptions {
  // The agent's Unix socket (dmapin-agent --uds_path).
  std::string uds_path = "/run/dmapin/agent.sock";
  // The agent's memory socket (dmapin-agent --memory_socket_path); empty: uds_path + ".memory",
  // the agent's default. Connected on the first AttachMemory only.
  std::string memory_socket_path;
  // How long Connect waits for the agent to accept the connection.
  absl::Duration connect_timeout = absl::Seconds(10);
  // The deadline of every unary call (registration of a large region pins all of it).
  absl::Duration rpc_timeout = absl::Seconds(60);
};

struct ContextOptions {
  // RLIMIT_MEMLOCK-like accounting of what the context may pin; nullopt: unlimited.
  std::optional<uint64_t> memlock_limit_bytes;
  bool cap_ipc_lock = false;
  v1::MemoryBacking backing = v1::MEMORY_BACKING_UNSPECIFIED;
};

class VmmClient;

// A device of a VFIO container, opened by the agent for this VMM (VmmClient::OpenDevices).
struct OpenedDevice {
  std::string name;  // e.g. "0000:00:03.0"
  UniqueFd fd;       // the VFIO device descriptor: config space, BARs, interrupts, DMA
};

// Whether `status` is the agent's "EAGAIN: ... waits for its VMM to give its descriptor back":
// a container this VMM holds, after the agent restarted.
bool AwaitsAdoption(const absl::Status& status);

// One DmaSession stream: each Map/Unmap is one synchronous round trip on it, cheaper than a
// unary call. Thread-compatible: use one session per thread (e.g. per VMM I/O thread). A failed
// request does not end the stream; a broken stream (agent gone) fails this and every later call
// with the stream's status (UNAVAILABLE, no errno payload).
class DmaSession {
 public:
  DmaSession(const DmaSession&) = delete;
  DmaSession& operator=(const DmaSession&) = delete;
  // Closes the stream (Close).
  ~DmaSession();

  // MapDma/UnmapDma on the stream: the status the unary call would have returned.
  absl::Status Map(absl::string_view container, uint64_t iova, uint64_t ua, uint64_t size);
  absl::Status Unmap(absl::string_view container, uint64_t iova, uint64_t size);

  // Half-closes the stream and returns how it ended. Idempotent; later Map/Unmap fail.
  absl::Status Close();

 private:
  friend class VmmClient;
  DmaSession(
      VmmClient* client, std::unique_ptr<grpc::ClientContext> context,
      std::unique_ptr<grpc::ClientReaderWriter<v1::DmaSessionRequest, v1::DmaSessionResponse>>
          stream)
      : client_(client), context_(std::move(context)), stream_(std::move(stream)) {}
  absl::Status RoundTrip(v1::DmaSessionRequest& request);
  // Ends the stream after a failed write or read: its final status, or UNAVAILABLE.
  absl::Status Broken(absl::string_view what);

  VmmClient* const client_;  // gives its containers back when the agent restarted
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::DmaSessionRequest, v1::DmaSessionResponse>> stream_;
  uint64_t next_tag_ = 1;
  // Set once the stream is over (closed or broken): what every later call answers.
  std::optional<absl::Status> ended_;
  bool closed_ = false;
  absl::Status final_;               // what Close answered
  v1::DmaSessionResponse response_;  // reused: no allocation per call
};

// The VMM's connection to the agent of its node. Thread-safe: the unary calls may come from any
// thread (the gRPC stub is), AttachMemory calls are serialized on the one memory socket
// connection; each DmaSession belongs to one thread.
class VmmClient {
 public:
  // Opens the channel to the agent's Unix socket and waits (connect_timeout) until it connects:
  // UNAVAILABLE when no agent serves there.
  static absl::StatusOr<std::unique_ptr<VmmClient>> Connect(const VmmClientOptions& options);

  VmmClient(const VmmClient&) = delete;
  VmmClient& operator=(const VmmClient&) = delete;

  // The node: its backend ("sim", "memlock", "vfio-type1", ...) and page size, among others.
  absl::StatusOr<v1::NodeStatus> GetNodeStatus();

  // A context owned by this process (the agent knows the caller by its Unix socket peer).
  absl::StatusOr<v1::Context> CreateContext(absl::string_view name,
                                            const ContextOptions& options = {});
  absl::StatusOr<v1::Context> GetContext(absl::string_view name);
  // Releases every region and container of the context and unpins everything.
  absl::Status TeardownContext(absl::string_view name);

  // Maps `slots` of this process's shared memory into the agent (all or none), over the memory
  // socket with their descriptors (SCM_RIGHTS): from then on the context's `ua`s in them can be
  // registered. Returns the context after the attach. Real backends only (the sim backend
  // answers EINVAL).
  absl::StatusOr<v1::Context> AttachMemory(absl::string_view context,
                                           absl::Span<const GuestRamSlot> slots);

  // A container (IOMMU domain) with the node's page size and the default window; the VFIO
  // backends attach `vfio_groups` (e.g. "/dev/vfio/26"), which must be empty otherwise.
  absl::StatusOr<v1::Container> CreateContainer(absl::string_view name,
                                                absl::Span<const std::string> vfio_groups = {});
  absl::Status ReleaseContainer(absl::string_view name);

  // --- The device handoff (VFIO backends; README, "What happens when the agent dies") ---------
  // Opens `devices` (PCI addresses in the container's IOMMU groups) for this VMM. The client
  // keeps a duplicate of the container's descriptor, and with the device descriptors (the
  // caller's) it keeps the container's IOMMU state, whatever happens to the agent: a restarted
  // agent takes the container back from this client (AdoptContainers), which the DMA calls do by
  // themselves when the agent answers that it waits for it.
  absl::StatusOr<std::vector<OpenedDevice>> OpenDevices(absl::string_view container,
                                                        absl::Span<const std::string> devices);
  // Gives every container this client holds back to the agent: OK when each was taken back or
  // was served already (EBUSY from the agent). The first other error, after trying every one.
  absl::Status AdoptContainers();
  // The client's descriptor of a container it holds, -1 if none.
  int container_fd(absl::string_view container) const;

  // Pins [ua, ua + size) of `context` for `container` (pre-registration).
  absl::StatusOr<v1::Region> RegisterRegion(absl::string_view container, absl::string_view context,
                                            uint64_t ua, uint64_t size);
  // EBUSY (FAILED_PRECONDITION) while DMA mappings remain on the last user.
  absl::Status UnregisterRegion(absl::string_view container, uint64_t ua, uint64_t size);

  // The DMA hot path as unary calls (for occasional use; DmaSession for a stream of them).
  absl::Status MapDma(absl::string_view container, uint64_t iova, uint64_t ua, uint64_t size);
  absl::Status UnmapDma(absl::string_view container, uint64_t iova, uint64_t size);
  // A new DmaSession stream on this client's channel.
  absl::StatusOr<std::unique_ptr<DmaSession>> StartDmaSession();

  // The host physical address of each of `uas` (registered addresses of `context`).
  absl::StatusOr<std::vector<uint64_t>> Translate(absl::string_view context,
                                                  absl::Span<const uint64_t> uas);

  // For calls this class does not wrap.
  v1::NodeAgent::Stub& stub() { return *stub_; }
  const VmmClientOptions& options() const { return options_; }

 private:
  VmmClient(VmmClientOptions options, std::shared_ptr<grpc::Channel> channel);
  std::unique_ptr<grpc::ClientContext> NewContext() const;
  // The memory socket, connected if it is not (a broken connection was reset).
  absl::StatusOr<MemorySocketClient*> MemorySocketLocked()
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(memory_mu_);
  // Drops the connection after a transport failure, so the next call reconnects.
  void ResetIfBrokenLocked(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(memory_mu_);
  friend class DmaSession;

  const VmmClientOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<v1::NodeAgent::Stub> stub_;

  mutable Mutex memory_mu_;
  // Connected on the first AttachMemory; reset after a broken connection, to reconnect.
  std::unique_ptr<MemorySocketClient> memory_socket_ ABSL_GUARDED_BY(memory_mu_);
  // The containers whose devices this VMM holds: name -> a descriptor of the container.
  std::map<std::string, UniqueFd, std::less<>> containers_ ABSL_GUARDED_BY(memory_mu_);
};

}  // namespace dmapin::client

#endif  // DMAPIN_CLIENT_VMM_CLIENT_H_
