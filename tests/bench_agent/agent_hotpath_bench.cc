// The node agent's DMA hot path end to end: 1-page MapDma + UnmapDma over the Unix socket.
//
// Starts the real dmapin-agent (sim backend, its own state dir, no TCP, metrics off unless
// --agent_metrics), creates one context, one container and one large registered region, then for
// each concurrency N in --concurrency keeps N calls in flight for --duration seconds: N workers,
// each mapping its own IOMMU page and unmapping it again, on gRPC's callback client API over
// --channels connections. Per N it prints calls/s (each MapDma and each UnmapDma is one call), the
// agent's CPU time over the window (utime + stime from /proc/<pid>/stat), calls per
// agent-CPU-second ("per core"), p50/p99 latency as the client sees it, and the client's own CPU.
//
// In the same run, one-thread in-process baselines of the same work: NodeAgent::MapDma+UnmapDma
// with a StateStore in a temp dir (what the agent does per call without gRPC: the registry and
// one mapping-journal append) and
// Registry::Map+Unmap alone (no durability). The overhead ratio is agent CPU per call over gRPC
// divided by the in-process cost per call.
//
//   bazel run -c opt //tests/bench_agent:agent_hotpath_bench [-- --concurrency=1,4,16,64]
//   (the agent comes from the data dependency; --agent_binary=PATH overrides it)
//
// Profiling the agent under the same load:
//   ... -- --agent_prefix="valgrind --tool=callgrind --callgrind-out-file=/tmp/agent.cg"
//          --duration=2 --concurrency=1,16 --startup_timeout=120
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "agent/node/node_agent.h"
#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
#include "agent/store/state_store.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "testing/agent_process.h"

ABSL_FLAG(std::string, agent_binary, "",
          "The dmapin-agent executable (default: the one in this binary's runfiles).");
ABSL_FLAG(std::string, agent_prefix, "",
          "Command words run before the agent, space-separated (e.g. \"valgrind "
          "--tool=callgrind\").");
ABSL_FLAG(bool, agent_metrics, false,
          "Run the agent with metrics on (--metrics_address=127.0.0.1:0) instead of off; the "
          "bench then also reports mapping-journal records per fold into SQLite from /metrics, "
          "scraped outside the measured windows.");
ABSL_FLAG(std::string, api, "unary",
          "How the workers call: 'unary' (a MapDma or UnmapDma RPC per call) or 'session' (each "
          "worker keeps one DmaSession stream and sends its calls on it).");
ABSL_FLAG(std::string, concurrency, "1,4,16,64", "Calls in flight, comma-separated.");
ABSL_FLAG(double, duration, 3.0, "Measured seconds per concurrency level.");
ABSL_FLAG(double, warmup, 0.3, "Unmeasured seconds before each measurement.");
ABSL_FLAG(int, channels, 4, "Client connections to the agent (at most one per worker).");
ABSL_FLAG(int, containers, 1,
          "Containers the workers spread over (all register the same region). The agent orders "
          "each container's maps under a per-container lock held across the journal append, so "
          "with one container the calls are serialized end to end.");
ABSL_FLAG(double, baseline_duration, 2.0, "Seconds per in-process baseline.");
ABSL_FLAG(uint64_t, page_size, 65536, "The simulated node's page size (bytes): one map's size.");
ABSL_FLAG(double, startup_timeout, 30.0, "Seconds to wait for the agent to serve.");

