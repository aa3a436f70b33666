"""Reading the usage ledger (the billing side).

Two families of hashes hold the counts (docs/keyspace.md): per shard, 15-minute and hour buckets
in UTC with every consumer in them; per consumer, day and month buckets in the consumer's billing
zone. A period read is one or a few ``HGETALL`` of one consumer's own keys, never a scan of the
cross product of dimensions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from .consumers import zone
from .errors import ConfigurationError
from .keyspace import BUCKET_1H, BUCKET_15M, SEP, Keyspace, split_counter_field
from .metering import latency_bucket_value_us
from .periods import period_days, snapshot

MEASURES = ("requests", "units", "bytes_in", "bytes_out")
DIMENSIONS = ("key_id", "route", "method", "status")


@dataclass(frozen=True, slots=True)
class UsageRow:
    consumer: str
    key_id: str
    route: str
    method: str
    status: int
    requests: int
    units: int
    bytes_in: int
    bytes_out: int


async def usage_totals(
    redis: Any, keyspace: Keyspace, since_s: int, until_s: int, *, hourly: bool = False
) -> list[UsageRow]:
    """Totals per every dimension over the UTC buckets starting in ``[since_s, until_s]``.

    ``hourly`` reads the hour buckets (kept 90 days) instead of the 15-minute ones (48 hours).
    """
    step = BUCKET_1H if hourly else BUCKET_15M
    name = keyspace.counters_1h if hourly else keyspace.counters_15m
    pipe = redis.pipeline(transaction=False)
    first = since_s - since_s % step
    for shard in range(keyspace.shards):
        for bucket in range(first, until_s + 1, step):
            pipe.hgetall(name(shard, bucket))
    sums: dict[tuple[str, str, str, str, int], dict[str, int]] = {}
    for fields in await pipe.execute():
        for raw_field, value in fields.items():
            *dims, measure = split_counter_field(raw_field.decode())
            if measure in MEASURES:
                row = sums.setdefault(tuple(dims), {})  # type: ignore[arg-type]
                row[measure] = row.get(measure, 0) + int(value)
    return [
        UsageRow(*key, *(m.get(measure, 0) for measure in MEASURES))
        for key, m in sorted(sums.items())
    ]


class UsageReader:
    """Totals, time series, top consumers and latency percentiles from the ledger."""

    def __init__(
        self, redis: Any, keyspace: Keyspace, *, retention_1h: float = 90 * 86400,
        retention_15m: float = 48 * 3600,
    ) -> None:  # fmt: skip
        """``retention_1h`` and ``retention_15m`` (seconds) say how far back ``totals_in_zone``
        can reach; pass ``MW_RETENTION_1H`` and ``MW_RETENTION_15M`` of the deployment."""
        self._redis = redis
        self._keyspace = keyspace
        self._reach_1h, self._reach_15m = retention_1h, retention_15m

    async def totals(
        self, consumer: str, period: str, by: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """One consumer's usage of a month or a day in its billing zone, grouped by ``by``.

        Rows carry every measure plus p50/p90/p99 of the time to the response start (ms).
        """
        _check_dimensions(by)
        period_days(period)  # validates the period's form
        if len(period) == 7:
            frozen = await snapshot(self._redis, self._keyspace, consumer, period)
            if frozen is not None:  # a closed month reads its immutable snapshot
                fields = {k.encode(): v for k, v in frozen["fields"].items()}
                return _group(fields, by)
            key = self._keyspace.counters_month(consumer, period)
        else:
            key = self._keyspace.counters_day(consumer, period)
        return _group(await self._redis.hgetall(key), by)

    async def totals_between(
        self, consumer: str, first_day: str, last_day: str, by: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """A consumer's usage from ``first_day`` to ``last_day`` (YYYY-MM-DD, inclusive, local
        days of its billing zone), summed from the day buckets (kept 13 months)."""
        days = _days(first_day, last_day)
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(self._keyspace.counters_day(consumer, day))
            replies = await pipe.execute()
        merged: dict[bytes, int] = {}
        for fields in replies:
            for name, value in fields.items():
                merged[name] = merged.get(name, 0) + int(value)
        _check_dimensions(by)
        return _group(merged, by)

    async def totals_in_zone(
        self, consumer: str, period: str, zone_name: str, by: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """A consumer's usage of a period in another zone than its billing zone.

        Served from the UTC hour buckets (kept 90 days) when the zone's period starts and ends
        on whole hours, else from the 15-minute buckets (kept 48 hours); anything else is
        refused, since it cannot be exact.
        """
        days = period_days(period)
        zone_info = zone(zone_name)
        start = int(datetime.fromisoformat(days[0]).replace(tzinfo=zone_info).timestamp())
        end = int((datetime.fromisoformat(days[-1]) + timedelta(days=1)).replace(
            tzinfo=zone_info).timestamp())  # fmt: skip
        age = time.time() - start
        if start % BUCKET_1H == 0 and end % BUCKET_1H == 0 and age <= self._reach_1h:
            step, name = BUCKET_1H, self._keyspace.counters_1h
        elif age <= self._reach_15m:
            step, name = BUCKET_15M, self._keyspace.counters_15m
        else:
            raise ConfigurationError(
                "tz", f"{period} in {zone_name} is beyond what the hour buckets keep (or not on "
                "whole hours and beyond what the 15-minute buckets keep); use the billing zone",
            )  # fmt: skip
        shard = self._keyspace.shard_of(consumer)
        pipe = self._redis.pipeline(transaction=False)
        for bucket in range(start, end, step):
            pipe.hgetall(name(shard, bucket))
        mine = (consumer + SEP).encode()
        fields: dict[bytes, int] = {}
        for bucket_fields in await pipe.execute():
            for raw_field, value in bucket_fields.items():
                if raw_field.startswith(mine):
                    own = raw_field[len(mine) :]
                    fields[own] = fields.get(own, 0) + int(value)
        return _group(fields, by)

    async def series(self, consumer: str, period: str) -> list[dict[str, Any]]:
        """One row per local day of the period, with every measure."""
        days = period_days(period)
        pipe = self._redis.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(self._keyspace.counters_day(consumer, day))
        rows = []
        for day, fields in zip(days, await pipe.execute(), strict=True):
            [total] = _group(fields, ()) or [_empty()]
            rows.append({"day": day, **total})
        return rows

    async def top(
        self, period: str, *, measure: str = "requests", n: int = 10,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The consumers with the most ``measure`` in a month ('YYYY-MM') or day.

        ``progress(done, total)`` is called after each thousand consumers read."""
        if measure not in MEASURES:
            raise ConfigurationError("measure", f"use one of {MEASURES}")
        kind = "cm" if len(period) == 7 else "cd"
        period_days(period)
        totals: list[dict[str, Any]] = []
        pattern = f"{self._keyspace.prefix}:{{s*}}:{kind}:*:{period}"
        keys = [key async for key in self._redis.scan_iter(match=pattern, count=1000)]
        for start in range(0, len(keys), 1000):  # pipelined: one round trip per 1,000 consumers
            chunk = keys[start : start + 1000]
            pipe = self._redis.pipeline(transaction=False)
            for raw_key in chunk:
                pipe.hgetall(raw_key)
            for raw_key, fields in zip(chunk, await pipe.execute(), strict=True):
                consumer = raw_key.decode().split(f":{kind}:", 1)[1].rsplit(":", 1)[0]
                [row] = _group(fields, ()) or [_empty()]
                totals.append({"consumer": consumer, **row})
            if progress is not None:
                progress(min(start + 1000, len(keys)), len(keys))
        totals.sort(key=lambda row: (-row[measure], row["consumer"]))
        return totals[:n]

    async def unique_clients(self, consumer: str, day: str) -> int:
        """Distinct client addresses of a consumer on a UTC day (HyperLogLog, ~1 % error)."""
        return int(await self._redis.pfcount(self._keyspace.uniques(consumer, day)))


