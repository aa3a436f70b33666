"""The targets of issue 7, each judged met / NOT met from one run's figures, plainly."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

IN_PROCESS_TARGET_US = 18.0


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def _paired(results: dict[str, Any], a: str, b: str, phase: str = "throughput") -> float | None:
    """Median over repetitions of req/s of ``a`` divided by req/s of ``b`` in the same rep."""
    rows = {(r["variant"], r["rep"]): r["rps"] for r in results["rounds"] if r["phase"] == phase}
    pairs = [rows[(a, rep)] / rows[(b, rep)] for (v, rep) in rows if v == a and (b, rep) in rows]
    return float(statistics.median(pairs)) if pairs else None


def _paired_added(
    results: dict[str, Any], a: str, b: str, figure: Callable[[dict[str, Any]], float | None],
    phase: str = "throughput",
) -> float | None:  # fmt: skip
    """Median over repetitions of ``figure`` of ``a`` minus ``figure`` of ``b`` in the same rep."""
    rows = {(r["variant"], r["rep"]): figure(r) for r in results["rounds"] if r["phase"] == phase}
    pairs = [
        x - y
        for (v, rep), x in rows.items()
        if v == a and x is not None and (y := rows.get((b, rep))) is not None
    ]
    return float(statistics.median(pairs)) if pairs else None


def _lease_calls(row: dict[str, Any]) -> float | None:
    """Script calls (EVALSHA and EVAL) per request of one run: flushes and the limiter's leases."""
    calls = row.get("redis_calls")
    if calls is None:
        return None
    scripts: int = calls.get("evalsha", 0) + calls.get("eval", 0)
    return scripts / max(int(row["requests"]), 1)


def _slow_note(rate: float) -> str:
    if rate >= 5000:
        return ""
    return (
        " (below 5,000 req/s each flush's fixed commands are shared by fewer requests, "
        "so this overstates the figure at 5,000)"
    )


