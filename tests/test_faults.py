"""Faults: counts stay exact through dropped requests and replies and Redis crashes (AOF
everysec, SIGKILL), with two single-worker uvicorn processes and the journal."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from meterwall import Meterwall, Settings
from meterwall.embedded import EmbeddedRedis
from meterwall.usage import UsageReader
from tests.faults import FaultProxy, Faults
from tests.helpers import serve, stop
from tests.test_flusher import ok_app

AOF = ["--appendonly", "yes", "--appendfsync", "everysec"]
ROUTES = ["/a", "/b", "/c", "/d"]


@pytest.mark.slow
async def test_counts_stay_exact_through_proxy_faults_and_redis_crashes(
    settings: Settings, tmp_path: Path
) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    server = EmbeddedRedis(data_dir=str(data), extra_args=AOF).start()
    port = server.port
    assert port is not None
    faults = Faults(drop_request=0.05, drop_reply=0.05, seed=7)
    consumers = [f"c{n:03d}" for n in range(200)]
    sent: Counter[tuple[str, str]] = Counter()
    try:
        async with FaultProxy(port, faults) as proxy:
            own = settings.replace(redis_url=f"redis://127.0.0.1:{proxy.port}/0", records="off",
                                   consumer_header="X-Consumer", redis_timeout=0.5)  # fmt: skip
            assert own.pseudonym_secret is not None
            env = {"MW_REDIS_URL": own.redis_url, "MW_KEY_PREFIX": own.key_prefix,
                   "MW_RECORDS": "off", "MW_CONSUMER_HEADER": "X-Consumer",
                   "MW_PSEUDONYM_SECRET": base64.b64encode(own.pseudonym_secret.reveal()).decode(),
                   "MW_REDIS_TIMEOUT": "500ms", "MW_COUNTER_FLUSH_INTERVAL": "200ms",
                   "MW_JOURNAL_DIR": own.journal_dir}  # fmt: skip
            servers, ports = await serve(env, 2)
            try:
                async with httpx.AsyncClient(timeout=30) as client:

                    async def one(n: int) -> int:
                        consumer, route = consumers[n % 200], ROUTES[(n // 200) % 4]
                        url = f"http://127.0.0.1:{ports[n % 2]}{route}"
                        reply = await client.get(url, headers={"X-Consumer": consumer})
                        sent[(consumer, route)] += 1
                        return reply.status_code

                    n = 0
                    for phase in range(3):
                        for _ in range(20):
                            statuses = await asyncio.gather(*(one(n + i) for i in range(50)))
                            assert statuses == [200] * 50
                            n += 50
                        if phase < 2:  # a crash: no shutdown, the last second may be lost
                            await asyncio.to_thread(server.kill)
                            server = EmbeddedRedis(port=port, data_dir=str(data), extra_args=AOF)
                            await asyncio.to_thread(server.start)
            finally:
                await stop(servers)  # graceful: each flushes, or leaves its journal
            faults.drop_request = faults.drop_reply = 0.0  # the network heals
            left = len(locks(Path(own.journal_dir)))
            survivor = Meterwall(ok_app, settings=own)  # a restarted worker adopts what is left
            survivor.flusher.start()
            assert await survivor.flusher.flush_once()
            assert survivor.flusher.journals_adopted == left
            await survivor.aclose()
    finally:
        month = datetime.now(UTC).strftime("%Y-%m")
        async with aioredis.Redis(port=port) as direct:
            reader = UsageReader(direct, settings.keyspace())
            counted: Counter[tuple[str, str]] = Counter()
            for consumer in consumers:
                for row in await reader.totals(consumer, month, ["route"]):
                    counted[(consumer, row["route"])] += row["requests"]
        server.stop()
    assert sum(sent.values()) == 3000
    assert len(sent) == 800  # fields: 200 consumers x 4 routes
    assert faults.counts.get("drop_request", 0) > 0
    assert faults.counts.get("drop_reply", 0) > 0
    assert counted == sent


def locks(directory: Path) -> list[Path]:
    """The journals of writers that did not finish cleanly (each holds a lock file)."""
    return list(directory.rglob("*.lock"))
