"""``python -m benchmarks.reliability``: what a Redis outage, a slow Redis and long streams cost.

Four figures that tests cannot assert (they need minutes, rates and memory of a real server),
each measured on single-worker uvicorn servers started as ``python -m benchmarks`` starts them,
meterwall configured as its variant 4 (metering + sealed records, ``X-Consumer``):

1. outage: a paced 1,000 requests/s from 200 consumers while Redis (AOF ``everysec``) is
   SIGKILLed, kept down for 2 minutes and restarted: errors, server RSS, time until Redis holds
   every count again, exact counts, records kept and dropped;
2. slow Redis: every Redis reply 200 ms late (``tests.faults.FaultProxy``, ``reply_delay_s``):
   the request latency against the same server on a direct Redis, alternating, for variant 4
   and variant 5 (access control with API keys, rate limit and quota);
3. SSE: time to the first Server-Sent Event, bare app against the app with meterwall;
4. a 1 GiB download in 64 KiB chunks: the server's RSS growth, bare and with meterwall.

``--quick`` shortens everything (a 15 s outage); ``--write`` replaces this command's section of
RESULTS.md and writes reliability.json. See benchmarks/README.md and docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from redis import Redis
from redis.exceptions import RedisError

from meterwall.embedded import EmbeddedRedis
from tests.faults import FaultProxy, Faults

from . import load, report
from .aiohttp_bench import code_version, wait_for_others
from .procs import ROOT, Cores, Server, counted_requests, other_benchmarks
from .run import make_keys, store_keys, variants
from .soak import Sampler

HERE = Path(__file__).parent
RESULTS_JSON = HERE / "reliability.json"
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
TITLE = "## Reliability under faults: `python -m benchmarks.reliability`"
RUN_AS = ("python", "-m", "benchmarks.reliability")
PARTS = ("outage", "slow", "sse", "download")
AOF = ["--appendonly", "yes", "--appendfsync", "everysec"]

RATE = 1000.0  # requests per second, paced (open loop)
OUTAGE_CONSUMERS = 200
OUTAGE_CONNECTIONS = 16
SLOW_CONNECTIONS = 4
REPLY_DELAY_S = 0.2
# Variant 5's plan (run.ACCESS) cut in two, to tell which lease makes requests wait.
QUOTA_ONLY = "bench: 1000000000 requests/month"
RATE_ONLY = "bench: 1000000/s burst 1000000"
DOWNLOAD_BYTES = 1 << 30
SSE_WARMUP = 10  # first events per app before the measured ones
POLL_S = 0.25  # how often Redis's counters are read after the restart
RECORDS_POLL_S = 1.0
SERIES_S = 15.0  # the report's RSS series: one value every 15 s
EARLY_S = 3  # the first seconds of a run, where a lease still grows after a pause

# The targets.
GROWTH_TARGET_MB = 50.0
DRAIN_TARGET_S = 60.0
P99_ADDED_TARGET_MS = 2.0
SSE_ADDED_TARGET_MS = 10.0
DOWNLOAD_TARGET_MIB = 16.0

# Sums the ``n`` (records) of a stream's entries after ARGV[1] (exclusive; "-": from the
# start), at most ARGV[2] entries: the records Redis holds, counted inside Redis so that the
# sealed blobs never cross the wire. Returns {records, entries, last id}.
_COUNT_RECORDS = """
local start = ARGV[1] == '-' and '-' or '(' .. ARGV[1]
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', tonumber(ARGV[2]))
local records, last = 0, ARGV[1]
for _, e in ipairs(entries) do
  last = e[1]
  local f = e[2]
  for i = 1, #f, 2 do
    if f[i] == 'n' then records = records + tonumber(f[i + 1]) end
  end
end
return {records, #entries, last}
"""


@dataclass(frozen=True)
class Plan:
    """Durations of one run (``--quick`` or full)."""

    before_s: float  # paced load before Redis is killed (the server's RSS settles)
    outage_s: float  # Redis down
    after_s: float  # paced load after the restart
    drain_wait_s: float  # after the load, how long to wait for the last counts
    slow_reps: int
    slow_run_s: float
    warmup_s: float
    sse_pairs: int
    downloads: int

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls(10.0, 15.0, 20.0, 30.0, 3, 4.0, 2.0, 100, 1)
        return cls(45.0, 120.0, 75.0, 60.0, 5, 12.0, 3.0, 500, 3)


# --- helpers ----------------------------------------------------------------------------------


def sealed_env() -> dict[str, dict[str, str]]:
    """The ``MW_*`` settings of ``python -m benchmarks``'s variants 4 and 5 (fresh keys)."""
    return {v.key: dict(v.env) for v in variants() if v.key in ("4", "5")}


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (``clear_refs`` 5), so that the next peak
    belongs to what follows; False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def mib(kib: int) -> float:
    return kib / 1024


@dataclass
class Paced:
    """A running benchmarks/paced.py. Its output goes to a file, not a pipe: a long run prints
    more than a pipe holds, and a client blocked on a full pipe never exits."""

    proc: subprocess.Popen[bytes]
    out: IO[bytes]
    err: IO[bytes]

    @classmethod
    def start(cls, port: int, cores: Cores, duration: float, connections: int,
              consumers: int) -> Paced:  # fmt: skip
        """At ``RATE`` requests/s, pinned away from the server's core."""
        cmd = [sys.executable, "-m", "benchmarks.paced", "--port", str(port), "--rate",
               str(RATE), "--duration", str(duration), "--connections", str(connections),
               "--consumers", str(consumers)]  # fmt: skip
        # closed by result(), which reads them once the client has exited
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err,
                                preexec_fn=cores.pin(cores.rest))  # fmt: skip
        return cls(proc, out, err)

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self, timeout: float) -> dict[str, Any]:
        """Wait for the client (killed after ``timeout`` s) and read what it printed."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with self.out, self.err:
            self.out.seek(0)
            self.err.seek(0)
            text, err = self.out.read(), self.err.read()
        if self.proc.returncode != 0:
            why = err.decode(errors="replace")[-2000:]
            raise RuntimeError(f"the paced client failed ({self.proc.returncode}):\n{why}")
        result: dict[str, Any] = json.loads(text)
        return result


def paced_run(
    port: int, cores: Cores, duration: float, connections: int, consumers: int
) -> dict[str, Any]:
    """One paced run, waited for."""
    return Paced.start(port, cores, duration, connections, consumers).result(duration + 60)


def start_server(factory: str, env: dict[str, str], cores: Cores, stack: ExitStack) -> Server:
    server = Server(factory, env, cores)
    stack.callback(server.stop)
    return server.start()


def stop_server(server: Server) -> dict[str, Any]:
    code, problems, benign = server.stop()
    return {"exit_code": code, "log": problems[:12], "client_disconnects": benign}


def meterwall_env(env: dict[str, str], redis_url: str, journal: Path) -> dict[str, str]:
    return {**env, "MW_REDIS_URL": redis_url, "MW_JOURNAL_DIR": str(journal)}


# --- what Redis holds -------------------------------------------------------------------------


def counts_by_consumer(client: Redis, prefix: str = "mw") -> dict[str, int]:
    """Requests per consumer from the day hashes ``<prefix>:{sNN}:cd:<consumer>:<day>``."""
    sep = b"\x1f"  # meterwall.keyspace.SEP
    out: dict[str, int] = {}
    for key in client.scan_iter(match=f"{prefix}:*:cd:*", count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        consumer = name.partition(":cd:")[2].rpartition(":")[0]
        for name_, value in client.hgetall(key).items():
            raw = name_ if isinstance(name_, bytes) else str(name_).encode()
            if raw.rsplit(sep, 1)[-1] == b"requests":
                out[consumer] = out.get(consumer, 0) + int(value)
    return out


class RecordCount:
    """Sealed records in Redis (the ``n`` of each stream entry), read incrementally."""

    def __init__(self, prefix: str = "mw") -> None:
        self.prefix = prefix
        self.last: dict[bytes, bytes] = {}
        self.records = 0
        self.entries = 0

    def update(self, client: Redis) -> int:
        script = client.register_script(_COUNT_RECORDS)
        for key in client.scan_iter(match=f"{self.prefix}:*:rec:*", count=1000):
            while True:
                start = self.last.get(key, b"-")
                records, entries, last = script(keys=[key], args=[start, 500])
                self.records += int(records)
                self.entries += int(entries)
                self.last[key] = last
                if int(entries) < 500:
                    break
        return self.records


def records_dropped(client: Redis, prefix: str = "mw") -> int:
    """``records_dropped`` that the flushers reported into the shards' ``stats`` hashes."""
    total = 0
    for key in client.scan_iter(match=f"{prefix}:*:stats", count=1000):
        value = client.hget(key, "records_dropped")
        total += int(value) if value is not None else 0
    return total


