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

Judging and waiting are gateway.coordination; the IdP call and the write-out gateway.redemption;
this module turns the outcome into the request's answer (cookies) and runs logout.

A failure that says nothing about the session (IdP down, store down, waited too long) keeps the
cookies and answers 503. RFC 9700 §4.14.2.

With raw refresh cookies (``cookies.refresh.sealed: false``) a token the gateway never handed out
(no ``family:`` record) may only start a flight, or a logout, while its client is within
``gateway.throttle``'s limit: beyond it, 429 and nothing is written or sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, NamedTuple
from uuid import uuid4

from gateway.authn import AuthResult
from gateway.cache import BoundedCache
from gateway.config import RefreshConfig
from gateway.cookies import CookieJar
from gateway.coordination import Arrival, Coordinator
from gateway.denylist import Denylist, refuse_until
from gateway.errors import CookieTooLarge, StoreError
from gateway.families import Families
from gateway.idp_client import IdPClient, scopes_of
from gateway.metrics import Metrics
from gateway.reasons import FATAL, TRANSIENT, Reason
from gateway.redemption import Outcome, Redemption
from gateway.sealing import Sealer
from gateway.stalls import Stalls
from gateway.store import RecordKeys, Store
from gateway.throttle import ClientThrottle
from gateway.tokens import Verifier

log = logging.getLogger("gateway.refresh")


class _Grace(NamedTuple):
    """A grace hit remembered by this worker: the successor, and its cookies, until the grace period ends."""

    until: float  # on the refresher's grace clock
    access: str
    cookies: tuple[bytes, ...]


