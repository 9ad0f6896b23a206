"""A WebSocket once admitted (gateway.websocket): its upstream socket, and the watchdog.

    connect    -> the upstream's socket (``open_upstream``): no redirects followed, the client's Host,
                  no compression on this hop
    watchdog   -> once a second per worker: a socket whose session ended (logout, denylist) is
                  closed with 4401, one whose token expired with 4401 when
                  ``websocket.close_on_expiry``, an idle one with 1001; the messages the relay
                  (gateway.relay) counted on each socket are added to the metrics

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
from websockets.http11 import Request

from gateway.config import WebSocketConfig
from gateway.denylist import Denylist
from gateway.metrics import Metrics
from gateway.reasons import Reason
from gateway.tls import UpstreamTLS
from gateway.types import Message, Send, StrHeaders

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
