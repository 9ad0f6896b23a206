"""gateway.cookies: the gateway's two cookies, read from requests and written on responses."""

from __future__ import annotations

import pytest

from gateway.config import CookiesConfig, CookieSpec, RefreshCookieSpec
from gateway.cookies import MAX_COOKIE_BYTES, CookieJar
from gateway.errors import CookieTooLarge
from gateway.sealing import Sealer

SEALER = Sealer("cookie-tests-store-secret")


@pytest.fixture
def jar() -> CookieJar:
    return CookieJar.from_config(CookiesConfig(), SEALER)


@pytest.fixture
def plain() -> CookieJar:
    return CookieJar.from_config(CookiesConfig(secure=False, same_site="strict"), SEALER)


@pytest.fixture
def raw() -> CookieJar:
    """cookies.refresh.sealed: false"""
    return CookieJar.from_config(CookiesConfig(refresh=RefreshCookieSpec(name="gw_refresh", sealed=False)), SEALER)


def attrs(cookie: bytes) -> list[str]:
    return [part.strip() for part in cookie.decode().split(";")]


def test_secure_cookies_get_the_host_prefix(jar: CookieJar) -> None:
    assert (jar.access_name, jar.refresh_name) == ("__Host-gw_access", "__Host-gw_refresh")
    assert jar.bare_names == ("gw_access", "gw_refresh")


def test_no_prefix_without_secure(plain: CookieJar) -> None:
    assert (plain.access_name, plain.refresh_name) == ("gw_access", "gw_refresh")


def test_set_cookie_attributes(jar: CookieJar) -> None:
    parts = attrs(jar.set_refresh("r.t.k"))
    assert parts[0] == "__Host-gw_refresh=" + SEALER.seal_cookie("r.t.k", "__Host-gw_refresh")
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
    config = CookiesConfig(
        access=CookieSpec(name="sess", max_age=300), refresh=RefreshCookieSpec(name="rt"), same_site="none"
    )
    jar = CookieJar.from_config(config, SEALER)
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


# --- the sealed refresh cookie (issue 14, item 10) ----------------------------------------------------

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"


def value_of(cookie: bytes) -> str:
    return cookie.split(b";", 1)[0].split(b"=", 1)[1].decode()


def test_the_refresh_cookie_holds_the_token_sealed(jar: CookieJar) -> None:
    value = value_of(jar.set_refresh(TOKEN))
    assert TOKEN not in value and "eyJ" not in value
    assert jar.open_refresh(value) == TOKEN
    # Read back from a request, as a browser sends it.
    _, refresh = jar.read([(b"cookie", jar.set_refresh(TOKEN).split(b";", 1)[0])])
    assert refresh is not None and jar.open_refresh(refresh) == TOKEN


def test_one_token_always_seals_to_the_same_cookie(jar: CookieJar) -> None:
    # Concurrent requests handed the same successor, on any worker, set byte-identical cookies.
    assert jar.set_refresh(TOKEN) == jar.set_refresh(TOKEN)
    other = CookieJar.from_config(CookiesConfig(), Sealer("cookie-tests-store-secret"))
    assert other.set_refresh(TOKEN) == jar.set_refresh(TOKEN)
    assert value_of(jar.set_refresh(TOKEN)) != value_of(jar.set_refresh(TOKEN + "x"))


def test_a_cookie_sealed_for_another_name_or_secret_does_not_open(jar: CookieJar, plain: CookieJar) -> None:
    assert plain.open_refresh(value_of(jar.set_refresh(TOKEN))) is None  # gw_refresh vs __Host-gw_refresh
    foreign = CookieJar.from_config(CookiesConfig(), Sealer("another-secret"))
    assert jar.open_refresh(value_of(foreign.set_refresh(TOKEN))) is None
    assert jar.open_refresh(TOKEN) is None  # a raw token, as set before sealing
    assert jar.open_refresh(SEALER.seal_cookie(TOKEN, jar.access_name)) is None


