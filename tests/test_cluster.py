"""Redis Cluster: three real masters; metering, records, access control, tracing and the
readers work across them, and counts stay exact across two worker processes."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from redis.asyncio.cluster import RedisCluster

from meterwall import KeyStore, Meterwall, Settings
from meterwall.embedded import EmbeddedCluster
from meterwall.reader import RecordReader
from meterwall.retention import Auditor
from meterwall.tracing import TraceQuery, Tracer
from meterwall.usage import UsageReader
from tests.helpers import serve, stop
from tests.test_access import api_app


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(3) as started:
        yield started


@pytest.fixture
def on_cluster(settings: Settings, cluster: EmbeddedCluster) -> Settings:
    return settings.replace(redis_url=cluster.url, redis_cluster=True)


@pytest.fixture
async def client(cluster: EmbeddedCluster) -> AsyncIterator[Any]:
    redis = RedisCluster.from_url(cluster.url)
    try:
        yield redis
    finally:
        await redis.aclose()


async def test_everything_works_across_three_masters(on_cluster, client, private_key) -> None:
    plans = "p: 1000/s, 100000 requests/month"
    own = on_cluster.replace(access="keys", plans=plans, default_plan="p")
    keys = KeyStore.for_settings(client, own)
    made = {c: await keys.create(c) for c in ("acme", "globex", "initech", "umbrella")}
    app = Meterwall(api_app, settings=own)
    async with LifespanManager(app):
        for index, (consumer, (_, key)) in enumerate(made.items()):
            transport = httpx.ASGITransport(app=app, client=(f"203.0.113.{index}", 4000))
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                for n in range(5):
                    reply = await http.get(f"/items/{n}", headers={"X-API-Key": key})
                    assert reply.status_code == 200, (consumer, reply.text)
                    assert "ratelimit" in reply.headers
    shards = {own.keyspace().shard_of(c) for c in made}
    slots = {client.keyslot(own.keyspace().shard_prefix(s)) for s in shards}
    nodes = {client.get_node_from_key(own.keyspace().shard_prefix(s)).name for s in shards}
    assert len(slots) == len(shards)
    assert len(nodes) > 1
    month = datetime.now(UTC).strftime("%Y-%m")
    reader = UsageReader(client, own.keyspace())
    for consumer in made:
        [row] = await reader.totals(consumer, month, ["route"])
        assert (row["route"], row["requests"]) == ("/items/{n}", 5)
    assert [r["requests"] for r in await reader.top(month, n=10)] == [5, 5, 5, 5]
    records = await RecordReader(client, own, private_key).records()
    assert len(records) == 20
    found = await Tracer(client, own, private_key, actor="t").trace(TraceQuery(ip="203.0.113.2"))
    assert [r["consumer"] for r in found.records] == ["initech"] * 5
    checks = {c.name: c for c in await Auditor(client, own.keyspace()).run()}
    for name in ("expiry", "age", "plaintext", "index"):
        assert checks[name].ok, checks[name].problems


async def test_counts_are_exact_across_two_workers_on_the_cluster(on_cluster, client) -> None:
    assert on_cluster.pseudonym_secret is not None
    env = {"MW_REDIS_URL": on_cluster.redis_url, "MW_REDIS_CLUSTER": "true",
           "MW_KEY_PREFIX": on_cluster.key_prefix, "MW_RECORD_PUBLIC_KEY":
           on_cluster.record_public_key or "", "MW_CONSUMER_HEADER": "X-Consumer",
           "MW_PSEUDONYM_SECRET": base64.b64encode(on_cluster.pseudonym_secret.reveal()).decode(),
           "MW_JOURNAL_DIR": on_cluster.journal_dir}  # fmt: skip
    servers, ports = await serve(env, 2)
    consumers = [f"c{n:02d}" for n in range(30)]
    try:
        async with httpx.AsyncClient(timeout=30) as http:

            async def one(n: int) -> int:
                url = f"http://127.0.0.1:{ports[n % 2]}/echo/{n}"
                headers = {"X-Consumer": consumers[n % 30]}
                return (await http.post(url, content=b"x" * n, headers=headers)).status_code

            for start in range(0, 600, 50):
                statuses = await asyncio.gather(*(one(n) for n in range(start, start + 50)))
                assert statuses == [200] * 50
    finally:
        await stop(servers)
    month = datetime.now(UTC).strftime("%Y-%m")
    reader = UsageReader(client, on_cluster.keyspace())
    for index, consumer in enumerate(consumers):
        [row] = await reader.totals(consumer, month, ["route"])
        assert row["requests"] == 20
        assert row["bytes_in"] == sum(n for n in range(600) if n % 30 == index)


async def test_a_revocation_reaches_the_worker_through_the_cluster(on_cluster, client) -> None:
    own = on_cluster.replace(access="keys")
    keys = KeyStore.for_settings(client, own)
    meta, key = await keys.create("acme")
    app = Meterwall(api_app, settings=own)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            headers = {"X-API-Key": key}
            assert (await http.get("/items/1", headers=headers)).status_code == 200
            assert app.access is not None
            await asyncio.wait_for(app.access.listening.wait(), timeout=10.0)
            app.access.key_event.clear()
            await keys.revoke(meta.id)
            await asyncio.wait_for(app.access.key_event.wait(), timeout=1.0)
            assert (await http.get("/items/1", headers=headers)).json()["detail"] == "revoked"
