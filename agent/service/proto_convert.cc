#include "agent/service/proto_convert.h"

#include <string>

#include "common/registry_counters.h"

namespace dmapin::agent {

static_assert(static_cast<int>(MemoryBacking::kUnspecified) == v1::MEMORY_BACKING_UNSPECIFIED);
static_assert(static_cast<int>(MemoryBacking::kAnonymous) == v1::MEMORY_BACKING_ANONYMOUS);
static_assert(static_cast<int>(MemoryBacking::kMemfd) == v1::MEMORY_BACKING_MEMFD);
static_assert(static_cast<int>(MemoryBacking::kHugetlbfs) == v1::MEMORY_BACKING_HUGETLBFS);

MemoryBacking FromProto(v1::MemoryBacking backing) { return static_cast<MemoryBacking>(backing); }

v1::MemoryBacking ToProto(MemoryBacking backing) { return static_cast<v1::MemoryBacking>(backing); }

void Fill(const ContextView& view, v1::Context* out) {
  out->set_name(view.name);
  out->set_memlock_unlimited(!view.spec.memlock_limit_bytes.has_value());
  out->set_memlock_limit_bytes(view.spec.memlock_limit_bytes.value_or(0));
  out->set_cap_ipc_lock(view.spec.cap_ipc_lock);
  out->set_backing(ToProto(view.spec.backing));
  out->set_locked_bytes(view.locked_bytes);
  out->set_regions(view.regions);
  out->set_memory_ua(view.memory_ua);
  out->set_memory_bytes(view.spec.memory_bytes);
  for (const std::string& container : view.containers) out->add_containers(container);
  if (view.owner.has_value()) {
    out->mutable_owner()->set_pid(view.owner->pid);
    out->mutable_owner()->set_uid(view.owner->uid);
    out->mutable_owner()->set_start_time(view.owner->start_time);
  }
  for (const GuestSlot& slot : view.slots) {
    v1::MemorySlot* added = out->add_slots();
    added->set_ua(slot.ua);
    added->set_size(slot.size);
    added->set_offset(slot.offset);
    added->set_agent_ua(slot.agent_ua);
    added->set_object(slot.object);
  }
}

void Fill(const ContainerView& view, v1::Container* out) {
  out->set_name(view.name);
  out->set_iommu_page_size(view.options.iommu_page_size);
  out->set_window_start(view.options.window_start);
  out->set_window_size(view.options.window_size);
  out->set_context(view.context);
  out->set_held_regions(view.held_regions);
  out->set_installed_entries(view.installed_entries);
  for (const std::string& group : view.vfio_groups) out->add_vfio_groups(group);
  out->set_handed_off(view.handed_off);
  out->set_awaiting_adoption(view.awaiting_adoption);
}

void Fill(const RegionView& view, uint64_t page_size, v1::Region* out) {
  out->set_context(view.context);
  out->set_ua(view.info.ua);
  out->set_size(view.info.size);
  out->set_entries(view.info.entries);
  out->set_used(view.info.used);
  out->set_mapped(view.info.mapped);
  out->set_page_size(page_size);
  out->set_max_iommu_page_size(view.info.max_iommu_page_size);
  out->set_pending_release(view.info.pending_release);
  for (const std::string& container : view.containers) out->add_containers(container);
  for (uint64_t hpa : view.info.hpas) out->add_hpas(hpa);
}

void Fill(const NodeStatusView& status, v1::RegistryCounters* out) {
  // The reported counters of common/registry_counters.h, each into its field of the same name.
#define DMAPIN_SET_REPORTED(field, ...) out->set_##field(status.counters.field);
  DMAPIN_REGISTRY_COUNTERS(DMAPIN_SET_REPORTED, DMAPIN_COUNTER_IGNORE)
#undef DMAPIN_SET_REPORTED
  out->set_store_commit_failures(status.store_commit_failures);
  out->set_vfio_inconsistencies(status.vfio_inconsistencies);
  out->set_refused_change_undo_failures(status.refused_change_undo_failures);
  out->set_permission_denied(status.permission_denied);
  out->set_owner_exit_teardowns(status.owner_exit_teardowns);
  out->set_owner_exits_at_recovery(status.owner_exits_at_recovery);
  out->set_memory_lost_at_recovery(status.memory_lost_at_recovery);
  out->set_limit_refusals(status.limit_refusals);
  out->set_containers_reopened_at_recovery(status.containers_reopened_at_recovery);
  out->set_containers_awaiting_adoption(status.containers_awaiting_adoption);
  out->set_containers_adopted(status.containers_adopted);
  out->set_adoption_inconsistencies(status.adoption_inconsistencies);
}

}  // namespace dmapin::agent
