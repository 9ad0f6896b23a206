"""What the gateway checked is what the upstream gets, on raw sockets against a real `gateway serve` with each
forwarder, the demo IdP (slow to refresh, so that a request is held in admission) and the echo upstream."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.sealed import refresh_cookie
from support.servers import GatewayProcess, IdPProcess, ServerProcess, start_gateway, start_idp

SECRET = "edge-process-hs256-secret-0123456789abcdef"


class _Canned(socketserver.StreamRequestHandler):
    """Answers each request (bodiless) with ``ANSWERS[path]``, keeping the connection."""

    def handle(self) -> None:
        while request_line := self.rfile.readline():
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            self.wfile.write(ANSWERS[request_line.split(b" ")[1]])
            self.wfile.flush()


ANSWERS = {
    b"/canned/not-modified": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n',
    b"/canned/no-content": b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
    b"/canned/switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"/canned/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.fixture(scope="module")
def canned() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Canned)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(secret=SECRET) as server:
        server.behaviour(latency=1.0)  # a refresh holds its request in admission this long
        yield server


@pytest.fixture(scope="module", params=["lean", "aiohttp"])
def gateway(
    idp: IdPProcess, upstream: ServerProcess, canned: str, request: pytest.FixtureRequest
) -> Iterator[GatewayProcess]:
    config: dict[str, Any] = {
        "server": {"forwarder": request.param, "access_log": False},
        "store": {"url": "memory://", "secret": "store-secret-for-tests"},
        "tokens": {"algorithms": ["HS256"], "secret": SECRET, "audience": "legacy-app", "leeway": 0},
        "refresh": {
            "endpoint": f"{idp.url}/token",
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
            "client_auth": "basic",
        },
        "cookies": {"secure": False},
        "routes": [
            {"name": "canned", "path": "/canned/", "upstream": canned, "auth": "none"},
            {"name": "app", "path": "/", "upstream": upstream.url},
        ],
    }
    with start_gateway(config, workers=1) as server:
        yield server


def expired_session_cookie(idp: IdPProcess) -> bytes:
    session = idp.issue("alice", access_ttl=-60)
    return f"gw_access={session['access']}; gw_refresh={refresh_cookie(session['refresh'], 'gw_refresh')}".encode()


def exchange(gateway: GatewayProcess, *parts: bytes, pause: float = 0.3) -> bytes:
    """Send ``parts`` on one connection, ``pause`` seconds apart; everything the gateway answers until it closes."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
        for number, part in enumerate(parts):
            if number:
                time.sleep(pause)
            conn.sendall(part)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_trailers_sent_while_the_request_is_admitted_never_reach_the_upstream(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    # uvicorn appended a chunked body's trailer fields to the headers the gateway held: a Host that came while the
    # request waited for its refresh went upstream (the last of two Hosts wins) after the routing and the checks.
    head = b"POST /probe HTTP/1.1\r\nHost: gw.example\r\nCookie: " + expired_session_cookie(idp) + b"\r\n"
    head += b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n"
    answer = exchange(gateway, head, b"0\r\nHost: evil.example\r\nX-Trailer-Probe: 1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
    seen = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert [value for name, value in seen["headers"] if name == "host"] == ["gw.example"]
    assert not [name for name, _ in seen["headers"] if name == "x-trailer-probe"]
    assert seen["body_length"] == 3


@pytest.mark.parametrize("path", ["/not-modified", "/no-content"])
def test_a_304_or_204_with_a_content_length_keeps_the_connection(gateway: GatewayProcess, path: str) -> None:
    # A 304's Content-Length is that of the 200 it stands for (RFC 9110 §8.6): the gateway passed it on, uvicorn
    # waited for that much content, failed the answer ("Exception in ASGI application") and cut the connection.
    first = f'GET /canned{path} HTTP/1.1\r\nHost: gw.example\r\nIf-None-Match: "v1"\r\n\r\n'.encode()
    answer = exchange(gateway, first, b"GET /canned/ok HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith({"/not-modified": b"HTTP/1.1 304 ", "/no-content": b"HTTP/1.1 204 "}[path]), answer
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b"\r\n\r\nok"), answer
    assert "Exception in ASGI application" not in gateway.log()


def test_an_upstreams_101_to_a_request_that_asked_for_no_upgrade_is_502(gateway: GatewayProcess) -> None:
    # Passed on, the 101 told the client (or a proxy in front of the gateway, which may then tunnel the connection
    # blindly) that it speaks another protocol now, while the gateway went on reading HTTP from it.
    answer = exchange(gateway, b"GET /canned/switch HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
    assert b"upstream_unreachable" in answer


def test_a_body_behind_an_upgrade_the_gateway_does_not_take_is_never_read_as_a_request(
    gateway: GatewayProcess,
) -> None:
    # llhttp takes no body after "Connection: Upgrade", and the HTTP path ignores an h2c Upgrade: the body that a
    # proxy in front (forwarding Upgrade for WebSockets) sent with its Content-Length was served as the next request.
    smuggled = b"GET /canned/ok HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n"
    head = b"POST /canned/ok HTTP/1.1\r\nHost: gw.example\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
        conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(smuggled))
        first = http.client.HTTPResponse(conn)  # the answer to the head (the body is not sent yet)
        first.begin()
        assert first.status == 400, (first.status, first.read())
        with contextlib.suppress(OSError):  # the body, as the proxy sends it: the gateway has closed, or reads it
            conn.sendall(smuggled)
            assert conn.recv(65536) == b""


@pytest.mark.parametrize("path", ["/canned/ok", "/private"])
def test_an_answer_before_100_continue_ends_the_connection(gateway: GatewayProcess, path: str) -> None:
    # The upstream's early answer (/canned/ok reads no body) or the gateway's own refusal (/private: no token)
    # came before the client was told to send its body. uvicorn kept the connection open and would have read the
    # client's next request as that body: the request lost, or its bytes read as one the client never made.
    head = f"POST {path} HTTP/1.1\r\nHost: gw.example\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=3) as conn:
        conn.sendall(head)
        answer = b""
        with contextlib.suppress(TimeoutError):  # kept open: no end of stream within the timeout
            while chunk := conn.recv(65536):
                answer += chunk
        closed = not chunk if answer else False
    status = {"/canned/ok": b"HTTP/1.1 200 ", "/private": b"HTTP/1.1 401 "}[path]
    assert answer.startswith(status), answer[:300]
    assert b"\r\nconnection: close\r\n" in answer.partition(b"\r\n\r\n")[0].lower() + b"\r\n" and closed, answer[:300]


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity, chunked", b"x-zip,chunked"])
def test_a_body_coded_besides_chunked_is_501_and_the_connection_stays_in_step(
    gateway: GatewayProcess, coding: bytes
) -> None:
    # llhttp takes "gzip, chunked" and undoes the chunked coding only; the gateway sent the body on re-chunked,
    # without the gzip, so the upstream read compressed bytes as the body (RFC 9112 §6.1: a server answers 501).
    post = b"POST /canned/ok HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
    post += b"5\r\nhello\r\n0\r\n\r\n"
    answer = exchange(gateway, post, b"GET /canned/ok HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n")
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 501 ") and b"unsupported_coding" in rest, answer[:300]
    assert rest.count(b"HTTP/1.1 ") == 1 and rest.endswith(b"\r\n\r\nok"), answer  # the body was read as the body


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b" chunked "])
def test_a_chunked_body_goes_through(gateway: GatewayProcess, idp: IdPProcess, coding: bytes) -> None:
    token = idp.issue("alice")["access"].encode()
    post = b"POST /probe HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer " + token + b"\r\n"
    post += b"Transfer-Encoding: " + coding + b"\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    answer = exchange(gateway, post)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["body_length"] == 5


@pytest.mark.parametrize("path", ["/canned/ok", "/private"])
def test_an_answer_to_an_expect_request_with_no_body_owed_keeps_the_connection(
    gateway: GatewayProcess, path: str
) -> None:
    # A client may send Expect: 100-continue with an empty body (botocore does with any file-like body): nothing is
    # owed, what comes next is the next request, and the connection goes on.
    first = f"POST {path} HTTP/1.1\r\nHost: gw.example\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n".encode()
    answer = exchange(gateway, first, b"GET /canned/ok HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n")
    status = {"/canned/ok": b"HTTP/1.1 200 ", "/private": b"HTTP/1.1 401 "}[path]
    assert answer.startswith(status) and b"\r\nconnection: close\r\n" not in answer.lower().split(b"\r\n\r\n")[0]
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == (2 if path == "/canned/ok" else 1), answer
