"""The credential of a server-side session (``session.mode: server``): resolved, verified, refreshed, written back.

    session cookie   -> its id unsealed (a value the gateway did not seal: no session, cookie cleared)
    record           -> gateway.sessions (this worker's cache, else the store); gone or expired: 401 session_ended
    access token     -> verified as a cookie's would be (gateway.tokens)
    due              -> the record read afresh (another worker may have refreshed), then its refresh token
                        through gateway.refresh's single flight (``SessionRefresher.outcome``): the same lock
                        per refresh-token hash, result sharing, grace, reuse detection and fault handling
    successor        -> written back into the record by compare-and-set; a writer that lost reads again and
                        finds the successor (or moves on from whatever is newer)
    fatal outcome    -> (reuse, invalid_grant, refresh_lost, ended family) the session record ends too

No token is ever set in a cookie: the only cookie this mode sets is the session cookie, at login,
and cleared at logout or when the session is over. docs/refresh.md, "Session mode", says why I1-I4 hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

import jwt

from gateway.authn import AuthResult
from gateway.denylist import refuse_until
from gateway.errors import StoreError
from gateway.families import SESSION, Families, access_refusals
from gateway.reasons import FATAL, TRANSIENT, Reason
from gateway.refresh import SessionRefresher
from gateway.sealing import Sealer
from gateway.session_index import SessionInfo
from gateway.sessions import Loaded, ServerSessions, SessionRecord
from gateway.store import BACKGROUND_RETRY, RETRY_PAUSE
from gateway.tokens import Verdict, Verifier
from gateway.types import RawHeaders

log = logging.getLogger("gateway.sessions")

MAX_ROUNDS = 4  # refreshes followed for one request (a grace hit whose access token expired, lost writes)


class SessionAuth:
    """Server-mode sessions as requests, logins and logouts see them; see the module docstring."""

    def __init__(
        self,
        *,
        sessions: ServerSessions,
        verifier: Verifier,
        refresher: SessionRefresher | None,
        families: Families,
        sealer: Sealer,
        absolute_timeout: float,
    ) -> None:
        self.sessions = sessions
        self._verifier = verifier
        self._refresher = refresher
        self._families = families
        self._sealer = sealer
        self._lifetime = absolute_timeout
        self._background: set[asyncio.Future[Any]] = set()
        self._inflight: dict[str, asyncio.Future[AuthResult]] = {}

    async def authenticate(self, headers: RawHeaders, client: str | None = None) -> AuthResult:
        """The request's session: its claims, or a reason (with the session cookie cleared when it is over)."""
        value = self.sessions.read_cookie(headers)
        if value is None:
            return AuthResult(reason=Reason.NO_TOKEN)
        h = self.sessions.open_cookie(value)
        if h is None:  # not sealed by this gateway: never looked up
            return AuthResult(reason=Reason.NO_TOKEN, set_cookies=[self.sessions.clear_cookie()])
        try:
            loaded = await self.sessions.load(h)
            if loaded is None:
                return self._over(Reason.SESSION_ENDED)
            verdict = await self._verifier.verify(loaded.record.access)
            if verdict.ok and not verdict.refreshable:
                return _valid(loaded, verdict)
            result = await self._refresh_once(h, client)
            # An early refresh the store cannot serve: the token still works (cookie mode too).
            return _valid(loaded, verdict) if verdict.ok and result.reason == Reason.STORE_UNAVAILABLE else result
        except StoreError as exc:
            log.error("session %s: store unavailable (%s); answering 503", h[:12], exc)
            return AuthResult(reason=Reason.STORE_UNAVAILABLE)

    async def _refresh_once(self, h: str, client: str | None) -> AuthResult:
        """Concurrent requests of one session in this worker share one refresh (one store read, one write-back)."""
        flight = self._inflight.get(h)
        if flight is None:
            flight = asyncio.ensure_future(self._refreshed(h, client))
            self._inflight[h] = flight
            flight.add_done_callback(lambda _: self._inflight.pop(h, None))
        result = await asyncio.shield(flight)  # a client that goes away must not cancel a refresh others wait for
        return replace(result, set_cookies=list(result.set_cookies))  # each answer its own list

    async def _refreshed(self, h: str, client: str | None) -> AuthResult:
        """The access token is due: read the record afresh, refresh it (single flight), write the successor back."""
        try:
            current = await self.sessions.load(h, fresh=True)  # another worker may have refreshed it already
        except StoreError as exc:  # never refreshed from a cached copy: it may hold a token rotated since (reuse)
            log.error("session %s: store unavailable (%s); answering 503", h[:12], exc)
            return AuthResult(reason=Reason.STORE_UNAVAILABLE)
        refreshed = False
        for _ in range(MAX_ROUNDS):
            if current is None:
                return self._over(Reason.SESSION_ENDED)
            record = current.record
            verdict = await self._verifier.verify(record.access)
            if verdict.ok and not verdict.refreshable:
                return _valid(current, verdict, refreshed)
            stranded = verdict.reason in NOT_YET and _past_exp(record.access)  # its key dropped meanwhile
            if (verdict.reason in TRANSIENT and not stranded) or record.refresh is None or self._refresher is None:
                return _valid(current, verdict, refreshed) if verdict.ok else AuthResult(reason=_kept(verdict))
            outcome = await self._refresher.outcome(record.refresh, record.access, client=client)
            if isinstance(outcome.label, Reason) and outcome.label in FATAL:
                await self.sessions.end(h, record)  # the family is over: so is the session
                return self._over(outcome.label)
            if outcome.access is None or outcome.refresh is None:
                # Nothing said about the session (IdP or store down, waited too long): kept, 503.
                label = outcome.label if isinstance(outcome.label, Reason) else Reason.REFRESH_ERROR
                return _valid(current, verdict, refreshed) if verdict.ok else AuthResult(reason=label)
            successor = replace(record, access=outcome.access, refresh=outcome.refresh)
            try:
                saved = await self.sessions.save(current, successor)
            except StoreError as exc:
                log.error("session %s: successor not written back yet (%s); retrying in the background", h[:12], exc)
                self._spawn(self._save_later(current, successor))
                saved = Loaded(h, current.raw, successor, 0.0)  # this request goes on with it
            refreshed = True
            if saved is None:  # another worker wrote first (the same successor, or a use): read its version
                current = await self.sessions.load(h, fresh=True)
                continue
            if outcome.label == "unverified":
                # Kept in the record all the same: the IdP redeemed the token; a later request verifies again.
                again = await self._verifier.verify(outcome.access)
                if again.ok:
                    return _valid(saved, again, refreshed)
                return AuthResult(
                    reason=Reason.IDP_TOKEN_UNVERIFIED if again.reason in TRANSIENT else Reason.IDP_BAD_RESPONSE
                )
            current = saved
        return AuthResult(reason=Reason.REFRESH_ERROR)

    async def _save_later(self, read: Loaded, successor: SessionRecord) -> None:
        """The write-back through a store outage: over the version read, or a newer one with only a use recorded."""
        deadline = time.monotonic() + BACKGROUND_RETRY
        while time.monotonic() < deadline:
            await asyncio.sleep(RETRY_PAUSE)
            try:
                if await self.sessions.save(read, successor) is not None:
                    return
                now = await self.sessions.load(read.h, fresh=True)
            except StoreError:
                continue
            if now is None or now.record.refresh != read.record.refresh:
                return  # ended, or moved on by another request
            read = now
        log.error("session %s: successor never written back (store unavailable)", read.h[:12])

    # --- login and logout ---------------------------------------------------------------------

    async def start(self, access: str, refresh: str | None, id_token: str | None, claims: dict[str, Any]) -> bytes:
        """A login (OIDC or capture): the session record and its cookie, the only Set-Cookie. Raises StoreError."""
        root = self._sealer.token_hash(refresh) if refresh else None
        await self._families.started(claims, refresh, self._lifetime)
        h, cookie = await self.sessions.create(access, refresh, id_token, claims, root)
        log.info("session %s started", h[:12])
        return cookie

    async def logout(self, value: str, client: str | None = None) -> None:
        """End the session a cookie value names, everywhere; through a store outage, retried in the background."""
        h = self.sessions.open_cookie(value)
        if h is None:
            return  # not ours: ends nothing
        try:
            await self._end(h, client)
        except StoreError as exc:
            log.error("logout session %s: not recorded yet (%s); retrying in the background", h[:12], exc)
            await self._refuse_here(h)
            self._spawn(self._end_later(h, client))

    async def _refuse_here(self, h: str) -> None:
        """Through a store outage: this worker refuses the session (and its token) at once; shared later."""
        cached = self.sessions.forget(h)
        if cached is None:
            return  # not cached here: any read goes to the store, which answers 503 until it is back
        record = cached.record
        await self._families.refuse(SESSION + record.root, record.expires)
        claims = await self._verifier.signed_claims(record.access)
        jti = (claims or {}).get("jti")
        if isinstance(jti, str):
            await self._families.refuse(jti, refuse_until(claims or {}, time.time()))

    async def id_token(self, value: str) -> str | None:
        """The ID token of the session a cookie value names (RP-initiated logout's hint), or None. Never raises."""
        h = self.sessions.open_cookie(value)
        if h is None:
            return None
        try:
            loaded = await self.sessions.load(h)
        except StoreError:
            return None
        return loaded.record.id_token if loaded is not None else None

    async def end_sessions_of(self, *, sub: str | None = None, sid: str | None = None) -> int:
        """End every session of a subject (``sub``) or of one IdP session (``sid``): back-channel logout
        (OIDC Back-Channel Logout 1.0 §2.5). Each as a logout would; how many there were. Raises StoreError."""
        found = [*(await self.sessions.of("sub", sub) if sub else [])]
        found += await self.sessions.of("sid", sid) if sid else []
        ended = 0
        for h in dict.fromkeys(found):
            ended += await self._end(h, None)
        return ended

    async def _end(self, h: str, client: str | None) -> int:
        loaded = await self.sessions.load(h, fresh=True)
        if loaded is None:
            return 0
        record = loaded.record
        if record.refresh is not None and self._refresher is not None:
            await self._refresher.end_session(record.refresh, client)  # the family ends; the IdP revokes
        await self.sessions.end(h, record)
        claims = await self._verifier.signed_claims(record.access)
        jti = (claims or {}).get("jti")
        if isinstance(jti, str):
            for entry, lasts in access_refusals(jti, claims or {}, time.time()):  # the token, and its sockets
                await self._families.refuse(entry, lasts)
        log.info("session %s ended", h[:12])
        return 1

    async def _end_later(self, h: str, client: str | None) -> None:
        deadline = time.monotonic() + BACKGROUND_RETRY
        while time.monotonic() < deadline:
            await asyncio.sleep(RETRY_PAUSE)
            try:
                await self._end(h, client)
                return
            except StoreError:
                continue

    def _over(self, reason: Reason) -> AuthResult:
        return AuthResult(reason=reason, set_cookies=[self.sessions.clear_cookie()])

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=2.0)


