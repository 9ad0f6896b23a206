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

from gateway.authn import Authenticator, AuthResult, bearer_token
from gateway.cache import BoundedCache
from gateway.cookies import CookieJar
from gateway.csrf import CSRFGuard
from gateway.denylist import Denylist
from gateway.errors import UnsafeClaim
from gateway.identity import IdentityHeaders, claims_allowed
from gateway.reasons import Reason
from gateway.routing import Route
from gateway.tokens import Verifier
from gateway.tracing import Tracer
from gateway.types import RawHeaders, Scope, StrHeaders

log = logging.getLogger("gateway")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Known(NamedTuple):
    """A token seen valid before, with what the request path needs from it."""

    claims: dict[str, Any]
    fresh_until: float  # exp - the refresh margin (Verifier.refresh_margin): after this, the full path decides
    jti: Any
    identity: StrHeaders
    token: str


class Admitted(NamedTuple):
    """What admission decided: ``refused`` set means answer that reason (with ``set_cookies``)."""

    claims: dict[str, Any] | None = None
    identity: StrHeaders = []
    token: str | None = None  # the access token the request goes on with (verified when claims is set)
    set_cookies: list[bytes] | None = None
    refreshed: bool = False
    refused: Reason | None = None


ANONYMOUS = Admitted()


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
        # Authorization header value (bytes) or access cookie (str) -> a token verified before.
        self._known: BoundedCache[bytes | str, Known] = BoundedCache()

    async def http(self, scope: Scope, route: Route, authorization: bytes | None, cookies: bool) -> Admitted:
        """An HTTP request to ``route``; ``authorization`` is its one Authorization header (b"": several)."""
        if route.auth == "none":
            return ANONYMOUS
        headers: RawHeaders = scope["headers"]
        if scope["method"] not in SAFE_METHODS and self._cross_site(scope):
            return Admitted(refused=Reason.CSRF)
        # The key is the credential the authenticator will use: a Bearer header wins over cookies.
        key: bytes | str | None = None
        if authorization and authorization[:7].lower() == b"bearer ":
            key = authorization
        elif authorization is None or authorization:  # none, or one that is not Bearer
            key = self._jar.read(headers)[0] if cookies else None
        known = self._known.get(key) if key else None
        if known is not None and self._clock() < known.fresh_until and known.jti not in self._denylist:
            # Its identity headers are ready; the route's rules still apply.
            if route.require and not claims_allowed(known.claims, route.require):
                return Admitted(refused=Reason.CLAIMS_DENIED)
            return Admitted(known.claims, known.identity, known.token)
        with self._tracer.span("gateway.authenticate", route=route.name):
            auth = await self._authenticator.authenticate(headers)
        admitted = self._judge(route, auth)
        if (
            admitted.refused is None
            and admitted.claims is not None
            and key
            and isinstance(key, bytes) == auth.bearer
            and not auth.set_cookies
            and not auth.refreshed
        ):
            self._remember(key, auth, admitted.claims, admitted.identity)
        return admitted

    async def websocket(self, scope: Scope, route: Route) -> Admitted:
        """A WebSocket handshake to ``route``: checked as an unsafe request would be, never from the fast path."""
        if route.auth == "none":
            return ANONYMOUS
        headers: RawHeaders = scope["headers"]
        # Browsers send cookies with cross-site WebSocket handshakes and no CORS applies:
        # a cookie session is only good from its own site (cross-site WebSocket hijacking).
        if bearer_token(headers) is None and any(self._jar.read(headers)):
            if self._csrf.refuses("POST", headers, self._origin(scope)):
                return Admitted(refused=Reason.CSRF)
        return self._judge(route, await self._authenticator.authenticate(headers))

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
            identity = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._identity.build(claims)]
        except UnsafeClaim as exc:
            log.warning("route %s: claim %s holds CR, LF or NUL; refusing", route.name, exc)
            return Admitted(refused=Reason.CLAIM_UNSAFE, set_cookies=auth.set_cookies)
        return Admitted(claims, identity, auth.token, auth.set_cookies, auth.refreshed)

    def _cross_site(self, scope: Scope) -> bool:
        """An unsafe request riding on the session cookie from another site (see gateway.csrf)."""
        headers = scope["headers"]
        if bearer_token(headers) is not None or self._jar.read(headers) == (None, None):
            return False
        refused: bool = self._csrf.refuses(scope["method"], headers, self._origin(scope))
        return refused

    def _remember(self, key: bytes | str, auth: AuthResult, claims: dict[str, Any], identity: StrHeaders) -> None:
        """Keep a plainly valid token for the fast path: same token, same claims, same headers."""
        if auth.exp is None or auth.token is None:
            return
        fresh_until = auth.exp - self._verifier.refresh_margin(claims, auth.exp)
        self._known.put(key, Known(claims, fresh_until, claims.get("jti"), identity, auth.token))
