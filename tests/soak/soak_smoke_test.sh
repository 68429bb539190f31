#!/usr/bin/env bash
# The soak in small: 20 s at 500 simulated agents, a fault every 3 s (each kind once), the same
# checks as a full run (any unexpected error, a dead process or growing memory fails it).
# Usage: soak_smoke_test.sh SOAK AGENT_BINARY SERVER_BINARY
set -euo pipefail
exec "$1" --agent_binary="$2" --server_binary="$3" --duration=20 --agents=500 --fault_every=3 \
  --interval=2
