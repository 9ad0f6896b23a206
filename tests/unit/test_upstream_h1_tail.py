"""gateway/upstream_h1.py (LeanForwarder), review of the early-success tail, the body past the parser and the
one-by-one reads (issue 17): each test failed before its fix. Real sockets on 127.0.0.1 (tests/support/rawhttp.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from support.rawhttp import RawRequest, RawUpstream
from support.waiting import until
from test_upstream_h1 import Reader, Writer, answering_first, send, whole

from gateway.forwarder import UpstreamResponse
from gateway.upstream_h1 import LeanForwarder

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_a_success_before_the_body_from_an_upstream_that_never_reads_it_is_not_held_for_ever(
    lean: LeanForwarder,
) -> None:
    """The writer stalls once the socket's buffers are full: the last read waited for it with no bound at all."""

    async def answers_and_stops_reading(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(30)  # keeps the connection, reads nothing more
        return True

    async def big_body() -> AsyncIterator[bytes]:
        for _ in range(512):  # 32 MB: far past what the socket buffers hold
            yield b"x" * 65536

    async with RawUpstream(answers_and_stops_reading) as url:
        response = await send(lean, url, "POST", [("content-length", str(512 * 65536))], big_body(), read_timeout=0.5)
        assert await asyncio.wait_for(whole(response), 5) == b"ok"
        await until(lambda: lean._active == 0, "the connection was freed")


async def test_a_success_before_the_body_from_a_client_that_never_ends_it_is_not_held_for_ever(
    lean: LeanForwarder,
) -> None:
    """Before issue 17's change the answer went at once (the body given up); the wait is now held to the read timeout,
    not to whenever the client chooses to finish its upload (nothing else bounds it: no client body timeout)."""

    async def stalled() -> AsyncIterator[bytes]:
        yield b"first,"
        await asyncio.sleep(30)
        yield b"never"

    async with RawUpstream(answering_first(OK)) as url:
        response = await send(lean, url, "POST", [("content-length", "11")], stalled(), read_timeout=0.5)
        assert await asyncio.wait_for(whole(response), 5) == b"ok"
        await until(lambda: lean._active == 0, "the connection was freed")


async def reads(response: UpstreamResponse) -> list[bytes]:
    got = []
    while data := await response.read():
        got.append(data)
    return got


async def test_many_small_pieces_buffered_are_joined_not_read_one_by_one(lean: LeanForwarder) -> None:
    """A chunked answer of 40-byte chunks buffered past JOIN_MAX was read one chunk per read: thousands of reads
    (each a send to the client) and a list.pop(0) each, quadratic in the pieces buffered."""
    pieces = 4000
    wire = b"".join(b"28\r\n" + b"%040d" % i + b"\r\n" for i in range(pieces)) + b"0\r\n\r\n"
    ready = asyncio.Event()

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await ready.wait()
        writer.write(wire)
        return True

    async with RawUpstream(handler) as url:
        response = await send(lean, url)
        ready.set()
        await asyncio.sleep(0.3)  # all of it buffered before the first read
        got = await reads(response)
    assert b"".join(got) == b"".join(b"%040d" % i for i in range(pieces))
    assert len(got) <= 8, len(got)


@pytest.mark.parametrize("pieces", [1, 2])  # 1: the body parsed by llhttp; 2: the body past the parser
@pytest.mark.parametrize(
    "connection",
    [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\tfoo\r\n", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\x0b\r\n"],
)
async def test_whether_the_connection_is_kept_does_not_depend_on_how_the_answer_arrived(
    lean: LeanForwarder, pieces: int, connection: bytes
) -> None:
    """keeps_alive() (past the parser) and llhttp (in it) read some Connection headers differently: an obs-folded
    ``close`` pooled a connection its upstream said it would close, when the body came in a packet of its own."""
    head = connection + b"Content-Length: 2\r\n\r\n"

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        for piece in [head + b"ok"] if pieces == 1 else [head, b"ok"]:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        return True

    upstream = RawUpstream(handler)
    async with upstream as url:
        for _ in range(2):
            assert await whole(await send(lean, url)) == b"ok"
    assert upstream.connections == 2


async def stalled_body() -> AsyncIterator[bytes]:
    yield b"first,"
    await asyncio.sleep(30)
    yield b"never"


async def test_an_early_success_to_an_expect_100_continue_request_neither_hangs_nor_pools_its_connection(
    lean: LeanForwarder,
) -> None:
    upstream = RawUpstream(answering_first(OK, keep=True, read=False))
    async with upstream as url:
        headers = [("content-length", "11"), ("expect", "100-continue")]
        response = await send(lean, url, "POST", headers, stalled_body(), read_timeout=5)
        assert await asyncio.wait_for(whole(response), 2) == b"ok"
        await until(lambda: lean._active == 0, "the connection was freed")
        assert await whole(await send(lean, url)) == b"ok"
    assert upstream.connections == 2


async def test_a_tail_whose_upstream_hangs_up_frees_its_slot_and_the_answer_goes_at_once(lean: LeanForwarder) -> None:
    upstream = RawUpstream(answering_first(OK, keep=False, read=False))
    async with upstream as url:
        response = await send(lean, url, "POST", [("content-length", "11")], stalled_body(), read_timeout=5)
        assert await asyncio.wait_for(whole(response), 2) == b"ok"
        await until(lambda: lean._active == 0, "the connection was freed")


async def test_closing_the_forwarder_during_a_tail_frees_its_slot(lean: LeanForwarder) -> None:
    upstream = RawUpstream(answering_first(OK, keep=True))
    async with upstream as url:
        response = await send(lean, url, "POST", [("content-length", "11")], stalled_body(), read_timeout=5)
        await asyncio.sleep(0.1)
        await lean.close()
        assert lean._active == 0
        assert await asyncio.wait_for(whole(response), 2) == b"ok"
        assert await whole(await send(lean, url)) == b"ok"


async def test_an_interim_answers_body_is_not_passed_on_as_the_final_answers(lean: LeanForwarder) -> None:
    """llhttp reads a Content-Length body after a 1xx other than 100, 101, 102 and 103: it went to the client
    before the final answer's own (aiohttp drops it)."""

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 199 X\r\nContent-Length: 5\r\n\r\nabcde" + OK)
        return True

    async with RawUpstream(handler) as url:
        response = await send(lean, url)
        assert response.status == 200 and await whole(response) == b"ok"
