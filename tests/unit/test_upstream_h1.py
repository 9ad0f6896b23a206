"""gateway/upstream_h1.py (LeanForwarder) against raw asyncio upstreams that misbehave on purpose: framing of
answers, keep-alive and when a connection must not be reused, retries, timeouts, request bodies, cancellation and
flow control. Real sockets on 127.0.0.1; nothing of the transport is mocked."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest
from support.rawhttp import RawRequest, RawUpstream, read_body
from support.waiting import until

from gateway.errors import BodyTooLarge, UpstreamFailure
from gateway.forwarder import UpstreamResponse, chunks, upstream_url
from gateway.h1_response import HIGH_WATER, Response
from gateway.upstream_h1 import LeanForwarder, request_head

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


async def send(
    forwarder: LeanForwarder,
    url: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: AsyncIterator[bytes] | None = None,
    read_timeout: float = 5,
) -> UpstreamResponse:
    return await forwarder.send(
        method, upstream_url(url + "/"), headers or [], body, connect_timeout=2, read_timeout=read_timeout
    )


async def whole(response: UpstreamResponse) -> bytes:
    return b"".join([chunk async for chunk in chunks(response)])


async def body_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def answering(answer: bytes, keep: bool = True):  # type: ignore[no-untyped-def]
    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        await read_body(reader, request)
        writer.write(answer)
        return keep

    return handler


async def test_a_chunked_answer_is_read_whole_and_the_connection_reused(lean: LeanForwarder) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    upstream = RawUpstream(answering(chunked))
    async with upstream as url:
        for _ in range(2):
            response = await send(lean, url)
            assert response.status == 200 and await whole(response) == b"hello world"
    assert upstream.connections == 1


async def test_a_body_without_length_ends_with_the_connection_and_it_is_not_reused(lean: LeanForwarder) -> None:
    upstream = RawUpstream(answering(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", keep=False))
    async with upstream as url:
        for _ in range(2):
            response = await send(lean, url)
            assert await whole(response) == b"until the end" and response.at_eof()
    assert upstream.connections == 2


async def test_head_has_no_body_whatever_its_content_length_says(lean: LeanForwarder) -> None:
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(answers[0] if request.method == "HEAD" else answers[1])
        return True

    upstream = RawUpstream(handler)
    async with upstream as url:
        head = await send(lean, url, "HEAD")
        assert head.status == 200 and (b"Content-Length", b"100") in head.headers
        assert await head.read() == b"" and head.at_eof()
        assert await whole(await send(lean, url)) == b"ok"  # the same connection: the HEAD answer took no bytes
    assert upstream.connections == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_204_and_304_have_no_body(lean: LeanForwarder, status: int) -> None:
    upstream = RawUpstream(answering(b"HTTP/1.1 %d X\r\nETag: x\r\n\r\n" % status))
    async with upstream as url:
        for _ in range(2):
            response = await send(lean, url)
            assert response.status == status and await response.read() == b"" and response.at_eof()
    assert upstream.connections == 1


async def test_100_continue_then_the_body_then_the_answer(lean: LeanForwarder) -> None:
    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n")
        await read_body(reader, request)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(request.body), request.body))
        return True

    upstream = RawUpstream(handler)
    async with upstream as url:
        headers = [("expect", "100-continue"), ("content-length", "5")]
        response = await send(lean, url, "PUT", headers, body_of(b"he", b"llo"))
        assert response.status == 201 and (b"X-Interim", b"1") not in response.headers
        assert await whole(response) == b"hello"
    assert upstream.requests[0].header("expect") == "100-continue"


async def test_a_final_answer_instead_of_100_continue_means_the_body_is_never_sent(lean: LeanForwarder) -> None:
    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 2\r\n\r\nno")
        return True

    upstream = RawUpstream(handler)
    async with upstream as url:
        headers = [("expect", "100-continue"), ("content-length", "5")]
        response = await send(lean, url, "PUT", headers, body_of(b"hello"))
        assert response.status == 417 and await whole(response) == b"no"
        assert await whole(await send(lean, url)) == b"no"  # on a new connection: the old one owes a body
    assert upstream.connections == 2


async def test_an_upstream_that_ignores_expect_times_out(lean: LeanForwarder) -> None:
    """Regression guard: aiohttp waits for 100 Continue without any deadline (the request hangs); lean gives up
    after the read timeout (504)."""

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        await reader.read()  # waits for a body that waits for 100 Continue
        return False

    async with RawUpstream(handler) as url:
        headers = [("expect", "100-continue"), ("content-length", "5")]
        with pytest.raises(UpstreamFailure) as failure:
            await asyncio.wait_for(send(lean, url, "PUT", headers, body_of(b"hello"), read_timeout=0.2), 5)
        assert failure.value.timeout is True and lean._active == 0


async def test_an_upstream_that_closes_mid_body_fails_the_read(lean: LeanForwarder) -> None:
    upstream = RawUpstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", keep=False))
    async with upstream as url:
        response = await send(lean, url)
        assert await response.read() == b"hello"
        with pytest.raises(UpstreamFailure) as failure:
            await response.read()
        assert failure.value.timeout is False


async def test_connection_close_is_not_reused_and_keep_alive_is(lean: LeanForwarder) -> None:
    closing = RawUpstream(answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"))
    kept = RawUpstream(answering(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"))
    for upstream, connections in ((closing, 2), (kept, 1)):
        async with upstream as url:
            for _ in range(2):
                assert await whole(await send(lean, url)) == b"ok"
        assert upstream.connections == connections


def hanging_up_on(second: int):  # type: ignore[no-untyped-def]
    """Answers every request but the ``second``-th (counted from 1): that one it reads, then hangs up without a word."""

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        await read_body(reader, request)
        if handler.seen == second - 1:  # type: ignore[attr-defined]
            handler.seen += 1  # type: ignore[attr-defined]
            return False
        handler.seen += 1  # type: ignore[attr-defined]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    handler.seen = 0  # type: ignore[attr-defined]
    return handler


async def test_a_connection_closed_while_idle_is_retried_once_on_a_new_one(lean: LeanForwarder) -> None:
    upstream = RawUpstream(hanging_up_on(2))
    async with upstream as url:
        assert await whole(await send(lean, url)) == b"ok"
        assert await whole(await send(lean, url)) == b"ok"
    assert [r.connection for r in upstream.requests] == [0, 0, 1]


async def test_a_request_with_a_body_or_not_idempotent_is_not_retried(lean: LeanForwarder) -> None:
    # It may have been acted on (and a body cannot be sent again).
    for method, body in (("PUT", body_of(b"x")), ("POST", None)):
        upstream = RawUpstream(hanging_up_on(2))
        async with upstream as url:
            assert await whole(await send(lean, url)) == b"ok"
            with pytest.raises(UpstreamFailure) as failure:
                await send(lean, url, method, [("content-length", "1")] if body else [], body)
            assert failure.value.timeout is False
        assert len(upstream.requests) == 2


async def test_an_idle_connection_the_upstream_closed_is_not_used(lean: LeanForwarder) -> None:
    upstream = RawUpstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", keep=False))
    async with upstream as url:
        assert await whole(await send(lean, url)) == b"ok"
        await until(lambda: not lean._all, "the closed connection left the pool")
        assert await whole(await send(lean, url)) == b"ok"
    assert upstream.connections == 2


async def test_the_read_timeout_fires_between_chunks_too(lean: LeanForwarder) -> None:
    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await reader.read()
        return False

    async with RawUpstream(handler) as url:
        response = await send(lean, url, read_timeout=0.2)
        assert await response.read() == b"hello"
        with pytest.raises(UpstreamFailure) as failure:
            await response.read()
        assert failure.value.timeout is True


async def test_a_refused_connection_is_an_upstream_failure(lean: LeanForwarder, closed_port: int) -> None:
    with pytest.raises(UpstreamFailure) as failure:
        await send(lean, f"http://127.0.0.1:{closed_port}")
    assert failure.value.timeout is False and lean._active == 0


async def test_request_bodies_go_as_is_with_a_length_and_chunked_without(lean: LeanForwarder) -> None:
    upstream = RawUpstream()
    async with upstream as url:
        await whole(await send(lean, url, "POST", [("content-length", "5")], body_of(b"he", b"llo")))
        await whole(await send(lean, url, "POST", [], body_of(b"he", b"", b"llo")))
        await whole(await send(lean, url, "POST"))
    with_length, chunked, empty = upstream.requests
    assert with_length.raw_body == b"hello" and with_length.header("transfer-encoding") is None
    assert chunked.header("transfer-encoding") == "chunked" and chunked.raw_body == b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"
    assert empty.header("content-length") == "0"  # as aiohttp: a POST without a body says so
    assert upstream.connections == 1


async def test_a_body_that_raises_fails_the_request_and_drops_the_connection(lean: LeanForwarder) -> None:
    async def too_large() -> AsyncIterator[bytes]:
        yield b"part"
        raise BodyTooLarge()

    upstream = RawUpstream()
    async with upstream as url:
        with pytest.raises(UpstreamFailure) as failure:
            await send(lean, url, "POST", [("content-length", "100")], too_large())
        assert failure.value.timeout is False
        await until(lambda: upstream.closed == 1, "the upstream saw the connection go")
        assert await whole(await send(lean, url)) == b"ok"
    assert upstream.connections == 2 and lean._active == 0


async def test_a_cancelled_read_drops_the_connection(lean: LeanForwarder) -> None:
    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        if request.connection == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
            await writer.drain()
            await reader.read()
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    upstream = RawUpstream(handler)
    async with upstream as url:
        response = await send(lean, url)
        assert await response.read() == b"hello"
        reading = asyncio.ensure_future(response.read())
        await asyncio.sleep(0.05)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        assert await whole(await send(lean, url)) == b"ok"
    assert upstream.connections == 2 and lean._active == 0


async def test_a_big_answer_read_slowly_is_not_buffered_whole(lean: LeanForwarder) -> None:
    size = 5 * 1024 * 1024

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()
        return True

    async with RawUpstream(handler) as url:
        response = await send(lean, url)
        assert isinstance(response, Response)
        got = most = 0
        paused = False
        while chunk := await response.read():
            got += len(chunk)
            await asyncio.sleep(0.002)  # a slow client
            conn = response.conn
            paused = paused or (conn is not None and conn.read_paused)
            most = max(most, response.buffered)
        assert got == size and paused
        assert most <= HIGH_WATER + 256 * 1024  # one socket read past the mark at most


async def test_the_pool_limit_holds_and_idle_connections_are_capped_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.upstream_h1.KEEPALIVE", 0.2)
    open_now = most = 0

    async def slow(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        await asyncio.sleep(0.05)
        open_now -= 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    upstream = RawUpstream(slow)
    lean = LeanForwarder(pool_size=3, max_idle=2)
    try:
        async with upstream as url:
            answers = await asyncio.gather(*(send(lean, url) for _ in range(9)))
            assert [await whole(a) for a in answers] == [b"ok"] * 9
            assert most == 3 and upstream.connections == 3  # three at a time, each reused
            assert sum(len(idle) for idle in lean._idle.values()) == 2  # the third was closed
            await until(lambda: upstream.closed == 3, "idle connections expired")
            assert not lean._idle and not lean._all
            assert await whole(await send(lean, url)) == b"ok"
            assert upstream.connections == 4
    finally:
        await lean.close()
    assert not lean._all


async def test_an_answer_dropped_unread_frees_its_connection_and_close_fails_one_in_flight(
    lean: LeanForwarder,
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"
    upstream = RawUpstream(answering(answer))
    async with upstream as url:
        response: UpstreamResponse | None = await send(lean, url)
        assert lean._active == 1
        response = None  # an exception between send and the last read: nobody closes it
        gc.collect()
        assert lean._active == 0
        await until(lambda: upstream.closed == 1, "the half-read connection was closed")
        reading = await send(lean, url)
        assert await reading.read() == b"hello"
        await lean.close()
        with pytest.raises(UpstreamFailure):
            await reading.read()
    assert response is None and upstream.connections == 2


async def refusing_first(request: RawRequest, reader: Reader, writer: Writer) -> bool:
    """An upstream that refuses its first connection's request with a 413 at once, without reading its body, and
    holds that connection until the forwarder hangs up; later connections are answered 200 ``ok``."""
    if request.connection == 0:
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        await reader.read()  # whatever else comes, until the forwarder hangs up
        return False
    return await answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")(request, reader, writer)  # type: ignore[no-any-return]


async def test_an_answer_before_the_body_is_sent_comes_at_once_and_its_connection_is_not_reused(
    lean: LeanForwarder,
) -> None:
    async def slow_body() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(30)  # a client that uploads slowly
        yield b"never"

    upstream = RawUpstream(refusing_first)
    async with upstream as url:
        response = await asyncio.wait_for(send(lean, url, "POST", [], slow_body()), 5)
        assert response.status == 413 and await whole(response) == b"no"
        assert await whole(await send(lean, url)) == b"ok"
    assert upstream.connections == 2 and lean._active == 0


def answering_first(answer: bytes, keep: bool = True, read: bool = True):  # type: ignore[no-untyped-def]
    """An upstream that answers as soon as the head is in, then reads the body (nginx's ``return``, say), or does
    not (``read``); it keeps the connection or closes it (``keep``)."""

    async def handler(request: RawRequest, reader: Reader, writer: Writer) -> bool:
        writer.write(answer)
        await writer.drain()
        if read:
            await read_body(reader, request)
        return keep

    return handler


async def test_a_success_before_the_body_is_sent_waits_for_the_body_and_its_connection_is_reused(
    lean: LeanForwarder,
) -> None:
    """Regression (issue 17): such an exchange used to abort its connection, one new connection per POST."""
    sent = asyncio.Event()

    async def client_body() -> AsyncIterator[bytes]:
        yield b"first,"
        await sent.wait()  # still uploading when the answer is in
        yield b"second"

    upstream = RawUpstream(answering_first(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    async with upstream as url:
        headers = [("content-length", "12")]
        response = await asyncio.wait_for(send(lean, url, "POST", headers, client_body()), 5)
        reading = asyncio.ensure_future(whole(response))
        await asyncio.sleep(0.1)
        assert response.status == 200 and not reading.done()  # the last byte waits for the body
        sent.set()
        assert await asyncio.wait_for(reading, 5) == b"ok"
        assert await whole(await send(lean, url, "POST", headers, body_of(b"again, again"))) == b"ok"
    assert [r.body for r in upstream.requests] == [b"first,second", b"again, again"]
    assert upstream.connections == 1 and lean._active == 0


@pytest.mark.parametrize(
    "answer", [b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]
)
async def test_an_empty_success_before_the_body_is_sent_also_waits_for_it(lean: LeanForwarder, answer: bytes) -> None:
    sent = asyncio.Event()

    async def client_body() -> AsyncIterator[bytes]:
        yield b"first,"
        await sent.wait()
        yield b"second"

    upstream = RawUpstream(answering_first(answer))
    async with upstream as url:
        response = await send(lean, url, "POST", [("content-length", "12")], client_body())
        reading = asyncio.ensure_future(whole(response))
        await asyncio.sleep(0.1)
        assert not reading.done()
        sent.set()
        assert await asyncio.wait_for(reading, 5) == b""
        assert await whole(await send(lean, url)) == b""
    assert [r.body for r in upstream.requests] == [b"first,second", b""] and upstream.connections == 1


async def test_a_success_before_the_body_whose_body_then_fails_closes_the_connection(lean: LeanForwarder) -> None:
    async def failing_body() -> AsyncIterator[bytes]:
        yield b"first,"
        await asyncio.sleep(0.1)
        raise BodyTooLarge()

    upstream = RawUpstream(answering_first(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    async with upstream as url:
        response = await send(lean, url, "POST", [("content-length", "100")], failing_body())
        assert await asyncio.wait_for(whole(response), 5) == b"ok"
        assert await whole(await send(lean, url)) == b"ok"
    assert upstream.connections == 2 and lean._active == 0


async def test_a_reader_cancelled_while_the_body_still_goes_frees_the_connection(lean: LeanForwarder) -> None:
    async def endless() -> AsyncIterator[bytes]:
        yield b"first,"
        await asyncio.sleep(30)
        yield b"never"

    upstream = RawUpstream(answering_first(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    async with upstream as url:
        response = await send(lean, url, "POST", [("content-length", "11")], endless())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(whole(response), 0.2)  # the client went away meanwhile
        await until(lambda: lean._active == 0, "the connection was freed")
        assert await whole(await send(lean, url)) == b"ok"
    assert upstream.connections == 2


@pytest.mark.parametrize("bad", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "\r\n"])
def test_a_cr_or_lf_in_a_header_is_refused_not_sent(bad: str) -> None:
    """Regression: a CRLF pair inside a value once slipped past a check that only compared CR, LF and CRLF counts."""
    url = upstream_url("http://127.0.0.1:9/")
    head, _, _ = request_head("GET", url, [("x-a", "ok"), ("host", "h")], False)
    assert head == b"GET / HTTP/1.1\r\nx-a: ok\r\nhost: h\r\n\r\n"
    for headers in ([("x-a", bad)], [(bad, "v")], [("host", bad)], [("host", "a"), ("host", bad)]):
        with pytest.raises(ValueError, match="Newline or carriage return"):
            request_head("GET", url, headers, False)
