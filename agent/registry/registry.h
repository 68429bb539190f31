// The region registry: dmapin's implementation of the pre-registration contract
// (../shared/spec/registry-semantics.md, "the spec" below).
//
// Threading model:
//  - Writers (contexts, containers, register/unregister, release, teardown) are serialized by one
//    mutex. They never wait for readers except in a grace period after unpublishing something.
//  - The DMA hot path (Map, Unmap, Translate, Lookup, Find, ReadSession) takes no lock. It reads
//    immutable snapshots inside an epoch read section (see epoch.h), so it never blocks on a
//    writer and never sees a half-built or freed region. Counters are atomics.
//  - A thread inside a ReadSession must not call a writer method (it would wait for itself).
//
// The registry knows nothing of gRPC or persistence: it answers with errno statuses
// (errno_status.h).
#ifndef DMAPIN_AGENT_REGISTRY_REGISTRY_H_
#define DMAPIN_AGENT_REGISTRY_REGISTRY_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "agent/registry/epoch.h"
#include "agent/registry/pin_backend.h"
#include "common/mutex.h"
#include "common/registry_counters.h"

namespace dmapin::agent {

struct ContextOptions {
  // RLIMIT_MEMLOCK of the context in bytes; nullopt = unlimited.
  std::optional<uint64_t> memlock_limit_bytes;
  // With CAP_IPC_LOCK the memlock limit is waived but pages are still counted (spec §2.5).
  bool cap_ipc_lock = false;
};

struct ContainerOptions {
  // Page size of the container's DMA window (4 KiB, 64 KiB, 16 MiB, ...): a power of two.
  uint64_t iommu_page_size = 4096;
  // The DMA window [window_start, window_start + window_size).
  uint64_t window_start = 0;
  uint64_t window_size = uint64_t{1} << 40;
};

// §7.2 and §7.3 for the common case, in one branch: [iova, iova + size) is aligned to the IOMMU
// page (and so is `ua`; 0 for an unmap) and lies in the window. Inlined into the DMA paths;
// Registry::CheckUnmap and Map say which check failed.
inline bool DmaRangeOk(const ContainerOptions& options, uint64_t iova, uint64_t size, uint64_t ua) {
  const uint64_t mask = options.iommu_page_size - 1;
  return size != 0 && ((iova | size | ua) & mask) == 0 && iova >= options.window_start &&
         size <= options.window_size && iova - options.window_start <= options.window_size - size;
}

// What registrations may cost the node. A region costs the registry 8 bytes per page (its
// physical addresses) and the backend the pinned memory itself, so the size a caller asks for must
// not decide either: a register over a limit is ENOMEM and changes nothing.
struct RegistryLimits {
  // Largest single region, in bytes.
  uint64_t max_region_bytes = 0;
  // Most bytes pinned at once, summed over every context.
  uint64_t max_pinned_bytes = 0;
};

// The node's physical memory in bytes (sysconf), or 0 when it cannot be read.
uint64_t PhysicalMemoryBytes();

// Both limits at the node's physical memory (one region may take all of it, and nothing can pin
// more than there is); 1 TiB each when the size cannot be read.
RegistryLimits DefaultRegistryLimits();

// A copy of one region's state, as seen at the moment it was read.
struct RegionInfo {
  ContextId context = 0;
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t entries = 0;
  uint64_t used = 0;
  uint64_t mapped = 0;
  // Largest IOMMU page size the backing allows (spec §8).
  uint64_t max_iommu_page_size = 0;
  bool pending_release = false;
  std::vector<ContainerId> holders;  // sorted
  std::vector<uint64_t> hpas;        // filled only when asked for
};

struct ContextInfo {
  ContextId id = 0;
  ContextOptions options;
  uint64_t locked_bytes = 0;
  uint64_t regions = 0;
  std::vector<ContainerId> containers;  // containers bound to this context, sorted
};

struct ContainerInfo {
  ContainerId id = 0;
  ContainerOptions options;
  std::optional<ContextId> context;  // set once the container first registered memory
  uint64_t held_regions = 0;
  uint64_t installed_entries = 0;
};

// Counts of degraded and notable paths, for metrics: one field per counter of
// DMAPIN_REGISTRY_COUNTERS (common/registry_counters.h), e.g. registers_ok, maps_ok.
struct RegistryStats {
#define DMAPIN_REGISTRY_STATS_FIELD(field, ...) uint64_t field = 0;
  DMAPIN_REGISTRY_COUNTERS(DMAPIN_REGISTRY_STATS_FIELD, DMAPIN_REGISTRY_STATS_FIELD)
#undef DMAPIN_REGISTRY_STATS_FIELD
};

class Registry {
 public:
  struct Region;
  struct Context;
  struct Container;
  struct Topology;

