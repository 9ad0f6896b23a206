"""The demo IdP's token endpoints over HTTP, in two dialects: OAuth 2.0 (RFC 6749 ``POST /token``,
RFC 7009 ``POST /revoke``) and Django SimpleJWT (``POST /api/token/``, ``POST /api/token/refresh/``),
plus the JWKS (``GET /jwks``, ``GET /.well-known/jwks.json``)."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from urllib.parse import unquote_plus

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.demo.idp.common import NO_STORE, OAuthError, oauth_tokens, read_form, read_json
from gateway.demo.idp.faults import SPOILED_ANSWER_FAILURES, failure_response, oversize_response
from gateway.demo.idp.provider import IdentityProvider, Outcome

# Answers grant_type=authorization_code from an authenticated client, given the form.
CodeGrant = Callable[[dict[str, str]], Awaitable[Response]]


class TokenEndpoints:
    """The token, revocation, SimpleJWT and JWKS endpoints of an ``IdentityProvider``.

    ``code_grant`` answers ``grant_type=authorization_code`` (the OIDC part's code exchange); without
    it that grant type is unsupported.
    """

    def __init__(self, idp: IdentityProvider, code_grant: CodeGrant | None = None) -> None:
        self.idp = idp
        self.code_grant = code_grant

    def routes(self) -> list[Route]:
        return [
            Route("/token", self.token, methods=["POST"]),
            Route("/revoke", self.revoke, methods=["POST"]),
            Route("/api/token/", self.simplejwt_login, methods=["POST"]),
            Route("/api/token/refresh/", self.simplejwt_refresh, methods=["POST"]),
            Route("/jwks", self.jwks, methods=["GET"]),
            Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
        ]

    async def token(self, request: Request) -> Response:
        idp = self.idp
        try:
            form = await read_form(request)
            grant = form.get("grant_type")
            if grant == "refresh_token":
                idp.counters.refresh_calls += 1
            if not idp.client_ok(form, _basic_credentials(request)):
                if grant == "refresh_token":
                    idp.refuse_client(form.get("refresh_token"))
                raise OAuthError("invalid_client", 401)
            if grant == "password":
                pair = idp.login(form.get("username", ""), form.get("password"))
                if pair is None:
                    raise OAuthError("invalid_grant")
                return oauth_tokens({"access_token": pair.access, "refresh_token": pair.refresh}, pair.expires_in)
            if grant == "authorization_code" and self.code_grant is not None:
                return await self.code_grant(form)
            if grant != "refresh_token":
                raise OAuthError("unsupported_grant_type" if grant else "invalid_request")
            outcome = await idp.refresh(form.get("refresh_token"))
        except OAuthError as exc:
            headers = {"WWW-Authenticate": 'Basic realm="idp"'} if exc.status == 401 else {}
            return JSONResponse({"error": exc.error}, status_code=exc.status, headers=NO_STORE | headers)
        if (failed := _failed_answer(outcome)) is not None:
            return failed
        if outcome.pair is None:
            return JSONResponse({"error": "invalid_grant"}, status_code=400, headers=NO_STORE)
        body = idp.tokens_body(outcome.pair, outcome.fail, "access_token", "refresh_token")
        if outcome.fail == "oversize":
            return oversize_response(body)
        return oauth_tokens(body, outcome.pair.expires_in)

    async def simplejwt_login(self, request: Request) -> Response:
        body = await read_json(request)
        pair = self.idp.login(body.get("username"), body.get("password"))
        if pair is None:
            return JSONResponse({"detail": "No active account found with the given credentials"}, status_code=401)
        return JSONResponse({"access": pair.access, "refresh": pair.refresh})

    async def simplejwt_refresh(self, request: Request) -> Response:
        self.idp.counters.refresh_calls += 1
        presented = (await read_json(request)).get("refresh")
        outcome = await self.idp.refresh(presented if isinstance(presented, str) else None)
        if (failed := _failed_answer(outcome)) is not None:
            return failed
        if outcome.pair is None:
            return JSONResponse({"detail": "Token is invalid or expired", "code": "token_not_valid"}, status_code=401)
        body = self.idp.tokens_body(outcome.pair, outcome.fail, "access", "refresh")
        return oversize_response(body) if outcome.fail == "oversize" else JSONResponse(body)

    async def revoke(self, request: Request) -> Response:
        try:
            form = await read_form(request)
            if not self.idp.client_ok(form, _basic_credentials(request)):
                raise OAuthError("invalid_client", 401)
            if "token" not in form:
                raise OAuthError("invalid_request")
        except OAuthError as exc:
            return JSONResponse({"error": exc.error}, status_code=exc.status)
        self.idp.revoke(form["token"])
        return Response(status_code=200)

    async def jwks(self, request: Request) -> Response:
        self.idp.counters.jwks_requests += 1
        if self.idp.behaviour.jwks == "down":
            return PlainTextResponse("Service Unavailable", status_code=503)
        max_age = int(self.idp.behaviour.jwks_max_age)
        cache = f"public, max-age={max_age}" if max_age > 0 else "no-cache"
        return JSONResponse(self.idp.keyring.jwks(), headers={"Cache-Control": cache})


def _failed_answer(outcome: Outcome) -> Response | None:
    """The injected failure's answer when it replaces the normal one: all but the spoiled tokens."""
    if outcome.fail is None or outcome.fail in SPOILED_ANSWER_FAILURES:
        return None
    return failure_response(outcome.fail)


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, _, secret = base64.b64decode(value, validate=True).decode().partition(":")
    except ValueError:
        return None
    # RFC 6749 §2.3.1: both parts are form-urlencoded before being joined.
    return unquote_plus(client_id), unquote_plus(secret)
