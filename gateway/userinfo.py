"""``GET {prefix}/userinfo``: who is logged in, for a single-page app (Duende BFF's ``/bff/user``).

The request is admitted as one on an ``auth: required`` route would be (``USERINFO_ROUTE``): cookie or
Bearer, the fast path, transparent refresh with rotated cookies (single flight), the denylist. It is
answered, never forwarded:

    200   the allowed claims of the access token (``identity.userinfo_claims``, those present) and its
          ``exp``, as JSON; the rotated ``Set-Cookie`` when the session was refreshed on the way
    401   ``{"error": "invalid_token", "reason": ...}`` without a session, to browsers too: the page
          asked with ``fetch``, so a login redirect or an HTML page would only confuse it; cookies
          cleared when the session ended
    503   + ``Retry-After`` when the IdP or the store is down (cookies kept), as on any route
    405   anything but GET and HEAD (it changes nothing but what a GET may: a refresh)

Every answer is ``Cache-Control: no-store`` and ``Vary: Cookie, Authorization``. Tokens never appear.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.accesslog import RequestIds, RequestInfo
from gateway.admission import Admission, Admitted
from gateway.heads import Scanned
from gateway.reasons import Reason
from gateway.responses import NO_STORE, Denials, send_response
from gateway.routing import Route, Upstream
from gateway.types import RawHeaders, Receive, Scope, Send

METHODS = frozenset({"GET", "HEAD"})
VARY = (b"vary", b"Cookie, Authorization")

# What admission sees: a route that needs a valid token and asks nothing more of its claims.
USERINFO_ROUTE = Route(
    name="userinfo",
    prefix="",
    host=None,
    upstream=Upstream("", "", ""),  # never forwarded
    auth="required",
    require={},
    capture=None,
    connect_timeout=0,
    read_timeout=0,
    methods=METHODS,
    allow=b"GET, HEAD",
    path_style="exact",
    max_body=0,
)


def user_claims(claims: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """The allowed claims ``claims`` has (a ``null`` one is left out), and ``exp`` when it is a number."""
    found = {name: claims[name] for name in allowed if claims.get(name) is not None}
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        found["exp"] = exp
    return found


class UserInfo:
    """``{prefix}/userinfo`` for one config generation."""

    def __init__(
        self, *, endpoint: str, admission: Admission, deny: Denials, claims: tuple[str, ...], request_ids: RequestIds
    ) -> None:
        self.endpoint = endpoint
        self._admission = admission
        self._deny = deny
        self._claims = claims
        self._request_ids = request_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = RequestInfo()
        seen = Scanned(scope["headers"])
        info.identify(seen.request_id, self._request_ids)
        scope = dict(scope, gateway=info)
        method: str = scope["method"]
        if method not in METHODS:
            extra = [(b"allow", USERINFO_ROUTE.allow), VARY]
            await self._deny(send, scope, Reason.METHOD_NOT_ALLOWED, None, extra=extra, api=True)
            return
        admitted = await self._admit(scope, seen)
        if admitted.refused is not None or admitted.claims is None:
            reason = admitted.refused or Reason.NO_TOKEN
            await self._deny(send, scope, reason, None, admitted.set_cookies, extra=[VARY], api=True)
            return
        body = json.dumps(user_claims(admitted.claims, self._claims), separators=(",", ":")).encode()
        headers: RawHeaders = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            NO_STORE,
            VARY,
            (b"x-request-id", info.request_id.encode()),
        ]
        headers += [(b"set-cookie", cookie) for cookie in admitted.set_cookies or ()]
        await send_response(send, 200, b"" if method == "HEAD" else body, headers)

    async def _admit(self, scope: Scope, seen: Scanned) -> Admitted:
        known = self._admission.known(scope, USERINFO_ROUTE, seen.authorization, seen.authorizations, seen.cookies)
        return known if known is not None else await self._admission.http(scope, USERINFO_ROUTE)
