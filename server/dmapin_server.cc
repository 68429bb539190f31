// dmapin-server: the fleet's control plane. Serves dmapin.v1.Admin (for admins, with grpcurl
// through reflection) and dmapin.v1.Control (one stream per node agent) on one gRPC port, and the
// fleet's Prometheus metrics on /metrics. Policies and intents are durable in an embedded SQLite
// database in --state_dir before any answer.
#include <signal.h>

#include <chrono>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "common/flags.h"
#include "common/grpc_auth.h"
#include "common/health_server.h"
#include "common/logging.h"
#include "common/net.h"
#include "common/server_limits.h"
#include "common/tls_credentials.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "prometheus/exposer.h"
#include "server/core/server_core.h"
#include "server/metrics/server_metrics.h"
#include "server/service/admin_service.h"
#include "server/service/control_service.h"
#include "server/store/sqlite_server_store.h"

ABSL_FLAG(std::string, grpc_address, "0.0.0.0:7480",
          "gRPC address (host:port) for admins (dmapin.v1.Admin, reflection, health) and the node "
          "agents' control streams (dmapin.v1.Control). Port 0 picks a free port (logged).");
ABSL_FLAG(std::string, health_address, "",
          "Plaintext gRPC address (host:port) serving only grpc.health.v1.Health, for probes "
          "that do not speak TLS (Kubernetes' gRPC probes). Empty: none (health is then on "
          "--grpc_address only).");
ABSL_FLAG(std::string, metrics_address, "0.0.0.0:9480",
          "HTTP address (host:port) serving the fleet's Prometheus metrics at /metrics. Port 0 "
          "picks a free port (logged). Empty disables metrics.");
ABSL_FLAG(std::string, state_dir, "/var/lib/dmapin/server",
          "Directory of the server's durable state (server.db): policies, intents, decision "
          "records, node admin state.");
ABSL_FLAG(bool, state_sync_full, false,
          "fsync the state database at every commit (survives power loss, not only kill -9).");
ABSL_FLAG(uint32_t, report_interval_ms, 1000,
          "How often agents report counter deltas or heartbeats (sent to them in Welcome).");
ABSL_FLAG(uint32_t, reconcile_interval_ms, 20,
          "How often the reconciler compares admitted intents with what agents report, at most "
          "(changes wake it at once).");
ABSL_FLAG(uint32_t, decision_timeout_ms, 30000,
          "A decision unanswered this long is considered lost and its intent re-evaluated.");
ABSL_FLAG(uint32_t, max_lost_decision_attempts, 3,
          "An intent whose decisions end without a result this many times in a row (timed out, "
          "or the agent's session ended while applying one: an agent that crashes on it) FAILS "
          "instead of being sent again. 0: never.");
ABSL_FLAG(uint32_t, lost_decision_backoff_ms, 1000,
          "The wait before sending a decision again after one was lost; doubles per loss, up to "
          "the policy's max EBUSY backoff.");
ABSL_FLAG(uint64_t, decision_history, 100000,
          "Decision records kept for ListDecisions (the newest; those in flight are always "
          "kept); older ones are pruned every minute. 0 keeps all (the store then grows without "
          "bound).");
ABSL_FLAG(uint64_t, intent_history, 10000,
          "Finished intents (FAILED, WITHDRAWN, SUPERSEDED) kept for ListIntents, the newest; "
          "older ones are forgotten every minute, in memory and in the store. 0 keeps all (memory "
          "and the store then grow with every intent ever created).");
ABSL_FLAG(bool, per_region_metrics, false,
          "Export one series per region (bounded by --max_region_series). Off by default: at "
          "fleet scale per-region series are the cardinality that hurts Prometheus.");
ABSL_FLAG(uint32_t, max_region_series, 1000, "Cap on per-region series when they are enabled.");
ABSL_FLAG(uint32_t, max_policies, 1024,
          "Most policies at once: SetPolicy of another name beyond it answers ENOSPC.");
ABSL_FLAG(uint32_t, max_watchers, 256,
          "Most Admin.WatchEvents streams open at once; more are refused (RESOURCE_EXHAUSTED, "
          "ENOSPC).");
