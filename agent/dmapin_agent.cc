// dmapin-agent: the node agent. Serves the node's region registry over gRPC on TCP (central
// service, admins) and on a Unix socket (VMMs on the node: the DMA hot path), with reflection and
// grpc.health.v1 on both, and its own Prometheus metrics over HTTP (--metrics_address, /metrics;
// see agent/service/agent_metrics.h). Every acknowledged change is durable in --state_dir before
// the reply; on start the registry is rebuilt from it, checked, and only then served.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "agent/control/control_client.h"
#include "agent/node/context_memory.h"
#include "agent/node/node_agent.h"
#include "agent/registry/memlock_backend.h"
#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
#include "agent/service/agent_metrics.h"
#include "agent/service/memory_socket.h"
#include "agent/service/node_agent_service.h"
#include "agent/service/proto_convert.h"
#include "agent/store/state_store.h"
#include "agent/vfio/vfio_container.h"
#include "agent/vfio/vfio_detect.h"
#include "agent/vfio/vfio_kernel.h"
#include "common/errno_status.h"
#include "common/flags.h"
#include "common/grpc_auth.h"
#include "common/grpc_status.h"
#include "common/health_server.h"
#include "common/logging.h"
#include "common/net.h"
#include "common/server_limits.h"
#include "common/tls_credentials.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "prometheus/exposer.h"

ABSL_FLAG(std::string, node_name, "",
          "Name of this node (default: $NODE_NAME, as set from the downward API, else the host "
          "name).");
ABSL_FLAG(std::string, tcp_address, "0.0.0.0:7470",
          "TCP address for the central service and admins (host:port); empty disables TCP.");
ABSL_FLAG(std::string, health_address, "",
          "Plaintext gRPC address (host:port) serving only grpc.health.v1.Health, for probes "
          "that do not speak TLS (Kubernetes' gRPC probes). Empty: none.");
ABSL_FLAG(std::string, uds_path, "/run/dmapin/agent.sock",
          "Unix socket for the VMMs on this node (the DMA hot path); empty disables it.");
ABSL_FLAG(std::string, memory_socket_path, "",
          "The memory socket (SOCK_SEQPACKET, api/README.md \"The memory socket\"): VMMs on this "
          "node send descriptors of their guest memory here (SCM_RIGHTS), which the agent maps "
          "shared and pins in the VMM's own addresses. Default: <uds_path>.memory (e.g. "
          "/run/dmapin/agent.sock.memory), none without --uds_path; \"none\" disables it (VMMs "
          "can still attach through the fd-less AttachMemory RPC).");
ABSL_FLAG(int32_t, socket_gid, -1,
          "Group of the Unix socket and the memory socket (mode 0660: owner and group may "
          "connect): the gid the VMMs' pods run with (e.g. a supplemental group). -1: the "
          "agent's own group.");
ABSL_FLAG(std::vector<std::string>, manager_uids, {},
          "Local uids that may act for VMMs (comma-separated): create a context for another "
          "process (CreateContextRequest.owner_pid), attach its memory, register and tear down on "
          "it; never map. E.g. the uid of a virt-handler-like management daemon. Default: none.");
ABSL_FLAG(bool, insecure_dma_from_any_peer, false,
          "INSECURE, for demos and tests only: let any caller, TCP peers included, map, unmap and "
          "translate on any context. Without it only the process that owns a context may, over "
          "the Unix socket (PERMISSION_DENIED otherwise).");
ABSL_FLAG(std::string, metrics_address, "0.0.0.0:9470",
          "HTTP address (host:port) serving the agent's Prometheus metrics at /metrics: "
          "per-context and per-container pinned bytes, regions and mappings, registry and "
          "state-store counters, per-method RPC latency and errors. Port 0 picks a free port "
          "(logged). Empty disables metrics, including their recording on the RPC path.");
ABSL_FLAG(std::string, state_dir, "/var/lib/dmapin/agent",
          "Directory of the agent's durable state: state.db (SQLite) and the mapping journal "
          "mappings.*.log (one record per DMA map/unmap, folded into state.db within 100 ms). "
          "Must survive agent restarts.");
ABSL_FLAG(bool, state_sync_full, false,
          "fsync the state store at every commit and the mapping journal at every record "
          "(survives power loss). Default: survive process "
          "crashes (kill -9) only, which is what pinned memory needs: a node that loses power "
          "loses its pins too.");
