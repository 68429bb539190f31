// Benchmarks of the region registry against the baselines it replaces, each ratio measured in the
// same run:
//  a) translate of random addresses over 10,000 regions: the kernel's newest-first list walk
//     (mm_iommu_lookup + mm_iommu_ua_to_hpa) vs Registry::Translate and ReadSession::TryTranslate.
//  b) sequential translate through one 1 GiB region: ReadSession::TryTranslate per address, and
//     ReadSession::VisitPages over the whole range, vs a bare array load loop over an
//     hpas-sized array.
//  c) map+unmap of one IOMMU page through a pre-registered region vs pinning per map
//     (mlock + /proc/self/pagemap + munlock; needs root).
//  d) translate throughput of 2 reader threads vs 1 while a writer registers/unregisters at
//     1,000 operations per second (alternating windows of 1 and 2 readers; the median ratio).
// Each benchmark reports its ratio as a counter where the baseline ran before it; main() ends
// with one RATIO line per comparison (PASS/FAIL against the target).
//
//   bazel run -c opt //tests/bench:registry_bench [-- --benchmark_filter=...]
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "agent/registry/memlock_backend.h"
#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
#include "benchmark/benchmark.h"

namespace dmapin::agent {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kPs = 65536;  // PS of the simulated node (ppc64)
constexpr uint32_t kPsShift = 16;
constexpr int kRegions = 10000;
constexpr uint64_t kRegionPages = 16;
constexpr uint64_t kRegionBase = uint64_t{1} << 36;
constexpr size_t kRandomUas = size_t{1} << 16;
constexpr uint64_t kSeqPages = 16384;  // 1 GiB of 64 KiB pages
constexpr uint64_t kSeqBase = uint64_t{1} << 44;

constexpr ContextId kSparseContext = 1;
constexpr ContextId kSeqContext = 2;
constexpr ContainerId kSparseContainer = 1;
constexpr ContainerId kWriterContainer = 2;
constexpr ContainerId kSeqContainer = 3;

[[noreturn]] void Die(const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "registry_bench: %s: %s\n", what.c_str(), status.ToString().c_str());
  std::abort();
}

void CheckOk(const std::string& what, const absl::Status& status) {
  if (!status.ok()) Die(what, status);
}

// Per-benchmark results (real ns per iteration and counters), filled by the reporter as each
// benchmark finishes, so later benchmarks can report a ratio against an earlier baseline.
struct Result {
  double ns_per_iter = 0;
  std::map<std::string, double> counters;
};
std::map<std::string, Result>& Results() {
  static auto* results = new std::map<std::string, Result>();
  return *results;
}
const Result* FindResult(const std::string& name) {
  auto it = Results().find(name);
  return it == Results().end() ? nullptr : &it->second;
}

class CollectingReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration || run.error_occurred) continue;
      Result& result = Results()[run.run_name.function_name];
      result.ns_per_iter =
          run.GetAdjustedRealTime() * 1e9 / benchmark::GetTimeUnitMultiplier(run.time_unit);
      for (const auto& [name, counter] : run.counters) result.counters[name] = counter.value;
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

// Times the measured loop of a benchmark itself, to report a ratio as a counter.
class LoopTimer {
 public:
  LoopTimer() : start_(Clock::now()) {}
  double NsPer(int64_t n) const {
    return std::chrono::duration<double, std::nano>(Clock::now() - start_).count() /
           static_cast<double>(std::max<int64_t>(n, 1));
  }

 private:
  Clock::time_point start_;
};

// Keeps `x` in a register and opaque to the optimizer without a memory clobber: the value must
// be computed, one element at a time (no vectorization), but nothing else is reloaded.
inline void Opaque(uint64_t& x) { asm volatile("" : "+r"(x)); }

// --- a) The kernel's list ---------------------------------------------------------------------

// struct mm_iommu_table_group_mem_t, reduced to what lookup and translation touch.
struct ListRegion {
  uint64_t ua;
  uint64_t entries;
  uint64_t* hpas;
  ListRegion* next;
};