def test_the_size_check_measures_the_sealed_cookie(jar: CookieJar, raw: CookieJar) -> None:
    token = "r" * (jar.max_total - len("a.b.c"))  # fits exactly when raw
    assert len(raw.session("a.b.c", token, 60)) == 2
    with pytest.raises(CookieTooLarge, match="use session: {mode: server}"):
        jar.session("a.b.c", token, 60)


def test_raw_refresh_cookies_when_sealing_is_off(raw: CookieJar) -> None:
    assert not raw.sealed
    assert value_of(raw.set_refresh(TOKEN)) == TOKEN
    assert raw.open_refresh("anything") == "anything"


# --- big tokens: numbered cookies (issue 16, item 2) ---------------------------------------------------

BIG = "eyJhbGciOiJSUzI1NiJ9." + "x" * 7000 + ".sig"  # an Entra ID access token with many groups


def pairs(cookies: list[bytes]) -> bytes:
    """The Cookie header a browser sends back for these Set-Cookie values (cleared ones dropped)."""
    return b"; ".join(c.split(b";", 1)[0] for c in cookies if b"Max-Age=0" not in c)


def names(cookies: list[bytes]) -> list[str]:
    return [c.split(b"=", 1)[0].decode() for c in cookies]


def cleared(cookies: list[bytes]) -> list[str]:
    return sorted(c.split(b"=", 1)[0].decode() for c in cookies if b"Max-Age=0" in c)


def test_a_cookie_over_the_browser_limit_goes_out_as_numbered_cookies_each_under_it(jar: CookieJar) -> None:
    cookies = jar.expand(jar.session(BIG, TOKEN, 60), [])
    assert names(cookies) == ["__Host-gw_access_0", "__Host-gw_access_1", "__Host-gw_refresh"]
    assert all(len(c) < MAX_COOKIE_BYTES for c in cookies)
    for cookie in cookies:  # every chunk keeps the cookie's attributes (the __Host- rules hold for each)
        assert {"Path=/", "HttpOnly", "SameSite=Lax", "Secure"} <= set(attrs(cookie))
    assert jar.read([(b"cookie", pairs(cookies))]) == (BIG, SEALER.seal_cookie(TOKEN, jar.refresh_name))


def test_a_big_sealed_refresh_cookie_is_split_and_opens_once_joined(jar: CookieJar) -> None:
    token = "r." + "y" * 5000
    cookies = jar.expand([jar.set_refresh(token, 60)], [])
    assert names(cookies) == ["__Host-gw_refresh_0", "__Host-gw_refresh_1"]
    assert all(len(c) < MAX_COOKIE_BYTES and "Max-Age=60" in attrs(c) for c in cookies)
    _, refresh = jar.read([(b"cookie", pairs(cookies))])
    assert refresh is not None and jar.open_refresh(refresh) == token


def test_a_cookie_that_fits_stays_one_cookie_named_as_ever(jar: CookieJar) -> None:
    assert jar.expand([jar.set_access("a.b.c")], []) == [jar.set_access("a.b.c")]
    largest = "t" * (MAX_COOKIE_BYTES - 1 - len(jar.set_access("")))
    assert jar.expand([jar.set_access(largest)], []) == [jar.set_access(largest)]
    assert names(jar.expand([jar.set_access(largest + "t")], [])) == ["__Host-gw_access_0", "__Host-gw_access_1"]


def test_a_cookie_that_shrinks_back_clears_the_chunks_the_request_carried(jar: CookieJar) -> None:
    big = jar.expand([jar.set_access("z" * 9000)], [])
    request = [(b"cookie", b"theme=dark; " + pairs(big))]
    assert len(big) == 3
    cookies = jar.expand([jar.set_access("a.b.c")], request)
    assert names(cookies)[0] == "__Host-gw_access" and value_of(cookies[0]) == "a.b.c"
    assert cleared(cookies) == ["__Host-gw_access_0", "__Host-gw_access_1", "__Host-gw_access_2"]
    # Fewer chunks than before: the last one goes, and so does a plain cookie (it would read as garbage beside them).
    fewer = jar.expand([jar.set_access(BIG)], [(b"cookie", pairs(big) + b"; __Host-gw_access=old")])
    assert [n for n in names(fewer) if n not in cleared(fewer)] == ["__Host-gw_access_0", "__Host-gw_access_1"]
    assert cleared(fewer) == ["__Host-gw_access", "__Host-gw_access_2"]
    assert jar.read([(b"cookie", pairs(fewer))])[0] == BIG