ABSL_FLAG(bool, recover_damaged_state, false,
          "Start even when the state directory is damaged (a damaged or lost state.db, a damaged, "
          "truncated or missing mapping-journal file): the damaged files are set aside "
          "(<name>.damaged.<time>), what was dropped is logged and counted in the "
          "dmapin_agent_store_recovery_* metrics. Without it such an agent refuses to start "
          "(DATA_LOSS naming the file and offset).");
ABSL_FLAG(std::string, backend, "sim",
          "Pinning backend: 'sim' (simulated memory, no real pinning: demos and tests), "
          "'memlock' (real mlock + /proc/self/pagemap of the VMMs' memory, which they share with "
          "the agent; or, simulating VMMs, of memory the agent allocates itself for contexts "
          "created with memory_bytes; needs root), or "
          "'vfio-type1' / 'vfio-spapr-v2' (memlock plus a real VFIO container per container, "
          "opened on the IOMMU groups CreateContainer names; needs /dev/vfio and root).");
ABSL_FLAG(std::string, hugetlbfs_dir, "",
          "memlock backend: hugetlbfs mount for MEMORY_BACKING_HUGETLBFS contexts (default: the "
          "first hugetlbfs mount).");
ABSL_FLAG(uint64_t, sim_page_size, 65536, "sim backend: the node's page size in bytes.");
ABSL_FLAG(std::string, sim_holes, "",
          "sim backend: unpinnable ranges, comma-separated ua:size (C notation), e.g. "
          "0x10050000:0x10000.");
ABSL_FLAG(std::string, sim_readonly, "", "sim backend: read-only ranges, like --sim_holes.");
ABSL_FLAG(std::string, sim_huge, "",
          "sim backend: huge-page ranges, comma-separated ua:size:huge_page_size.");
ABSL_FLAG(uint64_t, max_region_bytes, 0,
          "Largest region one registration may pin, in bytes; 0: the node's physical memory. A "
          "larger RegisterRegion answers ENOMEM (RESOURCE_EXHAUSTED) and changes nothing.");
ABSL_FLAG(uint64_t, max_pinned_bytes, 0,
          "Most bytes the node's registrations may pin at once, summed over every context; 0: the "
          "node's physical memory. A RegisterRegion past it answers ENOMEM (RESOURCE_EXHAUSTED). "
          "Regions restored at start stay even when they exceed a lowered limit.");
ABSL_FLAG(uint64_t, reserved_bytes, 0,
          "Memory the node never pins, in bytes: the default --max_pinned_bytes is the node's "
          "physical memory less this. 0: 1/16 of the physical memory, at least 1 GiB.");
ABSL_FLAG(uint64_t, context_memlock_limit_bytes, 0,
          "The most one context may pin (its RLIMIT_MEMLOCK), the node's decision: a VMM or a "
          "network client may ask for less, never more, unlimited or the waiver (cap_ipc_lock), "
          "which take a manager (--manager_uids); EPERM otherwise. 0: no per-context limit "
          "(--max_pinned_bytes bounds all contexts together); the waiver still takes a manager.");
ABSL_FLAG(uint64_t, max_contexts, 4096, "Most contexts on the node (ENOSPC beyond).");
ABSL_FLAG(uint64_t, max_contexts_per_owner, 64, "Most contexts one VMM process may own (ENOSPC).");
ABSL_FLAG(uint64_t, max_containers, 4096, "Most containers on the node (ENOSPC beyond).");
ABSL_FLAG(uint64_t, max_regions_per_context, 65536,
          "Most registered regions in one context (ENOSPC beyond).");
ABSL_FLAG(std::string, server, "",
          "gRPC address of the central service (dmapin-server), e.g. dmapin-server:7480. The "
          "agent holds one control stream to it, reconnecting with backoff; it serves its node "
          "whether or not the server is reachable. Empty: no central service.");
ABSL_FLAG(std::vector<std::string>, node_labels, {},
          "Labels of this node reported to the central service, comma-separated key=value "
          "(e.g. pool=a,zone=z1); the server's policies select nodes by them.");
ABSL_FLAG(uint32_t, report_interval_ms, 1000,
          "How often to send the central service counter deltas or a heartbeat (the server's "
          "Welcome may override it).");

namespace dmapin::agent {
namespace {

absl::StatusOr<std::map<std::string, std::string>> ParseLabels(
    const std::vector<std::string>& pairs) {
  std::map<std::string, std::string> labels;
  for (const std::string& pair : pairs) {
    std::vector<std::string> kv = absl::StrSplit(pair, absl::MaxSplits('=', 1));
    if (kv.size() != 2 || kv[0].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--node_labels: \"", pair, "\" is not key=value"));
    }
    labels[kv[0]] = kv[1];
  }
  return labels;
}

