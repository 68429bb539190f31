// The region registry's counters, listed once (an X-macro, like Envoy's stats_macros.h). The list
// generates RegistryStats' fields (agent/registry), their sums over the registry's atomics, the
// agent's dmapin_agent_* series (agent/service), the copy into v1::RegistryCounters, and the
// server's dmapin_fleet_node_* series of what agents report (server/metrics).
//
// DMAPIN_REGISTRY_COUNTERS(REPORTED, LOCAL) expands to one of these per counter, in this order:
//   REPORTED(field, metric, agent_help, fleet_help)  a counter agents report to clients and the
//                                                    central service: `field` is also the name
//                                                    of its dmapin.v1.RegistryCounters field
//   LOCAL(field, metric, agent_help)                 a counter of the agent's metrics only
// `metric` is the series name after the dmapin_agent_ (agent) or dmapin_fleet_node_ (server)
// prefix; `agent_help` and `fleet_help` are the HELP texts of those series. A new reported
// counter needs its field in RegistryCounters (api/dmapin/v1/agent.proto), by the same name.
#ifndef DMAPIN_COMMON_REGISTRY_COUNTERS_H_
#define DMAPIN_COMMON_REGISTRY_COUNTERS_H_

// clang-format off
#define DMAPIN_REGISTRY_COUNTERS(REPORTED, LOCAL)                                                 \
  REPORTED(registers_ok, "registers_total", "Successful region registrations.",                  \
           "Successful region registrations on the node.")                                       \
  REPORTED(registers_failed, "register_failures_total", "Failed region registrations.",          \
           "Failed region registrations on the node.")                                           \
  REPORTED(unregisters_ok, "unregisters_total", "Successful region unregistrations.",            \
           "Successful region unregistrations on the node.")                                     \
  REPORTED(unregisters_failed, "unregister_failures_total",                                      \
           "Failed region unregistrations (EBUSY included).",                                    \
           "Failed region unregistrations on the node (EBUSY included).")                        \
  REPORTED(unregister_ebusy, "unregister_ebusy_total",                                           \
           "Unregistrations refused with EBUSY because DMA mappings remained.",                  \
           "Unregistrations on the node refused with EBUSY.")                                    \
  REPORTED(pin_failures, "pin_failures_total", "Registrations whose pages could not be pinned.", \
           "Registrations on the node whose pages could not be pinned.")                         \
  /* Registrations refused by RegistryLimits. */                                                 \
  LOCAL(registers_over_limit, "register_limit_refusals_total",                                   \
        "Registrations refused with ENOMEM by --max_region_bytes or --max_pinned_bytes.")        \
  /* Registrations whose bookkeeping could not be allocated. */                                  \
  LOCAL(allocation_failures, "allocation_failures_total",                                        \
        "Registrations refused with ENOMEM because their bookkeeping could not be allocated.")   \
  REPORTED(maps_ok, "maps_total", "Successful DMA map calls.",                                   \
           "Successful DMA map calls on the node.")                                              \
  REPORTED(maps_failed, "map_failures_total", "Failed DMA map calls.",                           \
           "Failed DMA map calls on the node.")                                                  \
  REPORTED(map_rollbacks, "map_rollbacks_total",                                                 \
           "Failed DMA map calls that cleared entries they had installed.",                      \
           "Failed DMA map calls on the node that cleared entries they installed.")              \
  REPORTED(unmaps, "unmaps_total", "Successful DMA unmap calls.",                                \
           "Successful DMA unmap calls on the node.")                                            \
  REPORTED(pending_releases_started, "pending_releases_started_total",                           \
           "Regions that became pending release (unheld, still mapped).",                        \
           "Regions on the node that became pending release.")                                   \
  REPORTED(pending_releases_completed, "pending_releases_completed_total",                       \
           "Pending-release regions released after their last unmap.",                          \
           "Pending-release regions on the node released after their last unmap.")              \
  LOCAL(grace_periods, "grace_periods_total",                                                    \
        "Epoch grace periods the registry's writers waited for.")
// clang-format on

// For a list that takes no LOCAL counters: DMAPIN_REGISTRY_COUNTERS(X, DMAPIN_COUNTER_IGNORE).
#define DMAPIN_COUNTER_IGNORE(...)

#endif  // DMAPIN_COMMON_REGISTRY_COUNTERS_H_