class KernelStyleList {
 public:
  KernelStyleList() = default;
  KernelStyleList(const KernelStyleList&) = delete;
  KernelStyleList& operator=(const KernelStyleList&) = delete;
  ~KernelStyleList() {
    while (head_ != nullptr) {
      ListRegion* next = head_->next;
      delete[] head_->hpas;
      delete head_;
      head_ = next;
    }
  }

  // list_add_rcu: at the head, so the walk sees the newest region first.
  void Add(uint64_t ua, const std::vector<uint64_t>& hpas) {
    auto* region = new ListRegion{ua, hpas.size(), new uint64_t[hpas.size()], head_};
    std::copy(hpas.begin(), hpas.end(), region->hpas);
    head_ = region;
  }

  // mm_iommu_lookup(mm, ua, size = 1) then mm_iommu_ua_to_hpa(mem, ua, PAGE_SHIFT, &hpa).
  __attribute__((noinline)) bool Translate(uint64_t ua, uint64_t* hpa) const {
    for (const ListRegion* mem = head_; mem != nullptr; mem = mem->next) {
      if (mem->ua <= ua && ua + 1 <= mem->ua + (mem->entries << kPsShift)) {
        *hpa = mem->hpas[(ua - mem->ua) >> kPsShift] | (ua & (kPs - 1));
        return true;
      }
    }
    return false;
  }

 private:
  ListRegion* head_ = nullptr;
};

// The shared set-up of a), b) and d): one registry on a simulated 64 KiB-page node with
// 10,000 regions of 16 pages (with random gaps) in one context, the same regions in a kernel-style
// list, random addresses inside them, and one 1 GiB region in a second context.
struct Fixture {
  std::unique_ptr<SimBackend> backend;
  std::unique_ptr<Registry> registry;
  KernelStyleList list;
  std::vector<uint64_t> random_uas;
  std::vector<uint64_t> seq_hpas;  // the hpas of the 1 GiB region
  uint64_t spare_ua = 0;           // free address range for the writer of d)
};

Fixture& GetFixture() {
  static Fixture* fixture = [] {
    auto* f = new Fixture();
    SimBackendOptions options;
    options.page_size = kPs;
    options.track_pins = false;
    absl::StatusOr<std::unique_ptr<SimBackend>> backend = SimBackend::Create(options);
    CheckOk("SimBackend::Create", backend.status());
    f->backend = std::move(*backend);
    f->registry = std::make_unique<Registry>(f->backend.get());
    Registry& registry = *f->registry;
    CheckOk("CreateContext", registry.CreateContext(kSparseContext, {}));
    CheckOk("CreateContext", registry.CreateContext(kSeqContext, {}));
    ContainerOptions container;
    container.iommu_page_size = kPs;
    CheckOk("CreateContainer", registry.CreateContainer(kSparseContainer, container));
    CheckOk("CreateContainer", registry.CreateContainer(kWriterContainer, container));
    CheckOk("CreateContainer", registry.CreateContainer(kSeqContainer, container));

    std::mt19937_64 rng(42);
    std::vector<uint64_t> starts;
    uint64_t ua = kRegionBase;
    for (int i = 0; i < kRegions; ++i) {
      starts.push_back(ua);
      CheckOk("Register",
              registry.Register(kSparseContainer, kSparseContext, ua, kRegionPages * kPs));
      std::vector<uint64_t> hpas;
      for (uint64_t page = 0; page < kRegionPages; ++page) {
        hpas.push_back(f->backend->FakeHpa(kSparseContext, ua + page * kPs));
      }
      f->list.Add(ua, hpas);
      ua += (kRegionPages + 1 + rng() % 16) * kPs;  // a gap of 1 to 16 pages
    }
    f->spare_ua = ua + kPs;
    for (size_t i = 0; i < kRandomUas; ++i) {
      f->random_uas.push_back(starts[rng() % starts.size()] + rng() % (kRegionPages * kPs));
    }
    // Both implementations must agree before their speed means anything.
    for (uint64_t random_ua : f->random_uas) {
      uint64_t from_list = 0;
      absl::StatusOr<uint64_t> from_registry = registry.Translate(kSparseContext, random_ua);
      if (!f->list.Translate(random_ua, &from_list) || !from_registry.ok() ||
          *from_registry != from_list) {
        Die(absl::StrFormat("list and registry disagree at ua 0x%x", random_ua),
            from_registry.status());
      }
    }

    CheckOk("Register 1 GiB",
            registry.Register(kSeqContainer, kSeqContext, kSeqBase, kSeqPages * kPs));
    std::vector<RegionInfo> seq = registry.ListRegions(kSeqContext, /*with_hpas=*/true);
    if (seq.size() != 1 || seq[0].hpas.size() != kSeqPages) {
      Die("1 GiB region", absl::InternalError("not listed with its hpas"));
    }
    f->seq_hpas = seq[0].hpas;
    return f;
  }();
  return *fixture;
}

