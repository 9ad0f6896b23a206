"""One HTTP/1.1 connection to an upstream (an asyncio ``Protocol`` parsed by httptools) and the answer on it.

``Connection`` carries one exchange at a time: the request head goes out in one write, a body (if any) is
written by ``write_body`` as the socket drains, and the answer is parsed into a ``Response`` (the
``forwarder.UpstreamResponse`` the HTTP path reads). Once the answer is complete the connection leaves the
response: back to its owner's pool when it can carry another (keep-alive, body fully sent, nothing out of
turn), closed otherwise; what the response buffered stays with it. Flow control both ways: reading stops while
the response holds more than ``HIGH_WATER`` bytes, and the body waits for the socket to drain (issue 17).
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from collections.abc import AsyncIterator
from typing import Protocol as Interface

from gateway.errors import UpstreamFailure
from gateway.h1_parsing import AnswerParsing, until_close
from gateway.h1_response import Response


class Owner(Interface):
    """The pool a connection goes back to (``upstream_h1.LeanForwarder``)."""

    def release(self, conn: Connection, reusable: bool) -> None: ...

    def lost(self, conn: Connection) -> None: ...


class Connection(AnswerParsing):
    """One keep-alive connection; ``response`` is the exchange it carries now (None while idle)."""

    def __init__(self, owner: Owner, key: object) -> None:
        self.owner = owner
        self.key = key
        super().__init__()
        # The exchange it carries now: weak, so an answer dropped unread is collected and frees the connection
        # (Response.__del__); held strongly only while the parser feeds it (AnswerParsing._cur).
        self._ref: weakref.ref[Response] | None = None
        self.used = 0  # answers completed on it
        self.idle = False
        self.idle_since = 0.0
        self.dead = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._tail: Response | None = None  # an exchange answered before its body was all sent (finish)

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # a request head must not wait for Nagle's timer
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def current(self) -> Response | None:
        ref = self._ref
        return None if ref is None else ref()

    def data_received(self, data: bytes) -> None:
        response = self.current()
        if response is None:  # idle, and the upstream speaks: close it
            self.drop()
            return
        response.received = True
        if self.feed(response, data) and response.complete and self._ref is not None:
            self.finish(response)
        response.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        self._wake_drain()
        response = self.current()
        if response is None:
            self.drop()  # idle, or its answer was dropped unread
            self.owner.lost(self)
            return
        if response.status and exc is None and until_close(response):  # the body ends where the connection does
            response.complete, self._keep = True, False
            self.finish(response)
            response.wake()
        else:
            response.fail(UpstreamFailure(timeout=False), retryable=not response.received and self.used > 0)
        self.owner.lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def eof_received(self) -> bool | None:
        return None  # close: connection_lost decides whether the answer was complete

    # --- the exchange ---------------------------------------------------------------------------

    @property
    def write_paused(self) -> bool:
        """The transport holds more than it wants to: what was written is not all sent yet."""
        return self._write_paused

    def start(self, response: Response, head: bytes, body: bytes = b"") -> None:
        """Send the request head, with the body (or its first piece) when it is in already: one write."""
        self._ref = weakref.ref(response)
        self._junk, self._head = False, 0
        if self.dead or self.transport is None or self.transport.is_closing():  # hung up before it (a new one)
            response.fail(UpstreamFailure(timeout=False))  # and uvloop's write would raise
            return
        if body:
            self.transport.writelines((head, body))  # one writev with uvloop
        else:
            self.transport.write(head)

    def finish(self, response: Response) -> None:
        """The answer is complete: the connection leaves it, to the pool or closed. A success that came before the
        body was all sent (answered first, read after) leaves it once the body has gone (write_body), then pooled;
        an error that came first means the body is not wanted (RFC 9112 §9.6): it stops, the connection closes."""
        reusable = self._keep and not self._junk and not self.dead
        self._ref = None
        response.conn = None
        if not response.body_sent:
            writer = response.writer
            if reusable and response.status < 400 and writer is not None and not writer.done():
                self._tail = response  # write_body releases it
                return
            response.stop_writer()  # given up: aborted, a graceful close would wait for it to drain (issue 17)
            if self.transport is not None:
                self.transport.abort()
            reusable = False
        self._release(reusable)

    def _release(self, reusable: bool) -> None:
        if reusable:
            self.used += 1
            self.resume_reading()
        self.owner.release(self, reusable)

    def _carries(self, response: Response) -> bool:  # its exchange, the answer maybe in while the body goes
        return self._tail is response or self.current() is response

    def drop(self) -> None:
        """Close at once; the exchange on it (if any) is given up."""
        self.dead = True
        self._wake_drain()
        if self.transport is not None:
            self.transport.abort()
        if self._ref is not None:  # an exchange in progress: given up
            response = self._ref()
            self._ref = None
            if response is not None:
                response.conn = None
            self.owner.release(self, False)
        elif self._tail is not None:  # its answer is in, its body still going: given up
            self._tail.stop_writer()
            self._tail = None
            self.owner.release(self, False)

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    async def write_body(
        self, response: Response, body: AsyncIterator[bytes], length: int | None, expect: bool, armed: bool
    ) -> None:
        """Send the body as the socket drains (chunked without a ``length``), then start the read timeout.

        With ``Expect: 100-continue`` the body waits for the interim answer; a final answer first means it is
        never sent (and the connection not reused). A body that fails (too large, the client gone) or that does not
        fill its ``Content-Length`` exactly (what came past it would be the next request) drops the connection:
        the request fails as ``UpstreamFailure``.
        """
        transport = self.transport
        chunked = length is None
        left = length or 0
        assert transport is not None
        try:
            if expect:
                await self._continue(response, armed)
                if response.status or response.failure is not None:
                    return
            async for chunk in body:
                if not self._carries(response):
                    return
                if chunk:
                    left -= len(chunk)
                    if left < 0 and not chunked:
                        raise ValueError("the request body is longer than its Content-Length")
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    if self._write_paused:
                        await self._drained()
            if not self._carries(response):
                return
            if chunked:
                transport.write(b"0\r\n\r\n")
            elif left:
                raise ValueError("the request body is shorter than its Content-Length")
            if self._write_paused:  # sent, not just buffered: the read timeout starts then
                await self._drained()
                if not self._carries(response):
                    return
            response.body_sent = True
            response.writer = None
            if not response.status and response.failure is None and armed:
                response.arm()
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._tail is not response:
                response.fail(UpstreamFailure(timeout=False))
        finally:
            if self._tail is response:  # answered already: the pool once the body is all sent, else closed
                self._tail = None
                reusable = response.body_sent and not self._junk and not self.dead
                if not reusable and self.transport is not None:
                    self.transport.abort()
                self._release(reusable)

    async def _continue(self, response: Response, armed: bool) -> None:
        """Until ``100 Continue`` (or any interim answer), a final answer, or a failure (the read timeout applies)."""
        if armed:
            response.arm()
        try:  # the drain waiter's slot: the request's own task waits for the head meanwhile
            while not (response.continued or response.status or response.failure is not None or self.dead):
                self._drain = asyncio.get_running_loop().create_future()
                await self._drain
        finally:
            response.disarm()

    async def _drained(self) -> None:
        while self._write_paused and not self.dead:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
        if self.dead:
            raise ConnectionResetError("the upstream closed the connection")

    def _wake_drain(self) -> None:
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)
