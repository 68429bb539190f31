#include "common/connection_metrics.h"

#include "absl/strings/str_cat.h"
#include "common/metrics_util.h"

namespace dmapin {

void AddConnectionMetrics(std::vector<prometheus::MetricFamily>& out, absl::string_view prefix,
                          const ConnectionListener& listener) {
  using prometheus::MetricType;
  const ListenerStats stats = listener.stats();
  AddScalar(out, absl::StrCat(prefix, "grpc_connections"), "gRPC connections open.",
            MetricType::Gauge, static_cast<double>(stats.open));
  AddScalar(out, absl::StrCat(prefix, "grpc_connections_limit"),
            "Most gRPC connections open at once (--max_connections in force).", MetricType::Gauge,
            static_cast<double>(listener.max_connections()));
  AddScalar(out, absl::StrCat(prefix, "grpc_connections_accepted_total"),
            "gRPC connections accepted and served.", MetricType::Counter,
            static_cast<double>(stats.accepted));
  FamilyBuilder(absl::StrCat(prefix, "grpc_connections_refused_total"),
                "gRPC connections closed as soon as accepted: limit (--max_connections were "
                "open) or fds (no file descriptor left).",
                MetricType::Counter)
      .Add(static_cast<double>(stats.fd_exhausted), {{"reason", "fds"}})
      .Add(static_cast<double>(stats.refused), {{"reason", "limit"}})
      .MoveTo(out);
}

}  // namespace dmapin
