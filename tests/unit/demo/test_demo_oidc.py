"""The demo IdP as an OpenID Connect provider: discovery, code + PKCE login, ID tokens, code replay."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from html import unescape
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import pytest
from support.servers import start_idp

from gateway.demo.idp import IdPSettings, create_idp_app
from gateway.demo.idp.oidc import OIDCProvider

ISSUER = "http://idp"
CLIENT = {"client_id": "legacy-app", "client_secret": "demo-secret"}
REDIRECT = "http://127.0.0.1:8080/oauth/callback"
SCOPE = "openid offline_access profile email"
STATE = "s t&a=te/é"  # must come back intact, so it has to be URL-encoded on the way


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_params(challenge: str, **overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": "legacy-app",
        "redirect_uri": REDIRECT,
        "scope": SCOPE,
        "state": STATE,
        "nonce": "n-0S6_WzA2Mj",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params |= overrides
    return {k: v for k, v in params.items() if v is not None}


@pytest.fixture
def settings() -> IdPSettings:
    return IdPSettings(issuer=ISSUER)


@pytest.fixture
async def client(settings: IdPSettings) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_idp_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
        yield client


def hidden_fields(page: str) -> dict[str, str]:
    return {
        unescape(k): unescape(v) for k, v in re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', page)
    }


def query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def get_code(client: httpx.AsyncClient, challenge: str, username: str = "alice") -> str:
    page = await client.get("/authorize", params=authorize_params(challenge))
    assert page.status_code == 200, page.text
    response = await client.post(
        "/authorize", data=hidden_fields(page.text) | {"username": username, "password": username}
    )
    assert response.status_code == 302, response.text
    return query(response.headers["location"])["code"]


async def exchange(client: httpx.AsyncClient, code: str, verifier: str, redirect_uri: str = REDIRECT) -> httpx.Response:
    form = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier, "redirect_uri": redirect_uri}
    return await client.post("/token", data=form | CLIENT)


async def refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": token, **CLIENT})


async def stats(client: httpx.AsyncClient) -> dict[str, int]:
    return dict((await client.get("/_admin/stats")).json())


async def test_discovery_document_points_at_the_issuers_own_endpoints(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/.well-known/openid-configuration")).json()
    assert doc["issuer"] == ISSUER
    assert doc["authorization_endpoint"] == f"{ISSUER}/authorize" and doc["token_endpoint"] == f"{ISSUER}/token"
    assert doc["jwks_uri"] == f"{ISSUER}/jwks" and doc["revocation_endpoint"] == f"{ISSUER}/revoke"
    assert doc["response_types_supported"] == ["code"] and doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["grant_types_supported"] == ["authorization_code", "refresh_token", "password"]
    assert doc["id_token_signing_alg_values_supported"] == ["HS256"] and "openid" in doc["scopes_supported"]
    assert doc["token_endpoint_auth_methods_supported"] == ["client_secret_post", "client_secret_basic"]
    assert doc["subject_types_supported"] == ["public"]
    for key in ("authorization_endpoint", "jwks_uri"):  # the advertised endpoints exist
        assert (await client.get(doc[key])).status_code != 404


@pytest.mark.parametrize("settings", [IdPSettings(issuer=ISSUER, algorithm="RS256")], ids=["RS256"])
async def test_code_flow_with_pkce_issues_verifiable_tokens(client: httpx.AsyncClient, settings: IdPSettings) -> None:
    verifier, challenge = pkce()
    page = await client.get("/authorize", params=authorize_params(challenge))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="username"', 'id="password"', 'id="login"', 'method="post"'):
        assert element in page.text
    form = hidden_fields(page.text) | {"username": "alice", "password": "alice"}
    redirect = await client.post("/authorize", data=form)
    assert redirect.status_code == 302
    location = redirect.headers["location"]
    assert location.startswith(REDIRECT + "?") and "%26" in location  # state's "&" is encoded, not a new parameter
    back = query(location)
    assert back["state"] == STATE and set(back) == {"code", "state"}

    auth = httpx.BasicAuth(CLIENT["client_id"], CLIENT["client_secret"])  # the other client authentication
    form = {
        "grant_type": "authorization_code",
        "code": back["code"],
        "code_verifier": verifier,
        "redirect_uri": REDIRECT,
    }
    response = await client.post("/token", data=form, auth=auth)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300 and body["scope"] == SCOPE
    assert set(body) >= {"access_token", "refresh_token", "id_token"}

    jwks = (await client.get("/jwks")).json()
    key = jwt.PyJWK(jwks["keys"][0]).key
    header = jwt.get_unverified_header(body["id_token"])
    assert header["alg"] == "RS256" and header["kid"] == jwks["keys"][0]["kid"]
    id_token = jwt.decode(body["id_token"], key, algorithms=["RS256"], audience="legacy-app", issuer=ISSUER)
    assert id_token["sub"] == "alice" and id_token["nonce"] == "n-0S6_WzA2Mj"
    assert id_token["email"] == "alice@example.com" and id_token["name"] == "Alice Admin"
    assert abs(id_token["auth_time"] - time.time()) < 5 and id_token["exp"] > id_token["iat"]
    digest = hashlib.sha256(body["access_token"].encode()).digest()[:16]
    assert id_token["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    access = jwt.decode(body["access_token"], key, algorithms=["RS256"], audience="legacy-app", issuer=ISSUER)
    assert access["token_type"] == "access" and access["roles"] == ["user", "admin"]
    counts = await stats(client)
    assert (counts["authorize_requests"], counts["logins"], counts["code_exchanges"]) == (1, 1, 1)


async def test_refresh_token_from_the_code_flow_rotates(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    first = (await exchange(client, await get_code(client, challenge), verifier)).json()
    second = await refresh(client, first["refresh_token"])
    assert second.status_code == 200 and second.json()["refresh_token"] != first["refresh_token"]
    assert (await refresh(client, first["refresh_token"])).json() == {"error": "invalid_grant"}  # reuse
    assert (await refresh(client, second.json()["refresh_token"])).status_code == 400  # family revoked


async def test_wrong_verifier_is_invalid_grant_and_burns_the_code(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    code = await get_code(client, challenge)
    wrong = await exchange(client, code, pkce()[0])
    assert (wrong.status_code, wrong.json()) == (400, {"error": "invalid_grant"})
    assert (await exchange(client, code, verifier)).json() == {"error": "invalid_grant"}


async def test_wrong_redirect_uri_at_the_token_endpoint_is_invalid_grant(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    response = await exchange(client, await get_code(client, challenge), verifier, "http://127.0.0.1:8080/other")
    assert response.json() == {"error": "invalid_grant"}


async def test_code_replay_revokes_what_the_first_exchange_issued(client: httpx.AsyncClient) -> None:
    """Regression guard for RFC 6749 §4.1.2: a replayed code revokes the tokens issued from it."""
    verifier, challenge = pkce()
    code = await get_code(client, challenge)
    first = await exchange(client, code, verifier)
    assert first.status_code == 200
    replay = await exchange(client, code, verifier)
    assert (replay.status_code, replay.json()) == (400, {"error": "invalid_grant"})
    assert (await refresh(client, first.json()["refresh_token"])).json() == {"error": "invalid_grant"}
    assert (await stats(client))["families_revoked"] == 1


async def test_expired_code_is_invalid_grant(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    code = await get_code(client, challenge)
    oidc: OIDCProvider = client._transport.app.state.oidc  # type: ignore[attr-defined]
    oidc.clock = lambda: time.time() + 61
    assert (await exchange(client, code, verifier)).json() == {"error": "invalid_grant"}


async def test_unknown_code_and_missing_verifier(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    assert (await exchange(client, "no-such-code", verifier)).json() == {"error": "invalid_grant"}
    code = await get_code(client, challenge)
    assert (await exchange(client, code, "")).json() == {"error": "invalid_request"}


async def test_code_exchange_needs_client_authentication(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    form = {"grant_type": "authorization_code", "code": await get_code(client, challenge), "code_verifier": verifier}
    response = await client.post("/token", data=form | {"redirect_uri": REDIRECT, **CLIENT, "client_secret": "wrong"})
    assert (response.status_code, response.json()) == (401, {"error": "invalid_client"})


@pytest.mark.parametrize(
    "overrides",
    [
        {"redirect_uri": "https://evil.example/callback"},
        {"redirect_uri": "http://127.0.0.1@evil.example/callback"},
        {"redirect_uri": "http://127.0.0.1:8080/cb#fragment"},
        {"redirect_uri": None},
        {"client_id": "someone-else"},
    ],
    ids=["other-host", "userinfo", "fragment", "missing", "unknown-client"],
)
async def test_untrusted_client_or_redirect_gets_an_error_page_never_a_redirect(
    client: httpx.AsyncClient, overrides: dict[str, str | None]
) -> None:
    response = await client.get("/authorize", params=authorize_params(pkce()[1], **overrides))
    assert response.status_code == 400 and "location" not in response.headers
    assert "Sign-in error" in response.text


@pytest.mark.parametrize(
    "settings", [IdPSettings(issuer=ISSUER, redirect_uris=["https://app.example/cb?x=1"])], ids=["registered"]
)
async def test_registered_redirect_uris_match_exactly(client: httpx.AsyncClient) -> None:
    challenge = pkce()[1]
    refused = await client.get("/authorize", params=authorize_params(challenge))  # loopback, not registered
    assert refused.status_code == 400
    params = authorize_params(challenge, redirect_uri="https://app.example/cb?x=1")
    page = await client.get("/authorize", params=params)
    assert page.status_code == 200
    response = await client.post("/authorize", data=hidden_fields(page.text) | {"username": "bob", "password": "bob"})
    assert response.headers["location"].startswith("https://app.example/cb?x=1&code=")  # its query is kept


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "too-short"}, "invalid_request"),
        ({"scope": "profile email"}, "invalid_scope"),
        ({"response_type": "token"}, "unsupported_response_type"),
    ],
    ids=["no-challenge", "no-method", "plain", "malformed-challenge", "no-openid", "implicit"],
)
async def test_bad_request_redirects_back_with_the_error_and_state(
    client: httpx.AsyncClient, overrides: dict[str, str | None], error: str
) -> None:
    response = await client.get("/authorize", params=authorize_params(pkce()[1], **overrides))
    assert response.status_code == 302
    assert response.headers["location"].startswith(REDIRECT + "?")
    back = query(response.headers["location"])
    assert back["error"] == error and back["state"] == STATE and "code" not in back
    assert (await stats(client))["authorize_requests"] == 1


async def test_repeated_parameter_is_invalid_request(client: httpx.AsyncClient) -> None:
    url = "/authorize?" + urlencode(authorize_params(pkce()[1])) + "&scope=openid"
    back = query((await client.get(url)).headers["location"])
    assert back["error"] == "invalid_request"


async def test_bad_password_shows_the_form_again_with_401(client: httpx.AsyncClient) -> None:
    page = await client.get("/authorize", params=authorize_params(pkce()[1]))
    response = await client.post("/authorize", data=hidden_fields(page.text) | {"username": "alice", "password": "x"})
    assert response.status_code == 401 and "location" not in response.headers
    assert "Invalid username or password" in response.text and 'id="login"' in response.text
    assert hidden_fields(response.text) == hidden_fields(page.text)  # the user can try again
    assert (await stats(client))["logins"] == 0


async def test_forged_login_post_is_checked_like_the_request(client: httpx.AsyncClient) -> None:
    form = authorize_params(pkce()[1], redirect_uri="https://evil.example/cb") | {"username": "bob", "password": "bob"}
    response = await client.post("/authorize", data=form)
    assert response.status_code == 400 and "location" not in response.headers


def test_process_issuer_is_its_own_url_and_sign_in_helper_works() -> None:
    with start_idp() as idp:
        doc = httpx.get(f"{idp.url}/.well-known/openid-configuration", timeout=5).json()
        assert doc["issuer"] == idp.url and doc["authorization_endpoint"] == f"{idp.url}/authorize"
        verifier, challenge = pkce()
        callback = idp.sign_in(f"{doc['authorization_endpoint']}?{urlencode(authorize_params(challenge))}", "bob")
        form = {"grant_type": "authorization_code", "code": query(callback)["code"], "code_verifier": verifier}
        tokens = httpx.post(doc["token_endpoint"], data=form | {"redirect_uri": REDIRECT, **CLIENT}, timeout=5).json()
        claims: dict[str, Any] = jwt.decode(
            tokens["id_token"], IdPSettings.hs_secret, algorithms=["HS256"], audience="legacy-app", issuer=idp.url
        )
        assert claims["sub"] == "bob"
