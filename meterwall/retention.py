"""Retention as a guarantee: ``audit`` proves the 24-hour promise on a live Redis; ``purge``
applies it now.

The audit is structure-aware: it knows which values are ciphertext (sealed records, wrapped keys)
and which parts of an index member are binary pseudonyms, and looks for plaintext addresses and
credentials in everything else, so random ciphertext cannot raise a false alarm and no clear
field escapes the scan. It needs no private key; with one it also opens a sample of records.
"""

from __future__ import annotations

import ipaddress
import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .clock import SYSTEM_CLOCK, Clock
from .errors import InvalidRecord
from .keyspace import Keyspace, index_member, split_group
from .sealing import envelope_time_ns, read_envelope
from .settings import RETENTION_CEILING
from .store import eviction_policy

if TYPE_CHECKING:
    from .reader import RecordReader
    from .settings import Settings

SAMPLE = 200  # records a keyed audit opens
_BATCH = 100  # keys read per pipelined round trip
_ENTRY_ID = re.compile(rb"[0-9]{1,20}-[0-9]{1,20}")
_GENERATED = re.compile(rb"[0-9]+(?:-[0-9]+)?")  # a stream entry id, or a record count

META_AOF_REWRITE = "aof_rewrite_requested_at"
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![0-9A-Fa-f:])")
_CREDENTIAL = re.compile(
    r"(?i)(?:bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|(?<![A-Za-z0-9])(?:password|passwd|secret|api[_-]?key|token)\b[\"']?\s*[:=]\s*[\"']?"
    r"(?!\*\*\*)[^\s\"'&,}]{3,}"
)
_RAW_KINDS = ("rec", "ix")
_CLEAN_TEXTS_KEPT = 200_000  # distinct clean texts an audit remembers (a few tens of MiB)
#: A word every match of ``_CREDENTIAL`` contains (a superset: it only decides whether the
#: pattern runs at all).
_CREDENTIAL_HINTS = re.compile(r"(?i)bearer|basic|passw|secret|api|token|eyJ")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    problems: list[str] = field(default_factory=list)


