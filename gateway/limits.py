"""Limits on what one client may send and hold, enforced where uvicorn reads the bytes.

uvicorn's httptools protocol has no limit on a request's head (llhttp keeps none of its own: one
50 MB header was read whole and forwarded), no deadline for receiving it (a connection that sends
nothing, or a header line every few seconds, stayed open for good), and its ``limit_concurrency``
refuses requests on connections already open once the cap is reached. ``LimitedHttpTools`` extends
that protocol, as ``client_h1.ClientH1`` (the leaner body and answer path), with ``server.limits``:

    head bytes      over ``header_bytes``, 431 ``headers_too_large``
    header count    over ``header_count``, 431 ``too_many_headers``
    trailers        fields after a chunked body, which llhttp hands over as headers: counted with them,
                    their bytes held to ``header_bytes``; over, the connection is closed
    head deadline   from a connection's accept (its first request) or a request's first byte (later
                    ones) to the end of its head: over ``header_timeout``, 408 ``header_timeout`` when
                    part of a request came, else a silent close
    connections     HTTP connections open in this worker: a connection over ``max_connections`` gets
                    503 ``connection_limit`` for its first request; those already open go on
    idle keep-alive uvicorn's own timer, ``timeout_keep_alive`` = ``idle_timeout`` (``server_options``)

Every refusal is answered here, before the app is called, and closes the connection.

The hot path gains a few comparisons per request, no callback per header and no timer: a head is
checked once complete (its size measured only when the bytes fed since the last head exceed the
limit), and after every chunk that leaves it unfinished, so an endless header line, or endless
small ones, are cut as they arrive (at most one read past the limit: 256 000 bytes with uvloop).
Deadlines are one sweep per worker (``Connections``) every quarter of ``header_timeout``, not a
timer per request.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import weakref
from http import HTTPStatus
from typing import Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.client_h1 import ClientH1
from gateway.client_ws import ClientHop
from gateway.config import LimitsConfig, WebSocketConfig
from gateway.reasons import Reason
from gateway.responses import NO_STORE, RETRY_AFTER, http_date, status_for

log = logging.getLogger("gateway")


def server_options(limits: LimitsConfig) -> dict[str, Any]:
    """The ``uvicorn.Config`` options that put ``limits`` in force (``gateway serve`` and ``gateway demo``).

    Always httptools, as ``LimitedHttpTools``: uvicorn's h11 and plain httptools protocols keep none
    of these limits, so neither is ever chosen. The protocol is a ``functools.partial``, not a class
    made on the fly, so that it pickles into the worker processes uvicorn spawns; uvicorn only ever
    calls it, as it would call the class.
    """
    protocol = cast(type[asyncio.Protocol], functools.partial(LimitedHttpTools, limits=limits))
    return {"http": protocol, "timeout_keep_alive": limits.idle_timeout}


def websocket_options(websocket: WebSocketConfig) -> dict[str, Any]:
    """The ``uvicorn.Config`` options of the client hop's WebSockets (the upstream hop's: ``tunnel.open_upstream``).

    ``websocket.max_message_size`` counts a message as sent, decompressed (issue 17). uvicorn's ``websockets``
    protocol checks each frame's length on the wire against ``ws_max_size`` before it inflates it, so that a
    compressed frame of a message of exactly the limit, a few bytes longer when it barely compresses, was refused:
    uvicorn is given ``frame_allowance`` instead, and ``relay.relay`` holds the message itself to the limit.
    Inflating stops at ``ws_max_size`` (a deflate bomb is never inflated whole). Always the sans-I/O ``websockets``
    protocol, the one these semantics are known for, with the fast paths of ``client_ws.ClientHop``.
    """
    return {
        "ws": ClientHop,
        "ws_max_size": frame_allowance(websocket.max_message_size),
        "ws_ping_interval": websocket.ping_interval or None,
    }


def frame_allowance(max_size: int) -> int:
    """The most bytes a message of ``max_size`` bytes takes once deflated: zlib's ``deflateBound`` for any settings
    (stored and fixed-Huffman blocks included), plus room for the empty blocks of a flush per frame."""
    return max_size + (max_size + 7) // 8 + (max_size + 63) // 64 + 64


def refusal(reason: Reason) -> bytes:
    """The whole answer for ``reason``, as written to the socket: small JSON, as ``responses.send_denial`` makes."""
    status, error = status_for(reason)
    body = json.dumps({"error": error, "reason": reason}, separators=(",", ":")).encode()
    lines = [
        b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode()),
        b"date: " + http_date(),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"%s: %s" % NO_STORE,
        b"connection: close",
    ]
    if status == 503:
        lines.append(b"retry-after: " + RETRY_AFTER)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _Refused(Exception):
    """Raised in a parser callback to stop httptools at once; the reason is on the protocol."""


class Connections:
    """The HTTP connections of one worker: how many are open, and the sweep that ends overdue heads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, header_timeout: float) -> None:
        self.open: set[LimitedHttpTools] = set()
        self.header_timeout = header_timeout
        self._loop = loop
        self._period = min(max(header_timeout / 4, 0.05), 1.0)
        self._timer: asyncio.TimerHandle | None = None

    def add(self, connection: LimitedHttpTools) -> int:
        """Count ``connection`` in; how many are open now, it included."""
        self.open.add(connection)
        if self._timer is None:
            self._timer = self._loop.call_later(self._period, self._tick)
        return len(self.open)

    def discard(self, connection: LimitedHttpTools) -> None:
        self.open.discard(connection)

    def _tick(self) -> None:
        self._timer = None
        self.sweep(self._loop.time())
        if self.open:
            self._timer = self._loop.call_later(self._period, self._tick)

    def sweep(self, now: float) -> None:
        """End every connection whose awaited head began more than ``header_timeout`` before ``now``."""
        oldest = now - self.header_timeout
        for connection in [c for c in self.open if 0.0 < c.head_since < oldest]:
            connection.head_overdue()


