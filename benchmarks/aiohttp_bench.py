"""``python -m benchmarks.aiohttp_bench``: meterwall_aiohttp's overhead against a bare aiohttp app.

Starts a private Redis and two single-process aiohttp servers (benchmarks/aiohttp_apps.py): the
bare app, and the same app with ``meterwall_aiohttp.setup`` configured like variant 4 of
``python -m benchmarks`` (metering + sealed records). Drives them in turn with the ASGI
benchmark's load generator (wrk, else the asyncio client) from another process, pinned away
from the server's core, and reports medians with min-max, ratios paired per repetition, and a
check that meterwall counted exactly what the load generator completed. ``--write`` replaces
this command's section of RESULTS.md. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import pstats
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from meterwall.apikeys import new_key
from meterwall.embedded import EmbeddedRedis

from . import load
from .procs import (
    ROOT,
    Cores,
    Server,
    counted_requests,
    other_benchmarks,
    redis_stats,
)  # fmt: skip
from .report import generator_text, replace_section
from .run import sealed_env

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- aiohttp:start -->", "<!-- aiohttp:end -->"
SECTION_TITLE = "## aiohttp adapter: `python -m benchmarks.aiohttp_bench`"
RUN_AS = ("python", "-m", "benchmarks.aiohttp_bench")
_POLL_S = 30.0
#: Below this median ratio the meterwall server is profiled once more (``--profile auto``).
PROFILE_BELOW = 0.75


@dataclass(frozen=True)
class Variant:
    key: str  # the ``--variant`` of benchmarks.aiohttp_apps
    name: str
    env: dict[str, str] = field(default_factory=dict)
    meterwall: bool = False


def variants(redis_url: str, journal_dir: str) -> list[Variant]:
    """The bare app, and meterwall with the settings of the ASGI benchmark's variant 4."""
    sealed = {**sealed_env(), "MW_REDIS_URL": redis_url, "MW_JOURNAL_DIR": journal_dir}
    return [
        Variant("bare", "bare aiohttp app"),
        Variant("meterwall", "meterwall_aiohttp, metering + sealed records", sealed, True),
    ]


@dataclass
class AiohttpServer(Server):
    """One single-process ``aiohttp.web.run_app`` server; ``factory`` names the variant.

    CPU, memory, log and stop (SIGTERM: aiohttp runs its cleanup hooks, meterwall's final
    flush among them, and exits 0) are those of ``procs.Server``."""

    profile_out: str = ""

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "benchmarks.aiohttp_apps", "--variant", self.factory,
               "--port", str(self.port)]  # fmt: skip
        return cmd + (["--profile", self.profile_out] if self.profile_out else [])


@dataclass
class Target:
    variant: Variant
    server: AiohttpServer
    redis: Redis | None
    sent: int = 0  # requests the load generator completed, warm-up and readiness pings included
    max_cut: int = 0  # requests wrk may have cut in flight: one per connection per run


# --- running ------------------------------------------------------------------------------------


def drive(t: Target, args: argparse.Namespace, duration: float) -> dict[str, Any]:
    cores = t.server.cores
    out = load.run_load(args.gen, t.server.port, args.path, args.connections, duration, ROOT,
                        sys.executable, cores.pin(cores.rest))  # fmt: skip
    t.sent += out["requests"]
    t.max_cut += args.connections
    time.sleep(args.settle)  # the flusher's last interval lands in this run's CPU
    return out


def measure(t: Target, args: argparse.Namespace) -> dict[str, Any]:
    before = redis_stats(t.redis) if t.redis is not None else None
    cpu0 = t.server.cpu_seconds()
    out = drive(t, args, args.duration)
    cpu = t.server.cpu_seconds() - cpu0
    n = max(out["requests"], 1)
    row = {**out, "rps": out["requests"] / out["elapsed_s"], "cpu_us": cpu / n * 1e6,
           **t.server.memory_kib()}  # fmt: skip
    if t.redis is not None and before is not None:
        after = redis_stats(t.redis)
        calls = sum(v - before["calls"].get(k, 0) for k, v in after["calls"].items())
        row["redis_cmds"] = calls / n
        row["redis_cpu_us"] = (after["cpu_s"] - before["cpu_s"]) / n * 1e6
    return row


def finish(t: Target) -> dict[str, Any]:
    """Stop the server (meterwall flushes on cleanup), then compare its counters with the load."""
    code, problems, _ = t.server.stop()
    check: dict[str, Any] = {"exit_code": code, "log_problems": problems[:10]}
    if t.variant.meterwall and t.redis is not None:
        check.update(client_completed=t.sent, max_cut=t.max_cut,
                     meterwall_counted=counted_requests(t.redis))  # fmt: skip
    return check


