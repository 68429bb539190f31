#include "agent/node/node_agent.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "agent/node/node_agent_internal.h"
#include "agent/node/vfio_container_dma.h"
#include "common/errno_status.h"
#include "common/logging.h"

namespace dmapin::agent {
namespace node_internal {

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  return AppendToMessage(status, absl::StrCat(" (", context, ")"));
}

ContextOptions ToOptions(const ContextSpec& spec) {
  return ContextOptions{.memlock_limit_bytes = spec.memlock_limit_bytes,
                        .cap_ipc_lock = spec.cap_ipc_lock};
}

}  // namespace node_internal

namespace {

using node_internal::Annotate;
using node_internal::ToOptions;

constexpr uint64_t kDefaultWindowSize = uint64_t{1} << 40;

}  // namespace

absl::Status ValidateName(absl::string_view what, absl::string_view name) {
  if (name.empty() || name.size() > 128) {
    return ErrnoStatus(
        EINVAL, absl::StrFormat("%s name must be 1-128 characters, got %d", what, name.size()));
  }
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '/' || c == '-';
    if (!ok) {
      return ErrnoStatus(EINVAL, absl::StrFormat("%s name \"%s\" has a character outside "
                                                 "[A-Za-z0-9._/-]",
                                                 what, absl::CHexEscape(std::string(name))));
    }
  }
  return absl::OkStatus();
}

// The registry starts without limits: recovery restores what was acknowledged, whatever the
// limits are now; Create applies them afterwards.
NodeAgent::NodeAgent(NodeAgentOptions options)
    : options_(std::move(options)),
      guest_backend_(options_.backend),
      registry_(std::make_unique<Registry>(
          &guest_backend_,
          RegistryLimits{.max_region_bytes = ~uint64_t{0}, .max_pinned_bytes = ~uint64_t{0}})) {}

NodeAgent::~NodeAgent() = default;

absl::StatusOr<std::unique_ptr<NodeAgent>> NodeAgent::Create(NodeAgentOptions options) {
  if (options.backend == nullptr) return absl::InvalidArgumentError("NodeAgent needs a backend");
  std::unique_ptr<NodeAgent> agent(new NodeAgent(std::move(options)));
  if (absl::Status status = agent->Recover(); !status.ok()) return status;
  agent->registry_->SetLimits(agent->options_.limits);
  if (agent->options_.watch_owners) {
    NodeAgent* self = agent.get();
    agent->watcher_ = std::make_unique<ProcessWatcher>(
        [self](const std::string& key) { self->OnOwnerExit(key); });
    // The owners recovery found alive; one that exited since is torn down like any other.
    std::vector<std::pair<std::string, ProcessIdentity>> owners;
    {
      MutexLock names(&agent->names_mu_);
      for (const auto& [name, entry] : agent->contexts_) {
        if (entry->owner.has_value()) owners.emplace_back(WatchKey(name, entry->id), *entry->owner);
      }
    }
    for (const auto& [key, owner] : owners) {
      if (!agent->watcher_->Watch(key, owner).ok()) agent->OnOwnerExit(key);
    }
  }
  return agent;
}

std::string Caller::Describe() const {
  switch (kind) {
    case Kind::kInternal:
      return "the agent";
    case Kind::kRemote:
      return "a TCP peer";
    case Kind::kLocal:
      break;
  }
  return absl::StrFormat("pid %d uid %d", pid, uid);
}

std::string NodeAgent::WatchKey(absl::string_view name, ContextId id) {
  return absl::StrCat(name, "#", id);
}

void NodeAgent::OnOwnerExit(const std::string& key) {
  const size_t hash = key.rfind('#');
  if (hash == std::string::npos) return;
  const std::string name = key.substr(0, hash);
  std::shared_ptr<ContextEntry> entry = FindContext(name);
  // Torn down already, or a new context of the same name: not this owner's.
  if (entry == nullptr || WatchKey(name, entry->id) != key) return;
  const std::string owner = entry->owner.has_value() ? absl::StrFormat("pid %d", entry->owner->pid)
                                                     : std::string("its owner");
  absl::StatusOr<ContextInfo> info = registry_->GetContext(entry->id);
  const uint64_t locked = info.ok() ? info->locked_bytes : 0;
  absl::Status status = TeardownContext(name);
  if (status.ok()) {
    owner_exit_teardowns_.fetch_add(1, std::memory_order_relaxed);
    {
      MutexLock lock(&exits_mu_);
      recent_exits_.push_back({.context = name,
                               .pid = entry->owner.has_value() ? entry->owner->pid : 0,
                               .unpinned_bytes = locked});
      if (recent_exits_.size() > kRecentOwnerExits) recent_exits_.pop_front();
    }
    LOG(INFO) << absl::StrFormat(
        "context \"%s\": its VMM (%s) exited; context torn down, its "
        "containers released and every page it pinned unpinned",
        name, owner);
  } else if (ErrnoOf(status) != ENOENT) {
    LOG(ERROR) << absl::StrFormat(
        "context \"%s\": its VMM (%s) exited, but the teardown failed: "
        "%s",
        name, owner, status.ToString());
  }
}

std::vector<OwnerExit> NodeAgent::RecentOwnerExits() const {
  MutexLock lock(&exits_mu_);
  return {recent_exits_.begin(), recent_exits_.end()};
}

// --- Ownership --------------------------------------------------------------------------------

bool NodeAgent::IsManager(const Caller& caller) const {
  return caller.kind == Caller::Kind::kLocal &&
         std::find(options_.manager_uids.begin(), options_.manager_uids.end(), caller.uid) !=
             options_.manager_uids.end();
}

absl::Status NodeAgent::Denied(std::string message) const {
  permission_denied_.fetch_add(1, std::memory_order_relaxed);
  return ErrnoStatus(EPERM, absl::StatusCode::kPermissionDenied, message);
}

absl::Status NodeAgent::OverLimit(absl::string_view what, absl::string_view flag, uint64_t limit) {
  limit_refusals_.fetch_add(1, std::memory_order_relaxed);
  return ErrnoStatus(ENOSPC, absl::StrFormat("%s: at most %d (%s)", what, limit, flag));
}

absl::Status NodeAgent::CheckMemlockChoice(const ContextSpec& spec, const Caller& caller) const {
  if (caller.kind == Caller::Kind::kInternal || IsManager(caller)) return absl::OkStatus();
  if (spec.cap_ipc_lock) {
    return Denied(
        absl::StrFormat("context \"%s\": the memlock waiver (cap_ipc_lock) is the node's "
                        "decision; only a manager (--manager_uids) may ask for it, the "
                        "caller is %s",
                        spec.name, caller.Describe()));
  }
  const std::optional<uint64_t>& node = options_.context_memlock_limit_bytes;
  if (node.has_value() &&
      (!spec.memlock_limit_bytes.has_value() || *spec.memlock_limit_bytes > *node)) {
    return Denied(absl::StrFormat(
        "context \"%s\": memlock limit %s is over the node's 0x%x bytes per context "
        "(--context_memlock_limit_bytes); ask for that or less, or have a manager create it",
        spec.name,
        spec.memlock_limit_bytes.has_value() ? absl::StrFormat("0x%x", *spec.memlock_limit_bytes)
                                             : std::string("unlimited"),
        *node));
  }
  return absl::OkStatus();
}

absl::Status NodeAgent::CheckDma(const ContextEntry* context, absl::string_view context_name,
                                 const Caller& caller, absl::string_view what) const {
  if (caller.kind == Caller::Kind::kInternal || options_.dma_from_any_peer) {
    return absl::OkStatus();
  }
  if (caller.kind == Caller::Kind::kRemote) {
    return Denied(
        absl::StrFormat("%s on context \"%s\": DMA calls are the owning VMM's, over "
                        "the agent's Unix socket; %s may not make them",
                        what, context_name, caller.Describe()));
  }
  if (context == nullptr || !context->owner.has_value()) {
    return Denied(
        absl::StrFormat("%s on context \"%s\": the context has no owner process (it "
                        "was created over TCP), so no process may map on it",
                        what, context_name));
  }
  if (context->owner->pid != caller.pid) {
    return Denied(absl::StrFormat("%s on context \"%s\": it belongs to pid %d, the caller is %s",
                                  what, context_name, context->owner->pid, caller.Describe()));
  }
  return absl::OkStatus();
}

