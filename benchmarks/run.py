"""Orchestration of ``python -m benchmarks``: variants, servers, alternating rounds, figures."""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from meterwall.apikeys import ApiKey, KeyStore, new_key
from meterwall.embedded import EmbeddedRedis
from meterwall.keyspace import Keyspace
from meterwall.pseudonyms import derive
from meterwall.sealing import generate_keypair

from . import load, profiling, report
from .procs import (
    ROOT,
    Cores,
    Server,
    counted_requests,
    ledger_day_bytes,
    redis_stats,
    stored_records,
)

#: Variant 5's access settings: GET /ping (the readiness check) stays public, POST /echo needs a
#: key with the scope ``items:write``, and the plan's rate limit and quota are far from being hit.
ACCESS = {
    "MW_ACCESS": "keys",
    "MW_ACCESS_RULES": "/ping=public, POST /echo=items:write",
    "MW_PLANS": "bench: 1000000/s burst 1000000, 1000000000 requests/month",
    "MW_DEFAULT_PLAN": "bench",
}
KEY_PLAN, KEY_SCOPES = "bench", ("items:write",)

Keys = Sequence[tuple[str, str]]  # (key id, full key), one per consumer of load.CONSUMERS


@dataclass(frozen=True)
class Variant:
    key: str
    name: str
    factory: str
    env: dict[str, str] = field(default_factory=dict)
    redis: bool = False
    meterwall: bool = False
    api_keys: bool = False  # store the run's API keys in the variant's Redis before it starts


def sealed_env() -> dict[str, str]:
    """Variant 4's settings: a fresh record key pair (only its public half: the benchmark never
    opens a record), the consumer header and a fresh pseudonymisation secret."""
    _, public = generate_keypair()
    return {
        "MW_RECORD_PUBLIC_KEY": public,
        "MW_CONSUMER_HEADER": "X-Consumer",
        "MW_PSEUDONYM_SECRET": base64.b64encode(os.urandom(32)).decode(),
    }


def variants() -> list[Variant]:
    sealed = sealed_env()
    strategy = os.environ.get("BENCH_LIMITER", "fixed-window")  # read by apps.rate_limited
    return [
        Variant("1", "bare Starlette app", "bare"),
        Variant("2", "pure-ASGI no-op middleware", "noop"),
        Variant("3", "meterwall, metering only", "with_meterwall",
                {"MW_RECORDS": "off", "MW_CONSUMER_HEADER": "X-Consumer"}, redis=True,
                meterwall=True),
        Variant("4", "meterwall, metering + sealed records", "with_meterwall", sealed,
                redis=True, meterwall=True),
        Variant("5", "meterwall, everything on", "with_meterwall", {**sealed, **ACCESS},
                redis=True, meterwall=True, api_keys=True),
        Variant("6a", "BaseHTTPMiddleware + awaited XADD + HINCRBY", "basehttp_logger", redis=True),
        Variant("6b", f"limits rate limiter (Redis storage, {strategy})", "rate_limited",
                redis=True),
        Variant("6c", "starlette-exporter Prometheus metrics (in memory)",
                "prometheus_exporter"),
    ]  # fmt: skip


def make_keys() -> list[tuple[str, str]]:
    """One real meterwall key per consumer of the load generators, made once per run."""
    return [new_key() for _ in load.CONSUMERS]


def store_keys(url: str, secret_b64: str, keys: Keys) -> None:
    """Store ``keys`` in the Redis at ``url`` as meterwall's ``KeyStore`` does, so they verify.

    The digest is ``HMAC-SHA256(derive(secret, "api-keys"), full key)`` with the variant's own
    ``MW_PSEUDONYM_SECRET``; each key belongs to the consumer the load generator names for it.
    """
    store_key = derive(base64.b64decode(secret_b64), "api-keys")
    now = int(time.time())

    async def save() -> None:
        async with AsyncRedis.from_url(url) as client:
            store = KeyStore(client, Keyspace("mw", 16), store_key)
            for (key_id, full), consumer in zip(keys, load.CONSUMERS, strict=True):
                digest = store.digest(full)
                await store._save(ApiKey(key_id, consumer, digest, KEY_PLAN, KEY_SCOPES,
                                         created=now))  # fmt: skip

    asyncio.run(save())


