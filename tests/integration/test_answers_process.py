"""Answers through a real `gateway serve`: a streamed answer's head reaches the client before its first piece.

The client hop holds a response head until the body's first write, so that both go in one send
(gateway/client_h1.py); it must never hold it for the app. Here the upstream sends its head at once and its
first piece a second later (server-sent events, a long poll, a slow report): the client has the status line
within a fraction of that second, and a small answer still arrives whole.
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


class _Streaming(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            pass  # the head, read to its end: the requests here have no body
        if not line:
            return
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.wfile.flush()
        time.sleep(GAP)
        self.wfile.write(b"c\r\ndata: hello\n\r\n0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Streaming)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    config = {
        "server": {"access_log": False},
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
