"""Every Redis key meterwall uses is built here (documented in docs/keyspace.md).

Keys that belong together carry the hash tag of a logical shard, ``{sNN}``, derived from the
consumer id, so that one consumer's data lives in one Redis Cluster slot and a flush needs at most
one script call per shard. The shard count is fixed per deployment and recorded in Redis
(``<prefix>:meta``) so that every process agrees; a process configured with another count
refuses to start.
"""

from __future__ import annotations

import struct
import zlib

#: Raw records are grouped in slices of this many seconds; a slice expires as one key, at its
#: start plus the retention, so a record lives between (retention - slice) and retention.
SLICE_SECONDS = 300
#: Counter buckets (seconds).
BUCKET_15M = 900
BUCKET_1H = 3600

#: Index member tags (first byte of a member of an index zset).
TAG_IP = b"i"
TAG_NET = b"n"
TAG_CONSUMER = b"c"
TAG_KEY = b"k"
#: Tag + 16-byte keyed identifier: the part of an index member a lookup searches by.
IDENT_BYTES = 17


def index_member(member: bytes) -> tuple[bytes, bytes, bytes]:
    """An index member's identifier, stream entry id and packed record positions in that entry.

    A member is ``tag + identifier (16) + entry id length (1) + entry id + positions`` (2 bytes
    each, big-endian, ascending): one member per identifier and stored group, however many of
    the group's records it names, so an address or consumer seen a thousand times in a flush
    costs a few bytes per record instead of a sorted-set member each (``lua/apply_batch.lua``
    writes them). ``unpack_positions`` reads the positions.
    """
    end = IDENT_BYTES + 1 + (member[IDENT_BYTES] if len(member) > IDENT_BYTES else 0)
    tail = member[end:]
    if len(member) <= end or len(tail) % 2:
        raise ValueError("not an index member")
    return member[:IDENT_BYTES], member[IDENT_BYTES + 1 : end], tail


def tag_range(tag: bytes) -> tuple[bytes, bytes]:
    """ZRANGEBYLEX bounds of a slice index's members of one tag (every address member, say)."""
    return b"[" + tag, b"(" + bytes([tag[0] + 1])


def records_named(member: bytes) -> int:
    """How many records of its stream entry an index member names."""
    return len(index_member(member)[2]) // 2


