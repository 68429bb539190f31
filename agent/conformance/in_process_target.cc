#include "agent/conformance/in_process_target.h"

#include <cerrno>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/errno_status.h"

namespace dmapin::agent::conformance {
namespace {

ContextOptions ContextOptionsOf(const Case& node) {
  ContextOptions options;
  options.memlock_limit_bytes = node.memlock_limit;
  options.cap_ipc_lock = node.cap_ipc_lock;
  return options;
}

std::vector<SimRange> SimRangesOf(const std::vector<Range>& ranges) {
  std::vector<SimRange> result;
  result.reserve(ranges.size());
  for (const Range& range : ranges) result.push_back(SimRange{range.ua, range.size});
  return result;
}

RegionState RegionStateOf(const RegionInfo& info) {
  RegionState state;
  state.ua = info.ua;
  state.size = info.size;
  state.used = info.used;
  state.mapped = info.mapped;
  state.pending_release = info.pending_release;
  return state;
}

}  // namespace

absl::StatusOr<std::unique_ptr<InProcessTarget>> InProcessTarget::Create(const Case& node) {
  SimBackendOptions options;
  options.page_size = node.page_size;
  options.holes = SimRangesOf(node.holes);
  options.readonly = SimRangesOf(node.readonly);
  for (const HugeRange& huge : node.huge) {
    options.huge.push_back(SimHugeRange{huge.ua, huge.size, huge.page_size});
  }
  absl::StatusOr<std::unique_ptr<SimBackend>> backend = SimBackend::Create(std::move(options));
  if (!backend.ok()) return backend.status();
  return std::unique_ptr<InProcessTarget>(new InProcessTarget(node, *std::move(backend)));
}

InProcessTarget::InProcessTarget(const Case& node, std::unique_ptr<SimBackend> backend)
    : page_size_(node.page_size),
      context_options_(ContextOptionsOf(node)),
      backend_(std::move(backend)),
      registry_(std::make_unique<Registry>(backend_.get())) {}

InProcessTarget::~InProcessTarget() = default;

absl::StatusOr<InProcessTarget::ContextSlot> InProcessTarget::ContextFor(absl::string_view name,
                                                                         bool for_check) {
  auto it = contexts_.find(name);
  if (it != contexts_.end() && (!it->second.torn_down || for_check)) return it->second;
  ContextSlot slot;
  slot.id = next_context_id_++;
  absl::Status status = registry_->CreateContext(slot.id, context_options_);
  if (!status.ok()) return status;
  contexts_[std::string(name)] = slot;
  return slot;
}

absl::StatusOr<ContainerId> InProcessTarget::ContainerFor(absl::string_view name) {
  auto it = containers_.find(name);
  if (it != containers_.end()) return it->second;
  const ContainerId id = next_container_id_++;
  ContainerOptions options;
  options.iommu_page_size = page_size_;
  options.window_start = 0;
  options.window_size = kDefaultWindowSize;
  absl::Status status = registry_->CreateContainer(id, options);
  if (!status.ok()) return status;
  containers_.emplace(std::string(name), id);
  return id;
}

void InProcessTarget::ForgetReleasedContainers() {
  for (auto it = containers_.begin(); it != containers_.end();) {
    if (registry_->GetContainer(it->second).ok()) {
      ++it;
    } else {
      containers_.erase(it++);
    }
  }
}

absl::Status InProcessTarget::CreateContainer(absl::string_view container,
                                              const ContainerSettings& settings) {
  if (containers_.contains(container)) {
    return ErrnoStatus(EEXIST, absl::StrCat("container '", container, "' exists"));
  }
  const ContainerId id = next_container_id_++;
  ContainerOptions options;
  options.iommu_page_size = settings.iommu_page_size.value_or(page_size_);
  options.window_start = settings.window_start.value_or(0);
  options.window_size = settings.window_size.value_or(kDefaultWindowSize);
  absl::Status status = registry_->CreateContainer(id, options);
  if (status.ok()) containers_.emplace(std::string(container), id);
  return status;
}

absl::Status InProcessTarget::ReleaseContainer(absl::string_view container) {
  absl::StatusOr<ContainerId> id = ContainerFor(container);
  if (!id.ok()) return id.status();
  absl::Status status = registry_->ReleaseContainer(*id);
  ForgetReleasedContainers();
  return status;
}

absl::Status InProcessTarget::TeardownContext(absl::string_view context) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context);
  if (!slot.ok()) return slot.status();
  absl::Status status = registry_->TeardownContext(slot->id);
  if (status.ok()) contexts_[std::string(context)].torn_down = true;
  ForgetReleasedContainers();
  return status;
}

absl::Status InProcessTarget::Register(absl::string_view context, absl::string_view container,
                                       uint64_t ua, uint64_t size) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context);
  if (!slot.ok()) return slot.status();
  absl::StatusOr<ContainerId> id = ContainerFor(container);
  if (!id.ok()) return id.status();
  return registry_->Register(*id, slot->id, ua, size);
}

