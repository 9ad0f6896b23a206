"""The demo IdP's logout (gateway/demo/idp/logout.py): sid in its tokens, RP-initiated logout, logout tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
from test_demo_oidc import ISSUER, exchange, get_code, pkce

from gateway.demo.idp import IdPSettings, create_idp_app
from gateway.demo.idp.logout import EVENT

SECRET = IdPSettings().hs_secret


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_idp_app(IdPSettings(issuer=ISSUER)))
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
        yield client


async def login(client: httpx.AsyncClient) -> dict[str, str]:
    verifier, challenge = pkce()
    return dict((await exchange(client, await get_code(client, challenge), verifier)).json())


def claims(token: str) -> dict[str, object]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def test_each_login_has_its_own_sid_in_the_id_token_and_every_access_token(client: httpx.AsyncClient) -> None:
    first, second = await login(client), await login(client)
    sid = claims(first["id_token"])["sid"]
    assert sid and sid == claims(first["access_token"])["sid"] and sid != claims(second["id_token"])["sid"]
    refreshed = await client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": "legacy-app",
            "client_secret": "demo-secret",
        },
    )
    assert claims(refreshed.json()["access_token"])["sid"] == sid
    meta = (await client.get("/.well-known/openid-configuration")).json()
    assert meta["end_session_endpoint"] == f"{ISSUER}/end_session" and meta["backchannel_logout_supported"] is True


async def test_end_session_ends_the_login_session_and_redirects_back(client: httpx.AsyncClient) -> None:
    tokens, other = await login(client), await login(client)
    back = "http://127.0.0.1:8080/bye"
    answer = await client.get(
        "/end_session", params={"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": back, "state": "s1"}
    )
    assert answer.status_code == 302 and answer.headers["location"] == f"{back}?state=s1"
    families = {f["sid"]: f for f in (await client.get("/_admin/families")).json()["families"]}
    assert families[claims(tokens["id_token"])["sid"]]["revoked"] is True
    assert families[claims(other["id_token"])["sid"]]["revoked"] is False
    forged = jwt.encode({"sub": "alice", "aud": "legacy-app"}, "not-the-idps-key-0123456789abcdef", algorithm="HS256")
    assert (await client.get("/end_session", params={"id_token_hint": forged})).status_code == 400
    evil = await client.get("/end_session", params={"post_logout_redirect_uri": "https://evil.example/"})
    assert evil.status_code == 400  # the redirect_uri rule: registered, or any loopback http URI when none are


async def test_logout_tokens_and_their_bad_variants(client: httpx.AsyncClient) -> None:
    good = (await client.post("/_admin/logout_token", json={"sub": "alice", "sid": "s-1"})).json()["logout_token"]
    assert jwt.get_unverified_header(good)["typ"] == "logout+jwt"
    decoded = jwt.decode(good, SECRET, algorithms=["HS256"], audience="legacy-app", issuer=ISSUER)
    assert decoded["events"] == {EVENT: {}} and "nonce" not in decoded and decoded["jti"]
    bad = (
        await client.post("/_admin/logout_token", json={"sid": "s-1", "aud": "x", "nonce": "n", "events": False})
    ).json()["logout_token"]
    assert {k: claims(bad).get(k) for k in ("aud", "nonce", "events")} == {"aud": "x", "nonce": "n", "events": None}
    assert (await client.post("/_admin/logout_token", json={})).status_code == 400
