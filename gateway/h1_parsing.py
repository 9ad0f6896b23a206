"""How the bytes of an upstream's answers become ``Response`` objects on a lean connection (``h1_connection``).

httptools (llhttp) parses heads, chunked bodies and trailers, as leniently as aiohttp's parser. A body that one
``Content-Length`` delimits is taken past the parser once its head is parsed: the socket's bytes go to the
response as they came, where httptools would copy each piece into a new ``bytes`` (issue 17). What the upstream
sends out of turn (a second answer, bytes past a body) marks the connection as not to be trusted again. Below
the class, how an answer's headers frame it: its length, whether it ends with the connection, whether the
connection carries another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httptools

from gateway.errors import UpstreamFailure
from gateway.h1_response import HIGH_WATER, Response

MAX_HEADERS = 128  # header lines in one answer, and bytes in one name and its value: aiohttp's limits
MAX_FIELD = 8190
MAX_HEAD = (MAX_HEADERS + 1) * (MAX_FIELD + 4) + HIGH_WATER  # bytes of a head or trailers (no body in them) at most


class AnswerParsing(asyncio.Protocol):
    """The parsing half of ``h1_connection.Connection``: ``feed`` takes the socket's bytes for the answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = answer_parser(self)
        self.read_paused = False
        self._cur: Response | None = None  # the answer being fed (held strongly only meanwhile)
        self._headers: list[tuple[bytes, bytes]] = []
        self._interim = False
        self._keep = False  # the complete answer leaves its connection able to carry another
        self._junk = False  # bytes the upstream sent out of turn: the connection cannot be trusted again
        self._left = -1  # bytes of a Content-Length body still to come once the parser has seen its head, or -1
        self._head = 0  # bytes received since the head's start or the last body data (httptools buffers a field whole)

    def _wake_drain(self) -> None:
        """A body waiting for ``100 Continue`` goes on (the connection's)."""

    def feed(self, response: Response, data: bytes) -> bool:
        """Parse ``data`` into ``response``; False when that failed it (nothing more to do with it)."""
        if self._left > 0:  # the rest of a Content-Length body: no parser, no copy
            self._past_parser(response, data)
            return True
        self._head += len(data)
        if self._head > MAX_HEAD:
            response.fail(UpstreamFailure(timeout=False, detail="the upstream's answer head or trailers too large"))
            return False
        self._cur = response
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # 101 or CONNECT: not HTTP any more
            response.complete, self._keep = True, False
        except httptools.HttpParserError:
            if not response.complete:
                response.fail(UpstreamFailure(timeout=False, detail="the upstream's answer is not valid HTTP/1.1"))
                return False
            self._junk = True
        finally:
            self._cur = None
        return True

    def on_message_begin(self) -> None:
        if self._cur is None or self._cur.complete:
            self._junk = True  # a second answer to one request
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= MAX_HEADERS or len(name) + len(value) > MAX_FIELD or b"\0" in value:
            raise ValueError("an answer's headers too many, too long, or holding NUL")  # fails the parse
        # llhttp strips the whitespace before a value, not after it (RFC 9110 §5.5: neither is part of it).
        self._headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        response = self._cur
        status = self.parser.get_status_code()
        if response is None or response.complete:
            return
        self._wake_drain()  # a body waiting for 100 Continue goes on, or learns it is not wanted
        if status < 200 and status != 101:  # 100 Continue, 103 Early Hints: skipped, the final answer follows
            self._interim = response.continued = True
            return
        response.status, response.headers = status, self._headers
        self._left = -1 if response.head_only else fixed_length(status, self._headers)
        if self._left > 0:  # its end may be found past the parser: llhttp says now whether the connection is kept
            self._keep = self.parser.should_keep_alive()
        self._headers, self._head = [], 0  # trailers (after a chunked body) land here and are dropped, as aiohttp does
        if response.head_only:  # llhttp cannot be told it was HEAD: the answer ends here, a new parser follows
            response.complete = True
            self._keep = keeps_alive(self.parser.get_http_version(), response.headers)
            self.parser = answer_parser(self)

    def on_body(self, body: bytes) -> None:
        response = self._cur
        if response is None or response.complete:
            self._junk = True
            return
        if self._interim:  # a 1xx's own body (a Content-Length on, say, 199): dropped with it, as aiohttp does
            return
        self._head = 0
        self._left -= len(body)
        self._take(response, body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response = self._cur
        self._left = -1
        if response is not None and not response.complete:
            response.complete = True
            self._keep = self.parser.should_keep_alive()

    def _past_parser(self, response: Response, data: bytes) -> None:
        """Body bytes taken as they came: httptools would copy each into a new ``bytes``. The parser, which saw
        the head, is replaced once the body is all in (the next answer's head goes to a fresh one)."""
        left = self._left
        if len(data) > left:  # past the answer: out of turn
            self._junk = True
            data = data[:left]
        self._left = left - len(data)
        self._take(response, data)
        if not self._left:
            response.complete, self._left = True, -1  # self._keep: llhttp's, from its head
            self.parser = answer_parser(self)

    def _take(self, response: Response, data: bytes) -> None:
        response.chunks.append(data)
        response.buffered += len(data)
        if response.buffered > HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True  # until a read takes enough (Response.read)
            self.transport.pause_reading()


def keeps_alive(version: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    tokens = {t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")}
    return b"close" not in tokens if version == "1.1" else b"keep-alive" in tokens


def fixed_length(status: int, headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The length of a final answer's body when one ``Content-Length`` gives it (and no ``Transfer-Encoding``);
    -1 otherwise: the parser decides (204 and 304 have none, chunked, until close, several lengths refused)."""
    if status in (204, 304):
        return -1
    length = -1
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            return -1
        if lower == b"content-length":
            if length >= 0 or not value.isdigit():
                return -1
            length = int(value)
    return length


def until_close(response: Response) -> bool:
    """The body has no length: it ends when the upstream closes (RFC 9112 §6.3, item 8)."""
    if response.head_only or response.status in (204, 304):
        return False
    length = False
    for name, value in response.headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            return not value.strip().lower().endswith(b"chunked")
        length = length or lower == b"content-length"
    return not length


def answer_parser(protocol: object) -> httptools.HttpResponseParser:
    """httptools' parser, as lenient as aiohttp's with answers (CTLs in values, LF without CR, spaces after a
    chunk size): legacy apps send such things, and the reference forwarder takes them."""
    parser = httptools.HttpResponseParser(protocol)
    parser.set_dangerous_leniencies(
        lenient_headers=True, lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True
    )
    return parser
