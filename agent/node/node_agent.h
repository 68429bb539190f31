// NodeAgent: the node agent's core. It owns the names of memory contexts and containers, drives
// the registry (and for the VFIO backends the kernel, through one ContainerDma per container,
// container_dma.h), and makes every acknowledged change durable in the StateStore before
// returning.
// A change the store refuses is not acknowledged and is not seen either: it is undone in memory
// (and in the kernel) before the agent answers, or applied only once the store took it.
// On start it rebuilds the registry from the store (re-pinning through the backend) and checks
// the invariants before anyone is served (node_recovery.cc).
//
// No gRPC here: agent/service translates between this class and the wire.
#ifndef DMAPIN_AGENT_NODE_NODE_AGENT_H_
#define DMAPIN_AGENT_NODE_NODE_AGENT_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "agent/node/container_dma.h"
#include "agent/node/context_memory.h"
#include "agent/node/guest_address_backend.h"
#include "agent/node/guest_memory.h"
#include "agent/node/process_watch.h"
#include "agent/registry/pin_backend.h"
#include "agent/registry/registry.h"
#include "agent/store/state_store.h"
#include "agent/vfio/vfio_container.h"
#include "common/mutex.h"

namespace dmapin::agent {

// Who makes a call, as the gRPC layer (or the memory socket) saw it. Ownership rules (README,
// "Whose memory"): a context belongs to the local process that created it (or that a manager
// named); only that process may map, unmap and translate on it. Register, unregister, release
// and teardown are also open to managers and to the central service.
struct Caller {
  enum class Kind {
    kInternal,  // the agent itself: the control stream's decisions, recovery, in-process tests
    kRemote,    // a TCP peer: the central service or an admin (no local identity)
    kLocal,     // a process on the node, over the Unix socket (SO_PEERCRED)
  };
  Kind kind = Kind::kInternal;
  pid_t pid = 0;
  uid_t uid = 0;

