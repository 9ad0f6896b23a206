"""``GatewayConfig``: the whole of gateway.yaml, and the rules that span its sections."""

from __future__ import annotations

from pydantic import field_validator, model_validator

from gateway.config.base import Model, key_problems
from gateway.config.routes import IdentityConfig, RouteConfig, WebSocketConfig
from gateway.config.server import ServerConfig, StoreConfig
from gateway.config.sessions import CookiesConfig, CSRFConfig, LoginConfig, LogoutConfig, SessionConfig
from gateway.config.tls import TLSConfig, http_only
from gateway.config.tokens import RefreshConfig, TokensConfig

HEAD_ROOM = 4096  # a request's head besides the gateway's cookies: request line, other headers and cookies


class GatewayConfig(Model):
    """gateway.yaml. Strings may use `${VAR}` and `${VAR:-default}` (as in `sh`, the default also applies when
    `VAR` is set but empty; a missing variable with no default is an error naming the key). Unknown keys are
    errors. Durations are seconds. `gateway check` reports every problem at once, each with its key path."""

    server: ServerConfig = ServerConfig()
    """Listening address, internal endpoints, trusted proxies, logs and tracing."""
    store: StoreConfig = StoreConfig()
    """Where state shared between processes lives (memory or Redis)."""
    tokens: TokensConfig
    """How access tokens are verified; required."""
    refresh: RefreshConfig = RefreshConfig()
    """Transparent refresh at the IdP's token endpoint."""
    cookies: CookiesConfig = CookiesConfig()
    """The session cookies."""
    session: SessionConfig = SessionConfig()
    """Where browser sessions keep their tokens: in cookies, or server-side in the store."""
    identity: IdentityConfig = IdentityConfig()
    """Identity headers sent upstream, and the headers stripped from clients."""
    login: LoginConfig = LoginConfig()
    """Where browsers without a session are sent."""
    logout: LogoutConfig = LogoutConfig()
    """What happens after `POST {prefix}/logout`."""
    csrf: CSRFConfig = CSRFConfig()
    """Origins allowed for cookie-authenticated unsafe requests."""
    websocket: WebSocketConfig = WebSocketConfig()
    """Limits of proxied WebSockets."""
    routes: tuple[RouteConfig, ...]
    """The routes, at least one, with unique names; matched by longest path prefix (and host, when given)."""

    @field_validator("routes")
    @classmethod
    def _routes(cls, value: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
        if not value:
            raise ValueError("list at least one route")
        seen: dict[str, int] = {}
        problems: list[tuple[str, str]] = []
        for index, route in enumerate(value):
            if route.name in seen:
                problems.append(
                    (f"[{index}].name", f"duplicate route name {route.name!r} (also routes[{seen[route.name]}])")
                )
            seen.setdefault(route.name, index)
        if problems:
            raise key_problems(*problems)
        return value

    @model_validator(mode="after")
    def _store_secret(self) -> GatewayConfig:
        shared = not self.store.url.startswith("memory:")
        server = self.session.mode == "server"
        if (self.refresh.endpoint or self.login.oidc or server) and shared and not self.store.secret:
            # Every process must seal and unseal the same values, so the key cannot be random.
            raise key_problems(
                ("store.secret", "required with a shared store when refresh, login.oidc or session.mode: server is set")
            )
        if server and self.session.idle_timeout > self.session.absolute_timeout:
            raise key_problems(("session.idle_timeout", "longer than session.absolute_timeout"))
        if server and _names_clash(self.session.cookie.name, self.cookies.access.name, self.cookies.refresh.name):
            raise key_problems(
                ("session.cookie.name", "must differ from the token cookies' names and their `<name>_N` chunks")
            )
        return self

    @model_validator(mode="after")
    def _cookie_room(self) -> GatewayConfig:
        """Big tokens ride in every request's Cookie header: they must leave room for the rest of the head."""
        room = self.server.limits.header_bytes - HEAD_ROOM
        # Only a total set by hand: the default must not break a config with small heads that never sees big tokens.
        if "max_total" in self.cookies.model_fields_set and self.cookies.max_total > room:
            raise key_problems(("cookies.max_total", f"over server.limits.header_bytes less {HEAD_ROOM} ({room})"))
        return self

    @model_validator(mode="after")
    def _tls(self) -> GatewayConfig:
        """A ``tls`` key must have an https URL to apply to (it would silently do nothing on http://)."""
        found = [(f"routes[{i}].", http_only(r.tls, upstream=r.upstream)) for i, r in enumerate(self.routes)]
        refresh = self.refresh
        found.append(
            ("refresh.", http_only(refresh.tls, endpoint=refresh.endpoint, revocation=refresh.revocation_endpoint))
        )
        found.append(("tokens.", http_only(self.tokens.tls, jwks_url=self.tokens.jwks_url)))
        for name, opaque in (("introspection", self.tokens.introspection), ("userinfo", self.tokens.userinfo)):
            if opaque is not None:
                found.append((f"tokens.{name}.", http_only(opaque.tls, endpoint=opaque.endpoint)))
        if self.login.oidc is not None:
            found.append(("login.oidc.", http_only(self.login.oidc.tls, issuer=self.login.oidc.issuer)))
        problems = [(prefix + key, message) for prefix, items in found for key, message in items]
        if self.tokens.tls is not None and self.tokens.jwks_url is None:
            problems.append(("tokens.tls", "applies to jwks_url only; remove it or set jwks_url"))
        if refresh.tls is not None and refresh.endpoint is None and refresh.revocation_endpoint is None:
            problems.append(("refresh.tls", "applies to refresh.endpoint and revocation_endpoint; neither is set"))
        if problems:
            raise key_problems(*problems)
        return self

    def tls_settings(self) -> list[tuple[str, TLSConfig]]:
        """Every ``tls`` key that is set, with its key path (``routes[1].tls``, ``refresh.tls``...)."""
        found = [(f"routes[{i}].tls", r.tls) for i, r in enumerate(self.routes)]
        found += [("refresh.tls", self.refresh.tls), ("tokens.tls", self.tokens.tls)]
        for name in ("introspection", "userinfo"):
            opaque = getattr(self.tokens, name)
            found.append((f"tokens.{name}.tls", opaque.tls if opaque is not None else None))
        if self.login.oidc is not None:
            found.append(("login.oidc.tls", self.login.oidc.tls))
        return [(key, tls) for key, tls in found if tls is not None]


def _names_clash(session: str, *tokens: str) -> bool:
    """The session cookie's name is a token cookie's, or one of their chunks' (``<name>_N``), or the reverse."""

    def chunk(name: str, stem: str) -> bool:
        return name.startswith(stem + "_") and name[len(stem) + 1 :].isdigit()

    return any(session == t or chunk(session, t) or chunk(t, session) for t in tokens)
