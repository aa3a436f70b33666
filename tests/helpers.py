"""Small helpers shared by test modules."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from asyncio.subprocess import Process
from collections.abc import Mapping
from typing import Any


def this_hour() -> tuple[int, int]:
    """A counter read range covering the last hour (unix seconds)."""
    now = int(time.time())
    return now - 3600, now + 60


async def command_calls(redis: Any) -> dict[str, int]:
    """Calls per command so far (INFO commandstats: it counts what scripts run inside Redis)."""
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def command_calls_since(redis: Any, before: dict[str, int]) -> dict[str, int]:
    """The commands run since ``before`` (``command_calls``), those run at least once."""
    after = await command_calls(redis)
    return {name: calls - before.get(name, 0) for name, calls in after.items()
            if calls > before.get(name, 0)}  # fmt: skip


async def serve(env: Mapping[str, str], count: int) -> tuple[list[Process], list[int]]:
    """``count`` single-worker uvicorn processes of ``tests.served_app``, sharing only Redis."""
    servers, ports = [], []
    for _ in range(count):
        listener = socket.create_server(("127.0.0.1", 0))
        # uvicorn takes an inherited descriptor for a Unix socket and so never sets TCP_NODELAY
        # on its connections; a connection inherits it from the listener. Without it an answer
        # written in two parts (head, body) waits for the client's delayed ACK: 40 ms a request.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ports.append(listener.getsockname()[1])
        servers.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "uvicorn", "tests.served_app:app", "--fd",
                str(listener.fileno()), "--log-level", "warning", "--no-access-log",
                env={**os.environ, **env}, pass_fds=[listener.fileno()],
            )
        )  # fmt: skip
        listener.close()
    return servers, ports


async def stop(servers: list[Process], how: signal.Signals = signal.SIGTERM) -> None:
    """Signal every server and wait; SIGTERM is graceful (the lifespan shutdown flushes)."""
    for server in servers:
        server.send_signal(how)
    for server in servers:  # uvicorn re-raises the signal once it has shut down cleanly
        assert await asyncio.wait_for(server.wait(), 30) in (0, -signal.SIGTERM, -signal.SIGKILL)


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to a local server, one request at a time.

    A request through httpx costs the test process about 0.4 ms of CPU, taken from the servers
    under test on a small machine (tens of thousands of requests: seconds); this costs about
    25 µs: a request is a few bytes written, an answer a head and a ``Content-Length`` body read.
    There is no pipelining: like a real client, a connection waits for each answer. It reads only
    what the served test app sends (``Content-Length`` bodies, no chunked encoding).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, path: str, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """Send ``GET path`` and read the whole answer: (status, body)."""
        self._writer.write(_head("GET", path, headers))
        head = await self._reader.readuntil(b"\r\n\r\n")
        length = _CONTENT_LENGTH.search(head)
        if length is None:
            raise ValueError(f"an answer without Content-Length: {head!r}")
        body = await self._reader.readexactly(int(length.group(1)))
        return int(head[9:12]), body

    async def hold(self, path: str, headers: Mapping[str, str]) -> None:
        """Start a ``POST`` whose one-byte body waits for ``100 Continue``; return when the server
        asks for it, which it does when the app first reads the body (uvicorn, h11 or httptools).
        The request then never ends. The server has come back to its event loop since it wrote
        any answer this client read before: whatever it does synchronously after writing an
        answer (meterwall journals the request) is done."""
        self._writer.write(_head("POST", path, {**headers, "Content-Length": "1",
                                                "Expect": "100-continue"}))  # fmt: skip
        head = await self._reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 100 "):
            raise ValueError(f"expected 100 Continue, got {head!r}")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):  # the server may be gone (killed) already
            await self._writer.wait_closed()


def _head(method: str, path: str, headers: Mapping[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
