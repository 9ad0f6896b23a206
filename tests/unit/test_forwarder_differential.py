"""LeanForwarder against AiohttpForwarder (the reference), on generated requests and answers (issue 17).

A recording upstream (tests/support/rawhttp.py: a raw asyncio server) keeps the exact bytes of every request it gets
and answers what the generated case says: a status, a header list, and a body framed by Content-Length, chunked, or
by closing the connection (none for HEAD, 204 and 304), sometimes after a 100 or 103 interim answer, its bytes
written in pieces that arrive apart. Every case goes through both forwarders, twice each (the second time on a
pooled connection unless the first answer ended with the connection), and must come out the same:

- what the upstream got: the request head byte for byte (request line, header names in their case, values,
  order, the Host the forwarder adds or keeps), the body's bytes as framed on the wire (Content-Length or the
  chunk sizes), and so also the method, target and de-chunked body;
- what the client got: the status, the raw header list as the upstream sent it, and the body.

Nothing is normalised: no difference between the two was found that needed it. (aiohttp quirks the lean forwarder
copies on purpose, so they never show here: ``Content-Length: 0`` on a bodiless POST/PUT/PATCH/DELETE; ``Transfer-
Encoding: chunked`` appended after the last header; with several Host headers, one named ``Host`` where the first
was, holding the last one's value; a missing Host appended as ``Host: host[:port]``.)"""

from __future__ import annotations

import asyncio
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.rawhttp import RawRequest, RawUpstream, read_body

