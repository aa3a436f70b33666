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
    """A FIFO of items with a byte size each; ``put`` drops the oldest items beyond the limit."""

    __slots__ = ("_items", "bytes", "dropped", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self.dropped = 0
        self._items: deque[tuple[int, T]] = deque()

    def put(self, item: T, size: int) -> None:
        self._items.append((size, item))
        self.bytes += size
        while self.bytes > self.limit and self._items:
            dropped_size, _ = self._items.popleft()
            self.bytes -= dropped_size
            self.dropped += 1

    def take(self, n: int) -> list[T]:
        """Remove and return up to ``n`` of the oldest items."""
        out: list[T] = []
        items = self._items
        while items and len(out) < n:
            size, item = items.popleft()
            self.bytes -= size
            out.append(item)
        return out

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return (item for _, item in self._items)
