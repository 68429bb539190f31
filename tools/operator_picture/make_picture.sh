#!/usr/bin/env bash
# Regenerates docs/operator-view.png: what an operator sees in Prometheus while a dmapin fleet runs.
#
# End to end, from a real local run:
#   1. starts the local fleet demo (`./run demo`: dmapin-server on 127.0.0.1:7480, metrics 9480;
#      three agents, metrics 9471-9473; simulated VMMs, EBUSY retry flows),
#   2. starts Debian's `prometheus` on 127.0.0.1:9090 with a config derived from
#      deploy/prometheus/prometheus.yml (same job names, per-target `node` labels and rule file;
#      targets pointed at the demo's ports; 2 s scrapes), storage in a temporary directory,
#   3. lets it scrape for SCRAPE_SECONDS and up to the next full minute (the graph page keeps
#      only the minutes of its end time, so the 3 m window ends on a minute; it then starts at
#      least a minute after the first scrape, and rate()s over [1m] are steady in it), checks through the HTTP API that every key query returns
#      data, then screenshots Prometheus' own graph page (/graph, 3 m range) once per query with
#      headless Chromium,
#   4. crops the panels and composes them into one PNG with ImageMagick's montage,
#   5. stops Prometheus and the demo and removes the temporary directory.
#
# usage: tools/operator_picture/make_picture.sh [OUTPUT.png]      (default: docs/operator-view.png)
#        tools/operator_picture/make_picture.sh --existing-prometheus=URL --end='YYYY-MM-DD HH:MM:SS' [OUTPUT.png]
#          only steps 3-4, against a Prometheus that already scraped a demo (end time in UTC).
# environment: SCRAPE_SECONDS (default 240), DEMO_SECONDS (default SCRAPE_SECONDS + 150),
#              PROM_PORT (default 9090), KEEP_WORK=1 keeps the temporary directory (screenshots, logs).
#
# Needs (Debian bookworm packages): chromium, imagemagick (montage, convert), prometheus (the
# fleet demo's ./run installs it), curl, jq. Run from anywhere; the repository is found from this
# file. The demo's ports (7471-7473, 7480, 9471-9473, 9480) and PROM_PORT must be free.
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)"
SCRAPE_SECONDS="${SCRAPE_SECONDS:-240}"
DEMO_SECONDS="${DEMO_SECONDS:-$((SCRAPE_SECONDS + 150))}"
PROM_PORT="${PROM_PORT:-9090}"
RANGE=3m

existing=""
end_time=""
out=""
for arg in "$@"; do
  case "$arg" in
    --existing-prometheus=*) existing="${arg#*=}" ;;
    --end=*) end_time="${arg#*=}" ;;
    -h | --help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "make_picture: unknown flag $arg (see --help)" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
out="${out:-$ROOT/docs/operator-view.png}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

say() { echo "make_picture: $*"; }
die() { echo "make_picture: $*" >&2; exit 1; }

missing=()
command -v chromium >/dev/null || missing+=("chromium (apt-get install -y chromium)")
command -v montage >/dev/null && command -v convert >/dev/null ||
  missing+=("montage/convert (apt-get install -y imagemagick)")
command -v curl >/dev/null || missing+=("curl (apt-get install -y curl)")
command -v jq >/dev/null || missing+=("jq (apt-get install -y jq)")
if [[ -z "$existing" ]]; then
  command -v prometheus >/dev/null || missing+=("prometheus (apt-get install -y prometheus)")
