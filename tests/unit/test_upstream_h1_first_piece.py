"""gateway/upstream_h1.py: a ``Content-Length`` body's first piece is read before the request goes upstream; when
it is the whole body, head and body leave together. Real sockets on 127.0.0.1 (tests/support/rawhttp.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from support.rawhttp import RawRequest, RawUpstream, read_body
from support.waiting import until
from test_upstream_h1 import Reader, Writer, answering, body_of, refusing_first, send, whole

from gateway.errors import BodyTooLarge, ClientGone, UpstreamFailure
from gateway.upstream_h1 import LeanForwarder

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BIG = b"x" * (32 << 20)  # one piece, far more than the loopback socket buffers take: it waits in the transport


@pytest.mark.parametrize("failure", [ClientGone, BodyTooLarge])
async def test_a_body_that_fails_before_its_first_piece_never_reaches_the_upstream(
    lean: LeanForwarder, failure: type[Exception]
) -> None:
    """The client gone (or its body cut at max_body) before any of it came: the request fails as one whose body
    failed, and the upstream is not even connected to (it used to get the head, then a reset)."""

    async def failing() -> AsyncIterator[bytes]:
        raise failure()
        yield b""  # pragma: no cover - an async generator

    upstream = RawUpstream(answering(OK))
    async with upstream as url:
        with pytest.raises(UpstreamFailure) as caught:
            await send(lean, url, "POST", [("content-length", "5")], failing())
        assert caught.value.timeout is False
        assert await whole(await send(lean, url)) == b"ok"
    assert upstream.connections == 1 and [r.method for r in upstream.requests] == ["GET"]


async def test_a_slow_first_piece_holds_no_upstream_connection(lean: LeanForwarder) -> None:
    """A client that sends its head and then nothing for a while costs the upstream nothing meanwhile: the
    connection is made (from the pool or anew) once the body's first piece is in, and the request goes whole."""
    arrived = asyncio.Event()

    async def late() -> AsyncIterator[bytes]:
        await arrived.wait()
        yield b"hello"

    upstream = RawUpstream(answering(OK))
    async with upstream as url:
        sending = asyncio.create_task(send(lean, url, "POST", [("content-length", "5")], late()))
        await asyncio.sleep(0.2)
        assert upstream.connections == 0 and not sending.done()
        arrived.set()
        assert await whole(await sending) == b"ok"
        await until(lambda: len(upstream.requests) == 1, "the request at the upstream")
    assert upstream.requests[0].raw_body == b"hello" and upstream.connections == 1


@pytest.mark.parametrize("pieces", [[b"x" * 70_000], [b"x" * 10, b"y" * 69_990], [b"", b"x" * 70_000]])
async def test_a_body_whole_or_in_pieces_arrives_as_it_was_sent(lean: LeanForwarder, pieces: list[bytes]) -> None:
    """One piece of all of it (head and body in one write), a first piece and the rest (the rest by the writer),
    an empty first piece: the upstream gets the same request each time, and the connection is kept."""
    upstream = RawUpstream(answering(OK))
    body = b"".join(pieces)

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with upstream as url:
        for _ in range(2):
            response = await send(lean, url, "POST", [("content-length", str(len(body)))], stream())
            assert await whole(response) == b"ok"
        await until(lambda: len(upstream.requests) == 2, "both requests at the upstream")
    assert [r.raw_body for r in upstream.requests] == [body, body] and upstream.connections == 1


async def test_the_read_timeout_of_a_whole_body_starts_once_it_is_sent_not_once_it_is_buffered(
    lean: LeanForwarder,
) -> None:
    """The read timeout covers the upstream's answer, not the upload (review): a whole body written with its head
    counted as sent while 32 MB still waited in the transport, and a slow reader's answer came too late (504)."""

    async def slow_reader(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        await asyncio.sleep(1.0)  # busy: does not read the body for a while
        await read_body(reader, request)
        writer.write(OK)  # answers at once once it has it
        return True

    async with RawUpstream(slow_reader) as url:
        headers = [("content-length", str(len(BIG)))]
        response = await send(lean, url, "POST", headers, body_of(BIG), read_timeout=0.4)
        assert await whole(response) == b"ok"


async def test_an_error_answered_while_a_whole_body_is_still_going_does_not_pool_the_connection(
    lean: LeanForwarder,
) -> None:
    """An error answered before the body is all sent means the body is not wanted (RFC 9112 §9.6): it stops and
    the connection closes (review: a whole body counted as sent once handed to the transport, so a 413 pooled the
    connection, and the next request went behind the unwanted body to an upstream no longer parsing it)."""
    upstream = RawUpstream(refusing_first)
    async with upstream as url:
        headers = [("content-length", str(len(BIG)))]
        response = await asyncio.wait_for(send(lean, url, "POST", headers, body_of(BIG)), 5)
        assert response.status == 413 and await whole(response) == b"no"
        assert await whole(await send(lean, url, read_timeout=1)) == b"ok"
    assert upstream.connections == 2
