// kill -9 test of the node agent (the node-agent issue): "kill -9 at any moment loses no
// acknowledged operation and leaves no half-applied one".
//
// The agent runs as a child process on a Unix socket with a fresh --state_dir. Several worker
// threads, each owning one memory context and (up to) two containers, issue random mutations as
// fast as they can. Every answer the agent gives (OK or an errno) is applied to the worker's own
// in-process model, a dmapin::Registry over a SimBackend with the agent's page size, and must be
// the model's answer. Because a worker's objects are its own, its history is independent of the
// other workers' and totally ordered.
//
// A killer SIGKILLs the agent at a random moment (uniform 20-250 ms after the workload resumed).
// Each worker's call then in flight is ambiguous: the agent may or may not have made it durable.
// After the agent restarts on the same state directory, the test compares each worker's objects
// (GetContext, ListRegions, GetContainer) with two candidate models, the acknowledged history
// without and with the in-flight operation. Exactly one must match (both if the operation had no
// visible effect); it becomes the model. The node-wide lists and totals must equal the sum of the
// models, and with the memlock backend the agent's VmLck must equal the locked bytes of all
// contexts (no leaked or missing pins).
//
// The AgentKill9Repro tests are minimal reproductions of agent bugs this test found.
//
// Usage: agent_kill9_test <path to dmapin-agent> [gtest flags]. Environment knobs:
//   DMAPIN_KILL9_ROUNDS   rounds per test (default 100 sim, 50 memlock), for longer soaks;
//   DMAPIN_KILL9_SEED     the seed of the workers' operation choices (printed; the kill points and
//                         the interleaving still depend on timing);
//   DMAPIN_KILL9_AVOID    "unbind": never let a container unregister its last region, which steers
//                         around the binding bug of the repro tests to hunt for other bugs.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/registry/memlock_backend.h"
#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
#include "agent/store/mapping_journal.h"
#include "common/errno_status.h"
#include "common/mutex.h"
#include "dmapin/v1/agent.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"

extern char** environ;

namespace dmapin::agent {
namespace {

// argv[1]: the agent binary (the BUILD rule passes $(rootpath //agent:dmapin-agent)).
const char* g_agent_binary = nullptr;

constexpr int kWorkers = 3;
// Each context's address range: the sim backend's fixed base, or the memory the agent maps.
constexpr uint64_t kArenaPages = 32;
constexpr uint64_t kSimBase = 0x10000000;
// One page of the sim arena cannot be pinned (--sim_holes): registrations over it are EFAULT.
constexpr uint64_t kSimHolePage = 30;
constexpr uint64_t kMemlockLimitPages = 20;
// Maps and unmaps use the first kIovaSlots IOMMU pages of a window, so remaps are frequent.
constexpr uint64_t kIovaSlots = 48;
// A "small window" container: 4 KiB IOMMU pages, 64 of them from 1 MiB.
constexpr uint64_t kSmallIommuPage = 4096;
constexpr uint64_t kSmallWindowStart = 0x100000;
constexpr uint64_t kSmallWindowSize = 64 * kSmallIommuPage;
constexpr char kErrnoTrailer[] = "dmapin-errno";
constexpr absl::Duration kRpcDeadline = absl::Seconds(10);
constexpr absl::Duration kStartDeadline = absl::Seconds(30);
constexpr absl::Duration kParkDeadline = absl::Seconds(30);

struct Slot {
  uint64_t first_page;
  uint64_t pages;
};
// Registrations mostly pick one of these, so identical regions in both containers are common.
constexpr Slot kSlots[] = {{0, 4}, {4, 4}, {8, 2}, {10, 6}, {16, 8}, {24, 4}, {28, 4}};

// --- Operations --------------------------------------------------------------------------------

enum class OpKind {
  kCreateContext,
  kTeardownContext,
  kCreateContainer,
  kReleaseContainer,
  kRegister,
  kUnregister,
  kMap,
  kUnmap,
};

const char* KindName(OpKind kind) {
  switch (kind) {
    case OpKind::kCreateContext:
      return "CreateContext";
    case OpKind::kTeardownContext:
      return "TeardownContext";
    case OpKind::kCreateContainer:
      return "CreateContainer";
    case OpKind::kReleaseContainer:
      return "ReleaseContainer";
    case OpKind::kRegister:
      return "RegisterRegion";
    case OpKind::kUnregister:
      return "UnregisterRegion";
    case OpKind::kMap:
      return "MapDma";
    case OpKind::kUnmap:
      return "UnmapDma";
  }
  return "?";
}

struct Op {
  OpKind kind = OpKind::kRegister;
  std::string context;
  std::string container;
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t iova = 0;
  // CreateContext.
  std::optional<uint64_t> memlock_limit_bytes;  // nullopt = unlimited
  bool cap_ipc_lock = false;
  int backing = 0;
  uint64_t memory_bytes = 0;
  uint64_t memory_ua = 0;  // from the agent's answer (memlock backend)
  // CreateContainer (0 = the agent's default).
  uint64_t iommu_page_size = 0;
  uint64_t window_start = 0;
  uint64_t window_size = 0;
};

std::string Describe(const Op& op) {
  switch (op.kind) {
    case OpKind::kCreateContext:
      return absl::StrFormat(
          "CreateContext(%s, memlock_limit=%s, cap_ipc_lock=%d, backing=%d, memory_bytes=0x%x)",
          op.context,
          op.memlock_limit_bytes.has_value() ? absl::StrFormat("0x%x", *op.memlock_limit_bytes)
                                             : "unlimited",
          op.cap_ipc_lock, op.backing, op.memory_bytes);
    case OpKind::kTeardownContext:
      return absl::StrFormat("TeardownContext(%s)", op.context);
    case OpKind::kCreateContainer:
      return absl::StrFormat("CreateContainer(%s, iommu_page_size=0x%x, window=[0x%x, +0x%x))",
                             op.container, op.iommu_page_size, op.window_start, op.window_size);
    case OpKind::kReleaseContainer:
      return absl::StrFormat("ReleaseContainer(%s)", op.container);
    case OpKind::kRegister:
      return absl::StrFormat("RegisterRegion(%s, %s, ua=0x%x, size=0x%x)", op.container, op.context,
                             op.ua, op.size);
    case OpKind::kUnregister:
      return absl::StrFormat("UnregisterRegion(%s, ua=0x%x, size=0x%x)", op.container, op.ua,
                             op.size);
    case OpKind::kMap:
      return absl::StrFormat("MapDma(%s, iova=0x%x, ua=0x%x, size=0x%x)", op.container, op.iova,
                             op.ua, op.size);
    case OpKind::kUnmap:
      return absl::StrFormat("UnmapDma(%s, iova=0x%x, size=0x%x)", op.container, op.iova, op.size);
  }
  return "?";
}

std::string ErrnoText(int err) { return err == 0 ? "OK" : ErrnoName(err); }

// --- Observable state --------------------------------------------------------------------------

// What the test compares: one line per context, region and container, keyed by name.
using Snapshot = std::map<std::string, std::string>;
constexpr char kAbsent[] = "<absent>";

std::string ContextKey(absl::string_view name) { return absl::StrCat("context ", name); }
std::string RegionKey(absl::string_view context, uint64_t ua) {
  return absl::StrFormat("context %s region ua=0x%x", context, ua);
}
std::string ContainerKey(absl::string_view name) { return absl::StrCat("container ", name); }

std::string ContextValue(uint64_t locked_bytes, uint64_t regions,
                         const std::vector<std::string>& containers, uint64_t memory_ua,
                         uint64_t memory_bytes) {
  return absl::StrFormat("locked_bytes=0x%x regions=%d containers=[%s] memory=[0x%x, +0x%x)",
                         locked_bytes, regions, absl::StrJoin(containers, ","), memory_ua,
                         memory_bytes);
}

std::string RegionValue(uint64_t size, uint64_t used, uint64_t mapped, bool pending_release,
                        uint64_t max_iommu_page_size, const std::vector<std::string>& holders) {
  return absl::StrFormat(
      "size=0x%x used=%d mapped=%d pending_release=%d max_iommu=0x%x holders=[%s]", size, used,
      mapped, pending_release, max_iommu_page_size, absl::StrJoin(holders, ","));
}

std::string RegionValue(const v1::Region& region) {
  std::vector<std::string> holders(region.containers().begin(), region.containers().end());
  std::sort(holders.begin(), holders.end());
  return RegionValue(region.size(), region.used(), region.mapped(), region.pending_release(),
                     region.max_iommu_page_size(), holders);
}

std::string ContainerValue(absl::string_view context, uint64_t held_regions,
                           uint64_t installed_entries, uint64_t iommu_page_size,
                           uint64_t window_start, uint64_t window_size) {
  return absl::StrFormat(
      "context=\"%s\" held_regions=%d installed_entries=%d iommu_page=0x%x "
      "window=[0x%x, +0x%x)",
      context, held_regions, installed_entries, iommu_page_size, window_start, window_size);
}

// The lines of `agent` and `model` that differ.
std::string Diff(const Snapshot& agent, const Snapshot& model) {
  std::set<std::string> keys;
  for (const auto& [key, value] : agent) keys.insert(key);
  for (const auto& [key, value] : model) keys.insert(key);
  std::string diff;
  for (const std::string& key : keys) {
    auto a = agent.find(key);
    auto m = model.find(key);
    const std::string av = a == agent.end() ? kAbsent : a->second;
    const std::string mv = m == model.end() ? kAbsent : m->second;
    if (av != mv)
      absl::StrAppend(&diff, "    ", key, "\n      agent: ", av, "\n      model: ", mv, "\n");
  }
  return diff;
}

struct Totals {
  uint64_t contexts = 0;
  uint64_t containers = 0;
  uint64_t regions = 0;
  uint64_t locked_bytes = 0;
  uint64_t installed_entries = 0;
};

// --- The model ---------------------------------------------------------------------------------

// One worker's objects as the agent should hold them: a Registry over a SimBackend, plus the
// agent's name layer (ENOENT/EEXIST by name) on top. Keeps the log of operations applied since
// the worker's state was last trivial, so that a copy can be made by replay.
class Model {
 public:
  Model(uint64_t page_size, std::vector<SimRange> holes)
      : page_size_(page_size), holes_(std::move(holes)) {
    absl::StatusOr<std::unique_ptr<SimBackend>> backend =
        SimBackend::Create({.page_size = page_size_, .holes = holes_});
    if (!backend.ok()) {
      std::fprintf(stderr, "model: %s\n", backend.status().ToString().c_str());
      std::abort();
    }
    backend_ = std::move(*backend);
    registry_ = std::make_unique<Registry>(backend_.get());
  }

