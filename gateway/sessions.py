"""Which session a token belongs to, so that ending a session closes its WebSockets everywhere.

A session is a refresh-token family, named by the keyed hash of its first refresh token (its
root). The store remembers, for as long as the cookies may live:

    family:{h(refresh)} -> root   written at each rotation: the successor inherits the root
    member:{jti}        -> root   written for every access token the gateway hands out (token
                                  capture, OIDC login, rotation)

A socket learns its session from its access token, which has been verified (never from the
refresh cookie beside it, which nobody has checked). Ending a session (logout, refresh-token
reuse, a grant the IdP refuses) puts ``session:{root}`` on the denylist; every worker's
WebSocket watchdog closes the sockets of that session. Logout also puts ``ended:{jti}`` there
for the access token it was given, which closes sockets whose token has no session record
(a Bearer token, or a session the gateway did not start). Superseded tokens
(``tokens.revoke_superseded``) are refused by HTTP but do not close sockets: a rotation is
not the end of a session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gateway.denylist import Denylist
from gateway.errors import StoreError
from gateway.sealing import Sealer
from gateway.store import Store

log = logging.getLogger("gateway.sessions")

SESSION = "session:"  # denylist: every socket of this session ends
ENDED = "ended:"  # denylist: every socket opened with this access token (jti) ends


class SessionIndex:
    def __init__(self, store: Store, sealer: Sealer, denylist: Denylist, clock: Callable[[], float]) -> None:
        self._store = store
        self._sealer = sealer
        self._denylist = denylist
        self._clock = clock

    async def root_of(self, h: str) -> str:
        """The session of the refresh token with hash ``h`` (``h`` itself when never rotated). Raises StoreError."""
        raw = await self._store.get(f"family:{{{h}}}")
        return raw.decode() if raw else h

    async def link(self, claims: dict[str, Any], refresh_token: str | None, root: str, lifetime: float) -> None:
        """Record that these tokens belong to session ``root``. Raises StoreError."""
        if refresh_token is not None and self._sealer.token_hash(refresh_token) != root:
            await self._store.set(f"family:{{{self._sealer.token_hash(refresh_token)}}}", root.encode(), lifetime)
        jti = claims.get("jti")
        if isinstance(jti, str):
            await self._store.set(f"member:{{{self._sealer.token_hash(jti)}}}", root.encode(), lifetime)

    async def started(self, claims: dict[str, Any], refresh_token: str | None, lifetime: float | None) -> None:
        """A login: the session is new, its root the refresh token's hash. Best effort."""
        if refresh_token is None:
            return
        try:
            await self.link(claims, refresh_token, self._sealer.token_hash(refresh_token), lifetime or 3600)
        except StoreError as exc:
            log.warning("session record not stored (%s): logout closes this session's sockets by token only", exc)

    async def watch_keys(self, claims: dict[str, Any]) -> tuple[str, ...]:
        """The denylist entries that end a socket opened with this (verified) access token."""
        jti = claims.get("jti")
        if not isinstance(jti, str):
            return ()
        try:
            raw = await self._store.get(f"member:{{{self._sealer.token_hash(jti)}}}")
        except StoreError:
            raw = None  # the store is down: the token itself still ends it
        return (ENDED + jti, SESSION + raw.decode()) if raw else (ENDED + jti,)

    async def end(self, root: str, lifetime: float) -> None:
        """Close every socket of this session, in every process. Raises StoreError (ended here all the same)."""
        await self._denylist.deny(SESSION + root, self._clock() + max(lifetime, 60))

    async def end_token(self, jti: str, expires_at: float) -> None:
        await self._denylist.deny(ENDED + jti, expires_at)
