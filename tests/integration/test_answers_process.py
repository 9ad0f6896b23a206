"""Answers through a real `gateway serve`: a streamed answer's head reaches the client before its first piece.

The client hop holds a response head until the body's first write, so that both go in one send
(gateway/client_h1.py); it must never hold it for the app. Here the upstream sends its head at once and its
first piece a second later (server-sent events, a long poll, a slow report): the client has the status line
within a fraction of that second, and a small answer still arrives whole. A stream with no end (server-sent
events) ends upstream when its client leaves: uvicorn drops what is sent to a client that is gone without a word,
so the gateway used to read such a stream on for as long as the upstream sent it, holding its connection.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from support.servers import GatewayProcess, start_gateway

GAP = 1.0  # seconds between the upstream's head and its first piece
ENDLESS_ENDED = threading.Event()  # the endless stream's upstream found its connection closed


class _Streaming(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request_line = self.rfile.readline()
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            pass  # the head, read to its end: the requests here have no body
        if not line:
            return
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.wfile.flush()
        if request_line.startswith(b"GET /endless "):
            self._endless()
            return
        time.sleep(GAP)
        self.wfile.write(b"c\r\ndata: hello\n\r\n0\r\n\r\n")
        self.wfile.flush()

    def _endless(self) -> None:
        """An event every 50 ms, for 20 s at most (bounded), until the connection is closed."""
        try:
            for _ in range(400):
                self.wfile.write(b"8\r\ndata: x\n\r\n")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            ENDLESS_ENDED.set()


@pytest.fixture(scope="module", params=["lean", "aiohttp"])
def gateway(request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Streaming)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    config = {
        "server": {"access_log": False, "forwarder": request.param},
        "tokens": {"algorithms": ["HS256"], "secret": "answers-integration-secret-0123456789abcdef"},
        "routes": [
            {
                "name": "events",
                "path": "/",
                "upstream": f"http://127.0.0.1:{upstream.server_address[1]}",
                "auth": "none",
            }
        ],
    }
    try:
        with start_gateway(config, workers=1) as server:
            yield server
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_a_streamed_answers_head_reaches_the_client_before_its_first_piece(gateway: GatewayProcess) -> None:
    address = urlsplit(gateway.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: gw\r\n\r\n")
        first = sock.recv(65536)
        head_after = time.monotonic() - started
        received = first
        while not received.endswith(b"0\r\n\r\n"):
            more = sock.recv(65536)
            assert more, received
            received += more
        whole_after = time.monotonic() - started
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"data: hello" not in first
    assert head_after < GAP / 2 <= GAP * 0.9 <= whole_after
    assert b"text/event-stream" in received and b"data: hello\n" in received


def test_a_stream_ends_upstream_when_its_client_leaves(gateway: GatewayProcess) -> None:
    ENDLESS_ENDED.clear()
    address = urlsplit(gateway.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: gw\r\n\r\n")
        received = b""
        while received.count(b"data: x") < 2:
            more = sock.recv(65536)
            assert more, received
            received += more
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    # The client is gone: the gateway closes the upstream's connection, and the upstream's next writes fail.
    assert ENDLESS_ENDED.wait(5), "the upstream's stream went on after its client left"
    # The gateway goes on serving (the connection it gave up was not returned to its pool half read).
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: gw\r\n\r\n")
        received = b""
        while not received.endswith(b"0\r\n\r\n"):
            more = sock.recv(65536)
            assert more, received
            received += more
    assert b"data: hello\n" in received
