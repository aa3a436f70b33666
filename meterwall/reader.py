"""Reading raw records back: the reader side, which holds the private key (never app servers).

``RecordReader`` returns opened records for a time range and refuses any range that reaches past
the retention window: a record older than the ceiling is never returned, even if some expiry was
missed in Redis. Tracing by IP, key or consumer builds on this (another issue).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from redis.asyncio import Redis

from .clock import SYSTEM_CLOCK, Clock
from .errors import InvalidRecord, RetentionExceeded
from .keyspace import split_group
from .sealing import RecordOpener, read_envelope
from .settings import Settings

NS = 1_000_000_000


class RecordReader:
    """Opens records stored under one deployment's keyspace. Not for the request path."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        private_key: X25519PrivateKey,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        # redis-py types replies as unions of every decode mode; this client returns bytes.
        self._redis: Any = redis
        self._keyspace = settings.keyspace()
        self._retention_ns = int(settings.raw_retention * NS)
        self._opener = RecordOpener(private_key)
        self._clock = clock
        self._wrapped: dict[tuple[int, bytes], bytes] = {}  # data keys as read (still wrapped)

    def window_start_ns(self) -> int:
        """The oldest instant a record may come from right now."""
        return self._clock.now_ns() - self._retention_ns

    async def records(
        self, since_ns: int | None = None, until_ns: int | None = None
    ) -> list[dict[str, Any]]:
        """Opened records made in ``[since_ns, until_ns]``, oldest first.

        ``since_ns`` defaults to the start of the retention window. Raises ``RetentionExceeded``
        if it lies before that window, ``InvalidRecord`` if a stored record fails to open.
        """
        return [record async for _, record in self.iter_records(since_ns, until_ns)]

    async def iter_records(
        self, since_ns: int | None = None, until_ns: int | None = None
    ) -> AsyncIterator[tuple[bytes, dict[str, Any]]]:
        """Yield (sealed blob, opened record) pairs shard by shard, each shard in time order."""
        window = self.window_start_ns()
        if since_ns is None:
            since_ns = window
        elif since_ns < window:
            raise RetentionExceeded(
                "records older than the retention window are gone and cannot be read"
            )
        until_ns = self._clock.now_ns() if until_ns is None else until_ns
        first = since_ns // NS - self._keyspace.slice_seconds
        for shard in range(self._keyspace.shards):
            slices = await self._redis.zrangebyscore(
                self._keyspace.slices(shard), first, until_ns // NS
            )
            for slice_name in slices:
                key = self._keyspace.records(shard, int(slice_name))
                for _, fields in await self._redis.xrange(key):
                    for blob in _blobs(fields):
                        envelope = read_envelope(blob)
                        if (
                            not since_ns <= envelope.time_ns <= until_ns
                            or envelope.time_ns < window
                        ):
                            continue
                        yield blob, await self.open(shard, blob)

    async def open(self, shard: int, blob: bytes) -> dict[str, Any]:
        """Open one sealed record of ``shard``; raises ``InvalidRecord``."""
        envelope = read_envelope(blob)
        wrapped = self._wrapped.get((shard, envelope.key_id))
        if wrapped is None:
            wrapped = await self._redis.get(self._keyspace.data_key(shard, envelope.key_id))
            if wrapped is None:
                raise InvalidRecord("the record's data key is gone")
            self._wrapped[(shard, envelope.key_id)] = wrapped
        record: dict[str, Any] = orjson.loads(self._opener.open(blob, wrapped))
        # Id and time come from the authenticated header (records of version 2 leave them out).
        return {"id": envelope.record_id.hex(), "time_ns": envelope.time_ns, **record}

    async def count(self) -> int:
        """How many sealed records are stored (within or past the window: a raw count)."""
        total = 0
        for shard in range(self._keyspace.shards):
            for slice_name in await self._redis.zrange(self._keyspace.slices(shard), 0, -1):
                key = self._keyspace.records(shard, int(slice_name))
                total += sum(int(fields[b"n"]) for _, fields in await self._redis.xrange(key))
        return total


def _blobs(fields: dict[bytes, bytes]) -> list[bytes]:
    try:
        return split_group(fields[b"r"])
    except (KeyError, ValueError):
        raise InvalidRecord("a stored record group is malformed") from None
