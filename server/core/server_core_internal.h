// Small helpers of ServerCore's translation units (server_core.cc, server_core_reconcile.cc): how
// intents, regions and times are named and judged. Not part of ServerCore's interface.
#ifndef DMAPIN_SERVER_CORE_SERVER_CORE_INTERNAL_H_
#define DMAPIN_SERVER_CORE_SERVER_CORE_INTERNAL_H_

#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "dmapin/v1/admin.pb.h"
#include "dmapin/v1/control.pb.h"
#include "server/fleet/fleet_state.h"

namespace dmapin::server {
namespace server_core_internal {

inline constexpr char kDrainLabel[] = "dmapin.dev/drain";

inline std::string Rfc3339(absl::Time time) {
  if (time == absl::InfinitePast() || time == absl::Time()) return "";
  return absl::FormatTime(absl::RFC3339_full, time, absl::UTCTimeZone());
}

inline std::string KindName(v1::IntentKind kind) {
  switch (kind) {
    case v1::INTENT_KIND_REGISTER:
      return "register";
    case v1::INTENT_KIND_UNREGISTER:
      return "unregister";
    case v1::INTENT_KIND_RELEASE_CONTAINER:
      return "release_container";
    case v1::INTENT_KIND_TEARDOWN_CONTEXT:
      return "teardown_context";
    default:
      return "unspecified";
  }
}

inline v1::DecisionKind DecisionKindOf(v1::IntentKind kind) {
  switch (kind) {
    case v1::INTENT_KIND_REGISTER:
      return v1::DECISION_KIND_REGISTER;
    case v1::INTENT_KIND_UNREGISTER:
      return v1::DECISION_KIND_UNREGISTER;
    case v1::INTENT_KIND_RELEASE_CONTAINER:
      return v1::DECISION_KIND_RELEASE_CONTAINER;
    case v1::INTENT_KIND_TEARDOWN_CONTEXT:
      return v1::DECISION_KIND_TEARDOWN_CONTEXT;
    default:
      return v1::DECISION_KIND_UNSPECIFIED;
  }
}

inline bool Pursued(const v1::Intent& intent) {
  switch (intent.state()) {
    case v1::INTENT_STATE_PENDING:
    case v1::INTENT_STATE_APPLYING:
    case v1::INTENT_STATE_RETRYING:
      return true;
    case v1::INTENT_STATE_SATISFIED:
      // A registration is desired state: it is kept, and restored if it goes away.
      return intent.kind() == v1::INTENT_KIND_REGISTER;
    default:
      return false;
  }
}

inline bool Live(const v1::Intent& intent) {
  return Pursued(intent) || intent.state() == v1::INTENT_STATE_SATISFIED;
}

inline RegionKey KeyOfIntent(const v1::Intent& intent) {
  return RegionKey{intent.context(), intent.ua(), intent.size()};
}

inline RegionKey KeyOfRequest(const v1::CreateIntentRequest& request) {
  return RegionKey{request.context(), request.ua(), request.size()};
}

// Page tokens of the admin lists: the last key of the previous page, base-10 fields joined by '|'.
inline std::string RegionToken(const std::string& node, const RegionKey& key) {
  return absl::StrCat(node, "|", key.context, "|", key.ua, "|", key.size);
}

// Orders intent ids by their number ("i-12" before "i-100").
inline uint64_t IntentNumber(const std::string& id) {
  uint64_t number = 0;
  (void)absl::SimpleAtoi(absl::StripPrefix(id, "i-"), &number);
  return number;
}

}  // namespace server_core_internal
}  // namespace dmapin::server

#endif  // DMAPIN_SERVER_CORE_SERVER_CORE_INTERNAL_H_
