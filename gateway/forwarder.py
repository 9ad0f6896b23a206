"""Forwarding to upstreams: a small ``Forwarder`` interface, its aiohttp implementation, and the read deadlines.

This module knows nothing of tokens; identity reaches it as plain headers. Bodies stream both
ways in chunks, so a 1 GB upload or download never sits in memory. aiohttp's client measured
~5x faster here than httpx as a proxy client (see bench/); it is now the reference
(``server.forwarder: aiohttp``), and the default is the gateway's own, leaner HTTP/1.1 client
(``upstream_h1.LeanForwarder``), which sends the same bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, istr
from yarl import URL

from gateway.errors import UpstreamFailure
from gateway.tls import UpstreamTLS, tls_failure
from gateway.types import StrHeaders

CHUNK = 64 * 1024


class UpstreamResponse(Protocol):
    """An upstream's answer: status and headers at once, the body read chunk by chunk.

    ``read()`` returns the next chunk, ``b""`` at the end, and raises ``UpstreamFailure`` when
    the upstream fails mid-body. ``at_eof()`` tells, after a read, that nothing more will come
    (so the last chunk can go out as the final one). ``close()`` gives up on the rest.
    """

    status: int
    headers: Sequence[tuple[bytes, bytes]]

    async def read(self) -> bytes: ...

    def at_eof(self) -> bool: ...

    def close(self) -> None: ...


async def chunks(response: UpstreamResponse) -> AsyncIterator[bytes]:
    """The rest of the body as an async iterator (for the paths that read it whole)."""
    while chunk := await response.read():
        yield chunk


def upstream_url(url: str) -> URL:
    """The URL to forward to, taken as already encoded: the canonical path goes out exactly as authorised."""
    return URL(url, encoded=True)


class Forwarder(Protocol):
    async def send(
        self,
        method: str,
        url: URL,
        headers: StrHeaders,
        body: AsyncIterator[bytes] | None,
        *,
        connect_timeout: float,
        read_timeout: float,
        tls: UpstreamTLS | None = None,
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class _ExactRequest(aiohttp.ClientRequest):
    """A request that adds no headers of its own: a proxy forwards what the client sent.

    aiohttp adds Accept, Accept-Encoding and User-Agent when absent (an Accept-Encoding the
    client never sent would bring back a compressed body it cannot read). Its per-request
    ``skip_auto_headers`` does this too, but rebuilds a multidict on every request (~3 % of
    the hot path here), so the defaults are switched off once, in the class.
    """

    DEFAULT_HEADERS: dict[istr, str] = {}
    _skip_auto_headers = CIMultiDict({"Content-Type": None})  # nor a default Content-Type on bodies

    def update_auto_headers(self, skip_auto_headers: object) -> None:
        return None

    def update_headers(self, headers: Any) -> None:
        # The session hands over a CIMultiDict it built for this request alone: one C-level copy
        # (the request adds Content-Length and the like to its own) instead of aiohttp's loop
        # over every header in Python. Host as aiohttp does it: the client's (the last one), or
        # the upstream's when the client sent none.
        if not isinstance(headers, CIMultiDict):
            super().update_headers(headers)
            return
        self.headers = headers
        hosts = self.headers.getall(hdrs.HOST, ())
        if len(hosts) != 1:
            self.headers[hdrs.HOST] = hosts[-1] if hosts else (self.url.host_port_subcomponent or "")


class Deadlines:
    """Read timeouts for many requests at once, checked by one periodic task.

    aiohttp's own read timeout (``sock_read``) starts, cancels and restarts an event-loop timer
    on every request and every chunk received: ~1 % of the instructions per request here, and
    3-5 % of throughput under load. Here a request only writes its deadline into a dict, and a
    sweeper that wakes every quarter of the shortest timeout in use (at most once a second)
    expires the overdue ones. A timeout therefore fires up to that much late: 60 s fires within
    61 s, 0.5 s within 0.625 s.
    """

    def __init__(self) -> None:
        self._due: dict[object, tuple[float, Callable[[], None]]] = {}
        self._period = 1.0
        self._sweeper: asyncio.Task[None] | None = None

    def arm(self, key: object, seconds: float, expire: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self._due[key] = (loop.time() + seconds, expire)
        if seconds < self._period * 4:
            self._period = max(seconds / 4, 0.01)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep(), name="upstream-deadlines")

    def disarm(self, key: object) -> None:
        self._due.pop(key, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._due:
                await asyncio.sleep(self._period)
                now = loop.time()
                overdue = [key for key, (when, _) in self._due.items() if when <= now]
                for key in overdue:
                    _, expire = self._due.pop(key)
                    expire()
        finally:
            self._sweeper = None

    def close(self) -> None:
        self._due.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class _Expired:
    """Cancels the request task waiting for an upstream's answer, and says it did."""

    __slots__ = ("task", "fired")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel()


