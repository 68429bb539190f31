#!/usr/bin/env node
// Prints deploy/kubernetes/base/prometheusrule.yaml: the PrometheusRule (Prometheus Operator) with
// the groups of deploy/prometheus/dmapin-rules.yaml. After editing the rules:
//   node tests/deploy/make_prometheusrule.js > deploy/kubernetes/base/prometheusrule.yaml
// (tests/deploy:manifests_test fails while the two disagree).
'use strict';

const fs = require('fs');
const path = require('path');
const YAML = require('yaml');

const rulesFile = process.argv[2] || path.join(__dirname, '..', '..', 'deploy', 'prometheus', 'dmapin-rules.yaml');
const rules = YAML.parse(fs.readFileSync(rulesFile, 'utf8'));
const obj = {
  apiVersion: 'monitoring.coreos.com/v1',
  kind: 'PrometheusRule',
  metadata: {
    name: 'dmapin',
    labels: { 'app.kubernetes.io/name': 'dmapin', 'app.kubernetes.io/component': 'monitoring' },
  },
  spec: rules,
};
process.stdout.write(
  '# The alerting rules of deploy/prometheus/dmapin-rules.yaml for the Prometheus Operator.\n' +
  '# Generated from that file (tests/deploy checks that both agree): after editing the rules, run\n' +
  '#   node tests/deploy/make_prometheusrule.js > deploy/kubernetes/base/prometheusrule.yaml\n' +
  YAML.stringify(obj, { lineWidth: 0 }));
