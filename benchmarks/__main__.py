"""``python -m benchmarks``: meterwall side by side with the bare app and the usual alternatives.

Starts its own Redis servers and one single-worker uvicorn server per variant, drives them in
turn (A B C A B C ...) with a load generator in another process, and reports medians with their
spread. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time

from . import load, report
from .run import run

ALL = ("1", "2", "3", "4", "5", "6a", "6b", "6c")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 repetitions of 3 s (under 2 minutes in all)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(ALL),
        help="comma-separated, e.g. 1,3,4 (1, the bare app, is always added)",
    )
    parser.add_argument("--duration", type=float, help="seconds per run (default 10, quick 3)")
    parser.add_argument("--reps", type=int, help="repetitions per variant (default 5, quick 3)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    parser.add_argument(
        "--single",
        choices=["on", "off"],
        help="also a single-connection latency phase (default: on, quick: off)",
    )
    parser.add_argument("--path", default="/echo", choices=["/echo", "/ping"])
    parser.add_argument(
        "--http",
        default="auto",
        choices=["auto", "h11", "httptools"],
        help="uvicorn's HTTP parser (auto: httptools when installed)",
    )
    parser.add_argument("--generator", default="auto", choices=["auto", "wrk", "asyncio"])
    parser.add_argument(
        "--profile",
        default="4",
        metavar="VARIANT",
        help="afterwards, profile this variant under load with cProfile (default 4; none: skip)",
    )
    parser.add_argument(
        "--no-overhead",
        action="store_true",
        help="skip the in-process per-stage microbenchmark (overhead.py)",
    )
    parser.add_argument(
        "--soak",
        type=float,
        metavar="S",
        help="instead: the memory soak, S seconds of load each for the bare app and variant 4 "
        "(600 for the issue's 10 minutes); --write updates only its RESULTS.md section",
    )
    parser.add_argument(
        "--write", action="store_true", help="update RESULTS.md, results.json and throughput.png"
    )
    args = parser.parse_args(argv)
    if args.soak is not None and args.soak < 10:
        parser.error("--soak needs at least 10 seconds (600 for the issue's 10 minutes)")
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(ALL))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(ALL)}")
    if args.generator == "wrk" and load.generator() != "wrk":
        parser.error("wrk is not on PATH (apt-get install wrk)")
    args.variants = [k for k in ALL if k in {"1", *keys}]
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.reps = args.reps or (3 if args.quick else 5)
    if args.reps < 1 or args.duration <= 0:
        parser.error("--reps and --duration must be positive")
    args.warmup = 1.0 if args.quick else 2.0
    args.settle = 0.3  # > MW_FLUSH_INTERVAL: the last flush of a run is counted in it
    args.phases = [("throughput", args.duration, args.connections, args.reps)]
    if (args.single or ("off" if args.quick else "on")) == "on":
        args.phases.append(("single", max(1.0, args.duration / 2), 1, args.reps))
    args.command = shlex.join(["python", "-m", "benchmarks", *(argv or sys.argv[1:])])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("meterwall").setLevel(logging.ERROR)
    if args.soak is not None:
        from .soak import main as soak

        soak(args)
        return
    t0 = time.monotonic()
    results = run(args)
    results["wall_s"] = time.monotonic() - t0
    text = report.markdown(results)
    print(text)
    if results["overhead"].get("text"):
        print("In-process per-stage microbenchmark (benchmarks/overhead.py):\n")
        print(results["overhead"]["text"])
    if args.write:
        for line in report.write(results, text):
            print(line)


if __name__ == "__main__":
    main()
