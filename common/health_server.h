// A plaintext gRPC server that serves only grpc.health.v1.Health, for probes that cannot speak
// TLS (Kubernetes' gRPC probes): with mutual TLS on the main port, --health_address opens this
// one. Nothing else is registered on it (no reflection, no dmapin service), so it tells no more
// than whether the process is serving.
#ifndef DMAPIN_COMMON_HEALTH_SERVER_H_
#define DMAPIN_COMMON_HEALTH_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/grpcpp.h"

namespace dmapin {

class HealthOnlyServer {
 public:
  // Listens on "host:port" (port 0 picks one), without any server builder plugin (reflection
  // adds itself to every server otherwise). Calls grpc::EnableDefaultHealthCheckService(true).
  static absl::StatusOr<std::unique_ptr<HealthOnlyServer>> Start(const std::string& address);
  ~HealthOnlyServer();

  int port() const { return port_; }
  void SetServing(bool serving);

 private:
  HealthOnlyServer(std::unique_ptr<grpc::CallbackGenericService> unimplemented,
                   std::unique_ptr<grpc::Server> server, int port)
      : unimplemented_(std::move(unimplemented)), server_(std::move(server)), port_(port) {}

  // Answers every other method UNIMPLEMENTED (gRPC builds no server without any service).
  // Declared first: it outlives the server.
  std::unique_ptr<grpc::CallbackGenericService> unimplemented_;
  std::unique_ptr<grpc::Server> server_;
  const int port_;
};

// A binary's --health_address: nullptr when `address` is empty, else the started server, its
// address logged as `binary`'s; a failure names the flag.
absl::StatusOr<std::unique_ptr<HealthOnlyServer>> StartHealthOnlyServer(absl::string_view binary,
                                                                        const std::string& address);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_HEALTH_SERVER_H_
