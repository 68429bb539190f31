#include "agent/control/control_client.h"

#include <unistd.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "agent/service/proto_convert.h"
#include "agent/service/version.h"
#include "common/errno_status.h"
#include "common/logging.h"
#include "common/region_key.h"
#include "google/protobuf/util/message_differencer.h"

namespace dmapin::agent {
namespace {

using Clock = std::chrono::steady_clock;

// How long an ending stream waits for the server to close its side after our half-close before
// cancelling, and how long Stop() waits for the session thread before cancelling whatever blocks
// it (a connect, or a write stalled by flow control).
constexpr std::chrono::milliseconds kStopGrace{200};

// The host's physical memory (0 when unknown).
uint64_t HostMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size);
}

// The node's state as reported to the server, keyed as the server keys it (FleetState).
struct ReportedState {
  std::map<std::string, v1::Context> contexts;
  std::map<std::string, v1::Container> containers;
  std::map<RegionKey, v1::Region> regions;
  v1::RegistryCounters counters;
  // Contexts torn down lately because their owner exited (not diffed: read when one goes).
  std::map<std::string, OwnerExit> owner_exits;
};

// Reads the agent's current state. The lists are read one after the other, not atomically: a
// report may mix two moments, which the next report corrects (the server is level-triggered).
absl::StatusOr<ReportedState> ReadState(const NodeAgent& agent) {
  ReportedState state;
  for (const ContextView& view : agent.ListContexts()) Fill(view, &state.contexts[view.name]);
  for (const ContainerView& view : agent.ListContainers()) {
    Fill(view, &state.containers[view.name]);
  }
  absl::StatusOr<std::vector<RegionView>> regions = agent.ListRegions("", /*with_hpas=*/false);
  if (!regions.ok()) return regions.status();
  const uint64_t page_size = agent.page_size();
  for (const RegionView& view : *regions) {
    Fill(view, page_size, &state.regions[RegionKey{view.context, view.info.ua, view.info.size}]);
  }
  Fill(agent.Status(), &state.counters);
  for (OwnerExit& exit : agent.RecentOwnerExits()) {
    const std::string name = exit.context;
    state.owner_exits[name] = std::move(exit);
  }
  return state;
}

