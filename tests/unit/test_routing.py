"""gateway.routing: canonical paths (what is authorised is what is forwarded) and the route table."""

from __future__ import annotations

import pytest

from gateway.config import RouteConfig
from gateway.errors import BadPath
from gateway.routing import RouteTable, canonical_path, request_host


def table(*routes: dict[str, str]) -> RouteTable:
    return RouteTable.from_config(tuple(RouteConfig(upstream="http://127.0.0.1:9000", **r) for r in routes))


SITE = table(
    {"name": "app", "path": "/"},
    {"name": "public", "path": "/public/", "auth": "none"},
    {"name": "admin", "path": "/admin/"},
    {"name": "api", "path": "/api"},
)


def name_of(path: str, host: str | None = None, routes: RouteTable = SITE) -> str | None:
    route = routes.match(host, path)
    return route.name if route else None


# --- canonical_path ---


@pytest.mark.parametrize(
    ("raw", "decoded", "encoded"),
    [
        (b"/", "/", "/"),
        (b"/admin/users", "/admin/users", "/admin/users"),
        (b"/public/", "/public/", "/public/"),
        (b"//admin", "/admin", "/admin"),
        (b"/public//x///y/", "/public/x/y/", "/public/x/y/"),
        (b"/%61dmin/x", "/admin/x", "/admin/x"),
        (b"/a%20b/caf%C3%A9", "/a b/caf\u00e9", "/a%20b/caf%C3%A9"),
        (b"/files/100%25", "/files/100%", "/files/100%25"),  # no double decoding downstream
        (b"/a%3Fb", "/a?b", "/a%3Fb"),  # an encoded ? stays in the path, never becomes a query
        (b"/a%23b", "/a#b", "/a%23b"),
        (b"/a;b=c/...", "/a;b=c/...", "/a;b=c/..."),  # "..." is a name, not a dot segment
    ],
)
def test_canonical_path_forms(raw: bytes, decoded: str, encoded: str) -> None:
    assert canonical_path(raw) == (decoded, encoded)


def test_encoded_letters_reach_the_route_of_their_decoded_form() -> None:
    decoded, encoded = canonical_path(b"/%61dmin/x")
    assert name_of(decoded) == "admin"
    assert encoded == "/admin/x"  # forwarded byte for byte as matched


@pytest.mark.parametrize(
    "raw",
    [
        b"/public/../admin",
        b"/public/./admin",
        b"/public/..",
        b"/public/%2e%2e/admin",
        b"/public/%2E%2E/admin",
        b"/public/.%2e/admin",
        b"/public/..%2fadmin",
        b"/public/..%2Fadmin",
        b"/public/%2fadmin",
        b"/public/%252e%252e/../admin",
        b"/a\\b",
        b"/public/..\\admin",
        b"/a%5cb",
        b"/a%5Cb",
        b"/a%00b",
        b"/a%0d%0ab",
        b"/a%09b",
        b"/a%7fb",
        b"/a%ff",
        b"/a%c3",
        b"admin",
        b"",
    ],
)
def test_ambiguous_paths_are_refused(raw: bytes) -> None:
    with pytest.raises(BadPath):
        canonical_path(raw)


@pytest.mark.parametrize("raw", [b"/public/..;/admin", b"/public/%2e%2e;x=1/admin", b"/public/.;/admin"])
def test_dot_segment_with_path_parameter_is_refused(raw: bytes) -> None:
    """Regression: Tomcat/Jetty upstreams read "..;" as ".." (path traversal past a looser route's rule)."""
    with pytest.raises(BadPath):
        canonical_path(raw)


def test_bad_path_is_a_value_error() -> None:
    assert issubclass(BadPath, ValueError)


# --- RouteTable ---


def test_longest_prefix_wins() -> None:
    assert name_of("/") == "app"
    assert name_of("/anything/else") == "app"
    assert name_of("/public/x") == "public"
    assert name_of("/admin/users/1") == "admin"
    routes = table({"name": "a", "path": "/a/"}, {"name": "ab", "path": "/a/b/"}, {"name": "abc", "path": "/a/b/c"})
    assert name_of("/a/b/c/d", routes=routes) == "abc"
    assert name_of("/a/b/x", routes=routes) == "ab"
    assert name_of("/a/x", routes=routes) == "a"


def test_prefix_matches_on_segment_boundaries_only() -> None:
    assert name_of("/apiary") == "app"
    assert name_of("/api") == "api"
    assert name_of("/api/v1") == "api"
    assert name_of("/administrator") == "app"
    assert name_of("/admin") == "admin"
    assert name_of("/admin/") == "admin"
    assert name_of("/admin/x") == "admin"


def test_no_route_is_none() -> None:
    routes = table({"name": "api", "path": "/api/"})
    assert routes.match(None, "/") is None
    assert routes.match(None, "/apix") is None
    assert routes.match("example.com", "/other") is None


def test_host_bound_route_beats_generic_one() -> None:
    routes = table(
        {"name": "generic", "path": "/"},
        {"name": "generic-admin", "path": "/admin/"},
        {"name": "tenant", "path": "/", "host": "tenant.example"},
    )
    assert name_of("/admin/x", "tenant.example", routes) == "tenant"
    assert name_of("/admin/x", "other.example", routes) == "generic-admin"
    assert name_of("/x", None, routes) == "generic"


def test_host_route_never_matches_another_host() -> None:
    routes = table({"name": "tenant", "path": "/", "host": "tenant.example"})
    assert routes.match("evil.example", "/") is None
    assert routes.match(None, "/") is None


