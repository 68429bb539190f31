#include "tests/fleet/fleetsim.h"

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <random>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/registry_counters.h"

namespace dmapin {
namespace fleetsim {
namespace {

using Clock = std::chrono::steady_clock;
// (context, ua, size), as the server keys regions.
using Key = std::tuple<std::string, uint64_t, uint64_t>;

constexpr uint64_t kWindowSize = uint64_t{1} << 40;
constexpr uint64_t kRegionBase = uint64_t{1} << 32;
// Mappings a region may carry in the workload before it prefers unmapping.
constexpr uint64_t kMaxMappingsPerRegion = 8;

const char* ErrnoName(int err) {
  switch (err) {
    case 0:
      return "OK";
    case ENOENT:
      return "ENOENT";
    case EBUSY:
      return "EBUSY";
    case EINVAL:
      return "EINVAL";
    default:
      return "EIO";
  }
}

}  // namespace

// One stream (one call). Its agent owns it and deletes it once OnDone has run.
class FleetSim::Stream final : public grpc::ClientBidiReactor<v1::AgentMessage, v1::ServerMessage> {
 public:
  explicit Stream(Agent* agent) : agent_(agent) {}
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

  grpc::ClientContext context;
  v1::ServerMessage incoming;

 private:
  Agent* const agent_;
};

class FleetSim::Agent {
 public:
  Agent(FleetSim* sim, int index, v1::Control::Stub* stub)
      : sim_(sim),
        index_(index),
        name_(sim->NodeName(index)),
        stub_(stub),
        rng_(sim->options_.seed * 1000003 + static_cast<uint64_t>(index)) {
    const FleetSimOptions& o = sim->options_;
    incarnation_ = absl::StrFormat("%016x", rng_());
    for (int c = 0; c < o.contexts; ++c) {
      v1::Context& context = contexts_[absl::StrCat("vm", c)];
      context.set_name(absl::StrCat("vm", c));
      context.set_memlock_unlimited(true);
      for (int k = 0; k < o.containers_per_context; ++k) {
        v1::Container& container = containers_[absl::StrCat("vm", c, "/c", k)];
        container.set_name(absl::StrCat("vm", c, "/c", k));
        container.set_iommu_page_size(o.page_size);
        container.set_window_size(kWindowSize);
      }
    }
    for (int r = 0; r < o.regions_per_node; ++r) {
      const int c = r % std::max(1, o.contexts);
      const uint64_t ua = kRegionBase + static_cast<uint64_t>(r) * o.region_size;
      int err = 0;
      std::string message;
      RegisterLocked(absl::StrCat("vm", c), absl::StrCat("vm", c, "/c0"), ua, o.region_size, &err,
                     &message);
    }
    ClearDirtyLocked();
  }

  ~Agent() {
    // The driver and every stream are done (FleetSim::Stop).
    delete stream_;
  }

  // --- Control (driver and API threads) ------------------------------------------------------

  void Connect() {
    MutexLock lock(&mu_);
    want_up_ = true;
    reconnect_pending_ = false;
    if (stream_ != nullptr && !stream_done_) return;
    delete stream_;
    stream_ = new Stream(this);
    stream_done_ = false;
    closed_ = false;
    writing_ = false;
    welcomed_ = false;
    outq_.clear();
    ++connects_;
    stub_->async()->Connect(&stream_->context, stream_);
    stream_->AddHold();
    stream_->StartRead(&stream_->incoming);
    v1::AgentMessage hello;
    v1::Hello* h = hello.mutable_hello();
    h->set_node_name(name_);
    for (const auto& [key, value] : sim_->options_.labels) (*h->mutable_labels())[key] = value;
    h->set_page_size(sim_->options_.page_size);
    h->set_backend("sim");
    h->add_available_backends("sim");
    h->set_agent_version("fleetsim");
    h->set_incarnation(incarnation_);
    EnqueueLocked(std::move(hello));
    EnqueueSnapshotLocked();
    last_report_ = Clock::now();
    stream_->StartCall();
  }