def _empty() -> dict[str, Any]:
    return {**dict.fromkeys(MEASURES, 0), "denied": 0, "p50_ms": None, "p90_ms": None,
            "p99_ms": None}  # fmt: skip


def _group(fields: dict[bytes, Any], by: Sequence[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    histograms: dict[tuple[Any, ...], dict[int, int]] = {}
    for raw_field, raw_value in fields.items():
        key_id, route, method, status, measure = raw_field.decode().split(SEP)
        dims = {"key_id": key_id, "route": route, "method": method, "status": int(status)}
        group = tuple(dims[d] for d in by)
        row = groups.setdefault(group, {**dict(zip(by, group, strict=True)), **_empty()})
        if measure.startswith("lat:"):
            bucket = int(measure[4:])
            hist = histograms.setdefault(group, {})
            hist[bucket] = hist.get(bucket, 0) + int(raw_value)
        elif measure in MEASURES:
            row[measure] += int(raw_value)
        elif measure.startswith("denied:"):
            row["denied"] += int(raw_value)
    for group, hist in histograms.items():
        for name, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
            groups[group][name] = round(_quantile(hist.items(), q) / 1000, 3)
    return [groups[g] for g in sorted(groups, key=lambda g: tuple(str(x) for x in g))]


def _quantile(histogram: Iterable[tuple[int, int]], q: float) -> float:
    ordered = sorted(histogram)
    total = sum(count for _, count in ordered)
    seen = 0
    for bucket, count in ordered:
        seen += count
        if seen >= q * total:
            return latency_bucket_value_us(bucket)
    return latency_bucket_value_us(ordered[-1][0])


def _check_dimensions(by: Sequence[str]) -> None:
    unknown = set(by) - set(DIMENSIONS)
    if unknown:
        raise ConfigurationError("by", f"unknown dimension(s) {sorted(unknown)}; use {DIMENSIONS}")


def _days(first: str, last: str) -> list[str]:
    """Every day from ``first`` to ``last`` inclusive (at most 400: the day buckets' reach)."""
    try:
        start, end = date.fromisoformat(first), date.fromisoformat(last)
    except ValueError:
        raise ConfigurationError("--from", "days are YYYY-MM-DD") from None
    if end < start:
        raise ConfigurationError("--to", "is before --from")
    if (end - start).days > 400:
        raise ConfigurationError("--to", "at most 400 days (day buckets are kept 13 months)")
    return [(start + timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]