absl::StatusOr<uint64_t> ParseNumber(absl::string_view text) {
  uint64_t value = 0;
  if (absl::StartsWith(text, "0x") || absl::StartsWith(text, "0X")) {
    if (absl::SimpleHexAtoi(text.substr(2), &value)) return value;
  } else if (absl::SimpleAtoi(text, &value)) {
    return value;
  }
  return absl::InvalidArgumentError(absl::StrCat("bad number \"", text, "\""));
}

// Parses "ua:size[:page],..." into tuples of `fields` numbers.
absl::StatusOr<std::vector<std::vector<uint64_t>>> ParseRanges(absl::string_view flag,
                                                               absl::string_view text,
                                                               size_t fields) {
  std::vector<std::vector<uint64_t>> ranges;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    std::vector<absl::string_view> parts = absl::StrSplit(item, ':');
    if (parts.size() != fields) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": \"", item, "\" needs ", fields, " colon-separated numbers"));
    }
    std::vector<uint64_t> numbers;
    for (absl::string_view part : parts) {
      absl::StatusOr<uint64_t> number = ParseNumber(part);
      if (!number.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", flag, ": ", number.status().message()));
      }
      numbers.push_back(*number);
    }
    ranges.push_back(std::move(numbers));
  }
  return ranges;
}

bool IsVfioBackend(absl::string_view backend) {
  return backend == kVfioType1Backend || backend == kVfioSpaprV2Backend;
}

absl::StatusOr<std::unique_ptr<PinBackend>> MakeBackend() {
  const std::string backend = absl::GetFlag(FLAGS_backend);
  // The VFIO backends pin in the kernel through the container; the registry's own pins and
  // frame numbers come from memlock (the agent maps the contexts' memory itself).
  if (backend == "memlock" || IsVfioBackend(backend)) {
    absl::StatusOr<std::unique_ptr<MemlockBackend>> memlock = MemlockBackend::Create();
    if (!memlock.ok()) return memlock.status();
    return std::unique_ptr<PinBackend>(std::move(*memlock));
  }
  if (backend != "sim") {
    return absl::InvalidArgumentError(absl::StrCat("--backend=", backend,
                                                   ": expected sim, memlock, ", kVfioType1Backend,
                                                   " or ", kVfioSpaprV2Backend));
  }
  SimBackendOptions options{.page_size = absl::GetFlag(FLAGS_sim_page_size)};
  auto holes = ParseRanges("sim_holes", absl::GetFlag(FLAGS_sim_holes), 2);
  if (!holes.ok()) return holes.status();
  for (const auto& range : *holes) options.holes.push_back({range[0], range[1]});
  auto readonly = ParseRanges("sim_readonly", absl::GetFlag(FLAGS_sim_readonly), 2);
  if (!readonly.ok()) return readonly.status();
  for (const auto& range : *readonly) options.readonly.push_back({range[0], range[1]});
  auto huge = ParseRanges("sim_huge", absl::GetFlag(FLAGS_sim_huge), 3);
  if (!huge.ok()) return huge.status();
  for (const auto& range : *huge) options.huge.push_back({range[0], range[1], range[2]});
  absl::StatusOr<std::unique_ptr<SimBackend>> sim = SimBackend::Create(std::move(options));
  if (!sim.ok()) return sim.status();
  return std::unique_ptr<PinBackend>(std::move(*sim));
}

