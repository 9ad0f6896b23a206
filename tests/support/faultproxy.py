"""A fault-injecting TCP proxy for tests, modelled on Shopify's toxiproxy.

Put it between the code under test and Redis (``protocol="resp"``: it follows commands and their replies,
so a rule can act on one command's reply) or an HTTP server (``protocol="raw"``: a rule acts once per
connection, on its request line). It runs its own event loop in a daemon thread, so sync and async tests
drive it alike, and every control method returns once the change has taken effect::

    with FaultProxy("127.0.0.1", 6379) as proxy:
        rule = proxy.add_rule(r"^SET ", "drop_reply")
        ...  # point the code under test at proxy.redis_url()
        assert proxy.matched(rule) == 1

Rule actions, for the command (resp) or the connection's first request (raw) that a rule fires on:

- ``delay_reply``: forward it, hold its reply ``delay`` seconds (later replies on the connection queue behind it);
- ``drop_reply``: forward it, swallow its reply; the connection is then black-holed until the client closes it;
- ``reset_after``: forward it, and when its reply arrives reset the client connection instead of delivering it;
- ``reset_before``: reset the client connection without forwarding it;
- ``delay_command``: hold it ``delay`` seconds before forwarding it;
- ``blackhole_conn``: do not forward it; nothing more goes through that connection either way.

A reset is a real TCP RST (``SO_LINGER`` {1, 0}, then close), as when a peer or a middlebox drops its state.
In resp mode, after ``drop_reply`` or ``reset_after`` nothing more the client sends on that connection is
forwarded (the connection is doomed anyway), and ``heal()`` resets every black-holed connection, whatever
black-holed it. Not followed: ``CLIENT REPLY OFF|SKIP`` (commands without replies would shift the
reply bookkeeping) and ``MONITOR`` mixed with other commands on one connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import socket
import struct
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, get_args

logger = logging.getLogger(__name__)

Action = Literal["delay_reply", "drop_reply", "reset_after", "reset_before", "delay_command", "blackhole_conn"]
ACTIONS: frozenset[str] = frozenset(get_args(Action))

_CHUNK = 65536
_HEAD_LIMIT = 8192  # raw mode: how much of a connection's first bytes is waited for before matching
_CONTROL_TIMEOUT = 10.0
_ARG_LIMIT = 4096  # bytes of each command argument rendered for the log and for matching

# RESP type bytes (RESP3 ones included: redis-py speaks RESP2 by default, RESP3 with protocol=3).
_BLOBS = frozenset(b"$!=")  # length-prefixed: bulk string, bulk error, verbatim string
_AGGREGATES = frozenset(b"*~>")  # N elements: array, set, push
_MAPS = frozenset(b"%|")  # N pairs: map, attribute
_LINES = frozenset(b"+-:_,#(")  # one line: simple string, error, integer, null, double, boolean, big number
_ARRAY_LIKE = frozenset(b"*>")

# Pub/sub: replies nobody asked for, and the commands whose confirmations are one reply per channel.
_MESSAGES = frozenset({b"message", b"pmessage", b"smessage"})
_PUBSUB_COMMANDS = frozenset(
    {b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe", b"sunsubscribe"}
)


@dataclass(eq=False)  # identity semantics: a rule is a handle, two equal-looking rules are still two
class Rule:
    """A fault rule; ``fired`` counts the commands (raw: connections) it acted on."""

    match: re.Pattern[str]
    action: str
    delay: float = 0.0
    nth: int = 1
    times: int | None = 1
    fired: int = 0
    seen: int = 0  # matching commands so far, acted on or not; the rule fires from the nth on


# --- RESP parsing ---


def _render(args: list[bytes]) -> str:
    """A command as a log line: its arguments space-joined, non-UTF-8 bytes escaped, long ones cut."""
    return " ".join(_render_arg(arg) for arg in args)


def _render_arg(arg: bytes) -> str:
    # Cut, so a multi-megabyte value neither stalls the proxy's loop nor bloats the log; scripts still fit.
    if len(arg) <= _ARG_LIMIT:
        return arg.decode("utf-8", "backslashreplace")
    return f"{arg[:_ARG_LIMIT].decode('utf-8', 'backslashreplace')}...(+{len(arg) - _ARG_LIMIT} bytes)"


class _CommandParser:
    """Splits a client->server byte stream into commands: RESP arrays of bulk strings, or inline lines."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def take(self) -> bytes:
        """Whatever is buffered, unparsed (for falling back to plain forwarding)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def feed(self, data: bytes) -> list[tuple[bytes, list[bytes]]]:
        """The complete commands now buffered, as (raw bytes, arguments); raises ValueError on garbage."""
        buf = self._buf
        buf += data
        commands: list[tuple[bytes, list[bytes]]] = []
        pos = 0
        while pos < len(buf):
            if buf[pos] == ord("*"):
                parsed = self._multibulk(buf, pos)
                if parsed is None:
                    break
                end, args = parsed
            else:
                newline = buf.find(b"\n", pos)
                if newline < 0:
                    if len(buf) - pos > _CHUNK:  # Redis itself gives up on inline commands this long
                        raise ValueError("inline command too long")
                    break
                end, args = newline + 1, bytes(buf[pos:newline]).split()
            commands.append((bytes(buf[pos:end]), args))
            pos = end
        del buf[:pos]
        return commands

    @staticmethod
    def _multibulk(buf: bytearray, pos: int) -> tuple[int, list[bytes]] | None:
        """(end, args) of the array at ``pos``, or None while incomplete."""
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        count = int(buf[pos + 1 : line_end])
        cursor, args = line_end + 2, []
        for _ in range(max(count, 0)):
            line_end = buf.find(b"\r\n", cursor)
            if line_end < 0:
                return None
            if buf[cursor] != ord("$"):
                raise ValueError("command array element is not a bulk string")
            size = int(buf[cursor + 1 : line_end])
            if size < 0 or len(buf) < line_end + 2 + size + 2:
                if size < 0:
                    raise ValueError("null bulk string in a command")
                return None
            args.append(bytes(buf[line_end + 2 : line_end + 2 + size]))
            cursor = line_end + 2 + size + 2
        return cursor, args


@dataclass
class _Reply:
    data: bytes
    kind: int  # type byte of the top-level value
    items: tuple[bytes | None, ...]  # first two elements of a top-level array or push, when strings


class _ReplyParser:
    """Splits a server->client byte stream into whole RESP2/RESP3 replies; resumes where the last chunk ended."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = 0  # where the reply being parsed begins
        self._pos = 0  # where parsing resumes
        self._stack: list[list[int]] = []  # open aggregates: [elements still to come, is an attribute]
        self._kind = 0
        self._items: list[bytes | None] = []

    def take(self) -> bytes:
        """Whatever is buffered, unparsed (for falling back to plain forwarding)."""
        data = bytes(self._buf[self._start :])
        self._buf.clear()
        self._start = self._pos = 0
        self._stack.clear()
        return data

    def feed(self, data: bytes) -> list[_Reply]:
        """The replies completed by ``data``; raises ValueError on garbage."""
        self._buf += data
        replies = []
        while (reply := self._next()) is not None:
            replies.append(reply)
        if self._start:
            del self._buf[: self._start]
            self._pos -= self._start
            self._start = 0
        return replies

    def _next(self) -> _Reply | None:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n", self._pos)
            if line_end < 0:
                return None
            kind = buf[self._pos]
            header = bytes(buf[self._pos + 1 : line_end])
            value: bytes | None = None
            children = 0
            after = line_end + 2
            if kind in _BLOBS:
                size = int(header)
                if size >= 0:
                    after = line_end + 2 + size + 2
                    if len(buf) < after:
                        return None
                    value = bytes(buf[line_end + 2 : line_end + 2 + size])
            elif kind in _AGGREGATES:
                children = max(int(header), 0)  # -1: null array
            elif kind in _MAPS:
                children = 2 * int(header)
            elif kind == ord("+"):
                value = header
            elif kind not in _LINES:
                raise ValueError(f"not a RESP type: {bytes([kind])!r}")
            is_attribute = kind == ord("|")
            if not self._stack and not is_attribute:
                self._kind, self._items = kind, []
            elif (
                len(self._stack) == 1
                and not self._stack[0][1]
                and self._kind in _ARRAY_LIKE
                and len(self._items) < 2
                and not is_attribute
            ):
                self._items.append(value)
            self._pos = after
            if children:
                self._stack.append([children, int(is_attribute)])
                continue
            if is_attribute:  # an empty attribute annotates the value that follows; nothing ended
                continue
            # An element ended: close every aggregate it completes. An attribute does not count as an
            # element of its parent: the value it annotates comes next.
            while self._stack:
                top = self._stack[-1]
                top[0] -= 1
                if top[0]:
                    break
                self._stack.pop()
                if top[1]:
                    break
            else:
                reply = _Reply(bytes(buf[self._start : self._pos]), self._kind, tuple(self._items))
                self._start = self._pos
                return reply


