// NodeAgent's recovery: rebuilds the registry (and the kernel's containers, for the VFIO
// backends) and the name tables from what the store acknowledged, before anyone is served.
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "agent/node/container_dma.h"
#include "agent/node/node_agent.h"
#include "agent/node/node_agent_internal.h"
#include "agent/node/vfio_container_dma.h"
#include "common/errno_status.h"
#include "common/logging.h"

namespace dmapin::agent {

using node_internal::Annotate;
using node_internal::ToOptions;

absl::Status NodeAgent::Recover() {
  if (options_.store == nullptr) return absl::OkStatus();
  absl::StatusOr<PersistedState> state = options_.store->Load();
  if (!state.ok()) return Annotate(state.status(), "recovery: loading the state store");
  MutexLock control(&control_mu_);
  absl::flat_hash_map<std::string, std::shared_ptr<GuestMemory>> guests;
  if (absl::Status status = RecoverOwners(*state, &guests); !status.ok()) return status;
  std::vector<std::pair<ContextEntry*, StoredPending>> pending;
  {
    MutexLock names(&names_mu_);
    if (absl::Status status = RecoverLocked(*state, guests, &pending); !status.ok()) return status;
  }
  // After names_mu_: the agent takes a context's pending_mu first.
  for (auto& [context, row] : pending) {
    MutexLock lock(&context->pending_mu);
    context->pending.emplace_back(row.ua, row.size);
    context->has_pending.store(true, std::memory_order_release);
  }
  return absl::OkStatus();
}

namespace {

// The owner of a stored context, if it has one.
std::optional<ProcessIdentity> OwnerOf(const StoredContext& stored) {
  if (stored.owner_pid == 0) return std::nullopt;
  return ProcessIdentity{.pid = static_cast<pid_t>(stored.owner_pid),
                         .uid = stored.owner_uid,
                         .start_time = stored.owner_start_time};
}

// The owner's memory again, from its own mappings (the agent's were lost with its process): the
// same objects at the same offsets, or an error saying what changed.
absl::Status ReattachSlots(const StoredContext& stored, GuestMemory& guest) {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const StoredSlot& slot : stored.slots) ranges.emplace_back(slot.ua, slot.size);
  absl::StatusOr<std::vector<ProcessSlot>> opened =
      OpenProcessSlots(static_cast<pid_t>(stored.owner_pid), ranges);
  if (!opened.ok()) return opened.status();
  std::vector<SlotSource> sources;
  for (const ProcessSlot& slot : *opened) sources.push_back(slot.source);
  if (absl::Status status = guest.Attach(sources); !status.ok()) return status;
  // Both in ua order: what Attach recorded of each object against what was stored.
  const std::vector<GuestSlot> now = guest.slots();
  for (size_t i = 0; i < now.size(); ++i) {
    const StoredSlot& was = stored.slots[i];
    if (now[i].dev != was.dev || now[i].ino != was.ino || now[i].offset != was.offset) {
      return ErrnoStatus(
          EFAULT, absl::StrFormat("slot ua=0x%x: the VMM now maps another object or offset there "
                                  "(dev %d ino %d offset 0x%x, was dev %d ino %d offset 0x%x)",
                                  was.ua, now[i].dev, now[i].ino, now[i].offset, was.dev, was.ino,
                                  was.offset));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status NodeAgent::RecoverOwners(
    PersistedState& state, absl::flat_hash_map<std::string, std::shared_ptr<GuestMemory>>* guests) {
  // The final cleanup of a VMM that exited while the agent was down (or whose memory is gone) is
  // a teardown, as when the agent sees the exit itself: recorded first, then the state reloaded.
  Mutation gone;
  for (const StoredContext& stored : state.contexts) {
    const std::optional<ProcessIdentity> owned = OwnerOf(stored);
    if (!owned.has_value()) continue;
    const ProcessIdentity& owner = *owned;
    if (!IsAlive(owner)) {
      gone.DeleteContext(stored.name);
      owner_exits_at_recovery_.fetch_add(1, std::memory_order_relaxed);
      LOG(WARNING) << absl::StrFormat(
          "recovery: context \"%s\": its VMM (pid %d) exited while "
          "the agent was down; torn down",
          stored.name, owner.pid);
      continue;
    }
    if (!options_.vmm_memory || owner.pid == getpid() || stored.mem_size != 0) continue;
    auto guest = std::make_shared<GuestMemory>(registry_->page_size());
    if (absl::Status status = ReattachSlots(stored, *guest); !status.ok()) {
      gone.DeleteContext(stored.name);
      memory_lost_at_recovery_.fetch_add(1, std::memory_order_relaxed);
      LOG(ERROR) << absl::StrFormat(
          "recovery: context \"%s\": the memory of its VMM (pid %d) "
          "cannot be mapped again (%s); torn down",
          stored.name, owner.pid, status.ToString());
      continue;
    }
    (*guests)[stored.name] = std::move(guest);
  }
  if (gone.empty()) return absl::OkStatus();
  if (absl::Status status = Persist(gone); !status.ok()) {
    return Annotate(status, "recovery: tearing down the contexts of exited VMMs");
  }
  absl::StatusOr<PersistedState> reloaded = options_.store->Load();
  if (!reloaded.ok()) return Annotate(reloaded.status(), "recovery: reloading the state store");
  state = std::move(*reloaded);
  return absl::OkStatus();
}

absl::Status NodeAgent::RecoverLocked(
    const PersistedState& state,
    const absl::flat_hash_map<std::string, std::shared_ptr<GuestMemory>>& guests,
    std::vector<std::pair<ContextEntry*, StoredPending>>* pending) {
  uint64_t max_id = 0;
  for (const StoredContext& stored : state.contexts) {
    ContextSpec spec{.name = stored.name,
                     .memlock_limit_bytes = stored.memlock_limit_bytes,
                     .cap_ipc_lock = stored.cap_ipc_lock,
                     .backing = static_cast<MemoryBacking>(stored.backing),
                     .memory_bytes = stored.mem_size,
                     .owner_pid = static_cast<pid_t>(stored.owner_pid)};
    if (absl::Status status = registry_->CreateContext(stored.id, ToOptions(spec)); !status.ok()) {
      return Annotate(status, absl::StrCat("recovery: context ", stored.name));
    }
    auto entry = std::make_shared<ContextEntry>();
    if (stored.mem_size > 0) {
      // Back where the registrations expect it.
      absl::StatusOr<std::unique_ptr<ContextMemory>> memory =
          AllocateMemory(stored.name, spec, stored.mem_ua);
      if (!memory.ok()) {
        return Annotate(memory.status(), absl::StrCat("recovery: memory of context ", stored.name));
      }
      entry->memory = std::move(*memory);
    }
    entry->id = stored.id;
    entry->spec = std::move(spec);
    entry->owner = OwnerOf(stored);
    // Before anything is re-pinned (the holds below): the registrations are in the owner's
    // addresses.
    if (auto guest = guests.find(stored.name); guest != guests.end()) {
      entry->guest = guest->second;
      guest_backend_.SetMemory(stored.id, entry->guest);
    }
    contexts_[stored.name] = entry;
    context_names_[stored.id] = stored.name;
    max_id = std::max(max_id, stored.id);
  }
  for (const StoredContainer& stored : state.containers) {
    ContainerSpec spec{.name = stored.name,
                       .iommu_page_size = stored.iommu_page_size,
                       .window_start = stored.window_start,
                       .window_size = stored.window_size};
    spec.vfio_groups = stored.vfio_groups;
    ContainerOptions options{.iommu_page_size = stored.iommu_page_size,
                             .window_start = stored.window_start,
                             .window_size = stored.window_size};
    const bool creator_alive =
        stored.creator_pid != 0 && IsAlive({.pid = static_cast<pid_t>(stored.creator_pid),
                                            .start_time = stored.creator_start_time});
    // A handed-off container whose VMM lives (its context survived RecoverOwners, or its creator
    // lives while it is unbound): the kernel kept its mappings for the VMM's descriptors; the
    // container waits for the VMM to give it back. Otherwise (VFIO) the kernel dropped it with
    // the old process: it is opened again, on the same window (OpenVfioContainer refuses a
    // window that changed), and its mappings are made again.
    const bool adoptable = stored.handed_off && options_.new_vfio_driver != nullptr &&
                           (!stored.context.empty() || creator_alive);
    absl::StatusOr<std::unique_ptr<ContainerDma>> dma;
    if (stored.vfio_groups.empty()) {
      dma = NewRegistryContainerDma(*registry_, stored.id, options);
    } else if (adoptable) {
      dma = NewAdoptableVfioContainerDma(*registry_, stored.id, options, options_.new_vfio_driver(),
                                         &vfio_inconsistencies_, &guest_backend_);
      LOG(INFO) << absl::StrFormat(
          "recovery: container \"%s\": its VMM holds it; the kernel keeps its DMA mappings "
          "until the VMM gives its descriptor back",
          stored.name);
    } else {
      dma = NewContainerDma(stored.id, spec, &options);
      if (dma.ok()) {
        containers_reopened_at_recovery_.fetch_add(1, std::memory_order_relaxed);
        LOG(WARNING) << absl::StrFormat(
            "recovery: container \"%s\" (VFIO groups %s) was not handed to its VMM: the kernel "
            "dropped its DMA mappings with the old agent process; opened again and re-mapped",
            stored.name, absl::StrJoin(stored.vfio_groups, ","));
      }
    }
    if (!dma.ok()) return Annotate(dma.status(), absl::StrCat("recovery: container ", stored.name));
    auto entry = std::make_shared<ContainerEntry>();
    entry->dma = std::move(*dma);
    entry->id = stored.id;
    entry->name = stored.name;
    // A creator that is gone (or whose pid another process took) no longer maps on it.
    if (creator_alive) entry->creator_pid = static_cast<pid_t>(stored.creator_pid);
    if (!stored.context.empty()) {
      // Bound by an earlier registration, possibly to regions it no longer holds.
      auto context = contexts_.find(stored.context);
      if (context == contexts_.end()) {
        return absl::DataLossError(absl::StrFormat(
            "recovery: container %s is bound to missing context %s", stored.name, stored.context));
      }
      if (absl::Status status = entry->dma->Bind(context->second->id); !status.ok()) {
        return Annotate(status, absl::StrCat("recovery: binding container ", stored.name));
      }
      entry->bound.store(context->second.get(), std::memory_order_release);
    }
    entry->spec = std::move(spec);
    containers_[stored.name] = entry;
    container_names_[stored.id] = stored.name;
    max_id = std::max(max_id, stored.id);
  }
  auto context_of = [&](const std::string& name)
                        ABSL_EXCLUSIVE_LOCKS_REQUIRED(names_mu_) -> absl::StatusOr<ContextEntry*> {
    auto it = contexts_.find(name);
    if (it == contexts_.end()) {
      return absl::DataLossError(absl::StrCat("recovery: unknown context ", name));
    }
    return it->second.get();
  };
  // Holds in commit order, so that the first holder pins as it did originally.
  for (const StoredHold& hold : state.holds) {
    auto container = containers_.find(hold.container);
    absl::StatusOr<ContextEntry*> context = context_of(hold.context);
    if (container == containers_.end() || !context.ok()) {
      return absl::DataLossError(absl::StrFormat("recovery: hold of %s on %s names a missing row",
                                                 hold.container, hold.context));
    }
    if (absl::Status status = container->second->dma->ReplayRegistration(
            (*context)->id, hold.ua, hold.size, hold.device_iova);
        !status.ok()) {
      return Annotate(status, absl::StrFormat("recovery: re-registering ua=0x%x size=0x%x for "
                                              "container %s",
                                              hold.ua, hold.size, hold.container));
    }
    container->second->bound.store(*context, std::memory_order_release);
  }
  // Regions pending release: one that no container holds is registered by a temporary holder,
  // mapped below, then let go; one that containers registered meanwhile (spec §4: they added
  // users) gets its pending reference back once its mappings are restored.
  std::vector<ContainerId> temporary;
  std::vector<const StoredPending*> held_pending;
  uint64_t next_temporary = max_id + 1;
  for (const StoredPending& pending : state.pending) {
    absl::StatusOr<ContextEntry*> context = context_of(pending.context);
    if (!context.ok()) return context.status();
    absl::StatusOr<std::optional<RegionInfo>> held =
        registry_->Find((*context)->id, pending.ua, pending.size / registry_->page_size());
    if (!held.ok()) return held.status();
    if (held->has_value()) {
      held_pending.push_back(&pending);
      continue;
    }
    const ContainerId id = next_temporary++;
    absl::Status status =
        registry_->CreateContainer(id, {.iommu_page_size = registry_->page_size()});
    if (status.ok()) status = registry_->Register(id, (*context)->id, pending.ua, pending.size);
    if (!status.ok()) {
      return Annotate(status, absl::StrFormat("recovery: pending region ua=0x%x size=0x%x of %s",
                                              pending.ua, pending.size, pending.context));
    }
    temporary.push_back(id);
  }
  for (const StoredMapping& mapping : state.mappings) {
    auto container = containers_.find(mapping.container);
    if (container == containers_.end()) {
      return absl::DataLossError(
          absl::StrCat("recovery: mapping of unknown container ", mapping.container));
    }
    if (absl::Status status =
            container->second->dma->ReplayMapping(mapping.iova, mapping.ua, mapping.size);
        !status.ok()) {
      return Annotate(status,
                      absl::StrFormat("recovery: re-mapping iova=0x%x ua=0x%x size=0x%x "
                                      "of container %s",
                                      mapping.iova, mapping.ua, mapping.size, mapping.container));
    }
  }
  for (ContainerId id : temporary) {
    if (absl::Status status = registry_->ReleaseContainer(id); !status.ok()) return status;
  }
  // A pending row whose region no mapping keeps any more, as an agent before AddPendingDiff raised
  // has_pending first could leave it (an unmap racing the unregister recorded the unmap without
  // the release). The release is complete; the row goes.
  Mutation completed;
  std::vector<const StoredPending*> completed_held;
  for (const StoredPending* row : held_pending) {
    ContextEntry* context = *context_of(row->context);
    absl::StatusOr<std::optional<RegionInfo>> region =
        registry_->Find(context->id, row->ua, row->size / registry_->page_size());
    if (!region.ok()) return region.status();
    if (region->has_value() && (*region)->mapped == 1) {
      completed_held.push_back(row);  // its pending reference would be dropped at once
      continue;
    }
    if (absl::Status status = registry_->RestorePendingRelease(context->id, row->ua, row->size);
        !status.ok()) {
      return Annotate(status, absl::StrFormat("recovery: pending region ua=0x%x size=0x%x of %s",
                                              row->ua, row->size, row->context));
    }
  }
  for (const StoredPending& row : state.pending) {
    ContextEntry* context = *context_of(row.context);
    absl::StatusOr<std::optional<RegionInfo>> region =
        registry_->Find(context->id, row.ua, row.size / registry_->page_size());
    if (!region.ok()) return region.status();
    if (!region->has_value() ||
        std::find(completed_held.begin(), completed_held.end(), &row) != completed_held.end()) {
      completed.RemovePending(row.context, row.ua, row.size);
    } else if ((*region)->pending_release) {
      pending->emplace_back(context, row);
    } else {
      return absl::DataLossError(absl::StrFormat(
          "recovery: region ua=0x%x size=0x%x of %s was persisted as pending release but its "
          "restored mappings and holders leave nothing pending",
          row.ua, row.size, row.context));
    }
  }
  if (absl::Status status = Persist(completed); !status.ok()) {
    return Annotate(status, "recovery: removing completed pending releases");
  }
  next_id_ = next_temporary;
  auto next_id = state.meta.find(std::string(kMetaNextId));
  uint64_t persisted_next = 0;
  if (next_id != state.meta.end() && absl::SimpleAtoi(next_id->second, &persisted_next)) {
    next_id_ = std::max(next_id_, persisted_next);
  }
  return Annotate(registry_->CheckInvariants(), "recovery: invariants after rebuild");
}

}  // namespace dmapin::agent
