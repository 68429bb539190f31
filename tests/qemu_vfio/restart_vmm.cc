// vfio-restart-vmm: the VMM of the QEMU restart test (restart_guest_test.cc), test-only, on the
// client library (client/vmm_client.h). It does what a hypervisor does, against the real
// dmapin-agent over its Unix socket, and then keeps its device busy while the agent is killed and
// restarted under it:
//
//   guest RAM in a shared memfd -> CreateContext (owned by this process) -> the memfd over the
//   memory socket -> CreateContainer with the edu's VFIO group -> RegisterRegion of all of it ->
//   MapDma of --pairs source/destination ranges -> OpenDevices: the edu's device fd and a
//   duplicate of the container, which this process now holds (the device handoff)
//
// then prints
//
//   READY pid=<pid> container=<name> iovas=0x<src0>,0x<dst0>,... map_bytes=0x<each mapping>
//
// and runs two loops until it is killed:
//   - transfers (main thread): edu's DMA engine through this process's device fd, pair after
//     pair: a fresh 1 KiB pattern at the source range, IOVA src -> edu -> IOVA dst, and the bytes
//     compared in this process's own memory. A transfer that does not bring the right bytes back
//     is a failure, whatever the agent is doing;
//   - churn (a second thread): MapDma and UnmapDma of one more range, one after the other, every
//     20 ms, through the client library. While the agent is down these fail (UNAVAILABLE, counted
//     apart); after its restart the first one gives the container back (the library does on
//     EAGAIN), and GetNodeStatus/GetContainer say what the agent found.
// and every 200 ms one line:
//
//   STATS transfers=N failed=F churn_ok=A churn_down=D churn_errors=E adopted=C awaiting=W
//     inconsistencies=I vfio_inconsistencies=V entries=K
//
// (the last five from the agent serving now). A failed transfer also prints "FAILED transfer ...".
// SIGUSR1 asks for one DMA to an IOVA nobody mapped (the test's check that DMAR faults are seen);
// it prints "PROBE unmapped ..." and is not a transfer.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/vmm_client.h"
#include "common/errno_status.h"
#include "common/flags.h"
#include "tests/qemu_vfio/guest_support.h"

ABSL_FLAG(std::string, uds_path, "/run/dmapin/agent.sock", "The agent's Unix socket.");
ABSL_FLAG(std::string, vfio_group, "", "The IOMMU group of the container (/dev/vfio/N).");
ABSL_FLAG(std::string, device, "", "The edu's PCI address in that group (0000:00:03.0).");
ABSL_FLAG(uint64_t, guest_ram_bytes, uint64_t{4} << 20, "Guest RAM in bytes (page multiple).");
ABSL_FLAG(uint32_t, pairs, 4, "Source/destination mappings the transfers go through.");
ABSL_FLAG(uint64_t, map_bytes, 0x10000, "Bytes of each mapping (page multiple).");
ABSL_FLAG(uint32_t, pattern_bytes, 1024, "Bytes per transfer (edu: at most 4095).");