@pytest.mark.parametrize(
    ("header", "host"),
    [
        (b"Tenant.EXAMPLE", "tenant.example"),
        (b"tenant.example:8443", "tenant.example"),
        (b"TENANT.example:80", "tenant.example"),
        (b"[::1]:8080", "[::1]"),
        (b"127.0.0.1:9000", "127.0.0.1"),
    ],
)
def test_request_host_is_lowercase_without_port(header: bytes, host: str) -> None:
    assert request_host([(b"accept", b"*/*"), (b"host", header)]) == host


def test_host_compared_case_insensitively_without_port() -> None:
    routes = table({"name": "generic", "path": "/"}, {"name": "tenant", "path": "/", "host": "Tenant.Example"})
    host = request_host([(b"host", b"TENANT.example:8443")])
    assert name_of("/x", host, routes) == "tenant"


def test_request_without_host_header() -> None:
    assert request_host([(b"accept", b"*/*")]) is None


def test_query_string_never_affects_matching() -> None:
    # The table only ever sees the path; a query that looks like a path is just text of the query.
    decoded, _ = canonical_path(b"/public/x")
    assert name_of(decoded) == "public"
    assert name_of("/public/x?/admin/") == "public"
    decoded, encoded = canonical_path(b"/public/x%3F/admin/")
    assert name_of(decoded) == "public" and encoded == "/public/x%3F/admin/"


def test_compiled_route_keeps_upstream_parts() -> None:
    routes = RouteTable.from_config(
        (RouteConfig(name="app", path="/app/", upstream="https://app.internal:8443/base/", auth="optional"),)
    )
    route = routes.match(None, "/app/x")
    assert route is not None
    assert route.upstream.origin == "https://app.internal:8443"
    assert route.upstream.base_path == "/base"
    assert route.auth == "optional"
    assert any("app" in line and "/app" in line for line in routes.describe())


def test_a_routes_max_body_is_compiled_and_shown_by_check() -> None:
    config = RouteConfig(name="upload", path="/up/", upstream="http://127.0.0.1:9000", max_body=1024)
    routes = RouteTable.from_config((config, RouteConfig(name="app", path="/", upstream="http://127.0.0.1:9000")))
    assert [r.max_body for r in routes.routes] == [1024, None]
    assert routes.describe()[0].endswith("max_body=1024") and "max_body" not in routes.describe()[1]


# --- Host, strictly (issue 14, point 2) ---


@pytest.mark.parametrize(
    ("header", "host"),
    [(b"admin.example.:443", "admin.example"), (b"admin.example.", "admin.example"), (b"[::1]", "[::1]")],
)
def test_the_port_goes_before_the_trailing_dot(header: bytes, host: str) -> None:
    assert request_host([(b"host", header)]) == host


@pytest.mark.parametrize(
    "header",
    [
        b"admin.example:80:80",
        b"admin.example,other",
        b"[admin.example]",
        b"admin.example@x",
        b"admin example",
        b"admin.example:",
        b"admin.example:123456",
        b"",
        b".",
        b"admin..example",
        b"admin.example/x",
    ],
)
def test_what_is_not_a_host_is_none(header: bytes) -> None:
    assert request_host([(b"host", header)]) is None


# --- one path, one meaning (issue 14, point 1) ---

GUARDED = table({"name": "app", "path": "/"}, {"name": "admin", "path": "/admin/"})


def resolved(raw: bytes, routes: RouteTable = GUARDED) -> str | None:
    decoded, _ = canonical_path(raw)
    route = routes.resolve(None, decoded)
    return route.name if route else None


@pytest.mark.parametrize(
    "raw",
    [b"/admin;x/secret", b"/admin%3b/secret", b"/admin;x=1", b"/ADMIN/secret", b"/Admin", b"/admin./secret",
     b"/admin%20/secret", b"/admin.%20./secret"],
)  # fmt: skip
def test_a_path_an_upstream_may_read_as_another_route_is_refused(raw: bytes) -> None:
    with pytest.raises(BadPath):
        resolved(raw)


@pytest.mark.parametrize(
    ("raw", "route"),
    [(b"/about;jsessionid=1", "app"), (b"/static/File.TXT", "app"), (b"/admin/Secret;v=2", "admin"), (b"/x.", "app")],
)
def test_readings_that_stay_on_the_route_pass(raw: bytes, route: str) -> None:
    assert resolved(raw) == route


def test_a_route_that_reads_paths_its_way_is_matched_on_that_reading() -> None:
    servlet = table(
        {"name": "app", "path": "/", "path_style": "servlet"},
        {"name": "admin", "path": "/admin/", "path_style": "servlet"},
    )
    assert resolved(b"/admin;x/secret", servlet) == "admin"  # the rules of the route the upstream serves
    windows = table(
        {"name": "app", "path": "/", "path_style": "windows"},
        {"name": "admin", "path": "/Admin/", "path_style": "windows"},
    )
    assert resolved(b"/ADMIN./secret", windows) == "admin"
    exact = table({"name": "app", "path": "/", "path_style": "exact"}, {"name": "admin", "path": "/admin/"})
    assert resolved(b"/ADMIN/secret", exact) == "app"  # its upstream reads /ADMIN as /ADMIN: nothing to fear


def test_readings_that_disagree_about_the_style_are_refused() -> None:
    mixed = table({"name": "app", "path": "/", "path_style": "servlet"}, {"name": "admin", "path": "/admin/"})
    with pytest.raises(BadPath):
        resolved(b"/admin;x/secret", mixed)
