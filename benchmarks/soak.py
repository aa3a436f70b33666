"""``python -m benchmarks --soak S``: the server's memory under sustained load, bare app and 4.

The issue's memory target: the RSS meterwall adds under sustained load stays under 30 MiB and is
flat over a 10-minute run. For the bare app (1) and variant 4 (metering + sealed records), one
after the other, it starts the variant's own single-worker uvicorn server (and, for 4, its own
Redis) as ``python -m benchmarks`` does, warms it up, then drives it with the same load for S
seconds in chunks of 30 s while a thread samples the server's ``VmRSS`` from ``/proc`` every
5 s. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from typing import Any

from . import load, report, targets
from .procs import Cores, Server
from .run import Target, drive, finish, make_keys, start, variants

SOAK_VARIANTS = ("1", "4")
CHUNK_S = 30.0  # one load-generator run; its req/s and the RSS after it are reported
SAMPLE_S = 5.0  # VmRSS sampling period, while the load runs (96 samples in 8 minutes)
WINDOW_S = 480.0  # the slope is fitted over the last 8 minutes (less on shorter soaks)
ADDED_TARGET_MIB = 30.0  # the target
SLOPE_TARGET = 0.5  # MiB per minute; why this threshold: benchmarks/README.md
BEGIN, END = "<!-- soak:start -->", "<!-- soak:end -->"
TITLE = "## Memory under sustained load: `python -m benchmarks --soak`"
_SUMMARY = re.compile(r"<!-- soak:summary (\{.*?\}) -->")


class Sampler(threading.Thread):
    """Samples the server's VmRSS every ``every`` seconds: (seconds since start, KiB)."""

    def __init__(self, server: Server, every: float) -> None:
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def take(self) -> None:
        try:
            kib = self.server.memory_kib()["VmRSS"]
        except (OSError, KeyError):
            return
        self.samples.append((time.monotonic() - self.t0, kib))

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.take()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.take()


def window(duration: float) -> float:
    """Seconds at the end of the soak the slope is fitted over: 8 minutes, or 80% if shorter."""
    return min(WINDOW_S, 0.8 * duration)


def slope_mib_per_min(samples: list[tuple[float, int]], window_s: float) -> float | None:
    """Least-squares slope of VmRSS (MiB) over time (minutes), over the last ``window_s``."""
    if not samples:
        return None
    end = samples[-1][0]
    points = [(t / 60, kib / 1024) for t, kib in samples if t >= end - window_s]
    if len(points) < 3:
        return None
    fit = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return float(fit.slope)


