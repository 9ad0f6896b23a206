"""gateway.headers: strip-then-inject rules for requests and responses."""

from __future__ import annotations

import pytest

from gateway.headers import HeaderRules

Headers = list[tuple[bytes, bytes]]


@pytest.fixture
def rules() -> HeaderRules:
    return HeaderRules(
        strip_patterns=["X-Auth-*"],
        identity_names=[b"x-auth-user", b"x-user-id", b"remote-user"],
        cookie_names=("gw_access", "gw_refresh"),
        trusted_proxies=["10.0.0.0/8", "192.168.1.1"],
    )


def inbound(rules: HeaderRules, headers: Headers, client: str | None = "203.0.113.9", scheme: str = "https") -> Headers:
    return encoded(rules.inbound(headers, client=client, scheme=scheme, host=dict(headers).get(b"host")))


def encoded(headers: list[tuple[str, str]]) -> Headers:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]


def names(headers: Headers) -> list[bytes]:
    return [n for n, _ in headers]


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


# --- inbound: identity headers belong to the gateway ---


@pytest.mark.parametrize(
    "name",
    [b"x-auth-user", b"x-auth-roles", b"x_auth_user", b"x.auth.user", b"x-auth_user", b"x_auth.roles", b"x-auth-"],
)
def test_spoofed_identity_headers_removed_in_every_spelling(rules: HeaderRules, name: bytes) -> None:
    out = inbound(rules, [(b"host", b"app.example"), (name, b"admin"), (b"accept", b"*/*")])
    assert name not in names(out)
    assert b"admin" not in [v for _, v in out]
    assert values(out, b"accept") == [b"*/*"]


def test_spoofed_identity_headers_removed_case_insensitively(rules: HeaderRules) -> None:
    # ASGI servers lower-case names, but a raw or hand-built scope may not.
    out = inbound(rules, [(b"X-Auth-User", b"admin"), (b"X_AUTH_USER", b"admin"), (b"X.Auth.User", b"admin")])
    assert b"admin" not in [v for _, v in out]


def test_duplicate_spoofed_headers_all_removed(rules: HeaderRules) -> None:
    out = inbound(rules, [(b"x-auth-user", b"a"), (b"x-auth-user", b"b"), (b"x_auth_user", b"c")])
    assert not any(n.replace(b"_", b"-") == b"x-auth-user" for n in names(out))


@pytest.mark.parametrize(
    "name",
    [b"http-x-auth-user", b"HTTP_X_AUTH_USER", b"http.x-auth-roles", b"http-http-x-auth-user", b"http-remote-user"],
)
def test_identity_headers_behind_an_http_prefix_removed(rules: HeaderRules, name: bytes) -> None:
    """Regression: Django 5.2 under ASGI reads RemoteUserMiddleware.header = "HTTP_X_AUTH_USER" as the META key
    HTTP_HTTP_X_AUTH_USER (tickets #36300, #37079), i.e. a client's "HTTP-X-Auth-User" header."""
    out = inbound(rules, [(name, b"admin"), (b"http-x-other", b"kept")])
    assert b"admin" not in [v for _, v in out]
    assert values(out, b"http-x-other") == [b"kept"]


@pytest.mark.parametrize("name", [b"x-user-id", b"x_user_id", b"remote-user", b"remote_user", b"remote.user"])
def test_identity_header_names_outside_strip_patterns_removed(rules: HeaderRules, name: bytes) -> None:
    out = inbound(rules, [(name, b"admin"), (b"x-user-agent-ish", b"kept")])
    assert name not in names(out)
    assert values(out, b"x-user-agent-ish") == [b"kept"]


def test_unrelated_headers_kept_in_order(rules: HeaderRules) -> None:
    headers = [(b"host", b"app.example"), (b"accept", b"a"), (b"x-authorization-hint", b"b"), (b"accept", b"c")]
    out = inbound(rules, headers)
    assert [h for h in out if not h[0].startswith(b"x-forwarded")] == headers


