"""One generation of gateway.yaml: every part built from the config, wired in request order.

    request ──> {prefix}/auth         forwardauth.ForwardAuth (a front proxy asks; nothing is forwarded)
            ──> {prefix}/userinfo     userinfo.UserInfo (who is logged in: the session's claims as JSON)
            ──> under server.prefix?  endpoints.internal_app (health, ready, metrics, logout, login)
            ──> HTTP                  http.HttpPath
            ──> WebSocket             websocket.WebSocketPath
                both through          admission.Admission (CSRF, credential, refresh, claims)
    the IdP's side            controlplane.ControlPlane (keys, verifier, refresher, OIDC login, back-channel)

A ``Generation`` is immutable once built; a config reload builds a new one and swaps it in
(gateway.app), so a request runs start to finish under one config. What outlives reloads (store,
HTTP clients, denylist, metrics, open sockets) is ``shared.Shared``.
"""

from __future__ import annotations

import asyncio

from gateway.accesslog import AccessLog
from gateway.admission import Admission
from gateway.assertion import Assertion
from gateway.authn import Authenticator
from gateway.capture import Capturer
from gateway.config import GatewayConfig
from gateway.controlplane import ControlPlane
from gateway.cookies import CookieJar
from gateway.csrf import CSRFGuard
from gateway.endpoints import internal_app, private_app
from gateway.forwardauth import ForwardAuth
from gateway.headers import HeaderRules, TrustedProxies
from gateway.http import HttpPath
from gateway.identity import IdentityHeaders
from gateway.login import OIDCLogin
from gateway.logout import Logout
from gateway.responses import Denials
from gateway.routing import RouteTable
from gateway.shared import Shared
from gateway.tls import TLSSettings
from gateway.tracing import Tracer
from gateway.types import Receive, Scope, Send
from gateway.userinfo import UserInfo
from gateway.websocket import WebSocketPath

_PAGE_SCHEME = {"ws": "http", "wss": "https"}


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
        # Keys, verifier, refresher, server-side sessions, OIDC login, back-channel logout.
        self.control = control = ControlPlane(config, shared, self.tls, jar)
        verifier, oidc, sessions = control.verifier, control.oidc, control.sessions
        csrf = CSRFGuard(config.csrf.allowed_origins)
        tracer = Tracer(config.server.tracing)
        admission = Admission(
            authenticator=Authenticator(verifier, jar, control.refresher, sessions),
            verifier=verifier,
            jar=jar,
            csrf=csrf,
            identity=identity,
            denylist=shared.denylist,
            tracer=tracer,
            clock=shared.clock,
            origin=self.origin,
            client=self.client,
            sessions=sessions.sessions if sessions else None,
        )
        deny = Denials(shared.metrics.denial, f"{self.prefix}/login?next={{next}}" if oidc else config.login.url)
        access_log = AccessLog(config.server.access_log, shared.sealer)
        self.http = HttpPath(
            routes=routes,
            admission=admission,
            header_rules=self.header_rules,
            forwarder=shared.forwarder,
            capturer=Capturer(jar, verifier, shared.clock, shared.families, sessions),
            deny=deny,
            metrics=shared.metrics,
            tracer=tracer,
            access_log=access_log,
            request_ids=shared.request_ids,
            assertion=self.assertion,
        )
        self.websocket, self.forward_auth = self._other_paths(config, shared, routes, admission, deny, access_log)
        self.userinfo = self._userinfo(config, shared, admission, deny)
        logout = Logout(
            jar=jar,
            verifier=verifier,
            denylist=shared.denylist,
            refresher=control.refresher,
            csrf=csrf,
            origin=self.origin,
            client=self.client,
            redirect=config.logout.redirect,
            end_session_url=control.end_session.url if control.end_session else None,
            id_token_of=control.end_session.id_token_of if control.end_session else None,
            sessions=sessions,
        )
        self._internal_apps(config, shared, logout, oidc)

    async def start(self) -> None:
        await self.control.start()

    async def close(self, clients: bool = True) -> None:
        """Let this generation's refreshes finish (they hold locks and redeemed tokens); stop its JWKS timer;
        close its own control-plane clients (``tls``) unless ``clients`` is False (see ``close_clients``)."""
        await self.control.close()
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
            elif path == self.userinfo.endpoint:
                await self.userinfo(scope, receive, send)
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

    def _other_paths(
        self,
        config: GatewayConfig,
        shared: Shared,
        routes: RouteTable,
        admission: Admission,
        deny: Denials,
        access_log: AccessLog,
    ) -> tuple[WebSocketPath, ForwardAuth]:
        """The WebSocket path, and forward-auth's: the same routes, admission and refusals as HTTP."""
        websocket = WebSocketPath(
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
        forward_auth = ForwardAuth(
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
        return websocket, forward_auth

    def _internal_apps(self, config: GatewayConfig, shared: Shared, logout: Logout, oidc: OIDCLogin | None) -> None:
        """The endpoints under the prefix; with server.metrics, the private listener's app and its port (what
        arrives there sees that small app, never a route)."""
        jwks = self.assertion.jwks if self.assertion else None
        listener = config.server.metrics
        public = listener is None or listener.public
        self.internal = internal_app(
            self.prefix,
            shared.store,
            shared.metrics,
            logout,
            oidc,
            jwks=jwks,
            public_metrics=public,
            backchannel=self.control.backchannel,
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

    def _userinfo(self, config: GatewayConfig, shared: Shared, admission: Admission, deny: Denials) -> UserInfo:
        return UserInfo(
            endpoint=f"{self.prefix}/userinfo",
            admission=admission,
            deny=deny,
            claims=config.identity.userinfo_claims,
            request_ids=shared.request_ids,
        )
