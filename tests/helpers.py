"""Small helpers shared by test modules."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from asyncio.subprocess import Process
from collections.abc import Mapping


def this_hour() -> tuple[int, int]:
    """A counter read range covering the last hour (unix seconds)."""
    now = int(time.time())
    return now - 3600, now + 60


async def serve(env: Mapping[str, str], count: int) -> tuple[list[Process], list[int]]:
    """``count`` single-worker uvicorn processes of ``tests.served_app``, sharing only Redis."""
    servers, ports = [], []
    for _ in range(count):
        listener = socket.create_server(("127.0.0.1", 0))
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
