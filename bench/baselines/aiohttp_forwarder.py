"""Baseline: the fastest honest Python forwarder we know, raw ASGI + aiohttp's client, and no auth at all.

The gateway's target is to stay within 10 % of this while verifying tokens, injecting identity
headers and counting metrics.

    python bench/baselines/aiohttp_forwarder.py --port 9102 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn
from yarl import URL

Scope = MutableMapping[str, Any]
HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection"})


def create_app(upstream: str) -> Callable[..., Awaitable[None]]:
    session: aiohttp.ClientSession | None = None

    async def body(receive: Callable[[], Awaitable[Scope]]) -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body"):
                return

    async def app(
        scope: Scope, receive: Callable[[], Awaitable[Scope]], send: Callable[[Scope], Awaitable[None]]
    ) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    if session is not None:
                        await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
            )
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in HOP]
        has_body = any(k == b"content-length" and v != b"0" or k == b"transfer-encoding" for k, v in scope["headers"])
        query = scope["query_string"].decode("latin-1")
        url = URL(upstream + scope["raw_path"].decode("latin-1") + (f"?{query}" if query else ""), encoded=True)
        async with session.request(
            scope["method"], url, headers=headers, data=body(receive) if has_body else None, allow_redirects=False
        ) as response:
            out = [(k, v) for k, v in response.raw_headers if k.lower() not in HOP]
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        date_header=False,
    )
