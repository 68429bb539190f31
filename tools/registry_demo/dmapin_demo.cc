// dmapin_demo: a simulated VFIO host driving the region registry in-process.
//
// Until the node agent exists, this shows the registry at work on the SimBackend. Each simulated
// VM is a memory context with a memlock limit and two VFIO containers. Container 0 registers all
// of the VM's guest RAM (in chunks), container 1 shares half of it (used = 2 there). One thread
// per VM then maps and unmaps DMA at random IOVAs as fast as it can, and now and then:
//  - container 1 drops or re-takes a shared chunk (used 2 <-> 1),
//  - the guest "hot-plugs" a DIMM: register, map, unregister while mapped (EBUSY), unmap, retry,
//  - a device maps past the end of guest RAM (EINVAL, the partial map is rolled back),
//  - a translation through a ReadSession is checked against the simulated frame.
// With more than one VM, the last one has no memlock room for the DIMM: its hot-plug gets ENOMEM.
// A printer thread shows a counter table every --interval. At the end the containers are
// released, the contexts torn down, the registry's stats printed and its invariants checked;
// the exit status is 1 when a check or an expectation of the workload fails.
#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/random/distributions.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
#include "common/errno_status.h"

ABSL_FLAG(int, vms, 4, "Number of simulated VMs (memory contexts), 1 to 64.");
ABSL_FLAG(double, duration, 10.0, "How long the workload runs, in seconds.");
ABSL_FLAG(double, interval, 1.0, "Seconds between two counter tables.");
ABSL_FLAG(uint64_t, page_size, 65536,
          "Kernel base page size PS of the simulated node in bytes (a power of two >= 4096); "
          "the containers' IOMMU page size is the same.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the workload's random choices.");

namespace dmapin::agent {
namespace {

constexpr uint64_t kChunks = 8;       // guest RAM chunks per VM
constexpr uint64_t kChunkPages = 32;  // pages per chunk
constexpr uint64_t kSlots = 128;      // IOVA slots per container for the random maps
constexpr uint64_t kSlotPages = 4;    // largest random mapping, in pages (one slot)
// Slots past the random ones, kept for the hot-plug and the stray map.
constexpr uint64_t kHotplugSlot = kSlots;
constexpr uint64_t kStraySlot = kSlots + 1;
constexpr uint64_t kGuestBase = uint64_t{1} << 40;  // guest RAM's user address in every VM
constexpr uint64_t kHotplugChunk = 64;              // chunk index of the DIMM, far from base RAM
constexpr uint64_t kWindowStart = uint64_t{1} << 32;
constexpr uint64_t kWindowSize = uint64_t{1} << 36;
constexpr int kErrnoSlots = 256;
constexpr int kMaxSurprisesLogged = 20;

struct Mapping {
  uint64_t ua = 0;
  uint64_t pages = 0;
};

struct Vm {
  int index = 0;
  ContextId context = 0;
  std::array<ContainerId, 2> containers = {0, 0};
  uint64_t memlock_limit = 0;
  bool tight = false;  // no room for the hot-plugged DIMM

  // Written by the VM's thread, read by the printer.
  std::atomic<uint64_t> maps{0};
  std::atomic<uint64_t> unmaps{0};
  std::atomic<uint64_t> busy_retries_ok{0};
  std::atomic<uint64_t> translations{0};
  std::array<std::atomic<uint64_t>, kErrnoSlots> errors{};

  // Owned by the VM's thread.
  std::array<std::vector<std::optional<Mapping>>, 2> slots;
  std::vector<bool> shared;      // chunk held by container 1 too
  uint64_t installed_pages = 0;  // IOMMU entries this VM's mappings installed
};

std::string Mib(uint64_t bytes) { return absl::StrFormat("%.1f", bytes / 1048576.0); }

class Demo {
 public:
  Demo(SimBackend* backend, Registry* registry, uint64_t seed)
      : backend_(backend), registry_(registry), ps_(backend->page_size()), seed_(seed) {}

  absl::Status Setup(int vm_count);
  void RunVm(Vm& vm);
  void RunPrinter(absl::Duration interval, absl::Notification* done);
  // Rates are over `window`, since the previous table; or over the whole run.
  void PrintTable(absl::Duration elapsed, absl::Duration window, bool whole_run = false);
  // Checks the registry's invariants and that its counters match what the workload installed.
  bool CheckSteadyState();
  // Releases the containers and tears down the contexts; true when all went as the spec says.
  bool TearDown();
  void PrintStats() const;

