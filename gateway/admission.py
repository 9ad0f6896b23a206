"""Admission: whether a request may pass, and as whom.

    CSRF        an unsafe request riding on the session cookie from another site is refused (gateway.csrf)
    credential  a token seen valid before takes the fast path below; anything else is authenticated
                (gateway.authn: cookie or Bearer, verified, refreshed when expired)
    claims      the route's ``require`` rules (gateway.identity), then the identity headers

The fast path exists because most requests carry the same token as the one before: the
``Known`` entry keeps, per credential (the Authorization value or the access cookie), the claims
and the identity headers already built, so such a request costs a dict lookup and a denylist
check. Only plainly valid tokens are kept, until their refresh margin: near expiry, refresh,
errors and first sight all take the full path. ``tokens.Verifier`` has its own cache, by token,
for what the fast path does not serve (cookie and Bearer of one token, refresh outcomes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from gateway.authn import Authenticator, AuthResult, bearer_token, read_authorization
from gateway.cache import BoundedCache
from gateway.cookies import CookieJar
from gateway.csrf import SAFE_METHODS, CSRFGuard
from gateway.denylist import Denylist
from gateway.errors import UnsafeClaim
from gateway.identity import IdentityHeaders, claims_allowed
from gateway.reasons import Reason
from gateway.routing import Route
from gateway.sessions import ServerSessions
from gateway.tokens import Verifier
from gateway.tracing import Tracer
from gateway.types import RawHeaders, Scope, StrHeaders

log = logging.getLogger("gateway")


class Admitted(NamedTuple):
    """What admission decided: ``refused`` set means answer that reason (with ``set_cookies``)."""

    claims: dict[str, Any] | None = None
    identity: StrHeaders = []
    token: str | None = None  # the access token the request goes on with (verified when claims is set)
    set_cookies: list[bytes] | None = None
    refreshed: bool = False
    refused: Reason | None = None
    bearer: bool = False  # authenticated by the request's own Authorization header


ANONYMOUS = Admitted()
PREFLIGHT = Admitted()  # a CORS preflight forwarded unauthenticated (preflight: upstream): not even Authorization
REFUSED_CSRF = Admitted(refused=Reason.CSRF)
NO_CREDENTIAL = Admitted(refused=Reason.NO_TOKEN)


class Known(NamedTuple):
    """A token seen valid before, with what admission decided for it (served as is until ``fresh_until``)."""

    admitted: Admitted
    fresh_until: float  # exp - the refresh margin (Verifier.refresh_margin): after this, the full path decides
    jti: Any


class Admission:
    """The CSRF, credential and claims checks of one config generation, for HTTP and WebSocket."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        verifier: Verifier,
        jar: CookieJar,
        csrf: CSRFGuard,
        identity: IdentityHeaders,
        denylist: Denylist,
        tracer: Tracer,
        clock: Callable[[], float],
        origin: Callable[[Scope], str],
        client: Callable[[Scope], str | None] | None = None,
        sessions: ServerSessions | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._verifier = verifier
        self._jar = jar
        self._csrf = csrf
        self._identity = identity
        self._denylist = denylist
        self._tracer = tracer
        self._clock = clock
        self._origin = origin  # this request's own origin, as the browser sees it
        self._client = client or _peer  # the client's address, after trusted proxies (limits per client)
        self._sessions = sessions  # session.mode: server: the session cookie is the credential
        # Authorization header value (bytes) or access cookie (str) -> a token verified before.
        # A pair of cookies (access, refresh) -> a grace hit's answer (``_remember_grace``).
        self._known: BoundedCache[bytes | str | tuple[str, str], Known] = BoundedCache()
        verifier.on_key_change(self._known.clear)  # a key the IdP removed: its tokens take the full path again

    def known(
        self, scope: Scope, route: Route, authorization: bytes | None, count: int, cookies: bool
    ) -> Admitted | None:
        """The fast path: what admission decides without awaiting anything, or None for ``http``.

        ``authorization`` is the request's first Authorization header, of ``count``. A token seen
        valid before is served here; so are auth-less routes and refusals found in the headers.
        """
        if route.auth == "none":
            # A login route's captured tokens become the browser's session: logging a victim into
            # the attacker's account from another site (login CSRF) is refused like any forgery.
            if route.capture is not None and scope["method"] not in SAFE_METHODS and self._forged(scope, route):
                return REFUSED_CSRF
            return ANONYMOUS
        if authorization is not None:
            known = self._known.get(authorization) if count == 1 else None
            if known is None:  # not a Bearer token seen before: read it
                kind, _ = read_authorization(authorization, count)
                if kind == "several":
                    return Admitted(refused=Reason.INVALID_REQUEST)
                if kind == "malformed":  # never read past, even with a valid cookie riding along
                    return Admitted(refused=Reason.MALFORMED_AUTHORIZATION)
                if kind == "bearer":
                    return None
        else:
            known = None
        if known is None:  # the credential is the access cookie, if any
            if scope["method"] not in SAFE_METHODS and (cookies or route.capture is not None):
                if self._cross_site(scope, route):
                    return REFUSED_CSRF
            if authorization is None and not cookies:  # no credential at all: nothing to verify or refresh
                return NO_CREDENTIAL if route.auth == "required" else ANONYMOUS
            if cookies:  # inlined ``_cookie``: the hot path
                headers = scope["headers"]
                sessions = self._sessions
                if sessions is None:
                    cookie, refresh = self._jar.read(headers)
                    known = self._known.get(cookie or "")
                    if known is None and cookie and refresh:  # a grace hit answered before (``_remember_grace``)
                        known = self._known.get((cookie, refresh))
                        if known is not None and self._jar.chunked(headers):
                            known = None  # its cookies were expanded for a request without chunks to clear
                else:
                    known = self._known.get(sessions.read_cookie(headers) or "")
        if known is None or self._clock() >= known.fresh_until or known.jti in self._denylist:
            return None
        # Its identity headers are ready; the route's rules still apply.
        if route.require and not claims_allowed(known.admitted.claims or {}, route.require):
            return Admitted(refused=Reason.CLAIMS_DENIED)
        return known.admitted

    async def http(self, scope: Scope, route: Route) -> Admitted:
        """The full path, after ``known`` found nothing: authenticate (and refresh), then the route's rules."""
        headers: RawHeaders = scope["headers"]
        with self._tracer.span("gateway.authenticate", route=route.name):
            auth = await self._authenticator.authenticate(headers, self._client(scope))
        admitted = self._judge(route, auth)
        if admitted.refused is None and admitted.claims is not None:
            if not auth.set_cookies and not auth.refreshed:
                # The key is the credential the authenticator used: a Bearer header wins over cookies.
                key = _header(headers, b"authorization") if auth.bearer else self._cookie(headers)
                if key:
                    self._remember(key, auth, admitted)
            elif auth.refreshed and auth.until is not None and not auth.bearer and self._sessions is None:
                self._remember_grace(headers, auth, admitted)
        return admitted

    async def websocket(self, scope: Scope, route: Route) -> Admitted:
        """A WebSocket handshake to ``route``: checked as an unsafe request would be, never from the fast path."""
        if route.auth == "none":
            return ANONYMOUS
        headers: RawHeaders = scope["headers"]
        # Browsers send cookies with cross-site WebSocket handshakes and no CORS applies:
        # a cookie session is only good from its own site (cross-site WebSocket hijacking).
        if bearer_token(headers) is None and self._session_cookies(headers) and self._forged(scope, route, "POST"):
            return Admitted(refused=Reason.CSRF)
        return self._judge(route, await self._authenticator.authenticate(headers, self._client(scope)))

    def _judge(self, route: Route, auth: AuthResult) -> Admitted:
        """The route's rules applied to what authentication found."""
        claims = auth.claims
        if claims is None:
            if route.auth == "required":
                return Admitted(refused=auth.reason or Reason.NO_TOKEN, set_cookies=auth.set_cookies)
            return Admitted(set_cookies=auth.set_cookies)
        if route.require and not claims_allowed(claims, route.require):
            return Admitted(refused=Reason.CLAIMS_DENIED, set_cookies=auth.set_cookies)
        try:
            # UTF-8, as identity.build encodes them and the clients encode them back: "José" stays "José".
            identity = [(n.decode("ascii"), v.decode("utf-8")) for n, v in self._identity.build(claims)]
        except UnsafeClaim as exc:
            log.warning("route %s: claim %s; refusing", route.name, exc)
            return Admitted(refused=Reason.CLAIM_UNSAFE, set_cookies=auth.set_cookies)
        return Admitted(claims, identity, auth.token, auth.set_cookies, auth.refreshed, bearer=auth.bearer)

    def _cross_site(self, scope: Scope, route: Route) -> bool:
        """An unsafe request riding on a session cookie (either one) from another site (see gateway.csrf)."""
        if route.capture is None and not self._session_cookies(scope["headers"]):
            return False
        return self._forged(scope, route)

    def _cookie(self, headers: RawHeaders) -> str | None:
        """The cookie that is the credential: the access cookie, or in session.mode server the session cookie."""
        if self._sessions is None:
            return self._jar.read(headers)[0]
        return self._sessions.read_cookie(headers)

    def _session_cookies(self, headers: RawHeaders) -> bool:
        """Whether the request rides on one of the gateway's session cookies (either token cookie, or the session's)."""
        if self._sessions is not None and self._sessions.read_cookie(headers) is not None:
            return True
        return self._jar.read(headers) != (None, None)

    def _forged(self, scope: Scope, route: Route, method: str | None = None) -> bool:
        trusted = route.cors.trusted if route.cors is not None else frozenset()
        refused: bool = self._csrf.refuses(method or scope["method"], scope["headers"], self._origin(scope), trusted)
        return refused

    def _remember_grace(self, headers: RawHeaders, auth: AuthResult, admitted: Admitted) -> None:
        """A grace hit the refresher remembers (``auth.until``): the same pair of cookies again gets the same
        successor and cookies from the fast path until then. Keyed by both cookies as sent, so an expired access
        token gets nothing without the very refresh cookie it came with; never with a big cookie's chunks."""
        access, refresh = self._jar.read(headers)
        if access and refresh and not self._jar.chunked(headers):
            self._remember((access, refresh), auth, admitted)

    def _remember(self, key: bytes | str | tuple[str, str], auth: AuthResult, admitted: Admitted) -> None:
        """Keep a plainly valid token for the fast path: same token, same claims, same headers."""
        claims = admitted.claims
        if auth.exp is None or auth.token is None or claims is None:
            return
        fresh_until = auth.exp - self._verifier.refresh_margin(claims, auth.exp)
        if auth.until is not None:  # a server-side session: until its next use is due to be recorded
            fresh_until = min(fresh_until, auth.until)
        self._known.put(key, Known(admitted, fresh_until, auth.watch or claims.get("jti")))


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _header(headers: RawHeaders, name: bytes) -> bytes | None:
    return next((value for key, value in headers if key == name), None)