absl::Status InProcessTarget::Unregister(absl::string_view /*context*/, absl::string_view container,
                                         uint64_t ua, uint64_t size) {
  absl::StatusOr<ContainerId> id = ContainerFor(container);
  if (!id.ok()) return id.status();
  return registry_->Unregister(*id, ua, size);
}

absl::Status InProcessTarget::Map(absl::string_view /*context*/, absl::string_view container,
                                  uint64_t iova, uint64_t ua, uint64_t size) {
  absl::StatusOr<ContainerId> id = ContainerFor(container);
  if (!id.ok()) return id.status();
  return registry_->Map(*id, iova, ua, size);
}

absl::Status InProcessTarget::Unmap(absl::string_view /*context*/, absl::string_view container,
                                    uint64_t iova, uint64_t size) {
  absl::StatusOr<ContainerId> id = ContainerFor(container);
  if (!id.ok()) return id.status();
  return registry_->Unmap(*id, iova, size);
}

absl::StatusOr<uint64_t> InProcessTarget::Translate(absl::string_view context, uint64_t ua) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context);
  if (!slot.ok()) return slot.status();
  return registry_->Translate(slot->id, ua);
}

absl::StatusOr<std::optional<Range>> InProcessTarget::Lookup(absl::string_view context, uint64_t ua,
                                                             uint64_t size) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context);
  if (!slot.ok()) return slot.status();
  absl::StatusOr<std::optional<RegionInfo>> found = registry_->Lookup(slot->id, ua, size);
  if (!found.ok()) return found.status();
  if (!found->has_value()) return std::optional<Range>();
  return std::optional<Range>(Range{(*found)->ua, (*found)->size});
}

absl::StatusOr<std::optional<RegionState>> InProcessTarget::FindRegion(absl::string_view context,
                                                                       uint64_t ua, uint64_t size) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context, /*for_check=*/true);
  if (!slot.ok()) return slot.status();
  if (slot->torn_down && !registry_->GetContext(slot->id).ok()) {
    // The registry forgot the context: whatever it still lists under its id is left over.
    for (const RegionInfo& info : registry_->ListRegions(slot->id)) {
      if (info.ua == ua && info.size == size)
        return std::optional<RegionState>(RegionStateOf(info));
    }
    return std::optional<RegionState>();
  }
  // A size that is not a whole number of pages names no region.
  if (size == 0 || size % page_size_ != 0) return std::optional<RegionState>();
  absl::StatusOr<std::optional<RegionInfo>> found =
      registry_->Find(slot->id, ua, size / page_size_);
  if (!found.ok()) return found.status();
  if (!found->has_value()) return std::optional<RegionState>();
  if ((*found)->ua != ua || (*found)->size != size) {
    return absl::InternalError(absl::StrFormat("Find(0x%x, %u pages) returned the region 0x%x+0x%x",
                                               ua, size / page_size_, (*found)->ua,
                                               (*found)->size));
  }
  return std::optional<RegionState>(RegionStateOf(**found));
}

absl::StatusOr<ContextState> InProcessTarget::GetContextState(absl::string_view context) {
  absl::StatusOr<ContextSlot> slot = ContextFor(context, /*for_check=*/true);
  if (!slot.ok()) return slot.status();
  absl::StatusOr<ContextInfo> info = registry_->GetContext(slot->id);
  ContextState state;
  if (info.ok()) {
    state.locked_bytes = info->locked_bytes;
    state.regions = info->regions;
    return state;
  }
  if (!slot->torn_down) return info.status();
  // The registry forgot the torn-down context: count what it still lists under its id.
  for (const RegionInfo& info : registry_->ListRegions(slot->id)) {
    state.locked_bytes += info.size;
    ++state.regions;
  }
  return state;
}

absl::Status InProcessTarget::CheckInvariants() {
  absl::Status status = registry_->CheckInvariants();
  if (!status.ok()) return status;
  absl::StatusOr<uint64_t> pinned = backend_->TotalPinnedPages();
  if (!pinned.ok()) return absl::OkStatus();  // The backend cannot tell.
  uint64_t listed = 0;
  for (const RegionInfo& info : registry_->ListRegions()) listed += info.entries;
  if (*pinned != listed) {
    return absl::InternalError(absl::StrFormat(
        "the backend holds %u pinned pages but the listed regions have %u pages (spec §10.4)",
        *pinned, listed));
  }
  return absl::OkStatus();
}

TargetFactory InProcessTargetFactory() {
  return [](const Case& node) -> absl::StatusOr<std::unique_ptr<ConformanceTarget>> {
    absl::StatusOr<std::unique_ptr<InProcessTarget>> target = InProcessTarget::Create(node);
    if (!target.ok()) return target.status();
    return std::unique_ptr<ConformanceTarget>(*std::move(target));
  };
}

}  // namespace dmapin::agent::conformance
