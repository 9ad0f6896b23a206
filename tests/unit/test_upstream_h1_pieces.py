"""The lean forwarder's answers arriving in pieces (issue 17): a ``Content-Length`` body past its head is taken as the
socket gives it, without the parser, so where it ends, what follows it and whether the connection carries another
answer are decided there; large pieces reach the reader one by one, small ones joined."""

from __future__ import annotations

import asyncio

import pytest
from support.rawhttp import RawRequest, RawUpstream, read_body

from gateway.errors import UpstreamFailure
from gateway.forwarder import chunks, upstream_url
from gateway.h1_response import JOIN_MAX
from gateway.upstream_h1 import LeanForwarder

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


def in_pieces(*pieces: bytes):  # type: ignore[no-untyped-def]
    """Answers each request with ``pieces``, each written and flushed on its own, a moment apart."""

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        await read_body(reader, request)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        return True

    return handler


async def get(lean: LeanForwarder, url: str) -> tuple[int, list[bytes]]:
    response = await lean.send("GET", upstream_url(url + "/"), [], None, connect_timeout=2, read_timeout=5)
    return response.status, [chunk async for chunk in chunks(response)]


@pytest.mark.parametrize(
    ("head", "connections"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 1),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 10\r\n\r\n", 2),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 10\r\n\r\n", 1),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n", 2),
    ],
)
async def test_a_body_in_pieces_ends_at_its_length_and_the_connection_is_reused_as_its_head_says(
    lean: LeanForwarder, head: bytes, connections: int
) -> None:
    upstream = RawUpstream(in_pieces(head + b"01", b"234", b"56789"))
    async with upstream as url:
        for _ in range(2):
            status, body = await get(lean, url)
            assert status == 200 and b"".join(body) == b"0123456789"
    assert upstream.connections == connections and lean._active == 0


async def test_bytes_past_the_body_in_its_last_piece_are_not_passed_on_and_the_connection_is_not_reused(
    lean: LeanForwarder,
) -> None:
    upstream = RawUpstream(in_pieces(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n", b"okokHTTP/1.1 200 OK\r\n\r\n"))
    async with upstream as url:
        for _ in range(2):
            assert await get(lean, url) == (200, [b"okok"])
    assert upstream.connections == 2


async def test_a_body_cut_short_by_the_upstream_fails_the_read(lean: LeanForwarder) -> None:
    async def short(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b" more")
        return False  # and hang up

    async with RawUpstream(short) as url:
        response = await lean.send("GET", upstream_url(url + "/"), [], None, connect_timeout=2, read_timeout=5)
        with pytest.raises(UpstreamFailure):
            while await response.read():
                pass


async def test_large_pieces_reach_the_reader_one_by_one_and_small_ones_joined(lean: LeanForwarder) -> None:
    big = JOIN_MAX  # two of them buffered pass the join limit
    ready = asyncio.Event()

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * big + 6))
        await writer.drain()
        await ready.wait()
        for piece in (b"a" * big, b"b" * big, b"c", b"de", b"fgh"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        return True

    async with RawUpstream(handler) as url:
        response = await lean.send("GET", upstream_url(url + "/"), [], None, connect_timeout=2, read_timeout=5)
        ready.set()
        await asyncio.sleep(0.3)  # everything is in before the first read
        got = [chunk async for chunk in chunks(response)]
    assert b"".join(got) == b"a" * big + b"b" * big + b"cdefgh"
    assert all(len(chunk) <= big for chunk in got) and got[-1].endswith(b"cdefgh")  # not one 128 KB copy