  void Stop() { stop_.store(true, std::memory_order_relaxed); }
  std::vector<std::unique_ptr<Vm>>& vms() { return vms_; }
  uint64_t surprises() const { return surprises_.load(); }

 private:
  uint64_t ChunkBytes() const { return kChunkPages * ps_; }
  uint64_t ChunkUa(uint64_t chunk) const { return kGuestBase + chunk * ChunkBytes(); }
  uint64_t SlotIova(uint64_t slot) const { return kWindowStart + slot * kSlotPages * ps_; }

  // Counts a failed status under its errno.
  static void Count(Vm& vm, const absl::Status& status);
  // Counts `status` and checks it carries the errno the workload expects (0 for OK).
  void Expect(Vm& vm, const absl::Status& status, int want, const char* what);

  void MapOrUnmap(Vm& vm, std::mt19937_64& rng);
  void ToggleShare(Vm& vm, std::mt19937_64& rng);
  void Hotplug(Vm& vm);
  void StrayMap(Vm& vm);
  void CheckTranslation(Vm& vm, uint64_t ua);
  // "<locked> MiB locked, <n> regions (<p> pending release)" for the VM's context.
  std::string Describe(const Vm& vm) const;

  SimBackend* const backend_;
  Registry* const registry_;
  const uint64_t ps_;
  const uint64_t seed_;
  std::vector<std::unique_ptr<Vm>> vms_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> surprises_{0};
  absl::Time start_ = absl::Now();
  absl::Mutex print_mu_;
  // Counters at the previous table (only one thread prints tables at a time).
  std::vector<uint64_t> last_maps_;
  std::vector<uint64_t> last_unmaps_;
};

void Demo::Count(Vm& vm, const absl::Status& status) {
  if (status.ok()) return;
  const int err = std::clamp(ErrnoOf(status), 0, kErrnoSlots - 1);
  vm.errors[err].fetch_add(1, std::memory_order_relaxed);
}

void Demo::Expect(Vm& vm, const absl::Status& status, int want, const char* what) {
  Count(vm, status);
  if (ErrnoOf(status) == want) return;
  if (surprises_.fetch_add(1) < kMaxSurprisesLogged) {
    absl::MutexLock lock(&print_mu_);
    absl::FPrintF(stderr, "vm%d: %s: wanted %s, got %s\n", vm.index, what,
                  want == 0 ? "OK" : ErrnoName(want), status.ToString());
  }
}

absl::Status Demo::Setup(int vm_count) {
  for (int i = 0; i < vm_count; ++i) {
    auto vm = std::make_unique<Vm>();
    vm->index = i;
    vm->context = static_cast<ContextId>(i + 1);
    vm->containers = {static_cast<ContainerId>(100 * (i + 1) + 1),
                      static_cast<ContainerId>(100 * (i + 1) + 2)};
    // With more than one VM, the last one has no memlock room for the DIMM.
    vm->tight = vm_count > 1 && i == vm_count - 1;
    // Room for the base RAM plus two DIMMs, or exactly the base RAM for the tight VM.
    vm->memlock_limit = (kChunks + (vm->tight ? 0 : 2)) * ChunkBytes();
    vm->slots[0].resize(kSlots);
    vm->slots[1].resize(kSlots);
    vm->shared.assign(kChunks, false);

    ContextOptions context_options;
    context_options.memlock_limit_bytes = vm->memlock_limit;
    absl::Status status = registry_->CreateContext(vm->context, context_options);
    if (!status.ok()) return status;
    for (ContainerId container : vm->containers) {
      ContainerOptions container_options;
      container_options.iommu_page_size = ps_;
      container_options.window_start = kWindowStart;
      container_options.window_size = kWindowSize;
      status = registry_->CreateContainer(container, container_options);
      if (!status.ok()) return status;
    }
    for (uint64_t chunk = 0; chunk < kChunks; ++chunk) {
      status = registry_->Register(vm->containers[0], vm->context, ChunkUa(chunk), ChunkBytes());
      if (!status.ok()) return status;
      if (chunk < kChunks / 2) {
        status = registry_->Register(vm->containers[1], vm->context, ChunkUa(chunk), ChunkBytes());
        if (!status.ok()) return status;
        vm->shared[chunk] = true;
      }
    }
    absl::PrintF(
        "vm%d: context %d, containers %d and %d, %s MiB guest RAM in %d chunks, "
        "memlock limit %s MiB%s\n",
        i, vm->context, vm->containers[0], vm->containers[1], Mib(kChunks * ChunkBytes()), kChunks,
        Mib(vm->memlock_limit), vm->tight ? " (no room for a DIMM)" : "");
    vms_.push_back(std::move(vm));
  }
  start_ = absl::Now();
  return absl::OkStatus();
}

void Demo::RunVm(Vm& vm) {
  std::mt19937_64 rng(seed_ * 1000003 + static_cast<uint64_t>(vm.index));
  auto jitter = [&rng](int lo_ms, int hi_ms) {
    return absl::Milliseconds(absl::Uniform(rng, lo_ms, hi_ms));
  };
  absl::Time next_share = absl::Now() + jitter(20, 120);
  absl::Time next_hotplug = absl::Now() + jitter(100, 400);
  absl::Time next_stray = absl::Now() + jitter(50, 250);
  for (uint64_t op = 0; !stop_.load(std::memory_order_relaxed); ++op) {
    MapOrUnmap(vm, rng);
    if (op % 64 != 0) continue;
    const absl::Time now = absl::Now();
    if (now >= next_share) {
      ToggleShare(vm, rng);
      next_share = now + jitter(20, 120);
    }
    if (now >= next_hotplug) {
      Hotplug(vm);
      next_hotplug = now + jitter(100, 400);
    }
    if (now >= next_stray) {
      StrayMap(vm);
      next_stray = now + jitter(50, 250);
    }
  }
}

void Demo::MapOrUnmap(Vm& vm, std::mt19937_64& rng) {
  const int c = absl::Uniform(rng, 0, 2);
  const uint64_t slot = absl::Uniform<uint64_t>(rng, 0, kSlots);
  std::optional<Mapping>& mapping = vm.slots[c][slot];
  const ContainerId container = vm.containers[c];
  if (mapping.has_value()) {
    const absl::Status status = registry_->Unmap(container, SlotIova(slot), mapping->pages * ps_);
    vm.unmaps.fetch_add(1, std::memory_order_relaxed);
    Expect(vm, status, 0, "unmap");
    if (status.ok()) {
      vm.installed_pages -= mapping->pages;
      mapping.reset();
    }
    return;
  }
  const uint64_t pages = absl::Uniform<uint64_t>(absl::IntervalClosed, rng, 1, kSlotPages);
  const uint64_t chunk = absl::Uniform<uint64_t>(rng, 0, kChunks);
  const uint64_t first = absl::Uniform<uint64_t>(absl::IntervalClosed, rng, 0, kChunkPages - pages);
  const uint64_t ua = ChunkUa(chunk) + first * ps_;
  const absl::Status status = registry_->Map(container, SlotIova(slot), ua, pages * ps_);
  const uint64_t maps = vm.maps.fetch_add(1, std::memory_order_relaxed);
  Expect(vm, status, 0, "map");
  if (!status.ok()) return;
  mapping = Mapping{ua, pages};
  vm.installed_pages += pages;
  if (maps % 256 == 0) {
    CheckTranslation(vm, ua + absl::Uniform<uint64_t>(rng, 0, pages * ps_));
  }
}

void Demo::CheckTranslation(Vm& vm, uint64_t ua) {
  uint64_t hpa = 0;
  bool found = false;
  {
    // Hot-path translation; no writer call may happen inside this scope.
    Registry::ReadSession session(*registry_, vm.context);
    found = session.valid() && session.TryTranslate(ua, &hpa);
  }
  vm.translations.fetch_add(1, std::memory_order_relaxed);
  const uint64_t want = backend_->FakeHpa(vm.context, ua & ~(ps_ - 1)) | (ua & (ps_ - 1));
  if (found && hpa == want) return;
  if (surprises_.fetch_add(1) < kMaxSurprisesLogged) {
    absl::MutexLock lock(&print_mu_);
    absl::FPrintF(stderr, "vm%d: translate %#x: wanted %#x, got %s\n", vm.index, ua, want,
                  found ? absl::StrFormat("%#x", hpa) : std::string("nothing"));
  }
}

void Demo::ToggleShare(Vm& vm, std::mt19937_64& rng) {
  // Container 0 holds every chunk, so container 1 is never the last user: no EBUSY here.
  const uint64_t chunk = absl::Uniform<uint64_t>(rng, 0, kChunks);
  const absl::Status status =
      vm.shared[chunk]
          ? registry_->Unregister(vm.containers[1], ChunkUa(chunk), ChunkBytes())
          : registry_->Register(vm.containers[1], vm.context, ChunkUa(chunk), ChunkBytes());
  Expect(vm, status, 0, vm.shared[chunk] ? "unshare chunk" : "share chunk");
  if (status.ok()) vm.shared[chunk] = !vm.shared[chunk];
}

void Demo::Hotplug(Vm& vm) {
  const ContainerId container = vm.containers[0];
  const uint64_t ua = ChunkUa(kHotplugChunk);
  const uint64_t iova = SlotIova(kHotplugSlot);
  const absl::Status registered = registry_->Register(container, vm.context, ua, ChunkBytes());
  Expect(vm, registered, vm.tight ? ENOMEM : 0, "register DIMM");
  if (!registered.ok()) return;
  Expect(vm, registry_->Map(container, iova, ua, ps_), 0, "map DIMM");
  // The last user unregisters while a DMA mapping still uses the region: EBUSY, retry later.
  Expect(vm, registry_->Unregister(container, ua, ChunkBytes()), EBUSY, "unregister mapped DIMM");
  Expect(vm, registry_->Unmap(container, iova, ps_), 0, "unmap DIMM");
  const absl::Status retried = registry_->Unregister(container, ua, ChunkBytes());
  Expect(vm, retried, 0, "unregister DIMM after unmap");
  if (retried.ok()) vm.busy_retries_ok.fetch_add(1, std::memory_order_relaxed);
}

void Demo::StrayMap(Vm& vm) {
  // Two pages from the last page of guest RAM: the first installs, the second lies outside
  // every region, so the call fails with EINVAL and rolls back the first.
  const ContainerId container = vm.containers[1];
  const uint64_t ua = ChunkUa(kChunks) - ps_;
  vm.maps.fetch_add(1, std::memory_order_relaxed);
  Expect(vm, registry_->Map(container, SlotIova(kStraySlot), ua, 2 * ps_), EINVAL,
         "map past the end of guest RAM");
}

void Demo::RunPrinter(absl::Duration interval, absl::Notification* done) {
  absl::Time last = absl::Now();
  while (!done->WaitForNotificationWithTimeout(interval)) {
    const absl::Time now = absl::Now();
    PrintTable(now - start_, now - last);
    last = now;
  }
}

void Demo::PrintTable(absl::Duration elapsed, absl::Duration window, bool whole_run) {
  if (whole_run) {
    last_maps_.assign(vms_.size(), 0);
    last_unmaps_.assign(vms_.size(), 0);
  }
  last_maps_.resize(vms_.size(), 0);
  last_unmaps_.resize(vms_.size(), 0);
  const double seconds = std::max(absl::ToDoubleSeconds(window), 1e-9);

  std::string out = absl::StrFormat("--- t=%.1fs%s ---\n", absl::ToDoubleSeconds(elapsed),
                                    whole_run ? ", rates averaged over the run" : "");
  absl::StrAppendFormat(&out, "%-4s %3s %7s %17s %5s %9s %10s %10s  %s\n", "vm", "ctx", "regions",
                        "locked/limit MiB", "used", "installed", "map/s", "unmap/s", "errors");
  uint64_t total_maps = 0, total_unmaps = 0;
  for (size_t i = 0; i < vms_.size(); ++i) {
    Vm& vm = *vms_[i];
    uint64_t regions = 0, locked = 0, used = 0, installed = 0;
    if (absl::StatusOr<ContextInfo> info = registry_->GetContext(vm.context); info.ok()) {
      regions = info->regions;
      locked = info->locked_bytes;
    }
    for (const RegionInfo& region : registry_->ListRegions(vm.context)) {
      used += region.used;
      installed += region.mapped > 0 ? region.mapped - 1 : 0;
    }
    const uint64_t maps = vm.maps.load(std::memory_order_relaxed);
    const uint64_t unmaps = vm.unmaps.load(std::memory_order_relaxed);
    const double map_rate = (maps - last_maps_[i]) / seconds;
    const double unmap_rate = (unmaps - last_unmaps_[i]) / seconds;
    total_maps += maps - last_maps_[i];
    total_unmaps += unmaps - last_unmaps_[i];
    last_maps_[i] = maps;
    last_unmaps_[i] = unmaps;

    std::vector<std::string> errors;
    for (int err = 0; err < kErrnoSlots; ++err) {
      const uint64_t n = vm.errors[err].load(std::memory_order_relaxed);
      if (n > 0) errors.push_back(absl::StrCat(ErrnoName(err), "=", n));
    }
    absl::StrAppendFormat(
        &out, "%-4s %3d %7d %17s %5d %9d %10.0f %10.0f  %s\n", absl::StrCat("vm", vm.index),
        vm.context, regions, absl::StrCat(Mib(locked), "/", Mib(vm.memlock_limit)), used, installed,
        map_rate, unmap_rate, errors.empty() ? std::string("-") : absl::StrJoin(errors, " "));
  }
  absl::StrAppendFormat(&out, "all  map/s %.0f  unmap/s %.0f\n", total_maps / seconds,
                        total_unmaps / seconds);
  absl::MutexLock lock(&print_mu_);
  std::fputs(out.c_str(), stdout);
  std::fflush(stdout);
}

bool Demo::CheckSteadyState() {
  bool ok = true;
  if (absl::Status status = registry_->CheckInvariants(); !status.ok()) {
    absl::PrintF("invariants (workload stopped, mappings in place): FAILED: %s\n",
                 status.ToString());
    ok = false;
  } else {
    absl::PrintF("invariants (workload stopped, mappings in place): OK\n");
  }
  for (const auto& vm : vms_) {
    uint64_t installed = 0;
    for (const RegionInfo& region : registry_->ListRegions(vm->context)) {
      installed += region.mapped - 1;
    }
    if (installed != vm->installed_pages) {
      absl::PrintF("vm%d: registry counts %d installed entries, the workload installed %d\n",
                   vm->index, installed, vm->installed_pages);
      ok = false;
    }
  }
  return ok;
}

std::string Demo::Describe(const Vm& vm) const {
  absl::StatusOr<ContextInfo> info = registry_->GetContext(vm.context);
  if (!info.ok()) return "context gone";
  uint64_t pending = 0;
  for (const RegionInfo& region : registry_->ListRegions(vm.context)) {
    pending += region.pending_release ? 1 : 0;
  }
  return absl::StrFormat("%s MiB locked, %d regions (%d pending release)", Mib(info->locked_bytes),
                         info->regions, pending);
}

bool Demo::TearDown() {
  bool ok = true;
  for (const auto& vm : vms_) {
    auto step = [&](const absl::Status& status, const std::string& what) {
      absl::PrintF("vm%d: %s: %s -> %s\n", vm->index, what,
                   status.ok() ? std::string("OK") : status.ToString(), Describe(*vm));
      ok = ok && status.ok();
    };
    const ContainerId first = vm->containers[0];
    const ContainerId second = vm->containers[1];
    if (vm->index % 2 == 0) {
      // Container 0 goes first while container 1 still maps its chunks: those regions stay
      // pending release (spec section 4) until container 1's mappings are cleared.
      step(registry_->ReleaseContainer(first), absl::StrCat("release container ", first));
      step(registry_->ReleaseContainer(second), absl::StrCat("release container ", second));
    } else {
      // Only container 1 is released; the context teardown wipes what container 0 holds.
      step(registry_->ReleaseContainer(second), absl::StrCat("release container ", second));
    }
    step(registry_->TeardownContext(vm->context), absl::StrCat("tear down context ", vm->context));
  }
  if (!registry_->ListContexts().empty() || !registry_->ListRegions().empty()) {
    absl::PrintF("contexts or regions remain after teardown\n");
    ok = false;
  }
  if (absl::StatusOr<uint64_t> pinned = backend_->TotalPinnedPages(); !pinned.ok() || *pinned) {
    absl::PrintF("pages still pinned after teardown: %s\n",
                 pinned.ok() ? absl::StrCat(*pinned) : pinned.status().ToString());
    ok = false;
  }
  return ok;
}

void Demo::PrintStats() const {
  const RegistryStats s = registry_->stats();
  absl::PrintF("registry stats:\n");
  const std::pair<const char*, uint64_t> rows[] = {
      {"registers_ok", s.registers_ok},
      {"registers_failed", s.registers_failed},
      {"unregisters_ok", s.unregisters_ok},
      {"unregisters_failed", s.unregisters_failed},
      {"unregister_ebusy", s.unregister_ebusy},
      {"pin_failures", s.pin_failures},
      {"maps_ok", s.maps_ok},
      {"maps_failed", s.maps_failed},
      {"map_rollbacks", s.map_rollbacks},
      {"unmaps", s.unmaps},
      {"pending_releases_started", s.pending_releases_started},
      {"pending_releases_completed", s.pending_releases_completed},
      {"grace_periods", s.grace_periods},
  };
  for (const auto& [name, value] : rows) absl::PrintF("  %-27s %d\n", name, value);
  uint64_t translations = 0, busy_retries = 0;
  for (const auto& vm : vms_) {
    translations += vm->translations.load();
    busy_retries += vm->busy_retries_ok.load();
  }
  absl::PrintF("workload: %d translations checked, %d unregisters retried after EBUSY\n",
               translations, busy_retries);
}

int RunDemo() {
  const int vm_count = absl::GetFlag(FLAGS_vms);
  const double duration = absl::GetFlag(FLAGS_duration);
  const double interval = absl::GetFlag(FLAGS_interval);
  if (vm_count < 1 || vm_count > 64) {
    absl::FPrintF(stderr, "--vms must be between 1 and 64\n");
    return 2;
  }
  if (!(duration > 0) || !(interval > 0)) {
    absl::FPrintF(stderr, "--duration and --interval must be positive\n");
    return 2;
  }

  SimBackendOptions backend_options;
  backend_options.page_size = absl::GetFlag(FLAGS_page_size);
  absl::StatusOr<std::unique_ptr<SimBackend>> backend = SimBackend::Create(backend_options);
  if (!backend.ok()) {
    absl::FPrintF(stderr, "sim backend: %s\n", backend.status().ToString());
    return 2;
  }
  Registry registry(backend->get());
  Demo demo(backend->get(), &registry, absl::GetFlag(FLAGS_seed));
  absl::PrintF("dmapin demo: %d VMs on the %s backend, PS %d bytes, %.1fs\n", vm_count,
               (*backend)->name(), (*backend)->page_size(), duration);
  if (absl::Status status = demo.Setup(vm_count); !status.ok()) {
    absl::FPrintF(stderr, "setup failed: %s\n", status.ToString());
    return 1;
  }

  absl::Notification printer_done;
  std::thread printer([&] { demo.RunPrinter(absl::Seconds(interval), &printer_done); });
  std::vector<std::thread> threads;
  for (auto& vm : demo.vms()) threads.emplace_back([&demo, &vm] { demo.RunVm(*vm); });
  const absl::Time start = absl::Now();
  absl::SleepFor(absl::Seconds(duration));
  demo.Stop();
  for (std::thread& thread : threads) thread.join();
  printer_done.Notify();
  printer.join();
  const absl::Duration run_time = absl::Now() - start;
  demo.PrintTable(run_time, run_time, /*whole_run=*/true);

  bool ok = demo.CheckSteadyState();
  ok = demo.TearDown() && ok;
  demo.PrintStats();
  if (demo.surprises() > 0) {
    absl::PrintF("workload: %d answers differed from the spec's\n", demo.surprises());
    ok = false;
  }
  if (absl::Status status = registry.CheckInvariants(); !status.ok()) {
    absl::PrintF("invariants: FAILED: %s\n", status.ToString());
    ok = false;
  } else {
    absl::PrintF("invariants: OK\n");
  }
  absl::PrintF("%s\n", ok ? "demo: OK" : "demo: FAILED");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace dmapin::agent

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Drives the dmapin region registry in-process with simulated VMs on the sim backend.\n"
      "Usage: dmapin_demo [--vms=N] [--duration=SECONDS] [--interval=SECONDS] "
      "[--page_size=BYTES] [--seed=N]");
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    absl::FPrintF(stderr, "unexpected argument: %s\n", positional[1]);
    return 2;
  }
  return dmapin::agent::RunDemo();
}
