"""The audit log: one entry for every privileged read or change of personal data.

Every trace, export, erase and restrict appends who did it (the admin token's name, or the OS user
for the CLI), when, the query, and how many records were opened, to an append-only Redis stream
with its own retention (``MW_AUDIT_LOG_RETENTION``, default 13 months). An IP address never enters
the log: queries name it by a long-lived keyed pseudonym of its own (``ip~<hex>``), because the
hourly pseudonym keys are destroyed with the window and could not link the entry later.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import time
from typing import Any

import orjson

from .clientip import canonical_ip
from .pseudonyms import derive
from .settings import Settings


def cli_actor() -> str:
    """Who runs a command: the OS user, as the audit log names CLI actions."""
    try:
        return "os:" + getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "os:uid-unknown"


class LongLivedPseudonyms:
    """Keyed pseudonyms that must outlive the raw-data window (audit log, restriction list).

    One key per purpose, derived from ``MW_PSEUDONYM_SECRET`` with its own label, so an entry of
    one list cannot be matched against the other.
    """

    def __init__(self, secret: bytes, purpose: str) -> None:
        self._key = derive(secret, purpose)

    def address(self, text: str) -> str | None:
        """``ip~<32 hex>`` for an address (IPv4-mapped IPv6 as its IPv4 form), else None."""
        ip16 = canonical_ip(text)
        return None if ip16 is None else self.of_ip16(ip16)

    def of_ip16(self, ip16: bytes) -> str:
        return "ip~" + hmac.new(self._key, ip16, hashlib.sha256).digest()[:16].hex()

    def network(self, text: str) -> str:
        """``net~<hex>`` for a network given in CIDR form (its canonical text is what is keyed)."""
        return "net~" + hmac.new(self._key, text.encode(), hashlib.sha256).digest()[:16].hex()


_PAGE = 1000  # entries read per XRANGE


class AuditLog:
    """Append to and read the audit log of one deployment."""

    def __init__(self, redis: Any, settings: Settings) -> None:
        self._redis = redis
        self._key = f"{settings.key_prefix}:audit-log"
        self._retention_ms = int(settings.audit_log_retention * 1000)

    async def append(self, actor: str, action: str, query: dict[str, Any], opened: int,
                     **extra: Any) -> str:  # fmt: skip
        """Write one entry; entries older than the log's retention are trimmed on the way."""
        now_ms = int(time.time() * 1000)
        fields = {"at": str(now_ms / 1000), "actor": actor, "action": action,
                  "query": orjson.dumps(query), "opened": str(opened),
                  "extra": orjson.dumps(extra)}  # fmt: skip
        entry: bytes = await self._redis.xadd(
            self._key, fields, minid=str(now_ms - self._retention_ms), approximate=False
        )
        return entry.decode()

    async def entries(
        self, since_s: float | None = None, count: int | None = None
    ) -> list[dict[str, Any]]:
        """Entries, oldest first, from ``since_s`` on: all of them, or the first ``count``
        (read a page at a time, so the newest are never cut off)."""
        start = "-" if since_s is None else str(int(since_s * 1000))
        rows: list[Any] = []
        while count is None or len(rows) < count:
            page_size = _PAGE if count is None else min(_PAGE, count - len(rows))
            page = await self._redis.xrange(self._key, start, "+", count=page_size)
            rows += page
            if len(page) < page_size:
                break
            start = "(" + page[-1][0].decode()
        return [
            {"id": entry_id.decode(), "at": float(f[b"at"]), "actor": f[b"actor"].decode(),
             "action": f[b"action"].decode(), "query": orjson.loads(f[b"query"]),
             "opened": int(f[b"opened"]), **orjson.loads(f.get(b"extra", b"{}"))}
            for entry_id, f in rows
        ]  # fmt: skip
