// FleetSim: many simulated node agents in one process, each with its own Control.Connect stream
// to a dmapin-server, for scale tests and the control plane's benchmark.
//
// Every agent speaks the real protocol (api/dmapin/v1/control.proto) as agent/control's
// ControlClient does: Hello (node name, labels, page size, backend, incarnation), a full Snapshot,
// then every report interval a Delta with what changed (or a Heartbeat), decisions applied at
// most once and answered with a DecisionResult (errno and name) followed by a Delta, and a fresh
// Snapshot when the server asks for one. The server cannot tell it from real agents.
//
// Streams use gRPC's callback client API (one ClientBidiReactor per stream, no thread per agent)
// over `channels` channels shared round-robin, each with its own TCP connection. One driver
// thread walks the agents in a fixed cyclic order so each one reports once per interval,
// spread evenly over it, and runs the simulated VMMs' map/unmap workload at that moment.
//
// The per-agent state is a compact simulated registry, NOT agent/registry: 10,000 real
// registries (page index, IOMMU tables, epochs) would cost far more memory and CPU than the
// server under test. It keeps exactly what the agent reports: contexts (locked bytes, regions,
// bound containers), containers (held regions, installed IOMMU entries), regions keyed by
// (context, ua, size) with exact `used` (holding containers) and `mapped` (1 + installed
// mappings, as the kernel's mm_iommu counter) and the registry counters of RegistryCounters.
// Semantics follow registry-semantics.md where the server can see them: REGISTER of a held region
// succeeds idempotently, into an unknown context or container fails with ENOENT; UNREGISTER by the
// last holder of a region with mappings answers EBUSY (and the simulated VMM then unmaps, so the
// retry succeeds); a configurable share of UNREGISTER decisions answers EBUSY once as well.
#ifndef DMAPIN_TESTS_FLEET_FLEETSIM_H_
#define DMAPIN_TESTS_FLEET_FLEETSIM_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "dmapin/v1/control.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dmapin {
namespace fleetsim {

struct FleetSimOptions {
  // gRPC target of the server, e.g. "127.0.0.1:7480".
  std::string server_address;
  int agents = 100;
  // Channels (each its own TCP connection) the agents' streams share round-robin.
  int channels = 16;
  // Node i is named name_prefix + i (zero-padded to 5 digits).
  std::string name_prefix = "sim-";
  std::map<std::string, std::string> labels;
  uint64_t page_size = 65536;
  // What every node holds at start: `contexts` contexts "vm0".. (memlock unlimited), each with
  // `containers_per_context` containers "vm<c>/c<k>", and regions_per_node regions of
  // region_size bytes spread over the contexts, each held by its context's first container.
  int contexts = 1;
  int containers_per_context = 1;
  int regions_per_node = 100;
  uint64_t region_size = 2 << 20;
  // The simulated VMMs' DMA map/unmap operations per agent per second (each changes one region's
  // `mapped` and the counters, so it shows in the next Delta).
  double maps_per_second = 0;
  // Share (0..1) of UNREGISTER decisions answered EBUSY on their first attempt.
  double ebusy_share = 0;
  // Report interval; zero: the server's Welcome.report_interval_ms (1 s when it sends none).
  std::chrono::milliseconds report_interval{0};
  // Reconnect delay after the server ends a stream (scaled by a jitter factor in [0.5, 1.5]).
  std::chrono::milliseconds reconnect_delay{200};
  uint64_t seed = 1;
  // Mutual TLS: the credentials of node `name`'s certificate (the server takes a node's stream
  // only with that node's certificate), and then one channel per agent instead of `channels`
  // shared ones. Empty: plaintext (a server run with --insecure).
  std::function<std::shared_ptr<grpc::ChannelCredentials>(const std::string& name)> credentials_for;
};

// Sums over the agents (or one agent's values).
struct FleetSimStats {
  uint64_t agents = 0;
  uint64_t connected = 0;  // streams up with Hello and Snapshot queued
  uint64_t welcomed = 0;   // of those, the ones the server welcomed
  uint64_t connects = 0;
  uint64_t disconnects = 0;  // streams that ended (either side)
  uint64_t decisions_received = 0;
  uint64_t decisions_applied = 0;  // first-time applications, refusals (errno != 0) included
  uint64_t decisions_refused = 0;
  uint64_t duplicates = 0;  // decision ids seen before: answered from the record
  uint64_t ebusy_answers = 0;
  uint64_t snapshots_sent = 0;
  uint64_t snapshot_requests = 0;
  uint64_t deltas_sent = 0;
  uint64_t heartbeats_sent = 0;
  uint64_t region_updates_sent = 0;  // regions upserted or removed in Deltas
  uint64_t messages_sent = 0;
  uint64_t messages_received = 0;
  // The registry as the agents hold it (and report it).
  uint64_t regions = 0;
  uint64_t pinned_bytes = 0;
  uint64_t used_sum = 0;
  uint64_t installed_mappings = 0;
  uint64_t contexts = 0;
  uint64_t containers = 0;
  v1::RegistryCounters counters;
};

class FleetSim {
 public:
  explicit FleetSim(FleetSimOptions options);
  ~FleetSim();  // Stop()s.
  FleetSim(const FleetSim&) = delete;
  FleetSim& operator=(const FleetSim&) = delete;

