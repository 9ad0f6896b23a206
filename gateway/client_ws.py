"""The client hop of a proxied WebSocket: uvicorn's sans-I/O ``websockets`` protocol, with two fast paths.

    read    -> a complete text or binary frame at a frame boundary is unmasked (and inflated by the
               negotiated permessage-deflate) from the bytes received, without the parser's generators
    write   -> a ``websocket.send`` on an open, writable socket is written as one frame (deflated when
               negotiated) without ``ServerProtocol``'s frame serialisation

Its queue of ASGI events is a deque with one waiter (``_Inbox``). Everything else (the handshake,
fragments, control frames, a close, errors, backpressure) is uvicorn's ``WebSocketsSansIOProtocol`` as
it was; the fast paths do what its parser and ``send`` do, frame for frame (the limits:
``uvicorn.Config.ws_max_size`` on the frame as sent and on the inflated message, 1009; invalid UTF-8 in
a text, 1007). bench/websocket_bench.py: the parser's generators and frame objects, and the queue, were
about a fifth of the relay's CPU.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol
from websockets.speedups import apply_mask
from websockets.streams import StreamReader
from websockets.typing import BytesLike

_SHORT, _MID, _LONG = struct.Struct("!BB"), struct.Struct("!BBH"), struct.Struct("!BBQ")
_AT_EOF = StreamReader.at_eof.__code__


def payload_at(data: bytes, pos: int) -> tuple[int, int]:
    """Where the frame whose header is at ``pos`` goes on (its masking key or payload), and its payload's length.
    A length cut short reads small, and ``start`` then lies past the data: the caller waits for the rest."""
    length = data[pos + 1] & 0x7F
    if length == 126:
        return pos + 4, int.from_bytes(data[pos + 2 : pos + 4])
    if length == 127:
        return pos + 10, int.from_bytes(data[pos + 2 : pos + 10])
    return pos + 2, length


def frame_header(first: int, length: int, masked: bool) -> bytes:
    """A frame's first bytes: ``first`` (FIN, RSV, opcode), then the payload's length, the mask bit set when
    ``masked`` (the masking key, when there is one, follows)."""
    mask = 0x80 if masked else 0
    if length < 126:
        return _SHORT.pack(first, mask | length)
    if length < 65536:
        return _MID.pack(first, mask | 126, length)
    return _LONG.pack(first, mask | 127, length)


def at_frame_boundary(conn: Protocol) -> bool:
    """The parser waits for the first byte of a frame, not for the rest of one it began: once it has taken a
    header out of ``reader.buffer``, the buffer is empty while it waits for the payload (a fast path reading
    that payload as frames would take frames the peer never sent)."""
    parser: Any = conn.parser
    while parser.gi_yieldfrom is not None:
        parser = parser.gi_yieldfrom
    return parser.gi_code is _AT_EOF and not conn.reader.buffer


class _Inbox:
    """What uvicorn's protocol needs of its ``asyncio.Queue`` of ASGI events, for one consumer (the ASGI app's
    ``receive``, called by one task at a time): a deque and one waiter, no lock-step bookkeeping per message."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: deque[Any] = deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> Any:
        items = self._items
        while not items:
            self._waiter = self._loop.create_future()
            await self._waiter
        return items.popleft()

    def empty(self) -> bool:
        return not self._items

    def idle(self) -> bool:
        """The consumer waits and nothing is queued: a message handed on now keeps its order."""
        return self._waiter is not None and not self._items


class ClientHop(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol (``limits.websocket_options``) with the fast paths above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue: _Inbox = _Inbox(self.loop)  # type: ignore[assignment]
        # Set by gateway.relay: takes a message read here straight to the upstream; False: it did not.
        self.sink: Callable[[str | bytes], bool] | None = None

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn.state is OPEN and conn.current_size is None and at_frame_boundary(conn):
            data = self._fast(data)
            if not data:
                return
        super().data_received(data)

    def _fast(self, data: bytes) -> bytes:
        """Take the complete unfragmented data frames at the start of ``data``; the rest for the parser."""
        conn = self.conn
        pos, end, max_size, deflate = 0, len(data), conn.max_message_size, conn.extensions
        while end - pos >= 6 and not self.close_sent:
            first = data[pos]
            # FIN, no RSV2/RSV3, text or binary; RSV1 only with an extension; masked (as a client must)
            if first & 0xBF not in (0x81, 0x82) or (first & 0x40 and not deflate) or not data[pos + 1] & 0x80:
                break
            start, length = payload_at(data, pos)
            if (max_size is not None and length > max_size) or start + 4 + length > end:
                break  # over the limit (the parser fails it) or not all here yet
            payload = apply_mask(data[start + 4 : start + 4 + length], data[start : start + 4])
            pos = start + 4 + length
            text = first & 0x0F == 0x01
            if first & 0x40:
                inflated = self._inflate(Frame(Opcode.TEXT if text else Opcode.BINARY, payload, True, True))
                if inflated is None:
                    return b""
                payload = inflated
            if not self._pushed(payload, text):
                self.curr_msg_data_type = "text" if text else "bytes"
                self.frames = [payload]
                self.send_receive_event_to_app()
        return data[pos:] if pos else data

    def _pushed(self, payload: bytes, text: bool) -> bool:
        """Handed to ``sink`` (the relay's way to the upstream) while the app waits on an empty queue."""
        sink = self.sink
        if sink is None or not self.queue.idle():
            return False
        if text:
            try:
                return sink(payload.decode())
            except UnicodeDecodeError:
                return False  # uvicorn's way: 1007
        return sink(payload)

    def _inflate(self, frame: Frame) -> bytes | None:
        """The frame's data inflated; None when that failed the socket (as the parser fails it)."""
        conn = self.conn
        try:
            for extension in reversed(conn.extensions):
                frame = extension.decode(frame, max_size=conn.max_message_size)
            frame.check()
        except PayloadTooBig as exc:
            exc.set_current_size(None)
            self._fail(1009, str(exc), exc)
            return None
        except ProtocolError as exc:
            self._fail(1002, str(exc), exc)
            return None
        return bytes(frame.data)

    def _fail(self, code: int, reason: str, exc: Exception) -> None:
        self.conn.fail(code, reason)
        self.conn.parser_exc = exc
        self.handle_parser_exception()

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.send":
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is not None and self.push(data):
                return
        await super().send(message)

    def push(self, data: str | bytes) -> bool:
        """Write a message as one frame; False when uvicorn's ``send`` must (closed, not writable)."""
        conn = self.conn
        if self.close_sent or self.disconnected or conn.state is not OPEN or not self.writable.is_set():
            return False
        payload: BytesLike
        if isinstance(data, str):
            opcode, first, payload = Opcode.TEXT, 0x81, data.encode()
        else:
            opcode, first, payload = Opcode.BINARY, 0x82, data
        if conn.extensions:
            frame = Frame(opcode, payload)
            for extension in conn.extensions:
                frame = extension.encode(frame)
            payload = frame.data
            if frame.rsv1:
                first |= 0x40
        self.transport.write(b"".join((frame_header(first, len(payload), False), payload)))
        return True
