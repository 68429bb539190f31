#include "tests/fleet/fleet_harness.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/mutex.h"

namespace dmapin {
namespace fleetsim {

uint64_t RaiseNofileLimit(uint64_t want) {
  rlimit limit = {};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return 0;
  if (limit.rlim_cur >= want) return limit.rlim_cur;
  if (limit.rlim_max < want) {
    rlimit raised = {want, want};
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) return want;
  }
  limit.rlim_cur = std::min<rlim_t>(want, limit.rlim_max);
  setrlimit(RLIMIT_NOFILE, &limit);
  getrlimit(RLIMIT_NOFILE, &limit);
  return limit.rlim_cur;
}

// --- ServerUnderTest --------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<ServerUnderTest>> ServerUnderTest::Start(
    const std::string& binary, const std::vector<std::string>& extra_args) {
  std::unique_ptr<ServerUnderTest> server(new ServerUnderTest());
  absl::StatusOr<std::unique_ptr<harness::ScratchDir>> dir =
      harness::ScratchDir::Create("dmapin-fleetsim");
  if (!dir.ok()) return dir.status();
  server->dir_ = std::move(*dir);
  std::vector<std::string> args = {"--grpc_address=127.0.0.1:0", "--metrics_address=127.0.0.1:0",
                                   "--state_dir=" + server->dir_->Join("state")};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  absl::StatusOr<std::unique_ptr<harness::AgentProcess>> process = harness::AgentProcess::Start(
      {.binary = binary, .args = args, .log_path = server->dir_->Join("server.log"), .tcp = true});
  if (!process.ok()) return process.status();
  server->process_ = std::move(*process);
  server->metrics_port_ = harness::PortFromLog(server->process_->LogTail(100000), "metrics");
  if (server->metrics_port_ == 0) {
    return absl::InternalError(
        absl::StrCat("no metrics port in the server's log:\n", server->process_->LogTail()));
  }
  server->admin_ = v1::Admin::NewStub(harness::MakeChannel(server->target()));
  return server;
}

ServerUnderTest::~ServerUnderTest() = default;

absl::Status ServerUnderTest::Stop() { return process_->Terminate(absl::Seconds(20)); }

// --- /proc ------------------------------------------------------------------------------------

ProcUsage ReadProcUsage(pid_t pid) {
  const std::string base = pid == 0 ? "/proc/self" : absl::StrCat("/proc/", pid);
  ProcUsage usage;
  {
    std::ifstream in(base + "/stat");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // The command may hold spaces: fields count from after its closing parenthesis.
    const size_t close = text.rfind(')');
    if (close != std::string::npos) {
      std::vector<std::string> fields = absl::StrSplit(text.substr(close + 2), ' ');
      // Field 14 (utime) and 15 (stime) of stat(5) are 12 and 13 here (state is field 3 -> 1).
      uint64_t utime = 0;
      uint64_t stime = 0;
      if (fields.size() > 13 && absl::SimpleAtoi(fields[11], &utime) &&
          absl::SimpleAtoi(fields[12], &stime)) {
        usage.cpu_seconds =
            static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
      }
    }
  }
  std::ifstream status(base + "/status");
  std::string line;
  while (std::getline(status, line)) {
    absl::string_view view = line;
    uint64_t* target = nullptr;
    uint64_t scale = 1024;
    if (absl::ConsumePrefix(&view, "VmRSS:")) {
      target = &usage.rss_bytes;
    } else if (absl::ConsumePrefix(&view, "VmHWM:")) {
      target = &usage.rss_peak_bytes;
    } else if (absl::ConsumePrefix(&view, "Threads:")) {
      target = &usage.threads;
      scale = 1;
    }
    if (target == nullptr) continue;
    view = absl::StripAsciiWhitespace(view);
    absl::ConsumeSuffix(&view, " kB");
    uint64_t value = 0;
    if (absl::SimpleAtoi(view, &value)) *target = value * scale;
  }
  return usage;
}

// --- Metrics ----------------------------------------------------------------------------------

absl::StatusOr<Scrape> TimedScrape(int port) {
  const absl::Time start = absl::Now();
  absl::StatusOr<std::string> text = harness::ScrapeMetrics(port);
  if (!text.ok()) return text.status();
  return Scrape{.text = std::move(*text), .took = absl::Now() - start};
}

double SumMetric(absl::string_view exposition, absl::string_view name) {
  double sum = 0;
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!absl::ConsumePrefix(&line, name) || line.empty()) continue;
    if (line[0] == '{') {
      const size_t close = line.rfind('}');
      if (close == absl::string_view::npos) continue;
      line.remove_prefix(close + 1);
    }
    if (line.empty() || line[0] != ' ') continue;  // a longer name with this prefix
    double value = 0;
    if (absl::SimpleAtod(absl::StripAsciiWhitespace(line), &value)) sum += value;
  }
  return sum;
}

