"""Logout at the demo IdP: OpenID Connect RP-Initiated Logout 1.0 and Back-Channel Logout 1.0.

``GET|POST /end_session`` (``id_token_hint``, ``post_logout_redirect_uri``, ``client_id``, ``state``):
ends the login session the hint names (its refresh-token families are revoked) and redirects to
``post_logout_redirect_uri`` (registered, or any loopback http URI when none are); a hint this IdP
did not sign, or that names another client, is refused with 400.

``POST /_admin/logout_token`` (tests): a signed logout token for ``sub`` and/or ``sid``, with knobs
that make bad ones (``aud``, ``iss``, ``nonce``, ``events: false``, ``iat`` offset, a fixed ``jti``).
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.demo.idp.common import NO_STORE, OAuthError, bad_request, read_form, read_json
from gateway.demo.idp.pages import error_page
from gateway.demo.idp.provider import IdentityProvider

EVENT = "http://schemas.openid.net/event/backchannel-logout"


class LogoutEndpoints:
    """End-session and the logout-token minting of an ``IdentityProvider``; ``allowed`` checks redirect URIs."""

    def __init__(self, idp: IdentityProvider, allowed: Any) -> None:
        self.idp = idp
        self.allowed = allowed
        self.end_sessions = 0  # /end_session requests that ended a login session

    def routes(self) -> list[Route]:
        return [
            Route("/end_session", self.end_session, methods=["GET", "POST"]),
            Route("/_admin/logout_token", self.logout_token, methods=["POST"]),
        ]

    async def end_session(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                params = await read_form(request)
            except OAuthError:
                return error_page("malformed form", 400)
        else:
            params = dict(request.query_params)
        hint = params.get("id_token_hint")
        claims = self.idp.decode(hint) if hint else None
        client = self.idp.settings.client_id
        if hint and (claims is None or claims.get("aud") != client):
            return error_page("id_token_hint was not issued by this provider for this client", 400)
        if params.get("client_id", client) != client:
            return error_page("unknown client_id", 400)
        target = params.get("post_logout_redirect_uri")
        if target is not None and not self.allowed(target):
            return error_page("post_logout_redirect_uri is not registered", 400)
        sid = claims.get("sid") if claims else None
        for family in list(self.idp.families.values()):
            if sid is not None and family.claims.get("sid") == sid:
                self.idp.revoke_family(family)
        self.end_sessions += 1
        if target is None:
            return error_page("You are logged out.", 200)
        query = urlencode({k: v for k, v in (("state", params.get("state")),) if v is not None})
        separator = "&" if urlsplit(target).query else "?"
        return RedirectResponse(target + (separator + query if query else ""), status_code=302, headers=NO_STORE)

    async def logout_token(self, request: Request) -> Response:
        """``{"sub"?, "sid"?, "aud"?, "iss"?, "nonce"?, "events"?: bool, "iat_offset"?: int, "jti"?}``."""
        body = await read_json(request)
        sub, sid = body.get("sub"), body.get("sid")
        if not isinstance(sub, str | None) or not isinstance(sid, str | None) or (sub is None and sid is None):
            return bad_request("need sub and/or sid (strings)")
        s = self.idp.settings
        now = int(self.idp.now()) + int(body.get("iat_offset") or 0)
        claims: dict[str, Any] = {
            "iss": body.get("iss", s.issuer),
            "aud": body.get("aud", s.client_id),
            "iat": now,
            "exp": now + 120,
            "jti": body.get("jti") or uuid.uuid4().hex,
        }
        if body.get("events", True):
            claims["events"] = {EVENT: {}}
        claims |= {k: v for k, v in (("sub", sub), ("sid", sid), ("nonce", body.get("nonce"))) if v is not None}
        return JSONResponse({"logout_token": self.idp.sign(claims, typ="logout+jwt")})
