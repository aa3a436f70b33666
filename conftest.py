"""Shared fixtures for the meterwall test suite.

Redis: every test that needs a server uses the session-wide ``redis_url`` (a private
``EmbeddedRedis``, unless ``MW_TEST_REDIS_URL`` points at a server you run yourself) plus a
per-test ``key_prefix``, so tests never see each other's keys.

Add new fixtures below, in a section for their topic.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meterwall import Secret, Settings
from meterwall.embedded import EmbeddedRedis
from meterwall.sealing import load_private_key

# --- Redis ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the Redis the suite runs against; started once per session unless given."""
    external = os.environ.get("MW_TEST_REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def key_prefix() -> str:
    """A prefix unique to this test, valid as a meterwall key prefix."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An async client (bytes responses) for the suite's Redis, closed after the test."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# --- Keys and settings ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keypair() -> tuple[bytes, str]:
    """A record-sealing key pair for the session: (private PEM, public base64)."""
    from meterwall.sealing import generate_keypair

    return generate_keypair()


@pytest.fixture
def settings(
    redis_url: str, key_prefix: str, keypair: tuple[bytes, str], tmp_path: Path
) -> Settings:
    """Secure-default settings against the suite's Redis, isolated by the test's key prefix
    (and with a journal directory of the test's own)."""
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        record_public_key=keypair[1],
        pseudonym_secret=Secret(os.urandom(32)),
        flush_interval=0.02,
        journal_dir=str(tmp_path / "journal"),
    )


@pytest.fixture
def private_key(keypair: tuple[bytes, str]) -> X25519PrivateKey:
    return load_private_key(keypair[0])
