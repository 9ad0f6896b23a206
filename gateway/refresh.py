"""Transparent refresh: one IdP call per refresh token, however many requests race, on any
number of processes sharing one store, and whatever fails (docs/refresh.md).

For a refresh token with keyed hash ``h`` in the session family ``root`` (the token itself is
never a key and never logged), concurrent requests in one process join one flight, which reads
the token's record in one atomic step and judges it:

    family ended                        -> 401, cookies cleared (logout, reuse, invalid_grant, refresh_lost)
    result: the successor (grace)       -> use it (grace hit); a shared failure -> 503/502
    used: superseded                    -> the request arrived within grace_period of the rotation:
                                           carry on with the successor; later: reuse, end the family
    issued: an access token not yet verified -> verify it again
    attempt pending, owner on time      -> wait (woken by the store, or a look every 0.25 s)
    attempt lost ("maybe", or pending past its deadline for a while)
                                        -> the IdP may have redeemed the token: retry once within
                                           refresh.idp_reuse_window, else end cleanly (refresh_lost)
    nothing                             -> take lock:{root}:h and redeem (gateway.redemption)

A failure that says nothing about the session (IdP down, store down, waited too long) keeps the
cookies and answers 503. RFC 9700 §4.14.2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from uuid import uuid4

from gateway.authn import AuthResult
from gateway.config import RefreshConfig
from gateway.cookies import CookieJar
from gateway.denylist import Denylist
from gateway.errors import StoreError
from gateway.families import Families
from gateway.idp_client import IdPClient
from gateway.metrics import Metrics
from gateway.reasons import FATAL, Reason, ended_label
from gateway.redemption import BACKGROUND_RETRY, RETRY_PAUSE, SEND_WINDOW, TRANSIENT, Lease, Outcome, Redemption
from gateway.sealing import Sealer
from gateway.stalls import Stalls
from gateway.store import POLL_INTERVAL, Attempt, RecordKeys, Store, TokenRecord
from gateway.tokens import Verifier

log = logging.getLogger("gateway.refresh")
audit = logging.getLogger("gateway.audit")

SETTLE = 1.0  # seconds an attempt must look abandoned before another worker takes it over
MAX_FOLLOW = 4  # successors followed for one request that arrived within grace of several rotations
# Outcomes that end the session: both cookies are cleared. They are also the reasons a family ends.

Step = Literal["take", "takeover", "wait", "stale"]


@dataclass(slots=True)
class Arrival:
    """When a flight began (monotonic, this process) and first read the store (the store's clock)."""

    began: float
    at: float | None = None


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
        families: Families,
        clock: Callable[[], float] = time.time,
        denylist: Denylist | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._sealer = sealer
        self._idp = idp
        self._verifier = verifier
        self._jar = jar
        self._metrics = metrics
        self._families = families
        self._clock = clock
        # The pid lets an operator (and the crash test) tell which worker holds a lock.
        self._owner = f"{os.getpid()}:{uuid4().hex}"
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._denylist = denylist  # set when tokens.revoke_superseded: the replaced access token is refused
        self._stalls = Stalls()  # a request held up in a stalled worker is not a late replay
        self._redemption = Redemption(
            config=config,
            store=store,
            sealer=sealer,
            idp=idp,
            verifier=verifier,
            families=families,
            lifetime=self._cookie_lifetime,
            background=self._spawn,
        )

    async def refresh(self, refresh_token: str, old_access: str | None, *, _depth: int = 0) -> AuthResult:
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
        if outcome.label == "grace_hit" and result.reason == Reason.TOKEN_EXPIRED and outcome.refresh and _depth < 2:
            # The successor's access token expired within the grace period (access lifetime
            # shorter than grace_period): carry on with the successor refresh token.
            return await self.refresh(outcome.refresh, outcome.access, _depth=_depth + 1)
        return result

    async def end_session(self, refresh_token: str) -> bool:
        """Logout: the whole family is refused from now on, and the IdP is asked to revoke its newest token.

        With the store unreachable the end is recorded as soon as it answers again (retried in the
        background), so a copy of the session's tokens does not outlive the outage.
        """
        h = self._sealer.token_hash(refresh_token)
        newest = refresh_token
        try:
            newest = await self._record_end(h) or refresh_token
        except (StoreError, ValueError, TypeError) as exc:  # ValueError/TypeError: a reply of an odd shape
            log.error("logout token=%s: ended session not recorded yet (%s); retrying in the background", h[:12], exc)
            self._spawn(self._record_end_later(h))
        revoked = await self._idp.revoke(newest)
        log.info("logout token=%s revoked_at_idp=%s", h[:12], revoked)
        return revoked

    async def _record_end(self, h: str) -> str | None:
        keys = RecordKeys(await self._families.root_of(h), h)
        end = await self._families.end(keys, Reason.SESSION_ENDED)
        return self._families.head(keys, end.head)

    async def _record_end_later(self, h: str) -> None:
        deadline = time.monotonic() + BACKGROUND_RETRY
        while time.monotonic() < deadline:
            await asyncio.sleep(RETRY_PAUSE)
            try:
                await self._record_end(h)
            except (StoreError, ValueError, TypeError):
                continue
            log.info("logout token=%s: ended session recorded", h[:12])
            return
        log.error("logout token=%s: ended session never recorded (store unavailable)", h[:12])

    async def close(self) -> None:
        """Let flights and write-outs in progress finish (they hold locks and redeemed tokens)."""
        pending = [*self._inflight.values(), *self._background]
        if pending:
            await asyncio.wait(pending, timeout=self._config.timeout + 1)
        await self._stalls.close()

    # --- one flight per process ---------------------------------------------------------------

    async def _flight(self, h: str, token: str) -> Outcome:
        started = time.monotonic()
        self._stalls.start()
        try:
            keys = RecordKeys(await self._families.root_of(h), h)
            outcome = await self._coordinate(keys, token, Arrival(started), 0)
        except StoreError as exc:
            log.error("refresh token=%s: store unavailable (%s); answering 503", h[:12], exc)
            self._metrics.store_error("refresh")
            outcome = Outcome(Reason.STORE_UNAVAILABLE)
        except Exception:  # noqa: BLE001 - shared by every waiter: fail closed with 503, keep cookies
            log.exception("refresh token=%s: unexpected failure; answering 503", h[:12])
            outcome = Outcome(Reason.REFRESH_ERROR)
        self._metrics.refresh(outcome.label)
        log.info("refresh token=%s outcome=%s duration=%.3fs", h[:12], outcome.label, time.monotonic() - started)
        return outcome

    async def _coordinate(self, keys: RecordKeys, token: str, arrived: Arrival, depth: int) -> Outcome:
        """Judge the token's record until there is an outcome, redeeming it when it falls to us."""
        deadline = time.monotonic() + self._config.wait_timeout
        waited_since: float | None = None
        stale_since: float | None = None
        while True:
            async with self._store.watch(keys.lock) as waiter:
                record = await self._store.read_record(keys)
                arrived.at = record.now if arrived.at is None else arrived.at  # the store's clock: workers agree
                step = await self._judge(keys, token, record, arrived, depth)
                if isinstance(step, Outcome):
                    self._waited(waited_since)
                    return step
                # An attempt past its deadline must look abandoned for a while: its owner may just
                # be back from a store outage and about to settle it (failure 1).
                stale_since = (stale_since or time.monotonic()) if step == "stale" else None
                settled = stale_since is not None and time.monotonic() - stale_since >= SETTLE
                # One owner id per acquisition (the pid first, for operators): two flights of this
                # process (a token and, followed from it, its successor) never share a lock.
                owner = f"{self._owner}:{uuid4().hex[:8]}"
                if (step in ("take", "takeover") or settled) and await self._store.acquire(
                    keys.lock, owner, self._config.lock_lease
                ):
                    outcome = await self._own(keys, token, arrived, depth, settled, owner)
                    if outcome is not None:
                        self._waited(waited_since)
                        return outcome
                waited_since = waited_since or time.monotonic()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._waited(waited_since)
                    return Outcome(Reason.LOCK_TIMEOUT)
                # Woken by the owner's write-out or release; a lost announcement costs one poll.
                await waiter.wait(min(remaining, POLL_INTERVAL))

    async def _judge(
        self, keys: RecordKeys, token: str, record: TokenRecord, arrived: Arrival, depth: int
    ) -> Outcome | Step:
        """What a token's record means for a request that arrived at ``arrived.at`` (store clock)."""
        if record.ended is not None:
            return Outcome(ended_label(record.ended))
        if record.result is not None:
            outcome = self._redemption.unseal(record.result, keys.result)
            if outcome.ok:
                return Outcome("grace_hit", outcome.access, outcome.refresh, outcome.refresh_max_age)
            return outcome  # a failure shared for a moment
        if record.used is not None:
            successor: str = json.loads(self._sealer.unseal(record.used, keys.used))["successor"]
            rotated_at = record.rotated_at if record.rotated_at is not None else record.now
            held_up = self._stalls.credit(arrived.began)  # this worker stood still meanwhile
            at = arrived.at if arrived.at is not None else record.now
            if at - held_up > rotated_at + self._config.grace_period:
                return await self._reused(keys)
            if depth >= MAX_FOLLOW:
                return Outcome(Reason.REFRESH_ERROR)
            # Within grace, but the result is gone (this request was held up, a worker paused):
            # carry on with the successor, as the request would have a moment earlier.
            later = keys.of(self._sealer.token_hash(successor))
            return await self._coordinate(later, successor, arrived, depth + 1)
        if record.issued is not None:
            found = await self._issued(keys, token, record.issued)
            if found is not None:
                return found
        attempt = record.attempt
        if attempt is None or attempt.state == "done":
            return "take"
        if attempt.state == "maybe":
            return "takeover"
        return "wait" if record.now < attempt.deadline else "stale"

    async def _own(
        self, keys: RecordKeys, token: str, arrived: Arrival, depth: int, settled: bool, owner: str
    ) -> Outcome | None:
        """We hold the lock: look again, then redeem, take a lost attempt over, or end the session."""
        lease = Lease(self._store, keys.lock, owner, self._config.lock_lease).start()
        try:
            # Another owner may have finished between our read and our acquire.
            record = await self._store.read_record(keys)
            step = await self._judge(keys, token, record, arrived, depth)
            if isinstance(step, Outcome):
                return step
            if step == "wait" or (step == "stale" and not settled):
                return None
            takeover = record.attempt if step in ("takeover", "stale") else None
            if takeover is not None and not self._may_retry(takeover, record.now):
                return await self._lost(keys)
            return await self._redemption.run(keys, token, lease, takeover)
        finally:
            if not lease.kept:
                await lease.release()

    def _may_retry(self, attempt: Attempt, now: float) -> bool:
        """A lost answer may be retried once while the IdP still accepts the token (design point 7)."""
        window = self._config.idp_reuse_window
        # The retry must reach the IdP inside the window: recording it, then connecting, takes up to this.
        margin = SEND_WINDOW + self._config.timeout
        return window > 0 and not attempt.retried and now < attempt.started + window - margin

    async def _issued(self, keys: RecordKeys, token: str, sealed: bytes) -> Outcome | None:
        """This token came with an access token that did not verify at first: try it again."""
        access = self._sealer.unseal(sealed, keys.issued).decode()
        verdict = await self._verifier.verify(access)
        if verdict.reason == Reason.TOKEN_EXPIRED or (verdict.claims is None and verdict.reason not in TRANSIENT):
            return None  # too late to use it, or it never will verify: refresh as usual
        lifetime = self._cookie_lifetime(token)
        if verdict.claims is not None:
            await self._families.join(keys.root, verdict.claims)
            ended = (await self._store.read_record(keys)).ended  # an end between our read and the join
            if ended is not None:
                return Outcome(ended_label(ended))
            return Outcome("reverified", access, token, lifetime)
        return Outcome("unverified", access, token, lifetime)

    async def _lost(self, keys: RecordKeys) -> Outcome:
        """The IdP may have redeemed this token and its answer is lost: end the session cleanly, never resend."""
        audit.warning("event=refresh_lost token=%s", keys.h[:12])
        return await self._end(keys, Reason.REFRESH_LOST)

    async def _reused(self, keys: RecordKeys) -> Outcome:
        # A superseded refresh token came back after the grace period: treat the session as
        # stolen (RFC 9700 §4.14.2) and end the whole family, whoever holds its newer tokens.
        audit.warning("event=refresh_reuse token=%s", keys.h[:12])
        return await self._end(keys, Reason.REUSE)

    async def _end(self, keys: RecordKeys, reason: Reason) -> Outcome:
        end = await self._families.end(keys, reason)
        newest = self._families.head(keys, end.head)
        if end.first and newest is not None:
            self._spawn(self._idp.revoke(newest))  # best effort; the gateway refuses the family anyway
        return Outcome(ended_label(end.reason))

    # --- answers ----------------------------------------------------------------------------------

    async def _answer(self, outcome: Outcome) -> AuthResult:
        if isinstance(outcome.label, Reason) and outcome.label in FATAL:
            return AuthResult(reason=outcome.label, set_cookies=[self._jar.clear_access(), self._jar.clear_refresh()])
        if outcome.access is None or outcome.refresh is None:
            return AuthResult(reason=outcome.label if isinstance(outcome.label, Reason) else Reason.REFRESH_ERROR)
        verdict = await self._verifier.verify(outcome.access)
        if verdict.reason == Reason.TOKEN_EXPIRED and outcome.label == "grace_hit":
            return AuthResult(reason=Reason.TOKEN_EXPIRED)  # refresh() carries on with the successor
        if verdict.claims is None:
            # The IdP issued a successor whose access token does not verify (yet): keep the
            # successor in the refresh cookie, answer 503 (or 502 if it never can), try again later.
            reason = Reason.IDP_TOKEN_UNVERIFIED if verdict.reason in TRANSIENT else Reason.IDP_BAD_RESPONSE
            return AuthResult(
                reason=reason, set_cookies=[self._jar.set_refresh(outcome.refresh, outcome.refresh_max_age)]
            )
        cookies = [
            self._jar.set_access(outcome.access),
            self._jar.set_refresh(outcome.refresh, outcome.refresh_max_age),
        ]
        return AuthResult(claims=verdict.claims, token=outcome.access, set_cookies=cookies, refreshed=True)

    async def _deny_replaced(self, denylist: Denylist, old_access: str, new_jti: Any) -> None:
        claims = await self._verifier.signed_claims(old_access)
        jti, exp = (claims or {}).get("jti"), (claims or {}).get("exp")
        if isinstance(jti, str) and jti != new_jti and isinstance(exp, int | float) and exp > self._clock():
            try:
                await denylist.deny(jti, float(exp))
            except StoreError as exc:
                log.warning("could not denylist the replaced access token: %s", exc)

    # --- helpers ----------------------------------------------------------------------------------

    def _waited(self, since: float | None) -> None:
        if since is not None:
            self._metrics.lock_wait(time.monotonic() - since)

    def _cookie_lifetime(self, token: str) -> int:
        return self._jar.refresh_lifetime(token, self._clock())

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
