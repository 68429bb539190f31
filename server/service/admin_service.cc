#include "server/service/admin_service.h"

#include <chrono>
#include <memory>
#include <optional>
#include <utility>

#include "common/grpc_status.h"
#include "common/mutex.h"
#include "grpcpp/alarm.h"

namespace dmapin::server {
namespace {

// Answers with `result`'s value (copied into `response`) or its error.
template <typename T>
grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* context, absl::StatusOr<T> result,
                                T* response) {
  if (result.ok()) *response = std::move(*result);
  return FinishUnary(context, result.status());
}

// WatchEvents: writes the subscription's events one at a time, woken by the subscription's
// listener, so an idle watcher costs no thread. Owned by shared pointers (its own until OnDone,
// and the listener's for the length of a call) because the listener runs on the core's threads
// and may race with the end of the call.
class EventWriter final : public grpc::ServerWriteReactor<v1::Event> {
 public:
  static EventWriter* Start(grpc::CallbackServerContext* context,
                            std::shared_ptr<EventSubscription> subscription) {
    auto writer = std::shared_ptr<EventWriter>(new EventWriter(context, std::move(subscription)));
    writer->self_ = writer;
    writer->subscription_->SetListener([weak = std::weak_ptr<EventWriter>(writer)] {
      if (std::shared_ptr<EventWriter> alive = weak.lock()) alive->MaybeWrite();
    });
    writer->MaybeWrite();
    return writer.get();
  }

  void OnWriteDone(bool ok) override {
    {
      MutexLock lock(&mu_);
      writing_ = false;
      current_.reset();
    }
    if (!ok) {
      Stop(absl::UnavailableError("the event stream broke"));
      return;
    }
    MaybeWrite();
  }

  void OnCancel() override { Stop(absl::CancelledError("the watcher cancelled")); }

  void OnDone() override {
    subscription_->Close();
    self_.reset();  // may delete this (the alarm's destructor cancels it)
  }

 private:
  // How long a dropped watcher has to read what is already on its way before its stream is
  // cancelled: one that reads nothing would otherwise keep its stream, and the write it blocks,
  // forever (the status goes out only after the data before it).
  static constexpr absl::Duration kDroppedGrace = absl::Seconds(2);

  EventWriter(grpc::CallbackServerContext* context, std::shared_ptr<EventSubscription> subscription)
      : context_(context), subscription_(std::move(subscription)) {}

  void MaybeWrite() {
    MutexLock lock(&mu_);
    if (finished_) return;
    if (subscription_->closed()) {
      // Dropped by the server: ends at once, even behind a write the client never takes.
      const absl::Status why = subscription_->end_status();
      if (!why.ok()) {
        FinishLocked(why);
        return;
      }
    }
    if (writing_) return;
    current_ = subscription_->TryNext();
    if (current_ == nullptr) {
      if (subscription_->closed()) FinishLocked(subscription_->end_status());
      return;
    }
    writing_ = true;
    StartWrite(current_.get());
  }

  void Stop(const absl::Status& status) {
    // Clears the listener first: after Close it is never called again.
    subscription_->Close();
    MutexLock lock(&mu_);
    FinishLocked(status);
  }

  void FinishLocked(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(ServerStatus(context_, status));
    if (writing_) {
      cancel_alarm_.Set(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(kDroppedGrace),
                        [context = context_](bool fired) {
                          if (fired) context->TryCancel();
                        });
    }
  }

  grpc::CallbackServerContext* const context_;
  const std::shared_ptr<EventSubscription> subscription_;
  std::shared_ptr<EventWriter> self_;  // released by OnDone
  Mutex mu_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  EventSubscription::EventPtr current_ ABSL_GUARDED_BY(mu_);
  grpc::Alarm cancel_alarm_ ABSL_GUARDED_BY(mu_);
};

// A WatchEvents call refused before it started (too many watchers).
class RefusedWatch final : public grpc::ServerWriteReactor<v1::Event> {
 public:
  RefusedWatch(grpc::CallbackServerContext* context, const absl::Status& status) {
    Finish(ServerStatus(context, status));
  }
  void OnDone() override { delete this; }
};

}  // namespace

absl::Status AdminService::Authorize(grpc::CallbackServerContext* context, AdminAccess access,
                                     absl::string_view method) const {
  if (auth_ == nullptr) return absl::OkStatus();
  return auth_->Admin(*context, access, method);
}

grpc::ServerUnaryReactor* AdminService::SetPolicy(grpc::CallbackServerContext* context,
                                                  const v1::SetPolicyRequest* request,
                                                  v1::Policy* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kWrite, "Admin.SetPolicy");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->SetPolicy(request->policy()), response);
}

grpc::ServerUnaryReactor* AdminService::GetPolicy(grpc::CallbackServerContext* context,
                                                  const v1::GetPolicyRequest* request,
                                                  v1::Policy* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.GetPolicy");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->GetPolicy(request->name()), response);
}

