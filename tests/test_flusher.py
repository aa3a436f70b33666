"""The flusher against real Redis trouble: lost replies, a stopped server, a full buffer."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis

from meterwall import FixedClock, Meterwall, Settings
from meterwall.embedded import EmbeddedRedis
from meterwall.reader import RecordReader
from meterwall.sealing import HOUR_NS
from meterwall.types import Message, Receive, Scope, Send
from meterwall.usage import usage_totals
from tests.faults import FaultProxy
from tests.helpers import command_calls, command_calls_since, this_hour
from tests.test_middleware import _discard, body_receive, http_scope


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def requests_in_redis(redis: aioredis.Redis, settings: Settings) -> int:
    return sum(r.requests for r in await usage_totals(redis, settings.keyspace(), *this_hour()))


async def test_a_flush_retried_after_a_lost_reply_is_not_counted_twice(
    redis, settings, private_key
) -> None:
    port = urlparse(settings.redis_url).port
    assert port is not None
    async with FaultProxy(port) as proxy:
        proxied = settings.replace(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            redis_timeout=0.3,
            flush_interval=60,
            counter_flush_interval=0,  # counters go with every flush, so this one carries them
        )
        mw = Meterwall(ok_app, settings=proxied)
        await mw(http_scope(), body_receive(), _discard)
        assert await mw.flusher.flush_once() is True  # epoch key and shard count settled
        for _ in range(10):
            await mw(http_scope(), body_receive(), _discard)
        proxy.faults.mute_replies = True
        assert await mw.flusher.flush_once() is False  # the reply never came: a timeout
        assert "Timeout" in (mw.flusher.last_error or "")
        assert await requests_in_redis(redis, settings) == 11  # ...but the batch did land
        proxy.faults.mute_replies = False
        assert await mw.aclose() is True  # re-sends the same batch: "duplicate", a success
    assert await requests_in_redis(redis, settings) == 11
    assert len(await RecordReader(redis, settings, private_key).records()) == 11


@pytest.mark.slow
async def test_requests_are_served_while_redis_is_down_and_counts_arrive_after(
    settings, private_key
) -> None:
    server = EmbeddedRedis().start()
    try:
        own = settings.replace(redis_url=server.url, redis_timeout=0.5, flush_interval=60)
        mw = Meterwall(ok_app, settings=own)
        await mw(http_scope(), body_receive(), _discard)
        assert await mw.flusher.flush_once() is True
        await asyncio.to_thread(server.stop)

        statuses: list[int] = []

        async def record_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        for _ in range(20):
            await mw(http_scope("/during-outage"), body_receive(b"x"), record_status)
        assert statuses == [200] * 20
        assert await mw.flusher.flush_once() is False
        assert mw.health()["state"] == "degraded"
        assert mw.health()["queued_records"] == 20  # sealed, waiting in the bounded buffer

        restarted = EmbeddedRedis(port=server.port)
        await asyncio.to_thread(restarted.start)  # an empty server: persistence is off
        try:
            assert await mw.aclose() is True
            client = aioredis.Redis.from_url(restarted.url)
            try:
                # 20 from the outage, and the first request again: Redis lost it when it
                # restarted empty, and the journal sends what was acknowledged just before
                assert await requests_in_redis(client, own) == 21
                records = await RecordReader(client, own, private_key).records()
                assert sorted({r["path"] for r in records}) == ["/", "/during-outage"]
                assert len(records) == 21
                # the pseudonym key made while Redis was away was published with the records
                assert len(await client.keys(f"{own.key_prefix}:epk:*")) == 1
            finally:
                await client.aclose()
        finally:
            restarted.stop()
    finally:
        server.stop()


async def test_a_full_buffer_drops_the_oldest_records_and_counts_the_drop(
    redis, settings, private_key
) -> None:
    settings = settings.replace(buffer_bytes=64 * 1024, body_limit=8 * 1024, flush_interval=60)
    mw = Meterwall(ok_app, settings=settings)
    for n in range(30):
        await mw(http_scope(f"/r{n}"), body_receive(b"y" * 8000), _discard)
    dropped = mw.flusher.inbox.dropped
    assert dropped > 0
    assert await mw.aclose() is True
    records = await RecordReader(redis, settings, private_key).records()
    assert len(records) == 30 - dropped
    assert min(int(r["path"][2:]) for r in records) == dropped  # the oldest went first
    assert await requests_in_redis(redis, settings) == 30  # counters are never dropped
    stats = await redis.hgetall(settings.keyspace().stats(0))
    assert int(stats[b"records_dropped"]) == dropped


@pytest.mark.slow
async def test_a_transient_redis_error_keeps_the_batch_until_redis_accepts_it(
    settings, private_key
) -> None:
    server = EmbeddedRedis(extra_args=["--maxmemory", "1", "--maxmemory-policy", "noeviction"])
    server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        own = settings.replace(redis_url=server.url, flush_interval=60)
        mw = Meterwall(ok_app, settings=own)
        for _ in range(5):
            await mw(http_scope(), body_receive(), _discard)
        assert await mw.flusher.flush_once() is False  # OOM: transient, not a bad batch
        assert "OutOfMemoryError" in (mw.flusher.last_error or "")
        assert mw.health()["batches_refused"] == 0
        await client.config_set("maxmemory", 0)
        assert await mw.aclose() is True
        assert await requests_in_redis(client, own) == 5
        assert len(await RecordReader(client, own, private_key).records()) == 5
    finally:
        await client.aclose()
        server.stop()


def test_a_forked_child_gets_a_new_writer_and_data_key(settings) -> None:
    mw = Meterwall(ok_app, settings=settings)
    flusher = mw.flusher
    parent_writer, parent_key = flusher.writer, flusher.sealer.data_key(1)
    flusher.after_fork()  # what os.register_at_fork runs in the child
    assert flusher.writer != parent_writer
    assert flusher.sealer.data_key(1).key_id != parent_key.key_id  # no shared nonce space


@pytest.mark.slow
async def test_counts_are_exact_when_redis_restarts_with_aof_during_traffic(
    settings, tmp_path
) -> None:
    aof = ["--appendonly", "yes", "--appendfsync", "everysec"]
    server = EmbeddedRedis(extra_args=aof, data_dir=str(tmp_path)).start()
    own = settings.replace(redis_url=server.url, redis_timeout=0.5, flush_interval=60)
    mw = Meterwall(ok_app, settings=own)
    try:
        for _ in range(30):
            await mw(http_scope(), body_receive(), _discard)
        assert await mw.flusher.flush_once() is True
        await asyncio.to_thread(server.stop)  # SHUTDOWN: the AOF holds everything acknowledged
        for _ in range(20):  # served while Redis is down
            await mw(http_scope(), body_receive(), _discard)
        assert await mw.flusher.flush_once() is False
        server = EmbeddedRedis(port=server.port, extra_args=aof, data_dir=str(tmp_path))
        await asyncio.to_thread(server.start)
        for _ in range(10):
            await mw(http_scope(), body_receive(), _discard)
        assert await mw.aclose() is True
        client = aioredis.Redis.from_url(server.url)
        try:
            assert await requests_in_redis(client, own) == 60
        finally:
            await client.aclose()
    finally:
        server.stop()


async def test_an_earlier_hours_data_key_is_held_only_while_its_records_wait(
    redis, settings, private_key
) -> None:
    """Records sealed before an hour changed still carry their key to Redis, and the process
    then forgets it: a memory dump opens no more than the records it still holds."""
    clock = FixedClock(time.time_ns() // HOUR_NS * HOUR_NS + HOUR_NS - 1_000_000_000)
    mw = Meterwall(ok_app, settings=settings, clock=clock)
    for _ in range(2):  # one exchange in the last second of an hour, one in the next hour
        await mw(http_scope(), body_receive(), _discard)
        await mw.flusher._seal_inbox(None)  # sealed, not yet sent (as while Redis is away)
        clock.advance(2)
    held = set(mw.flusher._data_keys_by_id)
    assert len(held) == 2  # the sealer made a new key for the new hour; both are still needed
    assert await mw.flusher.flush()
    assert set(mw.flusher._data_keys_by_id).isdisjoint(held)  # nothing waits for them any more
    assert await RecordReader(redis, settings, private_key, clock=clock).count() == 2
    records = await RecordReader(redis, settings, private_key, clock=clock).records()
    assert sorted(r["time_ns"] // HOUR_NS for r in records) == sorted(
        {clock.now_ns() // HOUR_NS - 1, clock.now_ns() // HOUR_NS}
    )  # both opened with the private key
    await mw.aclose()


async def test_a_record_batch_to_a_known_slice_costs_redis_eight_commands(
    redis, settings, private_key
) -> None:
    """The flush script's work in a steady state: no trim, no unique-client count (they go
    with the counters), no expiry for a slice list that already lists the slice."""
    clock = FixedClock(time.time_ns())
    mw = Meterwall(ok_app, settings=settings.replace(counter_flush_interval=300), clock=clock)
    await mw(http_scope(), body_receive(), _discard)
    assert await mw.flusher.flush() is True  # the slice, its expiries, a trim, the counters
    before = await command_calls(redis)
    for _ in range(3):
        await mw(http_scope(), body_receive(), _discard)
    assert await mw.flusher.flush_once() is True  # as the flusher task does: counters not due
    spent = await command_calls_since(redis, before)
    script = {"evalsha", "time", "set", "get", "xadd", "zadd", "expireat", "expire", "pfadd",
              "hincrby", "zrangebyscore", "exists"}  # fmt: skip
    assert {k: v for k, v in spent.items() if k in script} == {
        "evalsha": 1,
        "time": 1,
        "set": 2,
        "xadd": 1,
        "zadd": 2,
        "expireat": 2,
    }  # SET: the high-water mark, the data key (NX); ZADD: the index, the slice list; EXPIREAT:
    # the stream and the index
    await mw.aclose()
    assert await RecordReader(redis, settings, private_key, clock=clock).count() == 4
    assert await requests_in_redis(redis, settings) == 4  # the closing flush sent the counts


async def test_a_flush_run_without_the_task_closes_its_connection_on_aclose(settings) -> None:
    """flush_once() outside the background task (tests, scripts, an adopting worker's first
    flush) makes the client; aclose() in the same loop must close it, not drop it open."""
    import gc

    mw = Meterwall(ok_app, settings=settings.replace(records="off"))
    assert await mw.flusher.flush_once()
    client = mw.flusher._redis
    assert client is not None
    assert await mw.aclose()
    assert mw.flusher._redis is None
    del client
    gc.collect()  # an unclosed socket is reported here, and warnings are errors
