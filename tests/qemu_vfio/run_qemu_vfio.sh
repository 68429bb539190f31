#!/usr/bin/env bash
# Runs dmapin's VFIO container drivers against a real Linux kernel under QEMU (TCG, no KVM):
#   x86_64  Debian's amd64 kernel on q35 with an emulated Intel IOMMU: VFIO_TYPE1v2_IOMMU
#   ppc64   Debian's bookworm-backports ppc64el 64k kernel on pseries: VFIO_SPAPR_TCE_v2_IOMMU
#   x86_64-agent  as x86_64, but the real dmapin-agent binary (--backend=vfio-type1) and a VMM on
#           it (vfio_test_vmm) run in the guest, with every shared library they need; the guest
#           program (agent_guest_test.cc) drives the edu device's DMA into the VMM's memory
#   x86_64-restart  as x86_64-agent, with restart_vmm as the VMM: it holds its edu device and
#           container (the device handoff) and runs edu DMA transfers all the time while the guest
#           program (restart_guest_test.cc) kills and restarts the agent 20 times
#   x86_64-survive  as x86_64 with one edu: survive_guest.cc, an experiment on what a type1
#           container keeps when the process that mapped dies while another holds the device and
#           container fds (OBSERVE lines; see SURVIVE.md)
#   ppc64-survive  as ppc64 with one edu: survive_spapr_guest.cc, the same experiment on a SPAPR
#           TCE v2 container, every answer asserted (PASS/FAIL lines; see SURVIVE.md)
# The guest program (vfio_guest_test.cc or agent_guest_test.cc, built here with -static from the
# project's own sources) is the initramfs's /init; it prints one PASS/FAIL line per step on the
# serial console. This script fails on any FAIL line, a missing end marker, or a
# timeout, and prints how long the boot and the test took. It installs nothing: a missing tool is
# an error naming the Debian package. Everything it writes goes to a temporary directory.
#
# usage: run_qemu_vfio.sh x86_64|ppc64|x86_64-agent|x86_64-restart|x86_64-survive|ppc64-survive [--agent=PATH] [--vmm=PATH] [--keep]
#   --keep                  keep the work directory (guest binary, initramfs, console log)
#   --agent, --vmm          x86_64-agent: the dmapin-agent and vfio_test_vmm binaries (Bazel
#                           passes them; by hand the default is bazel-bin's, so build
#                           //agent:dmapin-agent //tests/qemu_vfio:vfio_test_vmm first)
#   DMAPIN_QEMU_TIMEOUT     seconds for the whole QEMU run (default 300)
#   DMAPIN_QEMU_KERNEL      a kernel release to use instead of the newest installed one
set -euo pipefail

ARCH="${1:-}"
KEEP=0
AGENT_BIN=""
VMM_BIN=""
for arg in "${@:2}"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    --agent=*) AGENT_BIN="${arg#--agent=}" ;;
    --vmm=*) VMM_BIN="${arg#--vmm=}" ;;
    *)
      echo "usage: $0 x86_64|ppc64|x86_64-agent|x86_64-restart|x86_64-survive|ppc64-survive [--agent=PATH] [--vmm=PATH] [--keep]" >&2
      exit 2
      ;;
  esac
done
TIMEOUT="${DMAPIN_QEMU_TIMEOUT:-300}"

say() { echo "qemu_vfio[$ARCH]: $*"; }
die() {
  echo "qemu_vfio[$ARCH]: FAIL: $*" >&2
  exit 1
}

# The sources: the checkout this script lives in (under Bazel the runfiles entry is a symlink into
# it). The test's data, the host build of vfio_guest_test, makes Bazel re-run the test whenever a
# source the guest program includes changes.
SRC="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)"
[[ -f "$SRC/agent/vfio/vfio_container.cc" ]] || die "sources not found under $SRC"