absl::Status NodeAgent::CheckControl(const ContextEntry& context, absl::string_view context_name,
                                     const Caller& caller, absl::string_view what) const {
  // The central service and admins (TCP) keep the control-plane decisions.
  if (caller.kind != Caller::Kind::kLocal || IsManager(caller)) return absl::OkStatus();
  if (context.owner.has_value() && context.owner->pid == caller.pid) return absl::OkStatus();
  return Denied(absl::StrFormat(
      "%s context \"%s\": it belongs to %s, the caller is %s (not a manager: --manager_uids)", what,
      context_name,
      context.owner.has_value() ? absl::StrFormat("pid %d", context.owner->pid) : "no process",
      caller.Describe()));
}

absl::Status NodeAgent::CheckContainerDma(const ContainerEntry& container, const Caller& caller,
                                          absl::string_view what) const {
  if (const ContextEntry* context = container.bound.load(std::memory_order_acquire)) {
    // The hot path: the owner maps. The context's name (a lookup) only for a refusal.
    if (caller.kind == Caller::Kind::kLocal && context->owner.has_value() &&
        context->owner->pid == caller.pid) {
      return absl::OkStatus();
    }
    return CheckDma(context, ContextName(context->id), caller, what);
  }
  if (caller.kind == Caller::Kind::kLocal && container.creator_pid == caller.pid) {
    return absl::OkStatus();
  }
  if (caller.kind == Caller::Kind::kInternal || options_.dma_from_any_peer) {
    return absl::OkStatus();
  }
  return Denied(
      absl::StrFormat("%s on container \"%s\": it is bound to no context yet and the "
                      "caller (%s) did not create it",
                      what, container.name, caller.Describe()));
}

absl::Status NodeAgent::CheckContainerControl(const ContainerEntry& container, const Caller& caller,
                                              absl::string_view what) const {
  if (const ContextEntry* context = container.bound.load(std::memory_order_acquire)) {
    return CheckControl(*context, ContextName(context->id), caller, what);
  }
  if (caller.kind != Caller::Kind::kLocal || IsManager(caller) || container.creator_pid == 0 ||
      container.creator_pid == caller.pid) {
    return absl::OkStatus();
  }
  return Denied(absl::StrFormat("%s container \"%s\": pid %d created it, the caller is %s", what,
                                container.name, container.creator_pid, caller.Describe()));
}

StoredContext NodeAgent::ToStored(const ContextEntry& entry, const std::string& name) const {
  StoredContext stored{.name = name,
                       .id = entry.id,
                       .memlock_limit_bytes = entry.spec.memlock_limit_bytes,
                       .cap_ipc_lock = entry.spec.cap_ipc_lock,
                       .backing = static_cast<int>(entry.spec.backing),
                       .mem_ua = entry.memory != nullptr ? entry.memory->ua() : 0,
                       .mem_size = entry.memory != nullptr ? entry.memory->size() : 0};
  if (entry.owner.has_value()) {
    stored.owner_pid = entry.owner->pid;
    stored.owner_uid = entry.owner->uid;
    stored.owner_start_time = entry.owner->start_time;
  }
  if (entry.guest != nullptr) {
    for (const GuestSlot& slot : entry.guest->slots()) {
      stored.slots.push_back({.ua = slot.ua,
                              .size = slot.size,
                              .offset = slot.offset,
                              .dev = slot.dev,
                              .ino = slot.ino});
    }
  }
  return stored;
}

// --- Helpers ----------------------------------------------------------------------------------

std::shared_ptr<NodeAgent::ContainerEntry> NodeAgent::FindContainer(absl::string_view name) const {
  MutexLock lock(&names_mu_);
  auto it = containers_.find(name);
  return it == containers_.end() ? nullptr : it->second;
}

std::shared_ptr<NodeAgent::ContextEntry> NodeAgent::FindContext(absl::string_view name) const {
  MutexLock lock(&names_mu_);
  auto it = contexts_.find(name);
  return it == contexts_.end() ? nullptr : it->second;
}

namespace {

absl::Status NoSuchContainer(absl::string_view name) {
  return ErrnoStatus(ENOENT, absl::StrFormat("container \"%s\" does not exist", name));
}

absl::Status NoSuchContext(absl::string_view name) {
  return ErrnoStatus(ENOENT, absl::StrFormat("memory context \"%s\" does not exist", name));
}

}  // namespace

absl::Status NodeAgent::CheckWritable() const {
  if (store_failed_.load(std::memory_order_acquire)) {
    return ErrnoStatus(EIO,
                       "the state store failed earlier; this agent refuses changes until it is "
                       "restarted and rebuilds from what was acknowledged");
  }
  return absl::OkStatus();
}

absl::Status NodeAgent::Persist(Mutation& mutation, const DecisionTag* decision) {
  if (decision != nullptr) mutation.RecordDecision(decision->id, decision->epoch, 0);
  if (options_.store == nullptr || mutation.empty()) return absl::OkStatus();
  return StoreOutcome(options_.store->Commit(mutation));
}

absl::Status NodeAgent::PersistMappingChange(const ContainerEntry& container, bool mapped,
                                             uint64_t iova, uint64_t size, uint64_t ua) {
  if (options_.store == nullptr) return absl::OkStatus();
  return StoreOutcome(mapped ? options_.store->RecordMap(container.id, iova, size, ua)
                             : options_.store->RecordClear(container.id, iova, size));
}

absl::Status NodeAgent::StoreOutcome(absl::Status status) {
  if (status.ok()) return status;
  store_failed_.store(true, std::memory_order_release);
  store_commit_failures_.fetch_add(1, std::memory_order_relaxed);
  return ErrnoStatus(EIO,
                     absl::StrCat("could not be made durable, so not acknowledged (and undone); "
                                  "the agent now refuses changes until restarted: ",
                                  status.message()));
}

void NodeAgent::UndoFailed() {
  refused_change_undo_failures_.fetch_add(1, std::memory_order_relaxed);
}

void NodeAgent::AddPendingDiff(ContextEntry& context, const std::string& context_name,
                               Mutation* mutation) {
  // Raised before the registry is read: a map or unmap that completes a release the listing below
  // still saw then also sees the flag (the registry's lock orders the two), takes the pending path
  // and removes the row written here. Lowered below if nothing is pending.
  context.has_pending.store(true, std::memory_order_release);
  std::vector<std::pair<uint64_t, uint64_t>> now;
  for (const RegionInfo& region : registry_->ListRegions(context.id)) {
    if (region.pending_release) now.emplace_back(region.ua, region.size);
  }
  SetPendingRows(context, context_name, std::move(now), mutation);
}

void NodeAgent::SetPendingRows(ContextEntry& context, const std::string& context_name,
                               std::vector<std::pair<uint64_t, uint64_t>> now, Mutation* mutation) {
  for (const auto& [ua, size] : context.pending) {
    if (std::find(now.begin(), now.end(), std::make_pair(ua, size)) == now.end()) {
      mutation->RemovePending(context_name, ua, size);
    }
  }
  for (const auto& [ua, size] : now) {
    if (std::find(context.pending.begin(), context.pending.end(), std::make_pair(ua, size)) ==
        context.pending.end()) {
      mutation->PutPending(context_name, ua, size);
    }
  }
  context.has_pending.store(!now.empty(), std::memory_order_release);
  context.pending = std::move(now);
}

void NodeAgent::RestorePending(ContextEntry& context,
                               std::vector<std::pair<uint64_t, uint64_t>> persisted) {
  context.has_pending.store(!persisted.empty(), std::memory_order_release);
  context.pending = std::move(persisted);
}

absl::Status NodeAgent::MemoryBehindStore(absl::Status status) {
  store_failed_.store(true, std::memory_order_release);
  UndoFailed();
  return status;
}

