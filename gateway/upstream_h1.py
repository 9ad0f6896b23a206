"""``LeanForwarder``: the ``forwarder.Forwarder`` on the gateway's own HTTP/1.1 client (``server.forwarder: lean``).

aiohttp's client was ~43 % of the gateway's Python time under load: a proxy needs little of it. This one keeps
pooled keep-alive connections per (scheme, host, port, TLS context, server name) on asyncio protocols
(``h1_connection``), writes the request head in one buffer, and parses answers with httptools. What reaches the
upstream is what ``AiohttpForwarder`` sends, byte for byte (tests/unit/test_forwarder_differential.py): the given
headers and nothing of its own but ``Host`` when none was given (the last one when several were),
``Content-Length: 0`` on a bodiless POST/PUT/PATCH/DELETE, and ``Transfer-Encoding: chunked`` on a body without a
length. Failures are aiohttp's: connect timeout and read timeout (``forwarder.Deadlines``) are 504s, refusal,
reset and TLS failures 502s (``tls.tls_failure`` names the latter). An idempotent request without a body that
fails on a reused connection before any byte of the answer (the upstream closed it while idle) is sent once
more on a new connection, as aiohttp does.

No task, timer or future per request but the waits themselves. A ``Content-Length`` body's first piece is read
before the head goes; when it is the whole body (as uvicorn hands over most bodies: all that came before the app
read), head and body leave in one write. The rest of a body is written by one task while the answer is awaited (as
aiohttp does), so an upstream that answers early is heard at once.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator

from yarl import URL

from gateway.errors import UpstreamFailure
from gateway.forwarder import Deadlines, UpstreamResponse
from gateway.h1_connection import Connection
from gateway.h1_response import Response
from gateway.tls import UpstreamTLS, tls_failure
from gateway.types import StrHeaders

KEEPALIVE = 30.0  # seconds an idle connection is kept (aiohttp's keepalive_timeout)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # aiohttp adds Content-Length: 0 to the others


def request_head(method: str, url: URL, headers: StrHeaders, body: bool) -> tuple[bytes, bool, bool]:
    """The request line and headers as one buffer; whether the body goes chunked; whether it waits for 100."""
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1\r\n"]
    ends = 2  # line ends written: the request line's and the blank line's, then one per header line
    host_at = -1  # where the first Host header's name is in lines
    host = ""
    hosts = 0
    length = expect = False
    for name, value in headers:
        lower = name.lower()
        if lower == "host":
            host, hosts = value, hosts + 1
            if hosts > 1:
                continue
            host_at = len(lines)
        elif lower == "content-length":
            length = True
        elif lower == "expect" and not expect:
            expect = value.lower() == "100-continue"
        lines += (name, ": ", value, "\r\n")
        ends += 1
    if not hosts:
        lines.append(f"Host: {url.host_port_subcomponent or ''}\r\n")
        ends += 1
    elif hosts > 1:  # the last one, where the first was, named as aiohttp's multidict names it
        lines[host_at], lines[host_at + 2] = "Host", host
    chunked = body and not length
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
        ends += 1
    elif not body and not length and method not in _BODILESS:
        lines.append("Content-Length: 0\r\n")
        ends += 1
    lines.append("\r\n")
    text = "".join(lines)
    if text.count("\n") != ends or text.count("\r") != ends:  # a CR or LF of a name or value's own: refused
        raise ValueError("Newline or carriage return character detected in HTTP status line or headers")
    return text.encode("utf-8"), chunked, expect and body


def declared_length(headers: StrHeaders) -> int:
    """A body's ``Content-Length``: one number (several differing, or not a number, is refused, never sent)."""
    values = {value.strip() for name, value in headers if name.lower() == "content-length"}
    value = values.pop() if len(values) == 1 else ""
    if not (value.isascii() and value.isdigit()):
        raise ValueError("invalid Content-Length")
    return int(value)


async def _first_piece(body: AsyncIterator[bytes] | None, length: int) -> bytes:
    """A ``Content-Length`` body's first piece, read before the head goes: it is usually the whole body (uvicorn
    has it when the app starts), which then goes out with the head in one write, with no writer task. A body
    that fails here (too large, the client gone) or gives more than its length fails the request, as one that
    fails while it is written does."""
    assert body is not None
    try:
        first = await anext(body, b"")
        past = len(first) > length or (len(first) == length and await _more(body))
    except Exception as exc:
        raise UpstreamFailure(timeout=False, detail=f"the request body: {type(exc).__name__}") from None
    if past:
        raise UpstreamFailure(timeout=False, detail="the request body is longer than its Content-Length")
    return first


async def _more(body: AsyncIterator[bytes]) -> bool:
    """Whether a body gives anything more (empty pieces are nothing)."""
    async for piece in body:
        if piece:
            return True
    return False