ABSL_FLAG(uint32_t, watch_max_lag_events, 10000,
          "A WatchEvents watcher with this many events queued (it does not read) is dropped: its "
          "stream ends with RESOURCE_EXHAUSTED \"ENOBUFS: ... fell N events behind; reconnect\".");
ABSL_FLAG(uint64_t, watch_buffer_bytes, 64ull << 20,
          "Bytes of events queued for all WatchEvents watchers together; when full, the watcher "
          "furthest behind is dropped as above.");

namespace dmapin::server {
namespace {

int Run() {
  // SIGTERM/SIGINT are taken by sigwait below; block them before any thread starts so no thread
  // takes their default action.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // Before anything opens a descriptor: connections are limited below what this allows.
  const uint64_t fd_limit = RaiseFdLimit();

  // Secure by default: mutual TLS, or plaintext only when asked for.
  absl::StatusOr<TransportSecurity> security = TransportSecurityFromFlags();
  if (!security.ok()) {
    LOG(ERROR) << "dmapin-server: " << security.status().message();
    return 2;
  }
  absl::StatusOr<std::unique_ptr<AuthGate>> auth = AuthGate::FromFlags(*security);
  if (!auth.ok()) {
    LOG(ERROR) << "dmapin-server: " << auth.status().message();
    return 2;
  }
  LogTransportSecurity(*security, "dmapin-server");

  const std::string state_dir = absl::GetFlag(FLAGS_state_dir);
  absl::StatusOr<std::unique_ptr<SqliteServerStore>> store = SqliteServerStore::Open(
      state_dir, SqliteServerStoreOptions{.sync_full = absl::GetFlag(FLAGS_state_sync_full)});
  if (!store.ok()) {
    LOG(ERROR) << absl::StrFormat("dmapin-server: state store %s: %s", state_dir.c_str(),
                                  store.status().ToString().c_str());
    return 1;
  }
  absl::StatusOr<std::unique_ptr<ServerCore>> core = ServerCore::Create(ServerCoreOptions{
      .store = store->get(),
      .reconcile_interval = absl::Milliseconds(absl::GetFlag(FLAGS_reconcile_interval_ms)),
      .decision_timeout = absl::Milliseconds(absl::GetFlag(FLAGS_decision_timeout_ms)),
      .max_lost_decision_attempts = absl::GetFlag(FLAGS_max_lost_decision_attempts),
      .lost_decision_backoff = absl::Milliseconds(absl::GetFlag(FLAGS_lost_decision_backoff_ms)),
      .report_interval_ms = absl::GetFlag(FLAGS_report_interval_ms),
      .decision_history = absl::GetFlag(FLAGS_decision_history),
      .intent_history = absl::GetFlag(FLAGS_intent_history),
      .max_watchers = absl::GetFlag(FLAGS_max_watchers),
      .max_policies = absl::GetFlag(FLAGS_max_policies),
      .watch_max_lag_events = absl::GetFlag(FLAGS_watch_max_lag_events),
      .watch_buffer_bytes = absl::GetFlag(FLAGS_watch_buffer_bytes)});
  if (!core.ok()) {
    LOG(ERROR) << absl::StrFormat("dmapin-server: loading %s failed, refusing to serve: %s",
                                  state_dir.c_str(), core.status().ToString().c_str());
    return 1;
  }

  const ServerLimits limits = ServerLimitsFromFlags();
  ConnectionListener listener(MaxConnectionsFor(limits.max_connections, fd_limit));
  const std::string address = absl::GetFlag(FLAGS_grpc_address);
  // Plaintext: `listener` accepts the connections and hands them to gRPC (connection limits).
  // TLS: gRPC 1.51 takes only plaintext connections from a descriptor, so gRPC listens itself
  // and --max_connections does not apply to that port (README "Security").
  absl::StatusOr<int> port = 0;
  if (security->insecure) {
    port = listener.Listen(address);
    if (!port.ok()) {
      LOG(ERROR) << absl::StrFormat("dmapin-server: could not listen on %s: %s", address.c_str(),
                                    port.status().ToString().c_str());
      return 1;
    }
  }

  // The exposer holds collectables weakly: this one lives as long as Run.
  const std::shared_ptr<prometheus::Collectable> auth_metrics =
      (*auth)->Collectable("dmapin_server");
  const std::string metrics_address = absl::GetFlag(FLAGS_metrics_address);
  std::unique_ptr<ServerMetrics> metrics;
  std::unique_ptr<prometheus::Exposer> exposer;
  int metrics_port = 0;
  if (!metrics_address.empty()) {
    metrics = std::make_unique<ServerMetrics>(
        core->get(),
        ServerMetricsOptions{.per_region_series = absl::GetFlag(FLAGS_per_region_metrics),
                             .max_region_series = absl::GetFlag(FLAGS_max_region_series),
                             .listener = &listener});
    try {
      exposer = std::make_unique<prometheus::Exposer>(metrics_address, /*num_threads=*/1);
    } catch (const std::exception& e) {
      LOG(ERROR) << absl::StrFormat("dmapin-server: --metrics_address=%s: %s",
                                    metrics_address.c_str(), e.what());
      return 1;
    }
    exposer->RegisterCollectable(metrics->collectable());
    exposer->RegisterCollectable(auth_metrics);
    const std::vector<int> ports = exposer->GetListeningPorts();
    if (!ports.empty()) metrics_port = ports.front();
  }

  AdminService admin(core->get(), auth->get());
  ControlService control(core->get(), ControlServiceOptions{.auth = auth->get()});
  // Plaintext, health only (HealthOnlyServer drops the reflection plugin).
  absl::StatusOr<std::unique_ptr<HealthOnlyServer>> health_started =
      StartHealthOnlyServer("dmapin-server", absl::GetFlag(FLAGS_health_address));
  if (!health_started.ok()) {
    LOG(ERROR) << "dmapin-server: " << health_started.status().message();
    return 1;
  }
  std::unique_ptr<HealthOnlyServer> health_only = *std::move(health_started);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!security->insecure) {
    builder.AddListeningPort(address, ServerCredentialsFor(*security), &*port);
  }
  // Plaintext: no listening port; `listener` accepts the connections and hands them over.
  ApplyServerLimits(limits, builder);
  builder.RegisterService(&admin);
  builder.RegisterService(&control);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || (!security->insecure && *port == 0)) {
    LOG(ERROR) << absl::StrFormat("dmapin-server: could not start the gRPC server on %s",
                                  address.c_str());
    return 1;
  }
  listener.Start(server.get());
  server->GetHealthCheckService()->SetServingStatus(true);
  if (health_only != nullptr) health_only->SetServing(true);
  if (exposer != nullptr) {
    LOG(INFO) << absl::StrFormat("dmapin-server: metrics on http://%s/metrics (metrics port %d)",
                                 WithPort(metrics_address, metrics_port).c_str(), metrics_port);
  }
  LOG(INFO) << absl::StrFormat("dmapin-server: at most %zu connections (fd limit %llu)",
                               listener.max_connections(),
                               static_cast<unsigned long long>(fd_limit));
  LOG(INFO) << absl::StrFormat("dmapin-server: epoch %llu, state %s, serving on %s (tcp port %d)",
                               static_cast<unsigned long long>((*core)->epoch()), state_dir.c_str(),
                               WithPort(address, *port).c_str(), *port);

  int signal = 0;
  sigwait(&signals, &signal);
  LOG(INFO) << absl::StrFormat("dmapin-server: signal %d, shutting down", signal);
  server->GetHealthCheckService()->SetServingStatus(false);
  if (health_only != nullptr) health_only->SetServing(false);
  listener.Stop();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  // The exposer's threads read the metrics, which read the core: stop them first.
  exposer.reset();
  return 0;
}

}  // namespace
}  // namespace dmapin::server

int main(int argc, char** argv) {
  dmapin::InitBinary(
      argc, argv,
      "dmapin central service: fleet pinning policy, register/unregister decisions to the node "
      "agents, EBUSY retries, drains, and the fleet's counters as Prometheus metrics.\n"
      "Usage: dmapin-server [--grpc_address=HOST:PORT] [--metrics_address=HOST:PORT] "
      "[--state_dir=DIR]",
      "dmapin_server");
  return dmapin::server::Run();
}