std::string NodeAgent::ContextName(ContextId id) const {
  MutexLock lock(&names_mu_);
  auto it = context_names_.find(id);
  return it == context_names_.end() ? absl::StrCat("#", id) : it->second;
}

std::string NodeAgent::ContainerName(ContainerId id) const {
  MutexLock lock(&names_mu_);
  auto it = container_names_.find(id);
  return it == container_names_.end() ? absl::StrCat("#", id) : it->second;
}

RegionView NodeAgent::ToView(RegionInfo info) const {
  RegionView view;
  view.context = ContextName(info.context);
  for (ContainerId id : info.holders) view.containers.push_back(ContainerName(id));
  std::sort(view.containers.begin(), view.containers.end());
  view.info = std::move(info);
  return view;
}

ContextView NodeAgent::ToView(const ContextInfo& info) const {
  ContextView view;
  view.name = ContextName(info.id);
  if (std::shared_ptr<ContextEntry> entry = FindContext(view.name)) {
    view.spec = entry->spec;
    if (entry->memory != nullptr) view.memory_ua = entry->memory->ua();
    view.owner = entry->owner;
    if (entry->guest != nullptr) view.slots = entry->guest->slots();
  }
  view.locked_bytes = info.locked_bytes;
  view.regions = info.regions;
  for (ContainerId id : info.containers) view.containers.push_back(ContainerName(id));
  std::sort(view.containers.begin(), view.containers.end());
  return view;
}

ContainerView NodeAgent::ToView(const ContainerInfo& info) const {
  ContainerView view;
  view.name = ContainerName(info.id);
  view.options = info.options;
  if (std::shared_ptr<ContainerEntry> entry = FindContainer(view.name)) {
    view.vfio_groups = entry->spec.vfio_groups;
  }
  if (info.context.has_value()) view.context = ContextName(*info.context);
  view.held_regions = info.held_regions;
  view.installed_entries = info.installed_entries;
  if (std::shared_ptr<ContainerEntry> entry = FindContainer(view.name)) {
    view.handed_off = entry->dma->handed_off();
    view.awaiting_adoption = entry->dma->awaiting_adoption();
  }
  return view;
}

// --- Contexts ---------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<ContextMemory>> NodeAgent::AllocateMemory(absl::string_view name,
                                                                         const ContextSpec& spec,
                                                                         uint64_t at) {
  if (options_.memory_provider == nullptr) {
    return ErrnoStatus(EINVAL, absl::StrFormat("context \"%s\": memory_bytes needs a backend with "
                                               "agent-owned memory (memlock); the %s backend "
                                               "takes addresses as given",
                                               name, options_.backend->name()));
  }
  if (spec.memory_bytes % registry_->page_size() != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("context \"%s\": memory_bytes %d is not a multiple "
                                               "of the page size %d",
                                               name, spec.memory_bytes, registry_->page_size()));
  }
  return options_.memory_provider->Allocate(name, spec.backing, spec.memory_bytes, at);
}

absl::StatusOr<ContextView> NodeAgent::CreateContext(const ContextSpec& spec,
                                                     const Caller& caller) {
  if (absl::Status status = ValidateName("context", spec.name); !status.ok()) return status;
  // Whose context: the local caller's, or the process a manager names.
  pid_t owner_pid = spec.owner_pid;
  if (owner_pid < 0) {
    return ErrnoStatus(
        EINVAL, absl::StrFormat("context \"%s\": owner_pid %d is not a pid", spec.name, owner_pid));
  }
  if (owner_pid != 0 && caller.kind == Caller::Kind::kRemote) {
    return Denied(absl::StrFormat("context \"%s\": a TCP peer cannot name a local owner (pid %d)",
                                  spec.name, owner_pid));
  }
  if (owner_pid != 0 && caller.kind == Caller::Kind::kLocal && owner_pid != caller.pid &&
      !IsManager(caller)) {
    return Denied(
        absl::StrFormat("context \"%s\": only a manager (--manager_uids) may create a "
                        "context for another process (pid %d); the caller is %s",
                        spec.name, owner_pid, caller.Describe()));
  }
  if (owner_pid == 0 && caller.kind == Caller::Kind::kLocal) owner_pid = caller.pid;
  std::optional<ProcessIdentity> owner;
  if (owner_pid != 0) {
    absl::StatusOr<ProcessIdentity> identity = IdentifyProcess(owner_pid);
    if (!identity.ok()) {
      return Annotate(identity.status(), absl::StrCat("owner of context \"", spec.name, "\""));
    }
    owner = *identity;
  }
  if (!IsMemoryBacking(spec.backing)) {
    return ErrnoStatus(EINVAL, absl::StrFormat("context \"%s\": backing %d is not a MemoryBacking "
                                               "(0 unspecified, 1 anonymous, 2 memfd, 3 "
                                               "hugetlbfs)",
                                               spec.name, static_cast<int>(spec.backing)));
  }
  if (spec.memory_bytes > options_.limits.max_pinned_bytes) {
    return ErrnoStatus(
        ENOMEM, absl::StrFormat("context \"%s\": memory_bytes 0x%x is more than the "
                                "node may pin, 0x%x bytes (--max_pinned_bytes)",
                                spec.name, spec.memory_bytes, options_.limits.max_pinned_bytes));
  }
  if (absl::Status status = CheckMemlockChoice(spec, caller); !status.ok()) return status;
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  MutexLock control(&control_mu_);
  if (FindContext(spec.name) != nullptr) {
    return ErrnoStatus(EEXIST, absl::StrFormat("memory context \"%s\" already exists", spec.name));
  }
  {
    uint64_t contexts = 0;
    uint64_t of_owner = 0;
    {
      MutexLock names(&names_mu_);
      contexts = contexts_.size();
      if (owner.has_value()) {
        for (const auto& [name, entry] : contexts_) {
          if (entry->owner.has_value() && entry->owner->pid == owner->pid) ++of_owner;
        }
      }
    }
    if (contexts >= options_.max_contexts) {
      return OverLimit(absl::StrCat("context \"", spec.name, "\": contexts on the node"),
                       "--max_contexts", options_.max_contexts);
    }
    if (of_owner >= options_.max_contexts_per_owner) {
      return OverLimit(absl::StrFormat("context \"%s\": contexts of pid %d", spec.name, owner->pid),
                       "--max_contexts_per_owner", options_.max_contexts_per_owner);
    }
  }
  std::unique_ptr<ContextMemory> memory;
  if (spec.memory_bytes > 0) {
    absl::StatusOr<std::unique_ptr<ContextMemory>> allocated =
        AllocateMemory(spec.name, spec, /*at=*/0);
    if (!allocated.ok()) return allocated.status();
    memory = std::move(*allocated);
  }
  const ContextId id = next_id_++;
  auto entry = std::make_shared<ContextEntry>();
  entry->id = id;
  entry->spec = spec;
  entry->spec.owner_pid = owner.has_value() ? owner->pid : 0;
  entry->memory = std::move(memory);
  entry->owner = owner;
  // Another process's context works in that process's addresses, through the memory it
  // attaches; the agent's own (and simulated VMM memory) in the agent's.
  if (options_.vmm_memory && owner.has_value() && owner->pid != getpid() &&
      entry->memory == nullptr) {
    entry->guest = std::make_shared<GuestMemory>(registry_->page_size());
  }
  // Watched before anything is acknowledged: an owner that exits from now on is seen (its exit is
  // handled once this call lets go of control_mu_).
  if (owner.has_value() && watcher_ != nullptr) {
    if (absl::Status status = watcher_->Watch(WatchKey(spec.name, id), *owner); !status.ok()) {
      next_id_ = id;
      return Annotate(status, absl::StrCat("owner of context \"", spec.name, "\""));
    }
  }
  auto unwatch = [&] {
    if (owner.has_value() && watcher_ != nullptr) watcher_->Unwatch(WatchKey(spec.name, id));
  };
  if (absl::Status status = registry_->CreateContext(id, ToOptions(spec)); !status.ok()) {
    unwatch();
    next_id_ = id;
    return status;
  }
  if (entry->guest != nullptr) guest_backend_.SetMemory(id, entry->guest);
  Mutation mutation;
  mutation.PutContext(ToStored(*entry, spec.name));
  mutation.PutMeta(kMetaNextId, absl::StrCat(next_id_));
  if (absl::Status status = Persist(mutation); !status.ok()) {
    // Refused: the context goes again (it has nothing yet), and so does its memory, with `entry`.
    if (!registry_->TeardownContext(id).ok()) UndoFailed();
    guest_backend_.SetMemory(id, nullptr);
    unwatch();
    next_id_ = id;
    return status;
  }
  ContextView view;
  view.name = spec.name;
  view.spec = entry->spec;
  view.memory_ua = entry->memory != nullptr ? entry->memory->ua() : 0;
  view.owner = owner;
  {
    MutexLock names(&names_mu_);
    contexts_[spec.name] = std::move(entry);
    context_names_[id] = spec.name;
  }
  {
    // A new context of the name: an earlier one's exit no longer explains its removal.
    MutexLock exits(&exits_mu_);
    recent_exits_.erase(
        std::remove_if(recent_exits_.begin(), recent_exits_.end(),
                       [&](const OwnerExit& exit) { return exit.context == spec.name; }),
        recent_exits_.end());
  }
  return view;
}