def _valid(loaded: Loaded, verdict: Verdict, refreshed: bool = False) -> AuthResult:
    """A usable access token; admission's fast path keeps it at most until the session's next recorded use."""
    return AuthResult(
        claims=verdict.claims,
        token=loaded.record.access,
        exp=verdict.exp,
        refreshed=refreshed,
        until=loaded.until,
        watch=SESSION + loaded.record.root,
    )


# Verdicts on the record's access token that may pass soon (a new kid not in the JWKS yet, an IdP clock ahead).
NOT_YET = frozenset({Reason.UNKNOWN_KEY, Reason.TOKEN_NOT_YET_VALID})


def _kept(verdict: Verdict) -> Reason:
    """Why the record's access token (from the IdP, never from the browser) cannot be used now: one that does not
    verify *yet* is the cookie-mode successor kept unverified, 503 with the session kept, not 401 (a login)."""
    reason = verdict.reason or Reason.REFRESH_ERROR
    return Reason.IDP_TOKEN_UNVERIFIED if reason in NOT_YET else reason


def _past_exp(token: str) -> bool:
    """The ``exp`` the token claims has passed. Read without its signature, for one decision only: a record's token
    that cannot be verified *and* says it expired is refreshed (its key dropped from the JWKS while the session sat
    idle), as cookie mode refreshes once the unverifiable access cookie is cleared. The record is the gateway's own
    sealed value; the flight's ``issued`` check verifies a just-issued successor again instead of calling the IdP."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.InvalidTokenError:
        return False
    return isinstance(exp, int | float) and exp <= time.time()


class ServerSessionIndex:
    """``session_index.SessionIndex`` over server-side sessions, found through their sub and sid sets."""

    def __init__(self, auth: SessionAuth) -> None:
        self._auth = auth

    async def sessions(self, *, sub: str | None = None, sid: str | None = None) -> list[SessionInfo]:
        return [info for _, info in await self._found(sub, sid)]

    async def end(self, *, sub: str | None = None, sid: str | None = None) -> list[SessionInfo]:
        found = await self._found(sub, sid)
        for h, _ in found:
            await self._auth._end(h, None)  # as a logout would: the family ends, the IdP revokes
        return [info for _, info in found]

    async def _found(self, sub: str | None, sid: str | None) -> list[tuple[str, SessionInfo]]:
        """The live sessions of ``sub`` and/or ``sid`` (both given: those matching both). Raises StoreError."""
        sessions = self._auth.sessions
        candidates = await sessions.of("sid", sid) if sid else await sessions.of("sub", sub or "")
        found = []
        for h in dict.fromkeys(candidates):
            loaded = await sessions.load(h, fresh=True)
            if loaded is None or (sub and loaded.record.sub != sub):
                continue
            record = loaded.record
            found.append((h, SessionInfo(h[:12], record.sub or "", record.sid, record.created, record.seen)))
        return found
