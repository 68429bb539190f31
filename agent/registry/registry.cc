#include "agent/registry/registry.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <map>
#include <new>
#include <thread>
#include <utility>

#include "absl/base/attributes.h"
#include "absl/base/optimization.h"
#include "absl/container/flat_hash_map.h"
#include "absl/numeric/bits.h"
#include "absl/strings/str_format.h"
#include "agent/registry/iommu_table.h"
#include "agent/registry/page_index.h"
#include "common/errno_status.h"

namespace dmapin::agent {

// --- Limits -----------------------------------------------------------------------------------

uint64_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);    // NOLINT(runtime/int)
  const long page_size = sysconf(_SC_PAGESIZE);  // NOLINT(runtime/int)
  if (pages <= 0 || page_size <= 0) return 0;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size);
}

RegistryLimits DefaultRegistryLimits() {
  uint64_t memory = PhysicalMemoryBytes();
  if (memory == 0) memory = uint64_t{1} << 40;
  return RegistryLimits{.max_region_bytes = memory, .max_pinned_bytes = memory};
}

namespace {

// A region's physical addresses, 8 bytes per page. Arrays this large or larger are mmapped, so
// the memory goes back to the system when the region goes (malloc may keep a freed block of a
// few MiB in its heap), and an allocation that cannot be had fails instead of throwing.
constexpr uint64_t kMmapHpasBytes = uint64_t{256} << 10;

struct HpaDeleter {
  uint64_t entries = 0;
  void operator()(uint64_t* hpas) const {
    if (entries * sizeof(uint64_t) >= kMmapHpasBytes) {
      munmap(hpas, entries * sizeof(uint64_t));
    } else {
      delete[] hpas;
    }
  }
};
using HpaArray = std::unique_ptr<uint64_t[], HpaDeleter>;

// Null when the memory is not there. `entries` is bounded by the limits, so the size does not
// overflow.
HpaArray AllocateHpas(uint64_t entries) {
  const uint64_t bytes = entries * sizeof(uint64_t);
  if (bytes < kMmapHpasBytes) {
    return HpaArray(new (std::nothrow) uint64_t[entries], HpaDeleter{entries});
  }
  void* memory =
      mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, /*offset=*/0);
  if (memory == MAP_FAILED) return HpaArray(nullptr, HpaDeleter{entries});
  return HpaArray(static_cast<uint64_t*>(memory), HpaDeleter{entries});
}

}  // namespace

// --- State ------------------------------------------------------------------------------------
// Fields marked "writer" are guarded by Registry::mu_; the rest are immutable after publication
// or atomic, and may be read inside an epoch read section.

struct Registry::Region {
  ContextId context = 0;
  uint64_t ua = 0;
  uint64_t entries = 0;
  uint64_t last_byte = 0;  // ua + size - 1 (ua + size may be exactly 2^64)
  uint32_t max_iommu_shift = 0;
  HpaArray hpas;
  // Written by every map and unmap: on its own cache line, so translating readers of the fields
  // above do not share a line with mappers.
  alignas(64) std::atomic<uint64_t> mapped{1};  // biased, spec §5
  std::atomic<uint64_t> used{1};
  std::atomic<bool> pending_release{false};
  // Sorted holders, replaced copy-on-write so readers can describe the region without a lock.
  std::atomic<const std::vector<ContainerId>*> holders{nullptr};

  ~Region() { delete holders.load(std::memory_order_relaxed); }
  const std::vector<ContainerId>& Holders() const {
    return *holders.load(std::memory_order_acquire);
  }
};

struct Registry::Context {
  Context(ContextId id, const ContextOptions& options, uint32_t page_number_bits)
      : id(id), options(options), index(page_number_bits) {}
  const ContextId id;
  const ContextOptions options;
  PageIndex<Region> index;
  std::map<uint64_t, std::unique_ptr<Region>> regions;  // writer; by ua
  uint64_t locked_pages = 0;                            // writer
  std::vector<ContainerId> containers;                  // writer; bound containers, sorted
};

struct Registry::Container {
  Container(ContainerId id, const ContainerOptions& options)
      : id(id),
        options(options),
        iommu_shift(static_cast<uint32_t>(absl::countr_zero(options.iommu_page_size))),
        table(options.window_size >> iommu_shift) {}
  const ContainerId id;
  const ContainerOptions options;
  const uint32_t iommu_shift;
  std::atomic<Context*> context{nullptr};  // bound on first successful registration
  IommuTable<Region> table;
  std::vector<Region*> held;  // writer
};

namespace {

// Values with small ids (agents number them from 1) again, by id: the hot paths find them with
// one load instead of a hash lookup.
template <typename T>
struct DenseIds {
  static constexpr uint64_t kLimit = 4096;
  std::vector<T*> slots;

  T* Find(uint64_t id, const absl::flat_hash_map<uint64_t, T*>& all) const {
    if (ABSL_PREDICT_TRUE(id < slots.size())) return slots[id];
    if (id < kLimit) return nullptr;
    return FindLarge(id, all);
  }
  ABSL_ATTRIBUTE_NOINLINE static T* FindLarge(uint64_t id,
                                              const absl::flat_hash_map<uint64_t, T*>& all) {
    auto it = all.find(id);
    return it == all.end() ? nullptr : it->second;
  }
  void Set(uint64_t id, T* value) {
    if (id >= kLimit) return;
    if (slots.size() <= id) slots.resize(id + 1, nullptr);
    slots[id] = value;
  }
};

}  // namespace

struct Registry::Topology {
  absl::flat_hash_map<ContextId, Context*> contexts;
  absl::flat_hash_map<ContainerId, Container*> containers;
  DenseIds<Context> dense_contexts;
  DenseIds<Container> dense_containers;

  Context* FindContext(ContextId id) const { return dense_contexts.Find(id, contexts); }
  Container* FindContainer(ContainerId id) const { return dense_containers.Find(id, containers); }
  void AddContext(ContextId id, Context* context) {
    contexts[id] = context;
    dense_contexts.Set(id, context);
  }
  void EraseContext(ContextId id) {
    contexts.erase(id);
    dense_contexts.Set(id, nullptr);
  }
  void AddContainer(ContainerId id, Container* container) {
    containers[id] = container;
    dense_containers.Set(id, container);
  }
  void EraseContainer(ContainerId id) {
    containers.erase(id);
    dense_containers.Set(id, nullptr);
  }
};

// Counters. The hot-path ones are sharded per thread so concurrent mappers do not share a line:
// maps_ok and unmaps are bumped in the shards only (their unsharded atomics, generated with the
// others, stay 0; stats() adds both).
struct Registry::AtomicStats {
  static constexpr int kShards = 16;
  struct alignas(64) HotShard {
    std::atomic<uint64_t> maps_ok{0};
    std::atomic<uint64_t> unmaps{0};
  };
  HotShard hot[kShards];
#define DMAPIN_REGISTRY_ATOMIC(field, ...) std::atomic<uint64_t> field{0};
  DMAPIN_REGISTRY_COUNTERS(DMAPIN_REGISTRY_ATOMIC, DMAPIN_REGISTRY_ATOMIC)
#undef DMAPIN_REGISTRY_ATOMIC

  HotShard& Shard() {
    static std::atomic<uint32_t> next_shard{0};
    thread_local const uint32_t shard = next_shard.fetch_add(1) % kShards;
    return hot[shard];
  }
  static void Bump(std::atomic<uint64_t>& counter) {
    counter.fetch_add(1, std::memory_order_relaxed);
  }
};