case "$ARCH" in
  x86_64 | x86_64-agent | x86_64-restart | x86_64-survive)
    CXX=g++
    CXX_PKG=g++
    LIBDIR=/usr/lib/x86_64-linux-gnu
    ABSL_PKG=libabsl-dev
    QEMU=qemu-system-x86_64
    QEMU_PKG=qemu-system-x86
    KERNEL_GLOB='/boot/vmlinuz-*-amd64'
    KERNEL_PKG=linux-image-amd64
    MODE=type1
    [[ "$ARCH" == x86_64-agent ]] && MODE=agent
    [[ "$ARCH" == x86_64-restart ]] && MODE=restart
    [[ "$ARCH" == x86_64-survive ]] && MODE=survive
    MODULES=(vfio-pci vfio_iommu_type1)
    ;;
  ppc64 | ppc64-survive)
    CXX=powerpc64le-linux-gnu-g++
    CXX_PKG=g++-powerpc64le-linux-gnu
    LIBDIR=/usr/lib/powerpc64le-linux-gnu
    ABSL_PKG="libabsl-dev:ppc64el (needs 'dpkg --add-architecture ppc64el')"
    QEMU=qemu-system-ppc64
    QEMU_PKG=qemu-system-ppc
    KERNEL_GLOB='/boot/vmlinux-*-powerpc64le-64k'
    KERNEL_PKG="linux-image-powerpc64le-64k:ppc64el (6.12, from bookworm-backports; Debian 12's own ppc64el 6.1 kernel cannot bind vfio-pci on pseries)"
    MODE=spapr
    [[ "$ARCH" == ppc64-survive ]] && MODE=spapr-survive
    MODULES=(vfio-pci vfio_iommu_spapr_tce)
    ;;
  *)
    echo "usage: $0 x86_64|ppc64|x86_64-agent|x86_64-restart|x86_64-survive|ppc64-survive [--agent=PATH] [--vmm=PATH] [--keep]" >&2
    exit 2
    ;;
esac

# --- What this needs (installed by ./run setup) -------------------------------------------------
need_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package $2"
}
need_cmd "$CXX" "$CXX_PKG"
need_cmd "$QEMU" "$QEMU_PKG"
need_cmd cpio cpio
need_cmd timeout coreutils
[[ -f "$LIBDIR/libabsl_base.a" ]] || die "$LIBDIR/libabsl_base.a not found: install $ABSL_PKG"
[[ -f /usr/include/absl/status/status.h ]] || die "Abseil headers not found: install $ABSL_PKG"

# The kernel: the newest installed one of the flavour whose modules include vfio-pci.
KERNEL=""
KVER=""
if [[ -n "${DMAPIN_QEMU_KERNEL:-}" ]]; then
  KVER="$DMAPIN_QEMU_KERNEL"
  KERNEL="$(compgen -G "${KERNEL_GLOB/\*/$KVER}" | head -n1 || true)"
else
  while read -r candidate; do
    version="${candidate#/boot/vmlinu?-}"
    if [[ -f "/lib/modules/$version/modules.dep" ]]; then
      KERNEL="$candidate"
      KVER="$version"
    fi
  done < <(compgen -G "$KERNEL_GLOB" | sort -V || true)
fi
[[ -n "$KERNEL" && -f "$KERNEL" ]] || die "no kernel matching $KERNEL_GLOB: install $KERNEL_PKG"
MODDIR="/lib/modules/$KVER"
[[ -f "$MODDIR/modules.dep" ]] || die "$MODDIR/modules.dep not found: reinstall $KERNEL_PKG"
if [[ "$ARCH" == ppc64* ]]; then need_cmd xz xz-utils; fi
if [[ "$MODE" == agent || "$MODE" == restart ]]; then
  need_cmd ldd libc-bin
  need_cmd strip binutils
  [[ -n "$AGENT_BIN" ]] || AGENT_BIN="$SRC/bazel-bin/agent/dmapin-agent"
  if [[ -z "$VMM_BIN" && "$MODE" == restart ]]; then
    VMM_BIN="$SRC/bazel-bin/tests/qemu_vfio/restart_vmm"
  fi
  [[ -n "$VMM_BIN" ]] || VMM_BIN="$SRC/bazel-bin/tests/qemu_vfio/vfio_test_vmm"
  for bin in "$AGENT_BIN" "$VMM_BIN"; do
    [[ -x "$bin" ]] ||
      die "$bin not found: bazel build //agent:dmapin-agent //tests/qemu_vfio:vfio_test_vmm"
  done
  AGENT_BIN="$(readlink -f "$AGENT_BIN")"
  VMM_BIN="$(readlink -f "$VMM_BIN")"