  // Cancels the stream and keeps the agent down; `wait`: until the stream is done.
  void Disconnect(bool wait) {
    MutexLock lock(&mu_);
    want_up_ = false;
    reconnect_pending_ = false;
    if (stream_ == nullptr || stream_done_) return;
    stream_->context.TryCancel();
    while (wait && !stream_done_) cv_.wait(mu_);
  }

  void WaitDone() {
    MutexLock lock(&mu_);
    while (stream_ != nullptr && !stream_done_) cv_.wait(mu_);
  }

  // The driver's visit, once per report interval: the workload since the last visit, then a
  // Delta or a Heartbeat.
  void Tick(Clock::time_point now, double maps_per_second) {
    MutexLock lock(&mu_);
    if (!UpLocked() || !welcomed_ || sim_->flood_.load(std::memory_order_relaxed)) return;
    if (maps_per_second > 0) {
      credit_ += maps_per_second * std::chrono::duration<double>(now - last_report_).count();
      while (credit_ >= 1) {
        credit_ -= 1;
        MapOrUnmapLocked(RandomRegionLocked());
      }
    }
    last_report_ = now;
    EnqueueReportLocked(/*forced=*/false);
  }

  void ReportNow() {
    MutexLock lock(&mu_);
    if (UpLocked()) EnqueueReportLocked(/*forced=*/false);
  }

  void StartFlood() {
    MutexLock lock(&mu_);
    if (UpLocked() && outq_.empty()) {
      FloodDeltaLocked();
    }
  }

  bool Flushed() const {
    MutexLock lock(&mu_);
    return !UpLocked() || (outq_.empty() && !writing_);
  }

  bool welcomed() const {
    MutexLock lock(&mu_);
    return UpLocked() && welcomed_;
  }

  bool reconnect_pending() const {
    MutexLock lock(&mu_);
    return reconnect_pending_;
  }

  void Stats(FleetSimStats* s) const {
    MutexLock lock(&mu_);
    ++s->agents;
    s->connected += UpLocked() ? 1 : 0;
    s->welcomed += UpLocked() && welcomed_ ? 1 : 0;
    s->connects += connects_;
    s->disconnects += disconnects_;
    s->decisions_received += decisions_received_;
    s->decisions_applied += applied_.size();
    s->decisions_refused += refused_;
    s->duplicates += duplicates_;
    s->ebusy_answers += ebusy_answers_;
    s->snapshots_sent += snapshots_sent_;
    s->snapshot_requests += snapshot_requests_;
    s->deltas_sent += deltas_sent_;
    s->heartbeats_sent += heartbeats_sent_;
    s->region_updates_sent += region_updates_sent_;
    s->messages_sent += messages_sent_;
    s->messages_received += messages_received_;
    s->regions += regions_.size();
    for (const auto& [key, region] : regions_) {
      s->pinned_bytes += std::get<2>(key);
      s->used_sum += region.holders.size();
      s->installed_mappings += region.mapped - 1;
    }
    s->contexts += contexts_.size();
    s->containers += containers_.size();
    v1::RegistryCounters& c = s->counters;
#define DMAPIN_SUM_REPORTED(field, ...) c.set_##field(c.field() + counters_.field());
    DMAPIN_REGISTRY_COUNTERS(DMAPIN_SUM_REPORTED, DMAPIN_COUNTER_IGNORE)
#undef DMAPIN_SUM_REPORTED
  }

  void Applications(std::map<std::string, int>* out) const {
    MutexLock lock(&mu_);
    for (const auto& [id, record] : applied_) ++(*out)[id];
  }

  bool Applied(const std::string& id, int* errno_value) const {
    MutexLock lock(&mu_);
    auto it = applied_.find(id);
    if (it == applied_.end()) return false;
    if (errno_value != nullptr) *errno_value = it->second.first;
    return true;
  }

  // --- Stream callbacks (gRPC threads) -------------------------------------------------------

