"""One generation of gateway.yaml: every part built from the config, wired in request order.

    request ──> {prefix}/auth         forwardauth.ForwardAuth (a front proxy asks; nothing is forwarded)
            ──> under server.prefix?  endpoints.internal_app (health, ready, metrics, logout, login)
            ──> HTTP                  http.HttpPath
            ──> WebSocket             websocket.WebSocketPath
                both through          admission.Admission (CSRF, credential, refresh, claims)

A ``Generation`` is immutable once built; a config reload builds a new one and swaps it in
(gateway.app), so a request runs start to finish under one config. What outlives reloads (store,
HTTP clients, denylist, metrics, open sockets) is ``Shared``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from gateway.accesslog import AccessLog, RequestIds
from gateway.admission import Admission
from gateway.assertion import Assertion
from gateway.authn import Authenticator
from gateway.capture import Capturer
from gateway.config import GatewayConfig
from gateway.cookies import CookieJar
from gateway.csrf import CSRFGuard
from gateway.denylist import Denylist
from gateway.endpoints import internal_app, private_app
from gateway.families import Families
from gateway.forwardauth import ForwardAuth
from gateway.forwarder import Forwarder
from gateway.headers import HeaderRules, TrustedProxies
from gateway.http import HttpPath
from gateway.identity import IdentityHeaders
from gateway.idp_client import IdPClient
from gateway.keys import build_key_source
from gateway.login import OIDCLogin
from gateway.logout import Logout
from gateway.metrics import Metrics
from gateway.refresh import SessionRefresher
from gateway.responses import Denials
from gateway.routing import RouteTable
from gateway.sealing import Sealer
from gateway.sessionauth import SessionAuth
from gateway.sessions import ServerSessions
from gateway.store import Store
from gateway.throttle import ClientThrottle
from gateway.tls import TLSSettings
from gateway.tokens import Verifier
from gateway.tracing import Tracer
from gateway.tunnel import Sockets
from gateway.types import Receive, Scope, Send
from gateway.websocket import WebSocketPath

_PAGE_SCHEME = {"ws": "http", "wss": "https"}


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
    throttle: ClientThrottle = field(default_factory=ClientThrottle)  # used with raw refresh cookies only


class Generation:
    """One config generation's request path. Build with ``Generation(config, shared)``, then ``start()``."""

    def __init__(self, config: GatewayConfig, shared: Shared) -> None:
        self.config = config
        self.shared = shared
        self.prefix = config.server.prefix
        self.tls = TLSSettings(config, shared.http)  # contexts and control-plane clients of the tls keys
        routes = RouteTable.from_config(config.routes, self.tls.route)
        jar = CookieJar.from_config(config.cookies, shared.sealer)
        identity = IdentityHeaders(config.identity.headers)
        signed = config.identity.assertion
        self.assertion = Assertion(signed, config.identity.headers.values(), shared.clock) if signed else None
        self.header_rules = self._header_rules(config, jar, identity.names)
        self.keys = build_key_source(config.tokens, self.tls.client("tokens"), on_fetch=shared.metrics.jwks_fetch)
        verifier = Verifier(config.tokens, self.keys, shared.clock, denied=shared.denylist)
        self.refresher = self._refresher(config, shared, verifier, jar)
        self.sessions = self._server_sessions(config, shared, verifier)
        csrf = CSRFGuard(config.csrf.allowed_origins)
        tracer = Tracer(config.server.tracing)
        admission = Admission(
            authenticator=Authenticator(verifier, jar, self.refresher, self.sessions),
            verifier=verifier,
            jar=jar,
            csrf=csrf,
            identity=identity,
            denylist=shared.denylist,
            tracer=tracer,
            clock=shared.clock,
            origin=self.origin,
            client=self.client,
            sessions=self.sessions.sessions if self.sessions else None,
        )
        oidc = self._oidc(config, shared, verifier, jar)
        deny = Denials(shared.metrics.denial, f"{self.prefix}/login?next={{next}}" if oidc else config.login.url)
        access_log = AccessLog(config.server.access_log, shared.sealer)
        self.http = HttpPath(
            routes=routes,
            admission=admission,
            header_rules=self.header_rules,
            forwarder=shared.forwarder,
            capturer=Capturer(jar, verifier, shared.clock, shared.families, self.sessions),
            deny=deny,
            metrics=shared.metrics,
            tracer=tracer,
            access_log=access_log,
            request_ids=shared.request_ids,
            assertion=self.assertion,
        )
        self.websocket = self._websocket_path(config, shared, routes, admission, deny, access_log)
        self.forward_auth = self._forward_auth(config, shared, routes, admission, deny, access_log)
        logout = Logout(
            jar=jar,
            verifier=verifier,
            denylist=shared.denylist,
            refresher=self.refresher,
            csrf=csrf,
            origin=self.origin,
            client=self.client,
            redirect=config.logout.redirect,
            sessions=self.sessions,
        )
        self._internal_apps(config, shared, logout, oidc)

    async def start(self) -> None:
        await self.keys.start()

    async def close(self, clients: bool = True) -> None:
        """Let this generation's refreshes finish (they hold locks and redeemed tokens); stop its JWKS timer;
        close its own control-plane clients (``tls``) unless ``clients`` is False (see ``close_clients``)."""
        if self.refresher is not None:
            await self.refresher.close()
        if self.sessions is not None:
            await self.sessions.close()
        await self.keys.close()
        if clients:
            await self.tls.close()

    async def close_clients(self, after: float) -> None:
        """Close its own control-plane clients ``after`` seconds, or when cancelled (shutdown): a retired
        generation may still serve requests that started under it (an OIDC callback, a JWKS refetch)."""
        try:
            await asyncio.sleep(after)
        finally:
            await self.tls.close()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An HTTP request: one of the gateway's own endpoints, or one to forward."""
        path: str = scope["path"]
        prefix = self.prefix
        if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            auth = self.forward_auth.endpoint
            if path.startswith(auth) and (len(path) == len(auth) or path[len(auth)] == "/"):
                await self.forward_auth(scope, receive, send)
            else:
                await self.internal(scope, receive, send)
        else:
            await self.http(scope, receive, send)

    def origin(self, scope: Scope) -> str:
        """This request's own origin, as the browser sees it (forwarded headers from trusted proxies)."""
        client = scope.get("client")
        scheme: str = scope.get("scheme", "http")
        scheme = _PAGE_SCHEME.get(scheme, scheme)  # a WebSocket handshake comes from an http(s) page
        return self.header_rules.origin(scope["headers"], client[0] if client else None, scheme)

    def client(self, scope: Scope) -> str | None:
        """The client's address: the peer, or the one trusted proxies name (X-Forwarded-For)."""
        peer = scope.get("client")
        return self.header_rules.client(scope["headers"], peer[0] if peer else None)

    def _websocket_path(
        self,
        config: GatewayConfig,
        shared: Shared,
        routes: RouteTable,
        admission: Admission,
        deny: Denials,
        access_log: AccessLog,
    ) -> WebSocketPath:
        return WebSocketPath(
            prefix=config.server.prefix,
            routes=routes,
            admission=admission,
            header_rules=self.header_rules,
            sockets=shared.sockets,
            families=shared.families,
            limits=config.websocket,
            deny=deny,
            metrics=shared.metrics,
            access_log=access_log,
            request_ids=shared.request_ids,
            assertion=self.assertion,
        )

    def _internal_apps(self, config: GatewayConfig, shared: Shared, logout: Logout, oidc: OIDCLogin | None) -> None:
        """The endpoints under the prefix; with server.metrics, the private listener's app and its port (what
        arrives there sees that small app, never a route)."""
        jwks = self.assertion.jwks if self.assertion else None
        listener = config.server.metrics
        public = listener is None or listener.public
        self.internal = internal_app(
            self.prefix, shared.store, shared.metrics, logout, oidc, jwks=jwks, public_metrics=public
        )
        self.private_port = listener.port if listener else None
        self.private = private_app(self.prefix, shared.store, shared.metrics)

    def _header_rules(self, config: GatewayConfig, jar: CookieJar, identity: list[bytes]) -> HeaderRules:
        """What crosses the gateway: identity headers (and the assertion's) are the gateway's alone."""
        return HeaderRules(
            strip_patterns=config.identity.strip_inbound,
            identity_names=identity + ([self.assertion.name.encode()] if self.assertion else []),
            # The session cookie (session.mode: server) never reaches an upstream, nor is set by one.
            cookie_names=jar.bare_names + ((config.session.cookie.name,) if config.session.mode == "server" else ()),
            app_cookies=() if jar.sealed else jar.bare_names[1:],  # raw mode: the app sets the refresh cookie
            trusted_proxies=config.server.trusted_proxies,
            forward_token=config.identity.forward_token,
        )

    def _forward_auth(
        self,
        config: GatewayConfig,
        shared: Shared,
        routes: RouteTable,
        admission: Admission,
        deny: Denials,
        access_log: AccessLog,
    ) -> ForwardAuth:
        return ForwardAuth(
            endpoint=f"{self.prefix}/auth",
            routes=routes,
            admission=admission,
            header_rules=self.header_rules,
            trusted=TrustedProxies(config.server.trusted_proxies),
            deny=deny,
            metrics=shared.metrics,
            access_log=access_log,
            request_ids=shared.request_ids,
            forward_token=config.identity.forward_token,
            identity_names=IdentityHeaders(config.identity.headers).names,
            assertion=self.assertion,
        )

    def _refresher(
        self, config: GatewayConfig, shared: Shared, verifier: Verifier, jar: CookieJar
    ) -> SessionRefresher | None:
        if config.refresh.endpoint is None:
            return None
        return SessionRefresher(
            config=config.refresh,
            store=shared.store,
            sealer=shared.sealer,
            idp=IdPClient(config.refresh, self.tls.client("refresh")),
            verifier=verifier,
            jar=jar,
            metrics=shared.metrics,
            clock=shared.clock,
            denylist=shared.denylist if config.tokens.revoke_superseded else None,
            families=shared.families,
            # A sealed cookie the gateway did not issue never gets this far; raw ones are limited per client.
            throttle=None if config.cookies.refresh.sealed else shared.throttle,
        )

    def _oidc(self, config: GatewayConfig, shared: Shared, verifier: Verifier, jar: CookieJar) -> OIDCLogin | None:
        if config.login.oidc is None:
            return None
        return OIDCLogin(
            config=config.login.oidc,
            jar=jar,
            http=self.tls.client("login.oidc"),
            sealer=shared.sealer,
            store=shared.store,
            verifier=verifier,
            keys=self.keys,
            algorithms=config.tokens.algorithms,
            secure=config.cookies.secure,
            clock=shared.clock,
            families=shared.families,
            sessions=self.sessions,
        )

    def _server_sessions(self, config: GatewayConfig, shared: Shared, verifier: Verifier) -> SessionAuth | None:
        """session.mode server: the records in the store, and their requests, logins and logouts."""
        if config.session.mode != "server":
            return None
        store, sealer, denylist = shared.store, shared.sealer, shared.denylist
        return SessionAuth(
            sessions=ServerSessions(config.session, config.cookies, store, sealer, denylist, shared.clock),
            verifier=verifier,
            refresher=self.refresher,
            families=shared.families,
            sealer=shared.sealer,
            absolute_timeout=config.session.absolute_timeout,
        )
