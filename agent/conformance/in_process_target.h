// A conformance target over an in-process dmapin::Registry on a dmapin::SimBackend.
//
// Names map to fresh numeric ids (1, 2, ...) on first use; a released container's name is free
// again and its next use creates a new container with a new id. The registry decides everything
// else: the target only translates names and reads state back through Registry::Find, Lookup,
// GetContext and ListRegions.
//
// Contexts: created on first use with the case's memlock limit and CAP_IPC_LOCK. After
// TeardownContext a context's name keeps pointing at the torn-down context for `check` steps (so
// a case can verify that nothing is left); any other use of the name creates a fresh context.
// Containers the registry released along with the context lose their names too.
//
// The registry identifies the context of Unregister, Map and Unmap by the container's binding,
// so those ignore the step's context.
#ifndef DMAPIN_AGENT_CONFORMANCE_IN_PROCESS_TARGET_H_
#define DMAPIN_AGENT_CONFORMANCE_IN_PROCESS_TARGET_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "agent/conformance/case_file.h"
#include "agent/conformance/target.h"
#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"

namespace dmapin::agent::conformance {

class InProcessTarget final : public ConformanceTarget {
 public:
  // The DMA window of containers created on first use: [0, 2^40).
  static constexpr uint64_t kDefaultWindowSize = uint64_t{1} << 40;

  // A simulated node with the case's settings (its steps are not used). Bad settings (a
  // misaligned hole, ...) are an error.
  static absl::StatusOr<std::unique_ptr<InProcessTarget>> Create(const Case& node);

  InProcessTarget(const InProcessTarget&) = delete;
  InProcessTarget& operator=(const InProcessTarget&) = delete;
  ~InProcessTarget() override;

  std::string name() const override { return "in-process"; }

  absl::Status CreateContainer(absl::string_view container,
                               const ContainerSettings& settings) override;
  absl::Status ReleaseContainer(absl::string_view container) override;
  absl::Status TeardownContext(absl::string_view context) override;
  absl::Status Register(absl::string_view context, absl::string_view container, uint64_t ua,
                        uint64_t size) override;
  absl::Status Unregister(absl::string_view context, absl::string_view container, uint64_t ua,
                          uint64_t size) override;
  absl::Status Map(absl::string_view context, absl::string_view container, uint64_t iova,
                   uint64_t ua, uint64_t size) override;
  absl::Status Unmap(absl::string_view context, absl::string_view container, uint64_t iova,
                     uint64_t size) override;
  absl::StatusOr<uint64_t> Translate(absl::string_view context, uint64_t ua) override;
  absl::StatusOr<std::optional<Range>> Lookup(absl::string_view context, uint64_t ua,
                                              uint64_t size) override;
  absl::StatusOr<std::optional<RegionState>> FindRegion(absl::string_view context, uint64_t ua,
                                                        uint64_t size) override;
  absl::StatusOr<ContextState> GetContextState(absl::string_view context) override;

  // Registry::CheckInvariants(), and that the backend holds exactly one pin per page of every
  // listed region (nothing leaked after a release).
  absl::Status CheckInvariants() override;

  Registry& registry() { return *registry_; }
  SimBackend& backend() { return *backend_; }

 private:
  struct ContextSlot {
    ContextId id = 0;
    bool torn_down = false;
  };

  InProcessTarget(const Case& node, std::unique_ptr<SimBackend> backend);

  // The context named `name`, created on first use. A torn-down context is replaced by a fresh
  // one unless `for_check`.
  absl::StatusOr<ContextSlot> ContextFor(absl::string_view name, bool for_check = false);
  // The container named `name`, created with the defaults on first use.
  absl::StatusOr<ContainerId> ContainerFor(absl::string_view name);
  // Drops the names of containers the registry no longer knows.
  void ForgetReleasedContainers();

  const uint64_t page_size_;
  const ContextOptions context_options_;
  // Declared before registry_: the registry must go first.
  std::unique_ptr<SimBackend> backend_;
  std::unique_ptr<Registry> registry_;

  absl::flat_hash_map<std::string, ContextSlot> contexts_;
  absl::flat_hash_map<std::string, ContainerId> containers_;
  ContextId next_context_id_ = 1;
  ContainerId next_container_id_ = 1;
};

// A factory of InProcessTargets, for the runner.
TargetFactory InProcessTargetFactory();

}  // namespace dmapin::agent::conformance

#endif  // DMAPIN_AGENT_CONFORMANCE_IN_PROCESS_TARGET_H_
