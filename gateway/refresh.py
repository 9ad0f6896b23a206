"""Transparent refresh: one IdP call per refresh token, however many requests race, on any
number of processes sharing one store.

For a refresh token with keyed hash ``h`` (the token itself is never a key and never logged):

    in this process:  concurrent requests join one in-flight task (single flight)
    across processes: watch lock:{h}  ->  result:{h} there?      -> use it (grace hit)
                                      ->  used:{h} there?        -> reuse after grace: end session
                                      ->  acquire lock:{h}       -> we own the refresh
                                      ->  else wait for the lock's release announcement
    the owner:        re-check result/used; attempt:{h} left by a dead owner -> end session
                      (the IdP may have redeemed the token; a second call could be reuse);
                      mark attempt:{h}; call the IdP while renewing the lease (so a slow IdP
                      cannot outlive the lock, oauth2-proxy PR #3456); verify the new access
                      token; store result:{h} (grace_period) and used:{h} (as long as the old
                      cookie may live); release the lock, which wakes every waiter at once.

Everything stored is sealed (AES-GCM). A failure that says nothing about the session (IdP
down, store down, waited too long) keeps the cookies and answers 503; a dead grant or a
reused token ends the session (401 or login redirect, cookies cleared). RFC 9700 §4.14.2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from uuid import uuid4

from gateway.config import RefreshConfig
from gateway.cookies import CookieJar
from gateway.credentials import AuthResult
from gateway.denylist import Denylist
from gateway.errors import BadIdPResponse, IdPUnavailable, RefreshRejected, StoreError
from gateway.idp import IdPClient
from gateway.metrics import Metrics
from gateway.sealing import Sealer
from gateway.sessions import SessionIndex
from gateway.store import Store
from gateway.tokens import Verifier

log = logging.getLogger("gateway.refresh")
audit = logging.getLogger("gateway.audit")

FAILURE_MEMORY = 2.0  # seconds a passing IdP failure is shared with concurrent waiters (no stampede)
SHARE_RETRY = 10.0  # seconds the owner keeps trying to store a successor the IdP already issued
# Outcomes that end the session: both cookies are cleared.
FATAL = frozenset({"invalid_grant", "reuse", "abandoned"})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one refresh flight produced: new tokens or a failure code (``label`` is the metric)."""

    label: str
    access: str | None = None
    refresh: str | None = None
    refresh_max_age: int | None = None

    @property
    def ok(self) -> bool:
        return self.access is not None


