// vfio-test-vmm: the VMM of the QEMU agent test (agent_guest_test.cc), test-only, on the client
// library (client/vmm_client.h). It does what a hypervisor does before its guest runs, against
// the real dmapin-agent over its Unix socket (dmapin-reference-vmm runs a random map/unmap
// workload instead; this test needs fixed mappings that stay while a device DMAs):
//
//   guest RAM in a shared memfd -> CreateContext (owned by this process) -> the memfd over the
//   memory socket (SCM_RIGHTS) -> CreateContainer with the edu's VFIO group -> RegisterRegion of
//   all of it, by this process's own address -> MapDma of the source range (unary) and of the
//   destination range (on a DmaSession stream)
//
// then writes a pattern into the source range, prints one line on stdout
//
//   READY pid=<pid> ua=0x<guest RAM> size=0x<bytes> src_iova=0x.. src_ua=0x.. dst_iova=0x..
//   dst_ua=0x.. bytes=<n> seed=<s> map_bytes=0x<each mapping>
//   agent_ua=0x<the agent's mapping of the RAM>
//
// and waits to be killed: cleaning up is left to the agent's watch of this process's exit. On a
// failure it prints "FAILED <step>: <status>" on stderr and exits 1.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/vmm_client.h"
#include "common/flags.h"

ABSL_FLAG(std::string, uds_path, "/run/dmapin/agent.sock", "The agent's Unix socket.");
ABSL_FLAG(std::string, vfio_group, "", "The IOMMU group of the container (/dev/vfio/N).");
ABSL_FLAG(uint64_t, guest_ram_bytes, uint64_t{4} << 20, "Guest RAM in bytes (page multiple).");
ABSL_FLAG(uint64_t, src_iova, 0x100000, "IOVA of the source range (edu: below 256 MiB).");
ABSL_FLAG(uint64_t, dst_iova, 0x200000, "IOVA of the destination range.");
ABSL_FLAG(uint64_t, map_bytes, 0x10000, "Bytes of each of the two mappings (page multiple).");
ABSL_FLAG(uint32_t, pattern_bytes, 1024, "Pattern bytes written at the source range's start.");
ABSL_FLAG(uint32_t, seed, 0x5a, "Pattern seed: byte i is seed + 7 * i.");