def plaintext_findings(text: str) -> list[str]:
    """What in ``text`` looks like an IP address or a credential (validated, not just shaped).

    An audit scans millions of counter fields: each pattern runs only where its cheap
    precondition holds (a dot, two colons, a credential word).
    """
    found = []
    if "." in text:
        for match in _IPV4.finditer(text):
            if _is_ip(match.group()):
                found.append(f"IPv4 address {match.group()}")
    if text.count(":") >= 2:
        for match in _IPV6.finditer(text):
            if match.group().count(":") >= 2 and _is_ip(match.group()):
                found.append(f"IPv6 address {match.group()}")
    if _CREDENTIAL_HINTS.search(text):
        found.extend(f"credential {m.group()[:12]}..." for m in _CREDENTIAL.finditer(text))
    return found


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Auditor:
    """Runs every check against one deployment's keys."""

    def __init__(
        self, redis: Redis, keyspace: Keyspace, *, clock: Clock = SYSTEM_CLOCK,
        reader: RecordReader | None = None, settings: Settings | None = None,
        progress: Callable[[int], None] | None = None, sample: int = SAMPLE,
    ) -> None:  # fmt: skip
        """``reader`` (with the private key) opens a sample of records; ``settings`` (with the
        pseudonym secret) lets the restriction check search the indexes; ``progress`` is called
        with the number of keys scanned so far."""
        # redis-py types replies as unions of every decode mode; this client returns bytes.
        self._redis: Any = redis
        self._keyspace = keyspace
        self._clock = clock
        self._reader = reader
        self._settings = settings
        self._progress = progress
        self._sample_size = sample
        self._sample: list[tuple[int, bytes]] = []  # (shard, sealed record), a uniform sample
        self._seen = 0  # records offered to the sample so far
        self._weight, self._next_kept = 0.0, 0  # algorithm L's state once the sample is full
        self._groups: dict[str, dict[bytes, int]] = {}  # record stream -> entry id -> records
        # record stream -> index members as (entry id, records named, highest position)
        self._refs: dict[str, list[tuple[bytes, int, int]]] = {}
        self._opened: list[dict[str, Any]] = []
        self._clean: set[str] = set()  # texts found clean (bounded): not scanned again

    async def run(self) -> list[Check]:
        now = self._clock.now_ns() // 1_000_000_000
        self._sample, self._seen, self._groups, self._refs, self._opened = [], 0, {}, {}, []
        self._clean = set()
        expiry, age, plain = (
            Check("expiry", True, ""),
            Check("age", True, ""),
            Check("plaintext", True, ""),
        )
        keys = scanned = 0
        batch: list[bytes] = []

        async def audit_batch() -> None:
            nonlocal scanned
            scanned += await self._audit_batch(batch, now, expiry, age, plain)
            batch.clear()
            if self._progress is not None:
                self._progress(keys)

        async for raw_key in self._redis.scan_iter(match=self._keyspace.pattern(), count=1000):
            keys += 1
            batch.append(raw_key)
            if len(batch) >= _BATCH:
                await audit_batch()
        if batch:
            await audit_batch()
        expiry.detail = (
            f"{keys} keys scanned; raw-record and index keys expire within {RETENTION_CEILING} s, "
            "data and pseudonym keys within their hour plus that"
        )
        age.detail = f"no record older than {RETENTION_CEILING} s"
        plain.detail = f"{scanned} clear values scanned for IP addresses and credentials"
        for check in (expiry, age, plain):
            check.ok = not check.problems
        if self._progress is not None:
            self._progress(keys)
        await self._reread_missing_entries()
        checks = [expiry, age, plain, self._index_check()]
        if self._reader is not None:
            checks.append(await self._open_sample())
        checks.append(await self._restrictions())
        return [*checks, await self.persistence(now), await self.eviction()]

    async def _reread_missing_entries(self) -> None:
        """Streams and indexes are read in different SCAN batches: on a live store a flush in
        between adds index entries for stream entries the audit never saw. Those are read now;
        an entry whose stream has gone since (expired, purged) is no problem either."""
        missing = [(stream, entry) for stream, references in self._refs.items()
                   for entry, _, position in references
                   if position >= 0 and entry not in self._groups.get(stream, {})
                   and _ENTRY_ID.fullmatch(entry)]  # fmt: skip
        if not missing:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, entry in missing:
                pipe.xrange(stream, entry, entry, count=1)
                pipe.exists(stream)
            replies = await pipe.execute()
        for (stream, entry), found, exists in zip(missing, replies[0::2], replies[1::2],
                                                  strict=True):  # fmt: skip
            if found:
                try:
                    size = len(split_group(found[0][1].get(b"r", b"")))
                except ValueError:
                    continue  # reported as missing: it holds no readable group
                self._groups.setdefault(stream, {})[entry] = size
            elif not exists:
                self._refs[stream] = [r for r in self._refs[stream] if r[0] != entry]

    def _index_check(self) -> Check:
        """Every index entry points at a stored group and at a record inside it."""
        problems, refs = [], 0
        for stream, references in self._refs.items():
            groups = self._groups.get(stream, {})
            for entry, count, position in references:
                refs += count
                size = groups.get(entry)
                if position < 0:
                    problems.append(f"{stream}: an index member of an unknown format")
                elif size is None:
                    problems.append(f"{stream}: an index entry points at missing entry {entry!r}")
                elif position >= size:
                    problems.append(f"{stream} {entry!r}: index position {position} of {size}")
        detail = f"{refs} index entries point at stored records"
        return Check("index", not problems, detail, problems[:100])

    async def _open_sample(self) -> Check:
        """Records must open and authenticate with the reader's private key."""
        assert self._reader is not None
        problems, opened = [], 0
        for shard, blob in self._sample:
            try:
                record = await self._reader.open(shard, blob)
            except InvalidRecord as exc:
                problems.append(f"a record of shard {shard} does not open: {exc}")
                continue
            opened += 1
            self._opened.append(record)
        detail = f"{opened} of {len(self._sample)} sampled records opened and authenticated"
        return Check("records", not problems, detail, problems[:100])

    async def _restrictions(self) -> Check:
        """No raw record of a restricted subject made after its restriction.

        Consumers are searched in the indexes (needs the pseudonym secret); addresses only in
        the opened sample (with the private key), since their restriction names are one-way."""
        from .auditlog import LongLivedPseudonyms

        raw = await self._redis.hgetall(self._keyspace.restricted())
        since = {k.decode(): orjson.loads(v)["since"] for k, v in raw.items()}
        if not since:
            return Check("restrictions", True, "no restricted subjects")
        if self._settings is None or self._settings.pseudonym_secret is None:
            return Check("restrictions", False, "MW_PSEUDONYM_SECRET is needed to check them")
        from .tracing import TraceQuery, Tracer

        problems = []
        tracer = Tracer(self._redis, self._settings, None, clock=self._clock)
        for name, at in since.items():
            if name.startswith("consumer:"):
                found = await tracer.locate(TraceQuery(consumer=name[len("consumer:") :]))
                newer = await self._made_after(found.hits, at)
                if newer:
                    problems.append(f"{name}: {newer} records made after its restriction")
        names = LongLivedPseudonyms(self._settings.pseudonym_secret.reveal(), "restriction")
        for record in self._opened:
            ip = names.address(record["client"]["ip"] or "")
            if ip in since and record["time_ns"] // 1_000_000_000 > since[ip]:
                problems.append(f"{ip}: a record made after its restriction")
        detail = (f"{len(since)} restricted subjects: consumers searched in the indexes, "
                  f"addresses in {len(self._opened)} opened records")  # fmt: skip
        return Check("restrictions", not problems, detail, problems[:100])

    async def _made_after(self, hits: list[Any], since_s: int) -> int:
        newer = 0
        for hit in hits:
            rows = await self._redis.xrange(self._keyspace.records(hit.shard, hit.slice),
                                            hit.entry, hit.entry)  # fmt: skip
            if rows:
                blobs = split_group(rows[0][1][b"r"])
                if hit.position < len(blobs):
                    made = read_envelope(blobs[hit.position]).time_ns // 1_000_000_000
                    newer += made > since_s
        return newer

    async def _audit_batch(
        self, raw_keys: list[bytes], now: int, expiry: Check, age: Check, plain: Check
    ) -> int:
        """Audit some keys with three pipelined round trips (type and TTL, then the values)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for raw_key in raw_keys:
                pipe.type(raw_key)
                pipe.ttl(raw_key)
            meta = await pipe.execute()
        types = [t.decode() if isinstance(t, bytes) else str(t) for t in meta[0::2]]
        async with self._redis.pipeline(transaction=False) as pipe:
            for raw_key, kind_of_value in zip(raw_keys, types, strict=True):
                _read(pipe, raw_key, kind_of_value)
            values = await pipe.execute()
        scanned = 0
        for raw_key, kind_of_value, ttl, value in zip(raw_keys, types, meta[1::2], values,
                                                        strict=True):  # fmt: skip
            key = raw_key.decode()
            kind = _kind(key, self._keyspace.prefix)
            if kind in _RAW_KINDS:
                self._check_expiry(key, int(ttl), now, expiry)
            elif kind in ("dk", "epk"):  # keys that open records or link pseudonyms to IPs
                self._check_key_expiry(key, int(ttl), expiry)
            elif kind == "uqk":  # a day's unique-client key: gone a window after its day
                self._check_key_expiry(key, int(ttl), expiry, period=86400)
            if kind == "rec":
                self._check_ages(key, kind_of_value, value, now, age)
            clean = self._clean
            texts = (
                self._index_texts(key, value)
                if kind == "ix" and kind_of_value == "zset"
                else self._clear_texts(kind, _parts(kind_of_value, value))
            )
            for where, text in texts:
                scanned += 1
                if text in clean:  # counter fields repeat in every bucket: scanned once
                    continue
                findings = plaintext_findings(text)
                if findings:
                    plain.problems.extend(f"{key} ({where}): {f}" for f in findings)
                elif len(clean) < _CLEAN_TEXTS_KEPT:
                    clean.add(text)
        return scanned

    def _keep_in_sample(self, shard: int, blobs: list[bytes]) -> None:
        """Reservoir sampling: every record has the same chance to be opened.

        Li's algorithm L: after the reservoir is full it draws how many records to skip before
        the next one it keeps, so a million records cost a few hundred draws, not a million.
        """
        first, size = self._seen, self._sample_size
        self._seen += len(blobs)
        for blob in blobs[: max(0, size - first)]:
            self._sample.append((shard, blob))
        if first < size <= self._seen:  # just filled: the first skip
            self._weight = math.exp(math.log(_unit()) / size)
            self._next_kept = size + self._skip()
        while 0 < size <= self._seen and self._next_kept <= self._seen:
            self._sample[random.randrange(size)] = (shard, blobs[self._next_kept - first - 1])
            self._weight *= math.exp(math.log(_unit()) / size)
            self._next_kept += self._skip()

    def _skip(self) -> int:
        """1 + how many records go by before the next one the reservoir keeps."""
        return math.floor(math.log(_unit()) / math.log(1 - self._weight)) + 1

    async def eviction(self) -> Check:
        """Eviction could drop high-water marks (a retry then counts twice) or counters."""
        policy = await eviction_policy(self._redis)
        if policy is None:
            return Check("eviction", False, "cannot read maxmemory-policy (CONFIG not allowed)")
        ok = policy == "noeviction"
        detail = f"maxmemory-policy is {policy}" + ("" if ok else " (set it to noeviction)")
        return Check("eviction", ok, detail, [] if ok else [detail])

    def _check_expiry(self, key: str, ttl: int, now: int, check: Check) -> None:
        if ttl < 0:
            check.problems.append(f"{key} has no expiry")
        elif ttl > RETENTION_CEILING:
            check.problems.append(f"{key} expires in {ttl} s, beyond the ceiling")
        else:
            slice_start = int(key.rsplit(":", 1)[1])
            if now + ttl > slice_start + RETENTION_CEILING:
                check.problems.append(f"{key} outlives its slice start by more than the ceiling")

    def _check_key_expiry(self, key: str, ttl: int, check: Check, *, period: int = 3600) -> None:
        """Data keys and pseudonym keys live until their hour's (or day's) last record is gone."""
        if ttl < 0:
            check.problems.append(f"{key} has no expiry")
        elif ttl > RETENTION_CEILING + period:
            check.problems.append(f"{key} expires in {ttl} s, beyond its period plus the ceiling")

    def _check_ages(
        self, key: str, kind_of_value: str, entries: Any, now: int, check: Check
    ) -> None:
        if kind_of_value != "stream":
            check.problems.append(f"{key} is not a stream of sealed records")
            return
        groups = self._groups.setdefault(key, {})
        shard = _shard_of(key)
        for entry_id, fields in entries:
            try:
                blobs = split_group(fields.get(b"r", b""))
                made = [envelope_time_ns(blob) // 1_000_000_000 for blob in blobs]
            except (InvalidRecord, ValueError):
                check.problems.append(f"{key} holds a value that is not a sealed record")
                continue
            groups[entry_id] = len(blobs)
            if self._reader is not None:
                self._keep_in_sample(shard, blobs)
            if made and now - min(made) > RETENTION_CEILING:
                check.problems.append(f"{key} holds a record {now - min(made)} s old")

    def _index_texts(self, key: str, members: list[bytes]) -> list[tuple[str, str]]:
        """A slice index's members noted for the index check; the text among them to scan.

        A member is keyed identifiers, an entry id and positions: only an entry id that is not
        one Redis makes is text worth scanning (``keyspace.index_member``).
        """
        stream = key[: key.rindex(":ix:")] + ":rec:" + key.rsplit(":", 1)[1]
        refs = self._refs.setdefault(stream, [])
        out, generated = [], set()
        for member in members:
            try:
                _, entry, positions = index_member(member)
            except ValueError:
                refs.append((b"", 0, -1))  # reported by the index check
                continue
            # Positions ascend: the last one is the highest (how many, which is highest).
            refs.append((entry, len(positions) // 2, int.from_bytes(positions[-2:], "big")))
            if entry not in generated:
                if _GENERATED.fullmatch(entry):
                    generated.add(entry)
                else:
                    out.append(("member", _text(entry)))
        return out

    def _clear_texts(self, kind: str, parts: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
        """Every clear (non-ciphertext) part of a key's value that could hold text, as text.

        What meterwall itself writes in a fixed form is checked for that form instead of being
        scanned: stream entry ids and record counts (index members: ``_index_texts``).
        """
        out = []
        for part, value in parts:
            if (part == "value" and kind in ("dk", "epk", "uqk")) or part == "sealed":
                continue  # wrapped keys and sealed records are ciphertext
            if kind == "rec" and (
                (part == "field" and value in (b"n", b"r"))
                or (part in ("entry id", "value") and _GENERATED.fullmatch(value))
            ):
                continue  # the field names n and r, record counts and entry ids: nothing else
            if part == "value" and kind in _NETWORK_RULE_KINDS:
                value = _without_network_rules(value)
            out.append((part, _text(value)))
        return out

    async def persistence(self, now: int) -> Check:
        """Persistence files must not be able to hold copies older than the ceiling."""
        r = self._redis
        try:
            save = (await r.config_get("save")).get("save", "")
            aof = (await r.config_get("appendonly")).get("appendonly", "no")
            info = await r.info("persistence")
        except Exception as exc:  # managed Redis often disables CONFIG
            return Check("persistence", False, f"cannot read the persistence settings: {exc}")
        if not save and aof == "no":
            return Check("persistence", True, "persistence is off: no file holds raw records")
        problems = []
        if save:
            last = int(info.get("rdb_last_save_time", 0))
            if now - last > RETENTION_CEILING:
                problems.append(
                    f"the last RDB snapshot is {now - last} s old (run `meterwall purge`)"
                )
        if aof == "yes":
            requested = await r.hget(self._keyspace.meta(), META_AOF_REWRITE)
            if requested is None or now - int(requested) > RETENTION_CEILING:
                problems.append(
                    "the AOF may hold writes older than the ceiling: no AOF rewrite by "
                    "`meterwall purge` within the ceiling"
                )
        detail = "; ".join(problems) or "snapshots and AOF rewrites are newer than the ceiling"
        return Check("persistence", not problems, detail, problems)


async def key_parts(redis: Any, key: str | bytes) -> list[tuple[str, bytes]]:
    """Every part of a key's value, labelled: value, field, member, entry id or sealed."""
    kind_of_value = (await redis.type(key)).decode()
    async with redis.pipeline(transaction=False) as pipe:
        _read(pipe, key, kind_of_value)
        [value] = await pipe.execute()
    return _parts(kind_of_value, value)