  void OnReadDone(Stream* stream, bool ok) {
    if (!ok) {
      {
        MutexLock lock(&mu_);
        closed_ = true;
        if (!writing_) outq_.clear();
      }
      stream->RemoveHold();
      return;
    }
    {
      MutexLock lock(&mu_);
      ++messages_received_;
      const v1::ServerMessage& message = stream->incoming;
      switch (message.body_case()) {
        case v1::ServerMessage::kWelcome:
          welcomed_ = true;
          if (message.welcome().report_interval_ms() > 0 &&
              sim_->options_.report_interval.count() == 0) {
            sim_->interval_ms_.store(message.welcome().report_interval_ms(),
                                     std::memory_order_relaxed);
          }
          break;
        case v1::ServerMessage::kSnapshotRequest:
          ++snapshot_requests_;
          EnqueueSnapshotLocked();
          break;
        case v1::ServerMessage::kDecision:
          HandleDecisionLocked(message.decision());
          break;
        default:
          break;
      }
    }
    stream->StartRead(&stream->incoming);
  }

  void OnWriteDone(bool ok) {
    MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      closed_ = true;
      outq_.clear();
      return;
    }
    outq_.pop_front();
    if (closed_) {
      outq_.clear();
      return;
    }
    if (outq_.empty() && sim_->flood_.load(std::memory_order_relaxed)) FloodDeltaLocked();
    WriteNextLocked();
  }

  void OnDone() {
    bool reconnect = false;
    {
      MutexLock lock(&mu_);
      stream_done_ = true;
      closed_ = true;
      writing_ = false;
      welcomed_ = false;
      outq_.clear();
      ++disconnects_;
      reconnect = want_up_;
      reconnect_pending_ = want_up_;
      cv_.notify_all();
    }
    if (reconnect) sim_->ScheduleReconnect(index_);
  }

 private:
  struct Region {
    uint64_t mapped = 1;  // 1 + installed mappings
    std::vector<std::string> holders;
    // The container whose IOMMU table holds the mappings.
    std::string mapper;
  };

  bool UpLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stream_ != nullptr && !stream_done_ && !closed_;
  }

  // --- Writes ---------------------------------------------------------------------------------

