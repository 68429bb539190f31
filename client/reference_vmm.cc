// dmapin-reference-vmm: a small VMM on the client library (client/vmm_client.h), as a hypervisor
// would use it. It keeps guest RAM in a shared memfd, creates its own context and a container,
// attaches its RAM through the memory socket, registers it, then runs a DMA workload (map and
// unmap of random page-aligned chunks at IOVAs over one DmaSession) until --duration_seconds
// pass or SIGTERM/SIGINT, and prints one summary line on stdout:
//
//   dmapin-reference-vmm: summary context=vmm-42 backend=memlock simulated=false maps=N
//   unmaps=N errors=0 seconds=2.00 calls_per_second=N
//
// Against a sim agent (GetNodeStatus backend "sim", or --simulated) its addresses are simulated:
// nothing is allocated or attached, the RAM "lives" at 0x10000000. Exit status: 0 on success, 1
// when a call failed (the error on stderr), 2 for bad flags.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/vmm_client.h"
#include "common/errno_status.h"
#include "common/flags.h"

ABSL_FLAG(std::string, uds_path, "/run/dmapin/agent.sock", "The agent's Unix socket.");
ABSL_FLAG(std::string, memory_socket_path, "",
          "The agent's memory socket (default: <uds_path>.memory, as the agent's).");
ABSL_FLAG(std::string, name, "", "Context name (default: vmm-<pid>); the container is <name>/dma.");
ABSL_FLAG(uint64_t, guest_ram_bytes, uint64_t{64} << 20,
          "Guest RAM in bytes (rounded up to the node's page size).");
ABSL_FLAG(bool, hugetlb, false, "Guest RAM from huge pages (memfd MFD_HUGETLB).");
ABSL_FLAG(bool, simulated, false,
          "Simulated addresses, nothing attached (the sim backend; chosen by itself when the "
          "agent's backend is sim).");
ABSL_FLAG(double, duration_seconds, 10, "How long the workload runs; 0: until SIGTERM/SIGINT.");
ABSL_FLAG(uint64_t, map_bytes, 64 << 10,
          "Bytes per DMA mapping (rounded up to the node's page size).");
ABSL_FLAG(uint64_t, iova_base, 0, "First IOVA of the workload (IOMMU-page aligned).");
ABSL_FLAG(std::vector<std::string>, vfio_groups, {},
          "VFIO backends: the IOMMU groups of the container, comma-separated (/dev/vfio/26).");
ABSL_FLAG(bool, teardown_on_exit, true,
          "Unmap, unregister, release the container and tear the context down before exiting; "
          "false leaves the cleanup to the agent's watch of this process's exit.");
ABSL_FLAG(uint64_t, seed, 0, "Workload random seed (0: from the clock).");