# --- 1. outage --------------------------------------------------------------------------------


@dataclass
class Outage:
    """A Redis with AOF that can be SIGKILLed and restarted on the same port and files."""

    data: Path
    redis: EmbeddedRedis | None = None
    port: int | None = None

    def start(self) -> str:
        self.data.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis(port=self.port, data_dir=str(self.data), extra_args=AOF)
        self.redis.start()
        self.port = self.redis.port
        return self.redis.url

    def kill(self) -> None:
        if self.redis is not None:
            self.redis.kill()

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()


def _sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.monotonic()))


def _read_total(client: Redis, polls: list[tuple[float, int]]) -> None:
    """meterwall's request total now; nothing while Redis is still loading its AOF."""
    with suppress(RedisError, OSError):
        polls.append((time.monotonic(), counted_requests(client)))


def _read_records(client: Redis, records: RecordCount, polls: list[tuple[float, int, int]]) -> None:
    """Records stored and records dropped (and counted) now; nothing while Redis loads."""
    with suppress(RedisError, OSError):
        polls.append((time.monotonic(), records.update(client), records_dropped(client)))


def answered_by(result: dict[str, Any], at: float) -> int:
    """Requests the paced client had got a 2xx answer for by monotonic time ``at``."""
    edge = (at - result["start_monotonic"]) / result["done_bin_s"]
    return sum(n for b, n in result["done_bins"] if b + 1 <= edge)


def first_at_least(polls: list[tuple[float, int]], after: float, target: int) -> float | None:
    return next((t for t, n in polls if t >= after and n >= target), None)


