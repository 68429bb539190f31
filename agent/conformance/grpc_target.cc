#include "agent/conformance/grpc_target.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/errno_status.h"

namespace dmapin::agent::conformance {
namespace {

// Longest base of an agent name; leaves room for a generation suffix within the agent's 128.
constexpr size_t kMaxNameBase = 120;

std::string Hex(uint64_t value) { return absl::StrFormat("0x%x", value); }

std::string RangesFlag(const std::vector<Range>& ranges) {
  std::vector<std::string> items;
  for (const Range& range : ranges)
    items.push_back(absl::StrCat(Hex(range.ua), ":", Hex(range.size)));
  return absl::StrJoin(items, ",");
}

// The case's name as a valid agent name ([A-Za-z0-9._/-], 1-128), unique among `used`.
std::string FreshName(absl::string_view name, absl::flat_hash_set<std::string>* used) {
  std::string base;
  for (char c : name.substr(0, kMaxNameBase)) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '/' || c == '-';
    base.push_back(ok ? c : '_');
  }
  if (base.empty()) base = "_";
  std::string candidate = base;
  for (int generation = 2; used->contains(candidate); ++generation) {
    candidate = absl::StrCat(base, ".", generation);
  }
  used->insert(candidate);
  return candidate;
}

// The gRPC codes spec §9 allows for an errno (EEXIST: the agent's duplicate names); nullopt for
// errnos the table does not cover.
std::optional<std::vector<grpc::StatusCode>> CodesFor(int err) {
  switch (err) {
    case EINVAL:
      return std::vector<grpc::StatusCode>{grpc::StatusCode::INVALID_ARGUMENT};
    case EBUSY:
    case ENXIO:
      return std::vector<grpc::StatusCode>{grpc::StatusCode::FAILED_PRECONDITION};
    case ENOENT:
      return std::vector<grpc::StatusCode>{grpc::StatusCode::NOT_FOUND};
    case ENOMEM:
      return std::vector<grpc::StatusCode>{grpc::StatusCode::RESOURCE_EXHAUSTED};
    case EFAULT:
      return std::vector<grpc::StatusCode>{grpc::StatusCode::OUT_OF_RANGE,
                                           grpc::StatusCode::INTERNAL};
    case EPERM:
      return std::vector<grpc::StatusCode>{grpc::StatusCode::PERMISSION_DENIED};
    case EEXIST:
      return std::vector<grpc::StatusCode>{grpc::StatusCode::ALREADY_EXISTS};
    default:
      return std::nullopt;
  }
}

RegionState RegionStateOf(const v1::Region& region) {
  RegionState state;
  state.ua = region.ua();
  state.size = region.size();
  state.used = region.used();
  state.mapped = region.mapped();
  state.pending_release = region.pending_release();
  return state;
}

std::string ShowRegion(const v1::Region& region) {
  return absl::StrCat("region ", Hex(region.ua()), "+", Hex(region.size()), " of \"",
                      region.context(), "\"");
}

}  // namespace

std::vector<std::string> GrpcTarget::AgentArgs(const Case& node, absl::string_view dir) {
  std::vector<std::string> huge;
  for (const HugeRange& range : node.huge) {
    huge.push_back(absl::StrCat(Hex(range.ua), ":", Hex(range.size), ":", Hex(range.page_size)));
  }
  return {
      "--backend=sim",
      absl::StrCat("--sim_page_size=", Hex(node.page_size)),
      absl::StrCat("--sim_holes=", RangesFlag(node.holes)),
      absl::StrCat("--sim_readonly=", RangesFlag(node.readonly)),
      absl::StrCat("--sim_huge=", absl::StrJoin(huge, ",")),
      absl::StrCat("--state_dir=", dir, "/state"),
      "--tcp_address=",
      absl::StrCat("--uds_path=", dir, "/agent.sock"),
      "--node_name=conformance",
      // No metrics server: its default port is fixed (agents of parallel tests would collide)
      // and its HTTP server takes ~1.7 s to stop. --undefok keeps agents without the flag working.
      "--metrics_address=",
      "--undefok=metrics_address",
      // The cases pick memlock limits and the waiver (cap_ipc_lock), the node's decision: the
      // test is the node's manager as well as the VMM.
      absl::StrCat("--manager_uids=", getuid()),
  };
}

