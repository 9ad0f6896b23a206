"""gateway/relay.py between the two lean hops, in process over real sockets on 127.0.0.1: uvicorn with
``ClientHop`` in front, a ``websockets`` server behind. Messages go straight from one hop to the other
while the relay waits (``sink``), through the relay's tasks otherwise: order, limits and close codes must
not depend on which way a message took."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.clienthop import serving
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gateway.config import WebSocketConfig
from gateway.relay import relay
from gateway.tunnel import Tunnel, open_upstream

LIMIT = 16_384
closed_upstream: list[tuple[int | None, str | None]] = []


async def upstream_handler(ws: ServerConnection) -> None:
    """Echoes; "close" closes with 4000; "flood N" sends N numbered messages; "pause" stops reading a while."""
    try:
        async for message in ws:
            if message == "close":
                await ws.close(4000, "see you")
            elif isinstance(message, str) and message.startswith("flood "):
                for i in range(int(message.split()[1])):
                    await ws.send(f"{i:05d}" + "f" * 16_000)
            elif isinstance(message, str) and message.startswith("pause"):
                await asyncio.sleep(float(message.split()[1]) if " " in message else 0.3)
            else:
                await ws.send(message)
    finally:
        closed_upstream.append((ws.close_code, ws.close_reason))


@contextlib.asynccontextmanager
async def gateway() -> AsyncIterator[str]:
    async with serve(upstream_handler, "127.0.0.1", 0, max_size=None) as server:
        target = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "websocket.connect"
            upstream = await open_upstream(target, [], None, 5, WebSocketConfig(max_message_size=LIMIT))
            await send({"type": "websocket.accept"})
            try:
                await relay(Tunnel((), None), receive, send, upstream, LIMIT)
            finally:
                await upstream.close()

        async with serving(app, LIMIT) as url:
            yield url


async def close_code(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


@pytest.mark.parametrize("compression", ["deflate", None])
async def test_messages_keep_their_order_whichever_way_they_take(compression: str | None) -> None:
    async with gateway() as url, connect(url, compression=compression, max_size=None) as ws:
        sent: list[str | bytes] = []
        for i in range(300):
            message: str | bytes = f"{i:04d}é" * (i % 7 + 1) if i % 3 else bytes([i % 256]) * (i * 40 % LIMIT)
            sent.append(message)
            await ws.send(message)
            if i % 50 == 0:
                await ws.send("pause")  # the upstream stops reading: the gateway's writes back up
        assert [await ws.recv() for _ in sent] == sent
        await ws.send(["frag", "mented"])
        assert await ws.recv() == "fragmented"


async def test_a_client_that_reads_late_gets_a_flood_whole_and_in_order() -> None:
    async with gateway() as url, connect(url, max_size=None, max_queue=1) as ws:
        await ws.send("flood 1000")  # 16 MB
        await asyncio.sleep(0.5)
        received = [await ws.recv() for _ in range(1000)]
        assert received == [f"{i:05d}" + "f" * 16_000 for i in range(1000)]


async def test_an_upstream_that_stops_reading_slows_the_client_and_loses_nothing() -> None:
    async with gateway() as url, connect(url, max_size=None) as ws:
        sent = [bytes([i % 256]) * LIMIT for i in range(800)]  # 13 MB while the upstream sleeps
        received: list[str | bytes] = []

        async def read() -> None:
            while len(received) < len(sent) + 1:
                received.append(await ws.recv())

        reader = asyncio.create_task(read())
        await ws.send("pause 1")
        for message in sent:
            await ws.send(message)
        await ws.send("done")
        await asyncio.wait_for(reader, 20)
        assert received == [*sent, "done"]


async def test_one_byte_over_the_limit_from_the_client_is_1009_and_the_upstream_is_told() -> None:
    closed_upstream.clear()
    async with gateway() as url, connect(url, compression="deflate", max_size=None) as ws:
        await ws.send("a" * LIMIT)
        assert await ws.recv() == "a" * LIMIT
        await ws.send("é" * (LIMIT // 2) + "a")  # LIMIT + 1 bytes in UTF-8
        assert (await close_code(ws))[0] == 1009
    await asyncio.sleep(0.1)
    assert closed_upstream[-1][0] == 1001


async def test_close_codes_pass_both_ways() -> None:
    async with gateway() as url:
        async with connect(url) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            await ws.send("close")
            assert await close_code(ws) == (4000, "see you")
        closed_upstream.clear()
        async with connect(url) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            await ws.close(4001, "client left")
        await asyncio.sleep(0.1)
        assert closed_upstream[-1] == (4001, "client left")