class LeanForwarder:
    """Keep-alive connections to every upstream: at most ``pool_size`` in use, ``max_idle`` idle per upstream."""

    def __init__(self, *, pool_size: int = 512, max_idle: int = 256) -> None:
        self._pool_size = pool_size
        self._max_idle = max_idle
        self._deadlines = Deadlines()
        self._idle: dict[object, list[Connection]] = {}
        self._all: set[Connection] = set()
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._cleanup: asyncio.TimerHandle | None = None
        self._default_tls: ssl.SSLContext | None = None

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
        method = method.upper()  # as aiohttp sends it
        try:
            head, chunked, expect = request_head(method, url, headers, body is not None)
            length = None if chunked or body is None else declared_length(headers)
        except ValueError as exc:
            raise UpstreamFailure(timeout=False, detail=str(exc)) from None
        first = await _first_piece(body, length) if length and not expect else b""
        whole = body is None or len(first) == length
        https = url.scheme == "https"
        key = (https, url.host, url.port, tls if https else None)
        retry = body is None and method in IDEMPOTENT
        fresh = False
        while True:
            conn = await self._acquire(key, url, tls if https else None, connect_timeout, fresh)
            response = Response(conn, method == "HEAD", self._deadlines, read_timeout)
            conn.start(response, head, first)
            # A whole body that the transport still holds is not sent: the writer waits for it (and an error
            # answered meanwhile stops it, the connection closed: Connection.finish), then the read timeout starts.
            response.body_sent = whole and (body is None or not conn.write_paused)
            if not response.body_sent and response.failure is None:
                assert body is not None  # the rest of it, or nothing more once it is whole
                rest = None if length is None else length - len(first)
                writing = conn.write_body(response, body, rest, expect, True)
                response.writer = asyncio.get_running_loop().create_task(writing)
            await response.wait(True, response.body_sent)  # with a body, the read timeout starts once it is sent
            if response.failure is None:
                return response
            if not (retry and response.retryable):
                raise response.failure
            retry, fresh = False, True  # the upstream closed it while idle: once more, on a new connection

    async def _acquire(self, key: object, url: URL, tls: UpstreamTLS | None, timeout: float, fresh: bool) -> Connection:
        loop = asyncio.get_running_loop()
        while True:
            idle = None if fresh else self._idle.get(key)
            while idle:
                conn = idle.pop()
                conn.idle = False
                transport = conn.transport
                if conn.dead or transport is None or transport.is_closing():
                    continue
                if loop.time() - conn.idle_since >= KEEPALIVE:
                    transport.close()
                    continue
                self._active += 1
                return conn
            if self._active < self._pool_size:
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # it was our turn: pass it on
                raise
        self._active += 1
        try:
            conn = await self._connect(key, url, tls, timeout)
        except BaseException:
            self._active -= 1
            self._wake_one()
            raise
        if not conn.dead:  # else it is lost already: nothing will take it out of _all
            self._all.add(conn)
        return conn

    async def _connect(self, key: object, url: URL, tls: UpstreamTLS | None, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        server_name = None
        if url.scheme == "https":
            context = tls.context if tls is not None else self._system_tls()
            server_name = (tls.server_name if tls is not None else None) or url.host
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, key),
                    url.raw_host or "",
                    url.port or 80,
                    ssl=context,
                    server_hostname=server_name,
                )
        except TimeoutError:
            raise UpstreamFailure(timeout=True) from None
        except (OSError, ValueError) as exc:
            raise UpstreamFailure(timeout=False, detail=tls_failure(url.origin(), exc)) from None
        return conn

    def _system_tls(self) -> ssl.SSLContext:
        """aiohttp's default for https without a route ``tls``: the system's CAs, ALPN http/1.1."""
        if self._default_tls is None:
            self._default_tls = ssl.create_default_context()
            self._default_tls.set_alpn_protocols(["http/1.1"])
        return self._default_tls

    # --- the pool (h1_connection.Owner) ---------------------------------------------------------------

    def release(self, conn: Connection, reusable: bool) -> None:
        """An exchange is over: ``conn`` goes idle when ``reusable``, else it is closed."""
        self._active -= 1
        transport = conn.transport
        if reusable and transport is not None and not transport.is_closing():
            idle = self._idle.get(conn.key)
            if idle is None:
                idle = self._idle[conn.key] = []
            if len(idle) < self._max_idle or self._waiters:  # over the cap only for a request waiting
                loop = asyncio.get_running_loop()
                conn.idle, conn.idle_since = True, loop.time()
                idle.append(conn)
                if self._cleanup is None:
                    self._cleanup = loop.call_later(KEEPALIVE / 2, self._expire_idle)
                self._wake_one()
                return
        if transport is not None:
            transport.close()
        self._wake_one()

    def lost(self, conn: Connection) -> None:
        """``conn`` is closed (by either side)."""
        self._all.discard(conn)
        if conn.idle:
            conn.idle = False
            idle = self._idle.get(conn.key)
            if idle is not None and conn in idle:
                idle.remove(conn)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expire_idle(self) -> None:
        """Close connections idle for ``KEEPALIVE`` seconds (one timer for the pool, every half of it)."""
        self._cleanup = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key, idle in list(self._idle.items()):
            keep = [conn for conn in idle if now - conn.idle_since < KEEPALIVE]
            for conn in idle:
                if now - conn.idle_since >= KEEPALIVE and conn.transport is not None:
                    conn.idle = False
                    conn.transport.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._cleanup = loop.call_later(KEEPALIVE / 2, self._expire_idle)

    async def close(self) -> None:
        """Close every connection, idle or in use; the forwarder can be used again afterwards."""
        self._deadlines.close()
        if self._cleanup is not None:
            self._cleanup.cancel()
            self._cleanup = None
        self._idle.clear()
        for conn in list(self._all):
            conn.idle = False
            if (response := conn.current()) is not None:
                response.fail(UpstreamFailure(timeout=False, detail="the forwarder was closed"))
            conn.drop()
        self._all.clear()
        await asyncio.sleep(0)  # let the transports close
