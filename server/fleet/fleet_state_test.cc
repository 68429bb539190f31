#include "server/fleet/fleet_state.h"

#include "gtest/gtest.h"

namespace dmapin::server {
namespace {

v1::Region MakeRegion(const std::string& context, uint64_t ua, uint64_t size, uint64_t used,
                      uint64_t mapped, std::vector<std::string> holders) {
  v1::Region region;
  region.set_context(context);
  region.set_ua(ua);
  region.set_size(size);
  region.set_used(used);
  region.set_mapped(mapped);
  for (const std::string& holder : holders) region.add_containers(holder);
  return region;
}

TEST(FleetStateTest, SnapshotThenDeltasTrackRegionsAndCounters) {
  FleetState fleet;
  v1::Hello hello;
  hello.set_node_name("n1");
  (*hello.mutable_labels())["pool"] = "a";
  fleet.Connect(hello, absl::FromUnixSeconds(1));
  v1::Snapshot snapshot;
  *snapshot.add_regions() = MakeRegion("vm", 0x10000, 0x100000, 1, 3, {"c1"});
  *snapshot.add_regions() = MakeRegion("vm", 0x200000, 0x10000, 2, 1, {"c1", "c2"});
  snapshot.set_version(1);
  fleet.ApplySnapshot("n1", snapshot, absl::FromUnixSeconds(2));
  const NodeReport* node = fleet.Find("n1");
  ASSERT_NE(node, nullptr);
  EXPECT_TRUE(node->connected);
  EXPECT_EQ(node->pinned_bytes(), 0x110000u);
  EXPECT_EQ(node->used_sum(), 3u);
  EXPECT_EQ(node->installed_mappings(), 2u);
  EXPECT_TRUE(node->Holds({"vm", 0x200000, 0x10000}, "c2"));
  EXPECT_FALSE(node->Holds({"vm", 0x10000, 0x100000}, "c2"));

  v1::Delta delta;
  delta.set_version(2);
  *delta.add_upserted_regions() = MakeRegion("vm", 0x10000, 0x100000, 1, 1, {"c1"});
  v1::RegionKey* removed = delta.add_removed_regions();
  removed->set_context("vm");
  removed->set_ua(0x200000);
  removed->set_size(0x10000);
  fleet.ApplyDelta("n1", delta, absl::FromUnixSeconds(3));
  EXPECT_EQ(node->regions.size(), 1u);
  EXPECT_EQ(node->installed_mappings(), 0u);
  EXPECT_EQ(node->reports, 2u);
  fleet.Disconnect("n1", absl::FromUnixSeconds(4));
  EXPECT_FALSE(node->connected);
  EXPECT_EQ(fleet.connected(), 0u);
  // A new snapshot replaces everything.
  fleet.ApplySnapshot("n1", v1::Snapshot(), absl::FromUnixSeconds(5));
  EXPECT_TRUE(node->regions.empty());
}

// The sums are kept as regions change (ListNodes reads them for every node), and every change
// of the set of region keys is told, for the server's running totals of required bytes.
TEST(FleetStateTest, ReportsTellWhichRegionsCameAndWentAndKeepTheSums) {
  FleetState fleet;
  v1::Snapshot snapshot;
  *snapshot.add_regions() = MakeRegion("vm", 0x10000, 0x10000, 1, 1, {"c1"});
  *snapshot.add_regions() = MakeRegion("vm", 0x20000, 0x10000, 1, 5, {"c1"});
  RegionChanges changes = fleet.ApplySnapshot("n1", snapshot, absl::FromUnixSeconds(1));
  EXPECT_EQ(changes.added,
            (std::vector<RegionKey>{{"vm", 0x10000, 0x10000}, {"vm", 0x20000, 0x10000}}));
  EXPECT_TRUE(changes.removed.empty());
  const NodeReport* node = fleet.Find("n1");
  ASSERT_NE(node, nullptr);
  EXPECT_EQ(node->pinned_bytes(), 0x20000u);
  EXPECT_EQ(node->installed_mappings(), 4u);

  // An update of a reported region is no change of keys; a removal of an unknown key is nothing.
  v1::Delta delta;
  *delta.add_upserted_regions() = MakeRegion("vm", 0x20000, 0x10000, 2, 2, {"c1", "c2"});
  *delta.add_upserted_regions() = MakeRegion("db", 0, 0x40000, 1, 1, {"c3"});
  v1::RegionKey* gone = delta.add_removed_regions();
  gone->set_context("vm");
  gone->set_ua(0x10000);
  gone->set_size(0x10000);
  v1::RegionKey* unknown = delta.add_removed_regions();
  unknown->set_context("vm");
  unknown->set_ua(0x900000);
  unknown->set_size(0x10000);
  changes = fleet.ApplyDelta("n1", delta, absl::FromUnixSeconds(2));
  EXPECT_EQ(changes.added, (std::vector<RegionKey>{{"db", 0, 0x40000}}));
  EXPECT_EQ(changes.removed, (std::vector<RegionKey>{{"vm", 0x10000, 0x10000}}));
  EXPECT_EQ(node->pinned_bytes(), 0x50000u);
  EXPECT_EQ(node->used_sum(), 3u);
  EXPECT_EQ(node->installed_mappings(), 1u);

  // A snapshot: the keys it lacks went, the new ones came, the others are no change.
  v1::Snapshot next;
  *next.add_regions() = MakeRegion("db", 0, 0x40000, 1, 3, {"c3"});
  *next.add_regions() = MakeRegion("vm", 0x30000, 0x10000, 1, 1, {"c1"});
  changes = fleet.ApplySnapshot("n1", next, absl::FromUnixSeconds(3));
  EXPECT_EQ(changes.added, (std::vector<RegionKey>{{"vm", 0x30000, 0x10000}}));
  EXPECT_EQ(changes.removed, (std::vector<RegionKey>{{"vm", 0x20000, 0x10000}}));
  EXPECT_EQ(node->pinned_bytes(), 0x50000u);
  EXPECT_EQ(node->used_sum(), 2u);
  EXPECT_EQ(node->installed_mappings(), 2u);
}

TEST(FleetStateTest, ReconnectKeepsTheOldReportUnsyncedUntilTheSnapshot) {
  FleetState fleet;
  v1::Hello hello;
  hello.set_node_name("n1");
  EXPECT_FALSE(fleet.Connect(hello, absl::FromUnixSeconds(1)).synced);
  v1::Snapshot snapshot;
  *snapshot.add_regions() = MakeRegion("vm", 0x10000, 0x10000, 1, 1, {"c1"});
  fleet.ApplySnapshot("n1", snapshot, absl::FromUnixSeconds(2));
  const NodeReport* node = fleet.Find("n1");
  ASSERT_NE(node, nullptr);
  EXPECT_TRUE(node->synced);
  fleet.Disconnect("n1", absl::FromUnixSeconds(3));
  fleet.Connect(hello, absl::FromUnixSeconds(4));
  EXPECT_TRUE(node->connected);
  EXPECT_FALSE(node->synced);
  EXPECT_EQ(node->regions.size(), 1u) << "kept for display until the snapshot";
  fleet.ApplySnapshot("n1", v1::Snapshot(), absl::FromUnixSeconds(5));
  EXPECT_TRUE(node->synced);
  EXPECT_TRUE(node->regions.empty());
}

}  // namespace
}  // namespace dmapin::server
