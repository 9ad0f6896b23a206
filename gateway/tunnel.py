"""A WebSocket once admitted (gateway.websocket): its upstream socket, and the watchdog.

    connect    -> the upstream's socket (``open_upstream``, a gateway.upstream_ws.UpstreamSocket): no
                  redirects followed, the client's Host, no compression on this hop
    watchdog   -> once a second per worker: a socket whose session ended (logout, denylist) is
                  closed with 4401, one whose token expired with 4401 when
                  ``websocket.close_on_expiry``, an idle one with 1001; the messages the relay
                  (gateway.relay) counted on each socket are added to the metrics

Ping/pong is per hop: ASGI hands an application messages, not control frames, so uvicorn
answers (and sends) the client's pings and gateway.upstream_ws the upstream's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from websockets.client import ClientProtocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from gateway.config import WebSocketConfig
from gateway.denylist import Denylist
from gateway.metrics import Metrics
from gateway.reasons import Reason
from gateway.tls import UpstreamTLS
from gateway.types import Message, Send, StrHeaders
from gateway.upstream_ws import UpstreamSocket

log = logging.getLogger("gateway.websocket")


SESSION_ENDED = 4401  # the session behind the socket ended (logout, denylist) or its token expired
WATCH_INTERVAL = 1.0


class Tunnel:
    """One proxied socket as the watchdog sees it."""

    __slots__ = ("watch", "expires", "last_active", "to_upstream", "to_client", "stop")

    def __init__(self, watch: tuple[str, ...], expires: float | None) -> None:
        self.watch = watch  # denylist entries that end this socket (see gateway.families)
        self.expires = expires  # set when websocket.close_on_expiry: the token's exp
        self.last_active = time.monotonic()
        # Messages relayed each way since the metrics last took them: a counter's lock per message
        # was measurable in the relay (bench/websocket_bench.py), an int is not.
        self.to_upstream = self.to_client = 0
        self.stop: asyncio.Future[tuple[int, str, str]] = asyncio.get_running_loop().create_future()

    def end(self, code: int, reason: str, by: str) -> None:
        if not self.stop.done():
            self.stop.set_result((code, reason, by))


class Slot:
    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = False


async def open_upstream(
    url: str,
    headers: StrHeaders,
    subprotocols: list[str] | None,
    open_timeout: float,
    limits: WebSocketConfig,
    tls: UpstreamTLS | None = None,
) -> UpstreamSocket:
    """The upstream's socket, handshake done (raises InvalidStatus, InvalidHandshake, OSError, TimeoutError)."""
    uri = parse_uri(url)
    offered = [Subprotocol(s) for s in subprotocols] if subprotocols else None
    # No extensions offered: no compression on this hop. No redirect is followed: a 3xx is an InvalidStatus.
    protocol = ClientProtocol(uri, subprotocols=offered, max_size=limits.max_message_size)
    socket = UpstreamSocket(protocol, limits.max_message_size, limits.ping_interval or None)
    secure: dict[str, Any] = {}
    if uri.secure:  # the route's TLS, else the default context (as websockets' connect)
        secure = {"ssl": tls.context, "server_hostname": tls.server_name} if tls else {"ssl": True}
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(open_timeout):
            transport, _ = await loop.create_connection(lambda: socket, uri.host, uri.port, **secure)
            socket.connection_made(transport)  # uvloop calls it later: the request is written now
            await socket.handshake(headers)
    except BaseException:
        socket.abort()
        raise
    return socket


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
            self._count(tunnel)
            self._metrics.websocket_closed(by)

    def _count(self, tunnel: Tunnel) -> None:
        if tunnel.to_upstream or tunnel.to_client:
            self._metrics.websocket_messages(tunnel.to_upstream, tunnel.to_client)
            tunnel.to_upstream = tunnel.to_client = 0

    def sweep(self) -> None:
        """End the sockets whose session ended, whose token expired (when asked to) or that idled; count messages."""
        now, idle_since = self._clock(), time.monotonic() - self.config.idle_timeout
        for tunnel in list(self._open):
            self._count(tunnel)
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


def as_http(send: Send) -> Send:
    """A ``send`` that turns an HTTP answer into the WebSocket denial response (ASGI extension)."""

    async def send_http(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            await send({**message, "type": "websocket.http.response.start"})
        elif kind == "http.response.body":
            await send({**message, "type": "websocket.http.response.body"})

    return send_http
