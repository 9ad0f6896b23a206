"""An upstream's answer on a lean HTTP/1.1 connection (``h1_connection``): the ``forwarder.UpstreamResponse``.

The connection parses into it (status, raw headers, body chunks, completion or failure) and leaves it once the
answer is complete; what it buffered stays here for the HTTP path to read. Reads wait with the read timeout of
``forwarder.Deadlines`` (no timer per chunk), and a half-read answer given up (``close``, a cancelled wait, or
dropped unread) closes its connection: it is never reused (issue 17).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Protocol

from gateway.errors import UpstreamFailure
from gateway.forwarder import Deadlines

HIGH_WATER = 256 * 1024  # answer bytes buffered before its socket stops being read (read again below half of it)
JOIN_MAX = 64 * 1024  # buffered pieces up to this many bytes in all are joined into one read


class Carrier(Protocol):
    """What the answer needs of its connection (``h1_connection.Connection``)."""

    read_paused: bool

    def resume_reading(self) -> None: ...

    def drop(self) -> None: ...


class Response:
    """An upstream's answer (``forwarder.UpstreamResponse``): status and headers once the head is in, then the body."""

    __slots__ = (
        "status", "headers", "conn", "chunks", "buffered", "complete", "failure", "retryable", "waiter",
        "received", "body_sent", "continued", "head_only", "writer", "_deadlines", "_timeout", "__weakref__",
    )  # fmt: skip

    def __init__(self, conn: Carrier, head_only: bool, deadlines: Deadlines, timeout: float) -> None:
        self.status = 0
        self.headers: Sequence[tuple[bytes, bytes]] = ()
        self.conn: Carrier | None = conn  # None once the answer is complete, failed or closed
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.failure: UpstreamFailure | None = None
        self.retryable = False  # lost on a reused connection before a byte of the answer came
        self.waiter: asyncio.Future[None] | None = None
        self.received = False
        self.body_sent = False
        self.continued = False  # an interim answer (100 Continue) came: an Expect body may go
        self.head_only = head_only  # HEAD: no body, whatever the headers say
        self.writer: asyncio.Task[None] | None = None
        self._deadlines = deadlines
        self._timeout = timeout

    async def wait(self, head: bool, armed: bool) -> None:
        """Until the head (``head``) or body data is in, the answer complete or failed; ``armed``: read timeout on."""
        if armed:
            self.arm()
        try:
            # Once the connection left (closed, given up), nothing more can come.
            while not (self.status if head else self.chunks or self.complete) and self.failure is None and self.conn:
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
        except BaseException:  # cancelled (the client went away): this connection is half used
            self.close()
            raise
        finally:
            self.disarm()

    def arm(self) -> None:
        """The read timeout starts (one dict entry in ``Deadlines``, no timer)."""
        self._deadlines.arm(self, self._timeout, self.expire)

    def disarm(self) -> None:
        self._deadlines.disarm(self)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def expire(self) -> None:
        if self.waiter is not None:  # someone is waiting: the read timeout passed
            self.fail(UpstreamFailure(timeout=True))

    def fail(self, failure: UpstreamFailure, retryable: bool = False) -> None:
        if self.complete:
            return
        if self.failure is None:
            self.failure, self.retryable = failure, retryable
        self.close()

    async def read(self) -> bytes:
        chunks = self.chunks
        if not chunks and self.failure is None and not self.complete:
            await self.wait(False, True)
        if not chunks:
            if self.failure is not None:
                raise self.failure
            data = b""
        else:  # joined up to JOIN_MAX; a larger one goes alone, never copied (the client's transport writes it)
            data = chunks.pop() if len(chunks) == 1 else _take(chunks)
            self.buffered -= len(data)
        conn = self.conn
        if conn is not None and conn.read_paused and self.buffered <= HIGH_WATER // 2:
            conn.resume_reading()
        if self.complete and self.writer is not None:
            await self._sent()
        return data

    async def _sent(self) -> None:
        """Until the request body is all sent: the answer came first (``h1_connection.Connection.finish``), and
        once the client has its last byte its body can no longer be read (the connection would be lost). At most
        the read timeout: a client that never ends its body, or an upstream that stops reading it, would hold the
        answer for good; the body is then given up and its connection closed, as before issue 17's change."""
        writer = self.writer
        if writer is None or writer.done() or writer is asyncio.current_task():
            return
        try:
            await asyncio.wait((writer,), timeout=self._timeout)
        except BaseException:
            self.stop_writer()
            raise
        if not writer.done():
            self.stop_writer()

    def at_eof(self) -> bool:
        return self.complete and not self.chunks

    def close(self) -> None:
        """Give up on the rest: the connection is dropped, never reused."""
        conn = self.conn
        if conn is not None:
            conn.drop()
        self.stop_writer()
        self.wake()

    def stop_writer(self) -> None:
        writer = self.writer
        if writer is not None:
            self.writer = None
            if writer is not asyncio.current_task():
                writer.cancel()

    def __del__(self) -> None:
        # Abandoned half-read (an exception between send and the last read): never leave the slot taken.
        if self.conn is not None:
            with contextlib.suppress(Exception):  # a closed loop at exit: nothing left to free
                self.conn.drop()


def _take(chunks: list[bytes]) -> bytes:
    """The first pieces of ``chunks``, removed: joined up to JOIN_MAX bytes, or the first alone when larger."""
    size = count = 0
    for chunk in chunks:
        if count and size + len(chunk) > JOIN_MAX:
            break
        size += len(chunk)
        count += 1
    data = chunks[0] if count == 1 else b"".join(chunks[:count])
    del chunks[:count]
    return data