  // Applies `op` as the agent would and returns the agent's expected answer.
  absl::Status Apply(const Op& op) {
    log_.push_back(op);
    switch (op.kind) {
      case OpKind::kCreateContext: {
        if (contexts_.count(op.context) != 0) return ErrnoStatus(EEXIST, "context exists");
        const ContextId id = next_id_++;
        absl::Status status = registry_->CreateContext(
            id, {.memlock_limit_bytes = op.memlock_limit_bytes, .cap_ipc_lock = op.cap_ipc_lock});
        if (!status.ok()) return status;
        contexts_[op.context] = {
            .id = id, .memory_ua = op.memory_ua, .memory_bytes = op.memory_bytes};
        names_[id] = op.context;
        return absl::OkStatus();
      }
      case OpKind::kTeardownContext: {
        auto it = contexts_.find(op.context);
        if (it == contexts_.end()) return ErrnoStatus(ENOENT, "no such context");
        const ContextId id = it->second.id;
        absl::StatusOr<ContextInfo> info = registry_->GetContext(id);
        if (!info.ok()) return info.status();
        if (absl::Status status = registry_->TeardownContext(id); !status.ok()) return status;
        for (ContainerId bound : info->containers) EraseContainer(bound);
        names_.erase(id);
        contexts_.erase(it);
        // What is left are containers that never registered memory: a fresh start from them.
        log_.clear();
        for (const ContainerEntry& container : containers_) log_.push_back(container.create);
        return absl::OkStatus();
      }
      case OpKind::kCreateContainer: {
        if (FindContainer(op.container) != nullptr) {
          return ErrnoStatus(EEXIST, "container exists");
        }
        ContainerOptions options{
            .iommu_page_size = op.iommu_page_size != 0 ? op.iommu_page_size : page_size_,
            .window_start = op.window_start,
            .window_size = op.window_size != 0 ? op.window_size : uint64_t{1} << 40};
        const ContainerId id = next_id_++;
        if (absl::Status status = registry_->CreateContainer(id, options); !status.ok()) {
          return status;
        }
        containers_.push_back({.name = op.container, .id = id, .create = op});
        names_[id] = op.container;
        return absl::OkStatus();
      }
      case OpKind::kReleaseContainer: {
        const ContainerEntry* container = FindContainer(op.container);
        if (container == nullptr) return ErrnoStatus(ENOENT, "no such container");
        const ContainerId id = container->id;
        if (absl::Status status = registry_->ReleaseContainer(id); !status.ok()) return status;
        EraseContainer(id);
        return absl::OkStatus();
      }
      case OpKind::kRegister: {
        const ContainerEntry* container = FindContainer(op.container);
        if (container == nullptr) return ErrnoStatus(ENOENT, "no such container");
        auto context = contexts_.find(op.context);
        if (context == contexts_.end()) return ErrnoStatus(ENOENT, "no such context");
        return registry_->Register(container->id, context->second.id, op.ua, op.size);
      }
      case OpKind::kUnregister: {
        const ContainerEntry* container = FindContainer(op.container);
        if (container == nullptr) return ErrnoStatus(ENOENT, "no such container");
        return registry_->Unregister(container->id, op.ua, op.size);
      }
      case OpKind::kMap: {
        const ContainerEntry* container = FindContainer(op.container);
        if (container == nullptr) return ErrnoStatus(ENOENT, "no such container");
        return registry_->Map(container->id, op.iova, op.ua, op.size);
      }
      case OpKind::kUnmap: {
        const ContainerEntry* container = FindContainer(op.container);
        if (container == nullptr) return ErrnoStatus(ENOENT, "no such container");
        return registry_->Unmap(container->id, op.iova, op.size);
      }
    }
    return absl::InternalError("unknown op");
  }

  // A copy, made by replaying the log into a fresh registry.
  std::unique_ptr<Model> Clone() const {
    auto copy = std::make_unique<Model>(page_size_, holes_);
    for (const Op& op : log_) copy->Apply(op).IgnoreError();
    return copy;
  }

  // The worker's context ("" when it has none) and where its arena starts.
  std::string context() const { return contexts_.empty() ? "" : contexts_.begin()->first; }
  uint64_t memory_ua(const std::string& context) const {
    auto it = contexts_.find(context);
    return it == contexts_.end() ? 0 : it->second.memory_ua;
  }
  std::set<std::string> ContextNames() const {
    std::set<std::string> names;
    for (const auto& [name, entry] : contexts_) names.insert(name);
    return names;
  }
  std::set<std::string> ContainerNames() const {
    std::set<std::string> names;
    for (const ContainerEntry& container : containers_) names.insert(container.name);
    return names;
  }
  std::vector<std::string> containers() const {
    std::vector<std::string> names;
    for (const ContainerEntry& container : containers_) names.push_back(container.name);
    return names;
  }
  bool HasContainer(const std::string& name) const { return FindContainer(name) != nullptr; }
  // Whether `container` holds (ua, size) and nothing else: unregistering it would leave the
  // container bound to its context while holding no region.
  bool HoldsOnly(const std::string& name, uint64_t ua, uint64_t size) const {
    const ContainerEntry* container = FindContainer(name);
    if (container == nullptr) return false;
    absl::StatusOr<ContainerInfo> info = registry_->GetContainer(container->id);
    if (!info.ok() || !info->context.has_value() || info->held_regions != 1) return false;
    absl::StatusOr<std::optional<RegionInfo>> region =
        registry_->Find(*info->context, ua, size / page_size_);
    if (!region.ok() || !region->has_value()) return false;
    const std::vector<ContainerId>& holders = (*region)->holders;
    return std::find(holders.begin(), holders.end(), container->id) != holders.end();
  }
  std::optional<ContainerOptions> container_options(const std::string& name) const {
    const ContainerEntry* container = FindContainer(name);
    if (container == nullptr) return std::nullopt;
    absl::StatusOr<ContainerInfo> info = registry_->GetContainer(container->id);
    if (!info.ok()) return std::nullopt;
    return info->options;
  }
  std::vector<RegionInfo> Regions(const std::string& context) const {
    auto it = contexts_.find(context);
    if (it == contexts_.end()) return {};
    return registry_->ListRegions(it->second.id);
  }

  // The region line of (context, ua, size), as RegisterRegion would answer it.
  std::string RegionLine(const std::string& context, uint64_t ua, uint64_t size) const {
    auto it = contexts_.find(context);
    if (it == contexts_.end()) return kAbsent;
    absl::StatusOr<std::optional<RegionInfo>> region =
        registry_->Find(it->second.id, ua, size / page_size_);
    if (!region.ok() || !region->has_value()) return kAbsent;
    return Line(**region);
  }

