"""`websocket.max_message_size` is the size of a message as sent, decompressed, in both directions, whatever
permessage-deflate does on either hop (issue 17): a real `gateway serve` between the `websockets` client and an
upstream on the `websockets` library that offers permessage-deflate (support.deflating_upstream).

A message of exactly the limit passes, one byte more closes the socket with 1009; text counts UTF-8 bytes. A
compressed frame that inflates past the limit is refused without being inflated whole.
"""

from __future__ import annotations

import json
import os
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.deflating_upstream import DeflatingUpstream, digest, payload
from support.servers import GatewayProcess, start_gateway
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

LIMIT = 64 * 1024
MESSAGES = [
    pytest.param(kind, variant, id=f"{kind}-{variant}")
    for kind in ("binary", "text")
    for variant in ("random", "repeated")
]
COMPRESSION = [pytest.param("deflate", id="deflating-client"), pytest.param(None, id="plain-client")]


@pytest.fixture(scope="module")
def deflating() -> Iterator[DeflatingUpstream]:
    with DeflatingUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(deflating: DeflatingUpstream) -> Iterator[GatewayProcess]:
    config = {
        "server": {"access_log": False},
        "store": {"url": "memory://", "secret": "store-secret-for-size-tests"},
        "tokens": {"algorithms": ["HS256"], "secret": "size-tests-hs256-secret-0123456789abcdef"},
        "websocket": {"max_message_size": LIMIT},
        "routes": [{"name": "app", "path": "/", "upstream": deflating.url, "auth": "none"}],
    }
    with start_gateway(config, workers=1) as server:
        yield server


def open_socket(gateway: GatewayProcess, compression: str | None = "deflate") -> ClientConnection:
    url = gateway.url.replace("http://", "ws://") + "/sizes"
    ws = connect(url, compression=compression, max_size=None, open_timeout=10)
    assert bool(ws.protocol.extensions) == (compression is not None)  # the client hop deflates when asked to
    return ws


def close_code(ws: ClientConnection) -> int | None:
    """The code of the close frame the gateway sent (None: none came), after anything still in flight."""
    deadline = time.monotonic() + 10
    with pytest.raises(ConnectionClosed) as closed:
        while time.monotonic() < deadline:
            ws.recv(timeout=deadline - time.monotonic())
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


@pytest.mark.parametrize("compression", COMPRESSION)
@pytest.mark.parametrize(("kind", "variant"), MESSAGES)
def test_a_message_of_exactly_the_limit_reaches_the_upstream(
    gateway: GatewayProcess, kind: str, variant: str, compression: str | None
) -> None:
    """Regression (issue 17): a deflating client's incompressible message of exactly the limit was refused with
    1009, the limit being applied to the compressed frame (a few bytes longer than the message)."""
    message = payload(kind, variant, LIMIT, seed=1)
    with open_socket(gateway, compression) as ws:
        ws.send(message)
        assert json.loads(ws.recv(timeout=10)) == digest(message)


@pytest.mark.parametrize(("kind", "variant"), MESSAGES)
def test_a_message_of_exactly_the_limit_reaches_the_client(gateway: GatewayProcess, kind: str, variant: str) -> None:
    with open_socket(gateway) as ws:
        ws.send(f"send {kind} {variant} {LIMIT} 2")
        assert ws.recv(timeout=10) == payload(kind, variant, LIMIT, seed=2)


@pytest.mark.parametrize("compression", COMPRESSION)
@pytest.mark.parametrize(("kind", "variant"), MESSAGES)
def test_one_byte_over_the_limit_from_the_client_closes_with_1009(
    gateway: GatewayProcess, kind: str, variant: str, compression: str | None
) -> None:
    with open_socket(gateway, compression) as ws:
        ws.send(payload(kind, variant, LIMIT + 1, seed=3))
        assert close_code(ws) == 1009


@pytest.mark.parametrize(("kind", "variant"), MESSAGES)
def test_one_byte_over_the_limit_from_the_upstream_closes_with_1009(
    gateway: GatewayProcess, kind: str, variant: str
) -> None:
    """Regression (issue 17): the gateway refused the upstream's message but told the client 1014 (bad gateway)."""
    with open_socket(gateway) as ws:
        ws.send(f"send {kind} {variant} {LIMIT + 1} 4")
        assert close_code(ws) == 1009


def peak_rss(pid: int) -> int:
    """Bytes: the process's resident set high-water mark since the last reset_peak_rss."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def test_a_deflate_bomb_is_refused_with_1009_without_being_inflated(gateway: GatewayProcess) -> None:
    """48 MiB of zeros in one compressed frame smaller than the limit: refused with at most a bounded part inflated
    (the whole would raise the gateway's peak memory by 48 MiB)."""
    inflated = 48 * 1024 * 1024
    sock, protocol = handshake_with_deflate(gateway)
    compressor = zlib.compressobj(wbits=-protocol.extensions[0].local_max_window_bits)  # type: ignore[attr-defined]
    zeros = bytes(1024 * 1024)
    bomb = b"".join(compressor.compress(zeros) for _ in range(inflated // len(zeros))) + compressor.flush()
    assert len(bomb) < LIMIT  # it passes any check of the frame's own length
    assert gateway.process is not None
    pid = gateway.process.pid
    reset_peak_rss(pid)
    before = peak_rss(pid)
    # Binary, final, compressed (RSV1); masked with a zero key, which leaves the payload as it is.
    sock.sendall(bytes([0x80 | 0x40 | 0x2, 0x80 | 127]) + len(bomb).to_bytes(8, "big") + bytes(4) + bomb)
    assert received_close(sock, protocol) == 1009
    assert peak_rss(pid) - before < 16 * 1024 * 1024
    sock.close()


def handshake_with_deflate(gateway: GatewayProcess) -> tuple[socket.socket, ClientProtocol]:
    """A socket through the handshake, permessage-deflate agreed; frames are then written by hand."""
    protocol = ClientProtocol(
        parse_uri(gateway.url.replace("http://", "ws://") + "/bomb"), extensions=[ClientPerMessageDeflateFactory()]
    )
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    protocol.send_request(protocol.connect())
    sock.sendall(b"".join(protocol.data_to_send()))
    while protocol.state is State.CONNECTING:
        protocol.receive_data(sock.recv(65536))
    assert protocol.state is State.OPEN and protocol.extensions, protocol.handshake_exc
    return sock, protocol


def received_close(sock: socket.socket, protocol: ClientProtocol) -> int | None:
    events: list[Any] = []
    while protocol.close_rcvd is None:
        data = sock.recv(65536)
        if not data:
            break
        protocol.receive_data(data)
        events += protocol.events_received()
    assert not [e for e in events if isinstance(e, Frame) and e.opcode.name in ("TEXT", "BINARY")]
    return protocol.close_rcvd.code if protocol.close_rcvd is not None else None


def test_the_peak_memory_check_can_fail() -> None:
    """Inflating the bomb whole in the test's own process shows in its peak."""
    bomb = zlib.compress(bytes(48 * 1024 * 1024))
    pid = os.getpid()
    reset_peak_rss(pid)
    before = peak_rss(pid)
    inflated = zlib.decompress(bomb)
    assert peak_rss(pid) - before >= 32 * 1024 * 1024
    del inflated