fi
if ((${#missing[@]})); then
  printf 'make_picture: missing: %s\n' "${missing[@]}" >&2
  die "install them first (Debian bookworm: apt-get update && apt-get install -y chromium imagemagick prometheus curl jq)"
fi

# The panels: title | PromQL. Metric names: server/metrics/server_metrics.h.
PANELS=(
  "Pinned bytes per node (lower lines) vs. its pool budget (upper lines)|{__name__=~\"dmapin_fleet_node_pinned_bytes|dmapin_fleet_node_budget_bytes\"}"
  "Installed IOMMU/DMA mappings per node (the VMMs map and unmap at 200 calls/s)|dmapin_fleet_node_installed_mappings"
  "EBUSY answers scheduled for retry by the server, per second|rate(dmapin_server_ebusy_retries_total[1m])"
  "Intents held by the server, by state|dmapin_server_intents"
  "Decision results from the agents, per second, by kind and result|sum by (kind, result) (rate(dmapin_server_decision_results_total[1m]))"
  "Reconcile pass latency, p99 (seconds)|histogram_quantile(0.99, rate(dmapin_server_reconcile_duration_seconds_bucket[1m]))"
)

WORK="$(mktemp -d /tmp/dmapin-operator-picture.XXXXXX)"
demo_pid=""
prom_pid=""
cleanup() {
  local rc=$?
  if [[ -n "$prom_pid" ]] && kill -0 "$prom_pid" 2>/dev/null; then
    kill -TERM "$prom_pid" 2>/dev/null || true
    wait "$prom_pid" 2>/dev/null || true
  fi
  if [[ -n "$demo_pid" ]] && kill -0 "$demo_pid" 2>/dev/null; then
    # ./run execs fleet_demo, which stops its agents and server on SIGTERM.
    kill -TERM "$demo_pid" 2>/dev/null || true
    wait "$demo_pid" 2>/dev/null || true
  fi
  if [[ "${KEEP_WORK:-0}" == 1 ]]; then
    say "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what="$2"
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 1
  done
}

if [[ -z "$existing" ]]; then
  for port in 7471 7472 7473 7480 9471 9472 9473 9480 "$PROM_PORT"; do
    if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$port/"; then
      die "port $port on 127.0.0.1 is in use; stop what listens there first"
    fi
  done

  say "starting the fleet demo for ${DEMO_SECONDS}s (log: $WORK/demo.log)"
  "$ROOT/run" demo --duration="$DEMO_SECONDS" --interval=10 >"$WORK/demo.log" 2>&1 &
  demo_pid=$!
  # The first ./run may build; the metrics endpoints answer once the fleet is up.
  wait_for 900 "the demo's metrics endpoints (see $WORK/demo.log)" \
    bash -c 'for p in 9480 9471 9472 9473; do curl -sf --max-time 2 http://127.0.0.1:$p/metrics >/dev/null || exit 1; done'
  kill -0 "$demo_pid" 2>/dev/null || die "the demo exited early; see $WORK/demo.log"

  # deploy/prometheus/prometheus.yml with the demo's targets and node names and 2 s intervals.
  mkdir -p "$WORK/prometheus/data"
  cp "$ROOT/deploy/prometheus/dmapin-rules.yaml" "$WORK/prometheus/"
  sed -e 's/scrape_interval: .*/scrape_interval: 2s/' \
      -e 's/scrape_timeout: .*/scrape_timeout: 2s/' \
      -e 's/evaluation_interval: .*/evaluation_interval: 2s/' \
      -e 's/dmapin-server\.example\.internal:9480/127.0.0.1:9480/' \
      -e 's/node-a\.example\.internal:9470/127.0.0.1:9471/; s/node: node-a/node: node-1/' \
      -e 's/node-b\.example\.internal:9470/127.0.0.1:9472/; s/node: node-b/node: node-2/' \
      -e 's/node-c\.example\.internal:9470/127.0.0.1:9473/; s/node: node-c/node: node-3/' \
      "$ROOT/deploy/prometheus/prometheus.yml" >"$WORK/prometheus/prometheus.yml"
  if command -v promtool >/dev/null; then
    promtool check config "$WORK/prometheus/prometheus.yml" >"$WORK/promtool.log" 2>&1 ||
      { cat "$WORK/promtool.log" >&2; die "the derived Prometheus config is invalid"; }
  fi
  say "starting prometheus on 127.0.0.1:$PROM_PORT (log: $WORK/prometheus.log)"
  prometheus --config.file="$WORK/prometheus/prometheus.yml" \
    --storage.tsdb.path="$WORK/prometheus/data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
  prom_pid=$!
  existing="http://127.0.0.1:$PROM_PORT"
  wait_for 60 "prometheus to be ready" curl -sf "$existing/-/ready"
  wait_for 30 "all four targets up" bash -c \
    "[ \"\$(curl -sf '$existing/api/v1/targets?state=active' | jq '[.data.activeTargets[] | select(.health == \"up\")] | length')\" = 4 ]"
  say "scraping for ${SCRAPE_SECONDS}s"
  sleep "$SCRAPE_SECONDS"
  sleep $((60 - $(date -u +%s) % 60 + 2))
  kill -0 "$demo_pid" 2>/dev/null || die "the demo ended before the screenshots; raise DEMO_SECONDS"
  end_time="$(date -u '+%Y-%m-%d %H:%M:00')"
fi
existing="${existing%/}"
[[ -n "$end_time" ]] || end_time="$(date -u '+%Y-%m-%d %H:%M:%S')"
# The graph page drops the seconds of its end time; so do we.
end_time="$(date -u -d "$end_time" '+%Y-%m-%d %H:%M:00')"
end_epoch="$(date -u -d "$end_time" +%s)"

uri() { jq -rn --arg v "$1" '$v | @uri'; }

chrome_flags=(--headless=new --no-sandbox --disable-gpu --hide-scrollbars --mute-audio
  --no-first-run --user-data-dir="$WORK/chrome" --window-size=1000,1300 --virtual-time-budget=15000)

mkdir -p "$WORK/shots"
labels=()
i=0
for panel in "${PANELS[@]}"; do
  title="${panel%%|*}"
  expr="${panel#*|}"
  # The query must return data over the shown range (not "no data", not an empty graph).
  series="$(curl -sf "$existing/api/v1/query_range" --data-urlencode "query=$expr" \
    --data-urlencode "start=$((end_epoch - 180))" --data-urlencode "end=$end_epoch" \
    --data-urlencode "step=2" | jq '[.data.result[] | select((.values | length) > 10)] | length')"
  ((series > 0)) || die "no data for panel $i: $expr"
  url="$existing/graph?g0.expr=$(uri "$expr")&g0.tab=0&g0.stacked=0&g0.show_exemplars=0"
  url+="&g0.range_input=$RANGE&g0.end_input=$(uri "$end_time")&g0.moment_input=$(uri "$end_time")"
  shot="$WORK/shots/panel-$i.png"
  timeout 120 chromium "${chrome_flags[@]}" --screenshot="$shot" "$url" >"$WORK/shots/chromium-$i.log" 2>&1 ||
    { cat "$WORK/shots/chromium-$i.log" >&2; die "chromium failed on panel $i"; }
  [[ -s "$shot" ]] || die "chromium wrote no screenshot for panel $i"
  # Cut the navigation bar and the "Enable query history" line (the top 106 px),
  # then the white below the panel and its "Add Graph" button.
  convert "$shot" -crop +0+106 +repage -bordercolor white -border 1 -trim +repage \
    -gravity south -chop 0x50 -trim +repage -bordercolor white -border 8 "$WORK/shots/cropped-$i.png"
  labels+=(-label "$title" "$WORK/shots/cropped-$i.png")
  say "panel $i: $series series with data: $expr"
  i=$((i + 1))
done

mkdir -p "$(dirname "$out")"
montage -font DejaVu-Sans -pointsize 17 -background white -tile 2x -geometry +12+10 \
  -title "dmapin on Prometheus' graph page: local fleet demo, $RANGE to ${end_time%:00} UTC" \
  "${labels[@]}" "$WORK/composed.png"
convert "$WORK/composed.png" -bordercolor white -border 0x12 -resize '1800x>' -strip -colors 256 PNG8:"$out"
say "wrote $out ($(stat -c %s "$out") bytes, $(identify -format '%wx%h' "$out"))"
