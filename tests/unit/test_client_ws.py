"""gateway/client_ws.py over real sockets on 127.0.0.1: uvicorn serving an ASGI app with ``ClientHop``, the
``websockets`` client (deflating or not) or raw bytes on the other end. What the fast paths take must come
out as uvicorn's own parser would give it: messages, limits (1009), bad UTF-8 (1007), close codes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import zlib
from typing import Any

import pytest
from support import clienthop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from gateway.limits import frame_allowance

LIMIT = 8192
COMPRESSION = [pytest.param("deflate", id="deflating"), pytest.param(None, id="plain")]


class App:
    """Echoes each message; "close CODE" closes with it; "slow" stops reading for a while; records disconnects."""

    def __init__(self) -> None:
        self.disconnects: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.disconnects.append(message.get("code", 1005))
                return
            text = message.get("text")
            if text is not None and text.startswith("close "):
                await send({"type": "websocket.close", "code": int(text.split()[1]), "reason": "bye"})
                return
            if text == "slow":
                await asyncio.sleep(0.3)
            await send(
                {"type": "websocket.send", **({"text": text} if text is not None else {"bytes": message["bytes"]})}
            )


def serving(app: App, limit: int = LIMIT) -> contextlib.AbstractAsyncContextManager[str]:
    return clienthop.serving(app, limit)


def client(url: str, compression: str | None) -> connect:
    return connect(url, compression=compression, max_size=None, ping_interval=None)


async def close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


@pytest.mark.parametrize("compression", COMPRESSION)
async def test_messages_come_back_as_sent_one_by_one_or_many_in_a_read(compression: str | None) -> None:
    app = App()
    messages: list[str | bytes] = ["é" * 10, b"\x00\xff" * 50, "x" * 125, "y" * 126, b"z" * 70, os.urandom(LIMIT), ""]
    async with serving(app) as url, client(url, compression) as ws:
        assert bool(ws.protocol.extensions) == (compression is not None)
        for message in messages:
            await ws.send(message)
            assert await ws.recv() == message
        for message in messages:  # all written before any is read: several frames in one read
            await ws.send(message)
        assert [await ws.recv() for _ in messages] == messages
        await ws.send(["frag", "ment", "ed"])  # fragments: the parser's way
        assert await ws.recv() == "fragmented"
        await ws.close(4001, "done")
    await asyncio.sleep(0.05)
    assert app.disconnects == [4001]


@pytest.mark.parametrize("compression", COMPRESSION)
async def test_messages_over_64_kib_take_the_long_length(compression: str | None) -> None:
    async with serving(App(), limit=1 << 20) as url, client(url, compression) as ws:
        messages: list[str | bytes] = [os.urandom(70_000), "é" * 40_000]
        for message in messages:
            await ws.send(message)
            assert await ws.recv() == message


@pytest.mark.parametrize("compression", COMPRESSION)
async def test_the_servers_close_code_reaches_the_client(compression: str | None) -> None:
    async with serving(App()) as url, client(url, compression) as ws:
        await ws.send("close 4000")
        assert await close_code(ws) == 4000


async def test_a_frame_over_the_limit_or_inflating_past_it_closes_with_1009() -> None:
    async with serving(App()) as url:
        async with client(url, None) as ws:
            await ws.send(b"x" * (frame_allowance(LIMIT) + 1))
            assert await close_code(ws) == 1009
        async with client(url, "deflate") as ws:
            await ws.send(b"\x00" * (frame_allowance(LIMIT) + 1))  # a few hundred bytes deflated
            assert await close_code(ws) == 1009


async def test_invalid_utf8_in_a_text_closes_with_1007() -> None:
    async with serving(App()) as url, client(url, None) as ws:
        await ws.send("ok")
        assert await ws.recv() == "ok"
        ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xc3\x28"))
        ws.send_data()
        assert await close_code(ws) == 1007


async def test_a_client_that_stops_mid_frame_disconnects_the_app() -> None:
    app = App()
    async with serving(app) as url, client(url, None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        assert ws.transport is not None
        ws.transport.write(b"\x82\xfe\x10\x00" + os.urandom(4) + b"\x00" * 100)  # 4096 bytes announced
        ws.transport.abort()
        await asyncio.sleep(0.2)
    assert app.disconnects == [1005]  # uvicorn's code for a connection lost after the handshake


async def test_reading_pauses_while_the_app_does_not_take_messages() -> None:
    async with serving(App()) as url, client(url, "deflate") as ws:
        await ws.send("slow")
        sent = [f"{i:03d}" * 100 for i in range(100)]
        for message in sent:
            await ws.send(message)
        assert await ws.recv() == "slow"
        assert [await ws.recv() for _ in sent] == sent


def test_deflate_bomb_payload_is_small() -> None:
    # The 1009 test above relies on zeros deflating to far less than the frame allowance.
    assert len(zlib.compress(b"\x00" * (frame_allowance(LIMIT) + 1))) < LIMIT // 10


async def test_a_frame_cut_at_any_byte_is_read_as_one_frame() -> None:
    # A masked payload is the client's to choose: a cut right after the header (and mask) must not let the fast
    # path read the payload as frames while the parser waits for it.
    inner = b"\x81\x82\x00\x00\x00\x00hi"  # a masked text frame, "hi", as the payload of a binary frame
    frames = [b"\x82" + bytes([0x80 | len(inner)]) + b"\x00" * 4 + inner]
    frames.append(b"\x82\xfe\x00\x7e" + b"\x00" * 4 + inner + b"x" * (126 - len(inner)))
    async with serving(App()) as url, client(url, None) as ws:
        assert ws.transport is not None
        for frame in frames:
            payload = frame[-126:] if len(frame) > 126 else inner
            for at in range(1, len(frame)):
                ws.transport.write(frame[:at])
                await asyncio.sleep(0.005)
                ws.transport.write(frame[at:])
                async with asyncio.timeout(5):
                    assert await ws.recv() == payload, at


CLIENT_BAD_FRAMES = [
    pytest.param(b"\x82\x02hi", 1002, id="unmasked"),
    pytest.param(b"\xc2\x82\x00\x00\x00\x00hi", 1002, id="rsv1-without-extension"),
    pytest.param(b"\x93\x82\x00\x00\x00\x00hi", 1002, id="reserved-opcode-rsv3"),
    pytest.param(b"\x89\xfe\x00\x7e" + b"\x00" * 130, 1002, id="control-over-125"),
    pytest.param(b"\x09\x82\x00\x00\x00\x00hi", 1002, id="fragmented-control"),
    pytest.param(b"\x01\x82\x00\x00\x00\x00hi\x81\x82\x00\x00\x00\x00hi", 1002, id="data-mid-message"),
    pytest.param(b"\x82\xff" + b"\xff" * 8 + b"\x00" * 4, 1009, id="64-bit-top-bit"),
    pytest.param(b"\x81\x83\x00\x00\x00\x00\xc3\x80\xce", 1007, id="bad-utf8"),
]


@pytest.mark.parametrize(("frame", "code"), CLIENT_BAD_FRAMES)
async def test_a_frame_against_rfc_6455_fails_the_client(frame: bytes, code: int) -> None:
    app = App()
    async with serving(app) as url, client(url, None) as ws:
        assert ws.transport is not None
        await ws.send("ok")
        assert await ws.recv() == "ok"
        ws.transport.write(frame + b"\x81\x82\x00\x00\x00\x00hi")
        assert await close_code(ws) == code