namespace {

uint64_t Sum(const std::atomic<uint64_t>& counter) {
  return counter.load(std::memory_order_relaxed);
}

// mapped_inc of spec §5: increments unless the region is released (0).
bool MappedInc(std::atomic<uint64_t>& mapped) {
  uint64_t value = mapped.load(std::memory_order_relaxed);
  do {
    if (value == 0) return false;
  } while (!mapped.compare_exchange_weak(value, value + 1, std::memory_order_acq_rel,
                                         std::memory_order_relaxed));
  return true;
}

// mapped_dec of spec §5: decrements unless the value is 1. Returns the new value.
uint64_t MappedDec(std::atomic<uint64_t>& mapped) {
  uint64_t value = mapped.load(std::memory_order_relaxed);
  do {
    if (value <= 1) return value;
  } while (!mapped.compare_exchange_weak(value, value - 1, std::memory_order_acq_rel,
                                         std::memory_order_relaxed));
  return value - 1;
}

ABSL_ATTRIBUTE_NOINLINE ABSL_ATTRIBUTE_COLD absl::Status NoSuchContext(ContextId id) {
  return ErrnoStatus(ENOENT, absl::StrFormat("memory context %d does not exist", id));
}

ABSL_ATTRIBUTE_NOINLINE ABSL_ATTRIBUTE_COLD absl::Status OutsideEveryRegion(uint64_t ua) {
  return ErrnoStatus(EFAULT, absl::StatusCode::kOutOfRange,
                     absl::StrFormat("translate: ua=0x%x is outside every registered region", ua));
}

// Region generations come from one process-wide sequence, so a hint recorded for one registry can
// never match another (even one allocated at the same address).
uint64_t NewRegionGeneration() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

// The region this thread last mapped into, with the registry's region generation read before it
// was looked up. Plain data: it is only ever touched by its own thread.
struct MapHint {
  uint64_t generation;
  Registry::Region* region;
};
thread_local MapHint tls_map_hint = {0, nullptr};

template <typename T>
void InsertSorted(std::vector<T>& values, T value) {
  values.insert(std::lower_bound(values.begin(), values.end(), value), value);
}

template <typename T>
void EraseValue(std::vector<T>& values, T value) {
  values.erase(std::remove(values.begin(), values.end(), value), values.end());
}

}  // namespace

// What writers unpublished, to be freed after one grace period.
struct Registry::Retired {
  PageIndex<Region>::Garbage nodes;
  std::vector<std::unique_ptr<Region>> regions;  // pages still pinned
  std::vector<const std::vector<ContainerId>*> holder_lists;

  // Frees everything retired; the caller has waited for readers.
  void Free(PinBackend* backend) {
    nodes.Free();
    for (auto& region : regions) {
      backend->UnpinPages(region->context, region->ua,
                          absl::MakeConstSpan(region->hpas.get(), region->entries));
    }
    regions.clear();
    for (const auto* list : holder_lists) delete list;
    holder_lists.clear();
  }

  // Publishes `holders` as the region's holder list; the old list is freed with the rest.
  void SetHolders(Region* region, std::vector<ContainerId> holders) {
    const auto* old = region->holders.exchange(new std::vector<ContainerId>(std::move(holders)),
                                               std::memory_order_acq_rel);
    if (old != nullptr) holder_lists.push_back(old);
  }
};

// --- Construction -----------------------------------------------------------------------------

Registry::Registry(PinBackend* backend, RegistryLimits limits)
    : backend_(backend),
      page_size_(backend->page_size()),
      page_shift_(static_cast<uint32_t>(absl::countr_zero(backend->page_size()))),
      limits_(limits),
      region_generation_(NewRegionGeneration()),
      stats_(std::make_unique<AtomicStats>()) {
  topology_.store(new Topology, std::memory_order_release);
}

Registry::~Registry() {
  const Topology* topology = topology_.load(std::memory_order_acquire);
  for (const auto& [id, container] : topology->containers) delete container;
  for (const auto& [id, context] : topology->contexts) {
    for (auto& [ua, region] : context->regions) {
      backend_->UnpinPages(context->id, region->ua,
                           absl::MakeConstSpan(region->hpas.get(), region->entries));
    }
    delete context;
  }
  delete topology;
}

RegistryLimits Registry::limits() const {
  MutexLock lock(&mu_);
  return limits_;
}

void Registry::SetLimits(const RegistryLimits& limits) {
  MutexLock lock(&mu_);
  limits_ = limits;
}

const Registry::Topology* Registry::topology() const {
  return topology_.load(std::memory_order_acquire);
}

void Registry::WaitForReaders() const {
  EpochDomain::Global().Synchronize();
  AtomicStats::Bump(stats_->grace_periods);
}

namespace {

absl::Status ReadSectionMisuse(const char* method) {
  return absl::FailedPreconditionError(absl::StrFormat(
      "Registry::%s called inside a read section (it would wait for itself)", method));
}

}  // namespace

void Registry::PublishTopology(std::unique_ptr<Topology> next) {
  const Topology* old = topology_.exchange(next.release(), std::memory_order_acq_rel);
  WaitForReaders();
  delete old;
}

// --- Contexts and containers ------------------------------------------------------------------

absl::Status Registry::CreateContext(ContextId id, const ContextOptions& options) {
  if (EpochDomain::InReadSection()) return ReadSectionMisuse("CreateContext");
  MutexLock lock(&mu_);
  const Topology* current = topology();
  if (current->contexts.contains(id)) {
    return ErrnoStatus(EEXIST, absl::StrFormat("memory context %d already exists", id));
  }
  auto next = std::make_unique<Topology>(*current);
  next->AddContext(id, new Context(id, options, 64 - page_shift_));
  PublishTopology(std::move(next));
  return absl::OkStatus();
}

absl::Status Registry::CreateContainer(ContainerId id, const ContainerOptions& options) {
  if (EpochDomain::InReadSection()) return ReadSectionMisuse("CreateContainer");
  if (options.iommu_page_size < 4096 || !absl::has_single_bit(options.iommu_page_size)) {
    return ErrnoStatus(EINVAL, absl::StrFormat("IOMMU page size 0x%x is not a power of two >= "
                                               "4 KiB",
                                               options.iommu_page_size));
  }
  const uint64_t page_mask = options.iommu_page_size - 1;
  if (options.window_size == 0 || (options.window_start & page_mask) != 0 ||
      (options.window_size & page_mask) != 0 ||
      options.window_start + options.window_size - 1 < options.window_start) {
    return ErrnoStatus(EINVAL, absl::StrFormat("DMA window [0x%x, +0x%x) is empty, wraps, or is "
                                               "not aligned to the IOMMU page size 0x%x",
                                               options.window_start, options.window_size,
                                               options.iommu_page_size));
  }
  MutexLock lock(&mu_);
  const Topology* current = topology();
  if (current->containers.contains(id)) {
    return ErrnoStatus(EEXIST, absl::StrFormat("container %d already exists", id));
  }
  auto next = std::make_unique<Topology>(*current);
  next->AddContainer(id, new Container(id, options));
  PublishTopology(std::move(next));
  return absl::OkStatus();
}

void Registry::ClearContainerEntries(Container* container) {
  container->table.ForEachInstalled([](uint64_t, std::atomic<Region*>& slot) {
    Region* old = slot.exchange(nullptr, std::memory_order_acq_rel);
    if (old != nullptr) MappedDec(old->mapped);
  });
}

