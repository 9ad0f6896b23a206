"""gateway/client_h1.py: the client hop's answer path, driven byte by byte over a transport that records each write.

uvicorn wrote a response head and its body with a call each (two sends, two segments for every small answer);
the head now waits for the body's first write and both go in one. It never waits for the app: a head with no
body right behind it goes at the end of the loop turn. The body path's tests are in test_limits.py.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from test_limits import Server, Transport, settle
from uvicorn.config import Config

from gateway.limits import LimitedHttpTools

HEAD = b"HTTP/1.1 200 OK\r\n"


class Writes(Transport):
    """Records each write the connection makes (``writelines`` is one write: a single writev with uvloop)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        super().write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))


class Answers:
    """Answers 200 with ``body``: all at once, or the head first and the body once ``go`` is set."""

    def __init__(self, body: bytes = b"ok", late: bool = False, fail: bool = False) -> None:
        self.body, self.late, self.fail = body, late, fail
        self.go = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["method"] == "POST":
            while (await receive()).get("more_body"):
                pass
        headers = [(b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started.set()
        if self.fail:
            raise RuntimeError("the app fails after its head")
        if self.late:
            await self.go.wait()
        await send({"type": "http.response.body", "body": self.body})


def connect(app: Answers) -> tuple[LimitedHttpTools, Writes]:
    server = Server()
    server.config = Config(app=app, log_level="warning", lifespan="off")
    server.config.load()
    protocol = LimitedHttpTools(config=server.config, server_state=server.state, app_state={}, limits=server.limits)
    transport = Writes()
    protocol.connection_made(transport)
    return protocol, transport


@pytest.mark.parametrize("close", [False, True])
async def test_a_small_answer_leaves_in_one_write(close: bool) -> None:
    protocol, transport = connect(Answers())
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: gw\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n")
    await settle()
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(HEAD) and transport.writes[0].endswith(b"\r\n\r\nok")
    assert transport.closed is close


async def test_a_head_whose_body_is_late_goes_at_the_end_of_the_loop_turn() -> None:
    """A stream whose first piece is not in yet (server-sent events, a slow upstream): the client has the head
    while the app waits, and the body follows in a write of its own."""
    app = Answers(late=True)
    protocol, transport = connect(app)
    protocol.data_received(b"GET /events HTTP/1.1\r\nHost: gw\r\n\r\n")
    await app.started.wait()
    await settle()
    assert len(transport.writes) == 1 and transport.writes[0].startswith(HEAD) and not app.go.is_set()
    app.go.set()
    await settle()
    assert transport.writes[1:] == [b"ok"]


async def test_100_continue_goes_at_once_and_the_answer_after_it_in_one_write() -> None:
    protocol, transport = connect(Answers())
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    await settle()
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    protocol.data_received(b"body")
    await settle()
    assert len(transport.writes) == 2 and transport.writes[1].startswith(HEAD)
    assert transport.writes[1].endswith(b"\r\n\r\nok")


class Refuses:
    """Answers 401 without reading the request's body."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


async def test_an_answer_before_100_continue_closes_the_connection() -> None:
    """The client was never told to send its body and may send the next request instead: read as that body, it
    would be lost, or its bytes read as a request the client never made. uvicorn kept the connection open."""
    protocol, transport = connect(Refuses())  # type: ignore[arg-type]
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    await settle()
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 401 ")
    assert b"\r\nconnection: close\r\n" in transport.writes[0].lower() and transport.closed


@pytest.mark.parametrize("body", [b"Content-Length: 0\r\n\r\n", b"Content-Length: 4\r\n\r\nbody"])
async def test_an_answer_to_an_expect_request_whose_body_is_all_in_keeps_the_connection(body: bytes) -> None:
    """No body owed (none announced, or the client sent it without waiting): what comes next is a request."""
    protocol, transport = connect(Refuses())  # type: ignore[arg-type]
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n" + body)
    await settle()
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 401 ")
    assert b"connection: close" not in transport.writes[0].lower() and not transport.closed


async def test_an_answer_after_100_continue_keeps_the_connection() -> None:
    protocol, transport = connect(Answers())
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    await settle()
    protocol.data_received(b"body")
    await settle()
    assert transport.writes[1].startswith(HEAD) and not transport.closed
    assert b"connection: close" not in transport.writes[1].lower()


async def test_an_answer_to_head_is_written_as_it_comes() -> None:
    """No body write follows a HEAD answer's head (uvicorn writes none): nothing is held."""
    protocol, transport = connect(Answers())
    protocol.data_received(b"HEAD / HTTP/1.1\r\nHost: gw\r\n\r\n")
    await settle()
    assert len(transport.writes) == 1 and transport.writes[0].startswith(HEAD)
    assert transport.writes[0].endswith(b"\r\n\r\n") and not transport.closed


async def test_an_app_that_fails_after_its_head_gets_the_head_out_before_the_close() -> None:
    protocol, transport = connect(Answers(fail=True))
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    await settle()
    assert len(transport.writes) == 1 and transport.writes[0].startswith(HEAD) and transport.closed


async def test_pipelined_requests_are_answered_in_order_one_write_each() -> None:
    app = Answers()
    protocol, transport = connect(app)
    protocol.data_received(b"GET /one HTTP/1.1\r\nHost: gw\r\n\r\nGET /two HTTP/1.1\r\nHost: gw\r\n\r\n")
    for _ in range(4):
        await settle()
    assert len(transport.writes) == 2 and all(w.startswith(HEAD) and w.endswith(b"ok") for w in transport.writes)


# --- review: nothing the protocol writes itself overtakes or drops a held head ---


async def test_a_400_for_pipelined_garbage_does_not_overtake_a_held_head() -> None:
    """Request 1's head is held (its body is late) when the client's next bytes come in the same loop turn, and
    they are not HTTP: uvicorn's 400 goes to the connection itself. It went before request 1's head, and the close
    after it dropped that head: the client read the 400 as the answer to its valid first request."""
    app = Answers(late=True)
    protocol, transport = connect(app)
    protocol.data_received(b"GET /one HTTP/1.1\r\nHost: gw\r\n\r\n")
    asyncio.get_running_loop().call_soon(protocol.data_received, b"\x01 not http\r\n\r\n")
    await settle()
    assert transport.writes[0].startswith(HEAD) and transport.writes[1].startswith(b"HTTP/1.1 400 ")


async def test_a_refusal_that_closes_during_the_hold_sends_the_head_first() -> None:
    """Same turn, a pipelined request over header_count: the refusal writes nothing (an answer is under way)
    and closes the connection; the held head was dropped, where before it was on the wire ahead of the close."""
    app = Answers(late=True)
    protocol, transport = connect(app)
    protocol.data_received(b"GET /one HTTP/1.1\r\nHost: gw\r\n\r\n")
    many = b"GET /two HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n"
    asyncio.get_running_loop().call_soon(protocol.data_received, many)
    await settle()
    assert transport.closed and len(transport.writes) == 1 and transport.writes[0].startswith(HEAD)


async def test_a_finished_cycle_is_freed_by_refcount() -> None:
    """The wrapper refers to no cycle: every request's cycle would otherwise wait for the garbage collector."""
    protocol, _ = connect(Answers())
    protocol.data_received(b"GET /one HTTP/1.1\r\nHost: gw\r\n\r\n")
    await settle()
    first = weakref.ref(protocol.cycle)
    gc.disable()
    try:
        protocol.data_received(b"GET /two HTTP/1.1\r\nHost: gw\r\n\r\n")
        await settle()
        assert first() is None
    finally:
        gc.enable()


async def test_a_finished_cycle_of_an_expect_request_is_freed_by_refcount() -> None:
    """The answer that watches for 100 Continue refers to no cycle either: a body held past a collection of the
    young generation (a slow upload) would otherwise wait in the old one for a full collection."""
    protocol, transport = connect(Answers())
    protocol.data_received(b"POST /one HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    await settle()
    protocol.data_received(b"body")
    await settle()
    first = weakref.ref(protocol.cycle)
    gc.disable()
    try:
        protocol.data_received(b"GET /two HTTP/1.1\r\nHost: gw\r\n\r\n")
        await settle()
        assert first() is None and not transport.closed
    finally:
        gc.enable()


def on_uvloop(app: Any, then: Callable[[socket.socket], None] = lambda client: None) -> bytes:
    """What a client gets in 0.1 s from ``app`` served on uvloop over a real socket, for one GET; ``then`` acts as
    the client right after its request (a half-close)."""

    async def main() -> bytes:
        server_sock, client = socket.socketpair()

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            await app(client, scope, receive, send)

        server = Server()
        server.config = Config(app=asgi, log_level="warning", lifespan="off")
        server.config.load()
        protocol = LimitedHttpTools(config=server.config, server_state=server.state, app_state={}, limits=server.limits)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, server_sock)
        client.send(b"GET /one HTTP/1.1\r\nHost: gw\r\n\r\n")
        then(client)
        await asyncio.sleep(0.1)
        client.setblocking(False)
        try:
            return client.recv(65536)
        finally:
            await asyncio.sleep(0.01)  # the app's last turn
            client.close()

    return uvloop.run(main())


def test_on_uvloop_bytes_that_arrive_during_the_apps_step_come_after_the_held_head() -> None:
    """The production loop, a real socket: uvloop runs a ``call_soon`` made in a task step after the next poll,
    so the client's next bytes reach the protocol before the flush. They are not HTTP here: the client must read
    the 200 head first (it read only the 400)."""

    async def app(client: socket.socket, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        client.send(b"\x01 not http\r\n\r\n")  # the client's next bytes, in flight as the head is written
        await asyncio.sleep(0.2)  # the body comes after the client has read
        await send({"type": "http.response.body", "body": b"ok"})

    received = on_uvloop(app)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"HTTP/1.1 400 " in received


def test_a_held_head_goes_out_when_the_client_half_closes() -> None:
    """A client that half-closes after its request (``shutdown(SHUT_WR)``, ``nc -N``): the transport closes itself
    at the end of file, past the held head, which was dropped (review; plain uvicorn sent the head, then closed)."""

    async def app(client: socket.socket, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await asyncio.sleep(0.02)  # the body is a turn or more behind (a proxied stream)
        await send({"type": "http.response.body", "body": b"ok"})

    received = on_uvloop(app, lambda client: client.shutdown(socket.SHUT_WR))
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")


def over_socket(
    run: Callable[[Any], bytes], app: Any, wire: bytes, sndbuf: int = 0, half_close: bool = False, wait: float = 0
) -> bytes:
    """All a client reads from ``app`` served over a real socket on the loop that ``run`` runs, for ``wire``, up to
    the end of the connection (TimeoutError if it does not end): ``sndbuf`` shrinks the server's socket buffer,
    ``half_close`` ends the client's side after its requests, and it starts reading ``wait`` seconds after them."""

    async def main() -> bytes:
        server_sock, client = socket.socketpair()
        if sndbuf:
            server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        server = Server()
        server.config = Config(app=app, log_level="warning", lifespan="off")
        server.config.load()
        protocol = LimitedHttpTools(config=server.config, server_state=server.state, app_state={}, limits=server.limits)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, server_sock)
        client.sendall(wire)
        if half_close:
            client.shutdown(socket.SHUT_WR)
        await asyncio.sleep(wait)
        client.setblocking(False)
        received = b""
        with client:
            while more := await asyncio.wait_for(asyncio.get_running_loop().sock_recv(client, 65536), 1):
                received += more
        return received

    return run(main())


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_head_held_as_the_connection_closes_leaves_with_its_body(run: Callable[[Any], bytes]) -> None:
    """``nc -N``: two pipelined requests, then the client half-closes. The transport closes itself at the end of
    file, but first sends what it still holds (the first answer, more than the socket takes) and what is written
    meanwhile: the second answer's head, held past its turn, was dropped as the connection was closing, and its
    body went alone (the client read ``small`` where a head was due; plain uvicorn sent both)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b"a" * 60_000 if scope["path"] == "/big" else b"small"
        if scope["path"] == "/small":
            await asyncio.sleep(0.05)  # past the end of file: the connection is closing
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await asyncio.sleep(0.01)  # a proxied body, a turn or more behind its head
        await send({"type": "http.response.body", "body": body})

    wire = b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\nGET /small HTTP/1.1\r\nHost: gw\r\n\r\n"
    received = over_socket(run, app, wire, sndbuf=8192, half_close=True, wait=0.2)  # the first answer overflows it
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 2 and received.endswith(b"\r\n\r\nsmall")


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_an_empty_answer_closes_its_connection(run: Callable[[Any], bytes]) -> None:
    """A 204 (any empty body) leaves as the head and ``b""``. Given to ``writelines``, asyncio's transport keeps the
    empty piece for good from Python 3.12 on, until CPython gh-155888's fix: the connection never closed, and its
    writer woke the loop on every turn."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    received = over_socket(run, app, b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert received == b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"


def test_what_an_app_writes_once_the_connection_is_lost_is_dropped_without_an_error() -> None:
    """The connection is lost (here aborted) as the app writes its answer: uvicorn tells a request that has a
    pipelined one behind it nothing, so its writes go on. uvloop raised on them (so does asyncio's ``writelines``
    on Python 3.12 and 3.13.0, gh-136234), in the app's send or in the held head's flush callback; uvicorn means a
    lost client's answer to be dropped quietly, as asyncio's ``write`` drops it."""
    errors: list[Any] = []
    connections: list[LimitedHttpTools] = []

    async def app(client: socket.socket, scope: Any, receive: Any, send: Any) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        connections[0].transport.abort()  # connection_lost comes next, then the held head's flush
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"ok"})
        except RuntimeError as error:
            errors.append(error)

    real = LimitedHttpTools.connection_made

    def made(self: LimitedHttpTools, transport: asyncio.Transport) -> None:
        connections.append(self)
        real(self, transport)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LimitedHttpTools, "connection_made", made)
        assert on_uvloop(app, lambda client: client.send(b"GET /two HTTP/1.1\r\nHost: gw\r\n\r\n")) == b""
    assert errors == []
