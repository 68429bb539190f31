#!/usr/bin/env bash
# Builds tests/fuzz/registry_fuzz.cc as a real libFuzzer binary (clang-14, ASan + UBSan, coverage
# instrumentation on the registry sources too) and runs it for a bounded time on a copy of the seed
# corpus; then runs the gRPC handler fuzzers (run_service_fuzz.sh: agent_service, server_service)
# for the same time each. Everything it writes goes to a fresh directory under ${TMPDIR:-/tmp},
# never the repo.
#
#   FUZZ_SECONDS=600 tests/fuzz/run_fuzz.sh [extra libFuzzer flags for the registry fuzzer]
#
# Environment: FUZZ_SECONDS (default 60: the whole step's fuzzing time, a third per target;
# FUZZ_SERVICES=0 gives it all to the registry fuzzer), FUZZ_CXX (default clang++-14),
# FUZZ_CXXFLAGS (extra compiler flags, put first, e.g. -I of an overlay directory; registry fuzzer
# only), FUZZ_WORKDIR (default: a new mktemp directory). Exits with libFuzzer's status:
# non-zero when it found a crash, whose input is left in the work directory's artifacts/.
#
# Abseil comes from Debian's shared libraries, which are built with gcc and without ASan. Mixing
# them into a clang ASan binary works (same libstdc++ ABI; ASan intercepts malloc/free process-wide,
# it just does not instrument accesses inside the .so files), so bugs in Abseil itself would go
# unseen, but everything in the registry and the harness is checked.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$(pwd)
total_seconds=${FUZZ_SECONDS:-60}
services=${FUZZ_SERVICES:-1}
seconds=$total_seconds
if [[ "$services" != 0 ]]; then seconds=$(( (total_seconds + 2) / 3 )); fi
cxx=${FUZZ_CXX:-clang++-14}
work=${FUZZ_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/registry_fuzz.XXXXXX")}
mkdir -p "$work/build" "$work/corpus" "$work/artifacts"

# What //agent/registry:registry needs (registry, epoch, common/errno_status; iommu_table when it has a
# .cc) plus the simulated backend; no memlock, fault-injection, test or benchmark sources.
srcs=(tests/fuzz/registry_fuzz.cc common/errno_status.cc)
for name in registry epoch iommu_table sim_backend; do
  if [[ -f agent/registry/$name.cc ]]; then srcs+=("agent/registry/$name.cc"); fi
done

read -r -a extra_flags <<<"${FUZZ_CXXFLAGS:-}"
flags=("${extra_flags[@]}" -std=c++17 -O1 -g -fno-omit-frame-pointer
  "-fsanitize=fuzzer,address,undefined" -fno-sanitize-recover=undefined
  -Wall -Wextra -Werror -Wno-unused-parameter -I"$root")
# shellcheck disable=SC2207
absl_libs=($(pkg-config --libs absl_status absl_statusor absl_synchronization absl_str_format \
  absl_hash absl_raw_hash_set absl_strings absl_cord))

echo "run_fuzz: building with $cxx into $work/build (${#srcs[@]} sources)"
objs=()
pids=()
for src in "${srcs[@]}"; do
  obj="$work/build/$(echo "$src" | tr / _).o"
  objs+=("$obj")
  "$cxx" "${flags[@]}" -c "$src" -o "$obj" &
  pids+=($!)
  # Two compilers at a time: the machine has two cores.
  if (( ${#pids[@]} >= 2 )); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$cxx" "${flags[@]}" "${objs[@]}" "${absl_libs[@]}" -o "$work/build/registry_fuzz"

cp tests/fuzz/corpus/registry/* "$work/corpus/"
count_files() { find "$1" -type f | wc -l; }
echo "run_fuzz: fuzzing for ${seconds}s; working corpus $work/corpus ($(count_files "$work/corpus") seeds)"
status=0
# -max_len: the config byte plus 200 five-byte operation records (the harness's kMaxOps; fewer
# when records carry wide operands).
"$work/build/registry_fuzz" -max_total_time="$seconds" -timeout=10 -max_len=1001 -print_final_stats=1 \
  -artifact_prefix="$work/artifacts/" "$@" "$work/corpus" 2>&1 | tee "$work/fuzz.log" ||
  status=${PIPESTATUS[0]}

executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/fuzz.log" | tail -1)
crashes=$(count_files "$work/artifacts")
echo "run_fuzz: executions=${executions:-unknown} corpus=$(count_files "$work/corpus") \
artifacts=$crashes exit=$status workdir=$work"
if (( status != 0 )); then
  echo "run_fuzz: FAILED; reproduce with: $work/build/registry_fuzz $work/artifacts/<file>"
  find "$work/artifacts" -type f
else
  echo "run_fuzz: PASS (no crash in ${seconds}s)"
fi

if [[ "$services" != 0 ]]; then
  service_status=0
  FUZZ_SECONDS=$seconds FUZZ_WORKDIR="$work/service" FUZZ_CXX="$cxx" tests/fuzz/run_service_fuzz.sh ||
    service_status=$?
  if (( status == 0 )); then status=$service_status; fi
fi
exit "$status"
