// Differential test: random operation sequences run against the in-process target and against a
// live agent over gRPC must give the same errno for every operation and the same state (regions,
// counters, lookups, translation offsets), and both targets' invariant checks must hold
// throughout. Seeds are fixed, so a failure is reproducible; the failing seed and step are named.
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "agent/conformance/case_file.h"
#include "agent/conformance/grpc_target.h"
#include "agent/conformance/in_process_target.h"
#include "agent/conformance/test_support.h"
#include "common/errno_status.h"
#include "gtest/gtest.h"

namespace dmapin::agent::conformance {
namespace {

constexpr uint64_t kPage = 65536;
constexpr int kSeeds = 10;
constexpr int kStepsPerSeed = 250;

std::string Show(const absl::Status& status) {
  return status.ok() ? "OK" : std::string(status.message());
}

std::string Show(const absl::StatusOr<std::optional<RegionState>>& region) {
  if (!region.ok()) return Show(region.status());
  if (!region->has_value()) return "absent";
  return absl::StrFormat("used=%d mapped=%d pending=%d", (*region)->used, (*region)->mapped,
                         (*region)->pending_release);
}

std::string Show(const absl::StatusOr<ContextState>& state) {
  if (!state.ok()) return Show(state.status());
  return absl::StrFormat("locked=%d regions=%d", state->locked_bytes, state->regions);
}

std::string Show(const absl::StatusOr<std::optional<Range>>& range) {
  if (!range.ok()) return Show(range.status());
  if (!range->has_value()) return "null";
  return absl::StrFormat("0x%x+0x%x", (*range)->ua, (*range)->size);
}

class Driver {
 public:
  explicit Driver(uint32_t seed) : random_(seed) {}

  uint64_t Pick(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(random_); }

  std::string Context() { return Pick(6) == 0 ? "vm-b" : "vm-a"; }
  std::string Container() { return absl::StrCat("c", Pick(3)); }
  // A few slots of 64 KiB pages, so that ranges collide often; sometimes misaligned or huge.
  uint64_t Ua() {
    const uint64_t ua = 0x10000000 + Pick(24) * kPage;
    return Pick(20) == 0 ? ua + 0x1000 : ua;
  }
  uint64_t Size() {
    if (Pick(25) == 0) return 0;
    if (Pick(25) == 0) return kPage / 2;
    return (1 + Pick(6)) * kPage;
  }
  uint64_t Iova() { return Pick(30) == 0 ? (uint64_t{1} << 40) : Pick(16) * kPage; }

  // A range to act on: mostly one that was registered (whole, or a part of it for map), so that
  // sequences reach EBUSY, remaps, pending releases and shared regions, not only errors.
  Range PickRange(bool part) {
    if (registered_.empty() || Pick(10) < 3) return Range{Ua(), Size()};
    const Range& range = registered_[Pick(registered_.size())];
    if (!part) return range;
    const uint64_t pages = range.size / kPage;
    const uint64_t first = Pick(pages);
    return Range{range.ua + first * kPage, (1 + Pick(pages - first)) * kPage};
  }
  void Registered(const Range& range) { registered_.push_back(range); }

