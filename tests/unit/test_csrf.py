"""gateway/csrf.py: which cookie-authenticated unsafe requests are refused as cross-site."""

from __future__ import annotations

import pytest

from gateway.csrf import CSRFGuard, origin_of

OWN = "https://app.example"


def h(**headers: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]


@pytest.fixture
def guard() -> CSRFGuard:
    return CSRFGuard(["https://partner.example", "http://localhost:3000/some/path"])


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_safe_methods_pass_whatever_the_headers(guard: CSRFGuard, method: str) -> None:
    headers = h(Sec_Fetch_Site="cross-site", Origin="https://evil.example")
    assert not guard.refuses(method, headers, OWN)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_unsafe_methods_from_another_site_are_refused(guard: CSRFGuard, method: str) -> None:
    assert guard.refuses(method, h(Origin="https://evil.example"), OWN)
    assert guard.refuses(method, h(Sec_Fetch_Site="cross-site"), OWN)


@pytest.mark.parametrize("value", ["cross-site", "Cross-Site", " cross-site "])
def test_sec_fetch_site_cross_site_refused_even_with_matching_origin(guard: CSRFGuard, value: str) -> None:
    assert guard.refuses("POST", h(Sec_Fetch_Site=value, Origin=OWN), OWN)


@pytest.mark.parametrize("site", ["same-origin", "same-site", "none"])
def test_same_site_fetch_with_own_origin_allowed(guard: CSRFGuard, site: str) -> None:
    assert not guard.refuses("POST", h(Sec_Fetch_Site=site, Origin=OWN), OWN)


def test_same_site_sibling_origin_is_still_refused(guard: CSRFGuard) -> None:
    # Sec-Fetch-Site: same-site covers sibling subdomains; the Origin check must still catch them.
    assert guard.refuses("POST", h(Sec_Fetch_Site="same-site", Origin="https://blog.app.example"), OWN)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://app.example",  # scheme differs
        "https://app.example:8443",  # port differs
        "https://app.example.evil.example",
        "https://evilapp.example",
    ],
)
def test_origin_of_another_site_refused(guard: CSRFGuard, origin: str) -> None:
    assert guard.refuses("POST", h(Origin=origin), OWN)


@pytest.mark.parametrize("origin", ["null", " null", "garbage", "://", "https://"])
def test_opaque_or_unparseable_origin_refused(guard: CSRFGuard, origin: str) -> None:
    assert guard.refuses("POST", h(Origin=origin), OWN)


@pytest.mark.parametrize(
    ("origin", "own"),
    [
        ("https://app.example", "https://app.example"),
        ("https://app.example:443", "https://app.example"),
        ("https://app.example", "https://app.example:443"),
        ("http://app.example:80", "http://app.example"),
        ("HTTPS://App.Example", "https://app.example"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_own_origin_allowed_after_normalisation(guard: CSRFGuard, origin: str, own: str) -> None:
    assert not guard.refuses("POST", h(Origin=origin), own)


def test_non_default_port_is_not_normalised_away(guard: CSRFGuard) -> None:
    assert guard.refuses("POST", h(Origin="https://app.example:80"), "https://app.example")
    assert guard.refuses("POST", h(Origin="http://app.example:443"), "http://app.example")


@pytest.mark.parametrize("origin", ["https://partner.example", "https://PARTNER.example:443", "http://localhost:3000"])
def test_allowed_origins_honoured(guard: CSRFGuard, origin: str) -> None:
    assert not guard.refuses("POST", h(Origin=origin), OWN)


def test_allowed_origins_are_exact(guard: CSRFGuard) -> None:
    assert guard.refuses("POST", h(Origin="http://partner.example"), OWN)
    assert guard.refuses("POST", h(Origin="http://localhost:3001"), OWN)
    assert CSRFGuard([]).refuses("POST", h(Origin="https://partner.example"), OWN)


def test_referer_used_when_origin_absent(guard: CSRFGuard) -> None:
    assert guard.refuses("POST", h(Referer="https://evil.example/page?x=1"), OWN)
    assert not guard.refuses("POST", h(Referer="https://app.example/form#top"), OWN)
    assert not guard.refuses("POST", h(Referer="https://partner.example/x"), OWN)


def test_origin_wins_over_referer(guard: CSRFGuard) -> None:
    assert guard.refuses("POST", h(Origin="https://evil.example", Referer="https://app.example/"), OWN)
    assert not guard.refuses("POST", h(Origin=OWN, Referer="https://evil.example/"), OWN)


def test_neither_header_is_allowed(guard: CSRFGuard) -> None:
    # Old clients and curl send neither; browsers that can be tricked always send one.
    assert not guard.refuses("POST", h(Content_Type="application/json"), OWN)
    assert not guard.refuses("DELETE", [], OWN)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://app.example", "https://app.example"),
        ("https://app.example/", "https://app.example"),
        ("https://App.EXAMPLE:443/a/b?c#d", "https://app.example"),
        ("http://app.example:80", "http://app.example"),
        ("http://app.example:8080", "http://app.example:8080"),
        ("https://app.example:80", "https://app.example:80"),
        ("https://user:pw@app.example/", "https://app.example"),
        ("  https://app.example  ", "https://app.example"),
        ("http://[::1]:8080/x", "http://[::1]:8080"),
        ("http://[::1]", "http://[::1]"),
        ("ftp://files.example:21", "ftp://files.example:21"),
        ("null", None),
        ("", None),
        ("/relative/path", None),
        ("app.example", None),
        ("https://", None),
        ("https://app.example:99999", None),
        ("https://app.example:port", None),
        ("http://[::1", None),
    ],
)
def test_origin_of(url: str, expected: str | None) -> None:
    assert origin_of(url) == expected


def test_origins_trusted_by_a_routes_cors_pass_even_cross_site_and_no_other_does(guard: CSRFGuard) -> None:
    trusted = frozenset({"https://spa.example"})
    cross = h(Sec_Fetch_Site="cross-site", Origin="https://spa.example")
    assert guard.refuses("POST", cross, OWN)  # without the route's trust: a forgery like any other
    assert not guard.refuses("POST", cross, OWN, trusted)
    assert guard.refuses("POST", h(Sec_Fetch_Site="cross-site", Origin="https://evil.example"), OWN, trusted)
    # Only Origin earns the trust: a Referer from the SPA is not enough.
    assert guard.refuses("POST", h(Sec_Fetch_Site="cross-site", Referer="https://spa.example/app"), OWN, trusted)