def test_clearing_a_cookie_clears_every_chunk_the_request_carried(jar: CookieJar) -> None:
    request = [(b"cookie", pairs(jar.expand([jar.set_access(BIG), jar.set_refresh("r." + "y" * 5000)], [])))]
    cookies = jar.expand([jar.clear_access(), jar.clear_refresh()], request)
    assert cleared(cookies) == sorted(names(cookies))
    assert cleared(cookies) == [
        "__Host-gw_access",
        "__Host-gw_access_0",
        "__Host-gw_access_1",
        "__Host-gw_refresh",
        "__Host-gw_refresh_0",
        "__Host-gw_refresh_1",
    ]
    # Nothing carried: the plain names only, as before.
    assert jar.expand([jar.clear_access()], []) == [jar.clear_access()]


def test_other_set_cookies_pass_through_expand(jar: CookieJar) -> None:
    assert jar.expand([b"gw_oidc=; Max-Age=0"], [(b"cookie", b"__Host-gw_access_0=x")]) == [b"gw_oidc=; Max-Age=0"]


@pytest.mark.parametrize(
    "cookie",
    [
        b"__Host-gw_access_1=b",  # chunk 0 missing
        b"__Host-gw_access_0=a; __Host-gw_access_2=c",  # a gap
        b"__Host-gw_access_0=a; __Host-gw_access_0=a; __Host-gw_access_1=b",  # a duplicate
        b"__Host-gw_access_0=a; __Host-gw_access_00=a",  # the same chunk spelled twice
        b"__Host-gw_access=ab; __Host-gw_access_0=a; __Host-gw_access_1=b",  # both plain and chunks
        b"__Host-gw_access_0=a; __Host-gw_access_1=",  # an empty chunk
        b"__Host-gw_access_0=a; __Host-gw_access_1=\xff",  # a chunk that is not ASCII
        b"__Host-gw_access_0=a; __Host-gw_access_1000=b",  # an index past any the gateway writes
    ],
)
def test_broken_chunks_read_as_absent_and_are_all_cleared(jar: CookieJar, cookie: bytes) -> None:
    request = [(b"cookie", cookie + b"; __Host-gw_refresh=r")]
    assert jar.read(request) == (None, "r")
    sent = {part.split(b"=", 1)[0].decode() for part in cookie.split(b"; ")}
    assert set(cleared(jar.expand([jar.clear_access()], request))) == sent | {"__Host-gw_access"}


def test_chunks_are_joined_in_order_across_headers(jar: CookieJar) -> None:
    headers = [(b"cookie", b"__Host-gw_access_1=b; x=1"), (b"cookie", b"__Host-gw_access_0=a")]
    assert jar.read(headers) == ("ab", None)
    assert jar.read([(b"cookie", b"gw_access_0=a; gw_access_1=b")]) == (None, None)  # no __Host-: not ours


def test_joined_values_past_max_total_read_as_absent(jar: CookieJar) -> None:
    chunk = b"x" * 4000
    many = b"; ".join(b"__Host-gw_access_%d=%s" % (n, chunk) for n in range(4))  # 16000 bytes > 12288
    assert jar.read([(b"cookie", many)]) == (None, None)


def test_max_total_counts_both_values_together(jar: CookieJar) -> None:
    small = CookieJar.from_config(CookiesConfig(max_total=9000), SEALER)
    sealed = len(SEALER.seal_cookie(TOKEN, small.refresh_name))
    assert len(small.session("a" * (9000 - sealed), TOKEN, 60)) == 2
    with pytest.raises(CookieTooLarge, match=f"tokens of {9001} bytes do not fit in cookies"):
        small.session("a" * (9001 - sealed), TOKEN, 60)
