"""Authenticate a request: find its credentials, verify them, refresh when that is allowed.

A Bearer header wins over the access cookie. The result is either an identity (claims) or a
reason code; it also carries the Set-Cookie headers the response must bear (rotated tokens, or
a cleared access cookie after a bad one). Refresh is delegated to a ``Refresher`` and only ever
happens for cookie sessions whose access token is absent, expired or nearly so (or revoked),
and otherwise fully valid: a forged token never reaches the IdP, and API clients (Bearer) get a plain 401.
A refresh cookie the gateway did not seal (``CookieJar.open_refresh``) counts as absent and is
cleared: it never reaches the refresher, so neither the IdP nor the store.
With ``session.mode: server`` the cookie part is a ``SessionCredential`` (gateway.sessionauth): token
cookies are not read at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.cookies import CookieJar
from gateway.reasons import Reason
from gateway.tokens import Verdict, Verifier
from gateway.types import RawHeaders


@dataclass(slots=True)
class AuthResult:
    claims: dict[str, Any] | None = None
    token: str | None = None  # the access token the request goes on with
    reason: Reason | None = None
    bearer: bool = False
    set_cookies: list[bytes] = field(default_factory=list)
    refreshed: bool = False
    exp: float | None = None  # the token's exp when it was simply valid, or a grace hit remembered (refresh.py)
    until: float | None = None  # the fast path keeps the answer at most until then (server sessions, grace hits)
    watch: str | None = None  # server-side sessions: the denylist entry that ends the session (else the jti)


class Refresher(Protocol):
    async def refresh(self, refresh_token: str, old_access: str | None, *, client: str | None = None) -> AuthResult:
        """New tokens for a refresh token: an AuthResult with claims and cookies, or a reason.

        ``client`` is the client's address (after trusted proxies), for limits per client.
        """


class SessionCredential(Protocol):
    async def authenticate(self, headers: RawHeaders, client: str | None = None) -> AuthResult:
        """A server-side session's credential (``session.mode: server``, gateway.sessionauth)."""


# RFC 6750 §2.1: "Bearer" 1*SP b64token. Tabs are accepted as separators too, as Django's
# split() and most frameworks do, so the gateway never reads as "no token" what an app reads as one.
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr](?:[ \t]+([\x21-\x7e]+))?[ \t]*")

Authorization = Literal["none", "bearer", "malformed", "several", "other"]


def read_authorization(value: bytes | None, count: int = 1) -> tuple[Authorization, str | None]:
    """What an Authorization header says: (kind, bearer token).

    ``several``: more than one header (RFC 6750 §3.1: 400); ``malformed``: the Bearer scheme
    without a usable token (401); ``other``: another scheme (Basic...), not a credential here.
    """
    if value is None:
        return "none", None
    if count > 1:
        return "several", None
    if value[:6].lower() != b"bearer" or (len(value) > 6 and value[6:7] not in b" \t"):
        return "other", None
    found = _BEARER.fullmatch(value)
    if found is None or found.group(1) is None:
        return "malformed", None
    return "bearer", found.group(1).decode("ascii")


def authorization_of(headers: RawHeaders) -> tuple[Authorization, str | None]:
    """``read_authorization`` over a request's headers."""
    values = [value for name, value in headers if name == b"authorization"]
    return read_authorization(values[0] if values else None, len(values))


def bearer_token(headers: RawHeaders) -> str | None:
    """The Bearer token; "" when Authorization is malformed or repeated; None when there is none (or not Bearer)."""
    kind, token = authorization_of(headers)
    if kind == "bearer":
        return token
    return "" if kind in ("malformed", "several") else None