absl::StatusOr<std::unique_ptr<GrpcTarget>> GrpcTarget::Create(const Case& node,
                                                               const GrpcTargetOptions& options) {
  absl::StatusOr<std::unique_ptr<harness::ScratchDir>> dir =
      harness::ScratchDir::Create("dmapin-conformance-");
  if (!dir.ok()) return dir.status();
  harness::AgentProcessOptions process;
  process.binary = options.agent_binary;
  process.args = AgentArgs(node, (*dir)->path());
  process.log_path = (*dir)->Join("agent.log");
  process.uds_path = (*dir)->Join("agent.sock");
  process.start_timeout = options.start_timeout;
  absl::StatusOr<std::unique_ptr<harness::AgentProcess>> agent =
      harness::AgentProcess::Start(std::move(process));
  if (!agent.ok()) return agent.status();
  return std::unique_ptr<GrpcTarget>(
      new GrpcTarget(node, options, *std::move(dir), *std::move(agent)));
}

GrpcTarget::GrpcTarget(const Case& node, const GrpcTargetOptions& options,
                       std::unique_ptr<harness::ScratchDir> dir,
                       std::unique_ptr<harness::AgentProcess> agent)
    : page_size_(node.page_size),
      memlock_limit_(node.memlock_limit),
      cap_ipc_lock_(node.cap_ipc_lock),
      options_(options),
      dir_(std::move(dir)),
      agent_(std::move(agent)),
      channel_(harness::MakeChannel(agent_->uds_target())),
      stub_(v1::NodeAgent::NewStub(channel_)) {}

GrpcTarget::~GrpcTarget() { Close().IgnoreError(); }

absl::Status GrpcTarget::Close() {
  if (closed_) return close_status_;
  closed_ = true;
  stub_.reset();
  channel_.reset();
  close_status_ = agent_->Terminate(options_.stop_grace);
  agent_.reset();
  dir_.reset();
  return close_status_;
}

// --- Calls ------------------------------------------------------------------------------------

template <typename Request, typename Response>
absl::Status GrpcTarget::Call(absl::string_view rpc,
                              grpc::Status (v1::NodeAgent::Stub::*method)(grpc::ClientContext*,
                                                                          const Request&,
                                                                          Response*),
                              const Request& request, Response* response) {
  if (closed_) return absl::FailedPreconditionError("the target is closed");
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       absl::ToChronoMilliseconds(options_.rpc_timeout));
  const grpc::Status status = (stub_.get()->*method)(&context, request, response);
  return ToErrnoStatus(rpc, status, context);
}

absl::Status GrpcTarget::ToErrnoStatus(absl::string_view rpc, const grpc::Status& status,
                                       const grpc::ClientContext& context) {
  if (status.ok()) return absl::OkStatus();
  WireAnswer answer = DecodeWireAnswer(rpc, status, context.GetServerTrailingMetadata());
  if (answer.no_trailer) transport_failed_ = true;
  violations_.insert(violations_.end(), answer.violations.begin(), answer.violations.end());
  return answer.status;
}

WireAnswer DecodeWireAnswer(absl::string_view rpc, const grpc::Status& status,
                            const std::multimap<grpc::string_ref, grpc::string_ref>& trailers) {
  WireAnswer answer;
  if (status.ok()) return answer;
  answer.status = harness::FromGrpcStatus(status);
  auto it = trailers.find(kErrnoTrailerKey);
  if (it == trailers.end()) {
    answer.no_trailer = true;
    answer.violations.push_back(absl::StrCat(rpc, " failed with ", answer.status.ToString(),
                                             " and no \"", kErrnoTrailerKey, "\" trailer"));
    return answer;
  }
  const std::string name(it->second.data(), it->second.size());
  const std::optional<int> err = ErrnoFromName(name);
  if (!err.has_value()) {
    answer.violations.push_back(absl::StrCat(rpc, ": unknown errno \"", name,
                                             "\" in the trailer of ", answer.status.ToString()));
    return answer;
  }
  if (!absl::StartsWith(status.error_message(), absl::StrCat(name, ":"))) {
    answer.violations.push_back(absl::StrCat(rpc, ": the trailer says ", name,
                                             " but the message does not start with \"", name,
                                             ":\": ", answer.status.ToString()));
  }
  if (std::optional<std::vector<grpc::StatusCode>> codes = CodesFor(*err);
      codes.has_value() &&
      std::find(codes->begin(), codes->end(), status.error_code()) == codes->end()) {
    answer.violations.push_back(absl::StrCat(
        rpc, ": ", name, " came with gRPC code ", absl::StatusCodeToString(answer.status.code()),
        ", not the one spec §9 assigns: ", answer.status.ToString()));
  }
  answer.status.SetPayload(kErrnoPayloadUrl, absl::Cord(name));
  return answer;
}

