"""CPU cost per request that the meterwall middleware adds, everything on, in one process.

Why: meterwall promises "no Redis I/O on the request path" and a small, bounded CPU cost; the
issue's target is at most 18 µs of CPU added per request, all-in, on a 2-core machine. This
drives a trivial Starlette ``POST /echo`` (1 KiB JSON body with a ``password`` field) directly as
an ASGI callable, no server and no HTTP client, with and without the middleware, alternating in
the same run. "All-in" means each timed block of N requests ends with ``await flusher.flush()``,
so redaction, pseudonyms, sealing, packing and the Redis client's work in this process are
amortised into the per-request figure. The Redis server is another process: its CPU is reported
apart and not counted. See benchmarks/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meterwall import Meterwall, Secret, Settings
from meterwall.buffer import ByteBoundedQueue
from meterwall.capture import Captured, Exchange
from meterwall.clientip import TrustedProxies, canonical_ip
from meterwall.embedded import EmbeddedRedis
from meterwall.flusher import Flusher, queued_size, sealed_size
from meterwall.journal import FileJournal
from meterwall.metering import Meter
from meterwall.pseudonyms import HOUR
from meterwall.records import build_record
from meterwall.sealing import generate_keypair
from meterwall.types import ASGIApp, Message

TARGET_US = 18.0
RESULTS = Path(__file__).with_name("RESULTS.md")
RECORD_ID = bytes(16)  # the flusher numbers records; a fixed id is enough to time a stage
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
RUN_AS = ["python", *(["-m", "benchmarks.overhead"] if __spec__ else ["benchmarks/overhead.py"])]


async def echo(request: Request) -> JSONResponse:
    data = await request.json()
    return JSONResponse({"ok": True, "fields": len(data)})


def make_body() -> bytes:
    doc = {"username": "ada", "password": "correct horse battery staple", "note": ""}
    doc["note"] = "x" * (1024 - len(orjson.dumps(doc)))
    body = orjson.dumps(doc)
    assert len(body) == 1024
    return body


def make_scopes(body: bytes, count: int = 64) -> list[dict[str, Any]]:
    """Scope templates: 4 consumers, 64 client addresses behind a trusted proxy (127.0.0.1)."""
    scopes = []
    for k in range(count):
        headers = [
            (b"host", b"api.example.com"), (b"user-agent", b"bench/1.0"),
            (b"accept", b"application/json"), (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-consumer", ("acme", "globex", "initech", "umbrella")[k % 4].encode()),
            (b"x-forwarded-for", f"203.0.113.{k}".encode()),
            (b"authorization", f"Bearer sk_live_{k:04d}9f8e7d6c5b4a".encode()),
        ]  # fmt: skip
        scopes.append({
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/echo",
            "raw_path": b"/echo", "query_string": b"dry_run=1&api_key=sk_test_4eC39HqLyjWDarjtT1",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 40000 + k),
            "server": ("127.0.0.1", 8000),
        })  # fmt: skip
    return scopes


async def discard(message: Message) -> None:
    return None


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def run_requests(
    app: ASGIApp, scopes: list[dict[str, Any]], body: bytes, n: int, *, yield_each: bool
) -> None:
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    for i in range(n):
        scope = dict(scopes[i % len(scopes)])
        # fresh header tuples, as a server parses them: the garbage collector sees what it would
        scope["headers"] = [(name, value) for name, value in scope["headers"]]
        await app(scope, receive, discard)
        if yield_each:  # as under a server: the loop (and the flusher task) runs between requests
            await asyncio.sleep(0)


async def redis_stats(client: Redis) -> tuple[Counter[str], float]:
    """(calls per command but INFO, incl. those run inside scripts; server CPU seconds) so far."""
    cmds = await client.info("commandstats")
    cpu = await client.info("cpu")
    calls = Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in cmds.items()})
    del calls["info"]
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def time_us(fn: Callable[[], object], n: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of wall µs per call (perf_counter_ns over ``n`` calls)."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - t0) / n / 1000)
    return statistics.median(runs)


async def overhead(args: argparse.Namespace, settings: Settings, client: Redis) -> dict[str, Any]:
    """Alternating bare / meterwall blocks: CPU µs per request of each, Redis work per request."""
    body, scopes = make_body(), make_scopes(make_body())
    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    mw = Meterwall(app, settings=settings)
    cpu: dict[str, list[float]] = {"bare": [], "meterwall": []}
    cmds: Counter[str] = Counter()
    server_cpu = 0.0
    mw.flusher.start()  # what lifespan startup does: the flusher task runs from here on
    for rnd in range(args.rounds + 1):  # round 0 is a warm-up and is discarded
        for name, target in (("bare", app), ("meterwall", mw)):
            before = await redis_stats(client)
            gc.collect()  # each block starts from the same heap state (GC inside it counts)
            t0 = time.process_time_ns()
            await run_requests(target, scopes, body, args.n, yield_each=True)
            if target is mw:
                assert await mw.flusher.flush(), "flush left data behind"
            spent = time.process_time_ns() - t0
            after = await redis_stats(client)
            if rnd:
                cpu[name].append(spent / args.n / 1000)
                if target is mw:
                    cmds += after[0] - before[0]
                    server_cpu += after[1] - before[1]
    assert await mw.aclose(), "shutdown left data behind"
    health = mw.health()
    assert health["records_dropped"] == 0, health
    total = args.n * args.rounds
    stages = await stage_breakdown(args, app, mw.flusher, settings, scopes, body, client)
    return {"cpu": cpu, "cmds": {k: v / total for k, v in cmds.most_common()},
            "server_cpu_us": server_cpu / total * 1e6, "stages": stages}  # fmt: skip


async def stage_breakdown(
    args: argparse.Namespace, app: ASGIApp, fl: Flusher, settings: Settings,
    scopes: list[dict[str, Any]], body: bytes, client: Redis,
) -> list[tuple[str, float, str]]:  # fmt: skip
    """Median wall µs of each stage (single-threaded, no I/O unless said: close to CPU)."""
    # Request path: a second middleware whose flusher never runs (a pending future stands in for
    # its task, so submit() does not start one), with a journal of its own; its queue is
    # dropped after each block. A third one hands nothing to its flusher: capture alone.
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as journal_dir:
        journal = FileJournal(Path(journal_dir) / "journal", "probe")  # (a private parent)
        probe = Meterwall(app, settings=settings, journal=journal)
        probe.flusher._task = loop.create_future()  # type: ignore[assignment]
        capture = Meterwall(app, settings=settings)
        capture.flusher._task = loop.create_future()  # type: ignore[assignment]
        capture.flusher.submit = lambda ex: None  # type: ignore[method-assign]
        n = min(args.n, 2000)
        runs: dict[str, list[float]] = {"bare": [], "all": [], "capture": []}
        before = await redis_stats(client)
        for _ in range(max(args.rounds, 3)):
            for name, target in (("bare", app), ("all", probe), ("capture", capture)):
                t0 = time.perf_counter_ns()
                await run_requests(target, scopes, body, n, yield_each=False)
                runs[name].append((time.perf_counter_ns() - t0) / n / 1000)
            row = probe.flusher.inbox.take(len(probe.flusher.inbox))[-1]
            probe.flusher.meter.take()
        path_cmds = ((await redis_stats(client))[0] - before[0]).total()
        assert path_cmds == 0, f"{path_cmds} Redis commands on the request path"
        bare = statistics.median(runs["bare"])
        request_path = statistics.median(runs["all"]) - bare
        capture_only = statistics.median(runs["capture"]) - bare
        ex = Captured.from_row(row)
        delta = (ex.start_ns // 1_000_000_000, ex.consumer, ex.key_id, ex.route, ex.method,
                 ex.status, ex.ttfb_ns, ex.bytes_in, ex.bytes_out, ex.denied)  # fmt: skip
        meter, k = Meter(), 2000
        metering = time_us(lambda: meter.add(*delta), k)
        journaling = time_us(lambda: journal.delta(delta), k)
        journal.close(clean=True)
    exchange = Exchange(scopes[0], _no_receive, discard, settings.body_limit, ex.start_ns)
    exchange.body.append(body)
    exchange.bytes_in, exchange.status, exchange.route = len(body), 200, ex.route
    queue: ByteBoundedQueue[tuple[Any, ...]] = ByteBoundedQueue(settings.buffer_bytes)

    def enqueue() -> None:
        row = exchange.captured()
        queue.put(row, queued_size(row))
        if len(queue) >= k:
            queue.take(k)

    enqueuing = time_us(enqueue, k)

    # The flusher's per-record stages, on the last captured exchange (the main flusher, whose
    # epoch key for this hour is already agreed with Redis).
    red, tp = fl.redactor, settings.trusted_proxies
    fl._hour = ex.start_ns // 1_000_000_000 // HOUR
    headers, peer = ex.headers, ex.client[0]
    address = tp.resolve(peer, headers)
    assert address is not None, address
    assert address.startswith("203.0.113."), address
    ip16 = canonical_ip(address)
    assert ip16 is not None
    epoch = fl.pseudonyms.epoch(fl._hour)
    pseudonyms = epoch.pseudonyms(ip16)
    plain = build_record(ex, red, address, pseudonyms)
    assert b"correct horse" not in plain, "password not masked"
    assert b"sk_live" not in plain, "token not fingerprinted"
    ct, data = "application/json", ex.body

    def uncached() -> tuple[bytes, bytes]:
        epoch.cache.clear()
        return epoch.pseudonyms(ip16)

    stages = [
        ("request path: capture + meter + journal + enqueue (middleware minus bare app)",
         request_path, f"per request; {len(runs['all'])} alternating blocks of {n}; Redis "
         f"commands: {path_cmds}"),
        ("capture", capture_only, "the same, handing nothing on: exchange, receive and send "
         "wrappers, route template, consumer header"),
        ("meter", metering, "Meter.add: one row merged into the in-memory counters"),
        ("journal", journaling, "one counter delta appended to the journal file (a write call)"),
        ("enqueue", enqueuing, "the exchange as a plain tuple into the flusher's queue"),
        ("request path, the rest", request_path - capture_only - metering - journaling - enqueuing,
         "the request path minus the four above: submit's own work, and what the parts timed "
         "alone (hot, nothing kept) do not show: collecting the queued tuples, colder caches"),
        ("redact headers", time_us(lambda: red.headers(headers), k),
         "8 headers: Bearer fingerprint (HMAC), X-Forwarded-For pseudonym (cached)"),
        ("redact query", time_us(lambda: red.query(ex.query_string), k), "2 pairs"),
        ("redact body", time_us(lambda: red.body(ct, data, size=ex.bytes_in, truncated=False), k),
         "1 KiB JSON: parse, mask password"),
        ("resolve client + canonical_ip", time_us(
            lambda: canonical_ip(tp.resolve(peer, headers) or ""), k), "trusted proxy + XFF"),
        ("pseudonyms (cached)", time_us(lambda: epoch.pseudonyms(ip16), k), "dict hit"),
        ("pseudonyms (uncached)", time_us(uncached, k), "2 HMAC-SHA256"),
        ("build_record", time_us(lambda: build_record(ex, red, address,
         pseudonyms), k), "includes the three redactions above + orjson"),
        ("seal", time_us(lambda: fl.sealer.seal(plain, ex.start_ns, RECORD_ID), k),
         f"zstd (record codec 2) and AES-256-GCM of a {len(plain)} B record"),
        ("flusher _seal (all per-record work)", time_us(lambda: fl._seal(row), k),
         "resolve + pseudonyms + build_record + seal + index ids"),
    ]  # fmt: skip
    cpu_runs, wall_runs = [], []
    for _ in range(5):
        for _ in range(k):
            sealed = fl._seal(row)
            fl.outbox.put(sealed, sealed_size(sealed))
        t0, w0 = time.process_time_ns(), time.perf_counter_ns()
        assert await fl.flush()
        cpu_runs.append((time.process_time_ns() - t0) / k / 1000)
        wall_runs.append((time.perf_counter_ns() - w0) / k / 1000)
    await fl.aclose()
    stages += [
        ("flush, CPU in this process", statistics.median(cpu_runs),
         f"per record; msgpack + 1 EVALSHA round trip for {k} records (process_time)"),
        ("flush, wall", statistics.median(wall_runs),
         "per record; as above plus waiting for the Redis server to run the script"),
    ]  # fmt: skip
    return stages


def machine(server_version: str) -> list[str]:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [ln.partition(":")[2].strip() for ln in info if ln.startswith("model name")]
    model = names[0] if names else platform.processor() or "unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- machine: {platform.platform()}, CPU {model}, {os.cpu_count()} cores ({usable} usable)",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"Redis server {server_version}",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- command: `{shlex.join([*RUN_AS, *sys.argv[1:]])}`",
    ]


def report(args: argparse.Namespace, res: dict[str, Any], server_version: str) -> str:
    bare, wall = res["cpu"]["bare"], res["cpu"]["meterwall"]
    diffs = [m - b for b, m in zip(bare, wall, strict=True)]
    ratios = [m / b for b, m in zip(bare, wall, strict=True)]
    added, med = statistics.median(diffs), statistics.median
    verdict = "met" if added <= TARGET_US else "NOT met"
    lines = [
        *machine(server_version),
        f"- {args.rounds} measured rounds (+1 warm-up discarded) of {args.n} requests per variant",
        "",
        "| CPU per request (process_time) | median | min-max over rounds |",
        "|---|---:|---:|",
        f"| bare Starlette app | {med(bare):.1f} µs | {min(bare):.1f}-{max(bare):.1f} |",
        f"| with meterwall, all-in | {med(wall):.1f} µs | {min(wall):.1f}-{max(wall):.1f} |",
        f"| **added by meterwall** (paired per round) | **{added:.1f} µs** "
        f"| {min(diffs):.1f}-{max(diffs):.1f} |",
        f"| ratio meterwall / bare (paired per round) | {med(ratios):.2f}x "
        f"| {min(ratios):.2f}-{max(ratios):.2f} |",
        "",
        f"Target, at most {TARGET_US:g} µs CPU added per request: **{verdict}** (median "
        f"{added:.1f} µs; fastest meterwall round minus fastest bare round "
        f"{min(wall) - min(bare):.1f} µs; on this machine).",
        "",
        f"Redis per request, all-in (INFO commandstats; counts the commands the flush script "
        f"runs inside Redis): {sum(res['cmds'].values()):.3f} commands ("
        + ", ".join(f"{k} {v:.4g}" for k, v in res["cmds"].items())
        + "); round trips are the pipelined EVALSHAs, one per shard per flush; 0 on the request "
        f"path. Redis server CPU: {res['server_cpu_us']:.1f} µs per request (another process, "
        "not counted above).",
        "",
        "| stage (median µs, perf_counter) | µs | what it includes |",
        "|---|---:|---|",
        *(f"| {name} | {us:.2f} | {what} |" for name, us, what in res["stages"]),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_results(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    head, _, rest = old.partition(BEGIN)
    _, _, tail = rest.partition(END)
    RESULTS.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


async def main_async(args: argparse.Namespace) -> str:
    _, public = generate_keypair()
    async with EmbeddedRedis() as server:
        settings = Settings(
            redis_url=server.url, record_public_key=public, pseudonym_secret=Secret(os.urandom(32)),
            consumer_header="X-Consumer", trusted_proxies=TrustedProxies(["127.0.0.1"]),
        )  # fmt: skip
        client = Redis.from_url(server.url)
        try:
            info = await client.info("server")
            version = f"{Path(server.binary).name} {info['redis_version']}"
            return report(args, await overhead(args, settings, client), version)
        finally:
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=5000, help="requests per block (default 5000)")
    parser.add_argument("--rounds", type=int, default=9, help="measured rounds (default 9)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2000 requests")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.getLogger("meterwall").setLevel(logging.ERROR)  # not the start-up notes, twice
    if args.quick:
        args.n, args.rounds = 2000, 3
    text = asyncio.run(main_async(args))
    print(text, end="")
    if args.write:
        write_results(text)


if __name__ == "__main__":
    main()
