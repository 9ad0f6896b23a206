"""{prefix}/auth in-process: the front proxy's question answered with proxy mode's rules (gateway/forwardauth.py)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest
from support.fakes import RecordingUpstream

from gateway.app import Gateway, create_app
from gateway.config import parse_config

SECRET = "forward-auth-tests-secret-0123456789abcdef"
NGINX = "127.0.0.1"  # ASGITransport's client address: the trusted front proxy
ADMIN = {"sub": "alice", "roles": ["admin"], "email": "alice@example.test"}


def config(**server: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": False, "trusted_proxies": [NGINX], **server},
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "cookies": {"secure": False},
        "login": {"url": "https://login.example/?next={next}"},
        "routes": [
            {
                "name": "admin",
                "path": "/admin/",
                "upstream": "http://127.0.0.1:9",
                "require": {"claims": {"roles": "admin"}},
            },
            {"name": "public", "path": "/public/", "upstream": "http://127.0.0.1:9", "auth": "none"},
            {"name": "reports", "path": "/reports/", "upstream": "http://127.0.0.1:9", "methods": ["GET"]},
            {"name": "other-host", "path": "/", "host": "other.example", "upstream": "http://127.0.0.1:9"},
            {"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"},
        ],
    }


@pytest.fixture
def upstream() -> RecordingUpstream:
    return RecordingUpstream()


@pytest.fixture
def gateway(upstream: RecordingUpstream) -> Gateway:
    return create_app(parse_config(config()), forwarder=upstream)


def token(**claims: Any) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256")


async def ask(
    app: Gateway,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    path: str = "/.gateway/auth",
    method: str = "GET",
    client: tuple[str, int] = (NGINX, 4000),
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://app.example") as http:
        return await http.request(method, path, headers=headers)


def nginx(uri: str, method: str = "GET", **headers: str) -> dict[str, str]:
    return {"X-Original-URI": uri, "X-Original-Method": method, **headers}


def traefik(uri: str, method: str = "GET", host: str = "app.example", **headers: str) -> dict[str, str]:
    return {"X-Forwarded-Uri": uri, "X-Forwarded-Method": method, "X-Forwarded-Host": host, **headers}


async def test_a_valid_token_gets_200_with_the_identity_headers_and_nothing_is_forwarded(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    answer = await ask(gateway, nginx("/admin/users?page=2", Authorization=f"Bearer {token(**ADMIN)}"))
    assert answer.status_code == 200
    assert answer.headers["x-auth-user"] == "alice"
    assert answer.headers["x-auth-roles"] == "admin"
    assert answer.headers["x-auth-email"] == "alice@example.test"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.content == b""
    assert upstream.seen == []


async def test_no_token_is_401_and_a_browser_on_nginx_gets_the_login_url_in_location(gateway: Gateway) -> None:
    plain = await ask(gateway, nginx("/admin/"))
    assert plain.status_code == 401
    assert plain.json()["reason"] == "no_token"
    browser = await ask(gateway, nginx("/admin/x?y=1", **{"Sec-Fetch-Mode": "navigate"}))
    # auth_request takes only 2xx/401/403: the redirect rides on the 401 for error_page to use.
    assert browser.status_code == 401
    assert browser.headers["location"] == "https://login.example/?next=%2Fadmin%2Fx%3Fy%3D1"


async def test_a_browser_behind_traefik_or_caddy_gets_the_redirect_itself(gateway: Gateway) -> None:
    answer = await ask(gateway, traefik("/admin/x", **{"Sec-Fetch-Mode": "navigate"}))
    assert answer.status_code == 302
    assert answer.headers["location"] == "https://login.example/?next=%2Fadmin%2Fx"


async def test_claims_that_fail_the_route_rule_are_403(gateway: Gateway) -> None:
    bearer = f"Bearer {token(sub='bob', roles=['viewer'])}"
    assert (await ask(gateway, nginx("/admin/", Authorization=bearer))).status_code == 403
    assert (await ask(gateway, nginx("/elsewhere", Authorization=bearer))).status_code == 200


async def test_an_auth_none_route_is_200_with_empty_identity_headers_even_with_a_token(gateway: Gateway) -> None:
    answer = await ask(gateway, nginx("/public/x", Authorization=f"Bearer {token(**ADMIN)}"))
    assert answer.status_code == 200
    # Present and empty: the proxy that copies them overwrites whatever the client sent.
    assert [answer.headers[name] for name in ("x-auth-user", "x-auth-email", "x-auth-roles")] == ["", "", ""]


async def test_a_missing_claim_is_an_empty_identity_header(gateway: Gateway) -> None:
    answer = await ask(gateway, nginx("/x", Authorization=f"Bearer {token(sub='carol')}"))
    assert answer.headers["x-auth-user"] == "carol"
    assert answer.headers["x-auth-email"] == "" and answer.headers["x-auth-roles"] == ""


async def test_the_original_method_is_checked_against_the_route(gateway: Gateway) -> None:
    bearer = f"Bearer {token(**ADMIN)}"
    assert (await ask(gateway, traefik("/reports/q", "GET", Authorization=bearer))).status_code == 200
    refused = await ask(gateway, traefik("/reports/q", "DELETE", Authorization=bearer))
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET"
    # nginx's auth_request would turn a 405 into a 500 for the client: it gets 403.
    assert (await ask(gateway, nginx("/reports/q", "DELETE", Authorization=bearer))).status_code == 403


async def test_a_cross_site_unsafe_request_on_the_session_cookie_is_refused(gateway: Gateway) -> None:
    cookie = f"gw_access={token(**ADMIN)}"
    forged = nginx("/admin/delete", "POST", Cookie=cookie, Origin="https://evil.example")
    assert (await ask(gateway, forged)).json()["reason"] == "csrf"
    own = nginx("/admin/delete", "POST", Cookie=cookie, Origin="http://app.example")
    assert (await ask(gateway, own)).status_code == 200
    # The original method decides: the same cookie on a GET from anywhere is a safe request.
    assert (
        await ask(gateway, nginx("/admin/", "GET", Cookie=cookie, Origin="https://evil.example"))
    ).status_code == 200


async def test_a_cross_site_websocket_handshake_on_the_session_cookie_is_refused(gateway: Gateway) -> None:
    handshake = {
        "Cookie": f"gw_access={token(**ADMIN)}",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    forged = await ask(gateway, nginx("/admin/socket", Origin="https://evil.example", **handshake))
    assert (forged.status_code, forged.json()["reason"]) == (403, "csrf")
    own = await ask(gateway, nginx("/admin/socket", Origin="http://app.example", **handshake))
    assert (own.status_code, own.headers["x-auth-user"]) == (200, "alice")


async def test_a_revoked_token_is_refused(gateway: Gateway) -> None:
    bearer = {"Authorization": f"Bearer {token(jti='j-9', **ADMIN)}"}
    assert (await ask(gateway, nginx("/admin/", **bearer))).status_code == 200
    await gateway.shared.denylist.deny("j-9", time.time() + 600)
    refused = await ask(gateway, nginx("/admin/", **bearer))
    assert (refused.status_code, refused.json()["reason"]) == (401, "token_revoked")


async def test_the_host_the_proxy_names_picks_the_route(gateway: Gateway) -> None:
    viewer = f"Bearer {token(sub='bob', roles=['viewer'])}"
    # /admin/ on other.example belongs to route other-host, which has no claim rule.
    assert (await ask(gateway, traefik("/admin/", host="other.example", Authorization=viewer))).status_code == 200
    assert (await ask(gateway, traefik("/admin/", host="app.example", Authorization=viewer))).status_code == 403


async def test_forward_auth_headers_from_an_untrusted_peer_are_refused_not_believed(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    answer = await ask(gateway, nginx("/public/x"), client=("192.0.2.7", 4000))
    assert (answer.status_code, answer.json()["reason"]) == (403, "untrusted_proxy")
    assert "not in server.trusted_proxies" in caplog.text


async def test_a_request_that_names_no_original_uri_is_400(gateway: Gateway) -> None:
    answer = await ask(gateway)
    assert (answer.status_code, answer.json()["reason"]) == (400, "invalid_request")
    # A method alone says nothing of where the request goes: not read as "/".
    only_method = await ask(gateway, {"X-Forwarded-Method": "GET"})
    assert (only_method.status_code, only_method.json()["reason"]) == (400, "invalid_request")


async def test_envoy_sends_the_original_path_after_the_endpoint(gateway: Gateway) -> None:
    bearer = {"Authorization": f"Bearer {token(sub='bob', roles=['viewer'])}"}
    assert (await ask(gateway, bearer, path="/.gateway/auth/app/page?x=1")).status_code == 200
    assert (await ask(gateway, bearer, path="/.gateway/auth/admin/")).status_code == 403
    # Envoy keeps the original method on the check request.
    assert (await ask(gateway, bearer, path="/.gateway/auth/reports/x", method="DELETE")).status_code == 405
    # From anyone: the path is the request's own, not a header a proxy vouches for.
    assert (await ask(gateway, bearer, path="/.gateway/auth/app/", client=("192.0.2.7", 1))).status_code == 200


async def test_an_ambiguous_original_path_is_refused(gateway: Gateway) -> None:
    bearer = f"Bearer {token(**ADMIN)}"
    assert (await ask(gateway, nginx("/public/../admin/", Authorization=bearer))).status_code == 403
    answer = await ask(gateway, traefik("/public/%2e%2e/admin/", Authorization=bearer))
    assert (answer.status_code, answer.json()["reason"]) == (400, "bad_path")
    # nginx passes a fragment on to the app, which reads the path before it: /admin, not "/admin#/x".
    viewer = f"Bearer {token(sub='bob', roles=['viewer'])}"
    assert (await ask(gateway, nginx("/admin#/x", Authorization=viewer))).status_code == 403
    answer = await ask(gateway, traefik("/app#/x", Authorization=viewer))
    assert (answer.status_code, answer.json()["reason"]) == (400, "bad_path")


async def test_forward_token_hands_the_verified_token_to_the_proxy(upstream: RecordingUpstream) -> None:
    settings = config()
    settings["identity"] = {"forward_token": True}
    app = create_app(parse_config(settings), forwarder=upstream)
    access = token(**ADMIN)
    answer = await ask(app, nginx("/admin/", Cookie=f"gw_access={access}"))
    assert answer.headers["authorization"] == f"Bearer {access}"
    assert "authorization" not in (await ask(app, nginx("/public/", Cookie=f"gw_access={access}"))).headers


async def test_the_other_internal_endpoints_are_not_shadowed(gateway: Gateway) -> None:
    assert (await ask(gateway, path="/.gateway/health")).status_code == 200
    assert (await ask(gateway, path="/.gateway/authx")).status_code == 404


async def test_a_preflight_on_a_cors_or_preflight_upstream_route_passes_as_nobody(upstream: RecordingUpstream) -> None:
    settings = config()
    settings["routes"][:0] = [
        {
            "name": "spa-api",
            "path": "/api/",
            "upstream": "http://127.0.0.1:9",
            "cors": {"allowed_origins": ["https://spa.example"], "allow_credentials": True},
        },
        {"name": "legacy-api", "path": "/legacy/", "upstream": "http://127.0.0.1:9", "preflight": "upstream"},
    ]
    app = create_app(parse_config(settings), forwarder=upstream)
    preflight = {"Origin": "https://spa.example", "Access-Control-Request-Method": "PUT"}
    for path in ("/api/items", "/legacy/items"):
        answer = await ask(app, nginx(path, "OPTIONS", **preflight))
        assert answer.status_code == 200, path
        assert answer.headers["x-auth-user"] == ""  # never anyone's identity on a preflight
    other = await ask(
        app, traefik("/api/items", "OPTIONS", Origin="https://evil.example", **{"Access-Control-Request-Method": "PUT"})
    )
    assert (other.status_code, other.json()["reason"]) == (403, "cors_origin")
    # Without cors or preflight: upstream, a preflight needs a session like any request.
    assert (await ask(app, nginx("/elsewhere", "OPTIONS", **preflight))).status_code == 401


async def test_the_signed_assertion_rides_on_the_200_for_the_proxy_to_copy(
    upstream: RecordingUpstream, tmp_path: Any
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "assertion.pem").write_bytes(pem)
    settings = config()
    settings["identity"] = {"assertion": {"private_key_file": str(tmp_path / "assertion.pem")}}
    app = create_app(parse_config(settings), forwarder=upstream)
    answer = await ask(
        app, nginx("/admin/", Authorization=f"Bearer {token(**ADMIN)}", **{"X-Gateway-Assertion": "forged"})
    )
    signed = answer.headers["x-gateway-assertion"]
    claims = jwt.decode(signed, key.public_key(), algorithms=["ES256"], audience="http://127.0.0.1:9")
    assert claims["sub"] == "alice"
    anonymous = await ask(app, nginx("/public/x"))
    assert anonymous.headers["x-gateway-assertion"] == ""  # present and empty: the client's own is overwritten


@pytest.mark.parametrize(
    "headers, path",
    [
        # Caddy and Traefik pass the client's own X-Original-* along with the X-Forwarded-* they set.
        ({"X-Forwarded-Uri": "/admin/", "X-Forwarded-Method": "GET", "X-Original-URI": "/x"}, "/.gateway/auth"),
        (
            {"X-Forwarded-Uri": "/reports/q", "X-Forwarded-Method": "DELETE", "X-Original-Method": "GET"},
            "/.gateway/auth",
        ),
        # Envoy passes allow-listed headers along with the path it asks about.
        ({"X-Forwarded-Uri": "/x"}, "/.gateway/auth/admin/"),
        # One header twice: which one the proxy set is anyone's guess.
        ([("X-Original-URI", "/admin/"), ("X-Original-URI", "/x")], "/.gateway/auth"),
    ],
)
async def test_a_question_that_names_the_original_request_twice_is_refused(
    gateway: Gateway, headers: Any, path: str
) -> None:
    viewer = ("Authorization", f"Bearer {token(sub='bob', roles=['viewer'])}")
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    answer = await ask(gateway, [*pairs, viewer], path=path)
    assert answer.status_code in (400, 403)
    assert "x-auth-user" not in answer.headers


async def test_forward_auth_headers_from_an_untrusted_peer_are_refused_even_beside_a_path(gateway: Gateway) -> None:
    answer = await ask(gateway, {"X-Forwarded-Uri": "/x"}, path="/.gateway/auth/app/", client=("192.0.2.7", 1))
    assert (answer.status_code, answer.json()["reason"]) == (403, "untrusted_proxy")


async def test_a_capture_route_is_refused_it_needs_proxy_mode(upstream: RecordingUpstream) -> None:
    settings = config()
    settings["routes"].insert(
        0, {"name": "login", "path": "/api/token/", "upstream": "http://127.0.0.1:9", "auth": "none", "capture": {}}
    )
    app = create_app(parse_config(settings), forwarder=upstream)
    answer = await ask(app, traefik("/api/token/", "POST"))
    assert (answer.status_code, answer.json()["reason"]) == (403, "proxy_mode_only")


async def test_the_assertion_header_is_in_every_200_even_without_identity_assertion(gateway: Gateway) -> None:
    answer = await ask(gateway, nginx("/x", Authorization=f"Bearer {token(**ADMIN)}"))
    assert answer.headers["x-gateway-assertion"] == ""