void BM_TranslateRandomList(benchmark::State& state) {
  const Fixture& f = GetFixture();
  const uint64_t* uas = f.random_uas.data();
  size_t i = 0;
  for (auto _ : state) {
    uint64_t hpa = 0;
    const bool ok = f.list.Translate(uas[i++ & (kRandomUas - 1)], &hpa);
    benchmark::DoNotOptimize(ok);
    benchmark::DoNotOptimize(hpa);
  }
}

void SetSpeedup(benchmark::State& state, const char* baseline, double own_ns) {
  const Result* base = FindResult(baseline);
  if (base != nullptr && own_ns > 0) state.counters["speedup"] = base->ns_per_iter / own_ns;
}

void BM_TranslateRandomRegistry(benchmark::State& state) {
  const Fixture& f = GetFixture();
  const uint64_t* uas = f.random_uas.data();
  size_t i = 0;
  LoopTimer timer;
  for (auto _ : state) {
    absl::StatusOr<uint64_t> hpa =
        f.registry->Translate(kSparseContext, uas[i++ & (kRandomUas - 1)]);
    benchmark::DoNotOptimize(*hpa);
  }
  SetSpeedup(state, "translate_random_10k/list_baseline", timer.NsPer(state.iterations()));
}

void BM_TranslateRandomSession(benchmark::State& state) {
  const Fixture& f = GetFixture();
  const uint64_t* uas = f.random_uas.data();
  size_t i = 0;
  Registry::ReadSession session(*f.registry, kSparseContext);
  LoopTimer timer;
  for (auto _ : state) {
    uint64_t hpa = 0;
    const bool ok = session.TryTranslate(uas[i++ & (kRandomUas - 1)], &hpa);
    benchmark::DoNotOptimize(ok);
    benchmark::DoNotOptimize(hpa);
  }
  SetSpeedup(state, "translate_random_10k/list_baseline", timer.NsPer(state.iterations()));
}

// --- b) Sequential translation within one region ----------------------------------------------

void SetPerPage(benchmark::State& state, const char* baseline, double own_ns_per_iter) {
  state.counters["ns_per_page"] = own_ns_per_iter / kSeqPages;
  const Result* base = FindResult(baseline);
  if (base != nullptr) state.counters["vs_array"] = own_ns_per_iter / base->ns_per_iter;
}

