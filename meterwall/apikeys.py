"""API keys: shown once, stored only as a keyed hash, recognisable by their shape and checksum.

Format: ``mw_<env>_<key id>_<secret><checksum>``: env is ``live`` or ``test``, the key id 12 hex
characters, the secret 32 base62 characters and the checksum 6 base62 characters of CRC-32 over
everything before it. The checksum lets a typo (or a scanner looking at a leaked string) be
recognised without asking Redis. Redis holds the key id, ``HMAC-SHA256(server key, full key)`` and
the metadata; comparisons are constant-time, and an unknown id takes the same path as a wrong
secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from ipaddress import ip_network
from typing import TYPE_CHECKING, Any

import orjson

from .consumers import check_consumer_id
from .errors import ConfigurationError
from .keyspace import Keyspace
from .pseudonyms import derive

if TYPE_CHECKING:
    from .settings import Settings

_ALPHABET = string.digits + string.ascii_letters
_SHAPE = re.compile(r"^mw_(live|test)_([0-9a-f]{12})_([0-9A-Za-z]{32})([0-9A-Za-z]{6})$")
MAX_KEY_LENGTH = 64


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), 6)


def new_key(env: str = "live") -> tuple[str, str]:
    """A fresh (key id, full key)."""
    key_id = secrets.token_hex(6)
    body = f"mw_{env}_{key_id}_" + "".join(secrets.choice(_ALPHABET) for _ in range(32))
    return key_id, body + _checksum(body)


def parse_key(text: str) -> str | None:
    """The key id of a well-formed key with a valid checksum, else None (never raises)."""
    if len(text) > MAX_KEY_LENGTH or not text.isascii():
        return None
    match = _SHAPE.match(text)
    if match is None or _checksum(text[:-6]) != match.group(4):
        return None
    return match.group(2)


@dataclass(frozen=True)
class ApiKey:
    """A key's metadata as stored (never its secret). Times are unix seconds, 0 = none."""

    id: str
    consumer: str
    digest: str
    plan: str = ""
    scopes: tuple[str, ...] = ()
    cidrs: tuple[str, ...] = ()
    expires: int = 0
    created: int = 0
    revoked: int = 0
    previous_digest: str = ""
    previous_until: int = 0
    env: str = "live"
    extra: dict[str, Any] = field(default_factory=dict)
    last_used: int = 0  # kept apart (``<prefix>:key-used``), written at most once a minute

    def state(self, now_s: int) -> str:
        """'valid', 'revoked' or 'expired'."""
        if self.revoked and self.revoked <= now_s:
            return "revoked"
        if self.expires and self.expires <= now_s:
            return "expired"
        return "valid"

    def public(self, now_s: int | None = None) -> dict[str, Any]:
        """What listings show: everything but the digests, and the state at ``now_s``."""
        shown = asdict(self)
        del shown["digest"], shown["previous_digest"], shown["extra"]
        shown["scopes"], shown["cidrs"] = list(self.scopes), list(self.cidrs)
        shown["state"] = self.state(int(time.time()) if now_s is None else now_s)
        return shown


_LONGEST_S = 20 * 365 * 86400  # the furthest a key's expiry may lie


