"""The command line, run as a user runs it: a real process, real Redis."""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meterwall import Meterwall, Settings
from tests.test_flusher import ok_app
from tests.test_middleware import _discard, body_receive, http_scope


def meterwall(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    return subprocess.run(
        [sys.executable, "-m", "meterwall", *args],
        env={**clean, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_keygen_writes_a_private_key_0600_and_prints_exportable_settings(tmp_path: Path) -> None:
    done = meterwall("keygen", "--private-key", "reader.pem", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    key_file = tmp_path / "reader.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert sorted(lines) == ["MW_PSEUDONYM_SECRET", "MW_RECORD_PUBLIC_KEY"]
    assert Settings.from_env(lines).records == "sealed"  # what it prints is valid as is
    again = meterwall("keygen", "--private-key", "reader.pem", cwd=tmp_path)
    assert again.returncode != 0
    assert again.stderr.count("\n") == 1
    assert "exists" in again.stderr


async def test_audit_exits_0_on_a_clean_store_and_1_on_a_failure(redis, settings) -> None:
    mw = Meterwall(ok_app, settings=settings)
    for _ in range(3):
        await mw(http_scope(), body_receive(b'{"password": "x"}'), _discard)
    await mw.aclose()
    env = {"MW_REDIS_URL": settings.redis_url, "MW_KEY_PREFIX": settings.key_prefix}
    clean = meterwall("audit", env=env)
    assert clean.returncode == 0, clean.stdout
    assert "FAIL" not in clean.stdout
    await redis.set(f"{settings.key_prefix}:{{s01}}:rec:5", "x")
    dirty = meterwall("audit", env=env)
    assert dirty.returncode == 1
    assert "has no expiry" in dirty.stdout


def test_errors_are_one_line_without_a_traceback() -> None:
    bad_setting = meterwall("audit", env={"MW_RAW_RETENTION": "48h"})
    assert bad_setting.returncode == 2
    assert bad_setting.stderr.startswith("meterwall: error: MW_RAW_RETENTION: must be between")
    assert bad_setting.stderr.count("\n") == 1
    unreachable = meterwall("audit", env={"MW_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert unreachable.returncode == 2
    assert "Traceback" not in unreachable.stderr
    assert unreachable.stderr.count("\n") == 1
    unknown = meterwall("frobnicate")
    assert unknown.returncode == 2
    assert unknown.stderr.count("\n") == 1
    for args in (
        ("admin", "--port", "99999"),
        ("usage", "--top", "0", "--period", "2026-11"),
        ("demo", "--requests", "-5"),
        ("usage", "adjustments", "--period", "*"),
    ):
        refused = meterwall(*args, env={"MW_RECORDS": "off"})
        assert refused.returncode == 2, args
        assert refused.stderr.count("\n") == 1, (args, refused.stderr)
    with socket.socket() as taken:  # a port in use: one line, not uvicorn's log
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = meterwall("admin", "--host", "127.0.0.1", "--port", port, env={"MW_RECORDS": "off"})
    assert busy.returncode == 2
    assert busy.stderr.startswith("meterwall: error: cannot listen on 127.0.0.1:")
    assert busy.stderr.count("\n") == 1


async def test_a_demo_whose_traffic_fails_stops_its_api_and_redis(monkeypatch) -> None:
    from rich.console import Console

    from meterwall import demo as demo_module

    seen: list[str] = []

    async def failing(base: str, count: int) -> None:
        seen.append(base)
        raise RuntimeError("the network went away")

    monkeypatch.setattr(demo_module, "_traffic", failing)
    with pytest.raises(OSError, match="stopped answering"):
        await demo_module.run_demo(Console(file=io.StringIO()), count=10)
    [base] = seen
    port = int(base.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # nobody listens any more


def test_demo_runs_end_to_end_and_proves_its_privacy_claims() -> None:
    done = meterwall("demo", "--requests", "60")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "60 sealed records stored in Redis" in out
    assert "none found" in out
    assert (
        "audit: expiry pass, age pass, plaintext pass, index pass, records pass, "
        "restrictions pass, persistence pass, eviction pass"
    ) in " ".join(out.split())
    assert '"password": "***"' in out
    assert "Bearer fp:" in out
    assert "everything started is stopped" in out


def test_the_privacy_notice_follows_the_live_settings() -> None:
    base = {"MW_RECORDS": "off"}
    small = meterwall("privacy-notice", env={**base, "MW_BODY_LIMIT": "1KiB"})
    large = meterwall("privacy-notice", env={**base, "MW_BODY_LIMIT": "64KiB"})
    assert small.returncode == 0, small.stderr
    assert small.stdout != large.stdout
    html = meterwall("privacy-notice", "--format", "html", env=base)
    assert html.stdout.lstrip().lower().startswith("<!doctype html>")
    broken = meterwall("privacy-notice", env={**base, "MW_RAW_RETENTION": "48h"})
    assert (broken.returncode, broken.stderr.count("\n")) == (2, 1)
    assert "MW_RAW_RETENTION" in broken.stderr