@dataclass
class Watch:
    """What the orchestrator reads from Redis after the restart, with the time of each read."""

    totals: list[tuple[float, int]] = field(default_factory=list)
    records: list[tuple[float, int, int]] = field(default_factory=list)  # (t, stored, dropped)
    count: RecordCount = field(default_factory=RecordCount)

    def while_running(self, client: Redis, paced: Paced) -> None:
        """Until the paced client ends: the request total every POLL_S, the records every
        RECORDS_POLL_S (they cost Redis a walk over the new stream entries)."""
        while paced.running():
            _read_total(client, self.totals)
            if not self.records or time.monotonic() - self.records[-1][0] >= RECORDS_POLL_S:
                _read_records(client, self.count, self.records)
            time.sleep(POLL_S)

    def until_total(self, client: Redis, wanted: int, wait_s: float) -> None:
        """After the load: until the total reaches ``wanted`` (or ``wait_s`` passes)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _read_total(client, self.totals)
            if self.totals and self.totals[-1][1] >= wanted:
                return
            time.sleep(POLL_S)


def _stop_sampler(sampler: Sampler) -> None:
    if sampler.is_alive():
        sampler.stop()


def _outage(redis: Outage, server: Server, plan: Plan, launched: float) -> dict[str, Any]:
    """At ``before_s``: SIGKILL Redis; ``outage_s`` later: restart it on the same files. The
    server's VmHWM is reset at the kill, so its peak from then on is the outage's."""
    _sleep_until(launched + plan.before_s)
    before = server.memory_kib()
    peak_reset = reset_peak(server.pid)
    killed = time.monotonic()
    redis.kill()
    print(f"  [outage] Redis SIGKILLed; down for {plan.outage_s:g} s", file=sys.stderr)
    _sleep_until(killed + plan.outage_s)
    at_restart = server.memory_kib()
    redis.start()
    print("  [outage] Redis restarted", file=sys.stderr)
    return {"before_kib": before, "peak_reset": peak_reset, "killed": killed,
            "at_restart_kib": at_restart, "restarted": time.monotonic()}  # fmt: skip


def run_outage(plan: Plan, cores: Cores, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    """Paced load from 200 consumers through a Redis outage, then a SIGTERM (final flush) and
    what Redis holds: totals, counts per consumer, records stored and dropped."""
    with ExitStack() as stack:
        redis = Outage(tmp / "redis-outage")
        stack.callback(redis.stop)
        url = redis.start()
        server = start_server("with_meterwall", meterwall_env(env, url, tmp / "journal-outage"),
                              cores, stack)  # fmt: skip
        sampler = Sampler(server, 0.5)
        sampler.start()
        stack.callback(_stop_sampler, sampler)  # on an error; after a run it has stopped
        duration = plan.before_s + plan.outage_s + plan.after_s
        launched = time.monotonic()
        paced = Paced.start(server.port, cores, duration, OUTAGE_CONNECTIONS, OUTAGE_CONSUMERS)
        events = _outage(redis, server, plan, launched)
        watch = Watch()
        with Redis.from_url(url) as client:
            watch.while_running(client, paced)
            result = paced.result(60)
            after = server.memory_kib()
            watch.until_total(client, result["answered"] + server.pings, plan.drain_wait_s)
            sampler.stop()
            last = server.memory_kib()  # VmHWM: the peak from the kill to here
            check = stop_server(server)  # SIGTERM: the final flush
            final = {"counted": counted_requests(client), "by_consumer": counts_by_consumer(client),
                     "records_stored": watch.count.update(client),
                     "records_dropped": records_dropped(client),
                     "aof_rewrites": int(client.info("persistence")["aof_rewrites"])}  # fmt: skip
    return {
        "plan": plan.__dict__, "launched": launched, **events, "after_kib": after,
        "last_kib": last,
        "samples": [(sampler.t0 + t, kib) for t, kib in sampler.samples], "polls": watch.totals,
        "record_polls": watch.records, "client": result, "pings": server.pings, "final": final,
        "server": check,
    }  # fmt: skip


def outage_figures(r: dict[str, Any]) -> dict[str, Any]:
    """Errors, RSS, drain time and exactness from one outage run."""
    c = r["client"]
    pings = r["pings"]
    before_restart = answered_by(c, r["restarted"]) + pings
    drained_at = first_at_least(r["polls"], r["restarted"], before_restart)
    records_at = next((t for t, stored, dropped in r["record_polls"]
                       if stored + dropped >= before_restart), None)  # fmt: skip
    during = [kib for t, kib in r["samples"] if t >= r["killed"]]
    peak_kib = r["last_kib"]["VmHWM"] if r["peak_reset"] else max(during, default=0)
    before_kib = r["before_kib"]["VmRSS"]
    by_consumer = r["final"]["by_consumer"]
    sent = c["answered_by_consumer"]
    wrong = {k: (by_consumer.get(k, 0), n) for k, n in sent.items() if by_consumer.get(k, 0) != n}
    total = c["answered"] + pings
    stored, dropped = r["final"]["records_stored"], r["final"]["records_dropped"]
    return {
        # every request sent that got no 2xx: a non-2xx, a socket error or no answer at all
        "errors": c["scheduled"] - c["answered"], "non_2xx": c["non_2xx"],
        "socket_errors": c["socket_errors"], "answered": c["answered"],
        "scheduled": c["scheduled"],
        "rss_before_mib": mib(before_kib), "rss_peak_mib": mib(peak_kib),
        "rss_sampled_peak_mib": mib(max(during, default=0)),
        "rss_sampled_peak_at_s": _first_peak(r["samples"], r["killed"]) - r["launched"],
        "growth_mb": (peak_kib - before_kib) * 1024 / 1e6, "growth_mib": mib(peak_kib - before_kib),
        "needed_after_restart": before_restart,
        "drain_s": None if drained_at is None else drained_at - r["restarted"],
        "records_drain_s": None if records_at is None else records_at - r["restarted"],
        "counted": r["final"]["counted"], "expected": total,
        "exact_total": r["final"]["counted"] == total,
        "consumers": len(sent), "consumers_wrong": dict(list(wrong.items())[:5]),
        "exact_by_consumer": not wrong and len(sent) == OUTAGE_CONSUMERS,
        "records_stored": stored, "records_dropped": dropped,
        "records_unaccounted": total - stored - dropped,
        "latency": phase_latency(c, r["killed"], r["restarted"]),
    }  # fmt: skip


def _first_peak(samples: list[tuple[float, int]], since: float) -> float:
    """When the highest sampled RSS from ``since`` on was first reached."""
    after = [sample for sample in samples if sample[0] >= since]
    return max(after, key=lambda sample: sample[1])[0] if after else since


def phase_latency(c: dict[str, Any], killed: float, restarted: float) -> dict[str, Any]:
    """The worst per-second p99 and the max latency before, during and after the outage."""
    phases: dict[str, list[dict[str, Any]]] = {"before": [], "during": [], "after": []}
    for row in c["per_second"]:
        at = c["start_monotonic"] + row["second"]
        name = "before" if at < killed else "during" if at < restarted else "after"
        phases[name].append(row)
    return {
        name: {"worst_p99_ms": max((r["p99_ms"] for r in rows), default=None),
               "max_ms": max((r["max_ms"] for r in rows), default=None),
               "late_ms": max((r.get("late_ms", 0.0) for r in rows), default=None),
               "median_p50_ms": statistics.median([r["p50_ms"] for r in rows]) if rows else None}
        for name, rows in phases.items()
    }  # fmt: skip


# --- 2. slow Redis ----------------------------------------------------------------------------


class ProxyThread(threading.Thread):
    """``tests.faults.FaultProxy`` in a thread of its own (with its own event loop)."""

    def __init__(self, target_port: int, faults: Faults) -> None:
        super().__init__(daemon=True)
        self.target_port, self.faults = target_port, faults
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop, self._done = asyncio.get_running_loop(), asyncio.Event()
        async with FaultProxy(self.target_port, self.faults) as proxy:
            self.port = proxy.port
            self._ready.set()
            await self._done.wait()

    def begin(self) -> int:
        self.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self.port

    def end(self) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self.join(10)


def _latency_row(run: dict[str, Any], server: Server, cpu0: float) -> dict[str, Any]:
    keep = ("answered", "scheduled", "non_2xx", "socket_errors", "p50_ms", "p90_ms", "p99_ms",
            "p99.9_ms", "max_ms", "dispatch_late_max_ms", "service", "per_second")  # fmt: skip
    row = {k: run[k] for k in keep}
    row["cpu_us"] = (server.cpu_seconds() - cpu0) / max(run["answered"], 1) * 1e6
    row.update(server.memory_kib())
    return row


@dataclass
class Arm:
    """One server of the slow-Redis part and its own Redis (direct, or behind the proxy)."""

    server: Server
    redis: EmbeddedRedis
    answered: int = 0  # answers the client got, readiness pings and warm-up included

    def drive(self, cores: Cores, seconds: float) -> dict[str, Any]:
        cpu0 = self.server.cpu_seconds()
        out = paced_run(self.server.port, cores, seconds, SLOW_CONNECTIONS, len(load.CONSUMERS))
        self.answered += out["answered"]
        return _latency_row(out, self.server, cpu0)

    def finish(self) -> dict[str, Any]:
        """Stop the server (final flush), then compare meterwall's total with the answers."""
        check = stop_server(self.server)
        with Redis.from_url(self.redis.url) as client:
            check.update(counted=counted_requests(client), answered=self.answered,
                         records_dropped=records_dropped(client))  # fmt: skip
        return check