  // `backend` must outlive the registry.
  explicit Registry(PinBackend* backend, RegistryLimits limits = DefaultRegistryLimits());
  ~Registry();  // Unpins everything still registered.

  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  PinBackend* backend() const { return backend_; }
  uint64_t page_size() const { return page_size_; }
  RegistryLimits limits() const;
  // Replaces the limits; regions already registered stay, even over the new ones (an agent
  // restoring its state registers what it acknowledged earlier, then applies its limits).
  void SetLimits(const RegistryLimits& limits);

  // --- Contexts and containers (writers) ---------------------------------------------------
  // EEXIST if the id is taken.
  absl::Status CreateContext(ContextId id, const ContextOptions& options);
  // Spec §4: releases every region of the context and unpins every page, whatever the counters
  // say; containers bound to the context lose their mappings and holdings and are released too.
  absl::Status TeardownContext(ContextId id);
  // EINVAL for a bad page size or window; EEXIST if the id is taken.
  absl::Status CreateContainer(ContainerId id, const ContainerOptions& options);
  // Spec §4: clears every mapping of the container, unregisters what it holds (regions still
  // mapped by other containers stay *pending release*), and removes the container.
  absl::Status ReleaseContainer(ContainerId id);
  // The regions (ua, size) of the container's context that would be pending release after
  // ReleaseContainer(id), if nothing else changed meanwhile; changes nothing. For an agent that
  // records a release before it makes it (a release cannot be undone). Empty for an unbound
  // container; ENOENT for an unknown one.
  absl::StatusOr<std::vector<std::pair<uint64_t, uint64_t>>> PendingAfterRelease(
      ContainerId id) const;

  // Binds a container that never registered memory to `context`, as its first Register would
  // (spec §1), for an agent restoring its state after a restart. OK if already bound there; EPERM
  // if bound to another context; ENOENT for an unknown container or context.
  absl::Status BindContainer(ContainerId container, ContextId context);
  // Undoes the binding of a container's first Register (spec §1), for an agent whose record of
  // that register was refused: the container must hold nothing and map nothing again (EBUSY
  // otherwise). OK if unbound; ENOENT for an unknown container.
  absl::Status UnbindContainer(ContainerId container);

  // Restores the pending-release reference (spec §4) of a region that containers registered
  // while it was pending and that DMA mappings still use, for an agent restoring its state after
  // a restart: used += 1, and the reference is dropped once `mapped` returns to 1. (A pending
  // region without holders is restored by registering it from a temporary container, mapping,
  // and releasing that container.) ENOENT without such a region; EBUSY if it is already pending;
  // EINVAL if it has no holders or no mappings.
  absl::Status RestorePendingRelease(ContextId context, uint64_t ua, uint64_t size);

  // --- Registration (writers; spec §2, §3) ---------------------------------------------------
  absl::Status Register(ContainerId container, ContextId context, uint64_t ua, uint64_t size);
  // What Register would answer before it pins anything (every check of spec §2.1-§2.5 and the
  // limits), changing nothing: for callers that must ask a kernel first (the VFIO backends) and
  // should not hand it a request the registry refuses. Register may still fail after an OK here
  // (a pin failure, or a concurrent writer).
  absl::Status CheckRegister(ContainerId container, ContextId context, uint64_t ua,
                             uint64_t size) const;
  absl::Status Unregister(ContainerId container, uint64_t ua, uint64_t size);

