// Reading Grafana dashboards: every panel (rows' nested panels included), every query, every
// template variable; and Grafana's variable interpolation for evaluating queries by hand.
'use strict';

const fs = require('fs');
const path = require('path');

function loadDashboards(dir) {
  return fs.readdirSync(dir).filter((f) => f.endsWith('.json')).sort().map((f) => ({
    file: f,
    json: JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')),
  }));
}

function allPanels(dashboard) {
  const out = [];
  const walk = (panels) => {
    for (const p of panels || []) {
      out.push(p);
      if (p.panels) walk(p.panels);
    }
  };
  walk(dashboard.panels);
  return out;
}

// [{ panel, target, expr }] for every Prometheus query of every panel.
function allQueries(dashboard) {
  const out = [];
  for (const panel of allPanels(dashboard)) {
    for (const target of panel.targets || []) {
      if (typeof target.expr === 'string' && !target.hide) out.push({ panel, target, expr: target.expr });
    }
  }
  return out;
}

function variables(dashboard) {
  return (dashboard.templating && dashboard.templating.list) || [];
}

// The PromQL of a query variable ("label_values(...)", "query_result(...)", ...).
function variableQuery(v) {
  if (typeof v.query === 'string') return v.query;
  if (v.query && typeof v.query.query === 'string') return v.query.query;
  return v.definition || '';
}

// Replaces Grafana's variables in `expr`: the dashboard's own variables from `values`
// ({ name: value }), and the built-in intervals.
function interpolate(expr, values, { rateInterval = '15s', interval = '2s', range = '1m' } = {}) {
  const builtins = {
    __rate_interval: rateInterval, __interval: interval, __range: range,
    __range_s: String(parseInt(range, 10) * (range.endsWith('m') ? 60 : 1)),
  };
  const all = { ...builtins, ...values };
  // Longest names first, so $__range_s is not read as $__range + "_s".
  const names = Object.keys(all).sort((a, b) => b.length - a.length);
  let out = expr;
  for (const name of names) {
    out = out.split('${' + name + '}').join(all[name]);
    out = out.replace(new RegExp('\\$' + name + '(?![A-Za-z0-9_])', 'g'), () => all[name]);
  }
  return out;
}

module.exports = { loadDashboards, allPanels, allQueries, variables, variableQuery, interpolate };
