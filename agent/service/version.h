// The agent's version string, defined once: GetNodeStatus, the control stream's Hello and the
// version label of dmapin_agent_info all report it.
#ifndef DMAPIN_AGENT_SERVICE_VERSION_H_
#define DMAPIN_AGENT_SERVICE_VERSION_H_

namespace dmapin::agent {

inline constexpr char kAgentVersion[] = "dmapin-agent 0.1";

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_SERVICE_VERSION_H_
