// ControlClient: the node agent's one long-lived control stream to the central service
// (dmapin.v1.Control/Connect, see api/dmapin/v1/control.proto).
//
// On every (re)connect it sends Hello and a full Snapshot; then, every report interval, a Delta
// with what changed since the last state it sent (or a Heartbeat when nothing did). Decisions
// from the server are applied in arrival order through NodeAgent::ApplyDecision (at most once:
// a repeated id is answered from the agent's durable record) and answered with a DecisionResult,
// followed promptly by a Delta showing their effect. A broken stream or an unreachable server is
// retried forever with exponential backoff and jitter; the agent keeps serving meanwhile.
//
// Threads: one session thread (connects, sends Hello/Snapshot/Deltas/Heartbeats, backs off) and,
// while a stream is up, one reader thread (reads server messages and applies decisions). Writes
// to the stream are serialized by a per-stream mutex.
#ifndef DMAPIN_AGENT_CONTROL_CONTROL_CLIENT_H_
#define DMAPIN_AGENT_CONTROL_CONTROL_CLIENT_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "agent/node/node_agent.h"
#include "common/mutex.h"
#include "dmapin/v1/control.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dmapin::agent {

struct ControlClientOptions {
  // gRPC target of the central service, e.g. "dmapin-server:7443" or "unix:/run/dmapin.sock".
  std::string server_address;
  // Empty: the NodeAgent's node name.
  std::string node_name;
  std::map<std::string, std::string> labels;
  // How often to report (Delta or Heartbeat); the server's Welcome.report_interval_ms, when
  // non-zero, overrides it for the rest of the process.
  std::chrono::milliseconds report_interval{1000};
  // Reconnect backoff: initial delay, doubled per failed attempt up to max, each delay scaled by
  // a uniform factor in [1 - jitter, 1 + jitter] so a restarted server is not hit by the whole
  // fleet at once.
  std::chrono::milliseconds backoff_initial{100};
  std::chrono::milliseconds backoff_max{30000};
  double backoff_jitter = 0.2;
  // Identifies this process start to the server; empty: a random one (see incarnation()).
  std::string incarnation;
  // What the node can ever hold, sent in Hello so the server refuses intents larger than that
  // (0: no limit). The agent's --max_region_bytes and --max_pinned_bytes.
  uint64_t max_region_bytes = 0;
  uint64_t max_pinned_bytes = 0;
  // The host's physical memory; nullopt: the host's (sysconf) unless the backend is "sim", whose
  // memory is simulated (then none is sent).
  std::optional<uint64_t> physical_memory_bytes;
  // Null: insecure.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // With TLS credentials: the name the server's certificate must carry when it is not the host
  // of server_address (GRPC_SSL_TARGET_NAME_OVERRIDE_ARG); empty: that host.
  std::string tls_server_name;
  // HTTP/2 keepalive pings, to notice a server that vanished without closing the connection
  // (0: off). The server must permit pings this frequent on a stream it rarely writes to
  // (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS), or it answers with GOAWAY.
  std::chrono::milliseconds keepalive_time{0};
};

struct ControlClientStats {
  uint64_t connect_attempts = 0;
  uint64_t connects = 0;           // streams that got Hello and Snapshot through
  uint64_t disconnects = 0;        // of those, the ones that ended
  uint64_t decisions_applied = 0;  // first-time answers, refusals (errno != 0) included
  uint64_t decisions_refused = 0;  // first-time answers with errno != 0
  uint64_t duplicates = 0;         // answered from the record of an earlier application
  uint64_t messages_sent = 0;
  uint64_t messages_received = 0;
  uint64_t snapshots_sent = 0;
  uint64_t deltas_sent = 0;
  uint64_t heartbeats_sent = 0;
  uint64_t server_epoch = 0;  // from the last Welcome; 0 before any
  std::string last_error;     // how the last stream or connect attempt ended
};

class ControlClient {
 public:
  // `agent` must outlive the client.
  ControlClient(NodeAgent* agent, ControlClientOptions options);
  ~ControlClient();  // Stop()s.

  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;

  // Starts the session thread and returns at once (the first connect happens in the
  // background). INVALID_ARGUMENT without a server address; FAILED_PRECONDITION when already
  // started.
  absl::Status Start();
  // Half-closes the stream, cancels it, and joins the threads; returns promptly whether or not
  // the server is reachable. Idempotent; the client cannot be restarted.
  void Stop();

  // True while a stream is up (Hello and Snapshot sent, not broken yet).
  bool connected() const;
  ControlClientStats stats() const;
  const std::string& incarnation() const { return incarnation_; }

 private:
  struct Session;
  // How a session ended, for the backoff.
  struct SessionEnd {
    bool connected = false;  // Hello and Snapshot got through
    bool healthy = false;    // the server welcomed us, or the stream lived long: reset backoff
  };

  void Run();
  // Runs one stream until it breaks or Stop().
  SessionEnd RunSession();
  // Sends Snapshots, Deltas and Heartbeats until the stream breaks or Stop().
  void ReportLoop(Session* session);
  void ReadLoop(Session* session);
  void HandleDecision(Session* session, const v1::Decision& decision);
  // Writes one message under the stream's write lock; false once the stream is broken.
  bool Write(Session* session, const v1::AgentMessage& message);
  // Ends the stream: half-close, a short grace for the server to close its side, cancel, join
  // the reader, Finish. Returns the stream's final status.
  grpc::Status EndSession(Session* session, std::thread* reader);
  std::shared_ptr<grpc::Channel> MakeChannel() const;
  std::chrono::milliseconds NextBackoff(int failures);
  bool SendSnapshot(Session* session);

  NodeAgent* const agent_;
  const ControlClientOptions options_;
  const std::string incarnation_;

  mutable Mutex mu_;
  std::condition_variable_any cv_;  // signalled on every change of the flags below
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool run_done_ ABSL_GUARDED_BY(mu_) = false;
  bool connected_ ABSL_GUARDED_BY(mu_) = false;
  // The live session's context, so Stop() can cancel a blocked connect, read or write.
  grpc::ClientContext* context_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Per session: set by the reader thread (or a failed write), consumed by the session thread.
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool reader_done_ ABSL_GUARDED_BY(mu_) = false;
  bool welcomed_ ABSL_GUARDED_BY(mu_) = false;
  bool snapshot_requested_ ABSL_GUARDED_BY(mu_) = false;
  bool report_now_ ABSL_GUARDED_BY(mu_) = false;
  std::chrono::milliseconds report_interval_ ABSL_GUARDED_BY(mu_);
  ControlClientStats stats_ ABSL_GUARDED_BY(mu_);

  // Only the session thread touches these.
  uint64_t version_ = 0;             // of the last Snapshot/Delta sent (per incarnation)
  uint64_t heartbeat_sequence_ = 0;  // per incarnation
  std::mt19937_64 rng_;              // for the backoff jitter

  std::thread thread_;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_CONTROL_CONTROL_CLIENT_H_
