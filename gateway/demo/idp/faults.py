"""How the demo IdP misbehaves on request, and what it records: its run-time ``Behaviour`` (injected
failures, reuse and revocation policy, JWKS outage and max-age, clock skew), the signing
``Keyring`` (key rollover), the redemption ``Ledger`` and the failure answers.

Failures come in two kinds. Most answer *before* the presented refresh token is redeemed, so the
client may safely try it again. The ``CONSUMING_FAILURES`` answer *after*: the token has been rotated
and the answer is spoiled (``no_access``, ``bad_signature``; ``oversize``: over a megabyte, streamed
without a length; ``dpop``: ``token_type: DPoP``; ``expires_zero``: ``expires_in: 0``;
``wider_scope``: a ``scope`` beyond the session's) or lost on its way back (``redeem_then_*``: the
client times out, sees a reset connection, a proxy's 504 or a page that is not JSON), which is how
real clients end up holding a token that is no longer current.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

# Rotate the token, then never answer / cut the connection mid-body / a proxy's 504 / 200 with HTML.
LOST_ANSWER_FAILURES = ("redeem_then_hang", "redeem_then_reset", "redeem_then_504", "redeem_then_garbage")
# These answer 200 with spoiled tokens, so the IdP has redeemed the presented refresh token by then.
SPOILED_ANSWER_FAILURES = ("no_access", "bad_signature", "oversize", "dpop", "expires_zero", "wider_scope")
CONSUMING_FAILURES = SPOILED_ANSWER_FAILURES + LOST_ANSWER_FAILURES
FAILURES = ("503", "500", "timeout", "html", "invalid_client", "garbage") + CONSUMING_FAILURES

LedgerEvent = Literal["redeemed", "reused", "reused_in_window", "rejected", "failed"]
# Events in which the IdP accepted the presented token as one of its family's (current or not).
PRESENTATIONS: tuple[LedgerEvent, ...] = ("redeemed", "reused", "reused_in_window")

_NUMBERS = ("latency", "reuse_window", "clock_skew", "jwks_max_age")
_FLAGS = ("revoke_used", "reuse_revokes_family")

GATEWAY_TIMEOUT_PAGE = (
    "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    "<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@dataclass
class Behaviour:
    """What tests change at run time through ``POST /_admin/behaviour``."""

    latency: float = 0.0
    fail: str | None = None
    fail_count: int | None = None  # None: every refresh request fails while ``fail`` is set
    # Seconds after a rotation during which the token it redeemed may be redeemed again (0: never).
    reuse_window: float = 0.0
    # False: revoking a token that is no longer current leaves its family alone (SimpleJWT's blacklist).
    revoke_used: bool = True
    # False: a reused token is refused but its family lives on (SimpleJWT with BLACKLIST_AFTER_ROTATION).
    reuse_revokes_family: bool = True
    jwks: Literal["up", "down"] = "up"
    jwks_max_age: float = 300.0  # the JWKS answer's Cache-Control: max-age (0: no-cache)
    clock_skew: float = 0.0  # seconds added to iat/nbf/exp of the tokens issued (the IdP's clock is ahead)
    # Access tokens carry a ``groups`` claim of this many GUIDs (Entra ID's habit): 52 bytes of token each.
    groups: int = 0

    def update(self, body: dict[str, Any]) -> str | None:
        """Apply the fields of ``body``, or none of them and say what is wrong.

        ``fail`` and ``fail_count`` are set together: giving one clears the other.
        """
        for name, value in body.items():
            if (error := _invalid(name, value)) is not None:
                return error
        for name in (*_NUMBERS, *_FLAGS, "jwks", "groups"):
            if name in body:
                setattr(self, name, float(body[name]) if name in _NUMBERS else body[name])
        if "fail" in body or "fail_count" in body:
            self.fail, self.fail_count = body.get("fail"), body.get("fail_count")
        return None


def _invalid(name: str, value: Any) -> str | None:
    if name == "fail":
        ok, expected = value is None or value in FAILURES, f"null or one of {', '.join(FAILURES)}"
    elif name == "fail_count":
        ok, expected = value is None or (isinstance(value, int) and not isinstance(value, bool)), "an int or null"
    elif name == "groups":
        ok, expected = isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an int >= 0"
    elif name == "jwks":
        ok, expected = value in ("up", "down"), '"up" or "down"'
    elif name in _NUMBERS:
        ok, expected = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    elif name in _FLAGS:
        ok, expected = isinstance(value, bool), "a boolean"
    else:
        return f"unknown behaviour {name!r}"
    return None if ok else f"{name} must be {expected}"


def jwk(kid: str, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """The public half of ``key`` as a JWK (RFC 7517) for RS256 signatures."""
    public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**public, "kid": kid, "alg": "RS256", "use": "sig"}


class Keyring:
    """RS256 signing keys by kid; ``kid`` signs. Every key is kept, so what the IdP signed before a
    rollover still verifies here; the JWKS lists ``published``: the current key and, unless dropped,
    the one before it (as real IdPs do while clients catch up)."""

    def __init__(self, kid: str, key: rsa.RSAPrivateKey | None) -> None:
        self.kid = kid
        self.keys: dict[str, rsa.RSAPrivateKey] = {kid: key} if key is not None else {}
        self.published: list[str] = list(self.keys)

    def rotate(self, key: rsa.RSAPrivateKey, drop_old: bool = False) -> str:
        """Sign with ``key`` from now on, under a new kid (``demo-key-N``), which is returned."""
        n = len(self.keys) + 1
        while f"demo-key-{n}" in self.keys:
            n += 1
        kid = f"demo-key-{n}"
        self.keys[kid] = key
        self.published = [kid] + ([] if drop_old else [self.kid])
        self.kid = kid
        return kid

    def jwks(self) -> dict[str, Any]:
        return {"keys": [jwk(kid, self.keys[kid]) for kid in self.published]}


class Ledger:
    """Every refresh request the IdP received, in order: which token, which family, what happened.

    Bounded (oldest entries dropped past ``limit``) so a long demo or benchmark run cannot exhaust memory.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=limit)

    def record(self, jti: str | None, family: str | None, event: LedgerEvent) -> None:
        self.entries.append({"jti": jti, "family": family, "event": event, "at": time.time()})

    def clear(self) -> None:
        self.entries.clear()


