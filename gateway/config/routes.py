"""``routes``, ``identity`` and ``websocket``: what is forwarded where, and what the upstream learns."""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.config.assertion import AssertionConfig
from gateway.config.base import HEADER_NAME, AuthMode, Model, is_http_url, key_problems
from gateway.config.cors import CORSConfig
from gateway.config.tls import TLSConfig

DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
PathStyle = Literal["unknown", "exact", "servlet", "windows", "case_insensitive"]
_TOKEN = re.compile(r"[A-Z0-9!#$%&'*+.^_`|~-]+")


class IdentityConfig(Model):
    """What the upstream learns about the user: identity headers from the token's claims."""

    headers: dict[str, str] = Field(
        default_factory=lambda: {"X-Auth-User": "sub", "X-Auth-Email": "email", "X-Auth-Roles": "roles"}
    )
    """Header name to claim path. Dotted paths reach nested claims (`realm_access.roles`). Lists join with `,`,
    booleans become `true`/`false`, numbers become text, objects become compact JSON. A missing claim sends no
    header; a value containing CR, LF or NUL gets 403."""
    strip_inbound: tuple[str, ...] = ("X-Auth-*",)
    """Glob patterns of headers removed from every client request on every route (also `auth: none`). The names
    in `headers` are always removed too."""
    forward_token: bool = False
    """Replace `Authorization` upstream with `Bearer <access token>`."""
    assertion: AssertionConfig | None = None
    """A signed identity assertion (JWT) on every authenticated request forwarded; none by default."""
    userinfo_claims: tuple[str, ...] = ("sub", "name", "email", "preferred_username", "roles")
    """The claims `GET {prefix}/userinfo` returns to the page (those the access token has), with its `exp`: an
    allow-list of top-level claim names, taken as written (`https://app.example/roles` is one name, not a path).
    `[]` returns `exp` only. Tokens never appear there."""

    @field_validator("userinfo_claims")
    @classmethod
    def _userinfo_claims(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name.strip() for name in value):
            raise ValueError("a claim name cannot be empty")
        if len(set(value)) != len(value):
            raise ValueError("a claim is listed twice")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, claim in value.items():
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if not claim or any(not part for part in claim.split(".")):
                raise ValueError(f"{name}: {claim!r} is not a claim path")
        return value


class TimeoutConfig(Model):
    """Upstream timeouts in seconds; exceeding them gives 504 (once the response has started, the client's
    connection is cut instead)."""

    connect: float = Field(5, gt=0)
    """Seconds to open a connection to the upstream."""
    read: float = Field(60, gt=0)
    """How long the upstream may stay silent, before its response head and between two body chunks; a long
    response that keeps coming is never cut. The wait for the head starts once the request is sent."""


class WebSocketConfig(Model):
    """Limits of proxied WebSockets, on both hops (client to gateway, gateway to upstream)."""

    close_on_expiry: bool = False
    """Close a socket (code 4401, reason `token expired`) when the access token it was opened with expires. Off: a
    socket lives until either side closes it or its session ends."""
    max_message_size: int = Field(1_048_576, ge=1024)
    """Bytes of a message as sent (decompressed, text in UTF-8); a bigger message from either side closes the socket
    with 1009, whether or not a hop compresses it. Sets uvicorn's `ws_max_size` (a change needs a restart)."""
    idle_timeout: float = Field(300, ge=0)
    """Seconds without a message either way before the socket is closed with 1001 (`idle timeout`); 0 never.
    Checked once a second."""
    max_connections: int = Field(10_000, ge=1)
    """Open sockets per worker; a handshake over it is refused with 503 `websocket_limit`."""
    ping_interval: float = Field(20, ge=0)
    """Seconds between pings on each hop (uvicorn to the client, the gateway to the upstream); 0 off. A peer that
    stops answering is dropped."""


class RequireConfig(Model):
    """Rules on the token's claims for one route; failing any gives 403 `claims_denied`."""

    claims: dict[str, Any] = Field(default_factory=dict)
    """Claim path to a value or a list of accepted values. Every rule must pass: equality, or one of a list, or
    (for a list claim) containing one of them. `true` does not match `1`."""