# One Connections per uvicorn server (one per worker process; several in a test process).
_workers: weakref.WeakKeyDictionary[ServerState, Connections] = weakref.WeakKeyDictionary()


def _connections(state: ServerState, loop: asyncio.AbstractEventLoop, header_timeout: float) -> Connections:
    found = _workers.get(state)
    if found is None:
        found = _workers[state] = Connections(loop, header_timeout)
    return found


class LimitedHttpTools(ClientH1):
    """uvicorn's httptools protocol with the limits of ``server.limits`` (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: LimitsConfig,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._max_bytes = limits.header_bytes
        self._max_count = limits.header_count
        self._max_connections = limits.max_connections
        self._connections = _connections(server_state, self.loop, limits.header_timeout)
        self.head_since = 0.0  # loop time the awaited head began at; 0.0: none awaited
        self._unfinished = 0  # bytes of chunks that began and ended inside the awaited head
        self._fed = 0  # bytes fed since the last head ended: at least the size of the next head
        self._chunk = 0  # size of the chunk being fed
        self._framing = 0  # bytes fed during a body without any of it: chunk framing, trailer fields
        self._bodied = False  # body bytes came in the chunk being fed
        self._fields = 0  # header fields of the head being served (trailer fields come after them)
        self._refusal: Reason | None = None
        self._over_cap = False
        self._counted = False

    # --- the connection ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._counted = True
        self._over_cap = self._connections.add(self) > self._max_connections
        self.head_since = self.loop.time()  # the first head is due from the accept: silence is not free

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._leave()  # a WebSocket counts against websocket.max_connections from here on
        super().handle_websocket_upgrade()

    def _leave(self) -> None:
        if self._counted:
            self._counted = False
            self._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.held.head is not None:  # what these bytes make us write (a 400, a refusal) comes after it
            self.flush_held()
        self._unset_keepalive_if_required()
        self._chunk = size = len(data)
        self._fed += size
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refusal is not None:
                self.refuse(self._refusal)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        # head_since is set here (or at the accept) and cleared when a head ends: still set, it was set before
        # this chunk, and no head ended in it.
        if self.head_since > 0.0:
            self._unfinished_head()
        elif self.scope is not None and "method" not in self.scope:  # a head began in this chunk and goes on
            self.head_since = self.loop.time()
        elif self.cycle is not None and (self.cycle.more_body or len(self.headers) > self._max_count):
            self._body_chunk()

    def _unfinished_head(self) -> None:
        """After a chunk that began and ended inside a head: the head so far must be within the limits, so that
        an endless header line, or endless small ones, are cut as they come."""
        self._unfinished += self._chunk
        if self._unfinished > self._max_bytes:
            self.refuse(Reason.HEADERS_TOO_LARGE)
        elif self.headers is not None and len(self.headers) > self._max_count:
            self.refuse(Reason.TOO_MANY_HEADERS)

    def _body_chunk(self) -> None:
        """After a chunk of a request's body. llhttp hands the trailer fields after a chunked body to on_header,
        and uvicorn appends them to the headers the app holds: header and trailer fields together are held to
        ``header_count``, trailer bytes to ``header_bytes`` (over either, the connection is closed, and the app
        keeps the headers it saw)."""
        if self._bodied:
            self._bodied = False
            self._framing = 0
        elif self.cycle.more_body:
            self._framing += self._chunk
        if len(self.headers) > self._max_count:
            del self.headers[self._fields :]
            self.refuse(Reason.TOO_MANY_HEADERS)
        elif self._framing > self._max_bytes:
            self.refuse(Reason.HEADERS_TOO_LARGE)

    def refuse(self, reason: Reason) -> None:
        """Answer ``reason`` (unless a response is being written on this connection already) and close."""
        self.head_since = 0.0
        if self.transport.is_closing():
            return
        self.flush_held()
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(refusal(reason))
        log.info("refused %s from %s", reason, self.client[0] if self.client else "-")
        self.transport.close()

    def head_overdue(self) -> None:
        """The head was not complete in time: 408 if some of a request came, else just close. Not while uvicorn
        has stopped reading (a request queued behind the one being answered, a body the app has not read): the
        rest of the head may be waiting on this side; its time starts again."""
        if self.flow.read_paused:
            self.head_since = self.loop.time()
        elif self.scope is not None and "method" not in self.scope:  # a request began
            self.refuse(Reason.HEADER_TIMEOUT)
        else:
            self.head_since = 0.0
            self.flush_held()
            self.transport.close()

    # --- parser callbacks (the hot path: a few comparisons per request, one more call per body chunk) ---

    def on_body(self, body: bytes) -> None:
        self._bodied = True
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self.head_since = self._unfinished = self._framing = 0
        fed, self._fed = self._fed, self._chunk  # the rest of this chunk may hold the next head
        if (fields := len(self.headers)) > self._max_count or fed > self._max_bytes or self._over_cap:
            self._check_head(fed)
        self._fields = fields
        super().on_headers_complete()

    def _check_head(self, fed: int) -> None:
        """Refuse the head just parsed if it is over a limit. Its size (method and version left out) is measured
        only when the bytes fed since the last head say it may be over."""
        if len(self.headers) > self._max_count:
            self._stop(Reason.TOO_MANY_HEADERS)
        if fed > self._max_bytes:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > self._max_bytes:
                self._stop(Reason.HEADERS_TOO_LARGE)
        if self._over_cap:
            self._stop(Reason.CONNECTION_LIMIT)

    def _stop(self, reason: Reason) -> None:
        """Stop httptools at once (an exception out of a callback), to answer ``reason`` in ``data_received``."""
        self._refusal = reason
        raise _Refused(reason)