  // --- DMA hot path (lock-free; spec §7) -----------------------------------------------------
  // On failure, the first *cleared_pages IOMMU entries of the range were cleared (spec §7.5:
  // whatever they mapped before this call is gone); the rest of the range is unchanged. Callers
  // that mirror the mappings (the agent's durable state) need this; others pass nothing.
  // *replaced (when given) says whether the call overwrote or cleared an entry that was installed
  // before it: only then does an Unmap of the range not undo it (the registry keeps no ua of an
  // entry to restore).
  absl::Status Map(ContainerId container, uint64_t iova, uint64_t ua, uint64_t size,
                   uint64_t* cleared_pages = nullptr, bool* replaced = nullptr);
  absl::Status Unmap(ContainerId container, uint64_t iova, uint64_t size);
  // The error Unmap would answer (ENOENT, EINVAL, ENXIO), changing nothing: for callers that
  // unmap in a kernel first (VFIO) and must not hand it a range the registry refuses.
  absl::Status CheckUnmap(ContainerId container, uint64_t iova, uint64_t size) const;

  // --- Lookup and translation (lock-free; spec §6) -------------------------------------------
  // EFAULT (OUT_OF_RANGE) outside every region; ENOENT for an unknown context.
  absl::StatusOr<uint64_t> Translate(ContextId context, uint64_t ua) const;
  // The region containing all of [ua, ua + size), or nullopt.
  absl::StatusOr<std::optional<RegionInfo>> Lookup(ContextId context, uint64_t ua,
                                                   uint64_t size) const;
  // The region starting at `ua` with exactly `entries` pages, or nullopt.
  absl::StatusOr<std::optional<RegionInfo>> Find(ContextId context, uint64_t ua,
                                                 uint64_t entries) const;

  // --- Introspection -------------------------------------------------------------------------
  // All regions (of one context when given), ordered by (context, ua).
  std::vector<RegionInfo> ListRegions(std::optional<ContextId> context = std::nullopt,
                                      bool with_hpas = false) const;
  absl::StatusOr<ContextInfo> GetContext(ContextId id) const;
  std::vector<ContextInfo> ListContexts() const;
  absl::StatusOr<ContainerInfo> GetContainer(ContainerId id) const;
  std::vector<ContainerInfo> ListContainers() const;
  RegistryStats stats() const;

  // Checks every invariant of spec §10 (and the backend's pin counts where it can tell).
  // Meaningful when no operation is in flight; takes the writer lock.
  absl::Status CheckInvariants() const;

  // Batched, cached translation inside one read section, for loops on the hot path. The cache
  // of the last region hit makes sequential translation within a region a bounds check and an
  // array load. Must not outlive the registry; its thread must not call writer methods.
  class ReadSession {
   public:
    ReadSession(const Registry& registry, ContextId context);
    // Out of line like the constructor: a session is long-lived, and inlining the epoch exit
    // only grows the caller's translation loop.
    ~ReadSession();
    ReadSession(const ReadSession&) = delete;
    ReadSession& operator=(const ReadSession&) = delete;

    // False when the context is unknown.
    bool valid() const { return context_ != nullptr; }

    // The physical address of `ua`; false when `ua` lies outside every region.
    inline bool TryTranslate(uint64_t ua, uint64_t* hpa);

    absl::StatusOr<uint64_t> Translate(uint64_t ua);

    // Calls fn(hpa) for the consecutive pages ua, ua + PS, ... (at most `pages`; each hpa with
    // ua's offset within its page), in order, across adjacent regions, and stops at the first
    // page outside every region. Returns how many pages it visited. For DMA maps of contiguous
    // guest memory (filling TCEs or IOPTEs): one bounds check per region instead of one per page,
    // and an inner loop the compiler can vectorize with fn.
    template <typename Fn>
    uint64_t VisitPages(uint64_t ua, uint64_t pages, Fn&& fn);

    // VisitPages into hpas[0], hpas[1], ...; returns how many were translated.
    size_t TranslatePages(uint64_t ua, absl::Span<uint64_t> hpas);

   private:
    // Points the cache at the region containing `ua`; false when there is none.
    bool CacheRegionOf(uint64_t ua);

    EpochReadLock lock_;
    // The registry's page geometry, copied so the translation loops load it from the session.
    const uint32_t page_shift_;
    const uint64_t page_mask_;
    const Context* context_ = nullptr;
    // Cached last region: [cached_ua_, cached_ua_ + cached_bytes_).
    uint64_t cached_ua_ = 0;
    uint64_t cached_bytes_ = 0;
    const uint64_t* cached_hpas_ = nullptr;
  };

