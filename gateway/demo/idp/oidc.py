"""OpenID Connect for the demo IdP: discovery and the authorization code flow with PKCE.

``GET /authorize`` checks the request and shows a login form (a real browser fills it);
``POST /authorize`` checks the credentials and redirects back with a single-use code;
``POST /token`` with ``grant_type=authorization_code`` trades the code and its PKCE verifier for an
access token, a refresh token (a new rotating family, like a password login) and an ID token.
Strict like certified providers: PKCE S256 is required, redirect URIs match exactly (any loopback
URI when none are registered), and a code presented twice revokes what its first use issued.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.demo.idp.common import NO_STORE, OAuthError, oauth_tokens, read_form
from gateway.demo.idp.pages import error_page, login_page
from gateway.demo.idp.provider import Family, IdentityProvider

CODE_TTL = 60
# Redeemed codes are remembered this much longer than they live, so a late replay still revokes.
CODE_MEMORY = 600
SCOPES = ("openid", "offline_access", "profile", "email")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# RFC 7636 §4.1: 43-128 unreserved characters; an S256 challenge is a 43-character base64url SHA-256.
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class AuthorizationRequest:
    """A checked authorization request, carried through the login form in hidden fields."""

    client_id: str
    redirect_uri: str
    scope: str
    state: str | None
    nonce: str | None
    code_challenge: str

    def fields(self) -> list[tuple[str, str]]:
        """The request's parameters as the login form posts them back."""
        pairs = [("response_type", "code"), ("client_id", self.client_id), ("redirect_uri", self.redirect_uri)]
        pairs += [("scope", self.scope), ("code_challenge", self.code_challenge), ("code_challenge_method", "S256")]
        return pairs + [(k, v) for k, v in (("state", self.state), ("nonce", self.nonce)) if v is not None]


@dataclass
class AuthorizationCode:
    """A code handed to the client; ``family`` is what its first exchange issued."""

    request: AuthorizationRequest
    username: str
    auth_time: int
    expires_at: float
    redeemed: bool = False
    family: Family | None = None


class UntrustedRedirect(Exception):
    """client_id or redirect_uri is wrong: show an error page, never redirect (RFC 6749 §4.1.2.1)."""


class AuthorizeError(Exception):
    """An error reported to the client on its redirect URI (RFC 6749 §4.1.2.1)."""

    def __init__(self, error: str, description: str, redirect_uri: str, state: str | None) -> None:
        super().__init__(error)
        self.error, self.description, self.redirect_uri, self.state = error, description, redirect_uri, state