// With kOpaque, every element is forced through a register one at a time (no SIMD for the array
// loop), to show the cost per element without vectorization.
template <bool kOpaque>
void BM_SeqArray(benchmark::State& state) {
  const Fixture& f = GetFixture();
  const uint64_t* arr = f.seq_hpas.data();
  LoopTimer timer;
  for (auto _ : state) {
    benchmark::DoNotOptimize(arr);  // the array's contents are unknown to the compiler
    uint64_t sum = 0;
    for (uint64_t i = 0; i < kSeqPages; ++i) {
      uint64_t value = arr[i];
      if constexpr (kOpaque) Opaque(value);
      sum += value;
    }
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(state.iterations() * kSeqPages);
  SetPerPage(state, "", timer.NsPer(state.iterations()));
}

template <bool kOpaque>
void BM_SeqSession(benchmark::State& state) {
  const Fixture& f = GetFixture();
  Registry::ReadSession session(*f.registry, kSeqContext);
  LoopTimer timer;
  for (auto _ : state) {
    uint64_t sum = 0;
    for (uint64_t i = 0; i < kSeqPages; ++i) {
      uint64_t hpa = 0;
      session.TryTranslate(kSeqBase + i * kPs, &hpa);
      if constexpr (kOpaque) Opaque(hpa);
      sum += hpa;
    }
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(state.iterations() * kSeqPages);
  SetPerPage(
      state,
      kOpaque ? "seq_translate_1gib/array_baseline_opaque" : "seq_translate_1gib/array_baseline",
      timer.NsPer(state.iterations()));
}

// The batched form a DMA map of contiguous guest memory uses: VisitPages over the whole range,
// the same sum in the visitor.
void BM_SeqSessionPages(benchmark::State& state) {
  const Fixture& f = GetFixture();
  Registry::ReadSession session(*f.registry, kSeqContext);
  LoopTimer timer;
  for (auto _ : state) {
    uint64_t sum = 0;
    const uint64_t visited =
        session.VisitPages(kSeqBase, kSeqPages, [&sum](uint64_t hpa) { sum += hpa; });
    benchmark::DoNotOptimize(sum);
    benchmark::DoNotOptimize(visited);
  }
  state.SetItemsProcessed(state.iterations() * kSeqPages);
  SetPerPage(state, "seq_translate_1gib/array_baseline", timer.NsPer(state.iterations()));
}

// --- c) Map + unmap vs pin per map
// ----------------------------------------------------------------

bool IsRoot() { return geteuid() == 0; }

// The backend BM_MapUnmap ran on, for the summary.
std::string& MapBackendName() {
  static auto* name = new std::string("not run");
  return *name;
}

void BM_PinPerMap(benchmark::State& state) {
  if (!IsRoot()) {
    state.SkipWithError("the pin-per-map baseline needs root (mlock + pagemap frame numbers)");
    return;
  }
  absl::StatusOr<PagemapReader> pagemap = PagemapReader::Open();
  const uint64_t ps = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  absl::StatusOr<BackedMemory> memory = BackedMemory::Anonymous(16 * ps);
  if (!pagemap.ok() || !memory.ok()) {
    state.SkipWithError("cannot open pagemap or map memory");
    return;
  }
  std::fill_n(static_cast<char*>(memory->data()), memory->size(), 1);
  uint64_t i = 0;
  for (auto _ : state) {
    void* page = static_cast<char*>(memory->data()) + (i++ & 15) * ps;
    if (mlock(page, ps) != 0) {
      state.SkipWithError("mlock failed");
      break;
    }
    absl::StatusOr<uint64_t> hpa = pagemap->Hpa(reinterpret_cast<uintptr_t>(page));
    if (!hpa.ok()) {
      state.SkipWithError("pagemap read failed");
      break;
    }
    benchmark::DoNotOptimize(*hpa);
    munlock(page, ps);
  }
}

// The registry's map + unmap through a pre-registered region on the memlock backend (root) or,
// without root, the simulated one.
void BM_MapUnmap(benchmark::State& state) {
  std::unique_ptr<PinBackend> backend;
  std::optional<BackedMemory> memory;
  const uint64_t ps = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  uint64_t ua = kRegionBase;
  if (IsRoot()) {
    absl::StatusOr<std::unique_ptr<MemlockBackend>> memlock = MemlockBackend::Create();
    absl::StatusOr<BackedMemory> backed = BackedMemory::Anonymous(16 * ps);
    if (memlock.ok() && backed.ok()) {
      backend = std::move(*memlock);
      memory = std::move(*backed);
      ua = memory->ua();
    }
  }
  if (backend == nullptr) {
    SimBackendOptions options;
    options.page_size = ps;
    options.track_pins = false;
    absl::StatusOr<std::unique_ptr<SimBackend>> sim = SimBackend::Create(options);
    CheckOk("SimBackend::Create", sim.status());
    backend = std::move(*sim);
  }
  state.SetLabel(backend->name() + " backend");
  MapBackendName() = backend->name();
  {
    Registry registry(backend.get());
    CheckOk("CreateContext", registry.CreateContext(1, {}));
    ContainerOptions container;
    container.iommu_page_size = ps;
    CheckOk("CreateContainer", registry.CreateContainer(1, container));
    CheckOk("Register", registry.Register(1, 1, ua, 16 * ps));
    uint64_t i = 0;
    LoopTimer timer;
    for (auto _ : state) {
      const uint64_t page = i++ & 15;
      absl::Status map = registry.Map(1, page * ps, ua + page * ps, ps);
      absl::Status unmap = registry.Unmap(1, page * ps, ps);
      if (!map.ok() || !unmap.ok()) {
        state.SkipWithError(std::string(map.ok() ? unmap.message() : map.message()).c_str());
        break;
      }
    }
    SetSpeedup(state, "map_unmap_one_page/pin_per_map_baseline", timer.NsPer(state.iterations()));
    CheckOk("Unregister", registry.Unregister(1, ua, 16 * ps));
  }
}

// --- d) Reader scaling under a writer ------------------------------------------------------------

constexpr double kWriterOpsPerSecond = 1000;
// Windows of one and of two readers alternate, so that the machine's drift (other tenants, clock
// changes) hits both sides of each ratio alike; the scaling is the median of the windows' ratios.
constexpr int kScalingRounds = 10;
constexpr auto kScalingWindow = std::chrono::milliseconds(300);

// Registers and unregisters one more region at kWriterOpsPerSecond until destroyed.
class SteadyWriter {
 public:
  explicit SteadyWriter(Fixture& f) : f_(f), start_(Clock::now()), thread_([this] { Run(); }) {}
  ~SteadyWriter() { Stop(); }

  void Stop() {
    if (!thread_.joinable()) return;
    stop_.store(true);
    thread_.join();
    seconds_ = std::chrono::duration<double>(Clock::now() - start_).count();
  }
  double seconds() const { return seconds_; }
  uint64_t ops() const { return ops_; }
  uint64_t errors() const { return errors_; }
  double busy_seconds() const { return busy_ns_ * 1e-9; }  // inside Register/Unregister
  double cpu_seconds() const { return cpu_seconds_; }

 private:
  void Run() {
    const auto period = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(1.0 / kWriterOpsPerSecond));
    auto next = Clock::now();
    bool registered = false;
    while (!stop_.load(std::memory_order_relaxed)) {
      const auto op_start = Clock::now();
      const absl::Status status =
          registered ? f_.registry->Unregister(kWriterContainer, f_.spare_ua, kRegionPages * kPs)
                     : f_.registry->Register(kWriterContainer, kSparseContext, f_.spare_ua,
                                             kRegionPages * kPs);
      if (status.ok()) {
        registered = !registered;
      } else {
        ++errors_;
      }
      ++ops_;
      busy_ns_ +=
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - op_start).count();
      next += period;
      std::this_thread::sleep_until(next);
    }
    timespec cpu{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu);
    cpu_seconds_ = static_cast<double>(cpu.tv_sec) + static_cast<double>(cpu.tv_nsec) * 1e-9;
    if (registered) {
      CheckOk("Unregister",
              f_.registry->Unregister(kWriterContainer, f_.spare_ua, kRegionPages * kPs));
    }
  }

  Fixture& f_;
  const Clock::time_point start_;
  std::atomic<bool> stop_{false};
  // Written by the writer thread, read after it is joined.
  uint64_t ops_ = 0;
  uint64_t errors_ = 0;
  int64_t busy_ns_ = 0;
  double cpu_seconds_ = 0;
  double seconds_ = 0;
  std::thread thread_;  // last: starts once the fields above exist
};