fi

WORK="$(mktemp -d "${TEST_TMPDIR:-${TMPDIR:-/tmp}}/qemu_vfio.XXXXXX")"
cleanup() {
  if [[ $KEEP -eq 1 ]]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
say "kernel $KERNEL, work dir $WORK"

# --- The guest program: the project's real driver and registry sources, statically linked -------
t0=$SECONDS
if [[ "$MODE" == survive ]]; then
  GUEST_SRCS=(
    tests/qemu_vfio/survive_guest.cc
    tests/qemu_vfio/guest_support.cc
    common/errno_status.cc
  )
elif [[ "$MODE" == spapr-survive ]]; then
  GUEST_SRCS=(
    tests/qemu_vfio/survive_spapr_guest.cc
    tests/qemu_vfio/guest_support.cc
    common/errno_status.cc
  )
elif [[ "$MODE" == agent ]]; then
  GUEST_SRCS=(
    tests/qemu_vfio/agent_guest_test.cc
    tests/qemu_vfio/guest_support.cc
    common/errno_status.cc
  )
elif [[ "$MODE" == restart ]]; then
  GUEST_SRCS=(
    tests/qemu_vfio/restart_guest_test.cc
    tests/qemu_vfio/guest_support.cc
    common/errno_status.cc
  )
else
  GUEST_SRCS=(
    tests/qemu_vfio/vfio_guest_test.cc
    tests/qemu_vfio/guest_support.cc
    agent/vfio/vfio_container.cc
    agent/vfio/vfio_kernel.cc
    agent/vfio/vfio_detect.cc
    common/errno_status.cc
    agent/registry/registry.cc
    agent/registry/epoch.cc
    agent/registry/sim_backend.cc
  )
fi
mkdir -p "$WORK/root/modules"
(
  cd "$SRC"
  # getaddrinfo & co. are not used; silence glibc's static-linking notes about them.
  "$CXX" -std=c++17 -O1 -Wall -Werror -static -pthread -I. -o "$WORK/root/init" "${GUEST_SRCS[@]}" \
    -Wl,--start-group "$LIBDIR"/libabsl_*.a -Wl,--end-group 2>&1 |
    { grep -v -e "statically linked applications requires at runtime" -e "in function" || true; }
  exit "${PIPESTATUS[0]}"
) || die "building the guest program with $CXX failed"
say "guest program built in $((SECONDS - t0)) s ($(stat -c %s "$WORK/root/init") bytes)"

# --- Modules and their dependencies, from the guest kernel's modules.dep -------------------------
# Prints the modules.dep line of module $1 ("-" and "_" are the same in module names).
dep_line() {
  local want="${1//-/_}"
  awk -v want="$want" -F: '{
    n = $1; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n); gsub(/-/, "_", n)
    if (n == want) { print; exit }
  }' "$MODDIR/modules.dep"
}
ORDERED=()
add_module() {  # $1: path relative to $MODDIR; dependencies first
  local path="$1" line dep deps=() i
  for i in "${ORDERED[@]}"; do [[ "$i" == "$path" ]] && return 0; done
  line="$(awk -v p="$path" -F: '$1 == p { print; exit }' "$MODDIR/modules.dep")"
  read -r -a deps <<<"${line#*:}"
  # modules.dep lists a module's dependencies with the deepest last: load from the end.
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do add_module "${deps[$i]}"; done
  ORDERED+=("$path")
}
for module in "${MODULES[@]}"; do
  line="$(dep_line "$module")"
  [[ -n "$line" ]] || die "module $module not in $MODDIR/modules.dep (kernel $KVER)"
  add_module "${line%%:*}"
