"""The client hop of an HTTP/1.1 request: uvicorn's httptools protocol, with a leaner body and answer path.

    upgrade -> a head with ``Connection: Upgrade`` to anything but a WebSocket, and a body, is refused (400): llhttp
               takes no body after it, so the body would have been read as the next request
    head    -> the scope's headers are the head's fields, fixed when it ends: uvicorn appended a chunked body's trailer
               fields to the list the app held, so that one sent while the request was admitted went upstream
    body    -> a piece of request body the app reads on its own reaches it as httptools gave it; uvicorn
               gathered every piece into a ``bytearray`` and copied that into ``bytes`` on each ``receive``
               (twice 64 KB for a 64 KB POST). Pieces that pile up before the app reads are joined, as
               uvicorn joins them, and reading pauses past 64 KiB, as it does
    expect  -> an answer to ``Expect: 100-continue`` that comes before the app asked for the body (a refusal, an
               upstream's own early answer) closes the connection while the body is owed: the client was never told
               to send it and may send its next request instead, which uvicorn would have read as that body
    answer  -> the response head is held until the body's first write, and both go out in one send
               (``writelines``: one ``writev`` with uvloop; asyncio joins them): uvicorn wrote them with a
               call each, two sends of two segments for every small answer. A head with no body write
               right behind it (a stream whose first piece is not in yet) goes at the end of the loop turn
               (on uvloop, after that turn's reads), before anything the protocol writes or closes itself
               (a 400 for the client's next bytes, a refusal, a deadline, the client's half-close), or on
               the cycle's close. An answer to HEAD is not held: no body write follows it

Everything else is uvicorn's ``HttpToolsProtocol`` as it was; ``limits.LimitedHttpTools`` adds the limits.
bench/floor_bench.py: the head's own send was about a tenth of a proxied GET's CPU.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # what uvicorn's receive writes for Expect: 100-continue
CLIENT = "gateway.client"  # the scope's extension (ASGI: a dict) whose "held" is the connection's ``Held``


def client_gone(scope: Any) -> bool:
    """Whether the client of a request has left (its connection lost). uvicorn drops what an app sends then without a
    word, so an app streaming an answer with no end (server-sent events) never learns it by sending; it asks here.
    False under another server."""
    extension = scope.get("extensions", {}).get(CLIENT)
    return extension is not None and extension["held"].lost


class Held:
    """The response head a connection holds, if any: one per connection, shared by its cycles' ``HeadHold`` and
    the protocol. Whatever the protocol itself writes or closes (a 400, a refusal, a WebSocket handshake, a
    deadline) comes from the client's next bytes or a deadline, and it sends the held head first (``flush``), so
    nothing overtakes or drops it. Bytes only: no reference cycle."""

    __slots__ = ("head", "lost")

    def __init__(self) -> None:
        self.head: bytes | None = None
        self.lost = False  # the connection is lost (``ClientH1.connection_lost``): uvloop's write would raise, and
        # asyncio's writelines in Python 3.12 and 3.13.0 (CPython gh-136234); uvicorn drops a lost client's answer

    def flush(self, transport: asyncio.Transport) -> None:
        """Write the held head, closing transport or not: one that is closing still sends what it is given until
        its buffer drains, the body that follows the head included."""
        head = self.head
        if head is not None:
            self.head = None
            if not self.lost:
                transport.write(head)


class HeadHold:
    """What a request's cycle writes to: its connection's transport, but the response head waits for the body.

    The cycle's first write is the head, unless it is the ``100 Continue`` that uvicorn's ``receive`` writes
    (then the head is the next one). The held head goes with the next write, on ``close``, before anything the
    protocol writes itself, or at the end of the loop turn (``call_soon``), whichever comes first: it never
    waits for the app. No reference to the cycle: one would make a reference cycle of every request.
    """

    __slots__ = ("_transport", "_loop", "_held", "_headed")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, held: Held) -> None:
        self._transport = transport
        self._loop = loop
        self._held = held
        self._headed = False

    def write(self, data: bytes) -> None:
        held = self._held
        if held.lost:  # uvicorn does not tell a request with a pipelined one behind it: its writes would raise
            return
        head = held.head
        if head is not None:
            held.head = None
            if data:
                self._transport.writelines((head, data))
            else:  # no empty piece for asyncio's writelines: it keeps it for good (Python 3.12 on, CPython gh-155888)
                self._transport.write(head)
        elif self._headed or data == CONTINUE:
            self._transport.write(data)
        else:  # the head
            self._headed = True
            held.head = data
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._held.flush(self._transport)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # anything else uvicorn may ask of a transport
        return getattr(self._transport, name)


class ClientH1(HttpToolsProtocol):
    """uvicorn's httptools protocol with the body and answer paths of the module docstring. A subclass that
    writes to or closes the connection itself calls ``flush_held`` first (``data_received`` does)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.held = Held()
        # The scope's extensions (``client_gone``): one dict per connection, not per request; never changed.
        self.extensions: dict[str, dict[object, object]] = {CLIENT: {"held": self.held}}
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.held.lost = True
        super().connection_lost(exc)

    def flush_held(self) -> None:
        """Send a held response head now: before the protocol writes to the connection or closes it."""
        self.held.flush(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.held.head is not None:  # what these bytes make the protocol write (a 400...) comes after it
            self.flush_held()
        super().data_received(data)

    def eof_received(self) -> None:
        if self.held.head is not None:  # the client half-closed: the transport closes itself next
            self.flush_held()
        super().eof_received()

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() and not self._should_upgrade() and _declares_body(self.headers):
            # llhttp reads no body after "Connection: Upgrade" (what follows is the new protocol), and the HTTP path
            # ignores an Upgrade other than WebSocket's: the body that a proxy in front sent would be read as the
            # next request, one it never saw. Refused (400, closed) before the app is called.
            raise ValueError("a body behind an Upgrade that is not taken")
        before = self.cycle
        scope = self.scope
        scope["extensions"] = self.extensions  # how the app learns its client left
        # The head's fields, fixed now. llhttp hands a chunked body's trailer fields to on_header, and uvicorn appended
        # them to this list while the app held it: a Host or Authorization trailer that came while the request was
        # being admitted went upstream as a header of it. They stay in self.headers (limits.py counts them there).
        scope["headers"] = self.headers.copy()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not before and cycle is not None:  # a new cycle (none for an upgrade)
            if scope["method"] != "HEAD":  # a HEAD answer has no body write to wait for
                cycle.transport = HeadHold(self.transport, self.loop, self.held)  # type: ignore[assignment]
            if cycle.waiting_for_100_continue:
                cycle.__class__ = Expecting  # its task has not started: it calls Expecting.send

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        held: bytes | bytearray = cycle.body
        if not held:
            cycle.body = body  # type: ignore[assignment]  # uvicorn's receive takes bytes() of either
        else:
            if type(held) is bytes:
                cycle.body = held = bytearray(held)
            held += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()


class Expecting(RequestResponseCycle):
    """A request's cycle whose client awaits ``100 Continue``: an answer that starts before it went, with the body
    still owed, ends the connection (none announced, or all in already: what comes next is a request). A class, not
    a wrapper of ``send`` that refers to the cycle: no reference cycle per request."""

    async def send(self, message: Any) -> None:
        if self.waiting_for_100_continue and self.more_body and message["type"] == "http.response.start":
            self.keep_alive = False  # uvicorn adds "Connection: close" and closes once the answer is out
        await super().send(message)


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a head announces a body: a Content-Length other than 0, or a Transfer-Encoding."""
    return any(name == b"transfer-encoding" or (name == b"content-length" and value != b"0") for name, value in headers)