def _arm(stack: ExitStack, cores: Cores, env: dict[str, str], journal: Path, slow: bool,
         keys: list[tuple[str, str]]) -> Arm:  # fmt: skip
    """A Redis (behind a 200 ms reply delay when ``slow``) and a server on it; with access
    control on (variant 5) the run's API keys are stored first."""
    redis = stack.enter_context(EmbeddedRedis())
    url = redis.url
    if slow:
        assert redis.port is not None
        proxy = ProxyThread(redis.port, Faults(reply_delay_s=REPLY_DELAY_S))
        url = f"redis://127.0.0.1:{proxy.begin()}/0"
        stack.callback(proxy.end)
    if env.get("MW_ACCESS") == "keys":
        store_keys(redis.url, env["MW_PSEUDONYM_SECRET"], keys)
    server = start_server("with_meterwall", meterwall_env(env, url, journal), cores, stack)
    return Arm(server, redis, answered=server.pings)


def run_slow(plan: Plan, cores: Cores, variant: str, env: dict[str, str], tmp: Path,
             keys: list[tuple[str, str]]) -> dict[str, Any]:  # fmt: skip
    """The same server config on a direct Redis ("healthy") and behind 200 ms replies ("slow"),
    driven in turn at the paced rate: H S, S H, H S, ..."""
    with ExitStack() as stack:
        arms = {name: _arm(stack, cores, env, tmp / f"journal-{variant}-{name}",
                           name == "slow", keys)
                for name in ("healthy", "slow")}  # fmt: skip
        for arm in arms.values():  # warm-up, discarded
            arm.drive(cores, plan.warmup_s)
        rounds = []
        names = list(arms)
        for rep in range(plan.slow_reps):
            for name in names[rep % 2 :] + names[: rep % 2]:
                row = arms[name].drive(cores, plan.slow_run_s)
                rounds.append({"rep": rep, "redis": name, **row})
                print(f"  [slow {variant} rep {rep + 1}] {name:<7} p50 {row['p50_ms']:6.2f} ms"
                      f"  p99 {row['p99_ms']:6.2f} ms  max {row['max_ms']:7.2f} ms",
                      file=sys.stderr)  # fmt: skip
        checks = {name: arm.finish() for name, arm in arms.items()}
    return {"variant": variant, "rounds": rounds, "checks": checks}


def run_diagnosis(plan: Plan, cores: Cores, env: dict[str, str], tmp: Path,
                  keys: list[tuple[str, str]]) -> dict[str, Any]:  # fmt: skip
    """Variant 5 on the slow Redis with its plan cut in two: only the quota, only the rate
    limit. One run each after a warm-up and a pause as long as a run (in the alternation a
    server idles while the other runs), so it is measured as variant 5's slow runs are."""
    out = {}
    for label, plans in (("quota only", QUOTA_ONLY), ("rate limit only", RATE_ONLY)):
        with ExitStack() as stack:
            arm = _arm(stack, cores, {**env, "MW_PLANS": plans}, tmp / f"journal-{label}", True,
                       keys)  # fmt: skip
            arm.drive(cores, plan.warmup_s)
            time.sleep(plan.slow_run_s)
            row = arm.drive(cores, plan.slow_run_s)
            out[label] = {**row, "plans": plans, "check": arm.finish()}
            print(f"  [slow 5, {label}] p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms",
                  file=sys.stderr)  # fmt: skip
    return out


def slow_figures(r: dict[str, Any]) -> dict[str, Any]:
    """Paired per repetition: slow minus healthy p50 and p99; medians and the worst pair."""
    by = {(row["rep"], row["redis"]): row for row in r["rounds"]}
    reps = sorted({rep for rep, _ in by})
    added = {p: [by[(rep, "slow")][p] - by[(rep, "healthy")][p] for rep in reps]
             for p in ("p50_ms", "p99_ms")}  # fmt: skip
    out: dict[str, Any] = {
        f"{name}_{p}": statistics.median(row[p] for row in r["rounds"] if row["redis"] == name)
        for name in ("healthy", "slow") for p in ("p50_ms", "p99_ms", "max_ms")
    }  # fmt: skip
    out.update(
        p50_added_ms=statistics.median(added["p50_ms"]),
        p99_added_ms=statistics.median(added["p99_ms"]),
        p99_added_worst_ms=max(added["p99_ms"]),
        p99_added_each_ms=added["p99_ms"],
        errors=sum(row["non_2xx"] + row["socket_errors"] for row in r["rounds"]),
    )
    return out


# --- 3. SSE first event and 4. 1 GiB download -------------------------------------------------


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def first_event_ms(port: int) -> float:
    """Milliseconds from sending ``GET /sse`` (connected already) to the whole first event."""
    request = (b"GET /sse HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
               b"X-Consumer: acme\r\n\r\n")  # fmt: skip
    with _connect(port) as sock:
        data = b""
        t0 = time.perf_counter_ns()
        sock.sendall(request)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"/sse closed early: {data!r}")
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            at = body.find(b"data: ")
            if at >= 0 and body.find(b"\n\n", at) > 0:
                break
        elapsed = (time.perf_counter_ns() - t0) / 1e6
    if not head.startswith(b"HTTP/1.1 200") or b"text/event-stream" not in head:
        raise RuntimeError(f"/sse answered {head!r}")
    return elapsed


def run_sse(plan: Plan, servers: dict[str, Server]) -> dict[str, Any]:
    """``sse_pairs`` first-event times per app, alternating which goes first."""
    times: dict[str, list[float]] = {name: [] for name in servers}
    names = list(servers)
    for name in names:  # warm-up, discarded
        for _ in range(SSE_WARMUP):
            first_event_ms(servers[name].port)
    for rep in range(plan.sse_pairs):
        for name in names[rep % 2 :] + names[: rep % 2]:
            times[name].append(first_event_ms(servers[name].port))
            time.sleep(0.02)  # the server finishes the stream the client left
    return {"times_ms": times}


