"""The demo IdP behaves like a strict rotating one: single-use refresh tokens, reuse revokes the family."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from support.servers import start_idp

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
        "jwks_requests": 0,
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


async def test_jwks_says_how_long_it_may_be_cached(client: httpx.AsyncClient) -> None:
    assert (await client.get("/jwks")).headers["cache-control"] == "public, max-age=300"
    await behave(client, jwks_max_age=0)
    assert (await client.get("/.well-known/jwks.json")).headers["cache-control"] == "no-cache"


async def test_hs256_publishes_no_keys(client: httpx.AsyncClient) -> None:
    assert (await client.get("/jwks")).json() == {"keys": []}


# --- The ledger, failures after redeeming, reuse windows, revocation policies, key rollover, clock skew ---


async def ledger(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    return list((await client.get("/_admin/ledger")).json()["entries"])


async def families(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {f["id"]: f for f in (await client.get("/_admin/families")).json()["families"]}


async def behave(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/_admin/behaviour", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def events(entries: list[dict[str, Any]]) -> list[tuple[str | None, str]]:
    return [(entry["jti"], entry["event"]) for entry in entries]


async def test_the_ledger_records_every_refresh_request(client: httpx.AsyncClient) -> None:
    first = (await login(client))["refresh_token"]
    family = jwt.decode(first, options={"verify_signature": False})["fam"]
    second = (await refresh(client, first)).json()["refresh_token"]
    await behave(client, fail="503", fail_count=1)
    assert (await refresh(client, second)).status_code == 503
    third = (await client.post("/api/token/refresh/", json={"refresh": second})).json()["refresh"]
    assert (await refresh(client, "not-a-jwt")).status_code == 400
    bad_client = await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": third})
    assert bad_client.status_code == 401
    assert (await refresh(client, first)).status_code == 400  # reuse: the family is revoked
    assert (await refresh(client, third)).status_code == 400

    entries = await ledger(client)
    assert events(entries) == [
        (jti(first), "redeemed"),
        (jti(second), "failed"),
        (jti(second), "redeemed"),
        (None, "rejected"),
        (jti(third), "rejected"),
        (jti(first), "reused"),
        (jti(third), "rejected"),
    ]
    assert [e["family"] for e in entries] == [family, family, family, None, family, family, family]
    assert all(isinstance(e["at"], float) for e in entries)
    assert entries == sorted(entries, key=lambda e: e["at"])
    assert (await stats(client))["refresh_calls"] == len(entries)

    await client.post("/_admin/reset")
    assert await ledger(client) == []


async def test_families_show_the_chain_and_why_it_ended(client: httpx.AsyncClient) -> None:
    first = (await login(client))["refresh_token"]
    second = (await refresh(client, first)).json()["refresh_token"]
    assert (await refresh(client, first)).status_code == 400
    revoked = (await login(client, "bob"))["refresh_token"]
    await client.post("/revoke", data={"token": revoked, **CLIENT})
    alive = (await login(client, "bob"))["refresh_token"]

    listed = list((await families(client)).values())
    assert [(f["username"], f["revoked"], f["revoked_reason"]) for f in listed] == [
        ("alice", True, "reuse"),
        ("bob", True, "revocation"),
        ("bob", False, None),
    ]
    assert listed[0]["issued"] == [jti(first), jti(second)] and listed[0]["current"] == jti(second)
    assert listed[0]["previous"] == jti(first)
    assert listed[2]["issued"] == [jti(alive)] and listed[2]["previous"] is None


async def test_concurrent_redemptions_are_one_redeemed_and_one_reused(client: httpx.AsyncClient) -> None:
    token = (await login(client))["refresh_token"]
    await behave(client, latency=0.05)
    await asyncio.gather(refresh(client, token), refresh(client, token))
    assert sorted(events(await ledger(client))) == [(jti(token), "redeemed"), (jti(token), "reused")]


async def answer_or_error(request: Any) -> httpx.Response | BaseException:
    try:
        return await asyncio.wait_for(request, 0.3)
    except (TimeoutError, httpx.TransportError) as exc:
        return exc


@pytest.mark.parametrize("simplejwt", [False, True], ids=["oauth", "simplejwt"])
@pytest.mark.parametrize("fail", ["redeem_then_hang", "redeem_then_reset", "redeem_then_504", "redeem_then_garbage"])
async def test_redeem_then_lose_the_answer(client: httpx.AsyncClient, fail: str, simplejwt: bool) -> None:
    token = (await login(client))["refresh_token"]
    await behave(client, fail=fail, fail_count=1)
    if simplejwt:
        result = await answer_or_error(client.post("/api/token/refresh/", json={"refresh": token}))
    else:
        result = await answer_or_error(refresh(client, token))

    if fail == "redeem_then_hang":
        assert isinstance(result, TimeoutError)
    elif fail == "redeem_then_reset":  # in-process the cut connection surfaces as the client's own error
        assert isinstance(result, httpx.RemoteProtocolError)
    else:
        assert isinstance(result, httpx.Response)
        assert result.status_code == (504 if fail == "redeem_then_504" else 200)
        assert result.headers["content-type"].startswith("text/html") and "token" not in result.text
        with pytest.raises(ValueError):
            result.json()
    counts = await stats(client)
    assert (counts["refresh_ok"], counts["refresh_rejected"]) == (1, 0), "the token was redeemed"
    assert events(await ledger(client)) == [(jti(token), "redeemed")]

    retried = await refresh(client, token)
    assert retried.status_code == 400, "presenting it again is reuse"
    assert (await stats(client))["reuse_detected"] == 1
    assert events(await ledger(client))[-1] == (jti(token), "reused")


async def test_redeem_then_reset_sends_a_head_promising_more_than_the_body() -> None:
    idp_app = create_idp_app(IdPSettings())
    pair = idp_app.state.idp.start_session("alice")
    idp_app.state.idp.behaviour.fail = "redeem_then_reset"
    body = json.dumps({"refresh": pair.refresh}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/token/refresh/",
        "raw_path": b"/api/token/refresh/",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": None,
        "server": None,
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(httpx.RemoteProtocolError):
        await idp_app(scope, receive, send)
    start, part = sent
    assert start["status"] == 200
    assert int(dict(start["headers"])[b"content-length"]) > len(part["body"]) > 0 and part["more_body"] is True
    assert pair.family.current != jti(pair.refresh), "rotated before the connection was cut"


async def test_spoiled_answers_to_a_rejected_token_are_the_plain_rejection(client: httpx.AsyncClient) -> None:
    await behave(client, fail="no_access", fail_count=1)
    assert (await refresh(client, "not-a-jwt")).json() == {"error": "invalid_grant"}


async def test_reuse_window_accepts_the_previous_token_until_it_closes(client: httpx.AsyncClient) -> None:
    assert (await behave(client, reuse_window=0.5))["reuse_window"] == 0.5
    first = (await login(client))["refresh_token"]
    second = (await refresh(client, first)).json()["refresh_token"]
    again = await refresh(client, first)
    assert again.status_code == 200
    third = again.json()["refresh_token"]
    assert third != second
    [family] = (await families(client)).values()
    assert family["current"] == jti(third) and family["issued"] == [jti(first), jti(second), jti(third)]
    assert (await refresh(client, first)).status_code == 200, "any number of times inside the window"
    await asyncio.sleep(0.6)  # past the 0.5 s window: its closing is what is tested
    assert (await refresh(client, first)).status_code == 400, "the window is over: reuse"
    assert [event for _, event in events(await ledger(client))] == [
        "redeemed",
        "reused_in_window",
        "reused_in_window",
        "reused",
    ]
    counts = await stats(client)
    assert (counts["refresh_ok"], counts["reuse_detected"], counts["families_revoked"]) == (3, 1, 1)


async def test_reuse_window_covers_only_the_previous_token(client: httpx.AsyncClient) -> None:
    await behave(client, reuse_window=5)
    first = (await login(client))["refresh_token"]
    second = (await refresh(client, first)).json()["refresh_token"]
    assert (await refresh(client, first)).status_code == 200
    # What the first redemption issued is no longer current, nor the previous token: reuse.
    assert (await refresh(client, second)).status_code == 400
    [family] = (await families(client)).values()
    assert family["revoked_reason"] == "reuse"

    first = (await login(client))["refresh_token"]
    second = (await refresh(client, first)).json()["refresh_token"]
    assert (await refresh(client, second)).status_code == 200
    assert (await refresh(client, first)).status_code == 400, "two rotations ago"


async def test_reuse_window_setting_is_the_default_after_reset() -> None:
    transport = httpx.ASGITransport(app=create_idp_app(IdPSettings(reuse_window=5)))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp") as client:
        await behave(client, reuse_window=0)
        await client.post("/_admin/reset")
        first = (await login(client))["refresh_token"]
        await refresh(client, first)
        assert (await refresh(client, first)).status_code == 200


async def test_revoking_a_used_token_can_leave_the_family_alone(client: httpx.AsyncClient) -> None:
    assert (await behave(client, revoke_used=False))["revoke_used"] is False
    first = (await login(client))["refresh_token"]
    second = (await refresh(client, first)).json()["refresh_token"]
    assert (await client.post("/revoke", data={"token": first, **CLIENT})).status_code == 200
    third = (await refresh(client, second)).json()["refresh_token"]
    assert (await stats(client))["families_revoked"] == 0
    await client.post("/revoke", data={"token": third, **CLIENT})  # the current one still ends the session
    assert (await refresh(client, third)).status_code == 400
    counts = await stats(client)
    assert (counts["revocations"], counts["families_revoked"]) == (2, 1)


async def test_reuse_can_be_refused_without_revoking_the_family(client: httpx.AsyncClient) -> None:
    await behave(client, reuse_revokes_family=False)
    first = (await client.post("/api/token/", json={"username": "alice", "password": "alice"})).json()["refresh"]
    second = (await client.post("/api/token/refresh/", json={"refresh": first})).json()["refresh"]
    reused = await client.post("/api/token/refresh/", json={"refresh": first})
    assert (reused.status_code, reused.json()["code"]) == (401, "token_not_valid")
    assert (await client.post("/api/token/refresh/", json={"refresh": second})).status_code == 200
    counts = await stats(client)
    assert (counts["reuse_detected"], counts["families_revoked"]) == (1, 0)
    assert [event for _, event in events(await ledger(client))] == ["redeemed", "reused", "redeemed"]
    [family] = (await families(client)).values()
    assert family["revoked"] is False


async def test_behaviour_is_validated_and_reset(client: httpx.AsyncClient) -> None:
    for body in (
        {"reuse_windw": 1},
        {"reuse_window": "1"},
        {"clock_skew": True},
        {"revoke_used": 0},
        {"jwks": "sideways"},
        {"fail": "redeem_then_vanish"},
        {"fail_count": 1.5},
        {"groups": -1},
        {"groups": 2.5},
    ):
        response = await client.post("/_admin/behaviour", json=body)
        assert response.status_code == 400, body
        assert next(iter(body)) in response.json()["error"] or "behaviour" in response.json()["error"]
    changed = await behave(client, clock_skew=-5, jwks="down", reuse_revokes_family=False, latency=0)
    assert (changed["clock_skew"], changed["jwks"], changed["reuse_revokes_family"]) == (-5.0, "down", False)
    await client.post("/_admin/reset")
    assert await behave(client) == {
        "latency": 0.0,
        "fail": None,
        "fail_count": None,
        "reuse_window": 0.0,
        "revoke_used": True,
        "reuse_revokes_family": True,
        "jwks": "up",
        "jwks_max_age": 300.0,
        "clock_skew": 0.0,
        "groups": 0,
    }


async def test_big_tokens_carry_a_groups_claim_of_as_many_entries(client: httpx.AsyncClient) -> None:
    await behave(client, groups=120)
    issued = (await client.post("/_admin/issue", json={"username": "alice"})).json()
    groups = jwt.decode(issued["access"], options={"verify_signature": False})["groups"]
    assert len(groups) == 120 and len(set(groups)) == 120
    assert len(issued["access"]) > 6500  # HS256; Entra ID's RS256 tokens with as many groups are over 7 KB
    await client.post("/_admin/reset")


async def test_key_rollover_publishes_the_new_key_and_keeps_the_old_one() -> None:
    transport = httpx.ASGITransport(app=create_idp_app(IdPSettings(algorithm="RS256")))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp") as client:
        before = (await login(client))["refresh_token"]
        rotated = (await client.post("/_admin/rotate_key", json={})).json()
        assert rotated == {"kid": "demo-key-2", "published": ["demo-key-2", "demo-key-1"]}
        keys = {k["kid"]: jwt.PyJWK(k).key for k in (await client.get("/jwks")).json()["keys"]}
        assert list(keys) == ["demo-key-2", "demo-key-1"]

        response = await refresh(client, before)
        assert response.status_code == 200, "tokens signed with the old key stay redeemable"
        access = response.json()["access_token"]
        assert jwt.get_unverified_header(access)["kid"] == "demo-key-2"
        assert jwt.decode(access, keys["demo-key-2"], algorithms=["RS256"], audience="legacy-app")["sub"] == "alice"
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(access, keys["demo-key-1"], algorithms=["RS256"], audience="legacy-app")

        rotated = (await client.post("/_admin/rotate_key", json={"drop_old": True})).json()
        assert rotated == {"kid": "demo-key-3", "published": ["demo-key-3"]}
        jwks = (await client.get("/.well-known/jwks.json")).json()
        assert [k["kid"] for k in jwks["keys"]] == ["demo-key-3"]
        assert jwt.get_unverified_header((await login(client))["access_token"])["kid"] == "demo-key-3"
        assert (await refresh(client, response.json()["refresh_token"])).status_code == 200
        assert (await stats(client))["jwks_requests"] == 2


async def test_key_rollover_needs_rs256(client: httpx.AsyncClient) -> None:
    response = await client.post("/_admin/rotate_key", json={})
    assert response.status_code == 400 and "RS256" in response.json()["error"]


async def test_jwks_outage(client: httpx.AsyncClient) -> None:
    await behave(client, jwks="down")
    assert [(await client.get(path)).status_code for path in ("/jwks", "/.well-known/jwks.json")] == [503, 503]
    assert (await refresh(client, (await login(client))["refresh_token"])).status_code == 200, "only the JWKS is down"
    await behave(client, jwks="up")
    assert (await client.get("/jwks")).status_code == 200
    assert (await stats(client))["jwks_requests"] == 3


@pytest.mark.parametrize("skew", [120, -400])
async def test_clock_skew_shifts_issued_tokens(client: httpx.AsyncClient, skew: int) -> None:
    no_skew = jwt.decode((await login(client))["access_token"], options={"verify_signature": False})
    assert "nbf" not in no_skew
    await behave(client, clock_skew=skew)
    started = time.time()
    body = await login(client)
    access = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert abs(access["iat"] - (started + skew)) <= 2
    assert access["nbf"] == access["iat"] and access["exp"] == access["iat"] + 300
    if skew > 0:
        with pytest.raises(jwt.ImmatureSignatureError):  # what a gateway on the true clock sees
            jwt.decode(body["access_token"], IdPSettings.hs_secret, algorithms=["HS256"], audience="legacy-app")
    else:
        with pytest.raises(jwt.ExpiredSignatureError):
            jwt.decode(body["access_token"], IdPSettings.hs_secret, algorithms=["HS256"], audience="legacy-app")
    refresh_claims = jwt.decode(body["refresh_token"], options={"verify_signature": False})
    assert abs(refresh_claims["iat"] - (started + skew)) <= 2 and "nbf" not in refresh_claims
    await behave(client, clock_skew=0)
    assert (await refresh(client, body["refresh_token"])).status_code == 200, "the IdP accepts its own tokens"


async def test_idp_process_flags_and_helpers() -> None:
    with start_idp(algorithm="RS256", reuse_window=5, ignore_revoke_used=True, reuse_keeps_family=True) as idp:
        current = idp.behaviour()
        assert (current["reuse_window"], current["revoke_used"], current["reuse_revokes_family"]) == (5.0, False, False)
        first = idp.issue("alice")["refresh"]
        url = f"{idp.url}/api/token/refresh/"
        second = httpx.post(url, json={"refresh": first}, timeout=5).json()["refresh"]
        assert httpx.post(url, json={"refresh": first}, timeout=5).status_code == 200  # reuse window
        idp.behaviour(fail="redeem_then_reset", fail_count=1)
        with pytest.raises(httpx.ReadError):  # a real TCP RST: ECONNRESET
            httpx.post(url, json={"refresh": first}, timeout=5)
        assert idp.redemption_counts() == {jti(first): 3}
        assert [e["event"] for e in idp.ledger()] == ["redeemed", "reused_in_window", "reused_in_window"]
        [family] = idp.families()
        assert family["issued"][:2] == [jti(first), jti(second)] and len(family["issued"]) == 4

        assert idp.rotate_key() == "demo-key-2" and idp.rotate_key(drop_old=True) == "demo-key-3"
        assert [k["kid"] for k in httpx.get(f"{idp.url}/jwks", timeout=5).json()["keys"]] == ["demo-key-3"]
        assert idp.stats()["jwks_requests"] == 1, "the readiness probe does not count"
    with start_idp(clock_skew=30) as idp:
        access = jwt.decode(idp.issue("bob")["access"], options={"verify_signature": False})
        assert access["iat"] - time.time() > 25 and access["nbf"] == access["iat"]
