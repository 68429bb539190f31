#!/usr/bin/env bash
# Development and test certificates for dmapin's mutual TLS, made with Debian's openssl (EC P-256,
# SHA-256). Not for production: there, cert-manager issues them (deploy/kubernetes/overlays/
# cert-manager).
#
#   make_dev_certs.sh DIR [NODE...]
#       a CA (DIR/ca.pem, ca.key) and, signed by it, valid for 30 days:
#         server.pem/.key   spiffe://dmapin/server      DNS localhost, dmapin-server; IP 127.0.0.1
#         NODE.pem/.key     spiffe://dmapin/node/NODE   DNS localhost; IP 127.0.0.1
#                           (NODE... defaults to node-1 node-2 node-3)
#         admin.pem/.key    spiffe://dmapin/admin/admin
#         viewer.pem/.key   spiffe://dmapin/viewer/viewer
#   make_dev_certs.sh ca DIR NAME
#       a self-signed CA DIR/NAME.pem, DIR/NAME.key
#   make_dev_certs.sh issue DIR CA NAME SAN [START END]
#       DIR/NAME.pem, DIR/NAME.key signed by DIR/CA.pem; SAN in openssl's syntax
#       ("URI:spiffe://dmapin/node/node-1,DNS:localhost,IP:127.0.0.1"); START and END as
#       YYYYMMDDHHMMSSZ (default: now, +30 days), e.g. an expired one: 20200101000000Z
#       20200201000000Z. Every certificate a CA issues gets the next serial (DIR/CA.srl).
set -euo pipefail

die() { echo "make_dev_certs.sh: $*" >&2; exit 2; }

make_ca() {
  local dir="$1" name="$2"
  mkdir -p "$dir"
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$name.key.ec" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$dir/$name.key.ec" -out "$dir/$name.key"
  rm -f "$dir/$name.key.ec"
  openssl req -x509 -new -key "$dir/$name.key" -sha256 -days 365 -subj "/CN=$name" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/$name.pem" 2>/dev/null
  chmod 600 "$dir/$name.key"
}

issue() {
  local dir="$1" ca="$2" name="$3" san="$4" start="${5:-}" end="${6:-}"
  [[ -f "$dir/$ca.pem" && -f "$dir/$ca.key" ]] || die "no CA $dir/$ca.pem"
  local work
  work="$(mktemp -d)"
  # openssl ca keeps its own database; one per CA directory, so serials never repeat.
  local db="$dir/.$ca.db"
  mkdir -p "$db"
  [[ -f "$db/index.txt" ]] || : > "$db/index.txt"
  [[ -f "$db/serial" ]] || openssl rand -hex 8 > "$db/serial"
  cat > "$work/ca.cnf" <<CNF
[ca]
default_ca = dev
[dev]
database = $db/index.txt
serial = $db/serial
new_certs_dir = $work
certificate = $dir/$ca.pem
private_key = $dir/$ca.key
default_md = sha256
default_days = 30
policy = anything
unique_subject = no
copy_extensions = none
[anything]
commonName = supplied
[leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = $san
CNF
  openssl ecparam -name prime256v1 -genkey -noout -out "$work/key.ec" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$work/key.ec" -out "$work/key.pem"
  openssl req -new -key "$work/key.pem" -subj "/CN=$name" -out "$work/req.csr" 2>/dev/null
  local dates=()
  [[ -n "$start" ]] && dates+=(-startdate "$start")
  [[ -n "$end" ]] && dates+=(-enddate "$end")
  openssl ca -batch -notext -config "$work/ca.cnf" -extensions leaf "${dates[@]}" \
    -in "$work/req.csr" -out "$work/cert.pem" 2>"$work/err" || { cat "$work/err" >&2; die "issuing $name failed"; }
  # Replace atomically: a process watching the files never reads half of one.
  install -m 600 "$work/key.pem" "$dir/.$name.key.new"
  install -m 644 "$work/cert.pem" "$dir/.$name.pem.new"
  mv -f "$dir/.$name.key.new" "$dir/$name.key"
  mv -f "$dir/.$name.pem.new" "$dir/$name.pem"
  rm -rf "$work"
}

case "${1:-}" in
  ""|-h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  ca) [[ $# -eq 3 ]] || die "usage: make_dev_certs.sh ca DIR NAME"; make_ca "$2" "$3" ;;
  issue) [[ $# -eq 5 || $# -eq 7 ]] || die "usage: make_dev_certs.sh issue DIR CA NAME SAN [START END]"
    issue "${@:2}" ;;
  *)
    dir="$1"; shift
    nodes=("$@"); [[ ${#nodes[@]} -gt 0 ]] || nodes=(node-1 node-2 node-3)
    make_ca "$dir" ca
    issue "$dir" ca server "URI:spiffe://dmapin/server,DNS:localhost,DNS:dmapin-server,IP:127.0.0.1"
    for node in "${nodes[@]}"; do
      issue "$dir" ca "$node" "URI:spiffe://dmapin/node/$node,DNS:localhost,IP:127.0.0.1"
    done
    issue "$dir" ca admin "URI:spiffe://dmapin/admin/admin"
    issue "$dir" ca viewer "URI:spiffe://dmapin/viewer/viewer"
    echo "make_dev_certs.sh: CA and certificates in $dir (server, ${nodes[*]}, admin, viewer)"
    ;;
esac
