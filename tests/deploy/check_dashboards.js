#!/usr/bin/env node
// Static checks of dashboards/*.json and dashboards/provisioning (no Grafana, no Prometheus):
//   - generated from dashboards/generate_dashboards.js and up to date,
//   - a `datasource` variable of type datasource (prometheus); every panel and query uses it,
//   - a `node` variable from label_values() on the dashboards with per-node panels,
//   - no node names or hosts hard-coded in queries (node="..." / instance="..."),
//   - every non-row panel has a unit, a title, a description and at least one query;
//     byte-valued series (…_bytes) are in bytes or percent, …_seconds in seconds,
//   - unique uids and panel ids, no overlapping grid positions,
//   - the provisioning files parse and point at the dashboards.
//
// usage: check_dashboards.js DASHBOARDS_DIR
'use strict';

const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');
const YAML = require('yaml');
const { loadDashboards, allPanels, allQueries, variables, variableQuery } = require('./lib/dashboards');

const dir = process.argv[2];
let failures = 0;
let checks = 0;
const fail = (msg) => { failures++; process.stdout.write(`FAIL: ${msg}\n`); };
const check = (cond, msg) => { checks++; if (!cond) fail(msg); };

// Up to date with the generator.
try {
  execFileSync(process.execPath, [path.join(dir, 'generate_dashboards.js'), '--check'], { stdio: 'pipe' });
  checks++;
} catch (e) {
  fail(`dashboards/*.json are not what generate_dashboards.js makes: ${e.stderr}`);
}

const dashboards = loadDashboards(dir);
check(dashboards.length >= 3, `expected at least 3 dashboards, found ${dashboards.length}`);
const uids = new Set();
for (const { file, json } of dashboards) {
  check(json.uid && !uids.has(json.uid), `${file}: missing or duplicate uid ${json.uid}`);
  uids.add(json.uid);
  check(json.title && json.title.startsWith('dmapin'), `${file}: title ${json.title}`);
  check(!json.id, `${file}: a provisioned dashboard must not carry a numeric id`);
  const vars = variables(json);
  const ds = vars.find((v) => v.name === 'datasource');
  check(ds && ds.type === 'datasource' && ds.query === 'prometheus', `${file}: no prometheus datasource variable`);
  for (const v of vars.filter((x) => x.type === 'query')) {
    check(v.datasource && v.datasource.uid === '${datasource}', `${file}: variable ${v.name} does not use \${datasource}`);
    check(/^label_values\(/.test(variableQuery(v)), `${file}: variable ${v.name} is not a label_values() query`);
  }
  const queries = allQueries(json);
  const usesNode = queries.some((q) => q.expr.includes('$node'));
  if (usesNode) {
    const nodeVar = vars.find((v) => v.name === 'node');
    check(nodeVar && nodeVar.type === 'query', `${file}: queries use $node but there is no node query variable`);
  }
  const ids = new Set();
  const cells = [];
  for (const p of allPanels(json)) {
    check(!ids.has(p.id), `${file}: duplicate panel id ${p.id}`);
    ids.add(p.id);
    const g = p.gridPos;
    check(g && g.w > 0 && g.h > 0 && g.x + g.w <= 24, `${file}: panel "${p.title}" bad gridPos`);
    for (const c of cells) {
      const overlap = g.x < c.x + c.w && c.x < g.x + g.w && g.y < c.y + c.h && c.y < g.y + g.h;
      check(!overlap, `${file}: panel "${p.title}" overlaps "${c.title}"`);
    }
    cells.push({ ...g, title: p.title });
    if (p.type === 'row') continue;
    check(p.title && p.description, `${file}: panel ${p.id} needs a title and a description`);
    check(p.datasource && p.datasource.uid === '${datasource}', `${file}: panel "${p.title}" does not use \${datasource}`);
    const unit = p.fieldConfig && p.fieldConfig.defaults && p.fieldConfig.defaults.unit;
    check(unit, `${file}: panel "${p.title}" has no unit`);
    check((p.targets || []).length > 0, `${file}: panel "${p.title}" has no query`);
    for (const t of p.targets || []) {
      check(t.datasource && t.datasource.uid === '${datasource}', `${file}: "${p.title}" ${t.refId} does not use \${datasource}`);
      check(!/(node|instance|pod)\s*=~?\s*"(?!\$)[^"]+"/.test(t.expr), `${file}: "${p.title}" hard-codes a node/instance: ${t.expr}`);
      check(!/node-[a-z0-9]/.test(t.expr), `${file}: "${p.title}" names a node: ${t.expr}`);
      const isRatio = /\s\/\s/.test(t.expr) && !/_sum\[/.test(t.expr);
      if (/_bytes\b|_bytes\{/.test(t.expr) && !/rate\(/.test(t.expr)) {
        check(unit === 'bytes' || (isRatio && unit === 'percentunit'), `${file}: "${p.title}" shows bytes in unit ${unit}`);
      }
      if (/_seconds(_bucket|_sum)?\b/.test(t.expr) && !/_seconds_total/.test(t.expr) && !/_count/.test(t.expr)) {
        check(unit === 's', `${file}: "${p.title}" shows seconds in unit ${unit}`);
      }
    }
  }
}

// Provisioning.
const prov = path.join(dir, 'provisioning');
const dsFile = YAML.parse(fs.readFileSync(path.join(prov, 'datasources', 'dmapin-prometheus.yaml'), 'utf8'));
check(dsFile.apiVersion === 1 && dsFile.datasources.some((d) => d.type === 'prometheus'),
  'provisioning/datasources: no prometheus datasource');
const dbFile = YAML.parse(fs.readFileSync(path.join(prov, 'dashboards', 'dmapin.yaml'), 'utf8'));
check(dbFile.apiVersion === 1 && dbFile.providers.length > 0 && dbFile.providers[0].type === 'file',
  'provisioning/dashboards: no file provider');

process.stdout.write(`${checks - failures} passed, ${failures} failed\n`);
process.exit(failures ? 1 : 0);