  // Adds the lines of the named contexts (with their regions) and containers.
  void AddTo(const std::set<std::string>& contexts, const std::set<std::string>& containers,
             Snapshot* out) const {
    for (const std::string& name : contexts) {
      auto it = contexts_.find(name);
      if (it == contexts_.end()) {
        (*out)[ContextKey(name)] = kAbsent;
        continue;
      }
      absl::StatusOr<ContextInfo> info = registry_->GetContext(it->second.id);
      if (!info.ok()) {
        (*out)[ContextKey(name)] = absl::StrCat("<model error: ", info.status().ToString(), ">");
        continue;
      }
      (*out)[ContextKey(name)] =
          ContextValue(info->locked_bytes, info->regions, NamesOf(info->containers),
                       it->second.memory_ua, it->second.memory_bytes);
      for (const RegionInfo& region : registry_->ListRegions(it->second.id)) {
        (*out)[RegionKey(name, region.ua)] = Line(region);
      }
    }
    for (const std::string& name : containers) {
      const ContainerEntry* container = FindContainer(name);
      if (container == nullptr) {
        (*out)[ContainerKey(name)] = kAbsent;
        continue;
      }
      absl::StatusOr<ContainerInfo> info = registry_->GetContainer(container->id);
      if (!info.ok()) {
        (*out)[ContainerKey(name)] = absl::StrCat("<model error: ", info.status().ToString(), ">");
        continue;
      }
      const std::string context = info->context.has_value() ? NameOf(*info->context) : "";
      (*out)[ContainerKey(name)] = ContainerValue(
          context, info->held_regions, info->installed_entries, info->options.iommu_page_size,
          info->options.window_start, info->options.window_size);
    }
  }

  Totals totals() const {
    Totals totals;
    for (const ContextInfo& context : registry_->ListContexts()) {
      ++totals.contexts;
      totals.regions += context.regions;
      totals.locked_bytes += context.locked_bytes;
    }
    for (const ContainerInfo& container : registry_->ListContainers()) {
      ++totals.containers;
      totals.installed_entries += container.installed_entries;
    }
    return totals;
  }

  size_t log_size() const { return log_.size(); }

 private:
  struct ContextEntry {
    ContextId id = 0;
    uint64_t memory_ua = 0;
    uint64_t memory_bytes = 0;
  };
  struct ContainerEntry {
    std::string name;
    ContainerId id = 0;
    Op create;
  };

  const ContainerEntry* FindContainer(const std::string& name) const {
    for (const ContainerEntry& container : containers_) {
      if (container.name == name) return &container;
    }
    return nullptr;
  }
  void EraseContainer(ContainerId id) {
    for (auto it = containers_.begin(); it != containers_.end(); ++it) {
      if (it->id == id) {
        containers_.erase(it);
        break;
      }
    }
    names_.erase(id);
  }
  std::string NameOf(uint64_t id) const {
    auto it = names_.find(id);
    return it == names_.end() ? absl::StrCat("#", id) : it->second;
  }
  std::vector<std::string> NamesOf(const std::vector<ContainerId>& ids) const {
    std::vector<std::string> names;
    for (ContainerId id : ids) names.push_back(NameOf(id));
    std::sort(names.begin(), names.end());
    return names;
  }
  std::string Line(const RegionInfo& region) const {
    return RegionValue(region.size, region.used, region.mapped, region.pending_release,
                       region.max_iommu_page_size, NamesOf(region.holders));
  }

  const uint64_t page_size_;
  const std::vector<SimRange> holes_;
  std::unique_ptr<SimBackend> backend_;
  std::unique_ptr<Registry> registry_;  // after backend_: destroyed first
  uint64_t next_id_ = 1;
  std::map<std::string, ContextEntry> contexts_;
  std::vector<ContainerEntry> containers_;  // in creation order
  std::map<uint64_t, std::string> names_;   // context and container ids share the numbering
  std::vector<Op> log_;
};

// --- The agent process -------------------------------------------------------------------------

class AgentProcess {
 public:
  AgentProcess(std::string binary, std::vector<std::string> args, std::string log_path)
      : binary_(std::move(binary)), args_(std::move(args)), log_path_(std::move(log_path)) {}
  AgentProcess(const AgentProcess&) = delete;
  AgentProcess& operator=(const AgentProcess&) = delete;
  ~AgentProcess() { Kill(); }

  absl::Status Start() {
    if (pid_ > 0) return absl::FailedPreconditionError("agent already running");
    std::vector<char*> argv;
    argv.push_back(binary_.data());
    for (std::string& arg : args_) argv.push_back(arg.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path_.c_str(),
                                     O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, binary_.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) {
      return absl::InternalError(absl::StrCat("posix_spawn ", binary_, ": ", std::strerror(rc)));
    }
    pid_ = pid;
    return absl::OkStatus();
  }

  // SIGKILL and reap.
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  // How the process ended, if it has (reaps it); nullopt while it runs.
  std::optional<std::string> Exited() {
    if (pid_ <= 0) return "not started";
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) != pid_) return std::nullopt;
    pid_ = -1;
    if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return absl::StrCat("killed by signal ", WTERMSIG(status));
    return "ended";
  }

  pid_t pid() const { return pid_; }

  std::string LogTail(size_t bytes = 3000) const {
    std::ifstream in(log_path_);
    std::stringstream text;
    text << in.rdbuf();
    std::string all = text.str();
    return all.size() > bytes ? all.substr(all.size() - bytes) : all;
  }

 private:
  std::string binary_;
  std::vector<std::string> args_;
  const std::string log_path_;
  pid_t pid_ = -1;
};

absl::StatusOr<uint64_t> VmLckBytes(pid_t pid) {
  const std::string path = absl::StrCat("/proc/", pid, "/status");
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (!absl::StartsWith(line, "VmLck:")) continue;
    std::istringstream fields(line.substr(6));
    uint64_t kib = 0;
    std::string unit;
    fields >> kib >> unit;
    if (unit != "kB") return absl::InternalError(absl::StrCat(path, ": odd line ", line));
    return kib * 1024;
  }
  return absl::NotFoundError(absl::StrCat(path, ": no VmLck line"));
}

// --- gRPC helpers ------------------------------------------------------------------------------

// An answer of the agent (errno, 0 for OK) or a transport failure (the agent is gone).
struct Answer {
  bool answered = false;
  int err = 0;
  std::string text;  // status message, or the transport error
  // Filled for OK answers of RegisterRegion and CreateContext.
  std::string region_line;
  uint64_t memory_ua = 0;
};

Answer ToAnswer(const grpc::ClientContext& context, const grpc::Status& status) {
  Answer answer;
  if (status.ok()) {
    answer.answered = true;
    return answer;
  }
  const auto& trailers = context.GetServerTrailingMetadata();
  auto it = trailers.find(kErrnoTrailer);
  if (it == trailers.end()) {
    answer.text = absl::StrFormat("gRPC code %d: %s", status.error_code(), status.error_message());
    return answer;
  }
  const std::string name(it->second.data(), it->second.size());
  answer.answered = true;
  answer.err = ErrnoFromName(name).value_or(-1);
  answer.text = status.error_message();
  if (!absl::StartsWith(answer.text, name)) {
    // Still an answer, but not one the API allows: make it mismatch any model.
    answer.err = -2;
    answer.text = absl::StrCat("trailer ", name, " but message \"", answer.text, "\"");
  }
  return answer;
}

void SetDeadline(grpc::ClientContext* context, absl::Duration timeout) {
  context->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
}

