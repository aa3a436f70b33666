"""Incident tracing: a subject's requests inside the retention window, found without plaintext.

A subject is an IP address, a subnet, a consumer or an API key id. Nothing outside the sealed
records names an address, so an address is searched by its pseudonyms: for every hour of the
range, the pseudonym under each of that hour's epoch keys (an hour can have more than one when
writers could not agree). A subnet is searched by the prefix pseudonyms of its /24 (IPv4) or /48
(IPv6) networks; a consumer or key id by its keyed id. Each time slice has one index (a sorted
set whose members start with tag + 16-byte identifier), so finding a subject costs one
``ZRANGEBYLEX`` per slice and identifier, pipelined per shard; only the stream entries that hold a
match are read, and only matching records are opened. Every search is written to the audit log.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .apikeys import KeyStore
from .auditlog import AuditLog, LongLivedPseudonyms, cli_actor
from .clientip import canonical_ip
from .clock import SYSTEM_CLOCK, Clock
from .errors import ConfigurationError, RetentionExceeded
from .keyspace import (
    TAG_CONSUMER,
    TAG_IP,
    TAG_KEY,
    TAG_NET,
    index_member,
    split_group,
    unpack_positions,
)
from .pseudonyms import HOUR, Epoch, IpPseudonymiser, derive, keyed_id
from .reader import NS, RecordReader
from .settings import Settings

_STATUS = re.compile(r"^(?:[1-5]xx|[1-5]\d\d)$")
MAX_NETWORKS = 256  # /24s (or /48s) one subnet search may cover


#: How far ahead of this host's clock an app server's may run: a record can lie no further.
AHEAD_NS = 2 * 86400 * 10**9


@dataclass(frozen=True, slots=True)
class TraceQuery:
    """What to look for. At least one of ip, subnet, consumer, key_id; the rest filter."""

    ip: str | None = None
    subnet: str | None = None
    consumer: str | None = None
    key_id: str | None = None
    route: str | None = None  # a route template, exactly as counted (e.g. /items/{id})
    status: str | None = None  # "429", "5xx", ...
    since_ns: int | None = None  # default: the start of the retention window
    until_ns: int | None = None  # default: now

    def check(self) -> None:
        """Raise ``ConfigurationError`` naming the first bad field."""
        if not (self.ip or self.subnet or self.consumer or self.key_id):
            raise ConfigurationError("selector", "give an ip, a subnet, a consumer or a key id")
        if self.ip is not None and canonical_ip(self.ip) is None:
            raise ConfigurationError("ip", f"{self.ip!r} is not an IP address")
        if self.subnet is not None:
            _networks(self.subnet)
        if self.status is not None and not _STATUS.match(self.status):
            raise ConfigurationError("status", "a status (429) or a class (5xx)")

    def matches(self, record: dict[str, Any], since_ns: int, until_ns: int) -> bool:
        """The filters the index cannot answer, applied to an opened record."""
        if not since_ns <= record["time_ns"] <= until_ns:
            return False
        if self.ip is not None and canonical_ip(record["client"]["ip"] or "") != canonical_ip(
            self.ip
        ):
            return False
        if self.subnet is not None and not _in_subnet(record["client"]["ip"], self.subnet):
            return False
        if self.consumer is not None and record["consumer"] != self.consumer:
            return False
        if self.key_id is not None and record["key_id"] != self.key_id:
            return False
        if self.route is not None and record["route"] != self.route:
            return False
        status = str(record["status"])
        if self.status is not None:
            wanted = self.status
            return status[0] == wanted[0] if wanted.endswith("xx") else status == wanted
        return True


@dataclass(frozen=True, slots=True)
class Hit:
    """Where one matching record is stored (what an erase rewrites)."""

    shard: int
    slice: int
    entry: bytes  # stream entry id
    position: int  # index of the record in the entry's group


@dataclass
class Trace:
    """The records found, oldest first, and the query as the audit log names it."""

    query: dict[str, Any]
    since_ns: int
    until_ns: int
    records: list[dict[str, Any]] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    slices_searched: int = 0

    def summary(self) -> dict[str, Any]:
        """Requests per minute, routes, the status mix and the denials, for a first look."""
        per_minute = Counter(
            time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(r["time_ns"] // NS)) for r in self.records
        )
        denials = [r["decision"] for r in self.records if r["decision"] != "admitted"]
        return {
            "requests": len(self.records),
            "first": iso_utc(self.records[0]["time_ns"]) if self.records else None,
            "last": iso_utc(self.records[-1]["time_ns"]) if self.records else None,
            "requests_per_minute": dict(sorted(per_minute.items())),
            "routes": sorted({r["route"] for r in self.records}),
            "statuses": dict(sorted(Counter(str(r["status"]) for r in self.records).items())),
            "denials": dict(sorted(Counter(denials).items())),
        }


class Tracer:
    """Finds and opens a subject's records; opening needs the private key (the reader side).

    Without a private key, ``locate`` still finds where a subject's records are (what an erase
    needs): the index holds keyed pseudonyms, which the pseudonym secret can compute.
    """

    def __init__(
        self, redis: Any, settings: Settings, private_key: X25519PrivateKey | None, *,
        clock: Clock = SYSTEM_CLOCK, actor: str | None = None,
    ) -> None:  # fmt: skip
        if settings.pseudonym_secret is None:
            raise ConfigurationError("MW_PSEUDONYM_SECRET", "is needed to search by pseudonym")
        secret = settings.pseudonym_secret.reveal()
        self._redis = redis
        self._settings = settings
        self._keyspace = settings.keyspace()
        self._reader = (
            RecordReader(redis, settings, private_key, clock=clock) if private_key else None
        )
        self._retention_ns = int(settings.raw_retention * NS)
        self._epochs = IpPseudonymiser(secret, self._keyspace, int(settings.raw_retention))
        self._index_key = derive(secret, "index")
        self._audit_names = LongLivedPseudonyms(secret, "audit-log")
        self._audit = AuditLog(redis, settings)
        self._clock = clock
        self.actor = actor or cli_actor()

    async def trace(self, query: TraceQuery, *, action: str = "trace") -> Trace:
        """Open every record of the subject in the range, oldest first; audited as ``action``."""
        found = await self.find(query)
        await self._audit.append(self.actor, action, found.query, len(found.records),
                                 searched_slices=found.slices_searched)  # fmt: skip
        return found

    async def find(self, query: TraceQuery) -> Trace:
        """``trace`` without the audit entry (callers that write their own)."""
        if self._reader is None:
            raise ConfigurationError(
                "MW_RECORD_PRIVATE_KEY_FILE", "is needed to open records (the reader side's key)"
            )
        found = await self.locate(query)
        hits, found.hits = found.hits, []
        opened = await self._open(hits)
        since, until = found.since_ns, found.until_ns
        pairs = [(hit, record) for hit, record in opened if query.matches(record, since, until)]
        pairs.sort(key=lambda pair: pair[1]["time_ns"])
        found.hits = [hit for hit, _ in pairs]
        found.records = [record for _, record in pairs]
        return found

    async def locate(self, query: TraceQuery) -> Trace:
        """Where the subject's records are (``hits``), without opening any (no audit entry).

        Only the index selects: filters that need an opened record (route, status, a subnet
        narrower than /24) are not applied.
        """
        query.check()
        window = self._clock.now_ns() - self._retention_ns
        since = window if query.since_ns is None else query.since_ns
        until = self._clock.now_ns() if query.until_ns is None else query.until_ns
        if since < window:
            raise RetentionExceeded("records older than the retention window are gone")
        if until < since:
            raise ConfigurationError("until", "is before since")
        # no record lies further ahead than a writer's clock may run: a far --to is cut there
        until = max(since, min(until, self._clock.now_ns() + AHEAD_NS))
        found = Trace(self._describe(query, since, until), since, until)
        found.hits = await self._locate(query, since, until, found)
        return found

    async def _locate(self, query: TraceQuery, since: int, until: int, found: Trace) -> list[Hit]:
        tag, idents_of = await self._selector(query, since, until)
        shards = await self._shards(query)
        hits: list[Hit] = []
        for shard in shards:
            slices = [int(s) for s in await self._redis.zrangebyscore(
                self._keyspace.slices(shard), since // NS - self._keyspace.slice_seconds,
                until // NS)]  # fmt: skip
            found.slices_searched += len(slices)
            asked: list[int] = []
            async with self._redis.pipeline(transaction=False) as pipe:
                for slice_start in slices:
                    for ident in idents_of(slice_start // HOUR):
                        low, high = b"[" + tag + ident, b"(" + tag + ident + b"\xff\xff\xff"
                        pipe.zrangebylex(self._keyspace.index(shard, slice_start), low, high)
                        asked.append(slice_start)
                replies = await pipe.execute() if asked else []
            for slice_start, members in zip(asked, replies, strict=True):
                for member in members:
                    try:
                        _, entry, positions = index_member(member)
                    except ValueError:
                        continue  # names no record it can be resolved to; the audit reports it
                    hits += [Hit(shard, slice_start, entry, n) for n in unpack_positions(positions)]
        return hits

    async def _selector(self, query: TraceQuery, since: int, until: int) -> tuple[bytes, Any]:
        """The index tag and, per hour, the identifiers to look up (the most selective first)."""
        if query.ip is not None or query.subnet is not None:
            epochs = await self._epoch_keys(since // NS // HOUR, until // NS // HOUR)
            if query.ip is not None:
                ip16 = canonical_ip(query.ip)
                assert ip16 is not None
                per_hour = {h: [e.pseudonyms(ip16)[0] for e in es] for h, es in epochs.items()}
                return TAG_IP, lambda hour: per_hour.get(hour, [])
            assert query.subnet is not None
            prefixes = [canonical_ip(str(n.network_address)) for n in _networks(query.subnet)]
            per_hour = {h: [e.pseudonyms(p)[1] for e in es for p in prefixes if p is not None]
                        for h, es in epochs.items()}  # fmt: skip
            return TAG_NET, lambda hour: per_hour.get(hour, [])
        if query.key_id is not None:
            ident = keyed_id(self._index_key, query.key_id)
            return TAG_KEY, lambda hour: [ident]
        assert query.consumer is not None
        ident = keyed_id(self._index_key, query.consumer)
        return TAG_CONSUMER, lambda hour: [ident]

    async def _epoch_keys(self, first_hour: int, last_hour: int) -> dict[int, list[Epoch]]:
        """Every live epoch key of every hour in the range (deleted ones are simply absent)."""
        hours = list(range(first_hour, last_hour + 1))
        async with self._redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(self._keyspace.epoch_keys(hour))
            replies = await pipe.execute()
        epochs: dict[int, list[Epoch]] = {}
        for hour, fields in zip(hours, replies, strict=True):
            for key_id, wrapped in fields.items():
                secret = self._epochs.unwrap(hour, key_id.decode(), wrapped)
                if secret is not None:
                    epochs.setdefault(hour, []).append(
                        Epoch.from_secret(hour, key_id.decode(), secret, published=True)
                    )
        return epochs

    async def _shards(self, query: TraceQuery) -> list[int]:
        """A consumer's records live in its shard; a key's in its consumer's shard."""
        consumer = query.consumer
        if consumer is None and query.key_id is not None:
            key = await KeyStore.for_settings(self._redis, self._settings).get(query.key_id)
            consumer = key.consumer if key is not None else None
        if consumer is not None:
            return [self._keyspace.shard_of(consumer)]
        return list(range(self._keyspace.shards))

    async def _open(self, hits: list[Hit]) -> list[tuple[Hit, dict[str, Any]]]:
        """Read each stream entry once and open only the records that were hit."""
        entries = sorted({(h.shard, h.slice, h.entry) for h in hits})
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard, slice_start, entry in entries:
                pipe.xrange(self._keyspace.records(shard, slice_start), entry, entry)
            replies = await pipe.execute() if entries else []
        groups: dict[tuple[int, int, bytes], list[bytes]] = {}
        for where, rows in zip(entries, replies, strict=True):
            if rows:  # an entry can expire between the index read and this one
                groups[where] = split_group(rows[0][1][b"r"])
        assert self._reader is not None
        opened = []
        for hit in hits:
            blobs = groups.get((hit.shard, hit.slice, hit.entry))
            if blobs is not None and hit.position < len(blobs):
                opened.append((hit, await self._reader.open(hit.shard, blobs[hit.position])))
        return opened

    def audit_name(self, ip: str) -> str | None:
        """How the audit log names an address (a long-lived keyed pseudonym)."""
        return self._audit_names.address(ip)

    def _describe(self, query: TraceQuery, since: int, until: int) -> dict[str, Any]:
        """The query as the audit log keeps it: long-lived pseudonyms in place of addresses."""
        described: dict[str, Any] = {"since": iso_utc(since), "until": iso_utc(until)}
        if query.ip is not None:
            described["ip"] = self.audit_name(query.ip)
        if query.subnet is not None:
            described["subnet"] = self._audit_names.network(
                str(ip_network(query.subnet, strict=False))
            )
        for name in ("consumer", "key_id", "route", "status"):
            if getattr(query, name) is not None:
                described[name] = getattr(query, name)
        return described