// Translations per second of `readers` threads translating random uas for `window`. Reader r
// runs on CPU r (when there is one): the windows are too short to leave placement to the
// scheduler, which at times kept both readers on one CPU for a whole window.
double ReaderWindow(const Fixture& f, int readers, Clock::duration window) {
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> translations{0};
  std::vector<std::thread> threads;
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  for (int r = 0; r < readers; ++r) {
    threads.emplace_back([&, r] {
      if (r < cpus) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(r, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
      }
      const uint64_t* uas = f.random_uas.data();
      size_t i = static_cast<size_t>(r) * 7919;
      uint64_t done = 0;
      uint64_t sum = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        for (int k = 0; k < 64; ++k) {
          absl::StatusOr<uint64_t> hpa =
              f.registry->Translate(kSparseContext, uas[i++ & (kRandomUas - 1)]);
          sum += *hpa;
        }
        done += 64;
      }
      benchmark::DoNotOptimize(sum);
      translations.fetch_add(done);
    });
  }
  const auto start = Clock::now();
  std::this_thread::sleep_for(window);
  stop.store(true);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (std::thread& thread : threads) thread.join();
  return static_cast<double>(translations.load()) / seconds;
}

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

void BM_TranslateUnderWriter(benchmark::State& state) {
  Fixture& f = GetFixture();
  for (auto _ : state) {
    SteadyWriter writer(f);
    std::vector<double> one;
    std::vector<double> two;
    std::vector<double> ratios;
    for (int round = 0; round < kScalingRounds; ++round) {
      one.push_back(ReaderWindow(f, 1, kScalingWindow));
      two.push_back(ReaderWindow(f, 2, kScalingWindow));
      ratios.push_back(two.back() / one.back());
    }
    writer.Stop();
    state.SetIterationTime(writer.seconds());
    state.counters["one_reader_per_s"] = Median(one);
    state.counters["two_readers_per_s"] = Median(two);
    state.counters["scaling"] = Median(ratios);
    state.counters["scaling_min"] = *std::min_element(ratios.begin(), ratios.end());
    state.counters["scaling_max"] = *std::max_element(ratios.begin(), ratios.end());
    state.counters["writer_ops"] = static_cast<double>(writer.ops());
    state.counters["writer_ops_per_s"] = static_cast<double>(writer.ops()) / writer.seconds();
    state.counters["writer_errors"] = static_cast<double>(writer.errors());
    state.counters["writer_busy_pct"] = 100.0 * writer.busy_seconds() / writer.seconds();
    state.counters["writer_cpu_pct"] = 100.0 * writer.cpu_seconds() / writer.seconds();
  }
}

