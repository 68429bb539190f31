#include "server/fleet/fleet_state.h"

#include <algorithm>

namespace dmapin {

RegionKey KeyOf(const v1::Region& region) {
  return RegionKey{region.context(), region.ua(), region.size()};
}

uint64_t NodeReport::pinned_bytes() const {
  uint64_t bytes = 0;
  for (const auto& [key, region] : regions) bytes += region.size();
  return bytes;
}

uint64_t NodeReport::used_sum() const {
  uint64_t used = 0;
  for (const auto& [key, region] : regions) used += region.used();
  return used;
}

uint64_t NodeReport::installed_mappings() const {
  uint64_t mappings = 0;
  for (const auto& [key, region] : regions) {
    if (region.mapped() > 0) mappings += region.mapped() - 1;
  }
  return mappings;
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

void FleetState::ApplySnapshot(const std::string& name, const v1::Snapshot& snapshot,
                               absl::Time now) {
  NodeReport& node = nodes_[name];
  node.name = name;
  node.contexts.clear();
  node.containers.clear();
  node.regions.clear();
  for (const v1::Context& context : snapshot.contexts()) node.contexts[context.name()] = context;
  for (const v1::Container& container : snapshot.containers()) {
    node.containers[container.name()] = container;
  }
  for (const v1::Region& region : snapshot.regions()) node.regions[KeyOf(region)] = region;
  node.counters = snapshot.counters();
  node.version = snapshot.version();
  node.last_seen = now;
  node.synced = true;
  ++node.reports;
  ++node.confirmations;
}

void FleetState::ApplyDelta(const std::string& name, const v1::Delta& delta, absl::Time now) {
  NodeReport& node = nodes_[name];
  node.name = name;
  for (const v1::Region& region : delta.upserted_regions()) node.regions[KeyOf(region)] = region;
  for (const v1::RegionKey& key : delta.removed_regions()) {
    node.regions.erase(RegionKey{key.context(), key.ua(), key.size()});
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

}  // namespace dmapin