absl::StatusOr<ContextView> NodeAgent::GetContext(absl::string_view name) const {
  std::shared_ptr<ContextEntry> entry = FindContext(name);
  if (entry == nullptr) return NoSuchContext(name);
  absl::StatusOr<ContextInfo> info = registry_->GetContext(entry->id);
  // Torn down between the two lookups (the registry goes first): gone, by its name.
  if (!info.ok() && ErrnoOf(info.status()) == ENOENT) return NoSuchContext(name);
  if (!info.ok()) return info.status();
  return ToView(*info);
}

std::vector<ContextView> NodeAgent::ListContexts() const {
  std::vector<ContextView> views;
  for (const ContextInfo& info : registry_->ListContexts()) views.push_back(ToView(info));
  std::sort(views.begin(), views.end(),
            [](const ContextView& a, const ContextView& b) { return a.name < b.name; });
  return views;
}

absl::Status NodeAgent::TeardownContext(absl::string_view name, const DecisionTag* decision,
                                        const Caller& caller) {
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  MutexLock control(&control_mu_);
  std::shared_ptr<ContextEntry> context = FindContext(name);
  if (context == nullptr) return NoSuchContext(name);
  if (absl::Status status = CheckControl(*context, name, caller, "tear down"); !status.ok()) {
    return status;
  }
  absl::StatusOr<ContextInfo> info = registry_->GetContext(context->id);
  if (!info.ok()) return info.status();
  // Stop the bound containers' DMA paths first (in id order, the only multi-lock order).
  std::vector<std::shared_ptr<ContainerEntry>> bound;
  for (ContainerId id : info->containers) {
    if (auto entry = FindContainer(ContainerName(id))) bound.push_back(std::move(entry));
  }
  // A container its live VMM still holds, not taken back yet: the agent could not take its
  // mappings out of the kernel, so the teardown waits for the VMM (its exit is a teardown too).
  if (context->owner.has_value() && IsAlive(*context->owner)) {
    for (auto& entry : bound) {
      if (entry->dma->awaiting_adoption()) {
        return ErrnoStatus(EAGAIN,
                           absl::StrFormat("tear down context \"%s\": its container \"%s\" waits "
                                           "for its VMM (pid %d) to give its descriptor back after "
                                           "the agent restarted",
                                           name, entry->name, context->owner->pid));
      }
    }
  }
  std::vector<std::unique_ptr<MutexLock>> dma_locks;
  for (auto& entry : bound) dma_locks.push_back(std::make_unique<MutexLock>(&entry->dma_mu));
  MutexLock pending(&context->pending_mu);

  // The store first: a teardown cannot be undone (its pins and mappings are gone), and with the
  // context and the DMA paths of its containers held, the registry has no reason to refuse it.
  Mutation mutation;
  mutation.DeleteContext(name);
  for (auto& entry : bound) mutation.DeleteContainer(entry->name);
  if (absl::Status status = Persist(mutation, decision); !status.ok()) return status;
  if (absl::Status status = registry_->TeardownContext(context->id); !status.ok()) {
    return MemoryBehindStore(status);
  }
  for (auto& entry : bound) MarkReleasedUnderTeardown(*entry);
  // Nothing of it is pinned any more: its memory can go (unmapped when `context` goes).
  guest_backend_.SetMemory(context->id, nullptr);
  if (context->owner.has_value() && watcher_ != nullptr) {
    watcher_->Unwatch(WatchKey(name, context->id));
  }
  {
    MutexLock names(&names_mu_);
    for (auto& entry : bound) {
      containers_.erase(entry->name);
      container_names_.erase(entry->id);
    }
    contexts_.erase(name);
    context_names_.erase(context->id);
  }
  return absl::OkStatus();
}

// --- The VMM's memory -------------------------------------------------------------------------

absl::Status NodeAgent::NothingToAttach(absl::string_view name, const ContextEntry& context) const {
  std::string why;
  if (!options_.vmm_memory) {
    why = absl::StrFormat("the %s backend simulates memory: there is nothing to attach",
                          options_.backend->name());
  } else if (context.memory != nullptr) {
    why = "it uses simulated VMM memory the agent allocated itself (memory_bytes)";
  } else {
    why =
        "it has no owner process other than the agent (created over TCP or by the agent), so "
        "its addresses are the agent's own";
  }
  return ErrnoStatus(EINVAL, absl::StrFormat("attach memory to context \"%s\": %s", name, why));
}

absl::StatusOr<ContextView> NodeAgent::AttachSources(const std::string& name, ContextEntry& context,
                                                     absl::Span<const SlotSource> sources) {
  if (context.guest == nullptr) return NothingToAttach(name, context);
  if (sources.empty()) {
    return ErrnoStatus(EINVAL,
                       absl::StrFormat("attach memory to context \"%s\": no memory slots", name));
  }
  if (absl::Status status = context.guest->Attach(sources); !status.ok()) {
    return Annotate(status, absl::StrCat("attach memory to context \"", name, "\""));
  }
  Mutation mutation;
  mutation.PutContext(ToStored(context, name));
  if (absl::Status status = Persist(mutation); !status.ok()) {
    // Refused: the new slots go again (nothing can have pinned them: control_mu_ is held).
    for (const SlotSource& source : sources) {
      if (!context.guest->Detach(source.ua).ok()) UndoFailed();
    }
    return status;
  }
  absl::StatusOr<ContextInfo> info = registry_->GetContext(context.id);
  if (!info.ok()) return info.status();
  return ToView(*info);
}

absl::StatusOr<std::shared_ptr<NodeAgent::ContextEntry>> NodeAgent::ContextToAttachTo(
    absl::string_view name, const Caller& caller) const {
  std::shared_ptr<ContextEntry> context = FindContext(name);
  if (context == nullptr) return NoSuchContext(name);
  if (absl::Status status = CheckControl(*context, name, caller, "attach memory to");
      !status.ok()) {
    return status;
  }
  return context;
}

absl::StatusOr<ContextView> NodeAgent::AttachMemory(absl::string_view name,
                                                    absl::Span<const SlotSource> sources,
                                                    const Caller& caller) {
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  MutexLock control(&control_mu_);
  absl::StatusOr<std::shared_ptr<ContextEntry>> context = ContextToAttachTo(name, caller);
  if (!context.ok()) return context.status();
  return AttachSources(std::string(name), **context, sources);
}

