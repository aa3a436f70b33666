"""The fault proxy's reply delay: a slow link adds latency to every reply but caps no throughput,
so a benchmark of a slow Redis measures latency and not a proxy that falls behind."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlparse

import redis.asyncio as aioredis

from tests.faults import FaultProxy, Faults

HOLD = 0.2


async def test_a_reply_delay_adds_latency_once_per_reply_not_once_per_chunk(
    redis_url: str, key_prefix: str
) -> None:
    port = urlparse(redis_url).port
    assert port is not None
    value = b"x" * (2 * 1024 * 1024)  # a reply of many 64 KiB chunks
    async with FaultProxy(port, Faults(reply_delay_s=HOLD)) as proxy:
        client = aioredis.Redis(port=proxy.port)
        try:
            # Connecting costs round trips of its own (CLIENT SETINFO): open the connections first.
            await asyncio.gather(*(client.ping() for _ in range(8)))
            t0 = time.monotonic()
            assert await client.ping()
            one = time.monotonic() - t0
            await client.set(f"{key_prefix}:big", value, ex=60)
            t0 = time.monotonic()
            assert await client.get(f"{key_prefix}:big") == value
            big = time.monotonic() - t0
            t0 = time.monotonic()
            await asyncio.gather(*(client.ping() for _ in range(8)))  # on 8 connections at once
            side_by_side = time.monotonic() - t0
        finally:
            await client.aclose()
    assert HOLD <= one < HOLD + 0.15
    assert HOLD <= big < 2 * HOLD + 0.2  # 32 chunks held one after the other would take 6.4 s
    assert HOLD <= side_by_side < 2 * HOLD + 0.2