namespace dmapin::agent {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kRegionUa = uint64_t{1} << 32;
constexpr uint64_t kRegionPages = 16384;  // 1 GiB of 64 KiB pages
constexpr char kContext[] = "bench";

std::string ContainerName(int i) { return absl::StrCat("bench/vfio-", i); }

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// utime + stime of process `pid`, in seconds.
absl::StatusOr<double> ProcessCpuSeconds(pid_t pid) {
  std::ifstream file(absl::StrCat("/proc/", pid, "/stat"));
  std::string stat((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  // The command name (field 2) may hold spaces: parse after its closing parenthesis.
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return absl::NotFoundError(absl::StrCat("no process ", pid));
  std::vector<std::string> fields = absl::StrSplit(stat.substr(paren + 2), ' ');
  // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
  uint64_t utime = 0;
  uint64_t stime = 0;
  if (fields.size() < 13 || !absl::SimpleAtoi(fields[11], &utime) ||
      !absl::SimpleAtoi(fields[12], &stime)) {
    return absl::InternalError(absl::StrCat("cannot parse /proc/", pid, "/stat"));
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

double SelfCpuSeconds() {
  rusage usage = {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

// --- The agent's /metrics ------------------------------------------------------------------------

using harness::MetricValue;
using harness::ScrapeMetrics;

// The mapping journal's appends and folds (one SQLite transaction each).
struct StoreCounts {
  double records = 0;
  double folds = 0;
};

std::optional<StoreCounts> ScrapeStoreCounts(int port) {
  if (port == 0) return std::nullopt;
  absl::StatusOr<std::string> text = ScrapeMetrics(port);
  if (!text.ok()) return std::nullopt;
  std::optional<double> records = MetricValue(*text, "dmapin_agent_store_journal_records_total");
  std::optional<double> folds = MetricValue(*text, "dmapin_agent_store_journal_folds_total");
  if (!records.has_value() || !folds.has_value()) return std::nullopt;
  return StoreCounts{*records, *folds};
}

// --- The agent process ---------------------------------------------------------------------------

std::string FindAgent(const char* argv0) {
  std::string flag = absl::GetFlag(FLAGS_agent_binary);
  if (!flag.empty()) return flag;
  std::vector<std::string> candidates;
  if (const char* runfiles = std::getenv("RUNFILES_DIR")) {
    candidates.push_back(absl::StrCat(runfiles, "/dmapin/agent/dmapin-agent"));
  }
  candidates.push_back(absl::StrCat(argv0, ".runfiles/dmapin/agent/dmapin-agent"));
  candidates.push_back("agent/dmapin-agent");  // cwd of `bazel run`: the runfiles tree
  for (const std::string& candidate : candidates) {
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

class AgentProcess {
 public:
  static absl::StatusOr<std::unique_ptr<AgentProcess>> Start(const std::string& binary,
                                                             const std::string& dir) {
    const std::string socket = dir + "/a.sock";
    const std::string log = dir + "/agent.log";
    std::vector<std::string> args;
    for (absl::string_view word :
         absl::StrSplit(absl::GetFlag(FLAGS_agent_prefix), ' ', absl::SkipEmpty())) {
      args.emplace_back(word);
    }
    args.push_back(binary);
    args.push_back("--backend=sim");
    args.push_back(absl::StrCat("--sim_page_size=", absl::GetFlag(FLAGS_page_size)));
    args.push_back("--tcp_address=");
    args.push_back("--uds_path=" + socket);
    args.push_back("--state_dir=" + dir + "/state");
    args.push_back(absl::GetFlag(FLAGS_agent_metrics) ? "--metrics_address=127.0.0.1:0"
                                                      : "--metrics_address=");
    std::fprintf(stderr, "agent: %s\n", absl::StrJoin(args, " ").c_str());
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid < 0) return absl::InternalError("fork failed");
    if (pid == 0) {
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      execvp(argv[0], argv.data());
      _exit(127);
    }
    auto process = std::unique_ptr<AgentProcess>(new AgentProcess(pid, socket, log));
    if (absl::Status status = process->AwaitServing(); !status.ok()) return status;
    return process;
  }

  ~AgentProcess() {
    if (!reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  pid_t pid() const { return pid_; }
  // The agent's metrics port (0 when metrics are off).
  int metrics_port() const { return metrics_port_; }
  std::string target() const { return "unix:" + socket_; }
  const std::string& log() const { return log_; }

  // SIGTERM and wait (the agent shuts down gracefully; callgrind writes its profile then).
  void Stop() {
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    reaped_ = true;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::fprintf(stderr, "agent exited with wait status %d (log %s)\n", status, log_.c_str());
    }
  }

 private:
  AgentProcess(pid_t pid, std::string socket, std::string log)
      : pid_(pid), socket_(std::move(socket)), log_(std::move(log)) {}

  absl::Status AwaitServing() {
    std::shared_ptr<grpc::Channel> channel =
        grpc::CreateChannel(target(), grpc::InsecureChannelCredentials());
    auto stub = v1::NodeAgent::NewStub(channel);
    const Clock::time_point deadline =
        Clock::now() + std::chrono::milliseconds(
                           static_cast<int64_t>(absl::GetFlag(FLAGS_startup_timeout) * 1000));
    while (Clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        reaped_ = true;
        return absl::InternalError(
            absl::StrCat("the agent exited (wait status ", status, "); see ", log_));
      }
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
      context.set_wait_for_ready(true);
      v1::GetNodeStatusRequest request;
      v1::NodeStatus response;
      if (stub->GetNodeStatus(&context, request, &response).ok()) {
        ReadMetricsPort();
        return absl::OkStatus();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return absl::DeadlineExceededError(absl::StrCat("the agent did not serve; see ", log_));
  }

  // From the agent's log line "... (metrics port N)".
  void ReadMetricsPort() {
    std::ifstream file(log_);
    std::string line;
    while (std::getline(file, line)) {
      const size_t at = line.find("(metrics port ");
      if (at == std::string::npos) continue;
      absl::string_view rest = absl::string_view(line).substr(at + 14);
      rest = rest.substr(0, rest.find(')'));
      if (!absl::SimpleAtoi(rest, &metrics_port_)) metrics_port_ = 0;
    }
  }

  const pid_t pid_;
  const std::string socket_;
  const std::string log_;
  bool reaped_ = false;
  int metrics_port_ = 0;
};

// --- The gRPC load -------------------------------------------------------------------------------

struct Phase {
  std::atomic<bool> measuring{false};
  std::atomic<bool> stopping{false};
  std::mutex mu;
  std::condition_variable done;
  int active = 0;  // guarded by mu
};

// One call in flight at a time: MapDma of its own page, then UnmapDma of it, and again. As unary
// RPCs, or (with a session) as requests on the worker's own DmaSession stream.
class Worker {
 public:
  Worker(v1::NodeAgent::Stub* stub, Phase* phase, const std::string& container, uint64_t iova,
         uint64_t ua, uint64_t size, bool session)
      : stub_(stub), phase_(phase) {
    map_request_.set_container(container);
    map_request_.set_iova(iova);
    map_request_.set_ua(ua);
    map_request_.set_size(size);
    unmap_request_.set_container(container);
    unmap_request_.set_iova(iova);
    unmap_request_.set_size(size);
    latencies_ns_.reserve(1 << 16);
    if (session) session_ = std::make_unique<Session>(this);
  }

  ~Worker() {
    if (session_ != nullptr) session_->AwaitDone();
  }

  void Begin() { Issue(/*map=*/true); }

  const std::vector<uint32_t>& latencies_ns() const { return latencies_ns_; }
  uint64_t calls() const { return calls_; }
  uint64_t errors() const { return errors_; }
  const std::string& first_error() const { return first_error_; }

 private:
  // The worker's DmaSession stream: one request and its response at a time. The response can
  // arrive before gRPC reports the request's write done, so the next write (or the close) waits
  // for that report.
  class Session : public grpc::ClientBidiReactor<v1::DmaSessionRequest, v1::DmaSessionResponse> {
   public:
    explicit Session(Worker* worker) : worker_(worker) {
      worker->stub_->async()->DmaSession(&context_, this);
      StartCall();
    }

    void Send(bool map) {
      std::lock_guard<std::mutex> lock(mu_);
      next_.Clear();
      next_.set_tag(++tag_);
      if (map) {
        *next_.mutable_map() = worker_->map_request_;
      } else {
        *next_.mutable_unmap() = worker_->unmap_request_;
      }
      sent_map_ = map;
      StartRead(&response_);
      if (writing_) {
        next_pending_ = true;
      } else {
        WriteNextLocked();
      }
    }
    void Close() {
      std::lock_guard<std::mutex> lock(mu_);
      if (writing_) {
        close_pending_ = true;
      } else {
        StartWritesDone();
      }
    }

    void OnWriteDone(bool ok) override {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (ok && next_pending_) {
        next_pending_ = false;
        WriteNextLocked();
      } else if (close_pending_) {
        close_pending_ = false;
        StartWritesDone();
      }
    }
    void OnReadDone(bool ok) override {
      grpc::Status status;
      bool was_map = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        was_map = sent_map_;
        if (!ok) {
          status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "DmaSession stream ended");
        } else if (response_.tag() != tag_) {
          status = grpc::Status(grpc::StatusCode::INTERNAL, "DmaSession answered the wrong tag");
        } else if (response_.code() != 0) {
          status =
              grpc::Status(static_cast<grpc::StatusCode>(response_.code()), response_.message());
        }
      }
      worker_->OnDone(was_map, status);
    }
    void OnDone(const grpc::Status&) override {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      done_cv_.notify_all();
    }
    void AwaitDone() {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [this] { return done_; });
    }

   private:
    void WriteNextLocked() {
      writing_ = true;
      request_ = next_;
      StartWrite(&request_);
    }

    Worker* const worker_;
    grpc::ClientContext context_;
    std::mutex mu_;
    v1::DmaSessionRequest request_;  // being written
    v1::DmaSessionRequest next_;
    v1::DmaSessionResponse response_;
    uint64_t tag_ = 0;
    bool sent_map_ = false;
    bool writing_ = false;
    bool next_pending_ = false;
    bool close_pending_ = false;
    bool done_ = false;
    std::condition_variable done_cv_;
  };

  void Issue(bool map) {
    sent_ = Clock::now();
    if (session_ != nullptr) {
      session_->Send(map);
      return;
    }
    context_ = std::make_unique<grpc::ClientContext>();
    if (map) {
      stub_->async()->MapDma(context_.get(), &map_request_, &map_response_,
                             [this](grpc::Status status) { OnDone(true, status); });
    } else {
      stub_->async()->UnmapDma(context_.get(), &unmap_request_, &unmap_response_,
                               [this](grpc::Status status) { OnDone(false, status); });
    }
  }

  void OnDone(bool was_map, const grpc::Status& status) {
    const Clock::time_point now = Clock::now();
    if (phase_->measuring.load(std::memory_order_relaxed)) {
      latencies_ns_.push_back(static_cast<uint32_t>(
          std::min<int64_t>(std::chrono::nanoseconds(now - sent_).count(), UINT32_MAX)));
      ++calls_;
    }
    bool mapped = was_map;
    if (!status.ok()) {
      ++errors_;
      if (first_error_.empty()) {
        first_error_ = absl::StrCat(was_map ? "MapDma: " : "UnmapDma: ", status.error_message());
      }
      mapped = false;  // a failed map leaves nothing to unmap; a failed unmap is retried as map
    }
    // Stop only with the page unmapped, so that the next phase starts from a clean table.
    if (phase_->stopping.load(std::memory_order_relaxed) && !mapped) {
      if (session_ != nullptr) session_->Close();
      std::lock_guard<std::mutex> lock(phase_->mu);
      if (--phase_->active == 0) phase_->done.notify_all();
      return;
    }
    Issue(/*map=*/!mapped);
  }

  v1::NodeAgent::Stub* const stub_;
  Phase* const phase_;
  std::unique_ptr<Session> session_;
  std::unique_ptr<grpc::ClientContext> context_;
  v1::MapDmaRequest map_request_;
  v1::MapDmaResponse map_response_;
  v1::UnmapDmaRequest unmap_request_;
  v1::UnmapDmaResponse unmap_response_;
  Clock::time_point sent_;
  std::vector<uint32_t> latencies_ns_;
  uint64_t calls_ = 0;
  uint64_t errors_ = 0;
  std::string first_error_;
};

struct LoadResult {
  int in_flight = 0;
  double seconds = 0;
  uint64_t calls = 0;
  uint64_t errors = 0;
  double agent_cpu = 0;
  double client_cpu = 0;
  double p50_us = 0;
  double p99_us = 0;
  // Journal records and folds in the window (with --agent_metrics).
  std::optional<StoreCounts> store;
};

absl::StatusOr<LoadResult> RunLoad(const std::vector<std::unique_ptr<v1::NodeAgent::Stub>>& stubs,
                                   pid_t agent, int metrics_port, int in_flight) {
  const uint64_t page = absl::GetFlag(FLAGS_page_size);
  const int containers = std::max(1, absl::GetFlag(FLAGS_containers));
  Phase phase;
  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < in_flight; ++i) {
    workers.push_back(std::make_unique<Worker>(
        stubs[i % stubs.size()].get(), &phase, ContainerName(i % containers),
        /*iova=*/uint64_t(i) * page,
        /*ua=*/kRegionUa + uint64_t(i) * page, page, absl::GetFlag(FLAGS_api) == "session"));
  }
  phase.active = in_flight;
  for (auto& worker : workers) worker->Begin();
  std::this_thread::sleep_for(
      std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_warmup) * 1000)));

  const std::optional<StoreCounts> store0 = ScrapeStoreCounts(metrics_port);
  absl::StatusOr<double> cpu0 = ProcessCpuSeconds(agent);
  const double client0 = SelfCpuSeconds();
  const Clock::time_point t0 = Clock::now();
  phase.measuring = true;
  std::this_thread::sleep_for(
      std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_duration) * 1000)));
  phase.measuring = false;
  const Clock::time_point t1 = Clock::now();
  absl::StatusOr<double> cpu1 = ProcessCpuSeconds(agent);
  const double client1 = SelfCpuSeconds();
  const std::optional<StoreCounts> store1 = ScrapeStoreCounts(metrics_port);