absl::Status Registry::ReleaseContainer(ContainerId id) {
  if (EpochDomain::InReadSection()) return ReadSectionMisuse("ReleaseContainer");
  MutexLock lock(&mu_);
  const Topology* current = topology();
  auto it = current->containers.find(id);
  if (it == current->containers.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("container %d does not exist", id));
  }
  std::unique_ptr<Container> container(it->second);
  auto next = std::make_unique<Topology>(*current);
  next->EraseContainer(id);
  // After this grace period no map or unmap can still be working on the container.
  PublishTopology(std::move(next));

  ClearContainerEntries(container.get());
  Retired retired;
  Context* context = container->context.load(std::memory_order_relaxed);
  for (Region* region : std::vector<Region*>(container->held)) {
    bool busy = false;
    UnregisterLocked(container.get(), region, &busy, &retired).IgnoreError();
    if (busy) {
      // Another container still maps it: keep the reference as *pending release* (spec §4).
      std::vector<ContainerId> holders = region->Holders();
      EraseValue(holders, container->id);
      retired.SetHolders(region, std::move(holders));
      region->pending_release.store(true, std::memory_order_release);
      AtomicStats::Bump(stats_->pending_releases_started);
    }
  }
  if (context != nullptr) {
    EraseValue(context->containers, id);
    // Clearing our entries may have been the last use of regions pending from earlier releases.
    std::vector<Region*> completable;
    for (auto& [ua, region] : context->regions) {
      if (region->pending_release.load(std::memory_order_acquire)) {
        completable.push_back(region.get());
      }
    }
    for (Region* region : completable) TryCompletePendingLocked(region, &retired);
  }
  WaitForReaders();
  retired.Free(backend_);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::pair<uint64_t, uint64_t>>> Registry::PendingAfterRelease(
    ContainerId id) const {
  MutexLock lock(&mu_);
  const Topology* current = topology();
  auto it = current->containers.find(id);
  if (it == current->containers.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("container %d does not exist", id));
  }
  Container* container = it->second;
  std::vector<std::pair<uint64_t, uint64_t>> pending;
  const Context* context = container->context.load(std::memory_order_relaxed);
  if (context == nullptr) return pending;
  // What ReleaseContainer does, counted instead of applied: its entries go first.
  absl::flat_hash_map<const Region*, uint64_t> entries;
  container->table.ForEachInstalled([&entries](uint64_t, std::atomic<Region*>& slot) {
    if (const Region* region = slot.load(std::memory_order_acquire)) ++entries[region];
  });
  for (const auto& [ua, region] : context->regions) {
    auto mine = entries.find(region.get());
    const uint64_t mapped =
        region->mapped.load(std::memory_order_acquire) - (mine == entries.end() ? 0 : mine->second);
    bool is_pending = region->pending_release.load(std::memory_order_acquire);
    const bool held = std::find(container->held.begin(), container->held.end(), region.get()) !=
                      container->held.end();
    if (held && !is_pending && region->Holders().size() == 1) {
      is_pending = mapped != 1;  // the last user: still mapped by others, it waits (spec §4)
    } else if (is_pending && mapped == 1) {
      is_pending = false;  // no mapping keeps it any more: the release completes
    }
    if (is_pending) pending.emplace_back(ua, region->entries << page_shift_);
  }
  return pending;
}

absl::Status Registry::TeardownContext(ContextId id) {
  if (EpochDomain::InReadSection()) return ReadSectionMisuse("TeardownContext");
  MutexLock lock(&mu_);
  const Topology* current = topology();
  auto it = current->contexts.find(id);
  if (it == current->contexts.end()) {
    return NoSuchContext(id);
  }
  std::unique_ptr<Context> context(it->second);
  auto next = std::make_unique<Topology>(*current);
  next->EraseContext(id);
  std::vector<std::unique_ptr<Container>> containers;
  for (ContainerId container_id : context->containers) {
    Container* container = next->FindContainer(container_id);
    if (container == nullptr) continue;
    containers.emplace_back(container);
    next->EraseContainer(container_id);
  }
  // Its regions are freed with it: no hint may lead to them.
  region_generation_.store(NewRegionGeneration(), std::memory_order_release);
  PublishTopology(std::move(next));
  // Nobody can reach the context or its containers now: release everything, whatever the
  // counters say (spec §4).
  pinned_pages_ -= context->locked_pages;
  for (auto& container : containers) ClearContainerEntries(container.get());
  for (auto& [ua, region] : context->regions) {
    region->mapped.store(0, std::memory_order_release);
    backend_->UnpinPages(context->id, region->ua,
                         absl::MakeConstSpan(region->hpas.get(), region->entries));
  }
  return absl::OkStatus();
}

// --- Register / unregister --------------------------------------------------------------------

absl::Status Registry::ValidateRange(uint64_t ua, uint64_t size, const char* what) const {
  const uint64_t mask = page_size_ - 1;
  if (size == 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("%s of ua=0x%x: size is 0", what, ua));
  }
  if ((ua & mask) != 0 || (size & mask) != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("%s of ua=0x%x size=0x%x: not a multiple of the "
                                               "page size 0x%x",
                                               what, ua, size, page_size_));
  }
  if (ua + (size - 1) < ua) {
    return ErrnoStatus(
        EINVAL, absl::StrFormat("%s of ua=0x%x size=0x%x: range wraps past 2^64", what, ua, size));
  }
  return absl::OkStatus();
}

absl::Status Registry::Register(ContainerId container_id, ContextId context_id, uint64_t ua,
                                uint64_t size) {
  if (EpochDomain::InReadSection()) return ReadSectionMisuse("Register");
  absl::Status status = RegisterImpl(container_id, context_id, ua, size);
  AtomicStats::Bump(status.ok() ? stats_->registers_ok : stats_->registers_failed);
  return status;
}

absl::Status Registry::BindContainer(ContainerId container_id, ContextId context_id) {
  MutexLock lock(&mu_);
  const Topology* current = topology();
  auto container_it = current->containers.find(container_id);
  if (container_it == current->containers.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("container %d does not exist", container_id));
  }
  auto context_it = current->contexts.find(context_id);
  if (context_it == current->contexts.end()) {
    return NoSuchContext(context_id);
  }
  Container* container = container_it->second;
  Context* context = context_it->second;
  Context* bound = container->context.load(std::memory_order_relaxed);
  if (bound == context) return absl::OkStatus();
  if (bound != nullptr) {
    return ErrnoStatus(EPERM, absl::StrFormat("container %d is bound to memory context %d, not %d",
                                              container_id, bound->id, context_id));
  }
  container->context.store(context, std::memory_order_release);
  InsertSorted(context->containers, container_id);
  return absl::OkStatus();
}

absl::Status Registry::UnbindContainer(ContainerId container_id) {
  MutexLock lock(&mu_);
  const Topology* current = topology();
  auto it = current->containers.find(container_id);
  if (it == current->containers.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("container %d does not exist", container_id));
  }
  Container* container = it->second;
  Context* bound = container->context.load(std::memory_order_relaxed);
  if (bound == nullptr) return absl::OkStatus();
  auto busy = [&] {
    return ErrnoStatus(EBUSY, absl::StrFormat("container %d holds or maps memory of context %d",
                                              container_id, bound->id));
  };
  if (!container->held.empty()) return busy();
  // A bound container may map any region of its context, lock-free: unbind first, let the maps
  // that still saw the binding finish, and only then look for what they installed.
  container->context.store(nullptr, std::memory_order_release);
  WaitForReaders();
  bool installed = false;
  container->table.ForEachInstalled(
      [&installed](uint64_t, std::atomic<Region*>&) { installed = true; });
  if (installed) {
    container->context.store(bound, std::memory_order_release);
    return busy();
  }
  EraseValue(bound->containers, container_id);
  return absl::OkStatus();
}