def code_version() -> str:
    """The commit, and the files of meterwall's code changed in the working tree (measured too)."""
    git = ["git", "-C", str(ROOT)]
    rev = [*git, "rev-parse", "--short", "HEAD"]
    head = subprocess.run(rev, capture_output=True, text=True, check=False).stdout.strip()
    if not head:
        return "not a git checkout"
    status = [*git, "status", "--porcelain", "--", "meterwall", "plugins/aiohttp"]
    changed = subprocess.run(status, capture_output=True, text=True, check=False).stdout
    files = [line[3:] for line in changed.splitlines() if line.strip()]
    return f"commit {head}" + (
        f", with uncommitted changes to {', '.join(files)}" if files else ", clean"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0))
    code = code_version()
    cores = Cores.plan()
    if cores.rest is not None:
        os.sched_setaffinity(0, cores.rest)  # Redis and the load generators inherit it
    # The same requests as `python -m benchmarks`: real meterwall keys as (opaque) bearer tokens.
    os.environ[load.API_KEYS_ENV] = ",".join(new_key()[1] for _ in load.CONSUMERS)
    rounds: list[dict[str, Any]] = []
    load_avg = [os.getloadavg()]
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mw-aiohttp-bench-"))
        redis = stack.enter_context(EmbeddedRedis())
        client = stack.enter_context(Redis.from_url(redis.url))
        redis_server = f"{Path(redis.binary).name} {client.info('server')['redis_version']}"
        chosen = variants(redis.url, os.path.join(tmp, "journal"))
        targets = []
        for v in chosen:
            server = AiohttpServer(v.key, v.env, cores)
            stack.callback(server.stop)
            server.start()
            targets.append(Target(v, server, client if v.meterwall else None, server.pings))
        for t in targets:  # warm-up, discarded
            drive(t, args, args.warmup)
        for rep in range(args.reps):
            # A B, B A, A B, ...: alternating, and neither always runs first
            for t in targets[rep % 2 :] + targets[: rep % 2]:
                row = measure(t, args)
                rounds.append({"variant": t.variant.key, "rep": rep, **row})
                print(f"  [rep {rep + 1}/{args.reps}] {t.variant.key:<9} {row['rps']:8.0f} req/s"
                      f"  p50 {row['p50_ms']:5.2f} ms  p99 {row['p99_ms']:6.2f} ms"
                      f"  cpu {row['cpu_us']:6.1f} µs/req", file=sys.stderr)  # fmt: skip
        load_avg.append(os.getloadavg())
        checks = {t.variant.key: finish(t) for t in targets}
        results: dict[str, Any] = {
            "rounds": rounds, "checks": checks, "load_avg": load_avg, "generator": args.gen,
            "cores": cores.describe(), "redis_server": redis_server, "usable_cores": usable,
            "code": code,
            "variants": [{"key": v.key, "name": v.name} for v in chosen],
        }  # fmt: skip
        ratio = summarize(results)["meterwall"]["ratio"]["median"]
        if args.profile == "on" or (args.profile == "auto" and ratio < PROFILE_BELOW):
            mw = next(v for v in chosen if v.meterwall)
            env = {**mw.env, "MW_JOURNAL_DIR": os.path.join(tmp, "journal-profile")}
            results["profile"] = profile(mw, env, args, cores, client, tmp)
    return results


def profile(
    v: Variant, env: dict[str, str], args: argparse.Namespace, cores: Cores, client: Redis,
    tmp: str,
) -> dict[str, Any]:  # fmt: skip
    """One more run of the meterwall server under cProfile (warm-up, then one timed run)."""
    out = os.path.join(tmp, "server.prof")
    server = AiohttpServer(v.key, env, cores, profile_out=out)
    t = Target(v, server.start(), client, server.pings)
    try:
        drive(t, args, args.warmup)
        drive(t, args, args.duration)
    finally:
        server.stop()
    if not os.path.exists(out):
        return {"error": "the server wrote no profile"}
    return summarize_profile(Path(out), t.sent)


