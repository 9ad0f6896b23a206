"""The demo IdP behaves like a strict rotating one: single-use refresh tokens, reuse revokes the family."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from gateway.demo.idp import IdPSettings, create_idp_app

CLIENT = {"client_id": "legacy-app", "client_secret": "demo-secret"}


@pytest.fixture
def settings() -> IdPSettings:
    return IdPSettings()


@pytest.fixture
async def client(settings: IdPSettings) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_idp_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp") as client:
        yield client


def decode(token: str, settings: IdPSettings) -> dict[str, Any]:
    return jwt.decode(token, settings.hs_secret, algorithms=["HS256"], audience=settings.audience)


async def login(client: httpx.AsyncClient, username: str = "alice") -> dict[str, Any]:
    response = await client.post(
        "/token", data={"grant_type": "password", "username": username, "password": username, **CLIENT}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


async def refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": token, **CLIENT})


async def stats(client: httpx.AsyncClient) -> dict[str, int]:
    return dict((await client.get("/_admin/stats")).json())


async def test_password_grant_issues_access_and_refresh_jwts(client: httpx.AsyncClient, settings: IdPSettings) -> None:
    response = await client.post(
        "/token", data={"grant_type": "password", "username": "alice", "password": "alice", **CLIENT}
    )
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    assert jwt.get_unverified_header(body["access_token"])["typ"] == "JWT"
    access = decode(body["access_token"], settings)
    assert access["iss"] == "http://127.0.0.1" and access["aud"] == "legacy-app" and access["sub"] == "alice"
    assert access["token_type"] == "access" and access["roles"] == ["user", "admin"] and access["is_staff"] is True
    assert access["exp"] - access["iat"] == 300 and len(access["jti"]) == 32
    refresh_claims = jwt.decode(body["refresh_token"], settings.hs_secret, algorithms=["HS256"])
    assert refresh_claims["token_type"] == "refresh" and refresh_claims["fam"] and refresh_claims["sub"] == "alice"
    assert (await stats(client))["logins"] == 1


async def test_password_grant_with_wrong_password_is_invalid_grant(client: httpx.AsyncClient) -> None:
    data = {"grant_type": "password", "username": "bob", "password": "alice", **CLIENT}
    response = await client.post("/token", data=data)
    assert (response.status_code, response.json()) == (400, {"error": "invalid_grant"})


async def test_simplejwt_login(client: httpx.AsyncClient, settings: IdPSettings) -> None:
    response = await client.post("/api/token/", json={"username": "bob", "password": "bob"})
    assert set(response.json()) == {"access", "refresh"}
    assert decode(response.json()["access"], settings)["roles"] == ["user"]
    response = await client.post("/api/token/", json={"username": "bob", "password": "wrong"})
    assert response.status_code == 401
    assert response.json() == {"detail": "No active account found with the given credentials"}


async def test_refresh_rotates_and_reuse_revokes_the_family_including_the_successor(client: httpx.AsyncClient) -> None:
    first = (await login(client))["refresh_token"]
    response = await refresh(client, first)
    assert response.status_code == 200
    second = response.json()["refresh_token"]
    assert second != first and response.json()["access_token"]

    reused = await refresh(client, first)
    assert (reused.status_code, reused.json()) == (400, {"error": "invalid_grant"})
    successor = await refresh(client, second)
    assert successor.status_code == 400, "reuse must revoke the token issued before it was detected"
    counts = await stats(client)
    assert counts["reuse_detected"] == 1 and counts["families_revoked"] == 1
    assert (counts["refresh_calls"], counts["refresh_ok"], counts["refresh_rejected"]) == (3, 1, 2)


async def test_simplejwt_refresh_rotates_and_detects_reuse(client: httpx.AsyncClient) -> None:
    first = (await client.post("/api/token/", json={"username": "alice", "password": "alice"})).json()["refresh"]
    response = await client.post("/api/token/refresh/", json={"refresh": first})
    assert set(response.json()) == {"access", "refresh"}
    second = response.json()["refresh"]
    reused = await client.post("/api/token/refresh/", json={"refresh": first})
    assert reused.status_code == 401
    assert reused.json() == {"detail": "Token is invalid or expired", "code": "token_not_valid"}
    assert (await client.post("/api/token/refresh/", json={"refresh": second})).status_code == 401


async def test_concurrent_redemptions_of_one_token_let_exactly_one_win(client: httpx.AsyncClient) -> None:
    token = (await login(client))["refresh_token"]
    await client.post("/_admin/behaviour", json={"latency": 0.05})
    responses = await asyncio.gather(refresh(client, token), refresh(client, token))
    assert sorted(r.status_code for r in responses) == [200, 400]
    assert (await stats(client))["reuse_detected"] == 1


async def test_other_users_tokens_and_garbage_are_invalid_grant(
    client: httpx.AsyncClient, settings: IdPSettings
) -> None:
    access = (await login(client))["access_token"]
    forged = jwt.encode({"sub": "alice", "token_type": "refresh"}, "another-secret-of-at-least-32-bytes!!", "HS256")
    for token in (access, forged, "not-a-jwt"):
        assert (await refresh(client, token)).json() == {"error": "invalid_grant"}
    assert (await stats(client))["reuse_detected"] == 0


async def test_expired_refresh_token_is_invalid_grant_without_reuse() -> None:
    transport = httpx.ASGITransport(app=create_idp_app(IdPSettings(refresh_ttl=-60)))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp") as client:
        token = (await login(client))["refresh_token"]
        assert (await refresh(client, token)).status_code == 400
        assert (await stats(client))["reuse_detected"] == 0


async def test_revoking_a_refresh_token_revokes_its_family(client: httpx.AsyncClient) -> None:
    first = (await login(client))["refresh_token"]
    second = (await refresh(client, first)).json()["refresh_token"]
    assert (
        await client.post("/revoke", data={"token": first, "token_type_hint": "refresh_token", **CLIENT})
    ).status_code == 200
    assert (await refresh(client, second)).status_code == 400
    assert (await client.post("/revoke", data={"token": "unknown", **CLIENT})).status_code == 200
    assert (await client.post("/revoke", data={"token": second})).status_code == 401
    counts = await stats(client)
    assert (counts["revocations"], counts["families_revoked"], counts["reuse_detected"]) == (2, 1, 0)


@pytest.mark.parametrize(
    ("fail", "status"),
    [("503", 503), ("500", 500), ("html", 200), ("garbage", 200), ("invalid_client", 401)],
)
async def test_failure_modes_do_not_consume_the_refresh_token(
    client: httpx.AsyncClient, fail: str, status: int
) -> None:
    token = (await login(client))["refresh_token"]
    await client.post("/_admin/behaviour", json={"fail": fail, "fail_count": 1})
    failed = await refresh(client, token)
    assert failed.status_code == status
    assert "access_token" not in failed.text
    assert (await refresh(client, token)).status_code == 200, "the IdP failed before redeeming the token"


async def test_fail_without_count_fails_until_cleared(client: httpx.AsyncClient) -> None:
    token = (await login(client))["refresh_token"]
    await client.post("/_admin/behaviour", json={"fail": "503"})
    assert [(await refresh(client, token)).status_code for _ in range(3)] == [503, 503, 503]
    await client.post("/_admin/reset")
    assert (await refresh(client, token)).status_code == 200
    assert (await stats(client))["refresh_calls"] == 1, "reset zeroes the counters"


async def test_no_access_and_bad_signature_consume_the_token(client: httpx.AsyncClient, settings: IdPSettings) -> None:
    first = (await login(client))["refresh_token"]
    await client.post("/_admin/behaviour", json={"fail": "no_access", "fail_count": 1})
    response = await refresh(client, first)
    assert response.status_code == 200 and "access_token" not in response.json()
    second = response.json()["refresh_token"]

    await client.post("/_admin/behaviour", json={"fail": "bad_signature", "fail_count": 1})
    response = await refresh(client, second)
    with pytest.raises(jwt.InvalidSignatureError):
        decode(response.json()["access_token"], settings)
    assert (await refresh(client, second)).status_code == 400, "a 200 means the token was redeemed"


async def test_client_auth_basic_and_post(client: httpx.AsyncClient) -> None:
    token = (await login(client))["refresh_token"]
    data = {"grant_type": "refresh_token", "refresh_token": token}
    bad = await client.post("/token", data=data, auth=("legacy-app", "wrong"))
    assert (bad.status_code, bad.json()) == (401, {"error": "invalid_client"})
    assert (await client.post("/token", data=data)).status_code == 401
    assert (await client.post("/token", data=data, auth=("legacy-app", "demo-secret"))).status_code == 200


@pytest.mark.parametrize(
    ("client_auth", "accepted"),
    [("post", {"post"}), ("basic", {"basic"}), ("none", {"none", "post", "basic"}), ("any", {"post", "basic"})],
)
async def test_client_auth_setting(client_auth: Any, accepted: set[str]) -> None:
    transport = httpx.ASGITransport(app=create_idp_app(IdPSettings(client_auth=client_auth)))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp") as client:
        form = {"grant_type": "password", "username": "bob", "password": "bob"}
        ways: dict[str, dict[str, Any]] = {
            "post": {"data": form | CLIENT},
            "basic": {"data": form, "auth": ("legacy-app", "demo-secret")},
            "none": {"data": form},
        }
        for way, kwargs in ways.items():
            status = (await client.post("/token", **kwargs)).status_code
            assert (status == 200) == (way in accepted), (way, status)


async def test_protocol_errors(client: httpx.AsyncClient) -> None:
    unsupported = await client.post("/token", data={"grant_type": "client_credentials", **CLIENT})
    assert unsupported.json() == {"error": "unsupported_grant_type"}
    as_json = await client.post("/token", json={"grant_type": "password", **CLIENT})
    assert (as_json.status_code, as_json.json()) == (400, {"error": "invalid_request"})
    repeated = await client.post(
        "/token",
        content="grant_type=password&grant_type=password",
        auth=("legacy-app", "demo-secret"),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert repeated.json() == {"error": "invalid_request"}


async def test_admin_issue_mints_sessions_without_counting(client: httpx.AsyncClient, settings: IdPSettings) -> None:
    issued = (
        await client.post("/_admin/issue", json={"username": "bob", "access_ttl": -10, "claims": {"is_staff": True}})
    ).json()
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(issued["access"], settings)
    refreshed = (await refresh(client, issued["refresh"])).json()
    assert decode(refreshed["access_token"], settings)["is_staff"] is True, "overrides last for the session"
    assert (await stats(client)) == {
        "refresh_calls": 1,
        "refresh_ok": 1,
        "refresh_rejected": 0,
        "reuse_detected": 0,
        "families_revoked": 0,
        "logins": 0,
        "revocations": 0,
        "authorize_requests": 0,
        "code_exchanges": 0,
    }


async def test_rs256_tokens_verify_with_the_published_jwks() -> None:
    settings = IdPSettings(algorithm="RS256")
    transport = httpx.ASGITransport(app=create_idp_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp") as client:
        keys = (await client.get("/.well-known/jwks.json")).json()["keys"]
        assert [(k["kid"], k["alg"], k["use"], k["kty"]) for k in keys] == [("demo-key-1", "RS256", "sig", "RSA")]
        access = (await login(client))["access_token"]
        assert jwt.get_unverified_header(access)["kid"] == "demo-key-1"
        claims = jwt.decode(access, jwt.PyJWK(keys[0]).key, algorithms=["RS256"], audience="legacy-app")
        assert claims["sub"] == "alice"
        pem_claims = jwt.decode(access, settings.public_pem(), algorithms=["RS256"], audience="legacy-app")
        assert pem_claims == claims


async def test_hs256_publishes_no_keys(client: httpx.AsyncClient) -> None:
    assert (await client.get("/jwks")).json() == {"keys": []}
