"""gateway/upstream_h1.py (LeanForwarder), review findings: each test failed before its fix. Real sockets on
127.0.0.1 (tests/support/rawhttp.py), nothing of the transport mocked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop
from support.rawhttp import RawRequest, RawUpstream
from support.waiting import until
from test_upstream_h1 import Reader, Writer, answering, body_of, send, whole

from gateway.errors import UpstreamFailure
from gateway.forwarder import upstream_url
from gateway.h1_connection import Connection
from gateway.upstream_h1 import LeanForwarder


@pytest.mark.parametrize(
    ("answer", "connections"),
    [(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n", 2),
     (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n", 1)],
)  # fmt: skip
async def test_a_head_answers_connection_header_is_heeded(lean: LeanForwarder, answer: bytes, connections: int) -> None:
    """Regression: a HEAD answer's keep-alive was judged on an emptied header list, so ``Connection: close`` was
    ignored and the connection pooled: the next request (a POST, not retried) went to a socket being closed, 502."""

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        if request.method == "HEAD":
            writer.write(answer)
            await writer.drain()
            if b"close" in answer:
                await asyncio.sleep(0.2)  # closes a little later, as it said it would
                return False
            return True
        return await answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")(request, reader, writer)  # type: ignore[no-any-return]

    upstream = RawUpstream(handler)
    async with upstream as url:
        assert await whole(await send(lean, url, "HEAD")) == b""
        assert await whole(await send(lean, url, "POST")) == b"ok"
    assert upstream.connections == connections


@pytest.mark.parametrize(
    "pieces, sent",
    [
        ((b"hi", b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"), ["/"]),
        ((b"h", b"iGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"), ["/", "/"]),
    ],
    ids=["its-first-piece-whole-then-more", "past-it-in-a-later-piece"],
)
async def test_a_body_longer_than_its_content_length_is_not_sent_past_it(
    lean: LeanForwarder, pieces: tuple[bytes, ...], sent: list[str]
) -> None:
    """Regression: what a body gave past its Content-Length went out as is, and the upstream took it for the next
    request on the connection (smuggled; its answer would be the next client's). aiohttp cuts there; lean fails:
    before anything is sent when the first piece fills the length and more follows, else when the piece past it
    comes (the head and what fitted went out)."""
    upstream = RawUpstream()
    async with upstream as url:
        with pytest.raises(UpstreamFailure) as failure:
            await whole(await send(lean, url, "POST", [("content-length", "2")], body_of(*pieces)))
        assert failure.value.timeout is False
        assert await whole(await send(lean, url)) == b"ok"
    assert [r.target for r in upstream.requests] == sent
    assert not any(b"smuggled" in r.raw_body for r in upstream.requests)


async def test_a_body_shorter_than_its_content_length_never_leaves_its_connection_pooled(lean: LeanForwarder) -> None:
    """Regression: a body that ended short of its Content-Length counted as sent; an upstream that answered
    without reading it left the connection pooled, and the next request's head was read as the rest of the body."""

    async def unread(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        if request.method == "POST":
            await asyncio.sleep(0.1)  # the body (short) is written meanwhile; never read
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    upstream = RawUpstream(unread)
    async with upstream as url:
        with pytest.raises(UpstreamFailure):
            await whole(await send(lean, url, "POST", [("content-length", "10")], body_of(b"hi")))
        assert await whole(await send(lean, url)) == b"ok"
    assert [r.method for r in upstream.requests] == ["POST", "GET"] and upstream.connections == 2


async def test_an_endless_header_is_refused_before_it_is_buffered_whole(lean: LeanForwarder) -> None:
    """Regression: httptools buffers a header's name and value until its line ends, and the 8190-byte cap was
    checked only then: an upstream sending a header without end was buffered (and re-copied) until the read
    timeout. aiohttp refuses a field as it passes the cap; lean now refuses a head past what the caps allow."""

    async def endless(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(128):  # 8 MiB, the line never ends
            writer.write(b"a" * 65536)
            await writer.drain()
        await asyncio.sleep(10)
        return False

    async with RawUpstream(endless) as url:
        with pytest.raises(UpstreamFailure) as failure:
            await send(lean, url, read_timeout=5)
        assert failure.value.timeout is False  # refused as it came, not timed out with it all buffered


async def test_a_connection_whose_body_is_given_up_is_closed_at_once_not_left_flushing(lean: LeanForwarder) -> None:
    """Regression: an answer that came before the body was sent left its connection to a graceful close, which
    waits for the unsent body to drain: to an upstream that no longer reads (nor closes), the socket stayed open
    for good. The rest of the body is given up, so the connection is aborted."""

    async def early(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        await asyncio.sleep(5)  # reads no more, closes nothing
        return False

    async def big() -> AsyncIterator[bytes]:
        for _ in range(256):  # 16 MiB: more than the socket buffers hold
            yield b"x" * 65536

    async with RawUpstream(early) as url:
        headers = [("content-length", str(256 * 65536))]
        response = await asyncio.wait_for(send(lean, url, "POST", headers, big()), 5)
        assert response.status == 413 and await whole(response) == b"no"
        await until(lambda: not lean._all, "the connection was closed", timeout=2)
    assert lean._active == 0


async def test_an_endless_trailer_is_refused_before_it_is_buffered_whole(lean: LeanForwarder) -> None:
    """Regression: the same for a trailer after a chunked body (httptools buffers it as it does a header), which
    the head's cap did not cover: it was buffered until the read timeout."""

    async def endless(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Endless: ")
        for _ in range(128):  # 8 MiB, the line never ends
            writer.write(b"a" * 65536)
            await writer.drain()
        await asyncio.sleep(10)
        return False

    async with RawUpstream(endless) as url:
        response = await send(lean, url, read_timeout=5)
        with pytest.raises(UpstreamFailure) as failure:
            await whole(response)
        assert failure.value.timeout is False


class _BusyLoop(LeanForwarder):
    """The loop does other work between a connection's opening and its first request (a loaded gateway)."""

    async def _connect(self, *args: Any) -> Connection:
        conn = await super()._connect(*args)
        await asyncio.sleep(0.1)  # the upstream hangs up meanwhile
        return conn


async def _hung_up_before_the_request() -> tuple[UpstreamFailure | BaseException, float, LeanForwarder]:
    async def hang_up(reader: Reader, writer: Writer) -> None:
        writer.transport.abort()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    url = upstream_url(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
    lean = _BusyLoop()
    started = time.monotonic()
    try:
        await lean.send("POST", url, [], None, connect_timeout=2, read_timeout=3)
    except BaseException as exc:  # noqa: BLE001 - whatever comes out is the finding
        return exc, time.monotonic() - started, lean
    finally:
        await lean.close()
        server.close()
    raise AssertionError("an answer from an upstream that hung up")


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_new_connection_the_upstream_closed_before_the_request_fails_at_once(run: Any) -> None:
    """Regression: a new connection was used without a look at whether it was still open. The upstream had hung up
    (an overloaded server, a TLS 1.3 client certificate refused after the handshake): on uvloop (production) the
    write raised RuntimeError out of the forwarder (a 500) and the pool slot was never given back, so enough of
    them starved the pool; on asyncio the request waited out the read timeout (504)."""
    failure, took, lean = run(_hung_up_before_the_request())
    assert isinstance(failure, UpstreamFailure) and failure.timeout is False and took < 1
    assert lean._active == 0 and not lean._all


@pytest.mark.parametrize("lengths", [["2", "5"], ["x"], ["-2"], ["²"]])
async def test_a_content_length_that_is_not_one_number_is_refused_not_sent(
    lean: LeanForwarder, lengths: list[str]
) -> None:
    """Two differing Content-Length headers (or one that is no number) are two framings of one body: which one the
    upstream takes is its guess. Refused before a byte goes (the front's parser refuses them from clients too)."""
    upstream = RawUpstream()
    async with upstream as url:
        headers = [("content-length", n) for n in lengths]
        with pytest.raises(UpstreamFailure, match="invalid Content-Length"):
            await send(lean, url, "POST", headers, body_of(b"hi"))
    assert upstream.connections == 0
