"""The usage ledger: local days and months, units, latency percentiles, unique clients, reads."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import pytest

from meterwall import ConfigurationError, FixedClock, Meterwall
from meterwall.consumers import ConsumerRegistry
from meterwall.periods import adjustments, close_period
from meterwall.store import apply_batches
from meterwall.usage import UsageReader
from tests.helpers import command_calls, command_calls_since
from tests.test_cli import meterwall
from tests.test_flusher import ok_app
from tests.test_middleware import _discard, body_receive, http_scope


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1e9)


async def send_at(mw: Meterwall, clock: FixedClock, when: str, consumer: str, **scope) -> None:
    clock.set(at(when))
    headers = [(b"x-consumer", consumer.encode())]
    await mw(http_scope(headers=headers, **scope), body_receive(), _discard)


@pytest.mark.parametrize(
    ("zone", "midnight_utc"),
    [("UTC", "2026-10-31T23:59:59"), ("Asia/Kolkata", "2026-10-31T18:29:59"),
     ("Asia/Kathmandu", "2026-10-31T18:14:59")],
)  # fmt: skip
async def test_days_and_months_follow_the_consumers_billing_zone(
    redis, settings, zone: str, midnight_utc: str
) -> None:
    keyspace = settings.keyspace()
    await ConsumerRegistry(redis, keyspace).set("acme", tz=zone)
    clock = FixedClock(0)
    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"), clock=clock)
    before = midnight_utc  # the last second of October 31st in the zone
    after = midnight_utc[:-2] + "59.999"  # still October (sub-second)
    await send_at(mw, clock, before, "acme")
    await send_at(mw, clock, after, "acme")
    clock.set(at(midnight_utc) + 1_000_000_000)  # November 1st, 00:00:00 local
    await mw(http_scope(headers=[(b"x-consumer", b"acme")]), body_receive(), _discard)
    await mw.aclose()
    reader = UsageReader(redis, keyspace)
    [october] = await reader.totals("acme", "2026-10")
    [november] = await reader.totals("acme", "2026-11")
    assert (october["requests"], november["requests"]) == (2, 1)
    assert [r["requests"] for r in await reader.series("acme", "2026-10")][-1] == 2
    [first_day] = await reader.totals("acme", "2026-11-01")
    assert first_day["requests"] == 1
    [across] = await reader.totals_between("acme", "2026-10-30", "2026-11-02")
    assert across["requests"] == 3  # local days on both sides of the month's end
    assert await reader.totals_between("acme", "2026-11-02", "2026-11-05") == []


async def test_units_follow_route_weights_and_5xx_carry_none(redis, settings) -> None:
    async def app(scope, receive, send) -> None:
        await receive()
        status = 503 if scope["path"] == "/fail" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 10})

    settings = settings.replace(consumer_header="X-Consumer", route_weights={"<unmatched>": 3})
    mw = Meterwall(app, settings=settings)
    headers = [(b"x-consumer", b"globex")]
    for path in ["/a", "/b", "/fail"]:
        await mw(http_scope(path, headers=headers), body_receive(b"abc"), _discard)
    await mw.aclose()
    month = datetime.now(UTC).strftime("%Y-%m")
    rows = await UsageReader(redis, settings.keyspace()).totals("globex", month, ["status"])
    assert [
        (r["status"], r["requests"], r["units"], r["bytes_in"], r["bytes_out"]) for r in rows
    ] == [
        (200, 2, 6, 6, 20),
        (503, 1, 0, 3, 10),
    ]
    assert all(r["p50_ms"] is not None and r["p50_ms"] <= r["p99_ms"] for r in rows)


async def test_unique_clients_per_day_count_addresses_not_requests(redis, settings) -> None:
    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"))
    headers = [(b"x-consumer", b"initech")]
    for n in range(12):
        client = (f"198.51.100.{n % 3}", 1000 + n)
        await mw(http_scope(headers=headers, client=client), body_receive(), _discard)
    await mw.aclose()
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert await UsageReader(redis, settings.keyspace()).unique_clients("initech", day) == 3


async def test_a_zone_change_waits_for_the_next_month(redis, key_prefix, settings) -> None:
    registry = ConsumerRegistry(redis, settings.keyspace())
    await registry.set("acme", name="Acme", tz="UTC")
    now = int(datetime(2026, 11, 23, tzinfo=UTC).timestamp())
    changed = await registry.set("acme", tz="Asia/Kolkata", now_s=now)
    assert changed.tz_at(now) == "UTC"
    assert changed.tz_at(int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())) == "Asia/Kolkata"
    with pytest.raises(ConfigurationError, match="tz: unknown time zone"):
        await registry.set("acme", tz="Mars/Olympus")


async def test_the_cli_reads_the_same_numbers_as_python(redis, settings) -> None:
    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"))
    for path in ["/a", "/a", "/b"]:
        await mw(http_scope(path, headers=[(b"x-consumer", b"acme")]), body_receive(), _discard)
    await mw.aclose()
    month = datetime.now(UTC).strftime("%Y-%m")
    env = {"MW_REDIS_URL": settings.redis_url, "MW_KEY_PREFIX": settings.key_prefix}
    done = meterwall("usage", "--consumer", "acme", "--period", month, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    python = await UsageReader(redis, settings.keyspace()).totals("acme", month, ["route"])
    assert json.loads(done.stdout) == python
    assert [r["requests"] for r in python] == [3]  # an ASGI app without routes: <unmatched>
    csv = meterwall("usage", "--top", "5", "--period", month, "--format", "csv", env=env)
    assert csv.stdout.splitlines()[0].startswith("consumer,requests,units")
    assert csv.stdout.splitlines()[1].startswith("acme,3,3")
    today = datetime.now(UTC).date()
    days = ["--from", str(today - timedelta(days=3)), "--to", str(today + timedelta(days=1))]
    ranged = meterwall("usage", "--consumer", "acme", *days, "--format", "json", env=env)
    assert ranged.returncode == 0, ranged.stderr
    assert [r["requests"] for r in json.loads(ranged.stdout)] == [3]
    reversed_range = meterwall("usage", "--consumer", "acme", "--from", str(today),
                               "--to", str(today - timedelta(days=1)), env=env)  # fmt: skip
    assert (reversed_range.returncode, reversed_range.stderr.count("\n")) == (2, 1)
    bad = meterwall("usage", "--consumer", "acme", "--period", "November", env=env)
    assert bad.returncode == 2
    assert (
        bad.stderr == "meterwall: error: period: expected YYYY-MM or YYYY-MM-DD, got 'November'\n"
    )
    made = meterwall("consumers", "set", "acme", "--name", "Acme Corp", "--tz", "Asia/Kathmandu",
                     env=env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    listed = meterwall("consumers", "list", "--format", "json", env=env)
    assert json.loads(listed.stdout)[0]["tz"] == "Asia/Kathmandu"
    closing = meterwall("usage", "close", "--period", month, env=env)
    assert closing.returncode == 0, closing.stderr
    assert "not yet closable" in closing.stdout  # this month has not ended anywhere
    late = meterwall("usage", "adjustments", "--period", month, "--format", "json", env=env)
    assert json.loads(late.stdout) == []


async def test_closing_a_month_freezes_it_and_late_deltas_become_adjustments(
    redis, settings
) -> None:
    keyspace = settings.keyspace()
    registry = ConsumerRegistry(redis, keyspace)
    await registry.set("acme", tz="UTC")
    await registry.set("tata", tz="Asia/Kolkata")
    clock = FixedClock(0)
    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"), clock=clock)
    for consumer in ("acme", "tata", "tata"):
        await send_at(mw, clock, "2026-10-20T12:00:00", consumer)
    await mw.flusher.flush()

    now = int(datetime(2026, 11, 1, 0, 30, tzinfo=UTC).timestamp())
    report = await close_period(redis, keyspace, "2026-10", grace_s=7200, now_s=now)
    assert report.closed == ["tata"]  # its October ended at 18:30 UTC, 6 hours ago
    assert [c for c, _ in report.not_yet] == ["acme"]  # UTC: closable from 02:00
    again = await close_period(redis, keyspace, "2026-10", grace_s=7200, now_s=now)
    assert again.already_closed == ["tata"]

    await send_at(mw, clock, "2026-10-21T09:00:00", "tata")  # a late request for October
    await mw.aclose()
    reader = UsageReader(redis, keyspace)
    [frozen] = await reader.totals("tata", "2026-10")
    assert frozen["requests"] == 2  # the snapshot, not merged silently
    assert sum(r["requests"] for r in await reader.series("tata", "2026-10")) == 2
    late = await adjustments(redis, keyspace, "2026-10")
    assert sum(v for k, v in late["tata"].items() if k.endswith("requests")) == 1
    [open_month] = await reader.totals("acme", "2026-10")
    assert open_month["requests"] == 1


@pytest.mark.parametrize("zone_name", ["Europe/Berlin", "Asia/Kolkata", "Asia/Kathmandu"])
async def test_another_zone_is_served_from_utc_buckets_or_refused(
    redis, settings, zone_name: str
) -> None:
    from zoneinfo import ZoneInfo

    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"))
    for _ in range(4):
        await mw(http_scope(headers=[(b"x-consumer", b"acme")]), body_receive(), _discard)
    await mw(http_scope(headers=[(b"x-consumer", b"other")]), body_receive(), _discard)
    await mw.aclose()
    today_there = datetime.now(ZoneInfo(zone_name)).strftime("%Y-%m-%d")
    reader = UsageReader(redis, settings.keyspace())
    [row] = await reader.totals_in_zone("acme", today_there, zone_name, ["route"])
    assert row["requests"] == 4
    with pytest.raises(ConfigurationError, match=r"^tz: "):
        await reader.totals_in_zone("acme", "2020-01", zone_name)


async def test_late_requests_are_applied_and_counted_as_late(redis, settings) -> None:
    clock = FixedClock(0)
    mw = Meterwall(ok_app, settings=settings.replace(lateness=3600), clock=clock)
    await send_at(mw, clock, "2026-11-22T09:00:00", "")  # flushed a day or more later
    clock.set(time.time_ns())
    await mw(http_scope(), body_receive(), _discard)  # this one is on time
    await mw.aclose()
    stats = await redis.hgetall(settings.keyspace().stats(0))
    assert int(stats[b"late_requests"]) == 1


async def test_each_granularity_expires_after_its_own_retention(redis, settings) -> None:
    settings = settings.replace(
        consumer_header="X-Consumer", retention_15m=7200, retention_day=40 * 86400
    )
    mw = Meterwall(ok_app, settings=settings)
    await mw(http_scope(headers=[(b"x-consumer", b"acme")]), body_receive(), _discard)
    await mw.aclose()
    keyspace = settings.keyspace()
    now = time.time()
    bucket = int(now) - int(now) % 900
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    ttl_15m = await redis.ttl(keyspace.counters_15m(keyspace.shard_of("acme"), bucket))
    ttl_day = await redis.ttl(keyspace.counters_day("acme", day))
    assert 7200 - 900 <= ttl_15m <= 7200
    assert 40 * 86400 - 900 <= ttl_day <= 40 * 86400
    assert abs(await redis.ttl(keyspace.uniques("acme", day)) - ttl_day) <= 2  # as the day's


@pytest.mark.parametrize("last_request", ["10:05:00", "23:50:00"])
async def test_unique_clients_expire_with_their_days_counters_by_the_writers_clock(
    redis, settings, last_request: str, monkeypatch
) -> None:
    """Also when they are flushed the next day: the latest request's 15-minute bucket + the
    retention, the day counters' rule (a UTC consumer: its billing day is the UTC day). The two
    requests fall in different 15-minute buckets but one latency bucket, so they add to the
    same fields: each field keeps the latest bucket's expiry, not its first."""
    monkeypatch.setattr("meterwall.metering.latency_bucket", lambda ttfb_ns: 7)
    clock = FixedClock(0)
    own = settings.replace(consumer_header="X-Consumer", retention_day=40 * 86400)
    mw = Meterwall(ok_app, settings=own, clock=clock)
    day = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    await send_at(mw, clock, f"{day}T08:00:00", "acme", client=("192.0.2.7", 1000))
    await send_at(mw, clock, f"{day}T{last_request}", "acme", client=("192.0.2.8", 1000))
    clock.set(at(f"{day}T23:59:00") + 30 * 60 * 10**9)  # the flush comes after midnight
    await mw.aclose()
    keyspace = own.keyspace()
    assert await UsageReader(redis, keyspace).unique_clients("acme", day) == 2
    ttl_day = await redis.ttl(keyspace.counters_day("acme", day))
    ttl_uniques = await redis.ttl(keyspace.uniques("acme", day))
    assert abs(ttl_uniques - ttl_day) <= 2
    last = at(f"{day}T{last_request}") // 10**9
    assert abs(time.time() + ttl_uniques - (last - last % 900 + 40 * 86400)) <= 3