class KeyStore:
    """API keys in Redis (``<prefix>:key:<id>``); for the CLI, the admin API and the middleware."""

    def __init__(self, redis: Any, keyspace: Keyspace, server_key: bytes) -> None:
        self._redis = redis
        self._keyspace = keyspace
        self._server_key = server_key

    @classmethod
    def for_settings(cls, redis: Any, settings: Settings) -> KeyStore:
        """The store of a deployment; raises ``ConfigurationError`` without MW_PSEUDONYM_SECRET."""
        if settings.pseudonym_secret is None:
            raise ConfigurationError("MW_PSEUDONYM_SECRET", "is required to manage API keys")
        return cls(
            redis, settings.keyspace(), derive(settings.pseudonym_secret.reveal(), "api-keys")
        )

    def digest(self, full_key: str) -> str:
        return hmac.new(self._server_key, full_key.encode(), hashlib.sha256).hexdigest()

    async def create(
        self, consumer: str, *, plan: str = "", scopes: tuple[str, ...] = (),
        cidrs: tuple[str, ...] = (), expires: int = 0, env: str = "live",
    ) -> tuple[ApiKey, str]:  # fmt: skip
        """A new key: its metadata and the full key, which is never stored or shown again."""
        check_consumer_id(consumer, setting="consumer")  # it names keys and ledger fields
        now = int(time.time())
        if not 0 <= expires <= now + _LONGEST_S:  # (one already past makes a revoked-like key)
            raise ConfigurationError("expires", "a unix time at most 20 years ahead, or 0")
        for cidr in cidrs:
            try:
                ip_network(cidr, strict=True)
            except ValueError:
                raise ConfigurationError("--cidr", f"{cidr!r} is not a network") from None
        if env not in ("live", "test"):
            raise ConfigurationError("--env", "use live or test")
        key_id, full = new_key(env)
        meta = ApiKey(key_id, consumer, self.digest(full), plan, tuple(scopes), tuple(cidrs),
                      expires, now, env=env)  # fmt: skip
        await self._save(meta)
        return meta, full

    async def get(self, key_id: str) -> ApiKey | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._keyspace.api_key(key_id))
            pipe.hget(self._keyspace.key_last_used(), key_id)
            raw, last_used = await pipe.execute()
        if raw is None:
            return None
        data = orjson.loads(raw)
        data["scopes"], data["cidrs"] = tuple(data["scopes"]), tuple(data["cidrs"])
        data["last_used"] = int(last_used or 0)
        return ApiKey(**data)

    async def verify(self, full_key: str, now_s: int) -> tuple[ApiKey | None, str]:
        """(metadata, 'valid'|'unknown'|'revoked'|'expired'|'malformed') for a presented key."""
        key_id = parse_key(full_key)
        if key_id is None:
            return None, "malformed"
        meta = await self.get(key_id)
        presented = self.digest(full_key)
        expected = meta.digest if meta else "0" * 64
        ok = hmac.compare_digest(presented, expected)
        if meta is not None and not ok and meta.previous_until > now_s:
            ok = hmac.compare_digest(presented, meta.previous_digest)  # rotation grace
        if meta is None or not ok:
            return None, "unknown"
        return meta, meta.state(now_s)

    async def revoke(self, key_id: str) -> ApiKey:
        meta = await self._existing(key_id)
        meta = replace(meta, revoked=int(time.time()))
        await self._save(meta)
        return meta

    async def rotate(self, key_id: str, grace_s: int = 86400) -> tuple[ApiKey, str]:
        """A new secret for the same key id; the old one stays valid for ``grace_s``."""
        meta = await self._existing(key_id)
        body = f"mw_{meta.env}_{key_id}_" + "".join(secrets.choice(_ALPHABET) for _ in range(32))
        full = body + _checksum(body)
        meta = replace(meta, digest=self.digest(full), previous_digest=meta.digest,
                       previous_until=int(time.time()) + grace_s)  # fmt: skip
        await self._save(meta)
        return meta, full

    async def all(self, consumer: str | None = None) -> list[ApiKey]:
        found = []
        async for raw_key in self._redis.scan_iter(match=self._keyspace.api_key("*")):
            meta = await self.get(raw_key.decode().rsplit(":", 1)[1])
            if meta is not None and (consumer is None or meta.consumer == consumer):
                found.append(meta)
        return sorted(found, key=lambda k: (k.consumer, k.created, k.id))

    async def _existing(self, key_id: str) -> ApiKey:
        meta = await self.get(key_id)
        if meta is None:
            raise ConfigurationError("key id", f"no key {key_id!r}")
        return meta

    async def _save(self, meta: ApiKey) -> None:
        stored = asdict(meta)
        del stored["last_used"]
        await self._redis.set(self._keyspace.api_key(meta.id), orjson.dumps(stored))
        await self._redis.publish(self._keyspace.key_events(), meta.id)
