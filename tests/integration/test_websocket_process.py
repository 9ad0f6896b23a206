"""WebSocket proxying against real processes: `gateway serve` (2 workers, redis-server), the demo
IdP and the demo upstream's WebSocket echo, driven with the `websockets` client.

Handshakes are authorised like requests (refusals are HTTP statuses), identity headers reach the
upstream, messages and close codes pass both ways, a handshake refresh sets the rotated cookies,
and logout closes the session's sockets in every worker, even after its tokens rotated.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
from support.metrics import metric_value
from support.ports import connection_owner
from support.sealed import refresh_cookie
from support.servers import (
    GatewayProcess,
    IdPProcess,
    ServerProcess,
    set_cookies,
    start_gateway,
    start_idp,
)
from support.workers import worker_pids
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

SECRET = "websocket-tests-hs256-secret-0123456789abcdef"
ACCESS, REFRESH = "gw_access", "gw_refresh"


def config(idp: IdPProcess, upstream: ServerProcess, store_url: str, **websocket: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": False},
        "store": {"url": store_url, "key_prefix": f"gwtest:{os.urandom(4).hex()}:", "secret": "store-secret-for-tests"},
        "tokens": {"algorithms": ["HS256"], "secret": SECRET, "audience": "legacy-app", "leeway": 0},
        "refresh": {
            "endpoint": f"{idp.url}/token",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "client_auth": "basic",
            "grace_period": 10,
        },
        "cookies": {"secure": False},
        "websocket": websocket,
        "routes": [
            {
                "name": "login",
                "path": "/api/token/",
                "upstream": idp.url,
                "auth": "none",
                "capture": {"access": "access", "refresh": "refresh"},
            },
            {
                "name": "admin",
                "path": "/admin/",
                "upstream": upstream.url,
                "require": {"claims": {"roles": "admin"}},
            },
            {"name": "hook", "path": "/hook/", "upstream": upstream.url, "auth": "none", "methods": ["POST"]},
            {"name": "app", "path": "/", "upstream": upstream.url},
        ],
    }


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    with start_gateway(config(idp, upstream, redis_url, max_message_size=4 * 1024 * 1024), workers=2) as server:
        yield server


def ws_url(gateway: GatewayProcess, path: str = "/live") -> str:
    return gateway.url.replace("http://", "ws://") + path


def open_socket(gateway: GatewayProcess, path: str = "/live", **headers: str) -> ClientConnection:
    return connect(ws_url(gateway, path), additional_headers=headers, open_timeout=10, max_size=None)


def hello(socket: ClientConnection) -> dict[str, Any]:
    message = json.loads(socket.recv(timeout=5))
    return dict(message["hello"])


def upstream_headers(greeting: dict[str, Any]) -> dict[str, str]:
    return {name: value for name, value in greeting["headers"]}


def bearer(idp: IdPProcess, user: str = "alice", **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {idp.issue(user, claims=claims or None)['access']}"}


def refused(gateway: GatewayProcess, path: str = "/live", **headers: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as caught:
        open_socket(gateway, path, **headers)
    response = caught.value.response
    return response.status_code, json.loads(response.body or b"{}")


def closed_by(socket: ClientConnection, within: float) -> tuple[int, str]:
    """The close code and reason the gateway sent, waiting at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            socket.recv(timeout=max(0.1, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            return exc.rcvd.code, exc.rcvd.reason
        except TimeoutError:
            raise AssertionError(f"socket still open after {within} s") from None


def metric(gateway: GatewayProcess, name: str, **labels: str) -> float:
    """A sample's value summed over workers (gauges carry a pid label each with several workers)."""
    return metric_value(gateway.metrics(), name, **labels)


# --- handshake ------------------------------------------------------------------------------


def test_the_upstream_handshake_carries_the_clients_host_as_http_requests_do(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    # Issue 14 (18): the upstream got the client library's Host (its own address) on WebSockets,
    # and the client's on HTTP: a virtual-hosted app saw two different sites.
    credentials = bearer(idp, "alice")
    with open_socket(gateway, "/live", **credentials) as ws:
        seen = upstream_headers(hello(ws))
    over_http = httpx.get(f"{gateway.url}/hello", headers=credentials).json()["headers"]
    host = urlsplit(gateway.url).netloc
    assert seen["host"] == host and [v for n, v in over_http if n == "host"] == [host]
    assert [n for n, _ in hello_headers_of(gateway, credentials)].count("host") == 1


def hello_headers_of(gateway: GatewayProcess, credentials: dict[str, str]) -> list[list[str]]:
    with open_socket(gateway, "/live", **credentials) as ws:
        headers: list[list[str]] = hello(ws)["headers"]
    return headers


def test_bearer_socket_relays_text_and_binary_with_identity_headers(gateway: GatewayProcess, idp: IdPProcess) -> None:
    headers = bearer(idp, "alice", email="alice@example.com") | {"X-Auth-User": "mallory", "X-Request-ID": "ws-trace-1"}
    with connect(
        ws_url(gateway, "/live?room=7"), additional_headers=headers, subprotocols=["chat.v2", "chat.v1"], max_size=None
    ) as ws:
        assert ws.subprotocol == "chat.v2"  # the upstream's choice reaches the client
        assert ws.response.headers["x-request-id"] == "ws-trace-1"
        greeting = hello(ws)
        seen = upstream_headers(greeting)
        assert seen["x-auth-user"] == "alice" and seen["x-auth-email"] == "alice@example.com"
        assert [n for n, _ in greeting["headers"]].count("x-auth-user") == 1  # the spoofed one is gone
        assert seen["x-request-id"] == "ws-trace-1" and seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"  # what apps check for https, not "ws"
        assert greeting["path"] == "/live" and greeting["query_string"] == "room=7"
        ws.send("hello, upstream")
        assert ws.recv(timeout=5) == "hello, upstream"
        blob = os.urandom(3 * 1024 * 1024)  # large binary frames, both ways
        ws.send(blob)
        assert ws.recv(timeout=10) == blob


@pytest.mark.parametrize(
    ("path", "headers", "status", "reason"),
    [
        ("/live", {}, 401, "no_token"),
        ("/live", {"Authorization": "Bearer not-a-token"}, 401, "malformed_token"),
        ("/admin/live", "user", 403, "claims_denied"),
        ("/live/../admin/live", "user", 400, "bad_path"),
    ],
)
def test_denied_handshakes_get_the_http_status_of_a_request(
    gateway: GatewayProcess, idp: IdPProcess, path: str, headers: Any, status: int, reason: str
) -> None:
    if headers == "user":
        headers = bearer(idp, "bob", roles=["user"])
    code, body = refused(gateway, path, **headers)
    assert (code, body.get("reason")) == (status, reason)


def test_a_handshake_on_a_route_that_does_not_allow_get_is_405(gateway: GatewayProcess) -> None:
    # A handshake is a GET: on a POST-only route it reached the upstream, whose answer to that GET came back.
    with pytest.raises(InvalidStatus) as caught:
        open_socket(gateway, "/hook/live")
    response = caught.value.response
    assert (response.status_code, json.loads(response.body or b"{}").get("reason")) == (405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_cross_site_handshake_riding_on_cookies_is_refused(gateway: GatewayProcess, idp: IdPProcess) -> None:
    session = idp.issue("alice")
    cookie = f"{ACCESS}={session['access']}; {REFRESH}={refresh_cookie(session['refresh'], REFRESH)}"
    code, body = refused(gateway, Cookie=cookie, Origin="https://evil.example")
    assert (code, body["reason"]) == (403, "csrf")
    with open_socket(gateway, Cookie=cookie, Origin=gateway.url) as ws:  # same site: fine
        assert upstream_headers(hello(ws))["x-auth-user"] == "alice"


def test_a_handshake_with_a_refresh_cookie_the_gateway_did_not_seal_never_reaches_the_idp(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    """Regression (issue 14, item 10): a handshake's junk refresh cookie used to be redeemed at the IdP."""
    expired = idp.issue("alice", access_ttl=-60)
    before = idp.stats()["refresh_calls"]
    for junk in ["junk", expired["refresh"]]:  # made up, or a raw token (a cookie set before sealing)
        code, body = refused(gateway, Cookie=f"{ACCESS}={expired['access']}; {REFRESH}={junk}", Origin=gateway.url)
        assert (code, body["reason"]) == (401, "token_expired")
        code, body = refused(gateway, Cookie=f"{REFRESH}={junk}", Origin=gateway.url)
        assert (code, body["reason"]) == (401, "no_token")
    assert idp.stats()["refresh_calls"] == before
    sealed = f"{ACCESS}={expired['access']}; {REFRESH}={refresh_cookie(expired['refresh'], REFRESH)}"
    with open_socket(gateway, Cookie=sealed, Origin=gateway.url) as ws:  # the gateway's own cookie refreshes
        assert upstream_headers(hello(ws))["x-auth-user"] == "alice"
    assert idp.stats()["refresh_calls"] == before + 1


def test_upstream_refusal_passes_through_as_its_status(gateway: GatewayProcess, idp: IdPProcess) -> None:
    code, body = refused(gateway, "/_ws_refuse/404", **bearer(idp))
    assert (code, body) == (404, {"refused": 404})


def test_upstream_redirects_are_answered_not_followed(gateway: GatewayProcess, idp: IdPProcess) -> None:
    """Following one would take the identity headers wherever the upstream points."""
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    # A raw handshake (a WebSocket client library would follow the redirect itself).
    response = httpx.get(f"{gateway.url}/_ws_redirect", headers=handshake | bearer(idp))
    assert response.status_code == 302  # had the gateway followed it, this would be 101
    assert response.headers["location"].endswith("/_ws_landing")


def test_internal_endpoints_take_no_websockets(gateway: GatewayProcess, idp: IdPProcess) -> None:
    code, body = refused(gateway, "/.gateway/metrics", **bearer(idp))
    assert (code, body["reason"]) == (404, "no_route")


def test_handshake_refresh_sets_the_rotated_cookies(gateway: GatewayProcess, idp: IdPProcess) -> None:
    session = idp.issue("alice", access_ttl=-30)  # the access token expired half a minute ago
    before = idp.stats()["refresh_calls"]
    cookie = f"{ACCESS}={session['access']}; {REFRESH}={refresh_cookie(session['refresh'], REFRESH)}"
    with open_socket(gateway, Cookie=cookie, Origin=gateway.url) as ws:
        rotated = {c.split("=", 1)[0] for c in ws.response.headers.get_all("set-cookie")}
        assert rotated == {ACCESS, REFRESH}
        assert upstream_headers(hello(ws))["x-auth-user"] == "alice"
    assert idp.stats()["refresh_calls"] == before + 1


# --- relay and close codes ------------------------------------------------------------------


def test_upstream_close_code_and_reason_reach_the_client(gateway: GatewayProcess, idp: IdPProcess) -> None:
    with open_socket(gateway, **bearer(idp)) as ws:
        hello(ws)
        ws.send("close 4000 see you")
        assert closed_by(ws, within=5) == (4000, "see you")


def test_client_close_code_and_reason_reach_the_upstream(
    gateway: GatewayProcess, idp: IdPProcess, upstream: ServerProcess
) -> None:
    with open_socket(gateway, **bearer(idp)) as ws:
        hello(ws)
        ws.close(4002, "tab closed")
    deadline = time.monotonic() + 5
    while [4002, "tab closed"] not in httpx.get(f"{upstream.url}/_ws_closes").json():
        assert time.monotonic() < deadline, "the upstream never saw the client's close"
        time.sleep(0.1)


def test_client_close_is_counted_and_frees_the_socket(gateway: GatewayProcess, idp: IdPProcess) -> None:
    before = metric(gateway, "gateway_websocket_closed_total", by="client")
    with open_socket(gateway, **bearer(idp)) as ws:
        hello(ws)
        deadline = time.monotonic() + 5  # other workers' numbers are snapshots, a second old at most
        while metric(gateway, "gateway_websocket_connections") < 1:
            assert time.monotonic() < deadline, "the open socket is not in gateway_websocket_connections"
            time.sleep(0.2)
        ws.close(4001, "leaving")
    deadline = time.monotonic() + 5
    while metric(gateway, "gateway_websocket_closed_total", by="client") < before + 1:
        assert time.monotonic() < deadline, "the gateway did not see the client's close"
        time.sleep(0.2)


# --- session end --------------------------------------------------------------------------


def log_in(gateway: GatewayProcess) -> tuple[str, str]:
    response = httpx.post(f"{gateway.url}/api/token/", json={"username": "alice", "password": "alice"})
    assert response.status_code == 200, response.text
    jar = set_cookies(response)
    return jar[ACCESS].value, jar[REFRESH].value


def log_out(gateway: GatewayProcess, access: str, refresh: str) -> None:
    cookie = f"{ACCESS}={access}; {REFRESH}={refresh}"
    response = httpx.post(f"{gateway.url}/.gateway/logout", headers={"Cookie": cookie, "Origin": gateway.url})
    assert response.status_code == 204


def test_logout_closes_the_sessions_sockets_in_every_worker(gateway: GatewayProcess, idp: IdPProcess) -> None:
    access, refresh = log_in(gateway)
    cookie = f"{ACCESS}={access}; {REFRESH}={refresh}"
    workers = set(worker_pids(gateway, gateway.workers))
    with contextlib.ExitStack() as stack:
        sockets: list[ClientConnection] = []
        held_by: set[int | None] = set()  # which worker holds each socket, read from /proc
        while len(sockets) < 4 or not workers <= held_by:  # four at least, and one in each worker
            assert len(sockets) < 40, f"the session's sockets never reached every worker: {held_by} of {workers}"
            sockets.append(stack.enter_context(open_socket(gateway, Cookie=cookie, Origin=gateway.url)))
            held_by.add(connection_owner(gateway.port, sockets[-1].socket.getsockname()[1], workers))
        bystander = stack.enter_context(open_socket(gateway, **bearer(idp, "carol")))
        for ws in [*sockets, bystander]:
            hello(ws)
        started = time.monotonic()
        log_out(gateway, access, refresh)
        for ws in sockets:
            assert closed_by(ws, within=5) == (4401, "session ended")
        assert time.monotonic() - started < 5
        bystander.send("still here")  # another session's socket stays open
        assert bystander.recv(timeout=5) == "still here"


def test_logout_after_rotation_closes_a_socket_opened_before_it(gateway: GatewayProcess, idp: IdPProcess) -> None:
    access, refresh = log_in(gateway)
    with open_socket(gateway, Cookie=f"{ACCESS}={access}; {REFRESH}={refresh}", Origin=gateway.url) as ws:
        hello(ws)
        # The page goes on with an expired access token: the gateway rotates the refresh token.
        claims = jwt.decode(access, SECRET, algorithms=["HS256"], audience="legacy-app")
        expired = jwt.encode(claims | {"exp": int(time.time()) - 60}, SECRET, algorithm="HS256")
        rotated = httpx.get(f"{gateway.url}/page", headers={"Cookie": f"{ACCESS}={expired}; {REFRESH}={refresh}"})
        assert rotated.status_code == 200
        jar = set_cookies(rotated)
        assert jar[REFRESH].value != refresh
        log_out(gateway, jar[ACCESS].value, jar[REFRESH].value)  # logout presents only the new tokens
        assert closed_by(ws, within=5) == (4401, "session ended")


def test_logout_with_a_bearer_token_closes_the_sockets_opened_with_it(gateway: GatewayProcess, idp: IdPProcess) -> None:
    token = idp.issue("erin")["access"]
    with open_socket(gateway, Authorization=f"Bearer {token}") as ws:
        hello(ws)
        response = httpx.post(f"{gateway.url}/.gateway/logout", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 204
        assert closed_by(ws, within=5) == (4401, "session ended")


def test_a_stolen_access_token_with_a_junk_refresh_cookie_still_closes_at_logout(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    """What ends a socket comes from its verified access token, never from the unchecked refresh cookie."""
    access, refresh = log_in(gateway)
    stolen = f"{ACCESS}={access}; {REFRESH}=junk-{os.urandom(8).hex()}"
    with open_socket(gateway, Cookie=stolen, Origin=gateway.url) as ws:
        hello(ws)
        log_out(gateway, access, refresh)  # the real user logs out
        assert closed_by(ws, within=5) == (4401, "session ended")


def test_refresh_token_reuse_closes_the_sessions_sockets(gateway: GatewayProcess, idp: IdPProcess) -> None:
    """A superseded refresh token replayed after the grace period ends the session: its sockets close too."""
    session = idp.issue("frank", access_ttl=-30)
    old = f"{ACCESS}={session['access']}; {REFRESH}={refresh_cookie(session['refresh'], REFRESH)}"
    with open_socket(gateway, Cookie=old, Origin=gateway.url) as ws:  # refreshed at the handshake
        hello(ws)
        jar = {c.split("=", 1)[0]: c.split("=", 1)[1].split(";")[0] for c in ws.response.headers.get_all("set-cookie")}
        new = f"{ACCESS}={jar[ACCESS]}; {REFRESH}={jar[REFRESH]}"
        with open_socket(gateway, Cookie=new, Origin=gateway.url) as second:
            hello(second)
            # An attacker replays the old refresh token once the grace period (10 s here) is over.
            time.sleep(10.5)
            replay = httpx.get(f"{gateway.url}/page", headers={"Cookie": old})
            assert replay.status_code == 401
            assert closed_by(ws, within=5) == (4401, "session ended")
            assert closed_by(second, within=5) == (4401, "session ended")


# --- limits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict(idp: IdPProcess, upstream: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    limits = {"close_on_expiry": True, "max_connections": 3, "idle_timeout": 2, "max_message_size": 2048}
    with start_gateway(config(idp, upstream, redis_url, **limits), workers=1) as server:
        yield server


def short_lived(seconds: int, user: str = "dora") -> dict[str, str]:
    claims = {"sub": user, "aud": "legacy-app", "exp": int(time.time()) + seconds}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


def test_close_on_expiry_closes_when_the_handshake_token_expires(strict: GatewayProcess) -> None:
    with open_socket(strict, **short_lived(3)) as ws:
        hello(ws)
        deadline = time.monotonic() + 8
        with pytest.raises(ConnectionClosed) as closed:
            while time.monotonic() < deadline:  # kept busy: the expiry, not the idle timeout, ends it
                ws.send("tick")
                assert ws.recv(timeout=5) == "tick"
                time.sleep(0.3)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "token expired")


def test_idle_sockets_are_closed(strict: GatewayProcess) -> None:
    with open_socket(strict, **short_lived(600)) as ws:
        hello(ws)
        assert closed_by(ws, within=6) == (1001, "idle timeout")


def test_messages_over_the_limit_close_the_socket(strict: GatewayProcess) -> None:
    with open_socket(strict, **short_lived(600)) as ws:
        hello(ws)
        ws.send("x" * 1000)
        assert ws.recv(timeout=5) == "x" * 1000
        ws.send("x" * 4096)
        code, _ = closed_by(ws, within=5)
        assert code == 1009


def test_connections_over_the_limit_are_refused_with_503(strict: GatewayProcess) -> None:
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(open_socket(strict, **short_lived(600)))
        code, body = refused(strict, **short_lived(600))
        assert (code, body["reason"]) == (503, "websocket_limit")
    deadline = time.monotonic() + 5
    while True:  # a freed slot is usable again
        try:
            with open_socket(strict, **short_lived(600)) as ws:
                hello(ws)
            break
        except InvalidStatus:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_client_that_stops_reading_does_not_hold_its_slot(strict: GatewayProcess) -> None:
    """Ended while the gateway is blocked writing to it, the socket still gives its slot back."""
    before = metric(strict, "gateway_websocket_closed_total")
    host, port = strict.url.removeprefix("http://").split(":")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills at once
    raw.connect((host, int(port)))
    token = short_lived(4)["Authorization"]
    raw.sendall(
        f"GET /live HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: {token}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(1)  # byte by byte: nothing after the handshake is read
    assert head.startswith(b"HTTP/1.1 101")
    frame = b"\x81\xfe" + (2000).to_bytes(2, "big") + b"\x00\x00\x00\x00" + b"y" * 2000  # masked, zero key
    try:
        raw.settimeout(5)
        for _ in range(2000):  # echoed back into a client that reads nothing: the gateway's sends block
            raw.sendall(frame)
    except (TimeoutError, OSError):
        pass  # the gateway stopped reading us too: backpressure both ways
    try:
        # The token expires (close_on_expiry) while the gateway is stuck in a send to this client.
        deadline = time.monotonic() + 15
        while metric(strict, "gateway_websocket_closed_total") < before + 1:
            assert time.monotonic() < deadline, "the stalled socket was never let go"
            time.sleep(0.5)
        assert metric(strict, "gateway_websocket_connections") == 0
    finally:
        raw.close()
