#!/usr/bin/env node
// The checks of prometheus_loop_test.sh against a live Prometheus that scrapes a local fleet:
//   1. every scrape target is up, and agent series carry the `node` label of their target;
//   2. every template variable of every dashboard resolves to values (node: the fleet's nodes);
//   3. EVERY PromQL query of every dashboard panel parses and returns at least one sample with a
//      finite value, once with the variables at "All" (.*) and once with one node (and context)
//      selected; a query returning nothing fails;
//   4. every alerting rule of deploy/prometheus/dmapin-rules.yaml evaluates without error.
// Queries are retried until --deadline_s (rate() windows need a few scrapes).
//
// usage: prometheus_loop_check.js --prometheus=http://127.0.0.1:P --dashboards=DIR
//          --nodes=node-a,node-b,node-c [--deadline_s=60]
'use strict';

const { loadDashboards, allQueries, variables, variableQuery, interpolate } = require('./lib/dashboards');

const args = Object.fromEntries(process.argv.slice(2).map((a) => {
  const m = /^--([a-z_]+)=(.*)$/.exec(a);
  if (!m) throw new Error(`bad argument ${a}`);
  return [m[1], m[2]];
}));
const PROM = args.prometheus;
const NODES = args.nodes.split(',');
const DEADLINE = Date.now() + 1000 * Number(args.deadline_s || 60);

async function api(path, params = {}) {
  const url = new URL(PROM + path);
  for (const [k, v] of Object.entries(params)) {
    for (const one of [].concat(v)) url.searchParams.append(k, one);
  }
  const res = await fetch(url);
  const body = await res.json();
  if (body.status !== 'success') {
    const err = new Error(`${body.errorType}: ${body.error}`);
    err.promError = true;
    throw err;
  }
  return body.data;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(fn) {
  // At least one try, even past the deadline; retries until it.
  for (;;) {
    const last = await fn();
    if (last.ok || last.fatal || Date.now() >= DEADLINE) return last;
    await sleep(1000);
  }
}

function finiteSamples(data) {
  if (data.resultType === 'scalar') return Number.isFinite(Number(data.result[1])) ? 1 : 0;
  return data.result.filter((s) => Number.isFinite(Number(s.value[1]))).length;
}

// Evaluates Grafana's label_values()/query_result()/metric name variable queries.
async function resolveVariable(q) {
  let m = /^label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)$/.exec(q.trim());
  if (m) {
    const data = await api('/api/v1/series', { 'match[]': m[1] });
    return [...new Set(data.map((s) => s[m[2]]).filter((v) => v !== undefined))].sort();
  }
  m = /^label_values\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)$/.exec(q.trim());
  if (m) return (await api(`/api/v1/label/${m[1]}/values`)).sort();
  throw new Error(`unsupported variable query ${q}`);
}

async function main() {
  let failures = 0;
  const fail = (msg) => {
    failures++;
    process.stdout.write(`FAIL: ${msg}\n`);
  };

  // 1. Targets.
  const targets = await until(async () => {
    const data = await api('/api/v1/targets', { state: 'active' });
    const t = data.activeTargets;
    const up = t.filter((x) => x.health === 'up').length;
    return { ok: t.length === NODES.length + 1 && up === t.length, t };
  });
  if (!targets.ok) {
    fail(`not all targets up: ${JSON.stringify(targets.t.map((x) => [x.scrapeUrl, x.health, x.lastError]))}`);
  } else {
    process.stdout.write(`ok: ${targets.t.length} targets up\n`);
  }
  const byNode = await api('/api/v1/query', { query: 'count by (node) (dmapin_agent_locked_bytes{job="dmapin-agent"})' });
  const seen = byNode.result.map((s) => s.metric.node).sort();
  if (JSON.stringify(seen) !== JSON.stringify([...NODES].sort())) {
    fail(`agent series by node label: ${JSON.stringify(seen)}, want ${JSON.stringify(NODES)}`);
  }
  const info = await api('/api/v1/query', { query: 'dmapin_agent_info{job="dmapin-agent"}' });
  for (const s of info.result) {
    if (s.metric.exported_node !== undefined) fail(`dmapin_agent_info got exported_node: ${JSON.stringify(s.metric)}`);
  }

  // 2. + 3. Dashboards.
  let queries = 0;
  for (const { file, json } of loadDashboards(args.dashboards)) {
    const vars = variables(json).filter((v) => v.type === 'query');
    const values = { datasource: 'prometheus' };
    const oneNode = { datasource: 'prometheus' };
    for (const v of vars) {
      values[v.name] = v.allValue || '.*';
    }
    for (const v of vars) {
      const q = interpolate(variableQuery(v), oneNode);
      const got = await until(async () => {
        try {
          const vals = await resolveVariable(q);
          return { ok: vals.length > 0, vals };
        } catch (e) {
          return { ok: false, vals: [], error: e.message };
        }
      });
      if (!got.ok) {
        fail(`${file}: variable ${v.name} (${q}) has no values ${got.error || ''}`);
        continue;
      }
      if (v.name === 'node' && JSON.stringify(got.vals) !== JSON.stringify([...NODES].sort())) {
        fail(`${file}: variable node = ${JSON.stringify(got.vals)}, want ${JSON.stringify(NODES)}`);
      }
      // The second pass selects one value: the first node, and for later variables the first
      // value they offer for it.
      oneNode[v.name] = got.vals[0];
      process.stdout.write(`ok: ${file} variable ${v.name} = ${JSON.stringify(got.vals)}\n`);
    }
    for (const { panel, target, expr } of allQueries(json)) {
      for (const [label, vals] of [['all', values], ['one', oneNode]]) {
        const query = interpolate(expr, vals);
        queries++;
        const res = await until(async () => {
          try {
            const data = await api('/api/v1/query', { query });
            const n = finiteSamples(data);
            return { ok: n > 0, n, total: data.result.length };
          } catch (e) {
            // A parse error does not get better by waiting.
            if (e.promError && /bad_data/.test(e.message)) return { ok: false, error: e.message, fatal: true };
            return { ok: false, error: e.message };
          }
        });
        const where = `${file} panel "${panel.title}" ${target.refId} [${label}]`;
        if (!res.ok) {
          fail(`${where}: ${res.error ? res.error : `no data (${res.total} series, ${res.n} finite)`}\n      ${query}`);
        } else {
          process.stdout.write(`ok: ${where}: ${res.n} series\n`);
        }
      }
    }
  }

  // 4. Alerting rules.
  const rules = await until(async () => {
    const data = await api('/api/v1/rules');
    const all = data.groups.flatMap((g) => g.rules);
    const evaluated = all.filter((r) => r.lastEvaluation && !r.lastEvaluation.startsWith('0001'));
    return { ok: all.length > 0 && evaluated.length === all.length, all };
  });
  for (const r of rules.all || []) {
    if (r.health !== 'ok') fail(`rule ${r.name}: health ${r.health} ${r.lastError || ''}`);
  }
  process.stdout.write(`ok: ${(rules.all || []).length} rules loaded; firing/pending: ${
    (rules.all || []).filter((r) => r.state && r.state !== 'inactive').map((r) => `${r.name}(${r.state})`).join(' ') || 'none'}\n`);

  process.stdout.write(`${queries} dashboard query evaluations, ${failures} failures\n`);
  process.exit(failures ? 1 : 0);
}

main().catch((e) => {
  process.stderr.write(`prometheus_loop_check: ${e.stack || e}\n`);
  process.exit(1);
});
