// vfio-test-vmm: the VMM of the QEMU agent test (agent_guest_test.cc), test-only. It does what a
// hypervisor does before its guest runs, against the real dmapin-agent over its Unix socket:
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
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
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
#include "client/memory_socket_client.h"
#include "common/flags.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "grpcpp/grpcpp.h"

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

int Fail(const std::string& step, const std::string& what) {
  std::fprintf(stderr, "%s: FAILED %s: %s\n", kTag, step.c_str(), what.c_str());
  std::fflush(stderr);
  return 1;
}

int Fail(const std::string& step, const grpc::Status& status) {
  return Fail(step, absl::StrCat("gRPC code ", status.error_code(), ": ", status.error_message()));
}

std::unique_ptr<grpc::ClientContext> Call() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  return context;
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
    return Fail("flags", "two --map_bytes must fit the guest RAM, the pattern one mapping");
  }

  // Guest RAM as QEMU's memory-backend-memfd,share=on keeps it, touched so it exists.
  const int memfd = ::memfd_create("guest-ram", MFD_CLOEXEC);
  if (memfd < 0 || ::ftruncate(memfd, static_cast<off_t>(ram_bytes)) != 0) {
    return Fail("memfd", std::strerror(errno));
  }
  void* mapped = ::mmap(nullptr, ram_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  if (mapped == MAP_FAILED) return Fail("mmap", std::strerror(errno));
  auto* ram = static_cast<uint8_t*>(mapped);
  std::memset(ram, 0, ram_bytes);
  const uint64_t ua = reinterpret_cast<uint64_t>(ram);
  // The source range is the RAM's first mapping, the destination its second.
  const uint64_t src_ua = ua;
  const uint64_t dst_ua = ua + map_bytes;

  const std::string uds = absl::GetFlag(FLAGS_uds_path);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel("unix:" + uds, grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(60))) {
    return Fail("connect", "no agent on unix:" + uds);
  }
  std::unique_ptr<v1::NodeAgent::Stub> stub = v1::NodeAgent::NewStub(channel);

  // A context owned by this process: the agent knows the caller by SO_PEERCRED.
  v1::CreateContextRequest create;
  create.set_name(name);
  create.set_memlock_unlimited(true);
  create.set_backing(v1::MEMORY_BACKING_MEMFD);
  v1::Context context;
  if (grpc::Status s = stub->CreateContext(Call().get(), create, &context); !s.ok()) {
    return Fail("CreateContext", s);
  }
  if (context.owner().pid() != pid) {
    return Fail("CreateContext",
                absl::StrFormat("owner pid %d, this process is %d", context.owner().pid(), pid));
  }

  // The memfd by SCM_RIGHTS: the agent maps it MAP_SHARED, so ua is this process's address.
  absl::StatusOr<std::unique_ptr<client::MemorySocketClient>> memory =
      client::MemorySocketClient::Connect(uds + ".memory");
  if (!memory.ok()) return Fail("memory socket", memory.status().ToString());
  v1::AttachMemoryRequest attach;
  attach.set_context(name);
  v1::MemorySlot* slot = attach.add_slots();
  slot->set_ua(ua);
  slot->set_size(ram_bytes);
  slot->set_offset(0);
  slot->set_fd_index(0);
  const int fds[] = {memfd};
  absl::StatusOr<v1::Context> attached = (*memory)->Attach(attach, fds);
  if (!attached.ok()) return Fail("AttachMemory", attached.status().ToString());
  ::close(memfd);  // the mapping and the agent's copy keep the memory
  uint64_t agent_ua = 0;
  for (const v1::MemorySlot& attached_slot : attached->slots()) {
    if (attached_slot.ua() == ua) agent_ua = attached_slot.agent_ua();
  }
  if (agent_ua == 0) return Fail("AttachMemory", "the context lists no slot at this RAM's address");

  v1::CreateContainerRequest create_container;
  create_container.set_name(container);
  create_container.add_vfio_groups(absl::GetFlag(FLAGS_vfio_group));
  v1::Container created;
  if (grpc::Status s = stub->CreateContainer(Call().get(), create_container, &created); !s.ok()) {
    return Fail("CreateContainer", s);
  }

  v1::RegisterRegionRequest reg;
  reg.set_container(container);
  reg.set_context(name);
  reg.set_ua(ua);
  reg.set_size(ram_bytes);
  v1::Region region;
  if (grpc::Status s = stub->RegisterRegion(Call().get(), reg, &region); !s.ok()) {
    return Fail("RegisterRegion", s);
  }

  // Both ways a VMM maps: a unary MapDma, and a request on a DmaSession stream.
  v1::MapDmaRequest map;
  map.set_container(container);
  map.set_iova(src_iova);
  map.set_ua(src_ua);
  map.set_size(map_bytes);
  v1::MapDmaResponse map_response;
  if (grpc::Status s = stub->MapDma(Call().get(), map, &map_response); !s.ok()) {
    return Fail("MapDma", s);
  }
  grpc::ClientContext session_context;
  std::unique_ptr<grpc::ClientReaderWriter<v1::DmaSessionRequest, v1::DmaSessionResponse>> session =
      stub->DmaSession(&session_context);
  v1::DmaSessionRequest request;
  request.set_tag(1);
  request.mutable_map()->set_container(container);
  request.mutable_map()->set_iova(dst_iova);
  request.mutable_map()->set_ua(dst_ua);
  request.mutable_map()->set_size(map_bytes);
  v1::DmaSessionResponse response;
  if (!session->Write(request) || !session->Read(&response)) {
    return Fail("DmaSession", session->Finish());
  }
  if (response.tag() != 1 || response.code() != 0) {
    return Fail("DmaSession map", absl::StrFormat("tag %d code %d: %s", response.tag(),
                                                  response.code(), response.message()));
  }

  // What the device is to read: written by this process, in its own memory.
  for (uint32_t i = 0; i < pattern_bytes; ++i) ram[i] = static_cast<uint8_t>(seed + 7 * i);

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
