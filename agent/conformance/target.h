// The thing a conformance case runs against.
//
// One ConformanceTarget instance serves one case: a factory builds it from the case's node
// settings (page size, memlock limit, CAP_IPC_LOCK, unpinnable and huge-page ranges), the runner
// drives it step by step and then drops it. Containers and memory contexts are named by the
// strings of the case file; the target maps names to whatever ids its implementation uses.
// Containers are created on first use with an IOMMU page size equal to the case's page size and a
// DMA window [0, 2^40), unless CreateContainer said otherwise; contexts are created on first use
// with the case's memlock settings. After ReleaseContainer the name is free again: a later use
// creates a new container. After TeardownContext, FindRegion and GetContextState on that name
// report what is left of the torn-down context (nothing, when teardown works), while any other
// use of the name creates a fresh context; containers that were bound to the torn-down context
// are gone and their names free again. The case files rely on these rules.
//
// Operations answer like the registry contract (../shared/spec/registry-semantics.md): an OK or
// errno-carrying absl::Status (recover the errno with dmapin::ErrnoOf(), errno_status.h).
//
// The interface holds no registry types, so that a target that runs each case against a freshly
// started node agent over gRPC (grpc_target.h) implements it as well as the in-process one.
#ifndef DMAPIN_AGENT_CONFORMANCE_TARGET_H_
#define DMAPIN_AGENT_CONFORMANCE_TARGET_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "agent/conformance/case_file.h"

namespace dmapin::agent::conformance {

// Settings of an explicitly created container; unset fields take the first-use defaults.
struct ContainerSettings {
  std::optional<uint64_t> iommu_page_size;
  std::optional<uint64_t> window_start;
  std::optional<uint64_t> window_size;
};

// One region as the target reports it.
struct RegionState {
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t used = 0;
  uint64_t mapped = 0;
  bool pending_release = false;
};

// One memory context's account.
struct ContextState {
  uint64_t locked_bytes = 0;
  uint64_t regions = 0;
};

class ConformanceTarget {
 public:
  virtual ~ConformanceTarget() = default;

  // For messages ("in-process", "grpc").
  virtual std::string name() const = 0;

  // --- Containers and contexts (spec §1, §4) -------------------------------------------------
  virtual absl::Status CreateContainer(absl::string_view container,
                                       const ContainerSettings& settings) = 0;
  virtual absl::Status ReleaseContainer(absl::string_view container) = 0;
  virtual absl::Status TeardownContext(absl::string_view context) = 0;

  // --- Registration (spec §2, §3) -------------------------------------------------------------
  // `context` is the memory context the request comes from.
  virtual absl::Status Register(absl::string_view context, absl::string_view container, uint64_t ua,
                                uint64_t size) = 0;
  virtual absl::Status Unregister(absl::string_view context, absl::string_view container,
                                  uint64_t ua, uint64_t size) = 0;

  // --- DMA mappings (spec §7) -----------------------------------------------------------------
  virtual absl::Status Map(absl::string_view context, absl::string_view container, uint64_t iova,
                           uint64_t ua, uint64_t size) = 0;
  virtual absl::Status Unmap(absl::string_view context, absl::string_view container, uint64_t iova,
                             uint64_t size) = 0;

  // --- Lookup and translation (spec §6) -------------------------------------------------------
  // The host physical address of `ua`, or an errno status (EFAULT outside every region).
  virtual absl::StatusOr<uint64_t> Translate(absl::string_view context, uint64_t ua) = 0;
  // The region containing all of [ua, ua + size), or nullopt.
  virtual absl::StatusOr<std::optional<Range>> Lookup(absl::string_view context, uint64_t ua,
                                                      uint64_t size) = 0;

  // --- State, for checks ----------------------------------------------------------------------
  // The region with exactly this start and size, or nullopt when there is none.
  virtual absl::StatusOr<std::optional<RegionState>> FindRegion(absl::string_view context,
                                                                uint64_t ua, uint64_t size) = 0;
  virtual absl::StatusOr<ContextState> GetContextState(absl::string_view context) = 0;

  // The invariants of spec §10, checked after every step where the target can tell.
  virtual absl::Status CheckInvariants() { return absl::OkStatus(); }

  // Ends the case after its last step (the runner calls it once; the target is dropped after).
  // An error fails the case: e.g. a node agent that died or did not stop cleanly.
  virtual absl::Status Close() { return absl::OkStatus(); }
};

// Builds a fresh target for one case from its node settings (Case::steps are not used).
using TargetFactory =
    std::function<absl::StatusOr<std::unique_ptr<ConformanceTarget>>(const Case& node)>;

}  // namespace dmapin::agent::conformance

#endif  // DMAPIN_AGENT_CONFORMANCE_TARGET_H_
