#include "common/health_server.h"

#include <cerrno>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/errno_status.h"
#include "grpcpp/health_check_service_interface.h"

namespace dmapin {

absl::StatusOr<std::unique_ptr<HealthOnlyServer>> HealthOnlyServer::Start(
    const std::string& address) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return ErrnoStatus(EADDRNOTAVAIL, absl::StrCat("could not serve health checks on ", address));
  }
  server->GetHealthCheckService()->SetServingStatus(false);
  return std::unique_ptr<HealthOnlyServer>(new HealthOnlyServer(std::move(server), port));
}

HealthOnlyServer::~HealthOnlyServer() {
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

void HealthOnlyServer::SetServing(bool serving) {
  server_->GetHealthCheckService()->SetServingStatus(serving);
}

}  // namespace dmapin