absl::Status Registry::RestorePendingRelease(ContextId context_id, uint64_t ua, uint64_t size) {
  if (EpochDomain::InReadSection()) return ReadSectionMisuse("RestorePendingRelease");
  if (absl::Status status = ValidateRange(ua, size, "pending release"); !status.ok()) {
    return status;
  }
  MutexLock lock(&mu_);
  auto context_it = topology()->contexts.find(context_id);
  if (context_it == topology()->contexts.end()) return NoSuchContext(context_id);
  auto region_it = context_it->second->regions.find(ua);
  if (region_it == context_it->second->regions.end() ||
      region_it->second->entries != size >> page_shift_) {
    return ErrnoStatus(ENOENT, absl::StrFormat("context %d has no region ua=0x%x size=0x%x",
                                               context_id, ua, size));
  }
  Region* region = region_it->second.get();
  if (region->pending_release.load(std::memory_order_acquire)) {
    return ErrnoStatus(
        EBUSY, absl::StrFormat("region ua=0x%x size=0x%x is already pending release", ua, size));
  }
  if (region->Holders().empty() || region->mapped.load(std::memory_order_acquire) == 1) {
    return ErrnoStatus(EINVAL, absl::StrFormat("region ua=0x%x size=0x%x: a pending release needs "
                                               "holders and DMA mappings to wait for",
                                               ua, size));
  }
  region->used.fetch_add(1, std::memory_order_acq_rel);
  region->pending_release.store(true, std::memory_order_release);
  return absl::OkStatus();
}

struct Registry::RegisterPlan {
  Container* container = nullptr;
  Context* context = nullptr;
  // The container's first registration binds it to the context.
  bool bind = false;
  // §2.3: the region this register adds a user to; null for a new region.
  Region* existing = nullptr;
  uint64_t entries = 0;
};

absl::Status Registry::PlanRegisterLocked(ContainerId container_id, ContextId context_id,
                                          uint64_t ua, uint64_t size, RegisterPlan* plan) const {
  const Topology* current = topology();
  auto container_it = current->containers.find(container_id);
  if (container_it == current->containers.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("container %d does not exist", container_id));
  }
  auto context_it = current->contexts.find(context_id);
  if (context_it == current->contexts.end()) {
    return NoSuchContext(context_id);
  }
  Container* container = container_it->second;
  Context* context = context_it->second;
  const Context* bound = container->context.load(std::memory_order_relaxed);
  if (bound != nullptr && bound != context) {
    return ErrnoStatus(EPERM, absl::StrFormat("container %d is bound to memory context %d, not %d",
                                              container_id, bound->id, context_id));
  }
  // §2.1
  if (absl::Status status = ValidateRange(ua, size, "register"); !status.ok()) return status;
  const uint64_t entries = size >> page_shift_;
  const uint64_t last_byte = ua + (size - 1);
  *plan = RegisterPlan{
      .container = container, .context = context, .bind = bound == nullptr, .entries = entries};

  auto same_start = context->regions.find(ua);
  if (same_start != context->regions.end() && same_start->second->entries == entries) {
    Region* region = same_start->second.get();
    // §2.2: once per container.
    if (std::find(container->held.begin(), container->held.end(), region) !=
        container->held.end()) {
      return ErrnoStatus(EBUSY,
                         absl::StrFormat("container %d already holds region ua=0x%x size=0x%x",
                                         container_id, ua, size));
    }
    // §2.3: another user of an existing region (within the limits when it was registered).
    plan->existing = region;
    return absl::OkStatus();
  }

  // §2.4: overlap with any region of the context.
  auto next = context->regions.upper_bound(ua);
  if (next != context->regions.end() && next->second->ua <= last_byte) {
    return ErrnoStatus(
        EINVAL, absl::StrFormat("range ua=0x%x size=0x%x overlaps region "
                                "ua=0x%x size=0x%x",
                                ua, size, next->second->ua, next->second->entries << page_shift_));
  }
  if (next != context->regions.begin()) {
    const Region& prev = *std::prev(next)->second;
    if (prev.last_byte >= ua) {
      return ErrnoStatus(EINVAL, absl::StrFormat("range ua=0x%x size=0x%x overlaps region "
                                                 "ua=0x%x size=0x%x",
                                                 ua, size, prev.ua, prev.entries << page_shift_));
    }
  }

  // §2.5: memlock.
  if (context->options.memlock_limit_bytes.has_value() && !context->options.cap_ipc_lock) {
    const uint64_t limit_pages = *context->options.memlock_limit_bytes >> page_shift_;
    if (context->locked_pages + entries > limit_pages ||
        context->locked_pages + entries < entries) {
      return ErrnoStatus(
          ENOMEM, absl::StrFormat("memlock limit of context %d exceeded: %d pages locked + %d "
                                  "requested > limit %d pages (%d bytes)",
                                  context_id, context->locked_pages, entries, limit_pages,
                                  *context->options.memlock_limit_bytes));
    }
  }

  // The node's limits (dmapin: the kernel has RLIMIT_MEMLOCK and vmalloc; a context may be
  // unlimited here), before anything is allocated or pinned.
  if (size > limits_.max_region_bytes) {
    AtomicStats::Bump(stats_->registers_over_limit);
    return ErrnoStatus(ENOMEM, absl::StrFormat("register of ua=0x%x size=0x%x: larger than the "
                                               "per-region limit of 0x%x bytes "
                                               "(--max_region_bytes)",
                                               ua, size, limits_.max_region_bytes));
  }
  const uint64_t limit_pages = limits_.max_pinned_bytes >> page_shift_;
  if (pinned_pages_ > limit_pages || entries > limit_pages - pinned_pages_) {
    AtomicStats::Bump(stats_->registers_over_limit);
    return ErrnoStatus(
        ENOMEM, absl::StrFormat("register of ua=0x%x size=0x%x: the node has 0x%x bytes pinned, "
                                "and this would pass its limit of 0x%x bytes "
                                "(--max_pinned_bytes)",
                                ua, size, pinned_pages_ << page_shift_, limits_.max_pinned_bytes));
  }
  return absl::OkStatus();
}

absl::Status Registry::CheckRegister(ContainerId container_id, ContextId context_id, uint64_t ua,
                                     uint64_t size) const {
  MutexLock lock(&mu_);
  RegisterPlan plan;
  absl::Status status = PlanRegisterLocked(container_id, context_id, ua, size, &plan);
  // The caller will not call Register after a refusal: count it as the failed register it is.
  if (!status.ok()) AtomicStats::Bump(stats_->registers_failed);
  return status;
}

