#!/usr/bin/env bash
# gRPC reflection, no .proto file: starts dmapin-server and one dmapin-agent (sim backend, loopback,
# ports picked by the binaries) and runs grpc_reflection_check.js against them.
#
# usage (Bazel passes these): grpc_reflection_test.sh SERVER_BINARY AGENT_BINARY
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib/common.sh"
source "$HERE/lib/fleet.sh"

ROOT="$(runfiles_root)"
SERVER_BIN="$(readlink -f "${1:-$ROOT/server/dmapin-server}")"
AGENT_BIN="$(readlink -f "${2:-$ROOT/agent/dmapin-agent}")"
setup_node

WORK="$(mktemp -d /tmp/dmapin-reflect-test.XXXXXX)"
cleanup() {
  local rc=$?
  [[ $rc -eq 0 ]] || fleet_logs || true
  kill_started
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

START=$SECONDS
FLEET_NODES=(node-r:reflect)
start_fleet "$SERVER_BIN" "$AGENT_BIN" "$WORK"
node "$HERE/grpc_reflection_check.js" --server="$SERVER_GRPC" --agent="${AGENT_GRPC[node-r]}" --node=node-r
say "PASS in $((SECONDS - START)) s"