def lines(results: dict[str, Any]) -> list[str]:
    from .report import added_in_process, summarize

    thr = summarize(results, "throughput")
    single = summarize(results, "single")
    out: list[str] = []

    def ratio(key: str, target: float, label: str) -> None:
        s = thr.get(key)
        if s is None:
            out.append(f"- {label} at least {target:.2f} of bare: not run")
            return
        r = s["ratio"]
        out.append(
            f"- {label}: at least {target:.2f} of the bare app's req/s: {r['median']:.2f} "
            f"(min-max {r['min']:.2f}-{r['max']:.2f}): {_verdict(r['median'] >= target)}"
        )

    ratio("3", 0.90, "Metering only (3)")
    ratio("4", 0.75, "Metering + sealed records (4)")
    ratio("5", 0.70, "Everything on (5: sealed records, API keys, rate limit and quota)")
    cmds = [(k, thr[k]) for k in ("3", "4") if k in thr and "redis_cmds" in thr[k]]
    if cmds:
        ok = all(s["redis_cmds"]["median"] < 0.05 for _, s in cmds)
        rate = min(s["rps"]["median"] for _, s in cmds)
        figures = "; ".join(
            f"{k}: {s['redis_cmds']['median']:.3f} at {s['rps']['median']:.0f} req/s"
            for k, s in cmds
        )
        note = _slow_note(rate)
        out.append(
            f"- Redis commands per request under 0.05 for 3 and 4 (INFO commandstats, "
            f"including the commands run inside the flush script): {figures}{note}: "
            f"{_verdict(ok)}"
        )
    if "5" in thr and "redis_cmds" in thr["5"]:
        s5 = thr["5"]
        out.append(
            f"- Redis commands per request under 0.1 for 5 (as above, the lease script's "
            f"commands included): {s5['redis_cmds']['median']:.3f} at {s5['rps']['median']:.0f} "
            f"req/s{_slow_note(s5['rps']['median'])}: {_verdict(s5['redis_cmds']['median'] < 0.1)}"
        )
    else:
        out.append("- Redis commands per request under 0.1 for 5: not run")
    vs6 = {b: x for b in ("6a", "6b") if (x := _paired(results, "5", b)) is not None}
    others = [
        f"{a} / {b} = {x:.2f}x"
        for a, b in (("4", "6a"), ("4", "6b"), ("3", "6a"), ("3", "6b"), ("3", "6c"))
        if (x := _paired(results, a, b)) is not None
    ]
    if vs6:
        ok = vs6.get("6a", 3.0) >= 3.0 and vs6.get("6b", 1.5) >= 1.5
        figures = ", ".join(f"5 / {b} = {x:.2f}x" for b, x in vs6.items())
        verdict = _verdict(ok) if len(vs6) == 2 else f"{_verdict(ok)} (one alternative not run)"
    else:
        figures, verdict = "not run", ""
    out.append(
        "- Everything on (5) at least 3x the BaseHTTPMiddleware + Redis logger (6a) and 1.5x "
        f"the Redis rate limiter (6b) in req/s, paired per repetition: {figures}"
        + (f": {verdict}" if verdict else "")
        + (f" (for reference: {', '.join(others)})" if others else "")
    )
    access = _paired(results, "5", "4")
    out.append(
        "- Access control costs at most 10% of throughput: req/s of 5 at least 0.90 of 4's, "
        "paired per repetition: "
        + (f"{access:.2f}: {_verdict(access >= 0.90)}" if access is not None else "not run")
    )
    leases = _paired_added(results, "5", "4", _lease_calls)
    out.append(
        "- Redis round trips of the limiter per admitted request under 0.1: script calls "
        "(EVALSHA and EVAL) per request of 5 minus 4's, paired per repetition: "
        + (f"{leases:.4f}: {_verdict(leases < 0.1)}" if leases is not None else "not run")
    )
    micro = results.get("overhead", {})
    added = added_in_process(micro.get("text", ""))
    if added is None:
        out.append(
            f"- In-process CPU of the whole pipeline under {IN_PROCESS_TARGET_US:g} µs per "
            "request: not measured (overhead.py skipped or failed)"
        )
    else:
        out.append(
            f"- In-process CPU of the whole pipeline under {IN_PROCESS_TARGET_US:g} µs per "
            f"request (1 KiB body, everything on; `{micro['command']}`, section below): "
            f"{added:.1f} µs: {_verdict(added < IN_PROCESS_TARGET_US)}"
        )
    if single:
        rises = [(k, single[k]["p99_added_ms"]["median"]) for k in ("3", "4", "5") if k in single]
        text = ", ".join(f"{k}: {d:+.2f} ms" for k, d in rises)
        bare = single["1"]["p99_ms"]["median"]
        out.append(
            f"- Single-connection p99 rises at most 1 ms over the bare app ({bare:.2f} ms): "
            f"{text}: {_verdict(all(d <= 1.0 for _, d in rises))}"
        )
    else:
        out.append(
            "- Single-connection p99 rises at most 1 ms over the bare app: not measured "
            "(single-connection phase off; it is on by default outside --quick)"
        )
    p50 = _paired_added(results, "5", "4", lambda r: r["p50_ms"], "single")
    p99 = _paired_added(results, "5", "4", lambda r: r["p99_ms"], "single")
    if p50 is not None and p99 is not None:
        out.append(
            f"- Latency the access check adds (key lookup from the cache, rules, limits) under "
            f"50 µs at p50: single-connection latency of 5 minus 4, paired per repetition: "
            f"p50 {p50 * 1000:+.0f} µs, p99 {p99 * 1000:+.0f} µs: {_verdict(p50 < 0.050)}"
        )
    else:
        out.append(
            "- Latency the access check adds under 50 µs at p50 (single-connection latency of "
            "5 minus 4): not measured"
            + ("" if single else " (single-connection phase off; on by default outside --quick)")
        )
    if "1" in thr and "4" in thr:
        added_mib = thr["4"]["peak_rss_mib"] - thr["1"]["peak_rss_mib"]
        first, last = thr["4"]["rss_first_last_mib"]
        out.append(
            f"- RSS added by meterwall under sustained load under 30 MiB: peak RSS of 4 "
            f"minus bare = {added_mib:.1f} MiB: {_verdict(added_mib < 30)}; flat over a "
            f"10-minute run: {_soak_text()} (RSS of 4 after its first and last repetition of "
            f"this run: {first:.1f} and {last:.1f} MiB)"
        )
    if "4" in thr and "redis_mem_per_req" in thr["4"]:
        per = thr["4"]["redis_mem_per_req"]["median"]
        base = thr.get("3", {}).get("redis_mem_per_req", {}).get("median")
        counters = f"; variant 3, counters only: {base:.0f} B" if base is not None else ""
        out.append(
            f"- Redis memory per stored raw record under 400 B (/echo, 1 KiB body): "
            f"{per:.0f} B per request (used_memory growth of variant 4's own Redis per "
            f"request, counters included{counters}): {_verdict(per < 400)}"
        )
    out.append(_ledger_text(results))
    return out


