// FleetState: what the agents report, per node — their hello, connection, contexts, containers,
// regions with counters — fed by the control streams (snapshots and deltas) and read by the
// reconciler, the admin API and the metrics. Not thread-safe: ServerCore owns it under its lock.
#ifndef DMAPIN_SERVER_FLEET_FLEET_STATE_H_
#define DMAPIN_SERVER_FLEET_FLEET_STATE_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/region_key.h"
#include "dmapin/v1/control.pb.h"

namespace dmapin::server {

struct NodeReport {
  std::string name;
  v1::Hello hello;
  bool connected = false;
  absl::Time last_seen;
  absl::Time connected_since;
  // Counts every snapshot or delta applied: lets the reconciler know a report is newer than a
  // decision result.
  uint64_t reports = 0;
  // Counts every snapshot, delta and heartbeat: each confirms the reported state as of its
  // arrival (a heartbeat says nothing changed). A report older than an intent says nothing about
  // what the agent holds now.
  uint64_t confirmations = 0;
  // A snapshot arrived on the current connection. Until then the report is the one from before
  // a reconnect, possibly stale: nothing should be decided from it.
  bool synced = false;
  uint64_t version = 0;
  std::map<std::string, v1::Context> contexts;
  std::map<std::string, v1::Container> containers;
  // Changed only by FleetState, which keeps the sums below with it.
  std::map<RegionKey, v1::Region> regions;
  v1::RegistryCounters counters;

  // Sums over the reported regions, kept as they change: reading them costs nothing however
  // many regions the node reports (ListNodes reads them for every node).
  uint64_t pinned_bytes() const { return pinned_bytes_; }
  uint64_t used_sum() const { return used_sum_; }
  uint64_t installed_mappings() const { return installed_mappings_; }
  // Does `container` hold the region?
  bool Holds(const RegionKey& key, const std::string& container) const;

 private:
  friend class FleetState;
  void Count(const v1::Region& region, int sign);
  uint64_t pinned_bytes_ = 0;
  uint64_t used_sum_ = 0;
  uint64_t installed_mappings_ = 0;
};

// The region keys a report added to or removed from a node (an update of a region already
// reported is neither), for totals kept elsewhere (ServerCore's required bytes).
struct RegionChanges {
  std::vector<RegionKey> added;
  std::vector<RegionKey> removed;
};

class FleetState {
 public:
  // A stream said hello: the node is connected (its previous report is kept, not synced, until
  // the snapshot replaces it).
  NodeReport& Connect(const v1::Hello& hello, absl::Time now);
  void Disconnect(const std::string& node, absl::Time now);
  // Replaces everything the node reported.
  RegionChanges ApplySnapshot(const std::string& node, const v1::Snapshot& snapshot,
                              absl::Time now);
  RegionChanges ApplyDelta(const std::string& node, const v1::Delta& delta, absl::Time now);
  void Touch(const std::string& node, absl::Time now);
  // A heartbeat: the state is still the one last reported.
  void Confirm(const std::string& node, absl::Time now);

  const NodeReport* Find(const std::string& node) const;
  const std::map<std::string, NodeReport>& nodes() const { return nodes_; }
  size_t connected() const;

 private:
  std::map<std::string, NodeReport> nodes_;
};

RegionKey KeyOf(const v1::Region& region);

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_FLEET_FLEET_STATE_H_