class OIDCProvider:
    """The OIDC endpoints over an ``IdentityProvider``; ``clock`` decides code expiry (tests move it)."""

    def __init__(self, idp: IdentityProvider, clock: Callable[[], float] = time.time) -> None:
        self.idp = idp
        self.clock = clock
        self.codes: dict[str, AuthorizationCode] = {}

    def routes(self) -> list[Route]:
        """The routes to add to the IdP app."""
        return [
            Route("/.well-known/openid-configuration", self.discovery, methods=["GET"]),
            Route("/authorize", self.authorize_page, methods=["GET"]),
            Route("/authorize", self.login, methods=["POST"]),
        ]

    def redirect_allowed(self, uri: str) -> bool:
        """Exact match against ``settings.redirect_uris``; with none registered, any loopback http URI."""
        registered = self.idp.settings.redirect_uris
        if registered:
            return uri in registered
        if not uri.isprintable() or " " in uri or "\\" in uri:
            return False
        try:
            parts = urlsplit(uri)
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError:
            return False
        # No userinfo (http://127.0.0.1@evil) and no fragment (RFC 6749 §3.1.2).
        no_extras = parts.username is None and parts.password is None and "#" not in uri
        return parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS and no_extras

    async def discovery(self, request: Request) -> Response:
        """OpenID Provider Metadata (OIDC Discovery §3); URLs are built from the issuer."""
        s = self.idp.settings
        base = s.issuer.rstrip("/")
        return JSONResponse(
            {
                "issuer": s.issuer,
                "authorization_endpoint": f"{base}/authorize",
                "token_endpoint": f"{base}/token",
                "jwks_uri": f"{base}/jwks",
                "revocation_endpoint": f"{base}/revoke",
                "end_session_endpoint": f"{base}/end_session",
                "backchannel_logout_supported": True,
                "backchannel_logout_session_supported": True,
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "grant_types_supported": ["authorization_code", "refresh_token", "password"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": [s.algorithm],
                "scopes_supported": list(SCOPES),
                "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
                "revocation_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
                "subject_types_supported": ["public"],
                "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "sid", "email", "name"],
            }
        )

    def parse_request(self, params: list[tuple[str, str]]) -> AuthorizationRequest:
        """Check an authorization request; raises ``UntrustedRedirect`` or ``AuthorizeError``."""
        values = dict(params)
        repeated = {k for k in values if sum(1 for key, _ in params if key == k) > 1}
        client_id, redirect_uri = values.get("client_id"), values.get("redirect_uri")
        if client_id != self.idp.settings.client_id or "client_id" in repeated:
            raise UntrustedRedirect("unknown client_id")
        if redirect_uri is None or "redirect_uri" in repeated or not self.redirect_allowed(redirect_uri):
            raise UntrustedRedirect("redirect_uri is not registered for this client")
        state = None if "state" in repeated else values.get("state")

        def fail(error: str, description: str) -> AuthorizeError:
            return AuthorizeError(error, description, redirect_uri, state)

        if repeated:  # RFC 6749 §3.1: parameters must not be repeated
            raise fail("invalid_request", f"repeated parameter: {', '.join(sorted(repeated))}")
        response_type = values.get("response_type")
        if response_type != "code":
            error = "unsupported_response_type" if response_type else "invalid_request"
            raise fail(error, "response_type must be code")
        scopes = values.get("scope", "").split()
        if "openid" not in scopes or not set(scopes) <= set(SCOPES):
            raise fail("invalid_scope", f"scope must include openid and only name {', '.join(SCOPES)}")
        challenge = values.get("code_challenge")
        if not challenge or values.get("code_challenge_method") != "S256":
            raise fail("invalid_request", "PKCE is required: code_challenge with code_challenge_method=S256")
        if not _CHALLENGE.fullmatch(challenge):
            raise fail("invalid_request", "code_challenge is not a base64url SHA-256")
        return AuthorizationRequest(client_id, redirect_uri, " ".join(scopes), state, values.get("nonce"), challenge)

    async def authorize_page(self, request: Request) -> Response:
        """``GET /authorize``: the login form, or the error (a page or a redirect)."""
        self.idp.counters.authorize_requests += 1
        try:
            auth = self.parse_request(request.query_params.multi_items())
        except (UntrustedRedirect, AuthorizeError) as exc:
            return _authorize_error(exc)
        return login_page(auth.client_id, auth.fields())

    async def login(self, request: Request) -> Response:
        """``POST /authorize`` from the login form: a code on the redirect URI, or the form again with 401."""
        try:
            form = await read_form(request)
            auth = self.parse_request([(k, v) for k, v in form.items() if k not in ("username", "password")])
        except OAuthError:
            return error_page("malformed form", 400)
        except (UntrustedRedirect, AuthorizeError) as exc:
            return _authorize_error(exc)
        if "username" not in form and "password" not in form:
            # OIDC Core §3.1.2.1: the authorization request may itself come as a POST.
            self.idp.counters.authorize_requests += 1
            return login_page(auth.client_id, auth.fields())
        username = form.get("username", "")
        user = self.idp.settings.users.get(username)
        if user is None or not hmac.compare_digest(user["password"], form.get("password", "")):
            return login_page(auth.client_id, auth.fields(), username, "Invalid username or password.", 401)
        self.idp.counters.logins += 1
        now = self.clock()
        self._prune(now)
        code = secrets.token_urlsafe(32)
        self.codes[code] = AuthorizationCode(auth, username, int(now), now + CODE_TTL)
        return _redirect(auth.redirect_uri, {"code": code, "state": auth.state})

    def _prune(self, now: float) -> None:
        for value in [v for v, code in self.codes.items() if code.expires_at + CODE_MEMORY < now]:
            del self.codes[value]

    async def exchange(self, form: dict[str, str]) -> Response:
        """``grant_type=authorization_code`` from an authenticated client (RFC 6749 §4.1.3, RFC 7636 §4.6)."""
        self.idp.counters.code_exchanges += 1
        value, verifier, redirect_uri = form.get("code"), form.get("code_verifier"), form.get("redirect_uri")
        if not value or not verifier or not redirect_uri:
            raise OAuthError("invalid_request")
        now = self.clock()
        self._prune(now)
        code = self.codes.get(value)
        if code is None:
            raise OAuthError("invalid_grant")
        if code.redeemed:
            # RFC 6749 §4.1.2: a code used twice is stolen or leaked; revoke what it issued.
            if code.family is not None:
                self.idp.revoke_family(code.family, "reuse")
            raise OAuthError("invalid_grant")
        # Burnt by its first presentation, right or wrong, so a verifier cannot be guessed at leisure.
        code.redeemed = True
        auth = code.request
        if (
            now >= code.expires_at
            or form.get("client_id", auth.client_id) != auth.client_id
            or redirect_uri != auth.redirect_uri
            or not _pkce_matches(verifier, auth.code_challenge)
        ):
            raise OAuthError("invalid_grant")
        # One IdP login session per code: its sid is in the ID token and every access token of the family.
        pair = self.idp.start_session(code.username, {"sid": secrets.token_hex(16)})
        code.family = pair.family
        body = {
            "access_token": pair.access,
            "refresh_token": pair.refresh,
            "id_token": self.id_token(code, pair.access),
            "scope": auth.scope,
        }
        return oauth_tokens(body, pair.expires_in)

    def id_token(self, code: AuthorizationCode, access_token: str) -> str:
        """The ID token (OIDC Core §2), signed like the access tokens."""
        s = self.idp.settings
        now = int(self.clock() + self.idp.behaviour.clock_skew)
        claims: dict[str, Any] = {
            "iss": s.issuer,
            "sub": code.username,
            "aud": code.request.client_id,
            "azp": code.request.client_id,
            "iat": now,
            "exp": now + s.access_ttl,
            "auth_time": code.auth_time,
            "at_hash": _at_hash(access_token),
            "jti": secrets.token_hex(16),
        }
        if code.family is not None and "sid" in code.family.claims:
            claims["sid"] = code.family.claims["sid"]
        if code.request.nonce is not None:
            claims["nonce"] = code.request.nonce
        user = s.users.get(code.username)
        profile = user["claims"] if user else {}
        claims |= {k: profile[k] for k in ("email", "name") if k in profile}
        if "email" in claims:
            claims["email_verified"] = True
        return self.idp.sign(claims)


def _pkce_matches(verifier: str, challenge: str) -> bool:
    if not _VERIFIER.fullmatch(verifier):
        return False
    return hmac.compare_digest(_b64url(hashlib.sha256(verifier.encode()).digest()), challenge)


def _at_hash(access_token: str) -> str:
    # OIDC Core §3.1.3.6: left half of the hash that matches the signing alg (SHA-256 for RS256 and HS256).
    return _b64url(hashlib.sha256(access_token.encode()).digest()[:16])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _redirect(uri: str, params: dict[str, str | None]) -> Response:
    # A query already in a registered redirect URI is kept (RFC 6749 §3.1.2); 302, so the browser GETs it.
    query = urlencode({k: v for k, v in params.items() if v is not None})
    separator = "&" if urlsplit(uri).query else "?"
    return RedirectResponse(f"{uri}{separator}{query}", status_code=302, headers=NO_STORE)


def _authorize_error(exc: UntrustedRedirect | AuthorizeError) -> Response:
    if isinstance(exc, UntrustedRedirect):
        return error_page(str(exc), 400)
    return _redirect(exc.redirect_uri, {"error": exc.error, "error_description": exc.description, "state": exc.state})