  static Caller Internal() { return Caller{}; }
  static Caller Remote() { return Caller{.kind = Kind::kRemote}; }
  static Caller Local(pid_t pid, uid_t uid) {
    return Caller{.kind = Kind::kLocal, .pid = pid, .uid = uid};
  }
  // "pid 4242 uid 107", "a TCP peer", "the agent".
  std::string Describe() const;
};

struct NodeAgentOptions {
  std::string node_name;
  // Not owned; must outlive the agent.
  PinBackend* backend = nullptr;
  // Not owned; nullptr runs without durability (tests of the translation layer only).
  StateStore* store = nullptr;
  // Not owned; maps memory for contexts created with memory_bytes (memlock backend). nullptr:
  // contexts name memory by address only (sim backend).
  ContextMemoryProvider* memory_provider = nullptr;
  // Backends this node could run, as detected at start (reported in the node status).
  std::vector<std::string> available_backends;
  // The VFIO backend in use ("vfio-type1", "vfio-spapr-v2"), reported as the node's backend; empty
  // for sim and memlock.
  std::string vfio_backend;
  // The VFIO backends: opens the kernel side of a container (a VFIO container with these IOMMU
  // groups, e.g. "/dev/vfio/26"). Every registration, mapping and release of the container then
  // goes to the kernel too, and its DMA window is the kernel's. Null (sim, memlock): containers
  // exist in the registry only.
  std::function<absl::StatusOr<std::unique_ptr<VfioContainerDriver>>(
      const std::vector<std::string>& groups)>
      open_vfio_container;
  // The VFIO backends: a driver not opened yet, to take back a container whose VMM held it while
  // the agent restarted (ContainerDma::Adopt). Null: handed-off containers are opened again.
  std::function<std::unique_ptr<VfioContainerDriver>()> new_vfio_driver;
  // What registrations may pin (dmapin-agent --max_region_bytes, --max_pinned_bytes). Applied
  // after recovery: what the store holds was acknowledged under the limits of its time.
  RegistryLimits limits = DefaultRegistryLimits();
  // Most addresses one Translate call may ask for, and one ListRegions with_hpas may return
  // (8 bytes each, plus their encoding): ENOMEM above.
  uint64_t max_translate_uas = uint64_t{1} << 20;
  uint64_t max_listed_hpas = uint64_t{1} << 20;
  // Real pinning (memlock, VFIO): a context owned by another process works in that process's
  // addresses, through the memory it attaches (GuestMemory). False (sim): addresses are taken as
  // given and there is nothing to attach.
  bool vmm_memory = false;
  // Local uids that may act for VMMs (create a context for a pid, attach its memory, register;
  // never map): a virt-handler-like management daemon. dmapin-agent --manager_uids.
  std::vector<uid_t> manager_uids;
  // INSECURE, for demos and tests over TCP only: any caller may map, unmap and translate on any
  // context (dmapin-agent --insecure_dma_from_any_peer).
  bool dma_from_any_peer = false;
  // Watch each owner's exit (pidfd) and tear its context down then.
  bool watch_owners = true;
  // What a caller may not choose (dmapin-agent --context_memlock_limit_bytes): the most a context
  // may pin. A caller may ask for less; more, unlimited, or the waiver (cap_ipc_lock) take a
  // manager (EPERM otherwise). nullopt: no per-context limit (the node's --max_pinned_bytes
  // bounds everything).
  std::optional<uint64_t> context_memlock_limit_bytes;
  // How many of each a node, and one owner, may have (ENOSPC beyond; --max_contexts, ...): no
  // caller decides how much memory, or how many metric series, the agent keeps.
  uint64_t max_contexts = 4096;
  uint64_t max_contexts_per_owner = 64;
  uint64_t max_containers = 4096;
  uint64_t max_regions_per_context = 65536;
};

struct ContextSpec {
  std::string name;
  std::optional<uint64_t> memlock_limit_bytes;  // nullopt = unlimited
  bool cap_ipc_lock = false;
  MemoryBacking backing = MemoryBacking::kUnspecified;  // values it does not name are EINVAL
  // Simulated VMM memory: memory the agent allocates for the context itself (0: none). Needs a
  // memory provider; at most limits.max_pinned_bytes (ENOMEM).
  uint64_t memory_bytes = 0;
  // The process the context is for (0: the caller, when it is local). Naming another process
  // takes a manager (EPERM otherwise).
  pid_t owner_pid = 0;
};

struct ContainerSpec {
  std::string name;
  uint64_t iommu_page_size = 0;  // 0 = the node's page size
  uint64_t window_start = 0;
  uint64_t window_size = 0;  // 0 = 2^40
  // VFIO backends: the IOMMU groups the container attaches (at least one); the window and the
  // IOMMU page size then come from the kernel (values given here must match them). Empty
  // otherwise.
  std::vector<std::string> vfio_groups;
};

struct ContextView {
  std::string name;
  ContextSpec spec;
  uint64_t memory_ua = 0;  // where the agent mapped the context's memory, if it did
  std::optional<ProcessIdentity> owner;
  std::vector<GuestSlot> slots;  // the VMM's memory the agent mapped
  uint64_t locked_bytes = 0;
  uint64_t regions = 0;
  std::vector<std::string> containers;
};

struct ContainerView {
  std::string name;
  ContainerOptions options;
  std::vector<std::string> vfio_groups;
  std::string context;  // empty until bound
  uint64_t held_regions = 0;
  uint64_t installed_entries = 0;
  bool handed_off = false;         // the VMM holds its devices and a descriptor of it
  bool awaiting_adoption = false;  // recovered; waits for the VMM's descriptor
};

// The device handoff's answer: descriptor 0 is a duplicate of the container's, descriptor i + 1
// the device i asked for. The caller passes them on (and they close when this goes).
struct DeviceHandoff {
  ContainerView container;
  std::vector<VfioFd> fds;
};

struct RegionView {
  std::string context;
  std::vector<std::string> containers;
  RegionInfo info;
};

struct NodeStatusView {
  std::string node_name;
  std::string backend;
  std::vector<std::string> available_backends;
  uint64_t page_size = 0;
  uint64_t contexts = 0;
  uint64_t containers = 0;
  uint64_t regions = 0;
  uint64_t locked_bytes = 0;
  uint64_t installed_entries = 0;
  RegistryStats counters;
  // Degraded paths of the agent itself.
  bool store_failed = false;  // changes are refused until a restart
  uint64_t store_commit_failures = 0;
  // VFIO backends: kernel calls that failed where the registry could not be rolled back, and
  // closes of released containers that failed.
  uint64_t vfio_inconsistencies = 0;
  // Changes the store refused that could not be undone in memory or in the kernel: until the
  // restart, reads may show some of what was never acknowledged (or miss what was).
  uint64_t refused_change_undo_failures = 0;
  // Ownership: calls refused because the caller does not own the context (or is not local).
  uint64_t permission_denied = 0;
  // Contexts torn down because their owner exited: while the agent ran, and found at recovery.
  uint64_t owner_exit_teardowns = 0;
  uint64_t owner_exits_at_recovery = 0;
  // Contexts torn down at recovery because their owner's memory could not be mapped again.
  uint64_t memory_lost_at_recovery = 0;
  // Creations and registrations refused for a count limit (max_contexts, ...).
  uint64_t limit_refusals = 0;
  // Restarts: VFIO containers opened again at recovery (their DMA mappings were gone while the
  // agent was down), containers waiting for their VMM's descriptor now, containers taken back,
  // and kernel objects not found as recorded when taking them back.
  uint64_t containers_reopened_at_recovery = 0;
  uint64_t containers_awaiting_adoption = 0;
  uint64_t containers_adopted = 0;
  uint64_t adoption_inconsistencies = 0;
};

// A context the agent tore down because its owner exited (for the central service's events).
struct OwnerExit {
  std::string context;
  pid_t pid = 0;
  uint64_t unpinned_bytes = 0;
};

// A central-service decision being applied: recorded in the same transaction as its effect, so a
// repeated id is answered from the record and never applied twice.
struct DecisionTag {
  std::string id;
  uint64_t epoch = 0;
};

enum class DecisionKind {
  kRegister = 1,
  kUnregister = 2,
  kReleaseContainer = 3,
  kTeardownContext = 4
};

struct DecisionSpec {
  DecisionTag tag;
  DecisionKind kind = DecisionKind::kRegister;
  std::string context;
  std::string container;
  uint64_t ua = 0;
  uint64_t size = 0;
};

struct DecisionOutcome {
  absl::Status status;     // what applying it answered (or answered the first time)
  bool duplicate = false;  // answered from the record of an earlier application
};

// Names are 1-128 characters from [A-Za-z0-9._/-]; EINVAL otherwise.
absl::Status ValidateName(absl::string_view what, absl::string_view name);

class NodeAgent {
 public:
  // Builds the agent and rebuilds its registry from the store. Fails (and serves nothing) if the
  // persisted state cannot be restored exactly.
  static absl::StatusOr<std::unique_ptr<NodeAgent>> Create(NodeAgentOptions options);
  ~NodeAgent();

