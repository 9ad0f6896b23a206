"""A strict identity provider that rotates refresh tokens and detects their reuse.

It speaks two dialects: OAuth 2.0 (RFC 6749 ``POST /token``, RFC 7009 ``POST /revoke``) and
Django SimpleJWT (``POST /api/token/``, ``POST /api/token/refresh/``), and is an OpenID Connect
provider (discovery, code + PKCE login) through ``gateway.demo.idp.oidc``. Every refresh token may be
redeemed once; presenting a redeemed one revokes its whole family, as node-oidc-provider and
SimpleJWT with BLACKLIST_AFTER_ROTATION do (RFC 9700 §4.14.2), unless a reuse window lets the
previous token be redeemed again for a while (Auth0's reuse interval, Okta's grace period).
``/_admin/*`` lets tests count calls, read the redemption ledger, inject failures (before or after
redeeming, ``gateway.demo.idp.faults``), roll the signing key over, skew the clock and mint sessions.
State lives in memory: one process, one event loop.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import unquote_plus

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.demo.idp.common import NO_STORE, OAuthError, bad_request, oauth_tokens, read_form, read_json
from gateway.demo.idp.faults import (
    CONSUMING_FAILURES,
    SPOILED_ANSWER_FAILURES,
    Keyring,
    Ledger,
    LedgerEvent,
    failure_response,
)
from gateway.demo.idp.settings import IdPSettings, SigningKey, new_rsa_key


@dataclass
class Counters:
    refresh_calls: int = 0
    refresh_ok: int = 0
    refresh_rejected: int = 0
    reuse_detected: int = 0
    families_revoked: int = 0
    logins: int = 0  # password grant, SimpleJWT login and the OIDC login form
    revocations: int = 0
    authorize_requests: int = 0  # GET /authorize, valid or not
    code_exchanges: int = 0  # grant_type=authorization_code requests from an authenticated client
    jwks_requests: int = 0  # GET /jwks and /.well-known/jwks.json, up or down


@dataclass
class Family:
    """One login's chain of refresh tokens; only ``current`` may be redeemed (and ``previous`` in a reuse window)."""

    id: str
    username: str
    claims: dict[str, Any]
    current: str = ""
    revoked: bool = False
    revoked_reason: Literal["reuse", "revocation"] | None = None
    previous: str | None = None  # the token the last rotation redeemed
    rotated_at: float = 0.0  # time.monotonic() of that rotation
    issued: list[str] = field(default_factory=list)  # every refresh jti, oldest first

    def summary(self) -> dict[str, Any]:
        keys = ("id", "username", "current", "previous", "revoked", "revoked_reason", "issued")
        return {k: getattr(self, k) for k in keys}


@dataclass
class TokenPair:
    access: str
    refresh: str
    expires_in: int
    family: Family


@dataclass
class Outcome:
    """What a refresh request produced: tokens (None when rejected) and an injected failure to render."""

    pair: TokenPair | None
    fail: str | None = None


