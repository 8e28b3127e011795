#!/usr/bin/env bash
# Smoke test of session-bench: every scenario runs for a moment against debug builds, to prove the
# tool works. No thresholds: figures from a debug build on a shared machine mean nothing (the
# figures that count are in BENCHMARKS.md, from release builds). redis-server comes from apt.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server >/dev/null
fi
redis-server --version
cargo build --quiet --bins
bench=target/debug/session-bench
server=target/debug/session-authority
out=$(mktemp)
trap 'rm -f "$out"' EXIT
run() { echo "+ session-bench $*"; "$bench" --server-bin "$server" "$@" | tee -a "$out"; }

run health validate create mixed batch cache fanout \
  --seconds 1 --callers 8 --connections 2 --pool 200 --batch-size 50 \
  --subscribers 1,10 --revokes 10 --redis
run create --seconds 1 --callers 8 --connections 2 --random-users
run health bound --seconds 1 --callers 8 --connections 2 --pool 50
run overload --seconds 2 --callers 64 --pool 100
run soak --minutes 0.1 --rate 50
run scale --sessions 500,2000 --seconds 1 --callers 8
run replay --log-events 3000 --replays 4 --pool 200 --seconds 1 --callers 8
# etcd: the static etcd of the etcd-bin-vendored crate (a dev-dependency, fetched by the tests)
run cluster --seconds 1 --callers 8 --connections 2 --pool 200 --revokes 10
run scale --scale-store etcd --sessions 200,500 --seconds 1 --callers 8

for s in health validate redis-validate create redis-create mixed batch50 cache-hit cache-eviction \
         fanout overload soak scale replay cluster.validate.sled cluster.create.etcd_2_replicas \
         cluster.revoke_to_refused; do
  grep -q "scenario=$s " "$out" || { echo "no line for scenario $s"; exit 1; }
done
grep -q "scenario=scale store=Etcd " "$out" || { echo "no line for scale on etcd"; exit 1; }
grep -q "^compare=validate" "$out" && grep -q "^compare=create" "$out"
echo "bench smoke: every scenario ran"
