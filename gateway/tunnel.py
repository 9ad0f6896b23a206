"""A WebSocket once admitted (gateway.websocket): relayed both ways, and watched.

    relay      -> text and binary messages both ways, each ``send`` awaited (backpressure: a slow
                  reader slows its writer instead of filling memory); close codes pass through
    watchdog   -> once a second per worker: a socket whose session ended (logout, denylist) is
                  closed with 4401, one whose token expired with 4401 when
                  ``websocket.close_on_expiry``, an idle one with 1001

Ping/pong is per hop: ASGI hands an application messages, not control frames, so uvicorn
answers (and sends) the client's pings and the ``websockets`` client the upstream's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, PayloadTooBig
from websockets.http11 import Request

from gateway.config import WebSocketConfig
from gateway.denylist import Denylist
from gateway.metrics import Metrics
from gateway.reasons import Reason
from gateway.tls import UpstreamTLS
from gateway.types import Message, Receive, Send, StrHeaders

log = logging.getLogger("gateway.websocket")


SESSION_ENDED = 4401  # the session behind the socket ended (logout, denylist) or its token expired
WATCH_INTERVAL = 1.0
CLOSE_TIMEOUT = 5.0  # seconds a closing handshake may take on either side
# Codes that may not be sent in a close frame (RFC 6455 §7.4.1): 1005/1006/1015 only describe one.
_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def sendable(code: int | None, fallback: int) -> int:
    if code is None or code in _UNSENDABLE or not (1000 <= code <= 4999) or 1016 <= code < 3000:
        return fallback
    return code


class Tunnel:
    """One proxied socket as the watchdog sees it."""

    __slots__ = ("watch", "expires", "last_active", "stop")

    def __init__(self, watch: tuple[str, ...], expires: float | None) -> None:
        self.watch = watch  # denylist entries that end this socket (see gateway.families)
        self.expires = expires  # set when websocket.close_on_expiry: the token's exp
        self.last_active = time.monotonic()
        self.stop: asyncio.Future[tuple[int, str, str]] = asyncio.get_running_loop().create_future()

    def end(self, code: int, reason: str, by: str) -> None:
        if not self.stop.done():
            self.stop.set_result((code, reason, by))


class Slot:
    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = False


class _UpstreamConnection(ClientConnection):
    """A client connection whose handshake carries the Host the gateway gives it.

    ``websockets`` writes a Host for the URL, then appends the caller's headers: a Host passed in
    would make two. The last one (ours: the client's Host, as the HTTP path forwards it) stays.
    """

    def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
        super().__init__(protocol, **kwargs)
        send_request = protocol.send_request

        def send_one_host(request: Request) -> None:
            hosts = request.headers.get_all("Host")
            if len(hosts) > 1:
                del request.headers["Host"]
                request.headers["Host"] = hosts[-1]
            send_request(request)

        protocol.send_request = send_one_host  # type: ignore[method-assign]


class connect_upstream(connect):  # noqa: N801 - used as a function, as websockets' own connect
    """``websockets``' connect without following redirects: an upstream's 3xx goes back to the
    client as its answer, as on the HTTP path (following one would send the identity headers to
    wherever it points)."""

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, create_connection=_UpstreamConnection, **kwargs)

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


async def open_upstream(
    url: str,
    headers: StrHeaders,
    subprotocols: list[str] | None,
    open_timeout: float,
    limits: WebSocketConfig,
    tls: UpstreamTLS | None = None,
) -> ClientConnection:
    """The upstream's socket, opened with the gateway's settings (raises what ``connect`` raises)."""
    # wss:// with the route's TLS (else websockets' default context); ws:// takes no TLS arguments.
    secure = {"ssl": tls.context, "server_hostname": tls.server_name} if tls and url.startswith("wss:") else {}
    return await connect_upstream(
        url,
        additional_headers=headers,
        subprotocols=subprotocols or None,
        open_timeout=open_timeout,
        max_size=limits.max_message_size,
        ping_interval=limits.ping_interval or None,
        compression=None,  # each hop negotiates its own; none here saves CPU on both
        max_queue=4,  # messages read ahead from the upstream: with backpressure, 4 x max_size at most
        close_timeout=5,
        user_agent_header=None,
        proxy=None,  # never an HTTP(S)_PROXY from the environment: upstreams are local
        **secure,
    )


class Sockets:
    """The open sockets of this worker, and the watchdog that ends them."""

    def __init__(self, denylist: Denylist, metrics: Metrics, clock: Callable[[], float]) -> None:
        self._denylist = denylist
        self._metrics = metrics
        self._clock = clock
        self._open: set[Tunnel] = set()
        self._pending = 0  # handshakes in progress that hold a slot
        self._watchdog: asyncio.Task[None] | None = None
        self.config = WebSocketConfig()  # the serving generation's settings (set on each pipeline start)

    def __len__(self) -> int:
        return len(self._open)

    def reserve(self, limit: int) -> Slot | None:
        """A place for one more socket, held through the handshake; None when the worker is full."""
        if len(self._open) + self._pending >= limit:
            return None
        self._pending += 1
        return Slot()

    def release(self, slot: Slot) -> None:
        if not slot.used:
            slot.used = True
            self._pending -= 1

    def add(self, tunnel: Tunnel, slot: Slot) -> None:
        self.release(slot)  # the open socket now counts itself
        self._open.add(tunnel)
        self._metrics.websocket_opened()
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name="websocket-watchdog")

    def discard(self, tunnel: Tunnel, by: str) -> None:
        if tunnel in self._open:
            self._open.discard(tunnel)
            self._metrics.websocket_closed(by)

    def sweep(self) -> None:
        """End the sockets whose session ended, whose token expired (when asked to) or that idled."""
        now, idle_since = self._clock(), time.monotonic() - self.config.idle_timeout
        for tunnel in list(self._open):
            if any(key in self._denylist for key in tunnel.watch):
                tunnel.end(SESSION_ENDED, "session ended", Reason.SESSION_ENDED)
            elif tunnel.expires is not None and now >= tunnel.expires:
                tunnel.end(SESSION_ENDED, "token expired", Reason.TOKEN_EXPIRED)
            elif self.config.idle_timeout and tunnel.last_active < idle_since:
                tunnel.end(1001, "idle timeout", "idle")

    async def _watch(self) -> None:
        while self._open:
            await asyncio.sleep(WATCH_INTERVAL)
            self.sweep()

    async def close(self) -> None:
        """Shutdown: every socket is told the server is going away."""
        for tunnel in list(self._open):
            tunnel.end(1001, "gateway shutting down", "shutdown")
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog


async def relay(
    tunnel: Tunnel, receive: Receive, send: Send, upstream: ClientConnection, metrics: Metrics, max_size: int
) -> str:
    """Relay messages until one side closes or the watchdog ends the socket; say who ended it.

    A message is held to ``max_size`` as sent, decompressed (uvicorn reads the client's up to
    ``limits.frame_allowance``; the upstream hop negotiates no compression and reads up to ``max_size``).
    """
    text_chars = max_size // 4  # a text of no more characters cannot be over the limit in UTF-8

    async def from_client() -> tuple[str, int, str]:
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                    if len(data) > max_size:
                        return "too_big", 1009, "message too big"
                elif len(data) > text_chars and utf8_size(data) > max_size:
                    return "too_big", 1009, "message too big"
                tunnel.last_active = time.monotonic()
                try:
                    await upstream.send(data)
                except ConnectionClosed:
                    return "upstream", upstream.close_code or 1006, upstream.close_reason or ""
                metrics.ws_to_upstream.inc()
            elif message["type"] == "websocket.disconnect":
                return "client", message.get("code", 1005), message.get("reason") or ""

    async def from_upstream() -> tuple[str, int, str]:
        try:
            async for data in upstream:
                tunnel.last_active = time.monotonic()
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
                metrics.ws_to_client.inc()
        except ConnectionClosed:
            if isinstance(upstream.protocol.parser_exc, PayloadTooBig):
                return "too_big", 1009, "message too big"
        except (OSError, RuntimeError):  # the client went away (or was closed by the server) mid-send
            return "client", 1006, ""
        return "upstream", upstream.close_code or 1006, upstream.close_reason or ""

    client = asyncio.ensure_future(from_client())
    server = asyncio.ensure_future(from_upstream())
    try:
        waiting: set[asyncio.Future[Any]] = {client, server, tunnel.stop}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (client, server):
            task.cancel()
        # Collected, so that nothing is left running or unretrieved, but never waited on for
        # long: a client that stopped reading must not hold its slot (and its upstream) forever.
        await asyncio.wait([client, server], timeout=CLOSE_TIMEOUT)
    return await _close_both(tunnel, send, upstream, client, server)


async def _close_both(
    tunnel: Tunnel,
    send: Send,
    upstream: ClientConnection,
    client: asyncio.Future[tuple[str, int, str]],
    server: asyncio.Future[tuple[str, int, str]],
) -> str:
    """Close each side as the end requires; who ended it."""
    if tunnel.stop.done():
        code, reason, by = tunnel.stop.result()
        await _close_client(send, code, reason)
        await _close_upstream(upstream, 1001, reason)
        return by
    done = client if client.done() and not client.cancelled() and client.exception() is None else server
    if done.cancelled() or done.exception() is not None:
        await _close_client(send, 1011, "gateway error")
        await _close_upstream(upstream, 1011, "gateway error")
        return "error"
    by, code, reason = done.result()
    if by == "client":
        # The client's close code goes upstream; a vanished client (1006) is "going away".
        await _close_upstream(upstream, sendable(code, 1001), reason)
    elif by == "too_big":  # either way: the upstream's hop is closed already when it sent the message
        await _close_client(send, code, reason)
        await _close_upstream(upstream, 1001, "client sent a message too big")
    else:
        # The upstream's close code comes back to the client; a vanished upstream is 1014 (bad gateway).
        await _close_client(send, sendable(code, 1014 if code == 1006 else 1000), reason)
    return by


async def _close_client(send: Send, code: int, reason: str) -> None:
    # Bounded: the close frame waits for a writable socket, which a client that stopped
    # reading never gives; the server drops the connection when the application returns.
    with contextlib.suppress(OSError, RuntimeError, TimeoutError):  # the client may be gone already
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await send({"type": "websocket.close", "code": code, "reason": reason[:120]})


async def _close_upstream(upstream: ClientConnection, code: int, reason: str) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await upstream.close(code, reason[:120])


def as_http(send: Send) -> Send:
    """A ``send`` that turns an HTTP answer into the WebSocket denial response (ASGI extension)."""

    async def send_http(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            await send({**message, "type": "websocket.http.response.start"})
        elif kind == "http.response.body":
            await send({**message, "type": "websocket.http.response.body"})

    return send_http