def _as_multidict(headers: StrHeaders | None) -> CIMultiDict[str]:
    return CIMultiDict(headers or ())


class AiohttpForwarder:
    """Keep-alive connection pool to every upstream, sized for concurrency."""

    def __init__(self, *, pool_size: int = 512) -> None:
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float | None], aiohttp.ClientTimeout] = {}
        self._deadlines = Deadlines()

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=0, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bodies pass through as the upstream encoded them
            cookie_jar=aiohttp.DummyCookieJar(),  # never remember one user's cookies for the next
            request_class=_ExactRequest,
        )
        # aiohttp merges each request's headers into the session's defaults one by one, in
        # Python (~2 % of the hot path here). This session has no defaults: the merge is a copy.
        object.__setattr__(self._session, "_prepare_headers", _as_multidict)
        return self._session

    async def send(
        self,
        method: str,
        url: URL,
        headers: StrHeaders,
        body: AsyncIterator[bytes] | None,
        *,
        connect_timeout: float,
        read_timeout: float,
        tls: UpstreamTLS | None = None,
    ) -> UpstreamResponse:
        session = self._session or self._open()
        # A request with a body keeps aiohttp's read timeout: it must start once the body is
        # sent, however long a slow client takes to upload it. Without a body (most requests),
        # the deadlines above take over: the wait for the answer starts now, a chunk's at each read.
        reads = read_timeout if body is not None else None
        timeout = self._timeouts.get((connect_timeout, reads))
        if timeout is None:  # one per route, built once
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=reads)
            self._timeouts[(connect_timeout, reads)] = timeout
        expired = None
        if reads is None and (task := asyncio.current_task()) is not None:
            expired = _Expired(task)
            self._deadlines.arm(expired, read_timeout, expired)
        try:
            response = await session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
                # The route's context and name, per request: the pool keys connections by both, so one
                # session serves every route and generation (aiohttp's default: the system's CAs).
                ssl=tls.context if tls is not None else True,
                server_hostname=tls.server_name if tls is not None else None,
            )
        except asyncio.CancelledError:
            if expired is not None and expired.fired and expired.task.uncancel() == 0:
                raise UpstreamFailure(timeout=True) from None
            raise  # cancelled for another reason (shutdown): not ours to swallow
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamFailure(timeout=True) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamFailure(timeout=False, detail=tls_failure(url.origin(), exc)) from None
        finally:
            if expired is not None:
                self._deadlines.disarm(expired)
        return _AiohttpResponse(response, None if body is not None else self._deadlines, read_timeout)

    async def close(self) -> None:
        self._deadlines.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


class _AiohttpResponse:
    __slots__ = ("status", "headers", "_response", "_content", "_deadlines", "_read_timeout")

    def __init__(self, response: aiohttp.ClientResponse, deadlines: Deadlines | None, read_timeout: float) -> None:
        self.status = response.status
        self.headers: Sequence[tuple[bytes, bytes]] = response.raw_headers
        self._response = response
        self._content = response.content
        self._deadlines = deadlines  # None: aiohttp's own read timeout is on
        self._read_timeout = read_timeout

    def _expire(self) -> None:
        self._content.set_exception(aiohttp.ServerTimeoutError("upstream read timed out"))

    async def read(self) -> bytes:
        content = self._content
        try:
            if self._deadlines is None:
                chunk = await content.readany()
            else:
                # What has arrived already needs no deadline (a small body came with the head).
                chunk = content.read_nowait()
                if not chunk and not content.at_eof():
                    self._deadlines.arm(self, self._read_timeout, self._expire)
                    try:
                        chunk = await content.readany()
                    finally:
                        self._deadlines.disarm(self)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._response.release()
            raise UpstreamFailure(timeout=isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError)) from None
        if not chunk:
            self._response.release()
        return chunk

    def at_eof(self) -> bool:
        if self._content.at_eof():
            self._response.release()  # back to the pool (a no-op when aiohttp did it already)
            return True
        return False

    def close(self) -> None:
        self._response.release()