def sse_figures(r: dict[str, Any]) -> dict[str, Any]:
    bare, mw = r["times_ms"]["bare"], r["times_ms"]["meterwall"]
    out = {f"{name}_{stat}": fn(values) for name, values in (("bare", bare), ("meterwall", mw))
           for stat, fn in (("median_ms", statistics.median),
                            ("p99_ms", lambda v: percentile(v, 99)), ("max_ms", max))}  # fmt: skip
    out["median_added_ms"] = out["meterwall_median_ms"] - out["bare_median_ms"]
    out["p99_added_ms"] = out["meterwall_p99_ms"] - out["bare_p99_ms"]
    out["pairs"] = len(mw)
    return out


def download(port: int, size: int) -> float:
    """GET /download of ``size`` bytes, read and discarded; seconds taken."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with _connect(port) as sock:
        t0 = time.monotonic()
        sock.sendall(f"GET /download?bytes={size} HTTP/1.1\r\nHost: bench\r\n"
                     "X-Consumer: acme\r\n\r\n".encode())  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(view)
            if n == 0:
                raise RuntimeError(f"/download closed early: {head!r}")
            head += bytes(view[:n])
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/download answered {head[:200]!r}")
        got = len(head.partition(b"\r\n\r\n")[2])
        while got < size:
            n = sock.recv_into(view)
            if n == 0:
                raise RuntimeError(f"/download ended after {got} of {size} bytes")
            got += n
        return time.monotonic() - t0


def run_download(plan: Plan, servers: dict[str, Server]) -> dict[str, Any]:
    """Per app and repetition: VmHWM reset, one download, VmHWM minus the RSS before it."""
    rows = []
    names = list(servers)
    for rep in range(plan.downloads):
        for name in names[rep % 2 :] + names[: rep % 2]:
            server = servers[name]
            reset = reset_peak(server.pid)
            before = server.memory_kib()
            seconds = download(server.port, DOWNLOAD_BYTES)
            after = server.memory_kib()
            rows.append({"rep": rep, "app": name, "seconds": seconds, "peak_reset": reset,
                         "before_kib": before, "after_kib": after,
                         "growth_mib": mib(after["VmHWM"] - before["VmRSS"])})  # fmt: skip
            speed = DOWNLOAD_BYTES / seconds / 2**20
            print(f"  [download rep {rep + 1}] {name:<9} {speed:7.0f} MiB/s  "
                  f"RSS growth {rows[-1]['growth_mib']:6.2f} MiB", file=sys.stderr)  # fmt: skip
            time.sleep(0.5)
    return {"rows": rows, "bytes": DOWNLOAD_BYTES}


def download_figures(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("bare", "meterwall"):
        rows = [row for row in r["rows"] if row["app"] == name]
        out[f"{name}_growth_mib"] = max(row["growth_mib"] for row in rows)
        out[f"{name}_growth_each_mib"] = [row["growth_mib"] for row in rows]
        out[f"{name}_mib_s"] = statistics.median(
            r["bytes"] / row["seconds"] / 2**20 for row in rows
        )
        out[f"{name}_rss_before_mib"] = mib(rows[0]["before_kib"]["VmRSS"])
    out["peak_reset"] = all(row["peak_reset"] for row in r["rows"])
    return out


def run_streams(plan: Plan, cores: Cores, env: dict[str, str], tmp: Path,
                parts: list[str]) -> dict[str, Any]:  # fmt: skip
    """The streaming app, bare and with meterwall, for the SSE and download parts."""
    out: dict[str, Any] = {}
    with ExitStack() as stack:
        redis = stack.enter_context(EmbeddedRedis())
        servers = {
            "bare": start_server("streaming", {}, cores, stack),
            "meterwall": start_server("streaming_with_meterwall",
                                      meterwall_env(env, redis.url, tmp / "journal-streams"),
                                      cores, stack),
        }  # fmt: skip
        sent = servers["meterwall"].pings
        if "sse" in parts:
            out["sse"] = run_sse(plan, servers)
            sent += SSE_WARMUP + plan.sse_pairs
            print(f"  [sse] {sse_figures(out['sse'])}", file=sys.stderr)
        if "download" in parts:
            out["download"] = run_download(plan, servers)
            sent += plan.downloads
        out["servers"] = {name: stop_server(s) for name, s in servers.items()}
        with Redis.from_url(redis.url) as client:  # streams the client left are requests too
            out["servers"]["meterwall"].update(counted=counted_requests(client), sent=sent)
    return out


# --- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.of(args.quick)
    cores = Cores.plan()
    if cores.rest is not None:
        os.sched_setaffinity(0, cores.rest)  # Redis, the proxy and the clients inherit it
    keys = make_keys()  # real API keys: variant 5 verifies them, the others see opaque tokens
    os.environ[load.API_KEYS_ENV] = ",".join(full for _, full in keys)
    env = sealed_env()
    results: dict[str, Any] = {"code": code_version(), "cores": cores.describe(),
                               "load_avg": [os.getloadavg()], "plan": plan.__dict__}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mw-reliability-") as tmp_dir:
        tmp = Path(tmp_dir)
        with EmbeddedRedis() as probe, Redis.from_url(probe.url) as client:
            info = client.info("server")
            results["redis_server"] = f"{Path(probe.binary).name} {info['redis_version']}"
        if "outage" in args.parts:
            print("outage ...", file=sys.stderr)
            results["outage"] = run_outage(plan, cores, env["4"], tmp)
        if "slow" in args.parts:
            results["slow"] = {}
            for variant in args.slow_variants:
                print(f"slow Redis, variant {variant} ...", file=sys.stderr)
                results["slow"][variant] = run_slow(plan, cores, variant, env[variant], tmp, keys)
            five = results["slow"].get("5")
            if five and slow_figures(five)["p99_added_ms"] > P99_ADDED_TARGET_MS:
                print("slow Redis, variant 5 missed its target: its plan cut in two ...",
                      file=sys.stderr)  # fmt: skip
                results["slow_diagnosis"] = run_diagnosis(plan, cores, env["5"], tmp, keys)
        if {"sse", "download"} & set(args.parts):
            print("streams ...", file=sys.stderr)
            results.update(run_streams(plan, cores, env["4"], tmp, args.parts))
    results["load_avg"].append(os.getloadavg())
    return results


def figures(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "outage" in results:
        out["outage"] = outage_figures(results["outage"])
    if "slow" in results:
        out["slow"] = {v: slow_figures(r) for v, r in results["slow"].items()}
    if "sse" in results:
        out["sse"] = sse_figures(results["sse"])
    if "download" in results:
        out["download"] = download_figures(results["download"])
    return out


# --- the report -------------------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "**met**" if ok else "**NOT met**"


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} ms"


def target_rows(f: dict[str, Any], plan: Plan) -> list[str]:
    """Figure | target | measured | verdict, one row per target."""
    rows = ["| figure | target | measured | verdict |", "|---|---|---|---|"]
    o = f.get("outage")
    if o:
        down = f"{plan.outage_s:g} s outage"
        rows += [
            f"| outage: app errors (non-2xx, socket errors, unanswered) over the run, {down} "
            f"| 0 | {o['errors']} of {o['scheduled']:,} | {_verdict(o['errors'] == 0)} |",
            f"| outage: server RSS growth, VmHWM from the kill on minus VmRSS before it "
            f"| < {GROWTH_TARGET_MB:g} MB | {o['growth_mb']:.1f} MB ({o['growth_mib']:.1f} MiB: "
            f"{o['rss_before_mib']:.1f} → peak {o['rss_peak_mib']:.1f} MiB) "
            f"| {_verdict(o['growth_mb'] < GROWTH_TARGET_MB)} |",
            f"| outage: from the restart until Redis holds every count answered before it "
            f"| < {DRAIN_TARGET_S:g} s | "
            + ("never, within the wait" if o["drain_s"] is None else f"{o['drain_s']:.1f} s")
            + f" | {_verdict(o['drain_s'] is not None and o['drain_s'] < DRAIN_TARGET_S)} |",
            f"| outage: counts exact, total and per consumer ({o['consumers']} consumers) "
            f"| exact | {o['counted']:,} counted, {o['expected']:,} answered; per consumer "
            + ("all equal" if o["exact_by_consumer"] else f"differ: {o['consumers_wrong']}")
            + f" | {_verdict(o['exact_total'] and o['exact_by_consumer'])} |",
        ]
    for variant, s in f.get("slow", {}).items():
        rows.append(
            f"| slow Redis (+{REPLY_DELAY_S * 1000:.0f} ms per reply), variant {variant}: p99 "
            f"added, median of paired runs | ≤ {P99_ADDED_TARGET_MS:g} ms "
            f"| {s['p99_added_ms']:+.2f} ms (p99 {s['healthy_p99_ms']:.2f} → "
            f"{s['slow_p99_ms']:.2f} ms; worst pair {s['p99_added_worst_ms']:+.2f} ms) "
            f"| {_verdict(s['p99_added_ms'] <= P99_ADDED_TARGET_MS)} |"
        )
    e = f.get("sse")
    if e:
        for stat in ("median", "p99"):
            rows.append(
                f"| SSE: time to the first event, {stat} added by meterwall "
                f"| ≤ {SSE_ADDED_TARGET_MS:g} ms | {e[f'{stat}_added_ms']:+.2f} ms "
                f"({e[f'bare_{stat}_ms']:.2f} → {e[f'meterwall_{stat}_ms']:.2f} ms) "
                f"| {_verdict(e[f'{stat}_added_ms'] <= SSE_ADDED_TARGET_MS)} |"
            )
    d = f.get("download")
    if d:
        rows.append(
            f"| 1 GiB download through meterwall: server RSS growth (VmHWM minus VmRSS before; "
            f"worst of {len(d['meterwall_growth_each_mib'])}) | < {DOWNLOAD_TARGET_MIB:g} MiB "
            f"| {d['meterwall_growth_mib']:.2f} MiB (bare app {d['bare_growth_mib']:.2f} MiB) "
            f"| {_verdict(d['meterwall_growth_mib'] < DOWNLOAD_TARGET_MIB)} |"
        )
    return rows


def outage_lines(r: dict[str, Any], o: dict[str, Any]) -> list[str]:
    c, lat = r["client"], o["latency"]
    plan = r["plan"]

    def phase(name: str) -> str:
        p = lat[name]
        return (f"{name}: p50 {_ms(p['median_p50_ms'])}, worst 1-s p99 {_ms(p['worst_p99_ms'])}, "
                f"max {_ms(p['max_ms'])}, client late at most {_ms(p['late_ms'], 1)}")  # fmt: skip

    recs = (f"{o['records_drain_s']:.1f} s" if o["records_drain_s"] is not None
            else "not within the run")  # fmt: skip
    return [
        f"**Outage.** `with_meterwall` (variant 4, `MW_BUFFER_BYTES` default 16 MiB, journal on) "
        f"driven by benchmarks/paced.py at {c['rate']:,.0f} requests/s, open loop, "
        f"{c['connections']} keep-alive connections, {c['consumers']} consumers (`X-Consumer`), "
        f"`POST /echo` with a 1 KiB JSON body; Redis with AOF `everysec` SIGKILLed after "
        f"{plan['before_s']:g} s, restarted on the same port and files {plan['outage_s']:g} s "
        f"later, load on for {plan['after_s']:g} s more. The restart-to-drained time is the first "
        f"read of meterwall's request total (every {POLL_S:g} s, "
        f"`procs.counted_requests`) that reaches the {o['needed_after_restart']:,} requests "
        f"answered before the restart (readiness pings included); exactness is checked after a "
        f"SIGTERM (final flush).",
        "",
        f"- client latency from the due time, {phase('before')}; {phase('during')}; "
        f'{phase("after")}. "Client late" is how far the client\'s dispatcher fell behind its '
        f"schedule because its own core was busy: that core also runs Redis, which after the "
        f"restart applies the backlog and rewrote its AOF {r['final']['aof_rewrites']} times "
        f"(a fork and a write of everything it holds), and this benchmark's reads of Redis",
        f"- server RSS: {o['rss_before_mib']:.1f} MiB before the kill, "
        f"{mib(r['at_restart_kib']['VmRSS']):.1f} MiB at the restart, peak "
        f"{o['rss_peak_mib']:.1f} MiB (VmHWM reset at the kill: "
        f"{'yes' if r['peak_reset'] else 'no, sampled peak'}; sampled every 0.5 s: "
        f"{o['rss_sampled_peak_mib']:.1f} MiB, first reached at {o['rss_sampled_peak_at_s']:.0f} "
        f"s), {mib(r['after_kib']['VmRSS']):.1f} MiB at the end of the load",
        f"- server VmRSS every {SERIES_S:g} s from the start of the load, MiB (the kill at "
        f"{r['killed'] - r['launched']:.0f} s, the restart at "
        f"{r['restarted'] - r['launched']:.0f} s): "
        + ", ".join(f"{m:.1f}" for m in rss_series(r["samples"], r["launched"])),
        f"- sealed records: {o['records_stored']:,} stored, {o['records_dropped']:,} dropped and "
        f"counted (`records_dropped` in the shards' `stats` hashes: the buffer keeps the newest "
        f"16 MiB), {o['records_unaccounted']:+,} neither; stored + dropped reached the requests "
        f"answered before the restart {recs} after it",
        f"- server: exit code {r['server']['exit_code']}; log (a warning when Redis went away "
        f"is expected): " + ("; ".join(r["server"]["log"]) or "nothing alarming"),
    ]


def rss_series(samples: list[tuple[float, int]], start: float) -> list[float]:
    """VmRSS (MiB) of the sample nearest to every SERIES_S seconds from ``start``."""
    if not samples:
        return []
    out = []
    for step in range(int((samples[-1][0] - start) // SERIES_S) + 1):
        at = start + step * SERIES_S
        out.append(mib(min(samples, key=lambda sample: abs(sample[0] - at))[1]))
    return out


def slow_lines(results: dict[str, Any], f: dict[str, Any]) -> list[str]:
    out = [
        f"**Slow Redis.** Two servers of the same configuration, one on a direct Redis, one on a "
        f"Redis behind `tests.faults.FaultProxy` with `Faults(reply_delay_s={REPLY_DELAY_S:g})`: "
        f"every reply chunk reaches the server {REPLY_DELAY_S * 1000:.0f} ms after Redis sent it, "
        f"in order (a delay line; the proxy's older `delay` sleeps in the request pump chunk "
        f"after chunk, so a 1 MiB pipeline of 16 chunks would wait 3.2 s and the link could "
        f"carry at most 5 chunks/s: a throttled link rather than a slow Redis). Each run: "
        f"{RATE:,.0f} requests/s paced, {SLOW_CONNECTIONS} connections, the 4 consumers and API "
        f"keys of `python -m benchmarks`, `POST /echo`; healthy and slow alternate (H S, S H, "
        f"...) after a discarded warm-up each; latency from the due time; one value per run, "
        f'in the order run. "Client late" is how far the client\'s dispatcher fell behind its '
        f"schedule: a run where it is large had the client's own core taken (by Redis, the "
        f"proxy, or other work on the machine), and its tail says more about that than about "
        f"the server.",
        "",
        "| variant | Redis | p50 ms | p99 ms | max ms | client late, max ms | server CPU µs/req "
        "| errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, r in results["slow"].items():
        for name in ("healthy", "slow"):
            rows = [row for row in r["rounds"] if row["redis"] == name]
            cell = {p: ", ".join(f"{row[p]:.{digits}f}" for row in rows) for p, digits in
                    (("p50_ms", 2), ("p99_ms", 2), ("max_ms", 1),
                     ("dispatch_late_max_ms", 1))}  # fmt: skip
            cpu = statistics.median(row["cpu_us"] for row in rows)
            errors = sum(row["non_2xx"] + row["socket_errors"] for row in rows)
            out.append(f"| {variant} | {name} | {cell['p50_ms']} | {cell['p99_ms']} "
                       f"| {cell['max_ms']} | {cell['dispatch_late_max_ms']} | {cpu:.0f} "
                       f"| {errors} |")  # fmt: skip
    out.append("")
    for variant, r in results["slow"].items():
        slow = sorted((row for row in r["rounds"] if row["redis"] == "slow"),
                      key=lambda row: row["p99_ms"])  # fmt: skip
        middle = slow[len(slow) // 2]
        series = ", ".join(f"{sec['max_ms']:.0f}" for sec in middle["per_second"])
        out.append(f"- variant {variant}, slow, the run with the median p99: the slowest request "
                   f"of each second, ms: {series}")  # fmt: skip
    for variant, r in results["slow"].items():
        for name, c in r["checks"].items():
            out.append(f"- variant {variant}, {name}: {_check_text(c)}")
    if "slow_diagnosis" in results:
        out += ["", *diagnosis_lines(results["slow_diagnosis"])]
    return out


def _check_text(c: dict[str, Any]) -> str:
    log = "; ".join(c["log"]) or "nothing alarming"
    same = "equal" if c["counted"] == c["answered"] else "DIFFER"
    return (f"meterwall counted {c['counted']:,} requests, the client got {c['answered']:,} "
            f"answers (pings included): {same}; records dropped {c['records_dropped']}; exit "
            f"code {c['exit_code']}; log: {log}")  # fmt: skip


def waits(row: dict[str, Any], bound_ms: float) -> str:
    """When a run's requests waited: in its first seconds only (a lease that starts small
    after the pause and grows one round trip at a time), throughout, or never."""
    slow = [sec["second"] for sec in row["per_second"] if sec["max_ms"] > bound_ms]
    later = [sec for sec in slow if sec >= EARLY_S]
    if not slow:
        return "no second with a request over the bound"
    if not later:
        return f"waits only in the first {EARLY_S} s after the pause, none after"
    seconds = len([sec for sec in row["per_second"] if sec["second"] >= EARLY_S])
    return f"waits throughout: {len(later)} of the {seconds} seconds after the first {EARLY_S}"


def diagnosis_lines(d: dict[str, Any]) -> list[str]:
    """Which of variant 5's leases makes requests wait on the slow Redis, and when, from the
    two runs with its plan cut in two."""
    bound = REPLY_DELAY_S * 1000 / 2  # a request this slow waited on a Redis round trip
    runs = "; ".join(
        f'{label} (`MW_PLANS="{row["plans"]}"`): p50 {row["p50_ms"]:.2f} ms, p99 '
        f"{row['p99_ms']:.2f} ms, max {row['max_ms']:.2f} ms, slowest request of each second "
        + ", ".join(f"{sec['max_ms']:.0f}" for sec in row["per_second"])
        + f" ms: {waits(row, bound)}"
        for label, row in d.items()
    )
    return [
        f"Variant 5 missed its target, so it ran once more on the slow Redis with its plan cut in "
        f"two, one {len(d['quota only']['per_second'])} s run each after a warm-up and a pause "
        f'as long as a run (as in the alternation). A second "waits" when its slowest request '
        f"took over {bound:.0f} ms, half a slow round trip: {runs}."
    ]


def stream_lines(results: dict[str, Any], f: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if "sse" in f:
        e = f["sse"]
        out += [
            f"**SSE.** `GET /sse` of `benchmarks.apps:streaming` (a `StreamingResponse`, "
            f"`text/event-stream`, the first event at once, then one every 100 ms) against "
            f"`streaming_with_meterwall` (variant 4's settings): {e['pairs']} pairs, alternating "
            f"which goes first, each on a fresh connection (connect not timed), from sending the "
            f"request to having the whole first event; the client then hangs up. Bare: median "
            f"{e['bare_median_ms']:.2f} ms, p99 {e['bare_p99_ms']:.2f}, max "
            f"{e['bare_max_ms']:.2f}; meterwall: median {e['meterwall_median_ms']:.2f} ms, p99 "
            f"{e['meterwall_p99_ms']:.2f}, max {e['meterwall_max_ms']:.2f}.",
        ]
    if "download" in f:
        d = f["download"]
        each = {name: ", ".join(f"{g:.2f}" for g in d[f"{name}_growth_each_mib"])
                for name in ("bare", "meterwall")}  # fmt: skip
        out += [
            "",
            f"**1 GiB download.** `GET /download` streams {DOWNLOAD_BYTES:,} bytes in 64 KiB "
            f"chunks with a `Content-Length`; the client reads and discards. Before each, the "
            f"server's VmHWM is reset (`/proc/<pid>/clear_refs` 5: "
            f"{'done' if d['peak_reset'] else 'REFUSED, so VmHWM is the lifetime peak'}); the "
            f"growth is VmHWM after minus VmRSS before. Bare app (RSS "
            f"{d['bare_rss_before_mib']:.1f} MiB before): {each['bare']} MiB at "
            f"{d['bare_mib_s']:.0f} MiB/s; meterwall (RSS {d['meterwall_rss_before_mib']:.1f} "
            f"MiB before): {each['meterwall']} MiB at {d['meterwall_mib_s']:.0f} MiB/s.",
        ]
    if "servers" in results:
        out.append("")
        for name, c in results["servers"].items():
            counted = ""
            if "counted" in c:
                same = "equal" if c["counted"] == c["sent"] else "DIFFER"
                counted = (f"meterwall counted {c['counted']:,} requests, {c['sent']:,} were "
                           f"sent (readiness pings and warm-up included): {same}; ")  # fmt: skip
            out.append(f"- streaming server {name}: {counted}exit code {c['exit_code']}; log: "
                       + ("; ".join(c["log"]) or "nothing alarming"))  # fmt: skip
    return out


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    f = figures(results)
    plan = Plan(**results["plan"])
    la = results["load_avg"]
    lines = [
        *report.machine("auto"),
        f"- code: {results['code']} (the servers load it from the working tree)",
        f"- Redis: {results['redis_server']} (private `EmbeddedRedis` servers)",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"took {results.get('wall_s', 0):.0f} s",
        f"- command: `{args.command}`",
        f"- {results['cores']}",
        f"- load average (1 min) at start {la[0][0]:.2f}, at end {la[-1][0]:.2f}; other "
        f"benchmark processes at the start: {len(results.get('others_at_start', []))} "
        "(listed in reliability.json; idle servers count too)",
        "",
        *target_rows(f, plan),
    ]
    if "outage" in f and plan.outage_s < 120:
        short = f"A {plan.outage_s:g} s outage (`--quick`) is shorter than the issue's 2 minutes"
        lines += ["", f"{short}: its RSS growth and drain time say little about a 2-minute one."]
    if "outage" in f:
        lines += ["", *outage_lines(results["outage"], f["outage"])]
    if "slow" in f:
        lines += ["", *slow_lines(results, f)]
    if "sse" in f or "download" in f:
        lines += ["", *stream_lines(results, f)]
    return "\n".join(lines) + "\n"


def slim(results: dict[str, Any]) -> dict[str, Any]:
    """The results with the figures, for reliability.json: the paced client's answers per
    10 ms (what the drain time is computed from) become answers per second, and the RSS samples
    one per SERIES_S, so that the file stays small enough to read and to keep in git."""
    out = {**results, "figures": figures(results)}
    if "outage" in results:
        outage = dict(results["outage"])
        client = dict(outage["client"])
        per_second: dict[int, int] = {}
        for b, n in client.pop("done_bins"):
            second = int(b * client["done_bin_s"])
            per_second[second] = per_second.get(second, 0) + n
        client["answered_per_second"] = sorted(per_second.items())
        outage["client"] = client
        outage["samples"] = rss_series(outage["samples"], outage["launched"])
        outage["samples_every_s"] = SERIES_S
        out["outage"] = outage
    return out


def write(results: dict[str, Any], text: str) -> None:
    report.replace_section(BEGIN, END, text, TITLE)
    RESULTS_JSON.write_text(json.dumps(slim(results), indent=1, default=str) + "\n")


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=" ".join(RUN_AS), description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="a 15 s outage and short runs (about 3 minutes)")
    add("--parts", default=",".join(PARTS), help=f"of {', '.join(PARTS)} (default: all)")
    add("--slow-variants", default="4,5", help="for the slow-Redis part: 4, 5 (default: both)")
    add(
        "--wait",
        type=float,
        default=1200.0,
        metavar="S",
        help="wait up to S s for other benchmarks to end (default 1200; 0: measure anyway)",
    )
    add("--write", action="store_true", help="update RESULTS.md and benchmarks/reliability.json")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.slow_variants = [v.strip() for v in args.slow_variants.split(",") if v.strip()]
    if set(args.parts) - set(PARTS) or set(args.slow_variants) - {"4", "5"}:
        parser.error(f"--parts takes {', '.join(PARTS)}; --slow-variants takes 4 and 5")
    args.command = shlex.join([*RUN_AS, *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.wait > 0 and not wait_for_others(args.wait, "measuring"):
        raise SystemExit("another benchmark is still running: not measuring (--wait 0: anyway)")
    others = [without_paths(line) for line in other_benchmarks()]
    t0 = time.monotonic()
    results = run(args)
    results["others_at_start"] = others
    results["wall_s"] = time.monotonic() - t0
    results["command"] = args.command
    text = markdown(results, args)
    print()
    print(text, end="")
    if args.write:
        write(results, text)
        print(f"wrote {report.RESULTS_MD.relative_to(ROOT)} and {RESULTS_JSON.relative_to(ROOT)}")


def without_paths(command: str) -> str:
    """A command line with each absolute path cut to its last part (no machine paths in the
    results): ``/opt/venv/bin/python -m x`` becomes ``python -m x``."""
    return " ".join(
        Path(word).name if word.startswith("/") else word for word in command.split(" ")
    )


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the servers and Redis servers this run started, as Ctrl-C does."""
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    with _sigterm_as_interrupt():
        main()
