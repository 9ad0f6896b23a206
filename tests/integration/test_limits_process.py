"""Edge limits against a real `gateway serve` (issue "Edge hardening", item 11): header size and count,
the header deadline, the keep-alive idle timeout, the connection cap and a route's body limit.

The upstream is a raw recorder (support.recorder) with no limits of its own, so "the upstream never
saw it" is read from its record, and every 431/413 here can only be the gateway's.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.recorder import Recorder
from support.servers import GatewayProcess, start_gateway
from support.waiting import wait_until

SECRET = "limits-integration-secret-0123456789abcdef"
HEADER_TIMEOUT = 1.5
IDLE_TIMEOUT = 1
SWEEP_SLACK = 1.5  # the deadline is checked by a periodic sweep, plus a loaded test machine
MAX_CONNECTIONS = 4
MAX_BODY = 1000


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    with Recorder() as server:
        yield server


def _config(recorder: Recorder, limits: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"limits": limits, "access_log": False},
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "routes": [
            {"name": "small", "path": "/small/", "upstream": recorder.url, "auth": "none", "max_body": MAX_BODY},
            {"name": "app", "path": "/", "upstream": recorder.url, "auth": "none"},
        ],
    }


@pytest.fixture(scope="module")
def edge(recorder: Recorder) -> Iterator[GatewayProcess]:
    """Default header size and count; short deadlines so that the tests wait little."""
    limits = {"header_timeout": HEADER_TIMEOUT, "idle_timeout": IDLE_TIMEOUT}
    with start_gateway(_config(recorder, limits), workers=1) as server:
        yield server


@pytest.fixture(scope="module")
def capped(recorder: Recorder) -> Iterator[GatewayProcess]:
    with start_gateway(_config(recorder, {"max_connections": MAX_CONNECTIONS}), workers=1) as server:
        yield server


def connect(gateway: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=10)


def send(sock: socket.socket, data: bytes) -> None:
    """Send, ignoring the gateway having closed already (its answer is read next)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response from the socket: status, headers (lower-case names), body."""
    response = http.client.HTTPResponse(sock, method="GET")
    response.begin()
    headers = {name.lower(): value for name, value in response.getheaders()}
    return response.status, headers, response.read()


def get(sock: socket.socket, path: str, extra: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    send(sock, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + extra + b"\r\n")
    return answer(sock)


def reason(body: bytes) -> str:
    return str(json.loads(body)["reason"])


def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the gateway closes the connection (up to ``limit``, else ``inf``) and what it wrote first."""
    started, data = time.monotonic(), b""
    while (elapsed := time.monotonic() - started) < limit:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return elapsed, data
            if not chunk:
                return elapsed, data
            data += chunk
    return float("inf"), data


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- header size and count ---


