"""The request path for one generation of gateway.yaml: everything built from the config.

    request -> internal endpoint?  (under server.prefix: health, ready, metrics, logout,
                                    and with login.oidc: login, callback)
            -> canonical path      (routing.canonical_path; ambiguous paths are 400)
            -> route match         (routing.RouteTable; none is 404)
            -> CSRF                (csrf.CSRFGuard on unsafe requests riding the session cookie; 403)
            -> authenticate        (credentials.Authenticator: cookie / Bearer, verify, denylist, refresh)
            -> authorise           (identity.claims_allowed on route.require; 403)
            -> rewrite headers     (headers.HeaderRules, then identity headers injected)
            -> forward, streamed   (proxy.Forwarder; 502 / 504)
            -> response            (+ Set-Cookie for rotated or cleared cookies; capture.Capturer
                                    turns a login route's JSON tokens into cookies)

A ``Pipeline`` is immutable once built; a config reload builds a new one and swaps it in, so a
request runs start to finish under one config. What outlives reloads (store, HTTP clients,
denylist, metrics) is ``Shared``. The hot path is plain ASGI with direct ``send`` calls;
Starlette serves only the internal endpoints, where its conveniences cost nothing that matters.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount
from starlette.routing import Route as Endpoint
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from yarl import URL

from gateway.authn import Authenticator, AuthResult, bearer_token
from gateway.capture import Capturer, wants_capture
from gateway.config import GatewayConfig
from gateway.cookies import CookieJar
from gateway.csrf import CSRFGuard
from gateway.denylist import Denylist
from gateway.errors import StoreError
from gateway.families import Families
from gateway.forwarder import Forwarder, UpstreamFailure, chunks, upstream_url
from gateway.headers import HeaderRules
from gateway.identity import IdentityHeaders, UnsafeClaim, claims_allowed
from gateway.idp_client import IdPClient
from gateway.keys import build_key_source
from gateway.login import OIDCLogin
from gateway.logout import Logout
from gateway.metrics import Metrics
from gateway.reasons import Reason
from gateway.refresh import SessionRefresher
from gateway.responses import NO_STORE, login_location, safe_next, send_denial, status_for, wants_html
from gateway.routing import BadPath, Route, RouteTable, canonical_path, host_name
from gateway.sealing import Sealer
from gateway.store import Store
from gateway.tokens import Verifier
from gateway.tracing import Tracer
from gateway.tunnel import Slot, Sockets, Tunnel, as_http, connect_upstream, relay
from gateway.types import Receive, Scope, Send, StrHeaders

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

_CACHE_SIZE = 10_000
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestInfo:
    """What the access log line says about one request, filled in along the path."""

    __slots__ = ("request_id", "request_id_from_client", "reason", "upstream", "subject", "refreshed", "answered")

    def __init__(self) -> None:
        self.request_id = ""
        self.request_id_from_client = False
        self.reason: str | None = None
        self.upstream: float | None = None
        self.subject: Any = None
        self.refreshed = False
        self.answered: float | None = None  # WebSockets: perf_counter() when the handshake was answered


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestIds:
    """New request IDs: a random prefix per process and a counter (unique, and cheap to make)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFF:08x}"


class Known(NamedTuple):
    """A token seen valid before, with what the request path needs from it (see Pipeline._proxy)."""

    claims: dict[str, Any]
    fresh_until: float  # exp - the refresh margin (Verifier.refresh_margin): after this, the full path decides
    jti: Any
    identity: list[tuple[str, str]]
    token: str


class ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


@dataclass(frozen=True)
class Shared:
    """What every config generation uses and a reload keeps: connections, shared state, counters."""

    store: Store
    http: httpx.AsyncClient  # control plane (JWKS, IdP, OIDC); never follows redirects
    forwarder: Forwarder
    denylist: Denylist
    metrics: Metrics
    sealer: Sealer
    clock: Callable[[], float]
    request_ids: RequestIds
    sockets: Sockets
    families: Families