// --- Names ------------------------------------------------------------------------------------

absl::StatusOr<GrpcTarget::ContextSlot> GrpcTarget::ContextFor(absl::string_view name,
                                                               bool for_check) {
  auto it = contexts_.find(name);
  if (it != contexts_.end() && (!it->second.torn_down || for_check)) return it->second;
  ContextSlot slot;
  slot.agent_name = FreshName(name, &used_context_names_);
  v1::CreateContextRequest request;
  request.set_name(slot.agent_name);
  if (memlock_limit_.has_value()) {
    request.set_memlock_limit_bytes(*memlock_limit_);
  } else {
    request.set_memlock_unlimited(true);
  }
  request.set_cap_ipc_lock(cap_ipc_lock_);
  v1::Context response;
  absl::Status status =
      Call("CreateContext", &v1::NodeAgent::Stub::CreateContext, request, &response);
  if (!status.ok()) return status;
  contexts_[std::string(name)] = slot;
  return slot;
}

absl::StatusOr<std::string> GrpcTarget::ContainerFor(absl::string_view name) {
  auto it = containers_.find(name);
  if (it != containers_.end()) return it->second;
  const std::string agent_name = FreshName(name, &used_container_names_);
  v1::CreateContainerRequest request;
  request.set_name(agent_name);
  request.set_iommu_page_size(page_size_);
  request.set_window_start(0);
  request.set_window_size(kDefaultWindowSize);
  v1::Container response;
  absl::Status status =
      Call("CreateContainer", &v1::NodeAgent::Stub::CreateContainer, request, &response);
  if (!status.ok()) return status;
  containers_.emplace(std::string(name), agent_name);
  return agent_name;
}

