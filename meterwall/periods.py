"""Closing a billing period: each consumer's month is frozen into a snapshot with a checksum.

A month can be closed once its end in the consumer's billing zone lies more than the grace
period in the past (late flushes have arrived by then). Closing marks the month first (``SET
NX``), so closing twice changes nothing; from then on the flush script diverts that month's
deltas into an adjustments hash instead of merging them silently. Only then is the month read
and its snapshot written over the mark: a flush landing meanwhile is in one or the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import orjson

from .consumers import ConsumerRegistry, next_month_start
from .errors import ConfigurationError
from .keyspace import Keyspace

SNAPSHOT_RETENTION = 762 * 86400  # as long as the month counters: 25 months
CLOSING = b"closing"  # a month being closed: frozen already, its snapshot not written yet


@dataclass
class CloseReport:
    period: str
    closed: list[str] = field(default_factory=list)
    already_closed: list[str] = field(default_factory=list)
    not_yet: list[tuple[str, str]] = field(default_factory=list)  # (consumer, closable from)


def period_days(period: str) -> list[str]:
    """The local days of a period: 'YYYY-MM' (a month) or 'YYYY-MM-DD' (a day)."""
    try:
        if len(period) == 7:
            first = date.fromisoformat(period + "-01")
            following = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
            return [str(first + timedelta(days=n)) for n in range((following - first).days)]
        return [str(date.fromisoformat(period))]
    except ValueError:
        problem = f"expected YYYY-MM or YYYY-MM-DD, got {period!r}"
        raise ConfigurationError("period", problem) from None


def check_month(period: str, *, setting: str = "period") -> str:
    """``period`` if it is a month (YYYY-MM), else ``ConfigurationError`` naming ``setting``
    (it ends up in key names and SCAN patterns: nothing else may pass)."""
    if len(period) == 7:
        with contextlib.suppress(ConfigurationError):
            period_days(period)  # a real month, or it raises
            return period
    raise ConfigurationError(setting, f"expected a month (YYYY-MM), got {period!r}")


def period_end(period: str, zone_name: str) -> int:
    """Unix time of the first instant after the month ``period`` in a zone."""
    first = date.fromisoformat(period_days(period)[0])
    return next_month_start(first.year, first.month, zone_name)


def checksum(fields: dict[str, int]) -> str:
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def consumers_with_usage(redis: Any, keyspace: Keyspace, period: str) -> set[str]:
    found = set()
    async for raw_key in redis.scan_iter(match=f"{keyspace.prefix}:{{s*}}:cm:*:{period}"):
        found.add(raw_key.decode().split(":cm:", 1)[1].rsplit(":", 1)[0])
    return found


async def close_period(
    redis: Any, keyspace: Keyspace, period: str, *, grace_s: int = 7200, now_s: int | None = None
) -> CloseReport:
    """Close ``period`` ('YYYY-MM') for every consumer whose grace period has passed."""
    check_month(period)
    now_s = int(time.time()) if now_s is None else now_s
    registry = await ConsumerRegistry(redis, keyspace).all()
    report = CloseReport(period)
    for consumer in sorted(await consumers_with_usage(redis, keyspace, period) | set(registry)):
        known = registry.get(consumer)
        zone_name = "UTC"
        if known is not None:
            zone_name = known.tz_at(period_end(period, known.tz) - 1)
        closable_at = period_end(period, zone_name) + grace_s
        if now_s < closable_at:
            report.not_yet.append(
                (consumer, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(closable_at)))
            )
            continue
        # The marker first: from then on the flush script diverts the month's deltas into
        # adjustments, so a flush landing while the month is read is in one of the two.
        closed_key = keyspace.closed(consumer, period)
        marked = await redis.set(closed_key, CLOSING, nx=True, ex=SNAPSHOT_RETENTION)
        if not marked and await redis.get(closed_key) != CLOSING:  # (CLOSING: a close that
            report.already_closed.append(consumer)  # stopped after its mark; finished here)
            continue
        counts = await redis.hgetall(keyspace.counters_month(consumer, period))
        fields = {k.decode(): int(v) for k, v in counts.items()}
        snapshot = {"consumer": consumer, "period": period, "zone": zone_name,
                    "closed_at": now_s, "fields": fields, "checksum": checksum(fields)}  # fmt: skip
        await redis.set(closed_key, orjson.dumps(snapshot), xx=True, ex=SNAPSHOT_RETENTION)
        report.closed.append(consumer)
    return report


async def snapshot(
    redis: Any, keyspace: Keyspace, consumer: str, month: str
) -> dict[str, Any] | None:
    """The closed month's snapshot (verified against its checksum), or None if still open."""
    raw = await redis.get(keyspace.closed(consumer, month))
    if raw is None or raw == CLOSING:  # (being closed: the month's counters are frozen)
        return None
    frozen: dict[str, Any] = orjson.loads(raw)
    if checksum(frozen["fields"]) != frozen["checksum"]:
        raise ValueError(f"the snapshot of {consumer} {month} does not match its checksum")
    return frozen


async def adjustments(redis: Any, keyspace: Keyspace, period: str) -> dict[str, dict[str, int]]:
    """Per consumer, the deltas that arrived for ``period`` after it was closed."""
    check_month(period)
    out: dict[str, dict[str, int]] = {}
    async for raw_key in redis.scan_iter(match=f"{keyspace.prefix}:{{s*}}:adj:*:{period}"):
        consumer = raw_key.decode().split(":adj:", 1)[1].rsplit(":", 1)[0]
        fields = await redis.hgetall(raw_key)
        out[consumer] = {k.decode(): int(v) for k, v in fields.items()}
    return out
