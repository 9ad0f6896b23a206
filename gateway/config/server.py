"""``server`` and ``store``: where the gateway listens and where shared state lives."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.config.base import Model, host_port, key_problems


class LimitsConfig(Model):
    """What one client may send and hold, per worker process. Enforced before the gateway's app sees the request,
    in the HTTP server (uvicorn's httptools protocol, extended by `gateway/limits.py`); a change needs a restart.
    The body limit is per route (`routes[].max_body`)."""

    header_bytes: int = Field(65_536, ge=1024, le=16_777_216)
    """Bytes of a request's head: the request line and every header line together. A bigger head gets 431
    `headers_too_large` and the connection is closed; it is never read whole, nor forwarded."""
    header_count: int = Field(100, ge=1, le=10_000)
    """Header lines in one request; more get 431 `too_many_headers` and the connection is closed."""
    header_timeout: float = Field(10, gt=0, le=3600)
    """Seconds to receive a request's head, counted from the first byte of the request, or from the connection's
    accept for its first request (so a connection that sends nothing is closed too). Late: 408 `header_timeout`
    when part of a request came, else a silent close. Checked by a sweep every quarter of it (at most every
    second), so it fires up to that much late."""
    idle_timeout: int = Field(5, ge=1, le=3600)
    """Seconds a kept-alive connection may wait for its next request before it is closed (uvicorn's
    `timeout_keep_alive`)."""
    max_connections: int = Field(1000, ge=1)
    """HTTP connections open at once per worker. A connection over it gets 503 `connection_limit` (with
    `Retry-After`) for its first request and is closed; connections already open are not affected. A WebSocket
    leaves this count once upgraded (`websocket.max_connections` caps those)."""


class MetricsListenerConfig(Model):
    """A private listener for `/metrics`, `/health` and `/ready`, off the public port. It serves only those (at the
    root and under `server.prefix`: `http://127.0.0.1:9100/metrics`), never a route; every worker answers on it,
    with the numbers of all workers. A change of `host` or `port` needs a restart."""

    host: str = "127.0.0.1"
    """Bind address of the private listener; keep it off the public network (loopback, or an internal
    interface)."""
    port: int = Field(ge=1, le=65535)
    """Port of the private listener; required, and not the public port. Taken already: `gateway serve` exits 1."""
    public: bool = True
    """Also serve `{prefix}/metrics` on the public port; `false` answers 404 there (`health` and `ready` stay)."""


class ServerConfig(Model):
    """Where the gateway listens, where its internal endpoints live, and what it logs and traces."""

    host: str = "127.0.0.1"
    """Bind address (`gateway serve --host` overrides it)."""
    port: int = Field(8080, ge=1, le=65535)
    """Port (`gateway serve --port` overrides it)."""
    prefix: str = "/.gateway"
    """Where the internal endpoints (`health`, `ready`, `metrics`, `userinfo`, `logout`, OIDC `login` and
    `callback`) live. A path other than `/`; a trailing `/` is dropped. It takes precedence over every route."""
    trusted_proxies: tuple[str, ...] = ()
    """IP addresses or CIDRs whose `X-Forwarded-For`, `-Proto` and `-Host` headers are believed; none by default.
    With routes that name a `host`, such a peer's `X-Forwarded-Host` must name the request's `Host` (else 400
    `bad_host`): the app behind may read either.
    Also the front proxies whose forward-auth questions (`{prefix}/auth` with `X-Original-*` or
    `X-Forwarded-Method`/`-Uri`) are answered; such headers from any other peer get 403 `untrusted_proxy`."""
    watch_config: bool = True
    """Reload when the config file changes on disk (checked every second). SIGHUP always reloads."""
    access_log: bool = True
    """One JSON line per request on stdout (logger `gateway.access`)."""
    tracing: bool = False
    """OpenTelemetry spans (`gateway.request`, `gateway.authenticate`, `gateway.upstream`) when
    `opentelemetry-api` is installed, exported by the process's OpenTelemetry SDK setup. No token, cookie or claim
    value is put on a span."""
    forwarder: Literal["lean", "aiohttp"] = "lean"
    """The HTTP client that forwards requests upstream: `lean`, the gateway's own HTTP/1.1 client
    (`gateway/upstream_h1.py`: pooled keep-alive connections, a fraction of aiohttp's CPU per request), or
    `aiohttp`, aiohttp's client (the reference; what reaches the upstream is the same byte for byte). WebSockets
    use their own client either way. A change needs a restart."""
    limits: LimitsConfig = LimitsConfig()
    """Header size, count and deadline, keep-alive idle time, and connections per worker."""
    metrics: MetricsListenerConfig | None = None
    """A private listener for metrics and health checks; none: `{prefix}/metrics` on the public port only."""

    @model_validator(mode="after")
    def _metrics_port(self) -> ServerConfig:
        if self.metrics is not None and self.metrics.port == self.port:
            raise key_problems(("metrics.port", f"{self.port} is the public port (server.port)"))
        return self

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


class SentinelConfig(Model):
    """Redis Sentinel: the sentinels to ask and the name of the master set they monitor. The master is found
    (and found again after a failover) through the sentinels."""

    hosts: tuple[str, ...] = ()
    """The sentinels, as `"host:port"` (`"[v6]:port"` for IPv6); at least one."""
    master: str = ""
    """Name of the master set the sentinels monitor; required."""
    password: str | None = None
    """Password of the Redis master and replicas (use `${VAR}`)."""
    sentinel_password: str | None = None
    """Password of the sentinels themselves, when they need one (use `${VAR}`)."""
    db: int = Field(0, ge=0)
    """Redis database number."""

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if host_port(item) is None:
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
            raise key_problems(*problems)
        return self

    def addresses(self) -> list[tuple[str, int]]:
        """The sentinels as (host, port) pairs."""
        return [address for item in self.hosts if (address := host_port(item)) is not None]


class StoreConfig(Model):
    """Where shared state lives: `url` for memory or one Redis; `sentinel` or `cluster` for HA Redis.

    With `sentinel`, `url` may only choose the scheme (`redis://`, or `rediss://` for TLS) and
    defaults to `redis://`; the master's address comes from the sentinels.  With `cluster: true`,
    `url` names one seed node; the client discovers the others.
    """

    url: str = "memory://"
    """`redis://`, `rediss://` (TLS), `unix://`, or `memory://` (embedded, one process only). redis-py connection
    options go in the query string, e.g. `rediss://redis.internal:6380/0?ssl_ca_certs=/etc/gateway/redis-ca.pem`.
    Defaults to `redis://` when `sentinel` is set."""
    key_prefix: str = "gw:"
    """Every key the gateway writes lives under it."""
    secret: str | None = None
    """Keys the token hashes, encrypts (AES-GCM) the tokens held in the store and the OIDC login-state cookie, and
    seals the refresh cookie (AES-SIV, under a key of its own) (use `${VAR}`). Required with a shared store when
    `refresh.endpoint` or `login.oidc` is set; with `memory://` and no secret, a random key is used (sessions then
    end when the process restarts). Changing it logs every session out."""
    sentinel: SentinelConfig | None = None
    """Redis Sentinel: the master is found through these sentinels; `url` then only picks `redis://` or
    `rediss://`."""
    cluster: bool = False
    """Redis Cluster: `url` names one seed node and the others are discovered. Every key of one session shares a
    hash tag, so the Lua scripts work. Cannot be combined with `sentinel`."""

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
            raise key_problems(*problems)
        return self