def summarize_profile(path: Path, requests: int, top: int = 12) -> dict[str, Any]:
    """Top functions by self time (all code), and meterwall's by cumulative time, per request."""
    stats: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    idle = {k for k in stats if "select.epoll" in k[2]}  # the loop waiting: not server work
    total = max(sum(v[2] for k, v in stats.items() if k not in idle), 1e-9)

    def label(key: tuple[str, int, str]) -> str:
        file, line, name = key
        if file == "~":
            return name
        parts = Path(file).parts
        for root in ("meterwall_aiohttp", "meterwall", "aiohttp", "benchmarks"):
            if root in parts:
                file = "/".join(parts[len(parts) - parts[::-1].index(root) - 1 :])
                break
        else:
            file = Path(file).name
        return f"{file}:{line}({name})"

    def row(key: Any, value: Any) -> dict[str, Any]:
        _, calls, tt, ct, _ = value
        return {"function": label(key), "calls": calls, "self_us": tt / requests * 1e6,
                "cum_us": ct / requests * 1e6, "self_share": tt / total,
                "cum_share": ct / total}  # fmt: skip

    by_self = sorted((k for k in stats if k not in idle), key=lambda k: -stats[k][2])
    ours = [k for k in stats if "meterwall" in Path(k[0]).parts
            or "meterwall_aiohttp" in Path(k[0]).parts]  # fmt: skip
    ours.sort(key=lambda k: -stats[k][3])

    def cum(name: str, file_part: str) -> float:
        return float(sum(v[3] for k, v in stats.items() if k[2] == name and file_part in k[0]))

    def cum_from(name: str, file_part: str, caller: str) -> float:
        """Cumulative time of ``name`` in calls from the function named ``caller``."""
        return float(sum(ct for k, v in stats.items() if k[2] == name and file_part in k[0]
                         for c, (_, _, _, ct) in v[4].items() if c[2] == caller))  # fmt: skip

    handlers = cum("echo", "aiohttp_apps") + cum("ping", "aiohttp_apps")
    # The adapter reads the body ahead for the handler (which then gets it from aiohttp's
    # cache): the bare app pays that read in its handler, so it is no cost of meterwall's.
    body_read = cum_from("read", "web_request", "_read_ahead")
    own = cum("meterwall_middleware", "meterwall_aiohttp") - handlers - body_read
    return {
        "requests": requests, "total_s": total,
        "flusher_share": cum("_flush_once", "flusher") / total,
        "middleware_share": own / total, "body_read_share": body_read / total,
        "path_parts": {name: cum(fn, part) / total for name, fn, part in (
            ("`_scope` (the ASGI-shaped view of the request)", "_scope", "meterwall_aiohttp"),
            ("`Meterwall.complete` (metering, journal, queue)", "complete", "middleware.py"),
            ("`_finish` (timing, route template)", "_finish", "meterwall_aiohttp"),
            ("`_on_prepare` (response headers hook)", "_on_prepare", "meterwall_aiohttp"),
        )},
        "meterwall_self_share": sum(stats[k][2] for k in ours) / total,
        "top_self": [row(k, stats[k]) for k in by_self[:top]],
        "top_meterwall": [row(k, stats[k]) for k in ours[:top]],
    }  # fmt: skip


# --- figures ------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per variant: medians with min-max; ratio and added CPU paired with bare per repetition."""
    rows = results["rounds"]
    bare = {r["rep"]: r for r in rows if r["variant"] == "bare"}
    out: dict[str, dict[str, Any]] = {}
    for v in results["variants"]:
        mine = [r for r in rows if r["variant"] == v["key"]]
        s: dict[str, Any] = {
            name: _spread([r[name] for r in mine])
            for name in ("rps", "p50_ms", "p99_ms", "cpu_us", "redis_cmds", "redis_cpu_us")
            if all(r.get(name) is not None for r in mine)
        }
        s["ratio"] = _spread([r["rps"] / bare[r["rep"]]["rps"] for r in mine])
        s["cpu_added_us"] = _spread([r["cpu_us"] - bare[r["rep"]]["cpu_us"] for r in mine])
        s["peak_rss_mib"] = max(r["VmHWM"] for r in mine) / 1024
        s["errors"] = sum(r["non_2xx"] + r["socket_errors"] for r in mine)
        out[v["key"]] = s
    return out


