"""The flusher: one background task per process that does everything the request path must not.

Every ``flush_interval`` (or as soon as a batch is full) it takes the captured exchanges, resolves
the client address, redacts, pseudonymises and seals each one (even while Redis is away, so no
plaintext waits longer than one interval), then packs one batch per logical shard and sends them
all in one pipelined round trip of script calls. Exactly-once: each flush gets a sequence number;
a shard's batch that failed is re-sent unchanged before anything new is packed, and the script
ignores a sequence number at or below the writer's high-water mark for that shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import random
import struct
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from .auditlog import LongLivedPseudonyms
from .buffer import ByteBoundedQueue
from .capture import METHODS, Captured, Exchange
from .clientip import canonical_ip, forget_addresses
from .clock import Clock
from .consumers import Consumer, ConsumerRegistry
from .errors import ConfigurationError
from .journal import STALE_AFTER_S, FileJournal, Journal, NullJournal, deployment_dir, orphans
from .keyspace import BUCKET_15M, TAG_CONSUMER, TAG_IP, TAG_KEY, TAG_NET, pack_positions
from .metering import (
    KIND_1H,
    KIND_15M,
    KIND_DAY,
    KIND_MONTH,
    Increments,
    Meter,
    counter_increments,
    merge_increments,
)
from .plugins import ValueRedactor
from .pseudonyms import HOUR, IpPseudonymiser, derive, keyed_id
from .records import build_record
from .redaction import Redactor
from .sealing import DataKey, RecordSealer, load_public_key
from .settings import Settings
from .store import apply_batches, check_shards, connect, eviction_policy, server_run_id

log = logging.getLogger("meterwall")

BATCH_VERSION = 4  # the packed batch format lua/apply_batch.lua accepts
_REGISTRY_EVERY = 10.0  # seconds between reads of the consumer registry
_RESTRICTIONS_EVERY = 1.0  # seconds between reads of the restriction list
_ADOPT_EVERY = 5.0  # seconds between looks for dead writers' journals
_TRIM_EVERY = 10  # seconds between a writer's requests to trim one shard's expired slices
_EXCHANGE_OVERHEAD = 512  # bytes a queued exchange costs beyond its captured body (estimate)
_SLICE_NS = 200_000  # the flusher gives the loop back at least every 0.2 ms of sealing


#: A sealed record waiting to be sent: (shard, slice start, envelope, index idents, data key
#: id); each ident is 17 bytes, an index tag and a 16-byte keyed identifier. A plain tuple of
#: bytes and numbers, like a queued exchange (``capture.Captured``), so that the garbage
#: collector stops tracking it; the data keys themselves wait in ``Flusher._data_keys_by_id``.
Sealed = tuple[int, int, bytes, tuple[bytes, ...], bytes]


def queued_size(row: tuple[Any, ...]) -> int:
    """What a queued exchange (``Exchange.captured``) is charged against ``MW_BUFFER_BYTES``:
    its body, headers, path and query (large headers are the slowest to redact, so they pile
    up first) and a fixed overhead."""
    return len(row[20]) + sum(map(len, row[8])) + len(row[2]) + len(row[3]) + _EXCHANGE_OVERHEAD


def sealed_size(sealed: Sealed) -> int:
    """What a sealed record costs the outbox's byte budget."""
    return len(sealed[2]) + 17 * len(sealed[3])


_LENGTH = struct.Struct(">I")
_SERVER_CHECK_EVERY = 5.0  # seconds
_REFUSED = ("meterwall: bad batch", "meterwall: batch is not msgpack")
_CACHE_LIMIT = 65536
# What pending unique-client members cost in memory, measured with tracemalloc: a member (the
# 8-byte member as a bytes object, its set slot, its copy in the joined bytearray) and a
# consumer's day (its _DayClients, empty set and bytearray, dict entry and key). MW_BUFFER_BYTES
# bounds them too.
_UNIQUE_MEMBER_BYTES = 100
_UNIQUE_DAY_BYTES = 450


class _DayClients:
    """One consumer's distinct clients of one UTC day not sent yet, and the time of its latest
    request, whose 15-minute bucket sets the count's expiry. The members are kept joined as
    well: a journal snapshot during a long outage copies them instead of joining a set of
    thousands of them every few seconds."""

    __slots__ = ("joined", "latest_s", "members")

    def __init__(self, time_s: int) -> None:
        self.members: set[bytes] = set()
        self.joined = bytearray()
        self.latest_s = time_s


