"""Route table: which route, and so which rules and upstream, a request belongs to.

What is matched is exactly what is forwarded: the request path is decoded and made canonical
once (``canonical_path``), the route is chosen on that canonical form, and the proxy forwards
that same canonical form. Paths that could mean different things to us and to an upstream
(dot segments, encoded slashes or backslashes, NUL and control bytes) are refused with 400
instead of being guessed at.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

from gateway.cache import BoundedCache
from gateway.config import AuthMode, CaptureConfig, RouteConfig
from gateway.cors import CORSPolicy
from gateway.errors import BadPath
from gateway.reasons import Reason
from gateway.tls import UpstreamTLS

log = logging.getLogger("gateway")

# Characters kept literal when the canonical path is re-encoded (RFC 3986 pchar plus "/").
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def canonical_path(raw_path: bytes) -> tuple[str, str]:
    """Return (decoded, encoded) canonical forms of a raw request path, or raise BadPath.

    Duplicate slashes are collapsed (``//admin`` -> ``/admin``); dot segments, encoded ``/`` or
    ``\\``, backslashes, NUL and control characters are refused.
    """
    if not raw_path.startswith(b"/"):
        raise BadPath("path must start with /")
    lowered = raw_path.lower()
    if b"%2f" in lowered or b"%5c" in lowered or b"\\" in raw_path:
        raise BadPath("encoded slash or backslash in path")
    try:
        decoded = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("path is not UTF-8") from None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
        raise BadPath("control character in path")
    segments = decoded.split("/")
    # "..;x" is ".." to Tomcat/Jetty (path parameters are dropped before resolving dot segments).
    if any(seg.split(";", 1)[0] in (".", "..") for seg in segments):
        raise BadPath("dot segment in path")
    if "//" in decoded:
        decoded = "/" + "/".join(seg for seg in segments if seg) + ("/" if decoded.endswith("/") else "")
    return decoded, quote(decoded, safe=_PATH_SAFE)


def _servlet(path: str) -> str:
    """Tomcat, Jetty, Spring: ``;parameters`` dropped from every segment (``/admin;x/y`` is ``/admin/y``)."""
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/")) if ";" in path else path


def _windows(path: str) -> str:
    """IIS and Windows file servers: case folded, trailing dots and spaces trimmed from every segment."""
    return "/".join(segment.rstrip(". ") for segment in path.lower().split("/"))


# How common upstreams read a path other than byte for byte (routes[].path_style).
READINGS: dict[str, Callable[[str], str]] = {"servlet": _servlet, "windows": _windows, "case_insensitive": str.lower}


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    netloc: str
    base_path: str  # prepended to the forwarded path ("" for none)

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route: what ``RouteConfig`` says, in the shape the request path needs."""

    name: str
    prefix: str  # without trailing slash; "" for the root route
    host: str | None
    upstream: Upstream
    auth: AuthMode
    require: dict[str, Any]
    capture: CaptureConfig | None
    connect_timeout: float
    read_timeout: float
    methods: frozenset[str]
    allow: bytes  # the Allow header of a 405
    path_style: str  # how its upstream reads paths (RouteConfig.path_style)
    max_body: int | None  # bytes of request body; None: no limit
    tls: UpstreamTLS | None = None  # routes[].tls for an https upstream; None: the defaults
    cors: CORSPolicy | None = None  # the gateway answers preflights and sets the CORS headers (gateway.cors)
    preflight: bool = False  # preflight: upstream: preflights are forwarded unauthenticated

    def matches(self, path: str) -> bool:
        return not self.prefix or path == self.prefix or path.startswith(self.prefix + "/")


def compile_route(config: RouteConfig, tls: UpstreamTLS | None = None) -> Route:
    parts = urlsplit(config.upstream)
    return Route(
        name=config.name,
        prefix=config.path.rstrip("/"),
        host=config.host,
        upstream=Upstream(parts.scheme, parts.netloc, parts.path.rstrip("/")),
        auth=config.auth,
        require=dict(config.require.claims) if config.require else {},
        capture=config.capture,
        connect_timeout=config.timeout.connect,
        read_timeout=config.timeout.read,
        methods=frozenset(config.methods),
        allow=", ".join(config.methods).encode(),
        path_style=config.path_style,
        max_body=config.max_body,
        tls=tls,
        cors=CORSPolicy(config.cors, config.methods) if config.cors else None,
        preflight=config.preflight == "upstream",
    )


class CanonicalPaths:
    """``canonical_path`` remembered per raw path (most requests repeat a few paths); None for a refused one."""

    def __init__(self) -> None:
        self._known: BoundedCache[bytes, tuple[str, str]] = BoundedCache()

    def __call__(self, raw_path: bytes) -> tuple[str, str] | None:
        canonical = self._known.get(raw_path)
        if canonical is None:
            try:
                canonical = self._known.put(raw_path, canonical_path(raw_path))
            except BadPath:
                return None
        return canonical


class RouteLookup:
    """A ``RouteTable``'s answers remembered, for the HTTP path and forward-auth alike: a Host value's
    name (valid ones only), and the route of (host, canonical path), a refusal included."""

    def __init__(self, routes: RouteTable) -> None:
        self.routes = routes
        self._hosts: BoundedCache[bytes, str] = BoundedCache(1024)
        self._resolved: BoundedCache[tuple[str | None, str], Route | Reason] = BoundedCache()

    def host(self, value: bytes) -> str | None:
        """The host name of a Host header's value, None when it is not a valid one."""
        name = self._hosts.get(value)
        if name is None and (name := host_name(value)) is not None:
            self._hosts.put(value, name)
        return name

    def route(self, host: str | None, decoded: str) -> Route | Reason:
        key = (host if self.routes.by_host else None, decoded)
        route = self._resolved.get(key)
        if route is None:
            try:
                route = self._resolved.put(key, self.routes.resolve(*key) or Reason.NO_ROUTE)
            except BadPath as exc:
                log.info("ambiguous path refused: %s", exc)
                route = self._resolved.put(key, Reason.BAD_PATH)
        return route


class RouteTable:
    """Longest path prefix wins (on segment boundaries); a route bound to a host beats one that is not."""

    def __init__(self, routes: list[Route]) -> None:
        # Sorted once: host-bound first, then longer prefixes, keeping config order for ties.
        self.routes = sorted(routes, key=lambda r: (r.host is None, -len(r.prefix)))
        self.by_host = any(r.host is not None for r in routes)  # else the Host header never matters
        # Each reading applies to the route prefixes too: "/Admin/" read case-insensitively is "/admin".
        self._read_prefixes = {
            style: sorted(((r, read(r.prefix)) for r in routes), key=lambda item: (item[0].host is None, -len(item[1])))
            for style, read in READINGS.items()
        }

    @classmethod
    def from_config(
        cls, routes: tuple[RouteConfig, ...], tls: Callable[[str], UpstreamTLS | None] | None = None
    ) -> RouteTable:
        """The table of ``routes``; ``tls`` gives each route's TLS by name (gateway.tls.TLSSettings.route)."""
        return cls([compile_route(r, tls(r.name) if tls else None) for r in routes])

    def match(self, host: str | None, path: str) -> Route | None:
        for route in self.routes:
            if route.host is not None and route.host != host:
                continue
            if route.matches(path):
                return route
        return None

    def resolve(self, host: str | None, path: str) -> Route | None:
        """The route for ``path`` as its upstream will read it; BadPath when readings disagree.

        A route whose upstream reads paths a known way (``path_style``) is matched on that
        reading. For one whose upstream is unknown, every common reading must land on the same
        route, or the path is refused: what is authorised is what the upstream serves.
        """
        route = self.match(host, path)
        if route is None or route.path_style == "exact":
            return route
        if route.path_style in READINGS:
            read = self._match_reading(host, path, route.path_style)
            if read is not route and (read is None or read.path_style != route.path_style):
                raise BadPath(f"the upstream of route {route.name} reads this path as another route's")
            return read
        for style in READINGS:
            if self._match_reading(host, path, style) is not route:
                raise BadPath(f"a {style} upstream reads this path as another route's")
        return route

    def _match_reading(self, host: str | None, path: str, style: str) -> Route | None:
        read = READINGS[style]
        seen = read(path)
        for route, prefix in self._read_prefixes[style]:
            if route.host is not None and route.host != host:
                continue
            if not prefix or seen == prefix or seen.startswith(prefix + "/"):
                return route
        return None

    def describe(self) -> list[str]:
        """Human-readable lines for ``gateway check``."""
        lines = []
        for r in self.routes:
            where = f"{r.host or '*'}{r.prefix or '/'}"
            rule = f" require={r.require}" if r.require else ""
            rule += f" max_body={r.max_body}" if r.max_body is not None else ""
            rule += " cors" if r.cors else " preflight=upstream" if r.preflight else ""
            lines.append(f"{r.name:<16} {where:<32} -> {r.upstream.origin}{r.upstream.base_path}  auth={r.auth}{rule}")
        return lines


def request_host(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The Host header, lower-cased, without port (None: none, or not a host)."""
    for name, value in headers:
        if name == b"host":
            return host_name(value)
    return None


# RFC 9110 §7.2: Host = uri-host [ ":" port ]. Names are held to what DNS names and IP literals use:
# "admin.example,other", "admin.example@x" or "admin.example:80:80" are not hosts, and an upstream
# or a virtual host could read them differently from the route table (issue 14, point 2).
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?)(?::[0-9]{1,5})?")


def told_another_host(forwarded: list[bytes], name: str | None) -> bool:
    """Whether a trusted proxy's X-Forwarded-Host values (``forwarded``) name another host than the one routed on
    (``name``; None: none). The upstream gets both and may read either (Rails, Django's USE_X_FORWARDED_HOST), so one
    it cannot read counts as another ("admin.example:123456" is admin.example to Rails and Django)."""
    return bool(forwarded) and (name is None or any(host_name(host) != name for host in forwarded))


def host_name(value: bytes) -> str | None:
    """A Host header value, lower-cased, without port, then without trailing dot; None when it is not a host."""
    found = _HOST.fullmatch(value.strip(b" \t"))
    if found is None:
        return None
    return found.group(1).decode("ascii").lower().rstrip(".")