  const FleetSimOptions& options() const { return options_; }
  int size() const { return static_cast<int>(agents_.size()); }
  std::string NodeName(int index) const;

  // Connects every agent and starts the driver thread. Returns at once.
  void Start();
  // Ends every stream (half-close and cancel) and stops the driver; waits for the streams to end.
  void Stop();

  // Waits until `n` agents are welcomed; false on timeout.
  bool AwaitWelcomed(uint64_t n, absl::Duration timeout) const;
  // Waits until every queued message of every connected agent has been written to gRPC.
  bool AwaitFlushed(absl::Duration timeout) const;

  // Ends the streams of agents [first, first + count) from the agent's side and keeps them
  // down until Connect(). Waits until those streams are done.
  void Disconnect(int first, int count);
  // (Re)connects agents [first, first + count): same incarnation, i.e. a reconnect.
  void Connect(int first, int count);

  // The simulated VMMs' map/unmap rate per agent (0 stops the workload).
  void SetMapsPerSecond(double rate);
  // Every connected agent queues a Delta (or a Heartbeat when nothing changed) now.
  void ReportNow();

  // Flood: every connected agent sends Deltas back to back (the next as soon as gRPC took the
  // previous one), each changing `regions_per_delta` regions (a map or an unmap on each) and the
  // counters, until StopFlood(). Measures what the server absorbs.
  void StartFlood(int regions_per_delta);
  void StopFlood();

  FleetSimStats Stats() const;
  FleetSimStats AgentStats(int index) const;
  // How many times each decision id was applied for the first time, fleet-wide (an id applied
  // on two agents, or twice, shows a count above 1).
  std::map<std::string, int> DecisionApplications() const;
  // Whether `node`'s agent applied decision `id` (first time), and with which errno.
  bool Applied(int index, const std::string& id, int* errno_value = nullptr) const;

 private:
  class Agent;
  class Stream;

  void DriverLoop();
  // An agent's stream ended while it should be up: reconnect it after options_.reconnect_delay.
  void ScheduleReconnect(int index);

  const FleetSimOptions options_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<v1::Control::Stub>> stubs_;
  std::vector<std::unique_ptr<Agent>> agents_;

  std::atomic<bool> flood_{false};
  std::atomic<int> flood_regions_{0};
  std::atomic<double> maps_per_second_{0};
  // The report interval the driver paces the agents by (options, else the server's Welcome).
  std::atomic<uint64_t> interval_ms_{1000};

  mutable Mutex mu_;
  std::condition_variable_any cv_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::pair<std::chrono::steady_clock::time_point, int>> reconnects_
      ABSL_GUARDED_BY(mu_);
  std::mt19937_64 reconnect_rng_ ABSL_GUARDED_BY(mu_){7};
  std::thread driver_;
};

}  // namespace fleetsim
}  // namespace dmapin

#endif  // DMAPIN_TESTS_FLEET_FLEETSIM_H_