  absl::StatusOr<ContextView> CreateContext(const ContextSpec& spec,
                                            const Caller& caller = Caller::Internal());
  absl::StatusOr<ContextView> GetContext(absl::string_view name) const;
  std::vector<ContextView> ListContexts() const;
  absl::Status TeardownContext(absl::string_view name, const DecisionTag* decision = nullptr,
                               const Caller& caller = Caller::Internal());
  // Maps the owner's memory for the context (GuestMemory::Attach: all slots or none), from
  // descriptors the VMM sent (the memory socket).
  absl::StatusOr<ContextView> AttachMemory(absl::string_view context,
                                           absl::Span<const SlotSource> sources,
                                           const Caller& caller = Caller::Internal());
  // The fd-less path: the same, from the owner's own mappings of [ua, ua + size) of each range
  // (OpenProcessSlots).
  absl::StatusOr<ContextView> AttachOwnerMemory(
      absl::string_view context, absl::Span<const std::pair<uint64_t, uint64_t>> ranges,
      const Caller& caller = Caller::Internal());

  absl::StatusOr<ContainerView> CreateContainer(const ContainerSpec& spec,
                                                const Caller& caller = Caller::Internal());
  absl::StatusOr<ContainerView> GetContainer(absl::string_view name) const;
  std::vector<ContainerView> ListContainers() const;
  absl::Status ReleaseContainer(absl::string_view name, const DecisionTag* decision = nullptr,
                                const Caller& caller = Caller::Internal());

