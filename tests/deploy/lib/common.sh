# Shared helpers of the tests/deploy sh_tests (sourced).
#
# The npm packages (tests/deploy/package.json, installed by `./run setup` with
#   npm ci --prefix tests/deploy
# ) live in the source tree, not in Bazel's runfiles: the tests find them by resolving the
# package.json runfile (a symlink to the source file) back to the source directory.

die() {
  echo "FAIL: $*" >&2
  exit 1
}

say() {
  echo "== $*"
}

# The runfiles root (the workspace layout), for data files.
runfiles_root() {
  if [[ -n "${TEST_SRCDIR:-}" && -n "${TEST_WORKSPACE:-}" ]]; then
    echo "$TEST_SRCDIR/$TEST_WORKSPACE"
  else
    # Run by hand from the workspace: the workspace itself.
    cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd
  fi
}

# tests/deploy in the source tree (where node_modules is).
deploy_tests_src_dir() {
  local pkg
  pkg="$(readlink -f "$(runfiles_root)/tests/deploy/package.json")"
  dirname "$pkg"
}

need_tool() {
  command -v "$1" >/dev/null 2>&1 || die "$1 not found ($2)"
}

# Exports NODE_PATH for the npm packages and checks they are installed.
setup_node() {
  need_tool node "Debian/NodeSource package nodejs"
  local src
  src="$(deploy_tests_src_dir)"
  if [[ ! -d "$src/node_modules/@grpc/grpc-js" ]]; then
    die "npm packages missing in $src/node_modules: run 'npm ci --prefix tests/deploy' (./run setup does)"
  fi
  export NODE_PATH="$src/node_modules"
  DEPLOY_TESTS_SRC="$src"
}

# A free TCP port on 127.0.0.1 (the kernel's pick; a race with other programs is unlikely).
free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close();})'
}

# Waits until `log` contains "(<what> port N)" and prints N. dmapin-server and dmapin-agent log
# "(tcp port N)" and "(metrics port N)" when given port 0.
port_from_log() {
  local log="$1" what="$2" i port
  for i in $(seq 1 100); do
    port="$(grep -o "($what port [0-9]*)" "$log" 2>/dev/null | head -1 | grep -o '[0-9]*' || true)"
    if [[ -n "$port" ]]; then
      echo "$port"
      return 0
    fi
    sleep 0.1
  done
  echo "no '($what port N)' in $log:" >&2
  cat "$log" >&2
  return 1
}

# PIDs of the processes this test started; kill_started stops them (by PID only).
STARTED_PIDS=()
kill_started() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]}"; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  STARTED_PIDS=()
}