  void EnqueueLocked(v1::AgentMessage message) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (stream_ == nullptr || closed_) return;
    ++messages_sent_;
    switch (message.body_case()) {
      case v1::AgentMessage::kSnapshot:
        ++snapshots_sent_;
        break;
      case v1::AgentMessage::kDelta:
        ++deltas_sent_;
        region_updates_sent_ +=
            message.delta().upserted_regions_size() + message.delta().removed_regions_size();
        break;
      case v1::AgentMessage::kHeartbeat:
        ++heartbeats_sent_;
        break;
      default:
        break;
    }
    outq_.push_back(std::move(message));
    WriteNextLocked();
  }

  // The front of the queue is the message being written; it stays there until OnWriteDone.
  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || closed_ || outq_.empty()) return;
    writing_ = true;
    stream_->StartWrite(&outq_.front());
  }

  // --- Reports --------------------------------------------------------------------------------

  void FillRegion(const Key& key, const Region& region, v1::Region* out) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const uint64_t page = sim_->options_.page_size;
    out->set_context(std::get<0>(key));
    out->set_ua(std::get<1>(key));
    out->set_size(std::get<2>(key));
    out->set_entries(std::get<2>(key) / page);
    out->set_used(region.holders.size());
    out->set_mapped(region.mapped);
    out->set_page_size(page);
    out->set_max_iommu_page_size(page);
    for (const std::string& holder : region.holders) out->add_containers(holder);
  }

  void ClearDirtyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    dirty_regions_.clear();
    removed_regions_.clear();
    dirty_contexts_.clear();
    removed_contexts_.clear();
    dirty_containers_.clear();
    removed_containers_.clear();
    counters_dirty_ = false;
  }

  void EnqueueSnapshotLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    v1::AgentMessage message;
    v1::Snapshot* snapshot = message.mutable_snapshot();
    for (const auto& [name, context] : contexts_) *snapshot->add_contexts() = context;
    for (const auto& [name, container] : containers_) *snapshot->add_containers() = container;
    for (const auto& [key, region] : regions_) FillRegion(key, region, snapshot->add_regions());
    *snapshot->mutable_counters() = counters_;
    snapshot->set_version(++version_);
    ClearDirtyLocked();
    EnqueueLocked(std::move(message));
  }

  // A Delta with what changed since the last report; when nothing did, an empty Delta if
  // `forced` (after a decision: the server waits for a report newer than the result), else a
  // Heartbeat.
  void EnqueueReportLocked(bool forced) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    v1::AgentMessage message;
    v1::Delta* delta = message.mutable_delta();
    for (const Key& key : dirty_regions_) {
      auto it = regions_.find(key);
      if (it != regions_.end()) FillRegion(key, it->second, delta->add_upserted_regions());
    }
    for (const Key& key : removed_regions_) {
      v1::RegionKey* removed = delta->add_removed_regions();
      removed->set_context(std::get<0>(key));
      removed->set_ua(std::get<1>(key));
      removed->set_size(std::get<2>(key));
    }
    for (const std::string& name : dirty_contexts_) {
      auto it = contexts_.find(name);
      if (it != contexts_.end()) *delta->add_upserted_contexts() = it->second;
    }
    for (const std::string& name : removed_contexts_) delta->add_removed_contexts(name);
    for (const std::string& name : dirty_containers_) {
      auto it = containers_.find(name);
      if (it != containers_.end()) *delta->add_upserted_containers() = it->second;
    }
    for (const std::string& name : removed_containers_) delta->add_removed_containers(name);
    if (counters_dirty_) *delta->mutable_counters() = counters_;
    const bool changed = !dirty_regions_.empty() || !removed_regions_.empty() ||
                         !dirty_contexts_.empty() || !removed_contexts_.empty() ||
                         !dirty_containers_.empty() || !removed_containers_.empty() ||
                         counters_dirty_;
    ClearDirtyLocked();
    if (changed) {
      delta->set_version(++version_);
    } else if (forced) {
      delta->set_version(version_);
    } else {
      message.mutable_heartbeat()->set_sequence(++heartbeat_sequence_);
    }
    EnqueueLocked(std::move(message));
  }

  void FloodDeltaLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int n = std::min<int>(sim_->flood_regions_.load(std::memory_order_relaxed),
                                static_cast<int>(regions_.size()));
    if (n <= 0) return;
    auto it = regions_.upper_bound(flood_cursor_);
    for (int i = 0; i < n; ++i) {
      if (it == regions_.end()) it = regions_.begin();
      MapOrUnmapLocked(it);
      flood_cursor_ = it->first;
      ++it;
    }
    EnqueueReportLocked(/*forced=*/false);
  }

  // --- The simulated registry ---------------------------------------------------------------

  std::map<Key, Region>::iterator RandomRegionLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (regions_.empty()) return regions_.end();
    return std::next(regions_.begin(), static_cast<std::ptrdiff_t>(rng_() % regions_.size()));
  }

  void TouchRegionLocked(const Key& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    dirty_regions_.insert(key);
    removed_regions_.erase(key);
  }

  void AdjustInstalledLocked(const std::string& container, int64_t delta)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = containers_.find(container);
    if (it == containers_.end()) return;
    it->second.set_installed_entries(
        static_cast<uint64_t>(static_cast<int64_t>(it->second.installed_entries()) + delta));
    dirty_containers_.insert(container);
  }

  // A simulated VMM maps one more IOMMU page on the region, or unmaps one.
  void MapOrUnmapLocked(std::map<Key, Region>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (it == regions_.end() || it->second.holders.empty()) return;
    Region& region = it->second;
    const uint64_t installed = region.mapped - 1;
    const bool map = installed == 0 || (installed < kMaxMappingsPerRegion && (rng_() & 1) != 0);
    if (map) {
      if (installed == 0) region.mapper = region.holders.front();
      ++region.mapped;
      counters_.set_maps_ok(counters_.maps_ok() + 1);
      AdjustInstalledLocked(region.mapper, 1);
    } else {
      --region.mapped;
      counters_.set_unmaps(counters_.unmaps() + 1);
      AdjustInstalledLocked(region.mapper, -1);
    }
    counters_dirty_ = true;
    TouchRegionLocked(it->first);
  }

  // The VMM unmaps everything installed on the region.
  void UnmapAllLocked(std::map<Key, Region>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Region& region = it->second;
    const uint64_t installed = region.mapped - 1;
    if (installed == 0) return;
    region.mapped = 1;
    counters_.set_unmaps(counters_.unmaps() + installed);
    AdjustInstalledLocked(region.mapper, -static_cast<int64_t>(installed));
    counters_dirty_ = true;
    TouchRegionLocked(it->first);
  }

  void RegisterLocked(const std::string& context_name, const std::string& container_name,
                      uint64_t ua, uint64_t size, int* err, std::string* message)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto context = contexts_.find(context_name);
    auto container = containers_.find(container_name);
    counters_dirty_ = true;
    if (context == contexts_.end() || container == containers_.end()) {
      counters_.set_registers_failed(counters_.registers_failed() + 1);
      *err = ENOENT;
      *message =
          context == contexts_.end() ? "ENOENT: no such context" : "ENOENT: no such container";
      return;
    }
    if (!container->second.context().empty() && container->second.context() != context_name) {
      counters_.set_registers_failed(counters_.registers_failed() + 1);
      *err = EINVAL;
      *message = "EINVAL: the container is bound to another context";
      return;
    }
    const Key key(context_name, ua, size);
    auto [it, inserted] = regions_.try_emplace(key);
    if (inserted) {
      context->second.set_locked_bytes(context->second.locked_bytes() + size);
      context->second.set_regions(context->second.regions() + 1);
      dirty_contexts_.insert(context_name);
    }
    Region& region = it->second;
    if (std::find(region.holders.begin(), region.holders.end(), container_name) ==
        region.holders.end()) {
      region.holders.push_back(container_name);
      container->second.set_held_regions(container->second.held_regions() + 1);
      if (container->second.context().empty()) {
        container->second.set_context(context_name);
        context->second.add_containers(container_name);
        dirty_contexts_.insert(context_name);
      }
      dirty_containers_.insert(container_name);
    }
    counters_.set_registers_ok(counters_.registers_ok() + 1);
    TouchRegionLocked(key);
  }

  // Drops `container`'s hold on the region; the region goes when nobody holds it.
  void DropHoldLocked(std::map<Key, Region>::iterator it, const std::string& container)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Region& region = it->second;
    if (region.mapper == container) UnmapAllLocked(it);
    region.holders.erase(std::find(region.holders.begin(), region.holders.end(), container));
    auto held = containers_.find(container);
    if (held != containers_.end()) {
      held->second.set_held_regions(held->second.held_regions() - 1);
      dirty_containers_.insert(container);
    }
    const Key key = it->first;
    if (!region.holders.empty()) {
      TouchRegionLocked(key);
      return;
    }
    UnmapAllLocked(it);
    auto context = contexts_.find(std::get<0>(key));
    if (context != contexts_.end()) {
      context->second.set_locked_bytes(context->second.locked_bytes() - std::get<2>(key));
      context->second.set_regions(context->second.regions() - 1);
      dirty_contexts_.insert(std::get<0>(key));
    }
    regions_.erase(it);
    ebusy_once_.erase(key);
    dirty_regions_.erase(key);
    removed_regions_.insert(key);
  }

  void UnregisterLocked(const std::string& container, const Key& key, int* err,
                        std::string* message) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    counters_dirty_ = true;
    auto it = regions_.find(key);
    if (it == regions_.end() || std::find(it->second.holders.begin(), it->second.holders.end(),
                                          container) == it->second.holders.end()) {
      counters_.set_unregisters_failed(counters_.unregisters_failed() + 1);
      *err = ENOENT;
      *message = "ENOENT: the container holds no such region";
      return;
    }
    const bool last = it->second.holders.size() == 1;
    const bool mapped = it->second.mapped > 1;
    const bool injected =
        sim_->options_.ebusy_share > 0 && ebusy_once_.count(key) == 0 &&
        std::uniform_real_distribution<double>(0, 1)(rng_) < sim_->options_.ebusy_share;
    if ((last && mapped) || injected) {
      ebusy_once_.insert(key);
      counters_.set_unregisters_failed(counters_.unregisters_failed() + 1);
      counters_.set_unregister_ebusy(counters_.unregister_ebusy() + 1);
      *err = EBUSY;
      *message = "EBUSY: region still mapped; retry after the DMA mappings are gone";
      ++ebusy_answers_;
      // The VMM finishes its DMA and unmaps: the retry will succeed.
      UnmapAllLocked(it);
      return;
    }
    DropHoldLocked(it, container);
    counters_.set_unregisters_ok(counters_.unregisters_ok() + 1);
  }

  void ReleaseContainerLocked(const std::string& name, int* err, std::string* message)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto container = containers_.find(name);
    if (container == containers_.end()) {
      *err = ENOENT;
      *message = "ENOENT: no such container";
      return;
    }
    for (auto it = regions_.begin(); it != regions_.end();) {
      auto next = std::next(it);
      if (std::find(it->second.holders.begin(), it->second.holders.end(), name) !=
          it->second.holders.end()) {
        DropHoldLocked(it, name);
      }
      it = next;
    }
    const std::string context_name = container->second.context();
    auto context = contexts_.find(context_name);
    if (context != contexts_.end()) {
      auto* list = context->second.mutable_containers();
      list->erase(std::remove(list->begin(), list->end(), name), list->end());
      dirty_contexts_.insert(context_name);
    }
    containers_.erase(name);
    dirty_containers_.erase(name);
    removed_containers_.insert(name);
  }

  void TeardownContextLocked(const std::string& name, int* err, std::string* message)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto context = contexts_.find(name);
    if (context == contexts_.end()) {
      *err = ENOENT;
      *message = "ENOENT: no such context";
      return;
    }
    std::vector<std::string> bound(context->second.containers().begin(),
                                   context->second.containers().end());
    for (const std::string& container : bound) ReleaseContainerLocked(container, err, message);
    *err = 0;
    for (auto it = regions_.begin(); it != regions_.end();) {
      auto next = std::next(it);
      if (std::get<0>(it->first) == name) {
        while (!it->second.holders.empty()) {
          const std::string holder = it->second.holders.back();
          const bool last = it->second.holders.size() == 1;
          DropHoldLocked(it, holder);
          if (last) break;
        }
      }
      it = next;
    }
    contexts_.erase(name);
    dirty_contexts_.erase(name);
    removed_contexts_.insert(name);
  }

  void HandleDecisionLocked(const v1::Decision& decision) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ++decisions_received_;
    v1::AgentMessage message;
    v1::DecisionResult* result = message.mutable_result();
    result->set_decision_id(decision.id());
    result->set_epoch(decision.epoch());
    auto recorded = applied_.find(decision.id());
    if (recorded != applied_.end()) {
      // At most once: answered from the record.
      ++duplicates_;
      result->set_errno_value(recorded->second.first);
      result->set_errno_name(ErrnoName(recorded->second.first));
      result->set_message(recorded->second.second);
      result->set_duplicate(true);
    } else {
      int err = 0;
      std::string text;
      const Key key(decision.context(), decision.ua(), decision.size());
      switch (decision.kind()) {
        case v1::DECISION_KIND_REGISTER:
          RegisterLocked(decision.context(), decision.container(), decision.ua(), decision.size(),
                         &err, &text);
          break;
        case v1::DECISION_KIND_UNREGISTER:
          UnregisterLocked(decision.container(), key, &err, &text);
          break;
        case v1::DECISION_KIND_RELEASE_CONTAINER:
          ReleaseContainerLocked(decision.container(), &err, &text);
          break;
        case v1::DECISION_KIND_TEARDOWN_CONTEXT:
          TeardownContextLocked(decision.context(), &err, &text);
          break;
        default:
          err = EINVAL;
          text = "EINVAL: unknown decision kind";
          break;
      }
      applied_[decision.id()] = {err, text};
      if (err != 0) ++refused_;
      result->set_errno_value(err);
      result->set_errno_name(ErrnoName(err));
      result->set_message(text);
    }
    EnqueueLocked(std::move(message));
    // Show the effect now; after the result, so the server sees a report newer than it.
    EnqueueReportLocked(/*forced=*/true);
  }

  FleetSim* const sim_;
  const int index_;
  const std::string name_;
  v1::Control::Stub* const stub_;

  mutable Mutex mu_;
  std::condition_variable_any cv_;
  std::mt19937_64 rng_ ABSL_GUARDED_BY(mu_);
  std::string incarnation_;

  // The registry.
  std::map<std::string, v1::Context> contexts_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, v1::Container> containers_ ABSL_GUARDED_BY(mu_);
  std::map<Key, Region> regions_ ABSL_GUARDED_BY(mu_);
  v1::RegistryCounters counters_ ABSL_GUARDED_BY(mu_);
  std::set<Key> ebusy_once_ ABSL_GUARDED_BY(mu_);
  // Decision id -> (errno, message), for at-most-once.
  std::map<std::string, std::pair<int, std::string>> applied_ ABSL_GUARDED_BY(mu_);

  // What changed since the last report.
  std::set<Key> dirty_regions_ ABSL_GUARDED_BY(mu_);
  std::set<Key> removed_regions_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> dirty_contexts_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> removed_contexts_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> dirty_containers_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> removed_containers_ ABSL_GUARDED_BY(mu_);
  bool counters_dirty_ ABSL_GUARDED_BY(mu_) = false;
  Key flood_cursor_ ABSL_GUARDED_BY(mu_);

  // The stream.
  Stream* stream_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool stream_done_ ABSL_GUARDED_BY(mu_) = true;
  bool closed_ ABSL_GUARDED_BY(mu_) = true;
  bool want_up_ ABSL_GUARDED_BY(mu_) = false;
  bool reconnect_pending_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<v1::AgentMessage> outq_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool welcomed_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t heartbeat_sequence_ ABSL_GUARDED_BY(mu_) = 0;
  double credit_ ABSL_GUARDED_BY(mu_) = 0;
  Clock::time_point last_report_ ABSL_GUARDED_BY(mu_);

  uint64_t connects_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t disconnects_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t decisions_received_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t refused_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t duplicates_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t ebusy_answers_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t snapshots_sent_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t snapshot_requests_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t deltas_sent_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t heartbeats_sent_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t region_updates_sent_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t messages_sent_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t messages_received_ ABSL_GUARDED_BY(mu_) = 0;
};

