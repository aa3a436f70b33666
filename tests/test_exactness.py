"""Exact counts across worker processes, retries and replays (real uvicorn, real Redis)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import pytest

from meterwall import Meterwall
from meterwall.journal import NullJournal
from meterwall.store import apply_batches
from meterwall.usage import UsageReader
from tests.helpers import serve, stop
from tests.test_flusher import ok_app, requests_in_redis
from tests.test_middleware import _discard, body_receive, http_scope


class RecordingJournal(NullJournal):
    """The journal seam, used to keep every packed batch so that it can be replayed."""

    def __init__(self) -> None:
        self.packed_batches: list[tuple[int, bytes]] = []
        self.applied_seqs: list[int] = []

    def packed(self, writer: str, seq: int, batches: dict[int, bytes], took_deltas: bool) -> None:
        self.packed_batches.extend(batches.items())

    def applied(self, writer: str, shard: int, seq: int) -> None:
        self.applied_seqs.append(seq)


async def test_a_replayed_old_batch_is_ignored(redis, settings) -> None:
    journal = RecordingJournal()
    mw = Meterwall(ok_app, settings=settings, journal=journal)
    for _ in range(4):
        await mw(http_scope(), body_receive(), _discard)
    assert await mw.flusher.flush() is True
    await mw(http_scope(), body_receive(), _discard)
    await mw.aclose()
    assert await requests_in_redis(redis, settings) == 5
    assert len(journal.applied_seqs) >= 2
    assert journal.applied_seqs == sorted(set(journal.applied_seqs))  # one number per flush
    keyspace = settings.keyspace()
    marks = {shard: await redis.get(keyspace.high_water_mark(shard, mw.flusher.writer))
             for shard, _ in journal.packed_batches}  # fmt: skip
    for shard, payload in journal.packed_batches:  # a replay of everything, e.g. by a journal
        [reply] = (await apply_batches(redis, keyspace, {shard: payload})).values()
        assert reply == [b"duplicate", marks[shard]]  # the mark it answers is the mark it keeps
    assert await requests_in_redis(redis, settings) == 5
    for shard, mark in marks.items():
        assert await redis.get(keyspace.high_water_mark(shard, mw.flusher.writer)) == mark


@pytest.mark.slow
async def test_counts_are_exact_across_two_worker_processes(redis, settings) -> None:
    env = {
        "MW_REDIS_URL": settings.redis_url,
        "MW_KEY_PREFIX": settings.key_prefix,
        "MW_RECORD_PUBLIC_KEY": settings.record_public_key or "",
        "MW_PSEUDONYM_SECRET": "A" * 43,
        "MW_CONSUMER_HEADER": "X-Consumer",
    }
    servers, ports = await serve(env, 2)
    consumers = ["acme", "globex", "initech"]
    try:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(n: int) -> int:
                url = f"http://127.0.0.1:{ports[n % 2]}/echo/{n}"
                headers = {"X-Consumer": consumers[n % 3]}
                return (await client.post(url, content=b"x" * n, headers=headers)).status_code

            statuses = []
            for start in range(0, 600, 50):
                statuses += await asyncio.gather(*(one(n) for n in range(start, start + 50)))
        assert statuses == [200] * 600
    finally:
        await stop(servers)
    month = datetime.now(UTC).strftime("%Y-%m")
    reader = UsageReader(redis, settings.keyspace())
    for consumer in consumers:
        [row] = await reader.totals(consumer, month, ["route"])
        assert (row["route"], row["requests"]) == ("/echo/{n:int}", 200)
        sent = sum(n for n in range(600) if consumers[n % 3] == consumer)
        assert row["bytes_in"] == sent
