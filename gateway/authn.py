"""Authenticate a request: find its credentials, verify them, refresh when that is allowed.

A Bearer header wins over the access cookie. The result is either an identity (claims) or a
reason code; it also carries the Set-Cookie headers the response must bear (rotated tokens, or
a cleared access cookie after a bad one). Refresh is delegated to a ``Refresher`` and only ever
happens for cookie sessions whose access token is absent, expired or nearly so (or revoked),
and otherwise fully valid: a forged token never reaches the IdP, and API clients (Bearer) get a plain 401.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
    exp: float | None = None  # set when the token was simply valid (no refresh, no cookie to set)


class Refresher(Protocol):
    async def refresh(self, refresh_token: str, old_access: str | None) -> AuthResult:
        """New tokens for a refresh token: an AuthResult with claims and cookies, or a reason."""


def bearer_token(headers: RawHeaders) -> str | None:
    """The Bearer token; "" when an Authorization header is malformed; None when there is none."""
    found: str | None = None
    for name, value in headers:
        if name != b"authorization":
            continue
        scheme, _, rest = value.partition(b" ")
        if scheme.lower() != b"bearer":
            continue
        if found is not None:
            return ""  # two Bearer headers: ambiguous, refuse
        token = rest.strip()
        try:
            found = token.decode("ascii") if token and b" " not in token else ""
        except UnicodeDecodeError:
            found = ""
    return found


class Authenticator:
    def __init__(self, verifier: Verifier, jar: CookieJar, refresher: Refresher | None = None) -> None:
        self._verifier = verifier
        self._jar = jar
        self._refresher = refresher

    async def authenticate(self, headers: RawHeaders) -> AuthResult:
        bearer = bearer_token(headers)
        if bearer is not None:
            if not bearer:
                return AuthResult(reason=Reason.MALFORMED_AUTHORIZATION, bearer=True)
            checked = await self._verifier.verify(bearer)
            return AuthResult(claims=checked.claims, token=bearer, reason=checked.reason, bearer=True, exp=checked.exp)

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
        if refresh is not None and needs_refresh and self._refresher is not None:
            result = await self._refresher.refresh(refresh, access)
            if result.claims is None and verdict is not None and verdict.ok and result.reason in _SOFT_FAILURES:
                # Refreshing early failed for a passing reason, but the token still works: use it,
                # and keep whatever the refresh set (a successor the IdP issued must reach the browser).
                return AuthResult(claims=verdict.claims, token=access, set_cookies=result.set_cookies)
            return result
        if verdict is None:
            if garbage:
                return AuthResult(reason=garbage, set_cookies=[self._jar.clear_access()])
            return AuthResult(reason=Reason.NO_TOKEN)
        if verdict.ok:
            return AuthResult(claims=verdict.claims, token=access)
        clear = [] if verdict.reason == Reason.TOKEN_EXPIRED else [self._jar.clear_access()]
        return AuthResult(reason=verdict.reason, set_cookies=clear)


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
    }
)
