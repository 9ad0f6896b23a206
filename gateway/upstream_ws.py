"""The upstream hop of a proxied WebSocket: a lean client on websockets' sans-I/O ``ClientProtocol``.

    handshake  -> the request of ``websockets.client.ClientProtocol`` with the gateway's headers (one
                  Host: the client's), its response; a refusal raises ``InvalidStatus`` (gateway.tunnel.open_upstream)
    relay      -> ``recv``, ``write`` (+ ``drain``), ``close``, the close code; ``sink`` (gateway.relay)

The asyncio ``ClientConnection`` of ``websockets`` took about 30% of the relay's CPU samples (a task switch,
a queue, an assembler and frame objects per message). Here a complete text or binary frame at a frame boundary
is taken from the bytes received as they are (to ``sink`` when the relay waits on an empty queue), a message is
written as one masked frame; anything else (fragments, control frames, a close, errors, a frame over
``max_size``) goes through ``ClientProtocol``: pings answered, ``max_size`` on the whole message (1009), the
closing handshake. Backpressure: reading pauses at MAX_QUEUE messages queued; ``drain`` waits for the transport.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from typing import cast

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidMessage, PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.protocol import CONNECTING, OPEN
from websockets.speedups import apply_mask

from gateway.client_ws import at_frame_boundary, frame_header, payload_at
from gateway.types import StrHeaders

CLOSE_TIMEOUT = 5.0  # seconds the closing handshake may take before the connection is dropped
PING_TIMEOUT = 20.0  # seconds a keepalive ping may wait for its pong (as websockets' default)
MAX_QUEUE = 4  # messages read ahead for the relay before reading pauses: 4 x max_size at most
WRITE_LIMIT = 2**15  # bytes buffered in the transport before ``drain`` waits (as websockets' default)
_MASKS = 256  # masking keys drawn from os.urandom at once (1 KB a socket)


class UpstreamSocket(asyncio.Protocol):
    """One open upstream WebSocket, as the relay uses it."""

    def __init__(self, protocol: ClientProtocol, max_size: int, ping_interval: float | None) -> None:
        self.protocol = protocol
        self.subprotocol: str | None = None
        # Set by gateway.relay: takes a message read here straight to the client; False: it did not.
        self.sink: Callable[[str | bytes], bool] | None = None
        self._max_size = max_size
        self._ping_interval = ping_interval
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._messages: deque[str | bytes] = deque()
        self._fragments: list[bytes] = []
        self._text = False  # the fragmented message being read is text
        self._open = False  # OPEN, as the sans-I/O protocol's state, kept here for the fast paths
        self._ended = False  # recv raises once the messages read are taken
        self._paused = False  # reading paused: the relay has MAX_QUEUE messages to take
        self._write_paused = False
        self._waiter: asyncio.Future[None] | None = None  # recv waiting for a message
        self._drain: asyncio.Future[None] | None = None
        self._response: asyncio.Future[None] = self._loop.create_future()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._masks, self._mask_at = b"", _MASKS * 4
        self._timer: asyncio.TimerHandle | None = None  # the next keepalive ping, or its pong's deadline
        self._ping_payload: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._transport is None:  # uvloop's transports are no asyncio.Transport subclasses
            self._transport = cast(asyncio.Transport, transport)
            self._transport.set_write_buffer_limits(high=WRITE_LIMIT)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        if self._open and protocol.current_size is None and at_frame_boundary(protocol):
            data = self._fast(data)
            if not data:
                return
        protocol.receive_data(data)
        self._events()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._events()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the parser learns the stream ended (1006 if unclean)
        self._events(flush=False)
        self._ended, self._open = True, False
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
        for future in (self._response, self._lost, self._drain):
            if future is not None and not future.done():
                future.set_result(None)

    def pause_writing(self) -> None:  # the transport's buffer is over WRITE_LIMIT: ``write`` says "drain"
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _fast(self, data: bytes) -> bytes:
        """Take the complete unfragmented text and binary frames at the start of ``data``; the rest."""
        pos, end, max_size, messages = 0, len(data), self._max_size, self._messages
        while end - pos >= 2:
            first, second = data[pos], data[pos + 1]
            if (first != 0x81 and first != 0x82) or second & 0x80:  # FIN with no RSV, unmasked
                break
            start, length = payload_at(data, pos)
            if length > max_size or start + length > end:
                break  # over the limit (ClientProtocol fails it with 1009) or not all here yet
            payload = data[start : start + length]
            pos = start + length
            if self.sink is not None and self._waiter is not None and not messages and self._push(payload, first):
                continue
            if first == 0x81:
                if not self._text_message(payload):
                    return b""
            else:
                messages.append(payload)
        if messages:  # not all handed to ``sink``: the relay takes the rest
            self._received()
        return data[pos:] if pos else data

    def _push(self, payload: bytes, first: int) -> bool:
        """Handed to ``sink`` (the relay's way to the client) while ``recv`` waits on an empty queue."""
        assert self.sink is not None
        try:
            return self.sink(payload if first == 0x82 else payload.decode())
        except UnicodeDecodeError:
            return False  # queued instead, and failed with 1007 there

    def _text_message(self, payload: bytes) -> bool:
        try:
            self._messages.append(payload.decode())
        except UnicodeDecodeError as exc:  # as websockets' asyncio client: 1007, then the upstream is done
            self.protocol.fail(1007, f"{exc.reason} at position {exc.start}")
            self._open, self._ended = False, True
            self._events()
            return False
        return True

    def _events(self, flush: bool = True) -> None:
        """Handle what ClientProtocol parsed: messages, pongs, the handshake's response, the end."""
        protocol = self.protocol
        for event in protocol.events_received():
            if isinstance(event, Frame) and not self._ended:
                opcode = event.opcode
                if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                    self._text, self._fragments = opcode is Opcode.TEXT, []
                if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
                    self._fragments.append(bytes(event.data))
                    if event.fin:
                        data, self._fragments = b"".join(self._fragments), []
                        if not self._text:
                            self._messages.append(data)
                        elif not self._text_message(data):
                            break
                elif opcode is Opcode.PONG and bytes(event.data) == self._ping_payload:
                    self._pong()
        if not self._response.done() and (protocol.state is not CONNECTING or protocol.handshake_exc is not None):
            self._response.set_result(None)  # the response, or one that could not be read (no event for it)
        writes = protocol.data_to_send()
        if flush and self._transport is not None:
            self._write_all(writes)
        if self._open and protocol.state is not OPEN:
            self._open, self._ended = False, True
        if self._ended or self._messages:
            self._received()

    def _received(self) -> None:
        self._wake()
        if not self._paused and len(self._messages) >= MAX_QUEUE and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> str | bytes:
        """The next message; ConnectionClosed once the upstream closed (``too_big``: it sent one over the limit)."""
        messages = self._messages
        while not messages:
            if self._ended:
                raise self._closed()
            self._waiter = self._loop.create_future()
            await self._waiter
        data = messages.popleft()
        if self._paused and len(messages) <= MAX_QUEUE // 4 and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    def _closed(self) -> ConnectionClosed:
        protocol = self.protocol
        return ConnectionClosed(protocol.close_rcvd, protocol.close_sent, protocol.close_rcvd_then_sent)

    @property
    def writable(self) -> bool:  # open, and its transport's buffer under WRITE_LIMIT
        return self._open and not self._write_paused

    @property
    def too_big(self) -> bool:
        return isinstance(self.protocol.parser_exc, PayloadTooBig)

    @property
    def close_code(self) -> int:
        return self.protocol.close_rcvd.code if self.protocol.close_rcvd is not None else 1006

    @property
    def close_reason(self) -> str:
        return self.protocol.close_rcvd.reason if self.protocol.close_rcvd is not None else ""

    def write(self, data: str | bytes) -> bool:
        """Send one message as one masked frame; True when the caller should ``drain`` first."""
        if not self._open:
            raise self._closed()
        if isinstance(data, str):
            first, payload = 0x81, data.encode()
        else:
            first, payload = 0x82, data
        header = frame_header(first, len(payload), True)
        at = self._mask_at
        if at >= len(self._masks):
            self._masks, at = os.urandom(_MASKS * 4), 0
        mask = self._masks[at : at + 4]
        self._mask_at = at + 4
        assert self._transport is not None
        self._transport.write(b"".join((header, mask, apply_mask(payload, mask))))
        return self._write_paused

    def abort(self) -> None:
        self._open = False
        if self._transport is not None:
            self._transport.abort()

    async def drain(self) -> None:
        while self._write_paused and not self._lost.done():
            self._drain = self._loop.create_future()
            await self._drain

    def _write_all(self, writes: list[bytes]) -> None:
        assert self._transport is not None
        for chunk in writes:
            if chunk:
                self._transport.write(chunk)
            elif self._transport.can_write_eof():  # the sans-I/O protocol's end of stream
                self._transport.write_eof()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake (if not under way), then the connection, dropped after CLOSE_TIMEOUT."""
        if self._open:
            self.protocol.send_close(code, reason)
            self._events()
        if self._lost.done() or self._transport is None:
            return
        try:
            await asyncio.wait([self._lost], timeout=CLOSE_TIMEOUT)
        finally:
            if not self._lost.done():
                self._transport.abort()

    def _ping(self) -> None:
        if not self._open:
            return
        self._ping_payload = os.urandom(4)
        self.protocol.send_ping(self._ping_payload)
        self._events()
        self._timer = self._loop.call_later(PING_TIMEOUT, self._pong_missed)

    def _pong(self) -> None:
        self._ping_payload = None
        if self._timer is not None:
            self._timer.cancel()
        if self._ping_interval:
            self._timer = self._loop.call_later(self._ping_interval, self._ping)

    def _pong_missed(self) -> None:
        if self._open:
            self.protocol.fail(1011, "keepalive ping timeout")
            self._events()

    async def handshake(self, headers: StrHeaders) -> None:
        """Send the request with the gateway's headers; wait for the response (raises what websockets raises)."""
        request = self.protocol.connect()
        request.headers.update(headers)
        hosts = request.headers.get_all("Host")
        if len(hosts) > 1:  # websockets writes one for the URL; the client's (ours, last) stays
            del request.headers["Host"]
            request.headers["Host"] = hosts[-1]
        self.protocol.send_request(request)
        self._events()
        await self._response
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc
        if self.protocol.state is CONNECTING:  # lost before any response
            raise InvalidMessage("connection closed during the handshake")
        # Frames that came with the response were read already; a close among them ends the socket.
        self._open = self.protocol.state is OPEN
        self._ended = self._ended or not self._open
        self._received()
        self.subprotocol = self.protocol.subprotocol
        self._pong()  # starts the keepalive pings