  // --- The device handoff and restarts (README, "What happens when the agent dies") ----------
  // VFIO: opens `devices` (1 to kMaxHandoffDevices PCI addresses in the container's groups) and
  // duplicates the container, for the VMM that may map on it (its owner, or its creator while
  // unbound), and records that the VMM holds them: from then on the container's IOMMU state lives
  // as long as the VMM's descriptors, and a restarted agent takes it back (AdoptContainer).
  absl::StatusOr<DeviceHandoff> OpenDevices(absl::string_view container,
                                            absl::Span<const std::string> devices,
                                            const Caller& caller = Caller::Internal());
  static constexpr size_t kMaxHandoffDevices = 16;
  // After a restart: takes the container back from `container_fd` (always consumed: closed by
  // the container's VFIO kernel, or with close(2) when refused before it), the descriptor
  // OpenDevices handed out, from the same caller as OpenDevices.
  absl::StatusOr<AdoptionReport> AdoptContainer(absl::string_view container, int container_fd,
                                                const Caller& caller = Caller::Internal());
  // A planned exit (SIGTERM), once nothing is served any more: the kernel forgets the agent's
  // addresses of every handed-off container (their IOMMU entries stay).
  void PrepareForExit();

  absl::StatusOr<RegionView> RegisterRegion(absl::string_view container, absl::string_view context,
                                            uint64_t ua, uint64_t size,
                                            const DecisionTag* decision = nullptr,
                                            const Caller& caller = Caller::Internal());
  absl::Status UnregisterRegion(absl::string_view container, uint64_t ua, uint64_t size,
                                const DecisionTag* decision = nullptr,
                                const Caller& caller = Caller::Internal());

  // Applies a central-service decision at most once (see DecisionTag).
  DecisionOutcome ApplyDecision(const DecisionSpec& decision);

  absl::Status MapDma(absl::string_view container, uint64_t iova, uint64_t ua, uint64_t size,
                      const Caller& caller = Caller::Internal());
  absl::Status UnmapDma(absl::string_view container, uint64_t iova, uint64_t size,
                        const Caller& caller = Caller::Internal());
  absl::StatusOr<std::vector<uint64_t>> Translate(absl::string_view context,
                                                  absl::Span<const uint64_t> uas,
                                                  const Caller& caller = Caller::Internal()) const;
  absl::StatusOr<std::optional<RegionView>> Lookup(absl::string_view context, uint64_t ua,
                                                   uint64_t size) const;
  // Empty context: every context.
  // Physical addresses (with_hpas) only for a caller that may translate on every context listed.
  absl::StatusOr<std::vector<RegionView>> ListRegions(
      absl::string_view context, bool with_hpas, const Caller& caller = Caller::Internal()) const;
  NodeStatusView Status() const;
  // The most recent owner-exit teardowns (at most kRecentOwnerExits, oldest first).
  std::vector<OwnerExit> RecentOwnerExits() const;
  static constexpr size_t kRecentOwnerExits = 1024;

  // False once the store failed: the agent must be restarted (health reports NOT_SERVING).
  bool healthy() const { return !store_failed_.load(std::memory_order_acquire); }

  // The registry's page size (its pin granularity), for callers that describe regions.
  uint64_t page_size() const { return registry_->page_size(); }
  // The limits registrations are checked against (--max_region_bytes, --max_pinned_bytes).
  RegistryLimits registry_limits() const { return registry_->limits(); }

