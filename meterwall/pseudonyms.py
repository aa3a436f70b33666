"""Keyed IP pseudonyms whose keys are destroyed after the retention window (DESIGN decision 5).

``pseudonym = HMAC-SHA256(epoch key, canonical 16-byte IP)[:16]``. Epoch keys are random, one per
hour, made by whichever writer needs one first, and stored in Redis only wrapped (AES-256-GCM)
under a key derived from ``MW_PSEUDONYM_SECRET``. The wrapped keys expire with the retention
window, so afterwards nobody can link a pseudonym to an address, not even with the secret. An
unkeyed hash would be useless: the IPv4 space is enumerated in minutes.

When Redis is away, a writer makes a local epoch key and publishes it as soon as Redis answers
again (before any record that used it is stored); an epoch can thus hold more than one key, and a
search by IP tries them all. Pseudonyms are cached per epoch because the same clients repeat.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .clientip import canonical_ip, network_prefix
from .keyspace import Keyspace

log = logging.getLogger("meterwall")

HOUR = 3600
DAY = 86400
_CACHE_LIMIT = 65536
EPOCH_SCRIPT = resources.files("meterwall").joinpath("lua/epoch_key.lua").read_text()
INVALID = "ip:invalid"


def derive(secret: bytes, label: str) -> bytes:
    """A 32-byte key for one purpose, so no two purposes ever share a key."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"meterwall|" + label.encode()
    ).derive(secret)


def keyed_id(key: bytes, value: str) -> bytes:
    """16-byte keyed identifier of a consumer or key id, for the per-slice indexes."""
    return hmac.new(key, value.encode(), hashlib.sha256).digest()[:16]


@dataclass(slots=True)
class Epoch:
    """One hour's pseudonym key (its IP and network sub-keys) and a cache of its results."""

    hour: int
    key_id: str
    secret: bytes
    ip_key: bytes
    net_key: bytes
    published: bool
    cache: dict[bytes, tuple[bytes, bytes]] = field(default_factory=dict)

    @classmethod
    def from_secret(cls, hour: int, key_id: str, secret: bytes, published: bool) -> Epoch:
        return cls(hour, key_id, secret, derive(secret, "ip"), derive(secret, "net"), published)

    def pseudonyms(self, ip16: bytes) -> tuple[bytes, bytes]:
        """(address pseudonym, network-prefix pseudonym), 16 bytes each."""
        hit = self.cache.get(ip16)
        if hit is None:
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache.clear()
            hit = (
                hmac.new(self.ip_key, ip16, hashlib.sha256).digest()[:16],
                hmac.new(self.net_key, network_prefix(ip16), hashlib.sha256).digest()[:16],
            )
            self.cache[ip16] = hit
        return hit


class IpPseudonymiser:
    """Turns client addresses into hourly pseudonyms; used by the flusher, never per request.

    ``daily=True`` makes the daily keys of the unique-client counts instead: random too, agreed
    through Redis the same way, and deleted a retention window after their day, so that nobody
    can later test whether an address is in a day's count (the counts outlive the key).
    """

    def __init__(self, secret: bytes, keyspace: Keyspace, retention_s: int, *,
                 daily: bool = False) -> None:  # fmt: skip
        self._wrap = AESGCM(derive(secret, "uniques-key-wrap" if daily else "epoch-key-wrap"))
        self._keyspace = keyspace
        self._retention = retention_s
        self._period = DAY if daily else HOUR
        self._name = keyspace.uniques_keys if daily else keyspace.epoch_keys
        self._epochs: dict[int, Epoch] = {}
        self._local_secrets: dict[int, bytes] = {}

    def _wrap_key(self, hour: int, key_id: str, secret: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._wrap.encrypt(nonce, secret, f"{hour}|{key_id}".encode())

    def unwrap(self, hour: int, key_id: str, wrapped: bytes) -> bytes | None:
        """An epoch key from Redis, or None if it was wrapped under another secret."""
        try:
            return self._wrap.decrypt(wrapped[:12], wrapped[12:], f"{hour}|{key_id}".encode())
        except (InvalidTag, ValueError):
            return None

    async def prepare(self, hour: int, redis: Any) -> None:
        """Agree on the epoch key of ``hour`` with the other writers (one script call per hour).

        Raises the Redis error if Redis cannot be reached; ``epoch`` then makes a local key.
        """
        known = self._epochs.get(hour)
        if known is not None and known.published:
            return
        if known is not None:  # made while Redis was away: publish it as one more key
            secret = self._local_secrets[hour]
            await self._call(redis, hour, known.key_id, secret, add=True)
            known.published = True
            del self._local_secrets[hour]
            return
        key_id, secret = os.urandom(8).hex(), os.urandom(32)
        reply = await self._call(redis, hour, key_id, secret, add=False)
        fields = {reply[i].decode(): reply[i + 1] for i in range(0, len(reply), 2)}
        for candidate in sorted(fields):
            chosen = self.unwrap(hour, candidate, fields[candidate])
            if chosen is not None:
                self._epochs[hour] = Epoch.from_secret(hour, candidate, chosen, published=True)
                break
        else:
            log.error("meterwall: epoch keys in Redis were made under another MW_PSEUDONYM_SECRET")
            await self._call(redis, hour, key_id, secret, add=True)
            self._epochs[hour] = Epoch.from_secret(hour, key_id, secret, published=True)
        self._forget_before(hour)

    async def _call(self, redis: Any, hour: int, key_id: str, secret: bytes, *, add: bool) -> Any:
        expire_at = (hour + 1) * self._period + self._retention
        return await redis.eval(
            EPOCH_SCRIPT,
            1,
            self._name(hour),
            key_id,
            self._wrap_key(hour, key_id, secret),
            expire_at,
            "add" if add else "first",
            self._period,
        )

    def epoch(self, hour: int) -> Epoch:
        """The epoch of ``hour``; a local, not yet published key if ``prepare`` could not run."""
        known = self._epochs.get(hour)
        if known is None:
            key_id, secret = os.urandom(8).hex(), os.urandom(32)
            known = Epoch.from_secret(hour, key_id, secret, published=False)
            self._epochs[hour] = known
            self._local_secrets[hour] = secret
            self._forget_before(hour)
        return known

    def clear_caches(self) -> None:
        """Forget cached pseudonyms: their keys are addresses, kept no longer than one flush."""
        for epoch in self._epochs.values():
            epoch.cache.clear()

    def republish(self) -> None:
        """Redis lost its data (a restart without persistence): publish every live key again."""
        for hour, epoch in self._epochs.items():
            if epoch.published:
                epoch.published = False
                self._local_secrets[hour] = epoch.secret

    def unpublished_hours(self) -> list[int]:
        """Hours whose local key must reach Redis before any record that used it."""
        return sorted(self._local_secrets)

    def text(self, address: str, hour: int) -> str:
        """Display form of an address's pseudonym for stored headers; never raises."""
        ip16 = canonical_ip(address)
        if ip16 is None:
            return INVALID
        return "ip:" + self.epoch(hour).pseudonyms(ip16)[0].hex()

    def _forget_before(self, hour: int) -> None:
        """Forget epoch keys the retention window no longer needs (Redis drops them too)."""
        oldest = hour - self._retention // self._period - 1
        for old in [h for h in self._epochs if h < oldest]:
            del self._epochs[old]
            self._local_secrets.pop(old, None)