  phase.stopping = true;
  {
    std::unique_lock<std::mutex> lock(phase.mu);
    phase.done.wait(lock, [&] { return phase.active == 0; });
  }
  if (!cpu0.ok()) return cpu0.status();
  if (!cpu1.ok()) return cpu1.status();

  LoadResult result{.in_flight = in_flight,
                    .seconds = Seconds(t1 - t0),
                    .agent_cpu = *cpu1 - *cpu0,
                    .client_cpu = client1 - client0};
  if (store0.has_value() && store1.has_value()) {
    result.store = StoreCounts{store1->records - store0->records, store1->folds - store0->folds};
  }
  std::vector<uint32_t> latencies;
  for (const auto& worker : workers) {
    result.calls += worker->calls();
    result.errors += worker->errors();
    latencies.insert(latencies.end(), worker->latencies_ns().begin(), worker->latencies_ns().end());
    if (!worker->first_error().empty() && result.errors == worker->errors()) {
      std::fprintf(stderr, "first error: %s\n", worker->first_error().c_str());
    }
  }
  if (!latencies.empty()) {
    auto percentile = [&](double q) {
      const size_t k = std::min(latencies.size() - 1, static_cast<size_t>(q * latencies.size()));
      std::nth_element(latencies.begin(), latencies.begin() + k, latencies.end());
      return latencies[k] / 1000.0;
    };
    result.p50_us = percentile(0.50);
    result.p99_us = percentile(0.99);
  }
  return result;
}

