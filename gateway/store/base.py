"""The store's vocabulary: the ``Store`` protocol and the records the refresh machinery keeps in it.

Callers pass relative keys (``lock:{h}``, ``result:{h}``); the store prepends its key prefix.
Values are opaque bytes: sealing happens in the caller, so no store ever sees a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.store.waiters import Waiter

# How often a waiter looks at the store again when no announcement came: a lost notification
# (a pub/sub connection that dropped) costs at most this much, never a lease (issue 12, point 6).
POLL_INTERVAL = 0.25
# Work that must reach the store (a write-out, a logout, a cleanup) retries every RETRY_PAUSE
# seconds through an outage, in the background once its request has its answer, for this long.
RETRY_PAUSE = 0.25
BACKGROUND_RETRY = 300.0


@dataclass(frozen=True, slots=True)
class RecordKeys:
    """The store keys of one refresh token ``h`` of the session family ``root``.

    Every key carries the family's hash tag ``{root}``, so the atomic scripts that move a token
    between states (docs/refresh.md) touch one Redis Cluster slot.
    """

    root: str
    h: str

    @property
    def lock(self) -> str:
        return f"lock:{{{self.root}}}:{self.h}"

    @property
    def attempt(self) -> str:
        return f"attempt:{{{self.root}}}:{self.h}"

    @property
    def result(self) -> str:
        return f"result:{{{self.root}}}:{self.h}"

    @property
    def used(self) -> str:
        return f"used:{{{self.root}}}:{self.h}"

    @property
    def issued(self) -> str:
        return f"issued:{{{self.root}}}:{self.h}"

    @property
    def ended(self) -> str:
        return f"ended:{{{self.root}}}"

    @property
    def members(self) -> str:
        return f"members:{{{self.root}}}"

    @property
    def head(self) -> str:
        return f"head:{{{self.root}}}"

    def of(self, h: str) -> RecordKeys:
        """The keys of another token of the same family."""
        return RecordKeys(self.root, h)


AttemptState = Literal["pending", "maybe", "done"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """A call to the IdP with this refresh token: begun by the owner holding ``fence``.

    Times are the store's clock (seconds). ``pending`` until the owner settles it: ``done`` (the
    successor is recorded), ``maybe`` (the IdP may have redeemed the token and the answer is
    lost), or deleted (the request never reached the IdP). A ``pending`` attempt past its
    ``deadline`` is one whose owner died or was cut off: it may have been sent.
    """

    fence: str
    started: float
    deadline: float
    state: AttemptState
    retried: bool


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One atomic read of everything the store knows about a refresh token (``now``: the store's clock)."""

    now: float
    ended: str | None = None  # the family's end: "logout", "reuse", "invalid_grant", "refresh_lost"
    result: bytes | None = None  # sealed: the successor (kept grace_period) or a shared failure
    used: bytes | None = None  # sealed: the successor of a superseded token
    rotated_at: float | None = None  # when it was superseded
    attempt: Attempt | None = None
    issued: bytes | None = None  # sealed: an access token the IdP issued with this token, not yet verified


Finish = Literal["ok", "ended", "superseded"]


@dataclass(frozen=True, slots=True)
class FamilyEnd:
    """What ending a family found: whether this call ended it, its access tokens, its newest refresh token."""

    first: bool
    reason: str
    members: dict[str, float]
    head: bytes | None


