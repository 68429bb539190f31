#!/usr/bin/env bash
# Builds the gRPC handler fuzzers as real libFuzzer binaries (clang-14, ASan + UBSan, coverage on
# dmapin's sources) and runs each for a bounded time on a copy of its seed corpus:
#   agent_service   tests/fuzz/agent_service_fuzz.cc: NodeAgentService over an in-process channel
#   server_service  tests/fuzz/server_service_fuzz.cc: the server's Admin service and Control
#                   stream handler over an in-process channel, SQLite store in the work dir
#
#   FUZZ_SECONDS=300 tests/fuzz/run_service_fuzz.sh [agent_service|server_service ...]
#
# Environment: FUZZ_SECONDS (default 30, per target), FUZZ_CXX (default clang++-14), FUZZ_OPT
# (default -O0, the optimization of the instrumented sources), FUZZ_WORKDIR
# (default: a new mktemp directory), FUZZ_OBJ_CACHE (default ~/.cache/dmapin-fuzz-objs; objects
# keyed by compiler, flags, source and every header of the repo, so a second run builds in
# seconds; empty: no cache), FUZZ_FLAGS (extra libFuzzer flags). Exits non-zero when a target
# found a crash; its input is left in the work directory's artifacts/<target>/.
#
# Abseil, protobuf and gRPC come from Debian's shared libraries (gcc, no ASan); as in
# run_fuzz.sh, ASan still checks every access in dmapin's code and the harnesses. The generated
# .pb.cc files are compiled without sanitizers or coverage: they are not what is being fuzzed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$(pwd)
seconds=${FUZZ_SECONDS:-30}
cxx=${FUZZ_CXX:-clang++-14}
work=${FUZZ_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/service_fuzz.XXXXXX")}
cache=${FUZZ_OBJ_CACHE-$HOME/.cache/dmapin-fuzz-objs}
targets=("$@")
if (( ${#targets[@]} == 0 )); then targets=(agent_service server_service); fi
mkdir -p "$work/build" "$work/gen"
if [[ -n "$cache" ]]; then
  mkdir -p "$cache"
  # Objects of sources that changed since are never used again: unused for two weeks, gone.
  find "$cache" -name '*.o' -mtime +14 -delete
fi

common_srcs=(common/errno_status.cc common/grpc_status.cc common/sqlite_util.cc common/logging.cc)
agent_srcs=(tests/fuzz/agent_service_fuzz.cc "${common_srcs[@]}" common/server_limits.cc
  common/metrics_util.cc common/connection_metrics.cc
  agent/service/node_agent_service.cc agent/service/proto_convert.cc agent/service/agent_metrics.cc
  agent/service/memory_socket.cc
  agent/node/node_agent.cc agent/node/node_recovery.cc agent/node/container_dma.cc
  agent/node/context_memory.cc agent/node/guest_address_backend.cc agent/node/guest_memory.cc
  agent/node/process_watch.cc agent/node/vfio_container_dma.cc
  agent/registry/registry.cc agent/registry/epoch.cc agent/registry/sim_backend.cc
  agent/registry/memlock_backend.cc agent/store/state_store.cc agent/store/mapping_journal.cc
  agent/vfio/vfio_container.cc agent/vfio/vfio_kernel.cc)
agent_gen=(agent)
server_srcs=(tests/fuzz/server_service_fuzz.cc "${common_srcs[@]}"
  common/grpc_auth.cc common/peer_identity.cc common/metrics_util.cc
  server/service/admin_service.cc server/service/control_service.cc
  server/core/server_core.cc server/core/server_core_reconcile.cc server/core/requirements.cc
  server/core/reconcile_loop.cc server/core/event_fanout.cc server/fleet/fleet_state.cc
  server/policy/policy.cc server/store/server_store.cc server/store/sqlite_server_store.cc)
server_gen=(agent control admin)

# The generated code, as api/BUILD.bazel makes it.
protoc --proto_path=api --cpp_out="$work/gen" --grpc_out="$work/gen" \
  --plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin api/dmapin/v1/{agent,control,admin}.proto

# shellcheck disable=SC2207
grpc_cflags=($(pkg-config --cflags grpc++ protobuf))
# shellcheck disable=SC2207
libs=($(pkg-config --libs grpc++ protobuf) -lsqlite3 -lglog -lprometheus-cpp-pull
  -lprometheus-cpp-core -lz $(pkg-config --libs absl_flags absl_flags_parse 2>/dev/null || true))
base_flags=(-std=c++17 -gline-tables-only -fno-omit-frame-pointer -I"$root" -I"$work/gen"
  "${grpc_cflags[@]}")
# -O0 by default: half the build time of -O1 (about 65 s instead of 140 s from scratch on two
# cores) for about two thirds of its executions per second; FUZZ_OPT=-O1 for long runs.
flags=("${base_flags[@]}" "${FUZZ_OPT:--O0}" "-fsanitize=fuzzer-no-link,address,undefined"
  -fno-sanitize-recover=undefined -Wall -Wextra -Werror -Wno-unused-parameter
  -Wno-missing-field-initializers)
gen_flags=("${base_flags[@]}" -O0 -w)
link_flags=("${base_flags[@]}" "-fsanitize=fuzzer,address,undefined")

# What every object depends on besides its own source: the compiler, and all headers and protos.
header_key=$( { "$cxx" --version; find agent common server api tests/fuzz \
  \( -name '*.h' -o -name '*.proto' \) -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -c1-32)

# compile SRC OBJ FLAGS...: from the cache when an object with the same key is there.
compile() {
  local src=$1 obj=$2
  shift 2
  local key=""
  if [[ -n "$cache" ]]; then
    # The flags name the work directory (-I of the generated code): not part of the key.
    local args="$*"
    key=$( { echo "$header_key ${args//$work/WORK}"; cat "$src"; } | sha256sum | cut -c1-40)
    if [[ -f "$cache/$key.o" ]]; then
      touch "$cache/$key.o"
      cp "$cache/$key.o" "$obj"
      return 0
    fi
  fi
  "$cxx" "$@" -c "$src" -o "$obj"
  # Into the cache under a temporary name first: another run may be reading it.
  if [[ -n "$key" ]]; then
    cp "$obj" "$cache/$key.o.tmp$$" && mv "$cache/$key.o.tmp$$" "$cache/$key.o"
  fi
}

# Two compilers at a time: the machine has two cores.
pids=()
spawn() {
  compile "$@" &
  pids+=($!)
  if (( ${#pids[@]} >= 2 )); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
}

start=$(date +%s)
declare -A queued=()
for target in "${targets[@]}"; do
  declare -n srcs_ref="${target%_service}_srcs" gen_ref="${target%_service}_gen"
  for src in "${srcs_ref[@]}"; do
    obj="$work/build/$(echo "$src" | tr / _).o"
    if [[ -z "${queued[$obj]:-}" ]]; then
      queued[$obj]=1
      spawn "$src" "$obj" "${flags[@]}"
    fi
  done
  for proto in "${gen_ref[@]}"; do
    for kind in pb grpc.pb; do
      src="$work/gen/dmapin/v1/$proto.$kind.cc"
      obj="$work/build/gen_$proto.$kind.o"
      if [[ -z "${queued[$obj]:-}" ]]; then
        queued[$obj]=1
        spawn "$src" "$obj" "${gen_flags[@]}"
      fi
    done
  done
  unset -n srcs_ref gen_ref
done
for pid in "${pids[@]}"; do wait "$pid"; done
for target in "${targets[@]}"; do
  declare -n srcs_ref="${target%_service}_srcs" gen_ref="${target%_service}_gen"
  objs=()
  for src in "${srcs_ref[@]}"; do objs+=("$work/build/$(echo "$src" | tr / _).o"); done
  for proto in "${gen_ref[@]}"; do
    objs+=("$work/build/gen_$proto.pb.o" "$work/build/gen_$proto.grpc.pb.o")
  done
  "$cxx" "${link_flags[@]}" "${objs[@]}" "${libs[@]}" -o "$work/build/${target}_fuzz"
  unset -n srcs_ref gen_ref
done
echo "run_service_fuzz: built ${targets[*]} in $(( $(date +%s) - start ))s (${#queued[@]} objects)"

count_files() { find "$1" -type f | wc -l; }
read -r -a extra <<<"${FUZZ_FLAGS:-}"
status=0
summary=()
for target in "${targets[@]}"; do
  corpus="$work/corpus/$target"
  artifacts="$work/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  cp tests/fuzz/corpus/"$target"/* "$corpus/"
  echo "run_service_fuzz: fuzzing $target for ${seconds}s ($(count_files "$corpus") seeds)"
  rc=0
  # -max_len: kMaxRecords records of a few hundred bytes at most are the interesting ones.
  # TMPDIR: the server harness's SQLite stores go under the work directory.
  (cd "$work" && TMPDIR="$work" "$work/build/${target}_fuzz" -max_total_time="$seconds" \
    -timeout=20 -rss_limit_mb=4096 -max_len=8192 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${extra[@]}" "$corpus") 2>&1 |
    tee "$work/$target.log" | grep -v "^#[0-9].*\(NEW\|REDUCE\|pulse\)\|NEW_FUNC" ||
    rc=${PIPESTATUS[0]}
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$target.log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$target.log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$work/$target.log" | tail -1)
  summary+=("$target: executions=${executions:-?} exec/s=${rate:-?} ${cov:-cov: ?} \
corpus=$(count_files "$corpus") artifacts=$(count_files "$artifacts") exit=$rc")
  if (( rc != 0 )); then
    status=$rc
    echo "run_service_fuzz: $target FAILED; reproduce with: $work/build/${target}_fuzz <artifact>"
    find "$artifacts" -type f
  fi
done
for line in "${summary[@]}"; do echo "run_service_fuzz: $line"; done
echo "run_service_fuzz: workdir=$work"
exit "$status"
