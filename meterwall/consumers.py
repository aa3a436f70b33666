"""The consumer registry: who the customers are and which time zone their invoices use.

One small hash in Redis (``<prefix>:consumers``, field = consumer id, value = JSON). A time-zone
change never cuts a running period in two: it is stored as ``next_tz`` and takes effect at the
start of the next month in the old zone. The flusher reads the registry every few seconds to put
day and month buckets in each consumer's zone; unknown consumers bill in UTC.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from ipaddress import ip_network
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from .errors import ConfigurationError
from .keyspace import Keyspace


def zone(name: str, *, setting: str = "tz") -> ZoneInfo:
    """An IANA time zone; raises ``ConfigurationError`` naming ``setting`` if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(setting, f"unknown time zone {name!r}") from None


def check_consumer_id(consumer: object, *, setting: str = "consumer") -> str:
    """What requests can be counted under (MW_CONSUMER_HEADER, the JWT plugin: 1-128 printable
    characters, no space at either end) is what every command and route can name: a consumer
    that is billed must be one that can be read, traced, exported and erased."""
    if (
        not isinstance(consumer, str)
        or not 1 <= len(consumer) <= 128
        or not consumer.isprintable()
        or consumer != consumer.strip()
    ):
        raise ConfigurationError(
            setting, "use 1-128 printable characters, without a space at either end"
        )
    return consumer


def _network(text: str, setting: str) -> str:
    try:
        return str(ip_network(text.strip()))
    except ValueError:
        raise ConfigurationError(setting, f"{text!r} is not a network (CIDR)") from None


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
    allow: tuple[str, ...] = ()  # networks this consumer's keys may be used from (empty: any)
    deny: tuple[str, ...] = ()  # networks they may never be used from

    @classmethod
    def from_json(cls, raw: bytes) -> Consumer:
        data = orjson.loads(raw)
        data["allow"], data["deny"] = tuple(data.get("allow", ())), tuple(data.get("deny", ()))
        return cls(**data)

    def tz_at(self, time_s: int) -> str:
        """The billing zone in force at ``time_s``."""
        return self.next_tz if self.next_tz and time_s >= self.next_from else self.tz

    def changed(self, *, name: str | None, tz: str | None, now_s: int) -> Consumer:
        """This consumer with a new name and/or zone; a new zone waits for the next month."""
        new = self
        if name is not None:
            new = replace(new, name=name)
        if tz is not None:
            zone(tz)
            current = new.tz_at(now_s)
            if tz == current:
                return replace(new, tz=current, next_tz="", next_from=0)
            local = datetime.fromtimestamp(now_s, ZoneInfo(current))
            start = next_month_start(local.year, local.month, current)
            new = replace(new, tz=current, next_tz=tz, next_from=start)
        return new


class ConsumerRegistry:
    """Read and write the registry; for the CLI, the admin API and the flusher."""

    def __init__(self, redis: Any, keyspace: Keyspace) -> None:
        self._redis = redis
        self._key = keyspace.consumers()
        self._events = keyspace.key_events()
        self._fences = keyspace.consumer_networks()

    async def get(self, consumer: str) -> Consumer | None:
        raw = await self._redis.hget(self._key, consumer)
        return None if raw is None else Consumer.from_json(raw)

    async def set(
        self, consumer: str, *, name: str | None = None, tz: str | None = None,
        allow: Sequence[str] | None = None, deny: Sequence[str] | None = None,
        now_s: int | None = None,
    ) -> Consumer:  # fmt: skip
        """Create or change a consumer; ``allow``/``deny`` replace its networks when given.

        Raises ``ConfigurationError`` for a bad id, zone or network. A change is published, so
        every worker's access check sees it at once.
        """
        check_consumer_id(consumer)
        if tz is not None:
            zone(tz)
        allowed = None if allow is None else tuple(_network(c, "allow") for c in allow)
        denied = None if deny is None else tuple(_network(c, "deny") for c in deny)
        now_s = int(time.time()) if now_s is None else now_s
        current = await self.get(consumer)
        if current is None:
            updated = Consumer(consumer, name or "", tz or "UTC")
        else:
            updated = current.changed(name=name, tz=tz, now_s=now_s)
        if allowed is not None:
            updated = replace(updated, allow=allowed)
        if denied is not None:
            updated = replace(updated, deny=denied)
        # not a MULTI: the registry and the fence hash may live on different cluster nodes
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._key, consumer, orjson.dumps(asdict(updated)))
            if updated.allow or updated.deny:
                fence = {"allow": list(updated.allow), "deny": list(updated.deny)}
                pipe.hset(self._fences, consumer, orjson.dumps(fence))
            else:
                pipe.hdel(self._fences, consumer)
            pipe.publish(self._events, "consumer:" + consumer)
            await pipe.execute()
        return updated

    async def fences(self) -> dict[str, tuple[list[str], list[str]]]:
        """Consumer -> (allowed, denied) networks, for the consumers that have any."""
        raw = await self._redis.hgetall(self._fences)
        parsed = {k.decode(): orjson.loads(v) for k, v in raw.items()}
        return {c: (f["allow"], f["deny"]) for c, f in parsed.items()}

    async def all(self) -> dict[str, Consumer]:
        raw = await self._redis.hgetall(self._key)
        return {k.decode(): Consumer.from_json(v) for k, v in raw.items()}