  // For tests and the invariant checks of the recovery path.
  absl::Status CheckInvariants() const { return registry_->CheckInvariants(); }

 private:
  // One per container: its registry id, its DMA state (registry and kernel) and the lock that
  // orders its map/unmap calls with their durable records (so the store sees them in the order
  // the registry applied them).
  struct ContextEntry;
  struct ContainerEntry {
    // Constant once the entry is published.
    ContainerId id = 0;
    std::string name;
    ContainerSpec spec;
    // The local process that created the container (0: the agent, a TCP peer, or recovered): it
    // may map on the container until a registration binds it to a context, whose owner then may.
    pid_t creator_pid = 0;
    // Where the container's registrations and mappings live (the driver serializes its own
    // ioctls; map/unmap reach it under dma_mu, registrations under control_mu_, the close of
    // release and teardown under both).
    std::unique_ptr<ContainerDma> dma;

    Mutex dma_mu;
    // Set once the container is released or torn down; map/unmap then answer ENOENT.
    bool released ABSL_GUARDED_BY(dma_mu) = false;
    // The context the container is bound to (set on its first registration; the entry outlives
    // any use here because teardown takes dma_mu before dropping the context).
    std::atomic<ContextEntry*> bound{nullptr};
  };
  struct ContextEntry {
    ContextId id = 0;
    ContextSpec spec;
    std::unique_ptr<ContextMemory> memory;  // null unless spec.memory_bytes > 0
    std::optional<ProcessIdentity> owner;   // none: created over TCP or by the agent
    // The owner's memory, when the context works in the owner's addresses (set before the entry
    // is published; GuestMemory locks its own slots).
    std::shared_ptr<GuestMemory> guest;
    // Regions of this context pending release, as last persisted ((ua, size) pairs).
    Mutex pending_mu;
    std::vector<std::pair<uint64_t, uint64_t>> pending ABSL_GUARDED_BY(pending_mu);
    // Fast check on the DMA path: is there anything pending that an unmap could complete?
    std::atomic<bool> has_pending{false};
  };

  explicit NodeAgent(NodeAgentOptions options);
  // Recovery (node_recovery.cc): replays the store through the containers' ContainerDma.
  absl::Status Recover();
  // Rebuilds the registry and the name tables from `state`, each context with its owner's memory
  // from `guests` (RecoverOwners); the regions still pending release go to `pending` (their rows
  // are set by Recover, which may take the contexts' pending_mu).
  absl::Status RecoverLocked(
      const PersistedState& state,
      const absl::flat_hash_map<std::string, std::shared_ptr<GuestMemory>>& guests,
      std::vector<std::pair<ContextEntry*, StoredPending>>* pending)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(control_mu_, names_mu_);
  // Creates a new or recovered container in the registry, with its kernel side for the VFIO
  // backends (opened, and `options` fitted to its window).
  absl::StatusOr<std::unique_ptr<ContainerDma>> NewContainerDma(ContainerId id,
                                                                const ContainerSpec& spec,
                                                                ContainerOptions* options);
  // Opens the kernel side of a new or recovered container and fits `options` to its window.
  absl::StatusOr<std::unique_ptr<VfioContainerDriver>> OpenVfioContainer(const ContainerSpec& spec,
                                                                         ContainerOptions* options);
  // Releases the container in the registry, marks it released and closes its kernel side.
  absl::Status ReleaseContainerLocked(ContainerEntry& entry)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(entry.dma_mu);
  // Marks a container of a context being torn down released and closes its kernel side.
  // TeardownContext holds the dma_mu of every bound container at once, through a vector of
  // locks: a set only known at run time, which the analysis cannot follow.
  void MarkReleasedUnderTeardown(ContainerEntry& entry) ABSL_NO_THREAD_SAFETY_ANALYSIS;
  absl::StatusOr<std::unique_ptr<ContextMemory>> AllocateMemory(absl::string_view name,
                                                                const ContextSpec& spec,
                                                                uint64_t at);