void RegisterBenchmarks() {
  benchmark::RegisterBenchmark("translate_random_10k/list_baseline", BM_TranslateRandomList);
  benchmark::RegisterBenchmark("translate_random_10k/registry_translate",
                               BM_TranslateRandomRegistry);
  benchmark::RegisterBenchmark("translate_random_10k/read_session", BM_TranslateRandomSession);
  benchmark::RegisterBenchmark("seq_translate_1gib/array_baseline", BM_SeqArray<false>)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("seq_translate_1gib/read_session", BM_SeqSession<false>)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("seq_translate_1gib/read_session_pages", BM_SeqSessionPages)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("seq_translate_1gib/array_baseline_opaque", BM_SeqArray<true>)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("seq_translate_1gib/read_session_opaque", BM_SeqSession<true>)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("map_unmap_one_page/pin_per_map_baseline", BM_PinPerMap);
  benchmark::RegisterBenchmark("map_unmap_one_page/registry", BM_MapUnmap);
  benchmark::RegisterBenchmark("translate_under_writer/1_vs_2_readers", BM_TranslateUnderWriter)
      ->Iterations(1)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

// --- Summary ------------------------------------------------------------------------------------

std::string Verdict(bool pass) { return pass ? "PASS" : "FAIL"; }

void PrintSpeedup(const char* name, const char* base_label, const char* base, const char* own_label,
                  const char* own, double target) {
  const Result* b = FindResult(base);
  const Result* o = FindResult(own);
  if (b == nullptr || o == nullptr) {
    std::printf("RATIO %s: not run\n", name);
    return;
  }
  const double speedup = b->ns_per_iter / o->ns_per_iter;
  std::printf("RATIO %s: %s=%.1fns %s=%.1fns speedup=%.0fx target>=%.0fx %s\n", name, base_label,
              b->ns_per_iter, own_label, o->ns_per_iter, speedup, target,
              Verdict(speedup >= target).c_str());
}

void PrintSeq(const char* name, const char* base, const char* own, double target) {
  const Result* b = FindResult(base);
  const Result* o = FindResult(own);
  if (b == nullptr || o == nullptr) {
    std::printf("RATIO %s: not run\n", name);
    return;
  }
  const double ratio = o->ns_per_iter / b->ns_per_iter;
  std::printf("RATIO %s: array=%.3fns/page session=%.3fns/page ratio=%.2fx target<=%.1fx %s\n",
              name, b->ns_per_iter / kSeqPages, o->ns_per_iter / kSeqPages, ratio, target,
              Verdict(ratio <= target).c_str());
}

void PrintSummary() {
  std::printf("\n");
  PrintSpeedup("translate_random_10k", "list", "translate_random_10k/list_baseline", "registry",
               "translate_random_10k/registry_translate", 500);
  PrintSpeedup("translate_random_10k_session", "list", "translate_random_10k/list_baseline",
               "session", "translate_random_10k/read_session", 500);
  PrintSeq("seq_translate_1gib", "seq_translate_1gib/array_baseline",
           "seq_translate_1gib/read_session", 2.0);
  PrintSeq("seq_translate_1gib_pages (ReadSession::VisitPages)",
           "seq_translate_1gib/array_baseline", "seq_translate_1gib/read_session_pages", 2.0);
  PrintSeq("seq_translate_1gib_opaque (informational, no SIMD)",
           "seq_translate_1gib/array_baseline_opaque", "seq_translate_1gib/read_session_opaque",
           2.0);
  if (!IsRoot()) {
    std::printf("RATIO map_unmap_one_page: baseline needs root (mlock + pagemap); skipped\n");
  } else {
    PrintSpeedup("map_unmap_one_page", "pin_per_map", "map_unmap_one_page/pin_per_map_baseline",
                 "registry", "map_unmap_one_page/registry", 200);
  }
  const Result* scaling = FindResult("translate_under_writer/1_vs_2_readers");
  if (scaling == nullptr) {
    std::printf("RATIO translate_2_readers_vs_1: not run\n");
  } else {
    const auto& c = scaling->counters;
    std::printf(
        "RATIO translate_2_readers_vs_1: 1reader=%.2fM/s 2readers=%.2fM/s scaling=%.2fx "
        "target>=1.8x %s (median of %d alternating %lld ms windows, range %.2f-%.2fx; writer ops "
        "%.0f/s, target %.0f; writer inside an op %.1f%% of the wall time, on a CPU %.1f%%)\n",
        c.at("one_reader_per_s") / 1e6, c.at("two_readers_per_s") / 1e6, c.at("scaling"),
        Verdict(c.at("scaling") >= 1.8).c_str(), kScalingRounds,
        static_cast<long long>(kScalingWindow.count()), c.at("scaling_min"), c.at("scaling_max"),
        c.at("writer_ops_per_s"), kWriterOpsPerSecond, c.at("writer_busy_pct"),
        c.at("writer_cpu_pct"));
  }
  std::printf("(online cpus: %ld; map_unmap registry backend: %s)\n", sysconf(_SC_NPROCESSORS_ONLN),
              MapBackendName().c_str());
}

}  // namespace
}  // namespace dmapin::agent

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  dmapin::agent::RegisterBenchmarks();
  dmapin::agent::CollectingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  dmapin::agent::PrintSummary();
  benchmark::Shutdown();
  return 0;
}
