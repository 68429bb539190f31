#!/usr/bin/env node
// Generates the Grafana dashboards in this directory (dashboards/*.json) from one description, so
// that every panel follows the same conventions: a `datasource` variable (every query uses
// ${datasource}), no node names in queries (the `node` variable, from label_values), units on every
// panel (bytes, seconds, ops/s, percent). Edit this file, then run
//
//   node dashboards/generate_dashboards.js           # rewrites dashboards/*.json
//   node dashboards/generate_dashboards.js --check   # exits 1 if a JSON file is out of date
//
// The JSON files are what Grafana loads (dashboards/provisioning/, and the ConfigMaps of
// deploy/kubernetes). tests/deploy checks that they are up to date and evaluates every query
// against a live Prometheus scraping a local fleet.
//
// Label conventions the queries rely on (see deploy/prometheus/prometheus.yml and the
// PodMonitor/ServiceMonitor in deploy/kubernetes/base):
//   - agent series carry the scrape target label `node` (the agent's node name);
//   - job="dmapin-agent" for agents and job="dmapin-server" for the central service;
//   - server series dmapin_fleet_node_* etc. carry `node` themselves.
'use strict';

const fs = require('fs');
const path = require('path');

const DS = { type: 'prometheus', uid: '${datasource}' };
const N = 'node=~"$node"';
const RI = '$__rate_interval';

function datasourceVar() {
  return {
    name: 'datasource', label: 'Data source', type: 'datasource', query: 'prometheus',
    current: {}, hide: 0, refresh: 1, regex: '', options: [], includeAll: false, multi: false,
  };
}

function queryVar(name, label, query, { multi = true, includeAll = true } = {}) {
  return {
    name, label, type: 'query', datasource: DS,
    definition: query,
    query: { qryType: 1, query, refId: 'PrometheusVariableQueryEditor-VariableQuery' },
    refresh: 2, sort: 1, regex: '', hide: 0, multi, includeAll,
    allValue: includeAll ? '.*' : undefined, current: {}, options: [],
  };
}

let nextId = 1;

function target(expr, legendFormat, refId) {
  return { datasource: DS, expr, legendFormat: legendFormat || '__auto', range: true, refId };
}

function targets(list) {
  return list.map(([expr, legend], i) => target(expr, legend, String.fromCharCode(65 + i)));
}

function thresholds(steps) {
  return {
    mode: 'absolute',
    steps: [{ color: 'green', value: null }].concat(
      (steps || []).map(([value, color]) => ({ color, value }))),
  };
}

function panel(type, title, description, gridPos, list, unit, extra = {}) {
  const p = {
    id: nextId++, type, title, description, datasource: DS, gridPos,
    targets: targets(list),
    fieldConfig: {
      defaults: {
        unit, min: extra.min, max: extra.max,
        thresholds: thresholds(extra.thresholds),
        mappings: extra.mappings || [],
        color: { mode: extra.thresholds ? 'thresholds' : 'palette-classic' },
      },
      overrides: [],
    },
    options: {},
  };
  if (type === 'timeseries') {
    p.fieldConfig.defaults.custom = {
      drawStyle: 'line', lineWidth: 1, fillOpacity: extra.stack ? 30 : 10, showPoints: 'never',
      spanNulls: false, stacking: { mode: extra.stack ? 'normal' : 'none', group: 'A' },
    };
    p.options = {
      legend: { displayMode: 'table', placement: 'bottom', showLegend: true, calcs: ['lastNotNull', 'max'] },
      tooltip: { mode: 'multi', sort: 'desc' },
    };
  } else if (type === 'stat') {
    p.options = {
      reduceOptions: { calcs: ['lastNotNull'], fields: '', values: false },
      colorMode: 'value', graphMode: 'area', justifyMode: 'auto', textMode: 'auto', orientation: 'auto',
    };
  } else if (type === 'bargauge') {
    p.options = {
      reduceOptions: { calcs: ['lastNotNull'], fields: '', values: false },
      displayMode: 'gradient', orientation: 'horizontal', showUnfilled: true,
    };
  }
  // Drop undefined values so the JSON stays tidy.
  return JSON.parse(JSON.stringify(p));
}

