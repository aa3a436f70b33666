"""The write side of Redis: one pipelined round trip of script calls per flush.

Each logical shard that a flush touches gets one EVALSHA carrying its packed batch; the script
(``lua/apply_batch.lua``) fans it out to records, indexes and counters inside Redis. The client
never re-sends a command on its own: redis-py's default retry re-sends a script whose reply
timed out, which applied a flush twice in our trials. Our retries re-send the same batch on
purpose, and the writer's high-water mark makes that safe.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib import resources
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ConfigurationError
from .keyspace import Keyspace
from .settings import Settings

MAX_CONNECTIONS = 32  # per client; a process has a few clients (flusher, access, listener)
APPLY_SCRIPT = resources.files("meterwall").joinpath("lua/apply_batch.lua").read_bytes()
APPLY_SHA = hashlib.sha1(APPLY_SCRIPT, usedforsecurity=False).hexdigest()


def connect(
    settings: Settings, *, timeout: float | str | None = "default", one_node: bool = False
) -> Redis:
    """A client that fails fast and never retries behind our back.

    ``timeout`` overrides ``MW_REDIS_TIMEOUT`` (None: no read timeout, for pub/sub listeners).
    ``one_node``: with ``MW_REDIS_CLUSTER``, a plain client of the URL's node, for pub/sub (a
    cluster delivers a message published on any node to subscribers on every node).
    """
    read_timeout = settings.redis_timeout if timeout == "default" else timeout
    # A shorter timeout (MW_ACCESS_TIMEOUT) bounds connecting and waiting for a connection too:
    # an unreachable host must not hold a request longer than a slow answer would.
    wait = (
        settings.redis_timeout
        if read_timeout is None
        else min(read_timeout, settings.redis_timeout)
    )
    if settings.redis_cluster and not one_node:
        # Redis Cluster: the client follows MOVED/ASK itself; it never retries on its own.
        cluster = RedisCluster.from_url(
            settings.redis_url,
            socket_timeout=read_timeout,
            socket_connect_timeout=wait,
            retry=Retry(NoBackoff(), 0),
            max_connections=MAX_CONNECTIONS,
        )
        return cast(Redis, cluster)  # the same command surface for everything meterwall sends
    # A blocking pool: when every connection is busy a caller waits (up to the timeout) for
    # one instead of failing at once, and the number of connections to Redis stays bounded.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=MAX_CONNECTIONS,
        timeout=wait,
        socket_timeout=read_timeout,
        socket_connect_timeout=wait,
        retry=Retry(NoBackoff(), 0),  # zero retries: a timed-out command is never re-sent
    )
    return Redis.from_pool(pool)  # the client owns the pool and closes it with itself


async def server_run_id(redis: Redis) -> str:
    """Changes when Redis restarts: whatever it held only in memory may be gone."""
    info = await redis.info("server")
    return str(info.get("run_id", ""))


async def eviction_policy(redis: Redis) -> str | None:
    """Redis's maxmemory-policy, or None where CONFIG is not allowed (managed services)."""
    try:
        policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy")
    except ResponseError:
        return None
    return policy.decode() if isinstance(policy, bytes) else policy


async def stored_shards(redis: Redis, keyspace: Keyspace) -> int | None:
    """The shard count this deployment recorded on first use (readers must use the same)."""
    stored = await redis.hget(keyspace.meta(), "shards")
    return None if stored is None else int(stored)


async def check_shards(redis: Redis, keyspace: Keyspace) -> None:
    """Record the shard count on first use; refuse to write under a different one."""
    await redis.hsetnx(keyspace.meta(), "shards", keyspace.shards)
    stored = await redis.hget(keyspace.meta(), "shards")
    if stored is not None and int(stored) != keyspace.shards:
        raise ConfigurationError(
            "MW_SHARDS",
            f"is {keyspace.shards} but this Redis was set up with {int(stored)}; "
            "every process of a deployment must use the same count",
        )


async def apply_batches(
    redis: Redis, keyspace: Keyspace, batches: dict[int, bytes]
) -> dict[int, Any]:
    """Send one script call per shard in one round trip; a reply or an exception per shard.

    Raises the connection error if the round trip itself failed (then nothing is known about
    which batches landed, and the caller re-sends all of them).
    """
    results = await _send(redis, keyspace, batches)
    missing = {s: batches[s] for s, r in results.items() if isinstance(r, NoScriptError)}
    if missing:  # a restarted or flushed Redis forgot the script: load it once, send again
        await redis.script_load(APPLY_SCRIPT)
        results.update(await _send(redis, keyspace, missing))
    return results


async def _send(redis: Redis, keyspace: Keyspace, batches: dict[int, bytes]) -> dict[int, Any]:
    if isinstance(redis, RedisCluster):  # scripts cannot be pipelined across cluster nodes
        shards = list(batches)
        calls = [redis.evalsha(APPLY_SHA, 1, keyspace.shard_prefix(s), batches[s]) for s in shards]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, RedisConnectionError | RedisTimeoutError | OSError):
                raise reply
        return dict(zip(shards, replies, strict=True))
    pipe = redis.pipeline(transaction=False)
    shards = list(batches)
    for shard in shards:
        pipe.evalsha(APPLY_SHA, 1, keyspace.shard_prefix(shard), batches[shard])
    replies = await pipe.execute(raise_on_error=False)
    return dict(zip(shards, replies, strict=True))