absl::Status Registry::RegisterImpl(ContainerId container_id, ContextId context_id, uint64_t ua,
                                    uint64_t size) {
  MutexLock lock(&mu_);
  RegisterPlan plan;
  if (absl::Status status = PlanRegisterLocked(container_id, context_id, ua, size, &plan);
      !status.ok()) {
    return status;
  }
  Container* container = plan.container;
  Context* context = plan.context;
  const uint64_t entries = plan.entries;

  Retired retired;
  auto bind = [&] {
    if (plan.bind) {
      container->context.store(context, std::memory_order_release);
      InsertSorted(context->containers, container_id);
    }
  };

  if (plan.existing != nullptr) {
    Region* region = plan.existing;
    // §2.3: nothing is pinned or accounted. A region pending release gains a user like any
    // other: the pending reference stays until `mapped` returns to 1 (spec §4).
    region->used.fetch_add(1, std::memory_order_acq_rel);
    std::vector<ContainerId> holders = region->Holders();
    InsertSorted(holders, container_id);
    retired.SetHolders(region, std::move(holders));
    container->held.push_back(region);
    bind();
    WaitForReaders();
    retired.Free(backend_);
    return absl::OkStatus();
  }

  // §2.6: pin every page; roll back on failure.
  auto region = std::make_unique<Region>();
  region->context = context_id;
  region->ua = ua;
  region->entries = entries;
  region->last_byte = ua + (size - 1);
  region->hpas = AllocateHpas(entries);
  if (region->hpas == nullptr) {
    AtomicStats::Bump(stats_->allocation_failures);
    return ErrnoStatus(ENOMEM, absl::StrFormat("register of ua=0x%x size=0x%x: could not allocate "
                                               "0x%x bytes for the physical addresses of its "
                                               "pages",
                                               ua, size, entries * sizeof(uint64_t)));
  }
  uint64_t pinned = 0;
  uint32_t backing_shift = page_shift_;
  absl::Status pin_status = backend_->PinPages(
      context_id, ua, absl::MakeSpan(region->hpas.get(), entries), &pinned, &backing_shift);
  if (!pin_status.ok()) {
    backend_->UnpinPages(context_id, ua,
                         absl::MakeConstSpan(region->hpas.get(), std::min(pinned, entries)));
    AtomicStats::Bump(stats_->pin_failures);
    return pin_status;
  }
  // §8: the IOMMU page limit is the smallest backing page, capped by the natural alignment.
  const uint32_t alignment_shift = static_cast<uint32_t>(absl::countr_zero(ua | size));
  region->max_iommu_shift = std::min(backing_shift, alignment_shift);
  region->holders.store(new std::vector<ContainerId>{container_id}, std::memory_order_release);

  // §2.7: publish.
  Region* published = region.get();
  context->regions.emplace(ua, std::move(region));
  context->index.Assign(ua >> page_shift_, entries, published, &retired.nodes);
  context->locked_pages += entries;
  pinned_pages_ += entries;
  container->held.push_back(published);
  bind();
  WaitForReaders();
  retired.Free(backend_);
  return absl::OkStatus();
}

absl::Status Registry::UnregisterLocked(Container* container, Region* region, bool* busy,
                                        Retired* retired) {
  *busy = false;
  std::vector<ContainerId> holders = region->Holders();
  if (holders.size() > 1 || region->pending_release.load(std::memory_order_acquire)) {
    // §3.3: other users remain (another container, or the pending reference of spec §4).
    EraseValue(holders, container->id);
    retired->SetHolders(region, std::move(holders));
    EraseValue(container->held, region);
    region->used.fetch_sub(1, std::memory_order_acq_rel);
    return absl::OkStatus();
  }
  // §3.4: last user; only an unmapped region (mapped == 1) may go, and it goes atomically to 0 so
  // no new mapping can start.
  uint64_t expected = 1;
  if (!region->mapped.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) {
    *busy = true;
    return ErrnoStatus(EBUSY, absl::StrFormat("region ua=0x%x size=0x%x still has %d DMA "
                                              "mapping(s); unmap and retry",
                                              region->ua, region->entries << page_shift_,
                                              expected == 0 ? 0 : expected - 1));
  }
  EraseValue(container->held, region);
  retired->SetHolders(region, {});
  RemoveRegionLocked(region, retired);
  return absl::OkStatus();
}

void Registry::RemoveRegionLocked(Region* region, Retired* retired) {
  // §3.5: unpublish; pages are unpinned after the grace period (Retired::Free).
  region->used.store(0, std::memory_order_release);
  Context* context = topology()->contexts.at(region->context);
  context->index.Assign(region->ua >> page_shift_, region->entries, nullptr, &retired->nodes);
  // After the index: a reader that sees the new generation no longer finds the region there.
  region_generation_.store(NewRegionGeneration(), std::memory_order_release);
  context->locked_pages -= region->entries;
  pinned_pages_ -= region->entries;
  auto it = context->regions.find(region->ua);
  retired->regions.push_back(std::move(it->second));
  context->regions.erase(it);
}

bool Registry::TryCompletePendingLocked(Region* region, Retired* retired) {
  if (!region->pending_release.load(std::memory_order_acquire)) return false;
  if (!region->Holders().empty()) {
    // Spec §4: containers registered the region meanwhile. Once `mapped` is back at 1 the pending
    // reference is dropped like any user's (§3.3) and the region stays with its holders. Holders
    // only change under mu_; a map that starts after this load finds a region that is simply
    // registered, which is what it would find a moment later anyway.
    if (region->mapped.load(std::memory_order_acquire) != 1) return false;
    region->pending_release.store(false, std::memory_order_release);
    region->used.fetch_sub(1, std::memory_order_acq_rel);
    AtomicStats::Bump(stats_->pending_releases_completed);
    return true;
  }
  // The pending reference is the last user: the region goes, atomically closed to new mappings.
  uint64_t expected = 1;
  if (!region->mapped.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) {
    return false;
  }
  region->pending_release.store(false, std::memory_order_release);
  RemoveRegionLocked(region, retired);
  AtomicStats::Bump(stats_->pending_releases_completed);
  return true;
}

absl::Status Registry::Unregister(ContainerId container_id, uint64_t ua, uint64_t size) {
  if (EpochDomain::InReadSection()) return ReadSectionMisuse("Unregister");
  absl::Status status = UnregisterImpl(container_id, ua, size);
  if (status.ok()) {
    AtomicStats::Bump(stats_->unregisters_ok);
  } else {
    AtomicStats::Bump(stats_->unregisters_failed);
    if (ErrnoOf(status) == EBUSY) AtomicStats::Bump(stats_->unregister_ebusy);
  }
  return status;
}

absl::Status Registry::UnregisterImpl(ContainerId container_id, uint64_t ua, uint64_t size) {
  MutexLock lock(&mu_);
  const Topology* current = topology();
  auto container_it = current->containers.find(container_id);
  if (container_it == current->containers.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("container %d does not exist", container_id));
  }
  // §3.1
  if (absl::Status status = ValidateRange(ua, size, "unregister"); !status.ok()) return status;
  Container* container = container_it->second;
  const uint64_t entries = size >> page_shift_;
  // §3.2: exact match held by this container; no bisecting.
  Region* region = nullptr;
  for (Region* held : container->held) {
    if (held->ua == ua && held->entries == entries) region = held;
  }
  if (region == nullptr) {
    return ErrnoStatus(ENOENT, absl::StrFormat("container %d holds no region ua=0x%x size=0x%x",
                                               container_id, ua, size));
  }
  Retired retired;
  bool busy = false;
  absl::Status status = UnregisterLocked(container, region, &busy, &retired);
  if (!status.ok()) return status;
  WaitForReaders();
  retired.Free(backend_);
  return absl::OkStatus();
}