def _soak_text() -> str:
    """The soak's figures when RESULTS.md holds its section (``python -m benchmarks --soak``)."""
    from .soak import SLOPE_TARGET, recorded

    soak = recorded()
    if soak is None or "slope_mib_min" not in soak:
        return "not measured here (`python -m benchmarks --soak 600` measures it)"
    added = soak.get("added_mib")
    added_text = (
        f"peak RSS of 4 minus bare {added:.1f} MiB: {_verdict(soak['added_ok'])}; "
        if added is not None
        else ""
    )
    return (
        f'see the section "Memory under sustained load" below (`{soak["command"]}`, '
        f"{soak['date']}): {added_text}slope of 4's RSS over the last "
        f"{soak['window_min']:.2g} minutes {soak['slope_mib_min']:+.3f} MiB/min (flat: under "
        f"{SLOPE_TARGET:g}): {_verdict(soak['flat_ok'])}"
    )


def _ledger_text(results: dict[str, Any]) -> str:
    """Bytes per consumer-route-day: MEMORY USAGE of the consumers' day hashes after the run."""
    found = [(k, c["ledger"]) for k in ("3", "4", "5")
             if (c := results["checks"].get(k, {})).get("ledger")]  # fmt: skip
    if not found:
        return "- Ledger bytes per consumer-route-day: not measured (variants 3, 4 and 5 not run)"
    key, ledger = found[0]
    others = "".join(f"; variant {k}: {x['per_route']:.0f} B" for k, x in found[1:])
    fields, buckets = ledger["fields"], ledger["latency_buckets"]
    return (
        f"- Ledger bytes per consumer-route-day: {ledger['per_route']:.0f} B (`MEMORY USAGE` of "
        f"each consumer's day hash `mw:{{sNN}}:cd:<consumer>:<YYYY-MM-DD>` in variant {key}'s "
        f"Redis after the run, divided by its (key id, route, method, status) combinations; "
        f"median over {ledger['hashes']} hashes: {ledger['bytes']:g} B, {ledger['routes']:g} "
        f"route(s), {fields:g} fields ({fields - buckets:g} measures and {buckets:g} latency "
        f"buckets), {'/'.join(ledger['encodings'])} encoding{others})"
    )


def checks(results: dict[str, Any]) -> list[str]:
    """Sanity checks: exact counts, clean exits, no load errors."""
    out = ["Checks:", ""]
    for key, c in results["checks"].items():
        if "meterwall_counted" in c:
            counted, sent, cut = c["meterwall_counted"], c["client_completed"], c["max_cut"]
            if counted == sent:
                same = "equal"
            elif results["generator"] == "wrk" and 0 < counted - sent <= cut:
                same = (
                    f"consistent: wrk stops with up to one request in flight per connection "
                    f"(at most {cut} here), which the server still answers and counts"
                )
            else:
                same = f"**differ by {counted - sent:+d}**"
            out.append(
                f"- variant {key}: meterwall counted {counted} requests, the load "
                f"generator completed {sent}: {same}"
            )
            if c.get("records") is not None:
                stored, dropped = c["records"]
                whole = "every one" if stored == counted else f"**{stored - counted:+d}**"
                out.append(
                    f"- variant {key}: sealed records stored in Redis after the server stopped: "
                    f"{stored} ({whole}), dropped for lack of buffer space: {dropped}"
                )
        if c.get("exit_code") not in (0, -15) or c.get("log_problems"):
            problems = "; ".join(c["log_problems"]) or "clean"
            out.append(f"- variant {key}: server exit code {c.get('exit_code')}; log: {problems}")
    clean = [
        k
        for k, c in results["checks"].items()
        if c.get("exit_code") in (0, -15) and not c.get("log_problems")
    ]
    cut = {
        k: c["client_disconnects"]
        for k, c in results["checks"].items()
        if c.get("client_disconnects")
    }
    out.append(
        f"- servers that shut down cleanly with nothing alarming in their log: "
        f"{', '.join(clean) or 'none'}"
        + (
            f" (ClientDisconnect tracebacks of requests cut when the load generator "
            f"stopped, benign: {cut})"
            if cut
            else ""
        )
    )
    errors = sum(r["non_2xx"] + r["socket_errors"] for r in results["rounds"])
    out.append(f"- load errors (non-2xx and socket errors, all runs): {errors}")
    return out