bool Same(const google::protobuf::Message& a, const google::protobuf::Message& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

// Upserts what is new or changed in `to`, removes what `to` lacks.
template <typename Key, typename Message, typename Upsert, typename Remove>
void DiffMaps(const std::map<Key, Message>& from, const std::map<Key, Message>& to, Upsert upsert,
              Remove remove) {
  for (const auto& [key, message] : to) {
    auto it = from.find(key);
    if (it == from.end() || !Same(it->second, message)) upsert(message);
  }
  for (const auto& [key, message] : from) {
    if (to.find(key) == to.end()) remove(key);
  }
}

// The delta from `from` to `to` (without a version); false when nothing changed.
bool Diff(const ReportedState& from, const ReportedState& to, v1::Delta* delta) {
  DiffMaps(
      from.contexts, to.contexts,
      [&](const v1::Context& context) { *delta->add_upserted_contexts() = context; },
      [&](const std::string& name) {
        delta->add_removed_contexts(name);
        if (auto exit = to.owner_exits.find(name); exit != to.owner_exits.end()) {
          v1::EndedContext* ended = delta->add_ended_contexts();
          ended->set_context(name);
          ended->set_owner_pid(exit->second.pid);
          ended->set_unpinned_bytes(exit->second.unpinned_bytes);
        }
      });
  DiffMaps(
      from.containers, to.containers,
      [&](const v1::Container& container) { *delta->add_upserted_containers() = container; },
      [&](const std::string& name) { delta->add_removed_containers(name); });
  DiffMaps(
      from.regions, to.regions,
      [&](const v1::Region& region) { *delta->add_upserted_regions() = region; },
      [&](const RegionKey& key) {
        v1::RegionKey* removed = delta->add_removed_regions();
        removed->set_context(key.context);
        removed->set_ua(key.ua);
        removed->set_size(key.size);
      });
  if (!Same(from.counters, to.counters)) *delta->mutable_counters() = to.counters;
  return delta->upserted_contexts_size() > 0 || delta->removed_contexts_size() > 0 ||
         delta->upserted_containers_size() > 0 || delta->removed_containers_size() > 0 ||
         delta->upserted_regions_size() > 0 || delta->removed_regions_size() > 0 ||
         delta->has_counters();
}

void ToSnapshot(const ReportedState& state, uint64_t version, v1::Snapshot* out) {
  for (const auto& [name, context] : state.contexts) *out->add_contexts() = context;
  for (const auto& [name, container] : state.containers) *out->add_containers() = container;
  for (const auto& [key, region] : state.regions) *out->add_regions() = region;
  *out->mutable_counters() = state.counters;
  out->set_version(version);
}

std::string RandomIncarnation() {
  std::random_device device;
  std::string out;
  for (int i = 0; i < 4; ++i) absl::StrAppendFormat(&out, "%08x", device());
  return out;
}

DecisionKind KindOf(v1::DecisionKind kind) {
  switch (kind) {
    case v1::DECISION_KIND_REGISTER:
      return DecisionKind::kRegister;
    case v1::DECISION_KIND_UNREGISTER:
      return DecisionKind::kUnregister;
    case v1::DECISION_KIND_RELEASE_CONTAINER:
      return DecisionKind::kReleaseContainer;
    case v1::DECISION_KIND_TEARDOWN_CONTEXT:
      return DecisionKind::kTeardownContext;
    default:
      // ApplyDecision refuses (and records) unknown kinds with EINVAL.
      return static_cast<DecisionKind>(kind);
  }
}

}  // namespace

// One stream. The session thread owns it; the reader thread borrows it while the stream is up.
struct ControlClient::Session {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AgentMessage, v1::ServerMessage>> stream;
  // Sync streams allow one writer at a time: reports (session thread) and decision results
  // (reader thread) take turns.
  Mutex write_mu;
  bool closed ABSL_GUARDED_BY(write_mu) = false;  // a write failed, or WritesDone was sent
  // What this stream last told the server (session thread only): the base of the next Delta.
  ReportedState reported;
};

ControlClient::ControlClient(NodeAgent* agent, ControlClientOptions options)
    : agent_(agent),
      options_(std::move(options)),
      incarnation_(options_.incarnation.empty() ? RandomIncarnation() : options_.incarnation),
      report_interval_(options_.report_interval),
      rng_(std::random_device()()) {}

ControlClient::~ControlClient() { Stop(); }

absl::Status ControlClient::Start() {
  if (options_.server_address.empty()) {
    return absl::InvalidArgumentError("control client: no server address");
  }
  MutexLock lock(&mu_);
  if (started_) return absl::FailedPreconditionError("control client: already started");
  started_ = true;
  thread_ = std::thread([this] { Run(); });
  return absl::OkStatus();
}

void ControlClient::Stop() {
  {
    MutexLock lock(&mu_);
    if (!started_ || stopping_) {
      stopping_ = true;
    } else {
      stopping_ = true;
      cv_.notify_all();
      // The session thread ends the stream cleanly if it can; if a connect or a write blocks it,
      // cancel the stream under it.
      const Clock::time_point deadline = Clock::now() + 2 * kStopGrace;
      while (!run_done_ && Clock::now() < deadline) cv_.wait_until(mu_, deadline);
      if (!run_done_ && context_ != nullptr) context_->TryCancel();
    }
  }
  if (thread_.joinable()) thread_.join();
}

bool ControlClient::connected() const {
  MutexLock lock(&mu_);
  return connected_;
}

ControlClientStats ControlClient::stats() const {
  MutexLock lock(&mu_);
  return stats_;
}