Answer Send(v1::NodeAgent::Stub& stub, const Op& op) {
  grpc::ClientContext context;
  SetDeadline(&context, kRpcDeadline);
  grpc::Status status;
  Answer answer;
  switch (op.kind) {
    case OpKind::kCreateContext: {
      v1::CreateContextRequest request;
      request.set_name(op.context);
      request.set_memlock_unlimited(!op.memlock_limit_bytes.has_value());
      request.set_memlock_limit_bytes(op.memlock_limit_bytes.value_or(0));
      request.set_cap_ipc_lock(op.cap_ipc_lock);
      request.set_backing(static_cast<v1::MemoryBacking>(op.backing));
      request.set_memory_bytes(op.memory_bytes);
      v1::Context response;
      status = stub.CreateContext(&context, request, &response);
      answer = ToAnswer(context, status);
      answer.memory_ua = response.memory_ua();
      return answer;
    }
    case OpKind::kTeardownContext: {
      v1::TeardownContextRequest request;
      request.set_name(op.context);
      v1::TeardownContextResponse response;
      status = stub.TeardownContext(&context, request, &response);
      break;
    }
    case OpKind::kCreateContainer: {
      v1::CreateContainerRequest request;
      request.set_name(op.container);
      request.set_iommu_page_size(op.iommu_page_size);
      request.set_window_start(op.window_start);
      request.set_window_size(op.window_size);
      v1::Container response;
      status = stub.CreateContainer(&context, request, &response);
      break;
    }
    case OpKind::kReleaseContainer: {
      v1::ReleaseContainerRequest request;
      request.set_name(op.container);
      v1::ReleaseContainerResponse response;
      status = stub.ReleaseContainer(&context, request, &response);
      break;
    }
    case OpKind::kRegister: {
      v1::RegisterRegionRequest request;
      request.set_container(op.container);
      request.set_context(op.context);
      request.set_ua(op.ua);
      request.set_size(op.size);
      v1::Region response;
      status = stub.RegisterRegion(&context, request, &response);
      answer = ToAnswer(context, status);
      if (status.ok()) answer.region_line = RegionValue(response);
      return answer;
    }
    case OpKind::kUnregister: {
      v1::UnregisterRegionRequest request;
      request.set_container(op.container);
      request.set_ua(op.ua);
      request.set_size(op.size);
      v1::UnregisterRegionResponse response;
      status = stub.UnregisterRegion(&context, request, &response);
      break;
    }
    case OpKind::kMap: {
      v1::MapDmaRequest request;
      request.set_container(op.container);
      request.set_iova(op.iova);
      request.set_ua(op.ua);
      request.set_size(op.size);
      v1::MapDmaResponse response;
      status = stub.MapDma(&context, request, &response);
      break;
    }
    case OpKind::kUnmap: {
      v1::UnmapDmaRequest request;
      request.set_container(op.container);
      request.set_iova(op.iova);
      request.set_size(op.size);
      v1::UnmapDmaResponse response;
      status = stub.UnmapDma(&context, request, &response);
      break;
    }
  }
  return ToAnswer(context, status);
}

// A fresh channel: never one that shares a connection with an agent killed earlier.
std::shared_ptr<grpc::Channel> NewChannel(const std::string& socket) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 20);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 20);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(absl::StrCat("unix:", socket),
                                   grpc::InsecureChannelCredentials(), args);
}

// Starts `agent` and polls GetNodeStatus on `socket` until it answers.
absl::StatusOr<std::unique_ptr<v1::NodeAgent::Stub>> StartAgent(AgentProcess* agent,
                                                                const std::string& socket) {
  if (absl::Status status = agent->Start(); !status.ok()) return status;
  const absl::Time deadline = absl::Now() + kStartDeadline;
  for (;;) {
    if (std::optional<std::string> ended = agent->Exited(); ended.has_value()) {
      return absl::FailedPreconditionError(
          absl::StrCat("the agent ", *ended, " while starting; its log ends:\n", agent->LogTail()));
    }
    auto stub = v1::NodeAgent::NewStub(NewChannel(socket));
    grpc::ClientContext context;
    SetDeadline(&context, absl::Seconds(1));
    v1::NodeStatus status;
    if (stub->GetNodeStatus(&context, v1::GetNodeStatusRequest(), &status).ok()) {
      if (status.store_failed()) return absl::InternalError("the agent reports store_failed");
      return stub;
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "the agent did not answer GetNodeStatus within ", absl::FormatDuration(kStartDeadline),
          "; its log ends:\n", agent->LogTail()));
    }
    absl::SleepFor(absl::Milliseconds(5));  // poll interval
  }
}

absl::Status RpcError(absl::string_view what, const grpc::Status& status) {
  return absl::UnavailableError(
      absl::StrFormat("%s: gRPC code %d: %s", what, status.error_code(), status.error_message()));
}

// Adds the agent's lines for the named contexts (with their regions) and containers.
absl::Status AddAgentState(v1::NodeAgent::Stub& stub, const std::set<std::string>& contexts,
                           const std::set<std::string>& containers, Snapshot* out) {
  for (const std::string& name : contexts) {
    v1::Context context;
    {
      grpc::ClientContext rpc;
      SetDeadline(&rpc, kRpcDeadline);
      v1::GetContextRequest request;
      request.set_name(name);
      grpc::Status status = stub.GetContext(&rpc, request, &context);
      if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
        (*out)[ContextKey(name)] = kAbsent;
        continue;
      }
      if (!status.ok()) return RpcError(absl::StrCat("GetContext ", name), status);
    }
    std::vector<std::string> bound(context.containers().begin(), context.containers().end());
    (*out)[ContextKey(name)] = ContextValue(context.locked_bytes(), context.regions(), bound,
                                            context.memory_ua(), context.memory_bytes());
    grpc::ClientContext rpc;
    SetDeadline(&rpc, kRpcDeadline);
    v1::ListRegionsRequest request;
    request.set_context(name);
    v1::ListRegionsResponse regions;
    grpc::Status status = stub.ListRegions(&rpc, request, &regions);
    if (!status.ok()) return RpcError(absl::StrCat("ListRegions ", name), status);
    for (const v1::Region& region : regions.regions()) {
      (*out)[RegionKey(name, region.ua())] = RegionValue(region);
    }
  }
  for (const std::string& name : containers) {
    grpc::ClientContext rpc;
    SetDeadline(&rpc, kRpcDeadline);
    v1::GetContainerRequest request;
    request.set_name(name);
    v1::Container container;
    grpc::Status status = stub.GetContainer(&rpc, request, &container);
    if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
      (*out)[ContainerKey(name)] = kAbsent;
      continue;
    }
    if (!status.ok()) return RpcError(absl::StrCat("GetContainer ", name), status);
    (*out)[ContainerKey(name)] = ContainerValue(
        container.context(), container.held_regions(), container.installed_entries(),
        container.iommu_page_size(), container.window_start(), container.window_size());
  }
  return absl::OkStatus();
}

// --- The harness -------------------------------------------------------------------------------

struct Mode {
  std::string backend;  // "sim" or "memlock"
  uint64_t page_size = 0;
  int rounds = 0;
  bool memlock() const { return backend == "memlock"; }
};

int EnvInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  int parsed = 0;
  if (value != nullptr && absl::SimpleAtoi(value, &parsed) && parsed > 0) return parsed;
  return fallback;
}

class Kill9Harness {
 public:
  explicit Kill9Harness(Mode mode) : mode_(std::move(mode)) {
    uint64_t seed = std::random_device()();
    if (const char* env = std::getenv("DMAPIN_KILL9_SEED"); env != nullptr) {
      if (!absl::SimpleAtoi(env, &seed))
        ADD_FAILURE() << "DMAPIN_KILL9_SEED is not a number: " << env;
    }
    seed_ = seed;
    if (const char* env = std::getenv("DMAPIN_KILL9_AVOID"); env != nullptr) {
      avoid_unbind_ = absl::StrContains(env, "unbind");
    }
    rng_.seed(seed);
  }

  ~Kill9Harness() {
    // Kill first, so that workers still inside a call get their answer (an error) at once.
    killed_.store(true);
    if (agent_ != nullptr) agent_->Kill();
    StopWorkers();
    std::error_code ignored;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ignored);
  }

  absl::Status Run();

 private:
  struct Worker {
    int index = 0;
    std::unique_ptr<Model> model;
    std::mt19937_64 rng;
    uint64_t context_gen = 0;
    uint64_t container_gen = 0;
    std::unique_ptr<v1::NodeAgent::Stub> stub;
    std::optional<Op> in_flight;
    uint64_t acked_round = 0;
    uint64_t acked_total = 0;
    std::map<std::string, uint64_t> answers;  // "MapDma EINVAL" -> count
    std::thread thread;
  };

  void WorkerLoop(Worker* worker);
  void RunUntilKilled(Worker* worker, int round);
  Op Generate(Worker* worker);
  absl::Status Resolve(int round, v1::NodeAgent::Stub& stub, std::string* report);
  absl::Status CheckNode(v1::NodeAgent::Stub& stub, int round);
  void Fail(std::string message);
  std::string failure() {
    MutexLock lock(&mu_);
    return failure_;
  }
  void StopWorkers();

  const Mode mode_;
  uint64_t seed_ = 0;
  bool avoid_unbind_ = false;
  std::mt19937_64 rng_;
  std::string dir_;
  std::string socket_;
  std::unique_ptr<AgentProcess> agent_;
  uint64_t vmlck_baseline_ = 0;
  std::vector<std::unique_ptr<Worker>> workers_;

  Mutex mu_;
  std::condition_variable_any cv_;
  int round_ = 0;        // guarded by mu_: the workers run while it is ahead of what they saw
  int parked_ = 0;       // guarded by mu_: workers done with the current round
  bool stop_ = false;    // guarded by mu_
  std::string failure_;  // guarded by mu_: the first failure seen by a worker
  std::atomic<bool> stopping_{false};
  std::atomic<bool> killed_{false};  // set just before the SIGKILL
  // How the calls in flight at the kills resolved.
  int applied_ = 0;
  int not_applied_ = 0;
  int no_effect_ = 0;
  // Coverage: regions seen pending release, and mapped, at the restarts.
  int seen_pending_ = 0;
  int seen_mapped_ = 0;
};