def installed(*modules: str) -> bool:
    """Whether an optional alternative can run (located, not imported)."""
    return all(importlib.util.find_spec(module) is not None for module in modules)


@dataclass
class Target:
    """A running variant: its server, its Redis client (if any) and what was sent to it."""

    variant: Variant
    server: Server
    redis: Redis | None
    sent: int = 0  # requests the load generator completed, warm-up included
    max_cut: int = 0  # requests wrk may have cut in flight: one per connection per run


def drive(t: Target, args: argparse.Namespace, duration: float, conns: int) -> dict[str, Any]:
    """One load run from a separate process pinned away from the server."""
    cores = t.server.cores
    out = load.run_load(args.gen, t.server.port, args.path, conns, duration, ROOT,
                        sys.executable, cores.pin(cores.rest))  # fmt: skip
    t.sent += out["requests"]
    t.max_cut += conns
    time.sleep(args.settle)  # the flusher's last interval lands in this run's figures
    return out


def measure(t: Target, args: argparse.Namespace, duration: float, conns: int) -> dict[str, Any]:
    """One timed run, with the server's CPU and memory and the Redis work around it."""
    before = redis_stats(t.redis) if t.redis else None
    cpu0 = t.server.cpu_seconds()
    out = drive(t, args, duration, conns)
    cpu = t.server.cpu_seconds() - cpu0
    n = max(out["requests"], 1)
    row = {**out, "rps": out["requests"] / out["elapsed_s"], "cpu_us": cpu / n * 1e6,
           **t.server.memory_kib()}  # fmt: skip
    if t.redis is not None and before is not None:
        after = redis_stats(t.redis)
        calls = {k: v - before["calls"].get(k, 0) for k, v in after["calls"].items()}
        row["redis_calls"] = {k: v for k, v in calls.items() if v}
        row["redis_cmds"] = sum(calls.values()) / n
        row["redis_cpu_us"] = (after["cpu_s"] - before["cpu_s"]) / n * 1e6
        row["redis_used_memory"] = after["used_memory"]
        row["redis_mem_per_req"] = (after["used_memory"] - before["used_memory"]) / n
    return row


def start(
    v: Variant, args: argparse.Namespace, cores: Cores, stack: ExitStack, keys: Keys
) -> Target:
    env, client = dict(v.env), None
    if v.redis:  # each variant its own Redis: clean command statistics and memory
        redis = stack.enter_context(EmbeddedRedis())
        env["MW_REDIS_URL" if v.meterwall else "BENCH_REDIS_URL"] = redis.url
        client = stack.enter_context(Redis.from_url(redis.url))
        version = client.info("server")["redis_version"]
        args.redis_server = f"{os.path.basename(redis.binary)} {version}"
        if v.api_keys:
            store_keys(redis.url, v.env["MW_PSEUDONYM_SECRET"], keys)
    server = Server(v.factory, env, cores, args.http)
    stack.callback(server.stop)
    server.start()
    return Target(v, server, client, sent=server.pings)