# --- connections ---


@dataclass
class _Pending:
    """A forwarded command whose reply has not all arrived."""

    action: str | None = None
    delay: float = 0.0
    pubsub: bytes | None = None  # lower-cased (un)subscribe command: one confirmation per channel
    expected: int | None = 1  # replies it gets; None: unsubscribe-from-all, known when its first reply comes
    received: int = 0


@dataclass
class _Out:
    """An item for the client, released at loop time ``at``: data, or a signal once the data before it is out."""

    at: float
    data: bytes | None = None
    signal: Literal["blackhole", "reset", "eof"] | None = None


@dataclass(eq=False)
class _Conn:
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    server_reader: asyncio.StreamReader | None = None
    server_writer: asyncio.StreamWriter | None = None
    server_transport: asyncio.WriteTransport | None = None  # set on connection_made, before open returns
    group: asyncio.TaskGroup | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False
    blackholed: bool = False  # nothing goes through, either way, until the client closes or heal() closes it
    inbound_stopped: bool = False  # a command after which nothing more is forwarded was sent
    outbound_stopped: bool = False  # that command's reply came: nothing more is parsed or delivered
    passthrough: bool = False  # not RESP after all: forward bytes as they are, no rules
    pubsub: bool = False  # has subscribed: RESP2 "message" arrays are pushes, not replies
    pending: deque[_Pending] = field(default_factory=deque)
    out: asyncio.Queue[_Out] = field(default_factory=asyncio.Queue)
    channels: dict[bytes, set[bytes | None]] = field(default_factory=lambda: {b"": set(), b"p": set(), b"s": set()})
    commands: _CommandParser = field(default_factory=_CommandParser)
    replies: _ReplyParser = field(default_factory=_ReplyParser)


