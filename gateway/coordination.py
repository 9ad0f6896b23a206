"""Coordination across workers: what one refresh token's record in the store means, and who acts.

Every request that needs a refresh reads the token's record at one instant and judges it (the
table in gateway.refresh's docstring, states in docs/refresh.md). Judged "take" (or a lost
attempt it may retry), the request tries the lock; whoever gets it looks again, then redeems
(gateway.redemption). Everyone else waits for the owner's announcement, looking again every
``POLL_INTERVAL`` in case it was lost, until ``refresh.wait_timeout``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from uuid import uuid4

from gateway.config import RefreshConfig
from gateway.families import Families
from gateway.idp_client import IdPClient
from gateway.lease import Lease
from gateway.metrics import Metrics
from gateway.reasons import TRANSIENT, Reason, ended_label
from gateway.redemption import SEND_WINDOW, Outcome, Redemption
from gateway.sealing import Sealer
from gateway.stalls import Stalls
from gateway.store import POLL_INTERVAL, Attempt, FamilyEnd, RecordKeys, Store, TokenRecord
from gateway.tokens import Verifier

log = logging.getLogger("gateway.refresh")
audit = logging.getLogger("gateway.audit")

SETTLE = 1.0  # seconds an attempt must look abandoned before another worker takes it over
MAX_FOLLOW = 4  # successors followed for one request that arrived within grace of several rotations

Step = Literal["take", "takeover", "wait", "stale"]


@dataclass(slots=True)
class Arrival:
    """When a flight began (monotonic, this process) and first read the store (the store's clock), and what
    the request knew of its session: the scope of the access token being replaced, which no answer may widen."""

    began: float
    at: float | None = None
    granted: frozenset[str] | None = None


class Coordinator:
    """Judges token records and takes the lock when the work falls to this process."""

    def __init__(
        self,
        *,
        config: RefreshConfig,
        store: Store,
        sealer: Sealer,
        idp: IdPClient,
        verifier: Verifier,
        families: Families,
        metrics: Metrics,
        redemption: Redemption,
        stalls: Stalls,
        owner: str,
        lifetime: Callable[[str], int],
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self._config = config
        self._store = store
        self._sealer = sealer
        self._idp = idp
        self._verifier = verifier
        self._families = families
        self._metrics = metrics
        self._redemption = redemption
        self._stalls = stalls  # a request held up in a stalled worker is not a late replay
        self._owner = owner
        self._lifetime = lifetime  # how long a cookie holding this refresh token may live
        self._spawn = spawn

    async def coordinate(self, keys: RecordKeys, token: str, arrived: Arrival, depth: int) -> Outcome:
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
            counted = outcome.label != "unverified" or outcome.access is None
            if not counted:
                count = await self._counted(keys, outcome.access or "", outcome.refresh or token)
                if isinstance(count, Outcome):
                    return count
                counted = count
            if outcome.ok:
                if record.used is not None and outcome.refresh not in (None, token) and depth < MAX_FOLLOW:
                    newer = await self._newer(keys, outcome.refresh, arrived, depth)
                    if newer is not None:
                        return newer
                if not counted:
                    return outcome  # "unverified": 503 with the successor kept, never handed out uncounted
                # Only the token's own record tells what is left of its grace: a successor followed to
                # (depth > 0) has a grace of its own, which may outlast the token's by far.
                rotated = record.rotated_at if depth == 0 else None
                left = None if rotated is None else rotated + self._config.grace_period - record.now
                return Outcome("grace_hit", outcome.access, outcome.refresh, outcome.refresh_max_age, left)
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
            return await self.coordinate(later, successor, arrived, depth + 1)
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
            return await self._redemption.run(keys, token, lease, takeover, arrived.granted)
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
        lifetime = self._lifetime(token)
        if verdict.claims is not None:
            ended = await self._count(keys, verdict.claims, lifetime)
            return ended or Outcome("reverified", access, token, lifetime)
        return Outcome("unverified", access, token, lifetime)

    async def _newer(self, keys: RecordKeys, successor: str, arrived: Arrival, depth: int) -> Outcome | None:
        """The newest tokens, when a grace hit's successor has itself been rotated (or its session ended) since.

        Access tokens that are due within the grace period rotate the successor within the token's
        grace: a late request with the token before last would get the superseded successor, and a
        browser that keeps those cookies presents it after its own grace period, which is reuse (a
        logout nobody asked for, I2). None: the successor is still the newest.
        """
        later = keys.of(self._sealer.token_hash(successor))
        found = await self._store.read_record(later)
        if found.used is None and found.ended is None:
            return None
        step = await self._judge(later, successor, found, arrived, depth + 1)  # rotated or ended: an outcome
        return step if isinstance(step, Outcome) else None

    async def _counted(self, keys: RecordKeys, access: str, refresh: str) -> Outcome | bool:
        """A successor whose access token did not verify at its write-out was not counted in the family
        (``members``): if it verifies now, it is handed out, so count it first, or ending the family would
        not refuse it (I3). The family's end if it ended meanwhile; else whether it was counted (if not, it is
        answered 503 without the access token, however a later look at it would verify: nothing handed out)."""
        verdict = await self._verifier.verify(access)
        if verdict.claims is None:
            return False
        return await self._count(keys, verdict.claims, self._lifetime(refresh)) or True

    async def _count(self, keys: RecordKeys, claims: dict[str, Any], lifetime: float) -> Outcome | None:
        """Count an access token verified after its write-out as the write-out would have: in the family's
        ``members`` (its end refuses the token) and linked to it (``member:``: the token's WebSockets close when
        the family ends). The family's end if it ended meanwhile, else None."""
        await self._families.link(keys.root, None, claims, lifetime)
        await self._families.join(keys.root, claims)
        ended = (await self._store.read_record(keys)).ended  # an end between our read and the join
        return Outcome(ended_label(ended)) if ended is not None else None

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
        async def revoke(end: FamilyEnd) -> None:  # best effort; the gateway refuses the family anyway
            newest = self._families.head(keys, end.head)
            if newest is not None:
                await self._idp.revoke(newest)

        # Ended in the background (the reply lost): revoked then, whether or not that end was the first.
        end = await self._families.end_surely(keys, reason, self._spawn, revoke)
        if end.first:
            self._spawn(revoke(end))
        return Outcome(ended_label(end.reason))

    def _waited(self, since: float | None) -> None:
        if since is not None:
            self._metrics.lock_wait(time.monotonic() - since)