done
n=0
names=()
for path in "${ORDERED[@]}"; do
  base="$(basename "$path")"
  dest="$WORK/root/modules/$(printf '%02d' "$n")-${base%%.ko*}.ko"
  case "$path" in
    *.ko) cp "$MODDIR/$path" "$dest" ;;
    *.ko.xz) xz -dc "$MODDIR/$path" >"$dest" ;;
    *.ko.zst) need_cmd zstd zstd && zstd -qdc "$MODDIR/$path" >"$dest" ;;
    *) die "unknown module format: $path" ;;
  esac
  names+=("${base%%.ko*}")
  n=$((n + 1))
done
say "modules: ${names[*]}"

# --- x86_64-agent: the agent and the VMM, dynamically linked, with what ldd says they load -------
# The guest runs Debian's amd64 kernel, the host's userland ABI: the host's own libraries work
# there unchanged. Copies only are stripped.
if [[ "$MODE" == agent || "$MODE" == restart ]]; then
  t0=$SECONDS
  mkdir -p "$WORK/root/bin"
  cp "$AGENT_BIN" "$WORK/root/bin/dmapin-agent"
  cp "$VMM_BIN" "$WORK/root/bin/vfio-test-vmm"
  libs=()
  while read -r lib; do libs+=("$lib"); done < <(
    for bin in "$AGENT_BIN" "$VMM_BIN"; do
      ldd "$bin" || die "ldd $bin failed"
    done | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | LC_ALL=C sort -u)
  for lib in "${libs[@]}"; do
    [[ -f "$lib" ]] || die "$lib (from ldd) not found"
    mkdir -p "$WORK/root$(dirname "$lib")"
    cp -L "$lib" "$WORK/root$lib"  # the file itself, under the name the loader asks for
  done
  [[ -f "$WORK/root/lib64/ld-linux-x86-64.so.2" ]] || die "ldd named no /lib64/ld-linux-x86-64.so.2"
  payload=()
  for dir in bin lib lib64 usr; do [[ -d "$WORK/root/$dir" ]] && payload+=("$WORK/root/$dir"); done
  chmod -R u+w "${payload[@]}"
  before=$(du -sb "$WORK/root" | cut -f1)
  find "${payload[@]}" -type f -print0 | xargs -0 strip --strip-unneeded || die "strip failed"
  after=$(du -sb "$WORK/root" | cut -f1)
  say "agent and VMM: ${#libs[@]} libraries; guest root $((before >> 20)) MiB," \
    "$((after >> 20)) MiB stripped; in $((SECONDS - t0)) s"
fi
(cd "$WORK/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$WORK/initrd" ||
  die "cpio failed"

# --- Boot ---------------------------------------------------------------------------------------
case "$ARCH" in
  x86_64-survive)
    # One edu; see survive_guest.cc and SURVIVE.md.
    QEMU_ARGS=(-accel tcg -machine q35,kernel-irqchip=split -cpu max -smp 1 -m 512
      -device intel-iommu,intremap=on,caching-mode=on
      -device edu
      -kernel "$KERNEL" -initrd "$WORK/initrd"
      -append "console=ttyS0 intel_iommu=on panic=-1 quiet dmapin_mode=$MODE")
    ;;
  x86_64-agent | x86_64-restart)
    # One edu; room for the agent's and the VMM's libraries (unpacked into RAM) and their memory.
    QEMU_ARGS=(-accel tcg -machine q35,kernel-irqchip=split -cpu max -smp 1 -m 1024
      -device intel-iommu,intremap=on,caching-mode=on
      -device edu
      -kernel "$KERNEL" -initrd "$WORK/initrd"
      -append "console=ttyS0 intel_iommu=on panic=-1 quiet dmapin_mode=$MODE")
    ;;
  x86_64)
    QEMU_ARGS=(-accel tcg -machine q35,kernel-irqchip=split -cpu max -smp 1 -m 512
      -device intel-iommu,intremap=on,caching-mode=on
      -device edu -device edu
      -kernel "$KERNEL" -initrd "$WORK/initrd"
      -append "console=ttyS0 intel_iommu=on panic=-1 quiet dmapin_mode=$MODE")
    ;;
  ppc64)
    # Each edu on its own PCI host bridge: its own IOMMU group (on the default bridge it would
    # share one with the VGA and USB devices).
    QEMU_ARGS=(-machine pseries -smp 1 -m 1G
      -device spapr-pci-host-bridge,index=1,id=phb1 -device edu,bus=phb1.0
      -device spapr-pci-host-bridge,index=2,id=phb2 -device edu,bus=phb2.0
      -kernel "$KERNEL" -initrd "$WORK/initrd"
      -append "console=hvc0 panic=-1 quiet dmapin_mode=$MODE")
    ;;
  ppc64-survive)
    # One edu on its own PCI host bridge; see survive_spapr_guest.cc and SURVIVE.md.
    QEMU_ARGS=(-machine pseries -smp 1 -m 1G
      -device spapr-pci-host-bridge,index=1,id=phb1 -device edu,bus=phb1.0
      -kernel "$KERNEL" -initrd "$WORK/initrd"
      -append "console=hvc0 panic=-1 quiet dmapin_mode=$MODE")
    ;;