absl::Status GrpcTarget::ForgetReleasedContainers() {
  v1::ListContainersResponse listed;
  absl::Status status = Call("ListContainers", &v1::NodeAgent::Stub::ListContainers,
                             v1::ListContainersRequest(), &listed);
  if (!status.ok()) return status;
  absl::flat_hash_set<std::string> alive;
  for (const v1::Container& container : listed.containers()) alive.insert(container.name());
  for (auto it = containers_.begin(); it != containers_.end();) {
    if (alive.contains(it->second)) {
      ++it;
    } else {
      containers_.erase(it++);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::Region>> GrpcTarget::ListRegions(const std::string& agent_context) {
  v1::ListRegionsRequest request;
  request.set_context(agent_context);
  v1::ListRegionsResponse response;
  absl::Status status = Call("ListRegions", &v1::NodeAgent::Stub::ListRegions, request, &response);
  if (!status.ok()) return status;
  return std::vector<v1::Region>(response.regions().begin(), response.regions().end());
}

absl::StatusOr<std::vector<v1::Region>> GrpcTarget::Leftovers(const ContextSlot& slot) {
  // An agent that still knows the name after teardown lists what it kept under it.
  absl::StatusOr<std::vector<v1::Region>> own = ListRegions(slot.agent_name);
  if (own.ok() || ErrnoOf(own.status()) != ENOENT) return own;
  // Otherwise look for regions of the torn-down context the agent lists without a known name
  // ("#<id>"): the ones it had just before the teardown.
  absl::StatusOr<std::vector<v1::Region>> all = ListRegions("");
  if (!all.ok()) return all.status();
  std::vector<v1::Region> left;
  for (const v1::Region& region : *all) {
    const bool ours =
        region.context() == slot.agent_name ||
        (absl::StartsWith(region.context(), "#") &&
         std::find(slot.regions_at_teardown.begin(), slot.regions_at_teardown.end(),
                   Range{region.ua(), region.size()}) != slot.regions_at_teardown.end());
    if (ours) left.push_back(region);
  }
  return left;
}

// --- Operations -------------------------------------------------------------------------------

absl::Status GrpcTarget::CreateContainer(absl::string_view container,
                                         const ContainerSettings& settings) {
  // A name in use keeps its agent name, so that the agent itself answers EEXIST.
  auto known = containers_.find(container);
  const std::string agent_name =
      known != containers_.end() ? known->second : FreshName(container, &used_container_names_);
  v1::CreateContainerRequest request;
  request.set_name(agent_name);
  request.set_iommu_page_size(settings.iommu_page_size.value_or(page_size_));
  request.set_window_start(settings.window_start.value_or(0));
  request.set_window_size(settings.window_size.value_or(kDefaultWindowSize));
  v1::Container response;
  absl::Status status =
      Call("CreateContainer", &v1::NodeAgent::Stub::CreateContainer, request, &response);
  if (status.ok()) containers_.emplace(std::string(container), agent_name);
  return status;
}

absl::Status GrpcTarget::ReleaseContainer(absl::string_view container) {
  absl::StatusOr<std::string> agent_name = ContainerFor(container);
  if (!agent_name.ok()) return agent_name.status();
  v1::ReleaseContainerRequest request;
  request.set_name(*agent_name);
  v1::ReleaseContainerResponse response;
  absl::Status status =
      Call("ReleaseContainer", &v1::NodeAgent::Stub::ReleaseContainer, request, &response);
  if (absl::Status forgot = ForgetReleasedContainers(); !forgot.ok()) {
    violations_.push_back(
        absl::StrCat("ListContainers after ReleaseContainer: ", forgot.ToString()));
  }
  return status;
}

absl::Status GrpcTarget::TeardownContext(absl::string_view context) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context);
  if (!slot.ok()) return slot.status();
  absl::StatusOr<std::vector<v1::Region>> before = ListRegions(slot->agent_name);
  if (!before.ok()) return before.status();
  v1::TeardownContextRequest request;
  request.set_name(slot->agent_name);
  v1::TeardownContextResponse response;
  absl::Status status =
      Call("TeardownContext", &v1::NodeAgent::Stub::TeardownContext, request, &response);
  if (status.ok()) {
    ContextSlot& stored = contexts_[std::string(context)];
    stored.torn_down = true;
    stored.regions_at_teardown.clear();
    for (const v1::Region& region : *before) {
      stored.regions_at_teardown.push_back(Range{region.ua(), region.size()});
    }
  }
  if (absl::Status forgot = ForgetReleasedContainers(); !forgot.ok()) {
    violations_.push_back(
        absl::StrCat("ListContainers after TeardownContext: ", forgot.ToString()));
  }
  return status;
}

absl::Status GrpcTarget::Register(absl::string_view context, absl::string_view container,
                                  uint64_t ua, uint64_t size) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context);
  if (!slot.ok()) return slot.status();
  absl::StatusOr<std::string> agent_name = ContainerFor(container);
  if (!agent_name.ok()) return agent_name.status();
  v1::RegisterRegionRequest request;
  request.set_container(*agent_name);
  request.set_context(slot->agent_name);
  request.set_ua(ua);
  request.set_size(size);
  v1::Region response;
  return Call("RegisterRegion", &v1::NodeAgent::Stub::RegisterRegion, request, &response);
}

absl::Status GrpcTarget::Unregister(absl::string_view /*context*/, absl::string_view container,
                                    uint64_t ua, uint64_t size) {
  absl::StatusOr<std::string> agent_name = ContainerFor(container);
  if (!agent_name.ok()) return agent_name.status();
  v1::UnregisterRegionRequest request;
  request.set_container(*agent_name);
  request.set_ua(ua);
  request.set_size(size);
  v1::UnregisterRegionResponse response;
  return Call("UnregisterRegion", &v1::NodeAgent::Stub::UnregisterRegion, request, &response);
}

absl::Status GrpcTarget::Map(absl::string_view /*context*/, absl::string_view container,
                             uint64_t iova, uint64_t ua, uint64_t size) {
  absl::StatusOr<std::string> agent_name = ContainerFor(container);
  if (!agent_name.ok()) return agent_name.status();
  v1::MapDmaRequest request;
  request.set_container(*agent_name);
  request.set_iova(iova);
  request.set_ua(ua);
  request.set_size(size);
  v1::MapDmaResponse response;
  return Call("MapDma", &v1::NodeAgent::Stub::MapDma, request, &response);
}

