"""Session families: every token knows its session, and a session ends as a whole, everywhere.

A session is a refresh-token family, named by the keyed hash of its first refresh token (its
root). The store remembers, for as long as the cookies may live:

    family:{h(refresh)}  -> root   for every refresh token the gateway handed out: the first one of a
                                   login points at itself, a successor inherits the root; a token
                                   without one was never seen here (gateway.throttle)
    member:{h(jti)}      -> root   for every access token the gateway hands out (WebSockets find
                                   their session from their verified access token)
    members:{root}       the family's access tokens (jti until exp), written atomically with each
                         rotation (see ``Store.finish``) and at login
    head:{root}          sealed: the family's newest refresh token
    ended:{root}         why the family ended: session_ended (logout, back-channel logout), reuse, invalid_grant,
                         refresh_lost
    owner:{root}, id_token:{root}, by-sub:{h(sub)}, by-sid:{h(sid)}
                         the session index (gateway.session_index): ``FamilyIndex`` finds and ends the
                         families of a subject or an IdP login session

Ending a family (``end``) is one atomic step in the store; afterwards no token of the family gets
a 200 on any worker, whatever the IdP does with revocation (invariant I3, docs/refresh.md):
refresh tokens find ``ended:{root}``; every live access token of the family goes on the
denylist (refused by every worker within a second); ``session:{root}`` on the denylist closes
the family's WebSockets. Logout also denylists ``ended:{jti}`` for the access token it was
given, which closes sockets whose token has no family (a Bearer token from elsewhere).
Superseded tokens (``tokens.revoke_superseded``) are refused by HTTP but do not close sockets:
a rotation is not the end of a session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.denylist import Denylist, refuse_until
from gateway.errors import StoreError
from gateway.reasons import Reason, ended_label
from gateway.sealing import Sealer
from gateway.session_index import IndexRecords, SessionInfo
from gateway.store import BACKGROUND_RETRY, RETRY_PAUSE, FamilyEnd, RecordKeys, Store

log = logging.getLogger("gateway.families")

SESSION = "session:"  # denylist: every socket of this session ends
ENDED = "ended:"  # denylist: every socket opened with this access token (jti) ends
# ``ended:{jti}`` lasts at least this long: a socket outlives the token it was opened with, so an entry dated by the
# token's exp alone would have lapsed already at a logout after it; each worker's watchdog looks once a second.
ENDED_AT_LEAST = 60.0
AfterEnd = Callable[[FamilyEnd], Awaitable[Any]]  # what a caller does once a family's end is recorded


def access_refusals(jti: str, claims: dict[str, Any], now: float) -> tuple[tuple[str, float], tuple[str, float]]:
    """The denylist entries of a logged-out access token: its ``jti``, and the sockets opened with it (expired too)."""
    until = refuse_until(claims, now)
    return (jti, until), (ENDED + jti, max(until, now + ENDED_AT_LEAST))


class Families:
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        denylist: Denylist,
        clock: Callable[[], float],
        lifetime: float,
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._denylist = denylist
        self._clock = clock
        self._lifetime = lifetime  # how long an ended family is remembered: the longest a refresh cookie lives
        self.index = IndexRecords(store, sealer, clock, lifetime)
        self._background: set[asyncio.Future[None]] = set()  # a login's records written through an outage
        self._ending: set[str] = set()  # roots whose end is retried in the background: one retry each

    async def root_of(self, h: str) -> str:
        """The session of the refresh token with hash ``h`` (``h`` itself when never rotated). Raises StoreError."""
        return (await self.lookup(h))[0]

    async def lookup(self, h: str) -> tuple[str, bool]:
        """(the root of ``h``'s session, whether the gateway handed ``h`` out: login, capture or rotation).

        Raises StoreError.
        """
        raw = await self._store.get(f"family:{{{h}}}")
        return (raw.decode(), True) if raw else (h, False)

    async def link(self, root: str, refresh_token: str | None, claims: dict[str, Any] | None, lifetime: float) -> None:
        """Record that a new refresh token and access token belong to ``root``. Raises StoreError."""
        if refresh_token is not None:
            h = self._sealer.token_hash(refresh_token)
            await self._store.set(f"family:{{{h}}}", root.encode(), lifetime)
            if h != root:
                await self.index.touch(root)  # a rotation: the session index keeps the family
        jti = (claims or {}).get("jti")
        if isinstance(jti, str):
            await self._store.set(f"member:{{{self._sealer.token_hash(jti)}}}", root.encode(), lifetime)

    async def join(self, root: str, claims: dict[str, Any]) -> None:
        """Count an access token among the family's, so that ending the family refuses it. Raises StoreError."""
        jti = claims.get("jti")
        if isinstance(jti, str):  # an opaque token without exp is counted (and refused when it ends) for a day
            until = refuse_until(claims, self._clock())
            await self._store.add_member(RecordKeys(root, root).members, jti, until)

    async def started(
        self,
        claims: dict[str, Any],
        refresh_token: str | None,
        lifetime: float | None,
        *,
        sub: str | None = None,
        sid: str | None = None,
        id_token: str | None = None,
    ) -> None:
        """A login: the session is new, its root the refresh token's hash (without one, the access token's: a
        family of one token, so that back-channel logout ends it too), indexed under ``sub`` and ``sid`` (the ID
        token's, else the access token's claims). Never raises: through a store outage the records are written
        in the background once it answers (every write is idempotent), so that the session can still be ended
        as a whole (back-channel logout finds it, ending it refuses its first access token)."""
        jti = claims.get("jti")
        if refresh_token is None and not isinstance(jti, str):
            return
        sub = sub or (claims["sub"] if isinstance(claims.get("sub"), str) else None)
        sid = sid if sid is not None else claims.get("sid") if isinstance(claims.get("sid"), str) else None
        root = self._sealer.token_hash(refresh_token if refresh_token is not None else f"access\0{jti}")
        login = (root, refresh_token, claims, lifetime or 3600, sub, sid, id_token)
        try:
            await self._record(*login)
        except StoreError as exc:
            log.warning("session record not stored yet (%s); retrying in the background", exc)
            what = f"session record of family {root[:12]}"
            task = asyncio.ensure_future(self._later(lambda: self._record(*login), what))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _record(
        self, root: str, refresh: str | None, claims: dict[str, Any], lifetime: float, *index: str | None
    ) -> None:
        """The records of a login (see ``started``); ``index``: sub, sid, ID token. Raises StoreError."""
        sub, sid, id_token = index
        await self.link(root, refresh, claims, lifetime)
        await self.join(root, claims)
        if refresh is not None:  # NX: written late, it must not replace a newer head a rotation wrote meanwhile
            head = RecordKeys(root, root).head
            await self._store.set_if_absent(head, self._sealer.seal(refresh.encode(), head), lifetime)
        if sub is not None:
            await self.index.record(root, sub, sid, id_token)

    async def end(self, keys: RecordKeys, reason: Reason) -> FamilyEnd:
        """End the family of ``keys`` everywhere (atomic in the store); then refuse its live access tokens.

        Raises StoreError only when the family could not be marked ended; the denylist entries
        that follow are retried by the denylist's own sync when the store is back.
        """
        now = self._clock()
        end = await self._store.end_family(keys, reason, self._lifetime, now)
        for jti, exp in end.members.items():
            await self._deny(jti, exp)
        await self._deny(SESSION + keys.root, now + self._lifetime)
        return end

    async def ended_before_link(self, keys: RecordKeys, successor: str) -> bool:
        """Whether a logout with ``successor`` ended a family named after it, and if so end ``keys``' too.

        A rotation written out late (in the background, after a store outage) links its successor to
        the family only then; a logout with the successor that reached the store first found no
        family and ended one of the successor's own (``root_of``). The family it belongs to must end
        as well, or the logged-out token would go on refreshing. Best effort: False on a store error.
        """
        try:
            early = await self.ended(self._sealer.token_hash(successor))
            if early is not None:
                await self.end(keys, ended_label(early))
        except StoreError as exc:
            log.error("family %s: an early logout not checked (%s)", keys.root[:12], exc)
            return False
        return early is not None

    async def end_session(self, h: str, spawn: Callable[[Awaitable[Any]], None]) -> str | None:
        """Logout of the refresh token with hash ``h``: end its family; its newest refresh token, if known.

        With the store unreachable the end is recorded as soon as it answers again (retried in the
        background through ``spawn``), so a copy of the session's tokens does not outlive the outage.
        """
        try:
            return await self._end_session(h)
        except (StoreError, ValueError, TypeError) as exc:  # ValueError/TypeError: a reply of an odd shape
            log.error("logout token=%s: ended session not recorded yet (%s); retrying in the background", h[:12], exc)
            spawn(self._end_session_later(h))
            return None

    async def _end_session(self, h: str) -> str | None:
        keys = RecordKeys(await self.root_of(h), h)
        return self.head(keys, (await self.end(keys, Reason.SESSION_ENDED)).head)

    async def _end_session_later(self, h: str) -> None:
        await self._later(lambda: self._end_session(h), f"logout token={h[:12]}: ended session")

    async def end_surely(
        self, keys: RecordKeys, reason: Reason, spawn: Callable[[Awaitable[Any]], None], then: AfterEnd | None = None
    ) -> FamilyEnd:
        """``end``; when the store fails, the end is tried again in the background until it is recorded (it
        may have happened with its reply lost: the family then reads as ended and nobody else would refuse its
        live access tokens), then ``then`` (what the caller does after an end: revoking the head at the IdP,
        again if the lost reply was the first end's). Raises StoreError."""
        try:
            return await self.end(keys, reason)
        except StoreError as exc:
            log.error("family %s: end not confirmed (%s); retrying in the background", keys.root[:12], exc)
            if keys.root not in self._ending:  # however many requests meet the failure (a client retrying its 503)
                self._ending.add(keys.root)
                spawn(self._end_later(keys, reason, then))
            raise

    async def _end_later(self, keys: RecordKeys, reason: Reason, then: AfterEnd | None) -> None:
        ended: list[FamilyEnd] = []

        async def end() -> None:
            ended.append(await self.end(keys, reason))

        try:
            await self._later(end, f"family {keys.root[:12]}: ended session")
        finally:
            self._ending.discard(keys.root)
        if ended and then is not None:
            await then(ended[0])

    async def _later(self, step: Callable[[], Awaitable[Any]], what: str) -> None:
        """``step`` (idempotent) until the store takes it, for up to ``BACKGROUND_RETRY``."""
        deadline = time.monotonic() + BACKGROUND_RETRY
        while time.monotonic() < deadline:
            await asyncio.sleep(RETRY_PAUSE)
            try:
                await step()
            except (StoreError, ValueError, TypeError):  # ValueError/TypeError: a reply of an odd shape
                continue
            log.info("%s recorded", what)
            return
        log.error("%s never recorded (store unavailable)", what)

    def head(self, keys: RecordKeys, sealed: bytes | None) -> str | None:
        """The newest refresh token of the family, from ``FamilyEnd.head``."""
        if sealed is None:
            return None
        try:
            return self._sealer.unseal(sealed, keys.head).decode()
        except StoreError:
            log.error("family %s: the stored head token does not unseal", keys.root[:12])
            return None

    async def refuse(self, jti: str, expires_at: float) -> None:
        """Refuse one access token of an ended family everywhere (see ``end``)."""
        await self._deny(jti, expires_at)

    async def _deny(self, entry: str, expires_at: float) -> None:
        try:
            await self._denylist.deny(entry, expires_at)
        except StoreError as exc:
            # Refused here already; other workers learn it when this worker's copy is shared again.
            log.error("family end not shared with other workers yet (%s)", exc)

    async def ended(self, root: str) -> str | None:
        """Why the family ``root`` ended, or None while it lives. Raises StoreError."""
        return (await self._store.read_record(RecordKeys(root, root))).ended

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

    async def end_token(self, jti: str, expires_at: float) -> None:
        await self._denylist.deny(ENDED + jti, expires_at)


class FamilyIndex:
    """``SessionIndex`` for cookie sessions: the refresh-token families of a sub or sid, ended as a whole."""

    def __init__(self, families: Families) -> None:
        self._families = families

    async def sessions(self, *, sub: str | None = None, sid: str | None = None) -> list[SessionInfo]:
        return [info for _, info in await self._found(sub, sid)]

    async def end(self, *, sub: str | None = None, sid: str | None = None) -> list[SessionInfo]:
        ended = []
        for root, info in await self._found(sub, sid):
            # Ended already too: its tokens are refused again (idempotent), in case the end's reply was lost or
            # whoever ended it died before refusing them (the IdP's retry follows a 503).
            await self._families.end(RecordKeys(root, root), Reason.SESSION_ENDED)
            if info.ended is None:
                ended.append(info)
        return ended

    async def _found(self, sub: str | None, sid: str | None) -> list[tuple[str, SessionInfo]]:
        index = self._families.index
        found = []
        for root in await index.roots(sub, sid):
            owner = await index.owner(root)
            if owner is not None:
                refreshed = owner.get("refreshed")
                info = SessionInfo(
                    id=root[:16],
                    sub=owner["sub"],
                    sid=owner.get("sid"),
                    created=float(owner.get("created") or 0),
                    refreshed=float(refreshed) if refreshed else None,
                    ended=await self._families.ended(root),
                )
                found.append((root, info))
        return found