absl::StatusOr<ContextView> NodeAgent::AttachOwnerMemory(
    absl::string_view name, absl::Span<const std::pair<uint64_t, uint64_t>> ranges,
    const Caller& caller) {
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  MutexLock control(&control_mu_);
  absl::StatusOr<std::shared_ptr<ContextEntry>> found = ContextToAttachTo(name, caller);
  if (!found.ok()) return found.status();
  std::shared_ptr<ContextEntry> context = std::move(*found);
  // Only a context owned by another process has memory of its own (and so a guest).
  if (context->guest == nullptr) return NothingToAttach(name, *context);
  absl::StatusOr<std::vector<ProcessSlot>> opened = OpenProcessSlots(context->owner->pid, ranges);
  if (!opened.ok()) {
    return Annotate(opened.status(), absl::StrFormat("memory of pid %d for context \"%s\"",
                                                     context->owner->pid, name));
  }
  // Opened from the owner's /proc: still the same process, not another that took its pid?
  if (!IsAlive(*context->owner)) {
    return ErrnoStatus(ESRCH, absl::StrFormat("context \"%s\": its owner pid %d exited", name,
                                              context->owner->pid));
  }
  std::vector<SlotSource> sources;
  sources.reserve(opened->size());
  for (const ProcessSlot& slot : *opened) sources.push_back(slot.source);
  return AttachSources(std::string(name), *context, sources);
}

// --- Containers -------------------------------------------------------------------------------

absl::StatusOr<ContainerView> NodeAgent::CreateContainer(const ContainerSpec& spec,
                                                         const Caller& caller) {
  if (absl::Status status = ValidateName("container", spec.name); !status.ok()) return status;
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  MutexLock control(&control_mu_);
  if (FindContainer(spec.name) != nullptr) {
    return ErrnoStatus(EEXIST, absl::StrFormat("container \"%s\" already exists", spec.name));
  }
  {
    MutexLock names(&names_mu_);
    if (containers_.size() >= options_.max_containers) {
      return OverLimit(absl::StrCat("container \"", spec.name, "\": containers on the node"),
                       "--max_containers", options_.max_containers);
    }
  }
  ContainerOptions options{
      .iommu_page_size = spec.iommu_page_size != 0 ? spec.iommu_page_size : registry_->page_size(),
      .window_start = spec.window_start,
      .window_size = spec.window_size != 0 ? spec.window_size : kDefaultWindowSize};
  const ContainerId id = next_id_;
  absl::StatusOr<std::unique_ptr<ContainerDma>> dma = NewContainerDma(id, spec, &options);
  if (!dma.ok()) return dma.status();
  ++next_id_;
  auto entry = std::make_shared<ContainerEntry>();
  entry->dma = std::move(*dma);
  StoredContainer stored{.name = spec.name,
                         .id = id,
                         .iommu_page_size = options.iommu_page_size,
                         .window_start = options.window_start,
                         .window_size = options.window_size,
                         .vfio_groups = spec.vfio_groups};
  if (caller.kind == Caller::Kind::kLocal) {
    // Its creator may map on it until it is bound; a restart knows it again by its start time.
    absl::StatusOr<ProcessIdentity> creator = IdentifyProcess(caller.pid);
    if (creator.ok()) {
      stored.creator_pid = creator->pid;
      stored.creator_start_time = creator->start_time;
    }
  }
  Mutation mutation;
  mutation.PutContainer(stored);
  mutation.PutMeta(kMetaNextId, absl::StrCat(next_id_));
  if (absl::Status status = Persist(mutation); !status.ok()) {
    // Refused: the container goes again, kernel side too (it has nothing yet).
    if (!entry->dma->Release().ok()) {
      UndoFailed();
      entry->dma->CloseDevice();
    }
    next_id_ = id;
    return status;
  }
  entry->id = id;
  entry->name = spec.name;
  entry->spec = spec;
  entry->creator_pid = static_cast<pid_t>(stored.creator_pid);
  {
    MutexLock names(&names_mu_);
    containers_[spec.name] = std::move(entry);
    container_names_[id] = spec.name;
  }
  ContainerView view;
  view.name = spec.name;
  view.options = options;
  view.vfio_groups = spec.vfio_groups;
  return view;
}

absl::StatusOr<std::unique_ptr<ContainerDma>> NodeAgent::NewContainerDma(
    ContainerId id, const ContainerSpec& spec, ContainerOptions* options) {
  if (options_.open_vfio_container == nullptr && spec.vfio_groups.empty()) {
    return NewRegistryContainerDma(*registry_, id, *options);
  }
  absl::StatusOr<std::unique_ptr<VfioContainerDriver>> driver = OpenVfioContainer(spec, options);
  if (!driver.ok()) return driver.status();
  return NewVfioContainerDma(*registry_, id, *options, std::move(*driver), &vfio_inconsistencies_,
                             &guest_backend_);
}

absl::StatusOr<std::unique_ptr<VfioContainerDriver>> NodeAgent::OpenVfioContainer(
    const ContainerSpec& spec, ContainerOptions* options) {
  if (options_.open_vfio_container == nullptr) {
    return ErrnoStatus(EINVAL, absl::StrFormat("container \"%s\" names VFIO groups, but the %s "
                                               "backend has no VFIO containers",
                                               spec.name, options_.backend->name()));
  }
  if (spec.vfio_groups.empty()) {
    return ErrnoStatus(EINVAL, absl::StrFormat("container \"%s\" names no VFIO group; the %s "
                                               "backend needs at least one (e.g. /dev/vfio/26)",
                                               spec.name, options_.vfio_backend));
  }
  absl::StatusOr<std::unique_ptr<VfioContainerDriver>> vfio =
      options_.open_vfio_container(spec.vfio_groups);
  if (!vfio.ok()) return Annotate(vfio.status(), absl::StrCat("container \"", spec.name, "\""));
  absl::StatusOr<VfioDmaWindow> window = (*vfio)->DmaWindow();
  if (!window.ok()) return window.status();
  // The kernel's window is the container's; a caller that names one must name that one.
  auto mismatch = [&](const char* what, uint64_t asked, uint64_t kernel) {
    return ErrnoStatus(EINVAL, absl::StrFormat("container \"%s\": %s 0x%x differs from the "
                                               "kernel's 0x%x",
                                               spec.name, what, asked, kernel));
  };
  if (spec.iommu_page_size != 0 && spec.iommu_page_size != window->iommu_page_size) {
    return mismatch("iommu_page_size", spec.iommu_page_size, window->iommu_page_size);
  }
  if (spec.window_start != 0 && spec.window_start != window->start) {
    return mismatch("window_start", spec.window_start, window->start);
  }
  if (spec.window_size != 0 && spec.window_size != window->size) {
    return mismatch("window_size", spec.window_size, window->size);
  }
  *options = {.iommu_page_size = window->iommu_page_size,
              .window_start = window->start,
              .window_size = window->size};
  return vfio;
}

absl::StatusOr<ContainerView> NodeAgent::GetContainer(absl::string_view name) const {
  std::shared_ptr<ContainerEntry> entry = FindContainer(name);
  if (entry == nullptr) return NoSuchContainer(name);
  absl::StatusOr<ContainerInfo> info = registry_->GetContainer(entry->id);
  if (!info.ok()) return info.status();
  return ToView(*info);
}

std::vector<ContainerView> NodeAgent::ListContainers() const {
  std::vector<ContainerView> views;
  for (const ContainerInfo& info : registry_->ListContainers()) views.push_back(ToView(info));
  std::sort(views.begin(), views.end(),
            [](const ContainerView& a, const ContainerView& b) { return a.name < b.name; });
  return views;
}