absl::Status GrpcTarget::Unmap(absl::string_view /*context*/, absl::string_view container,
                               uint64_t iova, uint64_t size) {
  absl::StatusOr<std::string> agent_name = ContainerFor(container);
  if (!agent_name.ok()) return agent_name.status();
  v1::UnmapDmaRequest request;
  request.set_container(*agent_name);
  request.set_iova(iova);
  request.set_size(size);
  v1::UnmapDmaResponse response;
  return Call("UnmapDma", &v1::NodeAgent::Stub::UnmapDma, request, &response);
}

absl::StatusOr<uint64_t> GrpcTarget::Translate(absl::string_view context, uint64_t ua) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context);
  if (!slot.ok()) return slot.status();
  v1::TranslateRequest request;
  request.set_context(slot->agent_name);
  request.add_uas(ua);
  v1::TranslateResponse response;
  absl::Status status = Call("Translate", &v1::NodeAgent::Stub::Translate, request, &response);
  if (!status.ok()) return status;
  if (response.hpas_size() != 1) {
    return absl::InternalError(
        absl::StrCat("Translate of one ua answered ", response.hpas_size(), " hpas"));
  }
  return response.hpas(0);
}

absl::StatusOr<std::optional<Range>> GrpcTarget::Lookup(absl::string_view context, uint64_t ua,
                                                        uint64_t size) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context);
  if (!slot.ok()) return slot.status();
  v1::LookupRequest request;
  request.set_context(slot->agent_name);
  request.set_ua(ua);
  request.set_size(size);
  v1::LookupResponse response;
  absl::Status status = Call("Lookup", &v1::NodeAgent::Stub::Lookup, request, &response);
  if (!status.ok()) return status;
  if (!response.has_region()) return std::optional<Range>();
  return std::optional<Range>(Range{response.region().ua(), response.region().size()});
}

absl::StatusOr<std::optional<RegionState>> GrpcTarget::FindRegion(absl::string_view context,
                                                                  uint64_t ua, uint64_t size) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context, /*for_check=*/true);
  if (!slot.ok()) return slot.status();
  absl::StatusOr<std::vector<v1::Region>> regions =
      slot->torn_down ? Leftovers(*slot) : ListRegions(slot->agent_name);
  if (!regions.ok()) return regions.status();
  for (const v1::Region& region : *regions) {
    if (region.ua() == ua && region.size() == size) {
      return std::optional<RegionState>(RegionStateOf(region));
    }
  }
  return std::optional<RegionState>();
}

absl::StatusOr<ContextState> GrpcTarget::GetContextState(absl::string_view context) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context, /*for_check=*/true);
  if (!slot.ok()) return slot.status();
  v1::GetContextRequest request;
  request.set_name(slot->agent_name);
  v1::Context response;
  absl::Status status = Call("GetContext", &v1::NodeAgent::Stub::GetContext, request, &response);
  ContextState state;
  if (status.ok()) {
    state.locked_bytes = response.locked_bytes();
    state.regions = response.regions();
    return state;
  }
  if (!slot->torn_down) return status;
  // The agent forgot the torn-down context: count what it still lists of it.
  absl::StatusOr<std::vector<v1::Region>> left = Leftovers(*slot);
  if (!left.ok()) return left.status();
  for (const v1::Region& region : *left) {
    state.locked_bytes += region.size();
    ++state.regions;
  }
  return state;
}

// --- Checks -----------------------------------------------------------------------------------