class Flusher:
    """Owns the in-process meter and queues of one middleware instance and drains them to Redis."""

    def __init__(
        self, settings: Settings, clock: Clock, journal: Journal | None = None,
        value_redactors: Sequence[ValueRedactor] = (),
    ) -> None:  # fmt: skip
        self.settings = settings
        self.clock = clock
        self.keyspace = settings.keyspace()
        self.meter = Meter()
        self.inbox: ByteBoundedQueue[tuple[Any, ...]] = ByteBoundedQueue(settings.buffer_bytes)
        self.outbox: ByteBoundedQueue[Sealed] = ByteBoundedQueue(settings.buffer_bytes)
        self._given_journal = journal  # tests pass their own; else a FileJournal per writer
        self.journal: Journal = journal or NullJournal()
        self._journal_dir = _journal_dir(settings)
        self._next_adoption = 0.0
        self._readopt = False  # Redis restarted: replay the journals replayed lately again
        self.records_on = settings.records == "sealed"
        self._retention = int(settings.raw_retention)
        if self.records_on:
            assert settings.pseudonym_secret is not None
            assert settings.record_public_key is not None
            secret = self._secret = settings.pseudonym_secret.reveal()
            self.sealer = RecordSealer(load_public_key(settings.record_public_key))
            self.pseudonyms = IpPseudonymiser(secret, self.keyspace, self._retention)
            self.daily_keys = IpPseudonymiser(secret, self.keyspace, self._retention, daily=True)
            self.redactor = Redactor(
                derive(secret, "fingerprint"), self._address_pseudonym,
                extra_secret_fields=[settings.api_key_query] if settings.api_key_query else (),
                extra_credential_headers=[settings.api_key_header],
                value_redactors=[r.redact for r in value_redactors],
            )  # fmt: skip
            self._index_key = derive(secret, "index")
            self._restriction_names = LongLivedPseudonyms(secret, "restriction")
        self._restricted: set[str] = set()  # subjects whose raw records are not kept
        self._next_restrictions_read = 0.0
        self._hour = 0  # the hour of the exchange being redacted (for address headers)
        self._address_cache: dict[tuple[str | None, tuple[bytes, ...]], object] = {}
        self._ident_cache: dict[bytes, bytes] = {}
        self._data_keys_by_id: dict[bytes, DataKey] = {}  # of the records not yet sent
        self._counters: dict[int, Increments] = {}
        self._uniques: dict[tuple[str, int], _DayClients] = {}  # (consumer, UTC day) -> clients
        self._uniques_day = -1
        self._uniques_key = b""  # the key of day _uniques_day
        self._uniques_members: dict[bytes, bytes] = {}
        self._uniques_fresh: dict[tuple[str, int], list[bytes]] = {}  # not in the journal yet
        self._uniques_bytes = 0  # what _uniques holds, estimated
        self._uniques_dropped = 0  # adds refused at the bound, not yet reported to Redis
        self._uniques_dropped_total = 0
        self._trim_at: dict[int, int] = {}  # shard -> when (clock s) to ask for a trim again
        self._consumers: dict[str, Consumer] = {}
        self._next_registry_read = 0.0
        self._weights = settings.route_weights
        self._counters_at = 0.0
        self._flushing = False
        self._aggregate_retention = {
            KIND_15M: int(settings.retention_15m), KIND_1H: int(settings.retention_1h),
            KIND_DAY: int(settings.retention_day), KIND_MONTH: int(settings.retention_month),
        }  # fmt: skip
        self._pending: dict[int, tuple[int, bytes, int]] = {}  # shard -> (seq, payload, records)
        self._dropped_total = 0
        self.batches_refused = 0
        self.journals_adopted = 0
        self._in_aclose = False
        self.stale_journals: set[str] = set()  # writers whose journal is too old to replay
        self.journal_error: str | None = None
        self._new_writer()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis: Redis | None = None
        self._redis_loop: asyncio.AbstractEventLoop | None = None  # the loop it belongs to
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closing = False
        self._shards_checked = False  # the run id: after every failure
        self._server_known = False  # the shard count and eviction policy: once, and on restart
        self._next_server_check = 0.0
        self.misconfigured: str | None = None
        self.eviction_warning: str | None = None
        self._run_id = ""
        self._failures = 0
        self._retry_at = 0.0
        self.last_error: str | None = None
        self.last_flush_ok: float | None = None

    def _new_writer(self) -> None:
        """A fresh writer id after any fork: two processes must never share a sequence."""
        self._pid = os.getpid()
        self.writer = os.urandom(8).hex()
        self._seq = 0
        # (seq, shard, batch) a restarted Redis may have lost: sent again before anything newer.
        self._resend: list[tuple[int, int, bytes]] = []
        # Record ids: a random per-writer prefix and a counter (unique without a syscall each).
        self._record_ids = itertools.count(int.from_bytes(os.urandom(8), "big") << 64)

    def _new_life(self) -> None:
        """Everything the journal holds (batches, deltas, unique clients) is another worker's
        to replay now: this process goes on as a new writer, with records not yet packed."""
        self._new_writer()
        self._pending.clear()
        self._counters.clear()
        self.meter.take()
        self._uniques.clear()
        self._uniques_fresh.clear()
        self._uniques_bytes = 0

    def after_fork(self) -> None:
        """In a forked child: nothing of the parent's writer, task, loop or queue carries over.

        What the parent captured before the fork stays the parent's to flush; keeping a copy
        here would count it twice.
        """
        if isinstance(self.journal, FileJournal):
            self.journal.forget_after_fork()  # the parent's journal and lock stay the parent's
            self.journal = NullJournal()
        self._new_life()  # and, unlike a hand-over, not even its records or stats
        if self.records_on:  # never the parent's data key: its nonce counter would repeat
            self.sealer = RecordSealer(self.sealer.public_key)
        self._uniques_dropped = 0
        self.inbox.take(len(self.inbox))
        self.outbox.take(len(self.outbox))
        self._task = None
        self._loop = None
        self._redis = None

    # -- request path ------------------------------------------------------------------------

    def submit(self, ex: Exchange) -> None:
        """Meter and queue one finished exchange: memory, and one append to the journal file."""
        task = self._task
        if task is None or task.done() or self._loop is not asyncio.get_running_loop():
            self.start()
        method = ex.scope.get("method", "GET")  # a websocket handshake is a GET
        row = (ex.start_ns // 1_000_000_000, ex.consumer, ex.key_id, ex.route,
               method if method in METHODS else "OTHER", ex.status or 499, ex.ttfb_ns,
               ex.bytes_in, ex.bytes_out, ex.denied)  # fmt: skip
        self.meter.add(*row)
        try:
            self.journal.delta(row)
        except OSError as exc:  # a full disk must not fail requests: go on without a journal
            self._journal_failed(exc)
        if self.records_on:
            row = ex.captured()
            self.inbox.put(row, queued_size(row))
            if len(self.inbox) >= self.settings.batch_max_records:
                self._wake.set()

    def start(self) -> None:
        """Start the background task in the running loop (again after a fork or a new loop).

        Not while ``aclose`` runs: a request then only queues (its delta is journaled), and the
        next one after ``aclose`` starts the task with the journal of the writer it then is.
        """
        if self._in_aclose:
            return
        if self._pid != os.getpid():
            self._new_writer()
            self._pending.clear()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._redis = None  # a client is bound to the loop it was made in
            self._wake = asyncio.Event()
            self._lock = asyncio.Lock()
        self._loop = loop
        self._closing = False
        self._open_journal()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="meterwall-flusher")

    # -- background task ---------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.settings.flush_interval
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.flush_once()
            except Exception:  # the flusher must outlive any bug rather than stop metering
                log.exception("meterwall: flush failed unexpectedly")

    async def flush_once(self) -> bool:
        """Seal what was captured, then send one round of batches; True if Redis took it all."""
        async with self._lock:  # the task and an explicit flush() must not interleave
            return await self._flush_once()

    async def _flush_once(self) -> bool:
        redis = self._client()
        backing_off = time.monotonic() < self._retry_at
        if self.records_on:
            await self._seal_inbox(None if backing_off else redis)
        if backing_off:
            self._compact_journal()
            return False
        if self.misconfigured is not None:
            return False
        try:
            # On first contact, after a failure and every few seconds: a Redis that restarted
            # while we were idle (redis-py reconnects silently) may have lost epoch keys.
            if not self._shards_checked or time.monotonic() > self._next_server_check:
                await self._check_server(redis)
            if self._resend:
                await self._resend_lost(redis)
            if self.records_on:
                for hour in self.pseudonyms.unpublished_hours():
                    await self.pseudonyms.prepare(hour, redis)
                for day in self.daily_keys.unpublished_hours():
                    await self.daily_keys.prepare(day, redis)
            if time.monotonic() >= self._next_adoption:
                await self._adopt_orphans(redis)
            if not self._pending:
                await self._read_registry(redis)
                due = self._flushing or time.monotonic() >= self._counters_at
                await self._pack(counters_due=due)
                await asyncio.sleep(0)  # requests first: packing and sending are separate steps
            if self._pending:
                await self._send(redis)
            await asyncio.sleep(0)
            self._compact_journal()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            self._compact_journal()
            return False
        except ConfigurationError as exc:  # e.g. another shard count: no write can be right
            self.misconfigured = str(exc)
            log.error("meterwall: not writing to Redis: %s", exc)
            return False
        self._failures = 0
        self.last_error = None
        self.last_flush_ok = time.time()
        return not self._pending

    def _compact_journal(self) -> None:
        """Let the journal start a new segment with only what is still needed (it does so at
        most every few seconds), whether Redis answered or not: an outage must not grow it by
        a row per request."""
        try:
            self.journal.compact(self.meter.peek(), self._pending_uniques)
        except OSError as exc:
            self._journal_failed(exc)

    async def _check_server(self, redis: Redis) -> None:
        """The run id first (one round trip, after every failure); the shard count and the
        eviction policy on first contact and after a restart."""
        run_id = await server_run_id(redis)
        restarted = bool(self._run_id) and run_id != self._run_id
        if not self._server_known or restarted:
            await check_shards(redis, self.keyspace)
            policy = await eviction_policy(redis)
            if policy not in (None, "noeviction") and self.eviction_warning is None:
                # An evicted high-water mark lets a retried batch count twice; evicted counters
                # and keys lose data. Only noeviction keeps the ledger exact.
                self.eviction_warning = f"maxmemory-policy is {policy}, not noeviction"
                log.error(
                    "meterwall: Redis %s: counts may be lost or doubled", self.eviction_warning
                )
            self._server_known = True
        if restarted:
            if self.records_on:
                self.pseudonyms.republish()  # a restarted Redis may have lost them
                self.daily_keys.republish()
            queued = {(seq, shard) for seq, shard, _ in self._resend}
            self._resend += [b for b in self.journal.recent() if (b[0], b[1]) not in queued]
            self._resend.sort(key=lambda b: (b[0], b[1]))
            self.journal.owed(self._resend)  # a kill before they land must not lose them
            self._readopt, self._next_adoption = True, 0.0
        self.journal.release_recent()
        self._run_id = run_id
        self._shards_checked = True
        self._next_server_check = time.monotonic() + _SERVER_CHECK_EVERY

    async def _seal_inbox(self, redis: Redis | None) -> None:
        exchanges = self.inbox.take(len(self.inbox))
        if not exchanges:
            return
        if redis is not None:
            await self._read_restrictions(redis)
            seconds = {row[0] // 1_000_000_000 for row in exchanges}  # start_ns
            try:
                for hour in {s // HOUR for s in seconds}:
                    await self.pseudonyms.prepare(hour, redis)
                for day in {s // 86400 for s in seconds}:
                    await self.daily_keys.prepare(day, redis)
            except (RedisError, OSError) as exc:
                self._failed(exc)  # seal with local keys; they are published later
        try:
            await self._seal_rows(exchanges)
        finally:  # also when cancelled (a shutdown's timeout) in the middle of a backlog
            if self._uniques_fresh:
                self._journal_uniques()
            # Caches that hold plaintext addresses live no longer than one flush (DESIGN).
            self._address_cache.clear()
            self._uniques_members.clear()
            self.pseudonyms.clear_caches()
            self.daily_keys.clear_caches()
            forget_addresses()

    async def _seal_rows(self, exchanges: list[tuple[Any, ...]]) -> None:
        yield_at = time.perf_counter_ns() + _SLICE_NS
        for row in exchanges:
            try:
                sealed = self._seal(row)
            except Exception:  # one odd exchange must not cost the others their records
                log.exception("meterwall: could not seal a record")
                self._dropped_total += 1
                continue
            if sealed is None:  # a restricted subject: counted, never recorded
                continue
            self.outbox.put(sealed, sealed_size(sealed))
            now = time.perf_counter_ns()
            if now > yield_at:  # requests must not wait behind a backlog
                if self._uniques_fresh:  # a kill during the wait loses no client found so far
                    self._journal_uniques()
                await asyncio.sleep(0)
                back = time.perf_counter_ns()
                # Under load the loop is away for many requests' steps: a slice of at least
                # half that time keeps the flusher's share of the CPU above a third, enough
                # to keep up with what the requests hand it (else records pile up in memory).
                yield_at = back + max(_SLICE_NS, (back - now) // 2)

    async def _read_restrictions(self, redis: Redis) -> None:
        """The restricted subjects, read at most once a second (so a restriction holds within
        a second on every worker). If Redis cannot be read, the last list stays in force."""
        if time.monotonic() < self._next_restrictions_read:
            return
        self._next_restrictions_read = time.monotonic() + _RESTRICTIONS_EVERY
        try:
            names: list[bytes] = await redis.hkeys(self.keyspace.restricted())  # type: ignore[assignment]
        except (RedisError, OSError):
            self._lost_contact()
            return
        self._restricted = {n.decode() for n in names}

    def _is_restricted(self, consumer: str, ip16: bytes | None) -> bool:
        if consumer and "consumer:" + consumer in self._restricted:
            return True
        return ip16 is not None and self._restriction_names.of_ip16(ip16) in self._restricted

    def _seal(self, row: tuple[Any, ...]) -> Sealed | None:
        ex = Captured.from_row(row)
        time_s = ex.start_ns // 1_000_000_000
        self._hour = time_s // HOUR
        client = ex.client
        peer = client[0] if client else None
        address, ip16 = self._client_address(peer, ex.headers)
        pseudonyms = self.pseudonyms.epoch(self._hour).pseudonyms(ip16) if ip16 else None
        if ip16 is not None:
            self._count_unique(ex.consumer, time_s, ip16)
        if self._restricted and self._is_restricted(ex.consumer, ip16):
            return None
        record_id = next(self._record_ids).to_bytes(16, "big")
        # Address headers are pseudonymised for self._hour (_address_pseudonym): their epoch.
        plain = build_record(ex, self.redactor, address, pseudonyms, address_epoch=self._hour)
        blob, key = self.sealer.seal(plain, ex.start_ns, record_id)
        idents: tuple[bytes, ...] = ()
        if pseudonyms is not None:
            idents = (TAG_IP + pseudonyms[0], TAG_NET + pseudonyms[1])
        if ex.consumer:
            idents += (self._index_ident(TAG_CONSUMER, ex.consumer),)
        if ex.key_id:
            idents += (self._index_ident(TAG_KEY, ex.key_id),)
        shard = self.keyspace.shard_of(ex.consumer)
        self._data_keys_by_id[key.key_id] = key
        return (shard, self.keyspace.slice_start(time_s), blob, idents, key.key_id)

    def _client_address(self, peer: str | None, headers: Any) -> tuple[str | None, bytes | None]:
        """The client address and its canonical 16 bytes (None for none or garbage), cached by
        peer and forwarding headers: they repeat a lot. Like every cache that holds addresses,
        the cache is emptied after each flush."""
        trusted = self.settings.trusted_proxies
        cache_key = (peer, trusted.forwarded(headers) if trusted else ())
        found = self._address_cache.get(cache_key)
        if found is None:
            address = trusted.resolve(peer, headers) if trusted else peer
            found = (address, canonical_ip(address) if address else None)
            if len(self._address_cache) >= _CACHE_LIMIT:
                self._address_cache.clear()
            self._address_cache[cache_key] = found
        return found  # type: ignore[return-value]

    def _index_ident(self, tag: bytes, value: str) -> bytes:
        """Tag + keyed id of a consumer or key id (the same few values repeat: cached)."""
        cache_key = tag + value.encode()
        ident = self._ident_cache.get(cache_key)
        if ident is None:
            ident = tag + keyed_id(self._index_key, value)
            if len(self._ident_cache) >= _CACHE_LIMIT:
                self._ident_cache.clear()
            self._ident_cache[cache_key] = ident
        return ident

    def zone_of(self, consumer: str, time_s: int) -> str:
        known = self._consumers.get(consumer)
        return known.tz_at(time_s) if known is not None else "UTC"

    def _weight_of(self, route: str) -> int:
        return self._weights.get(route, 1)

    def _count_unique(self, consumer: str, time_s: int, ip16: bytes) -> None:
        """Add a client to the consumer's unique-client count of the UTC day (8-byte pseudonym).

        The day's key is random, agreed with the other writers through Redis and deleted a
        retention window after the day ends: the HyperLogLog outlives it, and from then on
        nobody can test whether an address is in it. It keeps only register maxima, so no
        pseudonym can be read back from it either.
        """
        day_number = time_s // 86400
        if day_number != self._uniques_day:
            self._uniques_day = day_number
            self._uniques_key = self.daily_keys.epoch(day_number).ip_key
            self._uniques_members.clear()
        key = self._uniques_key
        member = self._uniques_members.get(ip16)  # emptied after every flush, like all such caches
        if member is None:
            member = hmac.new(key, ip16, hashlib.sha256).digest()[:8]
            self._uniques_members[ip16] = member
        clients = self._uniques.get((consumer, day_number))
        if clients is not None:
            if clients.latest_s < time_s:
                clients.latest_s = time_s
            if member in clients.members:
                return
        cost = _UNIQUE_MEMBER_BYTES + (_UNIQUE_DAY_BYTES if clients is None else 0)
        if self._uniques_bytes + cost > self.settings.buffer_bytes:  # Redis away for long
            self._uniques_dropped += 1  # (a request's add: its client may be counted already)
            return
        if clients is None:
            clients = self._uniques[consumer, day_number] = _DayClients(time_s)
        self._uniques_bytes += cost
        clients.members.add(member)
        clients.joined += member
        self._uniques_fresh.setdefault((consumer, day_number), []).append(member)

    def _journal_uniques(self) -> None:
        """The members this sealing pass saw first, in one journal entry: a killed worker's
        unique clients are then lost only with its records not yet sealed."""
        fresh, self._uniques_fresh = self._uniques_fresh, {}
        entries = [[consumer, day, self._uniques[consumer, day].latest_s, b"".join(members)]
                   for (consumer, day), members in fresh.items()]  # fmt: skip
        try:
            self.journal.uniques(entries)
        except OSError as exc:
            self._journal_failed(exc)

    def _pending_uniques(self) -> list[list[Any]]:
        """Every unique-client member not sent yet, as the journal's snapshot holds them."""
        return [[consumer, day, clients.latest_s, bytes(clients.joined)]
                for (consumer, day), clients in self._uniques.items()]  # fmt: skip

    def _uniques_by_shard(self, days: Iterable[Sequence[Any]]) -> dict[int, list[list[Any]]]:
        """The batches' ``uniques`` sections: (consumer, UTC day, latest request s, members)."""
        by_shard: dict[int, list[list[Any]]] = {}
        for consumer, day_number, latest_s, members in days:
            # The day counters' rule: the 15-minute bucket of the latest request + the
            # retention (theirs per billing-zone day, this per UTC day).
            expire_at = latest_s - latest_s % BUCKET_15M + self._aggregate_retention[KIND_DAY]
            bucket = f"{consumer}:{time.strftime('%Y-%m-%d', time.gmtime(day_number * 86400))}"
            by_shard.setdefault(self.keyspace.shard_of(consumer), []).append(
                [bucket, members, expire_at]
            )
        return by_shard

    async def _read_registry(self, redis: Redis) -> None:
        """Billing zones change rarely: read the registry every few seconds, not per flush."""
        if time.monotonic() < self._next_registry_read:
            return
        self._consumers = await ConsumerRegistry(redis, self.keyspace).all()
        self._next_registry_read = time.monotonic() + _REGISTRY_EVERY

    def _address_pseudonym(self, address: str) -> str:
        return self.pseudonyms.text(address, self._hour)

    async def _pack(self, counters_due: bool = True) -> None:
        """Turn merged counters and up to one batch of sealed records into one payload per shard.

        Counters go out every ``MW_COUNTER_FLUSH_INTERVAL`` (and on every explicit flush): they
        merge in memory, so a longer interval costs Redis fewer increments, never a count.

        The records are grouped first, a shard at a time with requests served in between (it
        is most of the work: ~0.2 ms per shard for 150 records on a slow core, and one block
        of it all held a single-connection client's p99). The counters are taken after that,
        in one step with the journal write that marks them taken: a delta journaled between
        the two would be replayed as part of a batch that does not hold it.
        """
        by_shard: dict[int, list[Sealed]] = {}
        for item in self.outbox.take(self.settings.batch_max_records):
            by_shard.setdefault(item[0], []).append(item)
        grouped: dict[int, tuple[list[list[Any]], list[list[Any]], int]] = {}
        for shard, records in by_shard.items():
            await asyncio.sleep(0)
            grouped[shard] = (_record_groups(records), self._data_keys(records), len(records))
        if grouped:
            await asyncio.sleep(0)
        deltas = self.meter.take() if counters_due else {}
        if counters_due:
            self._counters_at = time.monotonic() + self.settings.counter_flush_interval
        increments = counter_increments(
            deltas, self.zone_of, self._weight_of, self._aggregate_retention
        )
        self._merge_by_shard(self._counters, increments)
        uniques: dict[int, list[list[Any]]] = {}
        if counters_due:  # with the counters: not two more commands in every record batch
            uniques = self._uniques_by_shard(self._pending_uniques())
            self._uniques.clear()
            self._uniques_fresh.clear()  # inside this batch, which the journal gets next
            self._uniques_bytes = 0
        stats: list[list[Any]] = []
        dropped = self.inbox.take_dropped() + self.outbox.take_dropped()
        if dropped:
            self._dropped_total += dropped
            stats.append(["records_dropped", dropped])
        if self._uniques_dropped:
            stats.append(["unique_adds_dropped", self._uniques_dropped])
            self._uniques_dropped_total += self._uniques_dropped
            self._uniques_dropped = 0
        shards = set(self._counters) | set(grouped) | set(uniques) | ({0} if stats else set())
        if not shards:
            return
        self._seq += 1
        batches: dict[int, bytes] = {}
        for shard in sorted(shards):
            groups, data_keys, count = grouped.get(shard, ([], [], 0))
            counters = self._counters.pop(shard, {})
            shard_stats = stats if shard == 0 else []
            payload = self._payload(self.writer, self._seq, counters, groups, data_keys,
                                    shard_stats, uniques.get(shard, []),
                                    self._trim_due(shard))  # fmt: skip
            self._pending[shard] = (self._seq, payload, count)
            batches[shard] = payload
        self._forget_data_keys()
        try:
            self.journal.packed(self.writer, self._seq, batches, counters_due)
        except OSError as exc:
            self._journal_failed(exc)

    def _merge_by_shard(
        self, into: dict[int, Increments], increments: dict[str, Increments]
    ) -> None:
        """Each consumer's increments into its shard's (``merge_increments``)."""
        for consumer, rows in increments.items():
            merge_increments(into.setdefault(self.keyspace.shard_of(consumer), {}), rows)

    def _payload(
        self, writer: str, seq: int, counters: dict[Any, list[int]], groups: list[list[Any]],
        data_keys: list[list[Any]], stats: list[list[Any]], uniques: list[Any], trim: bool,
    ) -> bytes:  # fmt: skip
        """One shard's packed batch, as ``lua/apply_batch.lua`` reads it."""
        packed: bytes = msgpack.packb(
            [
                BATCH_VERSION, writer, seq, self._retention,
                [[kind, bucket, name, n, at] for (kind, bucket, name), (n, at) in counters.items()],
                groups, data_keys, stats, uniques, int(self.settings.lateness), int(trim),
                [self._aggregate_retention[kind] for kind in (KIND_15M, KIND_1H, KIND_DAY,
                                                              KIND_MONTH)],
            ],
            use_bin_type=False,  # Redis's cmsgpack reads raw strings, not the bin type
        )  # fmt: skip
        return packed

    def _trim_due(self, shard: int) -> bool:
        """Whether this batch asks the script to trim the shard's expired slices: every
        ``_TRIM_EVERY`` s per shard (and on a writer's first batch). Expiries do the work; the
        trim only catches one that was missed, so it need not cost a command in every batch."""
        now = self.clock.now_ns() // 1_000_000_000
        due_at = self._trim_at.get(shard, 0)
        if due_at - _TRIM_EVERY <= now < due_at:  # (a clock set back does not postpone it)
            return False
        self._trim_at[shard] = now + _TRIM_EVERY
        return True

    def _data_keys(self, records: Iterable[Sealed]) -> list[list[Any]]:
        """The wrapped data keys the records need; the script stores each once (SET NX)."""
        keys = [self._data_keys_by_id[key_id] for key_id in {r[4] for r in records}]
        return [[k.key_id.hex(), k.wrapped, (k.hour + 1) * HOUR + self._retention] for k in keys]

    def _forget_data_keys(self) -> None:
        """Let go of the data keys no waiting record needs: a memory dump of an app server must
        not open more than the records it still holds (the sealer keeps only the current key)."""
        if len(self._data_keys_by_id) > 1:
            used = {item[4] for item in self.outbox}
            for key_id in [k for k in self._data_keys_by_id if k not in used]:
                del self._data_keys_by_id[key_id]

    async def _send(self, redis: Redis) -> None:
        batches = {shard: payload for shard, (_, payload, _) in self._pending.items()}
        results = await apply_batches(redis, self.keyspace, batches)
        for shard, reply in results.items():
            self._settle(shard, reply, "a batch")
            # "applied", or "duplicate": an earlier attempt of this very batch landed.
            seq, _, _ = self._pending.pop(shard)
            self._journal_applied(shard, seq)

    # -- journal -----------------------------------------------------------------------------

    def _open_journal(self) -> None:
        if self._given_journal is not None or self._journal_dir is None:
            return
        if isinstance(self.journal, FileJournal) and self.journal.writer == self.writer:
            return
        try:
            self.journal = FileJournal(self._journal_dir, self.writer, top=self._seq)
        except OSError as exc:
            self._journal_failed(exc)

    def _journal_applied(self, shard: int, seq: int) -> None:
        try:
            self.journal.applied(self.writer, shard, seq)
        except OSError as exc:  # a full disk, not Redis: the batch did land
            self._journal_failed(exc)

    def _journal_failed(self, exc: OSError) -> None:
        log.error("meterwall: journal off (%s): a kill can now lose counts", exc)
        self.journal_error = str(exc)
        self.journal = NullJournal()
        self._journal_dir = None

    async def _adopt_orphans(self, redis: Redis) -> None:
        """Replay the journals of dead writers of this deployment (every few seconds)."""
        self._next_adoption = time.monotonic() + _ADOPT_EVERY
        if self._journal_dir is None:
            return
        again, self._readopt = self._readopt, False
        for orphan in orphans(self._journal_dir, self.writer, again=again):
            if orphan.age_s() > STALE_AFTER_S:  # its batch marks in Redis may be gone
                orphan.abandon()
                if orphan.writer not in self.stale_journals:
                    self.stale_journals.add(orphan.writer)
                    log.error(
                        "meterwall: the journal of writer %s in %s is older than its batch "
                        "marks in Redis: replaying it could count twice, so it is left for an "
                        "operator (docs/reliability.md)", orphan.writer, self._journal_dir,
                    )  # fmt: skip
                continue
            try:
                await self._read_registry(redis)  # its deltas are billed in consumers' zones
                batches, deltas, days, top = orphan.read()
                for _, shard, payload in batches:
                    await self._apply_one(redis, shard, payload)
                increments = counter_increments(
                    deltas, self.zone_of, self._weight_of, self._aggregate_retention
                )
                by_shard: dict[int, Increments] = {}
                self._merge_by_shard(by_shard, increments)
                uniques = self._uniques_by_shard(days)
                for shard in sorted(by_shard.keys() | uniques.keys()):  # one more batch of it
                    payload = self._payload(orphan.writer, top + 1, by_shard.get(shard, {}), [],
                                            [], [], uniques.get(shard, []), trim=False)  # fmt: skip
                    await self._apply_one(redis, shard, payload)
            except (RedisError, OSError):
                orphan.abandon()
                self._readopt = self._readopt or again  # the next round replays them again
                raise
            except Exception:
                orphan.abandon()
                log.exception("meterwall: could not replay the journal of %s", orphan.writer)
                continue
            first = orphan.replayed_ago() is None
            orphan.replayed()
            if not first:
                continue  # replayed again after a Redis restart: counted once
            self.journals_adopted += 1
            log.info("meterwall: replayed the journal of writer %s (%d batches, %d deltas, "
                     "%d unique-client days)", orphan.writer, len(batches), len(deltas),
                     len(days))  # fmt: skip

    async def _apply_one(self, redis: Redis, shard: int, payload: bytes) -> None:
        reply = (await apply_batches(redis, self.keyspace, {shard: payload}))[shard]
        self._settle(shard, reply, "a replayed batch")

    def _settle(self, shard: int, reply: Any, what: str) -> None:
        """Raise a transient error (OOM, READONLY, BUSY, ...: the batch is kept and sent again);
        a batch the script refused as malformed is a bug, never a transient state: keeping it
        would block the shard forever, so it is logged, counted and let go."""
        if isinstance(reply, ResponseError) and str(reply).startswith(_REFUSED):
            log.error("meterwall: shard %d refused %s: %s", shard, what, reply)
            self.batches_refused += 1
        elif isinstance(reply, Exception):
            raise reply

    async def _resend_lost(self, redis: Redis) -> None:
        """Redis restarted: what it acknowledged in the last seconds may be gone; send it again,
        in batch order and before any newer batch of ours (whose number would raise the
        high-water mark past them). Each batch leaves the queue once Redis has it: starting
        over after every failure never finished on a lossy link, and counts were lost."""
        while self._resend:  # rounds of one round trip: the oldest batch of each shard
            first: dict[int, tuple[int, bytes]] = {}
            for seq, shard, payload in self._resend:
                first.setdefault(shard, (seq, payload))
            results = await apply_batches(
                redis, self.keyspace, {shard: payload for shard, (_, payload) in first.items()}
            )
            for shard, reply in results.items():
                self._settle(shard, reply, "a re-sent batch")
                seq = first[shard][0]
                self._resend.remove((seq, shard, first[shard][1]))
                self._journal_applied(shard, seq)  # acknowledged again: a new window

    def _lost_contact(self) -> None:
        """A command failed, even one whose failure is otherwise shrugged off: the next command
        may reach a restarted Redis (redis-py reconnects silently) that lost the last batches,
        so the run id is checked before any batch is sent, and the journal keeps the recent
        batches to send again until it is. A restart is found out only once Redis answers."""
        self.journal.hold_recent()
        self._shards_checked = False

    def _failed(self, exc: BaseException) -> None:
        self._lost_contact()
        self._failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        delay = min(5.0, self.settings.flush_interval * 2**self._failures)
        self._retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)
        if self._failures == 1:
            log.warning("meterwall: Redis unavailable, buffering (%s)", self.last_error)

    def _client(self) -> Redis:
        loop = asyncio.get_running_loop()
        if self._redis is None or self._redis_loop is not loop:  # a client is bound to its loop
            self._redis, self._redis_loop = connect(self.settings), loop
        return self._redis

    # -- shutdown ----------------------------------------------------------------------------

    def idle(self) -> bool:
        return not (
            self.inbox or self.outbox or self._pending or self.meter or self._counters
            or self._uniques or self._resend
        )  # fmt: skip

    async def flush(self, timeout: float = 5.0) -> bool:
        """Flush everything now (retrying until ``timeout`` s); True if nothing is left."""
        deadline = time.monotonic() + timeout
        self._flushing = True
        try:
            while not self.idle():
                if time.monotonic() > deadline:
                    return False
                self._retry_at = min(self._retry_at, time.monotonic())
                if not await self.flush_once() and self.last_error is not None:
                    await asyncio.sleep(min(0.05 * 2**self._failures, 0.5))
            return True
        finally:
            self._flushing = False

    async def aclose(self, timeout: float = 5.0) -> bool:
        """Stop the task (without cancelling a command in flight), flush, close the client."""
        self._in_aclose = True  # a request meanwhile must not start the task again (start)
        try:
            return await self._aclose(timeout)
        finally:
            self._in_aclose = False

    async def _aclose(self, timeout: float) -> bool:
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        loop = asyncio.get_running_loop()
        if task is not None and task.get_loop() is loop:
            await task
        elif self._loop is not loop:  # started in another (maybe closed) loop: start afresh here
            self._lock = asyncio.Lock()
            self._loop = loop
        if self._redis_loop is not loop:  # another loop's client cannot be closed from this one
            self._redis = None
        done = await self.flush(timeout)
        if not done:
            log.error("meterwall: shutdown left unflushed data (%s)", self.last_error)
        left_behind = not done and isinstance(self.journal, FileJournal)
        self.journal.close(clean=done)  # not done: another worker adopts what is left...
        if self._given_journal is None:
            self.journal = NullJournal()
        if left_behind:  # ... and this process forgets it, should it go on serving
            self._new_life()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        return done

    def health(self) -> dict[str, Any]:
        """The flusher's state for ``meterwall.health()``."""
        running = self._task is not None and not self._task.done()
        # (no journal: a kill loses counts; a stale one waits for an operator)
        degraded = self.last_error or self.journal_error or self.stale_journals
        state = "stopped" if not running else "degraded" if degraded else "ok"
        return {
            "state": "misconfigured" if self.misconfigured else state,
            "misconfigured": self.misconfigured,
            "warning": self.eviction_warning,
            "writer": self.writer,
            "queued_records": len(self.inbox)
            + len(self.outbox)
            + sum(n for _, _, n in self._pending.values()),
            "queued_bytes": self.inbox.bytes + self.outbox.bytes,
            "pending_batches": len(self._pending) + len(self._resend),
            "records_dropped": self._dropped_total + self.inbox.dropped + self.outbox.dropped,
            "unique_adds_dropped": self._uniques_dropped_total + self._uniques_dropped,
            "batches_refused": self.batches_refused,
            "last_error": self.last_error,
            "journal_error": self.journal_error,
            "stale_journals": sorted(self.stale_journals),
            "last_flush_ok": self.last_flush_ok,
        }


def _record_groups(records: list[Sealed]) -> list[list[Any]]:
    """One group per time slice: its record count, length-prefixed blobs and index.

    The script stores each group as one stream entry, so Redis's work does not grow by a
    command per record. The index is ``[identifier, positions, ...]``: each identifier once,
    with the positions (2 bytes each) of the group's records it names; the script makes one
    index member of each (``keyspace.index_member``).
    """
    by_slice: dict[int, list[Sealed]] = {}
    for record in records:
        by_slice.setdefault(record[1], []).append(record)
    groups = []
    pack_length = _LENGTH.pack
    for slice_start, items in by_slice.items():
        blobs = b"".join([pack_length(len(r[2])) + r[2] for r in items])
        positions: dict[bytes, list[int]] = {}
        for i, record in enumerate(items):
            for ident in record[3]:
                at = positions.get(ident)
                if at is None:
                    positions[ident] = [i]
                else:
                    at.append(i)
        index = [part for ident, at in positions.items() for part in (ident, pack_positions(at))]
        groups.append([slice_start, len(items), blobs, index])
    return groups


def _journal_dir(settings: Settings) -> Path | None:
    """This deployment's journal directory, or None with ``MW_JOURNAL_DIR=off``."""
    if settings.journal_dir == "off":
        return None
    base = settings.journal_dir or os.path.join(tempfile.gettempdir(),
                                                f"meterwall-journal-{os.getuid()}")  # fmt: skip
    return deployment_dir(base, settings.redis_url, settings.key_prefix)
