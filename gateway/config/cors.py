"""``routes[].cors``: a route whose CORS preflights the gateway answers, and whose answers carry its CORS headers."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.config.base import HEADER_NAME, Model, key_problems


def _origin_problem(value: str) -> str | None:
    """Why ``value`` is not an exact origin (``scheme://host[:port]``), or None."""
    if value == "*":
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return f"{value!r} is not an origin"
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None:
        return f"{value!r} is not an origin (scheme://host[:port])"
    if parts.path or parts.query or parts.fragment or value.endswith(("?", "#")):
        return f"{value!r} is not an origin: no path, query or fragment (not even a trailing /)"
    return None


class CORSConfig(Model):
    """The gateway answers this route's CORS preflights itself (an `OPTIONS` with `Origin` and
    `Access-Control-Request-Method`), without authentication and without calling the upstream: 204 with the CORS
    headers for an allowed origin, 403 `cors_origin` (and no CORS headers) for any other. Every other answer on the
    route (the upstream's, and the gateway's own refusals such as 401 or 403, so a page can read their status) gets
    `Access-Control-Allow-Origin` (and `-Allow-Credentials`, `-Expose-Headers`) when its `Origin` is allowed, and
    `Vary: Origin`; the upstream's own `Access-Control-*` headers are dropped, so this policy is the one browsers
    see. With `allow_credentials`, cookie-authenticated unsafe requests (and WebSocket handshakes) whose `Origin` is
    in `allowed_origins` pass the CSRF check on this route, even cross-site."""

    allowed_origins: tuple[str, ...] = Field(min_length=1)
    """Origins allowed to read answers, each exactly `scheme://host[:port]` as browsers send it in `Origin`
    (no path, not even `/`); `"*"` allows any origin, but not with `allow_credentials`. `null` is never allowed."""
    allowed_methods: tuple[str, ...] | None = None
    """Methods a preflight may ask for (`Access-Control-Allow-Methods`), each one of the route's `methods`; none: the
    route's `methods`."""
    allowed_headers: tuple[str, ...] = ()
    """Request headers a preflight may ask for (`Access-Control-Allow-Headers`) besides the CORS-safelisted ones;
    `["*"]`: any header but `Authorization` (the Fetch standard's wildcard), not with `allow_credentials`."""
    expose_headers: tuple[str, ...] = ()
    """Response headers page scripts may read besides the CORS-safelisted ones (`Access-Control-Expose-Headers`);
    `["*"]`: all of them, not with `allow_credentials`."""
    allow_credentials: bool = False
    """Allow credentialed requests (`fetch(..., {credentials: "include"})`: the session cookies ride along):
    `Access-Control-Allow-Credentials: true`. Cookies cross sites only with `cookies.same_site: none`; between
    origins of one site (other ports or subdomains) `lax` is enough."""
    max_age: int = Field(600, ge=0)
    """Seconds browsers may cache a preflight's answer (`Access-Control-Max-Age`; Chromium caps it at 7200)."""

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        problems = [p for p in (_origin_problem(v) for v in value) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("allowed_methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(m.upper() for m in value)

    @field_validator("allowed_headers", "expose_headers")
    @classmethod
    def _headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [v for v in value if v != "*" and not HEADER_NAME.match(v)]
        if bad:
            raise ValueError(f"not header names: {', '.join(map(repr, bad))}")
        if "*" in value and len(value) > 1:
            raise ValueError('"*" stands alone')
        return value

    @model_validator(mode="after")
    def _credentials(self) -> CORSConfig:
        if not self.allow_credentials:
            return self
        # Fetch standard: a credentialed request's answer must name its origin, and "*" in the lists is read
        # as a header named "*": a wildcard here would silently never work.
        wild = [k for k in ("allowed_origins", "allowed_headers", "expose_headers") if "*" in getattr(self, k)]
        if wild:
            raise key_problems(*((k, '"*" cannot be used with allow_credentials: true') for k in wild))
        return self
