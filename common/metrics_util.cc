#include "common/metrics_util.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>

namespace dmapin {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

FamilyBuilder::FamilyBuilder(std::string name, std::string help, MetricType type) {
  family_.name = std::move(name);
  family_.help = std::move(help);
  family_.type = type;
}

FamilyBuilder& FamilyBuilder::Add(double value, std::vector<ClientMetric::Label> labels) {
  ClientMetric metric;
  metric.label = std::move(labels);
  if (family_.type == MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family_.metric.push_back(std::move(metric));
  return *this;
}

void AddScalar(std::vector<MetricFamily>& out, std::string name, std::string help, MetricType type,
               double value) {
  FamilyBuilder(std::move(name), std::move(help), type).Add(value).MoveTo(out);
}

void AddProcessMetrics(std::vector<MetricFamily>& out) {
  rusage usage = {};
  if (getrusage(RUSAGE_SELF, &usage) == 0) {
    const double cpu = static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
                       static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
    AddScalar(out, "process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
              MetricType::Counter, cpu);
  }
  if (FILE* statm = std::fopen("/proc/self/statm", "r")) {
    unsigned long size_pages = 0;      // NOLINT(runtime/int): statm's format
    unsigned long resident_pages = 0;  // NOLINT(runtime/int)
    if (std::fscanf(statm, "%lu %lu", &size_pages, &resident_pages) == 2) {
      AddScalar(out, "process_resident_memory_bytes", "Resident memory size in bytes.",
                MetricType::Gauge,
                static_cast<double>(resident_pages) * static_cast<double>(sysconf(_SC_PAGESIZE)));
    }
    std::fclose(statm);
  }
}

}  // namespace dmapin
