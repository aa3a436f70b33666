"""A fault-injection toolkit for tests: a TCP proxy in front of Redis that misbehaves on purpose,
and helpers that stall or crash Redis. Pure Python, seeded, so a failing run can be replayed."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Faults:
    """Probabilities, per chunk a client sends (redis-py writes a command or a pipeline at once)."""

    drop_request: float = 0.0  # the chunk never reaches Redis; the connection is closed
    drop_reply: float = 0.0  # the chunk reaches Redis, its reply is swallowed, connection closed
    reset: float = 0.0  # the chunk reaches Redis, then the connection is reset (RST)
    half_open: float = 0.0  # nothing moves any more, the connection stays open (a dead peer)
    delay: float = 0.0  # the chunk waits ``delay_s`` before it is forwarded
    delay_s: float = 0.05
    # Every reply chunk reaches the client this long after Redis sent it, in order: a slow link
    # or a slow Redis. Unlike ``delay`` (the request pump sleeps, one chunk after the other), it
    # adds latency without capping throughput: chunks wait side by side in a delay line.
    reply_delay_s: float = 0.0
    # While set, every reply is swallowed and the connection stays open: a client's commands run
    # in Redis and it times out waiting (a reply lost on the way, not a connection lost).
    mute_replies: bool = False
    # When set, only chunks holding these bytes (say b"EVAL": the flush script's calls) meet the
    # faults above; every other chunk passes untouched.
    only: bytes = b""
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class FaultProxy:
    """Forwards 127.0.0.1:<port> to Redis at ``target_port``, injecting ``faults``."""

    def __init__(self, target_port: int, faults: Faults | None = None) -> None:
        self.target_port = target_port
        self.faults = faults or Faults()
        self._random = random.Random(self.faults.seed)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port: int = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._sockets:
            writer.close()
        # wait until every transport is really closed: a loop closed before that leaks them
        await asyncio.gather(*(w.wait_closed() for w in self._sockets), return_exceptions=True)
        await self._server.wait_closed()

    def _roll(self, name: str) -> bool:
        hit = self._random.random() < getattr(self.faults, name)
        if hit:
            self.faults.counts[name] = self.faults.counts.get(name, 0) + 1
        return hit

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()  # Redis is down: so is the proxy, for this connection
            return
        self._sockets += [client_w, server_w]
        link: dict[str, Any] = {"swallow": False, "frozen": False}
        task = asyncio.current_task()
        for pump in (self._requests(client_r, server_w, client_w, link),
                     self._replies(server_r, client_w, link)):  # fmt: skip
            child = asyncio.create_task(pump)
            self._tasks.add(child)
        if task is not None:
            self._tasks.discard(task)

    async def _requests(self, src: asyncio.StreamReader, server_w: asyncio.StreamWriter,
                        client_w: asyncio.StreamWriter, link: dict[str, Any]) -> None:  # fmt: skip
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if link["frozen"]:
                    continue
                if self.faults.only and self.faults.only not in data:
                    server_w.write(data)
                    await server_w.drain()
                    continue
                if self._roll("half_open"):
                    link["frozen"] = True
                    continue
                if self._roll("drop_request"):
                    break
                if self._roll("delay"):
                    await asyncio.sleep(self.faults.delay_s)
                server_w.write(data)
                await server_w.drain()
                if self._roll("drop_reply"):
                    link["swallow"] = True
                    await asyncio.sleep(0.05)  # let Redis run it, then hang up on the client
                    break
                if self._roll("reset"):
                    await asyncio.sleep(0.01)
                    _reset(client_w)
                    return
        client_w.close()
        server_w.close()

    async def _replies(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       link: dict[str, Any]) -> None:  # fmt: skip
        with contextlib.suppress(ConnectionError, OSError):
            async for data in self._arrivals(src):
                if link["swallow"] or link["frozen"] or self.faults.mute_replies:
                    continue
                dst.write(data)
                await dst.drain()
        dst.close()

    async def _arrivals(self, src: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """The reply chunks, each ``reply_delay_s`` after it arrived (at once when 0)."""
        hold = self.faults.reply_delay_s
        if hold <= 0:
            while data := await src.read(65536):
                yield data
            return
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            try:
                with contextlib.suppress(ConnectionError, OSError):
                    while data := await src.read(65536):
                        line.put_nowait((loop.time() + hold, data))
            finally:
                line.put_nowait((loop.time() + hold, b""))  # the end, held like the data

        reader = asyncio.create_task(receive())
        self._tasks.add(reader)
        while True:
            due, data = await line.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                return
            yield data


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN, as a crashed peer or a middlebox does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def stall(redis: Any, seconds: float) -> None:
    """Make Redis unresponsive for ``seconds`` (every client waits), as a slow disk would."""
    await redis.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
