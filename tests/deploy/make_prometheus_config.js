#!/usr/bin/env node
// Turns deploy/prometheus/prometheus.yml into the configuration of the test's Prometheus: the same
// jobs, relabelling and label conventions, with the static targets replaced by the local fleet's,
// a 1 s scrape/evaluation interval and an absolute path to the rule file.
//
// usage: make_prometheus_config.js SRC_YML RULES_FILE SERVER_METRICS NODE=HOST:PORT... > out.yml
'use strict';

const fs = require('fs');
const YAML = require('yaml');

const [src, rules, serverTarget, ...agents] = process.argv.slice(2);
if (!src || !rules || !serverTarget || agents.length === 0) {
  process.stderr.write('usage: make_prometheus_config.js SRC_YML RULES_FILE SERVER_METRICS NODE=HOST:PORT...\n');
  process.exit(2);
}
const config = YAML.parse(fs.readFileSync(src, 'utf8'));
config.global = { ...config.global, scrape_interval: '1s', scrape_timeout: '1s', evaluation_interval: '1s' };
config.rule_files = [rules];
const jobs = Object.fromEntries(config.scrape_configs.map((j) => [j.job_name, j]));
for (const name of ['dmapin-server', 'dmapin-agent']) {
  if (!jobs[name]) throw new Error(`${src} has no job ${name}`);
}
jobs['dmapin-server'].static_configs = [{ targets: [serverTarget] }];
jobs['dmapin-agent'].static_configs = agents.map((a) => {
  const [node, target] = a.split('=');
  return { targets: [target], labels: { node } };
});
process.stdout.write(YAML.stringify(config));
