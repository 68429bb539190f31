#!/usr/bin/env bash
# Runs one of this directory's node scripts with the npm packages on NODE_PATH; the other
# arguments are runfiles paths (relative to the workspace root), passed on as absolute paths.
#   node_test.sh SCRIPT.js [RUNFILES_PATH...]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib/common.sh"
setup_node
ROOT="$(runfiles_root)"
script="$1"
shift
paths=()
for p in "$@"; do
  paths+=("$ROOT/$p")
done
exec node "$HERE/$script" "${paths[@]}"