class SessionRefresher:
    """Implements ``authn.Refresher`` on top of a ``Store`` and an ``IdPClient``."""

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
        throttle: ClientThrottle | None = None,
        grace_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._grace_clock = grace_clock  # measures, here, what the store said was left of a grace period
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
        # Refresh-token hash -> a grace hit answered here: the same old cookie again (a page's parallel
        # requests, a client slow to take the new cookies) is answered without the store.
        self._graces: BoundedCache[str, _Grace] = BoundedCache(2048)  # an evicted one is asked of the store again
        self._background: set[asyncio.Future[Any]] = set()
        self._denylist = denylist  # set when tokens.revoke_superseded: the replaced access token is refused
        self._stalls = Stalls()  # a request held up in a stalled worker is not a late replay
        self._throttle = throttle  # raw refresh cookies: never-seen tokens per client (gateway.throttle)
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
        self._coordinator = Coordinator(
            config=config,
            store=store,
            sealer=sealer,
            idp=idp,
            verifier=verifier,
            families=families,
            metrics=metrics,
            redemption=self._redemption,
            stalls=self._stalls,
            owner=self._owner,
            lifetime=self._cookie_lifetime,
            spawn=self._spawn,
        )

    async def refresh(
        self, refresh_token: str, old_access: str | None, *, client: str | None = None, _depth: int = 0
    ) -> AuthResult:
        h = self._sealer.token_hash(refresh_token)
        remembered = self._graces.get(h)
        if remembered is not None and (result := await self._remembered(h, remembered)) is not None:
            return result
        outcome, leader = await self._join(h, refresh_token, old_access, client)
        result = await self._answer(outcome)
        until = outcome.grace_until
        if outcome.label == "grace_hit" and until is not None and result.claims is not None and result.set_cookies:
            self._graces.put(h, _Grace(until, outcome.access or "", tuple(result.set_cookies)))
        if leader and result.claims is not None and old_access and self._denylist is not None:
            await self._deny_replaced(self._denylist, old_access, result.claims.get("jti"))
        if outcome.label == "grace_hit" and result.reason == Reason.TOKEN_EXPIRED and outcome.refresh and _depth < 2:
            # The successor's access token expired within the grace period (access lifetime
            # shorter than grace_period): carry on with the successor refresh token. Its grace end is not this
            # token's: admission keeps no answer for these cookies (``until``), the store judges them each time.
            carried = await self.refresh(outcome.refresh, outcome.access, client=client, _depth=_depth + 1)
            return replace(carried, until=None) if carried.until is not None else carried
        return result

    async def outcome(self, refresh_token: str, old_access: str | None, *, client: str | None = None) -> Outcome:
        """The flight's outcome for ``refresh_token``, for callers that keep the tokens themselves
        (gateway.sessionauth): the same single flight, lock, result sharing, grace and reuse detection."""
        return (await self._join(self._sealer.token_hash(refresh_token), refresh_token, old_access, client))[0]

    async def _remembered(self, h: str, grace: _Grace) -> AuthResult | None:
        """A grace hit this worker answered before, while the grace period lasts and its successor verifies
        (the denylist included: a session ended meanwhile is refused here within a second, as on the fast
        path); None sends the request to the store.

        Not once the successor's access token is due: the successor may be rotated from then on, and only
        the store knows its own successor (a superseded one handed out here would come back as reuse)."""
        if self._grace_clock() < grace.until:
            verdict = await self._verifier.verify(grace.access)
            # Verifying may have taken a while (an opaque token asked about again): grace must last still.
            if verdict.claims is not None and not verdict.refreshable and self._grace_clock() < grace.until:
                self._metrics.refresh("grace_hit")
                # ``until``: admission may answer the same cookies again, without asking here, while grace lasts.
                until = self._clock() + (grace.until - self._grace_clock())
                cookies = list(grace.cookies)
                return AuthResult(
                    claims=verdict.claims,
                    token=grace.access,
                    set_cookies=cookies,
                    refreshed=True,
                    exp=verdict.exp,
                    until=until,
                )
        self._graces.pop(h, None)
        return None

    async def _join(
        self, h: str, refresh_token: str, old_access: str | None, client: str | None
    ) -> tuple[Outcome, bool]:
        """Join this process's flight for the token, or start it: (its outcome, whether we started it)."""
        flight = self._inflight.get(h)
        leader = flight is None
        if flight is None:
            flight = asyncio.ensure_future(self._flight(h, refresh_token, old_access, client))
            self._inflight[h] = flight
            flight.add_done_callback(lambda _: self._inflight.pop(h, None))
        # Shielded: a client that goes away must not cancel an IdP call others are waiting for
        # (the IdP would have redeemed the token and nobody would learn its successor).
        return await asyncio.shield(flight), leader

    async def end_session(self, refresh_token: str, client: str | None = None) -> Reason | None:
        """Logout: the whole family is refused from now on, and the IdP is asked to revoke its newest token.

        With the store unreachable the end is recorded as soon as it answers again (retried in the
        background), so a copy of the session's tokens does not outlive the outage. Returns why
        nothing was done (``REFRESH_RATE_LIMITED``: a never-seen raw token over its client's limit), or None.
        """
        h = self._sealer.token_hash(refresh_token)
        if self._throttle is not None and not await self._seen(h) and not self._throttle.allow(client):
            log.info("logout token=%s: never seen, client over its limit; nothing done", h[:12])
            return Reason.REFRESH_RATE_LIMITED
        newest = await self._families.end_session(h, self._spawn) or refresh_token
        revoked = await self._idp.revoke(newest)
        log.info("logout token=%s revoked_at_idp=%s", h[:12], revoked)
        return None

    async def close(self) -> None:
        """Let flights and write-outs in progress finish (they hold locks and redeemed tokens)."""
        pending = [*self._inflight.values(), *self._background]
        if pending:
            await asyncio.wait(pending, timeout=self._config.timeout + 1)
        await self._stalls.close()

    # --- one flight per process ---------------------------------------------------------------

    async def _flight(self, h: str, token: str, old_access: str | None, client: str | None) -> Outcome:
        started = time.monotonic()
        # A grace hit's remaining grace counts from before the store's read: whatever this worker spends
        # afterwards (verifying the successor, a stall, waiting to run) is not added on top.
        began = self._grace_clock()
        self._stalls.start()
        try:
            root, seen = await self._families.lookup(h)
            if not seen and self._throttle is not None and not self._throttle.allow(client):
                outcome = Outcome(Reason.REFRESH_RATE_LIMITED)  # nothing read, locked, sent or written
            else:
                arrival = Arrival(started, granted=await self._granted(old_access))
                outcome = await self._coordinator.coordinate(RecordKeys(root, h), token, arrival, 0)
        except StoreError as exc:
            log.error("refresh token=%s: store unavailable (%s); answering 503", h[:12], exc)
            self._metrics.store_error("refresh")
            outcome = Outcome(Reason.STORE_UNAVAILABLE)
        except Exception:  # noqa: BLE001 - shared by every waiter: fail closed with 503, keep cookies
            log.exception("refresh token=%s: unexpected failure; answering 503", h[:12])
            outcome = Outcome(Reason.REFRESH_ERROR)
        if outcome.grace_left is not None:
            outcome = replace(outcome, grace_until=began + outcome.grace_left)
        self._metrics.refresh(outcome.label)
        log.info("refresh token=%s outcome=%s duration=%.3fs", h[:12], outcome.label, time.monotonic() - started)
        return outcome

    # --- answers ----------------------------------------------------------------------------------

    async def _answer(self, outcome: Outcome) -> AuthResult:
        if isinstance(outcome.label, Reason) and outcome.label in FATAL:
            return AuthResult(reason=outcome.label, set_cookies=[self._jar.clear_access(), self._jar.clear_refresh()])
        if outcome.access is None or outcome.refresh is None:
            return AuthResult(reason=outcome.label if isinstance(outcome.label, Reason) else Reason.REFRESH_ERROR)
        verdict = await self._verifier.verify(outcome.access)
        if verdict.reason == Reason.TOKEN_EXPIRED and outcome.label == "grace_hit":
            return AuthResult(reason=Reason.TOKEN_EXPIRED)  # refresh() carries on with the successor
        if verdict.claims is None or outcome.label == "unverified":
            # The IdP issued a successor whose access token does not verify (yet): keep the
            # successor in the refresh cookie, answer 503 (or 502 if it never can), try again later.
            # One that verifies by now was not counted in its family when it was written out: it is
            # handed out only through the successor's own record (``issued``), counted first (I3).
            unverified = verdict.claims is not None or verdict.reason in TRANSIENT
            reason = Reason.IDP_TOKEN_UNVERIFIED if unverified else Reason.IDP_BAD_RESPONSE
            return AuthResult(
                reason=reason, set_cookies=[self._jar.set_refresh(outcome.refresh, outcome.refresh_max_age)]
            )
        try:
            cookies = self._jar.session(outcome.access, outcome.refresh, outcome.refresh_max_age)
        except CookieTooLarge as exc:  # the session cannot go on in cookies: ended, and told to the operator
            log.error("refresh: %s; session ended", exc)
            cleared = [self._jar.clear_access(), self._jar.clear_refresh()]
            return AuthResult(reason=Reason.COOKIE_TOO_LARGE, set_cookies=cleared)
        return AuthResult(claims=verdict.claims, token=outcome.access, set_cookies=cookies, refreshed=True)

    async def _deny_replaced(self, denylist: Denylist, old_access: str, new_jti: Any) -> None:
        claims = await self._verifier.signed_claims(old_access)
        jti, exp = (claims or {}).get("jti"), (claims or {}).get("exp")
        until = refuse_until(claims or {}, self._clock())  # as long as it verifies
        if isinstance(jti, str) and jti != new_jti and isinstance(exp, int | float) and until > self._clock():
            try:
                await denylist.deny(jti, until)
            except StoreError as exc:
                log.warning("could not denylist the replaced access token: %s", exc)

    # --- helpers ----------------------------------------------------------------------------------

    async def _seen(self, h: str) -> bool:
        try:
            return (await self._families.lookup(h))[1]
        except StoreError:
            return True  # the store decides later: ending the session is retried in the background

    async def _granted(self, old_access: str | None) -> frozenset[str] | None:
        """The scope of the access token being replaced, if it is ours and names one (RFC 6749 §6: no widening)."""
        claims = await self._verifier.signed_claims(old_access) if old_access else None
        return scopes_of(claims) if claims is not None else None

    def _cookie_lifetime(self, token: str) -> int:
        return self._jar.refresh_lifetime(token, self._clock())

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
