"""The owner's critical section: one call to the IdP per refresh token, and its write-out.

Only the worker holding ``lock:{root}:h`` comes here (see ``gateway.refresh``). It records an
attempt under a fresh fence before it sends anything, sends only while that record is young,
classifies what the IdP did, and writes the successor out with one conditional script that
succeeds only while its attempt still holds the fence and the family is alive. The states and
why each fault leaves I1-I4 intact are in docs/refresh.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any
from uuid import uuid4

import jwt

from gateway.config import RefreshConfig
from gateway.denylist import refuse_until
from gateway.errors import BadIdPResponse, IdPAnswerLost, IdPUnavailable, RefreshRejected, StoreError
from gateway.families import Families
from gateway.idp_client import IdPClient, IssuedTokens
from gateway.lease import Lease
from gateway.reasons import FATAL, TRANSIENT, Reason, Refreshed, as_reason
from gateway.sealing import Sealer
from gateway.store import BACKGROUND_RETRY, RETRY_PAUSE, Attempt, Finish, RecordKeys, Store
from gateway.tokens import Verifier

log = logging.getLogger("gateway.refresh")
audit = logging.getLogger("gateway.audit")

FAILURE_MEMORY = 2.0  # seconds a passing IdP failure is shared with concurrent waiters (no stampede)
SEND_WINDOW = 2.0  # the owner sends only this long after asking to record its attempt: never late, after a pause
SHARE_RETRY = 10.0  # seconds a request waits for its write-out through a store outage (then: in the background)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one refresh flight produced: new tokens or a failure code (``label`` is the metric)."""

    label: Reason | Refreshed
    access: str | None = None
    refresh: str | None = None
    refresh_max_age: int | None = None
    grace_left: float | None = None  # a grace hit: how much of the grace period was left when the record was read
    grace_until: float | None = None  # the same as a deadline on the worker's grace clock, from before that read

    @property
    def ok(self) -> bool:
        return self.access is not None


def attempt_window(config: RefreshConfig) -> float:
    """How long after it began an attempt may still be in its owner's hands (then it counts as abandoned)."""
    return SEND_WINDOW + config.timeout + 2 * config.lock_lease + 1.0


class _Refused(Exception):
    """The store refused the attempt (the state changed under us): nothing was sent."""


