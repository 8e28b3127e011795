"""A Python service using session-authority: log in, check, list, rotate, log out, and watch the
event stream, asserting every reply. Run against a server:

    python -m venv .venv && .venv/bin/pip install grpcio grpcio-tools
    SA_ADDR=localhost:50051 .venv/bin/python examples/python/scenario.py
"""

import os
import pathlib
import sys
import tempfile
import threading

import grpc
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

    print(f"python client: {passed} passed, 0 failed")


if __name__ == "__main__":
    main()
