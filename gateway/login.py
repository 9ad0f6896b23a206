"""OpenID Connect login run by the gateway: authorization code flow with PKCE (RFC 7636).

``GET {prefix}/login?next=/path`` sends the browser to the provider's authorization endpoint
(found through ``{issuer}/.well-known/openid-configuration``) with ``state``, ``nonce`` and an
S256 code challenge; those, with ``next``, travel in a short-lived sealed cookie (AES-GCM, so
neither readable nor forgeable). ``GET {prefix}/callback`` checks the state (once: a replayed
state is refused through the store, gateway.login_state; a 503 before the code could reach the
IdP keeps the cookie for the browser's retry), exchanges the code, verifies the ID token (signature,
issuer, audience = client_id, nonce) and the access token (an opaque one at the introspection or
userinfo endpoint, gateway.introspection; the ID token then with the discovery's ``jwks_uri`` unless
``tokens`` names keys), sets the session cookies and redirects to ``next``. Tokens never appear in
a URL (but the ID token as RP-initiated logout's ``id_token_hint``, as that spec has it), a body or
a log. With ``session.mode: server`` the tokens (the ID token too) go into a server-side session
(gateway.sessionauth) and the callback sets the session cookie alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from gateway.config import OIDCConfig
from gateway.cookies import CookieJar
from gateway.errors import CookieTooLarge, KeyFetchError, LoginFailed, StoreError
from gateway.families import Families
from gateway.identity import index_claims
from gateway.keys import JWKSKeys, KeySource
from gateway.login_state import STATE_LIFETIME, LoginRetry, States
from gateway.reasons import Reason
from gateway.responses import safe_target
from gateway.sealing import Sealer
from gateway.sessionauth import SessionAuth
from gateway.store import Store
from gateway.tokens import Verifier

log = logging.getLogger("gateway.login")

DISCOVERY_TTL = 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OIDCLogin:
    def __init__(
        self,
        *,
        config: OIDCConfig,
        jar: CookieJar,
        http: httpx.AsyncClient,
        sealer: Sealer,
        store: Store,
        verifier: Verifier,
        keys: KeySource | None,
        algorithms: tuple[str, ...],
        secure: bool,
        clock: Callable[[], float] = time.time,
        families: Families | None = None,
        logout_redirect: str = "/",
        sessions: SessionAuth | None = None,
    ) -> None:
        self._families = families
        self._sessions = sessions  # session.mode: server: one session cookie, the tokens in the store
        parts = urlsplit(config.redirect_url)
        self.after_logout = config.post_logout_redirect_url or urljoin(
            f"{parts.scheme}://{parts.netloc}/",
            safe_target(logout_redirect) if logout_redirect.startswith("/") else logout_redirect,
        )
        self._config = config
        self._jar = jar
        self._http = http
        self._sealer = sealer
        self._states = States(store, sealer)
        self._verifier = verifier
        self._keys = keys
        self._algorithms = list(algorithms)
        self._clock = clock
        self._cookie = ("__Host-" if secure else "") + "gw_oidc"
        self._cookie_attrs = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
        self._discovery: dict[str, Any] | None = None
        self._discovered_at = 0.0

    async def login(self, request: Request) -> Response:
        try:
            meta = await self.discover()
        except LoginFailed as exc:
            return _failure(exc)
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(64)
        target = safe_target(request.query_params.get("next"))
        sealed = self._sealer.seal(
            json.dumps({"s": state, "n": nonce, "v": verifier, "next": target, "t": self._clock()}).encode(),
            self._cookie,
        )
        params = {
            "response_type": "code",
            "client_id": self._config.client_id,
            "redirect_uri": self._config.redirect_url,
            "scope": " ".join(self._config.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": _b64(hashlib.sha256(verifier.encode()).digest()),
            "code_challenge_method": "S256",
        }
        location = f"{meta['authorization_endpoint']}?{urlencode(params)}"
        response = RedirectResponse(location, status_code=302, headers={"cache-control": "no-store"})
        response.headers.append(
            "set-cookie", f"{self._cookie}={_b64(sealed)}; Max-Age={STATE_LIFETIME}{self._cookie_attrs}"
        )
        return response

    async def callback(self, request: Request) -> Response:
        try:
            target, cookies = await self._complete(request)
        except LoginRetry as exc:
            return _failure(exc)  # the code never reached the IdP: the flow cookie and the state serve the retry
        except LoginFailed as exc:
            response = _failure(exc)
        else:
            response = RedirectResponse(target, status_code=302, headers={"cache-control": "no-store"})
            for cookie in cookies:
                response.headers.append("set-cookie", cookie.decode("latin-1"))
        response.headers.append("set-cookie", f"{self._cookie}=; Max-Age=0{self._cookie_attrs}")
        return response

    async def _complete(self, request: Request) -> tuple[str, list[bytes]]:
        query = request.query_params
        if "error" in query:
            log.warning("login: the provider answered error=%s", query.get("error", "")[:64])
            raise LoginFailed(400, Reason.LOGIN_REFUSED)
        flow = self._flow(request.cookies.get(self._cookie))
        state, code = query.get("state", ""), query.get("code", "")
        if not code or not hmac.compare_digest(state.encode(), str(flow["s"]).encode()):
            raise LoginFailed(400, Reason.LOGIN_STATE_INVALID)
        mine = await self._states.take(state)
        try:
            tokens = await self._exchange(code, str(flow["v"]))
        except LoginRetry:  # the code never left: the state is given back for the browser's retry
            if not await self._states.give_back(state, mine):
                raise LoginFailed(503, Reason.IDP_ERROR) from None
            raise
        access, refresh, id_token = tokens.get("access_token"), tokens.get("refresh_token"), tokens.get("id_token")
        if not isinstance(access, str) or not isinstance(id_token, str):
            raise LoginFailed(502, Reason.IDP_BAD_RESPONSE)
        id_claims = await self._check_id_token(id_token, str(flow["n"]))
        verdict = await self._verifier.verify(access)
        if verdict.claims is None:
            log.error("login: the provider's access token does not verify with tokens.* settings (%s)", verdict.reason)
            raise LoginFailed(502, Reason.IDP_BAD_RESPONSE)
        refresh = refresh if isinstance(refresh, str) and refresh else None
        if self._sessions is not None:
            claims = index_claims(verdict.claims, id_claims)
            cookie = await self._server_session(self._sessions, access, refresh, id_token, claims)
            return str(flow["next"]), [cookie]
        try:
            lifetime = self._jar.refresh_lifetime(refresh, self._clock()) if refresh else None
            cookies = self._jar.expand(self._jar.session(access, refresh, lifetime), request.headers.raw)
        except CookieTooLarge as exc:
            log.error("login: %s; no session set", exc)
            raise LoginFailed(502, Reason.COOKIE_TOO_LARGE) from None
        if self._families is not None:
            # Logout tokens name the ID token's sub and sid (OIDC Back-Channel Logout §2.4).
            sub, sid = id_claims.get("sub"), id_claims.get("sid")
            await self._families.started(
                verdict.claims,
                refresh,
                lifetime,
                sub=sub if isinstance(sub, str) else None,
                sid=sid if isinstance(sid, str) else None,
                id_token=id_token,
            )
        log.info("login: session started, subject %s", self._sealer.token_hash(str(verdict.claims.get("sub")))[:12])
        return str(flow["next"]), cookies

    async def _server_session(
        self, sessions: SessionAuth, access: str, refresh: str | None, id_token: str, claims: dict[str, Any]
    ) -> bytes:
        """session.mode server: the tokens go to the store; the browser gets the session cookie only."""
        try:
            cookie = await sessions.start(access, refresh, id_token, claims)
        except StoreError as exc:
            log.error("login: store unavailable, no session started (%s)", exc)
            raise LoginFailed(503, Reason.STORE_UNAVAILABLE) from None
        log.info("login: server-side session started, subject %s", self._sealer.token_hash(str(claims.get("sub")))[:12])
        return cookie

    def _flow(self, cookie: str | None) -> dict[str, Any]:
        if not cookie:
            raise LoginFailed(400, Reason.LOGIN_STATE_MISSING)
        try:
            raw = base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4))
            flow = json.loads(self._sealer.unseal(raw, self._cookie))
        except (StoreError, ValueError, RecursionError):
            raise LoginFailed(400, Reason.LOGIN_STATE_INVALID) from None
        if not isinstance(flow, dict) or self._clock() - float(flow.get("t", 0)) > STATE_LIFETIME:
            raise LoginFailed(400, Reason.LOGIN_STATE_EXPIRED)
        return flow

    async def _exchange(self, code: str, code_verifier: str) -> dict[str, Any]:
        """The code's tokens. Raises LoginRetry only when the code cannot have reached the IdP."""
        try:
            meta = await self.discover()
        except LoginFailed as exc:
            raise LoginRetry(exc.status, exc.reason) from None
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._config.redirect_url,
            "code_verifier": code_verifier,
            "client_id": self._config.client_id,
        }
        if self._config.client_secret:
            form["client_secret"] = self._config.client_secret
        try:
            response = await self._http.post(meta["token_endpoint"], data=form, follow_redirects=False)
        except httpx.HTTPError as exc:  # not connected: never sent; otherwise it may have been redeemed
            log.error("login: token endpoint unreachable (%s)", exc.__class__.__name__)
            unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            raise (LoginRetry if unsent else LoginFailed)(503, Reason.IDP_ERROR) from None
        try:
            body = response.json()
        except (ValueError, RecursionError):  # nested past the parser's depth is no answer either
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            log.warning("login: code exchange refused (status %d, error=%s)", response.status_code, error)
            raise LoginFailed(400 if response.status_code < 500 else 503, Reason.CODE_EXCHANGE_FAILED)
        return body

    async def _check_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(id_token)
            alg = header.get("alg")
            if alg not in self._algorithms:
                raise jwt.InvalidAlgorithmError(str(alg))
            key = await (await self.id_token_keys()).key_for(header.get("kid"), alg)
            claims = jwt.decode(
                id_token, key, algorithms=[alg], audience=self._config.client_id, issuer=self._config.issuer, leeway=60
            )
        except KeyFetchError:
            log.error("login: the ID token's key is unknown and the JWKS cannot be fetched")
            raise LoginFailed(503, Reason.KEYS_UNAVAILABLE) from None
        except (jwt.InvalidTokenError, TypeError, ValueError) as exc:
            log.error("login: ID token refused (%s)", exc.__class__.__name__)
            raise LoginFailed(502, Reason.ID_TOKEN_INVALID) from None
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            log.error("login: ID token nonce does not match")
            raise LoginFailed(400, Reason.ID_TOKEN_INVALID)
        return claims

    async def id_token_keys(self) -> KeySource:
        """The keys of ``tokens``; with opaque access tokens and no key there, the discovery's ``jwks_uri``."""
        if self._keys is None:
            jwks_uri = (await self.discover()).get("jwks_uri")
            if not isinstance(jwks_uri, str):
                log.error("login: the discovery document names no jwks_uri for the ID token's keys")
                raise LoginFailed(503, Reason.IDP_ERROR)
            self._keys = JWKSKeys(jwks_uri, self._http)  # fetched on first use, refetched on an unknown kid
        return self._keys

    async def discover(self) -> dict[str, Any]:
        if self._discovery is not None and self._clock() - self._discovered_at < DISCOVERY_TTL:
            return self._discovery
        url = self._config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            response = await self._http.get(url, follow_redirects=False)
            meta = response.json()
        except (httpx.HTTPError, ValueError, RecursionError):
            log.error("login: discovery failed at %s", url)
            raise LoginFailed(503, Reason.IDP_ERROR) from None
        if not isinstance(meta, dict) or meta.get("issuer") != self._config.issuer:
            # OIDC Discovery §4.3: the issuer in the document must be the one we asked.
            log.error("login: discovery document at %s names another issuer", url)
            raise LoginFailed(503, Reason.IDP_ERROR)
        if not all(isinstance(meta.get(k), str) for k in ("authorization_endpoint", "token_endpoint")):
            raise LoginFailed(503, Reason.IDP_ERROR)
        self._discovery, self._discovered_at = meta, self._clock()
        return meta


def _failure(exc: LoginFailed) -> Response:
    response = JSONResponse({"error": "login_failed", "reason": exc.reason}, status_code=exc.status)
    response.headers["cache-control"] = "no-store"
    if exc.status == 503:
        response.headers["retry-after"] = "5"
    return response