absl::Status NodeAgent::ReleaseContainer(absl::string_view name, const DecisionTag* decision,
                                         const Caller& caller) {
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  MutexLock control(&control_mu_);
  std::shared_ptr<ContainerEntry> entry = FindContainer(name);
  if (entry == nullptr) return NoSuchContainer(name);
  if (absl::Status status = CheckContainerControl(*entry, caller, "release"); !status.ok()) {
    return status;
  }
  // Before the store: the kernel's state is the VMM's until it gives the container back.
  if (entry->dma->awaiting_adoption()) {
    return Annotate(entry->dma->AwaitingAdoption("release"),
                    absl::StrCat("container \"", name, "\""));
  }
  MutexLock dma(&entry->dma_mu);
  ContextEntry* context = entry->bound.load(std::memory_order_acquire);
  // The store first: a release cannot be undone (the addresses of its mappings go with it), and
  // with the container's DMA path held the registry has no reason to refuse it.
  Mutation mutation;
  mutation.DeleteContainer(name);
  if (context == nullptr) {
    // Never registered memory: no region of any context, so no pending row can change.
    if (absl::Status status = Persist(mutation, decision); !status.ok()) return status;
    if (absl::Status status = ReleaseContainerLocked(*entry); !status.ok()) {
      return MemoryBehindStore(status);
    }
  } else {
    MutexLock pending(&context->pending_mu);
    // With the pending rows the release will leave. Raised before the registry is read, as in
    // AddPendingDiff: a concurrent map or unmap that changes them takes the pending path and
    // records its change after this one.
    std::vector<std::pair<uint64_t, uint64_t>> persisted_pending = context->pending;
    context->has_pending.store(true, std::memory_order_release);
    absl::StatusOr<std::vector<std::pair<uint64_t, uint64_t>>> after =
        registry_->PendingAfterRelease(entry->id);
    if (!after.ok()) {
      RestorePending(*context, std::move(persisted_pending));
      return after.status();
    }
    SetPendingRows(*context, ContextName(context->id), std::move(*after), &mutation);
    if (absl::Status status = Persist(mutation, decision); !status.ok()) {
      RestorePending(*context, std::move(persisted_pending));
      return status;
    }
    if (absl::Status status = ReleaseContainerLocked(*entry); !status.ok()) {
      return MemoryBehindStore(status);
    }
    // Anything the prediction missed (a map or unmap racing it): normally nothing.
    Mutation late;
    AddPendingDiffLocked(*context, late);
    Persist(late).IgnoreError();  // a failure still stops later changes (StoreOutcome)
  }
  MutexLock names(&names_mu_);
  containers_.erase(entry->name);
  container_names_.erase(entry->id);
  return absl::OkStatus();
}

absl::Status NodeAgent::ReleaseContainerLocked(ContainerEntry& entry) {
  if (absl::Status status = entry.dma->Release(); !status.ok()) return status;
  entry.released = true;
  return absl::OkStatus();
}

absl::StatusOr<DeviceHandoff> NodeAgent::OpenDevices(absl::string_view name,
                                                     absl::Span<const std::string> devices,
                                                     const Caller& caller) {
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  if (devices.empty() || devices.size() > kMaxHandoffDevices) {
    return ErrnoStatus(EINVAL, absl::StrFormat("open devices of container \"%s\": %d devices "
                                               "named; 1 to %d per request",
                                               name, devices.size(), kMaxHandoffDevices));
  }
  MutexLock control(&control_mu_);
  std::shared_ptr<ContainerEntry> entry = FindContainer(name);
  if (entry == nullptr) return NoSuchContainer(name);
  if (absl::Status status = CheckContainerDma(*entry, caller, "open devices"); !status.ok()) {
    return status;
  }
  MutexLock dma(&entry->dma_mu);
  if (entry->released) return NoSuchContainer(name);
  absl::StatusOr<std::vector<VfioFd>> fds = entry->dma->OpenDevices(devices);
  if (!fds.ok()) {
    return Annotate(fds.status(), absl::StrCat("open devices of container \"", name, "\""));
  }
  if (!entry->dma->handed_off()) {
    // Recorded before the VMM has them: a restart must not open groups the VMM holds (EBUSY).
    Mutation mutation;
    mutation.MarkHandedOff(name);
    if (absl::Status status = Persist(mutation); !status.ok()) return status;  // `fds` close
    entry->dma->MarkHandedOff();
  }
  LOG(INFO) << absl::StrFormat("container \"%s\": %d device(s) (%s) and the container handed to %s",
                               name, devices.size(), absl::StrJoin(devices, ", "),
                               caller.Describe());
  absl::StatusOr<ContainerInfo> info = registry_->GetContainer(entry->id);
  DeviceHandoff handoff;
  if (info.ok()) handoff.container = ToView(*info);
  handoff.fds = std::move(*fds);
  return handoff;
}

absl::StatusOr<AdoptionReport> NodeAgent::AdoptContainer(absl::string_view name, int container_fd,
                                                         const Caller& caller) {
  MutexLock control(&control_mu_);
  std::shared_ptr<ContainerEntry> entry = FindContainer(name);
  absl::Status refused;
  if (entry == nullptr) {
    refused = NoSuchContainer(name);
  } else {
    refused = CheckContainerDma(*entry, caller, "give back");
  }
  if (!refused.ok()) {
    ::close(container_fd);
    return refused;
  }
  MutexLock dma(&entry->dma_mu);
  absl::StatusOr<AdoptionReport> report = entry->dma->Adopt(container_fd);
  if (!report.ok()) {
    LOG(WARNING) << absl::StrFormat("container \"%s\": taking it back from %s failed: %s", name,
                                    caller.Describe(), report.status().ToString());
    return Annotate(report.status(), absl::StrCat("give back container \"", name, "\""));
  }
  containers_adopted_.fetch_add(1, std::memory_order_relaxed);
  adoption_inconsistencies_.fetch_add(report->inconsistencies, std::memory_order_relaxed);
  const std::string line = absl::StrFormat(
      "container \"%s\": taken back from %s without unmapping anything: %d registration and %d "
      "mapping piece(s) now at the agent's addresses, %d not found as recorded (made again)",
      name, caller.Describe(), report->registrations, report->mappings, report->inconsistencies);
  if (report->inconsistencies == 0) {
    LOG(INFO) << line;
  } else {
    LOG(WARNING) << line;
    for (const std::string& detail : report->details) {
      LOG(WARNING) << absl::StrFormat("container \"%s\": not as recorded: %s", name, detail);
    }
  }
  return report;
}

void NodeAgent::PrepareForExit() {
  MutexLock control(&control_mu_);
  std::vector<std::shared_ptr<ContainerEntry>> handed_off;
  {
    MutexLock names(&names_mu_);
    for (const auto& [name, entry] : containers_) {
      if (entry->dma->handed_off()) handed_off.push_back(entry);
    }
  }
  for (const std::shared_ptr<ContainerEntry>& entry : handed_off) {
    MutexLock dma(&entry->dma_mu);
    if (absl::Status status = entry->dma->PrepareForExit(); !status.ok()) {
      LOG(WARNING) << absl::StrFormat("container \"%s\": before the exit: %s", entry->name,
                                      status.ToString());
    }
  }
}

void NodeAgent::MarkReleasedUnderTeardown(ContainerEntry& entry) {
  entry.released = true;
  entry.dma->CloseDevice();
}

void NodeAgent::AddPendingDiffLocked(ContextEntry& context, Mutation& mutation) {
  AddPendingDiff(context, ContextName(context.id), &mutation);
}

// --- Registration -----------------------------------------------------------------------------

