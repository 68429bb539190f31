#include "common/health_server.h"

#include <cerrno>
#include <chrono>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/errno_status.h"
#include "common/logging.h"
#include "common/net.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/impl/server_builder_plugin.h"

namespace dmapin {
namespace {

// Drops every builder plugin: the reflection plugin registers itself for every server at static
// initialization (grpc++_reflection), and this server must serve health alone.
class NoPlugins final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->clear();
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<HealthOnlyServer>> HealthOnlyServer::Start(
    const std::string& address) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.SetOption(std::make_unique<NoPlugins>());
  auto unimplemented = std::make_unique<grpc::CallbackGenericService>();
  builder.RegisterCallbackGenericService(unimplemented.get());
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return ErrnoStatus(EADDRNOTAVAIL, absl::StrCat("could not serve health checks on ", address));
  }
  server->GetHealthCheckService()->SetServingStatus(false);
  return std::unique_ptr<HealthOnlyServer>(
      new HealthOnlyServer(std::move(unimplemented), std::move(server), port));
}

HealthOnlyServer::~HealthOnlyServer() {
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

void HealthOnlyServer::SetServing(bool serving) {
  server_->GetHealthCheckService()->SetServingStatus(serving);
}

absl::StatusOr<std::unique_ptr<HealthOnlyServer>> StartHealthOnlyServer(
    absl::string_view binary, const std::string& address) {
  if (address.empty()) return std::unique_ptr<HealthOnlyServer>();
  absl::StatusOr<std::unique_ptr<HealthOnlyServer>> started = HealthOnlyServer::Start(address);
  if (!started.ok()) {
    return absl::Status(started.status().code(),
                        absl::StrCat("--health_address: ", started.status().message()));
  }
  LOG(INFO) << absl::StrFormat("%s: plaintext health checks on %s (health port %d)", binary,
                               WithPort(address, (*started)->port()), (*started)->port());
  return started;
}

}  // namespace dmapin
