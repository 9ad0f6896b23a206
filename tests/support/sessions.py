"""Server-side sessions (``session.mode: server``) started in the store the way a login starts them.

A test that takes its tokens straight from the IdP (``IdPProcess.issue``) writes the session record with
the gateway's own code (gateway.sessions, gateway.families) and the config's ``store.secret``, and gets the
Cookie header a browser would hold after a login; no endpoint of the product exists for it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.config import CookiesConfig, SessionConfig
from gateway.denylist import Denylist
from gateway.families import Families
from gateway.sealing import Sealer
from gateway.sessions import ServerSessions, session_key
from gateway.store.redis import RedisStore
from support.sealed import STORE_SECRET


def start_session(
    redis_url: str,
    prefix: str,
    tokens: dict[str, str],
    claims: dict[str, Any],
    *,
    session: dict[str, Any] | None = None,
    secret: str = STORE_SECRET,
) -> str:
    """The session cookie (``name=value``) of a new session holding ``tokens`` (``{"access", "refresh"}``)."""

    async def start() -> str:
        store = RedisStore(redis_url, prefix)
        sealer = Sealer(secret)
        try:
            denylist = Denylist(store)
            config = SessionConfig(mode="server", **(session or {}))
            await Families(store, sealer, denylist, time.time, 3600).started(claims, tokens["refresh"], 3600)
            records = ServerSessions(config, CookiesConfig(), store, sealer, denylist)
            root = sealer.token_hash(tokens["refresh"])
            _, cookie = await records.create(tokens["access"], tokens["refresh"], None, claims, root)
            return cookie.decode().split(";")[0]
        finally:
            await store.close()

    return asyncio.run(start())


def record_key(prefix: str, cookie: str, secret: str = STORE_SECRET) -> str:
    """The Redis key of the session a cookie (``name=value``) names."""
    name, _, value = cookie.partition("=")
    session_id = Sealer(secret).open_cookie(value, name)
    assert session_id is not None, "not a session cookie of this secret"
    return prefix + session_key(Sealer(secret).token_hash(session_id))
