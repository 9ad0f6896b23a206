"""Baseline: the fastest honest Python forwarder we know, raw ASGI + aiohttp's client; no auth unless asked.

The gateway's target is to stay within 10 % of this while verifying tokens, injecting identity
headers and counting metrics. With ``--hs256-secret`` it is the plain aiohttp forwarder of issue 17:
PyJWT verifies the Bearer token on every request (401 without a valid one) and ``X-Auth-User``
carries its ``sub`` upstream, written plainly, with no cache.

    python bench/baselines/aiohttp_forwarder.py --port 9102 --upstream http://127.0.0.1:9100
    python bench/baselines/aiohttp_forwarder.py --port 9102 --upstream http://127.0.0.1:9100 --hs256-secret S
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import jwt
import uvicorn
from yarl import URL

Scope = MutableMapping[str, Any]
HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection"})
DENIED = [(b"content-type", b"text/plain"), (b"content-length", b"12"), (b"www-authenticate", b"Bearer")]


def identity(scope: Scope, secret: str, audience: str | None) -> str | None:
    """The ``sub`` of a valid HS256 Bearer token in the request, or None."""
    for name, value in scope["headers"]:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            try:
                claims = jwt.decode(value[7:], secret, algorithms=["HS256"], audience=audience)
            except jwt.InvalidTokenError:
                return None
            return str(claims.get("sub", ""))
    return None


def create_app(upstream: str, secret: str | None = None, audience: str | None = None) -> Callable[..., Awaitable[None]]:
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
        if secret is not None:
            user = identity(scope, secret, audience)
            if user is None:
                await send({"type": "http.response.start", "status": 401, "headers": DENIED})
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
            headers = [(k, v) for k, v in headers if k != "x-auth-user"] + [("X-Auth-User", user)]
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
    parser.add_argument("--hs256-secret", help="verify an HS256 Bearer token with PyJWT and send X-Auth-User")
    parser.add_argument("--audience", help="the token's required aud (with --hs256-secret)")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream, args.hs256_secret, args.audience),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        date_header=False,
    )
