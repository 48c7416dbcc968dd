"""A least-recently-used cache bounded by entry count and by bytes.

Why: a server caches one text embedding per unique prompt, and prompts come from clients. An unbounded dict grew by
~0.9 MB per unique 1 MiB prompt and never gave it back; with a bound, memory stays flat however many distinct prompts
arrive, while the handful an evaluation actually repeats stay cached.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LRUCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """`get` / `put` with eviction of the least recently used entries beyond `max_entries` or `max_bytes`.

    `size_of(key, value)` is each entry's cost in bytes. The newest entry is never evicted by its own `put`, so an
    entry larger than `max_bytes` is still returned to the caller that made it (and dropped by the next `put`).
    Not thread-safe: the policy that owns it runs on one thread.
    """

    def __init__(self, max_entries: int, max_bytes: int, size_of: Callable[[K, V], int]) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"LRUCache bounds must be >= 1, got max_entries={max_entries}, max_bytes={max_bytes}")
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._size_of = size_of
        self._items: collections.OrderedDict[K, tuple[V, int]] = collections.OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: K, value: V) -> None:
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]
        size = int(self._size_of(key, value))
        self._items[key] = (value, size)
        self.nbytes += size
        while len(self._items) > 1 and (len(self._items) > self.max_entries or self.nbytes > self.max_bytes):
            _, (_, old) = self._items.popitem(last=False)
            self.nbytes -= old
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._items), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}
