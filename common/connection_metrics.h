// The Prometheus series of a ConnectionListener, for the agent's and the server's metrics.
#ifndef DMAPIN_COMMON_CONNECTION_METRICS_H_
#define DMAPIN_COMMON_CONNECTION_METRICS_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "common/server_limits.h"
#include "prometheus/metric_family.h"

namespace dmapin {

// <prefix>grpc_connections (gauge, open), <prefix>grpc_connections_limit (gauge,
// --max_connections in force), <prefix>grpc_connections_accepted_total and
// <prefix>grpc_connections_refused_total{reason}: "limit" (max_connections open) or "fds" (no
// descriptor left), both always present. `prefix` is e.g. "dmapin_server_".
void AddConnectionMetrics(std::vector<prometheus::MetricFamily>& out, absl::string_view prefix,
                          const ConnectionListener& listener);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_CONNECTION_METRICS_H_
