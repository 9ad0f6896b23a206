"""gateway/upstream_ws.py over real sockets on 127.0.0.1: the upstream is the ``websockets`` server, or a raw
TCP server where a frame has to be cut or held back."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.http11 import Request, Response
from websockets.utils import accept_key

from gateway.config import WebSocketConfig
from gateway.tunnel import open_upstream
from gateway.upstream_ws import MAX_QUEUE, UpstreamSocket

LIMIT = 4096
LIMITS = WebSocketConfig(max_message_size=LIMIT, ping_interval=0)
Handler = Callable[[ServerConnection], Awaitable[None]]


@contextlib.asynccontextmanager
async def upstream(handler: Handler, **kwargs: Any) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, max_size=None, **kwargs) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/path?q=1"


@contextlib.asynccontextmanager
async def raw_upstream(
    after_handshake: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A server that answers the handshake by hand, then lets the test write (or not read) raw bytes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key.decode()).encode() + b"\r\n\r\n"
        )
        try:
            await after_handshake(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


async def open_(url: str, headers: list[tuple[str, str]] | None = None, **kwargs: Any) -> UpstreamSocket:
    return await open_upstream(url, headers or [], kwargs.pop("subprotocols", None), 5, kwargs.pop("limits", LIMITS))


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        if message == "close":
            await ws.close(4000, "see you")
        elif message == "fragments":
            await ws.send(["frag", "ment", "ed é"])
            await ws.send([b"\x00" * 10, b"\x01" * 10])
        else:
            await ws.send(message)


async def test_messages_both_ways_with_the_handshake_the_gateway_asked_for() -> None:
    seen: list[Request] = []

    async def record(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen.append(ws.request)
        await echo(ws)

    async with upstream(record, subprotocols=["chat.v2"]) as url:
        headers = [("host", "app.example"), ("x-user", "alice")]
        ws = await open_(url, headers, subprotocols=["chat.v1", "chat.v2"])
        assert ws.subprotocol == "chat.v2"
        messages: list[str | bytes] = ["text é", b"\x00\xff" * 100, "x" * LIMIT, b"y" * 300, "", b""]
        for message in messages:
            assert not ws.write(message)
            assert await ws.recv() == message
        await ws.close()
    request = seen[0]
    assert request.headers.get_all("Host") == ["app.example"]  # one Host: the client's
    assert request.headers["X-User"] == "alice" and "User-Agent" not in request.headers
    assert "Sec-WebSocket-Extensions" not in request.headers  # no compression on this hop
    assert request.path == "/path?q=1"


async def test_fragmented_messages_are_put_together() -> None:
    async with upstream(echo) as url:
        ws = await open_(url)
        ws.write("fragments")
        assert await ws.recv() == "fragmented é"
        assert await ws.recv() == b"\x00" * 10 + b"\x01" * 10
        await ws.close()


async def test_a_message_over_the_limit_closes_with_1009_whole_or_in_fragments() -> None:
    codes: list[int | None] = []

    async def oversize(ws: ServerConnection) -> None:
        what = await ws.recv()
        with contextlib.suppress(ConnectionClosed):
            await ws.send("z" * LIMIT)  # exactly the limit passes
            await ws.send(["z" * (LIMIT // 2), "z" * (LIMIT // 2 + 1)] if what == "fragments" else b"z" * (LIMIT + 1))
            await ws.wait_closed()
        codes.append(ws.close_code)

    async with upstream(oversize) as url:
        for what in ("whole", "fragments"):
            ws = await open_(url)
            ws.write(what)
            assert await ws.recv() == "z" * LIMIT
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.too_big
            await ws.close()
    assert codes == [1009, 1009]


async def test_close_codes_pass_both_ways() -> None:
    received: list[tuple[int | None, str | None]] = []

    async def keep(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await echo(ws)
        received.append((ws.close_code, ws.close_reason))

    async with upstream(keep) as url:
        ws = await open_(url)
        ws.write("close")  # the upstream closes
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4000, "see you")
        with pytest.raises(ConnectionClosed):
            ws.write("too late")
        await ws.close()
        ws = await open_(url)  # the gateway closes
        await ws.close(4001, "client left")
        await asyncio.sleep(0.05)
    assert received[-1] == (4001, "client left")


async def test_an_upstream_vanishing_mid_message_is_1006() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x81\x05hello" + struct.pack("!BBH", 0x82, 126, 1000) + b"\x00" * 10)
        await writer.drain()
        writer.transport.abort()

    async with raw_upstream(cut) as url:
        ws = await open_(url)
        assert await ws.recv() == "hello"
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.too_big) == (1006, False)
        await ws.close()


async def test_invalid_utf8_from_the_upstream_fails_the_socket_with_1007() -> None:
    got: list[bytes] = []

    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x81\x02\xc3\x28")
        got.append(await reader.read(64))  # the client's close frame (masked)
        writer.close()

    async with raw_upstream(bad) as url:
        ws = await open_(url)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        await ws.close()
    frame = got[0]
    assert frame[0] == 0x88
    assert bytes(b ^ frame[2 + i % 4] for i, b in enumerate(frame[6:8])) == struct.pack("!H", 1007)


async def test_reading_pauses_while_the_relay_does_not_take_messages() -> None:
    sent = 200

    async def flood(ws: ServerConnection) -> None:
        for i in range(sent):
            await ws.send(f"{i:04d}" * 500)
        await ws.wait_closed()

    async with upstream(flood) as url:
        ws = await open_(url)
        await asyncio.sleep(0.3)
        assert MAX_QUEUE <= len(ws._messages) < sent  # read ahead no further than MAX_QUEUE (and a read's worth)
        assert ws._paused
        for i in range(sent):
            assert await ws.recv() == f"{i:04d}" * 500
        assert not ws._paused
        await ws.close()


async def test_writes_wait_for_a_upstream_that_stops_reading() -> None:
    reading = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reading.wait()
        while await reader.read(65536):
            pass
        writer.close()

    async with raw_upstream(slow) as url:
        ws = await open_(url, limits=WebSocketConfig(max_message_size=1 << 20, ping_interval=0))
        writes = 0
        while not ws.write(b"x" * 65536):
            writes += 1
            assert writes < 1000, "the transport never asked to drain"
        drained = asyncio.ensure_future(ws.drain())
        await asyncio.sleep(0.2)
        assert not drained.done()
        reading.set()
        await asyncio.wait_for(drained, 5)
        ws.abort()


async def test_pings_are_answered_and_sent() -> None:
    async def ping(ws: ServerConnection) -> None:
        await asyncio.wait_for(await ws.ping(b"abc"), 2)
        await ws.send("pong came")
        await ws.wait_closed()

    async with upstream(ping) as url:
        ws = await open_(url)
        assert await ws.recv() == "pong came"
        await ws.close()

    pinged: list[bytes] = []

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frame = await reader.readexactly(10)  # a ping with 4 bytes, masked
        pinged.append(bytes(b ^ frame[2 + i % 4] for i, b in enumerate(frame[6:10])))
        writer.write(b"\x8a\x04" + pinged[0] + b"\x81\x02ok")
        await reader.read(64)

    async with raw_upstream(watch) as url:
        ws = await open_(url, limits=WebSocketConfig(max_message_size=LIMIT, ping_interval=0.05))
        assert await asyncio.wait_for(ws.recv(), 2) == "ok"
        assert ws._ping_payload is None  # its pong came back
        await ws.close()


async def test_messages_over_64_kib_take_the_long_length() -> None:
    async with upstream(echo) as url:
        ws = await open_(url, limits=WebSocketConfig(max_message_size=1 << 20, ping_interval=0))
        messages: list[str | bytes] = [b"\x01" * 70_000, "é" * 40_000]
        for message in messages:
            assert not ws.write(message)
            assert await ws.recv() == message
        await ws.close()


async def test_an_upstream_that_stops_answering_pings_is_failed_with_1011(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.upstream_ws.PING_TIMEOUT", 0.1)
    got: list[bytes] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(10)  # the ping, never answered
        got.append(await reader.readexactly(6 + 2 + len("keepalive ping timeout")))  # the close frame, masked

    async with raw_upstream(deaf) as url:
        ws = await open_(url, limits=WebSocketConfig(max_message_size=LIMIT, ping_interval=0.05))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 2)
        await asyncio.sleep(0.05)
        ws.abort()
    frame = got[0]
    assert frame[0] == 0x88
    assert bytes(b ^ frame[2 + i % 4] for i, b in enumerate(frame[6:8])) == struct.pack("!H", 1011)


async def test_a_refused_handshake_raises_with_the_upstreams_answer() -> None:
    def refuse(connection: ServerConnection, request: Request) -> Response:
        return Response(403, "Forbidden", Headers([("X-Why", "nope"), ("Content-Length", "2")]), b"no")

    async with upstream(echo, process_request=refuse) as url:
        with pytest.raises(InvalidStatus) as refused:
            await open_(url)
    assert refused.value.response.status_code == 403
    assert refused.value.response.headers["X-Why"] == "nope" and refused.value.response.body == b"no"


async def test_a_frame_cut_at_any_byte_is_read_as_one_frame() -> None:
    # The payload looks like frames itself: a cut right after the header must not let the fast path read it as
    # frames while the parser waits for the payload (frames smuggled in by whatever the upstream relays).
    inner = b"\x81\x02hi" + b"\x88\x02\x03\xe8"
    payloads = [inner, inner + b"x" * (126 - len(inner))]
    frames = [b"\x82" + bytes([len(inner)]) + payloads[0], b"\x82\x7e\x00\x7e" + payloads[1]]

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for frame in frames:
            for at in range(1, len(frame)):
                writer.write(frame[:at])
                await writer.drain()
                await asyncio.sleep(0.005)
                writer.write(frame[at:])
                await writer.drain()
                await asyncio.sleep(0.005)
        await reader.read()
        done.set()

    done = asyncio.Event()

    async with raw_upstream(cut) as url:
        ws = await open_(url)
        for frame, payload in zip(frames, payloads, strict=True):
            for at in range(1, len(frame)):
                async with asyncio.timeout(5):
                    assert await ws.recv() == payload, at
        ws.abort()
        await done.wait()


BAD_FRAMES = [
    pytest.param(b"\x82\x82\x00\x00\x00\x00hi", 1002, id="masked"),
    pytest.param(b"\xc2\x02hi", 1002, id="rsv1-without-extension"),
    pytest.param(b"\xa1\x02hi", 1002, id="rsv2"),
    pytest.param(b"\x83\x02hi", 1002, id="reserved-opcode"),
    pytest.param(b"\x89\x7e\x00\x7e" + b"p" * 126, 1002, id="control-over-125"),
    pytest.param(b"\x09\x02hi", 1002, id="fragmented-control"),
    pytest.param(b"\x01\x02hi\x81\x02hi", 1002, id="data-mid-message"),
    pytest.param(b"\x80\x02hi", 1002, id="continuation-alone"),
    pytest.param(b"\x82\x7f" + b"\xff" * 8, 1009, id="64-bit-top-bit"),
    pytest.param(b"\x01\x02\xc3\x80\x80\x01\xce", 1007, id="bad-utf8-end"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_a_frame_against_rfc_6455_fails_the_upstream(frame: bytes, code: int) -> None:
    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x81\x02ok" + frame + b"\x81\x05after")
        await writer.drain()
        await reader.read()
        done.set()

    done = asyncio.Event()

    async with raw_upstream(send) as url:
        ws = await open_(url)
        async with asyncio.timeout(5):
            assert await ws.recv() == "ok"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == code
        ws.abort()
        await done.wait()


async def test_a_response_that_is_no_http_fails_the_handshake_at_once() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 abc\r\n\r\n")  # then the connection stays open, until the gateway drops it
        await reader.read()
        writer.close()
        done.set()

    done = asyncio.Event()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    async with server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        started = asyncio.get_running_loop().time()
        with pytest.raises(InvalidMessage):  # a 502, as websockets' connect raised it; not the open timeout's 504
            await open_upstream(url, [], None, 3, LIMITS)
        assert asyncio.get_running_loop().time() - started < 1
        await done.wait()