def _read(pipe: Any, key: str | bytes, kind_of_value: str) -> None:
    """Queue the command that reads a whole value of this type (one reply per key)."""
    reader = {"string": pipe.get, "hash": pipe.hgetall, "stream": pipe.xrange,
              "set": pipe.smembers}.get(kind_of_value)  # fmt: skip
    if reader is not None:
        reader(key)
    elif kind_of_value in ("zset", "list"):
        (pipe.zrange if kind_of_value == "zset" else pipe.lrange)(key, 0, -1)
    else:  # none (expired meanwhile) or a type meterwall never writes: keep the replies aligned
        pipe.exists(key)


# Keys and consumers may carry the networks they may be used from (``keys create --cidr``,
# ``consumers set --allow/--deny``): an operator's configuration, not a client's address.
_NETWORK_RULE_KINDS = frozenset({"key", "consumers", "consumer-networks"})
_NETWORK_RULE_FIELDS = ("cidrs", "allow", "deny")


def _without_network_rules(value: bytes) -> bytes:
    """A key's or consumer's JSON without its network lists (anything else is still scanned)."""
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    if not isinstance(document, dict):
        return value
    for name in _NETWORK_RULE_FIELDS:
        document.pop(name, None)
    return orjson.dumps(document)


def _parts(kind_of_value: str, value: Any) -> list[tuple[str, bytes]]:
    parts: list[tuple[str, bytes]] = []
    if kind_of_value == "string":
        parts.append(("value", value or b""))
    elif kind_of_value == "hash":
        for name, field_value in value.items():
            parts += [("field", name), ("value", field_value)]
    elif kind_of_value in ("zset", "list", "set"):
        parts += [("member", m) for m in value]
    elif kind_of_value == "stream":
        for entry_id, fields in value:
            parts.append(("entry id", entry_id))
            for name, field_value in fields.items():
                parts += [("field", name), ("sealed" if name == b"r" else "value", field_value)]
    return parts


