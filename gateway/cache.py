"""``BoundedCache``: the one shape of cache on the request path.

A plain ``dict`` for reads (``get`` stays C-fast on the hot path) that never holds more than
``size`` entries: when full, the oldest quarter goes, so a flood of distinct keys (a URL scan,
random tokens) costs bounded memory and evicts only what is old, not everything at once.
"""

from __future__ import annotations

from itertools import islice
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_SIZE = 10_000


class BoundedCache(dict[K, V]):
    """A dict of at most ``size`` entries; write with ``put`` (plain ``[]=`` is not bounded)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        super().__init__()
        self.size = size

    def put(self, key: K, value: V) -> V:
        if len(self) >= self.size and key not in self:
            # Insertion order is age: drop the oldest quarter (dicts keep that order).
            for old in list(islice(self, max(1, self.size // 4))):
                del self[old]
        self[key] = value
        return value
