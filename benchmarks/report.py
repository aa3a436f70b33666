"""Figures of ``python -m benchmarks``: summary, Markdown section, results.json and the chart."""

from __future__ import annotations

import datetime
import json
import platform
import re
import statistics
from importlib.metadata import version
from pathlib import Path
from typing import Any

from . import load, profiling, targets
from .procs import uvicorn_impl

HERE = Path(__file__).parent
RESULTS_MD, RESULTS_JSON, CHART = (
    HERE / "RESULTS.md",
    HERE / "results.json",
    HERE / "throughput.png",
)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def variant_info(v: Any) -> dict[str, str]:
    return {"key": v.key, "name": v.name}


def progress(v: Any, phase: str, rep: int, row: dict[str, Any]) -> str:
    return (
        f"  [{phase} rep {rep + 1}] {v.key:>2} {v.name:<52} {row['rps']:8.0f} req/s  "
        f"p99 {row['p99_ms']:6.2f} ms  cpu {row['cpu_us']:6.1f} µs/req"
    )


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(results: dict[str, Any], phase: str) -> dict[str, dict[str, Any]]:
    """Per variant: medians with min-max of every figure; ratios paired with bare per rep."""
    rows = [r for r in results["rounds"] if r["phase"] == phase]
    bare = {r["rep"]: r for r in rows if r["variant"] == "1"}
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == key]
        s: dict[str, Any] = {
            name: _spread([r[name] for r in mine])
            for name in (
                "rps",
                "p50_ms",
                "p99_ms",
                "cpu_us",
                "redis_cmds",
                "redis_cpu_us",
                "redis_mem_per_req",
            )
            if all(r.get(name) is not None for r in mine)
        }
        s["ratio"] = _spread([r["rps"] / bare[r["rep"]]["rps"] for r in mine])
        s["p99_added_ms"] = _spread([r["p99_ms"] - bare[r["rep"]]["p99_ms"] for r in mine])
        s["peak_rss_mib"] = max(r["VmHWM"] for r in mine) / 1024
        s["rss_first_last_mib"] = (mine[0]["VmRSS"] / 1024, mine[-1]["VmRSS"] / 1024)
        s["errors"] = sum(r["non_2xx"] + r["socket_errors"] for r in mine)
        out[key] = s
    return out


def _fmt(s: dict[str, float] | None, digits: int = 1, scale: float = 1.0) -> str:
    if s is None:
        return "-"
    m, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} <sub>{lo:.{digits}f}-{hi:.{digits}f}</sub>"


