#include "server/service/control_service.h"

#include <cerrno>
#include <deque>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/errno_status.h"
#include "common/grpc_status.h"
#include "common/mutex.h"

namespace dmapin::server {

// One agent's stream. It is also the agent's AgentSession in the core, which may hold it (and
// call Send from its own threads) after the call ended: shared ownership, with the stream's own
// reference released by OnDone, and every write checked against `finished_`.
class ControlService::Stream final
    : public grpc::ServerBidiReactor<v1::AgentMessage, v1::ServerMessage>,
      public AgentSession {
 public:
  Stream(ControlService* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context) {}

  void Start(std::shared_ptr<Stream> self) {
    self_ = std::move(self);
    StartRead(&incoming_);
  }

  bool Send(const v1::ServerMessage& message) override {
    MutexLock lock(&mu_);
    if (finished_) return false;
    if (queue_.size() >= service_->options_.max_queued_messages) {
      service_->overflows_.fetch_add(1, std::memory_order_relaxed);
      FinishLocked(ErrnoStatus(
          ENOBUFS, absl::StrCat("node ", node_, " fell ", queue_.size(),
                                " messages behind; reconnect and resynchronise from a snapshot")));
      return false;
    }
    queue_.push_back(message);
    WriteNextLocked();
    return true;
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the agent closed its side (or the stream broke)
      Close(absl::OkStatus());
      return;
    }
    if (node_.empty()) {
      if (!incoming_.has_hello() || incoming_.hello().node_name().empty()) {
        service_->streams_rejected_.fetch_add(1, std::memory_order_relaxed);
        Close(ErrnoStatus(EINVAL,
                          "the first message of Control.Connect must be a Hello with a "
                          "node_name"));
        return;
      }
      if (service_->options_.auth != nullptr) {
        absl::Status denied =
            service_->options_.auth->Control(*context_, incoming_.hello().node_name());
        if (!denied.ok()) {
          // node_ stays empty: OnDone leaves the named node's session alone.
          service_->streams_denied_.fetch_add(1, std::memory_order_relaxed);
          Close(denied);
          return;
        }
      }
      node_ = incoming_.hello().node_name();
      v1::ServerMessage welcome;
      *welcome.mutable_welcome() = service_->core_->AgentConnected(incoming_.hello(), self_);
      Send(welcome);
    } else if (incoming_.has_hello()) {
      Close(
          ErrnoStatus(EINVAL, absl::StrCat("node ", node_, " sent a second Hello on one stream")));
      return;
    } else {
      service_->core_->AgentMessage(node_, this, incoming_);
    }
    StartRead(&incoming_);
  }

  void OnWriteDone(bool ok) override {
    MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      FinishLocked(absl::UnavailableError("write to the agent failed"));
      return;
    }
    queue_.pop_front();
    WriteNextLocked();
  }

  void OnCancel() override { Close(absl::CancelledError("the agent cancelled")); }

  void OnDone() override {
    if (!node_.empty()) service_->core_->AgentDisconnected(node_, this);
    self_.reset();  // may delete this
  }

 private:
  // The front of the queue is the message being written; it stays there until OnWriteDone.
  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_ || queue_.empty()) return;
    writing_ = true;
    StartWrite(&queue_.front());
  }

  void Close(const absl::Status& status) {
    MutexLock lock(&mu_);
    FinishLocked(status);
  }

  // Every error names its errno, in the message and the trailer (README "Errors").
  void FinishLocked(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(ServerStatus(context_, status));
  }

  ControlService* const service_;
  grpc::CallbackServerContext* const context_;
  std::shared_ptr<Stream> self_;  // released by OnDone
  // Touched only by the read chain (one read at a time).
  v1::AgentMessage incoming_;
  std::string node_;

  Mutex mu_;
  std::deque<v1::ServerMessage> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

grpc::ServerBidiReactor<v1::AgentMessage, v1::ServerMessage>* ControlService::Connect(
    grpc::CallbackServerContext* context) {
  streams_opened_.fetch_add(1, std::memory_order_relaxed);
  auto stream = std::make_shared<Stream>(this, context);
  stream->Start(stream);
  return stream.get();
}

ControlServiceStats ControlService::stats() const {
  return {.streams_opened = streams_opened_.load(std::memory_order_relaxed),
          .streams_rejected = streams_rejected_.load(std::memory_order_relaxed),
          .streams_denied = streams_denied_.load(std::memory_order_relaxed),
          .overflows = overflows_.load(std::memory_order_relaxed)};
}

}  // namespace dmapin::server