  // Ownership (see Caller). Count and answer EPERM (PERMISSION_DENIED) for a caller that may not
  // map/unmap/translate on `context` (null: a container not bound yet, which nothing can map),
  // or may not register, release or tear down on it.
  absl::Status CheckDma(const ContextEntry* context, absl::string_view context_name,
                        const Caller& caller, absl::string_view what) const;
  absl::Status CheckControl(const ContextEntry& context, absl::string_view context_name,
                            const Caller& caller, absl::string_view what) const;
  // CheckDma/CheckControl for a container: by the context it is bound to, else by its creator.
  absl::Status CheckContainerDma(const ContainerEntry& container, const Caller& caller,
                                 absl::string_view what) const;
  absl::Status CheckContainerControl(const ContainerEntry& container, const Caller& caller,
                                     absl::string_view what) const;
  bool IsManager(const Caller& caller) const;
  absl::Status Denied(std::string message) const;
  // ENOSPC for a count limit `flag` of `limit`, counted.
  absl::Status OverLimit(absl::string_view what, absl::string_view flag, uint64_t limit);
  // The memlock limit and waiver `spec` asks for, checked against what `caller` may choose.
  absl::Status CheckMemlockChoice(const ContextSpec& spec, const Caller& caller) const;
  // The row of a context, as Persist writes it.
  StoredContext ToStored(const ContextEntry& entry, const std::string& name) const;
  // EINVAL saying why `context` takes no memory of its owner (sim backend, simulated VMM memory,
  // no owner but the agent).
  absl::Status NothingToAttach(absl::string_view name, const ContextEntry& context) const;
  // Adds `sources` to the context's memory and makes them durable (all or nothing).
  absl::StatusOr<ContextView> AttachSources(const std::string& name, ContextEntry& context,
                                            absl::Span<const SlotSource> sources)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(control_mu_);
  // The context `name`, when `caller` may attach memory to it.
  absl::StatusOr<std::shared_ptr<ContextEntry>> ContextToAttachTo(absl::string_view name,
                                                                  const Caller& caller) const;
  // The owner of `key` ("<name>#<id>") exited: the final cleanup of its context.
  void OnOwnerExit(const std::string& key);
  static std::string WatchKey(absl::string_view name, ContextId id);
  // Recovery: tears down, in the store, the contexts whose owner is gone or whose memory cannot
  // be mapped again, and maps the memory of the others (to `guests`, by context name).
  absl::Status RecoverOwners(
      PersistedState& state,
      absl::flat_hash_map<std::string, std::shared_ptr<GuestMemory>>* guests);

  std::shared_ptr<ContainerEntry> FindContainer(absl::string_view name) const;
  std::shared_ptr<ContextEntry> FindContext(absl::string_view name) const;
  std::string ContextName(ContextId id) const;
  std::string ContainerName(ContainerId id) const;
  RegionView ToView(RegionInfo info) const;
  ContextView ToView(const ContextInfo& info) const;
  ContainerView ToView(const ContainerInfo& info) const;

