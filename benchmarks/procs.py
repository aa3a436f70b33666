"""Processes the benchmark starts and watches: uvicorn servers, pinning, /proc and Redis stats."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from meterwall.keyspace import SEP, TAG_IP, records_named, tag_range

ROOT = Path(__file__).resolve().parent.parent  # the project root: `benchmarks` is importable
CLK_TCK = os.sysconf("SC_CLK_TCK")
_START_TIMEOUT = 30.0
_PROBLEM = re.compile(r"ERROR|Error|unavailable|dropped|failed|refused")
# A load generator that stops at its deadline cuts requests in flight; the app's body read
# then raises this, which says nothing about the variant.
_BENIGN = "starlette.requests.ClientDisconnect"
# meterwall's start-up notes on trade-offs in force (the consumer header, the access
# failure policy ``MW_ACCESS_ON_REDIS_ERROR=open``): chosen by the variant, not alarming.
_NOTE = "meterwall: trade-off in force: "


@dataclass(frozen=True)
class Cores:
    """Server on its own core, everything else (client, Redis, this process) on the others."""

    server: set[int] | None
    rest: set[int] | None

    @classmethod
    def plan(cls) -> Cores:
        if not hasattr(os, "sched_getaffinity"):
            return cls(None, None)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None)
        return cls({cpus[-1]}, set(cpus[:-1]))

    def describe(self) -> str:
        if self.server is None:
            return "not pinned (fewer than 2 usable cores)"
        return (
            f"server pinned to CPU {sorted(self.server)}; load generator, Redis and the "
            f"orchestrator to CPU {sorted(self.rest or ())}"
        )

    def pin(self, cpus: set[int] | None) -> Callable[[], None] | None:
        """A ``preexec_fn`` that pins the child (and the threads it will make) to ``cpus``."""
        if cpus is None:
            return None
        return lambda: os.sched_setaffinity(0, cpus)


def uvicorn_impl(http: str = "auto") -> tuple[str, str]:
    """(http, loop) as uvicorn's ``auto`` would pick them; passed explicitly and reported."""
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return http, loop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@dataclass
class Server:
    """One single-worker uvicorn process serving ``benchmarks.apps:<factory>``."""

    factory: str
    env: dict[str, str]
    cores: Cores
    http: str = "auto"
    port: int = 0
    pings: int = 0  # successful GET /ping sent while waiting for it (the app counts them)
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))

    def command(self) -> list[str]:
        """The server's command line, for ``self.port`` (an aiohttp server names its own)."""
        http, loop = uvicorn_impl(self.http)
        return [
            sys.executable,
            "-m",
            "uvicorn",
            f"benchmarks.apps:{self.factory}",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-access-log",
            "--log-level",
            "warning",
            "--http",
            http,
            "--loop",
            loop,
            "--lifespan",
            "on",
        ]

    def start(self) -> Server:
        self.port = free_port()
        cmd = self.command()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=out,
                preexec_fn=self.cores.pin(self.cores.server),
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.factory} exited at start:\n{self.log_tail()}")
            if _ping(self.port):
                self.pings += 1
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.factory} did not answer in {_START_TIMEOUT:g}s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the server process so far."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory_kib(self) -> dict[str, int]:
        """VmHWM (peak RSS) and VmRSS in KiB."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                out[name] = int(value.split()[0])
        return out

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").strip()
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> tuple[int | None, list[str], int]:
        """SIGTERM (lifespan shutdown, meterwall's final flush).

        Returns the exit code, the alarming lines of its log and the number of benign
        ClientDisconnect tracebacks.

        uvicorn re-raises the signal once it has shut down cleanly, so -15 is a clean exit."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
            self.proc = None
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        problems, benign = log_problems(text)
        self.log.unlink(missing_ok=True)
        return code, problems, benign


def redis_stats(client: Redis) -> dict[str, Any]:
    """Command calls so far (INFO itself left out), server CPU seconds and used memory."""
    stats = client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    calls.pop("info", None)
    cpu = client.info("cpu")
    memory = client.info("memory")
    return {
        "calls": calls,
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "used_memory": int(memory["used_memory"]),
    }


def counted_requests(client: Redis, prefix: str = "mw") -> int:
    """The requests meterwall's 15-minute counters hold, over every shard and bucket."""
    sep = b"\x1f"  # meterwall.keyspace.SEP
    total = 0
    for key in client.scan_iter(match=f"{prefix}:*:c15:*", count=1000):
        for name, value in client.hgetall(key).items():
            field = name if isinstance(name, bytes) else name.encode()
            if field.rsplit(sep, 1)[-1] == b"requests":
                total += int(value)
    return total


def stored_records(client: Redis, prefix: str = "mw") -> tuple[int, int]:
    """(records stored, records dropped) in a variant's Redis: every benchmark record has a
    client address, so the address members of the slice indexes name each stored record once."""
    stored = dropped = 0
    for key in client.scan_iter(match=f"{prefix}:*:ix:*", count=1000):
        stored += sum(records_named(m) for m in client.zrangebylex(key, *tag_range(TAG_IP)))
    for key in client.scan_iter(match=f"{prefix}:*:stats", count=1000):
        dropped += int(client.hget(key, "records_dropped") or 0)
    return stored, dropped


def ledger_day_bytes(client: Redis, consumers: Sequence[str], prefix: str = "mw") -> dict[str, Any]:
    """Bytes of the usage ledger per consumer-route-day, from ``MEMORY USAGE`` of day hashes.

    Each consumer's day hash (``<prefix>:{sNN}:cd:<consumer>:<YYYY-MM-DD>``, one per local day)
    holds fields ``key id SEP route SEP method SEP status SEP measure``; the "routes" of a hash
    are its distinct (key id, route, method, status) combinations. Returns the median over the
    hashes found (normally one per consumer) of its bytes, routes, fields and bytes per route.
    """
    rows = []
    for consumer in consumers:
        for key in client.scan_iter(match=f"{prefix}:*:cd:{consumer}:*", count=1000):
            fields = [f.decode() if isinstance(f, bytes) else str(f) for f in client.hkeys(key)]
            if not fields:
                continue
            size = client.memory_usage(key, samples=0)
            if size is None:
                continue
            routes = {f.rpartition(SEP)[0] for f in fields}
            latency = sum(1 for f in fields if f.rpartition(SEP)[2].startswith("lat:"))
            encoding = client.object("encoding", key)
            rows.append(
                {
                    "bytes": int(size),
                    "routes": len(routes),
                    "fields": len(fields),
                    "latency_buckets": latency,
                    "per_route": int(size) / len(routes),
                    "encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
                }
            )
    if not rows:
        return {}
    out: dict[str, Any] = {
        name: statistics.median(float(r[name]) for r in rows)
        for name in ("bytes", "routes", "fields", "latency_buckets", "per_route")
    }
    out["hashes"] = len(rows)
    out["encodings"] = sorted({str(r["encoding"]) for r in rows})
    return out


def log_problems(text: str) -> tuple[list[str], int]:
    """Alarming log lines, each traceback reduced to its exception line; benign ones counted."""
    problems: list[str] = []
    lines, benign = text.splitlines(), 0
    in_traceback = False
    for line in lines:
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            if line.strip() == _BENIGN:
                benign += 1
            else:
                problems.append(line)
        elif (
            not in_traceback
            and _PROBLEM.search(line)
            and "Exception in ASGI" not in line
            and not line.startswith(_NOTE)
        ):
            problems.append(line)
    return problems, benign


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ancestors(pid: int) -> list[int]:
    out = []
    while (pid := _ppid(pid)) > 1:
        out.append(pid)
    return out


def _is_benchmark(argv: list[str]) -> bool:
    """A Python process running a module or script of benchmarks/ (not an editor, not a shell)."""
    if not argv or not Path(argv[0]).name.startswith("python"):
        return False
    return any(a == "benchmarks" or a.startswith(("benchmarks.", "benchmarks/"))
               or "/benchmarks/" in a for a in argv[1:])  # fmt: skip


def other_benchmarks() -> list[str]:
    """``pgrep -f benchmarks``, less this process, its ancestors and its children, and less
    whatever is not a Python process running benchmarks (shells, editors, ruff, pgrep)."""
    found = subprocess.run(["pgrep", "-f", "benchmarks"], capture_output=True, text=True,
                           check=False).stdout.split()  # fmt: skip
    me = os.getpid()
    mine = {me, *_ancestors(me)}
    busy = []
    for text in found:
        pid = int(text)
        if pid in mine or me in _ancestors(pid):
            continue  # this process, the shells that started it, or a process it started
        try:
            argv = [a.decode(errors="replace") for a in
                    Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]  # fmt: skip
        except OSError:
            continue
        if _is_benchmark(argv):
            busy.append(f"{pid}: {shlex.join(argv)}")
    return busy