// Starts the HTTP server for /metrics. prometheus-cpp (civetweb) reports a failed bind by throwing;
// this is the one place the agent meets a throwing library, so the exception ends here.
absl::StatusOr<std::unique_ptr<prometheus::Exposer>> StartExposer(const std::string& address) {
  try {
    return std::make_unique<prometheus::Exposer>(address, /*num_threads=*/1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics: ", e.what()));
  }
}

// What this node could run, reported in GetNodeStatus and to the central service (the VFIO
// backends by VFIO_CHECK_EXTENSION on /dev/vfio/vfio).
std::vector<std::string> DetectBackends() {
  std::vector<std::string> backends = {"sim"};
  if (MemlockBackend::Create().ok()) backends.push_back("memlock");
  RealVfioKernel kernel;
  for (std::string& vfio : DetectVfioBackends(kernel)) backends.push_back(std::move(vfio));
  return backends;
}

// --max_region_bytes and --max_pinned_bytes, 0 meaning the node's physical memory less the
// reserve it never pins (--reserved_bytes).
RegistryLimits LimitsFromFlags() {
  RegistryLimits limits = DefaultRegistryLimits();
  const uint64_t memory = limits.max_pinned_bytes;
  uint64_t reserve = absl::GetFlag(FLAGS_reserved_bytes);
  if (reserve == 0) reserve = std::max<uint64_t>(uint64_t{1} << 30, memory / 16);
  limits.max_pinned_bytes = memory > reserve ? memory - reserve : memory / 2;
  limits.max_region_bytes = std::min(limits.max_region_bytes, limits.max_pinned_bytes);
  if (const uint64_t region = absl::GetFlag(FLAGS_max_region_bytes); region != 0) {
    limits.max_region_bytes = region;
  }
  if (const uint64_t pinned = absl::GetFlag(FLAGS_max_pinned_bytes); pinned != 0) {
    limits.max_pinned_bytes = pinned;
  }
  return limits;
}

std::optional<uint64_t> ContextMemlockLimit() {
  const uint64_t limit = absl::GetFlag(FLAGS_context_memlock_limit_bytes);
  if (limit == 0) return std::nullopt;
  return limit;
}

absl::StatusOr<std::vector<uid_t>> ManagerUids() {
  std::vector<uid_t> uids;
  for (const std::string& text : absl::GetFlag(FLAGS_manager_uids)) {
    uint32_t uid = 0;
    if (!absl::SimpleAtoi(text, &uid)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--manager_uids: \"", text, "\" is not a uid"));
    }
    uids.push_back(uid);
  }
  return uids;
}

// The memory socket's requests: descriptors of a VMM's memory for one of its contexts, its
// devices, and its container back after a restart.
v1::MemorySocketReply AttachFromSocket(NodeAgent& agent, const PeerCredentials& peer,
                                       const v1::MemorySocketRequest& request,
                                       const std::vector<UniqueFd>& fds) {
  std::vector<SlotSource> sources;
  sources.reserve(std::min<size_t>(request.slots_size(), GuestMemory::kMaxSlots + 1));
  for (const v1::MemorySlot& slot : request.slots()) {
    if (sources.size() > GuestMemory::kMaxSlots) break;  // Attach refuses it, naming the limit
    // fd_index is in range: the server checked it (MemorySocketServer::Handler).
    sources.push_back({.ua = slot.ua(),
                       .size = slot.size(),
                       .offset = slot.offset(),
                       .fd = fds[slot.fd_index()].get()});
  }
  absl::StatusOr<ContextView> view =
      agent.AttachMemory(request.context(), sources, Caller::Local(peer.pid, peer.uid));
  if (!view.ok()) return ReplyFor(WithErrno(view.status()));
  v1::MemorySocketReply reply;
  Fill(*view, reply.mutable_context());
  return reply;
}

v1::MemorySocketReply ServeMemorySocket(NodeAgent& agent, const PeerCredentials& peer,
                                        const v1::MemorySocketRequest& request,
                                        std::vector<UniqueFd>& fds,
                                        std::vector<UniqueFd>* reply_fds) {
  const Caller caller = Caller::Local(peer.pid, peer.uid);
  if (request.has_open_devices()) {
    const v1::OpenDevicesRequest& open = request.open_devices();
    std::vector<std::string> devices(open.devices().begin(), open.devices().end());
    absl::StatusOr<DeviceHandoff> handoff = agent.OpenDevices(open.container(), devices, caller);
    if (!handoff.ok()) return ReplyFor(WithErrno(handoff.status()));
    v1::MemorySocketReply reply;
    Fill(handoff->container, reply.mutable_container());
    // The real kernel's descriptors are the process's own.
    for (VfioFd& fd : handoff->fds) reply_fds->emplace_back(fd.release());
    return reply;
  }
  if (request.has_adopt_container()) {
    const std::string& name = request.adopt_container().container();
    absl::StatusOr<AdoptionReport> report = agent.AdoptContainer(name, fds[0].release(), caller);
    if (!report.ok()) return ReplyFor(WithErrno(report.status()));
    v1::MemorySocketReply reply;
    reply.mutable_adoption()->set_registrations(report->registrations);
    reply.mutable_adoption()->set_mappings(report->mappings);
    reply.mutable_adoption()->set_inconsistencies(report->inconsistencies);
    if (absl::StatusOr<ContainerView> view = agent.GetContainer(name); view.ok()) {
      Fill(*view, reply.mutable_container());
    }
    return reply;
  }
  return AttachFromSocket(agent, peer, request, fds);
}