def test_a_one_megabyte_header_gets_431_and_never_reaches_the_upstream(
    edge: GatewayProcess, recorder: Recorder
) -> None:
    with connect(edge) as sock:
        send(sock, b"GET /big-header HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
        status, headers, body = answer(sock)
        assert (status, reason(body), headers["connection"]) == (431, "headers_too_large", "close")
        assert closed_after(sock, 5)[0] < 5
    assert "/big-header" not in recorder.paths()


def test_a_fifty_megabyte_header_costs_the_gateway_no_memory(edge: GatewayProcess, recorder: Recorder) -> None:
    """On main, one 50 MB header took the gateway from 84 to 307 MB RSS; now it reads about the limit, then stops."""
    assert edge.process is not None
    before = rss_kib(edge.process.pid)
    with connect(edge) as sock:
        send(sock, b"GET /huge-header HTTP/1.1\r\nHost: gw\r\nX-Huge: " + b"a" * 50_000_000 + b"\r\n\r\n")
        closed_after(sock, 10)
    assert rss_kib(edge.process.pid) - before < 16 * 1024
    assert "/huge-header" not in recorder.paths()


def test_five_hundred_headers_get_431_and_never_reach_the_upstream(edge: GatewayProcess, recorder: Recorder) -> None:
    many = b"".join(b"X-H-%d: v\r\n" % i for i in range(500))
    with connect(edge) as sock:
        status, _, body = get(sock, "/many-headers", many)
        assert (status, reason(body)) == (431, "too_many_headers")
    assert "/many-headers" not in recorder.paths()


def test_headers_within_the_defaults_are_forwarded(edge: GatewayProcess, recorder: Recorder) -> None:
    """90 headers and 32 KiB in one of them: under the defaults (100 headers, 64 KiB), so nothing is refused."""
    within = b"".join(b"X-H-%d: v\r\n" % i for i in range(88)) + b"X-Big: " + b"a" * 32_768 + b"\r\n"
    with connect(edge) as sock:
        assert get(sock, "/within-limits", within)[0] == 200
    [seen] = recorder.find("/within-limits")
    assert seen.head_bytes > 32_768


def test_a_fifty_megabyte_trailer_costs_the_gateway_no_memory(edge: GatewayProcess) -> None:
    """Trailer fields after a chunked body are header fields too (llhttp hands them over as headers)."""
    assert edge.process is not None
    before = rss_kib(edge.process.pid)
    with connect(edge) as sock:
        head = b"POST /trailer HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
        send(sock, head + b"X-Huge: " + b"t" * 50_000_000 + b"\r\n\r\n")
        took, written = closed_after(sock, 10)
    assert took < 10 and not written.startswith(b"HTTP/1.1 200")
    assert rss_kib(edge.process.pid) - before < 16 * 1024


# --- deadlines ---


@pytest.mark.parametrize("reused", [False, True], ids=["new-connection", "kept-alive-connection"])
def test_a_head_trickled_slower_than_the_deadline_is_cut(edge: GatewayProcess, reused: bool) -> None:
    """A header line every 0.4 s (each far inside any per-read timeout) never finishes the head: 408, closed."""
    with connect(edge) as sock:
        if reused:
            assert get(sock, "/before-trickle")[0] == 200
        started = time.monotonic()
        send(sock, b"GET /trickle HTTP/1.1\r\nHost: gw\r\n")
        written = b""
        for line in range(40):  # 16 s at most
            elapsed, written = closed_after(sock, 0.4)
            if elapsed != float("inf"):
                break
            send(sock, b"X-Drip-%d: x\r\n" % line)
        took = time.monotonic() - started
    assert HEADER_TIMEOUT - 0.1 <= took <= HEADER_TIMEOUT + SWEEP_SLACK
    assert written.startswith(b"HTTP/1.1 408 ") and b'"reason":"header_timeout"' in written


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(edge: GatewayProcess) -> None:
    with connect(edge) as sock:
        took, written = closed_after(sock, 10)
    assert HEADER_TIMEOUT - 0.1 <= took <= HEADER_TIMEOUT + SWEEP_SLACK
    assert written == b""  # nothing was asked, so nothing is answered


def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(edge: GatewayProcess) -> None:
    with connect(edge) as sock:
        status, headers, _ = get(sock, "/idle")
        assert status == 200 and headers.get("connection") != "close"
        took, written = closed_after(sock, 10)
    assert IDLE_TIMEOUT - 0.1 <= took <= IDLE_TIMEOUT + SWEEP_SLACK
    assert written == b""


# --- connections ---


def test_connections_over_the_cap_get_503_while_existing_ones_keep_working(capped: GatewayProcess) -> None:
    def served() -> list[socket.socket] | None:
        # The harness's own health checks may still be closing on the gateway's side: try again until they are.
        batch = [connect(capped) for _ in range(MAX_CONNECTIONS)]
        if all(get(sock, "/cap")[0] == 200 for sock in batch):
            return batch
        for sock in batch:
            sock.close()
        return None

    batch = wait_until(served, f"{MAX_CONNECTIONS} connections served at once")
    try:
        with connect(capped) as extra:
            status, headers, body = get(extra, "/over-cap")
            assert (status, reason(body), headers["connection"]) == (503, "connection_limit", "close")
            assert headers["retry-after"]
            assert closed_after(extra, 5)[0] < 5
        for sock in batch:  # the connections within the cap are untouched, and stay alive
            status, headers, _ = get(sock, "/cap")
            assert status == 200 and headers.get("connection") != "close"
        batch.pop().close()

        def a_new_one_is_served() -> bool:
            with connect(capped) as sock:
                return get(sock, "/cap")[0] == 200

        wait_until(a_new_one_is_served, "a slot freed by a closed connection is taken by a new one")
    finally:
        for sock in batch:
            sock.close()


# --- request bodies ---


def test_a_content_length_over_the_routes_max_body_gets_413_before_forwarding(
    edge: GatewayProcess, recorder: Recorder
) -> None:
    with connect(edge) as sock:
        send(sock, b"POST /small/declared HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        status, headers, body = answer(sock)
        assert (status, reason(body), headers["connection"]) == (413, "body_too_large", "close")
    assert recorder.find("/small/declared") == []


def test_a_chunked_body_growing_past_max_body_is_cut_with_413(edge: GatewayProcess, recorder: Recorder) -> None:
    chunk = b"%x\r\n%s\r\n" % (600, b"b" * 600)
    with connect(edge) as sock:
        send(sock, b"POST /small/chunked HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3)
        status, headers, body = answer(sock)
        assert (status, reason(body), headers["connection"]) == (413, "body_too_large", "close")
    assert not any(seen.complete for seen in recorder.find("/small/chunked"))


def test_a_body_within_max_body_is_forwarded_whole(edge: GatewayProcess, recorder: Recorder) -> None:
    with connect(edge) as sock:
        send(
            sock, b"POST /small/fits HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (MAX_BODY, b"c" * MAX_BODY)
        )
        assert answer(sock)[0] == 200
    [seen] = recorder.find("/small/fits")
    assert seen.complete and seen.body_bytes == MAX_BODY