def test_no_strip_patterns_still_strips_identity_names() -> None:
    rules = HeaderRules(strip_patterns=[], identity_names=[b"x-auth-user"], cookie_names=(), trusted_proxies=[])
    out = encoded(
        rules.inbound([(b"x_auth_user", b"admin"), (b"x-auth-other", b"kept")], client=None, scheme="http", host=None)
    )
    assert names(out)[:1] == [b"x-auth-other"]


# --- inbound: hop-by-hop and Connection ---


@pytest.mark.parametrize(
    "name",
    [
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ],
)
def test_hop_by_hop_removed(rules: HeaderRules, name: bytes) -> None:
    out = inbound(rules, [(name, b"x"), (b"accept", b"*/*")])
    assert name not in names(out)


def test_connection_listed_headers_removed(rules: HeaderRules) -> None:
    headers = [
        (b"connection", b"close, X-Foo"),
        (b"connection", b"x-bar"),
        (b"x-foo", b"1"),
        (b"x-bar", b"2"),
        (b"x-baz", b"3"),
    ]
    out = inbound(rules, headers)
    assert b"x-foo" not in names(out) and b"x-bar" not in names(out)
    assert values(out, b"x-baz") == [b"3"]


def test_connection_never_removes_the_host_or_the_request_id(rules: HeaderRules) -> None:
    # "Connection: Host" made the upstream get its own address as Host: another virtual host than the one routed.
    headers = [(b"host", b"app.example"), (b"connection", b"Host, X-Request-ID, x-foo"), (b"x-request-id", b"abc")]
    out = inbound(rules, headers + [(b"x-foo", b"1")])
    assert values(out, b"host") == [b"app.example"] and values(out, b"x-request-id") == [b"abc"]
    assert b"x-foo" not in names(out)


def test_another_spelling_of_x_request_id_is_removed(rules: HeaderRules) -> None:
    # Django under ASGI reads X_Request_ID as HTTP_X_REQUEST_ID and joins it with the gateway's X-Request-ID.
    out = inbound(rules, [(b"x_request_id", b"forged"), (b"x.request.id", b"forged"), (b"x-request-id", b"abc")])
    assert names(out).count(b"x-request-id") == 1 and b"x_request_id" not in names(out)
    assert b"x.request.id" not in names(out)


# --- inbound: gateway cookies ---


@pytest.mark.parametrize(
    ("cookie", "kept"),
    [
        (b"gw_access=tok; theme=dark; gw_refresh=r", b"theme=dark"),
        (b"__Host-gw_access=tok;sid=1;__Host-gw_refresh=r", b"sid=1"),
        (b"a=1; __Host-gw_access=tok; b=2", b"a=1; b=2"),
        (b"gw_access_other=1", b"gw_access_other=1"),
        # A big token's numbered cookies (issue 16): the upstream never sees a chunk either.
        (b"__Host-gw_access_0=t1; a=1; __Host-gw_access_1=t2; __Host-gw_refresh_0=r", b"a=1"),
        (b"gw_access_12=t; gw_refresh_3=r; gw_refresh_x=1; gw_refresh_=2", b"gw_refresh_x=1; gw_refresh_=2"),
    ],
)
def test_gateway_cookies_removed_from_cookie_header(rules: HeaderRules, cookie: bytes, kept: bytes) -> None:
    out = inbound(rules, [(b"cookie", cookie)])
    assert values(out, b"cookie") == [kept]


def test_cookie_header_dropped_when_only_gateway_cookies(rules: HeaderRules) -> None:
    out = inbound(rules, [(b"cookie", b"__Host-gw_access=a; gw_refresh=b"), (b"cookie", b"gw_access=c")])
    assert b"cookie" not in names(out)


# --- inbound: X-Forwarded-* ---