absl::Status Check(const grpc::Status& status, absl::string_view what) {
  if (status.ok()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", status.error_message()));
}

absl::Status SetUpAgent(v1::NodeAgent::Stub& stub) {
  const uint64_t page = absl::GetFlag(FLAGS_page_size);
  {
    grpc::ClientContext context;
    v1::CreateContextRequest request;
    request.set_name(kContext);
    request.set_memlock_unlimited(true);
    v1::Context response;
    if (auto s = Check(stub.CreateContext(&context, request, &response), "CreateContext");
        !s.ok()) {
      return s;
    }
  }
  for (int i = 0; i < std::max(1, absl::GetFlag(FLAGS_containers)); ++i) {
    {
      grpc::ClientContext context;
      v1::CreateContainerRequest request;
      request.set_name(ContainerName(i));
      request.set_iommu_page_size(page);
      v1::Container response;
      if (auto s = Check(stub.CreateContainer(&context, request, &response), "CreateContainer");
          !s.ok()) {
        return s;
      }
    }
    grpc::ClientContext context;
    v1::RegisterRegionRequest request;
    request.set_container(ContainerName(i));
    request.set_context(kContext);
    request.set_ua(kRegionUa);
    request.set_size(kRegionPages * page);
    v1::Region response;
    if (auto s = Check(stub.RegisterRegion(&context, request, &response), "RegisterRegion");
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

// --- In-process baselines ------------------------------------------------------------------------

// Runs `op` (one call) in a loop on this thread for the baseline duration; calls per second.
template <typename Op>
double CallsPerSecond(Op op) {
  const double duration = absl::GetFlag(FLAGS_baseline_duration);
  for (int i = 0; i < 1000; ++i) op();  // warm up
  uint64_t calls = 0;
  const Clock::time_point t0 = Clock::now();
  Clock::time_point now = t0;
  while (Seconds(now - t0) < duration) {
    for (int i = 0; i < 256; ++i) op();
    calls += 256;
    now = Clock::now();
  }
  return static_cast<double>(calls) / Seconds(now - t0);
}

absl::StatusOr<double> NodeAgentBaseline(const std::string& dir) {
  const uint64_t page = absl::GetFlag(FLAGS_page_size);
  absl::StatusOr<std::unique_ptr<SimBackend>> sim = SimBackend::Create({.page_size = page});
  if (!sim.ok()) return sim.status();
  absl::StatusOr<std::unique_ptr<StateStore>> store = StateStore::Open(dir);
  if (!store.ok()) return store.status();
  absl::StatusOr<std::unique_ptr<NodeAgent>> agent =
      NodeAgent::Create({.node_name = "bench", .backend = sim->get(), .store = store->get()});
  if (!agent.ok()) return agent.status();
  NodeAgent& a = **agent;
  if (auto s = a.CreateContext({.name = kContext}); !s.ok()) return s.status();
  if (auto s = a.CreateContainer({.name = ContainerName(0), .iommu_page_size = page}); !s.ok()) {
    return s.status();
  }
  if (auto s = a.RegisterRegion(ContainerName(0), kContext, kRegionUa, kRegionPages * page);
      !s.ok()) {
    return s.status();
  }
  absl::Status failure;
  bool map = true;
  const double rate = CallsPerSecond([&] {
    absl::Status s = map ? a.MapDma(ContainerName(0), 0, kRegionUa, page)
                         : a.UnmapDma(ContainerName(0), 0, page);
    if (!s.ok() && failure.ok()) failure = s;
    map = !map;
  });
  if (!failure.ok()) return failure;
  return rate;
}

absl::StatusOr<double> RegistryBaseline() {
  const uint64_t page = absl::GetFlag(FLAGS_page_size);
  absl::StatusOr<std::unique_ptr<SimBackend>> sim = SimBackend::Create({.page_size = page});
  if (!sim.ok()) return sim.status();
  Registry registry(sim->get());
  if (auto s = registry.CreateContext(1, {}); !s.ok()) return s;
  if (auto s = registry.CreateContainer(2, {.iommu_page_size = page}); !s.ok()) return s;
  if (auto s = registry.Register(2, 1, kRegionUa, kRegionPages * page); !s.ok()) return s;
  absl::Status failure;
  bool map = true;
  const double rate = CallsPerSecond([&] {
    absl::Status s = map ? registry.Map(2, 0, kRegionUa, page) : registry.Unmap(2, 0, page);
    if (!s.ok() && failure.ok()) failure = s;
    map = !map;
  });
  if (!failure.ok()) return failure;
  return rate;
}

// --- main ----------------------------------------------------------------------------------------

int Run(const char* argv0) {
  const std::string binary = FindAgent(argv0);
  if (binary.empty()) {
    std::fprintf(stderr, "no dmapin-agent found: pass --agent_binary=PATH\n");
    return 2;
  }
  std::vector<int> levels;
  for (absl::string_view item :
       absl::StrSplit(absl::GetFlag(FLAGS_concurrency), ',', absl::SkipEmpty())) {
    int n = 0;
    if (!absl::SimpleAtoi(item, &n) || n < 1 || uint64_t(n) > kRegionPages) {
      std::fprintf(stderr, "--concurrency: bad level \"%s\"\n", std::string(item).c_str());
      return 2;
    }
    levels.push_back(n);
  }
  char dir_template[] = "/tmp/dmapin_hotpath.XXXXXX";
  if (mkdtemp(dir_template) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::string dir = dir_template;

  int rc = 0;
  std::vector<LoadResult> results;
  {
    absl::StatusOr<std::unique_ptr<AgentProcess>> agent = AgentProcess::Start(binary, dir);
    if (!agent.ok()) {
      std::fprintf(stderr, "%s\n", agent.status().ToString().c_str());
      std::filesystem::remove_all(dir);
      return 1;
    }
    const int channels = std::max(1, absl::GetFlag(FLAGS_channels));
    std::vector<std::unique_ptr<v1::NodeAgent::Stub>> stubs;
    for (int i = 0; i < channels; ++i) {
      grpc::ChannelArguments args;
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per channel
      args.SetInt("dmapin.bench_channel", i);
      stubs.push_back(v1::NodeAgent::NewStub(
          grpc::CreateCustomChannel((*agent)->target(), grpc::InsecureChannelCredentials(), args)));
    }
    if (absl::Status s = SetUpAgent(*stubs[0]); !s.ok()) {
      std::fprintf(stderr, "setup: %s\n", s.ToString().c_str());
      rc = 1;
    }
    for (int level : levels) {
      if (rc != 0) break;
      absl::StatusOr<LoadResult> result =
          RunLoad(stubs, (*agent)->pid(), (*agent)->metrics_port(), level);
      if (!result.ok()) {
        std::fprintf(stderr, "N=%d: %s\n", level, result.status().ToString().c_str());
        rc = 1;
        break;
      }
      std::fprintf(stderr, "N=%d done: %.0f calls/s\n", level, result->calls / result->seconds);
      results.push_back(*result);
    }
    (*agent)->Stop();
  }

  absl::StatusOr<double> node_agent = NodeAgentBaseline(dir + "/inproc");
  absl::StatusOr<double> registry = RegistryBaseline();
  std::filesystem::remove_all(dir);

  std::printf(
      "\nagent hot path: 1-page (%llu bytes) MapDma + UnmapDma over the Unix socket, %s, "
      "callback client, %d connection(s), %d container(s), agent metrics %s\n",
      static_cast<unsigned long long>(absl::GetFlag(FLAGS_page_size)),
      absl::GetFlag(FLAGS_api) == "session" ? "one DmaSession stream per worker" : "unary RPCs",
      std::max(1, absl::GetFlag(FLAGS_channels)), std::max(1, absl::GetFlag(FLAGS_containers)),
      absl::GetFlag(FLAGS_agent_metrics) ? "on" : "off");
  std::printf("%6s %12s %10s %17s %10s %10s %11s %8s %12s\n", "N", "calls/s", "agent CPU",
              "calls/agent-CPU-s", "p50 us", "p99 us", "client CPU", "errors", "records/fold");
  for (const LoadResult& r : results) {
    std::string per_fold = "-";
    if (r.store.has_value() && r.store->folds > 0) {
      per_fold = absl::StrFormat("%.0f", r.store->records / r.store->folds);
    }
    std::printf("%6d %12.0f %9.2fs %17.0f %10.1f %10.1f %10.2fs %8llu %12s\n", r.in_flight,
                r.calls / r.seconds, r.agent_cpu, r.agent_cpu > 0 ? r.calls / r.agent_cpu : 0.0,
                r.p50_us, r.p99_us, r.client_cpu, static_cast<unsigned long long>(r.errors),
                per_fold.c_str());
    if (r.errors > 0) rc = 1;
  }
  std::printf("\nin-process baselines, one thread (calls/s; a call is one map or one unmap):\n");
  if (node_agent.ok()) {
    std::printf("  NodeAgent::MapDma/UnmapDma + journal record:   %12.0f  (%.2f us/call)\n",
                *node_agent, 1e6 / *node_agent);
  } else {
    std::printf("  NodeAgent baseline failed: %s\n", node_agent.status().ToString().c_str());
    rc = 1;
  }
  if (registry.ok()) {
    std::printf("  Registry::Map/Unmap alone:                      %12.0f  (%.2f us/call)\n",
                *registry, 1e6 / *registry);
  } else {
    std::printf("  Registry baseline failed: %s\n", registry.status().ToString().c_str());
    rc = 1;
  }
  if (node_agent.ok() && registry.ok()) {
    std::printf("\noverhead: agent CPU per call over gRPC/UDS vs in-process cost per call\n");
    std::printf("%6s %14s %18s %18s\n", "N", "agent us/call", "x NodeAgent call",
                "x Registry call");
    for (const LoadResult& r : results) {
      if (r.calls == 0) continue;
      const double us = 1e6 * r.agent_cpu / r.calls;
      std::printf("%6d %14.2f %18.1f %18.1f\n", r.in_flight, us, us / (1e6 / *node_agent),
                  us / (1e6 / *registry));
    }
  }
  constexpr double kTarget = 50000;
  double best = 0;
  for (const LoadResult& r : results) {
    if (r.agent_cpu > 0) best = std::max(best, r.calls / r.agent_cpu);
  }
  std::printf("\ntarget: >= %.0f calls per agent-CPU-second; best here %.0f: %s\n", kTarget, best,
              best >= kTarget ? "MET" : "NOT MET");
  return rc;
}

}  // namespace
}  // namespace dmapin::agent

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Benchmarks the dmapin agent's DMA hot path (1-page MapDma + UnmapDma over the Unix "
      "socket) against in-process baselines.");
  absl::ParseCommandLine(argc, argv);
  // As the agent does: Debian's Abseil checks every absl::Mutex (gRPC's) for deadlocks otherwise,
  // and the client shares the machine's cores with the agent.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  if (const std::string api = absl::GetFlag(FLAGS_api); api != "unary" && api != "session") {
    std::fprintf(stderr, "--api must be 'unary' or 'session', not '%s'\n", api.c_str());
    return 2;
  }
  return dmapin::agent::Run(argv[0]);
}
