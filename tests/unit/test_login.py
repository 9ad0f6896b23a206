"""gateway/login.py: the OIDC callback's state, taken once through the store, against a real Redis behind a fault
proxy (the IdP a MockTransport that signs HS256 tokens)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from support.faultproxy import FaultProxy

from gateway.config import CookiesConfig, TokensConfig
from gateway.config.sessions import OIDCConfig
from gateway.cookies import CookieJar
from gateway.keys import StaticKey
from gateway.login import OIDCLogin
from gateway.sealing import Sealer
from gateway.store.redis import RedisStore
from gateway.tokens import Verifier

ISSUER = "https://idp.example"
CLIENT = "app"
SECRET = "login-tests-secret-0123456789abcdef"


def idp(nonces: dict[str, str]) -> httpx.MockTransport:
    """Discovery and a token endpoint that answers any code with tokens (the ID token carries the login's nonce);
    while ``nonces["down"]`` is set the token endpoint cannot be reached."""

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            endpoints = {"authorization_endpoint": f"{ISSUER}/auth", "token_endpoint": f"{ISSUER}/token"}
            return httpx.Response(200, json={"issuer": ISSUER, **endpoints})
        if nonces.get("down"):
            raise httpx.ConnectError("connection refused", request=request)
        nonces["exchanges"] = str(int(nonces.get("exchanges", "0")) + 1)
        await asyncio.sleep(float(nonces.get("latency", "0")))
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": CLIENT, "sub": "alice", "iat": now, "exp": now + 300}
        access = jwt.encode(claims | {"jti": uuid.uuid4().hex}, SECRET, algorithm="HS256")
        id_token = jwt.encode(claims | {"nonce": nonces["last"]}, SECRET, algorithm="HS256")
        return httpx.Response(200, json={"access_token": access, "id_token": id_token, "refresh_token": "r-1"})

    return httpx.MockTransport(answer)


@pytest.fixture
async def proxied(redis_url: str, key_prefix: str) -> AsyncIterator[tuple[FaultProxy, RedisStore]]:
    parts = urlsplit(redis_url)
    if parts.scheme != "redis":
        pytest.skip("the proxy parses plain RESP")
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        store = RedisStore(proxy.redis_url(), key_prefix)
        try:
            yield proxy, store
        finally:
            await store.close()


def gateway(store: RedisStore, nonces: dict[str, str]) -> httpx.AsyncClient:
    sealer = Sealer("unit-secret")
    tokens = TokensConfig(algorithms=("HS256",), secret=SECRET, audience=CLIENT)
    flow = OIDCLogin(
        config=OIDCConfig(issuer=ISSUER, client_id=CLIENT, redirect_url="https://app.example/.gateway/callback"),
        jar=CookieJar.from_config(CookiesConfig(), sealer),
        http=httpx.AsyncClient(transport=idp(nonces)),
        sealer=sealer,
        store=store,
        verifier=Verifier(tokens, StaticKey(SECRET.encode())),
        keys=StaticKey(SECRET.encode()),
        algorithms=("HS256",),
        secure=True,
    )
    app = Starlette(routes=[Route("/login", flow.login), Route("/callback", flow.callback)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://app.example")


async def start(browser: httpx.AsyncClient, nonces: dict[str, str]) -> dict[str, str]:
    """``{prefix}/login``: the authorization request's query, and ``flow``: the flow cookie (the browser keeps it)."""
    to_idp = await browser.get("/login", params={"next": "/home"})
    query = {k: v[0] for k, v in parse_qs(urlsplit(to_idp.headers["location"]).query).items()}
    nonces["last"] = query["nonce"]
    return query | {"flow": to_idp.cookies["__Host-gw_oidc"]}


async def test_a_callback_refused_503_for_a_store_blip_works_when_retried(
    proxied: tuple[FaultProxy, RedisStore],
) -> None:
    """Regression: the 503 (Retry-After) for a store that did not answer also cleared the flow cookie, so the
    browser's retry was 400 login_state_missing: the login was lost to a blip."""
    proxy, store = proxied
    nonces: dict[str, str] = {}
    async with gateway(store, nonces) as browser:
        query = await start(browser, nonces)
        proxy.add_rule(r"^SET \S*oidc:", "reset_before", times=2)  # the command and redis-py's resend of it
        callback = {"state": query["state"], "code": "code-1"}
        blip = await browser.get("/callback", params=callback)
        assert blip.status_code == 503 and blip.headers["retry-after"] == "5"
        assert blip.json()["reason"] == "store_unavailable"
        retried = await browser.get("/callback", params=callback)
        assert retried.status_code == 302 and retried.headers["location"] == "/home", retried.text


async def test_a_callback_refused_503_for_an_unreachable_idp_works_when_retried(
    proxied: tuple[FaultProxy, RedisStore],
) -> None:
    """Regression: the code never reached the IdP, but the state was spent and the flow cookie cleared: the
    retry the 503 asks for was 400."""
    _, store = proxied
    nonces: dict[str, str] = {}
    async with gateway(store, nonces) as browser:
        query = await start(browser, nonces)
        callback = {"state": query["state"], "code": "code-1"}
        nonces["down"] = "yes"
        down = await browser.get("/callback", params=callback)
        assert down.status_code == 503 and down.headers["retry-after"] == "5"
        del nonces["down"]
        retried = await browser.get("/callback", params=callback)
        assert retried.status_code == 302 and retried.headers["location"] == "/home", retried.text
        assert "__Host-gw_oidc" not in browser.cookies  # cleared once the login is done
        browser.cookies.set("__Host-gw_oidc", query["flow"], domain="app.example")  # a copy, replayed
        replay = await browser.get("/callback", params=callback)
        assert replay.status_code == 400 and replay.json()["reason"] == "login_state_replayed"


async def test_a_state_whose_first_use_loses_its_reply_is_not_taken_for_a_replay(
    proxied: tuple[FaultProxy, RedisStore],
) -> None:
    """Regression: redis-py sends a command again after a connection reset; the state's SET NX that had landed
    answered "exists" the second time, and the user's own login was refused as a replayed state (400)."""
    proxy, store = proxied
    nonces: dict[str, str] = {}
    async with gateway(store, nonces) as browser:
        query = await start(browser, nonces)
        rule = proxy.add_rule(r"^SET \S*oidc:", "reset_after")
        done = await browser.get("/callback", params={"state": query["state"], "code": "code-1"})
        assert proxy.matched(rule) == 1
        assert done.status_code == 302 and done.headers["location"] == "/home", done.text
        browser.cookies.set("__Host-gw_oidc", query["flow"], domain="app.example")  # a copy, replayed
        replay = await browser.get("/callback", params={"state": query["state"], "code": "code-1"})
        assert replay.status_code == 400 and replay.json()["reason"] == "login_state_replayed"


async def test_two_copies_of_one_callback_at_once_send_the_code_once(proxied: tuple[FaultProxy, RedisStore]) -> None:
    """The state is one callback's at a time: a copy of the callback sent while the first is on its way (a double
    navigation) is refused without reaching the IdP, whose code reuse detection may revoke what the first got."""
    _, store = proxied
    nonces: dict[str, str] = {}
    async with gateway(store, nonces) as browser:
        query = await start(browser, nonces)
        callback = {"state": query["state"], "code": "code-1"}
        nonces["latency"] = "0.3"
        answers = await asyncio.gather(*(browser.get("/callback", params=callback) for _ in range(2)))
        assert sorted(a.status_code for a in answers) == [302, 400]
        assert nonces["exchanges"] == "1"


async def test_a_copy_refused_for_a_store_blip_does_not_give_back_the_state_another_callback_holds(
    proxied: tuple[FaultProxy, RedisStore],
) -> None:
    """Regression: a callback whose take of the state failed on the store gave the state back by deleting it, whoever
    held it: while the first callback's code was on its way to the IdP, a third copy took the state and sent the
    code again (the IdP's code reuse detection may revoke what the first one got)."""
    proxy, store = proxied
    nonces: dict[str, str] = {"latency": "0.5"}
    async with gateway(store, nonces) as browser:
        query = await start(browser, nonces)
        callback = {"state": query["state"], "code": "code-1"}
        first = asyncio.ensure_future(browser.get("/callback", params=callback))
        while "exchanges" not in nonces:  # the first callback holds the state, its code at the IdP
            await asyncio.sleep(0.01)
        proxy.add_rule(r"^SET \S*oidc:", "reset_before", times=2)  # the command and redis-py's resend of it
        blip = await browser.get("/callback", params=callback)
        assert blip.status_code == 503 and blip.json()["reason"] == "store_unavailable"
        third = await browser.get("/callback", params=callback)
        assert third.status_code == 400 and third.json()["reason"] == "login_state_replayed"
        assert (await first).status_code == 302
        assert nonces["exchanges"] == "1"
