#!/usr/bin/env bash
# Try several replicas on one machine: 3 etcd members and 2 replicas on loopback, in one command.
#   bash deploy/try-cluster.sh           # replicas on 127.0.0.1:50051 and 127.0.0.1:50052
# Create on one, validate on the other, revoke on either (grpcurl examples in the README). Ctrl-C
# stops everything; the data lives in a temporary directory and goes with it.
# etcd: $ETCD_BIN, `etcd` on the PATH, or the static etcd 3.7.2 of the etcd-bin-vendored crate
# (fetched by `cargo fetch`, as the tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
etcd=${ETCD_BIN:-$(command -v etcd || true)}
if [ -z "$etcd" ]; then
  cargo fetch --quiet
  case "$(uname -m)" in
    x86_64) platform=linux-amd64 ;;
    aarch64) platform=linux-arm64 ;;
    *) platform=unknown ;;
  esac
  etcd=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path "*etcd-bin-vendored-$platform-*/bin/etcd" | head -n1)
fi
[ -x "$etcd" ] || { echo "no etcd binary found; set ETCD_BIN" >&2; exit 1; }
cargo build --release --quiet --bin session-authority
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

peers="m0=http://127.0.0.1:12380,m1=http://127.0.0.1:22380,m2=http://127.0.0.1:32380"
for i in 0 1 2; do
  client="http://127.0.0.1:$((i + 1))2379"
  peer="http://127.0.0.1:$((i + 1))2380"
  "$etcd" --name "m$i" --data-dir "$work/m$i" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$peers" --initial-cluster-token try-cluster --initial-cluster-state new \
    --auto-compaction-mode periodic --auto-compaction-retention 1h \
    --log-level error >"$work/m$i.log" 2>&1 &
  pids+=($!)
done
endpoints="http://127.0.0.1:12379,http://127.0.0.1:22379,http://127.0.0.1:32379"
for port in 50051 50052; do
  target/release/session-authority --listen "127.0.0.1:$port" \
    --store etcd --etcd-endpoints "$endpoints" --etcd-prefix /try/ &
  pids+=($!)
done
echo "etcd: $endpoints"
echo "replicas: 127.0.0.1:50051 and 127.0.0.1:50052 (Ctrl-C stops everything)"
wait
