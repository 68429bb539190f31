// ContainerDma: one container's DMA state wherever it lives (the registry, and for the VFIO
// backends the kernel's IOMMU too), changed in the order that keeps the spec, each change with its
// own rollback. NodeAgent holds one per container and keeps names, ownership and durability (the
// store, and undoing what the store refused) on top; it never calls the kernel itself.
//
// Implementations (LevelDB Env style: one interface, one factory per backend):
//   NewRegistryContainerDma   the registry only (sim, memlock)            container_dma.cc
//   NewVfioContainerDma       the registry and a VFIO container driver    vfio_container_dma.cc
//
// Thread safety: the registry and the drivers are thread-safe; the caller orders the calls of one
// container (NodeAgent: registrations under its control lock, map/unmap under the container's DMA
// lock, release and close under both).
#ifndef DMAPIN_AGENT_NODE_CONTAINER_DMA_H_
#define DMAPIN_AGENT_NODE_CONTAINER_DMA_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "agent/registry/registry.h"
#include "agent/vfio/vfio_container.h"

namespace dmapin::agent {

// What taking a handed-off container back found (ContainerDma::Adopt).
struct AdoptionReport {
  uint64_t registrations = 0;    // kernel pre-registrations re-associated (pieces)
  uint64_t mappings = 0;         // kernel guest mappings re-associated (pieces)
  uint64_t inconsistencies = 0;  // store rows the kernel did not have as recorded (each redone)
  // What each of the first kMaxDetails was, e.g. "mapping iova=0x180000 size=0x10000: ENOENT ...".
  std::vector<std::string> details;
  static constexpr size_t kMaxDetails = 16;
  void Inconsistent(std::string detail) {
    ++inconsistencies;
    if (details.size() < kMaxDetails) details.push_back(std::move(detail));
  }
};

// A mapping as the store acknowledged it.
struct DmaMapping {
  uint64_t iova = 0;
  uint64_t ua = 0;
  uint64_t size = 0;
};

// The acknowledged mappings of the range being undone, from the store: nothing in memory keeps an
// IOMMU entry's ua, so an undo that must put entries back asks for them (and only then).
using AcknowledgedMappings = absl::FunctionRef<absl::StatusOr<std::vector<DmaMapping>>()>;

class ContainerDma {
 public:
  ContainerDma(const ContainerDma&) = delete;
  ContainerDma& operator=(const ContainerDma&) = delete;
  virtual ~ContainerDma() = default;

  ContainerId id() const { return id_; }
  // As the registry has them (for VFIO: the kernel's window).
  const ContainerOptions& options() const { return options_; }

  // --- Registration (spec §2, §3) ------------------------------------------------------------
  // Registers [ua, ua + size) of `context` everywhere, or nowhere. The registry's first
  // registration also binds the container (Unbind undoes that).
  virtual absl::Status Register(ContextId context, uint64_t ua, uint64_t size) = 0;
  // Unregisters everywhere, or nowhere; `context` is the container's (to give the hold back when
  // a later step fails).
  virtual absl::Status Unregister(ContextId context, uint64_t ua, uint64_t size) = 0;
  // Undoes the binding of the first Register (see Registry::UnbindContainer).
  absl::Status Unbind() { return registry_.UnbindContainer(id_); }
  // Where a registration made here lives in the device's IOVA space, for the store (type1's pin
  // range; 0 for the others).
  virtual uint64_t DeviceIova(uint64_t ua, uint64_t size) const { return 0; }

  // --- DMA (spec §7; the hot path: no allocation, no lock of its own) -------------------------
  // Maps [iova, iova + size) to [ua, ua + size). On failure the first *cleared_bytes of the range
  // were cleared (spec §7.5) everywhere; *replaced says whether an entry installed before was
  // overwritten or cleared (see Registry::Map).
  virtual absl::Status Map(uint64_t iova, uint64_t ua, uint64_t size, uint64_t* cleared_bytes,
                           bool* replaced) = 0;
  // An unmap in two steps, so a record can go between them. UnmapDevice checks the registry would
  // take the range (an error says which check failed) and takes it from the device first: once
  // the registry drops the entries a region may be released and its pages unpinned, so the device
  // must no longer reach them. UnmapRegistry then drops the registry's entries; after an OK
  // UnmapDevice of the same range it has no reason to fail.
  virtual absl::Status UnmapDevice(uint64_t iova, uint64_t size) = 0;
  absl::Status UnmapRegistry(uint64_t iova, uint64_t size) {
    return registry_.Unmap(id_, iova, size);
  }