class Redemption:
    """Calls the IdP for one refresh token and records what came of it; see the module docstring."""

    def __init__(
        self,
        *,
        config: RefreshConfig,
        store: Store,
        sealer: Sealer,
        idp: IdPClient,
        verifier: Verifier,
        families: Families,
        lifetime: Callable[[str], int],
        background: Callable[[Awaitable[Any]], None],
    ) -> None:
        self._config = config
        self._store = store
        self._sealer = sealer
        self._idp = idp
        self._verifier = verifier
        self._families = families
        self._lifetime = lifetime  # how long a cookie holding this refresh token may live
        self._background = background

    async def run(
        self, keys: RecordKeys, token: str, lease: Lease, takeover: Attempt | None, granted: frozenset[str] | None
    ) -> Outcome | None:
        """Redeem ``token`` (taking over ``takeover``, an attempt whose answer was lost, for one retry); an
        answer wider than ``granted`` (the replaced access token's scope, when known) is unusable.

        None when the store refused the attempt or the write-out because the state changed under
        us: the caller looks at the store again.
        """
        replace = takeover.fence if takeover is not None else None
        retried = takeover is not None
        while True:
            fence = uuid4().hex
            recorded = False

            async def record(fence: str = fence, replace: str | None = replace) -> None:
                # Called by the IdP client once connected, right before the request's first byte
                # leaves: a worker killed before this line leaves no attempt behind, one killed
                # after it has (almost always) sent the request.
                nonlocal recorded
                if not await self._begin(keys, token, fence, lease, replace):
                    raise _Refused
                recorded = True

            first_send = time.monotonic()
            try:
                issued = await self._idp.redeem(token, before_send=record, granted=granted)
            except _Refused:
                return None
            except IdPUnavailable as exc:
                log.error("refresh token=%s: IdP unavailable, token not redeemed: %s", keys.h[:12], exc)
                if recorded and not await self._settle(keys, fence, "clear", lease):
                    return Outcome(Reason.IDP_ERROR)  # taken over meanwhile: not ours to share
                return await self._shared_failure(keys, Reason.IDP_ERROR)
            except RefreshRejected as exc:
                log.info("refresh token=%s: %s", keys.h[:12], exc)
                try:
                    end = await self._families.end_surely(keys, Reason.INVALID_GRANT, self._background)
                except StoreError as store_exc:
                    log.error("refresh token=%s: session end not recorded (%s)", keys.h[:12], store_exc)
                    return Outcome(Reason.INVALID_GRANT)
                return Outcome(_fatal(end.reason))
            except IdPAnswerLost as exc:
                label = Reason.IDP_BAD_RESPONSE if isinstance(exc, BadIdPResponse) else Reason.IDP_ANSWER_LOST
                margin = SEND_WINDOW + self._config.timeout  # the retry must reach the IdP inside the window
                if not retried and time.monotonic() - first_send < self._config.idp_reuse_window - margin:
                    log.warning("refresh token=%s: %s; retrying once within the IdP's reuse window", keys.h[:12], exc)
                    replace, retried = fence, True
                    continue
                audit.warning("event=refresh_answer_lost token=%s detail=%s", keys.h[:12], exc)
                if not await self._settle(keys, fence, "maybe", lease):
                    return Outcome(label)  # taken over meanwhile: not ours to share
                return await self._shared_failure(keys, label)
            return await self._write_out(keys, token, fence, issued, lease)

    async def _begin(self, keys: RecordKeys, token: str, fence: str, lease: Lease, replace: str | None) -> bool:
        """Record the attempt under ``fence``; False if refused. Raises StoreError when it cannot be sure.

        Nothing is sent unless the record is certain and young: after a store failure the record
        may exist although we cannot know, so it is cleared (retried while we keep the lock).
        """
        asked = time.monotonic()
        # A "maybe" attempt is remembered as long as a cookie holding the token may live.
        window = attempt_window(self._config)
        ttl = max(float(self._lifetime(token)), window + 60)  # never gone while its owner may still act
        try:
            started = await self._store.begin_attempt(keys, lease.owner, fence, window, ttl, replace=replace)
        except (StoreError, asyncio.CancelledError):  # cancelled: refresh.timeout ran out meanwhile
            await self._settle(keys, fence, "clear", lease)
            raise
        if started is None:
            return False
        if time.monotonic() - asked > SEND_WINDOW:
            log.warning("refresh token=%s: the attempt was recorded too late to send it; not sending", keys.h[:12])
            await self._settle(keys, fence, "clear", lease)
            raise StoreError("store too slow to record the attempt in time")
        return True

    async def _write_out(
        self, keys: RecordKeys, token: str, fence: str, issued: IssuedTokens, lease: Lease
    ) -> Outcome | None:
        verdict = await self._verifier.verify(issued.access)
        claims = verdict.claims
        if claims is None:
            # Kept all the same (design point 3): the IdP has redeemed the token; the successor is the
            # session now. A later request verifies the access token again (JWKS back, clocks agree).
            log.error("refresh token=%s: the IdP's new access token does not verify (%s); successor kept",
                      keys.h[:12], verdict.reason)  # fmt: skip
        successor = issued.refresh or token
        rotated = successor != token
        max_age = self._lifetime(successor)
        outcome = Outcome("ok" if claims is not None else "unverified", issued.access, successor, max_age)
        writes = [(keys.result, self.seal(outcome, keys.result), max(self._config.grace_period, 1.0))]
        if rotated:
            writes.append((keys.head, self._sealer.seal(successor.encode(), keys.head), max_age))
        if claims is None and verdict.reason in TRANSIENT:
            later = keys.of(self._sealer.token_hash(successor))
            writes.append((later.issued, self._sealer.seal(issued.access.encode(), later.issued), _life(issued.access)))
        used = None
        if rotated:
            record = json.dumps({"successor": successor}).encode()
            used = (self._sealer.seal(record, keys.used), float(self._lifetime(token)))
        # Counted with or without exp (an opaque token's answer may not tell it), as a login's token is.
        jti = (claims or {}).get("jti")
        until = refuse_until(claims or {}, time.time())
        member = (jti, until) if isinstance(jti, str) else None

        async def finish() -> Finish:
            # The successor joins the family before anyone can present it.
            await self._families.link(keys.root, successor if rotated else None, claims, max_age)
            return await self._store.finish(keys, fence, writes, used=used, member=member)

        answer = await self._retrying(finish, SHARE_RETRY)
        if answer is None:
            log.error("refresh token=%s: successor not recorded yet (store unavailable); retrying in the background",
                      keys.h[:12])  # fmt: skip
            lease.kept = True
            self._background(self._finish_later(keys, finish, lease, successor if rotated else None, member))
            return outcome
        if answer == "ended":
            # Logout or reuse detection won the race: the family is over, and so are these tokens.
            log.info("refresh token=%s: the session ended during the IdP call; successor discarded", keys.h[:12])
            if rotated:
                self._background(self._idp.revoke(successor))
            return Outcome(Reason.SESSION_ENDED)  # the reason itself is the family's (refresh.ended_label)
        if answer == "superseded":
            log.warning("refresh token=%s: another worker took this attempt over; successor discarded", keys.h[:12])
            if rotated:
                self._background(self._idp.revoke(successor))
            return None
        return outcome

    async def _finish_later(
        self,
        keys: RecordKeys,
        finish: Callable[[], Awaitable[Finish]],
        lease: Lease,
        successor: str | None,
        member: tuple[str, float] | None,
    ) -> None:
        """The write-out after the request already has its tokens; if the session ended meanwhile, they die."""
        try:
            answer = await self._retrying(finish, BACKGROUND_RETRY)
            if answer == "ok" and successor is not None and await self._families.ended_before_link(keys, successor):
                answer = "ended"  # a logout with the successor came first: the family ends, these tokens die
            log.info("refresh token=%s: successor recorded late (%s)", keys.h[:12], answer or "gave up")
            if answer in ("ended", "superseded"):
                if member is not None:
                    await self._families.refuse(*member)  # the access token already handed out
                if successor is not None:
                    await self._idp.revoke(successor)
        finally:
            await lease.release()

    async def _settle(self, keys: RecordKeys, fence: str, state: Any, lease: Lease) -> bool:
        """Mark our attempt ``maybe`` or clear it; through a store outage, keep trying in the background.

        Clearing matters as much as marking: an attempt that never reached the IdP must not outlive
        us, or the next request would take it for a lost answer and end the session (failure 1).
        The lock stays ours until it is done, so nobody reads the attempt meanwhile.
        """

        async def settle() -> bool:
            return await self._store.settle_attempt(keys, fence, state)

        done = await self._retrying(settle, RETRY_PAUSE)
        if done is None:
            lease.kept = True
            self._background(self._settle_later(keys, settle, lease))
        return bool(done)

    async def _settle_later(self, keys: RecordKeys, settle: Callable[[], Awaitable[bool]], lease: Lease) -> None:
        try:
            done = await self._retrying(settle, BACKGROUND_RETRY)
            log.info(
                "refresh token=%s: attempt settled late (%s)", keys.h[:12], "ok" if done is not None else "gave up"
            )
        finally:
            await lease.release()

    async def _shared_failure(self, keys: RecordKeys, label: Reason) -> Outcome:
        """Tell concurrent requests, for a moment, so that they do not stampede a struggling IdP."""
        try:
            await self._store.set(keys.result, self.seal(Outcome(label), keys.result), FAILURE_MEMORY)
        except StoreError as exc:
            log.warning("refresh token=%s: failure not shared (%s)", keys.h[:12], exc)
        return Outcome(label)

    async def _retrying(self, step: Callable[[], Awaitable[Any]], patience: float) -> Any:
        """``step()`` until it does not raise StoreError; None when ``patience`` ran out."""
        deadline = time.monotonic() + patience
        failed = False
        while True:
            try:
                return await step()
            except StoreError as exc:
                if not failed:
                    log.warning("refresh: store unavailable (%s); retrying for up to %.0f s", exc, patience)
                failed = True
                if time.monotonic() >= deadline:
                    return None
                await asyncio.sleep(RETRY_PAUSE)

    def seal(self, outcome: Outcome, key: str) -> bytes:
        fields = asdict(outcome)
        del fields["grace_left"], fields["grace_until"]  # one worker's view of one read: never shared
        return self._sealer.seal(json.dumps(fields).encode(), key)

    def unseal(self, raw: bytes, key: str) -> Outcome:
        fields = json.loads(self._sealer.unseal(raw, key))
        label = fields.pop("label")
        return Outcome(as_reason(label) or label, **fields)


def _fatal(reason: str) -> Reason:
    """The outcome once an invalid_grant ended the family (the family's own reason if it ended first)."""
    code = as_reason(reason)
    return code if code in FATAL and code is not None else Reason.INVALID_GRANT


def _life(access: str) -> float:
    """How long to keep an access token awaiting verification: until its exp (unverified read), at most an hour."""
    try:
        exp = jwt.decode(access, options={"verify_signature": False}).get("exp")
    except jwt.InvalidTokenError:
        exp = None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return min(max(exp - time.time(), 1.0), 3600.0)
    return 60.0