void Registry::CompletePendingReleases(absl::Span<const PendingRelease> candidates) {
  MutexLock lock(&mu_);
  Retired retired;
  const Topology* current = topology();
  for (const PendingRelease& candidate : candidates) {
    auto context_it = current->contexts.find(candidate.context);
    if (context_it == current->contexts.end()) continue;
    auto region_it = context_it->second->regions.find(candidate.ua);
    if (region_it == context_it->second->regions.end() ||
        region_it->second->entries != candidate.entries) {
      continue;
    }
    TryCompletePendingLocked(region_it->second.get(), &retired);
  }
  if (retired.regions.empty() && retired.holder_lists.empty() && retired.nodes.size() == 0) return;
  WaitForReaders();
  retired.Free(backend_);
}

// --- Map / unmap ------------------------------------------------------------------------------

absl::Status Registry::Map(ContainerId container_id, uint64_t iova, uint64_t ua, uint64_t size,
                           uint64_t* cleared_pages, bool* replaced) {
  std::vector<PendingRelease> pending;
  uint64_t cleared = 0;
  bool overwrote = false;
  absl::Status status = MapImpl(container_id, iova, ua, size, &pending, &cleared, &overwrote);
  if (cleared_pages != nullptr) *cleared_pages = cleared;
  if (replaced != nullptr) *replaced = overwrote;
  if (status.ok()) {
    AtomicStats::Bump(stats_->Shard().maps_ok);
  } else {
    AtomicStats::Bump(stats_->maps_failed);
  }
  if (!pending.empty() && !EpochDomain::InReadSection()) CompletePendingReleases(pending);
  return status;
}

namespace {

// Error statuses of the DMA hot path, built out of line so Map and Unmap stay small (no string
// buffers, no stack protector, fewer registers saved).
ABSL_ATTRIBUTE_NOINLINE ABSL_ATTRIBUTE_COLD absl::Status NoSuchContainer(ContainerId id) {
  return ErrnoStatus(ENOENT, absl::StrFormat("container %d does not exist", id));
}

ABSL_ATTRIBUTE_NOINLINE ABSL_ATTRIBUTE_COLD absl::Status NeverRegistered(ContainerId id) {
  return ErrnoStatus(EPERM, absl::StrFormat("container %d has never registered memory", id));
}

ABSL_ATTRIBUTE_NOINLINE ABSL_ATTRIBUTE_COLD absl::Status MapWraps(uint64_t ua, uint64_t size) {
  return ErrnoStatus(EINVAL, absl::StrFormat("map ua=0x%x size=0x%x: range wraps past 2^64, so "
                                             "it is not inside registered memory",
                                             ua, size));
}

// Why the IOMMU page at `page_ua` could not be mapped into `region` (the index's answer): the
// checks of §7.4 in order; when both pass, mapped_inc found the region released.
ABSL_ATTRIBUTE_NOINLINE ABSL_ATTRIBUTE_COLD absl::Status MapPageError(
    const Registry::Region* region, uint64_t page_ua, uint32_t iommu_shift) {
  const uint64_t iommu_page = uint64_t{1} << iommu_shift;
  if (region == nullptr || page_ua + (iommu_page - 1) > region->last_byte) {
    return ErrnoStatus(EINVAL, absl::StrFormat("map: IOMMU page ua=0x%x size=0x%x is not "
                                               "inside one registered region",
                                               page_ua, iommu_page));
  }
  if (region->max_iommu_shift < iommu_shift) {
    return ErrnoStatus(
        EINVAL, absl::StrFormat("map: region ua=0x%x allows IOMMU pages up to "
                                "0x%x, not 0x%x",
                                region->ua, uint64_t{1} << region->max_iommu_shift, iommu_page));
  }
  return ErrnoStatus(ENXIO, absl::StrFormat("map: region ua=0x%x is being released", region->ua));
}

}  // namespace

absl::Status Registry::DmaRangeError(const Container& container, uint64_t iova, uint64_t size,
                                     const uint64_t* ua, const char* what) const {
  // §7.2 before §7.3: alignment (of ua too, for map) comes before the window.
  const uint64_t mask = container.options.iommu_page_size - 1;
  if (size == 0 || (iova & mask) != 0 || (size & mask) != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("%s iova=0x%x size=0x%x: zero or not a multiple "
                                               "of the IOMMU page size 0x%x",
                                               what, iova, size, mask + 1));
  }
  if (ua != nullptr && (*ua & mask) != 0) {
    return ErrnoStatus(EINVAL, absl::StrFormat("%s ua=0x%x size=0x%x: not a multiple of the IOMMU "
                                               "page size 0x%x",
                                               what, *ua, size, mask + 1));
  }
  const ContainerOptions& window = container.options;
  return ErrnoStatus(ENXIO,
                     absl::StrFormat("%s iova=0x%x size=0x%x lies outside the DMA window "
                                     "[0x%x, +0x%x)",
                                     what, iova, size, window.window_start, window.window_size));
}

absl::Status Registry::MapImpl(ContainerId container_id, uint64_t iova, uint64_t ua, uint64_t size,
                               std::vector<PendingRelease>* pending, uint64_t* cleared_pages,
                               bool* replaced) {
  EpochReadLock read_lock;
  Container* container = topology()->FindContainer(container_id);
  if (container == nullptr) return NoSuchContainer(container_id);
  // §7.1
  const Context* context = container->context.load(std::memory_order_acquire);
  if (context == nullptr) return NeverRegistered(container_id);
  // §7.2, §7.3
  if (!DmaRangeOk(container->options, iova, size, ua)) {
    return DmaRangeError(*container, iova, size, &ua, "map");
  }
  // §7.4: a ua range that wraps past 2^64 cannot lie inside any region. Checked after the window
  // (a wrap is a lookup failure, not an alignment error) and before the loop, whose page
  // addresses would otherwise wrap into low memory.
  if (ua + (size - 1) < ua) return MapWraps(ua, size);
  const uint32_t iommu_shift = container->iommu_shift;
  const uint64_t iommu_page = uint64_t{1} << iommu_shift;
  const uint64_t pages = size >> iommu_shift;
  const uint64_t first_entry = (iova - container->options.window_start) >> iommu_shift;
  auto dec = [&](Region* region) {
    if (MappedDec(region->mapped) == 1 && region->pending_release.load(std::memory_order_acquire)) {
      pending->push_back({region->context, region->ua, region->entries});
    }
  };
  // §7.4. The page index walk is most of a one-page map, so start from this thread's last region
  // when no region was unpublished since it was found (regions never overlap: if it contains the
  // page, it is what the index would answer).
  const uint64_t generation = region_generation_.load(std::memory_order_acquire);
  MapHint& hint = tls_map_hint;
  Region* cached = nullptr;
  if (hint.generation == generation && hint.region->context == context->id) cached = hint.region;
  for (uint64_t i = 0; i < pages; ++i) {
    const uint64_t page_ua = ua + (i << iommu_shift);
    const uint64_t page_last = page_ua + (iommu_page - 1);
    Region* region = cached;
    if (region == nullptr || page_ua < region->ua || page_last > region->last_byte) {
      region = context->index.Lookup(page_ua >> page_shift_);
    }
    if (ABSL_PREDICT_FALSE(region == nullptr || page_last > region->last_byte ||
                           region->max_iommu_shift < iommu_shift || !MappedInc(region->mapped))) {
      // §7.5: clear what this call installed.
      for (uint64_t j = 0; j < i; ++j) {
        Region* old = container->table.Exchange(first_entry + j, nullptr);
        if (old != nullptr) dec(old);
      }
      if (i > 0) AtomicStats::Bump(stats_->map_rollbacks);
      *cleared_pages = i;
      return MapPageError(region, page_ua, iommu_shift);
    }
    cached = region;
    Region* old = container->table.Exchange(first_entry + i, region);
    if (old != nullptr) {  // A remap moves the count.
      *replaced = true;
      dec(old);
    }
  }
  hint = {generation, cached};
  return absl::OkStatus();
}