absl::StatusOr<RegionView> NodeAgent::RegisterRegion(absl::string_view container_name,
                                                     absl::string_view context_name, uint64_t ua,
                                                     uint64_t size, const DecisionTag* decision,
                                                     const Caller& caller) {
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  MutexLock control(&control_mu_);
  std::shared_ptr<ContainerEntry> container = FindContainer(container_name);
  if (container == nullptr) return NoSuchContainer(container_name);
  std::shared_ptr<ContextEntry> context = FindContext(context_name);
  if (context == nullptr) return NoSuchContext(context_name);
  if (absl::Status status = CheckControl(*context, context_name, caller, "register memory of");
      !status.ok()) {
    return status;
  }
  if (absl::Status status = CheckContainerControl(*container, caller, "register memory for");
      !status.ok()) {
    return status;
  }
  if (absl::StatusOr<ContextInfo> info = registry_->GetContext(context->id);
      info.ok() && info->regions >= options_.max_regions_per_context) {
    return OverLimit(absl::StrCat("register in context \"", context_name, "\": its regions"),
                     "--max_regions_per_context", options_.max_regions_per_context);
  }
  MutexLock pending(&context->pending_mu);
  const bool had_pending = context->has_pending.load(std::memory_order_acquire);
  if (absl::Status status = container->dma->Register(context->id, ua, size); !status.ok()) {
    return status;
  }
  Mutation mutation;
  const bool binds = container->bound.exchange(context.get(), std::memory_order_acq_rel) == nullptr;
  if (binds) mutation.BindContainer(container_name, context_name);
  mutation.AddHold(container_name, context_name, ua, size, container->dma->DeviceIova(ua, size));
  std::vector<std::pair<uint64_t, uint64_t>> persisted_pending;
  if (had_pending) {
    persisted_pending = context->pending;
    AddPendingDiff(*context, std::string(context_name), &mutation);
  }
  if (absl::Status status = Persist(mutation, decision); !status.ok()) {
    // Refused: take the hold (and the binding) back, so reads show only what was acknowledged.
    if (had_pending) RestorePending(*context, std::move(persisted_pending));
    bool undone = container->dma->Unregister(context->id, ua, size).ok();
    if (binds) {
      if (container->dma->Unbind().ok()) {
        container->bound.store(nullptr, std::memory_order_release);
      } else {
        undone = false;
      }
    }
    if (!undone) UndoFailed();
    return status;
  }
  absl::StatusOr<std::optional<RegionInfo>> region =
      registry_->Find(context->id, ua, size / registry_->page_size());
  if (!region.ok()) return region.status();
  if (!region->has_value()) {
    return ErrnoStatus(EIO, absl::StatusCode::kInternal, "the registered region vanished");
  }
  return ToView(**region);
}

absl::Status NodeAgent::UnregisterRegion(absl::string_view container_name, uint64_t ua,
                                         uint64_t size, const DecisionTag* decision,
                                         const Caller& caller) {
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  MutexLock control(&control_mu_);
  std::shared_ptr<ContainerEntry> container = FindContainer(container_name);
  if (container == nullptr) return NoSuchContainer(container_name);
  if (absl::Status status = CheckContainerControl(*container, caller, "unregister memory of");
      !status.ok()) {
    return status;
  }
  // Null only for a container that never registered memory, which the registry refuses below.
  ContextEntry* context = container->bound.load(std::memory_order_acquire);
  const ContextId context_id = context != nullptr ? context->id : 0;
  if (absl::Status status = container->dma->Unregister(context_id, ua, size); !status.ok()) {
    return status;
  }
  Mutation mutation;
  mutation.RemoveHold(container_name, ContextName(context->id), ua, size);
  if (absl::Status status = Persist(mutation, decision); !status.ok()) {
    // Refused: the container holds the region again (re-pinned when it was the last holder).
    if (!container->dma->Register(context->id, ua, size).ok()) UndoFailed();
    return status;
  }
  return absl::OkStatus();
}

// --- Decisions --------------------------------------------------------------------------------

DecisionOutcome NodeAgent::ApplyDecision(const DecisionSpec& decision) {
  if (decision.tag.id.empty()) {
    return {ErrnoStatus(EINVAL, "decision without an id"), false};
  }
  MutexLock lock(&decision_mu_);
  if (options_.store != nullptr) {
    absl::StatusOr<std::optional<int>> recorded = options_.store->DecisionResult(decision.tag.id);
    if (!recorded.ok()) return {recorded.status(), false};
    if (recorded->has_value()) {
      const int err = **recorded;
      return {err == 0 ? absl::OkStatus()
                       : ErrnoStatus(err, absl::StrFormat("decision %s was answered %s before",
                                                          decision.tag.id, ErrnoName(err))),
              true};
    }
  }
  absl::Status status;
  switch (decision.kind) {
    case DecisionKind::kRegister:
      status = RegisterRegion(decision.container, decision.context, decision.ua, decision.size,
                              &decision.tag)
                   .status();
      break;
    case DecisionKind::kUnregister:
      status = UnregisterRegion(decision.container, decision.ua, decision.size, &decision.tag);
      break;
    case DecisionKind::kReleaseContainer:
      status = ReleaseContainer(decision.container, &decision.tag);
      break;
    case DecisionKind::kTeardownContext:
      status = TeardownContext(decision.context, &decision.tag);
      break;
    default:
      status =
          ErrnoStatus(EINVAL, absl::StrFormat("decision %s has unknown kind %d", decision.tag.id,
                                              static_cast<int>(decision.kind)));
  }
  // A refusal is an answer too: record it so a repeat gets the same one. (A store failure is
  // not an answer; the repeat will be tried again after the restart.)
  if (!status.ok() && ErrnoOf(status) != EIO && options_.store != nullptr) {
    Mutation record;
    record.RecordDecision(decision.tag.id, decision.tag.epoch, ErrnoOf(status));
    if (absl::Status persisted = Persist(record); !persisted.ok()) return {persisted, false};
  }
  return {status, false};
}

// --- DMA --------------------------------------------------------------------------------------

absl::Status NodeAgent::MapDma(absl::string_view container_name, uint64_t iova, uint64_t ua,
                               uint64_t size, const Caller& caller) {
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  std::shared_ptr<ContainerEntry> container = FindContainer(container_name);
  if (container == nullptr) return NoSuchContainer(container_name);
  if (absl::Status status = CheckContainerDma(*container, caller, "MapDma"); !status.ok()) {
    return status;
  }
  MutexLock dma(&container->dma_mu);
  if (container->released) return NoSuchContainer(container_name);
  uint64_t cleared_bytes = 0;
  bool replaced = false;
  absl::Status status = container->dma->Map(iova, ua, size, &cleared_bytes, &replaced);
  ContextEntry* context = container->bound.load(std::memory_order_acquire);
  if (context != nullptr && context->has_pending.load(std::memory_order_acquire)) {
    // The map may have moved a count off a region pending release: its rows change with it, in
    // one transaction.
    Mutation mutation;
    if (status.ok()) {
      mutation.SetMapping(container_name, iova, size, ua);
    } else if (cleared_bytes > 0) {
      mutation.ClearMappings(container_name, iova, cleared_bytes);
    }
    MutexLock pending(&context->pending_mu);
    std::vector<std::pair<uint64_t, uint64_t>> persisted_pending = context->pending;
    AddPendingDiff(*context, ContextName(context->id), &mutation);
    if (absl::Status persisted = Persist(mutation); !persisted.ok()) {
      RestorePending(*context, std::move(persisted_pending));
      UndoRefusedMap(*container, status.ok(), replaced, iova, size);
      return persisted;
    }
    return status;
  }
  absl::Status persisted;
  if (status.ok()) {
    persisted = PersistMappingChange(*container, /*mapped=*/true, iova, size, ua);
  } else if (cleared_bytes > 0) {
    // A failed map clears the entries it had reached (spec §7.5); record that too.
    persisted = PersistMappingChange(*container, /*mapped=*/false, iova, cleared_bytes);
  }
  if (ABSL_PREDICT_FALSE(!persisted.ok())) {
    UndoRefusedMap(*container, status.ok(), replaced, iova, size);
    return persisted;
  }
  return status;
}

void NodeAgent::UndoRefusedMap(ContainerEntry& container, bool installed, bool replaced,
                               uint64_t iova, uint64_t size) {
  if (!installed && !replaced) return;  // a failed map that only took back its own entries
  if (!container.dma->UndoMap(iova, size, replaced,
                              [&] { return AcknowledgedMappings(container, iova, size); })) {
    UndoFailed();
  }
}

absl::StatusOr<std::vector<DmaMapping>> NodeAgent::AcknowledgedMappings(
    const ContainerEntry& container, uint64_t iova, uint64_t size) {
  if (options_.store == nullptr) return absl::FailedPreconditionError("no state store");
  absl::StatusOr<std::vector<StoredMapping>> rows =
      options_.store->AcknowledgedMappings(container.id, iova, size);
  if (!rows.ok()) return rows.status();
  std::vector<DmaMapping> mappings;
  mappings.reserve(rows->size());
  for (const StoredMapping& row : *rows) {
    mappings.push_back({.iova = row.iova, .ua = row.ua, .size = row.size});
  }
  return mappings;
}

