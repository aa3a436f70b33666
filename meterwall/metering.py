"""Metering: usage counters merged in process memory on the request path (no I/O).

The request path only adds to a dict keyed by the 15-minute bucket and every dimension. The
flusher takes the merged deltas every flush interval and expands them into hash increments for
every granularity: 15 minutes and hours in UTC (per shard, all consumers), days and months in
each consumer's billing zone (per consumer). A 15-minute bucket never straddles a local midnight,
even at +05:30 or +05:45, so the local buckets are exact. Deltas merge, so an outage grows this
table by distinct keys, not by requests, and counts are never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from .keyspace import BUCKET_1H, BUCKET_15M, SEP, counter_field

#: (15-minute bucket start, consumer, key id, route, method, status, latency bucket, denial)
DeltaKey = tuple[int, str, str, str, str, int, int, str]
#: -> [requests, bytes in, bytes out]
Deltas = dict[DeltaKey, list[int]]

KIND_15M, KIND_1H, KIND_DAY, KIND_MONTH = 1, 2, 3, 4
#: Expiry of each granularity after its bucket (seconds): 48 h, 90 days, 13 and 25 months.
RETENTION = {KIND_15M: 48 * 3600, KIND_1H: 90 * 86400, KIND_DAY: 396 * 86400,
             KIND_MONTH: 762 * 86400}  # fmt: skip

#: Latency histogram: bucket i holds times to the response start in [2^(i/4), 2^((i+1)/4)) µs,
#: so a percentile read at a bucket's geometric middle is within 9 % of the true value.
LATENCY_STEPS_PER_DOUBLING = 4
NO_RESPONSE = -1


def latency_bucket(ttfb_ns: int) -> int:
    if ttfb_ns < 0:
        return NO_RESPONSE
    return int(math.log2(ttfb_ns / 1000 + 1) * LATENCY_STEPS_PER_DOUBLING)


def latency_bucket_value_us(bucket: int) -> float:
    """The representative value (µs) of a histogram bucket: its geometric middle."""
    return float(2 ** ((bucket + 0.5) / LATENCY_STEPS_PER_DOUBLING) - 1)


class Meter:
    """Per-process counter deltas; ``add`` is safe and cheap on the hot path."""

    __slots__ = ("_deltas",)

    def __init__(self) -> None:
        self._deltas: Deltas = {}

    def add(
        self, time_s: int, consumer: str, key_id: str, route: str, method: str, status: int,
        ttfb_ns: int, bytes_in: int, bytes_out: int, denied: str = "",
    ) -> None:  # fmt: skip
        key = (time_s - time_s % BUCKET_15M, consumer, key_id, route, method, status,
               latency_bucket(ttfb_ns), denied)  # fmt: skip
        row = self._deltas.get(key)
        if row is None:
            self._deltas[key] = [1, bytes_in, bytes_out]
        else:
            row[0] += 1
            row[1] += bytes_in
            row[2] += bytes_out

    def merge(self, key: DeltaKey, values: list[int]) -> None:
        """Add already-bucketed deltas (a journal's snapshot)."""
        row = self._deltas.get(key)
        if row is None:
            self._deltas[key] = list(values)
        else:
            for i, value in enumerate(values):
                row[i] += value

    def peek(self) -> Deltas:
        """The deltas not taken yet (read only: the journal snapshots them)."""
        return self._deltas

    def take(self) -> Deltas:
        """Hand the deltas made so far to the flusher and start afresh."""
        deltas, self._deltas = self._deltas, {}
        return deltas

    def __len__(self) -> int:
        return len(self._deltas)


#: (kind, bucket, field) -> (increment, expire at). The bucket is a start time (kinds 1, 2) or
#: "consumer:YYYY-MM-DD" / "consumer:YYYY-MM" (kinds 3, 4).
Increments = dict[tuple[int, int | str, str], list[int]]


def merge_increments(into: Increments, rows: Increments) -> None:
    """Add ``rows`` to ``into``: values summed, each keeping the later expiry (a counters hash
    is kept a retention after its latest bucket, whichever batch brought it)."""
    for key, (value, expire_at) in rows.items():
        known = into.get(key)
        if known is None:
            into[key] = [value, expire_at]
        else:
            known[0] += value
            known[1] = max(known[1], expire_at)


def counter_increments(
    deltas: Deltas,
    zone_of: Callable[[str, int], str],
    weight_of: Callable[[str], int],
    retention: dict[int, int] = RETENTION,
) -> dict[str, Increments]:
    """Expand deltas into hash increments per consumer.

    ``zone_of(consumer, time_s)`` names the consumer's billing zone; ``weight_of(route)`` gives
    the billable units of one request (0: not billable). Answers of 5xx carry no units.
    ``retention`` gives each granularity's expiry after its bucket (seconds).
    """

    def _add(
        rows: Increments, kind: int, bucket: int | str, name: str, value: int, at: int
    ) -> None:
        row = rows.get((kind, bucket, name))
        if row is None:
            rows[(kind, bucket, name)] = [value, at + retention[kind]]
        else:
            row[0] += value
            row[1] = max(row[1], at + retention[kind])  # kept after the latest bucket

    # Deltas are kept per latency bucket: the measures are summed over those first (a
    # consumer's route has ~20 of them), so each measure field is added once, not 20 times.
    totals: dict[tuple[int, str, str, str, str, int, str], list[int]] = {}
    histograms: list[tuple[tuple[int, str, str, str, str, int, str], int, int]] = []
    for (
        bucket,
        consumer,
        key_id,
        route,
        method,
        status,
        latency,
        denied,
    ), values in deltas.items():
        base = (bucket, consumer, key_id, route, method, status, denied)
        total = totals.get(base)
        if total is None:
            totals[base] = list(values[:3])
        else:
            total[0] += values[0]
            total[1] += values[1]
            total[2] += values[2]
        if latency != NO_RESPONSE:
            histograms.append((base, latency, values[0]))

    out: dict[str, Increments] = {}
    local: dict[tuple[int, str, str, str, str, int], tuple[str, str, str, str]] = {}
    days: dict[tuple[int, str], tuple[str, str]] = {}

    def buckets(base: tuple[int, str, str, str, str, int, str]) -> tuple[str, str, str, str]:
        """(day bucket, month bucket, day/month field prefix, 15-minute/hour field prefix)."""
        bucket, consumer, key_id, route, method, status, _ = base
        zone_name = zone_of(consumer, bucket)
        day_month = days.get((bucket, zone_name))
        if day_month is None:
            day_month = days[(bucket, zone_name)] = _local_day_month(bucket, zone_name)
        dims = f"{key_id}{SEP}{route}{SEP}{method}{SEP}{status}{SEP}"
        fields = counter_field(consumer, key_id, route, method, status, "")
        return f"{consumer}:{day_month[0]}", f"{consumer}:{day_month[1]}", dims, fields

    for base, (requests, bytes_in, bytes_out) in totals.items():
        bucket, consumer, _, route, _, status, denied = base
        rows = out.setdefault(consumer, {})
        hour = bucket - bucket % BUCKET_1H
        day, month, dims, fields = local[base[:6]] = buckets(base)
        units = requests * weight_of(route) if status < 500 and not denied else 0
        measures = [("requests", requests), ("units", units), ("bytes_in", bytes_in),
                    ("bytes_out", bytes_out)]  # fmt: skip
        if denied:
            measures.append(("denied:" + denied, requests))
        for measure, value in measures:
            if value:
                _add(rows, KIND_15M, bucket, fields + measure, value, bucket)
                _add(rows, KIND_1H, hour, fields + measure, value, hour)
                _add(rows, KIND_DAY, day, dims + measure, value, bucket)
                _add(rows, KIND_MONTH, month, dims + measure, value, bucket)
    for base, latency, requests in histograms:
        bucket, consumer = base[0], base[1]
        rows = out[consumer]
        hour = bucket - bucket % BUCKET_1H
        day, month, dims, fields = local[base[:6]]
        histogram = f"lat:{latency}"
        _add(rows, KIND_1H, hour, fields + histogram, requests, hour)
        _add(rows, KIND_DAY, day, dims + histogram, requests, bucket)
        _add(rows, KIND_MONTH, month, dims + histogram, requests, bucket)
    return out


def _local_day_month(time_s: int, zone_name: str) -> tuple[str, str]:
    local = datetime.fromtimestamp(time_s, UTC if zone_name == "UTC" else ZoneInfo(zone_name))
    return local.strftime("%Y-%m-%d"), local.strftime("%Y-%m")
