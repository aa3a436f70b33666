"""Data-subject rights: export (access, portability), erase, restrict and unrestrict.

A subject is a client IP address or a consumer. Raw records about an address are found by its
pseudonyms (``tracing``), so the operator must first verify that the requester controls the
address (README: "Data-subject requests"). Every action writes one audit-log entry.

Erasure rewrites the shared stream entries without the subject's records (``lua/erase.lua``),
with the slice's index; a consumer's aggregates go only when asked (billing may have a legal
basis to keep them), closed-period snapshots only when asked a second time. A restriction is kept
under a long-lived keyed pseudonym of its own (the hourly keys are destroyed with the window);
from then on the flusher keeps no raw record of the subject while counting goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import defaultdict
from importlib import resources
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .auditlog import AuditLog, LongLivedPseudonyms, cli_actor
from .clock import SYSTEM_CLOCK, Clock
from .consumers import check_consumer_id
from .errors import ConfigurationError
from .keyspace import SEP
from .settings import Settings
from .tracing import AHEAD_NS, Hit, TraceQuery, Tracer, iso_utc
from .usage import UsageReader

ERASE_SCRIPT = resources.files("meterwall").joinpath("lua/erase.lua").read_text()


def _subject(ip: str | None, consumer: str | None) -> TraceQuery:
    if (ip is None) == (consumer is None):
        raise ConfigurationError("subject", "give exactly one of an IP address or a consumer")
    if consumer is not None:
        check_consumer_id(consumer, setting="consumer")
    query = TraceQuery(ip=ip, consumer=consumer)
    query.check()
    return query


class SubjectRights:
    """Serve one deployment's data-subject requests. Export needs the private key."""

    def __init__(
        self, redis: Any, settings: Settings, private_key: X25519PrivateKey | None = None, *,
        clock: Clock = SYSTEM_CLOCK, actor: str | None = None,
    ) -> None:  # fmt: skip
        if settings.pseudonym_secret is None:
            raise ConfigurationError("MW_PSEUDONYM_SECRET", "is needed to find a subject")
        self._redis = redis
        self._settings = settings
        self._keyspace = settings.keyspace()
        self.actor = actor or cli_actor()
        self._tracer = Tracer(redis, settings, private_key, clock=clock, actor=self.actor)
        self._names = LongLivedPseudonyms(settings.pseudonym_secret.reveal(), "restriction")
        self._audit = AuditLog(redis, settings)
        self._clock = clock

    async def export(self, *, ip: str | None = None, consumer: str | None = None) -> dict[str, Any]:
        """Every raw record still held about the subject, opened, with a receipt; a consumer's
        usage aggregates too. The bundle is for the subject: it holds their own address."""
        query = self._everything_held(_subject(ip, consumer))
        found = await self._tracer.find(query)
        bundle: dict[str, Any] = {"records": found.records}
        if consumer is not None:
            bundle["usage"] = await self._usage(consumer)
        bundle["receipt"] = {
            "action": "export", "subject": "ip" if ip else "consumer",
            "searched_at": iso_utc(self._clock.now_ns()), "window": {"since": found.query["since"],
            "until": found.query["until"]}, "records": len(found.records),
            "usage_months": len(bundle.get("usage", {})),
            "checksum": hashlib.sha256(orjson.dumps(bundle["records"])).hexdigest(),
        }  # fmt: skip
        await self._audit.append(self.actor, "export", found.query, len(found.records))
        return bundle

    async def erase(
        self, *, ip: str | None = None, consumer: str | None = None, aggregates: bool = False,
        closed_periods: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """Delete the subject's raw records and index entries now; a receipt of what went."""
        if (aggregates or closed_periods) and consumer is None:
            raise ConfigurationError("--aggregates", "applies to a consumer only")
        if closed_periods and not aggregates:
            raise ConfigurationError("--closed-periods", "needs --aggregates as well")
        query = self._everything_held(_subject(ip, consumer))
        found = await self._tracer.locate(query)
        erased, members = await self._erase_hits(found.hits)
        keys = await self._erase_aggregates(consumer, closed_periods) if aggregates else 0
        receipt = {"action": "erase", "subject": "ip" if ip else "consumer",
                   "erased_at": iso_utc(self._clock.now_ns()), "records_erased": erased,
                   "index_entries_removed": members, "aggregate_keys_deleted": keys,
                   "closed_periods_deleted": closed_periods,
                   "next_step": "`meterwall purge`: persistence files drop old copies"}  # fmt: skip
        await self._audit.append(self.actor, "erase", found.query, 0, records_erased=erased,
                                 aggregate_keys_deleted=keys)  # fmt: skip
        return receipt

    async def restrict(self, *, ip: str | None = None, consumer: str | None = None) -> str:
        """From now on (within a second on every worker) keep no raw record of the subject."""
        name, described = self._name(ip, consumer)
        entry = orjson.dumps({"since": int(time.time()), "by": self.actor})
        await self._redis.hset(self._keyspace.restricted(), name, entry)
        await self._audit.append(self.actor, "restrict", described, 0)
        return name

    async def unrestrict(self, *, ip: str | None = None, consumer: str | None = None) -> bool:
        """Lift a restriction; True if there was one."""
        name, described = self._name(ip, consumer)
        removed = await self._redis.hdel(self._keyspace.restricted(), name)
        await self._audit.append(self.actor, "unrestrict", described, 0)
        return bool(removed)

    async def restricted(self) -> list[dict[str, Any]]:
        """The restriction list (addresses appear as pseudonyms only)."""
        raw = await self._redis.hgetall(self._keyspace.restricted())
        return [{"subject": k.decode(), **orjson.loads(v)} for k, v in sorted(raw.items())]

    def _name(self, ip: str | None, consumer: str | None) -> tuple[str, dict[str, Any]]:
        _subject(ip, consumer)
        if consumer is not None:
            return "consumer:" + consumer, {"consumer": consumer}
        assert ip is not None
        name = self._names.address(ip)
        assert name is not None  # _subject checked the address
        return name, {"ip": self._tracer.audit_name(ip)}

    async def _erase_hits(self, hits: list[Hit]) -> tuple[int, int]:
        groups: dict[tuple[int, int, bytes], list[int]] = defaultdict(list)
        for hit in hits:
            groups[(hit.shard, hit.slice, hit.entry)].append(hit.position)
        erased = members = 0
        for (shard, slice_start, entry), positions in sorted(groups.items()):
            keys = [
                self._keyspace.records(shard, slice_start),
                self._keyspace.index(shard, slice_start),
            ]
            done = await self._redis.eval(ERASE_SCRIPT, 2, *keys, entry, *positions)
            erased, members = erased + int(done[0]), members + int(done[1])
        return erased, members

    async def _erase_aggregates(self, consumer: str | None, closed_periods: bool) -> int:
        """The consumer's counters of every granularity, its unique-client counts, limits."""
        assert consumer is not None
        shard = self._keyspace.shard_of(consumer)
        prefix = self._keyspace.shard_prefix(shard)
        kinds = ["cd", "cm", "uq", "adj", "qt"] + (["closed"] if closed_periods else [])
        doomed = [self._keyspace.rate(shard, consumer)]
        for kind in kinds:
            doomed += [key async for key in self._consumer_keys(prefix, kind, consumer)]
        deleted = int(await self._redis.delete(*doomed)) if doomed else 0
        field_prefix = consumer + SEP  # the shard-wide 15-minute and hour buckets
        for kind in ("c15", "c1h"):
            async for key in self._redis.scan_iter(match=f"{prefix}{kind}:*"):
                fields = [f async for f, _ in self._hscan(key, _glob(field_prefix) + "*")]
                if fields:
                    await self._redis.hdel(key, *fields)
                    deleted += 1
        # What sinks delivered: running totals are live aggregates; a closed month's delivery
        # (its idempotency key and checksum) goes with the closed months.
        delivered = {b"running:" + consumer.encode()}
        if closed_periods:
            delivered.add(b"closed:" + consumer.encode())
        states = self._keyspace.export_states()  # hashes only: a stray key must not stop this
        async for key in self._redis.scan_iter(match=states, _type="hash"):
            fields = [f async for f, _ in self._hscan(key, "*:" + _glob(consumer))]
            doomed_fields = [f for f in fields if f in delivered]
            if doomed_fields:
                await self._redis.hdel(key, *doomed_fields)
                deleted += 1
        return deleted

    async def _hscan(self, key: Any, match: str) -> Any:
        async for item in self._redis.hscan_iter(key, match=match):
            yield item

    def _everything_held(self, query: TraceQuery) -> TraceQuery:
        """A data-subject request covers every record held, also those an app server whose
        clock runs ahead of this host's stamped in the future (up to two days)."""
        return dataclasses.replace(query, until_ns=self._clock.now_ns() + AHEAD_NS)

    async def _consumer_keys(self, prefix: str, kind: str, consumer: str) -> Any:
        """The ``{kind}:{consumer}:{day or month}`` keys of one consumer. Consumer ids may hold
        ``:``, so the glob also matches ``acme:eu``'s keys when looking for ``acme``'s: only a
        key whose rest after the consumer is one period (no ``:``) is the consumer's."""
        head = f"{prefix}{kind}:{consumer}:".encode()
        async for key in self._redis.scan_iter(match=f"{prefix}{kind}:{_glob(consumer)}:*"):
            if b":" not in key[len(head) :]:
                yield key

    async def _usage(self, consumer: str) -> dict[str, Any]:
        """Monthly totals by route for every month still kept, in the consumer's zone."""
        prefix = self._keyspace.shard_prefix(self._keyspace.shard_of(consumer))
        months = sorted(
            {
                k.decode().rsplit(":", 1)[1]
                async for k in self._consumer_keys(prefix, "cm", consumer)
            }
        )
        reader = UsageReader(self._redis, self._keyspace)
        return {month: await reader.totals(consumer, month, ["route"]) for month in months}


def _glob(text: str) -> str:
    """``text`` with the glob characters of SCAN MATCH escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