uint64_t CountSeries(absl::string_view exposition) {
  uint64_t count = 0;
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!line.empty() && line[0] != '#') ++count;
  }
  return count;
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = p / 100.0 * static_cast<double>(values.size() - 1);
  const size_t low = static_cast<size_t>(std::floor(rank));
  const size_t high = std::min(values.size() - 1, low + 1);
  return values[low] + (values[high] - values[low]) * (rank - static_cast<double>(low));
}

// --- The decision burst -----------------------------------------------------------------------

namespace {

// Reads WatchEvents on its own thread and records when each intent was satisfied.
class EventWatcher {
 public:
  explicit EventWatcher(v1::Admin::Stub* admin) {
    v1::WatchEventsRequest request;
    reader_ = admin->WatchEvents(&context_, request);
    thread_ = std::thread([this] { Run(); });
  }
  ~EventWatcher() {
    context_.TryCancel();
    thread_.join();
    reader_->Finish().IgnoreError();
  }
  // When each intent was seen satisfied.
  std::map<std::string, absl::Time> Satisfied() {
    MutexLock lock(&mu_);
    return satisfied_;
  }
  uint64_t events() {
    MutexLock lock(&mu_);
    return events_;
  }
  bool AwaitSatisfied(const std::vector<std::string>& ids, absl::Time deadline) {
    MutexLock lock(&mu_);
    for (;;) {
      bool all = true;
      for (const std::string& id : ids) {
        if (satisfied_.count(id) == 0) {
          all = false;
          break;
        }
      }
      if (all) return true;
      if (absl::Now() >= deadline) return false;
      cv_.wait_for(mu_, std::chrono::milliseconds(50));
    }
  }

 private:
  void Run() {
    v1::Event event;
    while (reader_->Read(&event)) {
      const absl::Time now = absl::Now();
      MutexLock lock(&mu_);
      ++events_;
      if (event.type() == "intent_satisfied") {
        satisfied_.emplace(event.intent_id(), now);
        cv_.notify_all();
      }
    }
  }

  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReader<v1::Event>> reader_;
  Mutex mu_;
  std::condition_variable_any cv_;
  std::map<std::string, absl::Time> satisfied_ ABSL_GUARDED_BY(mu_);
  uint64_t events_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;
};

}  // namespace

BurstResult RunDecisionBurst(const std::shared_ptr<grpc::Channel>& channel,
                             const std::vector<v1::CreateIntentRequest>& requests, int concurrency,
                             absl::Duration timeout) {
  BurstResult result;
  std::unique_ptr<v1::Admin::Stub> admin = v1::Admin::NewStub(channel);
  EventWatcher watcher(admin.get());
  // The subscription is registered when the server runs the handler; give it a moment.
  absl::SleepFor(absl::Milliseconds(200));

  struct Call {
    grpc::ClientContext context;
    v1::CreateIntentResponse response;
    absl::Time start;
  };
  Mutex mu;
  std::condition_variable_any cv;
  int in_flight = 0;
  std::map<std::string, absl::Time> started;  // intent id -> call start
  std::vector<std::unique_ptr<Call>> calls(requests.size());
  const absl::Time burst_start = absl::Now();
  for (size_t i = 0; i < requests.size(); ++i) {
    {
      MutexLock lock(&mu);
      while (in_flight >= concurrency) cv.wait(mu);
      ++in_flight;
    }
    calls[i] = std::make_unique<Call>();
    Call* call = calls[i].get();
    call->context.set_deadline(std::chrono::system_clock::now() +
                               absl::ToChronoMilliseconds(timeout));
    call->start = absl::Now();
    admin->async()->CreateIntent(
        &call->context, &requests[i], &call->response, [&, call](grpc::Status status) {
          const absl::Time now = absl::Now();
          MutexLock lock(&mu);
          --in_flight;
          if (status.ok()) {
            ++result.created;
            started[call->response.intent().id()] = call->start;
            result.create_ms.push_back(absl::ToDoubleMilliseconds(now - call->start));
          } else {
            if (result.create_errors++ == 0) result.first_error = status.error_message();
          }
          cv.notify_all();
        });
  }
  {
    MutexLock lock(&mu);
    while (in_flight > 0) cv.wait(mu);
  }
  result.issue_time = absl::Now() - burst_start;
  for (const auto& [id, start] : started) result.intent_ids.push_back(id);
  watcher.AwaitSatisfied(result.intent_ids, burst_start + timeout);
  const std::map<std::string, absl::Time> satisfied = watcher.Satisfied();
  absl::Time last = burst_start;
  for (const auto& [id, start] : started) {
    auto it = satisfied.find(id);
    if (it == satisfied.end()) {
      ++result.unobserved;
      continue;
    }
    ++result.satisfied;
    result.latency_ms.push_back(absl::ToDoubleMilliseconds(it->second - start));
    last = std::max(last, it->second);
  }
  result.total_time = last - burst_start;
  result.events = watcher.events();
  return result;
}

}  // namespace fleetsim
}  // namespace dmapin