def table(results: dict[str, Any], phase: str) -> list[str]:
    summary = summarize(results, phase)
    lines = [
        "| variant | req/s | ratio to bare | p50 ms | p99 ms | server CPU µs/req "
        "| Redis cmds/req | Redis CPU µs/req | peak RSS MiB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in results["variants"]:
        label = f"{v['key']}. {v['name']}"
        if v["key"] not in summary:
            why = results["skipped"].get(v["key"], "not run")
            lines.append(f"| {label} | {why} |  |  |  |  |  |  |  |  |")
            continue
        s = summary[v["key"]]
        cmds = _fmt(s.get("redis_cmds"), 3)
        lines.append(
            f"| {label} | {_fmt(s['rps'], 0)} | **{_fmt(s['ratio'], 2)}** | {_fmt(s['p50_ms'], 2)} "
            f"| {_fmt(s['p99_ms'], 2)} | {_fmt(s['cpu_us'])} | {cmds} "
            f"| {_fmt(s.get('redis_cpu_us'))} | {s['peak_rss_mib']:.1f} | {s['errors']} |"
        )
    return lines


def machine(http: str) -> list[str]:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [ln.partition(":")[2].strip() for ln in info if ln.startswith("model name")]
    http, loop = uvicorn_impl(http)
    return [
        f"- machine: {platform.platform()}, CPU {names[0] if names else platform.processor()}, "
        f"{len(names) or '?'} cores",
        f"- Python {platform.python_version()}, uvicorn {version('uvicorn')} (http={http}, "
        f"loop={loop}, 1 worker), Starlette {version('starlette')}",
    ]


def generator_text(generator: str) -> str:
    """How a run's load generator is named in RESULTS.md."""
    if generator == "wrk":
        return f"wrk ({load.wrk_version()}), 1 thread"
    return "asyncio keep-alive client (benchmarks/load.py; wrk not installed)"


def markdown(results: dict[str, Any]) -> str:
    args = results["args"]
    gen = results["generator"]
    gen_text = generator_text(gen)
    la = results["load_avg"]
    lines = [
        *machine(args["http"]),
        f"- Redis: {results['redis_server']} (one private server per variant that uses Redis)",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"took {results.get('wall_s', 0):.0f} s",
        f"- command: `{args['command']}`",
        f"- load generator: {gen_text}, separate process; {results['cores']}",
        f"- load average (1 min) at start {la[0][0]:.2f}, at end {la[-1][0]:.2f} "
        "(above ~0.1 at start means something else was running on the 2 cores)",
    ]
    for phase, duration, conns, reps in results["phases"]:
        lines += [
            "",
            f"**{phase}**: `{args['path']}`, {conns} connection{'s' if conns > 1 else ''}, "
            f"{reps} repetitions of {duration:g} s per variant, variants alternating "
            "(1 2 3 ..., 2 3 ... 1, ...) after a discarded warm-up; median <sub>min-max</sub>. "
            "The ratio is paired with the bare app's run of the same repetition.",
            "",
            *table(results, phase),
        ]
    lines += ["", "Targets of issue 7 (ratios from this run):", "", *targets.lines(results)]
    prof = profiling.lines(results.get("profile", {}))
    lines += ["", *prof] if prof else []
    lines += ["", *targets.checks(results)]
    return "\n".join(lines) + "\n"


def replace_section(begin: str, end: str, text: str, title: str = "") -> None:
    """Put ``text`` between two markers of RESULTS.md (appended, under ``title``, when they are
    missing). The file is read right before it is written, so other sections' edits stay."""
    old = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Results\n"
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        _, _, tail = rest.partition(end)
        new = f"{head}{begin}\n{text}{end}{tail}"
    else:
        heading = f"{title}\n\n" if title else ""
        new = f"{old.rstrip()}\n\n{heading}{begin}\n{text}{end}\n"
    RESULTS_MD.write_text(new)


def write(results: dict[str, Any], text: str) -> list[str]:
    replace_section(BEGIN, END, text)
    RESULTS_JSON.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return [f"wrote {RESULTS_MD.name}, {RESULTS_JSON.name}", chart(results)]


def chart(results: dict[str, Any]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            f"chart skipped: matplotlib is not installed (pip install matplotlib); "
            f"{CHART.name} left as it was"
        )
    summary = summarize(results, "throughput")
    keys = [v["key"] for v in results["variants"]]
    names = {v["key"]: v["name"] for v in results["variants"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, figure, title in (
        (axes[0], "ratio", "throughput, ratio to bare (higher is better)"),
        (axes[1], "p99_ms", "p99 latency, ms (lower is better)"),
    ):
        for i, key in enumerate(keys):
            s = summary.get(key, {}).get(figure)
            if s is None:
                ax.text(
                    i,
                    0,
                    "not run",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="grey",
                )
                continue
            err = [[s["median"] - s["min"]], [s["max"] - s["median"]]]
            color = "tab:green" if key in ("3", "4", "5") else "tab:grey"
            ax.bar(i, s["median"], yerr=err, capsize=4, color=color)
            ax.text(i, s["median"], f"{s['median']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(
            range(len(keys)),
            [f"{k}. {names[k]}" for k in keys],
            rotation=30,
            ha="right",
            fontsize=7,
        )
        ax.set_title(title, fontsize=10)
    axes[0].axhline(1.0, color="black", linewidth=0.6)
    date = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
    what = "POST /echo 1 KiB" if results["args"]["path"] == "/echo" else "GET /ping"
    fig.suptitle(
        f"meterwall vs bare app and alternatives, {what}, uvicorn 1 worker, "
        f"{results['generator']}; {date} (median, bars min-max)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(CHART, dpi=110)
    plt.close(fig)
    return f"wrote {CHART.name}"


def added_in_process(text: str) -> float | None:
    """'added by meterwall' µs from overhead.py's report."""
    m = re.search(r"added by meterwall\*\* \(paired per round\) \| \*\*([\d.]+) µs", text)
    return float(m.group(1)) if m else None