grpc::ServerUnaryReactor* AdminService::ListPolicies(grpc::CallbackServerContext* context,
                                                     const v1::ListPoliciesRequest*,
                                                     v1::ListPoliciesResponse* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.ListPolicies");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  for (v1::Policy& policy : core_->ListPolicies()) *response->add_policies() = std::move(policy);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* AdminService::DeletePolicy(grpc::CallbackServerContext* context,
                                                     const v1::DeletePolicyRequest* request,
                                                     v1::DeletePolicyResponse*) {
  if (absl::Status denied = Authorize(context, AdminAccess::kWrite, "Admin.DeletePolicy");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return FinishUnary(context, core_->DeletePolicy(request->name()));
}

grpc::ServerUnaryReactor* AdminService::CreateIntent(grpc::CallbackServerContext* context,
                                                     const v1::CreateIntentRequest* request,
                                                     v1::CreateIntentResponse* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kWrite, "Admin.CreateIntent");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->CreateIntent(*request), response);
}

grpc::ServerUnaryReactor* AdminService::GetIntent(grpc::CallbackServerContext* context,
                                                  const v1::GetIntentRequest* request,
                                                  v1::Intent* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.GetIntent");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->GetIntent(request->id()), response);
}

grpc::ServerUnaryReactor* AdminService::ListIntents(grpc::CallbackServerContext* context,
                                                    const v1::ListIntentsRequest* request,
                                                    v1::ListIntentsResponse* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.ListIntents");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->ListIntents(*request), response);
}

grpc::ServerUnaryReactor* AdminService::WithdrawIntent(grpc::CallbackServerContext* context,
                                                       const v1::WithdrawIntentRequest* request,
                                                       v1::Intent* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kWrite, "Admin.WithdrawIntent");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->WithdrawIntent(request->id()), response);
}

grpc::ServerUnaryReactor* AdminService::ListNodes(grpc::CallbackServerContext* context,
                                                  const v1::ListNodesRequest*,
                                                  v1::ListNodesResponse* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.ListNodes");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  for (v1::Node& node : core_->ListNodes()) *response->add_nodes() = std::move(node);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* AdminService::GetNode(grpc::CallbackServerContext* context,
                                                const v1::GetNodeRequest* request,
                                                v1::Node* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.GetNode"); !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->GetNode(request->name()), response);
}

grpc::ServerUnaryReactor* AdminService::CordonNode(grpc::CallbackServerContext* context,
                                                   const v1::CordonNodeRequest* request,
                                                   v1::Node* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kWrite, "Admin.CordonNode");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->SetCordon(request->name(), true), response);
}

grpc::ServerUnaryReactor* AdminService::UncordonNode(grpc::CallbackServerContext* context,
                                                     const v1::UncordonNodeRequest* request,
                                                     v1::Node* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kWrite, "Admin.UncordonNode");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->SetCordon(request->name(), false), response);
}

grpc::ServerUnaryReactor* AdminService::DrainNode(grpc::CallbackServerContext* context,
                                                  const v1::DrainNodeRequest* request,
                                                  v1::Node* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kWrite, "Admin.DrainNode");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->DrainNode(request->name()), response);
}

grpc::ServerUnaryReactor* AdminService::ListRegions(grpc::CallbackServerContext* context,
                                                    const v1::ListRegionsFleetRequest* request,
                                                    v1::ListRegionsFleetResponse* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.ListRegions");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->ListRegions(*request), response);
}

grpc::ServerUnaryReactor* AdminService::GetRegion(grpc::CallbackServerContext* context,
                                                  const v1::GetRegionFleetRequest* request,
                                                  v1::FleetRegion* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.GetRegion");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->GetRegion(*request), response);
}

grpc::ServerUnaryReactor* AdminService::ListDecisions(grpc::CallbackServerContext* context,
                                                      const v1::ListDecisionsRequest* request,
                                                      v1::ListDecisionsResponse* response) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.ListDecisions");
      !denied.ok()) {
    return FinishUnary(context, denied);
  }
  return Reply(context, core_->ListDecisions(*request), response);
}

grpc::ServerWriteReactor<v1::Event>* AdminService::WatchEvents(
    grpc::CallbackServerContext* context, const v1::WatchEventsRequest* request) {
  if (absl::Status denied = Authorize(context, AdminAccess::kRead, "Admin.WatchEvents");
      !denied.ok()) {
    return new RefusedWatch(context, denied);
  }
  absl::StatusOr<std::shared_ptr<EventSubscription>> subscription =
      core_->Subscribe(request->node());
  if (!subscription.ok()) return new RefusedWatch(context, subscription.status());
  return EventWriter::Start(context, *std::move(subscription));
}

}  // namespace dmapin::server