namespace dmapin::client {
namespace {

constexpr char kTag[] = "dmapin-reference-vmm";
// Where simulated guest RAM lives (sim backend: any address is "memory").
constexpr uint64_t kSimulatedUa = 0x10000000;
// A workload that keeps failing stops: the errors are the news, not their count.
constexpr uint64_t kMaxErrors = 100;

std::atomic<bool> stop_requested{false};
static_assert(std::atomic<bool>::is_always_lock_free, "used from a signal handler");

void OnSignal(int) { stop_requested.store(true, std::memory_order_relaxed); }

uint64_t RoundUp(uint64_t value, uint64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

void Info(const std::string& line) { std::fprintf(stderr, "%s: %s\n", kTag, line.c_str()); }

int Fail(absl::string_view what, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s: %s\n", kTag, std::string(what).c_str(), status.ToString().c_str());
  return 1;
}

// A session's failure that will not get better by trying again.
bool Fatal(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable ||
         status.code() == absl::StatusCode::kCancelled ||
         status.code() == absl::StatusCode::kPermissionDenied;
}

struct Workload {
  uint64_t maps = 0;
  uint64_t unmaps = 0;
  uint64_t errors = 0;
  absl::Status first_error;
};

int Run() {
  const pid_t pid = getpid();
  const std::string name =
      absl::GetFlag(FLAGS_name).empty() ? absl::StrCat("vmm-", pid) : absl::GetFlag(FLAGS_name);
  const std::string container = name + "/dma";

  absl::StatusOr<std::unique_ptr<VmmClient>> connected =
      VmmClient::Connect({.uds_path = absl::GetFlag(FLAGS_uds_path),
                          .memory_socket_path = absl::GetFlag(FLAGS_memory_socket_path)});
  if (!connected.ok()) return Fail("connect", connected.status());
  VmmClient& client = **connected;
  absl::StatusOr<v1::NodeStatus> node = client.GetNodeStatus();
  if (!node.ok()) return Fail("GetNodeStatus", node.status());
  const uint64_t page = node->page_size();
  if (page == 0 || (page & (page - 1)) != 0) {
    return Fail("GetNodeStatus", absl::InternalError(absl::StrCat("page size ", page)));
  }
  bool simulated = absl::GetFlag(FLAGS_simulated);
  if (node->backend() == "sim") {
    if (!simulated) Info("the agent's backend is sim: simulated guest addresses, nothing attached");
    simulated = true;
  } else if (simulated) {
    std::fprintf(stderr,
                 "%s: --simulated, but the agent's backend is %s: it pins real memory, which this "
                 "VMM must attach (drop --simulated)\n",
                 kTag, node->backend().c_str());
    return 2;
  }

  const uint64_t ram_bytes = RoundUp(std::max<uint64_t>(absl::GetFlag(FLAGS_guest_ram_bytes), 1),
                                     std::max<uint64_t>(page, sysconf(_SC_PAGESIZE)));
  const uint64_t map_bytes = RoundUp(std::max<uint64_t>(absl::GetFlag(FLAGS_map_bytes), 1), page);
  if (map_bytes > ram_bytes) {
    std::fprintf(stderr, "%s: --map_bytes=%llu is larger than the guest RAM (%llu bytes)\n", kTag,
                 static_cast<unsigned long long>(map_bytes),
                 static_cast<unsigned long long>(ram_bytes));
    return 2;
  }
  const uint64_t iova_base = absl::GetFlag(FLAGS_iova_base);

  // Guest RAM: the VMM's own shared memory, or simulated addresses.
  std::optional<GuestRam> ram;
  uint64_t ua = RoundUp(kSimulatedUa, page);
  if (!simulated) {
    absl::StatusOr<GuestRam> created =
        GuestRam::CreateMemfd("guest-ram", ram_bytes, absl::GetFlag(FLAGS_hugetlb));
    if (!created.ok()) return Fail("guest RAM", created.status());
    ram = std::move(*created);
    ua = ram->ua();
  }

  absl::StatusOr<v1::Context> context = client.CreateContext(name);
  if (!context.ok()) return Fail("CreateContext", context.status());
  const std::vector<std::string> groups = absl::GetFlag(FLAGS_vfio_groups);
  absl::StatusOr<v1::Container> created_container = client.CreateContainer(container, groups);
  if (!created_container.ok()) return Fail("CreateContainer", created_container.status());
  const uint64_t iommu_page = std::max<uint64_t>(created_container->iommu_page_size(), 1);
  const uint64_t slots = ram_bytes / map_bytes;
  const uint64_t window_end = created_container->window_start() + created_container->window_size();
  if (iova_base % iommu_page != 0 || map_bytes % iommu_page != 0 ||
      iova_base < created_container->window_start() || iova_base > window_end ||
      slots * map_bytes > window_end - iova_base) {
    std::fprintf(stderr,
                 "%s: IOVAs [0x%llx, +0x%llx) in chunks of 0x%llx do not fit the container's "
                 "window [0x%llx, 0x%llx) with IOMMU pages of 0x%llx\n",
                 kTag, static_cast<unsigned long long>(iova_base),
                 static_cast<unsigned long long>(slots * map_bytes),
                 static_cast<unsigned long long>(map_bytes),
                 static_cast<unsigned long long>(created_container->window_start()),
                 static_cast<unsigned long long>(window_end),
                 static_cast<unsigned long long>(iommu_page));
    return 2;
  }
  if (ram.has_value()) {
    const GuestRamSlot slot = SlotOf(*ram);
    absl::StatusOr<v1::Context> attached = client.AttachMemory(name, {&slot, 1});
    if (!attached.ok()) return Fail("AttachMemory", attached.status());
  }
  absl::StatusOr<v1::Region> region = client.RegisterRegion(container, name, ua, ram_bytes);
  if (!region.ok()) return Fail("RegisterRegion", region.status());
  Info(absl::StrFormat(
      "context %s on %s (backend %s%s, page %d): %d MiB of guest RAM at 0x%x %s, registered "
      "for %s; workload: %d-byte mappings at %d IOVAs from 0x%x",
      name, node->node_name(), node->backend(), simulated ? ", simulated" : "", page,
      ram_bytes >> 20, ua, simulated ? "(simulated)" : "(memfd, attached)", container, map_bytes,
      slots, iova_base));

  absl::StatusOr<std::unique_ptr<DmaSession>> session = client.StartDmaSession();
  if (!session.ok()) return Fail("DmaSession", session.status());
  uint64_t seed = absl::GetFlag(FLAGS_seed);
  if (seed == 0) seed = static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())) ^ pid;
  std::mt19937_64 random(seed);
  std::uniform_int_distribution<uint64_t> pick_slot(0, slots - 1);
  std::uniform_int_distribution<uint64_t> pick_page(0, (ram_bytes - map_bytes) / page);
  std::vector<bool> mapped(slots, false);

