"""Incident tracing at scale: trace by IP, a subject export and the retention audit on a full day.

Targets of the tracing issue, with N records stored over 24 hours from M client addresses: a trace
by one IP (up to 1,000 matches) in under 1 s including opening the records; a subject export
(``SubjectRights.export(ip=...)``) in under 2 s; ``meterwall audit`` on that data set in under
30 s.

Run: ``python -m benchmarks.tracing [--records N] [--ips M] [--write]`` (defaults 1,000,000 records
and 50,000 addresses). It starts a private Redis (``EmbeddedRedis``), fills it through the real
middleware (a trivial ASGI app called in process, a ``FixedClock`` moved across the day, explicit
flushes), then times each operation 3 times. ``--write`` replaces its section of RESULTS.md. See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import datetime
import gc
import json
import logging
import os
import platform
import pstats
import random
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meterwall import Meterwall, Secret, Settings
from meterwall.clock import FixedClock
from meterwall.embedded import EmbeddedRedis
from meterwall.keyspace import TAG_IP, Keyspace, records_named, tag_range
from meterwall.reader import RecordReader
from meterwall.retention import Auditor, Check
from meterwall.sealing import generate_keypair, load_private_key
from meterwall.subjects import SubjectRights
from meterwall.tracing import Trace, TraceQuery, Tracer
from meterwall.types import Message, Receive, Scope, Send

from .procs import other_benchmarks
from .report import replace_section

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"  # the file .report.replace_section writes
BEGIN, END = "<!-- tracing:start -->", "<!-- tracing:end -->"
SECTION_TITLE = "## Incident tracing at scale: `python -m benchmarks.tracing`"
RUN_AS = ["python", *(["-m", "benchmarks.tracing"] if __spec__ else ["benchmarks/tracing.py"])]

NS = 1_000_000_000
DAY = 86_400
HOT_IP = "203.0.113.7"  # the traced client (documentation range)
PREFIX = "bench"
CONSUMERS = 500
REPS = 3
TARGETS = {"trace": 1.0, "export": 2.0, "audit": 30.0, "cli": 30.0}


# --- the app and its traffic ---------------------------------------------------------------------


class _Route:
    """What a Starlette router leaves in ``scope["route"]``: meterwall reads ``path`` from it."""

    __slots__ = ("endpoint", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.endpoint = path  # a Route (not a Mount) has an endpoint; its value is not read


ITEM, SEARCH, REVIEWS, ORDERS = (
    _Route("/items/{item_id}"),
    _Route("/search"),
    _Route("/items/{item_id}/reviews"),
    _Route("/orders"),
)
_JSON = [(b"content-type", b"application/json")]
_BODIES = {
    200: b'{"id":1234,"name":"widget","price":12.5,"stock":17,"tags":["blue","steel"]}',
    201: b'{"order":"ord_8f2a","status":"accepted"}',
    204: b"",
    404: b'{"detail":"not found"}',
    422: b'{"detail":"quantity must be positive"}',
    429: b'{"detail":"slow down"}',
    500: b'{"detail":"internal error"}',
}


async def api(scope: Scope, receive: Receive, send: Send) -> None:
    """The trivial app: reads a request body, names its route as Starlette would, answers JSON.

    The status comes from the request generator (``bench.status``), so the records carry a
    realistic mix of outcomes without any app logic.
    """
    if scope["method"] in ("POST", "PUT", "PATCH"):
        more = True
        while more:
            message = await receive()
            more = bool(message.get("more_body", False))
    scope["route"] = scope["bench.route"]
    status: int = scope["bench.status"]
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": _BODIES[status]})


async def _discard(message: Message) -> None:
    return None


class _Body:
    """``receive`` that hands the app one request body."""

    __slots__ = ("_message",)

    def __init__(self, body: bytes) -> None:
        self._message = {"type": "http.request", "body": body, "more_body": False}

    async def __call__(self) -> Message:
        return self._message


_EMPTY = _Body(b"")
_AGENTS = (
    b"python-requests/2.31.0",
    b"okhttp/4.12.0",
    b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/126.0 Safari/537.36",
    b"curl/8.5.0",
    b"acme-sdk-go/1.8.2",
)
_WORDS = ("blue widget", "steel", "gift card", "usb-c cable", "lamp", "desk", "red shoes")


@dataclass
class Client:
    """One client address and what its requests carry (its consumer, agent and token)."""

    ip: str
    headers: list[tuple[bytes, bytes]]


def make_clients(count: int, rng: random.Random) -> tuple[Client, list[Client]]:
    """The traced client and ``count - 1`` others: random IPv4 (90%) and IPv6 (10%) addresses.

    Each belongs to one of 500 consumers (every 20th address is anonymous: no consumer, no token).
    """
    seen = {HOT_IP}
    addresses = [HOT_IP]
    while len(addresses) < count:
        if rng.random() < 0.1:
            ip = (
                f"2001:db8:{rng.getrandbits(16):x}:{rng.getrandbits(16):x}::{rng.getrandbits(16):x}"
            )
        else:
            octets = (rng.randrange(1, 224), rng.randrange(256), rng.randrange(256))
            ip = "{}.{}.{}.".format(*octets) + str(rng.randrange(1, 255))
        if ip not in seen:
            seen.add(ip)
            addresses.append(ip)
    clients = []
    for n, ip in enumerate(addresses):
        headers = [(b"host", b"api.example.com"), (b"user-agent", _AGENTS[n % len(_AGENTS)]),
                   (b"accept", b"application/json")]  # fmt: skip
        if n % 20 != 1:  # the traced client (n = 0) has a consumer
            consumer = f"cust-{(n * 7919) % CONSUMERS:04d}"
            token = f"Bearer sk_live_{consumer}_{(n * 104729) % 10**8:08d}"
            headers += [(b"x-consumer", consumer.encode()), (b"authorization", token.encode())]
        clients.append(Client(ip, headers))
    return clients[0], clients[1:]


def make_request(client: Client, rng: random.Random) -> tuple[Scope, _Body]:
    """One request of a small shop API: mostly reads, some orders with a JSON body."""
    roll = rng.random()
    body, receive, query = b"", _EMPTY, b""
    headers = [*client.headers, (b"x-request-id", f"{rng.getrandbits(64):016x}".encode())]
    if roll < 0.55:
        method, route, item = "GET", ITEM, rng.randrange(1, 200_000)
        path = f"/items/{item}"
        query = b"fields=name,price" if roll < 0.15 else b""
        status = 404 if rng.random() < 0.05 else 200
    elif roll < 0.75:
        method, route, path, status = "GET", SEARCH, "/search", 200
        query = f"q={_WORDS[rng.randrange(len(_WORDS))]}&page={rng.randrange(1, 6)}".encode()
    elif roll < 0.85:
        method, route, status = "GET", REVIEWS, 200
        path = f"/items/{rng.randrange(1, 200_000)}/reviews"
    elif roll < 0.97:
        method, route, path = "POST", ORDERS, "/orders"
        body = orjson.dumps({
            "item_id": rng.randrange(1, 200_000), "quantity": rng.randrange(1, 5),
            "shipping": {"name": "Ada Lovelace", "street": "12 Analytical Row", "city": "London",
                         "postcode": "N1 7GU"},
            "payment_token": f"tok_{rng.getrandbits(64):016x}", "coupon": None,
        })  # fmt: skip
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]  # fmt: skip
        receive = _Body(body)
        status = 422 if rng.random() < 0.03 else 201
    else:
        method, route, status = "DELETE", ITEM, 204
        path = f"/items/{rng.randrange(1, 200_000)}"
    outcome = rng.random()
    if outcome < 0.01:
        status = 429
    elif outcome < 0.013:
        status = 500
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": method, "scheme": "https", "path": path, "raw_path": path.encode(),
        "query_string": query, "root_path": "", "headers": headers,
        "client": (client.ip, rng.randrange(1024, 65536)), "server": ("api.example.com", 443),
        "bench.route": route, "bench.status": status,
    }  # fmt: skip
    return scope, receive


# --- filling -------------------------------------------------------------------------------------


@dataclass
class Fill:
    records: int
    hot: int
    seconds: float
    cpu_seconds: float
    first_ns: int
    last_ns: int
    per_flush: int
    flushes: int
    health: dict[str, Any] = field(default_factory=dict)


async def fill(args: argparse.Namespace, settings: Settings) -> Fill:
    """Send N requests through the middleware, their times spread evenly over the span."""
    rng = random.Random(args.seed)
    hot_client, others = make_clients(args.ips, rng)
    n, hot = args.records, min(args.hot, args.records // 10)
    end_ns = time.time_ns()  # the real time when filling starts: no record lies in the future
    span_ns = int((DAY - args.margin * 60) * NS)
    step = span_ns // n
    first_ns = end_ns - step * (n - 1)
    hot_every = n // hot
    clock = FixedClock(first_ns)
    mw = Meterwall(api, settings=settings, clock=clock)
    report_every = max(n // 20, 1)
    flushes = sent_hot = 0
    t0, c0 = time.perf_counter(), time.process_time()
    print(f"filling {n:,} records from {args.ips:,} addresses ({hot:,} from {HOT_IP}), "
          f"{args.per_flush} per flush ...", flush=True)  # fmt: skip
    for i in range(n):
        clock.set(first_ns + i * step)
        if i % hot_every == hot_every // 2 and sent_hot < hot:
            client = hot_client
            sent_hot += 1
        else:
            client = others[rng.randrange(len(others))]
        scope, receive = make_request(client, rng)
        await mw(scope, receive, _discard)
        if (i + 1) % args.per_flush == 0:
            flushes += 1
            if not await mw.flusher.flush_once():
                assert await mw.flusher.flush(30), f"flush failed: {mw.flusher.last_error}"
        if (i + 1) % report_every == 0 or i + 1 == n:
            elapsed = time.perf_counter() - t0
            rate = (i + 1) / elapsed
            eta = (n - i - 1) / rate
            print(f"  {i + 1:>10,} / {n:,} ({(i + 1) / n:4.0%}) in {elapsed:6.1f} s, "
                  f"{rate:7,.0f} records/s, ETA {eta:5.0f} s", flush=True)  # fmt: skip
    assert await mw.aclose(30), f"shutdown left data behind: {mw.flusher.last_error}"
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert sent_hot == hot, (sent_hot, hot)
    return Fill(n, hot, seconds, cpu, first_ns, first_ns + step * (n - 1), args.per_flush,
                flushes, mw.health())  # fmt: skip


# --- what is stored ------------------------------------------------------------------------------


@dataclass
class Stored:
    records: int  # records an address index member names (every record here has an address)
    entries: int  # stream entries (one per shard, slice and flush)
    slices: int  # record streams (one per shard and 5-minute slice)
    stream_bytes: int  # MEMORY USAGE of the record streams
    index_bytes: int  # MEMORY USAGE of the slice indexes
    other_bytes: int  # MEMORY USAGE of every other key of the deployment
    keys: int
    stats: dict[str, int]


async def stored(redis: Any, keyspace: Keyspace) -> Stored:
    """Records held, counted without opening any: the positions the address members of each
    slice index name (a member names every record of its entry from that address)."""
    names: list[tuple[int, int]] = []
    for shard in range(keyspace.shards):
        names += [(shard, int(s)) for s in await redis.zrange(keyspace.slices(shard), 0, -1)]
    async with redis.pipeline(transaction=False) as pipe:
        for shard, start in names:
            pipe.zrangebylex(keyspace.index(shard, start), *tag_range(TAG_IP))
            pipe.xlen(keyspace.records(shard, start))
        replies = await pipe.execute()
    named = [sum(records_named(m) for m in members) for members in replies[0::2]]
    # What each kind of key takes, as Redis's allocator sees it (MEMORY USAGE, every element).
    keys = [k async for k in redis.scan_iter(match=keyspace.pattern(), count=1000)]
    async with redis.pipeline(transaction=False) as pipe:
        for name in keys:
            pipe.memory_usage(name, samples=0)
        sizes = await pipe.execute()
    by_kind = {"rec": 0, "ix": 0, "other": 0}
    for name, size in zip(keys, sizes, strict=True):
        kind = name.decode().split(":")[2] if b":{s" in name else "other"
        by_kind[kind if kind in by_kind else "other"] += size or 0
    stats: dict[str, int] = {}
    for shard in range(keyspace.shards):
        for name, value in (await redis.hgetall(keyspace.stats(shard))).items():
            stats[name.decode()] = stats.get(name.decode(), 0) + int(value)
    return Stored(
        records=sum(named), entries=sum(replies[1::2]), slices=len(names),
        stream_bytes=by_kind["rec"], index_bytes=by_kind["ix"], other_bytes=by_kind["other"],
        keys=len(keys), stats=stats,
    )  # fmt: skip


async def used_memory(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


# --- the operations ------------------------------------------------------------------------------


@dataclass
class Timed:
    name: str
    target: float
    runs: list[float]
    note: str = ""
    profile: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def met(self) -> bool:
        return self.median < self.target and max(self.runs) < self.target


async def timed(name: str, op: Callable[[], Awaitable[Any]]) -> tuple[list[float], Any]:
    runs, result = [], None
    for rep in range(REPS):
        gc.collect()
        t0 = time.perf_counter()
        result = await op()
        runs.append(time.perf_counter() - t0)
        print(f"  {name} run {rep + 1}: {runs[-1]:.3f} s", flush=True)
    return runs, result


@dataclass
class TraceDetail:
    locate_s: float
    slices: int
    lookups: int
    hits: int
    entries: int
    entry_bytes: int


async def trace_detail(redis: Any, settings: Settings, key: X25519PrivateKey) -> TraceDetail:
    """Where a trace's time goes: ``locate`` alone, and what ``_open`` then reads."""
    tracer = Tracer(redis, settings, key, actor="bench")
    t0 = time.perf_counter()
    found = await tracer.locate(TraceQuery(ip=HOT_IP))
    locate_s = time.perf_counter() - t0
    keyspace = settings.keyspace()
    entries = sorted({(h.shard, h.slice, h.entry) for h in found.hits})
    async with redis.pipeline(transaction=False) as pipe:
        for shard, start, entry in entries:
            pipe.xrange(keyspace.records(shard, start), entry, entry)
        rows = await pipe.execute()
    size = sum(len(r[0][1][b"r"]) for r in rows if r)
    # One ZRANGEBYLEX per searched slice and live epoch key of its hour (one key per hour here).
    return TraceDetail(locate_s, found.slices_searched, found.slices_searched, len(found.hits),
                       len(entries), size)  # fmt: skip