  // --- Undo (of a change the store refused) ---------------------------------------------------
  // Takes out again the entries of a map (the device first, as in an unmap) and, when it
  // `replaced` any, puts back the acknowledged ones. False if some step failed.
  virtual bool UndoMap(uint64_t iova, uint64_t size, bool replaced,
                       AcknowledgedMappings acknowledged) = 0;
  // Gives the device back the acknowledged mappings an UnmapDevice took (the registry still has
  // them). False if some step failed.
  virtual bool UndoUnmapDevice(uint64_t iova, uint64_t size, AcknowledgedMappings acknowledged) = 0;

  // --- Recovery (a failed step fails the recovery, so nothing is undone) ----------------------
  // Binds a restored container that no hold binds (see Registry::BindContainer).
  absl::Status Bind(ContextId context) { return registry_.BindContainer(id_, context); }
  // Replays an acknowledged registration (at `device_iova`, as DeviceIova said, when not 0) and
  // mapping: the registry first, then the device. A container waiting for adoption notes what the
  // device should already have instead (Adopt checks it).
  virtual absl::Status ReplayRegistration(ContextId context, uint64_t ua, uint64_t size,
                                          uint64_t device_iova) = 0;
  virtual absl::Status ReplayMapping(uint64_t iova, uint64_t ua, uint64_t size) = 0;

  // --- The device handoff and restarts (VFIO; the others answer ENODEV / do nothing) ----------
  // Opens `devices` for the VMM and duplicates the container: descriptor 0 is the container,
  // i + 1 is devices[i]. MarkHandedOff once the store recorded it.
  virtual absl::StatusOr<std::vector<VfioFd>> OpenDevices(absl::Span<const std::string> devices);
  // From now on the VMM holds the container: its release clears the kernel's state itself (closing
  // would drop nothing), and a planned exit invalidates the agent's addresses first.
  virtual void MarkHandedOff() {}
  virtual bool handed_off() const { return false; }
  // Recovered from a handed-off container: it waits for the VMM's descriptor (Adopt); until then
  // registrations, maps and releases answer EAGAIN (UNAVAILABLE).
  virtual bool awaiting_adoption() const { return false; }
  // EAGAIN (UNAVAILABLE): `what` waits for the VMM's descriptor.
  absl::Status AwaitingAdoption(absl::string_view what) const;
  // Takes the container back from `container_fd` (always consumed) and checks and re-associates
  // every registration and mapping the recovery replayed; what the kernel does not have as
  // recorded is made again and counted. Only while awaiting_adoption().
  virtual absl::StatusOr<AdoptionReport> Adopt(int container_fd);
  // Before a planned exit (SIGTERM) of a handed-off container: see
  // VfioContainerDriver::InvalidateAddresses.
  virtual absl::Status PrepareForExit() { return absl::OkStatus(); }

  // --- Release ---------------------------------------------------------------------------------
  // Releases the container in the registry (spec §4) and, once it did, closes the device side.
  // An error leaves both as they were (EAGAIN while awaiting adoption).
  absl::Status Release();
  // Closes the device side of a container the registry has let go already (a context teardown).
  // A close error is counted, not returned: the registry has already let the container go.
  virtual void CloseDevice() = 0;

 protected:
  // `registry` must outlive this; the container `id` must exist in it.
  ContainerDma(Registry& registry, ContainerId id, const ContainerOptions& options)
      : registry_(registry), id_(id), options_(options) {}

  // Constant after construction.
  Registry& registry_;
  const ContainerId id_;
  const ContainerOptions options_;
};

// Creates container `id` in the registry, its only home.
absl::StatusOr<std::unique_ptr<ContainerDma>> NewRegistryContainerDma(
    Registry& registry, ContainerId id, const ContainerOptions& options);

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_NODE_CONTAINER_DMA_H_