  Workload work;
  const double duration = absl::GetFlag(FLAGS_duration_seconds);
  const absl::Time start = absl::Now();
  const absl::Time end = duration > 0 ? start + absl::Seconds(duration) : absl::InfiniteFuture();
  while (!stop_requested.load(std::memory_order_relaxed) && absl::Now() < end &&
         work.errors < kMaxErrors) {
    const uint64_t i = pick_slot(random);
    const uint64_t iova = iova_base + i * map_bytes;
    absl::Status status;
    if (mapped[i]) {
      status = (*session)->Unmap(container, iova, map_bytes);
      if (status.ok()) {
        ++work.unmaps;
        mapped[i] = false;
      }
    } else {
      status = (*session)->Map(container, iova, ua + pick_page(random) * page, map_bytes);
      if (status.ok()) {
        ++work.maps;
        mapped[i] = true;
      }
    }
    if (!status.ok()) {
      if (work.errors++ == 0) work.first_error = status;
      if (Fatal(status)) break;
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  if (stop_requested.load()) Info("signalled: ending the workload");

  // Cleanup in the order a VMM shuts a device down; without it the agent's exit watch does all
  // of it when this process is gone.
  absl::Status cleanup;
  if (absl::GetFlag(FLAGS_teardown_on_exit)) {
    for (uint64_t i = 0; i < slots && cleanup.ok(); ++i) {
      if (mapped[i]) cleanup = (*session)->Unmap(container, iova_base + i * map_bytes, map_bytes);
    }
    if (cleanup.ok()) cleanup = (*session)->Close();
    if (cleanup.ok()) cleanup = client.UnregisterRegion(container, ua, ram_bytes);
    if (cleanup.ok()) cleanup = client.ReleaseContainer(container);
    if (cleanup.ok()) cleanup = client.TeardownContext(name);
  } else {
    Info("--teardown_on_exit=false: leaving the cleanup to the agent's exit watch");
  }

  std::printf(
      "%s: summary context=%s backend=%s simulated=%s maps=%llu unmaps=%llu errors=%llu "
      "seconds=%.2f calls_per_second=%.1f\n",
      kTag, name.c_str(), node->backend().c_str(), simulated ? "true" : "false",
      static_cast<unsigned long long>(work.maps), static_cast<unsigned long long>(work.unmaps),
      static_cast<unsigned long long>(work.errors), seconds,
      seconds > 0 ? static_cast<double>(work.maps + work.unmaps) / seconds : 0.0);
  std::fflush(stdout);
  if (work.errors > 0) return Fail("DMA workload", work.first_error);
  if (!cleanup.ok()) return Fail("cleanup", cleanup);
  return 0;
}

}  // namespace
}  // namespace dmapin::client

int main(int argc, char** argv) {
  dmapin::InitBinary(argc, argv,
                     "dmapin-reference-vmm: a reference VMM on the dmapin client library "
                     "(guest RAM in a memfd, its context and container, a DMA workload)",
                     "reference_vmm");
  struct sigaction action {};
  action.sa_handler = dmapin::client::OnSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  return dmapin::client::Run();
}
