"""A Python service using session-authority: log in, check, list, rotate, log out, and watch the
event stream, asserting every reply; then a device-bound session (DBSC-style) refreshed with a
proof signed by a real P-256 key pair. Run against a server:

    python -m venv .venv && .venv/bin/pip install grpcio grpcio-tools cryptography
    SA_ADDR=localhost:50051 .venv/bin/python examples/python/scenario.py
"""

import base64
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def generate_stubs() -> pathlib.Path:
    """Generates the Python stubs from proto/ (no checked-in generated code to go stale)."""
    out = pathlib.Path(tempfile.mkdtemp(prefix="sa-stubs-"))
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    code = protoc.main(
        ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    )
    assert code == 0, "protoc failed"
    sys.path.insert(0, str(out))
    return out


generate_stubs()
from session_authority.v1 import events_pb2, events_pb2_grpc  # noqa: E402
from session_authority.v1 import sessions_pb2, sessions_pb2_grpc  # noqa: E402

passed = 0


def check(condition: bool, what: str) -> None:
    global passed
    if not condition:
        print(f"FAILED: {what}")
        print(f"{passed} passed, 1 failed")
        sys.exit(1)
    passed += 1


def main() -> None:
    channel = grpc.insecure_channel(os.environ.get("SA_ADDR", "localhost:50051"))
    sessions = sessions_pb2_grpc.SessionServiceStub(channel)
    events = events_pb2_grpc.EventServiceStub(channel)

    created = sessions.CreateSession(
        sessions_pb2.CreateSessionRequest(
            tenant_id="python-co",
            user_id="alice",
            device=sessions_pb2.Device(
                ip="198.51.100.7",
                user_agent="python-client",
                location=sessions_pb2.Location(country="GB", city="London", latitude=51.5, longitude=-0.12),
            ),
            attributes={"login_method": "password"},
        )
    )
    check(created.token.startswith("sat_"), "a token with the service's prefix")
    check(created.session.device.location.city == "London", "the device and place are kept")
    check(created.cookie.http_only, "cookie advice comes back")
    session_id = created.session.session_id

    # Watch from just before the creation, in the background.
    seen = []
    done = threading.Event()

    def watch() -> None:
        stream = events.WatchEvents(events_pb2.WatchEventsRequest(after_sequence=created.sequence - 1))
        for item in stream:
            if item.HasField("event"):
                seen.append((item.event.sequence, item.event.WhichOneof("body"), item.event.session_id))
                if item.event.WhichOneof("body") == "revoked":
                    done.set()
                    stream.cancel()
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    valid = sessions.ValidateSession(sessions_pb2.ValidateSessionRequest(token=created.token))
    check(valid.session.session_id == session_id, "the token validates")
    listed = sessions.ListSessions(sessions_pb2.ListSessionsRequest(tenant_id="python-co", user_id="alice"))
    check([s.session_id for s in listed.sessions] == [session_id], "the session is listed")

    rotated = sessions.RotateSession(sessions_pb2.RotateSessionRequest(token=created.token))
    check(rotated.token != created.token, "rotation issues a new token")
    # Within the tenant's rotation_grace_period (10 s by default) the old token still validates, so
    # requests the page sent before it rotated pass; it never rotates again.
    valid = sessions.ValidateSession(sessions_pb2.ValidateSessionRequest(token=created.token))
    check(valid.session.session_id == session_id, "the old token validates within the grace period")
    try:
        sessions.RotateSession(sessions_pb2.RotateSessionRequest(token=created.token))
        check(False, "the old token cannot rotate again")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.UNAUTHENTICATED, "the old token gets UNAUTHENTICATED")
        check(e.details() == "session not valid", "with the one message")

    revoked = sessions.RevokeSession(
        sessions_pb2.RevokeSessionRequest(session_id=session_id, reason=sessions_pb2.REVOKE_REASON_USER_LOGOUT)
    )
    check(revoked.revoked, "the session is revoked")
    try:
        sessions.ValidateSession(sessions_pb2.ValidateSessionRequest(token=rotated.token))
        check(False, "the rotated token is dead after the revoke")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.UNAUTHENTICATED, "the revoked token gets UNAUTHENTICATED")

    check(done.wait(10), "the watcher saw the revocation")
    kinds = [(kind, sid) for _, kind, sid in seen]
    check(
        kinds == [("created", session_id), ("rotated", session_id), ("revoked", session_id)],
        f"events created, rotated, revoked in order: {kinds}",
    )
    sequences = [s for s, _, _ in seen]
    check(sequences == list(range(created.sequence, created.sequence + 3)), "sequences without holes")
    check(sequences[-1] == revoked.sequence, "the revoke reply carries its event's sequence")

    try:
        sessions.CreateSession(sessions_pb2.CreateSessionRequest(tenant_id="", user_id="bob"))
        check(False, "an empty tenant is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, "bad input gets INVALID_ARGUMENT")
        check(e.details().startswith("tenant_id"), "naming the field")

    login_rotation(sessions)
    bound_session(sessions)

    print(f"python client: {passed} passed, 0 failed")


def login_rotation(sessions) -> None:
    """At a login or privilege change, rotate with privilege_change: the token the browser held
    before (perhaps planted by an attacker: session fixation) dies at once, with no grace period."""
    before = sessions.CreateSession(sessions_pb2.CreateSessionRequest(tenant_id="python-co", user_id="carol"))
    logged_in = sessions.RotateSession(
        sessions_pb2.RotateSessionRequest(token=before.token, privilege_change=True)
    )
    try:
        sessions.ValidateSession(sessions_pb2.ValidateSessionRequest(token=before.token))
        check(False, "the token from before the login is dead at once")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.UNAUTHENTICATED, "the pre-login token gets UNAUTHENTICATED")
    valid = sessions.ValidateSession(sessions_pb2.ValidateSessionRequest(token=logged_in.token))
    check(valid.session.session_id == before.session.session_id, "the logged-in token validates")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def dbsc_proof(key: ec.EllipticCurvePrivateKey, challenge: str, session_id: str) -> str:
    """What a DBSC browser sends in Sec-Session-Response: an ES256 JWS over the challenge."""
    header = b64url(json.dumps({"alg": "ES256", "typ": "dbsc+jwt"}).encode())
    payload = b64url(json.dumps({"jti": challenge, "sub": session_id, "iat": int(time.time())}).encode())
    signing_input = f"{header}.{payload}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    # JWS wants the raw r || s (RFC 7518, 3.4), not the DER that the library returns.
    return f"{header}.{payload}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def bound_session(sessions) -> None:
    """A session bound to a device key: the key pair stays with the client (a browser keeps it in
    the TPM); the service gets the public half as a JWK and renews the token only against proofs."""
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    jwk = json.dumps(
        {"kty": "EC", "crv": "P-256", "x": b64url(numbers.x.to_bytes(32, "big")), "y": b64url(numbers.y.to_bytes(32, "big"))}
    )
    created = sessions.CreateSession(
        sessions_pb2.CreateSessionRequest(tenant_id="python-co", user_id="bob", binding_key=jwk)
    )
    session_id = created.session.session_id
    check(created.session.bound, "the session is device-bound")
    check(created.cookie.max_age.seconds == 600, "its cookie lives as long as its token (10 minutes)")

    challenge = sessions.GetBindingChallenge(sessions_pb2.GetBindingChallengeRequest(session_id=session_id))
    proof = dbsc_proof(key, challenge.challenge, session_id)
    refreshed = sessions.RefreshBoundSession(sessions_pb2.RefreshBoundSessionRequest(session_id=session_id, proof=proof))
    check(refreshed.token != created.token, "a refresh issues a new token")
    valid = sessions.ValidateSession(sessions_pb2.ValidateSessionRequest(token=refreshed.token))
    check(valid.session.rotation_count == 1, "the new token validates; the refresh was a rotation")

    # Each refresh carries the next challenge (DBSC's Sec-Session-Challenge on the 200): keep it,
    # and the next refresh is one call.
    again = sessions.RefreshBoundSession(
        sessions_pb2.RefreshBoundSessionRequest(
            session_id=session_id, proof=dbsc_proof(key, refreshed.next_challenge, session_id)
        )
    )
    valid = sessions.ValidateSession(sessions_pb2.ValidateSessionRequest(token=again.token))
    check(valid.session.rotation_count == 2, "the carried challenge refreshes the session again")

    # A thief with the token but not the key: a replayed proof, or one signed by another key.
    thief = ec.generate_private_key(ec.SECP256R1())
    challenge = sessions.GetBindingChallenge(sessions_pb2.GetBindingChallengeRequest(session_id=session_id))
    for what, bad in [("a replayed proof", proof), ("a proof from another key", dbsc_proof(thief, challenge.challenge, session_id))]:
        try:
            sessions.RefreshBoundSession(sessions_pb2.RefreshBoundSessionRequest(session_id=session_id, proof=bad))
            check(False, f"{what} is refused")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNAUTHENTICATED, f"{what} gets UNAUTHENTICATED")


if __name__ == "__main__":
    main()