class SessionRefresher:
    """Implements ``credentials.Refresher`` on top of a ``Store`` and an ``IdPClient``."""

    def __init__(
        self,
        *,
        config: RefreshConfig,
        store: Store,
        sealer: Sealer,
        idp: IdPClient,
        verifier: Verifier,
        jar: CookieJar,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        denylist: Denylist | None = None,
        sessions: SessionIndex | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._sealer = sealer
        self._idp = idp
        self._verifier = verifier
        self._jar = jar
        self._metrics = metrics
        self._clock = clock
        self._lease = config.lock_lease
        # The pid lets an operator (and the crash test) tell which worker holds a lock.
        self._owner = f"{os.getpid()}:{uuid4().hex}"
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._denylist = denylist  # set when tokens.revoke_superseded: the replaced access token is refused
        self._sessions = sessions  # session records, so that an ended session closes its WebSockets

    async def refresh(self, refresh_token: str, old_access: str | None, *, _nested: bool = False) -> AuthResult:
        h = self._sealer.token_hash(refresh_token)
        flight = self._inflight.get(h)
        leader = flight is None
        if flight is None:
            flight = asyncio.ensure_future(self._flight(h, refresh_token))
            self._inflight[h] = flight
            flight.add_done_callback(lambda _: self._inflight.pop(h, None))
        # Shielded: a client that goes away must not cancel an IdP call others are waiting for
        # (the IdP would have redeemed the token and nobody would learn its successor).
        outcome = await asyncio.shield(flight)
        result = await self._answer(outcome)
        if leader and result.claims is not None and old_access and self._denylist is not None:
            await self._deny_replaced(self._denylist, old_access, result.claims.get("jti"))
        if outcome.label == "grace_hit" and result.reason == "token_expired" and outcome.refresh and not _nested:
            # The successor's access token expired within the grace period (access lifetime
            # shorter than grace_period): carry on with the successor refresh token.
            return await self.refresh(outcome.refresh, outcome.access, _nested=True)
        return result

    async def end_session(self, refresh_token: str) -> bool:
        """Logout: the gateway refuses this refresh token from now on, and the IdP is asked to revoke it."""
        h = self._sealer.token_hash(refresh_token)
        try:
            dead = self._sealer.seal(b'{"dead": true}')
            await self._store.set(f"used:{{{h}}}", dead, self._cookie_lifetime(refresh_token))
            await self._store.delete(f"result:{{{h}}}")
        except StoreError as exc:
            log.error("logout token=%s: could not record the ended session (%s)", h[:12], exc)
        await self._end_sockets(h, self._cookie_lifetime(refresh_token))
        revoked = await self._idp.revoke(refresh_token)
        log.info("logout token=%s revoked_at_idp=%s", h[:12], revoked)
        return revoked

    async def _end_sockets(self, h: str, lifetime: float) -> None:
        """The session of refresh token ``h`` is over: its WebSockets close in every process."""
        if self._sessions is None:
            return
        try:
            await self._sessions.end(await self._sessions.root_of(h), lifetime)
        except StoreError as exc:
            log.error("token=%s: sockets of the ended session not closed everywhere (%s)", h[:12], exc)

    async def _deny_replaced(self, denylist: Denylist, old_access: str, new_jti: Any) -> None:
        claims = await self._verifier.signed_claims(old_access)
        jti, exp = (claims or {}).get("jti"), (claims or {}).get("exp")
        if isinstance(jti, str) and jti != new_jti and isinstance(exp, int | float) and exp > self._clock():
            try:
                await denylist.deny(jti, float(exp))
            except StoreError as exc:
                log.warning("could not denylist the replaced access token: %s", exc)

    async def close(self) -> None:
        """Let flights in progress finish (they hold locks and redeemed tokens)."""
        pending = [*self._inflight.values(), *self._background]
        if pending:
            await asyncio.wait(pending, timeout=self._config.timeout + 1)

    # --- one flight per process ---------------------------------------------------------------

    async def _flight(self, h: str, token: str) -> Outcome:
        started = time.monotonic()
        try:
            outcome = await self._coordinate(h, token)
        except StoreError as exc:
            log.error("refresh token=%s: store unavailable (%s); answering 503", h[:12], exc)
            self._metrics.store_error("refresh")
            outcome = Outcome("store_unavailable")
        except Exception:  # noqa: BLE001 - shared by every waiter: fail closed with 503, keep cookies
            log.exception("refresh token=%s: unexpected failure; answering 503", h[:12])
            outcome = Outcome("refresh_error")
        self._metrics.refresh(outcome.label)
        log.info("refresh token=%s outcome=%s duration=%.3fs", h[:12], outcome.label, time.monotonic() - started)
        return outcome

    async def _coordinate(self, h: str, token: str) -> Outcome:
        lock = f"lock:{{{h}}}"
        deadline = time.monotonic() + self._config.wait_timeout
        waited_since: float | None = None
        while True:
            async with self._store.watch(lock) as waiter:
                found = await self._lookup(h)
                if found is not None:
                    self._waited(waited_since)
                    return found
                if await self._store.acquire(lock, self._owner, self._lease):
                    break
                waited_since = waited_since or time.monotonic()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._waited(waited_since)
                    return Outcome("lock_timeout")
                # Woken by the owner's release; the slice bounds a wait on an owner that died.
                await waiter.wait(min(remaining, self._lease))
        self._waited(waited_since)
        try:
            return await self._own(h, token, lock)
        finally:
            try:
                await self._store.release(lock, self._owner)
            except StoreError as exc:
                log.warning("refresh token=%s: could not release the lock (%s); it expires by itself", h[:12], exc)

    def _waited(self, since: float | None) -> None:
        if since is not None:
            self._metrics.lock_wait(time.monotonic() - since)

    async def _lookup(self, h: str) -> Outcome | None:
        """A finished refresh of this token (grace hit or shared failure), or a reuse."""
        # Read in the reverse order of the owner's writes (result, then used): reading result
        # first could miss a result written a moment later and then see its used marker, which
        # would look like reuse of a token that is within its grace period (found by bench/soak.py).
        used = await self._store.get(f"used:{{{h}}}")
        raw = await self._store.get(f"result:{{{h}}}")
        if raw is not None:
            outcome = self._unseal(raw)
            if outcome.ok:
                return Outcome("grace_hit", outcome.access, outcome.refresh, outcome.refresh_max_age)
            return outcome
        if used is not None:
            return await self._reused(h, used)
        return None

    # --- the owner ------------------------------------------------------------------------------

    async def _own(self, h: str, token: str, lock: str) -> Outcome:
        found = await self._lookup(h)
        if found is not None:
            return found
        attempt = f"attempt:{{{h}}}"
        remember = self._cookie_lifetime(token)
        if await self._store.get(attempt) is not None:
            # The previous owner's lease ran out mid-call (it died). The IdP may have redeemed
            # the token; calling again could be reuse and revoke the whole family. End cleanly.
            audit.warning("event=refresh_abandoned token=%s", h[:12])
            await self._settle(h, Outcome("abandoned"), remember)
            return Outcome("abandoned")
        await self._store.set(attempt, b"1", remember)
        renewing = asyncio.create_task(self._renew(lock))
        try:
            return await self._redeem(h, token, attempt, remember)
        finally:
            renewing.cancel()  # held until the result is shared: a slow store must not free the lock early

    async def _redeem(self, h: str, token: str, attempt: str, remember: float) -> Outcome:
        started = time.monotonic()
        try:
            issued = await self._idp.redeem(token)
        except IdPUnavailable as exc:
            log.error("refresh token=%s: IdP unavailable: %s", h[:12], exc)
            await self._store.delete(attempt)  # the token was not redeemed: a later try is safe
            await self._store.set(f"result:{{{h}}}", self._seal(Outcome("idp_error")), FAILURE_MEMORY)
            return Outcome("idp_error")
        except RefreshRejected as exc:
            log.info("refresh token=%s: %s", h[:12], exc)
            await self._settle(h, Outcome("invalid_grant"), remember)
            await self._end_sockets(h, remember)  # the IdP says the session is over
            return Outcome("invalid_grant")
        except BadIdPResponse as exc:
            log.error("refresh token=%s: %s", h[:12], exc)
            await self._settle(h, Outcome("idp_bad_response"), remember)
            return Outcome("idp_bad_response")
        finally:
            self._metrics.idp_latency(time.monotonic() - started)

        verdict = await self._verifier.verify(issued.access)
        if verdict.claims is None:
            log.error("refresh token=%s: the IdP's new access token does not verify", h[:12])
            await self._settle(h, Outcome("idp_bad_response"), remember)
            return Outcome("idp_bad_response")
        successor = issued.refresh or token
        outcome = Outcome("ok", issued.access, successor, self._cookie_lifetime(successor))
        await self._share(h, token, outcome, attempt, remember, verdict.claims)
        return outcome

    async def _share(
        self, h: str, token: str, outcome: Outcome, attempt: str, remember: float, claims: dict[str, Any]
    ) -> None:
        """Store the successor for the other requests, retrying through a store failover.

        The IdP has redeemed the token, so these writes are the only record of its successor: a
        Redis failover (seconds) must not turn every other request into an abandoned session.
        This request gets the successor in any case.
        """
        deadline = time.monotonic() + max(2 * self._lease, SHARE_RETRY)
        while True:
            try:
                if self._sessions is not None:
                    # The new tokens join the old one's session (before anyone can use them).
                    root = await self._sessions.root_of(h)
                    await self._sessions.link(claims, outcome.refresh, root, outcome.refresh_max_age or remember)
                await self._store.set(f"result:{{{h}}}", self._seal(outcome), max(self._config.grace_period, 1.0))
                if outcome.refresh != token:
                    used = self._sealer.seal(json.dumps({"successor": outcome.refresh}).encode())
                    await self._store.set(f"used:{{{h}}}", used, remember)
                await self._store.delete(attempt)
                return
            except StoreError as exc:
                if time.monotonic() >= deadline:
                    log.error("refresh token=%s: new tokens could not be shared (%s)", h[:12], exc)
                    return
                await asyncio.sleep(0.25)

    async def _settle(self, h: str, outcome: Outcome, remember: float) -> None:
        """Record that this token is finished: concurrent requests share the failure, later ones get 401."""
        await self._store.set(f"result:{{{h}}}", self._seal(outcome), max(self._config.grace_period, 1.0))
        await self._store.set(f"used:{{{h}}}", self._sealer.seal(b'{"dead": true}'), remember)
        await self._store.delete(f"attempt:{{{h}}}")

    async def _renew(self, lock: str) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                if not await self._store.renew(lock, self._owner, self._lease):
                    log.warning("refresh lock %s was lost while the IdP call was in flight", lock)
                    return
            except StoreError as exc:
                log.warning("refresh lock renewal failed (%s); retrying", exc)

    async def _reused(self, h: str, raw: bytes) -> Outcome:
        data = json.loads(self._sealer.unseal(raw))
        if data.get("dead"):
            return Outcome("invalid_grant")
        # A superseded refresh token came back after the grace period: treat the session as
        # stolen (RFC 9700 §4.14.2). Revoke its successor and refuse the gateway's own copy.
        audit.warning("event=refresh_reuse token=%s", h[:12])
        successor: str = data["successor"]
        forever = self._cookie_lifetime(successor)
        await self._store.set(f"used:{{{h}}}", self._sealer.seal(b'{"dead": true}'), forever)
        await self._store.set(
            f"used:{{{self._sealer.token_hash(successor)}}}", self._sealer.seal(b'{"dead": true}'), forever
        )
        await self._store.delete(f"result:{{{self._sealer.token_hash(successor)}}}")
        await self._end_sockets(h, forever)
        task = asyncio.create_task(self._idp.revoke(successor))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return Outcome("reuse")

    # --- helpers ----------------------------------------------------------------------------------

    def _cookie_lifetime(self, token: str) -> int:
        return self._jar.refresh_lifetime(token, self._clock())

    def _seal(self, outcome: Outcome) -> bytes:
        return self._sealer.seal(json.dumps(asdict(outcome)).encode())

    def _unseal(self, raw: bytes) -> Outcome:
        return Outcome(**json.loads(self._sealer.unseal(raw)))

    async def _answer(self, outcome: Outcome) -> AuthResult:
        if not outcome.ok:
            reason = "invalid_grant" if outcome.label == "abandoned" else outcome.label
            cookies = [self._jar.clear_access(), self._jar.clear_refresh()] if outcome.label in FATAL else []
            return AuthResult(reason=reason, set_cookies=cookies)
        verdict = await self._verifier.verify(outcome.access) if outcome.access else None
        if verdict is not None and verdict.reason == "token_expired" and outcome.label == "grace_hit":
            return AuthResult(reason="token_expired")  # refresh() carries on with the successor
        if verdict is None or not verdict.ok or outcome.access is None or outcome.refresh is None:
            return AuthResult(reason="idp_bad_response")
        cookies = [
            self._jar.set_access(outcome.access),
            self._jar.set_refresh(outcome.refresh, outcome.refresh_max_age),
        ]
        return AuthResult(claims=verdict.claims, token=outcome.access, set_cookies=cookies, refreshed=True)
