"""Both forwarders (aiohttp and lean) against a raw TCP server that records the request bytes it receives.

The forwarding client must send exactly the headers it is given (nothing of its own), one Host
header whatever the client sent, and stream the body back chunk by chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from support.waiting import until

from gateway.errors import UpstreamFailure
from gateway.forwarder import AiohttpForwarder, Forwarder, chunks, upstream_url
from gateway.upstream_h1 import LeanForwarder


class Recorder:
    """Answers every request with a fixed body after recording the request head."""

    def __init__(self, body: bytes = b"hello") -> None:
        self.heads: list[bytes] = []
        self.body = body
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Up: 1\r\n\r\n%s" % (len(self.body), self.body))
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def header_lines(self) -> list[str]:
        return self.heads[-1].decode("latin-1").split("\r\n")[1:-2]


@pytest.fixture(params=["aiohttp", "lean"])
async def forwarder(request: pytest.FixtureRequest) -> AsyncIterator[Forwarder]:
    forwarder: Forwarder = AiohttpForwarder() if request.param == "aiohttp" else LeanForwarder()
    yield forwarder
    await forwarder.close()


async def fetch(forwarder: Forwarder, url: str, headers: list[tuple[str, str]]) -> bytes:
    response = await forwarder.send("GET", upstream_url(url), headers, None, connect_timeout=5, read_timeout=5)
    assert response.status == 200 and (b"X-Up", b"1") in response.headers
    return b"".join([chunk async for chunk in chunks(response)])


async def test_sends_exactly_the_given_headers(forwarder: Forwarder) -> None:
    recorder = Recorder()
    async with recorder as url:
        body = await fetch(forwarder, url + "/a?b=1", [("host", "app.example"), ("x-auth-user", "alice")])
    assert body == b"hello"
    assert recorder.heads[-1].startswith(b"GET /a?b=1 HTTP/1.1\r\n")
    assert recorder.header_lines() == ["host: app.example", "x-auth-user: alice"]


async def test_one_host_header_whatever_the_client_sent(forwarder: Forwarder) -> None:
    recorder = Recorder()
    async with recorder as url:
        await fetch(forwarder, url, [("host", "first.example"), ("accept", "*/*"), ("host", "second.example")])
        doubled = [line for line in recorder.header_lines() if line.lower().startswith("host:")]
        await fetch(forwarder, url, [("accept", "*/*")])
        hostless = [line for line in recorder.header_lines() if line.lower().startswith("host:")]
    assert [h.lower() for h in doubled] == ["host: second.example"]  # as aiohttp itself does: the last one
    assert [h.lower() for h in hostless] == [f"host: {url.removeprefix('http://')}"]


async def test_unreachable_upstream_is_an_upstream_failure(forwarder: Forwarder, closed_port: int) -> None:
    with pytest.raises(UpstreamFailure) as failure:
        await forwarder.send(
            "GET", upstream_url(f"http://127.0.0.1:{closed_port}/"), [], None, connect_timeout=2, read_timeout=2
        )
    assert failure.value.timeout is False


class Silent:
    """Accepts connections and reads requests, then says nothing (or only a head and part of a body)."""

    def __init__(self, answer: bytes = b"") -> None:
        self.answer = answer
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.requests = 0  # request heads received so far

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        writer.write(self.answer)
        await reader.read()  # until the gateway hangs up

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for writer in self.writers:
            writer.close()
        self.server.close()


async def test_no_answer_within_the_read_timeout_is_a_timeout(forwarder: Forwarder) -> None:
    async with Silent() as url:
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamFailure) as failure:
            await forwarder.send("GET", upstream_url(url), [], None, connect_timeout=2, read_timeout=0.2)
        assert failure.value.timeout is True
        assert asyncio.get_running_loop().time() - started < 1.5
        # The timeout's cancellation was taken back: the request's task goes on undisturbed.
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.01)  # a cancellation still pending for this task would be raised here


async def test_a_body_that_stops_coming_is_a_timeout(forwarder: Forwarder) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"
    async with Silent(head) as url:
        response = await forwarder.send("GET", upstream_url(url), [], None, connect_timeout=2, read_timeout=0.2)
        assert await response.read() == b"hello"
        with pytest.raises(UpstreamFailure) as failure:
            await response.read()
        assert failure.value.timeout is True


async def test_a_cancelled_request_stays_cancelled(forwarder: Forwarder) -> None:
    # Cancellation from outside (a server shutting down) is not a timeout, even when the read
    # timeout fires while it is under way.
    silent = Silent()
    async with silent as url:
        request = asyncio.create_task(
            forwarder.send("GET", upstream_url(url), [], None, connect_timeout=2, read_timeout=30)
        )
        await until(lambda: silent.requests == 1, "the request reached the upstream")
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        # Both at once: the deadline expires (fired here by hand, in the same loop step) and the
        # task is cancelled from outside. The outside cancellation wins.
        both = asyncio.create_task(
            forwarder.send("GET", upstream_url(url), [], None, connect_timeout=2, read_timeout=30)
        )
        await until(
            lambda: silent.requests == 2 and bool(forwarder._deadlines._due),  # type: ignore[attr-defined]
            "the request is waiting for its answer, its read deadline set",
        )
        for _, expire in list(forwarder._deadlines._due.values()):  # type: ignore[attr-defined]
            expire()
        both.cancel()
        with pytest.raises(asyncio.CancelledError):
            await both


async def test_timeouts_still_fire_after_the_forwarder_was_closed_and_reused(forwarder: Forwarder) -> None:
    async with Silent() as url:
        with pytest.raises(UpstreamFailure):
            await forwarder.send("GET", upstream_url(url), [], None, connect_timeout=2, read_timeout=0.1)
        await forwarder.close()  # e.g. the app's shutdown, then another start in the same process
        with pytest.raises(UpstreamFailure) as failure:
            await asyncio.wait_for(
                forwarder.send("GET", upstream_url(url), [], None, connect_timeout=2, read_timeout=0.1), 3
            )
        assert failure.value.timeout is True


async def test_a_connect_that_does_not_complete_in_time_is_a_timeout(forwarder: Forwarder) -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, so the connect hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    try:
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamFailure) as failure:
            await forwarder.send(
                "GET", upstream_url(f"http://127.0.0.1:{port}/"), [], None, connect_timeout=0.3, read_timeout=5
            )
        assert failure.value.timeout is True
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        for sock in (*fillers, listener):
            sock.close()
