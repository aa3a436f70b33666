"""Read speed of the usage ledger (issue targets: a consumer's month by route under 20 ms;
totals of 10,000 consumers for a month under 3 s).

Run: ``python benchmarks/ledger.py``. It starts its own Redis, fills the month hashes the flusher
would have written (100 routes with every measure and 8 latency buckets for one consumer; 10,000
consumers with 3 routes each), then times the reads through ``UsageReader``.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import redis.asyncio as aioredis

from meterwall.embedded import EmbeddedRedis
from meterwall.keyspace import SEP, Keyspace
from meterwall.usage import UsageReader

MONTH = "2026-11"


def month_fields(routes: int) -> dict[str, int]:
    fields = {}
    for n in range(routes):
        dims = f"k{n % 3}{SEP}/route/{n}/{{id}}{SEP}GET{SEP}200{SEP}"
        for measure, value in (
            ("requests", 1000),
            ("units", 1000),
            ("bytes_in", 9),
            ("bytes_out", 9),
        ):
            fields[dims + measure] = value
        for bucket in range(40, 48):
            fields[dims + f"lat:{bucket}"] = 125
    return fields


async def main() -> None:
    with EmbeddedRedis() as server:
        redis = aioredis.Redis.from_url(server.url)
        keyspace = Keyspace("bench", 16)
        await redis.hset(keyspace.counters_month("acme", MONTH), mapping=month_fields(100))
        pipe = redis.pipeline(transaction=False)
        for n in range(10_000):
            pipe.hset(keyspace.counters_month(f"c{n:05d}", MONTH), mapping=month_fields(3))
        await pipe.execute()
        reader = UsageReader(redis, keyspace)
        one = []
        for _ in range(50):
            t0 = time.perf_counter()
            rows = await reader.totals("acme", MONTH, ["route"])
            one.append((time.perf_counter() - t0) * 1000)
        assert len(rows) == 100
        t0 = time.perf_counter()
        top = await reader.top(MONTH, n=10)
        everyone = time.perf_counter() - t0
        assert len(top) == 10
        await redis.aclose()
    print(
        f"- one consumer's month grouped by route (100 routes, 1,200 fields): median "
        f"{statistics.median(one):.2f} ms, max {max(one):.2f} ms over 50 reads (target < 20 ms)"
    )
    print(f"- top consumers of a month over 10,001 consumers: {everyone:.2f} s (target < 3 s)")


if __name__ == "__main__":
    asyncio.run(main())