void Kill9Harness::Fail(std::string message) {
  {
    MutexLock lock(&mu_);
    if (failure_.empty()) failure_ = std::move(message);
  }
  stopping_.store(true);
  cv_.notify_all();
}

void Kill9Harness::StopWorkers() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  stopping_.store(true);
  cv_.notify_all();
  for (auto& worker : workers_) {
    if (worker->thread.joinable()) worker->thread.join();
  }
}

void Kill9Harness::WorkerLoop(Worker* worker) {
  int seen = 0;
  for (;;) {
    {
      std::unique_lock<Mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || round_ > seen; });
      if (stop_) return;
      seen = round_;
    }
    RunUntilKilled(worker, seen);
    {
      MutexLock lock(&mu_);
      ++parked_;
    }
    cv_.notify_all();
  }
}

void Kill9Harness::RunUntilKilled(Worker* worker, int round) {
  Model& model = *worker->model;
  while (!stopping_.load()) {
    Op op = Generate(worker);
    const Answer answer = Send(*worker->stub, op);
    if (!answer.answered) {
      if (!killed_.load()) {
        Fail(absl::StrFormat("round %d, thread t%d: %s failed while the agent was alive: %s", round,
                             worker->index, Describe(op), answer.text));
        return;
      }
      worker->in_flight = op;
      return;
    }
    if (op.kind == OpKind::kCreateContext) op.memory_ua = answer.memory_ua;
    const int expected = ErrnoOf(model.Apply(op));
    ++worker->answers[absl::StrCat(KindName(op.kind), " ", ErrnoText(expected))];
    if (answer.err != expected) {
      Fail(absl::StrFormat(
          "round %d, thread t%d, acknowledged op #%d: %s\n  agent answered %s (%s)\n  model "
          "answered %s",
          round, worker->index, worker->acked_total + worker->acked_round + 1, Describe(op),
          ErrnoText(answer.err), answer.text, ErrnoText(expected)));
      return;
    }
    if (op.kind == OpKind::kRegister && answer.err == 0) {
      const std::string want = model.RegionLine(op.context, op.ua, op.size);
      if (answer.region_line != want) {
        Fail(absl::StrFormat("round %d, thread t%d: %s answered region\n  %s\n  model: %s", round,
                             worker->index, Describe(op), answer.region_line, want));
        return;
      }
    }
    ++worker->acked_round;
  }
}