namespace dmapin::qemu_vfio {
namespace {

constexpr char kTag[] = "vfio-restart-vmm";
constexpr uint64_t kFirstIova = 0x100000;  // edu reaches 28 bits of bus address
constexpr uint64_t kNeverMapped = 0x8000000;

volatile sig_atomic_t probe_requested = 0;
void OnProbe(int) { probe_requested = 1; }

int Fail(const std::string& step, const absl::Status& status) {
  std::fprintf(stderr, "%s: FAILED %s: %s\n", kTag, step.c_str(), status.ToString().c_str());
  std::fflush(stderr);
  return 1;
}

struct Stats {
  std::atomic<uint64_t> transfers{0};
  std::atomic<uint64_t> failed{0};
  std::atomic<uint64_t> churn_ok{0};
  std::atomic<uint64_t> churn_down{0};  // the agent was not there (restarting)
  std::atomic<uint64_t> churn_errors{0};
  // What the agent serving now reports (-1 until it answered).
  std::atomic<int64_t> adopted{-1};
  std::atomic<int64_t> awaiting{-1};
  std::atomic<int64_t> inconsistencies{-1};
  std::atomic<int64_t> vfio_inconsistencies{-1};
  std::atomic<int64_t> entries{-1};
};

// MapDma, UnmapDma, MapDma, ... of [iova, iova + size) -> ua, each retried until the agent takes
// it; then what the agent says of itself and of the container.
void Churn(client::VmmClient& agent, const std::string& container, uint64_t iova, uint64_t ua,
           uint64_t size, Stats& stats) {
  bool mapped = false;
  for (;;) {
    const absl::Status status =
        mapped ? agent.UnmapDma(container, iova, size) : agent.MapDma(container, iova, ua, size);
    if (status.ok()) {
      mapped = !mapped;
      stats.churn_ok.fetch_add(1);
      absl::StatusOr<v1::NodeStatus> node = agent.GetNodeStatus();
      v1::GetContainerRequest request;
      request.set_name(container);
      v1::Container got;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      const bool have = agent.stub().GetContainer(&context, request, &got).ok();
      if (node.ok() && have) {
        stats.adopted.store(static_cast<int64_t>(node->counters().containers_adopted()));
        stats.awaiting.store(static_cast<int64_t>(node->counters().containers_awaiting_adoption()));
        stats.inconsistencies.store(
            static_cast<int64_t>(node->counters().adoption_inconsistencies()));
        stats.vfio_inconsistencies.store(
            static_cast<int64_t>(node->counters().vfio_inconsistencies()));
        stats.entries.store(static_cast<int64_t>(got.installed_entries()));
      }
    } else if (status.code() == absl::StatusCode::kUnavailable ||
               status.code() == absl::StatusCode::kDeadlineExceeded ||
               status.code() == absl::StatusCode::kCancelled) {
      // The agent is gone or going (a graceful stop cancels the calls it still has).
      stats.churn_down.fetch_add(1);
    } else {
      stats.churn_errors.fetch_add(1);
      std::printf("CHURN-ERROR %s\n", status.ToString().c_str());
      std::fflush(stdout);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void Report(const Stats& stats) {
  for (;;) {
    std::printf(
        "STATS transfers=%llu failed=%llu churn_ok=%llu churn_down=%llu churn_errors=%llu "
        "adopted=%lld awaiting=%lld inconsistencies=%lld vfio_inconsistencies=%lld "
        "entries=%lld\n",
        static_cast<unsigned long long>(stats.transfers.load()),
        static_cast<unsigned long long>(stats.failed.load()),
        static_cast<unsigned long long>(stats.churn_ok.load()),
        static_cast<unsigned long long>(stats.churn_down.load()),
        static_cast<unsigned long long>(stats.churn_errors.load()),
        static_cast<long long>(stats.adopted.load()), static_cast<long long>(stats.awaiting.load()),
        static_cast<long long>(stats.inconsistencies.load()),
        static_cast<long long>(stats.vfio_inconsistencies.load()),
        static_cast<long long>(stats.entries.load()));
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

int Run() {
  const pid_t pid = ::getpid();
  const std::string name = absl::StrCat("vmm-", pid);
  const std::string container = name + "/edu";
  const uint64_t ram_bytes = absl::GetFlag(FLAGS_guest_ram_bytes);
  const uint64_t map_bytes = absl::GetFlag(FLAGS_map_bytes);
  const uint32_t pairs = absl::GetFlag(FLAGS_pairs);
  const uint32_t pattern_bytes = absl::GetFlag(FLAGS_pattern_bytes);
  // The pairs, then one range for the churn.
  if ((2 * pairs + 1) * map_bytes > ram_bytes || pattern_bytes > map_bytes || pairs == 0) {
    return Fail("flags", absl::InvalidArgumentError(
                             "2 * --pairs + 1 mappings must fit the guest RAM, the pattern one"));
  }

  absl::StatusOr<client::GuestRam> ram = client::GuestRam::CreateMemfd("guest-ram", ram_bytes);
  if (!ram.ok()) return Fail("guest RAM", ram.status());
  auto* bytes = static_cast<uint8_t*>(ram->data());
  std::memset(bytes, 0, ram_bytes);
  const uint64_t ua = ram->ua();

  absl::StatusOr<std::unique_ptr<client::VmmClient>> connected =
      client::VmmClient::Connect({.uds_path = absl::GetFlag(FLAGS_uds_path),
                                  .connect_timeout = absl::Seconds(60),
                                  .rpc_timeout = absl::Seconds(30)});
  if (!connected.ok()) return Fail("connect", connected.status());
  client::VmmClient& agent = **connected;
  absl::StatusOr<v1::Context> context =
      agent.CreateContext(name, {.backing = v1::MEMORY_BACKING_MEMFD});
  if (!context.ok()) return Fail("CreateContext", context.status());
  const client::GuestRamSlot slot = client::SlotOf(*ram);
  absl::StatusOr<v1::Context> attached = agent.AttachMemory(name, {&slot, 1});
  if (!attached.ok()) return Fail("AttachMemory", attached.status());
  const std::string group = absl::GetFlag(FLAGS_vfio_group);
  absl::StatusOr<v1::Container> created = agent.CreateContainer(container, {&group, 1});
  if (!created.ok()) return Fail("CreateContainer", created.status());
  absl::StatusOr<v1::Region> region = agent.RegisterRegion(container, name, ua, ram_bytes);
  if (!region.ok()) return Fail("RegisterRegion", region.status());

  // Mapping k: IOVA kFirstIova + k * map_bytes -> the RAM's k-th map_bytes (even k: a source,
  // odd k: its destination).
  std::vector<std::string> iovas;
  for (uint32_t k = 0; k < 2 * pairs; ++k) {
    const uint64_t iova = kFirstIova + k * map_bytes;
    if (absl::Status s = agent.MapDma(container, iova, ua + k * map_bytes, map_bytes); !s.ok()) {
      return Fail(absl::StrFormat("MapDma iova 0x%x", iova), s);
    }
    iovas.push_back(absl::StrFormat("0x%x", iova));
  }
  const std::string device = absl::GetFlag(FLAGS_device);
  absl::StatusOr<std::vector<client::OpenedDevice>> devices =
      agent.OpenDevices(container, {&device, 1});
  if (!devices.ok()) return Fail("OpenDevices", devices.status());
  agent::Edu edu;
  if (absl::Status s = edu.Adopt((*devices)[0].fd.release()); !s.ok()) return Fail("edu", s);
  if (!edu.DetectEndianness()) {
    return Fail("edu", absl::InternalError(
                           absl::StrFormat("identification 0x%08x", edu.Read(agent::Edu::kIdent))));
  }

  std::printf("READY pid=%d container=%s iovas=%s map_bytes=0x%llx\n", pid, container.c_str(),
              absl::StrJoin(iovas, ",").c_str(), static_cast<unsigned long long>(map_bytes));
  std::fflush(stdout);

  Stats stats;
  const uint64_t churn_index = 2 * pairs;
  std::thread churn(Churn, std::ref(agent), container, kFirstIova + churn_index * map_bytes,
                    ua + churn_index * map_bytes, map_bytes, std::ref(stats));
  std::thread report(Report, std::cref(stats));
  churn.detach();
  report.detach();

  struct sigaction action = {};
  action.sa_handler = OnProbe;
  sigaction(SIGUSR1, &action, nullptr);
  for (uint64_t n = 0;; ++n) {
    if (probe_requested != 0) {
      probe_requested = 0;
      const absl::Status probe = edu.Dma(kNeverMapped, 64, /*to_ram=*/false);
      std::printf("PROBE unmapped iova 0x%llx: %s\n", static_cast<unsigned long long>(kNeverMapped),
                  probe.ToString().c_str());
      std::fflush(stdout);
    }
    const uint32_t pair = static_cast<uint32_t>(n % pairs);
    uint8_t* src = bytes + 2 * pair * map_bytes;
    uint8_t* dst = src + map_bytes;
    const std::string pattern = agent::Pattern(static_cast<uint32_t>(n * 13 + 1), pattern_bytes);
    std::memcpy(src, pattern.data(), pattern_bytes);
    std::memset(dst, 0, pattern_bytes);
    const uint64_t src_iova = kFirstIova + 2 * pair * map_bytes;
    absl::Status status = edu.Dma(src_iova, pattern_bytes, /*to_ram=*/false);
    if (status.ok()) status = edu.Dma(src_iova + map_bytes, pattern_bytes, /*to_ram=*/true);
    const std::string got(reinterpret_cast<const char*>(dst), pattern_bytes);
    if (status.ok() && got == pattern) {
      stats.transfers.fetch_add(1);
    } else {
      stats.failed.fetch_add(1);
      std::printf("FAILED transfer %llu through iova 0x%llx: %s\n",
                  static_cast<unsigned long long>(n), static_cast<unsigned long long>(src_iova),
                  status.ok() ? agent::Compared(got, pattern).c_str() : status.ToString().c_str());
      std::fflush(stdout);
    }
  }
}

}  // namespace
}  // namespace dmapin::qemu_vfio

int main(int argc, char** argv) {
  dmapin::InitBinary(argc, argv,
                     "vfio-restart-vmm: maps its guest RAM on the dmapin agent, takes its edu "
                     "device and keeps it DMAing while the agent restarts (test-only)",
                     "vfio_restart_vmm");
  return dmapin::qemu_vfio::Run();
}
