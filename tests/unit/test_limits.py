"""gateway.limits: uvicorn's httptools protocol with header, deadline and connection limits, driven byte by byte.

Each test feeds raw bytes to ``LimitedHttpTools`` over a recording transport, as uvicorn's own protocol
tests do, and looks at what was written and whether the app was called. The process-level proofs (a real
`gateway serve`, real sockets) are in tests/integration/test_limits_process.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import random
import socket
import zlib
from typing import Any

import pytest
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from gateway.client_ws import ClientHop
from gateway.config import LimitsConfig, WebSocketConfig
from gateway.limits import LimitedHttpTools, frame_allowance, refusal, server_options, websocket_options
from gateway.reasons import Reason


class Transport(asyncio.Transport):
    """Records what the protocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class App:
    """Answers 200 ``ok`` and records every request it was called for."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


class Server:
    """One uvicorn server's worth of state: connections made to it share the connection count."""

    def __init__(self, **limits: Any) -> None:
        self.app = App()
        self.config = Config(app=self.app, log_level="warning", lifespan="off")
        self.config.load()
        self.state = ServerState()
        self.limits = LimitsConfig(**limits)

    def connect(self) -> tuple[LimitedHttpTools, Transport]:
        protocol = LimitedHttpTools(config=self.config, server_state=self.state, app_state={}, limits=self.limits)
        transport = Transport()
        protocol.connection_made(transport)
        return protocol, transport


def status(transport: Transport) -> int:
    return int(bytes(transport.written).split(b" ", 2)[1])


def reason(transport: Transport) -> str:
    return str(json.loads(bytes(transport.written).split(b"\r\n\r\n", 1)[1])["reason"])


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def get(path: str = "/", headers: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + headers + b"\r\n"


# --- header bytes and count ---


async def test_a_head_over_header_bytes_gets_431_and_the_app_is_never_called() -> None:
    server = Server(header_bytes=1024)
    protocol, transport = server.connect()
    protocol.data_received(get("/big", b"X-Big: " + b"a" * 2000 + b"\r\n"))
    await settle()
    assert (status(transport), reason(transport), transport.closed) == (431, "headers_too_large", True)
    assert server.app.paths == []


async def test_a_long_request_target_counts_as_head() -> None:
    server = Server(header_bytes=1024)
    protocol, transport = server.connect()
    protocol.data_received(get("/" + "a" * 2000))
    await settle()
    assert (status(transport), reason(transport)) == (431, "headers_too_large")


async def test_an_endless_header_line_is_cut_as_it_arrives_not_when_it_ends() -> None:
    """llhttp hands a header over only once its line ends; the bytes fed meanwhile are what bounds memory."""
    server = Server(header_bytes=1024)
    protocol, transport = server.connect()
    fed = 0
    for chunk in [b"GET / HTTP/1.1\r\nHost: gw\r\nX-Endless: "] + [b"a" * 512] * 100:
        protocol.data_received(chunk)
        fed += len(chunk)
        if transport.closed:
            break
    assert (status(transport), reason(transport)) == (431, "headers_too_large")
    assert fed <= 1024 + 512  # one read past the limit at most


async def test_too_many_headers_get_431_whether_they_come_at_once_or_one_by_one() -> None:
    server = Server(header_count=5)
    at_once, at_once_transport = server.connect()
    at_once.data_received(get("/many", b"".join(b"X-%d: v\r\n" % i for i in range(5))))  # Host makes 6
    trickled, trickled_transport = server.connect()
    trickled.data_received(b"GET /many HTTP/1.1\r\n")
    for i in range(50):  # the head never ends: refused as the count passes the limit
        trickled.data_received(b"X-%d: v\r\n" % i)
        if trickled_transport.closed:
            break
    await settle()
    assert (status(at_once_transport), reason(at_once_transport)) == (431, "too_many_headers")
    assert (status(trickled_transport), reason(trickled_transport)) == (431, "too_many_headers")
    assert i < 10 and server.app.paths == []


async def test_heads_within_the_limits_are_served_however_they_arrive() -> None:
    server = Server(header_bytes=1024, header_count=5)
    protocol, transport = server.connect()
    head = get("/within", b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(4)))
    for i in range(0, len(head), 7):  # trickled in 7-byte reads
        protocol.data_received(head[i : i + 7])
    await settle()
    assert server.app.paths == ["/within"] and status(transport) == 200 and not transport.closed


