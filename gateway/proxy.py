"""Forwarding to upstreams: a small ``Forwarder`` interface and its aiohttp implementation.

This module knows nothing of tokens; identity reaches it as plain headers. Bodies stream both
ways in chunks, so a 1 GB upload or download never sits in memory. aiohttp's client is the hot
path because it measured ~5x faster here than httpx as a proxy client (see bench/).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, istr
from yarl import URL

Headers = list[tuple[str, str]]  # request headers, latin-1 decoded (as aiohttp takes them)
CHUNK = 64 * 1024


class UpstreamFailure(Exception):
    """The upstream could not be reached or did not answer in time; ``timeout`` tells which."""

    def __init__(self, timeout: bool) -> None:
        self.timeout = timeout
        super().__init__("upstream timed out" if timeout else "upstream refused or reset the connection")


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
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        *,
        connect_timeout: float,
        read_timeout: float,
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
        self.headers = CIMultiDict(headers)
        hosts = self.headers.getall(hdrs.HOST, ())
        if len(hosts) != 1:
            self.headers[hdrs.HOST] = hosts[-1] if hosts else (self.url.host_port_subcomponent or "")


class AiohttpForwarder:
    """Keep-alive connection pool to every upstream, sized for concurrency."""

    def __init__(self, *, pool_size: int = 512) -> None:
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=0, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bodies pass through as the upstream encoded them
            cookie_jar=aiohttp.DummyCookieJar(),  # never remember one user's cookies for the next
            request_class=_ExactRequest,
        )
        return self._session

    async def send(
        self,
        method: str,
        url: URL,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> UpstreamResponse:
        session = self._session or self._open()
        timeout = self._timeouts.get((connect_timeout, read_timeout))
        if timeout is None:  # one per route, built once
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
            self._timeouts[(connect_timeout, read_timeout)] = timeout
        try:
            response = await session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamFailure(timeout=True) from None
        except (aiohttp.ClientError, OSError, ValueError):
            raise UpstreamFailure(timeout=False) from None
        return _AiohttpResponse(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _AiohttpResponse:
    __slots__ = ("status", "headers", "_response", "_content")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status = response.status
        self.headers: Sequence[tuple[bytes, bytes]] = response.raw_headers
        self._response = response
        self._content = response.content

    async def read(self) -> bytes:
        try:
            chunk = await self._content.readany()
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
