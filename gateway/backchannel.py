"""``POST {prefix}/backchannel-logout``: OpenID Connect Back-Channel Logout 1.0, with ``login.oidc``.

The IdP posts a logout token (``logout_token=``, form-encoded). It is checked as §2.6 says: signed
with an allowed algorithm by a key from ``tokens`` (the IdP's JWKS), ``iss`` = ``login.oidc.issuer``,
``aud`` contains ``login.oidc.client_id``, ``iat`` present and recent (``MAX_AGE``, with
``tokens.leeway``), ``jti`` present and not seen in a logout done before on any worker (remembered in the store once its
sessions have ended, so that the IdP's retry of a logout the store could not finish is no replay),
``events`` holding the back-channel logout event as an object, ``sub`` or ``sid``, and no ``nonce``
(so an ID token is never taken for one). Then every session of that ``sid`` (or, without one, of that
``sub``) ends, on every worker and replica, through the ``SessionIndex``: its tokens are refused at
once, its WebSockets close. Answers: 200 (``Cache-Control: no-store``); 400 ``invalid_request`` with
a description for a token refused (§2.8); 503 + ``Retry-After`` when the keys or the store cannot be
reached (the IdP may retry). Never a 500.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.config import MAX_LEEWAY
from gateway.errors import GatewayError, KeyFetchError, StoreError
from gateway.keys import KeySource
from gateway.sealing import Sealer
from gateway.session_index import SessionIndex
from gateway.store import Store

log = logging.getLogger("gateway.backchannel")

EVENT = "http://schemas.openid.net/event/backchannel-logout"
MAX_AGE = 300  # seconds: a logout token issued longer ago than this (plus leeway) is refused
MAX_BODY = 64 * 1024


class LogoutTokenInvalid(GatewayError):
    """A logout token refused; the message is the description sent back to the IdP (never token content)."""


class LogoutTokens:
    """Checks logout tokens (§2.6); ``verify`` answers the token's (sub, sid)."""

    def __init__(
        self,
        *,
        keys: KeySource,
        algorithms: Sequence[str],
        issuer: str,
        audience: str,
        store: Store,
        sealer: Sealer,
        leeway: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._algorithms = [a for a in algorithms if a.lower() != "none"]
        self._issuer = issuer
        self._audience = audience
        self._store = store
        self._sealer = sealer
        self._leeway = leeway
        self._clock = clock

    async def verify(self, token: str) -> tuple[str | None, str | None]:
        """(sub, sid) of a valid logout token, not ``spent``. Raises LogoutTokenInvalid, KeyFetchError, StoreError."""
        claims = await self._decode(token)
        now = self._clock()
        iat = claims["iat"]
        if not isinstance(iat, int | float) or iat > now + self._leeway:
            raise LogoutTokenInvalid("iat is in the future")
        if now - iat > MAX_AGE + self._leeway:
            raise LogoutTokenInvalid("the logout token is too old")
        if "nonce" in claims:
            raise LogoutTokenInvalid("a logout token must not contain nonce")
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(EVENT), dict):
            raise LogoutTokenInvalid("events does not hold the back-channel logout event")
        sub, sid = claims.get("sub"), claims.get("sid")
        if not (isinstance(sub, str) and sub) and not (isinstance(sid, str) and sid):
            raise LogoutTokenInvalid("neither sub nor sid")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise LogoutTokenInvalid("jti missing")
        if await self._store.get(self._jti_key(jti)) is not None:
            raise LogoutTokenInvalid("jti already used")
        return (sub if isinstance(sub, str) and sub else None), (sid if isinstance(sid, str) and sid else None)

    async def spent(self, token: str) -> None:
        """Remember a verified token's ``jti`` once its sessions have ended: from now on it is a replay.

        Written after the logout, not before: a mark that outlived a logout the store could not do (or that
        answered "taken" to redis-py's resend of its own SET NX) refused the IdP's retry, and the sessions
        stayed alive. A plain SET, so a resend is harmless. Raises StoreError."""
        jti = str(jwt.decode(token, options={"verify_signature": False}).get("jti"))
        # As long as any leeway a reload may set (MAX_LEEWAY) lets its iat pass: a replay is refused whatever it is.
        await self._store.set(self._jti_key(jti), b"1", MAX_AGE + 2 * MAX_LEEWAY + 60)

    def _jti_key(self, jti: str) -> str:
        return f"logout-jti:{{{self._sealer.token_hash(self._issuer + chr(0) + jti)}}}"

    async def _decode(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in self._algorithms:
                raise LogoutTokenInvalid("algorithm not allowed")
            key = await self._keys.key_for(header.get("kid"), alg)
            if key is None:
                raise LogoutTokenInvalid("unknown signing key")
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["iss", "aud", "iat", "jti"]},
            )
        except jwt.InvalidAudienceError:
            raise LogoutTokenInvalid("aud does not name this client") from None
        except jwt.InvalidIssuerError:
            raise LogoutTokenInvalid("iss is not the configured issuer") from None
        except jwt.ImmatureSignatureError:
            raise LogoutTokenInvalid("iat is in the future") from None
        except jwt.ExpiredSignatureError:
            raise LogoutTokenInvalid("the logout token is too old (exp)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise LogoutTokenInvalid(f"{exc.claim} missing") from None
        except (jwt.InvalidTokenError, TypeError, ValueError) as exc:
            raise LogoutTokenInvalid(f"not a valid signed token ({exc.__class__.__name__})") from None
        return claims


class BackchannelLogout:
    """The endpoint: a logout token in, the sessions it names ended everywhere."""

    def __init__(self, tokens: LogoutTokens, index: SessionIndex, sealer: Sealer) -> None:
        self._tokens = tokens
        self._index = index
        self._sealer = sealer

    async def handle(self, request: Request) -> Response:
        try:
            token = await _logout_token(request)
            sub, sid = await self._tokens.verify(token)
            ended = await self._index.end(sub=sub, sid=sid)  # ending twice (concurrent deliveries) ends nothing more
            await self._tokens.spent(token)
        except LogoutTokenInvalid as exc:
            log.warning("back-channel logout refused: %s", exc)
            return _answer(400, {"error": "invalid_request", "error_description": str(exc)})
        except (KeyFetchError, StoreError) as exc:
            log.error("back-channel logout not done: %s unavailable (%s)", _what(exc), exc)
            return _answer(503, {"error": "temporarily_unavailable"}, {"retry-after": "5"})
        who = self._sealer.token_hash(sid or sub or "")[:12]
        log.info("back-channel logout: %s %s, %d session(s) ended", "sid" if sid else "sub", who, len(ended))
        return Response(status_code=200, headers={"cache-control": "no-store"})


async def _logout_token(request: Request) -> str:
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise LogoutTokenInvalid("expected application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise LogoutTokenInvalid("body too large")
    try:
        values = parse_qs(body.decode("ascii"), strict_parsing=False).get("logout_token", [])
    except UnicodeDecodeError:
        raise LogoutTokenInvalid("malformed form") from None
    if len(values) != 1 or not values[0]:
        raise LogoutTokenInvalid("logout_token missing")
    return values[0]


def _what(exc: Exception) -> str:
    return "keys" if isinstance(exc, KeyFetchError) else "store"


def _answer(status: int, body: dict[str, str], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers={"cache-control": "no-store", **(headers or {})})
