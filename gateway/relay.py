"""The relay of one admitted WebSocket (gateway.websocket): messages both ways, then both sides closed.

    relay      -> text and binary messages both ways, each ``send`` awaited (backpressure: a slow
                  reader slows its writer instead of filling memory); a message over
                  ``websocket.max_message_size`` (as sent, decompressed) closes the socket with 1009
    close      -> close codes pass through; the watchdog's end (gateway.tunnel) closes both sides

This is the hot path of a socket. Behind uvicorn's protocol as ``client_ws.ClientHop`` gives it, a
message read while the relay waits on an empty queue goes straight to the other hop from the callback
that read it (``sink``: no task switch, no ASGI message); one over the limit, or with the other side
closed or not writable, or read while a message is in hand, takes the tasks' way below, so the order
holds. Per message: a clock read and an int added to (the watchdog turns the ints into metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from websockets.exceptions import ConnectionClosed

from gateway.client_ws import ClientHop
from gateway.tunnel import Tunnel
from gateway.types import Receive, Send
from gateway.upstream_ws import UpstreamSocket

CLOSE_TIMEOUT = 5.0  # seconds a closing handshake may take on either side
# Codes that may not be sent in a close frame (RFC 6455 §7.4.1): 1005/1006/1015 only describe one.
_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})
TOO_BIG = ("too_big", 1009, "message too big")

Ended = tuple[str, int, str]  # who ended the relay, the close code, the reason


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def sendable(code: int | None, fallback: int) -> int:
    if code is None or code in _UNSENDABLE or not (1000 <= code <= 4999) or 1016 <= code < 3000:
        return fallback
    return code


async def relay(tunnel: Tunnel, receive: Receive, send: Send, upstream: UpstreamSocket, max_size: int) -> str:
    """Relay messages until one side closes or the watchdog ends the socket; say who ended it.

    A message is held to ``max_size`` as sent, decompressed (uvicorn reads the client's up to
    ``limits.frame_allowance``; the upstream hop negotiates no compression and reads up to ``max_size``).
    """
    hop = getattr(send, "__self__", None)  # uvicorn's protocol, when ``send`` is its own
    if not isinstance(hop, ClientHop):
        hop = None
    if hop is not None:
        upstream.sink, hop.sink = _to_client(tunnel, hop), _to_upstream(tunnel, upstream, max_size)
    client = asyncio.ensure_future(_from_client(tunnel, receive, upstream, max_size))
    server = asyncio.ensure_future(_from_upstream(tunnel, send, upstream))
    try:
        waiting: set[asyncio.Future[Any]] = {client, server, tunnel.stop}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if hop is not None:
            upstream.sink = hop.sink = None
        for task in (client, server):
            task.cancel()
        # Collected, so that nothing is left running or unretrieved, but never waited on for
        # long: a client that stopped reading must not hold its slot (and its upstream) forever.
        await asyncio.wait([client, server], timeout=CLOSE_TIMEOUT)
    return await _close_both(tunnel, send, upstream, client, server)


def _to_client(tunnel: Tunnel, hop: ClientHop) -> Callable[[str | bytes], bool]:
    """What the upstream's socket hands on while the relay waits: written to the client at once, in
    the callback that read it (no task switch, no ASGI message); False leaves it to ``_from_upstream``."""
    push, clock = hop.push, time.monotonic

    def sink(data: str | bytes) -> bool:
        if not push(data):
            return False
        tunnel.last_active = clock()
        tunnel.to_client += 1
        return True

    return sink


def _to_upstream(tunnel: Tunnel, upstream: UpstreamSocket, max_size: int) -> Callable[[str | bytes], bool]:
    """The client's messages, likewise; one over ``max_size`` or a full or closed upstream: ``_from_client``'s."""
    write, clock, text_chars = upstream.write, time.monotonic, max_size // 4

    def sink(data: str | bytes) -> bool:
        if not upstream.writable or len(data) > max_size:
            return False
        if isinstance(data, str) and len(data) > text_chars and utf8_size(data) > max_size:
            return False
        write(data)
        tunnel.last_active = clock()
        tunnel.to_upstream += 1
        return True

    return sink


async def _from_client(tunnel: Tunnel, receive: Receive, upstream: UpstreamSocket, max_size: int) -> Ended:
    forward, clock = upstream.write, time.monotonic  # bound once: looked up per message otherwise
    text_chars = max_size // 4  # a text of no more characters cannot be over the limit in UTF-8
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
                if len(data) > max_size:
                    return TOO_BIG
            elif len(data) > text_chars and utf8_size(data) > max_size:
                return TOO_BIG
            tunnel.last_active = clock()
            try:
                if forward(data):  # the upstream's socket buffer is full: wait until it drains
                    await upstream.drain()
            except ConnectionClosed:
                return "upstream", upstream.close_code or 1006, upstream.close_reason or ""
            tunnel.to_upstream += 1
        elif kind == "websocket.disconnect":
            return "client", message.get("code", 1005), message.get("reason") or ""


async def _from_upstream(tunnel: Tunnel, send: Send, upstream: UpstreamSocket) -> Ended:
    recv, clock = upstream.recv, time.monotonic
    try:
        while True:  # recv() itself rather than ``async for``: no async generator step per message
            data = await recv()
            tunnel.last_active = clock()
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
            tunnel.to_client += 1
    except ConnectionClosed:  # ``async for`` ends on ConnectionClosedOK and raises the others: both end here
        if upstream.too_big:
            return TOO_BIG
    except (OSError, RuntimeError):  # the client went away (or was closed by the server) mid-send
        return "client", 1006, ""
    return "upstream", upstream.close_code or 1006, upstream.close_reason or ""


async def _close_both(
    tunnel: Tunnel,
    send: Send,
    upstream: UpstreamSocket,
    client: asyncio.Future[Ended],
    server: asyncio.Future[Ended],
) -> str:
    """Close each side as the end requires; who ended it."""
    if tunnel.stop.done():
        code, reason, by = tunnel.stop.result()
        await _close_client(send, code, reason)
        await _close_upstream(upstream, 1001, reason)
        return by
    done = client if client.done() and not client.cancelled() and client.exception() is None else server
    if done.cancelled() or done.exception() is not None:
        await _close_client(send, 1011, "gateway error")
        await _close_upstream(upstream, 1011, "gateway error")
        return "error"
    by, code, reason = done.result()
    if by == "client":
        # The client's close code goes upstream; a vanished client (1006) is "going away".
        await _close_upstream(upstream, sendable(code, 1001), reason)
    elif by == "too_big":  # either way: the upstream's hop is closed already when it sent the message
        await _close_client(send, code, reason)
        await _close_upstream(upstream, 1001, "client sent a message too big")
    else:
        # The upstream's close code comes back to the client; a vanished upstream is 1014 (bad gateway).
        await _close_client(send, sendable(code, 1014 if code == 1006 else 1000), reason)
    return by


async def _close_client(send: Send, code: int, reason: str) -> None:
    # Bounded: the close frame waits for a writable socket, which a client that stopped
    # reading never gives; the server drops the connection when the application returns.
    with contextlib.suppress(OSError, RuntimeError, TimeoutError):  # the client may be gone already
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await send({"type": "websocket.close", "code": code, "reason": reason[:120]})


async def _close_upstream(upstream: UpstreamSocket, code: int, reason: str) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await upstream.close(code, reason[:120])
