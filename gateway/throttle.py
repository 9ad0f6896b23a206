"""``ClientThrottle``: how many refreshes with never-seen refresh tokens one client may start.

With ``cookies.refresh.sealed: false`` the gateway accepts raw refresh cookies, so it cannot tell
a token it issued from junk before asking the IdP. Every refresh with a token the store has never
seen (no ``family:`` record, gateway.families) costs an IdP call and store writes; this bounds how
often one client can make the gateway do that. Tokens the gateway has seen (every token it
captured, logged in with, or rotated) are never limited, nor is anything with sealed cookies (a
cookie the gateway did not seal never gets this far).

A token bucket per client address (after ``server.trusted_proxies``; an IPv6 client by its /64,
which one host usually holds whole), kept in each worker's memory: ``BURST`` attempts at once,
then one more every ``REFILL`` seconds. Limits are per worker, so with N workers a client gets
at most N times as many. The table is bounded (``BoundedCache``): under a flood of distinct
addresses the oldest buckets go, which only ever lets an old client start afresh.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from gateway.cache import BoundedCache

BURST = 10
REFILL = 5.0  # seconds per attempt regained; responses.RETRY_AFTER tells clients as much


class ClientThrottle:
    """Token buckets by client address; ``allow(client)`` takes one attempt or says no."""

    def __init__(self, burst: int = BURST, refill: float = REFILL, clock: Callable[[], float] = time.monotonic) -> None:
        self._burst = burst
        self._refill = refill
        self._clock = clock
        self._buckets: BoundedCache[str, tuple[float, float]] = BoundedCache()  # key -> (attempts left, at)

    def allow(self, client: str | None) -> bool:
        """Whether ``client`` may start one more refresh with a never-seen token (and count it)."""
        key = _key(client)
        now = self._clock()
        left, then = self._buckets.get(key, (float(self._burst), now))
        left = min(float(self._burst), left + (now - then) / self._refill)
        if left < 1.0:
            self._buckets.put(key, (left, now))
            return False
        self._buckets.put(key, (left - 1.0, now))
        return True


def _key(client: str | None) -> str:
    """The bucket of an address: itself for IPv4, its /64 for IPv6; clients without one share a bucket."""
    if not client:
        return "-"
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client  # a Unix socket path and the like: one bucket per value
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