class Store(Protocol):
    """What the refresher needs from shared state; every failure surfaces as ``StoreError``."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float, *, notify: bool = False) -> None:
        """Store ``value`` for ``ttl`` seconds; with ``notify``, atomically announce ``key`` to all waiters."""
        ...

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
        """Set ``key`` to ``value`` for ``ttl`` seconds only if it holds ``expected`` now (compare-and-set)."""
        ...

    async def acquire(self, key: str, owner: str, lease: float) -> bool:
        """Take the lock ``key`` for ``lease`` seconds unless someone holds it."""
        ...

    async def renew(self, key: str, owner: str, lease: float) -> bool:
        """Extend the lease, only if ``owner`` still holds the lock."""
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Delete the lock only if ``owner`` holds it, and then announce ``key``."""
        ...

    def watch(self, key: str) -> AbstractAsyncContextManager[Waiter]:
        """Register interest in ``key``: enter, check state, then ``await waiter.wait(timeout)``."""
        ...

    async def add_member(self, key: str, member: str, expires_at: float) -> None:
        """Add ``member`` to the expiring set ``key`` until ``expires_at`` (epoch seconds); announce ``key``."""
        ...

    async def members(self, key: str, now: float) -> dict[str, float]:
        """Members of the expiring set ``key`` still alive at ``now`` (epoch seconds), with their expiry."""
        ...

    async def wait(self, key: str, timeout: float) -> bool: ...

    # --- refresh records: each one atomic step (a Lua script on Redis); docs/refresh.md ---

    async def read_record(self, keys: RecordKeys) -> TokenRecord:
        """Family end, result, used, attempt and issued of one token, read at one instant."""
        ...

    async def begin_attempt(
        self, keys: RecordKeys, owner: str, fence: str, window: float, ttl: float, *, replace: str | None = None
    ) -> float | None:
        """Record a ``pending`` attempt under ``fence``; the store's time, or None if refused.

        Refused unless ``owner`` holds ``keys.lock``, the family is alive, the token is not
        superseded, and there is no unsettled attempt (other than ``replace``, which is taken over).
        Idempotent: repeated after a lost reply, it answers as the first time; refused once ``fence``
        was settled (a copy that reached the store after its owner gave up waiting and cleared it).
        """
        ...

    async def settle_attempt(self, keys: RecordKeys, fence: str, state: Literal["maybe", "clear"]) -> bool:
        """Mark the attempt ``maybe`` (answer lost) or delete it (never sent), only if it is still ``fence``'s.

        A retry (it took over a ``maybe`` attempt) is never deleted: it goes back to ``maybe``.
        Clearing an attempt (there or not yet) leaves ``fence`` behind as ``cleared``, read as no attempt,
        so that a copy of the owner's ``begin_attempt`` that timed out but still runs later is refused.
        """
        ...

    async def finish(
        self,
        keys: RecordKeys,
        fence: str,
        writes: Sequence[tuple[str, bytes, float]],
        *,
        used: tuple[bytes, float] | None = None,
        member: tuple[str, float] | None = None,
    ) -> Finish:
        """The owner's write-out, only if its attempt still holds ``fence`` and the family is alive.

        An attempt that is gone altogether (not taken over: the store lost it, restarted empty or
        failed over to a replica that never had it) does not refuse the write-out: the IdP has
        redeemed the token, and its successor is the session's only future. Refusing it would
        leave the token looking fresh, and the next owner would present it to the IdP again (reuse).
        Unless the token is superseded already by another successor than ``used`` (another owner's,
        whose attempt expired since): ``superseded``. The same ``used`` again is a repeat: ``ok``.

        ``writes`` are (key, value, ttl) in the family's slot; ``used`` marks the token superseded
        (stamped with the store's time); ``member`` adds an access token (jti, exp) to the family.
        Announces ``keys.lock``. Idempotent: a repeat after a lost reply answers ``ok``.
        """
        ...

    async def end_family(self, keys: RecordKeys, reason: str, ttl: float, now: float) -> FamilyEnd:
        """Mark the family ended (the first reason stays) and return its live access tokens and head."""
        ...

    async def holder(self, key: str) -> str | None:
        """Who holds the lock ``key`` now (None: nobody)."""
        ...

    async def ping(self) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def parse_attempt(fields: dict[str, str] | dict[bytes, bytes] | None, *, scale: float = 1.0) -> Attempt | None:
    """An attempt record from its stored fields (str from memory, bytes and milliseconds from Redis)."""
    if not fields:
        return None
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    state = text.get("state")
    if state not in ("pending", "maybe", "done"):
        return None
    return Attempt(
        fence=text.get("fence", ""),
        started=float(text.get("started", 0)) * scale,
        deadline=float(text.get("deadline", 0)) * scale,
        state=state,  # type: ignore[arg-type]
        retried=text.get("retried") == "1",
    )