absl::Status Registry::Unmap(ContainerId container_id, uint64_t iova, uint64_t size) {
  std::vector<PendingRelease> pending;
  {
    EpochReadLock read_lock;
    Container* container = topology()->FindContainer(container_id);
    if (container == nullptr) return NoSuchContainer(container_id);
    if (!DmaRangeOk(container->options, iova, size, /*ua=*/0)) {
      return DmaRangeError(*container, iova, size, /*ua=*/nullptr, "unmap");
    }
    const uint64_t pages = size >> container->iommu_shift;
    const uint64_t first_entry = (iova - container->options.window_start) >> container->iommu_shift;
    // Visits only what is installed: an unmap of a whole 2^64 window is as cheap as its mappings.
    container->table.ClearRange(first_entry, pages, [&pending](Region* old) {
      if (MappedDec(old->mapped) == 1 && old->pending_release.load(std::memory_order_acquire)) {
        pending.push_back({old->context, old->ua, old->entries});
      }
    });
  }
  AtomicStats::Bump(stats_->Shard().unmaps);
  if (!pending.empty() && !EpochDomain::InReadSection()) CompletePendingReleases(pending);
  return absl::OkStatus();
}

absl::Status Registry::CheckUnmap(ContainerId container_id, uint64_t iova, uint64_t size) const {
  EpochReadLock read_lock;
  const Container* container = topology()->FindContainer(container_id);
  if (container == nullptr) return NoSuchContainer(container_id);
  if (!DmaRangeOk(container->options, iova, size, /*ua=*/0)) {
    return DmaRangeError(*container, iova, size, /*ua=*/nullptr, "unmap");
  }
  return absl::OkStatus();
}

// --- Lookup / translate -----------------------------------------------------------------------

absl::StatusOr<uint64_t> Registry::Translate(ContextId context_id, uint64_t ua) const {
  // A ReadSession's work without its cache: a one-shot translation is bound by the cache misses
  // of the index walk, and the fewer instructions around them, the more of them the CPU overlaps
  // across calls.
  EpochReadLock read_lock;
  const Context* context = topology()->FindContext(context_id);
  if (ABSL_PREDICT_FALSE(context == nullptr)) return NoSuchContext(context_id);
  const Region* region = context->index.Lookup(ua >> page_shift_);
  if (ABSL_PREDICT_FALSE(region == nullptr)) return OutsideEveryRegion(ua);
  return region->hpas[(ua - region->ua) >> page_shift_] | (ua & (page_size_ - 1));
}

RegionInfo Registry::Describe(const Region& region, bool with_hpas) const {
  RegionInfo info;
  info.context = region.context;
  info.ua = region.ua;
  info.entries = region.entries;
  info.size = region.entries << page_shift_;
  info.used = region.used.load(std::memory_order_acquire);
  info.mapped = region.mapped.load(std::memory_order_acquire);
  info.max_iommu_page_size = uint64_t{1} << region.max_iommu_shift;
  info.pending_release = region.pending_release.load(std::memory_order_acquire);
  info.holders = region.Holders();
  if (with_hpas) info.hpas.assign(region.hpas.get(), region.hpas.get() + region.entries);
  return info;
}

absl::StatusOr<std::optional<RegionInfo>> Registry::Lookup(ContextId context_id, uint64_t ua,
                                                           uint64_t size) const {
  EpochReadLock read_lock;
  auto it = topology()->contexts.find(context_id);
  if (it == topology()->contexts.end()) {
    return NoSuchContext(context_id);
  }
  // §6: the whole non-empty interval must lie in one region.
  if (size == 0 || ua + (size - 1) < ua) return std::optional<RegionInfo>();
  const Region* region = it->second->index.Lookup(ua >> page_shift_);
  if (region == nullptr || ua + (size - 1) > region->last_byte) return std::optional<RegionInfo>();
  return std::optional<RegionInfo>(Describe(*region, /*with_hpas=*/false));
}

absl::StatusOr<std::optional<RegionInfo>> Registry::Find(ContextId context_id, uint64_t ua,
                                                         uint64_t entries) const {
  EpochReadLock read_lock;
  auto it = topology()->contexts.find(context_id);
  if (it == topology()->contexts.end()) {
    return NoSuchContext(context_id);
  }
  const Region* region = it->second->index.Lookup(ua >> page_shift_);
  if (region == nullptr || region->ua != ua || region->entries != entries) {
    return std::optional<RegionInfo>();
  }
  return std::optional<RegionInfo>(Describe(*region, /*with_hpas=*/false));
}

Registry::ReadSession::ReadSession(const Registry& registry, ContextId context)
    : page_shift_(registry.page_shift_), page_mask_(registry.page_size_ - 1) {
  context_ = registry.topology()->FindContext(context);
}

Registry::ReadSession::~ReadSession() = default;

bool Registry::ReadSession::CacheRegionOf(uint64_t ua) {
  if (context_ == nullptr) return false;
  const Region* region = context_->index.Lookup(ua >> page_shift_);
  if (region == nullptr) return false;
  cached_ua_ = region->ua;
  cached_bytes_ = region->entries << page_shift_;
  cached_hpas_ = region->hpas.get();
  return true;
}

size_t Registry::ReadSession::TranslatePages(uint64_t ua, absl::Span<uint64_t> hpas) {
  uint64_t* out = hpas.data();
  return VisitPages(ua, hpas.size(), [&out](uint64_t hpa) { *out++ = hpa; });
}

absl::StatusOr<uint64_t> Registry::ReadSession::Translate(uint64_t ua) {
  uint64_t hpa = 0;
  if (TryTranslate(ua, &hpa)) return hpa;
  return OutsideEveryRegion(ua);
}

// --- Introspection ----------------------------------------------------------------------------

std::vector<RegionInfo> Registry::ListRegions(std::optional<ContextId> context_id,
                                              bool with_hpas) const {
  MutexLock lock(&mu_);
  std::vector<const Context*> contexts;
  for (const auto& [id, context] : topology()->contexts) {
    if (!context_id.has_value() || *context_id == id) contexts.push_back(context);
  }
  std::sort(contexts.begin(), contexts.end(),
            [](const Context* a, const Context* b) { return a->id < b->id; });
  std::vector<RegionInfo> regions;
  for (const Context* context : contexts) {
    for (const auto& [ua, region] : context->regions) {
      regions.push_back(Describe(*region, with_hpas));
    }
  }
  return regions;
}

absl::StatusOr<ContextInfo> Registry::GetContext(ContextId id) const {
  MutexLock lock(&mu_);
  auto it = topology()->contexts.find(id);
  if (it == topology()->contexts.end()) {
    return NoSuchContext(id);
  }
  return DescribeContextLocked(*it->second);
}

