"""gateway.yaml: strict loading into frozen typed objects.

Loading is three steps and does no I/O besides reading the one file: parse YAML, expand
``${VAR}`` / ``${VAR:-default}`` in strings, validate into pydantic models that forbid unknown
keys. Every problem is collected and reported at once as ``key.path: message``
(``routes[2].upstream: not an http(s) URL``) in a :class:`ConfigError`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.errors import ConfigError

HS_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
MAX_LEEWAY = 300
MIN_HS_SECRET_BYTES = 32
# How a route treats tokens; routing.Route keeps the same type.
AuthMode = Literal["required", "optional", "none"]
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _problems(*items: tuple[str, str]) -> PydanticCustomError:
    """An error that names sub-keys of the model it is raised on (see ``_format``)."""
    return PydanticCustomError("gateway_keys", "{summary}", {"summary": "; ".join(m for _, m in items), "items": items})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    prefix: str = "/.gateway"
    trusted_proxies: tuple[str, ...] = ()
    watch_config: bool = True  # reload when gateway.yaml changes on disk (SIGHUP always reloads)
    access_log: bool = True  # one JSON line per request on the gateway.access logger
    tracing: bool = False  # OpenTelemetry spans, when the opentelemetry-api package is installed

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or value == "/" or "?" in value or "#" in value:
            raise ValueError("must be a path such as /.gateway")
        return value.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return value


class SentinelConfig(_Model):
    """Redis Sentinel: the sentinels to ask and the name of the master set they monitor."""

    hosts: tuple[str, ...] = ()
    master: str = ""
    password: str | None = None
    sentinel_password: str | None = None
    db: int = Field(0, ge=0)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if _host_port(item) is None:
                raise ValueError(f"{item!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _required(self) -> SentinelConfig:
        problems: list[tuple[str, str]] = []
        if not self.hosts:
            problems.append(("hosts", 'list at least one sentinel as "host:port"'))
        if not self.master:
            problems.append(("master", "name the master set the sentinels monitor"))
        if problems:
            raise _problems(*problems)
        return self

    def addresses(self) -> list[tuple[str, int]]:
        """The sentinels as (host, port) pairs."""
        return [address for item in self.hosts if (address := _host_port(item)) is not None]


class StoreConfig(_Model):
    """Where shared state lives: ``url`` for memory or one Redis; ``sentinel`` or ``cluster`` for HA Redis.

    With ``sentinel``, ``url`` may only choose the scheme (``redis://``, or ``rediss://`` for TLS) and
    defaults to ``redis://``; the master's address comes from the sentinels.  With ``cluster: true``,
    ``url`` names one seed node; the client discovers the others.
    """

    url: str = "memory://"
    key_prefix: str = "gw:"
    secret: str | None = None
    sentinel: SentinelConfig | None = None
    cluster: bool = False

    @model_validator(mode="before")
    @classmethod
    def _sentinel_url(cls, data: Any) -> Any:
        # The default memory:// would mark a Sentinel store as process-local (store.secret, --workers checks).
        if isinstance(data, dict) and data.get("sentinel") is not None and "url" not in data:
            return {**data, "url": "redis://"}
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"memory", "redis", "rediss", "unix"}:
            raise ValueError("must be memory://, redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _topology(self) -> StoreConfig:
        problems: list[tuple[str, str]] = []
        parts = urlsplit(self.url)
        if self.sentinel is not None and self.cluster:
            problems.append(("cluster", "cannot be combined with store.sentinel"))
        elif self.sentinel is not None:
            if parts.scheme not in {"redis", "rediss"} or parts.netloc or parts.path not in ("", "/"):
                problems.append(
                    ("url", "with store.sentinel, leave out or set to redis:// or rediss:// (TLS) without an address")
                )
        elif self.cluster:
            if parts.scheme not in {"redis", "rediss"} or not parts.hostname:
                problems.append(("url", "store.cluster needs a redis:// or rediss:// URL naming one seed node"))
            elif parts.path not in ("", "/", "/0"):
                problems.append(("url", "Redis Cluster has only database 0"))
        if problems:
            raise _problems(*problems)
        return self


class TokensConfig(_Model):
    algorithms: tuple[str, ...] = ("RS256",)
    secret: str | None = None
    public_key_file: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway: float = Field(30, ge=0)
    refresh_before: float = Field(30, ge=0)
    revoke_superseded: bool = False

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("list at least one algorithm")
        for alg in value:
            if alg.lower() == "none":
                raise ValueError('"none" is never accepted')
            if alg not in HS_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r}")
        if set(value) & HS_ALGORITHMS and set(value) & ASYMMETRIC_ALGORITHMS:
            # One key would serve both kinds: the classic algorithm-confusion hole.
            raise ValueError("HS* algorithms cannot be mixed with asymmetric ones")
        return value

    @field_validator("leeway")
    @classmethod
    def _leeway(cls, value: float) -> float:
        if value > MAX_LEEWAY:
            raise ValueError(f"at most {MAX_LEEWAY} seconds")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks(cls, value: str | None) -> str | None:
        if value is not None and not _is_http_url(value):
            raise ValueError("not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _keys(self) -> TokensConfig:
        problems: list[tuple[str, str]] = []
        sources = [k for k in ("secret", "public_key_file", "jwks_url") if getattr(self, k)]
        symmetric = bool(set(self.algorithms) & HS_ALGORITHMS)
        if len(sources) != 1:
            problems.append(("secret", "set exactly one of secret, public_key_file, jwks_url"))
        elif symmetric and sources != ["secret"]:
            problems.append((sources[0], "HS* algorithms need tokens.secret"))
        elif not symmetric and sources == ["secret"]:
            problems.append(("secret", "a shared secret only verifies HS* algorithms"))
        # RFC 7518 §3.2: the key is at least as long as the hash (32, 48, 64 bytes for HS256/384/512).
        minimum = max([MIN_HS_SECRET_BYTES] + [int(a[2:]) // 8 for a in self.algorithms if a in HS_ALGORITHMS])
        if symmetric and self.secret is not None and len(self.secret.encode()) < minimum:
            problems.append(("secret", f"HS secrets must be at least {minimum} bytes"))
        if problems:
            raise _problems(*problems)
        return self


class RefreshFields(_Model):
    request: str = "refresh"
    access: str = "access"
    refresh: str = "refresh"


class RefreshConfig(_Model):
    endpoint: str | None = None
    style: Literal["oauth2", "json"] = "oauth2"
    client_id: str | None = None
    client_secret: str | None = None
    client_auth: Literal["post", "basic", "none"] = "post"
    fields: RefreshFields = RefreshFields()
    revocation_endpoint: str | None = None
    timeout: float = Field(5, gt=0, le=120)
    grace_period: float = Field(30, ge=0, le=3600)
    lock_lease: float = Field(5, gt=0, le=60)
    wait_timeout: float = Field(30, gt=0, le=300)
    # Auth0 "reuse interval", Okta "grace period", Keycloak "refresh token max reuse": how long the
    # IdP accepts a just-used refresh token again. Above 0, an attempt whose answer was lost is
    # retried once within it instead of ending the session (docs/refresh.md).
    idp_reuse_window: float = Field(0, ge=0, le=3600)

    @field_validator("endpoint", "revocation_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not _is_http_url(value):
            raise ValueError("not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _grace(self) -> RefreshConfig:
        if self.endpoint is not None and self.grace_period < self.lock_lease:
            # Waiters look again every 0.25 s, but one look can take a store timeout (2 s) and the
            # owner's write-out a lease: the result must outlive that (issue 12, failure 7).
            raise _problems(
                (
                    "grace_period",
                    f"{self.grace_period:g} s is shorter than refresh.lock_lease ({self.lock_lease:g} s): requests "
                    "waiting on another worker's refresh must find its result before it expires; raise "
                    "grace_period or lower lock_lease",
                )
            )
        return self


class CookieSpec(_Model):
    name: str
    max_age: int | None = Field(None, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError("not a valid cookie name")
        return value


class CookiesConfig(_Model):
    access: CookieSpec = CookieSpec(name="gw_access")
    refresh: CookieSpec = CookieSpec(name="gw_refresh", max_age=1209600)
    secure: bool = True
    same_site: Literal["lax", "strict", "none"] = "lax"


class IdentityConfig(_Model):
    headers: dict[str, str] = Field(
        default_factory=lambda: {"X-Auth-User": "sub", "X-Auth-Email": "email", "X-Auth-Roles": "roles"}
    )
    strip_inbound: tuple[str, ...] = ("X-Auth-*",)
    forward_token: bool = False

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, claim in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if not claim or any(not part for part in claim.split(".")):
                raise ValueError(f"{name}: {claim!r} is not a claim path")
        return value


class OIDCConfig(_Model):
    issuer: str
    client_id: str
    client_secret: str | None = None
    scopes: tuple[str, ...] = ("openid", "offline_access")
    redirect_url: str

    @field_validator("issuer", "redirect_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not _is_http_url(value):
            raise ValueError("not an http(s) URL")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in value:
            raise ValueError('must include "openid"')
        return value


class LoginConfig(_Model):
    url: str | None = None
    oidc: OIDCConfig | None = None


class LogoutConfig(_Model):
    redirect: str = "/"


class CSRFConfig(_Model):
    allowed_origins: tuple[str, ...] = ()


class TimeoutConfig(_Model):
    connect: float = Field(5, gt=0)
    read: float = Field(60, gt=0)


class WebSocketConfig(_Model):
    close_on_expiry: bool = False
    max_message_size: int = Field(1_048_576, ge=1024)
    idle_timeout: float = Field(300, ge=0)
    max_connections: int = Field(10_000, ge=1)
    ping_interval: float = Field(20, ge=0)


class RequireConfig(_Model):
    claims: dict[str, Any] = Field(default_factory=dict)


class CaptureConfig(_Model):
    access: str = "access"
    refresh: str = "refresh"
    keep_access: bool = True


class RouteConfig(_Model):
    name: str
    path: str
    host: str | None = None
    upstream: str
    auth: AuthMode = "required"
    require: RequireConfig | None = None
    capture: CaptureConfig | None = None
    timeout: TimeoutConfig = TimeoutConfig()

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value or "%" in value or "\\" in value:
            raise ValueError("must be a plain path starting with /")
        return value

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        parts = urlsplit(value)
        if not _is_http_url(value) or parts.query or parts.fragment:
            raise ValueError("not an http(s) URL")
        return value.rstrip("/")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return value.lower() if value else value


class GatewayConfig(_Model):
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
            raise _problems(*problems)
        return value

    @model_validator(mode="after")
    def _store_secret(self) -> GatewayConfig:
        shared = not self.store.url.startswith("memory:")
        if (self.refresh.endpoint or self.login.oidc) and shared and not self.store.secret:
            # Every process must seal and unseal the same values, so the key cannot be random.
            raise _problems(("store.secret", "required with a shared store when refresh or login.oidc is set"))
        return self


def _host_port(value: str) -> tuple[str, int] | None:
    """Split "host:port" (or "[v6]:port"); None unless both parts are present and the port is valid."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in {"http", "https"} and bool(parts.hostname)


# --- loading ----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _expand(node: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string of the parsed YAML."""
    if isinstance(node, dict):
        return {k: _expand(v, _join(path, str(k)), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if env.get(name) or (name in env and default is None):
            return env[name]
        if default is not None:  # like sh: ":-" also covers a variable that is set but empty
            return default
        problems.append(f"{path}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")
        return ""

    return _VAR.sub(substitute, node)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _format(error: Any) -> list[str]:
    path = ""
    for part in error["loc"]:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
    if error["type"] == "gateway_keys":
        out = []
        for key, message in error["ctx"]["items"]:
            out.append(f"{path}{key}: {message}" if key.startswith("[") else f"{_join(path, key)}: {message}")
        return out
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return [f"{path or '(top level)'}: {message}"]


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate already-parsed YAML; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(["(top level): the config must be a mapping of keys"])
    problems: list[str] = []
    expanded = _expand(data, "", os.environ if env is None else env, problems)
    try:
        config = GatewayConfig.model_validate(expanded)
    except ValidationError as exc:
        # A key whose variable is missing was validated as "": its knock-on complaints
        # ("set exactly one of ...", "at least 32 bytes") would only hide the real problem.
        missing = {problem.split(":", 1)[0] for problem in problems}
        for error in exc.errors():
            problems.extend(p for p in _format(error) if p.split(":", 1)[0] not in missing)
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate gateway.yaml; every failure is a ConfigError, never a traceback."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the config file ({exc.__class__.__name__}: {exc})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})".replace("\n", " ")]) from None
    return parse_config(data, env)
