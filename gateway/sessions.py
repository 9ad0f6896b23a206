"""Server-side sessions (``session.mode: server``): the browser holds one sealed id, the store holds the tokens.

    cookie   __Host-gw_session = AES-SIV(a random 32-byte id, bound to the cookie's name) (gateway.sealing)
    record   sess:{h}       h = the id's keyed hash; the value is sealed (AES-GCM, associated data = the
                            key, invariant I4): access, refresh and ID token, sub, sid, the session's
                            root, created, last recorded use, absolute end. Lives min(idle_timeout from
                            the last recorded use, what is left of absolute_timeout).
    indexes  sessions:sub:{h(sub)}, sessions:sid:{h(sid)}: expiring sets of session hashes, so that every
                            session of a subject, or of one IdP session, can be ended (back-channel logout)
    cache    per worker, by h: a record read from the store, until a use is due to be recorded; dropped
             as soon as ``session:{root}`` reaches the denylist (logout, reuse, an ended family: every
             worker within a second), the same entry that closes the session's WebSockets

Updates are compare-and-set on the sealed value (``Store.replace``): every seal draws a fresh nonce,
so the value read is the version; a writer that lost reads again. A use is recorded at most once
per ``touch_every`` seconds (a minute, or an eighth of the idle timeout), so a busy session costs
one store write a minute, not one per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

from gateway.cache import BoundedCache
from gateway.config import CookiesConfig, SessionConfig
from gateway.denylist import Denylist
from gateway.errors import StoreError
from gateway.families import SESSION
from gateway.sealing import Sealer
from gateway.store import Store
from gateway.types import RawHeaders

log = logging.getLogger("gateway.sessions")

ID_BYTES = 32
MAX_TOUCH_EVERY = 60.0
MIN_TOUCH_EVERY = 1.0


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """What the store keeps for one browser session (times: epoch seconds)."""

    access: str
    refresh: str | None
    id_token: str | None
    sub: str | None
    sid: str | None
    root: str  # the refresh family's root (or the session's hash without a refresh token): session:{root} ends it
    created: float
    seen: float  # the last recorded use
    expires: float  # the absolute end


class Loaded(NamedTuple):
    """A record as read: ``raw`` (its sealed value) is the version a compare-and-set writes over."""

    h: str
    raw: bytes
    record: SessionRecord
    until: float  # a cached copy serves until then (the next use to record, or the absolute end)


def session_key(h: str) -> str:
    """The store key of the session with hash ``h`` (its own hash tag: one slot per session)."""
    return f"sess:{{{h}}}"


def index_key(kind: str, value: str, sealer: Sealer) -> str:
    """The expiring set of session hashes of one ``sub`` or ``sid`` (``kind``)."""
    return f"sessions:{kind}:{{{sealer.token_hash(value)}}}"


class ServerSessions:
    """Session records in the store, the session cookie, and the per-worker cache; see the module docstring."""

    def __init__(
        self,
        config: SessionConfig,
        cookies: CookiesConfig,
        store: Store,
        sealer: Sealer,
        denylist: Denylist,
        clock: Callable[[], float] = time.time,
    ) -> None:
        secure, same_site = cookies.secure, cookies.same_site
        self._config = config
        self._store = store
        self._sealer = sealer
        self._denylist = denylist
        self._clock = clock
        self.cookie_name = ("__Host-" if secure else "") + config.cookie.name
        self._cookie_b = self.cookie_name.encode()
        self._attrs = f"; Path=/; HttpOnly; SameSite={same_site.capitalize()}" + ("; Secure" if secure else "")
        # At most once a second however short the idle timeout: a busy session never costs a write per request.
        self.touch_every = max(MIN_TOUCH_EVERY, min(MAX_TOUCH_EVERY, config.idle_timeout / 8))
        self._cache: BoundedCache[str, Loaded] = BoundedCache()
        self._loading: dict[str, asyncio.Future[Loaded | None]] = {}

    @property
    def bare_name(self) -> str:
        return self._config.cookie.name

    # --- the cookie ---------------------------------------------------------------------------

    def read_cookie(self, headers: RawHeaders) -> str | None:
        """The session cookie's value (as sent); None when absent, empty or sent twice."""
        found: bytes | None = None
        count = 0
        for name, value in headers:
            if name != b"cookie":
                continue
            for part in value.split(b";"):
                key, sep, val = part.strip().partition(b"=")
                if sep and key == self._cookie_b:
                    count += 1
                    found = val.strip(b'"')
        if count != 1 or not found:
            return None
        text = found.decode("ascii", errors="replace")
        return text if text.isprintable() and text.isascii() else None

    def open_cookie(self, value: str) -> str | None:
        """The session hash a cookie value names; None for a value this gateway did not seal."""
        session_id = self._sealer.open_cookie(value, self.cookie_name)
        return self._sealer.token_hash(session_id) if session_id else None

    def set_cookie(self, session_id: str) -> bytes:
        value = self._sealer.seal_cookie(session_id, self.cookie_name)
        return f"{self.cookie_name}={value}; Max-Age={self._config.absolute_timeout}{self._attrs}".encode("latin-1")

    def clear_cookie(self) -> bytes:
        return f"{self.cookie_name}=; Max-Age=0{self._attrs}".encode("latin-1")

    # --- records ------------------------------------------------------------------------------

    async def create(
        self, access: str, refresh: str | None, id_token: str | None, claims: dict[str, Any], root: str | None
    ) -> tuple[str, bytes]:
        """A new session: (its hash, the Set-Cookie value). Raises StoreError (then no session exists)."""
        session_id = secrets.token_urlsafe(ID_BYTES)
        h = self._sealer.token_hash(session_id)
        now = self._clock()
        sub, sid = claims.get("sub"), claims.get("sid")
        record = SessionRecord(
            access=access,
            refresh=refresh,
            id_token=id_token,
            sub=sub if isinstance(sub, str) else None,
            sid=sid if isinstance(sid, str) else None,
            root=root or h,
            created=now,
            seen=now,
            expires=now + self._config.absolute_timeout,
        )
        await self._store.set(session_key(h), self._seal(h, record), self._ttl(record, now))
        for kind, value in (("sub", record.sub), ("sid", record.sid)):
            if value is not None:
                await self._store.add_member(index_key(kind, value, self._sealer), h, record.expires)
        return h, self.set_cookie(session_id)

    async def load(self, h: str, *, fresh: bool = False) -> Loaded | None:
        """The live session ``h`` (from this worker's cache unless ``fresh``), its use recorded when due;
        None when it ended or expired. Concurrent reads of one session in this worker share one store read
        (a page's burst must not take a connection each). Raises StoreError."""
        if not fresh:
            cached = self._cache.get(h)
            if cached is not None and self._clock() < cached.until and not self._ended(cached.record):
                return cached
        flight = self._loading.get(h)
        if flight is None:
            flight = asyncio.ensure_future(self._read(h))
            self._loading[h] = flight
            flight.add_done_callback(lambda _: self._loading.pop(h, None))
        return await asyncio.shield(flight)

    async def _read(self, h: str, _depth: int = 0) -> Loaded | None:
        raw = await self._store.get(session_key(h))
        record = self._unseal(h, raw) if raw is not None else None
        now = self._clock()
        if record is None or raw is None:
            self._cache.pop(h, None)
            return None
        if now >= record.expires or now - record.seen > self._config.idle_timeout or self._ended(record):
            await self.end(h, record)
            return None
        if now - record.seen >= self.touch_every:
            touched = replace(record, seen=now)
            value = self._seal(h, touched)
            try:
                written = await self._store.replace(session_key(h), raw, value, self._ttl(touched, now))
            except StoreError as exc:
                # Recording the use is bookkeeping: the record was read. Served as read, not cached (the next
                # read tries again); a write-back over it that lost to a use that did land reads again.
                log.warning("session %s: use not recorded (%s)", h[:12], exc)
                self._cache.pop(h, None)
                return Loaded(h, raw, record, now)
            if written:
                raw, record = value, touched
            elif _depth < 3:  # another worker wrote meanwhile (a use, a refresh): read its version
                return await self._read(h, _depth + 1)
            # Still contended: the session as read serves (never a logout for it); the use is recorded next time.
        return self._cache.put(h, Loaded(h, raw, record, min(record.seen + self.touch_every, record.expires)))

    def forget(self, h: str) -> Loaded | None:
        """Drop this worker's cached copy of session ``h``; the copy it had, if any."""
        return self._cache.pop(h, None)

    async def save(self, loaded: Loaded, record: SessionRecord) -> Loaded | None:
        """Write ``record`` over ``loaded`` (compare-and-set); None when someone else wrote first. Raises StoreError."""
        h, now = loaded.h, self._clock()
        value = self._seal(h, record)
        if not await self._store.replace(session_key(h), loaded.raw, value, self._ttl(record, now)):
            self._cache.pop(h, None)
            return None
        return self._cache.put(h, Loaded(h, value, record, min(record.seen + self.touch_every, record.expires)))

    async def end(self, h: str, record: SessionRecord) -> None:
        """End the session everywhere: ``session:{root}`` denied (caches, sockets), the record deleted.

        Denied first: a delete whose reply is lost leaves nothing for a retry to end, and a store that reads but
        cannot write still has this worker refuse the session at once. Raises StoreError when the record could not
        be deleted."""
        self._cache.pop(h, None)
        try:
            await self._denylist.deny(SESSION + record.root, record.expires)
        except StoreError as exc:  # refused here already; shared by the denylist's sync once the store answers
            log.error("session %s ended; not shared with other workers yet (%s)", h[:12], exc)
        await self._store.delete(session_key(h))

    async def of(self, kind: str, value: str) -> list[str]:
        """The hashes of the live sessions of one ``sub`` or ``sid`` (``kind``). Raises StoreError."""
        return list(await self._store.members(index_key(kind, value, self._sealer), self._clock()))

    def _ended(self, record: SessionRecord) -> bool:
        return SESSION + record.root in self._denylist

    def _ttl(self, record: SessionRecord, now: float) -> float:
        return max(min(float(self._config.idle_timeout), record.expires - now), 0.001)

    def _seal(self, h: str, record: SessionRecord) -> bytes:
        return self._sealer.seal(json.dumps(asdict(record), separators=(",", ":")).encode(), session_key(h))

    def _unseal(self, h: str, raw: bytes) -> SessionRecord | None:
        try:
            return SessionRecord(**json.loads(self._sealer.unseal(raw, session_key(h))))
        except (StoreError, ValueError, TypeError):
            # Not sealed for this key (copied from another, another secret): never hands out tokens (I4).
            log.error("session %s: the stored record does not unseal; treated as no session", h[:12])
            return None