esac
CONSOLE="$WORK/console.log"
say "booting: $QEMU ${QEMU_ARGS[*]}"
start_ns=$(date +%s%N)
timeout --kill-after=10 "$TIMEOUT" "$QEMU" -display none -monitor none -serial stdio -no-reboot \
  "${QEMU_ARGS[@]}" </dev/null >"$CONSOLE" 2>"$WORK/qemu.err" &
qemu_pid=$!
boot_ns=""
while kill -0 "$qemu_pid" 2>/dev/null; do
  if [[ -z "$boot_ns" ]] && grep -q "^INFO $MODE start:" "$CONSOLE" 2>/dev/null; then
    boot_ns=$(date +%s%N)
  fi
  sleep 0.2
done
set +e
wait "$qemu_pid"
qemu_rc=$?
set -e
end_ns=$(date +%s%N)
if [[ -z "$boot_ns" ]] && grep -q "^INFO $MODE start:" "$CONSOLE"; then boot_ns=$end_ns; fi

# --- Verdict ------------------------------------------------------------------------------------
tr -d '\r' <"$CONSOLE" >"$CONSOLE.txt"
grep -E "^(PASS|FAIL|INFO|DIFF|OBSERVE|RESULT) " "$CONSOLE.txt" || true
passes=$(grep -c "^PASS " "$CONSOLE.txt" || true)
fails=$(grep -c "^FAIL " "$CONSOLE.txt" || true)
total_s=$(awk -v a="$start_ns" -v b="$end_ns" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
if [[ -n "$boot_ns" ]]; then
  boot_s=$(awk -v a="$start_ns" -v b="$boot_ns" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  test_s=$(awk -v a="$boot_ns" -v b="$end_ns" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  say "timing: boot to /init ${boot_s} s, test and shutdown ${test_s} s, QEMU total ${total_s} s"
else
  say "timing: QEMU ran ${total_s} s; the guest program never started"
fi

problem=""
if [[ $qemu_rc -eq 124 || $qemu_rc -eq 137 ]]; then
  problem="timeout: QEMU still running after ${TIMEOUT} s"
elif [[ $qemu_rc -ne 0 ]]; then
  problem="$QEMU exited with $qemu_rc: $(head -c 2000 "$WORK/qemu.err")"
elif ! grep -q "^DMAPIN-QEMU-VFIO-DONE" "$CONSOLE.txt"; then
  problem="the guest program did not finish (no end marker on the console)"
elif [[ $fails -ne 0 ]]; then
  problem="$fails step(s) FAILED"
elif [[ $passes -eq 0 ]]; then
  problem="no step passed"
fi
if [[ -n "$problem" ]]; then
  echo "----- last 60 console lines -----" >&2
  tail -n 60 "$CONSOLE.txt" >&2
  die "$problem"
fi
say "PASSED: $passes steps, 0 failed ($KVER)"