async def test_an_older_backlog_batch_does_not_shorten_a_usage_keys_expiry(redis, settings) -> None:
    """Writer A flushes the day's 22:00 request; writer B, back from an outage, flushes its
    08:00 request of the same day afterwards. The day hash, the month hash and the unique
    clients keep the expiry of the latest request, whichever batch came last."""
    own = settings.replace(consumer_header="X-Consumer", retention_day=40 * 86400)
    day = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    for when in ("22:00:00", "08:00:00"):
        clock = FixedClock(0)
        writer = Meterwall(ok_app, settings=own, clock=clock)
        await send_at(writer, clock, f"{day}T{when}", "acme", client=("192.0.2.7", 1000))
        await writer.aclose()
    keyspace = own.keyspace()
    latest = at(f"{day}T22:00:00") // 10**9
    expected = {
        keyspace.counters_day("acme", day): latest + 40 * 86400,
        keyspace.counters_month("acme", day[:7]): latest + 762 * 86400,
        keyspace.uniques("acme", day): latest + 40 * 86400,
    }
    for key, expires in expected.items():
        assert abs(time.time() + await redis.ttl(key) - expires) <= 3, key


async def test_a_lowered_retention_cuts_back_the_expiry_of_the_keys_being_written(
    redis, settings
) -> None:
    """Moving later only must not pin an expiry that the operator has since shortened: it is
    cut back to the new retention from now (not to the batch's own, which may be older than
    the key's latest request)."""
    day = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    for retention_day in (40 * 86400, 10 * 86400):  # the deployment lowers MW_RETENTION_DAY
        own = settings.replace(consumer_header="X-Consumer", retention_day=retention_day)
        clock = FixedClock(0)
        writer = Meterwall(ok_app, settings=own, clock=clock)
        await send_at(writer, clock, f"{day}T08:00:00", "acme", client=("192.0.2.7", 1000))
        await writer.aclose()
    keyspace = settings.keyspace()
    for key in (keyspace.counters_day("acme", day), keyspace.uniques("acme", day)):
        assert 10 * 86400 - 3 <= await redis.ttl(key) <= 10 * 86400, key