  // Makes `mutation` durable. When the store fails, the caller undoes its change (or never made
  // it); the agent then refuses further changes (EIO) and reports itself unhealthy, so that a
  // restart rebuilds the registry from what was acknowledged.
  absl::Status Persist(Mutation& mutation, const DecisionTag* decision = nullptr);
  // The DMA hot path's record of one mapping change: a journal append, no transaction (see
  // StateStore::RecordMap). mapped=false clears the range.
  absl::Status PersistMappingChange(const ContainerEntry& container, bool mapped, uint64_t iova,
                                    uint64_t size, uint64_t ua = 0);
  // What the store answered, with the agent's reaction to a failure (see Persist).
  absl::Status StoreOutcome(absl::Status status);
  absl::Status CheckWritable() const;
  // Counts a refused change that could not be undone (see refused_change_undo_failures).
  void UndoFailed();
  // Takes out again the entries of a map whose record the store refused (`installed`: the map
  // succeeded), and puts back what it overwrote or cleared (`replaced`) from the store.
  void UndoRefusedMap(ContainerEntry& container, bool installed, bool replaced, uint64_t iova,
                      uint64_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(container.dma_mu);
  // The store's acknowledged mappings of [iova, iova + size), for the undos of ContainerDma.
  // Fails without a store, or when it cannot say.
  absl::StatusOr<std::vector<DmaMapping>> AcknowledgedMappings(const ContainerEntry& container,
                                                               uint64_t iova, uint64_t size);
  // Adds to `mutation` the changes that bring the persisted pending-release rows of `context` in
  // line with the registry. Holds context.pending_mu until the caller has committed.
  void AddPendingDiff(ContextEntry& context, const std::string& context_name, Mutation* mutation)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(context.pending_mu);
  void AddPendingDiffLocked(ContextEntry& context, Mutation& mutation)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(context.pending_mu);
  // AddPendingDiff towards the rows `now` (the regions pending release) instead of the registry's.
  void SetPendingRows(ContextEntry& context, const std::string& context_name,
                      std::vector<std::pair<uint64_t, uint64_t>> now, Mutation* mutation)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(context.pending_mu);
  // Puts back the rows of a context as last persisted, after the store refused a change to them.
  void RestorePending(ContextEntry& context, std::vector<std::pair<uint64_t, uint64_t>> persisted)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(context.pending_mu);
  // The store took a change the registry then refused (it has no reason to): memory is behind the
  // store, so the agent refuses changes until a restart rebuilds from it. Counted; returns
  // `status`.
  absl::Status MemoryBehindStore(absl::Status status);

  // Constant after construction.
  const NodeAgentOptions options_;
  // Between the registry and options_.backend: a VMM's addresses to the agent's.
  GuestAddressBackend guest_backend_;
  const std::unique_ptr<Registry> registry_;

  // Serializes the control operations (everything but map/unmap/lookups) with their records.
  mutable Mutex control_mu_;
  // Serializes decisions, so a repeated id cannot race its first application.
  Mutex decision_mu_;
  // Name tables; writers hold control_mu_ and names_mu_, readers only names_mu_.
  mutable Mutex names_mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<ContextEntry>> contexts_
      ABSL_GUARDED_BY(names_mu_);
  absl::flat_hash_map<std::string, std::shared_ptr<ContainerEntry>> containers_
      ABSL_GUARDED_BY(names_mu_);
  absl::flat_hash_map<ContextId, std::string> context_names_ ABSL_GUARDED_BY(names_mu_);
  absl::flat_hash_map<ContainerId, std::string> container_names_ ABSL_GUARDED_BY(names_mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(control_mu_) = 1;

  std::atomic<bool> store_failed_{false};
  std::atomic<uint64_t> store_commit_failures_{0};
  // Kernel (VFIO) calls that failed after the registry had changed and could not be undone
  // (counted by the containers' VfioContainerDma), and failed closes.
  std::atomic<uint64_t> vfio_inconsistencies_{0};
  std::atomic<uint64_t> refused_change_undo_failures_{0};
  mutable std::atomic<uint64_t> permission_denied_{0};
  std::atomic<uint64_t> owner_exit_teardowns_{0};
  std::atomic<uint64_t> owner_exits_at_recovery_{0};
  std::atomic<uint64_t> memory_lost_at_recovery_{0};
  std::atomic<uint64_t> limit_refusals_{0};
  std::atomic<uint64_t> containers_reopened_at_recovery_{0};
  std::atomic<uint64_t> containers_adopted_{0};
  std::atomic<uint64_t> adoption_inconsistencies_{0};

  mutable Mutex exits_mu_;
  std::deque<OwnerExit> recent_exits_ ABSL_GUARDED_BY(exits_mu_);

  // Last: destroyed first, so no owner exit is handled while the rest goes.
  std::unique_ptr<ProcessWatcher> watcher_;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_NODE_NODE_AGENT_H_