class Pipeline:
    """One config generation's request path. Build with ``Pipeline(config, shared)``, then ``start()``."""

    def __init__(self, config: GatewayConfig, shared: Shared) -> None:
        clock = shared.clock
        self.config = config
        self.shared = shared
        self.metrics = shared.metrics
        self.store = shared.store
        self.denylist = shared.denylist
        self.forwarder = shared.forwarder
        self.http = shared.http
        self.prefix = config.server.prefix
        self._access_log = config.server.access_log
        self.tracer = Tracer(config.server.tracing)
        self.routes = RouteTable.from_config(config.routes)
        self.jar = CookieJar.from_config(config.cookies)
        self.identity = IdentityHeaders(config.identity.headers)
        self.header_rules = HeaderRules(
            strip_patterns=config.identity.strip_inbound,
            identity_names=self.identity.names,
            cookie_names=self.jar.bare_names,
            trusted_proxies=config.server.trusted_proxies,
        )
        self._paths: dict[bytes, tuple[str, str]] = {}  # raw path -> canonical forms
        self._urls: dict[tuple[str, str], URL] = {}  # (route, canonical path) -> upstream URL, no query
        # Authorization header value (bytes) or access cookie (str) -> a token verified before.
        self._known: dict[bytes | str, Known] = {}
        self._forward_token = config.identity.forward_token
        self._request_ids = shared.request_ids
        self.keys = build_key_source(config.tokens, self.http, on_fetch=self.metrics.jwks_fetch)
        self.verifier = Verifier(config.tokens, self.keys, clock, denied=self.denylist)
        sealer = shared.sealer
        self.refresher: SessionRefresher | None = None
        if config.refresh.endpoint is not None:
            self.refresher = SessionRefresher(
                config=config.refresh,
                store=self.store,
                sealer=sealer,
                idp=IdPClient(config.refresh, self.http),
                verifier=self.verifier,
                jar=self.jar,
                metrics=self.metrics,
                clock=clock,
                denylist=self.denylist if config.tokens.revoke_superseded else None,
                families=shared.families,
            )
        self.authenticator = Authenticator(self.verifier, self.jar, self.refresher)
        self.csrf = CSRFGuard(config.csrf.allowed_origins)
        self.capturer = Capturer(self.jar, self.verifier, clock, shared.families)
        endpoints = [
            Endpoint("/health", self._health),
            Endpoint("/ready", self._ready),
            Endpoint("/metrics", self._metrics),
            Endpoint("/logout", self._logout_endpoint().handle, methods=["POST"]),
        ]
        self.login_url = config.login.url
        if config.login.oidc is not None:
            oidc = OIDCLogin(
                config=config.login.oidc,
                jar=self.jar,
                http=self.http,
                sealer=sealer,
                store=self.store,
                verifier=self.verifier,
                keys=self.keys,
                algorithms=config.tokens.algorithms,
                secure=config.cookies.secure,
                clock=clock,
                families=shared.families,
            )
            endpoints += [Endpoint("/login", oidc.login), Endpoint("/callback", oidc.callback)]
            self.login_url = f"{self.prefix}/login?next={{next}}"
        self.internal = Starlette(routes=[Mount(self.prefix, routes=endpoints)])

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        """Let this generation's refreshes finish (they hold locks and redeemed tokens)."""
        if self.refresher is not None:
            await self.refresher.close()

    def _logout_endpoint(self) -> Logout:
        return Logout(
            jar=self.jar,
            verifier=self.verifier,
            denylist=self.denylist,
            refresher=self.refresher,
            csrf=self.csrf,
            origin=self._origin,
            redirect=self.config.logout.redirect,
        )

    def _origin(self, scope: Scope) -> str:
        """This request's own origin, as the browser sees it (forwarded headers from trusted proxies)."""
        client = scope.get("client")
        return self.header_rules.origin(scope["headers"], client[0] if client else None, scope.get("scheme", "http"))

    # --- request path ---------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        prefix = self.prefix
        if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            await self.internal(scope, receive, send)
            return
        started = time.perf_counter()
        scope["gateway"] = info = RequestInfo()
        if self.tracer.enabled:
            with self.tracer.span("gateway.request", method=scope["method"]) as span:
                route_name, status = await self._proxy(scope, receive, send)
                span.set_attribute("gateway.route", route_name)
                span.set_attribute("http.response.status_code", status)
        else:
            route_name, status = await self._proxy(scope, receive, send)
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        elapsed = time.perf_counter() - started
        self.metrics.request(route_name, method, status, elapsed)
        if self._access_log:
            self._log_access(scope, info, route_name, status, elapsed)

    def _log_access(self, scope: Scope, info: RequestInfo, route: str, status: int, elapsed: float) -> None:
        """One JSON line per request; the path without its query (queries carry secrets), the subject hashed."""
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": info.request_id,
            "route": route,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "upstream_ms": round(info.upstream * 1000, 2) if info.upstream is not None else None,
            "outcome": info.reason or ("refreshed" if info.refreshed else "ok"),
            "subject": self.shared.sealer.token_hash(str(info.subject))[:16] if info.subject is not None else None,
        }
        access_log.info(json.dumps(record, separators=(",", ":")))

    def _remember(self, key: bytes | str, auth: AuthResult, claims: dict[str, Any], identity: StrHeaders) -> None:
        """Keep a plainly valid token for the fast path: same token, same claims, same headers."""
        if auth.exp is None or auth.token is None:
            return
        if len(self._known) >= _CACHE_SIZE:
            self._known.clear()  # bounded: a flood of distinct tokens cannot grow it
        fresh_until = auth.exp - self.verifier.refresh_margin(claims, auth.exp)
        self._known[key] = Known(claims, fresh_until, claims.get("jti"), identity, auth.token)

    def _admit(self, route: Route, claims: dict[str, Any]) -> tuple[Reason | None, StrHeaders]:
        """The route's claim rules, then the identity headers: (reason, []) when refused."""
        if route.require and not claims_allowed(claims, route.require):
            return Reason.CLAIMS_DENIED, []
        try:
            return None, [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.identity.build(claims)]
        except UnsafeClaim as exc:
            log.warning("route %s: claim %s holds CR, LF or NUL; refusing", route.name, exc)
            return Reason.CLAIM_UNSAFE, []

    def _upstream_headers(
        self,
        scope: Scope,
        host: bytes | None,
        identity: StrHeaders,
        info: RequestInfo,
        token: str | None,
        *,
        connection: bool = True,
        client_request_id: bool = True,
    ) -> StrHeaders:
        """The request's headers as the upstream gets them: filtered, then identity and request ID added.

        ``token`` is the verified access token (None without one); it goes upstream with identity.forward_token.
        ``connection`` / ``client_request_id`` False say the request has no Connection / X-Request-ID
        header, which saves looking (the hot path knows from its own pass over the headers).
        """
        client = scope.get("client")
        out = self.header_rules.inbound(
            scope["headers"],
            client=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            host=host,
            connection=connection,
        )
        out.extend(identity)
        if not info.request_id_from_client:
            if client_request_id and any(n == "x-request-id" for n, _ in out):  # the client's was not sane: replaced
                out = [(n, v) for n, v in out if n != "x-request-id"]
            out.append(("x-request-id", info.request_id))
        if self._forward_token and token:
            out = [(n, v) for n, v in out if n != "authorization"]
            out.append(("authorization", "Bearer " + token))
        return out

    def _cross_site(self, scope: Scope) -> bool:
        """An unsafe request riding on the session cookie from another site (see gateway.csrf)."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return False
        headers = scope["headers"]
        if bearer_token(headers) is not None or self.jar.read(headers) == (None, None):
            return False
        refused: bool = self.csrf.refuses(scope["method"], headers, self._origin(scope))
        return refused

    async def _deny(
        self, send: Send, scope: Scope, reason: Reason, route: Route | None, cookies: list[bytes] | None = None
    ) -> int:
        html = wants_html(scope["method"], scope["headers"])
        login = self._login_location(scope)
        headers = [(b"set-cookie", c) for c in cookies or []]
        info: RequestInfo | None = scope.get("gateway")
        if info is not None:
            info.reason = reason
            headers.append((b"x-request-id", info.request_id.encode()))
        self.metrics.denial(reason)
        log.info("denied %s %s route=%s reason=%s", scope["method"], scope["path"], route and route.name, reason)
        name = route.name if route else None
        await send_denial(send, reason, html=html, route=name, headers=headers, login_url=login)
        status = status_for(reason)[0]
        return 302 if status == 401 and html and login else status

    def _login_location(self, scope: Scope) -> str | None:
        if not self.login_url:
            return None
        return login_location(self.login_url, safe_next(scope["path"], scope["query_string"]))

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> tuple[str, int]:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        info: RequestInfo = scope["gateway"]
        host: bytes | None = None
        authorization: bytes | None = None
        request_id: bytes | None = None
        has_body = cookies = connection = False
        for name, value in headers:  # one pass for what the path below needs
            if name == b"host":
                host = value
            elif name == b"authorization":
                authorization = b"" if authorization is not None else value  # b"": more than one
            elif name == b"cookie":
                cookies = True
            elif name == b"content-length":
                has_body = value.strip() != b"0"
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"x-request-id" and request_id is None:
                request_id = value
            elif name == b"connection":
                connection = True
        if request_id is not None and _REQUEST_ID.fullmatch(request_id):
            info.request_id, info.request_id_from_client = request_id.decode("ascii"), True
        else:
            info.request_id = self._request_ids()  # the client's, when sane, so traces join up

        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        canonical = self._paths.get(raw_path)
        if canonical is None:
            try:
                canonical = canonical_path(raw_path)
            except BadPath:
                return "-", await self._deny(send, scope, Reason.BAD_PATH, None)
            if len(self._paths) >= _CACHE_SIZE:
                self._paths.clear()  # bounded: a scan of unique URLs cannot grow it
            self._paths[raw_path] = canonical
        decoded, path = canonical
        route = self.routes.match(host_name(host) if host and self.routes.by_host else None, decoded)
        if route is None:
            return "-", await self._deny(send, scope, Reason.NO_ROUTE, None)

        auth: AuthResult | None = None
        set_cookies: list[bytes] | None = None
        claims: dict[str, Any] | None = None
        identity: StrHeaders = []
        token: str | None = None
        if route.auth != "none":
            if scope["method"] not in _SAFE_METHODS and self._cross_site(scope):
                return route.name, await self._deny(send, scope, Reason.CSRF, route)
            # Fast path: a token verified before, still well before its expiry, not revoked since.
            # Everything else (first sight, near expiry, refresh, errors) takes the full path.
            # The key is the credential the authenticator will use: a Bearer header wins over cookies.
            key: bytes | str | None = None
            if authorization and authorization[:7].lower() == b"bearer ":
                key = authorization
            elif authorization is None or authorization:  # none, or one that is not Bearer
                key = self.jar.read(headers)[0] if cookies else None
            known = self._known.get(key) if key else None
            if known is not None and self.shared.clock() < known.fresh_until and known.jti not in self.denylist:
                claims, identity, token = known.claims, known.identity, known.token
            else:
                with self.tracer.span("gateway.authenticate", route=route.name):
                    auth = await self.authenticator.authenticate(headers)
                claims, token = auth.claims, auth.token
                if claims is None and route.auth == "required":
                    return route.name, await self._deny(
                        send, scope, auth.reason or Reason.NO_TOKEN, route, auth.set_cookies
                    )
            set_cookies = auth.set_cookies if auth is not None else None
            if auth is None:  # a known token: its identity headers are ready, the route's rules still apply
                if claims is not None and route.require and not claims_allowed(claims, route.require):
                    return route.name, await self._deny(send, scope, Reason.CLAIMS_DENIED, route)
            elif claims is not None:
                reason, identity = self._admit(route, claims)
                if reason is not None:
                    return route.name, await self._deny(send, scope, reason, route, set_cookies)
                if key and isinstance(key, bytes) == auth.bearer and not auth.set_cookies and not auth.refreshed:
                    self._remember(key, auth, claims, identity)

        upstream_headers = self._upstream_headers(
            scope,
            host,
            identity,
            info,
            token if claims is not None else None,
            connection=connection,
            client_request_id=request_id is not None,
        )
        if claims is not None:
            info.subject = claims.get("sub")
            info.refreshed = auth is not None and auth.refreshed

        if route.capture is not None:
            # The login response is read and rewritten here, so it must come back unencoded.
            upstream_headers = [(n, v) for n, v in upstream_headers if n != "accept-encoding"]
        query: bytes = scope["query_string"]
        up = route.upstream
        if query:
            url = upstream_url(f"{up.scheme}://{up.netloc}{up.base_path}{path}?{query.decode('latin-1')}")
        else:
            cached = self._urls.get((route.name, path))
            if cached is None:
                if len(self._urls) >= _CACHE_SIZE:
                    self._urls.clear()
                cached = self._urls[(route.name, path)] = upstream_url(f"{up.scheme}://{up.netloc}{up.base_path}{path}")
            url = cached
        body = _request_body(receive) if has_body else None
        forwarding = self.forwarder.send(
            scope["method"],
            url,
            upstream_headers,
            body,
            connect_timeout=route.connect_timeout,
            read_timeout=route.read_timeout,
        )
        upstream_started = time.perf_counter()
        try:
            if self.tracer.enabled:
                with self.tracer.span("gateway.upstream", route=route.name):
                    response = await forwarding
            else:
                response = await forwarding  # no span, not even a no-op one: this is the hot path
        except UpstreamFailure as exc:
            reason = Reason.UPSTREAM_TIMEOUT if exc.timeout else Reason.UPSTREAM_UNREACHABLE
            log.warning("route %s: %s", route.name, exc)
            return route.name, await self._deny(send, scope, reason, route, set_cookies)
        info.upstream = time.perf_counter() - upstream_started
        self.metrics.upstream(route.name, info.upstream)

        out = self.header_rules.outbound(response.headers, route.name)
        out.append((b"x-request-id", info.request_id.encode()))
        if route.capture is not None and wants_capture(response.status, out):
            captured = await self.capturer.take(route.capture, out, chunks(response), route.name)
            if captured.reason is not None:
                return route.name, await self._deny(send, scope, captured.reason, route, set_cookies)
            await send({"type": "http.response.start", "status": response.status, "headers": captured.headers})
            await send({"type": "http.response.body", "body": captured.body})
            return route.name, response.status
        if set_cookies:
            out.extend((b"set-cookie", c) for c in set_cookies)
            if info.refreshed:
                out = [(n, v) for n, v in out if n != b"cache-control"]
                out.append(NO_STORE)
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        try:
            # Each chunk goes out as it comes; the last one with more_body=False, which saves a
            # send (and a write) per response. Most responses are one chunk, read once.
            chunk = await response.read()
            while chunk and not response.at_eof():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await response.read()
        except UpstreamFailure as exc:
            # Headers are gone already; all we can do is cut the connection so the client sees it.
            log.warning("route %s: upstream failed mid-response: %s", route.name, exc)
            response.close()
            return route.name, response.status
        await send({"type": "http.response.body", "body": chunk})
        return route.name, response.status

    # --- WebSockets ---------------------------------------------------------------------------

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket handshake: authorised like a GET, then relayed (see gateway.tunnel)."""
        if (await receive())["type"] != "websocket.connect":
            return
        started = time.perf_counter()
        # For the code shared with HTTP (denials, logs, origin, X-Forwarded-Proto): a handshake is a GET.
        scope["method"] = "GET"
        scope["scheme"] = "https" if scope.get("scheme") == "wss" else "http"
        scope["gateway"] = info = RequestInfo()
        info.request_id = self._request_ids()
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if _REQUEST_ID.fullmatch(value):
                    info.request_id, info.request_id_from_client = value.decode("ascii"), True
                break
        if "websocket.http.response" in scope.get("extensions", {}):
            respond = as_http(send)
        else:
            respond = _refuse_handshake(send)  # no denial responses here: the server answers 403
        route_name, status, closed_by = "-", 101, None
        try:
            route_name, status, closed_by = await self._websocket(scope, receive, send, respond, info)
        finally:
            # The handshake is the request (its latency is what the histogram shows); the access
            # log line is written when the socket closes, with how long it lived.
            ended = time.perf_counter()
            self.metrics.request(route_name, "WEBSOCKET", status, (info.answered or ended) - started)
            if self._access_log:
                self._log_access(scope, info, route_name, status, ended - started)
            if closed_by is not None:
                log.info("websocket closed route=%s by=%s after %.1fs", route_name, closed_by, ended - started)

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, respond: Send, info: RequestInfo
    ) -> tuple[str, int, str | None]:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        try:
            decoded, path = canonical_path(raw_path)
        except BadPath:
            return "-", await self._deny(respond, scope, Reason.BAD_PATH, None), None
        if decoded == self.prefix or decoded.startswith(self.prefix + "/"):
            return "-", await self._deny(respond, scope, Reason.NO_ROUTE, None), None  # internal endpoints are HTTP
        host = next((v for n, v in headers if n == b"host"), None)
        route = self.routes.match(host_name(host) if host and self.routes.by_host else None, decoded)
        if route is None:
            return "-", await self._deny(respond, scope, Reason.NO_ROUTE, None), None
        sockets = self.shared.sockets
        slot = sockets.reserve(self.config.websocket.max_connections)  # before any await: no overshoot
        if slot is None:
            return route.name, await self._deny(respond, scope, Reason.WEBSOCKET_LIMIT, route), None
        try:
            return await self._tunnel(scope, receive, send, respond, info, route, path, host, slot)
        finally:
            sockets.release(slot)

    async def _tunnel(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        respond: Send,
        info: RequestInfo,
        route: Route,
        path: str,
        host: bytes | None,
        slot: Slot,
    ) -> tuple[str, int, str | None]:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        sockets = self.shared.sockets
        auth = AuthResult()
        identity: StrHeaders = []
        watch: tuple[str, ...] = ()
        if route.auth != "none":
            _, refresh_cookie = self.jar.read(headers)
            # Browsers send cookies with cross-site WebSocket handshakes and no CORS applies:
            # a cookie session is only good from its own site (cross-site WebSocket hijacking).
            if bearer_token(headers) is None and (refresh_cookie or self.jar.read(headers)[0]):
                if self.csrf.refuses("POST", headers, self._origin(scope)):  # checked as an unsafe request would be
                    return route.name, await self._deny(respond, scope, Reason.CSRF, route), None
            auth = await self.authenticator.authenticate(headers)
            claims = auth.claims
            if claims is None and route.auth == "required":
                refused = auth.reason or Reason.NO_TOKEN
                return route.name, await self._deny(respond, scope, refused, route, auth.set_cookies), None
            if claims is not None:
                reason, identity = self._admit(route, claims)
                if reason is not None:
                    return route.name, await self._deny(respond, scope, reason, route, auth.set_cookies), None
                info.subject, info.refreshed = claims.get("sub"), auth.refreshed
                # What ends this socket: the end of its session (found from the verified access
                # token, see gateway.families), or a logout with the token itself.
                watch = await self.shared.families.watch_keys(claims)

        upstream_headers = [
            (n, v)
            for n, v in self._upstream_headers(scope, host, identity, info, auth.token if auth.claims else None)
            if n != "host" and not n.startswith("sec-websocket-")  # the client library makes its own
        ]
        up = route.upstream
        scheme = "wss" if up.scheme == "https" else "ws"
        query: bytes = scope["query_string"]
        url = f"{scheme}://{up.netloc}{up.base_path}{path}" + (f"?{query.decode('latin-1')}" if query else "")
        limits = self.config.websocket
        connecting = time.perf_counter()
        try:
            upstream = await connect_upstream(
                url,
                additional_headers=upstream_headers,
                subprotocols=scope.get("subprotocols") or None,
                open_timeout=route.connect_timeout,
                max_size=limits.max_message_size,
                ping_interval=limits.ping_interval or None,
                compression=None,  # each hop negotiates its own; none here saves CPU on both
                max_queue=4,  # messages read ahead from the upstream: with backpressure, 4 x max_size at most
                close_timeout=5,
                user_agent_header=None,
                proxy=None,  # never an HTTP(S)_PROXY from the environment: upstreams are local
            )
        except InvalidStatus as exc:
            # The upstream refused the handshake: its answer goes back as it was.
            answer = exc.response
            out = self.header_rules.outbound(
                [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.raw_items()], route.name
            )
            out = [(n, v) for n, v in out if n not in (b"content-length", b"transfer-encoding")]
            body = answer.body or b""
            out += [(b"content-length", str(len(body)).encode()), (b"x-request-id", info.request_id.encode())]
            out += [(b"set-cookie", c) for c in auth.set_cookies]
            await respond({"type": "http.response.start", "status": answer.status_code, "headers": out})
            await respond({"type": "http.response.body", "body": body})
            return route.name, answer.status_code, None
        except TimeoutError:
            log.warning("route %s: upstream WebSocket handshake timed out", route.name)
            return route.name, await self._deny(respond, scope, Reason.UPSTREAM_TIMEOUT, route, auth.set_cookies), None
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            log.warning("route %s: upstream WebSocket refused: %s", route.name, type(exc).__name__)
            return (
                route.name,
                await self._deny(respond, scope, Reason.UPSTREAM_UNREACHABLE, route, auth.set_cookies),
                None,
            )

        info.answered = time.perf_counter()
        info.upstream = info.answered - connecting
        accept = [(b"set-cookie", c) for c in auth.set_cookies]
        accept.append((b"x-request-id", info.request_id.encode()))
        exp = auth.claims.get("exp") if auth.claims is not None and limits.close_on_expiry else None
        tunnel = Tunnel(watch, float(exp) if isinstance(exp, int | float) else None)
        sockets.add(tunnel, slot)
        by = "error"
        try:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol, "headers": accept})
            by = await relay(tunnel, receive, send, upstream, self.metrics, limits.max_message_size)
        finally:
            sockets.discard(tunnel, by)
            await upstream.close()
        return route.name, 101, by

    # --- internal endpoints -------------------------------------------------------------------

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _ready(self, request: Request) -> Response:
        try:
            await self.store.ping()
        except StoreError:
            self.metrics.store_error("ready")
            return JSONResponse({"status": "unavailable", "store": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)


def _refuse_handshake(send: Send) -> Send:
    """Without the denial-response extension, any refusal is a close before accept (HTTP 403)."""

    async def refuse(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            await send({"type": "websocket.close", "code": 1008})

    return refuse


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
