// Translation of the node agent's core views (agent/node) to their dmapin.v1 messages, shared by
// the NodeAgent gRPC service and the control-stream client (agent/control).
#ifndef DMAPIN_AGENT_SERVICE_PROTO_CONVERT_H_
#define DMAPIN_AGENT_SERVICE_PROTO_CONVERT_H_

#include <cstdint>

#include "agent/node/context_memory.h"
#include "agent/node/node_agent.h"
#include "dmapin/v1/agent.pb.h"

namespace dmapin::agent {

// The agent's MemoryBacking and the proto's have the same values: a wire value neither names
// passes through unchanged (CreateContext refuses it with EINVAL).
MemoryBacking FromProto(v1::MemoryBacking backing);
v1::MemoryBacking ToProto(MemoryBacking backing);

void Fill(const ContextView& view, v1::Context* out);
void Fill(const ContainerView& view, v1::Container* out);
// `page_size` is the node's page size (regions do not carry it in the core).
void Fill(const RegionView& view, uint64_t page_size, v1::Region* out);
// The registry counters of a node status, with the agent's own store-commit failures.
void Fill(const NodeStatusView& status, v1::RegistryCounters* out);

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_SERVICE_PROTO_CONVERT_H_
