"""gateway/logout.py: ``POST {prefix}/logout`` through a store outage."""

from __future__ import annotations

import time

import httpx
import jwt
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.config import CookiesConfig, TokensConfig
from gateway.cookies import CookieJar
from gateway.csrf import CSRFGuard
from gateway.denylist import Denylist
from gateway.errors import StoreError
from gateway.families import ENDED
from gateway.keys import StaticKey
from gateway.logout import Logout
from gateway.reasons import Reason
from gateway.sealing import Sealer
from gateway.store import MemoryStore
from gateway.tokens import Verifier

SECRET = "logout-tests-secret-0123456789abcdef"


class DownStore(MemoryStore):
    async def add_member(self, key: str, member: str, expires_at: float) -> None:
        raise StoreError("store down")


async def test_a_logout_during_a_store_outage_still_ends_the_tokens_websockets() -> None:
    """Regression: the token's jti and ``ended:{jti}`` (its WebSockets) were denied in one try; the first failing
    skipped the second, so a socket opened with a Bearer token (no family to end) stayed open after the logout,
    here and, once the store was back, on every worker (I3)."""
    store = DownStore("t:", clock=time.time)
    denylist = Denylist(store)
    verifier = Verifier(TokensConfig(algorithms=("HS256",), secret=SECRET), StaticKey(SECRET.encode()), denied=denylist)
    logout = Logout(
        jar=CookieJar.from_config(CookiesConfig(), Sealer("unit-secret")), verifier=verifier, denylist=denylist,
        refresher=None, csrf=CSRFGuard([]), origin=lambda scope: "https://app.example", redirect="/",
    )  # fmt: skip
    app = Starlette(routes=[Route("/logout", logout.handle, methods=["POST"])])
    token = jwt.encode({"sub": "alice", "jti": "jti-1", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://app.example") as client:
        answer = await client.post("/logout", headers={"authorization": f"Bearer {token}"})
    assert answer.status_code == 204
    assert (await verifier.verify(token)).reason == Reason.TOKEN_REVOKED
    assert ENDED + "jti-1" in denylist  # the sockets opened with it close
    assert set(denylist._unshared) == {"jti-1", ENDED + "jti-1"}  # both shared once the store answers