Op Kill9Harness::Generate(Worker* worker) {
  std::mt19937_64& rng = worker->rng;
  auto uniform = [&rng](uint64_t lo, uint64_t hi) {
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
  };
  auto chance = [&rng](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  const Model& model = *worker->model;
  const uint64_t ps = mode_.page_size;
  const int t = worker->index;
  Op op;

  const std::string context = model.context();
  if (context.empty()) {
    op.kind = OpKind::kCreateContext;
    // Two names in turn: a torn-down context's name comes back, which catches stale rows.
    op.context = absl::StrFormat("t%d/vm%d", t, worker->context_gen++ % 2);
    if (chance(0.5)) op.memlock_limit_bytes = kMemlockLimitPages * ps;
    op.cap_ipc_lock = chance(0.25);
    if (mode_.memlock()) {
      op.memory_bytes = kArenaPages * ps;
      op.backing = chance(0.3) ? v1::MEMORY_BACKING_MEMFD
                               : (chance(0.5) ? v1::MEMORY_BACKING_ANONYMOUS
                                              : v1::MEMORY_BACKING_UNSPECIFIED);
    }
    return op;
  }
  const std::vector<std::string> containers = model.containers();
  if (containers.size() < 2) {
    op.kind = OpKind::kCreateContainer;
    // Six names in rotation: released names come back too.
    do {
      op.container = absl::StrFormat("t%d/c%d", t, worker->container_gen++ % 6);
    } while (model.HasContainer(op.container));
    if (chance(0.4)) {
      op.iommu_page_size = kSmallIommuPage;
      op.window_start = kSmallWindowStart;
      op.window_size = kSmallWindowSize;
    }
    return op;
  }

  const uint64_t base = mode_.memlock() ? model.memory_ua(context) : kSimBase;
  const std::string& container = containers[uniform(0, containers.size() - 1)];
  const std::vector<RegionInfo> regions = model.Regions(context);
  auto pick_region = [&]() -> const RegionInfo& { return regions[uniform(0, regions.size() - 1)]; };
  op.container = container;
  op.context = context;
  const double dice = std::uniform_real_distribution<double>(0, 1)(rng);

  if (dice < 0.01) {  // names that do not exist: ENOENT
    switch (uniform(0, 2)) {
      case 0:
        op.kind = OpKind::kMap;
        op.container = absl::StrFormat("t%d/nosuch", t);
        op.iova = 0;
        op.ua = base;
        op.size = ps;
        break;
      case 1:
        op.kind = OpKind::kRegister;
        op.context = absl::StrFormat("t%d/nosuch-vm", t);
        op.ua = base;
        op.size = ps;
        break;
      default:
        op.kind = OpKind::kUnregister;
        op.container = absl::StrFormat("t%d/nosuch", t);
        op.ua = base;
        op.size = ps;
        break;
    }
    return op;
  }
  if (dice < 0.03) {
    op.kind = OpKind::kReleaseContainer;
    return op;
  }
  if (dice < 0.037) {
    op.kind = OpKind::kTeardownContext;
    return op;
  }
  if (dice < 0.28) {
    op.kind = OpKind::kRegister;
    const double r = std::uniform_real_distribution<double>(0, 1)(rng);
    if (r < 0.75) {
      const Slot& slot = kSlots[uniform(0, std::size(kSlots) - 1)];
      op.ua = base + slot.first_page * ps;
      op.size = slot.pages * ps;
    } else if (r < 0.9) {
      const uint64_t first = uniform(0, kArenaPages - 1);
      op.ua = base + first * ps;
      op.size = std::min<uint64_t>(uniform(1, 4), kArenaPages - first) * ps;
    } else if (r < 0.95) {
      op.ua = base + uniform(0, kArenaPages - 1) * ps + ps / 2;  // misaligned: EINVAL
      op.size = ps;
    } else {
      op.ua = base;  // empty: EINVAL
      op.size = 0;
    }
    return op;
  }
  if (dice < 0.43) {
    op.kind = OpKind::kUnregister;
    const double r = std::uniform_real_distribution<double>(0, 1)(rng);
    if (!regions.empty() && r < 0.65) {
      const RegionInfo& region = pick_region();
      op.ua = region.ua;
      op.size = region.size;
    } else if (r < 0.9) {
      const Slot& slot = kSlots[uniform(0, std::size(kSlots) - 1)];
      op.ua = base + slot.first_page * ps;
      op.size = slot.pages * ps;
    } else {
      const uint64_t first = uniform(0, kArenaPages - 2);
      op.ua = base + first * ps;
      op.size = uniform(1, 2) * ps;
    }
    if (avoid_unbind_ && model.HoldsOnly(container, op.ua, op.size)) {
      // DMAPIN_KILL9_AVOID=unbind: steer around the known binding bug (see the repro tests).
      const Slot& slot = kSlots[uniform(0, std::size(kSlots) - 1)];
      op.kind = OpKind::kRegister;
      op.ua = base + slot.first_page * ps;
      op.size = slot.pages * ps;
    }
    return op;
  }

  const std::optional<ContainerOptions> options = model.container_options(container);
  const uint64_t page = options.has_value() ? options->iommu_page_size : ps;
  const uint64_t window_start = options.has_value() ? options->window_start : 0;
  const uint64_t window_size = options.has_value() ? options->window_size : uint64_t{1} << 40;
  const uint64_t slots = std::min(kIovaSlots, window_size / page);
  const double r = std::uniform_real_distribution<double>(0, 1)(rng);
  if (dice < 0.73) {
    op.kind = OpKind::kMap;
    const double n = std::uniform_real_distribution<double>(0, 1)(rng);
    const uint64_t pages = n < 0.5 ? 1 : (n < 0.9 ? uniform(2, 4) : 8);
    op.size = pages * page;
    if (r < 0.9) {
      op.iova = window_start + uniform(0, slots - 1) * page;
    } else if (r < 0.95) {
      op.iova = window_start + window_size;  // outside the window: ENXIO
    } else {
      op.iova = window_start + uniform(0, slots - 1) * page + page / 2;  // misaligned: EINVAL
    }
    if (!regions.empty() && chance(0.75)) {
      const RegionInfo& region = pick_region();
      op.ua = region.ua + uniform(0, region.size / page - 1) * page;  // may run past its end
    } else {
      op.ua = base + uniform(0, kArenaPages * ps / page - 1) * page;
    }
    return op;
  }
  op.kind = OpKind::kUnmap;
  op.size = uniform(1, 8) * page;
  if (r < 0.92) {
    op.iova = window_start + uniform(0, slots - 1) * page;
  } else if (r < 0.97) {
    op.iova = window_start + window_size;  // ENXIO
  } else {
    op.iova = window_start + page / 2;  // EINVAL
  }
  return op;
}

absl::Status Kill9Harness::Resolve(int round, v1::NodeAgent::Stub& stub, std::string* report) {
  std::vector<std::string> parts;
  for (auto& worker : workers_) {
    if (!worker->in_flight.has_value()) {
      return absl::InternalError(
          absl::StrFormat("round %d, thread t%d: no call was in flight", round, worker->index));
    }
    Op op = *worker->in_flight;
    worker->in_flight.reset();
    std::unique_ptr<Model> with = worker->model->Clone();
    {
      // The copy must be the model (a check of the test itself).
      Snapshot live;
      Snapshot copy;
      worker->model->AddTo(worker->model->ContextNames(), worker->model->ContainerNames(), &live);
      with->AddTo(worker->model->ContextNames(), worker->model->ContainerNames(), &copy);
      if (live != copy) {
        return absl::InternalError(absl::StrFormat(
            "round %d, thread t%d: test bug: the replayed model differs from the live one:\n%s",
            round, worker->index, Diff(copy, live)));
      }
    }
    if (op.kind == OpKind::kCreateContext && mode_.memlock()) {
      // The answer was lost: if the context exists, its memory is wherever the agent put it.
      grpc::ClientContext context;
      SetDeadline(&context, kRpcDeadline);
      v1::GetContextRequest request;
      request.set_name(op.context);
      v1::Context response;
      if (stub.GetContext(&context, request, &response).ok()) op.memory_ua = response.memory_ua();
    }
    with->Apply(op).IgnoreError();

    std::set<std::string> contexts = worker->model->ContextNames();
    std::set<std::string> containers = worker->model->ContainerNames();
    for (const std::string& name : with->ContextNames()) contexts.insert(name);
    for (const std::string& name : with->ContainerNames()) containers.insert(name);
    if (!op.context.empty()) contexts.insert(op.context);
    if (!op.container.empty()) containers.insert(op.container);

    Snapshot agent;
    if (absl::Status status = AddAgentState(stub, contexts, containers, &agent); !status.ok()) {
      return status;
    }
    Snapshot without_op;
    Snapshot with_op;
    worker->model->AddTo(contexts, containers, &without_op);
    with->AddTo(contexts, containers, &with_op);
    for (const auto& [key, value] : agent) {
      if (absl::StrContains(value, "pending_release=1")) ++seen_pending_;
      if (absl::StrContains(key, " region ") && !absl::StrContains(value, " mapped=1 ")) {
        ++seen_mapped_;
      }
    }
    const bool match_without = agent == without_op;
    const bool match_with = agent == with_op;
    if (!match_without && !match_with) {
      return absl::DataLossError(absl::StrFormat(
          "round %d, thread t%d: after the restart the agent's state is neither the acknowledged "
          "history nor the history plus the call in flight at the kill, %s.\n"
          "  differences from the acknowledged history:\n%s"
          "  differences from the history plus the call in flight:\n%s",
          round, worker->index, Describe(op), Diff(agent, without_op), Diff(agent, with_op)));
    }
    std::string resolution;
    if (match_with && !match_without) {
      worker->model = std::move(with);
      resolution = "applied";
      ++applied_;
    } else if (match_without && !match_with) {
      resolution = "not applied";
      ++not_applied_;
    } else {
      resolution = "no effect";
      ++no_effect_;
    }
    parts.push_back(absl::StrFormat("t%d %s %s", worker->index, KindName(op.kind), resolution));
  }
  *report = absl::StrJoin(parts, ", ");
  return CheckNode(stub, round);
}

// Node-wide: nothing but the workers' objects exists, the totals add up, and (memlock) the
// agent's locked memory is exactly what the registry pins.
absl::Status Kill9Harness::CheckNode(v1::NodeAgent::Stub& stub, int round) {
  std::set<std::string> want_contexts;
  std::set<std::string> want_containers;
  Totals want;
  for (auto& worker : workers_) {
    for (const std::string& name : worker->model->ContextNames()) want_contexts.insert(name);
    for (const std::string& name : worker->model->ContainerNames()) want_containers.insert(name);
    const Totals totals = worker->model->totals();
    want.contexts += totals.contexts;
    want.containers += totals.containers;
    want.regions += totals.regions;
    want.locked_bytes += totals.locked_bytes;
    want.installed_entries += totals.installed_entries;
  }
  std::set<std::string> have_contexts;
  std::set<std::string> have_containers;
  {
    grpc::ClientContext context;
    SetDeadline(&context, kRpcDeadline);
    v1::ListContextsResponse response;
    grpc::Status status = stub.ListContexts(&context, v1::ListContextsRequest(), &response);
    if (!status.ok()) return RpcError("ListContexts", status);
    for (const v1::Context& c : response.contexts()) have_contexts.insert(c.name());
  }
  {
    grpc::ClientContext context;
    SetDeadline(&context, kRpcDeadline);
    v1::ListContainersResponse response;
    grpc::Status status = stub.ListContainers(&context, v1::ListContainersRequest(), &response);
    if (!status.ok()) return RpcError("ListContainers", status);
    for (const v1::Container& c : response.containers()) have_containers.insert(c.name());
  }
  if (have_contexts != want_contexts || have_containers != want_containers) {
    return absl::DataLossError(absl::StrFormat(
        "round %d: the agent lists contexts [%s] and containers [%s]; the models have [%s] and "
        "[%s]",
        round, absl::StrJoin(have_contexts, ","), absl::StrJoin(have_containers, ","),
        absl::StrJoin(want_contexts, ","), absl::StrJoin(want_containers, ",")));
  }
  v1::NodeStatus node;
  {
    grpc::ClientContext context;
    SetDeadline(&context, kRpcDeadline);
    grpc::Status status = stub.GetNodeStatus(&context, v1::GetNodeStatusRequest(), &node);
    if (!status.ok()) return RpcError("GetNodeStatus", status);
  }
  const std::string have_totals = absl::StrFormat(
      "contexts=%d containers=%d regions=%d locked_bytes=0x%x installed_entries=%d store_failed=%d",
      node.contexts(), node.containers(), node.regions(), node.locked_bytes(),
      node.installed_entries(), node.store_failed());
  const std::string want_totals = absl::StrFormat(
      "contexts=%d containers=%d regions=%d locked_bytes=0x%x installed_entries=%d store_failed=0",
      want.contexts, want.containers, want.regions, want.locked_bytes, want.installed_entries);
  if (have_totals != want_totals) {
    return absl::DataLossError(
        absl::StrFormat("round %d: node status %s, models %s", round, have_totals, want_totals));
  }
  if (mode_.memlock()) {
    absl::StatusOr<uint64_t> vmlck = VmLckBytes(agent_->pid());
    if (!vmlck.ok()) return vmlck.status();
    if (*vmlck != vmlck_baseline_ + want.locked_bytes) {
      return absl::DataLossError(absl::StrFormat(
          "round %d: the agent's VmLck is 0x%x bytes, but baseline 0x%x + registry 0x%x = 0x%x "
          "(%s pins)",
          round, *vmlck, vmlck_baseline_, want.locked_bytes, vmlck_baseline_ + want.locked_bytes,
          *vmlck > vmlck_baseline_ + want.locked_bytes ? "leaked" : "missing"));
    }
  }
  return absl::OkStatus();
}

absl::Status Kill9Harness::Run() {
  if (g_agent_binary == nullptr) {
    return absl::InvalidArgumentError("usage: agent_kill9_test <path to dmapin-agent>");
  }
  // A short directory: Unix socket paths are limited to 108 bytes.
  char dir_template[] = "/tmp/dmapin-kill9-XXXXXX";
  if (mkdtemp(dir_template) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp: ", std::strerror(errno)));
  }
  dir_ = dir_template;
  socket_ = dir_ + "/agent.sock";
  std::string log_path = dir_ + "/agent.log";
  if (const char* outputs = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR"); outputs != nullptr) {
    log_path = absl::StrCat(outputs, "/agent-", mode_.backend, ".log");
    std::error_code ignored;
    std::filesystem::remove(log_path, ignored);
  }
  std::vector<std::string> args = {
      absl::StrCat("--backend=", mode_.backend), absl::StrCat("--state_dir=", dir_, "/state"),
      absl::StrCat("--uds_path=", socket_), "--tcp_address=", "--node_name=kill9",
      // No metrics listener (a fixed TCP port by default); --undefok keeps agents without the
      // flag working.
      "--metrics_address=", "--undefok=metrics_address",
      // The workload picks memlock limits and the waiver: the test is the node's manager too.
      absl::StrCat("--manager_uids=", getuid())};
  std::vector<SimRange> holes;
  if (!mode_.memlock()) {
    args.push_back(absl::StrCat("--sim_page_size=", mode_.page_size));
    const SimRange hole{.ua = kSimBase + kSimHolePage * mode_.page_size, .size = mode_.page_size};
    args.push_back(absl::StrFormat("--sim_holes=0x%x:0x%x", hole.ua, hole.size));
    holes.push_back(hole);
  }
  agent_ = std::make_unique<AgentProcess>(g_agent_binary, args, log_path);
  std::printf("kill -9 test: backend %s, page size %d, %d workers, %d rounds, seed %llu%s\n",
              mode_.backend.c_str(), static_cast<int>(mode_.page_size), kWorkers, mode_.rounds,
              static_cast<unsigned long long>(seed_),
              avoid_unbind_ ? " (DMAPIN_KILL9_AVOID=unbind: never empties a bound container)" : "");
  std::fflush(stdout);

  absl::StatusOr<std::unique_ptr<v1::NodeAgent::Stub>> stub = StartAgent(agent_.get(), socket_);
  if (!stub.ok()) return stub.status();
  if (mode_.memlock()) {
    absl::StatusOr<uint64_t> baseline = VmLckBytes(agent_->pid());
    if (!baseline.ok()) return baseline.status();
    vmlck_baseline_ = *baseline;
    std::printf("VmLck baseline before any context: 0x%x bytes\n",
                static_cast<unsigned>(vmlck_baseline_));
  }

  for (int i = 0; i < kWorkers; ++i) {
    auto worker = std::make_unique<Worker>();
    worker->index = i;
    worker->model = std::make_unique<Model>(mode_.page_size, holes);
    worker->rng.seed(seed_ * 7919 + static_cast<uint64_t>(i) + 1);
    workers_.push_back(std::move(worker));
  }
  for (auto& worker : workers_) {
    worker->thread = std::thread([this, w = worker.get()] { WorkerLoop(w); });
  }

  const absl::Time start = absl::Now();
  uint64_t total_acked = 0;
  for (int round = 1; round <= mode_.rounds; ++round) {
    // Resume the workload, each worker on a fresh channel to the restarted agent.
    {
      MutexLock lock(&mu_);
      for (auto& worker : workers_) {
        worker->stub = v1::NodeAgent::NewStub(NewChannel(socket_));
        worker->acked_round = 0;
      }
      killed_.store(false);
      parked_ = 0;
      round_ = round;
    }
    cv_.notify_all();
    const absl::Duration delay = absl::Milliseconds(
        std::uniform_int_distribution<int>(20, 250)(rng_));  // the random kill moment
    {
      std::unique_lock<Mutex> lock(mu_);
      cv_.wait_for(lock, absl::ToChronoMilliseconds(delay), [&] { return !failure_.empty(); });
    }
    killed_.store(true);
    agent_->Kill();
    {
      std::unique_lock<Mutex> lock(mu_);
      if (!cv_.wait_for(lock, absl::ToChronoMilliseconds(kParkDeadline),
                        [&] { return parked_ == kWorkers; })) {
        return absl::DeadlineExceededError(
            absl::StrFormat("round %d: the workers did not stop within %s after the kill", round,
                            absl::FormatDuration(kParkDeadline)));
      }
    }
    if (std::string failed = failure(); !failed.empty()) {
      return absl::DataLossError(failed);
    }
    const absl::Time restart = absl::Now();
    stub = StartAgent(agent_.get(), socket_);
    if (!stub.ok()) {
      return absl::DataLossError(
          absl::StrFormat("round %d: restart failed: %s", round, stub.status().message()));
    }
    const absl::Duration restart_time = absl::Now() - restart;
    std::string report;
    if (absl::Status status = Resolve(round, **stub, &report); !status.ok()) return status;
    uint64_t acked = 0;
    std::vector<std::string> per_worker;
    for (auto& worker : workers_) {
      acked += worker->acked_round;
      worker->acked_total += worker->acked_round;
      per_worker.push_back(absl::StrFormat("t%d %d", worker->index, worker->acked_round));
    }
    total_acked += acked;
    std::printf(
        "round %d/%d: killed after %d ms, %d ops acknowledged (%s); in flight: %s; "
        "restart %d ms\n",
        round, mode_.rounds, static_cast<int>(absl::ToInt64Milliseconds(delay)),
        static_cast<int>(acked), absl::StrJoin(per_worker, ", ").c_str(), report.c_str(),
        static_cast<int>(absl::ToInt64Milliseconds(restart_time)));
    std::fflush(stdout);
  }
  StopWorkers();

  std::map<std::string, uint64_t> answers;
  for (auto& worker : workers_) {
    for (const auto& [key, count] : worker->answers) answers[key] += count;
  }
  std::vector<std::string> histogram;
  for (const auto& [key, count] : answers) histogram.push_back(absl::StrCat(key, "=", count));
  std::printf("answers: %s\n", absl::StrJoin(histogram, " ").c_str());
  std::printf(
      "summary: backend %s: %d rounds, %d acknowledged ops, in-flight ops applied %d / "
      "not applied %d / no effect %d; at the restarts %d mapped regions, %d pending "
      "release; %.1f s\n",
      mode_.backend.c_str(), mode_.rounds, static_cast<int>(total_acked), applied_, not_applied_,
      no_effect_, seen_mapped_, seen_pending_, absl::ToDoubleSeconds(absl::Now() - start));
  std::fflush(stdout);
  return absl::OkStatus();
}

// --- Reproductions of agent bugs the kill -9 test found -----------------------------------------

// A sim agent (64 KiB pages) on a fresh state directory that can be killed and restarted.
class ReproAgent {
 public:
  static constexpr uint64_t kPage = 65536;

  ReproAgent() {
    char dir_template[] = "/tmp/dmapin-repro-XXXXXX";
    if (mkdtemp(dir_template) != nullptr) dir_ = dir_template;
    socket_ = dir_ + "/agent.sock";
    process_ = MakeProcess({});
  }
  ~ReproAgent() {
    process_->Kill();
    std::error_code ignored;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ignored);
  }

  absl::Status Start() {
    if (g_agent_binary == nullptr || dir_.empty()) {
      return absl::FailedPreconditionError("no agent binary or no scratch directory");
    }
    absl::StatusOr<std::unique_ptr<v1::NodeAgent::Stub>> stub = StartAgent(process_.get(), socket_);
    if (!stub.ok()) return stub.status();
    stub_ = std::move(*stub);
    return absl::OkStatus();
  }
  absl::Status Kill9AndRestart() {
    process_->Kill();
    return Start();
  }
  void Kill9() { process_->Kill(); }
  // Starts a stopped agent again, with `extra_args` added to its flags.
  absl::Status StartWith(std::vector<std::string> extra_args) {
    process_ = MakeProcess(std::move(extra_args));
    return Start();
  }
  std::string state_dir() const { return dir_ + "/state"; }
  std::string LogTail() { return process_->LogTail(); }

  // The errno of the agent's answer (0 for OK); -1 when it did not answer.
  int Do(const Op& op) {
    const Answer answer = Send(*stub_, op);
    return answer.answered ? answer.err : -1;
  }
  absl::StatusOr<v1::Container> GetContainer(const std::string& name) {
    grpc::ClientContext context;
    SetDeadline(&context, kRpcDeadline);
    v1::GetContainerRequest request;
    request.set_name(name);
    v1::Container container;
    grpc::Status status = stub_->GetContainer(&context, request, &container);
    if (!status.ok()) return RpcError("GetContainer", status);
    return container;
  }

 private:
  std::unique_ptr<AgentProcess> MakeProcess(std::vector<std::string> extra_args) {
    std::vector<std::string> args = {"--backend=sim",
                                     absl::StrCat("--sim_page_size=", kPage),
                                     absl::StrCat("--state_dir=", dir_, "/state"),
                                     absl::StrCat("--uds_path=", socket_),
                                     "--tcp_address=",
                                     "--metrics_address=",
                                     "--undefok=metrics_address",
                                     absl::StrCat("--manager_uids=", getuid())};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    return std::make_unique<AgentProcess>(g_agent_binary == nullptr ? "" : g_agent_binary,
                                          std::move(args), dir_ + "/agent.log");
  }

  std::string dir_;
  std::string socket_;
  std::unique_ptr<AgentProcess> process_;
  std::unique_ptr<v1::NodeAgent::Stub> stub_;
};

