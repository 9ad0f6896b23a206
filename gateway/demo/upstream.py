"""An echo upstream: answers what it received, plus a few paths that misbehave on purpose.

Raw ASGI, no framework, so benchmarks measure the gateway rather than this server.

    any method, any path   200 JSON: method, path, raw_path, query_string, headers, body_length, body_sha256
    GET /_stream/{nbytes}  nbytes of b"x", chunked, in 64 KiB pieces
    GET /_status/{code}    that status, JSON {"status": code}
    GET /_slow/{seconds}   sleeps, then 200
    GET /_drip/{seconds}   5 chunks of 1 KiB, chunked, {seconds} apart (the first at once)
    GET /_set-cookie/{name} two Set-Cookie headers
    GET /_hop              hop-by-hop headers a proxy must drop (RFC 9110 §7.6.1)
    GET /_html             text/html

WebSocket (any path): the first message it sends is JSON ``{"hello": {path, query_string,
headers, subprotocols}}``; then it echoes every text or binary message. A text message
``close <code> [reason]`` makes it close with that code; ``/_ws_refuse/{status}`` refuses the
handshake with that HTTP status; ``/_ws_redirect`` answers 302 to ``/_ws_landing``.
``GET /_ws_closes`` lists the last close codes and reasons its clients sent, as
``[[code, reason], ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json

from gateway.types import ASGIApp, RawHeaders, Receive, Scope, Send

CHUNK = 64 * 1024


async def _respond(send: Send, status: int, body: bytes, content_type: bytes, extra: RawHeaders | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, data: object, extra: RawHeaders | None = None) -> None:
    await _respond(send, status, json.dumps(data).encode(), b"application/json", extra)


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    # Hash as the body streams in, so a multi-gigabyte upload costs no memory.
    digest, length, more = hashlib.sha256(), 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        digest.update(chunk)
        length += len(chunk)
        more = message.get("more_body", False)
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    echo = {
        "method": scope["method"],
        "path": scope["path"],
        "raw_path": raw_path.decode("latin-1"),
        "query_string": scope["query_string"].decode("latin-1"),
        "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in scope["headers"]],
        "body_length": length,
        "body_sha256": digest.hexdigest(),
    }
    await _json(send, 200, echo)


async def _stream(send: Send, nbytes: int) -> None:
    # No content-length: the server falls back to chunked transfer encoding.
    headers = [(b"content-type", b"application/octet-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    block = b"x" * CHUNK
    while nbytes > 0:
        await send({"type": "http.response.body", "body": block[: min(nbytes, CHUNK)], "more_body": True})
        nbytes -= CHUNK
    await send({"type": "http.response.body", "body": b""})


async def _drip(send: Send, interval: float) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for index in range(5):
        if index:
            await asyncio.sleep(interval)
        await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _seconds(arg: str) -> bool:
    return arg.replace(".", "", 1).isdigit()


async def _special(name: str, arg: str, send: Send) -> bool:
    """Answer one of the ``GET /_name/arg`` paths; False when the path is not one of them."""
    if name == "_stream" and arg.isdigit():
        await _stream(send, int(arg))
    elif name == "_status" and arg.isdigit() and 200 <= int(arg) <= 599:
        await _json(send, int(arg), {"status": int(arg)})
    elif name == "_slow" and _seconds(arg):
        await asyncio.sleep(float(arg))
        await _json(send, 200, {"slept": float(arg)})
    elif name == "_drip" and _seconds(arg):
        await _drip(send, float(arg))
    elif name == "_set-cookie" and arg:
        cookies = [(b"set-cookie", f"{arg}=upstream; Path=/".encode()), (b"set-cookie", b"other=1; Path=/")]
        await _json(send, 200, {"cookies": [arg, "other"]}, cookies)
    elif name == "_hop" and not arg:
        hop = [
            (b"connection", b"close, X-Secret-Hop"),
            (b"x-secret-hop", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-authenticate", b"Basic"),
            (b"x-normal", b"yes"),
        ]
        await _json(send, 200, {"hop": True}, hop)
    elif name == "_ws_closes" and not arg:
        await _json(send, 200, list(CLOSES))
    elif name == "_html" and not arg:
        await _respond(send, 200, b"<!doctype html><html><body><h1>upstream</h1></body></html>", b"text/html")
    else:
        return False
    return True


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


CLOSES: collections.deque[tuple[int, str]] = collections.deque(maxlen=100)


async def _websocket(scope: Scope, receive: Receive, send: Send) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    name, _, arg = scope["path"][1:].partition("/")
    if name == "_ws_redirect":
        here = next((v for n, v in scope["headers"] if n == b"host"), b"")
        location = b"ws://" + here + b"/_ws_landing"
        await send({"type": "websocket.http.response.start", "status": 302, "headers": [(b"location", location)]})
        await send({"type": "websocket.http.response.body", "body": b""})
        return
    if name == "_ws_refuse" and arg.isdigit():
        body = json.dumps({"refused": int(arg)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": int(arg), "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    subprotocols = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": subprotocols[0] if subprotocols else None})
    hello = {
        "path": scope["path"],
        "query_string": scope["query_string"].decode("latin-1"),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
        "subprotocols": subprotocols,
    }
    await send({"type": "websocket.send", "text": json.dumps({"hello": hello})})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            CLOSES.append((message.get("code", 1005), message.get("reason") or ""))
            return
        text = message.get("text")
        if text is not None and text.startswith("close "):
            code, _, reason = text[6:].partition(" ")
            await send({"type": "websocket.close", "code": int(code), "reason": reason})
            return
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


def create_upstream_app() -> ASGIApp:
    """The echo upstream as a raw ASGI app."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await _websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"].startswith("/_"):
            name, _, arg = scope["path"][1:].partition("/")
            if await _special(name, arg, send):
                return
        await _echo(scope, receive, send)

    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the echo upstream under uvicorn: ``python -m gateway.demo.upstream --port N``."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m gateway.demo.upstream", description="An echo upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    # A short graceful shutdown: /_slow requests may be sleeping.
    uvicorn.run(create_upstream_app(), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
