"""The consumer registry: who the customers are and which time zone their invoices use.

One small hash in Redis (``<prefix>:consumers``, field = consumer id, value = JSON). A time-zone
change never cuts a running period in two: it is stored as ``next_tz`` and takes effect at the
start of the next month in the old zone. The flusher reads the registry every few seconds to put
day and month buckets in each consumer's zone; unknown consumers bill in UTC.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from .errors import ConfigurationError
from .keyspace import Keyspace

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")


def zone(name: str, *, setting: str = "tz") -> ZoneInfo:
    """An IANA time zone; raises ``ConfigurationError`` naming ``setting`` if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(setting, f"unknown time zone {name!r}") from None


def check_consumer_id(consumer: str, *, setting: str = "consumer") -> str:
    if not _ID.match(consumer):
        raise ConfigurationError(
            setting, "use 1-128 of A-Z a-z 0-9 _ . @ : - starting with a letter or digit"
        )
    return consumer


def next_month_start(year: int, month: int, zone_name: str) -> int:
    """Unix time of local midnight on the first day of the month after ``year-month``."""
    year, month = divmod(year * 12 + month, 12)
    return int(datetime(year, month + 1, 1, tzinfo=ZoneInfo(zone_name)).timestamp())


@dataclass(frozen=True, slots=True)
class Consumer:
    """A customer of the API. ``next_from`` is a unix time (seconds) or 0."""

    id: str
    name: str = ""
    tz: str = "UTC"
    next_tz: str = ""
    next_from: int = 0

    def tz_at(self, time_s: int) -> str:
        """The billing zone in force at ``time_s``."""
        return self.next_tz if self.next_tz and time_s >= self.next_from else self.tz

    def changed(self, *, name: str | None, tz: str | None, now_s: int) -> Consumer:
        """This consumer with a new name and/or zone; a new zone waits for the next month."""
        new = self
        if name is not None:
            new = Consumer(new.id, name, new.tz, new.next_tz, new.next_from)
        if tz is not None:
            zone(tz)
            current = new.tz_at(now_s)
            if tz == current:
                return Consumer(new.id, new.name, current)
            local = datetime.fromtimestamp(now_s, ZoneInfo(current))
            start = next_month_start(local.year, local.month, current)
            new = Consumer(new.id, new.name, current, tz, start)
        return new


class ConsumerRegistry:
    """Read and write the registry; for the CLI, the admin API and the flusher."""

    def __init__(self, redis: Any, keyspace: Keyspace) -> None:
        self._redis = redis
        self._key = keyspace.consumers()

    async def get(self, consumer: str) -> Consumer | None:
        raw = await self._redis.hget(self._key, consumer)
        return None if raw is None else Consumer(**orjson.loads(raw))

    async def set(
        self, consumer: str, *, name: str | None = None, tz: str | None = None,
        now_s: int | None = None,
    ) -> Consumer:  # fmt: skip
        """Create or change a consumer. Raises ``ConfigurationError`` for a bad id or zone."""
        check_consumer_id(consumer)
        if tz is not None:
            zone(tz)
        now_s = int(time.time()) if now_s is None else now_s
        current = await self.get(consumer)
        if current is None:
            updated = Consumer(consumer, name or "", tz or "UTC")
        else:
            updated = current.changed(name=name, tz=tz, now_s=now_s)
        await self._redis.hset(self._key, consumer, orjson.dumps(asdict(updated)))
        return updated

    async def all(self) -> dict[str, Consumer]:
        raw = await self._redis.hgetall(self._key)
        return {k.decode(): Consumer(**orjson.loads(v)) for k, v in raw.items()}
