// Helpers for the Prometheus collectors that build their families at scrape time (the agent's
// and the server's state series).
#ifndef DMAPIN_COMMON_METRICS_UTIL_H_
#define DMAPIN_COMMON_METRICS_UTIL_H_

#include <string>
#include <utility>
#include <vector>

#include "prometheus/client_metric.h"
#include "prometheus/metric_family.h"
#include "prometheus/metric_type.h"

namespace dmapin {

// Builds one family sample by sample. Labels are given sorted by name.
class FamilyBuilder {
 public:
  FamilyBuilder(std::string name, std::string help, prometheus::MetricType type);

  FamilyBuilder& Add(double value, std::vector<prometheus::ClientMetric::Label> labels = {});

  // Appends the family to `out` (even without samples: the HELP/TYPE lines document it).
  void MoveTo(std::vector<prometheus::MetricFamily>& out) { out.push_back(std::move(family_)); }

 private:
  prometheus::MetricFamily family_;
};

// One family with one unlabelled sample.
void AddScalar(std::vector<prometheus::MetricFamily>& out, std::string name, std::string help,
               prometheus::MetricType type, double value);

// CPU seconds and resident bytes of this process, as the standard process_* series.
void AddProcessMetrics(std::vector<prometheus::MetricFamily>& out);

}  // namespace dmapin

#endif  // DMAPIN_COMMON_METRICS_UTIL_H_
