"""Load generators: wrk when it is installed, else a keep-alive asyncio client (this module).

Both send the same requests: ``POST /echo`` with a 1 KiB JSON body (``password`` field), a query
string with an ``api_key``, an ``Authorization: Bearer`` header and an ``X-Consumer`` header that
rotates over 4 consumers. Each connection keeps one request in flight (closed loop), like wrk.
The bearer token of each consumer is a real meterwall API key when ``BENCH_API_KEYS`` holds one
per consumer (the orchestrator makes them once per run), else a fixed fake token.

Run as ``python -m benchmarks.load --port N`` it drives a server and prints one JSON line:
requests, non-2xx responses, socket errors, elapsed seconds and latency percentiles (ms). It
imports nothing heavy, so that it starts fast and leaves the CPU to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONSUMERS = ("acme", "globex", "initech", "umbrella")
#: Comma-separated API keys, one per consumer in the order of CONSUMERS.
API_KEYS_ENV = "BENCH_API_KEYS"
QUERY = "dry_run=1&api_key=sk_test_4eC39HqLyjWDarjtT1"
PERCENTILES = (50, 90, 99)


def make_body() -> bytes:
    """The 1 KiB JSON body of benchmarks/overhead.py (same bytes)."""
    doc = {"username": "ada", "password": "correct horse battery staple", "note": ""}
    doc["note"] = "x" * (1024 - len(json.dumps(doc, separators=(",", ":"))))
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) == 1024
    return body


def api_key(consumer: str) -> str:
    """The bearer token ``consumer`` sends: its key from ``BENCH_API_KEYS``, else a fake one."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if not keys:
        return f"sk_live_{CONSUMERS.index(consumer):04d}9f8e7d6c5b4a"
    if len(keys) != len(CONSUMERS):
        raise ValueError(f"{API_KEYS_ENV} holds {len(keys)} keys, expected {len(CONSUMERS)}")
    return keys[CONSUMERS.index(consumer)]


def request_parts(path: str, consumer: str) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """(method, target, headers without host, body) of one benchmark request."""
    headers = [
        ("User-Agent", "bench/1.0"),
        ("Accept", "application/json"),
        ("X-Consumer", consumer),
        ("Authorization", f"Bearer {api_key(consumer)}"),
    ]
    if path == "/ping":
        return "GET", path, headers, b""
    body = make_body()
    headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    return "POST", f"{path}?{QUERY}", headers, body


def raw_request(host: str, path: str, consumer: str) -> bytes:
    method, target, headers, body = request_parts(path, consumer)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- the asyncio client -----------------------------------------------------------------------


async def _connection(
    host: str, port: int, request: bytes, deadline: float, lat: list[int], counts: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    clock = time.perf_counter_ns
    try:
        while time.monotonic() < deadline:
            t0 = clock()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if length is None:
                raise ValueError("response without Content-Length")
            await reader.readexactly(int(length.group(1)))
            lat.append(clock() - t0)
            if not head.startswith(b"HTTP/1.1 2"):
                counts[1] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError):
        counts[2] += 1
    finally:
        writer.close()


async def _drive(
    host: str, port: int, path: str, connections: int, duration: float
) -> dict[str, Any]:
    requests = [raw_request(f"{host}:{port}", path, CONSUMERS[i % 4]) for i in range(connections)]
    lat: list[int] = []
    counts = [0, 0, 0]  # unused, non-2xx, socket errors
    t0 = time.monotonic()
    deadline = t0 + duration
    await asyncio.gather(*(_connection(host, port, r, deadline, lat, counts) for r in requests))
    elapsed = time.monotonic() - t0
    lat.sort()
    pct = {
        f"p{p}_ms": lat[min(len(lat) - 1, len(lat) * p // 100)] / 1e6 if lat else None
        for p in PERCENTILES
    }
    return {
        "requests": len(lat),
        "non_2xx": counts[1],
        "socket_errors": counts[2],
        "elapsed_s": elapsed,
        **pct,
    }


# -- wrk ---------------------------------------------------------------------------------------

_LUA = """\
local reqs = {}
local n = 0
init = function(args)
%s
end
request = function()
  n = n + 1
  return reqs[(n %% #reqs) + 1]
end
"""


def wrk_script(path: str) -> str:
    """A wrk Lua script that sends the same requests as the asyncio client."""

    def lua(text: str | bytes) -> str:
        raw = text.encode() if isinstance(text, str) else text
        return '"' + "".join(f"\\{b:03d}" for b in raw) + '"'

    lines = []
    for i, consumer in enumerate(CONSUMERS):
        method, target, headers, body = request_parts(path, consumer)
        table = ", ".join(f"[{lua(k)}] = {lua(v)}" for k, v in headers)
        lines.append(
            f"  reqs[{i + 1}] = wrk.format({lua(method)}, {lua(target)}, "
            f"{{{table}}}, {lua(body) if body else 'nil'})"
        )
    return _LUA % "\n".join(lines)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def parse_wrk(text: str) -> dict[str, Any]:
    def ms(value: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
        if m is None:
            raise RuntimeError(f"cannot read wrk's duration {value!r}")
        return float(m.group(1)) * _UNITS[m.group(2)]

    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    pct = {
        f"p{p}_ms": ms(m.group(1)) if (m := re.search(rf"^\s+{p}%\s+(\S+)", text, re.M)) else None
        for p in PERCENTILES
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return {
        "requests": int(done.group(1)),
        "elapsed_s": ms(done.group(2) + done.group(3)) / 1e3,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
        **pct,
    }


# -- one run from the orchestrator -------------------------------------------------------------


def generator() -> str:
    """ "wrk" when wrk is on PATH, else "asyncio"."""
    return "wrk" if shutil.which("wrk") else "asyncio"


def wrk_version() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return ""
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip().splitlines()[0] if out.stdout + out.stderr else "wrk"


def run_load(
    kind: str,
    port: int,
    path: str,
    connections: int,
    duration: float,
    cwd: Path,
    python: str,
    preexec: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Drive 127.0.0.1:port from a separate process; returns the client's figures."""
    if kind == "wrk":
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(wrk_script(path))
        try:
            cmd = [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--latency",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}{path}",
            ]
            out = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                check=True,
                preexec_fn=preexec,
                timeout=duration + 30,
            )
        finally:
            Path(script.name).unlink()
        return parse_wrk(out.stdout)
    cmd = [
        python,
        "-m",
        "benchmarks.load",
        "--port",
        str(port),
        "--path",
        path,
        "--connections",
        str(connections),
        "--duration",
        str(duration),
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
        preexec_fn=preexec,
        timeout=duration + 30,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="keep-alive asyncio HTTP/1.1 load generator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/echo", choices=["/echo", "/ping"])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds")
    args = parser.parse_args()
    result = asyncio.run(_drive(args.host, args.port, args.path, args.connections, args.duration))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
