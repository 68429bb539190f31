#!/usr/bin/env bash
# Offline checks of deploy/:
#   - `kubectl kustomize` renders every overlay of deploy/kubernetes/overlays (and the base);
#   - check_manifests.mjs validates every rendered object against the Kubernetes / Prometheus
#     Operator schemas (npm kubernetes-models) and checks the deployment's properties;
#   - the Dockerfiles build on debian:bookworm-slim with the packages and bazel commands of ./run,
#     and their runtime stages install the package of every shared library the binaries link
#     (ldd + dpkg -S on this machine's build), the server as a non-root user.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib/common.sh"
ROOT="$(runfiles_root)"
need_tool kubectl "kubectl with its built-in kustomize"
setup_node
SERVER_BIN="${1:+$(readlink -f "$1")}"
AGENT_BIN="${2:+$(readlink -f "$2")}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# kustomize must see the real files (its load restrictor follows the directory layout, and the
# runfiles tree has only the declared files): render from the source tree.
SRC="$(cd "$(deploy_tests_src_dir)/../.." && pwd)"
K="$SRC/deploy/kubernetes"

say "kubectl kustomize (kubectl $(kubectl version --client 2>/dev/null | head -1))"
kubectl kustomize "$K/base" >"$WORK/base.yaml" || die "the base does not render"
overlays=()
for d in "$K"/overlays/*/; do
  overlays+=("$(basename "$d")")
done
[[ " ${overlays[*]} " == *" dev "* && " ${overlays[*]} " == *" production "* ]] ||
  die "expected overlays dev and production, found: ${overlays[*]}"
failed=0
for o in "${overlays[@]}"; do
  kubectl kustomize "$K/overlays/$o" >"$WORK/$o.yaml" || die "overlay $o does not render"
  echo "rendered $o: $(grep -c '^kind:' "$WORK/$o.yaml") objects"
  node "$HERE/check_manifests.mjs" "$o" "$WORK/$o.yaml" "$SRC" || failed=1
done
[[ $failed -eq 0 ]] || die "manifest checks failed"

say "Dockerfiles"
D="$SRC/deploy/docker"
run_packages="$(sed -n '/^DMAPIN_APT_PACKAGES=(/,/^)/p' "$SRC/run")"
[[ -n "$run_packages" ]] || die "no DMAPIN_APT_PACKAGES in ./run"
for component in agent server; do
  f="$D/$component.Dockerfile"
  [[ -f "$f" ]] || die "no $f"
  target="//$component:dmapin-$component"
  [[ "$(grep -c '^FROM debian:bookworm-slim' "$f")" -eq 2 ]] || die "$f: build and runtime stages must be FROM debian:bookworm-slim"
  grep -q '^RUN ./run setup' "$f" || die "$f: the build stage must install ./run's packages (./run setup)"
  grep -q "bazel build .*$target" "$f" || die "$f: no 'bazel build $target'"
  [[ -f "$f.dockerignore" ]] || die "no $f.dockerignore"
  runtime="$(awk '/^FROM/{n++} n==2' "$f")"
  bin="$SERVER_BIN"
  [[ $component == agent ]] && bin="$AGENT_BIN"
  if [[ -n "$bin" ]]; then
    # Every library the binary links must come from a package the runtime stage installs (or
    # from debian:bookworm-slim itself).
    while read -r pkg; do
      case "$pkg" in libc6 | libgcc-s1 | libstdc++6 | zlib1g) continue ;; esac
      grep -qw -- "$pkg" <<<"$runtime" || die "$f: the runtime stage lacks $pkg (a library of dmapin-$component)"
    done < <(ldd "$bin" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
      dpkg -S "$(readlink -f "$lib")" 2>/dev/null || dpkg -S "$lib" 2>/dev/null || dpkg -S "/usr$lib" 2>/dev/null || true
    done | cut -d: -f1 | sort -u)
    echo "ok: $component runtime packages cover ldd of the binary"
  fi
  if [[ $component == server ]]; then
    grep -qE '^USER (65532|[1-9][0-9]*)' <<<"$runtime" || die "$f: the server must run as a non-root user"
  fi
  echo "ok: $f"
done
say "PASS"