void FleetSim::Stream::OnReadDone(bool ok) { agent_->OnReadDone(this, ok); }
void FleetSim::Stream::OnWriteDone(bool ok) { agent_->OnWriteDone(ok); }
void FleetSim::Stream::OnDone(const grpc::Status&) { agent_->OnDone(); }

// --- FleetSim ---------------------------------------------------------------------------------

FleetSim::FleetSim(FleetSimOptions options) : options_(std::move(options)) {
  interval_ms_.store(options_.report_interval.count() > 0
                         ? static_cast<uint64_t>(options_.report_interval.count())
                         : 1000);
  // With TLS every agent has its own certificate, hence its own channel.
  const bool tls = options_.credentials_for != nullptr;
  const int channels = tls ? std::max(1, options_.agents) : std::max(1, options_.channels);
  for (int i = 0; i < channels; ++i) {
    grpc::ChannelArguments args;
    // Each channel its own subchannel, hence its own TCP connection.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("dmapin.fleetsim.channel", i);
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    channels_.push_back(grpc::CreateCustomChannel(
        options_.server_address,
        tls ? options_.credentials_for(NodeName(i)) : grpc::InsecureChannelCredentials(), args));
    stubs_.push_back(v1::Control::NewStub(channels_.back()));
  }
  for (int i = 0; i < options_.agents; ++i) {
    agents_.push_back(
        std::make_unique<Agent>(this, i, stubs_[static_cast<size_t>(i) % stubs_.size()].get()));
  }
}