absl::Status NodeAgent::UnmapDma(absl::string_view container_name, uint64_t iova, uint64_t size,
                                 const Caller& caller) {
  if (absl::Status status = CheckWritable(); !status.ok()) return status;
  std::shared_ptr<ContainerEntry> container = FindContainer(container_name);
  if (container == nullptr) return NoSuchContainer(container_name);
  if (absl::Status status = CheckContainerDma(*container, caller, "UnmapDma"); !status.ok()) {
    return status;
  }
  MutexLock dma(&container->dma_mu);
  if (container->released) return NoSuchContainer(container_name);
  // The device first (see ContainerDma::UnmapDevice), but only a range the registry would take.
  if (absl::Status status = container->dma->UnmapDevice(iova, size); !status.ok()) return status;
  // Then the record, before the registry: the registry's entries need not be put back after a
  // refusal then (only the device's, from the store), and a range checked as above cannot be
  // refused by UnmapRegistry.
  if (absl::Status persisted = PersistMappingChange(*container, /*mapped=*/false, iova, size);
      ABSL_PREDICT_FALSE(!persisted.ok())) {
    // The registry still shows the acknowledged mappings; the device gets them back.
    if (!container->dma->UndoUnmapDevice(
            iova, size, [&] { return AcknowledgedMappings(*container, iova, size); })) {
      UndoFailed();
    }
    return persisted;
  }
  if (absl::Status status = container->dma->UnmapRegistry(iova, size); !status.ok()) {
    return status;
  }
  ContextEntry* context = container->bound.load(std::memory_order_acquire);
  if (context != nullptr && context->has_pending.load(std::memory_order_acquire)) {
    // The unmap may have completed a pending release. The unmap itself is durable already; if
    // this record fails, the rows it would remove are ones recovery removes too (a pending row
    // that no mapping keeps, or whose holders keep the region), so memory matches what a restart
    // rebuilds, and the unmap stays acknowledged.
    Mutation mutation;
    MutexLock pending(&context->pending_mu);
    AddPendingDiff(*context, ContextName(context->id), &mutation);
    Persist(mutation).IgnoreError();  // a failure still stops later changes (StoreOutcome)
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint64_t>> NodeAgent::Translate(absl::string_view context_name,
                                                           absl::Span<const uint64_t> uas,
                                                           const Caller& caller) const {
  std::shared_ptr<ContextEntry> context = FindContext(context_name);
  if (context == nullptr) return NoSuchContext(context_name);
  if (absl::Status status = CheckDma(context.get(), context_name, caller, "Translate");
      !status.ok()) {
    return status;
  }
  if (uas.size() > options_.max_translate_uas) {
    return ErrnoStatus(ENOMEM, absl::StrFormat("translate: %d addresses in one call, over the "
                                               "limit of %d; split the call",
                                               uas.size(), options_.max_translate_uas));
  }
  std::vector<uint64_t> hpas(uas.size());
  Registry::ReadSession session(*registry_, context->id);
  for (size_t i = 0; i < uas.size(); ++i) {
    if (!session.TryTranslate(uas[i], &hpas[i])) {
      return ErrnoStatus(EFAULT, absl::StatusCode::kOutOfRange,
                         absl::StrFormat("translate: ua=0x%x (index %d) is outside every "
                                         "registered region of \"%s\"",
                                         uas[i], i, context_name));
    }
  }
  return hpas;
}

absl::StatusOr<std::optional<RegionView>> NodeAgent::Lookup(absl::string_view context_name,
                                                            uint64_t ua, uint64_t size) const {
  std::shared_ptr<ContextEntry> context = FindContext(context_name);
  if (context == nullptr) return NoSuchContext(context_name);
  absl::StatusOr<std::optional<RegionInfo>> region = registry_->Lookup(context->id, ua, size);
  if (!region.ok()) return region.status();
  if (!region->has_value()) return std::optional<RegionView>();
  return std::optional<RegionView>(ToView(std::move(**region)));
}

absl::StatusOr<std::vector<RegionView>> NodeAgent::ListRegions(absl::string_view context_name,
                                                               bool with_hpas,
                                                               const Caller& caller) const {
  std::optional<ContextId> context_id;
  if (!context_name.empty()) {
    std::shared_ptr<ContextEntry> context = FindContext(context_name);
    if (context == nullptr) return NoSuchContext(context_name);
    if (with_hpas) {
      if (absl::Status status =
              CheckDma(context.get(), context_name, caller, "ListRegions with_hpas");
          !status.ok()) {
        return status;
      }
    }
    context_id = context->id;
  } else if (with_hpas && caller.kind != Caller::Kind::kInternal && !options_.dma_from_any_peer) {
    // Physical addresses are each owner's: every context listed must be the caller's.
    std::vector<std::pair<std::string, std::shared_ptr<ContextEntry>>> all;
    {
      MutexLock names(&names_mu_);
      all.assign(contexts_.begin(), contexts_.end());
    }
    for (const auto& [name, entry] : all) {
      if (absl::Status status = CheckDma(entry.get(), name, caller, "ListRegions with_hpas");
          !status.ok()) {
        return status;
      }
    }
  }
  // With hpas the answer is 8 bytes per pinned page: bounded before anything is copied. The
  // control lock keeps registrations from growing it between the count and the copy.
  std::unique_ptr<MutexLock> control;
  if (with_hpas) {
    control = std::make_unique<MutexLock>(&control_mu_);
    uint64_t pages = 0;
    for (const ContextInfo& info : registry_->ListContexts()) {
      if (!context_id.has_value() || info.id == *context_id) {
        pages += info.locked_bytes / registry_->page_size();
      }
    }
    if (pages > options_.max_listed_hpas) {
      return ErrnoStatus(ENOMEM, absl::StrFormat("ListRegions with_hpas would return %d physical "
                                                 "addresses, over the limit of %d per call; list "
                                                 "without them, or use Translate",
                                                 pages, options_.max_listed_hpas));
    }
  }
  std::vector<RegionView> views;
  for (RegionInfo& info : registry_->ListRegions(context_id, with_hpas)) {
    views.push_back(ToView(std::move(info)));
  }
  return views;
}

NodeStatusView NodeAgent::Status() const {
  NodeStatusView status;
  status.node_name = options_.node_name;
  status.backend = options_.vfio_backend.empty() ? options_.backend->name() : options_.vfio_backend;
  status.available_backends = options_.available_backends;
  status.page_size = registry_->page_size();
  for (const ContextInfo& context : registry_->ListContexts()) {
    ++status.contexts;
    status.regions += context.regions;
    status.locked_bytes += context.locked_bytes;
  }
  for (const ContainerInfo& container : registry_->ListContainers()) {
    ++status.containers;
    status.installed_entries += container.installed_entries;
  }
  status.counters = registry_->stats();
  status.store_failed = store_failed_.load(std::memory_order_acquire);
  status.store_commit_failures = store_commit_failures_.load(std::memory_order_relaxed);
  status.vfio_inconsistencies = vfio_inconsistencies_.load(std::memory_order_relaxed);
  status.refused_change_undo_failures =
      refused_change_undo_failures_.load(std::memory_order_relaxed);
  status.permission_denied = permission_denied_.load(std::memory_order_relaxed);
  status.owner_exit_teardowns = owner_exit_teardowns_.load(std::memory_order_relaxed);
  status.owner_exits_at_recovery = owner_exits_at_recovery_.load(std::memory_order_relaxed);
  status.memory_lost_at_recovery = memory_lost_at_recovery_.load(std::memory_order_relaxed);
  status.limit_refusals = limit_refusals_.load(std::memory_order_relaxed);
  status.containers_reopened_at_recovery =
      containers_reopened_at_recovery_.load(std::memory_order_relaxed);
  status.containers_adopted = containers_adopted_.load(std::memory_order_relaxed);
  status.adoption_inconsistencies = adoption_inconsistencies_.load(std::memory_order_relaxed);
  {
    MutexLock names(&names_mu_);
    for (const auto& [name, entry] : containers_) {
      if (entry->dma->awaiting_adoption()) ++status.containers_awaiting_adoption;
    }
  }
  return status;
}

}  // namespace dmapin::agent