class Authenticator:
    def __init__(
        self,
        verifier: Verifier,
        jar: CookieJar,
        refresher: Refresher | None = None,
        sessions: SessionCredential | None = None,
    ) -> None:
        self._verifier = verifier
        self._jar = jar
        self._refresher = refresher
        self._sessions = sessions  # session.mode: server: no token cookies, one session cookie

    async def authenticate(self, headers: RawHeaders, client: str | None = None) -> AuthResult:
        """The request's credential, verified (and refreshed); ``client``: its address, for the refresher."""
        result = await self._authenticate(headers, client)
        if result.set_cookies:  # big tokens as numbered cookies; stale chunks cleared (CookieJar.expand)
            result.set_cookies = self._jar.expand(result.set_cookies, headers)
        return result

    async def _authenticate(self, headers: RawHeaders, client: str | None) -> AuthResult:
        kind, bearer = authorization_of(headers)
        if kind == "several":
            return AuthResult(reason=Reason.INVALID_REQUEST, bearer=True)
        if kind == "malformed":
            return AuthResult(reason=Reason.MALFORMED_AUTHORIZATION, bearer=True)
        if bearer is not None:
            checked = await self._verifier.verify(bearer)
            return AuthResult(claims=checked.claims, token=bearer, reason=checked.reason, bearer=True, exp=checked.exp)
        if self._sessions is not None:
            return await self._sessions.authenticate(headers, client)

        access, refresh = self._jar.read(headers)
        if access is None and refresh is None:
            return AuthResult(reason=Reason.NO_TOKEN)
        verdict: Verdict | None = await self._verifier.verify(access) if access else None
        if verdict is not None and verdict.ok and not verdict.refreshable:
            return AuthResult(claims=verdict.claims, token=access, exp=verdict.exp)
        garbage = verdict.reason if verdict is not None and verdict.reason in _UNREADABLE else None
        if garbage:
            # Not a token at all (truncated, mangled by a proxy): treat the cookie as absent, so a
            # refresh cookie can still carry the session; a well-formed but forged token cannot.
            verdict = None

        # A revoked access token (tokens.revoke_superseded) may ride with a refresh token still in
        # its grace period: the refresher hands out the successor, or refuses an ended session.
        needs_refresh = verdict is None or verdict.refreshable or verdict.reason == Reason.TOKEN_REVOKED
        dropped: list[bytes] = []
        if refresh is not None and needs_refresh and self._refresher is not None:
            token = self._jar.open_refresh(refresh)
            if token is not None:
                return await _refreshed(self._refresher, token, access, verdict, client)
            # Not sealed by this gateway (junk, another secret, a raw token from before sealing): never
            # redeemed, never looked up in the store, and cleared so the browser stops sending it.
            dropped = [self._jar.clear_refresh()]
        if verdict is None:
            if garbage:
                return AuthResult(reason=garbage, set_cookies=[self._jar.clear_access(), *dropped])
            return AuthResult(reason=Reason.NO_TOKEN, set_cookies=dropped)
        if verdict.ok:
            return AuthResult(claims=verdict.claims, token=access, set_cookies=dropped)
        # An expired token may still be refreshed later; one whose keys are unavailable may be fine.
        clear = [] if verdict.reason in _KEPT else [self._jar.clear_access()]
        return AuthResult(reason=verdict.reason, set_cookies=clear + dropped)


async def _refreshed(
    refresher: Refresher, token: str, access: str | None, verdict: Verdict | None, client: str | None
) -> AuthResult:
    """The refresher's answer for ``token``, or the still valid access token when refreshing early failed softly."""
    result = await refresher.refresh(token, access, client=client)
    if result.claims is None and verdict is not None and verdict.ok and result.reason in _SOFT_FAILURES:
        # Refreshing early failed for a passing reason, but the token still works: use it,
        # and keep whatever the refresh set (a successor the IdP issued must reach the browser).
        return AuthResult(claims=verdict.claims, token=access, set_cookies=result.set_cookies)
    return result


# Refusals that leave the access cookie in place.
_KEPT = frozenset(
    {Reason.TOKEN_EXPIRED, Reason.KEYS_UNAVAILABLE, Reason.INTROSPECTION_UNAVAILABLE, Reason.STORE_UNAVAILABLE}
)
# Access cookies that hold no token at all (as opposed to a token that fails a check).
_UNREADABLE = frozenset({Reason.MALFORMED_TOKEN, Reason.TOKEN_TOO_LARGE})
# Failures that say nothing about the session itself (it may still be fine a moment later).
_SOFT_FAILURES = frozenset(
    {
        Reason.IDP_ERROR,
        Reason.LOCK_TIMEOUT,
        Reason.STORE_UNAVAILABLE,
        Reason.REFRESH_ERROR,
        Reason.IDP_ANSWER_LOST,
        Reason.IDP_BAD_RESPONSE,
        Reason.IDP_TOKEN_UNVERIFIED,
        Reason.REFRESH_RATE_LIMITED,
    }
)
