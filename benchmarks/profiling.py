"""Where a variant's server time goes under load: cProfile inside the uvicorn process.

``benchmarks.apps:profiled`` builds the app named by ``BENCH_PROFILE_FACTORY`` with cProfile on
from the start and dumps the stats to ``BENCH_PROFILE_OUT`` once lifespan shutdown is complete
(after meterwall's final flush). The profiler slows Python calls down (often 1.5-2x), so read
the shares, not the absolute µs.
"""

from __future__ import annotations

import cProfile
import os
import pstats
from pathlib import Path
from typing import Any

from meterwall.types import ASGIApp, Message, Receive, Scope, Send

# Wrappers whose cumulative time includes the app or the server's socket writes.
_WRAPPERS = {
    ("middleware.py", "__call__"), ("middleware.py", "_http"), ("capture.py", "send"),
    ("capture.py", "receive"), ("flusher.py", "_run"), ("flusher.py", "flush_once"),
}  # fmt: skip


def profiled_app(inner: ASGIApp, out: str) -> ASGIApp:
    profiler = cProfile.Profile()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await inner(scope, receive, send)
            return

        async def watch_send(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.shutdown.complete":
                profiler.disable()
                profiler.dump_stats(out)

        await inner(scope, receive, watch_send)

    profiler.enable()
    return app


def summarize(path: Path, requests: int, top: int = 12) -> dict[str, Any]:
    """Total profiled time, meterwall's share, and its top functions by cumulative time."""
    stats: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    idle = [k for k in stats if "select.epoll" in k[2]]  # the loop waiting: not server work
    total = max(sum(v[2] for k, v in stats.items() if k not in idle), 1e-9)
    ours = {k: v for k, v in stats.items() if f"{os.sep}meterwall{os.sep}" in k[0]}
    flusher = sum(v[3] for k, v in ours.items() if k[2] == "_flush_once")
    rows = []
    for (file, line, name), (_, calls, tt, ct, _) in ours.items():
        if (Path(file).name, name) in _WRAPPERS:
            continue
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": calls,
                     "self_us": tt / requests * 1e6, "cum_us": ct / requests * 1e6,
                     "cum_share": ct / total})  # fmt: skip
    rows.sort(key=lambda r: -r["cum_us"])
    return {"requests": requests, "total_s": total, "flusher_share": flusher / total,
            "meterwall_self_share": sum(v[2] for v in ours.values()) / total,
            "top": rows[:top]}  # fmt: skip


def lines(prof: dict[str, Any]) -> list[str]:
    if not prof or "top" not in prof:
        return []
    out = [
        f"Profile of variant {prof['variant']} under load (cProfile in the server, "
        f"{prof['requests']} requests, {prof['total_s']:.1f} s of profiled time, waits in "
        f"epoll left out; the profiler "
        f"inflates Python calls, read the shares): the flusher task takes "
        f"**{prof['flusher_share']:.0%}** of the server's time; meterwall's own Python code "
        f"(self time) {prof['meterwall_self_share']:.0%}.",
        "",
        "| meterwall function | calls | self µs/req | cumulative µs/req | share of server time |",
        "|---|---:|---:|---:|---:|",
    ]
    out += [f"| `{r['function']}` | {r['calls']} | {r['self_us']:.1f} | {r['cum_us']:.1f} "
            f"| {r['cum_share']:.1%} |" for r in prof["top"]]  # fmt: skip
    return out
