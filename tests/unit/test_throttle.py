"""gateway.throttle: refreshes with never-seen raw refresh tokens, per client address."""

from __future__ import annotations

import pytest

from gateway.throttle import BURST, REFILL, ClientThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_one_attempt_per_refill_interval() -> None:
    clock = Clock()
    throttle = ClientThrottle(clock=clock)
    assert [throttle.allow("198.51.100.7") for _ in range(BURST + 5)] == [True] * BURST + [False] * 5
    clock.now += REFILL * 0.9
    assert not throttle.allow("198.51.100.7")
    clock.now += REFILL * 0.2
    assert throttle.allow("198.51.100.7") and not throttle.allow("198.51.100.7")
    clock.now += REFILL * 100  # a long pause refills the bucket, never beyond the burst
    assert sum(throttle.allow("198.51.100.7") for _ in range(BURST * 2)) == BURST


def test_clients_have_buckets_of_their_own() -> None:
    throttle = ClientThrottle(burst=1, clock=Clock())
    assert throttle.allow("198.51.100.7") and not throttle.allow("198.51.100.7")
    assert throttle.allow("198.51.100.8")
    assert throttle.allow(None) and not throttle.allow(None) and not throttle.allow("")  # no address: one bucket


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),  # one /64: one host's addresses
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("::ffff:198.51.100.7", "198.51.100.7", True),  # an IPv4 client on a dual-stack socket
        ("198.51.100.7", "198.51.100.8", False),
    ],
)
def test_ipv6_clients_count_by_their_64(first: str, second: str, shared: bool) -> None:
    throttle = ClientThrottle(burst=1, clock=Clock())
    assert throttle.allow(first)
    assert throttle.allow(second) is not shared