def cli_env(url: str, settings: Settings, pem_path: str) -> dict[str, str]:
    assert settings.pseudonym_secret is not None
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    secret = base64.urlsafe_b64encode(settings.pseudonym_secret.reveal()).decode()
    return {**clean, "MW_REDIS_URL": url, "MW_KEY_PREFIX": PREFIX, "MW_PSEUDONYM_SECRET": secret,
            "MW_RECORD_PRIVATE_KEY_FILE": pem_path}  # fmt: skip


def run_cli(env: dict[str, str], fmt: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    done = subprocess.run(  # our own interpreter and module, no shell
        [sys.executable, "-m", "meterwall", "audit", "--format", fmt],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    return time.perf_counter() - t0, done


async def profile(op: Callable[[], Awaitable[Any]], top: int = 12) -> list[str]:
    """One more run under cProfile: Markdown rows of the functions with the most self time."""
    prof = cProfile.Profile()
    prof.enable()
    await op()
    prof.disable()
    stats = pstats.Stats(prof)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in raw.values()) or 1.0
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = ["Top functions by self time:", "",
             "| function | calls | self s | cumulative s | share of self time |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for (path, line, name), (_, calls, tt, ct, _) in rows:
        where = f"{_short(path)}:{line}({name})" if line else name
        lines.append(f"| `{where}` | {calls} | {tt:.2f} | {ct:.2f} | {tt / total:.0%} |")
    ours = [item for item in raw.items() if f"{os.sep}meterwall{os.sep}" in item[0][0]]
    ours.sort(key=lambda item: item[1][3], reverse=True)
    lines += ["", "meterwall's functions by cumulative time (a coroutine's resumptions count as "
              "calls):", "", "| function | calls | cumulative s | share of the run |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for (path, line, name), (_, calls, _, ct, _) in ours[: top - 4]:
        lines.append(f"| `{_short(path)}:{line}({name})` | {calls} | {ct:.2f} | {ct / total:.0%} |")
    return lines


def _short(path: str) -> str:
    parts = Path(path).parts
    for anchor in ("meterwall", "redis", "asyncio", "cryptography", "benchmarks"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return Path(path).name


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    fill: Fill
    before: Stored
    after: Stored
    memory_before: int
    memory_after: int
    server: str
    ops: list[Timed]
    detail: TraceDetail
    checks: list[Check]
    cli_ok: str
    cli_rss_mib: float
    table_s: float | None
    wall_s: float
    code: tuple[str, str] = ("", "")  # at the start and at the end of the run


async def measure(args: argparse.Namespace, url: str, binary: str) -> Outcome:
    started = time.perf_counter()
    pem, public = generate_keypair()
    key = load_private_key(pem)
    settings = Settings(
        redis_url=url, key_prefix=PREFIX, record_public_key=public,
        pseudonym_secret=Secret(os.urandom(32)), flush_interval=60.0,
        consumer_header="X-Consumer",
    )  # fmt: skip
    redis = aioredis.Redis.from_url(url)
    try:
        info = await redis.info("server")
        server = f"{Path(binary).name} {info['redis_version']}"
        memory_before = await used_memory(redis)
        filled = await fill(args, settings)
        gc.collect()
        memory_after = await used_memory(redis)
        keyspace = settings.keyspace()
        before = await stored(redis, keyspace)
        mib = memory_after / 2**20
        print(f"stored: {before.records:,} records in {before.entries:,} stream entries over "
              f"{before.slices:,} slices; used_memory {mib:,.1f} MiB", flush=True)  # fmt: skip
        ops: list[Timed] = []

        async def trace() -> Trace:
            return await Tracer(redis, settings, key, actor="bench").trace(TraceQuery(ip=HOT_IP))

        runs, found = await timed("trace", trace)
        assert len(found.records) == filled.hot, (len(found.records), filled.hot)
        ops.append(Timed(f"trace by IP ({len(found.records):,} records found and opened)",
                         TARGETS["trace"], runs))  # fmt: skip
        detail = await trace_detail(redis, settings, key)

        async def export() -> dict[str, Any]:
            return await SubjectRights(redis, settings, key, actor="bench").export(ip=HOT_IP)

        runs, bundle = await timed("export", export)
        assert len(bundle["records"]) == filled.hot, len(bundle["records"])
        ops.append(Timed(f"subject export by IP ({len(bundle['records']):,} records)",
                         TARGETS["export"], runs))  # fmt: skip

        async def audit() -> list[Check]:
            reader = RecordReader(redis, settings, key)
            auditor = Auditor(redis, keyspace, reader=reader, settings=settings)
            return await auditor.run()

        runs, checks = await timed("audit", audit)
        ops.append(Timed("`Auditor.run()` in process, with the private key", TARGETS["audit"],
                         runs))  # fmt: skip

        fd, pem_path = tempfile.mkstemp(prefix="meterwall-bench-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(pem)
            env = cli_env(url, settings, pem_path)
            cli_runs, cli_ok = [], ""
            for rep in range(REPS):
                seconds, done = run_cli(env, "json")
                cli_runs.append(seconds)
                print(f"  cli run {rep + 1}: {seconds:.3f} s (exit {done.returncode})", flush=True)
                try:
                    report = json.loads(done.stdout)
                    cli_ok = (
                        "ok"
                        if report["ok"]
                        else "FAILED: "
                        + ", ".join(c["name"] for c in report["checks"] if not c["ok"])
                    )
                except (ValueError, KeyError):
                    cli_ok = (
                        f"no JSON report (exit {done.returncode}): {done.stderr.strip()[-300:]}"
                    )
            ops.append(Timed("`meterwall audit --format json` (subprocess, private key file)",
                             TARGETS["cli"], cli_runs))  # fmt: skip
            table_s = None
            if args.table:
                table_s, done = run_cli(env, "table")
                print(f"  cli (table format) run: {table_s:.3f} s (exit {done.returncode})")
        finally:
            os.unlink(pem_path)
        # Linux: KiB; the largest child waited for so far (the CLI runs; Redis still runs).
        cli_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

        for op, fn in zip(ops[:3], (trace, export, audit), strict=True):
            if not op.met and args.profile:
                print(f"profiling: {op.name} ...", flush=True)
                op.profile = await profile(fn)
        after = await stored(redis, keyspace)
        wall = time.perf_counter() - started
        return Outcome(filled, before, after, memory_before, memory_after, server, ops, detail,
                       checks, cli_ok, cli_rss_mib, table_s, wall)  # fmt: skip
    finally:
        await redis.aclose()


# --- the report ----------------------------------------------------------------------------------


def code_state() -> str:
    """The meterwall code measured: HEAD and any uncommitted change under meterwall/."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()  # fmt: skip
        status = ["git", "status", "--porcelain", "--", "meterwall"]
        dirty = subprocess.run(status, cwd=ROOT, text=True, capture_output=True,
                               check=True).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"commit {head}" + (
        f" with uncommitted changes in {', '.join(changed)}" if changed else ""
    )


def machine() -> list[str]:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [ln.partition(":")[2].strip() for ln in info if ln.startswith("model name")]
    model = names[0] if names else platform.processor() or "unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [
        f"- machine: {platform.platform()}, CPU {model}, {os.cpu_count()} cores ({usable} usable); "
        f"load average (1 min) at the end {load:.2f}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- command: `{shlex.join([*RUN_AS, *sys.argv[1:]])}`",
    ]


def _iso(time_ns: int) -> str:
    return datetime.datetime.fromtimestamp(time_ns / NS, datetime.UTC).strftime("%H:%M:%S")


def report(args: argparse.Namespace, out: Outcome) -> str:
    f, s = out.fill, out.before
    grown = out.memory_after - out.memory_before
    span_h = (f.last_ns - f.first_ns) / NS / 3600
    verdict = {True: "**met**", False: "**NOT met**"}
    lines = [
        *machine(),
        f"- meterwall: {out.code[0]}"
        + ("" if out.code[0] == out.code[1] else f" (**changed during the run**: {out.code[1]})"),
        f"- Redis: {out.server}, private (`EmbeddedRedis`, persistence off), 16 shards",
        f"- data set: {f.records:,} sealed records from {args.ips:,} client addresses (10% "
        f"IPv6; {CONSUMERS} consumers, every 20th address anonymous), one every "
        f"{(f.last_ns - f.first_ns) / max(f.records - 1, 1) / NS * 1000:.0f} ms of simulated "
        f"time over the {span_h:.2f} h before the run started (the last 24 h less a "
        f"{args.margin:g}-minute margin, so that no record expires while it is measured); the "
        f"traced address {HOT_IP} made {f.hot:,} of them, evenly spread",
        "- traffic: a small shop API through `Meterwall` (records sealed, `MW_CONSUMER_HEADER`): "
        "55% `GET /items/{item_id}`, 20% `GET /search?q=...`, 10% reviews, 12% `POST /orders` "
        "(~230 B JSON body), 3% `DELETE`; 1% 429, 0.3% 500",
        f"- filling: {f.seconds:.0f} s ({f.records / f.seconds:,.0f} records/s, "
        f"{f.cpu_seconds:.0f} s CPU in this process), {f.per_flush} records per flush "
        f"({f.flushes:,} flushes; at this rate a 100 ms flush would carry "
        f"{f.records / ((f.last_ns - f.first_ns) / NS) * 0.1:.2f}): {s.entries:,} stream entries, "
        f"{s.records / max(s.entries, 1):.2f} records per entry, {s.slices:,} slices; "
        f"records dropped {f.health.get('records_dropped')}, "
        f"expired before store {s.stats.get('records_expired_before_store', 0)}",
        f"- Redis used_memory: {out.memory_after / 2**20:,.1f} MiB after filling "
        f"({out.memory_before / 2**20:.1f} MiB empty): **{grown / f.records:,.0f} B per record**, "
        f"all keys included; by MEMORY USAGE of each of the {s.keys:,} keys: record streams "
        f"{s.stream_bytes / f.records:,.0f} B, slice indexes {s.index_bytes / f.records:,.0f} B, "
        f"other keys {s.other_bytes / f.records:,.0f} B per record (counters, unique-client "
        f"counts, data and epoch keys)",
        f"- records held after measuring: {out.after.records:,} of {f.records:,}; whole run "
        f"{out.wall_s / 60:.1f} min",
        "",
        f"| operation ({REPS} runs each) | target | median | max | result |",
        "|---|---:|---:|---:|---|",
    ]
    for op in out.ops:
        lines.append(f"| {op.name} | < {op.target:g} s | {op.median:.3f} s | {max(op.runs):.3f} s "
                     f"| {verdict[op.met]} |")  # fmt: skip
    d = out.detail
    trace_med = out.ops[0].median
    lines += [
        "",
        f"- trace by IP: `locate` (index search) {d.locate_s:.3f} s: {d.slices:,} slices searched "
        f"with {d.lookups:,} `ZRANGEBYLEX` in 16 pipelines; opening (`_open`) about "
        f"{max(trace_med - d.locate_s, 0):.3f} s: {d.entries:,} stream entries read for "
        f"{d.hits:,} hits ({d.entry_bytes / 2**20:.2f} MiB), {d.hits:,} records decrypted",
        "- audit checks (in process): "
        + ", ".join(f"{c.name} {'pass' if c.ok else 'FAIL'}" for c in out.checks)
        + f"; CLI report: {out.cli_ok}, peak RSS of the CLI process {out.cli_rss_mib:,.0f} MiB. "
        + "; ".join(c.detail for c in out.checks if c.name in ("expiry", "plaintext", "index")),
    ]
    if out.table_s is not None:
        lines.append(f"- `meterwall audit` (table format, progress bar to a pipe, once): "
                     f"{out.table_s:.3f} s")  # fmt: skip
    for op in out.ops:
        if op.profile:
            lines += ["", f"Profile of one more run of {op.name} (cProfile; the profiler "
                      "inflates Python calls, read the shares):", "", *op.profile]  # fmt: skip
    missed = [op.name for op in out.ops if not op.met]
    lines += ["", "Verdict: " + ("every target met." if not missed else
                                 "NOT met: " + "; ".join(missed) + ".")]  # fmt: skip
    return "\n".join(lines) + "\n"


# --- RESULTS.md ----------------------------------------------------------------------------------


def wait_for_other_writers(limit_s: float = 3600) -> None:
    deadline = time.monotonic() + limit_s
    while busy := other_benchmarks():
        if time.monotonic() > deadline:
            raise SystemExit(f"still running after {limit_s:.0f} s, not writing: {busy}")
        print(f"waiting for another benchmark writing RESULTS.md: {busy}", flush=True)
        time.sleep(15)


def write_results(text: str) -> None:
    """Replace this command's section of RESULTS.md, once no other benchmark writes it."""
    wait_for_other_writers()
    replace_section(BEGIN, END, text, SECTION_TITLE)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=" ".join(RUN_AS), description=__doc__.split("\n", 1)[0] if __doc__ else None
    )
    parser.add_argument("--records", type=int, default=1_000_000, help="records (1,000,000)")
    parser.add_argument("--ips", type=int, default=50_000, help="client addresses (50,000)")
    parser.add_argument("--hot", type=int, default=1000, help="records of the traced IP (1,000)")
    parser.add_argument(
        "--per-flush", type=int, default=8,
        help="records per flush while filling (8): sets how many records share a stream entry",
    )  # fmt: skip
    parser.add_argument(
        "--margin", type=float, default=40,
        help="minutes left out of the 24 h so nothing expires during the run (40)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="do not profile the operations that miss their target")  # fmt: skip
    parser.add_argument("--table", action="store_true",
                        help="also time `meterwall audit` once in table format")  # fmt: skip
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.records < 20 or args.ips < 2 or args.per_flush < 1:
        parser.error("need --records >= 20, --ips >= 2 and --per-flush >= 1")
    logging.getLogger("meterwall").setLevel(logging.ERROR)  # not the start-up notes
    code_at_start = code_state()
    # SIGTERM unwinds like Ctrl-C, so the private Redis is stopped, never left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with EmbeddedRedis() as server:
        outcome = asyncio.run(measure(args, server.url, server.binary))
    outcome.code = (code_at_start, code_state())
    text = report(args, outcome)
    print()
    print(text, end="")
    if args.write:
        write_results(text)
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