def finish(t: Target) -> dict[str, Any]:
    """Stop the server (meterwall flushes at shutdown), then check what it left behind."""
    code, problems, benign = t.server.stop()
    check: dict[str, Any] = {"exit_code": code, "log_problems": problems[:10],
                             "client_disconnects": benign}  # fmt: skip
    if t.variant.meterwall and t.redis is not None:
        check.update(client_completed=t.sent, max_cut=t.max_cut,
                     meterwall_counted=counted_requests(t.redis),
                     records=(stored_records(t.redis)
                              if t.variant.env.get("MW_RECORDS") != "off" else None),
                     redis_used_memory=t.redis.info("memory")["used_memory"],
                     redis_keys=t.redis.dbsize(),
                     ledger=ledger_day_bytes(t.redis, load.CONSUMERS))  # fmt: skip
    return check


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = Cores.plan()
    if cores.rest is not None:
        os.sched_setaffinity(0, cores.rest)  # Redis and the clients inherit it
    auto = load.generator()
    args.gen = auto if args.generator == "auto" else args.generator
    args.redis_server = ""
    chosen = [v for v in variants() if v.key in args.variants]
    # Every variant sends the same requests: for 5 the bearer tokens are real keys (stored in its
    # Redis before it starts), for the others opaque tokens. The load generators read them from
    # the environment: wrk's script is built in this process, the asyncio client inherits it.
    keys = make_keys()
    os.environ[load.API_KEYS_ENV] = ",".join(full for _, full in keys)
    skipped: dict[str, str] = {}
    if "6b" in args.variants and not installed("limits", "coredis"):
        skipped["6b"] = "skipped: `pip install 'limits[async-redis]'` to run it"
    if "6c" in args.variants and not installed("starlette_exporter"):
        skipped["6c"] = "skipped: `pip install starlette-exporter` to run it"
    rounds: list[dict[str, Any]] = []
    load_avg = [os.getloadavg()]
    with ExitStack() as stack:
        targets = [start(v, args, cores, stack, keys) for v in chosen if v.key not in skipped]
        for t in targets:  # warm-up, discarded
            drive(t, args, args.warmup, args.connections)
        for phase, duration, conns, reps in args.phases:
            for rep in range(reps):
                # A B C, B C A, C A B, ...: alternating, and no variant always runs first
                for t in targets[rep % len(targets) :] + targets[: rep % len(targets)]:
                    row = measure(t, args, duration, conns)
                    rounds.append({"variant": t.variant.key, "phase": phase, "rep": rep, **row})
                    print(report.progress(t.variant, phase, rep, row), file=sys.stderr)
        load_avg.append(os.getloadavg())
        checks = {t.variant.key: finish(t) for t in targets}
        prof = profile(next((v for v in chosen if v.key == args.profile), None), args, cores,
                       keys)  # fmt: skip
    return {
        "args": {k: v for k, v in vars(args).items() if k not in ("phases", "gen")},
        "phases": args.phases, "generator": args.gen, "redis_server": args.redis_server,
        "cores": cores.describe(), "load_avg": load_avg,
        "variants": [report.variant_info(v) for v in chosen], "skipped": skipped,
        "rounds": rounds, "checks": checks, "profile": prof, "overhead": run_overhead(args),
    }  # fmt: skip


def profile(
    v: Variant | None, args: argparse.Namespace, cores: Cores, keys: Keys
) -> dict[str, Any]:
    """One more run of ``v`` under cProfile, on a fresh server and Redis (after the others)."""
    if v is None:
        return {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "server.prof")
        profiled = replace(v, factory="profiled", env={**v.env, "BENCH_PROFILE_OUT": out,
                           "BENCH_PROFILE_FACTORY": v.factory})  # fmt: skip
        t = start(profiled, args, cores, stack, keys)
        drive(t, args, args.warmup, args.connections)
        drive(t, args, args.duration, args.connections)
        t.server.stop()
        if not os.path.exists(out):
            return {"variant": v.key, "error": "the server wrote no profile"}
        return {"variant": v.key, **profiling.summarize(Path(out), t.sent)}


def run_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/overhead.py in its own process (it writes its own RESULTS.md section)."""
    if args.no_overhead:
        return {"skipped": True}
    cmd = [sys.executable, "-m", "benchmarks.overhead"]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--write"] if args.write else []
    allcpus = os.cpu_count() or 1
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, range(allcpus)),
    )
    shown = ["python", *cmd[1:]]
    return {
        "command": " ".join(shown),
        "exit_code": out.returncode,
        "text": out.stdout,
        "stderr": out.stderr[-2000:],
    }