class _Upstream(asyncio.StreamReaderProtocol):
    """Records the upstream transport on the connection as soon as it exists, so a reset can never leak it."""

    def __init__(
        self, reader: asyncio.StreamReader, conn: _Conn, transports: weakref.WeakSet[asyncio.WriteTransport]
    ) -> None:
        super().__init__(reader)
        self._conn, self._transports = conn, transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.WriteTransport)
        self._conn.server_transport = transport
        self._transports.add(transport)
        if self._conn.closed:  # reset while connecting
            transport.abort()


async def _read(reader: asyncio.StreamReader, size: int = _CHUNK) -> bytes:
    """Up to ``size`` bytes; b"" at EOF or when the peer reset the connection."""
    try:
        return await reader.read(size)
    except OSError:
        return b""


def _pubsub_family(command: bytes) -> bytes:
    """b"" for (un)subscribe, b"p" for patterns, b"s" for shard channels."""
    return command.removesuffix(b"subscribe").removesuffix(b"un")


# --- the proxy ---


class FaultProxy:
    """Listens on 127.0.0.1:<free port chosen by binding port 0>, forwards to target (host, port)."""

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int, *, protocol: Literal["resp", "raw"] = "resp") -> None:
        if protocol not in ("resp", "raw"):
            raise ValueError(f"protocol must be 'resp' or 'raw', not {protocol!r}")
        self.target_host, self.target_port, self.protocol = target_host, target_port, protocol
        self.port = 0  # known once start() returns
        self._lock = threading.Lock()  # guards _rules (and their counters) and _log across threads
        self._rules: list[Rule] = []
        self._log: list[str] = []
        # Loop-thread state: changed only on the loop (control methods hop there), so never torn.
        self._mode: Literal["normal", "down", "blackhole"] = "normal"
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        # Every transport, so stop() can abort even those still flushing after a graceful close.
        self._transports: weakref.WeakSet[asyncio.WriteTransport] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False

    # --- lifecycle ---

    def start(self) -> FaultProxy:
        """Start listening (own event loop, daemon thread); return once connections are accepted."""
        if self._thread is not None:
            if self._stopped:
                raise RuntimeError("a stopped FaultProxy cannot be started again")
            return self
        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy-{self.target_host}:{self.target_port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(_CONTROL_TIMEOUT) or self._error is not None:
            self.stop()
            raise RuntimeError("FaultProxy did not start") from self._error
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening, join the thread; safe to call twice."""
        if self._thread is None or self._stopped:
            self._stopped = True
            return
        self._stopped = True
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop_event.set)
        self._thread.join(_CONTROL_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError("FaultProxy did not stop")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT`` (resp) or ``http://127.0.0.1:PORT`` (raw)."""
        scheme = "redis" if self.protocol == "resp" else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def redis_url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:PORT/db``, for clients that should go through the proxy."""
        return f"redis://{self.host}:{self.port}/{db}"

    # --- rules and faults (any thread) ---

    def add_rule(self, match: str, action: str, *, delay: float = 0.0, nth: int = 1, times: int | None = 1) -> Rule:
        """Act on the ``nth`` command matching ``match`` (a case-insensitive regex, searched) and the next ones,
        ``times`` times in all (None: no limit). Counting spans all connections; the first rule added that
        is due acts, other matching rules only count the command."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {sorted(ACTIONS)}")
        if nth < 1 or (times is not None and times < 1) or delay < 0:
            raise ValueError("need nth >= 1, times >= 1 or None, delay >= 0")
        rule = Rule(re.compile(match, re.IGNORECASE), action, delay, nth, times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        """Remove every rule; connections a rule already black-holed stay so."""
        with self._lock:
            self._rules.clear()

    def matched(self, rule: Rule) -> int:
        """How many times ``rule`` fired."""
        with self._lock:
            return rule.fired

    @property
    def log(self) -> list[str]:
        """Commands seen, in order (resp: space-joined arguments; raw: each connection's request line)."""
        with self._lock:
            return list(self._log)

    def down(self) -> None:
        """Refuse: reset every connection; new ones are accepted and reset at once."""

        def down() -> None:
            self._mode = "down"
            for conn in list(self._conns):
                self._kill(conn, rst=True)

        self._control(down)

    def blackhole(self) -> None:
        """Connections, current and new, stay open but nothing is forwarded either way."""

        def blackhole() -> None:
            self._mode = "blackhole"
            for conn in self._conns:
                conn.blackholed = True

        self._control(blackhole)

    def heal(self) -> None:
        """Forward normally again; black-holed connections (by blackhole() or a rule) are reset, not revived."""

        def heal() -> None:
            self._mode = "normal"
            for conn in list(self._conns):
                if conn.blackholed:
                    self._kill(conn, rst=True)

        self._control(heal)

    def reset_all(self) -> None:
        """Reset every current connection once; new ones are accepted as usual."""

        def reset_all() -> None:
            for conn in list(self._conns):
                self._kill(conn, rst=True)

        self._control(reset_all)

    def _control(self, change: Callable[[], None]) -> None:
        """Run ``change`` on the loop thread and wait for it (directly when not running)."""
        loop, thread = self._loop, self._thread
        if (
            loop is None
            or thread is None
            or self._stopped
            or not thread.is_alive()
            or threading.current_thread() is thread
        ):
            change()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                change()
            except BaseException as exc:  # handed to the calling thread
                done.set_exception(exc)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(run)
        done.result(_CONTROL_TIMEOUT)

    def _evaluate(self, rendered: str) -> Rule | None:
        """Log a command and return the rule that acts on it, if any."""
        with self._lock:
            self._log.append(rendered)
            chosen = None
            for rule in self._rules:
                if not rule.match.search(rendered):
                    continue
                rule.seen += 1
                if chosen is None and rule.seen >= rule.nth and (rule.times is None or rule.fired < rule.times):
                    rule.fired += 1
                    chosen = rule
            return chosen

    # --- loop thread ---

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start(); a thread must not die with an exception under pytest
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._accept, self.host, 0)
        try:
            self.port = int(server.sockets[0].getsockname()[1])
            self._ready.set()
            await self._stop_event.wait()
        finally:
            server.close()
            await asyncio.sleep(0)  # connections accepted just before the close register themselves
            for conn in list(self._conns):
                self._kill(conn, rst=True)
            # Handlers end by themselves once their pumps are cancelled; cancelling them instead would
            # trip a 3.11 bug (its client_connected_cb callback calls exception() on a cancelled task).
            await asyncio.gather(*self._handlers, return_exceptions=True)
            for transport in list(self._transports):
                transport.abort()
            await server.wait_closed()
            # Let the connection_lost callbacks close the sockets while the loop still runs.
            for _ in range(3):
                await asyncio.sleep(0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Conn(reader, writer)
        self._handlers.add(task)
        self._conns.add(conn)
        self._transports.add(writer.transport)
        try:
            if self._mode == "down" or (self._stop_event is not None and self._stop_event.is_set()):
                self._kill(conn, rst=True)
                return
            conn.blackholed = self._mode == "blackhole"
            async with asyncio.TaskGroup() as group:
                conn.group = group
                first = self._resp(conn) if self.protocol == "resp" else self._raw(conn)
                conn.pumps.append(group.create_task(first))
        except asyncio.CancelledError:
            pass  # only stop() gets here, mid-teardown; ending normally sidesteps the 3.11 callback bug
        except Exception:
            logger.exception("faultproxy connection failed")
        finally:
            self._kill(conn, rst=True)  # no-op unless something above went wrong
            self._conns.discard(conn)
            self._handlers.discard(task)

    def _kill(self, conn: _Conn, *, rst: bool) -> None:
        """End a connection: an RST or a normal close to the client, a close to the server; stop its pumps."""
        if conn.closed:
            return
        conn.closed = True
        transport = conn.client_writer.transport
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
        if conn.server_transport is not None:
            conn.server_transport.abort()
        current = asyncio.current_task()
        for pump in conn.pumps:
            if pump is not current:
                pump.cancel()

    async def _connect(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_CHUNK, loop=loop)
        protocol = _Upstream(reader, conn, self._transports)
        transport, _ = await loop.create_connection(lambda: protocol, self.target_host, self.target_port)
        conn.server_reader, conn.server_writer = reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    @staticmethod
    def _spawn(conn: _Conn, pump: Coroutine[Any, Any, None]) -> None:
        """Run ``pump`` alongside the connection's others; a reset cancels them all."""
        assert conn.group is not None
        conn.pumps.append(conn.group.create_task(pump))

    async def _drain(self, conn: _Conn, writer: asyncio.StreamWriter) -> bool:
        """Wait for ``writer`` to flush; on a broken connection close it and say so."""
        try:
            await writer.drain()
        except OSError:
            self._kill(conn, rst=False)
            return False
        return True

    # --- resp ---

    async def _resp(self, conn: _Conn) -> None:
        """Connect upstream, then pump commands; replies flow through _resp_replies and the ordered _deliver."""
        if not conn.blackholed:  # a connection born black-holed never reaches the server
            try:
                await self._connect(conn)
            except OSError:
                self._kill(conn, rst=True)  # as the client would see a refused server
                return
            self._spawn(conn, self._resp_replies(conn))
            self._spawn(conn, self._deliver(conn))
        await self._resp_commands(conn)

    async def _resp_commands(self, conn: _Conn) -> None:
        while data := await _read(conn.client_reader):
            if conn.blackholed or conn.inbound_stopped:
                continue
            writer = conn.server_writer
            assert writer is not None
            if conn.passthrough:
                writer.write(data)
            else:
                try:
                    commands = conn.commands.feed(data)
                except ValueError:
                    self._evaluate("<not RESP: forwarding as is>")
                    conn.passthrough = True
                    writer.write(conn.commands.take())
                    commands = []
                for raw, args in commands:
                    if not args:  # an empty command: Redis ignores it without a reply
                        continue
                    rule = self._evaluate(_render(args))
                    action = rule.action if rule is not None else None
                    delay = rule.delay if rule is not None else 0.0
                    if action == "reset_before":
                        self._kill(conn, rst=True)
                        return
                    if action == "blackhole_conn":
                        conn.blackholed = True
                        break
                    if action == "delay_command":
                        # Holding the pump keeps the commands after it in order behind it.
                        await asyncio.sleep(delay)
                        if conn.blackholed:
                            break
                    conn.pending.append(self._pending(conn, args, action, delay))
                    writer.write(raw)
                    if action in ("drop_reply", "reset_after"):
                        conn.inbound_stopped = True  # the connection is doomed: its later commands never run
                        break
            if not await self._drain(conn, writer):
                return
        self._kill(conn, rst=False)  # the client closed

    @staticmethod
    def _pending(conn: _Conn, args: list[bytes], action: str | None, delay: float) -> _Pending:
        name = args[0].lower()
        if name not in _PUBSUB_COMMANDS:
            return _Pending(action, delay)
        conn.pubsub = True
        channels = len(args) - 1
        unsubscribe_all = channels == 0 and name.endswith(b"unsubscribe")
        return _Pending(action, delay, name, None if unsubscribe_all else max(channels, 1))

    async def _resp_replies(self, conn: _Conn) -> None:
        assert conn.server_reader is not None
        loop = asyncio.get_running_loop()
        while data := await _read(conn.server_reader):
            if conn.blackholed or conn.outbound_stopped:
                continue
            if conn.passthrough:
                conn.out.put_nowait(_Out(loop.time(), data))
                continue
            try:
                replies = conn.replies.feed(data)
            except ValueError:
                conn.passthrough = True
                conn.out.put_nowait(_Out(loop.time(), conn.replies.take()))
                continue
            for reply in replies:
                owner = self._owner(conn, reply)
                action = owner.action if owner is not None else None
                if action == "delay_reply":
                    assert owner is not None
                    conn.out.put_nowait(_Out(loop.time() + owner.delay, reply.data))
                elif action in ("drop_reply", "reset_after"):
                    conn.outbound_stopped = True
                    conn.out.put_nowait(_Out(loop.time(), signal="blackhole" if action == "drop_reply" else "reset"))
                    break
                else:
                    conn.out.put_nowait(_Out(loop.time(), reply.data))
        if not (conn.blackholed or conn.outbound_stopped):
            conn.out.put_nowait(_Out(loop.time(), signal="eof"))  # the server closed: so does the client, after

    @staticmethod
    def _owner(conn: _Conn, reply: _Reply) -> _Pending | None:
        """The pending command ``reply`` answers (popped once all its replies came), or None for a push."""
        head = conn.pending[0] if conn.pending else None
        first = reply.items[0].lower() if reply.items and reply.items[0] is not None else None
        push = reply.kind == ord(">")
        if first is not None and (push or (reply.kind == ord("*") and conn.pubsub)):
            if first in _MESSAGES:
                return None
            if first in _PUBSUB_COMMANDS:
                if head is None or head.pubsub != first:
                    return None  # e.g. the server dropping a shard channel on its own
                channels = conn.channels[_pubsub_family(first)]
                if head.expected is None:  # unsubscribe from all: one confirmation per channel, at least one
                    head.expected = max(len(channels), 1)
                channel = reply.items[1] if len(reply.items) > 1 else None
                if first.endswith(b"unsubscribe"):
                    channels.discard(channel)
                else:
                    channels.add(channel)
            elif push:
                return None  # client-tracking invalidations and the like
        if head is None:
            return None  # MONITOR output, or a reply we lost track of: deliver it as it is
        head.received += 1
        if head.expected is None or head.received >= head.expected:
            conn.pending.popleft()
        return head

    async def _deliver(self, conn: _Conn) -> None:
        """Write replies to the client in order, each no earlier than its release time."""
        loop = asyncio.get_running_loop()
        while True:
            item = await conn.out.get()
            if (wait := item.at - loop.time()) > 0:
                await asyncio.sleep(wait)
            if conn.blackholed:
                continue
            if item.data is not None:
                conn.client_writer.write(item.data)
                if not await self._drain(conn, conn.client_writer):
                    return
            elif item.signal == "blackhole":
                conn.blackholed = True
            else:
                self._kill(conn, rst=item.signal == "reset")
                return

    # --- raw ---

    async def _raw(self, conn: _Conn) -> None:
        """Wait for the request head, let the rules decide, then pump both ways unparsed."""
        head = bytearray()
        while not conn.blackholed and b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
            data = await _read(conn.client_reader, _HEAD_LIMIT - len(head))
            if not data:
                self._kill(conn, rst=False)
                return
            head += data
        request_line = bytes(head).split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        rule = None if conn.blackholed else self._evaluate(request_line)
        action = rule.action if rule is not None else None
        if action == "reset_before":
            self._kill(conn, rst=True)
            return
        if action == "blackhole_conn":
            conn.blackholed = True
        if action == "delay_command":
            assert rule is not None
            await asyncio.sleep(rule.delay)
        if not conn.blackholed:
            try:
                await self._connect(conn)
            except OSError:
                self._kill(conn, rst=True)
                return
            assert conn.server_writer is not None
            self._spawn(conn, self._raw_responses(conn, action, rule.delay if rule is not None else 0.0))
            conn.server_writer.write(head)
        while True:
            if conn.server_writer is not None and not await self._drain(conn, conn.server_writer):
                return
            data = await _read(conn.client_reader)
            if not data:
                break
            if not conn.blackholed and conn.server_writer is not None:
                conn.server_writer.write(data)
        self._kill(conn, rst=False)

    async def _raw_responses(self, conn: _Conn, action: str | None, delay: float) -> None:
        assert conn.server_reader is not None
        first = True
        while data := await _read(conn.server_reader):
            if conn.blackholed:
                continue
            if first:
                first = False
                if action == "reset_after":
                    self._kill(conn, rst=True)
                    return
                if action == "drop_reply":
                    conn.blackholed = True
                    continue
                if action == "delay_reply":
                    await asyncio.sleep(delay)
                    if conn.blackholed:
                        continue
            conn.client_writer.write(data)
            if not await self._drain(conn, conn.client_writer):
                return
        if action == "reset_after" and first:
            self._kill(conn, rst=True)  # the server hung up without answering: still a reset, not a close
        elif not conn.blackholed:
            self._kill(conn, rst=False)