async def test_a_big_body_read_with_a_small_head_is_not_a_big_head() -> None:
    server = Server(header_bytes=1024)
    protocol, transport = server.connect()
    body = b"b" * 200_000
    protocol.data_received(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await settle()
    assert server.app.paths == ["/upload"] and status(transport) == 200


class Reader(App):
    """Reads the body message by message (yielding between reads, as a forwarder writing upstream does)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (message := await receive())["type"] == "http.request":
            self.messages.append(message["body"])
            if not message["more_body"]:
                break
            await asyncio.sleep(0)
        await App.__call__(self, scope, receive, send)


class Pausing(Transport):
    def __init__(self) -> None:
        super().__init__()
        self.pauses = 0

    def pause_reading(self) -> None:
        self.pauses += 1


class Pieces(LimitedHttpTools):
    """Records each piece of body httptools hands over."""

    pieces: list[bytes]

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        super().on_body(body)


@pytest.mark.parametrize("cuts", [[], [10], [1, 2, 3, 70_000], list(range(1, 200_000, 9_999))])
async def test_a_body_reaches_the_app_whole_however_it_is_cut_and_one_read_piece_is_not_copied(
    cuts: list[int],
) -> None:
    """uvicorn joined every piece into a bytearray and copied that into bytes on each receive; a piece the app
    reads on its own now reaches it as httptools gave it (the same object), and pieces that pile up (more than
    one per read) are joined, in order, with reading paused past 64 KiB as uvicorn pauses it."""
    server = Server()
    server.app = reader = Reader()
    server.config = Config(app=reader, log_level="warning", lifespan="off")
    server.config.load()
    protocol = Pieces(config=server.config, server_state=server.state, app_state={}, limits=server.limits)
    protocol.pieces = []
    transport = Pausing()
    protocol.connection_made(transport)
    body = random.Random(7).randbytes(200_000)
    wire = b"POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    head = wire.index(b"\r\n\r\n") + 4
    edges = [0, head, *(head + cut for cut in cuts), len(wire)]
    for start, end in zip(edges, edges[1:], strict=False):
        protocol.data_received(wire[start:end])
        if end - start < 5_000:  # small pieces pile up before the app reads
            continue
        await settle()
    await settle()
    assert b"".join(reader.messages) == body and status(transport) == 200
    pieces = iter(protocol.pieces)
    for message in reader.messages:  # the pieces each message was made of, in order
        made_of = [next(pieces)]
        while sum(map(len, made_of)) < len(message):
            made_of.append(next(pieces))
        if len(made_of) == 1:
            assert message is made_of[0]  # handed on, not copied
        else:
            assert message == b"".join(made_of)
    assert next(pieces, None) is None
    if not cuts:  # the whole body in one read: one message, no copy
        assert len(reader.messages) == 1 and reader.messages[0] is protocol.pieces[0]
    assert (transport.pauses > 0) == any(len(message) > 65_536 for message in reader.messages)


async def test_pipelined_heads_in_one_read_are_measured_each_on_its_own() -> None:
    """Two 700-byte heads in one 1.4 KB read, under a 1 KiB limit: both are served."""
    server = Server(header_bytes=1024)
    protocol, transport = server.connect()
    one = get("/one", b"X-Pad: " + b"p" * 650 + b"\r\n")
    two = get("/two", b"X-Pad: " + b"p" * 650 + b"\r\n")
    protocol.data_received(one + two)
    await settle()
    assert server.app.paths == ["/one", "/two"] and not transport.closed


class Holder(App):
    """Reads the body, holds its scope (as a request waiting for its upstream does), and never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.scopes: list[Any] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        while (await receive())["type"] == "http.request":
            await asyncio.sleep(0)


def chunked_post(path: str) -> bytes:
    return b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"


async def test_trailers_are_header_fields_too_many_cut_the_connection() -> None:
    """llhttp hands trailer fields to on_header, and uvicorn appends them to the scope's headers the app holds."""
    server = Server(header_count=10)
    server.app = server.config.loaded_app = Holder()  # type: ignore[assignment]
    protocol, transport = server.connect()
    protocol.data_received(chunked_post("/trailers") + b"".join(b"T-%d: x\r\n" % i for i in range(5000)) + b"\r\n")
    await settle()
    assert transport.closed
    assert [name for name, _ in server.app.scopes[0]["headers"]] == [b"host", b"transfer-encoding"]


async def test_trailers_that_come_while_the_app_holds_the_scope_never_join_its_headers() -> None:
    """A trailer Host came after the gateway had routed on the head's, and went upstream as the request's Host."""
    server = Server()
    server.app = server.config.loaded_app = Holder()  # type: ignore[assignment]
    protocol, transport = server.connect()
    protocol.data_received(chunked_post("/trailers"))
    await settle()  # the app holds the scope: the request is being admitted
    protocol.data_received(b"Host: evil.example\r\nAuthorization: Bearer unchecked\r\n\r\n")
    await settle()
    assert not transport.closed
    assert server.app.scopes[0]["headers"] == [(b"host", b"gw"), (b"transfer-encoding", b"chunked")]


@pytest.mark.parametrize("framing", [b"Content-Length: 36\r\n", b"Transfer-Encoding: chunked\r\n"])
async def test_a_body_behind_an_upgrade_that_is_not_taken_is_refused_never_read_as_a_request(framing: bytes) -> None:
    """llhttp takes no body after Connection: Upgrade: a proxy's body became the next request, one it never saw."""
    server = Server()
    protocol, transport = server.connect()
    head = b"POST /one HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n" + framing + b"\r\n"
    protocol.data_received(head)
    if not transport.closed:
        protocol.data_received(b"GET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n")
    await settle()
    assert server.app.paths == [] and transport.closed and status(transport) == 400


async def test_an_upgrade_that_is_not_taken_without_a_body_is_served_as_http() -> None:
    server = Server()
    protocol, transport = server.connect()
    protocol.data_received(
        b"GET /one HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"
    )
    await settle()
    protocol.data_received(get("/two"))
    await settle()
    assert server.app.paths == ["/one", "/two"] and not transport.closed


async def test_an_endless_trailer_line_is_cut_as_it_arrives() -> None:
    server = Server(header_bytes=1024)
    server.app = server.config.loaded_app = Holder()  # type: ignore[assignment]
    protocol, transport = server.connect()
    protocol.data_received(chunked_post("/trailer") + b"T-Endless: ")
    fed = 0
    for _ in range(100):
        protocol.data_received(b"t" * 512)
        fed += 512
        if transport.closed:
            break
    assert transport.closed and fed <= 1024 + 512


async def test_a_chunked_body_in_small_pieces_is_not_mistaken_for_trailers() -> None:
    server = Server(header_bytes=1024)
    server.app = server.config.loaded_app = Holder()  # type: ignore[assignment]
    protocol, transport = server.connect()
    protocol.data_received(b"POST /many-chunks HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(2000):  # 2000 one-byte chunks, each in its own read: 12 KB of framing for 2 KB of body
        protocol.data_received(b"1\r\nx\r\n")
    protocol.data_received(b"0\r\n\r\n")
    await settle()
    assert not transport.closed and len(server.app.scopes) == 1


# --- the header deadline ---


async def test_the_sweep_ends_overdue_heads_only() -> None:
    server = Server(header_timeout=10)
    silent, silent_transport = server.connect()
    partial, partial_transport = server.connect()
    partial.data_received(b"GET /slow HTTP/1.1\r\nHost: gw\r\n")
    served, served_transport = server.connect()
    served.data_received(get("/served"))
    await settle()
    connections = silent._connections
    connections.sweep(silent.head_since + 9)  # not yet
    assert not (silent_transport.closed or partial_transport.closed)
    connections.sweep(silent.head_since + 11)
    assert silent_transport.closed and silent_transport.written == b""  # nothing asked, nothing answered
    assert partial_transport.closed and (status(partial_transport), reason(partial_transport)) == (
        408,
        "header_timeout",
    )
    assert not served_transport.closed  # answered, kept alive: uvicorn's idle timer is in charge now


async def test_a_kept_alive_connections_next_head_is_due_from_its_first_byte() -> None:
    server = Server(header_timeout=10)
    protocol, transport = server.connect()
    protocol.data_received(get("/first"))
    await settle()
    assert protocol.head_since == 0.0  # between requests: the idle timeout applies, not the head deadline
    protocol.data_received(b"GET /second HTTP/1.1\r\n")
    began = protocol.head_since
    assert began > 0.0
    protocol._connections.sweep(began + 11)
    assert transport.closed and transport.written.endswith(b'"reason":"header_timeout"}')


async def test_the_sweep_runs_by_itself() -> None:
    server = Server(header_timeout=0.2)
    _, transport = server.connect()
    await asyncio.sleep(0.5)
    assert transport.closed


async def test_a_pipelined_head_is_not_overdue_while_the_server_stops_reading() -> None:
    """A real socket. Behind a slow answer the client pipelines a second request and the start of a third, the rest
    of which it sends at once: uvicorn stops reading at the queued second head, so the third one's rest waits in the
    socket, unread. The deadline ran on: the connection was closed mid-answer, the slow one's head alone sent."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await asyncio.sleep(0.8 if scope["path"] == "/slow" else 0)
        await send({"type": "http.response.body", "body": b"ok"})

    config = uvicorn.Config(app, lifespan="off", log_level="error", **server_options(LimitsConfig(header_timeout=0.2)))
    server = uvicorn.Server(config)
    sock = socket.create_server(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection(*sock.getsockname())
    try:
        writer.write(get("/slow"))
        await asyncio.sleep(0.05)
        writer.write(get("/two") + get("/three")[:10])
        await asyncio.sleep(0.05)
        writer.write(get("/three")[10:])
        received = b""
        with contextlib.suppress(ConnectionError, TimeoutError):
            while received.count(b"ok") < 3 and (more := await asyncio.wait_for(reader.read(65536), 2)):
                received += more
        assert received.count(b"HTTP/1.1 200 OK\r\n") == 3
    finally:
        writer.close()
        server.should_exit = True
        await task


# --- connections ---


async def test_a_connection_over_the_cap_gets_503_and_the_others_are_served() -> None:
    server = Server(max_connections=2)
    (first, first_t), (second, second_t) = server.connect(), server.connect()
    over, over_t = server.connect()
    over.data_received(get("/over"))
    first.data_received(get("/first"))
    second.data_received(get("/second"))
    await settle()
    assert (status(over_t), reason(over_t), over_t.closed) == (503, "connection_limit", True)
    assert b"retry-after: " in over_t.written
    assert server.app.paths == ["/first", "/second"] and status(first_t) == status(second_t) == 200
    over.connection_lost(None)
    first.connection_lost(None)
    later, later_t = server.connect()  # two closed, one slot free
    later.data_received(get("/later"))
    await settle()
    assert server.app.paths[-1] == "/later" and status(later_t) == 200


async def test_a_websocket_leaves_the_http_connection_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HttpToolsProtocol, "handle_websocket_upgrade", lambda self: None)
    server = Server()
    protocol, _ = server.connect()
    assert len(protocol._connections.open) == 1
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    protocol.data_received(get("/ws", upgrade + b"Sec-WebSocket-Version: 13\r\n"))
    assert len(protocol._connections.open) == 0


# --- what uvicorn gets ---


async def test_the_server_options_pickle_into_spawned_workers() -> None:
    limits = LimitsConfig(header_bytes=4096, idle_timeout=7)
    options = pickle.loads(pickle.dumps(server_options(limits)))
    assert options["timeout_keep_alive"] == 7
    config = Config(app=App(), log_level="warning", lifespan="off", **options)
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
    assert isinstance(protocol, LimitedHttpTools) and protocol._max_bytes == 4096


def test_refusals_are_small_json_that_close_the_connection() -> None:
    head, body = refusal(Reason.CONNECTION_LIMIT).split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"connection: close" in head and b"retry-after: 5" in head and b"cache-control: no-store" in head
    assert json.loads(body) == {"error": "service_unavailable", "reason": "connection_limit"}
    assert refusal(Reason.HEADERS_TOO_LARGE).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


@pytest.mark.parametrize("size", [1024, 65_536, 1_048_576])
@pytest.mark.parametrize(("level", "wbits", "strategy"), [(6, 15, zlib.Z_DEFAULT_STRATEGY), (1, 9, zlib.Z_FIXED)])
def test_a_deflated_message_of_the_limit_fits_the_frame_allowance(
    size: int, level: int, wbits: int, strategy: int
) -> None:
    """Random bytes, the worst case, with a sync flush per frame as permessage-deflate sends it (issue 17)."""
    data = random.Random(size).randbytes(size)
    compressor = zlib.compressobj(level, zlib.DEFLATED, -wbits, 8, strategy)
    deflated = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert size < len(deflated) <= frame_allowance(size)


def test_uvicorn_reads_client_frames_up_to_the_allowance_with_the_sansio_protocol() -> None:
    options = websocket_options(WebSocketConfig(max_message_size=65_536, ping_interval=0))
    assert issubclass(options["ws"], WebSocketsSansIOProtocol)  # uvicorn's websockets-sansio, with fast paths
    assert options == {"ws": ClientHop, "ws_max_size": frame_allowance(65_536), "ws_ping_interval": None}
    Config(app=lambda *a: None, **options).load()  # a protocol uvicorn knows