def test_forwarded_headers_from_untrusted_client_replaced(rules: HeaderRules) -> None:
    headers = [
        (b"host", b"app.example"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"evil.example"),
        (b"forwarded", b"for=1.2.3.4"),
        (b"x-real-ip", b"1.2.3.4"),
        (b"X_Forwarded_For", b"5.6.7.8"),
    ]
    out = inbound(rules, headers, client="203.0.113.9", scheme="http")
    assert values(out, b"x-forwarded-for") == [b"203.0.113.9"]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"app.example"]
    assert b"forwarded" not in names(out) and b"x-real-ip" not in names(out)
    assert b"1.2.3.4" not in b"".join(v for _, v in out) and b"5.6.7.8" not in b"".join(v for _, v in out)


@pytest.mark.parametrize("proxy", ["10.1.2.3", "192.168.1.1"])
def test_forwarded_headers_from_trusted_proxy_kept_and_appended(rules: HeaderRules, proxy: str) -> None:
    headers = [
        (b"host", b"internal:8080"),
        (b"x-forwarded-for", b"198.51.100.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"app.example"),
    ]
    out = inbound(rules, headers, client=proxy, scheme="http")
    assert values(out, b"x-forwarded-for") == [b"198.51.100.7, " + proxy.encode()]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"app.example"]


def test_address_next_to_trusted_cidr_is_not_trusted(rules: HeaderRules) -> None:
    out = inbound(rules, [(b"x-forwarded-for", b"1.2.3.4")], client="192.168.1.2")
    assert values(out, b"x-forwarded-for") == [b"192.168.1.2"]


def test_no_proxy_trusted_by_default() -> None:
    rules = HeaderRules(strip_patterns=["X-Auth-*"], identity_names=[], cookie_names=(), trusted_proxies=[])
    out = encoded(rules.inbound([(b"x-forwarded-for", b"1.2.3.4")], client="127.0.0.1", scheme="http", host=None))
    assert values(out, b"x-forwarded-for") == [b"127.0.0.1"]


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", [b"1.2.3.4"], "203.0.113.9"),  # an untrusted peer says what it likes: ignored
        ("10.1.2.3", [b"198.51.100.7"], "198.51.100.7"),
        ("10.1.2.3", [b"6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # the client's own claim (6.6.6.6) is not believed
        ("10.1.2.3", [b"6.6.6.6, 198.51.100.7, 10.9.9.9"], "198.51.100.7"),  # through two trusted proxies
        ("10.1.2.3", [b"6.6.6.6", b"198.51.100.7"], "198.51.100.7"),  # two headers read as one list
        ("10.1.2.3", [b"10.9.9.9"], "10.9.9.9"),  # only trusted hops: the first of them
        ("10.1.2.3", [], "10.1.2.3"),
        (None, [], None),
    ],
)
def test_client_address_after_trusted_proxies(
    rules: HeaderRules, peer: str | None, forwarded: list[bytes], client: str | None
) -> None:
    headers = [(b"x-forwarded-for", value) for value in forwarded]
    assert rules.client(headers, peer) == client


def test_forwarded_headers_without_client_or_host(rules: HeaderRules) -> None:
    out = encoded(rules.inbound([], client=None, scheme="https", host=None))
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert b"x-forwarded-host" not in names(out)


# --- outbound ---


def test_outbound_hop_by_hop_and_connection_listed_removed(rules: HeaderRules) -> None:
    headers = [
        (b"content-type", b"text/plain"),
        (b"connection", b"keep-alive, X-Internal"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"x-internal", b"secret"),
        (b"x-public", b"ok"),
    ]
    out = rules.outbound(headers, "app")
    assert out == [(b"content-type", b"text/plain"), (b"x-public", b"ok")]


def test_outbound_connection_header_with_original_case() -> None:
    """Regression: upstream raw headers keep their case; "Connection: X-Internal" must still remove X-Internal."""
    rules = HeaderRules(strip_patterns=[], identity_names=[], cookie_names=(), trusted_proxies=[])
    headers = [(b"Connection", b"X-Internal"), (b"X-Internal", b"secret"), (b"Content-Type", b"text/plain")]
    assert rules.outbound(headers, "app") == [(b"content-type", b"text/plain")]


