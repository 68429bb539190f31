#include "server/fleet/fleet_state.h"

#include <algorithm>

namespace dmapin::server {

RegionKey KeyOf(const v1::Region& region) {
  return RegionKey{region.context(), region.ua(), region.size()};
}

void NodeReport::Count(const v1::Region& region, int sign) {
  // Unsigned arithmetic wraps: adding then subtracting the same figures is exact.
  const uint64_t s = static_cast<uint64_t>(sign);
  pinned_bytes_ += s * region.size();
  used_sum_ += s * region.used();
  installed_mappings_ += s * (region.mapped() > 0 ? region.mapped() - 1 : 0);
}

bool NodeReport::Holds(const RegionKey& key, const std::string& container) const {
  auto it = regions.find(key);
  if (it == regions.end()) return false;
  const auto& holders = it->second.containers();
  return std::find(holders.begin(), holders.end(), container) != holders.end();
}

NodeReport& FleetState::Connect(const v1::Hello& hello, absl::Time now) {
  NodeReport& node = nodes_[hello.node_name()];
  node.name = hello.node_name();
  node.hello = hello;
  node.connected = true;
  node.synced = false;
  node.connected_since = now;
  node.last_seen = now;
  return node;
}

void FleetState::Disconnect(const std::string& name, absl::Time now) {
  auto it = nodes_.find(name);
  if (it == nodes_.end()) return;
  it->second.connected = false;
  it->second.last_seen = now;
}

RegionChanges FleetState::ApplySnapshot(const std::string& name, const v1::Snapshot& snapshot,
                                        absl::Time now) {
  NodeReport& node = nodes_[name];
  node.name = name;
  node.contexts.clear();
  node.containers.clear();
  for (const v1::Context& context : snapshot.contexts()) node.contexts[context.name()] = context;
  for (const v1::Container& container : snapshot.containers()) {
    node.containers[container.name()] = container;
  }
  std::map<RegionKey, v1::Region> regions;
  for (const v1::Region& region : snapshot.regions()) regions[KeyOf(region)] = region;
  // Both maps are in key order: one merge finds what appeared and what went.
  RegionChanges changes;
  auto before = node.regions.begin();
  auto after = regions.begin();
  while (before != node.regions.end() || after != regions.end()) {
    if (after == regions.end() || (before != node.regions.end() && before->first < after->first)) {
      changes.removed.push_back(before->first);
      ++before;
    } else if (before == node.regions.end() || after->first < before->first) {
      changes.added.push_back(after->first);
      ++after;
    } else {
      ++before;
      ++after;
    }
  }
  node.regions.swap(regions);
  node.pinned_bytes_ = node.used_sum_ = node.installed_mappings_ = 0;
  for (const auto& [key, region] : node.regions) node.Count(region, +1);
  node.counters = snapshot.counters();
  node.version = snapshot.version();
  node.last_seen = now;
  node.synced = true;
  ++node.reports;
  ++node.confirmations;
  return changes;
}

RegionChanges FleetState::ApplyDelta(const std::string& name, const v1::Delta& delta,
                                     absl::Time now) {
  NodeReport& node = nodes_[name];
  node.name = name;
  RegionChanges changes;
  for (const v1::Region& region : delta.upserted_regions()) {
    auto [it, added] = node.regions.try_emplace(KeyOf(region));
    if (added) {
      changes.added.push_back(it->first);
    } else {
      node.Count(it->second, -1);
    }
    it->second = region;
    node.Count(region, +1);
  }
  for (const v1::RegionKey& key : delta.removed_regions()) {
    auto it = node.regions.find(RegionKey{key.context(), key.ua(), key.size()});
    if (it == node.regions.end()) continue;
    node.Count(it->second, -1);
    changes.removed.push_back(it->first);
    node.regions.erase(it);
  }
  for (const v1::Context& context : delta.upserted_contexts()) {
    node.contexts[context.name()] = context;
  }
  for (const std::string& context : delta.removed_contexts()) node.contexts.erase(context);
  for (const v1::Container& container : delta.upserted_containers()) {
    node.containers[container.name()] = container;
  }
  for (const std::string& container : delta.removed_containers()) {
    node.containers.erase(container);
  }
  if (delta.has_counters()) node.counters = delta.counters();
  node.version = delta.version();
  node.last_seen = now;
  ++node.reports;
  ++node.confirmations;
  return changes;
}

void FleetState::Confirm(const std::string& name, absl::Time now) {
  auto it = nodes_.find(name);
  if (it == nodes_.end()) return;
  it->second.last_seen = now;
  ++it->second.confirmations;
}

void FleetState::Touch(const std::string& name, absl::Time now) {
  auto it = nodes_.find(name);
  if (it != nodes_.end()) it->second.last_seen = now;
}

const NodeReport* FleetState::Find(const std::string& name) const {
  auto it = nodes_.find(name);
  return it == nodes_.end() ? nullptr : &it->second;
}

size_t FleetState::connected() const {
  size_t count = 0;
  for (const auto& [name, node] : nodes_) count += node.connected ? 1 : 0;
  return count;
}

}  // namespace dmapin::server