 private:
  friend class ReadSession;
  // Key of a region whose pending release may be completable after a read section ends.
  struct PendingRelease {
    ContextId context;
    uint64_t ua;
    uint64_t entries;
  };
  // What writers unpublished, to be freed after one grace period (registry.cc).
  struct Retired;

  const Topology* topology() const;
  // Publishes a new topology and frees the old one after a grace period.
  void PublishTopology(std::unique_ptr<Topology> next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WaitForReaders() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  struct RegisterPlan;
  // Spec §2.1-§2.5 and the limits for a register: fills `plan` with what it would change.
  absl::Status PlanRegisterLocked(ContainerId container, ContextId context, uint64_t ua,
                                  uint64_t size, RegisterPlan* plan) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RegisterImpl(ContainerId container, ContextId context, uint64_t ua, uint64_t size);
  absl::Status UnregisterImpl(ContainerId container, uint64_t ua, uint64_t size);
  absl::Status UnregisterLocked(Container* container, Region* region, bool* busy, Retired* retired)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveRegionLocked(Region* region, Retired* retired) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool TryCompletePendingLocked(Region* region, Retired* retired)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CompletePendingReleases(absl::Span<const PendingRelease> candidates);
  void ClearContainerEntries(Container* container);
  absl::Status MapImpl(ContainerId container, uint64_t iova, uint64_t ua, uint64_t size,
                       std::vector<PendingRelease>* pending, uint64_t* cleared_pages,
                       bool* replaced);
  // The error for a DMA range that failed the inline check of Map or Unmap (cold: only builds
  // the message). `ua` is null for unmap.
  ABSL_ATTRIBUTE_NOINLINE absl::Status DmaRangeError(const Container& container, uint64_t iova,
                                                     uint64_t size, const uint64_t* ua,
                                                     const char* what) const;
  absl::Status ValidateRange(uint64_t ua, uint64_t size, const char* what) const;
  RegionInfo Describe(const Region& region, bool with_hpas) const;
  ContextInfo DescribeContextLocked(const Context& context) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  ContainerInfo DescribeContainerLocked(Container& container) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  PinBackend* const backend_;
  const uint64_t page_size_;
  const uint32_t page_shift_;

  mutable Mutex mu_;
  RegistryLimits limits_ ABSL_GUARDED_BY(mu_);
  // Pages pinned over every context (the sum of their locked_pages).
  uint64_t pinned_pages_ ABSL_GUARDED_BY(mu_) = 0;
  // The current topology (contexts and containers by id); replaced copy-on-write by writers.
  std::atomic<const Topology*> topology_{nullptr};

  // Replaced by a value never used before (by any registry) whenever a region is unpublished, so
  // Map trusts its per-thread hint to the last region it mapped into only while this still equals
  // what the hint recorded: a hinted region is never one a grace period may have freed.
  std::atomic<uint64_t> region_generation_;

  struct AtomicStats;
  std::unique_ptr<AtomicStats> stats_;
};

// --- Inline fast path ------------------------------------------------------------------------

inline bool Registry::ReadSession::TryTranslate(uint64_t ua, uint64_t* hpa) {
  // `hpa` is not passed to the out-of-line path, so it can stay in a register in callers' loops.
  if (ABSL_PREDICT_FALSE(ua - cached_ua_ >= cached_bytes_) && !CacheRegionOf(ua)) return false;
  *hpa = cached_hpas_[(ua - cached_ua_) >> page_shift_] | (ua & page_mask_);
  return true;
}

template <typename Fn>
uint64_t Registry::ReadSession::VisitPages(uint64_t ua, uint64_t pages, Fn&& fn) {
  const uint32_t shift = page_shift_;
  const uint64_t in_page = ua & page_mask_;
  uint64_t done = 0;
  while (done < pages) {
    if (ua - cached_ua_ >= cached_bytes_ && !CacheRegionOf(ua)) break;
    const uint64_t first = (ua - cached_ua_) >> shift;
    const uint64_t run = std::min<uint64_t>((cached_bytes_ >> shift) - first, pages - done);
    const uint64_t* from = cached_hpas_ + first;
    for (uint64_t i = 0; i < run; ++i) fn(from[i] | in_page);
    done += run;
    const uint64_t next = ua + (run << shift);
    if (next < ua) break;  // the run ended at 2^64
    ua = next;
  }
  return done;
}

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_REGISTRY_REGISTRY_H_
