"""gateway/endsession.py: RP-initiated logout's end-session URL (OIDC RP-Initiated Logout 1.0 §2)."""

from __future__ import annotations

import time
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway.config.sessions import OIDCConfig
from gateway.denylist import Denylist
from gateway.endsession import EndSession
from gateway.families import Families
from gateway.login import OIDCLogin
from gateway.sealing import Sealer
from gateway.store import MemoryStore

ISSUER = "https://idp.example"


def login(meta: dict[str, Any], *, logout_redirect: str = "/bye?x=1", **oidc: Any) -> tuple[EndSession, Families]:
    def discovery(request: httpx.Request) -> httpx.Response:
        assert request.url == f"{ISSUER}/.well-known/openid-configuration"
        return httpx.Response(
            200,
            json={
                "issuer": ISSUER,
                "authorization_endpoint": f"{ISSUER}/auth",
                "token_endpoint": f"{ISSUER}/token",
                **meta,
            },
        )

    store, sealer = MemoryStore("t:", clock=time.time), Sealer("unit-secret")
    families = Families(store, sealer, Denylist(store), time.time, 3600)
    config = OIDCConfig(issuer=ISSUER, client_id="app", redirect_url="https://app.example/.gateway/callback", **oidc)
    flow = OIDCLogin(
        config=config,
        jar=cast(Any, None),
        http=httpx.AsyncClient(transport=httpx.MockTransport(discovery)),
        sealer=sealer,
        store=store,
        verifier=cast(Any, None),
        keys=cast(Any, None),
        algorithms=("RS256",),
        secure=True,
        families=families,
        logout_redirect=logout_redirect,
    )
    return EndSession(flow, "app", families, sealer), families


async def test_the_end_session_url_carries_the_sessions_id_token_and_the_way_back() -> None:
    flow, families = login({"end_session_endpoint": f"{ISSUER}/logout?realm=main"})
    await families.started({"sub": "alice", "jti": "j1", "exp": time.time() + 60}, "refresh-1", 3600, id_token="idt-1")
    url = await flow.url("refresh-1")
    assert url is not None and url.startswith(f"{ISSUER}/logout?realm=main&")
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert query == {
        "realm": "main",
        "client_id": "app",
        "post_logout_redirect_uri": "https://app.example/bye?x=1",
        "id_token_hint": "idt-1",
    }
    without = await flow.url("a-refresh-token-never-seen")  # no session: no hint, still the IdP
    assert without is not None and "id_token_hint" not in without


async def test_no_end_session_endpoint_keeps_todays_redirect() -> None:
    flow, _ = login({})
    assert await flow.url("refresh-1") is None
    flow, _ = login({"end_session_endpoint": "javascript:alert(1)"})
    assert await flow.url("refresh-1") is None


async def test_post_logout_redirect_url_and_unsafe_logout_redirects() -> None:
    flow, _ = login({"end_session_endpoint": f"{ISSUER}/logout"}, post_logout_redirect_url="https://app.example/out")
    url = await flow.url(None)
    assert url is not None and parse_qs(urlsplit(url).query)["post_logout_redirect_uri"] == ["https://app.example/out"]
    flow, _ = login({"end_session_endpoint": f"{ISSUER}/logout"}, logout_redirect="//evil.example/")
    url = await flow.url(None)
    assert url is not None and parse_qs(urlsplit(url).query)["post_logout_redirect_uri"] == ["https://app.example/"]


async def test_a_discovery_that_fails_in_any_way_costs_rp_initiated_logout_never_the_logout() -> None:
    """Regression: a discovery answer nested past the JSON parser's depth raised out of logout (a 500, and the
    session was not ended)."""
    ends, _ = login({})

    async def broken() -> dict[str, Any]:
        raise RecursionError("maximum recursion depth exceeded")

    ends._login.discover = broken  # type: ignore[method-assign]
    assert await ends.url("refresh-1") is None


async def test_logout_tokens_verify_with_the_id_tokens_keys_even_without_a_tokens_key() -> None:
    """Regression: with opaque access tokens and no key in tokens, every logout token was refused (unknown key)."""
    from gateway.endsession import IdTokenKeys
    from gateway.errors import KeyFetchError, LoginFailed
    from gateway.keys import StaticKey
    from gateway.reasons import Reason

    ends, _ = login({})
    keys = IdTokenKeys(ends._login)

    async def discovered() -> Any:
        return StaticKey("the provider's key")

    ends._login.id_token_keys = discovered  # type: ignore[method-assign]
    assert await keys.key_for("kid-1", "RS256") == "the provider's key"

    async def no_jwks_uri() -> Any:
        raise LoginFailed(503, Reason.IDP_ERROR)

    ends._login.id_token_keys = no_jwks_uri  # type: ignore[method-assign]
    with pytest.raises(KeyFetchError):  # a 503 at the endpoint: the IdP retries, nothing ends by mistake
        await keys.key_for("kid-1", "RS256")
