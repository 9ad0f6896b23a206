"""``GatewayConfig``: the whole of gateway.yaml, and the rules that span its sections."""

from __future__ import annotations

from pydantic import field_validator, model_validator

from gateway.config.base import Model, key_problems
from gateway.config.routes import IdentityConfig, RouteConfig, WebSocketConfig
from gateway.config.server import ServerConfig, StoreConfig
from gateway.config.sessions import CookiesConfig, CSRFConfig, LoginConfig, LogoutConfig
from gateway.config.tokens import RefreshConfig, TokensConfig


class GatewayConfig(Model):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    tokens: TokensConfig
    refresh: RefreshConfig = RefreshConfig()
    cookies: CookiesConfig = CookiesConfig()
    identity: IdentityConfig = IdentityConfig()
    login: LoginConfig = LoginConfig()
    logout: LogoutConfig = LogoutConfig()
    csrf: CSRFConfig = CSRFConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    routes: tuple[RouteConfig, ...]

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
        if (self.refresh.endpoint or self.login.oidc) and shared and not self.store.secret:
            # Every process must seal and unseal the same values, so the key cannot be random.
            raise key_problems(("store.secret", "required with a shared store when refresh or login.oidc is set"))
        return self