class IdentityProvider:
    """The IdP's state and endpoints."""

    def __init__(self, settings: IdPSettings) -> None:
        self.settings = settings
        self.counters = Counters()
        self.behaviour = settings.behaviour()
        self.ledger = Ledger()
        self.families: dict[str, Family] = {}
        self._redeem_lock = asyncio.Lock()
        self.keyring = Keyring(settings.kid, settings.rsa_key)  # RS256 only
        self._rogue_key: SigningKey | None = None  # signs the "bad_signature" tokens
        # Answers grant_type=authorization_code once the client is authenticated (``gateway.demo.idp.oidc``).
        self.code_grant: Callable[[dict[str, str]], Awaitable[Response]] | None = None

    def now(self) -> float:
        """The IdP's clock: the time plus ``clock_skew``; what issued tokens' iat/exp are based on."""
        return time.time() + self.behaviour.clock_skew

    def sign(self, claims: dict[str, Any], key: SigningKey | None = None) -> str:
        """A JWT over ``claims`` with the IdP's current key (or ``key``), alg and kid."""
        rs256 = self.settings.algorithm == "RS256"
        headers = {"typ": "JWT"} | ({"kid": self.keyring.kid} if rs256 else {})
        signing_key = key or (self.keyring.keys[self.keyring.kid] if rs256 else self.settings.hs_secret)
        return jwt.encode(claims, signing_key, algorithm=self.settings.algorithm, headers=headers)

    def _access(self, family: Family, ttl: int, key: SigningKey | None = None) -> str:
        now = int(self.now())
        user = self.settings.users.get(family.username)
        claims: dict[str, Any] = {"iss": self.settings.issuer, "sub": family.username, "iat": now, "exp": now + ttl}
        if self.behaviour.clock_skew:
            claims["nbf"] = now
        if self.settings.audience is not None:
            claims["aud"] = self.settings.audience
        claims |= {"jti": uuid.uuid4().hex, "token_type": "access"}
        return self.sign(claims | (user["claims"] if user else {}) | family.claims, key)

    def _issue(self, family: Family, access_ttl: int | None = None) -> TokenPair:
        """Sign a new pair; the new refresh token becomes the family's current one."""
        now = int(self.now())
        family.current = uuid.uuid4().hex
        family.issued.append(family.current)
        refresh = self.sign(
            {
                "iss": self.settings.issuer,
                "sub": family.username,
                "iat": now,
                "exp": now + self.settings.refresh_ttl,
                "jti": family.current,
                "token_type": "refresh",
                "fam": family.id,
            }
        )
        ttl = self.settings.access_ttl if access_ttl is None else access_ttl
        return TokenPair(self._access(family, ttl), refresh, ttl, family)

    def start_session(self, username: str, claims: dict[str, Any] | None = None, ttl: int | None = None) -> TokenPair:
        """Log ``username`` in: a new family. ``claims`` override the user's in every access token it gets."""
        family = Family(uuid.uuid4().hex, username, dict(claims or {}))
        self.families[family.id] = family
        return self._issue(family, ttl)

    def _decode(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this IdP signed (with any of its keys), expired or not."""
        try:
            key: str | rsa.RSAPublicKey = self.settings.hs_secret
            if self.settings.algorithm == "RS256":
                kid = jwt.get_unverified_header(token).get("kid", self.keyring.kid)
                key = self.keyring.keys[kid].public_key()
            return jwt.decode(
                token,
                key,
                algorithms=[self.settings.algorithm],
                issuer=self.settings.issuer,
                # The caller checks exp, on the IdP's (maybe skewed) clock; iat and nbf are not checked.
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "require": ["exp", "jti", "sub"],
                },
            )
        except (jwt.InvalidTokenError, KeyError, TypeError):  # TypeError: a kid that is not a string
            return None

    def _refresh_claims(self, token: str | None) -> dict[str, Any] | None:
        """The claims of one of this IdP's refresh tokens (expired or not), else None."""
        claims = self._decode(token) if token else None
        return claims if claims is not None and claims.get("token_type") == "refresh" else None

    def revoke_family(self, family: Family, reason: Literal["reuse", "revocation"] = "revocation") -> None:
        """End a login: none of the family's refresh tokens can be redeemed any more."""
        if not family.revoked:
            family.revoked, family.revoked_reason = True, reason
            self.counters.families_revoked += 1

    def _log(self, claims: dict[str, Any] | None, event: LedgerEvent) -> None:
        jti, family = (str(claims["jti"]), str(claims.get("fam"))) if claims else (None, None)
        self.ledger.record(jti, family, event)

    def _redeem(self, claims: dict[str, Any] | None) -> TokenPair | None:
        family = self.families.get(str(claims.get("fam"))) if claims else None
        if claims is None or family is None or family.revoked or int(claims["exp"]) <= self.now():
            self._log(claims, "rejected")
            return None
        b, now = self.behaviour, time.monotonic()
        if claims["jti"] == family.current:
            family.previous, family.rotated_at = family.current, now
            self._log(claims, "redeemed")
            return self._issue(family)
        if claims["jti"] == family.previous and b.reuse_window > 0 and now - family.rotated_at <= b.reuse_window:
            # Inside the reuse window the previous token buys another pair; what the first redemption
            # issued is no longer current. The window stays anchored at that first redemption.
            self._log(claims, "reused_in_window")
            return self._issue(family)
        # A token of this family that is no longer current was redeemed before: someone holds a
        # copy, so end the session for everyone (RFC 9700 §4.14.2), unless told to only refuse it.
        self.counters.reuse_detected += 1
        self._log(claims, "reused")
        if b.reuse_revokes_family:
            self.revoke_family(family, "reuse")
        return None

    def _take_failure(self) -> str | None:
        b = self.behaviour
        if b.fail is None:
            return None
        fail = b.fail
        if b.fail_count is not None:
            b.fail_count -= 1
            if b.fail_count <= 0:
                b.fail, b.fail_count = None, None
        return fail

    async def refresh(self, presented: str | None) -> Outcome:
        """Redeem a refresh token, honouring injected latency and failures; every call is in the ledger."""
        # Decided on arrival, so concurrent requests meet failures in the order they came.
        fail = self._take_failure()
        claims = self._refresh_claims(presented)
        consuming = fail is None or fail in CONSUMING_FAILURES
        if not consuming:
            self._log(claims, "failed")
        if self.behaviour.latency > 0:
            await asyncio.sleep(self.behaviour.latency)
        if fail == "timeout":
            await asyncio.sleep(3600)
        if not consuming:
            return Outcome(None, fail)
        # The lock makes "is it current? then rotate" one step even if redemption ever awaits,
        # so of two simultaneous redemptions exactly one wins and the other is reuse.
        async with self._redeem_lock:
            pair = self._redeem(claims)
        if pair is None:
            self.counters.refresh_rejected += 1
        else:
            self.counters.refresh_ok += 1
        if fail == "redeem_then_hang":
            await asyncio.sleep(3600)
        return Outcome(pair, fail)

    def failure_response(self, fail: str) -> Response:
        return failure_response(fail)

    def _failed_answer(self, outcome: Outcome) -> Response | None:
        """The injected failure's answer when it replaces the normal one: all but the spoiled tokens."""
        if outcome.fail is None or outcome.fail in SPOILED_ANSWER_FAILURES:
            return None
        return failure_response(outcome.fail)

    def tokens_body(self, pair: TokenPair, fail: str | None, access_key: str, refresh_key: str) -> dict[str, Any]:
        """The success body, spoiled as the injected ``no_access`` / ``bad_signature`` failure asks."""
        body: dict[str, Any] = {access_key: pair.access, refresh_key: pair.refresh}
        if fail == "no_access":
            del body[access_key]
        elif fail == "bad_signature":
            if self._rogue_key is None:
                rs256 = self.settings.algorithm == "RS256"
                self._rogue_key = new_rsa_key() if rs256 else "a-different-secret-that-nobody-trusts!"
            body[access_key] = self._access(pair.family, pair.expires_in, self._rogue_key)
        return body

    def _client_ok(self, request: Request, form: dict[str, str]) -> bool:
        s = self.settings
        basic = _basic_credentials(request)
        posted = (form.get("client_id"), form.get("client_secret"))
        if s.client_auth == "none":
            return form.get("client_id", s.client_id) == s.client_id
        if basic is not None and s.client_auth in ("basic", "any"):
            return basic == (s.client_id, s.client_secret)
        if basic is None and posted[1] is not None and s.client_auth in ("post", "any"):
            return posted == (s.client_id, s.client_secret)
        return False

    async def token(self, request: Request) -> Response:
        try:
            form = await read_form(request)
            grant = form.get("grant_type")
            if grant == "refresh_token":
                self.counters.refresh_calls += 1
            if not self._client_ok(request, form):
                if grant == "refresh_token":
                    self.counters.refresh_rejected += 1
                    self._log(self._refresh_claims(form.get("refresh_token")), "rejected")
                raise OAuthError("invalid_client", 401)
            if grant == "password":
                user = self.settings.users.get(form.get("username", ""))
                if user is None or user["password"] != form.get("password"):
                    raise OAuthError("invalid_grant")
                self.counters.logins += 1
                pair = self.start_session(form["username"])
                return oauth_tokens({"access_token": pair.access, "refresh_token": pair.refresh}, pair.expires_in)
            if grant == "authorization_code" and self.code_grant is not None:
                return await self.code_grant(form)
            if grant != "refresh_token":
                raise OAuthError("unsupported_grant_type" if grant else "invalid_request")
            outcome = await self.refresh(form.get("refresh_token"))
        except OAuthError as exc:
            headers = {"WWW-Authenticate": 'Basic realm="idp"'} if exc.status == 401 else {}
            return JSONResponse({"error": exc.error}, status_code=exc.status, headers=NO_STORE | headers)
        if (failed := self._failed_answer(outcome)) is not None:
            return failed
        if outcome.pair is None:
            return JSONResponse({"error": "invalid_grant"}, status_code=400, headers=NO_STORE)
        body = self.tokens_body(outcome.pair, outcome.fail, "access_token", "refresh_token")
        return oauth_tokens(body, outcome.pair.expires_in)

    async def simplejwt_login(self, request: Request) -> Response:
        body = await read_json(request)
        username, password = body.get("username"), body.get("password")
        user = self.settings.users.get(username) if isinstance(username, str) else None
        if user is None or user["password"] != password:
            return JSONResponse({"detail": "No active account found with the given credentials"}, status_code=401)
        self.counters.logins += 1
        pair = self.start_session(cast(str, username))
        return JSONResponse({"access": pair.access, "refresh": pair.refresh})

    async def simplejwt_refresh(self, request: Request) -> Response:
        self.counters.refresh_calls += 1
        presented = (await read_json(request)).get("refresh")
        outcome = await self.refresh(presented if isinstance(presented, str) else None)
        if (failed := self._failed_answer(outcome)) is not None:
            return failed
        if outcome.pair is None:
            return JSONResponse({"detail": "Token is invalid or expired", "code": "token_not_valid"}, status_code=401)
        return JSONResponse(self.tokens_body(outcome.pair, outcome.fail, "access", "refresh"))

    async def revoke(self, request: Request) -> Response:
        try:
            form = await read_form(request)
            if not self._client_ok(request, form):
                raise OAuthError("invalid_client", 401)
            if "token" not in form:
                raise OAuthError("invalid_request")
        except OAuthError as exc:
            return JSONResponse({"error": exc.error}, status_code=exc.status)
        self.counters.revocations += 1
        # Expired tokens may still be revoked; unknown or invalid ones are ignored (RFC 7009 §2.2).
        # Access tokens are accepted but change nothing: they are self-contained and short-lived.
        # With revoke_used false, a token already used is all that is revoked (SimpleJWT's blacklist),
        # which changes nothing here: it could not be redeemed anyway.
        claims = self._refresh_claims(form["token"])
        family = self.families.get(str(claims.get("fam"))) if claims else None
        if (
            claims is not None
            and family is not None
            and (self.behaviour.revoke_used or claims["jti"] == family.current)
        ):
            self.revoke_family(family)
        return Response(status_code=200)

    async def jwks(self, request: Request) -> Response:
        self.counters.jwks_requests += 1
        if self.behaviour.jwks == "down":
            return PlainTextResponse("Service Unavailable", status_code=503)
        return JSONResponse(self.keyring.jwks())

    async def admin_stats(self, request: Request) -> Response:
        return JSONResponse(dataclasses.asdict(self.counters))

    async def admin_behaviour(self, request: Request) -> Response:
        error = self.behaviour.update(await read_json(request))
        if error is not None:
            return bad_request(error)
        return JSONResponse(dataclasses.asdict(self.behaviour))

    async def admin_reset(self, request: Request) -> Response:
        """Zero the counters, clear the ledger and return to the start-up behaviour (keys and families stay)."""
        self.counters = Counters()
        self.behaviour = self.settings.behaviour()
        self.ledger.clear()
        return JSONResponse({"ok": True})

    async def admin_ledger(self, request: Request) -> Response:
        return JSONResponse({"entries": list(self.ledger.entries)})

    async def admin_families(self, request: Request) -> Response:
        return JSONResponse({"families": [family.summary() for family in self.families.values()]})

    async def admin_rotate_key(self, request: Request) -> Response:
        """``{"drop_old": bool}``: a new signing key and kid; answers ``{"kid", "published"}``."""
        drop_old = (await read_json(request)).get("drop_old", False)
        if not isinstance(drop_old, bool):
            return bad_request("drop_old must be a boolean")
        if self.settings.algorithm != "RS256":
            return bad_request("key rollover needs algorithm RS256")
        key = await asyncio.to_thread(new_rsa_key)  # ~0.1 s of CPU: keep answering meanwhile
        kid = self.keyring.rotate(key, drop_old)
        return JSONResponse({"kid": kid, "published": self.keyring.published})

    async def admin_issue(self, request: Request) -> Response:
        body = await read_json(request)
        username, ttl, claims = body.get("username"), body.get("access_ttl"), body.get("claims") or {}
        if not isinstance(username, str) or not (ttl is None or isinstance(ttl, int)) or not isinstance(claims, dict):
            return JSONResponse({"error": "need username (str), access_ttl (int|null), claims (object)"}, 400)
        pair = self.start_session(username, claims, ttl)
        return JSONResponse({"access": pair.access, "refresh": pair.refresh})


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


def create_idp_app(settings: IdPSettings) -> Starlette:
    """The IdP as an ASGI app; its state is ``app.state.idp`` (an ``IdentityProvider``) and ``app.state.oidc``."""
    # Imported here because gateway.demo.idp.oidc builds on this module.
    from gateway.demo.idp.oidc import OIDCProvider

    idp = IdentityProvider(settings)
    oidc = OIDCProvider(idp)
    idp.code_grant = oidc.exchange
    routes = [
        Route("/token", idp.token, methods=["POST"]),
        Route("/revoke", idp.revoke, methods=["POST"]),
        Route("/api/token/", idp.simplejwt_login, methods=["POST"]),
        Route("/api/token/refresh/", idp.simplejwt_refresh, methods=["POST"]),
        Route("/jwks", idp.jwks, methods=["GET"]),
        Route("/.well-known/jwks.json", idp.jwks, methods=["GET"]),
        Route("/_admin/stats", idp.admin_stats, methods=["GET"]),
        Route("/_admin/behaviour", idp.admin_behaviour, methods=["POST"]),
        Route("/_admin/reset", idp.admin_reset, methods=["POST"]),
        Route("/_admin/issue", idp.admin_issue, methods=["POST"]),
        Route("/_admin/ledger", idp.admin_ledger, methods=["GET"]),
        Route("/_admin/families", idp.admin_families, methods=["GET"]),
        Route("/_admin/rotate_key", idp.admin_rotate_key, methods=["POST"]),
        *oidc.routes(),
    ]
    app = Starlette(routes=routes)
    app.state.idp, app.state.oidc = idp, oidc
    return app