def test_outbound_gateway_set_cookie_dropped_others_kept(rules: HeaderRules) -> None:
    headers = [
        (b"Set-Cookie", b"gw_access=evil; Path=/"),
        (b"set-cookie", b"__Host-gw_refresh=evil; Path=/; Secure"),
        (b"set-cookie", b"sessionid=abc; HttpOnly"),
        (b"set-cookie", b"gw_access_x=1"),
        (b"set-cookie", b"__Host-gw_access_0=evil; Path=/; Secure"),  # a chunk of a big cookie (issue 16)
        (b"set-cookie", b"gw_refresh_1=evil"),
    ]
    out = rules.outbound(headers, "app")
    assert out == [(b"set-cookie", b"sessionid=abc; HttpOnly"), (b"set-cookie", b"gw_access_x=1")]


def test_outbound_accepts_an_iterator(rules: HeaderRules) -> None:
    headers = iter([(b"connection", b"x-a"), (b"x-a", b"1"), (b"x-b", b"2")])
    assert rules.outbound(headers, "app") == [(b"x-b", b"2")]


# --- inbound: the whole proxy-header family (issue 14, point 3) ---


@pytest.mark.parametrize(
    "name",
    [
        b"X-Forwarded-Port",
        b"X-Forwarded-Prefix",
        b"X-Forwarded-Ssl",
        b"X-Forwarded-Scheme",
        b"X-Forwarded-Server",
        b"X-Forwarded-Uri",
        b"X-Original-URL",
        b"X_Rewrite_URL",
        b"X-Original-Host",
        b"X-Host",
        b"X-Client-IP",
        b"True-Client-IP",
        b"X-HTTP-Method-Override",
    ],
)
@pytest.mark.parametrize("client", ["203.0.113.9", "10.1.2.3"], ids=["untrusted", "trusted proxy"])
def test_proxy_headers_never_reach_the_upstream(rules: HeaderRules, name: bytes, client: str) -> None:
    sent = inbound(rules, [(b"host", b"gw.example"), (name.lower(), b"/admin/secret"), (b"accept", b"*/*")], client)
    assert name.lower().replace(b"_", b"-") not in names(sent)
    assert b"/admin/secret" not in [v for _, v in sent]
    assert (b"accept", b"*/*") in sent


# --- outbound: a nameless Set-Cookie is one the browser sends back under the name in its value ---


@pytest.mark.parametrize("value", [b"=gw_access=x", b" =gw_refresh=x; Path=/", b"=x"])
def test_nameless_upstream_cookies_are_dropped(rules: HeaderRules, value: bytes) -> None:
    out = rules.outbound([(b"Set-Cookie", value), (b"Set-Cookie", b"app=1")], "app")
    assert out == [(b"set-cookie", b"app=1")]


def test_an_app_may_set_the_refresh_cookie_only_when_it_is_not_sealed() -> None:
    # cookies.refresh.sealed: false is for apps that issue the raw refresh cookie themselves (dj-rest-auth).
    raw = HeaderRules(
        strip_patterns=[], identity_names=[], cookie_names=("gw_access", "gw_refresh"), trusted_proxies=[],
        app_cookies=("gw_refresh",),
    )  # fmt: skip
    answer = [
        (b"Set-Cookie", b"gw_refresh=raw; HttpOnly"),
        (b"Set-Cookie", b"gw_access=x"),
        (b"Set-Cookie", b"=gw_refresh=x"),
    ]
    assert raw.outbound(answer, "app") == [(b"set-cookie", b"gw_refresh=raw; HttpOnly")]
    sealed = HeaderRules(
        strip_patterns=[], identity_names=[], cookie_names=("gw_access", "gw_refresh"), trusted_proxies=[]
    )
    assert sealed.outbound(answer, "app") == []