ContextInfo Registry::DescribeContextLocked(const Context& context) const {
  ContextInfo info;
  info.id = context.id;
  info.options = context.options;
  info.locked_bytes = context.locked_pages << page_shift_;
  info.regions = context.regions.size();
  info.containers = context.containers;
  return info;
}

std::vector<ContextInfo> Registry::ListContexts() const {
  MutexLock lock(&mu_);
  std::vector<ContextInfo> contexts;
  for (const auto& [id, context] : topology()->contexts) {
    contexts.push_back(DescribeContextLocked(*context));
  }
  std::sort(contexts.begin(), contexts.end(),
            [](const ContextInfo& a, const ContextInfo& b) { return a.id < b.id; });
  return contexts;
}

ContainerInfo Registry::DescribeContainerLocked(Container& container) const {
  ContainerInfo info;
  info.id = container.id;
  info.options = container.options;
  const Context* context = container.context.load(std::memory_order_acquire);
  if (context != nullptr) info.context = context->id;
  info.held_regions = container.held.size();
  container.table.ForEachInstalled(
      [&info](uint64_t, std::atomic<Region*>&) { ++info.installed_entries; });
  return info;
}

absl::StatusOr<ContainerInfo> Registry::GetContainer(ContainerId id) const {
  MutexLock lock(&mu_);
  auto it = topology()->containers.find(id);
  if (it == topology()->containers.end()) {
    return ErrnoStatus(ENOENT, absl::StrFormat("container %d does not exist", id));
  }
  return DescribeContainerLocked(*it->second);
}

std::vector<ContainerInfo> Registry::ListContainers() const {
  MutexLock lock(&mu_);
  std::vector<ContainerInfo> containers;
  for (const auto& [id, container] : topology()->containers) {
    containers.push_back(DescribeContainerLocked(*container));
  }
  std::sort(containers.begin(), containers.end(),
            [](const ContainerInfo& a, const ContainerInfo& b) { return a.id < b.id; });
  return containers;
}

RegistryStats Registry::stats() const {
  RegistryStats stats;
#define DMAPIN_REGISTRY_SUM(field, ...) stats.field = Sum(stats_->field);
  DMAPIN_REGISTRY_COUNTERS(DMAPIN_REGISTRY_SUM, DMAPIN_REGISTRY_SUM)
#undef DMAPIN_REGISTRY_SUM
  for (const auto& shard : stats_->hot) {
    stats.maps_ok += Sum(shard.maps_ok);
    stats.unmaps += Sum(shard.unmaps);
  }
  return stats;
}

// --- Invariants (spec §10) --------------------------------------------------------------------

absl::Status Registry::CheckInvariants() const {
  MutexLock lock(&mu_);
  const Topology* current = topology();
  // Installed entries per region, over every container.
  absl::flat_hash_map<const Region*, uint64_t> installed;
  for (const auto& [id, container] : current->containers) {
    container->table.ForEachInstalled([&installed](uint64_t, std::atomic<Region*>& slot) {
      ++installed[slot.load(std::memory_order_acquire)];
    });
  }
  absl::flat_hash_map<const Region*, uint64_t> holders_seen;
  for (const auto& [id, container] : current->containers) {
    for (const Region* region : container->held) {
      ++holders_seen[region];
      const Context* bound = container->context.load(std::memory_order_acquire);
      if (bound == nullptr || bound->id != region->context) {
        return absl::InternalError(absl::StrFormat(
            "invariant: container %d holds region ua=0x%x of another context", id, region->ua));
      }
    }
  }
  uint64_t total_pages = 0;
  for (const auto& [id, context] : current->contexts) {
    uint64_t locked = 0;
    const Region* prev = nullptr;
    for (const auto& [ua, owned] : context->regions) {
      const Region* region = owned.get();
      const std::string name =
          absl::StrFormat("context %d region ua=0x%x entries=%d", id, region->ua, region->entries);
      // §10.1
      if (prev != nullptr && prev->last_byte >= region->ua) {
        return absl::InternalError("invariant 1: overlap at " + name);
      }
      prev = region;
      // §10.2
      const uint64_t used = region->used.load(std::memory_order_acquire);
      const uint64_t mapped = region->mapped.load(std::memory_order_acquire);
      if (used < 1 || mapped < 1) {
        return absl::InternalError(
            absl::StrFormat("invariant 2: %s has used=%d mapped=%d", name, used, mapped));
      }
      auto installed_it = installed.find(region);
      const uint64_t entries_in = installed_it == installed.end() ? 0 : installed_it->second;
      if (mapped - 1 != entries_in) {
        return absl::InternalError(
            absl::StrFormat("invariant 2: %s has mapped=%d but %d installed IOMMU entries", name,
                            mapped, entries_in));
      }
      installed.erase(region);
      // §10.5
      const bool pending = region->pending_release.load(std::memory_order_acquire);
      auto seen_it = holders_seen.find(region);
      const uint64_t holders = seen_it == holders_seen.end() ? 0 : seen_it->second;
      if (holders != region->Holders().size()) {
        return absl::InternalError(
            absl::StrFormat("invariant 5: %s lists %d holders but %d containers hold it", name,
                            region->Holders().size(), holders));
      }
      if (used != holders + (pending ? 1 : 0)) {
        return absl::InternalError(absl::StrFormat("invariant 5: %s has used=%d with %d holders%s",
                                                   name, used, holders,
                                                   pending ? " + pending release" : ""));
      }
      // The index maps exactly the region's pages to it.
      const uint64_t first_page = region->ua >> page_shift_;
      const uint64_t last_page = region->last_byte >> page_shift_;
      if (context->index.Lookup(first_page) != region ||
          context->index.Lookup(last_page) != region ||
          (first_page > 0 && context->index.Lookup(first_page - 1) == region) ||
          (last_page + 1 != 0 && context->index.Lookup(last_page + 1) == region)) {
        return absl::InternalError("index does not map exactly the pages of " + name);
      }
      // §10.4 (where the backend can tell).
      for (uint64_t i = 0; i < region->entries; ++i) {
        absl::StatusOr<uint64_t> count =
            backend_->PinCount(context->id, region->ua + (i << page_shift_));
        if (!count.ok()) break;
        if (*count != 1) {
          return absl::InternalError(
              absl::StrFormat("invariant 4: page 0x%x of %s is pinned %d times",
                              region->ua + (i << page_shift_), name, *count));
        }
      }
      locked += region->entries;
    }
    // §10.3
    if (locked != context->locked_pages) {
      return absl::InternalError(
          absl::StrFormat("invariant 3: context %d accounts %d locked pages, regions have %d", id,
                          context->locked_pages, locked));
    }
    total_pages += locked;
  }
  if (!installed.empty()) {
    return absl::InternalError(absl::StrFormat(
        "invariant 2: %d IOMMU entries point at no listed region", installed.size()));
  }
  if (total_pages != pinned_pages_) {
    return absl::InternalError(
        absl::StrFormat("invariant 3: the node accounts %d pinned pages, its contexts %d",
                        pinned_pages_, total_pages));
  }
  absl::StatusOr<uint64_t> total = backend_->TotalPinnedPages();
  if (total.ok() && *total != total_pages) {
    return absl::InternalError(absl::StrFormat(
        "invariant 4: backend has %d pages pinned, registry accounts for %d", *total, total_pages));
  }
  return absl::OkStatus();
}

}  // namespace dmapin::agent
