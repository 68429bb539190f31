#include "client/vmm_client.h"

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/errno_status.h"

namespace dmapin::client {
namespace {

constexpr char kErrnoTrailer[] = "dmapin-errno";

// "<ERRNO>: <reason>" with the errno name as payload, also for errnos common/errno_status does
// not name (ECONNREFUSED).
absl::Status SystemError(int err, absl::StatusCode code, absl::string_view what) {
  const char* known = strerrorname_np(err);
  const std::string name = known != nullptr ? std::string(known) : ErrnoName(err);
  absl::Status status(code, absl::StrCat(name, ": ", what, ": ", strerror(err)));
  status.SetPayload(kErrnoPayloadUrl, absl::Cord(name));
  return status;
}

// The "EBUSY" of "EBUSY: ...", when it is an errno name this project knows.
std::optional<std::string> ErrnoPrefix(absl::string_view message) {
  const size_t colon = message.find(':');
  if (colon == absl::string_view::npos) return std::nullopt;
  const absl::string_view name = message.substr(0, colon);
  if (!ErrnoFromName(name).has_value()) return std::nullopt;
  return std::string(name);
}

absl::Status StatusOfResponse(const v1::DmaSessionResponse& response) {
  if (response.code() == 0) return absl::OkStatus();
  absl::StatusCode code = static_cast<absl::StatusCode>(response.code());
  if (response.code() < 1 || response.code() > 16) code = absl::StatusCode::kUnknown;
  absl::Status status(code, response.message());
  if (!response.errno_name().empty()) {
    status.SetPayload(kErrnoPayloadUrl, absl::Cord(response.errno_name()));
  } else if (std::optional<std::string> name = ErrnoPrefix(response.message())) {
    status.SetPayload(kErrnoPayloadUrl, absl::Cord(*name));
  }
  return status;
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status, const grpc::ClientContext& context) {
  if (status.ok()) return absl::OkStatus();
  absl::Status converted(static_cast<absl::StatusCode>(status.error_code()),
                         status.error_message());
  const auto& trailers = context.GetServerTrailingMetadata();
  if (auto it = trailers.find(kErrnoTrailer); it != trailers.end() && it->second.size() > 0) {
    converted.SetPayload(kErrnoPayloadUrl,
                         absl::Cord(absl::string_view(it->second.data(), it->second.size())));
  } else if (std::optional<std::string> name = ErrnoPrefix(status.error_message())) {
    converted.SetPayload(kErrnoPayloadUrl, absl::Cord(*name));
  }
  return converted;
}

// --- GuestRam ---------------------------------------------------------------------------------

absl::StatusOr<GuestRam> GuestRam::CreateMemfd(absl::string_view name, uint64_t bytes,
                                               bool hugetlb) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  if (bytes == 0 || bytes % page != 0) {
    return ErrnoStatus(EINVAL, absl::StrCat("guest RAM of ", bytes, " bytes: not a positive ",
                                            "multiple of the page size (", page, ")"));
  }
  const std::string name_string(name);
  UniqueFd fd(memfd_create(name_string.c_str(), MFD_CLOEXEC | (hugetlb ? MFD_HUGETLB : 0)));
  if (!fd.valid()) {
    const int err = errno;
    return SystemError(err, StatusCodeForErrno(err), absl::StrCat("memfd_create ", name));
  }
  if (ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
    const int err = errno;
    return SystemError(err, StatusCodeForErrno(err),
                       absl::StrCat("ftruncate memfd ", name, " to ", bytes, " bytes"));
  }
  // Shared: the agent maps the same pages through the descriptor.
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (base == MAP_FAILED) {
    const int err = errno;
    return SystemError(err, StatusCodeForErrno(err),
                       absl::StrCat("mmap ", bytes, " bytes of memfd ", name));
  }
  return GuestRam(std::move(fd), base, bytes);
}

GuestRam::GuestRam(GuestRam&& other) noexcept
    : fd_(std::move(other.fd_)),
      base_(std::exchange(other.base_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

GuestRam& GuestRam::operator=(GuestRam&& other) noexcept {
  if (this != &other) {
    Unmap();
    fd_ = std::move(other.fd_);
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

GuestRam::~GuestRam() { Unmap(); }

void GuestRam::Unmap() {
  if (base_ != nullptr) munmap(base_, size_);
  base_ = nullptr;
  size_ = 0;
}

GuestRamSlot SlotOf(const GuestRam& ram) {
  return {.ua = ram.ua(), .size = ram.size(), .offset = 0, .fd = ram.fd()};
}

// --- DmaSession -------------------------------------------------------------------------------

DmaSession::~DmaSession() { Close().IgnoreError(); }

absl::Status DmaSession::Map(absl::string_view container, uint64_t iova, uint64_t ua,
                             uint64_t size) {
  v1::DmaSessionRequest request;
  v1::MapDmaRequest* map = request.mutable_map();
  map->set_container(std::string(container));
  map->set_iova(iova);
  map->set_ua(ua);
  map->set_size(size);
  return RoundTrip(request);
}

absl::Status DmaSession::Unmap(absl::string_view container, uint64_t iova, uint64_t size) {
  v1::DmaSessionRequest request;
  v1::UnmapDmaRequest* unmap = request.mutable_unmap();
  unmap->set_container(std::string(container));
  unmap->set_iova(iova);
  unmap->set_size(size);
  return RoundTrip(request);
}

absl::Status DmaSession::RoundTrip(v1::DmaSessionRequest& request) {
  if (ended_.has_value()) return *ended_;
  const uint64_t tag = next_tag_++;
  request.set_tag(tag);
  if (!stream_->Write(request)) return Broken("write");
  if (!stream_->Read(&response_)) return Broken("read");
  if (response_.tag() != tag) {
    // The agent answers in order; anything else means the stream cannot be trusted.
    ended_ = ErrnoStatus(
        EIO, absl::StatusCode::kInternal,
        absl::StrCat("DmaSession: response tag ", response_.tag(), " for request tag ", tag));
    context_->TryCancel();
    stream_->Finish();
    return *ended_;
  }
  absl::Status status = StatusOfResponse(response_);
  // After an agent restart: give the containers back, then once more.
  if (AwaitsAdoption(status) && client_ != nullptr && client_->AdoptContainers().ok()) {
    request.set_tag(next_tag_++);
    if (!stream_->Write(request)) return Broken("write");
    if (!stream_->Read(&response_)) return Broken("read");
    if (response_.tag() != request.tag()) {
      ended_ = ErrnoStatus(EIO, absl::StatusCode::kInternal,
                           absl::StrCat("DmaSession: response tag ", response_.tag(),
                                        " for request tag ", request.tag()));
      context_->TryCancel();
      stream_->Finish();
      return *ended_;
    }
    status = StatusOfResponse(response_);
  }
  return status;
}

absl::Status DmaSession::Broken(absl::string_view what) {
  absl::Status status = FromGrpcStatus(stream_->Finish(), *context_);
  if (status.ok()) {
    status = absl::UnavailableError(
        absl::StrCat("DmaSession: the agent ended the stream (", what, " failed)"));
  }
  ended_ = status;
  return status;
}

absl::Status DmaSession::Close() {
  if (closed_) return final_;
  closed_ = true;
  if (ended_.has_value()) {
    final_ = *ended_;  // already broken: how it broke
    return final_;
  }
  stream_->WritesDone();
  final_ = FromGrpcStatus(stream_->Finish(), *context_);
  ended_ = absl::FailedPreconditionError("DmaSession is closed");
  return final_;
}

// --- VmmClient --------------------------------------------------------------------------------

VmmClient::VmmClient(VmmClientOptions options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::NodeAgent::NewStub(channel_)) {}

absl::StatusOr<std::unique_ptr<VmmClient>> VmmClient::Connect(const VmmClientOptions& options) {
  if (options.uds_path.empty() || options.uds_path.size() >= sizeof(sockaddr_un::sun_path)) {
    return ErrnoStatus(EINVAL,
                       absl::StrCat("agent socket path \"", options.uds_path, "\": empty or over ",
                                    sizeof(sockaddr_un::sun_path) - 1, " bytes"));
  }
  VmmClientOptions resolved = options;
  if (resolved.memory_socket_path.empty()) {
    resolved.memory_socket_path = resolved.uds_path + ".memory";
  }
  // The agent is local and restarts in well under a second (a DaemonSet update, a crash): retry
  // its socket quickly rather than with gRPC's default backoff, which grows to two minutes.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(
      "unix:" + resolved.uds_path, grpc::InsecureChannelCredentials(), args);
  const auto deadline =
      std::chrono::system_clock::now() + absl::ToChronoMilliseconds(resolved.connect_timeout);
  if (!channel->WaitForConnected(deadline)) {
    // Tell a missing socket from an agent that does not answer.
    const int err = access(resolved.uds_path.c_str(), F_OK) == 0 ? ECONNREFUSED : ENOENT;
    return SystemError(err, absl::StatusCode::kUnavailable,
                       absl::StrCat("no dmapin agent serving on unix:", resolved.uds_path,
                                    " within ", absl::FormatDuration(resolved.connect_timeout)));
  }
  return std::unique_ptr<VmmClient>(new VmmClient(std::move(resolved), std::move(channel)));
}

std::unique_ptr<grpc::ClientContext> VmmClient::NewContext() const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() +
                        absl::ToChronoMilliseconds(options_.rpc_timeout));
  return context;
}

absl::StatusOr<v1::NodeStatus> VmmClient::GetNodeStatus() {
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::NodeStatus response;
  grpc::Status status = stub_->GetNodeStatus(context.get(), v1::GetNodeStatusRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status, *context);
  return response;
}

absl::StatusOr<v1::Context> VmmClient::CreateContext(absl::string_view name,
                                                     const ContextOptions& options) {
  v1::CreateContextRequest request;
  request.set_name(std::string(name));
  if (options.memlock_limit_bytes.has_value()) {
    request.set_memlock_limit_bytes(*options.memlock_limit_bytes);
  } else {
    request.set_memlock_unlimited(true);
  }
  request.set_cap_ipc_lock(options.cap_ipc_lock);
  request.set_backing(options.backing);
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::Context response;
  grpc::Status status = stub_->CreateContext(context.get(), request, &response);
  if (!status.ok()) return FromGrpcStatus(status, *context);
  return response;
}

absl::StatusOr<v1::Context> VmmClient::GetContext(absl::string_view name) {
  v1::GetContextRequest request;
  request.set_name(std::string(name));
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::Context response;
  grpc::Status status = stub_->GetContext(context.get(), request, &response);
  if (!status.ok()) return FromGrpcStatus(status, *context);
  return response;
}

absl::Status VmmClient::TeardownContext(absl::string_view name) {
  v1::TeardownContextRequest request;
  request.set_name(std::string(name));
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::TeardownContextResponse response;
  return FromGrpcStatus(stub_->TeardownContext(context.get(), request, &response), *context);
}

absl::StatusOr<v1::Context> VmmClient::AttachMemory(absl::string_view context,
                                                    absl::Span<const GuestRamSlot> slots) {
  v1::AttachMemoryRequest request;
  request.set_context(std::string(context));
  // Each descriptor is sent once; slots sharing one name the same index.
  std::vector<int> fds;
  for (const GuestRamSlot& slot : slots) {
    size_t index = 0;
    while (index < fds.size() && fds[index] != slot.fd) ++index;
    if (index == fds.size()) fds.push_back(slot.fd);
    v1::MemorySlot* out = request.add_slots();
    out->set_ua(slot.ua);
    out->set_size(slot.size);
    out->set_offset(slot.offset);
    out->set_fd_index(static_cast<uint32_t>(index));
  }
  MutexLock lock(&memory_mu_);
  absl::StatusOr<MemorySocketClient*> socket = MemorySocketLocked();
  if (!socket.ok()) return socket.status();
  absl::StatusOr<v1::Context> attached = (*socket)->Attach(request, fds);
  ResetIfBrokenLocked(attached.status());
  return attached;
}

absl::StatusOr<MemorySocketClient*> VmmClient::MemorySocketLocked() {
  if (memory_socket_ == nullptr) {
    absl::StatusOr<std::unique_ptr<MemorySocketClient>> connected =
        MemorySocketClient::Connect(options_.memory_socket_path);
    if (!connected.ok()) return connected.status();
    memory_socket_ = std::move(*connected);
  }
  return memory_socket_.get();
}

void VmmClient::ResetIfBrokenLocked(const absl::Status& status) {
  // A broken connection (the agent restarted, or dropped us) is reopened by the next call; the
  // agent's other refusals leave it usable.
  if (status.code() == absl::StatusCode::kUnavailable) memory_socket_.reset();
}

bool AwaitsAdoption(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable && ErrnoOf(status) == EAGAIN &&
         absl::StrContains(status.message(), "give its descriptor back");
}

absl::StatusOr<std::vector<OpenedDevice>> VmmClient::OpenDevices(
    absl::string_view container, absl::Span<const std::string> devices) {
  v1::OpenDevicesRequest request;
  request.set_container(std::string(container));
  for (const std::string& device : devices) request.add_devices(device);
  MutexLock lock(&memory_mu_);
  absl::StatusOr<MemorySocketClient*> socket = MemorySocketLocked();
  if (!socket.ok()) return socket.status();
  absl::StatusOr<std::vector<UniqueFd>> fds = (*socket)->OpenDevices(request, nullptr);
  ResetIfBrokenLocked(fds.status());
  if (!fds.ok()) return fds.status();
  containers_[std::string(container)] = std::move((*fds)[0]);
  std::vector<OpenedDevice> opened;
  for (size_t i = 0; i < devices.size(); ++i) {
    opened.push_back({.name = devices[i], .fd = std::move((*fds)[i + 1])});
  }
  return opened;
}

absl::Status VmmClient::AdoptContainers() {
  MutexLock lock(&memory_mu_);
  absl::Status first;
  for (const auto& [name, fd] : containers_) {
    absl::StatusOr<MemorySocketClient*> socket = MemorySocketLocked();
    if (!socket.ok()) return socket.status();
    absl::StatusOr<v1::MemorySocketReply> reply = (*socket)->AdoptContainer(name, fd.get());
    ResetIfBrokenLocked(reply.status());
    if (!reply.ok() && ErrnoOf(reply.status()) != EBUSY && first.ok()) first = reply.status();
  }
  return first;
}

int VmmClient::container_fd(absl::string_view container) const {
  MutexLock lock(&memory_mu_);
  auto it = containers_.find(container);
  return it == containers_.end() ? -1 : it->second.get();
}

absl::StatusOr<v1::Container> VmmClient::CreateContainer(
    absl::string_view name, absl::Span<const std::string> vfio_groups) {
  v1::CreateContainerRequest request;
  request.set_name(std::string(name));
  for (const std::string& group : vfio_groups) request.add_vfio_groups(group);
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::Container response;
  grpc::Status status = stub_->CreateContainer(context.get(), request, &response);
  if (!status.ok()) return FromGrpcStatus(status, *context);
  return response;
}

absl::Status VmmClient::ReleaseContainer(absl::string_view name) {
  v1::ReleaseContainerRequest request;
  request.set_name(std::string(name));
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::ReleaseContainerResponse response;
  return FromGrpcStatus(stub_->ReleaseContainer(context.get(), request, &response), *context);
}

absl::StatusOr<v1::Region> VmmClient::RegisterRegion(absl::string_view container,
                                                     absl::string_view context_name, uint64_t ua,
                                                     uint64_t size) {
  v1::RegisterRegionRequest request;
  request.set_container(std::string(container));
  request.set_context(std::string(context_name));
  request.set_ua(ua);
  request.set_size(size);
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::Region response;
  grpc::Status status = stub_->RegisterRegion(context.get(), request, &response);
  if (!status.ok()) return FromGrpcStatus(status, *context);
  return response;
}

absl::Status VmmClient::UnregisterRegion(absl::string_view container, uint64_t ua, uint64_t size) {
  v1::UnregisterRegionRequest request;
  request.set_container(std::string(container));
  request.set_ua(ua);
  request.set_size(size);
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::UnregisterRegionResponse response;
  return FromGrpcStatus(stub_->UnregisterRegion(context.get(), request, &response), *context);
}

absl::Status VmmClient::MapDma(absl::string_view container, uint64_t iova, uint64_t ua,
                               uint64_t size) {
  v1::MapDmaRequest request;
  request.set_container(std::string(container));
  request.set_iova(iova);
  request.set_ua(ua);
  request.set_size(size);
  for (int attempt = 0;; ++attempt) {
    std::unique_ptr<grpc::ClientContext> context = NewContext();
    v1::MapDmaResponse response;
    absl::Status status =
        FromGrpcStatus(stub_->MapDma(context.get(), request, &response), *context);
    // After an agent restart: give the containers back, then once more.
    if (attempt > 0 || !AwaitsAdoption(status) || !AdoptContainers().ok()) return status;
  }
}

absl::Status VmmClient::UnmapDma(absl::string_view container, uint64_t iova, uint64_t size) {
  v1::UnmapDmaRequest request;
  request.set_container(std::string(container));
  request.set_iova(iova);
  request.set_size(size);
  for (int attempt = 0;; ++attempt) {
    std::unique_ptr<grpc::ClientContext> context = NewContext();
    v1::UnmapDmaResponse response;
    absl::Status status =
        FromGrpcStatus(stub_->UnmapDma(context.get(), request, &response), *context);
    if (attempt > 0 || !AwaitsAdoption(status) || !AdoptContainers().ok()) return status;
  }
}

absl::StatusOr<std::unique_ptr<DmaSession>> VmmClient::StartDmaSession() {
  // No deadline: the stream lives as long as the VMM uses it.
  auto context = std::make_unique<grpc::ClientContext>();
  std::unique_ptr<grpc::ClientReaderWriter<v1::DmaSessionRequest, v1::DmaSessionResponse>> stream =
      stub_->DmaSession(context.get());
  if (stream == nullptr) return absl::UnavailableError("DmaSession: the stream did not start");
  return std::unique_ptr<DmaSession>(new DmaSession(this, std::move(context), std::move(stream)));
}

absl::StatusOr<std::vector<uint64_t>> VmmClient::Translate(absl::string_view context_name,
                                                           absl::Span<const uint64_t> uas) {
  v1::TranslateRequest request;
  request.set_context(std::string(context_name));
  request.mutable_uas()->Add(uas.begin(), uas.end());
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::TranslateResponse response;
  grpc::Status status = stub_->Translate(context.get(), request, &response);
  if (!status.ok()) return FromGrpcStatus(status, *context);
  if (static_cast<size_t>(response.hpas_size()) != uas.size()) {
    return ErrnoStatus(
        EIO, absl::StatusCode::kInternal,
        absl::StrCat("Translate: ", response.hpas_size(), " addresses for ", uas.size(), " asked"));
  }
  return std::vector<uint64_t>(response.hpas().begin(), response.hpas().end());
}

}  // namespace dmapin::client