def _networks(subnet: str) -> list[IPv4Network | IPv6Network]:
    """The /24 (IPv4) or /48 (IPv6) networks that cover ``subnet`` (narrower ones: its own)."""
    network = _subnet(subnet)
    unit = 24 if network.version == 4 else 48
    if network.prefixlen >= unit:
        return [network.supernet(new_prefix=unit)]
    if 2 ** (unit - network.prefixlen) > MAX_NETWORKS:
        raise ConfigurationError(
            "subnet", f"at most {MAX_NETWORKS} /{unit} networks per search (a /{unit - 8})"
        )
    return list(network.subnets(new_prefix=unit))


def _subnet(text: str) -> IPv4Network | IPv6Network:
    """``text`` as a network; written IPv4-mapped (``::ffff:203.0.113.0/120``), as the IPv4
    network it is: addresses are canonical, so a mapped address is its IPv4 form."""
    try:
        network = ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigurationError("subnet", f"{text!r} is not a network (CIDR)") from None
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None and network.prefixlen >= 96:
        return IPv4Network((mapped, network.prefixlen - 96))
    return network


def _in_subnet(address: str | None, subnet: str) -> bool:
    try:
        ip = ip_address(address or "")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip) in _subnet(subnet)


def iso_utc(time_ns: int) -> str:
    """A nanosecond time as ISO 8601 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time_ns // NS))


def parse_instant(name: str, text: str | None) -> int | None:
    """Nanoseconds of an ISO 8601 time (UTC unless it has an offset); ``name`` for errors."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(name, f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * NS)