class CaptureConfig(Model):
    """Token capture: a successful JSON login answer on this route becomes the session cookies, and the refresh
    token never reaches the page (`capture: {}` takes the defaults)."""

    access: str = "access"
    """Field of the login answer that holds the access token (it must verify with `tokens`)."""
    refresh: str = "refresh"
    """Field of the login answer that holds the refresh token; it is removed from the body."""
    keep_access: bool = True
    """Keep the access token in the body passed on; `false` removes it too."""


class RouteConfig(Model):
    """One route. The longest path prefix wins, on segment boundaries; routes bound to a `host` are tried first;
    ties keep config order. No match gives 404 `no_route`."""

    name: str
    """Unique; appears in metrics, logs and error bodies."""
    path: str
    """Plain path prefix starting with `/` (no `?`, `#`, `%` or backslash)."""
    host: str | None = None
    """Match only this `Host` (case-insensitive, port ignored)."""
    upstream: str
    """`http(s)://host[:port][/base]`, with no query or fragment. A base path is prepended to the forwarded
    path."""
    auth: AuthMode = "required"
    """`required`: a valid token is needed. `optional`: identity headers are added when a valid token is present.
    `none`: no token is looked at."""
    require: RequireConfig | None = None
    """Claims the token must carry on this route."""
    capture: CaptureConfig | None = None
    """Turn this route's JSON login answer into the session cookies."""
    timeout: TimeoutConfig = TimeoutConfig()
    """Upstream timeouts."""
    path_style: PathStyle = "unknown"
    """How this route's upstream reads paths. `unknown`: a path that a common server would read as another route's
    (`;params` dropped as servlet containers do, case folded and trailing dots or spaces trimmed as IIS does, case
    folded) is refused with 400 `bad_path`. `exact`: the upstream reads paths byte for byte (no check). `servlet`,
    `windows`, `case_insensitive`: the upstream reads them that way, and the gateway matches routes on that
    reading."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    """HTTP methods this route accepts; any other gets 405 `method_not_allowed` (with `Allow`). TRACE and CONNECT
    are never forwarded unless listed. The method is the request line's: an app that reads a `_method` parameter on
    POST (Rails, Laravel, Symfony) acts on that instead."""
    max_body: int | None = Field(None, ge=0)
    """Bytes of request body this route accepts; none: no limit. A bigger `Content-Length` gets 413
    `body_too_large` before anything is forwarded; a chunked body that grows past it is cut: 413 when the upstream
    has not answered yet, else the connection is closed. Either way the connection is closed after the 413."""
    tls: TLSConfig | None = None
    """TLS to an `https://` upstream, for HTTP and WebSocket alike (private CA, client certificate, SNI name)."""
    preflight: Literal["authenticate", "upstream"] = "authenticate"
    """CORS preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`). `authenticate`: like any
    request (browsers send preflights without cookies: 401 on an `auth: required` route). `upstream`: forwarded
    without authentication, with no identity headers, no `Authorization` and no access token (the app answers them;
    oauth2-proxy's `skip_auth_preflight`); `methods` must include `OPTIONS`. Not with `cors`."""
    cors: CORSConfig | None = None
    """The gateway answers this route's preflights and sets its CORS headers itself."""

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
        if not is_http_url(value) or parts.query or parts.fragment:
            raise ValueError("not an http(s) URL")
        return value.rstrip("/")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return value.lower().rstrip(".") if value else value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        methods = tuple(m.upper() for m in value)
        if not methods or any(not _TOKEN.fullmatch(m) for m in methods):
            raise ValueError("must be a list of HTTP method names")
        return methods

    @model_validator(mode="after")
    def _cross_origin(self) -> RouteConfig:
        if self.cors is not None and self.preflight == "upstream":
            raise key_problems(("preflight", "upstream answers preflights, cors has the gateway answer them: pick one"))
        if self.preflight == "upstream" and "OPTIONS" not in self.methods:
            raise key_problems(("preflight", "upstream forwards OPTIONS: list it in methods"))
        extra = [m for m in (self.cors.allowed_methods or ()) if m not in self.methods] if self.cors else []
        if extra:
            raise key_problems(("cors.allowed_methods", f"not in the route's methods: {', '.join(extra)}"))
        return self
