#!/usr/bin/env bash
# Runs the client examples in examples/ against real server processes: the Python scenario (grpcio
# from PyPI, in the .venv this script shares with the README examples) and the Node sidecar.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet --disable-pip-version-check grpcio==1.85.1 grpcio-tools==1.85.1 \
  cryptography==50.0.2

cargo build --quiet --bin session-authority
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$root/target/debug/session-authority" --listen "127.0.0.1:$port" --data-dir "$work/data" >"$work/server.log" 2>&1 &
server_pid=$!
trap 'kill -9 $server_pid 2>/dev/null || true; wait $server_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.1
done

SA_ADDR="127.0.0.1:$port" .venv/bin/python examples/python/scenario.py || {
  echo "--- server log"; cat "$work/server.log"; exit 1; }

# The Node sidecar (grpc-js from npm): it starts and restarts its own server.
(cd examples/node && npm ci --no-audit --no-fund --silent)
SA_BIN="$root/target/debug/session-authority" node examples/node/scenario.js