 private:
  std::mt19937 random_;
  std::vector<Range> registered_;
};

TEST(GrpcDifferentialTest, RandomSequencesAgreeWithInProcess) {
  GrpcTargetOptions options;
  options.agent_binary = AgentBinary();
  for (uint32_t seed = 1; seed <= kSeeds; ++seed) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    Case node;
    node.name = absl::StrCat("differential-", seed);
    if (seed % 2 == 0) node.memlock_limit = 12 * kPage;
    if (seed % 3 == 0) node.holes = {Range{0x10000000 + 20 * kPage, kPage}};
    absl::StatusOr<std::unique_ptr<InProcessTarget>> local = InProcessTarget::Create(node);
    ASSERT_TRUE(local.ok()) << local.status();
    absl::StatusOr<std::unique_ptr<GrpcTarget>> remote = GrpcTarget::Create(node, options);
    ASSERT_TRUE(remote.ok()) << remote.status();
    ConformanceTarget* targets[2] = {local->get(), remote->get()};
    Driver driver(seed);
    for (int step = 0; step < kStepsPerSeed; ++step) {
      const std::string context = driver.Context();
      const std::string container = driver.Container();
      const uint64_t op = driver.Pick(100);
      const Range range = driver.PickRange(/*part=*/op >= 45 && op < 65);
      const uint64_t ua = range.ua;
      const uint64_t size = range.size;
      const uint64_t iova = driver.Iova();
      std::string what;
      std::string answers[2];
      for (int t = 0; t < 2; ++t) {
        ConformanceTarget& target = *targets[t];
        if (op < 30) {
          what = absl::StrFormat("register %s %s 0x%x+0x%x", context, container, ua, size);
          answers[t] = ExpectName(ErrnoOf(target.Register(context, container, ua, size)));
        } else if (op < 45) {
          what = absl::StrFormat("unregister %s 0x%x+0x%x", container, ua, size);
          answers[t] = ExpectName(ErrnoOf(target.Unregister(context, container, ua, size)));
        } else if (op < 65) {
          what = absl::StrFormat("map %s iova 0x%x 0x%x+0x%x", container, iova, ua, size);
          answers[t] = ExpectName(ErrnoOf(target.Map(context, container, iova, ua, size)));
        } else if (op < 75) {
          what = absl::StrFormat("unmap %s iova 0x%x+0x%x", container, iova, size);
          answers[t] = ExpectName(ErrnoOf(target.Unmap(context, container, iova, size)));
        } else if (op < 79) {
          what = absl::StrCat("release ", container);
          answers[t] = ExpectName(ErrnoOf(target.ReleaseContainer(container)));
        } else if (op < 81) {
          what = absl::StrCat("teardown ", context);
          answers[t] = ExpectName(ErrnoOf(target.TeardownContext(context)));
        } else if (op < 86) {
          what = absl::StrFormat("translate %s 0x%x", context, ua + 0x123);
          absl::StatusOr<uint64_t> hpa = target.Translate(context, ua + 0x123);
          // Physical addresses depend on ids; the offset inside the page does not.
          answers[t] = hpa.ok() ? absl::StrFormat("offset 0x%x", *hpa % kPage)
                                : ExpectName(ErrnoOf(hpa.status()));
        } else if (op < 91) {
          what = absl::StrFormat("lookup %s 0x%x+0x%x", context, ua, size);
          absl::StatusOr<std::optional<Range>> found = target.Lookup(context, ua, size);
          answers[t] = found.ok() ? Show(found) : ExpectName(ErrnoOf(found.status()));
        } else if (op < 96) {
          what = absl::StrFormat("find %s 0x%x+0x%x", context, ua, size);
          answers[t] = Show(target.FindRegion(context, ua, size));
        } else {
          what = absl::StrCat("context state ", context);
          answers[t] = Show(target.GetContextState(context));
        }
        const absl::Status invariants = target.CheckInvariants();
        ASSERT_TRUE(invariants.ok())
            << target.name() << " step " << step << " (" << what << "): " << invariants;
      }
      if (op < 30 && answers[0] == "OK") driver.Registered(range);
      ASSERT_EQ(answers[0], answers[1])
          << "step " << step << " (" << what << "): in-process vs grpc";
    }
    // The final state of every region and context agrees too.
    for (const char* context : {"vm-a", "vm-b"}) {
      EXPECT_EQ(Show(targets[0]->GetContextState(context)),
                Show(targets[1]->GetContextState(context)))
          << context;
      for (uint64_t slot = 0; slot < 24; ++slot) {
        for (uint64_t pages = 1; pages <= 6; ++pages) {
          const uint64_t ua = 0x10000000 + slot * kPage;
          EXPECT_EQ(Show(targets[0]->FindRegion(context, ua, pages * kPage)),
                    Show(targets[1]->FindRegion(context, ua, pages * kPage)))
              << context << absl::StrFormat(" 0x%x+0x%x", ua, pages * kPage);
        }
      }
    }
    EXPECT_TRUE((*remote)->Close().ok());
  }
}

}  // namespace
}  // namespace dmapin::agent::conformance

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  dmapin::agent::conformance::SetAgentBinaryFromArgs(&argc, argv);
  return RUN_ALL_TESTS();
}
