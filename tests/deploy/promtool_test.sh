#!/usr/bin/env bash
# Offline checks of the Prometheus files: `promtool check config` of deploy/prometheus/prometheus.yml,
# `promtool check rules` of dmapin-rules.yaml, `promtool test rules` of the unit tests (one test
# group per alert at least; every alert of the rule file must be tested).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib/common.sh"
ROOT="$(runfiles_root)"
need_tool promtool "Debian package prometheus"

PROM_DIR="$ROOT/deploy/prometheus"
RULES="$PROM_DIR/dmapin-rules.yaml"
RULES_TEST="$ROOT/tests/deploy/prometheus/dmapin-rules_test.yaml"

say "promtool check config"
# prometheus.yml names its rule file relatively: check it where it lies.
(cd "$PROM_DIR" && promtool check config prometheus.yml)
say "promtool check rules"
promtool check rules "$RULES"
say "promtool test rules"
(cd "$(dirname "$RULES_TEST")" && promtool test rules "$(basename "$RULES_TEST")")

say "every alert has a unit test"
missing=0
while read -r alert; do
  if ! grep -q "alertname: $alert\$" "$RULES_TEST"; then
    echo "FAIL: alert $alert has no test in $RULES_TEST" >&2
    missing=1
  fi
done < <(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\).*/\1/p' "$RULES")
[[ $missing -eq 0 ]] || exit 1
say "PASS"
