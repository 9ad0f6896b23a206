"""The fault-injecting proxy (tests/support/faultproxy.py) against a real redis-server and a real HTTP server.

Each fault is checked from both ends: what the client sees (timeout, reset, delay) and what the server
did (the key is set or not, the request was handled or not), since that pairing is what tests built on
the proxy rely on.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.faultproxy import FaultProxy

TIMEOUT = 0.5  # client socket timeout: how long a lost reply takes to notice


def _via(proxy: FaultProxy, redis_url: str) -> str:
    """``redis_url`` (credentials and database kept) pointed at the proxy."""
    parts = urlsplit(redis_url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(("redis", f"{userinfo}{at}{proxy.host}:{proxy.port}", parts.path, parts.query, ""))


def _client(proxy: FaultProxy, redis_url: str, timeout: float = TIMEOUT, **options: Any) -> redis.Redis:
    """A client through the proxy that never retries, so each fault surfaces as the error it causes."""
    return redis.Redis.from_url(
        _via(proxy, redis_url),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


def _command(*args: str) -> bytes:
    """A command in RESP, for tests that speak to the proxy over a bare socket."""
    return f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)


def _recv_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything received, and how the connection ended: "reset", "eof" or "timeout"."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            return data, "timeout"
        if not chunk:
            return data, "eof"
        data += chunk


@pytest.fixture
def proxy(redis_url: str) -> Iterator[FaultProxy]:
    parts = urlsplit(redis_url)
    if parts.scheme != "redis":
        pytest.skip("the proxy parses plain RESP; REDIS_URL uses TLS")
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        yield proxy


@pytest.fixture
def direct(redis_url: str) -> Iterator[redis.Redis]:
    """A client straight to Redis, to see what really happened behind the proxy."""
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        yield client


@pytest.fixture
def through(proxy: FaultProxy, redis_url: str) -> Iterator[redis.Redis]:
    with _client(proxy, redis_url) as client:
        yield client


# --- forwarding ---


def test_forwards_commands_pipelines_scripts_and_large_values(
    proxy: FaultProxy, through: redis.Redis, direct: redis.Redis, key_prefix: str
) -> None:
    key, big = key_prefix + "a", key_prefix + "big"
    assert through.set(key, "1", px=5000)
    assert through.get(key) == b"1"
    with through.pipeline() as pipe:
        pipe.incr(key).incr(key).get(key).lrange(key_prefix + "none", 0, -1)
        assert pipe.execute() == [2, 3, b"3", []]
    assert through.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, key, 10) == 13
    value = bytes(range(256)) * 4000  # ~1 MB: arrives in many chunks each way
    assert through.set(big, value)
    assert through.get(big) == value
    assert direct.get(key) == b"13"
    assert f"SET {key} 1 PX 5000" in proxy.log
    assert [line for line in proxy.log if line.startswith("INCRBY ")] == [f"INCRBY {key} 1"] * 2  # redis-py's incr
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}"
    assert proxy.redis_url(3) == f"redis://127.0.0.1:{proxy.port}/3"


def test_pubsub_messages_go_through(through: redis.Redis, direct: redis.Redis, key_prefix: str) -> None:
    channel = key_prefix + "ch"
    pubsub = through.pubsub()
    try:
        pubsub.subscribe(channel, channel + "2")
        pubsub.psubscribe(key_prefix + "p*")
        confirmations = [pubsub.get_message(timeout=1) for _ in range(3)]
        assert [m["type"] for m in confirmations if m] == ["subscribe", "subscribe", "psubscribe"]
        assert direct.publish(channel, "hello") == 1
        message = pubsub.get_message(timeout=1)
        assert message is not None and (message["type"], message["data"]) == ("message", b"hello")
        direct.publish(key_prefix + "pattern", "world")
        message = pubsub.get_message(timeout=1)
        assert message is not None and (message["type"], message["data"]) == ("pmessage", b"world")
    finally:
        pubsub.close()


def test_pubsub_bookkeeping_keeps_replies_matched(proxy: FaultProxy, key_prefix: str) -> None:
    # Pipelined (un)subscribes get one confirmation per channel, UNSUBSCRIBE without arguments one per
    # channel held; if the proxy miscounted any of them, the reset meant for GET's reply would hit a
    # confirmation instead and some would be missing.
    proxy.add_rule(r"^GET ", "reset_after")
    with socket.create_connection((proxy.host, proxy.port), timeout=2) as sock:
        sock.sendall(
            _command("SUBSCRIBE", key_prefix + "a", key_prefix + "b")
            + _command("PSUBSCRIBE", key_prefix + "p*")
            + _command("UNSUBSCRIBE")
            + _command("PUNSUBSCRIBE")
            + _command("GET", key_prefix + "k")
        )
        data, ending = _recv_until_closed(sock)
    assert ending == "reset"
    assert data.count(b"$9\r\nsubscribe\r\n") == 2
    assert data.count(b"$10\r\npsubscribe\r\n") == 1
    assert data.count(b"$11\r\nunsubscribe\r\n") == 2
    assert data.count(b"$12\r\npunsubscribe\r\n") == 1
    assert data.endswith(b":0\r\n")  # the last confirmation, not GET's reply ($-1)


def test_resp3_replies_and_pushes(proxy: FaultProxy, redis_url: str, direct: redis.Redis, key_prefix: str) -> None:
    key, channel = key_prefix + "h", key_prefix + "ch"
    with _client(proxy, redis_url, timeout=2, protocol=3) as through:
        through.hset(key, mapping={"a": "1", "b": "2"})
        rule = proxy.add_rule(rf"^HGETALL {re.escape(key)}$", "delay_reply", delay=0.2)
        started = time.monotonic()
        assert through.hgetall(key) == {b"a": b"1", b"b": b"2"}  # a RESP3 map, held as one reply
        assert time.monotonic() - started >= 0.2
        assert proxy.matched(rule) == 1
        pubsub = through.pubsub()
        try:
            pubsub.subscribe(channel)
            confirmation = pubsub.get_message(timeout=1)
            assert confirmation is not None and confirmation["type"] == "subscribe"
            direct.publish(channel, "pushed")
            message = pubsub.get_message(timeout=1)
            assert message is not None and message["data"] == b"pushed"
        finally:
            pubsub.close()
        assert through.ping()


# --- rules ---


def test_delay_reply_holds_the_nth_matching_reply(
    proxy: FaultProxy, redis_url: str, direct: redis.Redis, key_prefix: str
) -> None:
    key = key_prefix + "k"
    direct.set(key, "v")
    rule = proxy.add_rule(rf"^GET {re.escape(key)}$", "delay_reply", delay=0.4, nth=2)
    with _client(proxy, redis_url, timeout=2) as through:
        timings = []
        for _ in range(3):
            started = time.monotonic()
            assert through.get(key) == b"v"
            timings.append(time.monotonic() - started)
    assert timings[0] < 0.3 and timings[1] >= 0.4 and timings[2] < 0.3
    assert proxy.matched(rule) == rule.fired == 1


def test_delay_reply_runs_the_command_at_once_and_delay_command_holds_it(
    proxy: FaultProxy, redis_url: str, direct: redis.Redis, key_prefix: str
) -> None:
    held_reply, held_command = key_prefix + "reply", key_prefix + "command"
    proxy.add_rule(rf"^SET {re.escape(held_reply)} ", "delay_reply", delay=0.6)
    proxy.add_rule(rf"^SET {re.escape(held_command)} ", "delay_command", delay=0.6)
    with _client(proxy, redis_url, timeout=2) as first, _client(proxy, redis_url, timeout=2) as second:
        setters = [
            threading.Thread(target=first.set, args=(held_reply, "1")),
            threading.Thread(target=second.set, args=(held_command, "1")),
        ]
        for setter in setters:
            setter.start()
        deadline = time.monotonic() + 0.5
        while not (direct.get(held_reply) and sum(line.startswith(f"SET {key_prefix}") for line in proxy.log) == 2):
            assert time.monotonic() < deadline, proxy.log
            time.sleep(0.01)
        # Both SETs reached the proxy: one already ran in Redis (only its reply waits), the other is held.
        assert direct.get(held_command) is None
        assert all(setter.is_alive() for setter in setters)
        for setter in setters:
            setter.join()
    assert direct.get(held_command) == b"1"


def test_drop_reply_times_out_although_redis_ran_the_command(
    proxy: FaultProxy, through: redis.Redis, direct: redis.Redis, key_prefix: str
) -> None:
    key = key_prefix + "k"
    rule = proxy.add_rule(rf"^SET {re.escape(key)} ", "drop_reply")
    with pytest.raises(redis.TimeoutError):
        through.set(key, "1")
    assert direct.get(key) == b"1"
    assert through.set(key, "2")  # a new connection; the rule fired its one time
    assert direct.get(key) == b"2"
    assert proxy.matched(rule) == 1


def test_reset_after_runs_the_command_reset_before_does_not(
    proxy: FaultProxy, through: redis.Redis, direct: redis.Redis, key_prefix: str
) -> None:
    after, before = key_prefix + "after", key_prefix + "before"
    proxy.add_rule(rf"^SET {re.escape(after)} ", "reset_after")
    proxy.add_rule(rf"^SET {re.escape(before)} ", "reset_before")
    with pytest.raises(redis.ConnectionError):
        through.set(after, "1")
    with pytest.raises(redis.ConnectionError):
        through.set(before, "1")
    assert direct.get(after) == b"1"
    assert direct.get(before) is None
    assert through.ping()


def test_a_reset_is_a_tcp_rst(proxy: FaultProxy) -> None:
    proxy.add_rule(r"^PING$", "reset_before")
    with socket.create_connection((proxy.host, proxy.port), timeout=2) as sock:
        sock.sendall(_command("PING"))
        assert _recv_until_closed(sock) == (b"", "reset")  # ECONNRESET, not a quiet EOF


def test_nth_and_times_count_matches_across_connections(
    proxy: FaultProxy, through: redis.Redis, direct: redis.Redis, key_prefix: str
) -> None:
    key = key_prefix + "n"
    rule = proxy.add_rule(rf"^INCRBY {re.escape(key)} 1$", "reset_before", nth=2, times=2)
    outcomes: list[object] = []
    for _ in range(4):
        try:
            outcomes.append(through.incr(key))
        except redis.ConnectionError:
            outcomes.append("reset")  # each reset costs the client its connection
    assert outcomes == [1, "reset", "reset", 2]
    assert proxy.matched(rule) == 2
    assert proxy.log.count(f"INCRBY {key} 1") == 4
    assert direct.get(key) == b"2"


def test_rules_can_be_cleared(proxy: FaultProxy, through: redis.Redis) -> None:
    rule = proxy.add_rule("^PING$", "reset_before", times=None)
    with pytest.raises(redis.ConnectionError):
        through.ping()
    proxy.clear_rules()
    assert through.ping()
    assert proxy.matched(rule) == 1
    with pytest.raises(ValueError):
        proxy.add_rule("x", "explode")


def test_blackholed_subscribe_never_confirms(
    proxy: FaultProxy, through: redis.Redis, direct: redis.Redis, key_prefix: str
) -> None:
    channel = key_prefix + "ch"
    rule = proxy.add_rule(r"^SUBSCRIBE\b", "blackhole_conn")
    lost, seen = through.pubsub(), direct.pubsub()
    try:
        lost.subscribe(channel)
        seen.subscribe(channel)
        confirmation = seen.get_message(timeout=1)
        assert confirmation is not None and confirmation["type"] == "subscribe"
        assert direct.publish(channel, "hi") == 1  # only the direct subscriber reached Redis
        message = seen.get_message(timeout=1)
        assert message is not None and message["data"] == b"hi"
        assert lost.get_message(timeout=0.5) is None
        assert lost.get_message(timeout=0.1) is None
    finally:
        lost.close()
        seen.close()
    assert proxy.matched(rule) == 1


async def test_async_client_sees_the_same_faults(proxy: FaultProxy, redis_url: str, key_prefix: str) -> None:
    key = key_prefix + "k"
    client = aioredis.Redis.from_url(_via(proxy, redis_url), socket_timeout=TIMEOUT, retry=AsyncRetry(NoBackoff(), 0))
    try:
        await client.set(key, "1")
        proxy.add_rule(rf"^GET {re.escape(key)}$", "drop_reply")
        with pytest.raises(redis.TimeoutError):
            await client.get(key)
        proxy.add_rule(rf"^INCRBY {re.escape(key)} 1$", "reset_after")
        with pytest.raises(redis.ConnectionError):
            await client.incr(key)
        assert await client.get(key) == b"2"
    finally:
        await client.aclose()


# --- network-wide faults ---


def test_an_unreachable_target_resets_the_client(redis_url: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        with FaultProxy("127.0.0.1", closed.getsockname()[1]) as proxy, _client(proxy, redis_url) as client:
            started = time.monotonic()
            with pytest.raises(redis.ConnectionError):
                client.ping()
            assert time.monotonic() - started < TIMEOUT / 2


def test_down_fails_fast_and_heal_recovers(proxy: FaultProxy, through: redis.Redis) -> None:
    assert through.ping()
    proxy.down()
    for _ in range(2):  # the pooled connection (reset), then a new one (accepted and reset)
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            through.ping()
        assert time.monotonic() - started < TIMEOUT / 2
    proxy.heal()
    assert through.ping()


def test_blackhole_times_out_and_heal_closes_the_stuck_connections(proxy: FaultProxy, through: redis.Redis) -> None:
    assert through.ping()
    with socket.create_connection((proxy.host, proxy.port), timeout=2) as stuck:
        proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            through.ping()
        stuck.sendall(_command("PING"))
        # Time for the PING to reach the proxy, which swallows it (nothing shows that it did): shorter, the
        # check below only proves less; it cannot fail a proxy that is right.
        time.sleep(0.1)
        proxy.heal()
        assert _recv_until_closed(stuck) == (b"", "reset")  # no PONG leaked, then the connection is gone
    assert through.ping()


def test_reset_all_resets_current_connections_only(proxy: FaultProxy, through: redis.Redis) -> None:
    sockets = [socket.create_connection((proxy.host, proxy.port), timeout=2) for _ in range(2)]
    try:
        for sock in sockets:
            sock.sendall(_command("PING"))
            assert sock.recv(100) == b"+PONG\r\n"
        proxy.reset_all()
        for sock in sockets:
            assert _recv_until_closed(sock) == (b"", "reset")
    finally:
        for sock in sockets:
            sock.close()
    assert through.ping()


# --- raw mode (HTTP) ---


class _Recorder(ThreadingHTTPServer):
    """Answers every request with 200 "ok" and records "METHOD /path" and when it arrived."""

    daemon_threads = True
    seen: list[tuple[str, float]]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client the proxy reset mid-response is the point of these tests


class _Handler(BaseHTTPRequestHandler):
    server: _Recorder

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.seen.append((f"{self.command} {self.path}", time.monotonic()))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[_Recorder]:
    server = _Recorder(("127.0.0.1", 0), _Handler)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def http_proxy(http_server: _Recorder) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", http_server.server_address[1], protocol="raw") as proxy:
        yield proxy


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def _requests(server: _Recorder) -> list[str]:
    return [line for line, _ in server.seen]


def test_raw_forwards_and_logs_request_lines(
    http_proxy: FaultProxy, http_server: _Recorder, http: httpx.Client
) -> None:
    assert http.get(f"{http_proxy.url}/hello").text == "ok"
    assert http.post(f"{http_proxy.url}/token", data={"grant_type": "refresh_token"}).text == "ok"
    assert http_proxy.log == ["GET /hello HTTP/1.1", "POST /token HTTP/1.1"]
    assert _requests(http_server) == ["GET /hello", "POST /token"]
    assert http_proxy.url == f"http://127.0.0.1:{http_proxy.port}"


def test_raw_drop_reply_times_out_after_the_server_answered(
    http_proxy: FaultProxy, http_server: _Recorder, http: httpx.Client
) -> None:
    rule = http_proxy.add_rule(r"^POST /token ", "drop_reply")
    with pytest.raises(httpx.ReadTimeout):
        http.post(f"{http_proxy.url}/token", content=b"x")
    assert _requests(http_server) == ["POST /token"]
    assert http.post(f"{http_proxy.url}/token").text == "ok"  # once per connection, once in all
    assert http_proxy.matched(rule) == 1


def test_raw_reset_after_and_reset_before(http_proxy: FaultProxy, http_server: _Recorder, http: httpx.Client) -> None:
    http_proxy.add_rule(r"^POST /after ", "reset_after")
    http_proxy.add_rule(r"^POST /before ", "reset_before")
    with pytest.raises(httpx.TransportError):
        http.post(f"{http_proxy.url}/after")
    with pytest.raises(httpx.TransportError):
        http.post(f"{http_proxy.url}/before")
    assert _requests(http_server) == ["POST /after"]


def test_raw_delays_and_blackhole(http_proxy: FaultProxy, http_server: _Recorder, http: httpx.Client) -> None:
    http_proxy.add_rule(r"^GET /slow-reply ", "delay_reply", delay=0.3)
    http_proxy.add_rule(r"^GET /slow-request ", "delay_command", delay=0.3)
    http_proxy.add_rule(r"^GET /void ", "blackhole_conn")
    started = time.monotonic()
    assert http.get(f"{http_proxy.url}/slow-reply").text == "ok"
    assert time.monotonic() - started >= 0.3
    assert http_server.seen[-1][1] - started < 0.2  # the server answered at once; the proxy held the answer
    started = time.monotonic()
    assert http.get(f"{http_proxy.url}/slow-request").text == "ok"
    assert http_server.seen[-1][1] - started >= 0.3  # the request itself was held
    with pytest.raises(httpx.ReadTimeout):
        http.get(f"{http_proxy.url}/void")
    assert _requests(http_server) == ["GET /slow-reply", "GET /slow-request"]


def test_raw_down_and_heal(http_proxy: FaultProxy, http: httpx.Client) -> None:
    http_proxy.down()
    with pytest.raises(httpx.TransportError):
        http.get(f"{http_proxy.url}/")
    http_proxy.heal()
    assert http.get(f"{http_proxy.url}/").text == "ok"