absl::Status GrpcTarget::CheckListedState() {
  v1::ListContextsResponse contexts;
  absl::Status status = Call("ListContexts", &v1::NodeAgent::Stub::ListContexts,
                             v1::ListContextsRequest(), &contexts);
  if (!status.ok()) return status;
  v1::ListContainersResponse containers;
  status = Call("ListContainers", &v1::NodeAgent::Stub::ListContainers, v1::ListContainersRequest(),
                &containers);
  if (!status.ok()) return status;
  absl::StatusOr<std::vector<v1::Region>> regions = ListRegions("");
  if (!regions.ok()) return regions.status();

  std::vector<std::string> problems;
  absl::flat_hash_map<std::string, std::vector<const v1::Region*>> by_context;
  uint64_t mapped_entries = 0;
  for (const v1::Region& region : *regions) {
    if (region.used() < 1 || region.mapped() < 1) {
      problems.push_back(absl::StrCat("invariant 2: ", ShowRegion(region),
                                      " has used=", region.used(), " mapped=", region.mapped()));
    }
    const uint64_t holders =
        static_cast<uint64_t>(region.containers_size()) + (region.pending_release() ? 1 : 0);
    if (region.used() != holders) {
      problems.push_back(absl::StrCat(
          "invariant 5: ", ShowRegion(region), " has used=", region.used(), " with ",
          region.containers_size(), " holders", region.pending_release() ? " (pending)" : ""));
    }
    if (region.mapped() >= 1) mapped_entries += region.mapped() - 1;
    by_context[region.context()].push_back(&region);
  }
  for (const v1::Context& context : contexts.contexts()) {
    std::vector<const v1::Region*> own = by_context[context.name()];
    by_context.erase(context.name());
    uint64_t bytes = 0;
    for (const v1::Region* region : own) bytes += region->size();
    if (bytes != context.locked_bytes() || own.size() != context.regions()) {
      problems.push_back(absl::StrCat("invariant 3: context \"", context.name(),
                                      "\" reports locked_bytes=", context.locked_bytes(),
                                      " regions=", context.regions(), " but lists ", own.size(),
                                      " regions of ", bytes, " bytes"));
    }
    std::sort(own.begin(), own.end(),
              [](const v1::Region* a, const v1::Region* b) { return a->ua() < b->ua(); });
    for (size_t i = 1; i < own.size(); ++i) {
      if (own[i]->ua() - own[i - 1]->ua() < own[i - 1]->size()) {
        problems.push_back(absl::StrCat("invariant 1: ", ShowRegion(*own[i - 1]), " overlaps ",
                                        ShowRegion(*own[i])));
      }
    }
  }
  for (const auto& [context, left] : by_context) {
    problems.push_back(absl::StrCat(left.size(), " listed regions belong to \"", context,
                                    "\", which ListContexts does not list (e.g. ",
                                    ShowRegion(*left.front()), ")"));
  }
  uint64_t installed = 0;
  for (const v1::Container& container : containers.containers()) {
    installed += container.installed_entries();
  }
  if (installed != mapped_entries) {
    problems.push_back(absl::StrCat("invariant 2: the containers report ", installed,
                                    " installed entries but the regions' mapped counts add up to ",
                                    mapped_entries));
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InternalError(absl::StrJoin(problems, "; "));
}

absl::Status GrpcTarget::CheckInvariants() {
  if (closed_) return absl::OkStatus();
  // A broken connection usually means a dying agent: give it a moment to be reaped, so that the
  // failure names the exit rather than the transport error.
  if (transport_failed_) {
    transport_failed_ = false;
    agent_->AwaitExit(absl::Seconds(1));
  }
  if (absl::Status running = agent_->CheckRunning(); !running.ok()) {
    violations_.clear();  // the calls failed because the agent is gone
    if (agent_death_reported_) {
      return absl::UnavailableError(absl::StrCat("the agent (pid ", agent_->pid(), ") is gone"));
    }
    agent_death_reported_ = true;
    return running;
  }
  std::vector<std::string> problems = std::move(violations_);
  violations_.clear();
  absl::Status listed = CheckListedState();
  // Violations from the listing calls themselves.
  problems.insert(problems.end(), violations_.begin(), violations_.end());
  violations_.clear();
  if (!listed.ok()) problems.push_back(std::string(listed.message()));
  if (problems.empty()) return absl::OkStatus();
  return absl::InternalError(absl::StrJoin(problems, "; "));
}

TargetFactory GrpcTargetFactory(GrpcTargetOptions options) {
  return [options](const Case& node) -> absl::StatusOr<std::unique_ptr<ConformanceTarget>> {
    absl::StatusOr<std::unique_ptr<GrpcTarget>> target = GrpcTarget::Create(node, options);
    if (!target.ok()) return target.status();
    return std::unique_ptr<ConformanceTarget>(*std::move(target));
  };
}

}  // namespace dmapin::agent::conformance
