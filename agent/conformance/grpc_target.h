// A conformance target that runs each case against a freshly started dmapin-agent over gRPC.
//
// Per case: a scratch directory, an agent started with --backend=sim and the case's node
// settings (--sim_page_size, --sim_holes, --sim_readonly, --sim_huge), a fresh --state_dir, no
// TCP, no metrics server and a Unix socket in the scratch directory; the target waits for
// grpc.health.v1 SERVING,
// then turns every step into the matching dmapin.v1.NodeAgent RPC. Close() stops the agent with
// SIGTERM (SIGKILL after a grace period), requires a clean exit and removes the directory.
//
// Names follow the rules of target.h like the in-process target does: a case's context and
// container names map to agent names (the case name itself where the agent accepts it, with a
// ".2", ".3", ... suffix for later generations of the same name); contexts are created on first
// use with the case's memlock limit (memlock_unlimited when it has none) and CAP_IPC_LOCK;
// containers on first use with the case's page size and the window [0, 2^40). After
// ReleaseContainer or TeardownContext the target asks the agent (ListContainers) which
// containers are gone and frees their names. For `check` steps on a torn-down context it reports
// what the agent still lists of it (nothing, when teardown works).
//
// Errors: the errno comes from the "dmapin-errno" trailer. A failed call whose trailer is missing
// or unknown, whose message does not start with "<ERRNO>:", or whose gRPC code is not the one
// spec §9 assigns to that errno is a protocol violation: CheckInvariants() reports it, so the
// step fails whatever the case expected.
//
// CheckInvariants() also checks that the agent is still running and the invariants of spec §10
// that the API shows (ListContexts, ListContainers, ListRegions): no overlap in a context,
// used >= 1 and mapped >= 1, used = holders (+1 while pending release), locked bytes and region
// counts per context, installed entries = sum of (mapped - 1), and no region of an unknown
// context. The in-process target's pin count (§10.4) is not visible over the wire.
//
// Limits of the wire: CreateContainerRequest reads 0 as "default", so a case that creates a
// container with an explicit iommu_page_size or window_size of 0 gets the default here.
#ifndef DMAPIN_AGENT_CONFORMANCE_GRPC_TARGET_H_
#define DMAPIN_AGENT_CONFORMANCE_GRPC_TARGET_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "agent/conformance/case_file.h"
#include "agent/conformance/target.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "testing/agent_process.h"

namespace dmapin::agent::conformance {

// The trailing-metadata key that names the errno of a failed call (agent.proto).
inline constexpr char kErrnoTrailerKey[] = "dmapin-errno";

// A failed call's answer as the conformance runner sees it, and what is wrong with it on the wire.
struct WireAnswer {
  // OK, or the call's code and message with the trailer's errno attached (ErrnoOf() finds it);
  // without a usable trailer, the bare code and message (ErrnoOf() then says EIO).
  absl::Status status;
  // Protocol violations: a missing or unknown trailer, a message that does not start with
  // "<ERRNO>:", a gRPC code other than spec §9's for that errno. Empty when the answer is clean.
  std::vector<std::string> violations;
  // No trailer at all: the call probably never reached the service (broken connection, ...).
  bool no_trailer = false;
};
WireAnswer DecodeWireAnswer(absl::string_view rpc, const grpc::Status& status,
                            const std::multimap<grpc::string_ref, grpc::string_ref>& trailers);

struct GrpcTargetOptions {
  // The dmapin-agent executable.
  std::string agent_binary;
  // How long an agent may take to serve after its start.
  absl::Duration start_timeout = absl::Seconds(30);
  // Deadline of every RPC.
  absl::Duration rpc_timeout = absl::Seconds(10);
  // How long Close() waits after SIGTERM before SIGKILL.
  absl::Duration stop_grace = absl::Seconds(5);
};

class GrpcTarget final : public ConformanceTarget {
 public:
  // The DMA window of containers created on first use: [0, 2^40).
  static constexpr uint64_t kDefaultWindowSize = uint64_t{1} << 40;

  // Starts an agent for the case's node settings (its steps are not used) and waits until it
  // serves. Bad settings make the agent refuse to start: an error quoting its log.
  static absl::StatusOr<std::unique_ptr<GrpcTarget>> Create(const Case& node,
                                                            const GrpcTargetOptions& options);

  // The agent's command line for a case (after argv[0]), given its scratch directory.
  static std::vector<std::string> AgentArgs(const Case& node, absl::string_view dir);

  GrpcTarget(const GrpcTarget&) = delete;
  GrpcTarget& operator=(const GrpcTarget&) = delete;
  // Close()s the target if the runner did not.
  ~GrpcTarget() override;

  std::string name() const override { return "grpc"; }

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
  absl::Status CheckInvariants() override;
  absl::Status Close() override;

  // The agent serving this case (nullptr after Close()).
  harness::AgentProcess* agent() { return agent_.get(); }

 private:
  struct ContextSlot {
    std::string agent_name;
    bool torn_down = false;
    // The context's regions just before its teardown, to recognise what the agent left behind.
    std::vector<Range> regions_at_teardown;
  };

  GrpcTarget(const Case& node, const GrpcTargetOptions& options,
             std::unique_ptr<harness::ScratchDir> dir,
             std::unique_ptr<harness::AgentProcess> agent);

  // One unary RPC with the deadline; the answer as an errno status (see the file comment).
  template <typename Request, typename Response>
  absl::Status Call(absl::string_view rpc,
                    grpc::Status (v1::NodeAgent::Stub::*method)(grpc::ClientContext*,
                                                                const Request&, Response*),
                    const Request& request, Response* response);
  absl::Status ToErrnoStatus(absl::string_view rpc, const grpc::Status& status,
                             const grpc::ClientContext& context);

  // The context named `name`, created on first use. A torn-down context is replaced by a fresh
  // one unless `for_check`.
  absl::StatusOr<ContextSlot> ContextFor(absl::string_view name, bool for_check = false);
  // The agent's name of the container named `name`, created with the defaults on first use.
  absl::StatusOr<std::string> ContainerFor(absl::string_view name);
  // Drops the names of containers the agent no longer lists.
  absl::Status ForgetReleasedContainers();
  // What the agent still lists of a torn-down context.
  absl::StatusOr<std::vector<v1::Region>> Leftovers(const ContextSlot& slot);
  absl::StatusOr<std::vector<v1::Region>> ListRegions(const std::string& agent_context);
  // Spec §10 as far as the API shows it.
  absl::Status CheckListedState();

  const uint64_t page_size_;
  const std::optional<uint64_t> memlock_limit_;
  const bool cap_ipc_lock_;
  const GrpcTargetOptions options_;
  std::unique_ptr<harness::ScratchDir> dir_;
  std::unique_ptr<harness::AgentProcess> agent_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::NodeAgent::Stub> stub_;

  absl::flat_hash_map<std::string, ContextSlot> contexts_;
  absl::flat_hash_map<std::string, std::string> containers_;
  absl::flat_hash_set<std::string> used_context_names_;
  absl::flat_hash_set<std::string> used_container_names_;
  // Protocol violations since the last CheckInvariants().
  std::vector<std::string> violations_;
  // A call failed without reaching the service (no errno trailer): the agent may be dying.
  bool transport_failed_ = false;
  bool agent_death_reported_ = false;
  bool closed_ = false;
  absl::Status close_status_;
};

// A factory of GrpcTargets, for the runner.
TargetFactory GrpcTargetFactory(GrpcTargetOptions options);

}  // namespace dmapin::agent::conformance

#endif  // DMAPIN_AGENT_CONFORMANCE_GRPC_TARGET_H_
