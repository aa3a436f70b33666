"""An open-loop, paced HTTP/1.1 client: a fixed number of requests per second, whatever happens.

wrk and load.py's client are closed loops: when the server slows down they send less, which
hides the slowdown (coordinated omission) and cannot hold a rate such as "1,000 requests/s
through a 2-minute Redis outage". Here request ``i`` is due at ``start + i / rate``; a
dispatcher hands each due request to a pool of keep-alive connections (one request in flight
each, like a browser or a service client), and its latency is counted from the time it was due,
so a request that waits for a free connection is charged for the wait.

Run as ``python -m benchmarks.paced --port N --rate 1000 --duration 60 --consumers 200`` it
prints one JSON line: requests answered per consumer, non-2xx answers, socket errors,
latency percentiles, per-second latency and answers, and when it started on the system's
monotonic clock (``time.monotonic()``, the same in every process) so that its timeline can be
laid next to the orchestrator's. Like load.py it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from . import load

_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
PERCENTILES = (50, 90, 99, 99.9)
BIN_S = 0.01  # answers are counted per 10 ms bin of their completion time


def consumer_names(count: int) -> list[str]:
    """load.CONSUMERS (with real API keys when ``BENCH_API_KEYS`` is set) when 4 or fewer,
    else ``c000``, ``c001``, ... (their bearer tokens are then opaque)."""
    if count <= len(load.CONSUMERS):
        return list(load.CONSUMERS[:count])
    return [f"c{n:03d}" for n in range(count)]


def request_bytes(host: str, path: str, consumer: str) -> bytes:
    """load.py's request for ``consumer``; a consumer of its own gets a borrowed token."""
    if consumer in load.CONSUMERS:
        return load.raw_request(host, path, consumer)
    borrowed = load.CONSUMERS[int(consumer[1:]) % len(load.CONSUMERS)]
    raw = load.raw_request(host, path, borrowed)
    return raw.replace(
        f"X-Consumer: {borrowed}\r\n".encode(), f"X-Consumer: {consumer}\r\n".encode()
    )


@dataclass
class Tally:
    """What the connections saw; latencies in ns from the time each request was due."""

    start: float
    latency: list[int] = field(default_factory=list)
    service: list[int] = field(default_factory=list)  # from the write, without waiting for a slot
    answered: dict[str, int] = field(default_factory=dict)
    done_bins: dict[int, int] = field(default_factory=dict)
    by_second: dict[int, list[int]] = field(default_factory=dict)
    non_2xx: int = 0
    socket_errors: int = 0
    late_ns: int = 0  # how far behind its schedule the dispatcher fell, at most
    late_by_second: dict[int, int] = field(default_factory=dict)  # ... per second of schedule

    def late(self, due_ns: int, late_ns: int) -> None:
        """The dispatcher handed a request over ``late_ns`` after it was due: its own process
        did not run (its core was busy), which no server can be blamed for."""
        second = int(due_ns / 1e9 - self.start)
        self.late_ns = max(self.late_ns, late_ns)
        self.late_by_second[second] = max(self.late_by_second.get(second, 0), late_ns)

    def answer(self, consumer: str, due_ns: int, sent_ns: int, status_ok: bool) -> None:
        now = time.monotonic_ns()
        self.latency.append(now - due_ns)
        self.service.append(now - sent_ns)
        second = int(due_ns / 1e9 - self.start)
        self.by_second.setdefault(second, []).append(now - due_ns)
        if status_ok:
            self.answered[consumer] = self.answered.get(consumer, 0) + 1
            done = int((now / 1e9 - self.start) / BIN_S)
            self.done_bins[done] = self.done_bins.get(done, 0) + 1
        else:
            self.non_2xx += 1


Item = tuple[int, int] | None  # (request number, due time ns), or the end