std::shared_ptr<grpc::Channel> ControlClient::MakeChannel() const {
  grpc::ChannelArguments args;
  // A fresh channel per attempt, with its own subchannels: our backoff alone decides when to
  // retry (a shared subchannel would carry gRPC's own reconnect backoff from the last attempt).
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              static_cast<int>(options_.backoff_initial.count()));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, static_cast<int>(options_.backoff_max.count()));
  if (options_.keepalive_time.count() > 0) {
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options_.keepalive_time.count()));
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  if (options_.credentials != nullptr && !options_.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(options_.tls_server_name);
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      options_.credentials != nullptr ? options_.credentials : grpc::InsecureChannelCredentials();
  return grpc::CreateCustomChannel(options_.server_address, credentials, args);
}

std::chrono::milliseconds ControlClient::NextBackoff(int failures) {
  double delay = static_cast<double>(options_.backoff_initial.count());
  const double max = static_cast<double>(options_.backoff_max.count());
  for (int i = 1; i < failures && delay < max; ++i) delay *= 2;
  delay = std::min(delay, max);
  const double jitter = std::clamp(options_.backoff_jitter, 0.0, 1.0);
  std::uniform_real_distribution<double> factor(1.0 - jitter, 1.0 + jitter);
  return std::chrono::milliseconds(static_cast<int64_t>(delay * factor(rng_)));
}

void ControlClient::Run() {
  int failures = 0;
  for (;;) {
    const SessionEnd end = RunSession();
    failures = end.healthy ? 1 : failures + 1;
    MutexLock lock(&mu_);
    if (stopping_) break;
    const std::chrono::milliseconds delay = NextBackoff(failures);
    // Say so on the first failure and then at every doubling, not on every attempt.
    if (end.connected || (failures & (failures - 1)) == 0) {
      LOG(WARNING) << absl::StrFormat("dmapin-agent: control stream to %s: %s; retrying in %lld ms",
                                      options_.server_address.c_str(), stats_.last_error.c_str(),
                                      static_cast<long long>(delay.count()));
    }
    const Clock::time_point deadline = Clock::now() + delay;
    while (!stopping_ && Clock::now() < deadline) cv_.wait_until(mu_, deadline);
    if (stopping_) break;
  }
  MutexLock lock(&mu_);
  run_done_ = true;
  cv_.notify_all();
}

ControlClient::SessionEnd ControlClient::RunSession() {
  SessionEnd end;
  Session session;
  {
    MutexLock lock(&mu_);
    if (stopping_) return end;
    context_ = &session.context;
    broken_ = false;
    reader_done_ = false;
    welcomed_ = false;
    snapshot_requested_ = false;
    report_now_ = false;
    ++stats_.connect_attempts;
  }
  std::unique_ptr<v1::Control::Stub> stub = v1::Control::NewStub(MakeChannel());
  // Blocks until the call is started or failed; Stop() cancels it if it takes too long.
  session.stream = stub->Connect(&session.context);
  const Clock::time_point started = Clock::now();

  v1::AgentMessage hello_message;
  v1::Hello* hello = hello_message.mutable_hello();
  const NodeStatusView status = agent_->Status();
  hello->set_node_name(options_.node_name.empty() ? status.node_name : options_.node_name);
  for (const auto& [key, value] : options_.labels) (*hello->mutable_labels())[key] = value;
  hello->set_page_size(status.page_size);
  hello->set_backend(status.backend);
  for (const std::string& backend : status.available_backends) {
    hello->add_available_backends(backend);
  }
  hello->set_agent_version(kAgentVersion);
  hello->set_incarnation(incarnation_);
  hello->set_max_region_bytes(options_.max_region_bytes);
  hello->set_max_pinned_bytes(options_.max_pinned_bytes);
  if (options_.physical_memory_bytes.has_value()) {
    hello->set_physical_memory_bytes(*options_.physical_memory_bytes);
  } else if (status.backend != "sim") {
    hello->set_physical_memory_bytes(HostMemoryBytes());
  }

  std::thread reader;
  if (Write(&session, hello_message) && SendSnapshot(&session)) {
    end.connected = true;
    {
      MutexLock lock(&mu_);
      connected_ = true;
      ++stats_.connects;
    }
    LOG(INFO) << absl::StrFormat("dmapin-agent: control stream to %s up (incarnation %s)",
                                 options_.server_address.c_str(), incarnation_.c_str());
    // Started only now, so decision results always follow our Snapshot on the stream.
    reader = std::thread([this, &session] { ReadLoop(&session); });
    ReportLoop(&session);
  }

  const grpc::Status final_status = EndSession(&session, &reader);
  MutexLock lock(&mu_);
  context_ = nullptr;
  if (connected_) {
    connected_ = false;
    ++stats_.disconnects;
  }
  end.healthy = end.connected && (welcomed_ || Clock::now() - started >= options_.backoff_max);
  stats_.last_error = stopping_ ? "stopped"
                                : absl::StrFormat("%s (code %d)", final_status.error_message(),
                                                  static_cast<int>(final_status.error_code()));
  return end;
}