from gateway.errors import UpstreamFailure
from gateway.forwarder import AiohttpForwarder, Forwarder, upstream_url
from gateway.upstream_h1 import LeanForwarder

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&'*+.^_`|~-", min_size=1, max_size=12)
VALUE = st.text(alphabet=string.ascii_letters + string.digits + " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~é€", max_size=30)
NAME = TOKEN.map(lambda t: "x-" + t) | st.sampled_from(["Accept", "user-agent", "Content-Type", "Cookie"])
PATH = st.lists(st.text(alphabet=string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@", max_size=8), max_size=4)
QUERY = st.none() | st.text(alphabet=string.ascii_letters + string.digits + "=&-._~%+", max_size=20)


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # length | chunked | close
    sizes: list[int]
    interim: bytes  # 1xx answers sent before this one (skipped by both)
    pieces: list[int]  # the answer's bytes written in pieces of these sizes (the rest last), each sent on its own

    def wire(self, method: str) -> tuple[bytes, bool]:
        """The answer's bytes, and whether the connection stays open after it."""
        bodiless = method == "HEAD" or self.status in (204, 304)
        head = [f"HTTP/1.1 {self.status} Whatever\r\n", *(f"{n}: {v}\r\n" for n, v in self.headers)]
        body, keep = b"", True
        if self.framing == "length" and self.status not in (204, 304):
            head.append(f"Content-Length: {len(self.body)}\r\n")
            body = self.body
        elif self.framing == "chunked" and self.status not in (204, 304):
            head.append("Transfer-Encoding: chunked\r\n")
            body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in _split(self.body, self.sizes) if p) + b"0\r\n\r\n"
        elif self.framing == "close":
            body, keep = self.body, bodiless
        return self.interim + "".join([*head, "\r\n"]).encode() + (b"" if bodiless else body), keep


@dataclass
class Case:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes | None
    with_length: bool
    sizes: list[int]
    answer: Answer


def _split(data: bytes, sizes: list[int]) -> list[bytes]:
    parts, at = [], 0
    for size in sizes:
        parts.append(data[at : at + size])
        at += size
    parts.append(data[at:])
    return parts


@st.composite
def cases(draw: st.DrawFn) -> Case:
    method = draw(st.sampled_from(METHODS))
    path = "/" + "/".join(draw(PATH))
    query = draw(QUERY)
    headers = draw(st.lists(st.tuples(NAME, VALUE), max_size=8))
    if draw(st.booleans()):  # duplicates, as clients send them
        headers += draw(st.lists(st.sampled_from(headers), max_size=3)) if headers else []
    hosts = draw(st.lists(st.sampled_from(["app.example", "other.example:8443", "[::1]:80"]), max_size=2))
    for host in hosts:
        headers.insert(draw(st.integers(0, len(headers))), (draw(st.sampled_from(["host", "Host"])), host))
    body = draw(st.none() | st.binary(max_size=3000)) if method != "HEAD" else None
    with_length = body is not None and draw(st.booleans())
    if with_length and body is not None:
        headers.insert(draw(st.integers(0, len(headers))), ("content-length", str(len(body))))
    status = draw(st.sampled_from([200, 201, 204, 301, 304, 400, 404, 500, 503]))
    answer = Answer(
        status,
        draw(st.lists(st.tuples(NAME.map(lambda n: n.title()), VALUE.map(str.strip)), max_size=6)),
        draw(st.binary(max_size=5000)),
        draw(st.sampled_from(["length", "chunked", "close"])),
        draw(st.lists(st.integers(0, 2000), max_size=4)),
        draw(
            st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"])
        ),
        draw(st.lists(st.integers(1, 3000), max_size=3)),
    )
    sizes = draw(st.lists(st.integers(0, 1500), max_size=4))
    return Case(method, path + (f"?{query}" if query is not None else ""), headers, body, with_length, sizes, answer)


async def _parts(data: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    for part in _split(data, sizes):
        yield part


async def _through(forwarder: Forwarder, url: str, case: Case) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = None if case.body is None else _parts(case.body, case.sizes)
    response = await forwarder.send(
        case.method, upstream_url(url + case.target), list(case.headers), body, connect_timeout=5, read_timeout=5
    )
    data = b""
    while chunk := await response.read():
        data += chunk
    return response.status, list(response.headers), data


def _seen(request: RawRequest) -> tuple[bytes, bytes]:
    return request.head, request.raw_body


async def _run(case: Case) -> None:
    async def answer(request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await read_body(reader, request)
        wire, keep = case.answer.wire(request.method)
        for piece in _split(wire, case.answer.pieces):
            if piece:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)  # its own segment: a head cut anywhere, a body past the parser
        return keep

    upstream = RawUpstream(answer)
    reference, lean = AiohttpForwarder(), LeanForwarder()
    try:
        async with upstream as url:
            got = [await _through(f, url, case) for f in (reference, reference, lean, lean)]
    finally:
        await reference.close()
        await lean.close()
    seen = [_seen(r) for r in upstream.requests]
    assert len(seen) == 4
    assert seen[2] == seen[0] and seen[3] == seen[1], f"the upstream got different requests:\n{seen}"
    assert got[2] == got[0] and got[3] == got[1], f"the client got different answers:\n{got}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_lean_sends_and_answers_as_aiohttp_does(case: Case) -> None:
    asyncio.run(_run(case))


MALFORMED = {
    "a control character in a value": b"HTTP/1.1 200 OK\r\nX-A: v\x01w\r\nContent-Length: 2\r\n\r\nok",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: v\x00w\r\nContent-Length: 2\r\n\r\nok",
    "LF without CR": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "whitespace after a value": b"HTTP/1.1 200 OK\r\nX-A: v \t\r\nContent-Length: 2\r\n\r\nok",
    "trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
    "a chunk extension": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a=b\r\nok\r\n0\r\n\r\n",
    "no reason phrase": b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
    "HTTP/1.0 without a length": b"HTTP/1.0 200 OK\r\n\r\nok",
    "space before the colon": b"HTTP/1.1 200 OK\r\nX-A : v\r\nContent-Length: 2\r\n\r\nok",
    "Content-Length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "Content-Length twice": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "129 headers": b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 129 + b"Content-Length: 2\r\n\r\nok",
    "a name and value of 8190 bytes": b"HTTP/1.1 200 OK\r\nX-A: " + b"v" * 8187 + b"\r\nContent-Length: 2\r\n\r\nok",
    "a name and value of 8191 bytes": b"HTTP/1.1 200 OK\r\nX-A: " + b"v" * 8188 + b"\r\nContent-Length: 2\r\n\r\nok",
    "128 headers": b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 127 + b"Content-Length: 2\r\n\r\nok",
}


async def _malformed(forwarder: Forwarder, answer: bytes) -> object:
    async def handler(request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer)
        return False

    try:
        async with RawUpstream(handler) as url:
            try:
                response = await forwarder.send(
                    "GET", upstream_url(url + "/"), [], None, connect_timeout=5, read_timeout=5
                )
                data = b""
                while chunk := await response.read():
                    data += chunk
                return response.status, list(response.headers), data
            except UpstreamFailure as exc:
                return "502/504", exc.timeout  # the message may differ; the answer the client gets does not
    finally:
        await forwarder.close()


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_answer_is_taken_or_refused_as_aiohttp_does(answer: bytes) -> None:
    """aiohttp parses answers leniently (llhttp's lenient headers, LF without CR, spaces after a chunk size), strips
    the whitespace after values, drops trailers, and caps headers at 128 of 8190 bytes (name and value): the lean
    forwarder does the same. Where both refuse, only the failure's wording differs (502 either way)."""
    assert await _malformed(LeanForwarder(), answer) == await _malformed(AiohttpForwarder(), answer)