async def _read_answer(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    length = _LENGTH.search(head)
    if length is None:
        raise ValueError("response without Content-Length")
    await reader.readexactly(int(length.group(1)))
    return head.startswith(b"HTTP/1.1 2")


async def _connection(
    host: str, port: int, queue: asyncio.Queue[Item], requests: list[tuple[str, bytes]],
    tally: Tally,
) -> None:  # fmt: skip
    """One keep-alive connection: takes due requests one at a time; reconnects after an error
    (the request that met the error counts as a socket error, not as answered)."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while (item := await queue.get()) is not None:
        number, due_ns = item
        consumer, raw = requests[number % len(requests)]
        try:
            if writer is None or reader is None:
                reader, writer = await asyncio.open_connection(host, port)
            sent_ns = time.monotonic_ns()
            writer.write(raw)
            ok = await _read_answer(reader)
            tally.answer(consumer, due_ns, sent_ns, ok)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            tally.socket_errors += 1
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _dispatch(queue: asyncio.Queue[Item], rate: float, total: int, tally: Tally) -> None:
    """Put every request on the queue at its due time (the loop wakes about once a ms)."""
    start_ns = int(tally.start * 1e9)
    sent = 0
    while sent < total:
        now = time.monotonic_ns()
        due_now = min(total, int((now - start_ns) * rate / 1e9) + 1)
        for number in range(sent, due_now):
            due_ns = start_ns + int(number * 1e9 / rate)
            tally.late(due_ns, now - due_ns)
            queue.put_nowait((number, due_ns))
        sent = due_now
        next_ns = start_ns + int(sent * 1e9 / rate)
        await asyncio.sleep(max(0.0, (next_ns - time.monotonic_ns()) / 1e9))


def _percentiles(values_ns: list[int]) -> dict[str, float | None]:
    ordered = sorted(values_ns)
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        at = min(len(ordered) - 1, int(len(ordered) * p / 100))
        out[f"p{p:g}_ms"] = ordered[at] / 1e6 if ordered else None
    out["max_ms"] = ordered[-1] / 1e6 if ordered else None
    return out


async def run_paced(
    host: str, port: int, path: str, rate: float, duration: float, connections: int,
    consumers: int,
) -> dict[str, Any]:  # fmt: skip
    """Send ``rate * duration`` requests on schedule over ``connections`` connections."""
    names = consumer_names(consumers)
    requests = [(c, request_bytes(f"{host}:{port}", path, c)) for c in names]
    queue: asyncio.Queue[Item] = asyncio.Queue()
    tally = Tally(start=time.monotonic() + 0.05)  # a moment to open the connections
    total = int(rate * duration)
    workers = [
        asyncio.create_task(_connection(host, port, queue, requests, tally))
        for _ in range(connections)
    ]
    await asyncio.sleep(max(0.0, tally.start - time.monotonic()))
    await _dispatch(queue, rate, total, tally)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - tally.start
    by_second = {s: _percentiles(v) for s, v in sorted(tally.by_second.items())}
    return {
        "scheduled": total, "answered": sum(tally.answered.values()),
        "answered_by_consumer": tally.answered, "non_2xx": tally.non_2xx,
        "socket_errors": tally.socket_errors, "rate": rate, "elapsed_s": elapsed,
        "start_monotonic": tally.start, "connections": connections, "consumers": len(names),
        "dispatch_late_max_ms": tally.late_ns / 1e6, **_percentiles(tally.latency),
        "service": _percentiles(tally.service),
        "per_second": [{"second": s, "n": len(tally.by_second[s]), "p50_ms": p["p50_ms"],
                        "p99_ms": p["p99_ms"], "max_ms": p["max_ms"],
                        "late_ms": tally.late_by_second.get(s, 0) / 1e6}
                       for s, p in by_second.items()],
        "done_bin_s": BIN_S, "done_bins": sorted(tally.done_bins.items()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="open-loop paced keep-alive HTTP/1.1 client")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/echo", choices=["/echo", "/ping"])
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of schedule")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--consumers", type=int, default=4, help="X-Consumer values, in turn")
    args = parser.parse_args()
    result = asyncio.run(run_paced(args.host, args.port, args.path, args.rate, args.duration,
                                   args.connections, args.consumers))  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