std::string NodeName() {
  std::string name = absl::GetFlag(FLAGS_node_name);
  if (!name.empty()) return name;
  if (const char* env = std::getenv("NODE_NAME"); env != nullptr && *env != '\0') return env;
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  return host;
}

int Run() {
  // SIGTERM/SIGINT are taken by sigwait below. Block them before any thread starts (gRPC, the
  // metrics server): threads inherit the mask, and one that did not block them would take the
  // signal's default action and kill the agent without a graceful shutdown.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // Before anything opens a descriptor: connections are limited below what this allows.
  const uint64_t fd_limit = RaiseFdLimit();
  // Secure by default: mutual TLS on the TCP port and to the server, or plaintext only when asked
  // for. The Unix socket is local and known by SO_PEERCRED: never TLS.
  // Without a TCP port and a server there is nothing to secure: only the Unix socket.
  const bool uses_tcp =
      !absl::GetFlag(FLAGS_tcp_address).empty() || !absl::GetFlag(FLAGS_server).empty();
  absl::StatusOr<TransportSecurity> security =
      uses_tcp ? TransportSecurityFromFlags() : TransportSecurity{.insecure = true};
  if (!security.ok()) {
    LOG(ERROR) << "dmapin-agent: " << security.status().message();
    return 2;
  }
  // Only --insecure itself shows as insecure then (nothing on TCP is exposed otherwise).
  if (!uses_tcp) security->insecure = InsecureFlag();
  absl::StatusOr<std::unique_ptr<AuthGate>> auth = AuthGate::FromFlags(*security);
  if (!auth.ok()) {
    LOG(ERROR) << "dmapin-agent: " << auth.status().message();
    return 2;
  }
  if (uses_tcp) LogTransportSecurity(*security, "dmapin-agent");
  const std::string state_dir = absl::GetFlag(FLAGS_state_dir);
  absl::StatusOr<std::unique_ptr<PinBackend>> backend = MakeBackend();
  if (!backend.ok()) {
    LOG(ERROR) << absl::StrFormat("dmapin-agent: backend: %s", backend.status().ToString().c_str());
    return 2;
  }
  absl::StatusOr<std::unique_ptr<StateStore>> store = StateStore::Open(
      state_dir, {.sync_full = absl::GetFlag(FLAGS_state_sync_full),
                  .recover_damaged_state = absl::GetFlag(FLAGS_recover_damaged_state)});
  if (!store.ok()) {
    LOG(ERROR) << absl::StrFormat("dmapin-agent: state store %s: %s", state_dir.c_str(),
                                  store.status().ToString().c_str());
    return 1;
  }
  for (const std::string& line : (*store)->recovery_report()) {
    LOG(WARNING) << absl::StrFormat("dmapin-agent: state store %s: recovered from damage: %s",
                                    state_dir.c_str(), line.c_str());
  }
  // With real pinning the agent maps the contexts' memory itself.
  std::unique_ptr<ContextMemoryProvider> memory;
  if ((*backend)->name() == "memlock") {
    memory = NewBackedMemoryProvider(absl::GetFlag(FLAGS_hugetlbfs_dir));
  }
  const std::string backend_flag = absl::GetFlag(FLAGS_backend);
  RealVfioKernel vfio_kernel;
  std::function<absl::StatusOr<std::unique_ptr<VfioContainerDriver>>(
      const std::vector<std::string>&)>
      open_vfio_container;
  std::function<std::unique_ptr<VfioContainerDriver>()> new_vfio_driver;
  if (IsVfioBackend(backend_flag)) {
    new_vfio_driver = [&vfio_kernel, backend_flag] {
      return NewVfioContainerDriver(backend_flag, &vfio_kernel);
    };
    open_vfio_container = [&vfio_kernel, backend_flag](const std::vector<std::string>& groups)
        -> absl::StatusOr<std::unique_ptr<VfioContainerDriver>> {
      std::unique_ptr<VfioContainerDriver> driver =
          NewVfioContainerDriver(backend_flag, &vfio_kernel);
      if (absl::Status status = driver->Open(groups); !status.ok()) return status;
      return driver;
    };
  }
  absl::StatusOr<std::vector<uid_t>> manager_uids = ManagerUids();
  if (!manager_uids.ok()) {
    LOG(ERROR) << absl::StrFormat("dmapin-agent: %s", manager_uids.status().ToString().c_str());
    return 2;
  }
  const bool dma_from_any_peer = absl::GetFlag(FLAGS_insecure_dma_from_any_peer);
  if (dma_from_any_peer) {
    LOG(WARNING) << "dmapin-agent: --insecure_dma_from_any_peer: ANY caller, TCP peers included, "
                    "may map, unmap and translate on ANY context. Demos and tests only.";
  }
  absl::StatusOr<std::unique_ptr<NodeAgent>> agent =
      NodeAgent::Create({.node_name = NodeName(),
                         .backend = backend->get(),
                         .store = store->get(),
                         .memory_provider = memory.get(),
                         .available_backends = DetectBackends(),
                         .vfio_backend = IsVfioBackend(backend_flag) ? backend_flag : "",
                         .open_vfio_container = std::move(open_vfio_container),
                         .new_vfio_driver = std::move(new_vfio_driver),
                         .limits = LimitsFromFlags(),
                         .vmm_memory = memory != nullptr,
                         .manager_uids = std::move(*manager_uids),
                         .dma_from_any_peer = dma_from_any_peer,
                         .context_memlock_limit_bytes = ContextMemlockLimit(),
                         .max_contexts = absl::GetFlag(FLAGS_max_contexts),
                         .max_contexts_per_owner = absl::GetFlag(FLAGS_max_contexts_per_owner),
                         .max_containers = absl::GetFlag(FLAGS_max_containers),
                         .max_regions_per_context = absl::GetFlag(FLAGS_max_regions_per_context)});
  if (!agent.ok()) {
    LOG(ERROR) << absl::StrFormat("dmapin-agent: recovery from %s failed, refusing to serve: %s",
                                  state_dir.c_str(), agent.status().ToString().c_str());
    return 1;
  }

  // The listening sockets first: the metrics export their connection counts.
  const ServerLimits limits = ServerLimitsFromFlags();
  ConnectionListener listener(MaxConnectionsFor(limits.max_connections, fd_limit));
  std::vector<std::string> listening;
  const std::string tcp = absl::GetFlag(FLAGS_tcp_address);
  int tcp_port = 0;
  // TLS: gRPC listens on the TCP port itself (it takes only plaintext connections from a
  // descriptor), below; --max_connections then covers the Unix socket only.
  if (!tcp.empty() && security->insecure) {
    absl::StatusOr<int> port = listener.Listen(tcp);
    if (!port.ok()) {
      LOG(ERROR) << absl::StrFormat("dmapin-agent: could not listen on %s: %s", tcp.c_str(),
                                    port.status().ToString().c_str());
      return 1;
    }
    tcp_port = *port;
  }
  if (!tcp.empty()) listening.push_back(tcp);
  const std::string uds = absl::GetFlag(FLAGS_uds_path);
  if (!uds.empty()) {
    std::error_code ignored;
    std::filesystem::create_directories(std::filesystem::path(uds).parent_path(), ignored);
    std::filesystem::remove(uds, ignored);  // a stale socket from a previous run
    if (absl::StatusOr<int> port = listener.Listen("unix:" + uds); !port.ok()) {
      LOG(ERROR) << absl::StrFormat("dmapin-agent: could not listen on unix:%s: %s", uds.c_str(),
                                    port.status().ToString().c_str());
      return 1;
    }
    listening.push_back("unix:" + uds);
  }
  // Who may connect: the owner and --socket_gid (a socket needs write permission to connect).
  const int32_t socket_gid = absl::GetFlag(FLAGS_socket_gid);
  auto restrict_socket = [socket_gid](const std::string& path) -> bool {
    if (socket_gid >= 0 && chown(path.c_str(), static_cast<uid_t>(-1), socket_gid) != 0) {
      LOG(ERROR) << absl::StrFormat("dmapin-agent: chown %s to gid %d: %s", path.c_str(),
                                    socket_gid, strerror(errno));
      return false;
    }
    if (chmod(path.c_str(), 0660) != 0) {
      LOG(ERROR) << absl::StrFormat("dmapin-agent: chmod %s: %s", path.c_str(), strerror(errno));
      return false;
    }
    return true;
  };
  if (!uds.empty() && !restrict_socket(uds)) return 1;
  if (listening.empty()) {
    LOG(ERROR) << "dmapin-agent: neither --tcp_address nor --uds_path is set";
    return 2;
  }

  std::unique_ptr<MemorySocketServer> memory_socket;
  std::string memory_socket_path = absl::GetFlag(FLAGS_memory_socket_path);
  if (memory_socket_path.empty() && !uds.empty()) memory_socket_path = uds + ".memory";
  if (memory_socket_path == "none") memory_socket_path.clear();
  if (const std::string& path = memory_socket_path; !path.empty()) {
    std::error_code ignored;
    std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ignored);
    NodeAgent* core = agent->get();
    absl::StatusOr<std::unique_ptr<MemorySocketServer>> started = MemorySocketServer::Start(
        path, [core](const PeerCredentials& peer, const v1::MemorySocketRequest& request,
                     std::vector<UniqueFd>& fds, std::vector<UniqueFd>* reply_fds) {
          return ServeMemorySocket(*core, peer, request, fds, reply_fds);
        });
    if (!started.ok()) {
      LOG(ERROR) << absl::StrFormat("dmapin-agent: --memory_socket_path=%s: %s", path.c_str(),
                                    started.status().ToString().c_str());
      return 1;
    }
    memory_socket = std::move(*started);
    if (!restrict_socket(path)) return 1;
    LOG(INFO) << absl::StrFormat("dmapin-agent: memory socket on %s", path.c_str());
  }

  // Metrics are recorded only when they are served.
  // The exposer holds collectables weakly: this one lives as long as Run.
  const std::shared_ptr<prometheus::Collectable> auth_metrics =
      (*auth)->Collectable("dmapin_agent");
  const std::string metrics_address = absl::GetFlag(FLAGS_metrics_address);
  std::unique_ptr<AgentMetrics> metrics;
  std::unique_ptr<prometheus::Exposer> exposer;
  int metrics_port = 0;
  if (!metrics_address.empty()) {
    metrics =
        std::make_unique<AgentMetrics>(AgentMetricsOptions{.agent = agent->get(),
                                                           .store = store->get(),
                                                           .listener = &listener,
                                                           .memory_socket = memory_socket.get()});
    absl::StatusOr<std::unique_ptr<prometheus::Exposer>> started = StartExposer(metrics_address);
    if (!started.ok()) {
      LOG(ERROR) << absl::StrFormat("dmapin-agent: --metrics_address=%s: %s",
                                    metrics_address.c_str(), started.status().ToString().c_str());
      return 1;
    }
    exposer = std::move(*started);
    exposer->RegisterCollectable(metrics->collectable());
    exposer->RegisterCollectable(auth_metrics);
    const std::vector<int> ports = exposer->GetListeningPorts();
    if (!ports.empty()) metrics_port = ports.front();
  }

  // Callers are known by their connection: a Unix-socket peer by SO_PEERCRED (a VMM, a manager),
  // anything else is a TCP peer.
  NodeAgentService service(
      agent->get(), metrics.get(),
      [&listener](const std::string& peer) {
        if (std::optional<UnixPeer> local = listener.UnixPeerOf(FdOfGrpcPeer(peer))) {
          return Caller::Local(local->pid, local->uid);
        }
        return Caller::Remote();
      },
      // A Unix-socket caller is checked by SO_PEERCRED in the core; a TCP caller must hold the
      // server's or an admin's certificate (everything passes with --insecure).
      [&listener, gate = auth->get()](grpc::CallbackServerContext* context,
                                      absl::string_view method) {
        if (listener.UnixPeerOf(FdOfGrpcPeer(context->peer())).has_value()) {
          return absl::OkStatus();
        }
        return gate->AgentRemote(*context, method);
      });
  // Plaintext, health only (HealthOnlyServer drops the reflection plugin).
  absl::StatusOr<std::unique_ptr<HealthOnlyServer>> health_started =
      StartHealthOnlyServer("dmapin-agent", absl::GetFlag(FLAGS_health_address));
  if (!health_started.ok()) {
    LOG(ERROR) << "dmapin-agent: " << health_started.status().message();
    return 1;
  }
  std::unique_ptr<HealthOnlyServer> health_only = *std::move(health_started);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!tcp.empty() && !security->insecure) {
    builder.AddListeningPort(tcp, ServerCredentialsFor(*security), &tcp_port);
  }
  // Otherwise no listening port: `listener` accepts the connections and hands them over.
  ApplyServerLimits(limits, builder);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || (!tcp.empty() && tcp_port == 0)) {
    LOG(ERROR) << absl::StrFormat("dmapin-agent: could not start the gRPC server%s",
                                  tcp.empty() ? "" : (" on " + tcp).c_str());
    return 1;
  }
  listener.Start(server.get());
  // The control stream starts once the node is served: decisions may arrive at once.
  std::unique_ptr<ControlClient> control;
  if (const std::string address = absl::GetFlag(FLAGS_server); !address.empty()) {
    absl::StatusOr<std::map<std::string, std::string>> labels =
        ParseLabels(absl::GetFlag(FLAGS_node_labels));
    if (!labels.ok()) {
      LOG(ERROR) << absl::StrFormat("dmapin-agent: %s", labels.status().ToString().c_str());
      return 2;
    }
    control = std::make_unique<ControlClient>(
        agent->get(),
        ControlClientOptions{
            .server_address = address,
            .labels = std::move(*labels),
            .report_interval = std::chrono::milliseconds(absl::GetFlag(FLAGS_report_interval_ms)),
            .max_region_bytes = (*agent)->registry_limits().max_region_bytes,
            .max_pinned_bytes = (*agent)->registry_limits().max_pinned_bytes,
            // Only the server's certificate (spiffe://<trust domain>/server, or a --tls_roles
            // entry for role server) is the central service: not any certificate of the CA.
            .credentials = ChannelCredentialsFor(*security, (*auth)->ServerVerifier()),
            .tls_server_name = security->server_name,
            .keepalive_time = std::chrono::seconds(30)});
    if (absl::Status status = control->Start(); !status.ok()) {
      LOG(ERROR) << absl::StrFormat("dmapin-agent: control stream to %s: %s", address.c_str(),
                                    status.ToString().c_str());
      return 1;
    }
    LOG(INFO) << absl::StrFormat("dmapin-agent: control stream to the central service at %s",
                                 address.c_str());
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(true);
  if (health_only != nullptr) health_only->SetServing(true);
  if (exposer != nullptr) {
    LOG(INFO) << absl::StrFormat("dmapin-agent: metrics on http://%s/metrics (metrics port %d)",
                                 WithPort(metrics_address, metrics_port).c_str(), metrics_port);
  }
  LOG(INFO) << absl::StrFormat("dmapin-agent: at most %zu connections (fd limit %llu)",
                               listener.max_connections(),
                               static_cast<unsigned long long>(fd_limit));
  if (!tcp.empty()) listening.front() = WithPort(tcp, tcp_port);  // the port 0 picked
  const RegistryLimits registry_limits = (*agent)->registry_limits();
  LOG(INFO) << absl::StrFormat("dmapin-agent: limits: %llu bytes per region, %llu bytes pinned",
                               static_cast<unsigned long long>(registry_limits.max_region_bytes),
                               static_cast<unsigned long long>(registry_limits.max_pinned_bytes));
  LOG(INFO) << absl::StrFormat(
      "dmapin-agent: node %s, backend %s, state %s, serving on %s (tcp port %d)",
      NodeName().c_str(), (*agent)->Status().backend.c_str(), state_dir.c_str(),
      absl::StrJoin(listening, ", ").c_str(), tcp_port);

  // SIGTERM/SIGINT end the agent gracefully; the health status follows the store's health.
  std::atomic<bool> stopping{false};
  std::thread watchdog([&] {
    bool serving = true;
    while (!stopping.load()) {
      const bool healthy = (*agent)->healthy();
      if (healthy != serving) {
        health->SetServingStatus(healthy);
        if (health_only != nullptr) health_only->SetServing(healthy);
        serving = healthy;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
  int signal = 0;
  sigwait(&signals, &signal);
  LOG(INFO) << absl::StrFormat("dmapin-agent: signal %d, shutting down", signal);
  stopping = true;
  watchdog.join();
  health->SetServingStatus(false);
  if (health_only != nullptr) health_only->SetServing(false);
  if (control != nullptr) control->Stop();
  listener.Stop();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  memory_socket.reset();
  // A planned exit: nothing is served any more; the kernel forgets the agent's addresses of the
  // containers the VMMs hold (their devices keep every IOVA mapping for the next agent).
  (*agent)->PrepareForExit();
  // The exposer's threads read the metrics, which read the agent: stop them first.
  exposer.reset();
  return 0;
}

}  // namespace
}  // namespace dmapin::agent

int main(int argc, char** argv) {
  dmapin::InitBinary(
      argc, argv,
      "dmapin node agent: serves the node's DMA pre-registration registry over gRPC.\n"
      "Usage: dmapin-agent [--backend=sim|memlock|vfio-type1|vfio-spapr-v2] [--state_dir=DIR] "
      "[--tcp_address=HOST:PORT] [--uds_path=PATH] [--metrics_address=HOST:PORT] "
      "[--server=HOST:PORT]",
      "dmapin_agent");
  return dmapin::agent::Run();
}