def failure_response(fail: str) -> Response:
    """The answer an injected failure gives (``timeout`` and ``redeem_then_hang`` never get here)."""
    if fail == "503":
        return PlainTextResponse("Service Unavailable", status_code=503)
    if fail == "500":
        return JSONResponse({"error": "server_error"}, status_code=500)
    if fail == "html":
        return Response("<html><body><h1>Something went wrong</h1></body></html>", media_type="text/html")
    if fail == "garbage":
        return Response(b"\x00not json{", media_type="application/json")
    if fail == "redeem_then_504":
        return Response(GATEWAY_TIMEOUT_PAGE, status_code=504, media_type="text/html")
    if fail == "redeem_then_garbage":
        return Response("<!doctype html><title>Welcome</title><p>Please sign in.", media_type="text/html")
    if fail == "redeem_then_reset":
        return TruncatedResponse()
    return JSONResponse({"error": "invalid_client"}, status_code=401)


def spoil(body: dict[str, Any], fail: str | None, scope: str) -> dict[str, Any]:
    """A success ``body`` as the injected failure asks: another token type, no lifetime, or more than ``scope``."""
    if fail == "dpop":
        return body | {"token_type": "DPoP"}  # RFC 9449: bound to a key the client would have to hold
    if fail == "expires_zero":
        return body | {"expires_in": 0}
    if fail == "wider_scope":
        return body | {"scope": f"{scope} admin".strip()}
    return body


def oversize_response(body: dict[str, Any], size: int = 1024 * 1024) -> Response:
    """``body`` padded past ``size`` bytes, streamed in 16 KiB chunks without a Content-Length (chunked)."""

    async def chunks() -> AsyncIterator[bytes]:
        yield json.dumps(body)[:-1].encode() + b', "padding": "'
        for _ in range(size // 16384 + 1):
            yield b"x" * 16384
        yield b'"}'

    return StreamingResponse(chunks(), media_type="application/json")


class TruncatedResponse(Response):
    """A 200 whose Content-Length promises more than is sent before the connection goes away.

    Under a real server the socket is set to linger 0, so closing it sends a TCP RST (Linux, found
    through /proc); otherwise (in-process, httpx's ASGITransport) the call raises the
    ``httpx.RemoteProtocolError`` a client would see on a connection closed mid-body.
    """

    def __init__(self) -> None:
        body = b'{"access_token": "' + b"e" * 2000 + b'", "refresh_token": "' + b"e" * 2000 + b'"}'
        super().__init__(body, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[:100], "more_body": True})
        await asyncio.sleep(0.05)  # let the head and partial body reach the client before the reset
        if not linger_zero(scope):
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        # Returning unfinished makes uvicorn close the connection, which the kernel now does with RST.


def linger_zero(scope: Scope) -> bool:
    """Set SO_LINGER 0 on the TCP socket serving ``scope`` (matched by both addresses); False if not found."""
    client, server = scope.get("client"), scope.get("server")
    if not client or not server or not os.path.isdir("/proc/self/fd"):
        return False
    wanted = (tuple(client)[:2], tuple(server)[:2])
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves the server's socket open
        except (OSError, ValueError):
            continue
        with sock:
            try:
                peer, local = sock.getpeername(), sock.getsockname()
            except OSError:  # listening or unconnected
                continue
            if sock.type != socket.SOCK_STREAM or not isinstance(peer, tuple) or not isinstance(local, tuple):
                continue
            if (peer[:2], local[:2]) == wanted:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return True
    return False
