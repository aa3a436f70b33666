"""The 24-hour promise: readers, the flush script, real Redis expiry, audit and purge."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis

from meterwall import FixedClock, Meterwall, RetentionExceeded
from meterwall.embedded import EmbeddedRedis
from meterwall.reader import RecordReader
from meterwall.retention import Auditor, plaintext_findings, purge
from meterwall.store import apply_batches
from tests.helpers import this_hour
from tests.test_flusher import ok_app, requests_in_redis
from tests.test_middleware import _discard, body_receive, http_scope

DAY = 86400
NS = 1_000_000_000


async def serve(mw: Meterwall, n: int = 1, path: str = "/") -> None:
    for _ in range(n):
        await mw(http_scope(path), body_receive(), _discard)


async def test_records_past_the_ceiling_are_unreadable(redis, settings, private_key) -> None:
    clock = FixedClock(time.time_ns())
    made_at = clock.now_ns()
    mw = Meterwall(ok_app, settings=settings, clock=clock)
    await serve(mw, 3)
    await mw.aclose()
    assert len(await RecordReader(redis, settings, private_key, clock=clock).records()) == 3
    clock.advance(DAY + 1)  # one second past the ceiling; Redis itself has not expired them yet
    later = RecordReader(redis, settings, private_key, clock=clock)
    assert await later.records() == []
    with pytest.raises(RetentionExceeded):
        await later.records(since_ns=made_at)


async def test_the_flush_script_refuses_records_already_past_the_ceiling(
    redis, settings, private_key
) -> None:
    clock = FixedClock(time.time_ns() - (DAY + 600) * NS)  # captured 24 h 10 min ago
    mw = Meterwall(ok_app, settings=settings, clock=clock)
    await serve(mw, 4)
    await mw.flusher._seal_inbox(None)  # sealed then, flushed only now:
    clock.set(time.time_ns())
    assert await mw.aclose() is True
    assert await RecordReader(redis, settings, private_key).count() == 0
    stats = await redis.hgetall(settings.keyspace().stats(0))
    assert int(stats[b"records_expired_before_store"]) == 4


async def plant_expired_slice(redis: aioredis.Redis, settings) -> tuple[str, str, int]:
    """A slice past the ceiling whose expiry was missed: what the trim must remove."""
    keyspace = settings.keyspace()
    old_slice = keyspace.slice_start(int(time.time()) - DAY - 600)
    old_key, old_index = keyspace.records(0, old_slice), keyspace.index(0, old_slice)
    await redis.xadd(old_key, {"n": 1, "r": b"x"})
    await redis.zadd(old_index, {b"member": 0})
    await redis.zadd(keyspace.slices(0), {str(old_slice): old_slice})
    return old_key, old_index, old_slice


async def test_a_writer_trims_slices_past_the_ceiling_first_then_every_ten_seconds(
    redis, settings
) -> None:
    keyspace = settings.keyspace()
    old_key, old_index, old_slice = await plant_expired_slice(redis, settings)
    clock = FixedClock(time.time_ns())
    mw = Meterwall(ok_app, settings=settings, clock=clock)
    await serve(mw, 1)
    assert await mw.flusher.flush() is True
    assert await redis.exists(old_key, old_index) == 0  # trimmed by the writer's first batch
    assert await redis.zscore(keyspace.slices(0), str(old_slice)) is None

    await plant_expired_slice(redis, settings)
    clock.advance(9)
    await serve(mw, 1)
    assert await mw.flusher.flush() is True
    assert await redis.exists(old_key, old_index) == 2  # not asked for again within 10 s
    clock.advance(1)
    await serve(mw, 1)
    await mw.aclose()
    assert await redis.exists(old_key, old_index) == 0
    assert await redis.zscore(keyspace.slices(0), str(old_slice)) is None


async def test_a_slice_stream_that_lost_its_expiry_gets_it_back_with_the_next_write(
    redis, settings
) -> None:
    mw = Meterwall(ok_app, settings=settings)
    await serve(mw, 2)
    assert await mw.flusher.flush() is True
    keyspace = settings.keyspace()
    [slice_name] = await redis.zrange(keyspace.slices(0), 0, -1)
    record_key = keyspace.records(0, int(slice_name))
    index_key = keyspace.index(0, int(slice_name))
    await redis.persist(record_key)  # restored without TTLs, say: the slice list still names it
    await redis.persist(index_key)
    await serve(mw, 2)
    await mw.aclose()
    assert await redis.xlen(record_key) == 2  # the first flush's group and the second's
    assert 0 < await redis.ttl(record_key) <= DAY
    assert 0 < await redis.ttl(index_key) <= DAY


async def test_a_writer_whose_clock_runs_fast_cannot_extend_retention(redis, settings) -> None:
    ahead = FixedClock(time.time_ns() + 7200 * NS)  # two hours fast
    mw = Meterwall(ok_app, settings=settings, clock=ahead)
    await serve(mw, 2)
    await mw.aclose()
    keyspace = settings.keyspace()
    [slice_name] = await redis.zrange(keyspace.slices(0), 0, -1)
    ttl = await redis.ttl(keyspace.records(0, int(slice_name)))
    assert 0 < ttl <= DAY  # Redis's own clock decides, not the writer's


async def test_index_keys_expire_even_when_a_slice_starts_without_identifiers(
    redis, settings
) -> None:
    mw = Meterwall(ok_app, settings=settings)
    await mw(http_scope(client=None), body_receive(), _discard)  # nothing to index
    await mw(http_scope(), body_receive(), _discard)  # an IP to index
    await mw.aclose()
    keyspace = settings.keyspace()
    [slice_name] = await redis.zrange(keyspace.slices(0), 0, -1)
    assert 0 < await redis.ttl(keyspace.index(0, int(slice_name))) <= DAY


@pytest.mark.slow
async def test_records_really_expire_in_redis(redis, settings, private_key) -> None:
    settings = settings.replace(raw_retention=3)
    await redis.config_set("notify-keyspace-events", "Ex")
    pubsub = redis.pubsub()
    await pubsub.subscribe("__keyevent@0__:expired")
    try:
        mw = Meterwall(ok_app, settings=settings)
        await serve(mw, 2)
        await mw.aclose()
        keyspace = settings.keyspace()
        [slice_name] = await redis.zrange(keyspace.slices(0), 0, -1)
        record_key = keyspace.records(0, int(slice_name)).encode()
        assert 0 < await redis.ttl(record_key) <= 3
        assert await RecordReader(redis, settings, private_key).count() == 2

        async def expired() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message" and message["data"] == record_key:
                    return

        await asyncio.wait_for(expired(), timeout=15)  # the event Redis emits on real expiry
        assert await redis.exists(record_key) == 0
        assert await RecordReader(redis, settings, private_key).count() == 0
        assert await requests_in_redis(redis, settings) == 2  # counts outlive the records
    finally:
        await pubsub.aclose()


async def test_audit_passes_on_clean_traffic_and_names_each_failure(redis, settings) -> None:
    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"))
    await serve(mw, 5, "/login")
    await mw.aclose()
    keyspace = settings.keyspace()
    checks = await Auditor(redis, keyspace).run()
    assert [(c.name, c.ok) for c in checks] == [
        ("expiry", True), ("age", True), ("plaintext", True), ("index", True),
        ("restrictions", True), ("persistence", True), ("eviction", True),
    ]  # fmt: skip

    await redis.xadd(keyspace.records(3, 1000), {"r": b"not sealed"})  # no expiry
    bucket = this_hour()[0] // 900 * 900
    await redis.hset(keyspace.counters_15m(2, bucket), "acme\x1f/from/203.0.113.9\x1fGET", 1)
    await redis.set(keyspace.stats(5), "Authorization: Bearer abcdefgh12345678")
    await redis.set(keyspace.data_key(4, b"\x01" * 8), b"wrapped")  # a data key kept forever
    checks = {c.name: c for c in await Auditor(redis, keyspace).run()}
    assert not checks["expiry"].ok
    assert "has no expiry" in checks["expiry"].problems[0]
    assert any(":dk:0101010101010101 has no expiry" in p for p in checks["expiry"].problems)
    assert not checks["age"].ok
    assert not checks["plaintext"].ok
    found = " ".join(checks["plaintext"].problems)
    assert "IPv4 address 203.0.113.9" in found
    assert "credential" in found


async def test_audit_sees_records_under_a_prefix_with_colons(redis, settings) -> None:
    settings = settings.replace(key_prefix=f"app:{settings.key_prefix}")
    mw = Meterwall(ok_app, settings=settings)
    await serve(mw, 1)
    await mw.aclose()
    keyspace = settings.keyspace()
    [slice_name] = await redis.zrange(keyspace.slices(0), 0, -1)
    await redis.persist(keyspace.records(0, int(slice_name)))
    checks = {c.name: c for c in await Auditor(redis, keyspace).run()}
    assert not checks["expiry"].ok


def test_plaintext_findings_validate_what_they_report() -> None:
    assert plaintext_findings("1700000000000-0 12:30:45 v1.2.3 /items/{id}") == []
    assert plaintext_findings("999.1.1.1") == []
    assert plaintext_findings("from 2001:db8::1 via 10.0.0.1") == [
        "IPv4 address 10.0.0.1",
        "IPv6 address 2001:db8::1",
    ]
    assert plaintext_findings('{"password": "***"}') == []
    assert plaintext_findings('{"password": "hunter2"}') != []
    # Each pattern runs only behind a cheap precondition: none of them may hide a finding.
    assert plaintext_findings("Authorization BEARER abcdefghij1234") != []
    assert plaintext_findings("api_key=abcdef123") != []
    assert plaintext_findings("x_api_key=abcdef123") != []  # a prefix joined by "_" too
    assert plaintext_findings("x_api_key=***") == []
    assert plaintext_findings("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0") != []
    assert plaintext_findings("lat:12␟acme␟/items/{id}␟GET␟200␟requests") == []


@pytest.mark.slow
async def test_persistence_check_fails_with_aof_until_purge_requests_a_rewrite(
    settings,
) -> None:
    server = EmbeddedRedis(extra_args=["--appendonly", "yes"]).start()
    client = aioredis.Redis.from_url(server.url)
    try:
        keyspace = settings.keyspace()
        auditor = Auditor(client, keyspace)
        before = await auditor.persistence(int(time.time()))
        assert not before.ok
        assert "AOF" in before.detail
        result = await purge(client, keyspace, DAY)
        assert result["rewrites_requested"] == 1
        after = await auditor.persistence(int(time.time()))
        assert after.ok, after.detail
    finally:
        await client.aclose()
        server.stop()


def test_the_audit_sample_gives_every_record_the_same_chance() -> None:
    """Algorithm L skips ahead between kept records; over many audits each record of 100,
    offered in uneven groups, lands in a sample of 10 about equally often."""

    def sample(size: int, groups: list[int]) -> list[int]:
        auditor = Auditor(None, None, sample=size)  # type: ignore[arg-type]
        offered = 0
        for n in groups:
            auditor._keep_in_sample(0, [bytes([i]) for i in range(offered, offered + n)])
            offered += n
        return [blob[0] for _, blob in auditor._sample]

    random.seed(3)
    counts: Counter[int] = Counter()
    for _ in range(4000):
        kept = sample(10, [3, 7, 1, 40, 25, 24])
        assert len(set(kept)) == 10
        counts.update(kept)
    assert len(counts) == 100
    assert 320 <= min(counts.values()) <= max(counts.values()) <= 480  # 400 expected, sd 19
    assert sorted(sample(10, [5])) == [0, 1, 2, 3, 4]
    assert sample(0, [5]) == []


async def test_a_batch_of_an_earlier_version_without_the_trim_field_is_applied_and_trims(
    redis, settings
) -> None:
    """Journals and rolling upgrades hand the script batches of 10 fields: no trim field, which
    reads as "trim"; a bad trim field is refused before any write."""
    old_key, old_index, _ = await plant_expired_slice(redis, settings)
    keyspace = settings.keyspace()
    counters = [[1, int(time.time()) // 900 * 900, "acme\x1f\x1f/x\x1fGET\x1f200\x1frequests", 2,
                 int(time.time()) + 3600]]  # fmt: skip
    earlier = msgpack.packb([4, "w-old", 1, DAY, counters, [], [], [], [], 900],
                            use_bin_type=False)  # fmt: skip
    [reply] = (await apply_batches(redis, keyspace, {0: earlier})).values()
    assert reply[0] == b"applied"
    assert await redis.exists(old_key, old_index) == 0
    bad = msgpack.packb([4, "w-old", 2, DAY, counters, [], [], [], [], 900, 2],
                        use_bin_type=False)  # fmt: skip
    [refused] = (await apply_batches(redis, keyspace, {0: bad})).values()
    assert "bad batch: trim" in str(refused)
    assert int(await redis.get(keyspace.high_water_mark(0, "w-old"))) == 1  # nothing written


async def test_network_rules_are_configuration_not_client_addresses(redis, settings) -> None:
    """``consumers set --allow/--deny`` and ``keys create --cidr`` store networks on purpose:
    the plaintext check passes over those lists, and still scans everything else there."""
    from meterwall.consumers import ConsumerRegistry
    from tests.test_access import make_key

    keyspace = settings.keyspace()
    await ConsumerRegistry(redis, keyspace).set(
        "acme", allow=["203.0.113.0/24"], deny=["198.51.100.7/32"]
    )
    await make_key(redis, settings.replace(access="keys"), cidrs=("192.0.2.0/24",))
    checks = {c.name: c for c in await Auditor(redis, keyspace, settings=settings).run()}
    assert checks["plaintext"].ok, checks["plaintext"].problems
    await redis.hset(keyspace.consumers(), "globex", b'{"note": "seen from 203.0.113.9"}')
    checks = {c.name: c for c in await Auditor(redis, keyspace, settings=settings).run()}
    assert not checks["plaintext"].ok
    assert any("203.0.113.9" in p for p in checks["plaintext"].problems)


async def test_a_fast_writer_never_moves_a_slice_expiry_later(redis, settings) -> None:
    """A writer whose clock runs ahead writes into a slice that lies in the future: its keys
    expire at Redis's now + retention, and a later write must not push that further (the first
    records would outlive 24 hours)."""
    ahead = (int(time.time()) // 300 + 24) * 300  # two hours ahead, at a slice start
    clock = FixedClock(ahead * 10**9)
    app = Meterwall(ok_app, settings=settings, clock=clock)
    await app(http_scope("/x", client=("203.0.113.7", 5000)), body_receive(), _discard)
    assert await app.aclose()
    keys = [k async for k in redis.scan_iter(match=f"{settings.key_prefix}:*:rec:*")]
    keys += [k async for k in redis.scan_iter(match=f"{settings.key_prefix}:*:ix:*")]
    assert len(keys) == 2
    now = int((await redis.time())[0])
    for key in keys:  # as if the first write was made 10 hours ago
        await redis.expireat(key, now + 86400 - 36000)
    clock.advance(3)  # the same slice
    app = Meterwall(ok_app, settings=settings, clock=clock)
    await app(http_scope("/x", client=("198.51.100.4", 5000)), body_receive(), _discard)
    assert await app.aclose()
    for key in keys:
        assert await redis.ttl(key) <= 86400 - 36000, key


async def test_an_audit_of_a_live_store_does_not_report_entries_written_while_it_ran(
    redis, settings, monkeypatch
) -> None:
    """Streams and indexes are read in different batches: a flush in between adds index
    entries for stream entries the audit read before they existed. They are read again."""
    from meterwall import retention as retention_module

    own = settings.replace(consumer_header="X-Consumer")
    app = Meterwall(ok_app, settings=own)
    keyspace = own.keyspace()
    consumers = {keyspace.shard_of(f"c{n}"): f"c{n}" for n in range(200)}  # one per shard

    async def traffic() -> None:
        for consumer in consumers.values():
            headers = [(b"host", b"api.test"), (b"x-consumer", consumer.encode())]
            await app(http_scope("/x", headers=headers), body_receive(), _discard)
        assert await app.flusher.flush()

    await traffic()
    audit_batch = retention_module.Auditor._audit_batch

    async def then_more_traffic(self: Any, *args: Any) -> int:
        scanned: int = await audit_batch(self, *args)
        await traffic()  # a flush lands between this batch and the next
        return scanned

    monkeypatch.setattr(retention_module, "_BATCH", 1)
    monkeypatch.setattr(retention_module.Auditor, "_audit_batch", then_more_traffic)
    checks = {c.name: c for c in await Auditor(redis, keyspace).run()}
    assert checks["index"].ok, checks["index"].problems[:3]
    assert checks["expiry"].ok, checks["expiry"].problems[:3]
    await app.aclose()
