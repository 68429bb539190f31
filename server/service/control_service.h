// The gRPC face of the agents' control stream (dmapin.v1.Control/Connect). Each stream is a
// callback reactor (no thread per agent): the first message must be Hello; the core answers with
// Welcome and from then on sees the agent's messages and sends it decisions through the stream's
// AgentSession, whose sends queue and never block the core.
#ifndef DMAPIN_SERVER_SERVICE_CONTROL_SERVICE_H_
#define DMAPIN_SERVER_SERVICE_CONTROL_SERVICE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "common/grpc_auth.h"
#include "dmapin/v1/control.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/core/server_core.h"

namespace dmapin::server {

struct ControlServiceOptions {
  // Messages queued for one agent beyond this end its stream with RESOURCE_EXHAUSTED: the agent
  // reconnects and resynchronises from a snapshot, and the reconciler sends again what is still
  // needed (level-triggered), so nothing is lost but memory stays bounded.
  size_t max_queued_messages = 65536;
  // Checks each stream's Hello against the peer certificate (an agent speaks only for the node
  // its certificate names) before the core sees it, so a refused stream never replaces, and never
  // touches, the named node's session. nullptr checks nothing (in-process tests, fuzzers). Must
  // outlive the service.
  AuthGate* auth = nullptr;
};

struct ControlServiceStats {
  uint64_t streams_opened = 0;
  uint64_t streams_rejected = 0;  // no Hello first, or a Hello without a node name
  uint64_t streams_denied = 0;    // the peer certificate does not name the Hello's node
  uint64_t overflows = 0;         // streams ended because the agent did not keep up
};

class ControlService final : public v1::Control::CallbackService {
 public:
  // `core` must outlive the service.
  explicit ControlService(ServerCore* core, ControlServiceOptions options = {})
      : core_(core), options_(options) {}

  grpc::ServerBidiReactor<v1::AgentMessage, v1::ServerMessage>* Connect(
      grpc::CallbackServerContext* context) override;

  ControlServiceStats stats() const;

 private:
  class Stream;

  ServerCore* const core_;
  const ControlServiceOptions options_;
  std::atomic<uint64_t> streams_opened_{0};
  std::atomic<uint64_t> streams_rejected_{0};
  std::atomic<uint64_t> streams_denied_{0};
  std::atomic<uint64_t> overflows_{0};
};

}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_SERVICE_CONTROL_SERVICE_H_