@pytest.mark.parametrize("ceiling", [[None, 2, 3, 4], [1, 2, 3], [1, 2, 3, 0], "1234"])
async def test_a_bad_aggregate_retention_is_refused_before_any_write(
    redis, settings, ceiling
) -> None:
    keyspace = settings.keyspace()
    now = int(time.time())
    counters = [[1, now // 900 * 900, "acme\x1f\x1f/x\x1fGET\x1f200\x1frequests", 1, now + 60]]
    batch = [4, "w-ceiling", 1, 3600, counters, [], [], [], [], 900, 0]
    for seq, last in ((1, [60, 60, 60, 60]), (2, ceiling)):
        batch[2] = seq
        payload = msgpack.packb([*batch, last], use_bin_type=False)
        [reply] = (await apply_batches(redis, keyspace, {0: payload})).values()
    assert "bad batch: aggregate retention" in str(reply)
    assert int(await redis.get(keyspace.high_water_mark(0, "w-ceiling"))) == 1  # nothing written


async def test_an_unchanged_expiry_is_not_set_again(redis, settings) -> None:
    """TTL rounds to the nearest second, the script's clock down: an equal expiry must not read
    as an earlier one (an EXPIREAT per hash and flush for nothing). Counters only: a record
    batch sets its stream's and index's expiry every time."""
    own = settings.replace(consumer_header="X-Consumer", records="off")
    clock = FixedClock(0)
    day = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    first = Meterwall(ok_app, settings=own, clock=clock)
    await send_at(first, clock, f"{day}T08:00:00", "acme")
    await first.aclose()
    for n in range(20):  # the same 15-minute bucket: the same expiry, each time
        writer = Meterwall(ok_app, settings=own, clock=clock)
        await send_at(writer, clock, f"{day}T08:0{n % 10}:00", "acme")
        before = await command_calls(redis)
        await writer.aclose()
        calls = await command_calls_since(redis, before)
        assert calls.get("ttl", 0) >= 4, calls  # 15 minutes, hour, day, month
        assert "expireat" not in calls, calls


async def test_unique_clients_waiting_for_redis_are_bounded_and_refused_adds_counted(
    redis, settings
) -> None:
    """MW_BUFFER_BYTES bounds the members held between counter flushes too (a long outage with
    many clients): about 100 bytes a member and 450 a consumer's day. Past the bound a request's
    client is not added and the request is counted (each of them: an upper bound on the clients
    missing); the day's latest request still sets the count's expiry."""
    own = settings.replace(consumer_header="X-Consumer", counter_flush_interval=300,
                           buffer_bytes=64 * 1024, retention_day=40 * 86400)  # fmt: skip
    accepted = (own.buffer_bytes - 450) // 100  # 650
    clock = FixedClock(0)
    mw = Meterwall(ok_app, settings=own, clock=clock)
    mw.flusher.start()
    day = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    await send_at(mw, clock, f"{day}T07:00:00", "acme", client=("192.0.2.1", 1))
    assert await mw.flusher.flush_once()  # the first flush sends the counters: none pending
    for n in range(accepted + 48):
        await send_at(
            mw, clock, f"{day}T08:00:00", "acme", client=(f"10.0.{n // 250}.{n % 250}", 1)
        )
        if n % 50 == 49:
            assert await mw.flusher.flush_once()  # records sealed; uniques stay pending
    for _ in range(2):  # a refused client again, later in the day
        await send_at(mw, clock, f"{day}T22:00:00", "acme", client=("10.9.9.9", 1))
    assert await mw.flusher.flush_once()
    assert mw.health()["unique_adds_dropped"] == 50
    await mw.aclose()
    keyspace = own.keyspace()
    counted = await UsageReader(redis, keyspace).unique_clients("acme", day)
    # A HyperLogLog of ~650 members (its day key is random per run) is off by about 4 (one
    # sd of linear counting over 16,384 registers); unbounded, it would count 699.
    assert abs(counted - (1 + accepted)) <= 24
    stats = await redis.hgetall(keyspace.stats(0))
    assert int(stats[b"unique_adds_dropped"]) == 50
    expires = at(f"{day}T22:00:00") // 10**9 + 40 * 86400
    assert abs(time.time() + await redis.ttl(keyspace.uniques("acme", day)) - expires) <= 3


async def test_writers_agree_on_the_days_random_key_and_it_goes_with_the_window(
    redis, settings
) -> None:
    """Two workers count one client once; the day's key expires a window after the day."""
    own = settings.replace(consumer_header="X-Consumer")
    headers = [(b"x-consumer", b"hooli")]
    for worker in (Meterwall(ok_app, settings=own), Meterwall(ok_app, settings=own)):
        for n in range(4):
            scope = http_scope(headers=headers, client=(f"192.0.2.{n % 2}", 1000 + n))
            await worker(scope, body_receive(), _discard)
        await worker.aclose()
    today = int(time.time()) // 86400
    assert await UsageReader(redis, own.keyspace()).unique_clients(
        "hooli", datetime.now(UTC).strftime("%Y-%m-%d")
    ) == 2  # fmt: skip
    day_key = own.keyspace().uniques_keys(today)
    assert await redis.hlen(day_key) == 1  # one random key, agreed through Redis
    expires = time.time() + await redis.ttl(day_key)  # TTL, not EXPIRETIME: Redis 6.2 too
    assert abs(expires - ((today + 1) * 86400 + int(own.raw_retention))) <= 2


def _increments_one_by_one(deltas, zone_of, weight_of):  # type: ignore[no-untyped-def]
    """The ledger's rules applied delta by delta, as plainly as they read: the model."""
    from meterwall.keyspace import SEP, counter_field
    from meterwall.metering import BUCKET_1H, NO_RESPONSE, RETENTION, _local_day_month

    out: dict = {}

    def add(consumer, kind, bucket, name, value, at):  # type: ignore[no-untyped-def]
        rows = out.setdefault(consumer, {})
        row = rows.setdefault((kind, bucket, name), [0, at + RETENTION[kind]])
        row[0] += value
        row[1] = max(row[1], at + RETENTION[kind])  # kept a retention after its latest bucket

    for key, values in deltas.items():
        bucket, consumer, key_id, route, method, status, latency, denied = key
        hour = bucket - bucket % BUCKET_1H
        day, month = _local_day_month(bucket, zone_of(consumer, bucket))
        dims = f"{key_id}{SEP}{route}{SEP}{method}{SEP}{status}{SEP}"
        units = values[0] * weight_of(route) if status < 500 and not denied else 0
        named = [("requests", values[0]), ("units", units), ("bytes_in", values[1]),
                 ("bytes_out", values[2])]  # fmt: skip
        if denied:
            named.append(("denied:" + denied, values[0]))
        if latency != NO_RESPONSE:
            named.append((f"lat:{latency}", values[0]))
        for name, value in named:
            if not value:
                continue
            field = counter_field(consumer, key_id, route, method, status, name)
            if not name.startswith("lat:"):  # the 15-minute hashes hold no histogram
                add(consumer, 1, bucket, field, value, bucket)
            add(consumer, 2, hour, field, value, hour)
            add(consumer, 3, f"{consumer}:{day}", dims + name, value, bucket)
            add(consumer, 4, f"{consumer}:{month}", dims + name, value, bucket)
    return out


def test_counter_increments_equal_the_rules_applied_delta_by_delta() -> None:
    import random

    from meterwall.metering import NO_RESPONSE, counter_increments

    rng = random.Random(7)
    zones = {"acme": "UTC", "globex": "Asia/Kolkata", "": "UTC"}
    deltas = {}
    for _ in range(400):
        key = (
            1796000000 - 900 * rng.randrange(3) - 900 * 96 * rng.randrange(2) * 30,
            rng.choice(list(zones)), rng.choice(["", "k1"]), rng.choice(["/a", "/b/{id}"]),
            rng.choice(["GET", "POST"]), rng.choice([200, 404, 503]),
            rng.choice([NO_RESPONSE, *range(20, 40)]), rng.choice(["", "", "rate"]),
        )  # fmt: skip
        deltas[key] = [rng.randrange(1, 5), rng.randrange(0, 3000), rng.randrange(0, 99)]
    zone_of = lambda consumer, _: zones[consumer]  # noqa: E731
    weight_of = lambda route: 3 if route == "/a" else 0  # noqa: E731
    assert counter_increments(deltas, zone_of, weight_of) == _increments_one_by_one(
        deltas, zone_of, weight_of
    )


class _FlushAfterRead:
    """The closer's client; a worker's flush lands right after the month is read."""

    def __init__(self, redis: Any, flush: Any) -> None:
        self._redis, self._flush = redis, flush

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)

    async def hgetall(self, key: str) -> Any:
        value = await self._redis.hgetall(key)
        if ":cm:" in key:
            await self._flush()
        return value


async def test_a_flush_landing_while_a_month_is_closed_is_in_the_snapshot_or_adjusted(
    redis, settings
) -> None:
    keyspace = settings.keyspace()
    clock = FixedClock(0)
    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"), clock=clock)
    await send_at(mw, clock, "2026-10-20T12:00:00", "acme")
    assert await mw.flusher.flush()
    await send_at(mw, clock, "2026-10-31T23:59:00", "acme")  # a late batch, in flight

    now = int(datetime(2026, 11, 1, 3, 0, tzinfo=UTC).timestamp())
    closer = _FlushAfterRead(redis, mw.flusher.flush)
    report = await close_period(closer, keyspace, "2026-10", grace_s=7200, now_s=now)
    assert report.closed == ["acme"]
    assert await mw.aclose()
    [frozen] = await UsageReader(redis, keyspace).totals("acme", "2026-10")
    late = (await adjustments(redis, keyspace, "2026-10")).get("acme", {})
    assert frozen["requests"] + sum(v for k, v in late.items() if k.endswith("requests")) == 2
    again = await close_period(redis, keyspace, "2026-10", grace_s=7200, now_s=now)
    assert again.already_closed == ["acme"]


async def test_a_close_stopped_after_its_mark_is_finished_by_the_next(redis, settings) -> None:
    from meterwall.periods import CLOSING

    keyspace = settings.keyspace()
    clock = FixedClock(0)
    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"), clock=clock)
    await send_at(mw, clock, "2026-10-20T12:00:00", "acme")
    assert await mw.aclose()
    await redis.set(keyspace.closed("acme", "2026-10"), CLOSING)  # the closer died here
    [open_month] = await UsageReader(redis, keyspace).totals("acme", "2026-10")
    assert open_month["requests"] == 1
    now = int(datetime(2026, 11, 1, 3, 0, tzinfo=UTC).timestamp())
    report = await close_period(redis, keyspace, "2026-10", grace_s=7200, now_s=now)
    assert report.closed == ["acme"]
    assert json.loads(await redis.get(keyspace.closed("acme", "2026-10")))["fields"]