def _fmt(s: dict[str, float] | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    m, lo, hi = (s[k] for k in ("median", "min", "max"))
    return f"{m:.{digits}f} <sub>{lo:.{digits}f}-{hi:.{digits}f}</sub>"


def table(results: dict[str, Any]) -> list[str]:
    summary = summarize(results)
    lines = [
        "| variant | req/s | ratio to bare | p50 ms | p99 ms | server CPU µs/req "
        "| CPU added µs/req | Redis cmds/req | Redis CPU µs/req | peak RSS MiB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in results["variants"]:
        s = summary[v["key"]]
        added = "-" if v["key"] == "bare" else _fmt(s["cpu_added_us"])
        lines.append(
            f"| {v['name']} | {_fmt(s['rps'], 0)} | **{_fmt(s['ratio'], 2)}** "
            f"| {_fmt(s['p50_ms'], 2)} | {_fmt(s['p99_ms'], 2)} | {_fmt(s['cpu_us'])} | {added} "
            f"| {_fmt(s.get('redis_cmds'), 3)} | {_fmt(s.get('redis_cpu_us'))} "
            f"| {s['peak_rss_mib']:.1f} | {s['errors']} |"
        )
    return lines


def check_lines(results: dict[str, Any]) -> list[str]:
    out = ["Checks:", ""]
    for key, c in results["checks"].items():
        if "meterwall_counted" in c:
            counted, sent, cut = c["meterwall_counted"], c["client_completed"], c["max_cut"]
            if counted == sent:
                same = "**equal**"
            elif results["generator"] == "wrk" and 0 < counted - sent <= cut:
                same = (f"**consistent**: wrk stops with up to one request in flight per "
                        f"connection (at most {cut} here), which the server still answers and "
                        f"counts")  # fmt: skip
            else:
                same = f"**differ by {counted - sent:+d}**"
            out.append(
                f"- {key}: meterwall counted {counted} requests, the load generator "
                f"completed {sent} (readiness pings and warm-up included): {same}"
            )
        problems = "; ".join(c["log_problems"]) or "nothing alarming"
        out.append(f"- {key}: server exit code {c['exit_code']} (0 is a clean stop); "
                   f"log: {problems}")  # fmt: skip
    errors = sum(r["non_2xx"] + r["socket_errors"] for r in results["rounds"])
    out.append(f"- load errors (non-2xx and socket errors, all runs): {errors}")
    return out


def profile_lines(prof: dict[str, Any] | None) -> list[str]:
    if not prof:
        return []
    if "error" in prof:
        return [f"Profile: {prof['error']}."]
    parts = ", ".join(f"{name} {share:.1%}" for name, share in prof["path_parts"].items())
    out = [
        f"Profile of the meterwall server (cProfile in the server, one run of the same load, "
        f"{prof['requests']} requests, {prof['total_s']:.1f} s of profiled time, waits in epoll "
        f"left out; the profiler inflates Python calls, read the shares): the adapter's request "
        f"path (`meterwall_middleware` less the handlers and less the body read it does ahead "
        f"for the handler, {prof['body_read_share']:.0%}, which the bare app pays in its "
        f"handler) takes **{prof['middleware_share']:.0%}** of the server's time ({parts}), the "
        f"flusher task **{prof['flusher_share']:.0%}**; meterwall's own Python code (self time) "
        f"{prof['meterwall_self_share']:.0%}. A coroutine's resumptions count as calls.",
        "",
        "| top functions by self time | calls | self µs/req | cumulative µs/req | share (self) |",
        "|---|---:|---:|---:|---:|",
    ]
    out += [f"| `{r['function']}` | {r['calls']} | {r['self_us']:.1f} | {r['cum_us']:.1f} "
            f"| {r['self_share']:.1%} |" for r in prof["top_self"]]  # fmt: skip
    out += [
        "",
        "| meterwall function (by cumulative time) | calls | self µs/req | cumulative µs/req "
        "| share (cumulative) |",
        "|---|---:|---:|---:|---:|",
    ]
    out += [f"| `{r['function']}` | {r['calls']} | {r['self_us']:.1f} | {r['cum_us']:.1f} "
            f"| {r['cum_share']:.1%} |" for r in prof["top_meterwall"]]  # fmt: skip
    return out


def machine(usable: int) -> list[str]:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [ln.partition(":")[2].strip() for ln in info if ln.startswith("model name")]
    from aiohttp import http_parser

    parser = "C" if http_parser.HttpRequestParser.__module__.endswith("_http_parser") else "Python"
    return [
        f"- machine: {platform.platform()}, CPU {names[0] if names else platform.processor()}, "
        f"{len(names) or '?'} cores ({usable} usable)",
        f"- Python {platform.python_version()}, aiohttp "
        f"{importlib.metadata.version('aiohttp')} (`web.run_app`, 1 process, asyncio loop, "
        f"{parser} HTTP parser, access log off)",
    ]


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    gen = results["generator"]
    gen_text = generator_text(gen)
    la = results["load_avg"]
    s = summarize(results)["meterwall"]
    lines = [
        *machine(results["usable_cores"]),
        f"- code: {results['code']} (the servers load it from the working tree)",
        f"- Redis: {results['redis_server']} (private, `EmbeddedRedis`, persistence off)",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"took {results.get('wall_s', 0):.0f} s",
        f"- command: `{args.command}`",
        f"- load generator: {gen_text}, separate process; {results['cores']}",
        f"- load average (1 min) at start {la[0][0]:.2f}, at end {la[-1][0]:.2f} "
        "(above ~0.1 at start means something else was running on the cores)",
        "",
        f"`{args.path}`, {args.connections} connections, {args.reps} repetitions of "
        f"{args.duration:g} s per variant, alternating (A B, B A, ...) after a discarded "
        f"{args.warmup:g} s warm-up each; median <sub>min-max</sub>. The ratio and the CPU added "
        "are paired with the bare app's run of the same repetition. meterwall is configured as "
        "variant 4 of `python -m benchmarks` (metering + sealed records, `X-Consumer`), "
        "the same requests (1 KiB JSON body).",
        "",
        *table(results),
        "",
        f"meterwall_aiohttp / bare aiohttp: **{s['ratio']['median']:.2f}** of the req/s "
        f"(min-max {s['ratio']['min']:.2f}-{s['ratio']['max']:.2f}), "
        f"**{s['cpu_added_us']['median']:+.1f} µs** of server CPU per request.",
    ]
    prof = profile_lines(results.get("profile"))
    lines += ["", *prof] if prof else []
    lines += ["", *check_lines(results)]
    return "\n".join(lines) + "\n"


# --- other benchmarks and RESULTS.md ------------------------------------------------------------


def wait_for_others(limit_s: float, what: str) -> bool:
    """Poll every 30 s until no other benchmark runs; False if one still runs after limit_s."""
    deadline = time.monotonic() + limit_s
    while busy := other_benchmarks():
        if time.monotonic() > deadline:
            print(f"still running after {limit_s:.0f} s: {busy}", file=sys.stderr)
            return False
        print(f"waiting for another benchmark before {what}: {busy}", file=sys.stderr,
              flush=True)  # fmt: skip
        time.sleep(_POLL_S)
    return True


def write_results(text: str) -> None:
    """Replace this command's section of RESULTS.md (others' edits stay)."""
    replace_section(BEGIN, END, text, SECTION_TITLE)


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=" ".join(RUN_AS), description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 3 s")
    parser.add_argument("--duration", type=float, help="seconds per run (default 10, quick 3)")
    parser.add_argument("--reps", type=int, help="repetitions per variant (default 5, quick 3)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--path", default="/echo", choices=["/echo", "/ping"])
    parser.add_argument("--generator", default="auto", choices=["auto", "wrk", "asyncio"])
    parser.add_argument(
        "--profile", default="auto", choices=["auto", "on", "off"],
        help=f"profile the meterwall server for one more run (auto: if the ratio is below "
             f"{PROFILE_BELOW})",
    )  # fmt: skip
    parser.add_argument(
        "--wait", type=float, default=1200.0, metavar="S",
        help="wait up to S seconds for other benchmarks to finish, before measuring and before "
             "writing (polling every 30 s; default 1200)",
    )  # fmt: skip
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.generator == "wrk" and load.generator() != "wrk":
        parser.error("wrk is not on PATH (apt-get install wrk)")
    args.gen = load.generator() if args.generator == "auto" else args.generator
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.reps = args.reps or (3 if args.quick else 5)
    if args.reps < 1 or args.duration <= 0 or args.connections < 1:
        parser.error("--reps, --duration and --connections must be positive")
    args.warmup = 1.0 if args.quick else 2.0
    args.settle = 0.3  # > MW_FLUSH_INTERVAL: the last flush of a run is counted in it
    args.command = shlex.join([*RUN_AS, *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not wait_for_others(args.wait, "measuring"):
        raise SystemExit("another benchmark is still running: not measuring")
    t0 = time.monotonic()
    results = run(args)
    results["wall_s"] = time.monotonic() - t0
    text = markdown(results, args)
    print()
    print(text, end="")
    if args.write:
        if not wait_for_others(args.wait, "writing RESULTS.md"):
            raise SystemExit("another benchmark is still running: RESULTS.md left as it was")
        write_results(text)  # re-reads the file right before replacing the section
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the servers on SIGTERM too
    main()