Op ReproOp(OpKind kind, std::string container, uint64_t ua = 0, uint64_t size = 0,
           uint64_t iova = 0) {
  Op op;
  op.kind = kind;
  op.context = "vm";
  op.container = std::move(container);
  op.ua = ua;
  op.size = size;
  op.iova = iova;
  return op;
}

// Container "b" registers a region of "vm" and unregisters it again: b stays bound to vm (spec
// §1: a container is bound when it first registers memory; the registry never unbinds it), so
// it may map any region of vm (spec §7.4), here one that container "a" holds.
void BindWithoutRegions(ReproAgent& agent) {
  constexpr uint64_t kBase = kSimBase;
  constexpr uint64_t kPage = ReproAgent::kPage;
  Op create = ReproOp(OpKind::kCreateContext, "");
  ASSERT_EQ(agent.Do(create), 0);
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kCreateContainer, "a")), 0);
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kCreateContainer, "b")), 0);
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kRegister, "a", kBase, 4 * kPage)), 0);
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kRegister, "b", kBase + 4 * kPage, kPage)), 0);
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kUnregister, "b", kBase + 4 * kPage, kPage)), 0);
  absl::StatusOr<v1::Container> b = agent.GetContainer("b");
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->context(), "vm") << "before the kill";
}

// The binding is acknowledged state, but no store row records it: after kill -9 the restarted
// agent has forgotten it, and b's maps of vm fail with EPERM.
TEST(AgentKill9Repro, ContainerStaysBoundAfterKill9) {
  ReproAgent agent;
  ASSERT_TRUE(agent.Start().ok());
  BindWithoutRegions(agent);
  if (testing::Test::HasFatalFailure()) return;
  const uint64_t page = ReproAgent::kPage;
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kMap, "b", kSimBase, page, /*iova=*/0)), 0);
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kUnmap, "b", 0, page, /*iova=*/0)), 0);

  absl::Status restarted = agent.Kill9AndRestart();
  ASSERT_TRUE(restarted.ok()) << restarted;
  absl::StatusOr<v1::Container> b = agent.GetContainer("b");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->context(), "vm") << "the restarted agent forgot that b is bound to vm";
  EXPECT_EQ(ErrnoText(agent.Do(ReproOp(OpKind::kMap, "b", kSimBase, page, /*iova=*/0))), "OK")
      << "b may map vm's regions after the restart as it could before";
}