def unpack_positions(packed: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{len(packed) // 2}H", packed)


def pack_positions(positions: list[int]) -> bytes:
    return struct.pack(f">{len(positions)}H", *positions)


def _slice_seconds(retention_s: int) -> int:
    """At most 5 minutes and a quarter of the retention, and a divisor of an hour: a slice
    never straddles an hour, so the index entries of its records are all keyed by the pseudonym
    key of the hour a search looks up for it (a 14-minute retention would give 210 s slices)."""
    most = min(SLICE_SECONDS, max(1, retention_s // 4))
    return max(d for d in range(1, most + 1) if 3600 % d == 0)


class Keyspace:
    """Key names under one prefix; cheap to call on the flusher's path."""

    __slots__ = ("_shard_prefixes", "prefix", "shards", "slice_seconds")

    def __init__(self, prefix: str, shards: int, retention_s: int = 86400) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("a key prefix must not contain '{' or '}'")
        self.prefix = prefix
        self.shards = shards
        # Short retentions (tests, strict deployments) get short slices, so that a slice's
        # expiry at start + retention does not cut its records' lives short.
        self.slice_seconds = _slice_seconds(retention_s)
        self._shard_prefixes = [f"{prefix}:{{s{n:02d}}}:" for n in range(shards)]

    def shard_of(self, consumer: str) -> int:
        """The logical shard of a consumer; anonymous traffic ('') always lands on shard 0."""
        if not consumer:
            return 0
        return zlib.crc32(consumer.encode()) % self.shards

    def slice_start(self, time_s: int) -> int:
        return time_s - time_s % self.slice_seconds

    def shard_prefix(self, shard: int) -> str:
        """Prefix of every key of one shard; the flush script builds its keys from it."""
        return self._shard_prefixes[shard]

    # Keys of one shard (the Lua script builds the same names from the shard prefix).
    def records(self, shard: int, slice_start: int) -> str:
        return f"{self._shard_prefixes[shard]}rec:{slice_start}"

    def index(self, shard: int, slice_start: int) -> str:
        return f"{self._shard_prefixes[shard]}ix:{slice_start}"

    def slices(self, shard: int) -> str:
        return f"{self._shard_prefixes[shard]}slices"

    def data_key(self, shard: int, key_id: bytes) -> str:
        return f"{self._shard_prefixes[shard]}dk:{key_id.hex()}"

    def high_water_mark(self, shard: int, writer: str) -> str:
        return f"{self._shard_prefixes[shard]}hwm:{writer}"

    def counters_15m(self, shard: int, bucket_start: int) -> str:
        return f"{self._shard_prefixes[shard]}c15:{bucket_start}"

    def counters_1h(self, shard: int, bucket_start: int) -> str:
        return f"{self._shard_prefixes[shard]}c1h:{bucket_start}"

    def stats(self, shard: int) -> str:
        return f"{self._shard_prefixes[shard]}stats"

    def counters_day(self, consumer: str, day: str) -> str:
        """One consumer's counters of one day in its billing zone ('YYYY-MM-DD')."""
        return f"{self._shard_prefixes[self.shard_of(consumer)]}cd:{consumer}:{day}"

    def counters_month(self, consumer: str, month: str) -> str:
        """One consumer's counters of one month in its billing zone ('YYYY-MM')."""
        return f"{self._shard_prefixes[self.shard_of(consumer)]}cm:{consumer}:{month}"

    def closed(self, consumer: str, month: str) -> str:
        """The frozen snapshot of a consumer's closed month (JSON with a checksum)."""
        return f"{self._shard_prefixes[self.shard_of(consumer)]}closed:{consumer}:{month}"

    def adjustments(self, consumer: str, month: str) -> str:
        """Deltas that arrived for a consumer's month after it was closed."""
        return f"{self._shard_prefixes[self.shard_of(consumer)]}adj:{consumer}:{month}"

    def uniques(self, consumer: str, day: str) -> str:
        """HyperLogLog of one consumer's daily client pseudonyms of one UTC day."""
        return f"{self._shard_prefixes[self.shard_of(consumer)]}uq:{consumer}:{day}"

    def rate(self, shard: int, consumer: str) -> str:
        """A consumer's rate-limit state (GCRA theoretical arrival time, ms); expires when idle."""
        return f"{self._shard_prefixes[shard]}rl:{consumer}"

    def quota(self, shard: int, consumer: str, month: str) -> str:
        """A consumer's quota of one billing month: tokens used and the outstanding leases."""
        return f"{self._shard_prefixes[shard]}qt:{consumer}:{month}"

    # Keys outside the shards.
    def meta(self) -> str:
        return f"{self.prefix}:meta"

    def consumers(self) -> str:
        return f"{self.prefix}:consumers"

    def consumer_networks(self) -> str:
        """Hash: consumer id -> its allowed and denied networks (only consumers that have any)."""
        return f"{self.prefix}:consumer-networks"

    def restricted(self) -> str:
        """Hash: restricted subjects (``ip~<hex>`` long-lived pseudonyms, ``consumer:<id>``)."""
        return f"{self.prefix}:restricted"

    def api_key(self, key_id: str) -> str:
        """One API key's metadata and keyed hash (never the key itself)."""
        return f"{self.prefix}:key:{key_id}"

    def key_last_used(self) -> str:
        """Hash: key id -> when it was last used (unix seconds, to the minute)."""
        return f"{self.prefix}:key-used"

    def key_events(self) -> str:
        """Pub/sub channel: key ids whose metadata changed (revoked, rotated)."""
        return f"{self.prefix}:key-events"

    def export_state(self, sink: str, month: str) -> str:
        """Hash: a sink's deliveries of one month, field ``<kind>:<consumer>`` (kind ``closed``
        or ``running``), so that a consumer's erasure finds them whatever the sink."""
        return f"{self.prefix}:export:{sink}:{month}"

    def export_states(self) -> str:
        """A SCAN pattern matching every sink's ``export_state`` hashes."""
        return f"{self.prefix}:export:*"

    def epoch_keys(self, hour: int) -> str:
        return f"{self.prefix}:epk:{hour}"

    def uniques_keys(self, day: int) -> str:
        """The random key(s) of one UTC day of unique-client counts (day: unix time // 86400)."""
        return f"{self.prefix}:uqk:{day}"

    def pattern(self) -> str:
        """A SCAN pattern matching every key of this deployment."""
        return f"{self.prefix}:*"


def split_group(packed: bytes) -> list[bytes]:
    """The sealed records of one stream entry (each prefixed by its 4-byte length)."""
    blobs, pos, end = [], 0, len(packed)
    while pos + 4 <= end:
        length = int.from_bytes(packed[pos : pos + 4], "big")
        blobs.append(packed[pos + 4 : pos + 4 + length])
        pos += 4 + length
    if pos != end:
        raise ValueError("a record group is truncated")
    return blobs


#: Separator of the parts of a counter field (consumers, routes and key ids never contain it).
SEP = "\x1f"


def counter_field(
    consumer: str, key_id: str, route: str, method: str, status: int, measure: str
) -> str:
    """Field of a shard's 15-minute or hour hash: every dimension, then the measure."""
    return f"{consumer}{SEP}{key_id}{SEP}{route}{SEP}{method}{SEP}{status}{SEP}{measure}"


def split_counter_field(field: str) -> tuple[str, str, str, str, int, str]:
    consumer, key_id, route, method, status, measure = field.split(SEP)
    return consumer, key_id, route, method, int(status), measure
