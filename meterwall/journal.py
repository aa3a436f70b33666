"""The seam for a worker-local journal (DESIGN decision 3).

The flusher tells the journal about every batch it packs and every batch Redis acknowledged, so
that a journal can keep packed batches on local disk until Redis holds them durably and replay
them after a kill or a Redis restart (replays are safe: the writer's high-water mark turns them
into no-ops). The default journal keeps nothing; the durable one is added by the faults issue.
"""

from __future__ import annotations

from typing import Protocol


class Journal(Protocol):
    def packed(self, writer: str, shard: int, seq: int, payload: bytes) -> None:
        """A batch was packed and is about to be sent."""

    def applied(self, writer: str, shard: int, seq: int) -> None:
        """Redis answered applied (or duplicate, which means an earlier attempt landed)."""


class NullJournal:
    """Keeps nothing: a process kill loses what was not flushed yet."""

    __slots__ = ()

    def packed(self, writer: str, shard: int, seq: int, payload: bytes) -> None:
        return None

    def applied(self, writer: str, shard: int, seq: int) -> None:
        return None
