"""The session index: which sessions a subject (``sub``) or an IdP login session (``sid``) has, so that
back-channel logout (``gateway.backchannel``) and ``gateway sessions`` can end them.

``SessionIndex`` is what they use; any kind of session implements it. Cookie sessions (refresh-token
families) implement it as ``families.FamilyIndex`` over the records kept here, written at login and
kept alive by each rotation:

    owner:{root}          sealed: {sub, sid, created, refreshed} of the family ``root``
    id_token:{root}       sealed: the ID token of an OIDC login (``id_token_hint`` at RP-initiated logout)
    by-sub:{h(sub)}       the families of a subject (expiring set: root until the family may end)
    by-sid:{h(sid)}       the families of an IdP login session

Keys of one family share its hash tag; each index set is one key, so every write touches one Redis
Cluster slot. ``sub`` and ``sid`` are keyed hashes in key names, sealed in values, never logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import StoreError
from gateway.sealing import Sealer
from gateway.store import Store

log = logging.getLogger("gateway.sessions")


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session as an operator sees it: never a token. ``id`` is a short, stable handle (a hash)."""

    id: str
    sub: str
    sid: str | None
    created: float
    refreshed: float | None
    ended: str | None = None


class SessionIndex(Protocol):
    """Sessions of a subject or of an IdP login session, found and ended on every worker and replica.

    With both ``sub`` and ``sid``, only sessions matching both; at least one must be given.
    """

    async def sessions(self, *, sub: str | None = None, sid: str | None = None) -> list[SessionInfo]:
        """The sessions still remembered (ended ones included, with why). Raises StoreError."""
        ...

    async def end(self, *, sub: str | None = None, sid: str | None = None) -> list[SessionInfo]:
        """End them everywhere (I3); the ones this call found alive. Raises StoreError."""
        ...


def owner_key(root: str) -> str:
    return f"owner:{{{root}}}"


def id_token_key(root: str) -> str:
    return f"id_token:{{{root}}}"


class IndexRecords:
    """The index's records in the store: who owns a family, and the families of a sub or sid."""

    def __init__(self, store: Store, sealer: Sealer, clock: Callable[[], float], lifetime: float) -> None:
        self._store = store
        self._sealer = sealer
        self._clock = clock
        self._lifetime = lifetime  # the longest a family may live after its last rotation

    def _set_key(self, kind: str, value: str) -> str:
        return f"by-{kind}:{{{self._sealer.token_hash(kind + chr(0) + value)}}}"

    async def record(self, root: str, sub: str, sid: str | None, id_token: str | None) -> None:
        """A login: index the family under its sub and sid; keep its ID token. Raises StoreError."""
        now = self._clock()
        owner = {"sub": sub, "sid": sid, "created": now, "refreshed": None}
        await self._write(root, owner, now)
        if id_token is not None:
            key = id_token_key(root)
            await self._store.set(key, self._sealer.seal(id_token.encode(), key), self._lifetime)

    async def touch(self, root: str) -> None:
        """A rotation: the family lives on, and so do its index entries. Best effort."""
        try:
            owner = await self.owner(root)
            if owner is not None:
                now = self._clock()
                await self._write(root, owner | {"refreshed": now}, now)
        except StoreError as exc:
            log.warning("session index of family %s not extended (%s)", root[:12], exc)

    async def _write(self, root: str, owner: dict[str, Any], now: float) -> None:
        key = owner_key(root)
        await self._store.set(key, self._sealer.seal(json.dumps(owner).encode(), key), self._lifetime)
        await self._store.add_member(self._set_key("sub", owner["sub"]), root, now + self._lifetime)
        if owner.get("sid"):
            await self._store.add_member(self._set_key("sid", owner["sid"]), root, now + self._lifetime)

    async def owner(self, root: str) -> dict[str, Any] | None:
        """The family's {sub, sid, created, refreshed}, or None (not indexed, or forgotten). Raises StoreError."""
        key = owner_key(root)
        raw = await self._store.get(key)
        if raw is None:
            return None
        try:
            found = json.loads(self._sealer.unseal(raw, key))
        except (StoreError, ValueError):
            log.error("family %s: the stored owner record does not unseal", root[:12])
            return None
        return found if isinstance(found, dict) and isinstance(found.get("sub"), str) else None

    async def roots(self, sub: str | None, sid: str | None) -> list[str]:
        """The families indexed under ``sid`` (or else ``sub``), filtered by both. Raises StoreError."""
        if sid is None and sub is None:
            raise ValueError("need sub or sid")
        now = self._clock()
        found = await self._store.members(self._set_key("sid", sid) if sid else self._set_key("sub", str(sub)), now)
        if sid is None or sub is None:
            return sorted(found)
        return sorted(set(found) & set(await self._store.members(self._set_key("sub", sub), now)))

    async def id_token(self, root: str) -> str | None:
        """The ID token of the family's login, if kept. Best effort."""
        key = id_token_key(root)
        try:
            raw = await self._store.get(key)
            return self._sealer.unseal(raw, key).decode() if raw else None
        except StoreError as exc:
            log.warning("ID token of family %s not read (%s)", root[:12], exc)
            return None