function row(title, y) {
  return { id: nextId++, type: 'row', title, collapsed: false, gridPos: { h: 1, w: 24, x: 0, y }, panels: [] };
}

function dashboard(uid, title, description, tags, vars, panels) {
  return {
    uid, title, description, tags: ['dmapin'].concat(tags),
    editable: true, graphTooltip: 1, schemaVersion: 39, version: 1, refresh: '30s',
    time: { from: 'now-1h', to: 'now' }, timepicker: {}, timezone: 'browser', fiscalYearStartMonth: 0,
    liveNow: false, weekStart: '',
    annotations: {
      list: [{
        builtIn: 1, datasource: { type: 'grafana', uid: '-- Grafana --' }, enable: true, hide: true,
        iconColor: 'rgba(0, 211, 255, 1)', name: 'Annotations & Alerts', type: 'dashboard',
      }],
    },
    links: [{
      asDropdown: false, icon: 'external link', includeVars: false, keepTime: true, tags: ['dmapin'],
      targetBlank: false, title: 'dmapin', type: 'dashboards',
    }],
    templating: { list: vars },
    panels,
  };
}

// --- Fleet overview ----------------------------------------------------------------------------

function fleetOverview() {
  nextId = 1;
  const panels = [
    row('Fleet', 0),
    panel('stat', 'Agents connected', 'Agents with an open control stream to the central service.',
      { h: 4, w: 4, x: 0, y: 1 }, [['dmapin_server_agents_connected', 'connected']], 'none'),
    panel('stat', 'Nodes known', 'Nodes the central service knows, connected or not.',
      { h: 4, w: 4, x: 4, y: 1 }, [['dmapin_fleet_nodes', 'nodes']], 'none'),
    panel('stat', 'Pinned (fleet)', 'Sum of the sizes of all registered regions, fleet-wide.',
      { h: 4, w: 4, x: 8, y: 1 }, [['dmapin_fleet_pinned_bytes', 'pinned']], 'bytes'),
    panel('stat', 'Regions', 'Pre-registered regions, fleet-wide.',
      { h: 4, w: 4, x: 12, y: 1 }, [['dmapin_fleet_regions', 'regions']], 'none'),
    panel('stat', 'Installed IOMMU mappings', 'IOMMU entries installed, fleet-wide (sum of mapped - 1).',
      { h: 4, w: 4, x: 16, y: 1 }, [['dmapin_fleet_installed_mappings', 'mappings']], 'none'),
    panel('stat', 'Intents retrying (EBUSY)', 'Intents the central service is retrying through EBUSY.',
      { h: 4, w: 4, x: 20, y: 1 }, [['dmapin_server_intents{state="retrying"}', 'retrying']], 'none',
      { thresholds: [[1, 'orange']] }),
    row('Pinned memory and budgets', 5),
    panel('timeseries', 'Pinned bytes vs pool budget',
      'Per node: bytes pinned on the node, the budget of the tightest policy pool that selects it, and that whole pool\'s use (the pool\'s, not the node\'s). Nodes without a budgeting policy have no budget series.',
      { h: 9, w: 12, x: 0, y: 6 }, [
        [`dmapin_fleet_node_pinned_bytes{${N}}`, '{{node}} pinned'],
        [`dmapin_fleet_node_budget_bytes{${N}}`, '{{node}} pool budget'],
        [`dmapin_fleet_node_budget_used_bytes{${N}}`, '{{node}} pool used'],
      ], 'bytes', { min: 0 }),
    panel('bargauge', 'Pool budget used', 'Pool use / pool budget, per node (80 % orange, 90 % red; the alert DmapinPinnedBudgetNearlyUsed fires at 90 %).',
      { h: 9, w: 6, x: 12, y: 6 }, [
        [`dmapin_fleet_node_budget_used_bytes{${N}} / dmapin_fleet_node_budget_bytes{${N}}`, '{{node}}'],
      ], 'percentunit', { min: 0, max: 1, thresholds: [[0.8, 'orange'], [0.9, 'red']] }),
    panel('bargauge', 'Locked vs memlock limit', 'Per node: bytes locked by memlock-limited contexts / the sum of their limits (contexts without a limit are left out).',
      { h: 9, w: 6, x: 18, y: 6 }, [
        [`dmapin_fleet_node_locked_bytes{${N}} / dmapin_fleet_node_memlock_limit_bytes{${N}}`, '{{node}}'],
      ], 'percentunit', { min: 0, max: 1, thresholds: [[0.8, 'orange'], [0.9, 'red']] }),
    panel('timeseries', 'Regions per node', 'Pre-registered regions per node.',
      { h: 8, w: 8, x: 0, y: 15 }, [[`dmapin_fleet_node_regions{${N}}`, '{{node}}']], 'none', { min: 0 }),
    panel('timeseries', 'Installed IOMMU mappings per node', 'IOMMU entries installed per node.',
      { h: 8, w: 8, x: 8, y: 15 }, [[`dmapin_fleet_node_installed_mappings{${N}}`, '{{node}}']], 'none', { min: 0 }),
    panel('timeseries', 'Contexts and containers', 'Memory contexts (VMs) and VFIO containers per node.',
      { h: 8, w: 8, x: 16, y: 15 }, [
        [`dmapin_fleet_node_contexts{${N}}`, '{{node}} contexts'],
        [`dmapin_fleet_node_containers{${N}}`, '{{node}} containers'],
      ], 'none', { min: 0 }),
    row('Decisions and errors', 23),
    panel('timeseries', 'Decisions sent', 'Decisions the central service sent to agents, by kind.',
      { h: 8, w: 8, x: 0, y: 24 }, [
        [`sum by (kind) (rate(dmapin_server_decisions_sent_total[${RI}]))`, '{{kind}}'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'Decision results', 'Results the agents answered, by kind and result (OK or the errno name).',
      { h: 8, w: 8, x: 8, y: 24 }, [
        [`sum by (kind, result) (rate(dmapin_server_decision_results_total[${RI}]))`, '{{kind}} {{result}}'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'Registry failures per node', 'Failed registers, pins and DMA maps, and EBUSY answers to unregister, as the agents report them to the central service.',
      { h: 8, w: 8, x: 16, y: 24 }, [
        [`sum by (node) (rate(dmapin_fleet_node_register_failures_total{${N}}[${RI}]))`, '{{node}} register'],
        [`sum by (node) (rate(dmapin_fleet_node_pin_failures_total{${N}}[${RI}]))`, '{{node}} pin'],
        [`sum by (node) (rate(dmapin_fleet_node_map_failures_total{${N}}[${RI}]))`, '{{node}} map'],
        [`sum by (node) (rate(dmapin_fleet_node_unregister_ebusy_total{${N}}[${RI}]))`, '{{node}} unregister EBUSY'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'Agent RPC errors', 'Failed agent RPCs (VMMs and admins), by method and errno.',
      { h: 8, w: 12, x: 0, y: 32 }, [
        [`sum by (method, errno) (rate(dmapin_agent_rpc_errors_total{job="dmapin-agent", ${N}}[${RI}]))`, '{{method}} {{errno}}'],
      ], 'ops', { min: 0 }),
    panel('stat', 'Node connection', 'Control stream of each node: 1 connected, 0 disconnected (a disconnected node keeps its last reported state until the server forgets it).',
      { h: 8, w: 12, x: 12, y: 32 }, [[`dmapin_fleet_node_connected{${N}}`, '{{node}}']], 'none', {
        thresholds: [],
        mappings: [{ type: 'value', options: { 0: { text: 'disconnected', color: 'red', index: 0 }, 1: { text: 'connected', color: 'green', index: 1 } } }],
      }),
  ];
  return dashboard('dmapin-fleet-overview', 'dmapin / Fleet overview',
    'Pinned memory against pool budgets, regions and IOMMU mappings, decisions and errors, across the fleet (from dmapin-server, plus agent RPC errors).',
    ['fleet'], [datasourceVar(), queryVar('node', 'Node', 'label_values(dmapin_fleet_node_connected, node)')], panels);
}

// --- Node detail -------------------------------------------------------------------------------

function nodeDetail() {
  nextId = 1;
  const NC = `${N}, context=~"$context"`;
  const panels = [
    row('Node', 0),
    panel('stat', 'Locked', 'Bytes pinned on the node (all contexts).',
      { h: 4, w: 4, x: 0, y: 1 }, [[`sum(dmapin_agent_locked_bytes{${N}})`, 'locked']], 'bytes'),
    panel('stat', 'Regions', 'Pre-registered regions on the node.',
      { h: 4, w: 4, x: 4, y: 1 }, [[`sum(dmapin_agent_regions{${N}})`, 'regions']], 'none'),
    panel('stat', 'Installed IOMMU mappings', 'IOMMU entries installed in all containers.',
      { h: 4, w: 4, x: 8, y: 1 }, [[`sum(dmapin_agent_installed_mappings{${N}})`, 'mappings']], 'none'),
    panel('stat', 'Contexts without memlock limit', 'Contexts whose memlock limit is unlimited (no headroom to watch).',
      { h: 4, w: 4, x: 12, y: 1 }, [[`sum(dmapin_agent_context_memlock_unlimited{${N}})`, 'unlimited']], 'none'),
    panel('stat', 'State store failed', '1: a state-store commit failed; the refused change was undone and the agent refuses changes until restarted.',
      { h: 4, w: 4, x: 16, y: 1 }, [[`max(dmapin_agent_store_failed{${N}})`, 'failed']], 'none', {
        thresholds: [[1, 'red']],
        mappings: [{ type: 'value', options: { 0: { text: 'ok', index: 0 }, 1: { text: 'FAILED', index: 1 } } }],
      }),
    panel('stat', 'Agent up', 'Prometheus scrape of the agent (1 up).',
      { h: 4, w: 4, x: 20, y: 1 }, [[`min(up{job="dmapin-agent", ${N}})`, 'up']], 'none', {
        thresholds: [],
        mappings: [{ type: 'value', options: { 0: { text: 'DOWN', color: 'red', index: 0 }, 1: { text: 'up', color: 'green', index: 1 } } }],
      }),
    row('Contexts and memlock', 5),
    panel('timeseries', 'Locked bytes per context', 'Bytes each memory context (VM) has pinned.',
      { h: 8, w: 8, x: 0, y: 6 }, [[`dmapin_agent_context_locked_bytes{${NC}}`, '{{node}} {{context}}']], 'bytes', { min: 0, stack: true }),
    panel('timeseries', 'Memlock headroom per context', 'Memlock limit minus locked bytes, per memlock-limited context (unlimited contexts have no series).',
      { h: 8, w: 8, x: 8, y: 6 }, [
        [`dmapin_agent_context_memlock_limit_bytes{${NC}} - dmapin_agent_context_locked_bytes{${NC}}`, '{{node}} {{context}}'],
      ], 'bytes', { min: 0 }),
    panel('bargauge', 'Memlock used per context', 'Locked bytes / memlock limit, per limited context (the alert DmapinMemlockLimitNearlyReached fires at 90 %).',
      { h: 8, w: 8, x: 16, y: 6 }, [
        [`dmapin_agent_context_locked_bytes{${NC}} / dmapin_agent_context_memlock_limit_bytes{${NC}}`, '{{node}} {{context}}'],
      ], 'percentunit', { min: 0, max: 1, thresholds: [[0.8, 'orange'], [0.9, 'red']] }),
    row('Containers', 14),
    panel('timeseries', 'Pinned bytes per container', 'Size of the regions each VFIO container holds.',
      { h: 8, w: 8, x: 0, y: 15 }, [[`dmapin_agent_container_pinned_bytes{${NC}}`, '{{node}} {{container}}']], 'bytes', { min: 0 }),
    panel('timeseries', 'Regions per container', 'Regions each container holds.',
      { h: 8, w: 8, x: 8, y: 15 }, [[`dmapin_agent_container_regions{${NC}}`, '{{node}} {{container}}']], 'none', { min: 0 }),
    panel('timeseries', 'IOMMU mappings per container', 'IOMMU entries installed in each container.',
      { h: 8, w: 8, x: 16, y: 15 }, [[`dmapin_agent_container_installed_mappings{${NC}}`, '{{node}} {{container}}']], 'none', { min: 0 }),
    row('Registry operations', 23),
    panel('timeseries', 'Registry operations', 'Registers, unregisters, DMA maps and unmaps per second.',
      { h: 8, w: 8, x: 0, y: 24 }, [
        [`sum by (node) (rate(dmapin_agent_registers_total{${N}}[${RI}]))`, '{{node}} register'],
        [`sum by (node) (rate(dmapin_agent_unregisters_total{${N}}[${RI}]))`, '{{node}} unregister'],
        [`sum by (node) (rate(dmapin_agent_maps_total{${N}}[${RI}]))`, '{{node}} map'],
        [`sum by (node) (rate(dmapin_agent_unmaps_total{${N}}[${RI}]))`, '{{node}} unmap'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'EBUSY retries', 'Unregisters answered EBUSY (the region is still mapped): at the agent, and the central service\'s retries fleet-wide.',
      { h: 8, w: 8, x: 8, y: 24 }, [
        [`sum by (node) (rate(dmapin_agent_unregister_ebusy_total{${N}}[${RI}]))`, '{{node}} EBUSY answers'],
        [`rate(dmapin_server_ebusy_retries_total[${RI}])`, 'server retries (fleet)'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'Registry failures', 'Failed registers, pins, maps (and their rollbacks), and pending releases started/completed.',
      { h: 8, w: 8, x: 16, y: 24 }, [
        [`sum by (node) (rate(dmapin_agent_register_failures_total{${N}}[${RI}]))`, '{{node}} register'],
        [`sum by (node) (rate(dmapin_agent_pin_failures_total{${N}}[${RI}]))`, '{{node}} pin'],
        [`sum by (node) (rate(dmapin_agent_map_failures_total{${N}}[${RI}]))`, '{{node}} map'],
        [`sum by (node) (rate(dmapin_agent_map_rollbacks_total{${N}}[${RI}]))`, '{{node}} map rollback'],
        [`sum by (node) (rate(dmapin_agent_pending_releases_started_total{${N}}[${RI}]))`, '{{node}} pending release started'],
      ], 'ops', { min: 0 }),
    row('RPCs and state store', 32),
    panel('timeseries', 'RPC latency p99', 'Time in the agent\'s handlers (agent work and durable commit, without transport), 99th percentile by method.',
      { h: 8, w: 8, x: 0, y: 33 }, [
        [`histogram_quantile(0.99, sum by (le, method) (rate(dmapin_agent_rpc_duration_seconds_bucket{${N}}[${RI}])))`, '{{method}}'],
      ], 's', { min: 0 }),
    panel('timeseries', 'RPC rate and errors', 'Agent RPCs per second by method, and failed ones by method and errno.',
      { h: 8, w: 8, x: 8, y: 33 }, [
        [`sum by (method) (rate(dmapin_agent_rpc_duration_seconds_count{${N}}[${RI}]))`, '{{method}}'],
        [`sum by (method, errno) (rate(dmapin_agent_rpc_errors_total{${N}}[${RI}]))`, '{{method}} {{errno}}'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'State store', 'Durable state commits, transactions (group commit) and rows written per second; failed commits.',
      { h: 8, w: 8, x: 16, y: 33 }, [
        [`sum by (node) (rate(dmapin_agent_store_commits_total{${N}}[${RI}]))`, '{{node}} commits'],
        [`sum by (node) (rate(dmapin_agent_store_transactions_total{${N}}[${RI}]))`, '{{node}} transactions'],
        [`sum by (node) (rate(dmapin_agent_store_rows_written_total{${N}}[${RI}]))`, '{{node}} rows'],
        [`sum by (node) (rate(dmapin_agent_store_failed_commits_total{${N}}[${RI}]))`, '{{node}} failed commits'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'Agent memory', 'Resident memory of the agent process.',
      { h: 8, w: 12, x: 0, y: 41 }, [[`process_resident_memory_bytes{job="dmapin-agent", ${N}}`, '{{node}}']], 'bytes', { min: 0 }),
    panel('timeseries', 'Agent CPU', 'CPU time of the agent process per second.',
      { h: 8, w: 12, x: 12, y: 41 }, [[`rate(process_cpu_seconds_total{job="dmapin-agent", ${N}}[${RI}])`, '{{node}}']], 's', { min: 0 }),
  ];
  return dashboard('dmapin-node-detail', 'dmapin / Node detail',
    'One node agent: pinned memory per context and container, memlock headroom, EBUSY answers, registry operations, RPC latency and the state store (from the agent\'s own /metrics).',
    ['node'], [
      datasourceVar(),
      queryVar('node', 'Node', 'label_values(dmapin_agent_info, node)', { multi: false, includeAll: true }),
      queryVar('context', 'Context', 'label_values(dmapin_agent_context_locked_bytes{node=~"$node"}, context)'),
    ], panels);
}

// --- Control plane -----------------------------------------------------------------------------

function controlPlane() {
  nextId = 1;
  const panels = [
    row('Intents', 0),
    panel('stat', 'Agents connected', 'Agents with an open control stream.',
      { h: 4, w: 6, x: 0, y: 1 }, [['dmapin_server_agents_connected', 'connected']], 'none'),
    panel('stat', 'Intents pursued', 'Intents pending, applying or retrying.',
      { h: 4, w: 6, x: 6, y: 1 }, [['sum(dmapin_server_intents{state=~"pending|applying|retrying"})', 'pursued']], 'none'),
    panel('stat', 'Oldest pending intent', 'Age of the oldest intent still pursued (the alert DmapinPendingIntentTooOld fires past 10 min).',
      { h: 4, w: 6, x: 12, y: 1 }, [['dmapin_server_oldest_pending_intent_age_seconds', 'age']], 's', {
        thresholds: [[300, 'orange'], [600, 'red']],
      }),
    panel('stat', 'Decisions timed out', 'Decisions that got no result in time, over the dashboard\'s range.',
      { h: 4, w: 6, x: 18, y: 1 }, [['increase(dmapin_server_decisions_timed_out_total[$__range])', 'timed out']], 'none', {
        thresholds: [[1, 'orange']],
      }),
    panel('timeseries', 'Intents by state', 'Intents the server holds, by state.',
      { h: 8, w: 12, x: 0, y: 5 }, [['dmapin_server_intents', '{{state}}']], 'none', { min: 0 }),
    panel('timeseries', 'Oldest pending intent age', 'Age of the oldest intent still pursued (pending, applying or retrying); 0 when none.',
      { h: 8, w: 12, x: 12, y: 5 }, [['dmapin_server_oldest_pending_intent_age_seconds', 'oldest pending']], 's', { min: 0 }),
    row('Reconciler', 13),
    panel('timeseries', 'Reconcile latency', 'Duration of reconcile passes: 50th and 99th percentile and mean.',
      { h: 8, w: 12, x: 0, y: 14 }, [
        [`histogram_quantile(0.5, sum by (le) (rate(dmapin_server_reconcile_duration_seconds_bucket[${RI}])))`, 'p50'],
        [`histogram_quantile(0.99, sum by (le) (rate(dmapin_server_reconcile_duration_seconds_bucket[${RI}])))`, 'p99'],
        [`rate(dmapin_server_reconcile_duration_seconds_sum[${RI}]) / rate(dmapin_server_reconcile_duration_seconds_count[${RI}])`, 'mean'],
      ], 's', { min: 0 }),
    panel('timeseries', 'Reconcile passes', 'Reconcile passes per second, and passes missing from the latency histogram.',
      { h: 8, w: 12, x: 12, y: 14 }, [
        [`rate(dmapin_server_reconcile_passes_total[${RI}])`, 'passes'],
        [`rate(dmapin_server_reconcile_durations_unobserved_total[${RI}])`, 'unobserved'],
      ], 'ops', { min: 0 }),
    row('Control streams', 22),
    panel('timeseries', 'Stream traffic', 'Control-stream messages per second: agent reports received, decisions sent.',
      { h: 8, w: 8, x: 0, y: 23 }, [
        [`rate(dmapin_server_stream_messages_received_total[${RI}])`, 'received (agent -> server)'],
        [`rate(dmapin_server_stream_messages_sent_total[${RI}])`, 'sent (server -> agent)'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'Agent connects and disconnects', 'Control streams opened and closed per second.',
      { h: 8, w: 8, x: 8, y: 23 }, [
        [`rate(dmapin_server_agent_connects_total[${RI}])`, 'connects'],
        [`rate(dmapin_server_agent_disconnects_total[${RI}])`, 'disconnects'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'Nodes connected', 'Control stream per node (1 connected).',
      { h: 8, w: 8, x: 16, y: 23 }, [['dmapin_fleet_node_connected', '{{node}}']], 'none', { min: 0, max: 1 }),
    row('Retries and failures', 31),
    panel('timeseries', 'EBUSY retries', 'EBUSY answers the server scheduled for retry, per second.',
      { h: 8, w: 8, x: 0, y: 32 }, [[`rate(dmapin_server_ebusy_retries_total[${RI}])`, 'EBUSY retries']], 'ops', { min: 0 }),
    panel('timeseries', 'Timeouts and store failures', 'Decisions without a result in time, and failed commits of the server\'s store, per second.',
      { h: 8, w: 8, x: 8, y: 32 }, [
        [`rate(dmapin_server_decisions_timed_out_total[${RI}])`, 'decisions timed out'],
        [`rate(dmapin_server_store_failures_total[${RI}])`, 'store failures'],
      ], 'ops', { min: 0 }),
    panel('timeseries', 'Watch events dropped', 'Events dropped for lossy WatchEvents subscribers (open subscriptions only: a gauge).',
      { h: 8, w: 8, x: 16, y: 32 }, [['dmapin_server_watch_events_dropped', 'dropped']], 'none', { min: 0 }),
    row('Server process', 40),
    panel('timeseries', 'Server memory', 'Resident memory of dmapin-server.',
      { h: 8, w: 12, x: 0, y: 41 }, [['process_resident_memory_bytes{job="dmapin-server"}', '{{instance}}']], 'bytes', { min: 0 }),
    panel('timeseries', 'Server CPU', 'CPU time of dmapin-server per second.',
      { h: 8, w: 12, x: 12, y: 41 }, [[`rate(process_cpu_seconds_total{job="dmapin-server"}[${RI}])`, '{{instance}}']], 's', { min: 0 }),
  ];
  return dashboard('dmapin-control-plane', 'dmapin / Control plane',
    'The central service: intents, reconcile latency, control-stream traffic, EBUSY retries and failures.',
    ['control-plane'], [datasourceVar()], panels);
}

const DASHBOARDS = {
  'dmapin-fleet-overview.json': fleetOverview,
  'dmapin-node-detail.json': nodeDetail,
  'dmapin-control-plane.json': controlPlane,
};

function main() {
  const check = process.argv.includes('--check');
  const outIdx = process.argv.indexOf('--out');
  const outDir = outIdx > 0 ? process.argv[outIdx + 1] : __dirname;
  let stale = 0;
  for (const [file, make] of Object.entries(DASHBOARDS)) {
    const text = JSON.stringify(make(), null, 2) + '\n';
    const dest = path.join(outDir, file);
    if (check) {
      const have = fs.existsSync(dest) ? fs.readFileSync(dest, 'utf8') : '';
      if (have !== text) {
        process.stderr.write(`${dest} is out of date: run node dashboards/generate_dashboards.js\n`);
        stale++;
      }
    } else {
      fs.writeFileSync(dest, text);
    }
  }
  process.exit(stale ? 1 : 0);
}

main();