FleetSim::~FleetSim() { Stop(); }

std::string FleetSim::NodeName(int index) const {
  return absl::StrFormat("%s%05d", options_.name_prefix, index);
}

void FleetSim::Start() {
  {
    MutexLock lock(&mu_);
    if (started_) return;
    started_ = true;
  }
  maps_per_second_.store(options_.maps_per_second);
  for (auto& agent : agents_) agent->Connect();
  driver_ = std::thread([this] { DriverLoop(); });
}

void FleetSim::Stop() {
  {
    MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    cv_.notify_all();
  }
  if (driver_.joinable()) driver_.join();
  flood_.store(false);
  for (auto& agent : agents_) agent->Disconnect(/*wait=*/false);
  for (auto& agent : agents_) agent->WaitDone();
}

void FleetSim::ScheduleReconnect(int index) {
  MutexLock lock(&mu_);
  if (stopping_) return;
  std::uniform_real_distribution<double> jitter(0.5, 1.5);
  const auto delay = std::chrono::duration_cast<Clock::duration>(options_.reconnect_delay *
                                                                 jitter(reconnect_rng_));
  reconnects_.emplace_back(Clock::now() + delay, index);
}

void FleetSim::DriverLoop() {
  constexpr auto kTick = std::chrono::milliseconds(10);
  const size_t n = agents_.size();
  size_t cursor = 0;
  double position = 0;
  Clock::time_point last = Clock::now();
  for (;;) {
    std::vector<int> due;
    {
      MutexLock lock(&mu_);
      cv_.wait_for(mu_, kTick);
      if (stopping_) return;
      const Clock::time_point now = Clock::now();
      for (auto it = reconnects_.begin(); it != reconnects_.end();) {
        if (it->first <= now) {
          due.push_back(it->second);
          it = reconnects_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (int index : due) {
      if (agents_[static_cast<size_t>(index)]->reconnect_pending()) {
        agents_[static_cast<size_t>(index)]->Connect();
      }
    }
    const Clock::time_point now = Clock::now();
    const double interval_s =
        static_cast<double>(std::max<uint64_t>(1, interval_ms_.load(std::memory_order_relaxed))) /
        1000.0;
    position +=
        static_cast<double>(n) * std::chrono::duration<double>(now - last).count() / interval_s;
    last = now;
    size_t visits = static_cast<size_t>(position);
    position -= static_cast<double>(visits);
    visits = std::min(visits, n);
    const double rate = maps_per_second_.load(std::memory_order_relaxed);
    for (size_t i = 0; i < visits; ++i) {
      agents_[cursor]->Tick(now, rate);
      cursor = (cursor + 1) % n;
    }
  }
}

bool FleetSim::AwaitWelcomed(uint64_t n, absl::Duration timeout) const {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    uint64_t welcomed = 0;
    for (const auto& agent : agents_) welcomed += agent->welcomed() ? 1 : 0;
    if (welcomed >= n) return true;
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

bool FleetSim::AwaitFlushed(absl::Duration timeout) const {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    bool flushed = true;
    for (const auto& agent : agents_) {
      if (!agent->Flushed()) {
        flushed = false;
        break;
      }
    }
    if (flushed) return true;
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
}

void FleetSim::Disconnect(int first, int count) {
  const int end = std::min(first + count, size());
  for (int i = first; i < end; ++i) agents_[static_cast<size_t>(i)]->Disconnect(false);
  for (int i = first; i < end; ++i) agents_[static_cast<size_t>(i)]->WaitDone();
}

void FleetSim::Connect(int first, int count) {
  const int end = std::min(first + count, size());
  for (int i = first; i < end; ++i) agents_[static_cast<size_t>(i)]->Connect();
}

void FleetSim::SetMapsPerSecond(double rate) { maps_per_second_.store(rate); }

void FleetSim::ReportNow() {
  for (auto& agent : agents_) agent->ReportNow();
}

void FleetSim::StartFlood(int regions_per_delta) {
  flood_regions_.store(regions_per_delta);
  flood_.store(true);
  for (auto& agent : agents_) agent->StartFlood();
}

void FleetSim::StopFlood() { flood_.store(false); }

FleetSimStats FleetSim::Stats() const {
  FleetSimStats stats;
  for (const auto& agent : agents_) agent->Stats(&stats);
  return stats;
}

FleetSimStats FleetSim::AgentStats(int index) const {
  FleetSimStats stats;
  agents_[static_cast<size_t>(index)]->Stats(&stats);
  return stats;
}

std::map<std::string, int> FleetSim::DecisionApplications() const {
  std::map<std::string, int> out;
  for (const auto& agent : agents_) agent->Applications(&out);
  return out;
}

bool FleetSim::Applied(int index, const std::string& id, int* errno_value) const {
  return agents_[static_cast<size_t>(index)]->Applied(id, errno_value);
}

}  // namespace fleetsim
}  // namespace dmapin