// Worse: if b holds an acknowledged mapping at the kill, the restarted agent cannot re-map it
// (EPERM: b is not bound any more) and refuses to start at all.
TEST(AgentKill9Repro, MappingOfContainerWithoutRegionsSurvivesKill9) {
  ReproAgent agent;
  ASSERT_TRUE(agent.Start().ok());
  BindWithoutRegions(agent);
  if (testing::Test::HasFatalFailure()) return;
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kMap, "b", kSimBase, ReproAgent::kPage, /*iova=*/0)), 0);

  absl::Status restarted = agent.Kill9AndRestart();
  ASSERT_TRUE(restarted.ok()) << restarted;
  absl::StatusOr<v1::Container> b = agent.GetContainer("b");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->context(), "vm");
  EXPECT_EQ(b->installed_entries(), 1u);
}

// The newest mapping-journal file in `dir` when its first two record slots are written (the maps
// before a kill that beat the 100 ms fold), else "".
std::string JournalWithRecords(const std::string& dir) {
  const std::vector<std::string> files = ListJournalFiles(dir);  // by name: oldest first
  if (files.empty()) return "";
  std::ifstream in(files.back(), std::ios::binary);
  std::string slots(3 * 48, '\0');
  in.read(slots.data(), static_cast<std::streamsize>(slots.size()));
  const bool written = in.gcount() == static_cast<std::streamsize>(slots.size()) &&
                       slots.find_first_not_of('\0', 2 * 48) != std::string::npos;
  return written ? files.back() : "";
}

// Acknowledged maps only in the journal at a kill -9, then one byte of the first of them flipped:
// the agent refuses to start with DATA_LOSS naming the file and offset instead of silently serving
// fewer mappings; with --recover_damaged_state it starts and says what it dropped.
TEST(AgentKill9Repro, DamagedJournalRefusesToStartUnlessRecoveryIsAsked) {
  ReproAgent agent;
  ASSERT_TRUE(agent.Start().ok());
  const uint64_t page = ReproAgent::kPage;
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kCreateContext, "")), 0);
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kCreateContainer, "a")), 0);
  ASSERT_EQ(agent.Do(ReproOp(OpKind::kRegister, "a", kSimBase, 64 * page)), 0);
  std::string damaged;
  for (int round = 0; round < 8 && damaged.empty(); ++round) {
    for (uint64_t i = 0; i < 4; ++i) {
      const uint64_t n = round * 4 + i;
      ASSERT_EQ(agent.Do(ReproOp(OpKind::kMap, "a", kSimBase + n * page, page, n * page)), 0);
    }
    agent.Kill9();
    damaged = JournalWithRecords(agent.state_dir());
    if (damaged.empty()) {
      ASSERT_TRUE(agent.StartWith({}).ok());  // the fold won: again
    }
  }
  ASSERT_FALSE(damaged.empty()) << "every round's maps were folded before the kill";
  {
    std::fstream file(damaged, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(48 + 30);
    file.put('\x5a');
  }
  absl::Status refused = agent.StartWith({});
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.message()), ::testing::HasSubstr("DATA_LOSS"));
  EXPECT_THAT(std::string(refused.message()),
              ::testing::HasSubstr(absl::StrCat(damaged, " at offset 48")));
  absl::Status recovered = agent.StartWith({"--recover_damaged_state"});
  ASSERT_TRUE(recovered.ok()) << recovered;
  EXPECT_THAT(agent.LogTail(), ::testing::HasSubstr("recovered from damage"));
  EXPECT_THAT(agent.LogTail(), ::testing::HasSubstr("well-formed records after the damage"));
  // The next start needs no flag: the damage was set aside.
  ASSERT_TRUE(agent.Kill9AndRestart().ok());
}

TEST(AgentKill9Test, SimBackend) {
  Kill9Harness harness(
      {.backend = "sim", .page_size = 65536, .rounds = EnvInt("DMAPIN_KILL9_ROUNDS", 100)});
  absl::Status status = harness.Run();
  EXPECT_TRUE(status.ok()) << status;
}

TEST(AgentKill9Test, MemlockBackend) {
  if (geteuid() != 0) {
    GTEST_SKIP() << "the memlock backend needs root (mlock without limit, /proc/self/pagemap "
                    "frame numbers); running as uid "
                 << geteuid();
  }
  if (absl::StatusOr<std::unique_ptr<MemlockBackend>> probe = MemlockBackend::Create();
      !probe.ok()) {
    GTEST_SKIP() << "the memlock backend is not available here: " << probe.status();
  }
  const long page_size = sysconf(_SC_PAGESIZE);
  Kill9Harness harness({.backend = "memlock",
                        .page_size = static_cast<uint64_t>(page_size),
                        .rounds = EnvInt("DMAPIN_KILL9_ROUNDS", 50)});
  absl::Status status = harness.Run();
  EXPECT_TRUE(status.ok()) << status;
}

}  // namespace
}  // namespace dmapin::agent

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  if (argc > 1) {
    dmapin::agent::g_agent_binary = argv[1];
  } else if (const char* env = std::getenv("DMAPIN_AGENT"); env != nullptr) {
    dmapin::agent::g_agent_binary = env;
  }
  return RUN_ALL_TESTS();
}
