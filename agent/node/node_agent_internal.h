// Helpers shared by node_agent.cc and node_recovery.cc; not part of the node_agent library's API.
#ifndef DMAPIN_AGENT_NODE_NODE_AGENT_INTERNAL_H_
#define DMAPIN_AGENT_NODE_NODE_AGENT_INTERNAL_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "agent/node/node_agent.h"
#include "agent/registry/registry.h"

namespace dmapin::agent {
namespace node_internal {

// `status` with " (context)" added to its message, its code and payloads (the errno) kept.
absl::Status Annotate(const absl::Status& status, absl::string_view context);

ContextOptions ToOptions(const ContextSpec& spec);

}  // namespace node_internal
}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_NODE_NODE_AGENT_INTERNAL_H_