namespace dmapin::qemu_vfio {
namespace {

constexpr char kTag[] = "vfio-test-vmm";

int Fail(const std::string& step, const absl::Status& status) {
  std::fprintf(stderr, "%s: FAILED %s: %s\n", kTag, step.c_str(), status.ToString().c_str());
  std::fflush(stderr);
  return 1;
}

int Run() {
  const pid_t pid = ::getpid();
  const std::string name = absl::StrCat("vmm-", pid);
  const std::string container = name + "/edu";
  const uint64_t ram_bytes = absl::GetFlag(FLAGS_guest_ram_bytes);
  const uint64_t map_bytes = absl::GetFlag(FLAGS_map_bytes);
  const uint64_t src_iova = absl::GetFlag(FLAGS_src_iova);
  const uint64_t dst_iova = absl::GetFlag(FLAGS_dst_iova);
  const uint32_t pattern_bytes = absl::GetFlag(FLAGS_pattern_bytes);
  const uint32_t seed = absl::GetFlag(FLAGS_seed);
  if (2 * map_bytes > ram_bytes || pattern_bytes > map_bytes) {
    return Fail("flags", absl::InvalidArgumentError(
                             "two --map_bytes must fit the guest RAM, the pattern one mapping"));
  }

  // Guest RAM as QEMU's memory-backend-memfd,share=on keeps it, touched so it exists.
  absl::StatusOr<client::GuestRam> ram = client::GuestRam::CreateMemfd("guest-ram", ram_bytes);
  if (!ram.ok()) return Fail("guest RAM", ram.status());
  auto* bytes = static_cast<uint8_t*>(ram->data());
  std::memset(bytes, 0, ram_bytes);
  const uint64_t ua = ram->ua();
  // The source range is the RAM's first mapping, the destination its second.
  const uint64_t src_ua = ua;
  const uint64_t dst_ua = ua + map_bytes;

  // The connection is the VMM's identity: the agent knows it by SO_PEERCRED and makes it the
  // context's owner.
  absl::StatusOr<std::unique_ptr<client::VmmClient>> connected =
      client::VmmClient::Connect({.uds_path = absl::GetFlag(FLAGS_uds_path),
                                  .connect_timeout = absl::Seconds(60),
                                  .rpc_timeout = absl::Seconds(120)});
  if (!connected.ok()) return Fail("connect", connected.status());
  client::VmmClient& agent = **connected;
  absl::StatusOr<v1::Context> context =
      agent.CreateContext(name, {.backing = v1::MEMORY_BACKING_MEMFD});
  if (!context.ok()) return Fail("CreateContext", context.status());
  if (context->owner().pid() != pid) {
    return Fail("CreateContext",
                absl::InternalError(absl::StrFormat("owner pid %d, this process is %d",
                                                    context->owner().pid(), pid)));
  }
  // The memfd by SCM_RIGHTS over the memory socket: the agent maps it MAP_SHARED, so every ua
  // below is this process's own address.
  const client::GuestRamSlot slot = client::SlotOf(*ram);
  absl::StatusOr<v1::Context> attached = agent.AttachMemory(name, {&slot, 1});
  if (!attached.ok()) return Fail("AttachMemory", attached.status());
  uint64_t agent_ua = 0;
  for (const v1::MemorySlot& attached_slot : attached->slots()) {
    if (attached_slot.ua() == ua) agent_ua = attached_slot.agent_ua();
  }
  if (agent_ua == 0) {
    return Fail("AttachMemory", absl::InternalError("the context lists no slot at the RAM's ua"));
  }
  const std::string group = absl::GetFlag(FLAGS_vfio_group);
  absl::StatusOr<v1::Container> created = agent.CreateContainer(container, {&group, 1});
  if (!created.ok()) return Fail("CreateContainer", created.status());
  absl::StatusOr<v1::Region> region = agent.RegisterRegion(container, name, ua, ram_bytes);
  if (!region.ok()) return Fail("RegisterRegion", region.status());

  // Both ways a VMM maps: a unary MapDma, and a request on a DmaSession stream.
  if (absl::Status s = agent.MapDma(container, src_iova, src_ua, map_bytes); !s.ok()) {
    return Fail("MapDma", s);
  }
  absl::StatusOr<std::unique_ptr<client::DmaSession>> session = agent.StartDmaSession();
  if (!session.ok()) return Fail("DmaSession", session.status());
  if (absl::Status s = (*session)->Map(container, dst_iova, dst_ua, map_bytes); !s.ok()) {
    return Fail("DmaSession map", s);
  }

  // What the device is to read: written by this process, in its own memory.
  for (uint32_t i = 0; i < pattern_bytes; ++i) bytes[i] = static_cast<uint8_t>(seed + 7 * i);

  std::printf(
      "READY pid=%d ua=0x%llx size=0x%llx src_iova=0x%llx src_ua=0x%llx dst_iova=0x%llx "
      "dst_ua=0x%llx bytes=%u seed=%u map_bytes=0x%llx agent_ua=0x%llx\n",
      pid, static_cast<unsigned long long>(ua), static_cast<unsigned long long>(ram_bytes),
      static_cast<unsigned long long>(src_iova), static_cast<unsigned long long>(src_ua),
      static_cast<unsigned long long>(dst_iova), static_cast<unsigned long long>(dst_ua),
      pattern_bytes, seed, static_cast<unsigned long long>(map_bytes),
      static_cast<unsigned long long>(agent_ua));
  std::fflush(stdout);
  // The stream stays open: the agent's exit watch is what ends it all.
  for (;;) ::pause();
}

}  // namespace
}  // namespace dmapin::qemu_vfio

int main(int argc, char** argv) {
  dmapin::InitBinary(argc, argv,
                     "vfio-test-vmm: sets up, attaches, registers and maps its guest RAM on the "
                     "dmapin agent, prints READY and waits to be killed (test-only)",
                     "vfio_test_vmm");
  return dmapin::qemu_vfio::Run();
}
