"""``POST {prefix}/logout``: end the session everywhere, whatever the IdP says.

The access token's ``jti`` goes on the denylist until its ``exp`` (so a replayed copy is refused
by every process); the refresh token is refused by the gateway from now on and revoked at the
IdP's RFC 7009 endpoint when one is configured; both cookies are cleared. A revocation endpoint
that fails does not keep the session alive. Browsers are sent to ``logout.redirect`` (303),
other clients get 204. With ``login.oidc`` and an IdP that advertises an ``end_session_endpoint``,
browsers are sent there instead (OIDC RP-Initiated Logout: ``id_token_hint``, ``client_id``,
``post_logout_redirect_uri``), so the IdP's own session ends too and the next login asks again.

A refresh cookie the gateway did not seal ends nothing: no store write, no IdP call (the cookies
are cleared all the same). With raw refresh cookies, a never-seen token over its client's limit
gets 429 and nothing is done (gateway.throttle). With ``session.mode: server`` the session cookie
names the session: its record ends on every worker (gateway.sessionauth), and its cookie is cleared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.authn import bearer_token
from gateway.cookies import CookieJar
from gateway.csrf import CSRFGuard
from gateway.denylist import Denylist
from gateway.errors import StoreError
from gateway.families import access_refusals
from gateway.reasons import Reason
from gateway.refresh import SessionRefresher
from gateway.responses import safe_target, wants_html
from gateway.sessionauth import SessionAuth
from gateway.tokens import Verifier

log = logging.getLogger("gateway.logout")


class Logout:
    def __init__(
        self,
        *,
        jar: CookieJar,
        verifier: Verifier,
        denylist: Denylist,
        refresher: SessionRefresher | None,
        csrf: CSRFGuard,
        origin: Callable[[MutableMapping[str, Any]], str],
        redirect: str,
        client: Callable[[MutableMapping[str, Any]], str | None] | None = None,
        end_session_url: Callable[[str | None, str | None], Awaitable[str | None]] | None = None,
        id_token_of: Callable[[str | None], Awaitable[str | None]] | None = None,
        sessions: SessionAuth | None = None,
    ) -> None:
        self._end_session_url = end_session_url  # login.oidc: RP-initiated logout
        self._id_token_of = id_token_of
        self._jar = jar
        self._verifier = verifier
        self._denylist = denylist
        self._refresher = refresher
        self._csrf = csrf
        self._origin = origin
        self._client = client
        self._sessions = sessions  # session.mode: server: the session cookie names what ends
        self._redirect = safe_target(redirect) if redirect.startswith("/") else redirect

    async def handle(self, request: Request) -> Response:
        scope = request.scope
        headers = scope["headers"]
        bearer = bearer_token(headers)
        access, refresh = self._jar.read(headers)
        held = self._sessions.sessions.read_cookie(headers) if self._sessions is not None else None
        if not bearer and (access or refresh or held) and self._csrf.refuses("POST", headers, self._origin(scope)):
            return JSONResponse({"error": "forbidden", "reason": Reason.CSRF}, status_code=403)
        token = bearer or access
        session = self._jar.open_refresh(refresh) if refresh and self._refresher is not None else None
        browser = wants_html("GET", headers) or _is_form(headers)
        hint = await self._hint(held, session) if browser and self._end_session_url is not None else None
        if session is not None and self._refresher is not None:
            client = self._client(scope) if self._client is not None else None
            # Its WebSockets close everywhere too.
            if await self._refresher.end_session(session, client) == Reason.REFRESH_RATE_LIMITED:
                return JSONResponse(
                    {"error": "too_many_requests", "reason": Reason.REFRESH_RATE_LIMITED},
                    status_code=429,
                    headers={"retry-after": "5", "cache-control": "no-store"},
                )
        if held is not None and self._sessions is not None:
            # Record deleted, family ended and revoked at the IdP, caches and sockets ended on every worker.
            await self._sessions.logout(held, self._client(scope) if self._client is not None else None)
        if token:
            await self._deny(token)
        if self._sessions is not None:  # session mode names no token cookie, not even to clear it
            clear = [self._sessions.sessions.clear_cookie()]
        else:  # both token cookies, and every chunk the request carried
            clear = self._jar.expand([self._jar.clear_access(), self._jar.clear_refresh()], headers)
        if browser:
            # The session is over here first; then the IdP's too (RP-initiated logout), when it offers one.
            at_idp = await self._end_session_url(None, hint) if self._end_session_url is not None else None
            response: Response = Response(status_code=303, headers={"location": at_idp or self._redirect})
        else:
            response = Response(status_code=204)
        response.headers["cache-control"] = "no-store"
        for cookie in clear:
            response.headers.append("set-cookie", cookie.decode("latin-1"))
        return response

    async def _hint(self, held: str | None, refresh: str | None) -> str | None:
        """The session's ID token, found before the session ends (the hint of RP-initiated logout)."""
        if held is not None and self._sessions is not None:
            return await self._sessions.id_token(held)
        return await self._id_token_of(refresh) if self._id_token_of is not None else None

    async def _deny(self, token: str) -> None:
        claims = await self._verifier.signed_claims(token)
        if claims is None:
            return  # not our token (or forged): nothing to revoke
        jti = claims.get("jti")
        if not isinstance(jti, str):
            log.warning("logout: the access token has no jti; it stays valid until it expires")
            return
        # The token, and the sockets opened with it: each refused here at once, even when the store fails.
        for entry, lasts in access_refusals(jti, claims, time.time()):
            try:
                await self._denylist.deny(entry, lasts)
            except StoreError as exc:  # shared by the denylist's sync once the store answers
                log.error("logout: denylist not shared with other processes yet (%s); refused here", exc)


def _is_form(headers: list[tuple[bytes, bytes]]) -> bool:
    """An HTML form post (a logout button) expects a page back, not 204."""
    for name, value in headers:
        if name == b"content-type":
            return value.startswith((b"application/x-www-form-urlencoded", b"multipart/form-data"))
    return False