grpc::Status ControlClient::EndSession(Session* session, std::thread* reader) {
  {
    MutexLock lock(&session->write_mu);
    if (!session->closed) {
      session->closed = true;
      session->stream->WritesDone();
    }
  }
  if (reader->joinable()) {
    // A server that saw our half-close ends the call; give it a moment to, then cancel.
    MutexLock lock(&mu_);
    const Clock::time_point deadline = Clock::now() + kStopGrace;
    while (!reader_done_ && Clock::now() < deadline) cv_.wait_until(mu_, deadline);
  }
  session->context.TryCancel();
  if (reader->joinable()) {
    reader->join();
  } else {
    // Finish wants every incoming message read first.
    v1::ServerMessage ignored;
    while (session->stream->Read(&ignored)) {
    }
  }
  return session->stream->Finish();
}

bool ControlClient::Write(Session* session, const v1::AgentMessage& message) {
  bool ok = false;
  {
    MutexLock lock(&session->write_mu);
    if (!session->closed) {
      ok = session->stream->Write(message);
      if (!ok) session->closed = true;
    }
  }
  MutexLock lock(&mu_);
  if (!ok) {
    broken_ = true;
    cv_.notify_all();
    return false;
  }
  ++stats_.messages_sent;
  switch (message.body_case()) {
    case v1::AgentMessage::kSnapshot:
      ++stats_.snapshots_sent;
      break;
    case v1::AgentMessage::kDelta:
      ++stats_.deltas_sent;
      break;
    case v1::AgentMessage::kHeartbeat:
      ++stats_.heartbeats_sent;
      break;
    default:
      break;
  }
  return true;
}

bool ControlClient::SendSnapshot(Session* session) {
  absl::StatusOr<ReportedState> state = ReadState(*agent_);
  if (!state.ok()) {
    LOG(ERROR) << absl::StrFormat("dmapin-agent: control: cannot read the agent's state: %s",
                                  state.status().ToString().c_str());
    return false;
  }
  v1::AgentMessage message;
  ToSnapshot(*state, ++version_, message.mutable_snapshot());
  if (!Write(session, message)) return false;
  session->reported = std::move(*state);
  return true;
}