def _unit() -> float:
    """A uniform draw in (0, 1): logarithms of it are finite."""
    return random.random() or 5e-324


def _shard_of(key: str) -> int:
    """The logical shard of a key named ``<prefix>:{sNN}:...``."""
    tag = key[key.index("{s") + 2 : key.index("}")]
    return int(tag)


def _kind(key: str, prefix: str) -> str:
    """The kind part of a key name: 'rec', 'ix', 'dk', 'c15', 'epk', 'meta', ...

    The prefix itself may contain ':', so it is removed before the name is split.
    """
    parts = key[len(prefix) + 1 :].split(":")
    return parts[1] if len(parts) > 1 and parts[0].startswith("{") else parts[0]


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("latin-1") if isinstance(value, bytes) else value


async def purge(
    redis: Any, keyspace: Keyspace, retention_s: int, *, clock: Clock = SYSTEM_CLOCK
) -> dict[str, int]:
    """Delete every slice and epoch key past the window now, then ask for a persistence rewrite."""
    now = clock.now_ns() // 1_000_000_000
    deleted = 0
    for shard in range(keyspace.shards):
        old = await redis.zrangebyscore(keyspace.slices(shard), "-inf", now - retention_s)
        for name in old:
            slice_start = int(name)
            deleted += await redis.delete(
                keyspace.records(shard, slice_start), keyspace.index(shard, slice_start)
            )
        if old:
            await redis.zremrangebyscore(keyspace.slices(shard), "-inf", now - retention_s)
    for kind, period in (("epk", 3600), ("uqk", 86400)):
        async for raw_key in redis.scan_iter(match=f"{keyspace.prefix}:{kind}:*"):
            number = int(raw_key.decode().rsplit(":", 1)[1])
            if (number + 1) * period + retention_s <= now:
                deleted += await redis.delete(raw_key)
    rewrites = 0
    config = await redis.config_get("appendonly")
    if config.get("appendonly") == "yes":
        await redis.bgrewriteaof()
        await redis.hset(keyspace.meta(), META_AOF_REWRITE, now)
        rewrites += 1
    if (await redis.config_get("save")).get("save"):
        try:
            await redis.bgsave()
        except ResponseError as exc:  # a save already in progress is fine
            if "in progress" not in str(exc):
                raise
        rewrites += 1
    return {"deleted_keys": deleted, "rewrites_requested": rewrites}


def failed(checks: Iterable[Check]) -> bool:
    return any(not c.ok for c in checks)
