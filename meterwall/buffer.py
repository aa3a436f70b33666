"""Bounded buffers for raw records: memory stays bounded by bytes when Redis is away.

When the bound is reached the oldest records are dropped and counted; the count is stored in Redis
when it answers again, so an operator can see what an outage cost. Counters never go through
here: they merge (see ``metering``) and are never dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ByteBoundedQueue(Generic[T]):
    """A FIFO of items with a byte size each; ``put`` drops the oldest items beyond the limit.

    Items and sizes are kept apart (not as pairs) so that an item the garbage collector can
    untrack is not wrapped in a tuple it must untrack too."""

    __slots__ = ("_items", "_sizes", "bytes", "dropped", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self.dropped = 0
        self._items: deque[T] = deque()
        self._sizes: deque[int] = deque()

    def put(self, item: T, size: int) -> None:
        self._items.append(item)
        self._sizes.append(size)
        self.bytes += size
        while self.bytes > self.limit and self._items:
            self._items.popleft()
            self.bytes -= self._sizes.popleft()
            self.dropped += 1

    def take(self, n: int) -> list[T]:
        """Remove and return up to ``n`` of the oldest items."""
        items, sizes = self._items, self._sizes
        if n >= len(items):
            out = list(items)
            items.clear()
            sizes.clear()
            self.bytes = 0
            return out
        out = [items.popleft() for _ in range(n)]
        self.bytes -= sum([sizes.popleft() for _ in range(n)])
        return out

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)