void ControlClient::ReportLoop(Session* session) {
  Clock::time_point last_report = Clock::now();
  for (;;) {
    bool snapshot = false;
    bool forced = false;
    {
      MutexLock lock(&mu_);
      for (;;) {
        if (stopping_ || broken_) return;
        if (snapshot_requested_ || report_now_) break;
        const Clock::time_point due = last_report + report_interval_;
        if (Clock::now() >= due) break;
        cv_.wait_until(mu_, due);
      }
      snapshot = snapshot_requested_;
      forced = report_now_;
      snapshot_requested_ = false;
      report_now_ = false;
    }
    last_report = Clock::now();
    if (snapshot) {
      if (!SendSnapshot(session)) return;
      continue;
    }
    v1::AgentMessage message;
    absl::StatusOr<ReportedState> state = ReadState(*agent_);
    if (state.ok() && Diff(session->reported, *state, message.mutable_delta())) {
      message.mutable_delta()->set_version(++version_);
    } else if (state.ok() && forced) {
      // After a decision, report even when nothing changed (a duplicate, a refusal): the server
      // waits for a report newer than the result before it trusts its view again.
      message.mutable_delta()->set_version(version_);
    } else {
      if (!state.ok()) {
        LOG(ERROR) << absl::StrFormat("dmapin-agent: control: cannot read the agent's state: %s",
                                      state.status().ToString().c_str());
      }
      message.mutable_heartbeat()->set_sequence(++heartbeat_sequence_);
    }
    if (!Write(session, message)) return;
    if (message.has_delta()) session->reported = std::move(*state);
  }
}

void ControlClient::ReadLoop(Session* session) {
  v1::ServerMessage message;
  while (session->stream->Read(&message)) {
    {
      MutexLock lock(&mu_);
      ++stats_.messages_received;
    }
    switch (message.body_case()) {
      case v1::ServerMessage::kWelcome: {
        MutexLock lock(&mu_);
        // A new epoch within one stream should not happen (it is one server process); if it
        // does, the server lost what we told it: start over with a snapshot.
        if (welcomed_ && message.welcome().server_epoch() != stats_.server_epoch) {
          snapshot_requested_ = true;
        }
        welcomed_ = true;
        stats_.server_epoch = message.welcome().server_epoch();
        if (message.welcome().report_interval_ms() > 0) {
          report_interval_ = std::chrono::milliseconds(message.welcome().report_interval_ms());
        }
        cv_.notify_all();
        break;
      }
      case v1::ServerMessage::kSnapshotRequest: {
        MutexLock lock(&mu_);
        snapshot_requested_ = true;
        cv_.notify_all();
        break;
      }
      case v1::ServerMessage::kDecision:
        // Applied here, on the reader thread, so decisions take effect in arrival order.
        HandleDecision(session, message.decision());
        break;
      default:
        break;  // from a newer server: nothing we know to do
    }
  }
  MutexLock lock(&mu_);
  reader_done_ = true;
  broken_ = true;
  cv_.notify_all();
}

void ControlClient::HandleDecision(Session* session, const v1::Decision& decision) {
  const DecisionSpec spec{.tag = {.id = decision.id(), .epoch = decision.epoch()},
                          .kind = KindOf(decision.kind()),
                          .context = decision.context(),
                          .container = decision.container(),
                          .ua = decision.ua(),
                          .size = decision.size()};
  const DecisionOutcome outcome = agent_->ApplyDecision(spec);
  const int err = ErrnoOf(outcome.status);

  v1::AgentMessage message;
  v1::DecisionResult* result = message.mutable_result();
  result->set_decision_id(decision.id());
  result->set_epoch(decision.epoch());
  result->set_errno_value(err);
  result->set_errno_name(err == 0 ? "OK" : ErrnoName(err));
  result->set_message(std::string(outcome.status.message()));
  result->set_duplicate(outcome.duplicate);
  {
    MutexLock lock(&mu_);
    if (outcome.duplicate) {
      ++stats_.duplicates;
    } else {
      ++stats_.decisions_applied;
      if (err != 0) ++stats_.decisions_refused;
    }
  }
  if (!Write(session, message)) return;
  // Show the effect now rather than at the next interval; after the result, so the server
  // sees a report newer than it.
  MutexLock lock(&mu_);
  report_now_ = true;
  cv_.notify_all();
}

}  // namespace dmapin::agent
