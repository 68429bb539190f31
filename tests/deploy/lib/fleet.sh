# Starts a local dmapin fleet on loopback (sourced after common.sh): one dmapin-server and the
# agents named in FLEET_NODES (name:pool), sim backend, ports picked by the binaries (port 0),
# state in $FLEET_DIR. Sets SERVER_GRPC, SERVER_METRICS, AGENT_GRPC[name], AGENT_METRICS[name].
#
#   start_fleet SERVER_BINARY AGENT_BINARY DIR

FLEET_NODES=(node-a:a node-b:a node-c:b)
declare -A AGENT_GRPC AGENT_METRICS

start_fleet() {
  local server_bin="$1" agent_bin="$2" dir="$3"
  FLEET_DIR="$dir"
  mkdir -p "$dir/server"
  "$server_bin" --insecure --grpc_address=127.0.0.1:0 --metrics_address=127.0.0.1:0 \
    --state_dir="$dir/server" --report_interval_ms=500 >"$dir/server.log" 2>&1 &
  STARTED_PIDS+=($!)
  local p
  p="$(port_from_log "$dir/server.log" tcp)" || die "dmapin-server did not start"
  SERVER_GRPC="127.0.0.1:$p"
  p="$(port_from_log "$dir/server.log" metrics)" || die "dmapin-server has no metrics port"
  SERVER_METRICS="127.0.0.1:$p"

  local entry name pool
  for entry in "${FLEET_NODES[@]}"; do
    name="${entry%%:*}"
    pool="${entry##*:}"
    mkdir -p "$dir/$name"
    # The Unix socket stays short (sun_path is 108 bytes): $dir is a mktemp dir under /tmp.
    NODE_NAME="$name" "$agent_bin" --insecure --backend=sim --server="$SERVER_GRPC" \
      --node_labels="pool=$pool" --tcp_address=127.0.0.1:0 --metrics_address=127.0.0.1:0 \
      --uds_path="$dir/$name/agent.sock" --state_dir="$dir/$name" --manager_uids="$(id -u)" \
      >"$dir/$name.log" 2>&1 &
    STARTED_PIDS+=($!)
  done
  for entry in "${FLEET_NODES[@]}"; do
    name="${entry%%:*}"
    p="$(port_from_log "$dir/$name.log" tcp)" || die "dmapin-agent $name did not start"
    AGENT_GRPC[$name]="127.0.0.1:$p"
    p="$(port_from_log "$dir/$name.log" metrics)" || die "dmapin-agent $name has no metrics port"
    AGENT_METRICS[$name]="127.0.0.1:$p"
  done
}

# "node-a=unix:DIR/node-a/agent.sock,node-b=..." for the workload's --agents: it calls the agents
# as a VMM does, over their Unix sockets (DMA calls over TCP are refused).
fleet_agents_arg() {
  local out="" entry name
  for entry in "${FLEET_NODES[@]}"; do
    name="${entry%%:*}"
    out+="${out:+,}$name=unix:$FLEET_DIR/$name/agent.sock"
  done
  echo "$out"
}

fleet_logs() {
  local f
  for f in "$FLEET_DIR"/*.log; do
    echo "--- $f (last 30 lines)"
    tail -30 "$f"
  done
}