def by_minute(samples: list[tuple[float, int]]) -> list[float]:
    """VmRSS (MiB) of the sample nearest to each whole minute of the soak (0, 1, 2, ...)."""
    if not samples:
        return []
    end = samples[-1][0]
    out = []
    for minute in range(int(end // 60) + 1):
        at = minute * 60
        nearest = min(samples, key=lambda s: abs(s[0] - at))
        out.append(nearest[1] / 1024)
    return out


def soak_one(t: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then ``args.soak`` seconds of load in chunks, VmRSS sampled meanwhile."""
    drive(t, args, args.warmup, args.connections)  # discarded
    sampler = Sampler(t.server, SAMPLE_S)
    sampler.take()  # the start: after the warm-up, before the soak's load
    sampler.start()
    cpu0 = t.server.cpu_seconds()
    chunks: list[dict[str, Any]] = []
    done = 0.0
    while args.soak - done >= 1.0:
        duration = min(CHUNK_S, args.soak - done)
        out = drive(t, args, duration, args.connections)
        done += duration
        rss = t.server.memory_kib()["VmRSS"]
        chunks.append({**out, "variant": t.variant.key, "rps": out["requests"] / out["elapsed_s"],
                       "at_s": time.monotonic() - sampler.t0, "VmRSS": rss})  # fmt: skip
        print(
            f"  [soak {t.variant.key}] {done:5.0f}/{args.soak:g} s  {chunks[-1]['rps']:8.0f} req/s"
            f"  p99 {out['p99_ms']:6.2f} ms  RSS {rss / 1024:6.1f} MiB",
            file=sys.stderr,
            flush=True,
        )
    sampler.stop()
    cpu = t.server.cpu_seconds() - cpu0
    memory = t.server.memory_kib()
    served = sum(c["requests"] for c in chunks)
    samples = sampler.samples
    return {
        "variant": t.variant.key,
        "name": t.variant.name,
        "start_mib": samples[0][1] / 1024,
        "end_mib": samples[-1][1] / 1024,
        "peak_mib": memory["VmHWM"] / 1024,
        "max_sampled_mib": max(kib for _, kib in samples) / 1024,
        "slope_mib_min": slope_mib_per_min(samples, window(args.soak)),
        "samples": samples,
        "by_minute_mib": by_minute(samples),
        "chunks": chunks,
        "served": served,
        "cpu_us": cpu / max(served, 1) * 1e6,
        "redis_used_memory": t.redis.info("memory")["used_memory"] if t.redis else None,
    }


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    cores = Cores.plan()
    if cores.rest is not None:
        os.sched_setaffinity(0, cores.rest)  # Redis and the clients inherit it
    args.gen = load.generator() if args.generator == "auto" else args.generator
    args.redis_server = ""
    keys = make_keys()  # the same requests as the normal run (variant 4 does not verify them)
    os.environ[load.API_KEYS_ENV] = ",".join(full for _, full in keys)
    load_avg = [os.getloadavg()]
    runs: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}
    for v in (v for v in variants() if v.key in SOAK_VARIANTS):
        with ExitStack() as stack:  # one server (and Redis) at a time, stopped before the next
            t = start(v, args, cores, stack, keys)
            runs[v.key] = soak_one(t, args)
            checks[v.key] = finish(t)
    load_avg.append(os.getloadavg())
    return {
        "args": {k: val for k, val in vars(args).items() if k not in ("phases", "gen")},
        "generator": args.gen, "redis_server": args.redis_server, "cores": cores.describe(),
        "load_avg": load_avg, "runs": runs, "checks": checks,
        # for targets.checks: every chunk is a load run whose errors count
        "rounds": [c for r in runs.values() for c in r["chunks"]],
    }  # fmt: skip


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} <sub>{min(values):.0f}-{max(values):.0f}</sub>"


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    runs = results["runs"]
    bare, mw = runs.get("1"), runs.get("4")
    out: dict[str, Any] = {"window_min": window(results["args"]["soak"]) / 60}
    if bare and mw:
        out["added_mib"] = mw["peak_mib"] - bare["peak_mib"]
        out["added_ok"] = out["added_mib"] < ADDED_TARGET_MIB
    if mw and mw["slope_mib_min"] is not None:
        out["slope_mib_min"] = mw["slope_mib_min"]
        out["flat_ok"] = mw["slope_mib_min"] < SLOPE_TARGET
    return out


def markdown(results: dict[str, Any]) -> str:
    args = results["args"]
    gen = results["generator"]
    gen_text = report.generator_text(gen)
    la = results["load_avg"]
    date = datetime.datetime.now(datetime.UTC)
    win = f"{window(args['soak']) / 60:.2g}"
    lines = [
        *report.machine(args["http"]),
        f"- Redis: {results['redis_server']} (variant 4's own private server)",
        f"- date: {date:%Y-%m-%d %H:%M} UTC; took {results.get('wall_s', 0):.0f} s",
        f"- command: `{args['command']}`",
        f"- load generator: {gen_text}, separate process; {results['cores']}",
        f"- load average (1 min) at start {la[0][0]:.2f}, at end {la[-1][0]:.2f} "
        "(above ~0.1 at start means something else was running on the 2 cores)",
        "",
        f"`{args['path']}`, {args['connections']} connections (closed loop), {args['soak']:g} s "
        f"per variant in runs of {CHUNK_S:g} s, the bare app (1) first, then variant 4, each on "
        f"its own fresh server (and, for 4, its own Redis) after a discarded {args['warmup']:g} s "
        f"warm-up. VmRSS of the server from `/proc/<pid>/status`, sampled every {SAMPLE_S:g} s "
        "during the load; start is the sample right after the warm-up, peak is `VmHWM` at the "
        f"end, the slope is the least-squares fit of VmRSS over the last {win} minutes.",
        "",
        "| variant | req/s per run of 30 s | requests served | RSS at start MiB | peak MiB "
        f"| end MiB | slope, last {win} min, MiB/min | server CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in results["runs"].items():
        slope = r["slope_mib_min"]
        errors = sum(c["non_2xx"] + c["socket_errors"] for c in r["chunks"])
        lines.append(
            f"| {key}. {r['name']} | {_spread([c['rps'] for c in r['chunks']])} "
            f"| {r['served']:,} | {r['start_mib']:.1f} | {r['peak_mib']:.1f} "
            f"| {r['end_mib']:.1f} | {'-' if slope is None else f'{slope:+.3f}'} "
            f"| {r['cpu_us']:.1f} | {errors} |"
        )
    lines += ["", "VmRSS (MiB) at each minute of the soak:", ""]
    for key, r in results["runs"].items():
        series = ", ".join(f"{m:.1f}" for m in r["by_minute_mib"])
        lines.append(f"- {key}: {series}")
    mw = results["runs"].get("4")
    if mw and mw.get("redis_used_memory") is not None:
        lines.append(
            f"- variant 4's Redis used_memory at the end: {mw['redis_used_memory'] / 2**20:,.0f} "
            "MiB (sealed records are kept 24 h, so it grows through the soak; not the server's "
            "RSS)"
        )
    v = verdicts(results)
    lines += ["", "Targets of issue 7:", ""]
    if "added_mib" in v:
        bare_peak, mw_peak = results["runs"]["1"]["peak_mib"], results["runs"]["4"]["peak_mib"]
        lines.append(
            f"- RSS added by meterwall (peak of 4 minus peak of bare) under "
            f"{ADDED_TARGET_MIB:g} MiB: {mw_peak:.1f} - {bare_peak:.1f} = {v['added_mib']:.1f} "
            f"MiB: {targets._verdict(v['added_ok'])}"
        )
    if "slope_mib_min" in v:
        lines.append(
            f"- flat: slope of 4 under {SLOPE_TARGET:g} MiB/min over the last {win} minutes "
            f"(threshold: benchmarks/README.md): {v['slope_mib_min']:+.3f} MiB/min "
            f"(RSS of 4 from {mw['start_mib']:.1f} MiB at the start to {mw['end_mib']:.1f} MiB "
            f"at the end): {targets._verdict(v['flat_ok'])}"
        )
    if args["soak"] < 600:
        lines.append(f"- a {args['soak']:g} s soak is shorter than the issue's 10 minutes")
    lines += ["", *targets.checks(results)]
    summary = {"date": f"{date:%Y-%m-%d}", "command": args["command"], **v}
    lines += ["", f"<!-- soak:summary {json.dumps(summary)} -->"]
    return "\n".join(lines) + "\n"


def write(text: str) -> str:
    """Replace the soak section of RESULTS.md (others' edits stay)."""
    report.replace_section(BEGIN, END, text, TITLE)
    return f"wrote the soak section of {report.RESULTS_MD.name}"


def recorded() -> dict[str, Any] | None:
    """The summary of the soak section of RESULTS.md, when there is one."""
    try:
        text = report.RESULTS_MD.read_text()
    except OSError:
        return None
    if BEGIN not in text or END not in text:
        return None
    section = text.partition(BEGIN)[2].partition(END)[0]
    m = _SUMMARY.search(section)
    if m is None:
        return None
    try:
        summary: dict[str, Any] = json.loads(m.group(1))
    except ValueError:
        return None
    return summary


def main(args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    results = run_soak(args)
    results["wall_s"] = time.monotonic() - t0
    text = markdown(results)
    print(text)
    if args.write:
        print(write(text))
