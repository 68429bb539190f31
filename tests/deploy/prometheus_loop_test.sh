#!/usr/bin/env bash
# Prometheus in the loop: a local fleet (dmapin-server + 3 dmapin-agents, sim backend, loopback,
# ports picked by the binaries) with a workload on it, Debian's prometheus scraping it every second
# with the jobs of deploy/prometheus/prometheus.yml and the rules of dmapin-rules.yaml; then
#   - `promtool check metrics` on every /metrics endpoint (must print nothing),
#   - every PromQL query of every dashboard panel must parse and return data (prometheus_loop_check.js),
#   - every alerting rule must evaluate without error.
#
# usage (Bazel passes these): prometheus_loop_test.sh SERVER_BINARY AGENT_BINARY
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib/common.sh"
source "$HERE/lib/fleet.sh"

ROOT="$(runfiles_root)"
SERVER_BIN="$(readlink -f "${1:-$ROOT/server/dmapin-server}")"
AGENT_BIN="$(readlink -f "${2:-$ROOT/agent/dmapin-agent}")"
[[ -x "$SERVER_BIN" && -x "$AGENT_BIN" ]] || die "binaries not found: $SERVER_BIN $AGENT_BIN"
need_tool prometheus "Debian package prometheus"
need_tool promtool "Debian package prometheus"
need_tool curl "Debian package curl"
setup_node

WORK="$(mktemp -d /tmp/dmapin-prom-test.XXXXXX)"
WORKLOAD_PID=""
cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    fleet_logs || true
    echo "--- prometheus.log (last 30 lines)"
    tail -30 "$WORK/prometheus.log" 2>/dev/null || true
    echo "--- workload.log"
    cat "$WORK/workload.log" 2>/dev/null || true
  fi
  kill_started
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

START=$SECONDS
say "starting the fleet in $WORK"
start_fleet "$SERVER_BIN" "$AGENT_BIN" "$WORK"
say "server grpc $SERVER_GRPC metrics $SERVER_METRICS; agents $(fleet_agents_arg)"

say "starting the workload"
node "$HERE/fleet_workload.js" --server="$SERVER_GRPC" --agents="$(fleet_agents_arg)" \
  --churn_seconds=240 >"$WORK/workload.log" 2>&1 &
WORKLOAD_PID=$!
STARTED_PIDS+=("$WORKLOAD_PID")
for _ in $(seq 1 300); do
  grep -q 'workload: setup done' "$WORK/workload.log" && break
  kill -0 "$WORKLOAD_PID" 2>/dev/null || die "the workload exited: $(cat "$WORK/workload.log")"
  sleep 0.1
done
grep -q 'workload: setup done' "$WORK/workload.log" || die "the workload did not finish its setup"
cat "$WORK/workload.log"

say "promtool check metrics on every endpoint"
targets=("server=$SERVER_METRICS")
for entry in "${FLEET_NODES[@]}"; do
  name="${entry%%:*}"
  targets+=("$name=${AGENT_METRICS[$name]}")
done
prom_agents=()
for t in "${targets[@]}"; do
  name="${t%%=*}"
  addr="${t#*=}"
  curl -sf "http://$addr/metrics" >"$WORK/$name.metrics" || die "scrape of $name ($addr) failed"
  [[ -s "$WORK/$name.metrics" ]] || die "$name: empty /metrics"
  if ! lint="$(promtool check metrics <"$WORK/$name.metrics" 2>&1)"; then
    die "promtool check metrics failed on $name:"$'\n'"$lint"
  fi
  [[ -z "$lint" ]] || die "promtool check metrics on $name is not clean:"$'\n'"$lint"
  echo "ok: $name /metrics ($(grep -vc '^#' "$WORK/$name.metrics") samples) is clean"
  [[ "$name" == server ]] || prom_agents+=("$name=$addr")
done

say "starting prometheus"
PROM_PORT="$(free_port)"
node "$HERE/make_prometheus_config.js" "$ROOT/deploy/prometheus/prometheus.yml" \
  "$(readlink -f "$ROOT/deploy/prometheus/dmapin-rules.yaml")" "$SERVER_METRICS" "${prom_agents[@]}" \
  >"$WORK/prometheus.yml"
promtool check config "$WORK/prometheus.yml" >/dev/null || die "generated config invalid: $(cat "$WORK/prometheus.yml")"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
STARTED_PIDS+=($!)
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null || die "prometheus did not become ready"

# rate() over $__rate_interval (15 s here) needs a few scrapes: the check retries until its deadline.
say "evaluating every dashboard query against prometheus on 127.0.0.1:$PROM_PORT"
nodes="$(printf '%s\n' "${FLEET_NODES[@]}" | cut -d: -f1 | paste -sd,)"
node "$HERE/prometheus_loop_check.js" --prometheus="http://127.0.0.1:$PROM_PORT" \
  --dashboards="$ROOT/dashboards" --nodes="$nodes" --deadline_s=60

kill -0 "$WORKLOAD_PID" 2>/dev/null || die "the workload died: $(cat "$WORK/workload.log")"
say "PASS in $((SECONDS - START)) s"
