"""gateway.cookies: the gateway's two cookies, read from requests and written on responses."""

from __future__ import annotations

import pytest

from gateway.config import CookiesConfig, CookieSpec
from gateway.cookies import CookieJar


@pytest.fixture
def jar() -> CookieJar:
    return CookieJar.from_config(CookiesConfig())


@pytest.fixture
def plain() -> CookieJar:
    return CookieJar.from_config(CookiesConfig(secure=False, same_site="strict"))


def attrs(cookie: bytes) -> list[str]:
    return [part.strip() for part in cookie.decode().split(";")]


def test_secure_cookies_get_the_host_prefix(jar: CookieJar) -> None:
    assert (jar.access_name, jar.refresh_name) == ("__Host-gw_access", "__Host-gw_refresh")
    assert jar.bare_names == ("gw_access", "gw_refresh")


def test_no_prefix_without_secure(plain: CookieJar) -> None:
    assert (plain.access_name, plain.refresh_name) == ("gw_access", "gw_refresh")


def test_set_cookie_attributes(jar: CookieJar) -> None:
    parts = attrs(jar.set_refresh("r.t.k"))
    assert parts[0] == "__Host-gw_refresh=r.t.k"
    assert {"Path=/", "HttpOnly", "SameSite=Lax", "Secure", "Max-Age=1209600"} <= set(parts)
    assert not any(p.startswith("Domain") for p in parts)  # __Host- forbids Domain


def test_access_cookie_is_a_session_cookie_by_default(jar: CookieJar) -> None:
    parts = attrs(jar.set_access("a.b.c"))
    assert parts[0] == "__Host-gw_access=a.b.c"
    assert not any(p.startswith("Max-Age") for p in parts)
    assert {"Path=/", "HttpOnly", "Secure"} <= set(parts)
    assert "Max-Age=60" in attrs(jar.set_access("a.b.c", max_age=60))


def test_plain_cookie_attributes(plain: CookieJar) -> None:
    parts = attrs(plain.set_access("x"))
    assert parts[0] == "gw_access=x"
    assert "Secure" not in parts and "SameSite=Strict" in parts and "HttpOnly" in parts


def test_configured_names_and_max_age() -> None:
    config = CookiesConfig(access=CookieSpec(name="sess", max_age=300), refresh=CookieSpec(name="rt"), same_site="none")
    jar = CookieJar.from_config(config)
    access = attrs(jar.set_access("v"))
    assert access[0] == "__Host-sess=v" and "Max-Age=300" in access and "SameSite=None" in access
    assert not any(p.startswith("Max-Age") for p in attrs(jar.set_refresh("v")))


def test_clear_cookies_expire_at_once(jar: CookieJar) -> None:
    for cookie, name in ((jar.clear_access(), "__Host-gw_access"), (jar.clear_refresh(), "__Host-gw_refresh")):
        parts = attrs(cookie)
        assert parts[0] == f"{name}="
        assert "Max-Age=0" in parts and "Path=/" in parts and "Secure" in parts


# --- read ---


def test_read_both(jar: CookieJar) -> None:
    headers = [(b"cookie", b"theme=dark; __Host-gw_access=a.b.c; __Host-gw_refresh=r1")]
    assert jar.read(headers) == ("a.b.c", "r1")


def test_read_across_several_cookie_headers(jar: CookieJar) -> None:
    headers = [(b"cookie", b"__Host-gw_access=a.b.c"), (b"accept", b"*/*"), (b"cookie", b"__Host-gw_refresh=r1")]
    assert jar.read(headers) == ("a.b.c", "r1")


def test_absent(jar: CookieJar) -> None:
    assert jar.read([]) == (None, None)
    assert jar.read([(b"cookie", b"other=1")]) == (None, None)


def test_unprefixed_name_not_read_when_secure(jar: CookieJar) -> None:
    # Only the __Host- cookie is trusted: a subdomain can set a plain gw_access, never a __Host- one.
    assert jar.read([(b"cookie", b"gw_access=a.b.c; gw_refresh=r")]) == (None, None)


def test_duplicated_cookie_is_absent(jar: CookieJar) -> None:
    headers = [(b"cookie", b"__Host-gw_access=one; __Host-gw_access=two; __Host-gw_refresh=r")]
    assert jar.read(headers) == (None, "r")
    split = [(b"cookie", b"__Host-gw_refresh=a"), (b"cookie", b"__Host-gw_refresh=b")]
    assert jar.read(split) == (None, None)


@pytest.mark.parametrize(
    "cookie",
    [
        b"__Host-gw_access",
        b"__Host-gw_access=",
        b'__Host-gw_access=""',  # regression: a quoted empty value was read as an empty token
        b"__Host-gw_access=\xff\xfe",
        b"__Host-gw_access=a\x01b",
        b";;;==;",
        b"\x00\x00",
    ],
)
def test_garbage_is_absent_never_an_error(jar: CookieJar, cookie: bytes) -> None:
    assert jar.read([(b"cookie", cookie)])[0] is None


def test_quoted_value_is_unquoted(jar: CookieJar) -> None:
    assert jar.read([(b"cookie", b'__Host-gw_access="a.b.c"')])[0] == "a.b.c"


def test_cookie_round_trip(plain: CookieJar) -> None:
    set_cookie = plain.set_access("eyJ.eyJ.sig")
    pair = set_cookie.split(b";", 1)[0]
    assert plain.read([(b"cookie", pair)]) == ("eyJ.eyJ.sig", None)
