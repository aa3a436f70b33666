"""The worker-local journal (DESIGN decision 3): a killed worker loses no count.

Every request's counter delta is appended on the request path (one ``write`` to the OS, no
fsync: it survives a process kill, not a machine crash). When the flusher packs a batch it writes,
in one ``write``, a marker that the deltas so far are inside that batch, and the batch itself
(counters and sealed records). Redis's acknowledgements are appended too.

A journal lives in ``MW_JOURNAL_DIR/<deployment>/`` as segment files of one writer, locked by a
``.lock`` file the writer holds (``flock``) for its lifetime. Every few seconds the writer starts a
new segment with a snapshot of what is still needed (the deltas not yet packed, the batches not yet
acknowledged) and deletes the old ones, but for those holding a batch acknowledged within the
durability window, so a journal stays small and young. Any other worker of the deployment that can
take a dead writer's lock adopts its journal: it re-sends its batches (the writer's high-water marks
turn what Redis already has into no-ops) and packs its remaining deltas as one more batch of that
writer. Unique-client members are journaled by each sealing pass and travel the same way.
Raw records not yet sealed when a worker is killed are lost (at most one flush interval), and
with them the clients seen only in those requests.
Batches Redis acknowledged in the last ``KEEP_S`` seconds are sent again when Redis's run id
changes (a Redis killed with ``appendfsync everysec`` can lose its last second).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import msgpack

from .metering import Deltas, Meter

log = logging.getLogger("meterwall")

KEEP_S = 10.0  # acknowledged batches are kept this long (a Redis restart may undo them)
ROTATE_S = 2.0  # a new segment at most this often
MAX_AGE_S = 24 * 3600  # an abandoned journal older than the retention ceiling is dropped
# How long a writer's high-water mark outlives its last batch (the flush script's `hwm:` key).
# Replaying a journal is exact only while its writer's marks exist: an older one is left for an
# operator (STALE_AFTER_S, a day of margin), never replayed on its own.
MARK_LIFETIME_S = 30 * 86400
STALE_AFTER_S = MARK_LIFETIME_S - 86400
_HEAD = struct.Struct(">IB")  # length of the body, kind
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16  # buffers per writev
DELTA, SNAPSHOT, TAKEN, BATCH, APPLIED = b"D"[0], b"S"[0], b"M"[0], b"P"[0], b"A"[0]
HIGH = b"H"[0]  # the writer's highest batch number so far (a new segment must not forget it)
# Unique clients not sent yet: [[consumer, UTC day number, latest request s, 8-byte members]].
# They travel with the counters (TAKEN covers them too) but are found at sealing, not on the
# request path: each sealing pass journals the members it saw first.
UNIQUES = b"U"[0]
# A compaction's snapshot: [deltas as SNAPSHOT holds them, uniques as UNIQUES holds them], in
# one entry, so a kill in the middle of writing it cannot leave one without the other (a torn
# entry is ignored and the old segments, not yet deleted, still hold both). SNAPSHOT entries
# (deltas only) of journals written before it are still read.
SNAPSHOT_ALL = b"Z"[0]
# A DELTA body is the msgpack array of ``Meter.add``'s ten arguments. ``FileJournal.delta``
# encodes it by hand: integers as msgpack int64 (marker 0xd3 and 8 bytes, valid for any value
# that fits), the text fields as cached msgpack strings.
_INT64 = b"\xd3"
_TIME = struct.Struct(">q")
_COUNTS = struct.Struct(">qcqcqcq")  # status, ttfb ns, bytes in, bytes out, int64 markers between
_TEXTS_CACHE_LIMIT = 4096


class Journal(Protocol):
    def delta(self, row: Sequence[Any]) -> None:
        """One request's counter delta (``Meter.add``'s arguments), on the request path."""

    def packed(self, writer: str, seq: int, batches: dict[int, bytes], took_deltas: bool) -> None:
        """Batches packed for sending; ``took_deltas``: they hold every delta so far."""

    def uniques(self, entries: list[list[Any]]) -> None:
        """Unique-client members first seen by a sealing pass (see ``UNIQUES``)."""

    def applied(self, writer: str, shard: int, seq: int) -> None:
        """Redis answered applied (or duplicate, which means an earlier attempt landed)."""

    def recent(self) -> list[tuple[int, int, bytes]]:
        """(seq, shard, batch) acknowledged within ``KEEP_S``: to send again after a Redis
        restart, in batch order."""

    def owed(self, batches: list[tuple[int, int, bytes]]) -> None:
        """(seq, shard, batch) a restarted Redis lost, to send again: kept like batches never
        acknowledged (copied by every compaction) until Redis acknowledges them again, so a
        kill in the middle of sending them again loses none."""

    def hold_recent(self) -> None:
        """Contact with Redis is lost: keep what ``recent`` would answer now until released
        (finding out whether Redis restarted may take longer than ``KEEP_S``)."""

    def release_recent(self) -> None:
        """Redis answered again and its run id was checked: the usual window applies again."""

    def compact(
        self, pending_deltas: Deltas, pending_uniques: Callable[[], list[list[Any]]] = list
    ) -> None:
        """Maybe start a new segment holding only what is still needed (``pending_uniques``
        is called only then)."""

    def close(self, *, clean: bool) -> None:
        """Stop writing; ``clean``: everything reached Redis, delete the journal."""


class NullJournal:
    """Keeps nothing: a process kill loses what was not flushed yet (``MW_JOURNAL_DIR=off``)."""

    __slots__ = ()

    def delta(self, row: Sequence[Any]) -> None:
        return None

    def packed(self, writer: str, seq: int, batches: dict[int, bytes], took_deltas: bool) -> None:
        return None

    def uniques(self, entries: list[list[Any]]) -> None:
        return None

    def applied(self, writer: str, shard: int, seq: int) -> None:
        return None

    def recent(self) -> list[tuple[int, int, bytes]]:
        return []

    def owed(self, batches: list[tuple[int, int, bytes]]) -> None:
        return None

    def hold_recent(self) -> None:
        return None

    def release_recent(self) -> None:
        return None

    def compact(
        self, pending_deltas: Deltas, pending_uniques: Callable[[], list[list[Any]]] = list
    ) -> None:
        return None

    def close(self, *, clean: bool) -> None:
        return None


def _check_private(path: Path) -> None:
    """A journal's directory and its parent must be ours (or root's) and writable by nobody
    else: whoever can write there can plant a journal that the next adoption replays into the
    ledger, or swap ours away. The default lies in the shared temporary directory, where
    another user could create it first."""
    info = os.stat(path)
    if info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o022:
        raise OSError(
            f"journal: {path} is owned by uid {info.st_uid} with mode {info.st_mode & 0o777:o}; "
            "it must be this user's (or root's) and writable by nobody else"
        )


def deployment_dir(base: str, redis_url: str, key_prefix: str) -> Path:
    """Journals of one deployment only: another prefix or Redis never adopts them."""
    tag = hashlib.sha256(f"{redis_url}|{key_prefix}".encode()).hexdigest()[:16]
    return Path(base) / tag


class FileJournal:
    """The journal of one writer (one process), in ``directory``."""

    def __init__(
        self, directory: Path, writer: str, *, rotate_s: float = ROTATE_S, top: int = 0
    ) -> None:
        """``top``: the highest batch number the writer used before (a flusher started again
        after ``aclose``): an adopter must replay leftovers above it, never as a batch below."""
        for place in (directory.parent, directory):  # (a mode for each: umask may be 0)
            place.mkdir(mode=0o700, parents=True, exist_ok=True)
            _check_private(place)
        self.directory = directory
        self.writer = writer
        self._rotate_s = rotate_s
        # Locked before it has its name: an adopter looking for dead writers' locks must never
        # take a live writer's in the moment between its creation and its lock.
        making = directory / f".{writer}.lock.new"
        self._lock_fd = os.open(making, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(making, directory / f"{writer}.lock")
        # A marker of an earlier life's replay must not make an adopter delete this one's
        (directory / f"{writer}.replayed").unlink(missing_ok=True)
        self._segment = 0
        self._fd = -1
        self._opened_at = 0.0
        self._top = top  # the highest batch number this writer packed
        # Batches still needed, by (seq, shard): (payload, acknowledged at or 0, the segment
        # holding its latest copy). An acknowledged batch's payload is dropped from memory (ten
        # seconds of sealed records are tens of megabytes under load): ``recent`` reads it back.
        self._batches: dict[tuple[int, int], tuple[bytes, float, int]] = {}
        # The encoded parts of a delta entry around its numbers, by its text fields.
        self._delta_parts: dict[tuple[str, ...], tuple[bytes, bytes, bytes]] = {}
        self._held_since: float | None = None  # acknowledged after this: kept (hold_recent)
        self._open_segment()
        if top:
            self._write((HIGH, top))

    def _path(self, segment: int) -> Path:
        return self.directory / f"{self.writer}.{segment:08d}.seg"

    def _open_segment(self) -> None:
        self._segment += 1
        path = self._path(self._segment)
        self._fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        self._opened_at = time.monotonic()

    def _write(self, *entries: tuple[int, Any]) -> None:
        """Entries in one system call (a marker never lands without the batches it marks),
        each written from where msgpack packed it: a flush's batches are not copied again."""
        buffers: list[bytes] = []
        for kind, body in entries:
            packed = msgpack.packb(body, use_bin_type=True)
            buffers += [_HEAD.pack(len(packed), kind), packed]
        if len(buffers) > _IOV_MAX:  # a compaction after a long outage: one joined buffer
            buffers = [b"".join(buffers)]
        size = sum(len(buffer) for buffer in buffers)
        if os.writev(self._fd, buffers) != size:  # a full disk: never delete what it replaces
            raise OSError(f"journal: short write to segment {self._segment}")

    def delta(self, row: Sequence[Any]) -> None:
        """One ``write`` per request, and cheap to encode: the same DELTA entry as
        ``_write((DELTA, list(row)))`` would write, bar integer widths, built from cached parts.
        A row that does not fit (say a status that is not an integer) takes that general path.
        """
        try:
            time_s, consumer, key_id, route, method, status, ttfb, size_in, size_out, denied = row
            start = _TIME.pack(time_s)
            counts = _COUNTS.pack(status, _INT64, ttfb, _INT64, size_in, _INT64, size_out)
        except (ValueError, struct.error):
            self._write((DELTA, list(row)))
            return
        texts = (consumer, key_id, route, method, denied)
        parts = self._delta_parts.get(texts)
        if parts is None:
            parts = _delta_parts(texts)
            if len(self._delta_parts) >= _TEXTS_CACHE_LIMIT:  # consumer names come from clients
                self._delta_parts.clear()
            self._delta_parts[texts] = parts
        head, names, tail = parts
        entry = b"".join((head, start, names, counts, tail))
        if os.write(self._fd, entry) != len(entry):  # a full disk
            raise OSError(f"journal: short write to segment {self._segment}")

    def packed(self, writer: str, seq: int, batches: dict[int, bytes], took_deltas: bool) -> None:
        self._top = max(self._top, seq)
        entries: list[tuple[int, Any]] = [(TAKEN, seq)] if took_deltas else []
        for shard, payload in batches.items():
            entries.append((BATCH, [seq, shard, payload]))
            self._batches[(seq, shard)] = (payload, 0.0, self._segment)
        self._write(*entries)  # one write: the marker never lands without its batches

    def uniques(self, entries: list[list[Any]]) -> None:
        self._write((UNIQUES, entries))

    def applied(self, writer: str, shard: int, seq: int) -> None:
        known = self._batches.get((seq, shard))
        if known is not None:
            self._batches[(seq, shard)] = (b"", time.monotonic(), known[2])
        self._write((APPLIED, [seq, shard]))

    def recent(self) -> list[tuple[int, int, bytes]]:
        """Read back from the segments that hold them (kept until ``KEEP_S`` has passed)."""
        wanted = {key: home for key, (_, at, home) in self._batches.items()
                  if self._keeps(at)}  # fmt: skip
        found: dict[tuple[int, int], bytes] = {}
        for home in sorted(set(wanted.values())):
            try:
                data = self._path(home).read_bytes()
            except OSError as exc:  # a segment removed by hand: what it held cannot be re-sent
                log.warning("meterwall: journal segment %d unreadable: %s", home, exc)
                continue
            for kind, body in _entries(data):
                if kind == BATCH and wanted.get((body[0], body[1])) == home:
                    found[(body[0], body[1])] = body[2]
        return [(seq, shard, found[(seq, shard)]) for seq, shard in sorted(found)]

    def _keeps(self, acknowledged_at: float) -> bool:
        """An acknowledged batch a restarted Redis may have lost (0: not acknowledged)."""
        if not acknowledged_at:
            return False
        held = self._held_since
        since = time.monotonic() if held is None else held
        return since - acknowledged_at < KEEP_S or acknowledged_at > since

    def owed(self, batches: list[tuple[int, int, bytes]]) -> None:
        for seq, shard, payload in batches:
            home = self._batches.get((seq, shard), (b"", 0.0, self._segment))[2]
            self._batches[(seq, shard)] = (payload, 0.0, home)

    def hold_recent(self) -> None:
        if self._held_since is None:
            self._held_since = time.monotonic()

    def release_recent(self) -> None:
        self._held_since = None

    def compact(
        self, pending_deltas: Deltas, pending_uniques: Callable[[], list[list[Any]]] = list
    ) -> None:
        """A new segment with the unpacked deltas and unique clients and the unacknowledged
        batches; old ones go.

        A batch acknowledged within ``KEEP_S`` is not copied: the old segment holding it stays
        until then. (Copying those batches at every rotation cost more CPU under load than all
        the rest of the journal.) A reader reads every segment in order and the newest starts
        with the snapshot, so the deltas in a kept segment count for nothing.
        """
        now = time.monotonic()
        if now - self._opened_at < self._rotate_s:
            return
        old = self._segment
        old_fd = self._fd
        self._open_segment()
        snapshot = [[list(key), values] for key, values in pending_deltas.items()]
        # The highest batch number goes first: an adopter sends the leftover deltas as the next
        # batch, and a number at or below the writer's high-water mark would be dropped.
        entries: list[tuple[int, Any]] = [
            (HIGH, self._top), (SNAPSHOT_ALL, [snapshot, pending_uniques()])
        ]  # fmt: skip
        batches: dict[tuple[int, int], tuple[bytes, float, int]] = {}
        kept: set[int] = set()  # old segments holding a batch acknowledged within KEEP_S
        for (seq, shard), (payload, acked, home) in sorted(self._batches.items()):
            if not acked:
                entries.append((BATCH, [seq, shard, payload]))
                batches[(seq, shard)] = (payload, acked, self._segment)
            elif self._keeps(acked):
                batches[(seq, shard)] = (payload, acked, home)
                kept.add(home)
        self._batches = batches
        self._write(*entries)
        os.close(old_fd)
        for path in self.directory.glob(f"{self.writer}.*.seg"):
            number = int(path.name.split(".")[1])
            if number <= old and number not in kept:
                path.unlink(missing_ok=True)

    def close(self, *, clean: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if clean:
            for path in self.directory.glob(f"{self.writer}.*.seg"):
                path.unlink(missing_ok=True)
            (self.directory / f"{self.writer}.lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)  # releases the lock: another worker may adopt what is left

    def forget_after_fork(self) -> None:
        """In a forked child: close the parent's descriptors (the parent keeps its lock)."""
        for fd in (self._fd, self._lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._lock_fd = -1


class Replay(NamedTuple):
    """A dead writer's journal, read."""

    batches: list[tuple[int, int, bytes]]  # (seq, shard, payload), in batch order
    deltas: Deltas  # in no batch
    uniques: list[tuple[str, int, int, bytes]]  # in no batch: see ``UNIQUES``
    top: int  # the highest batch number the writer used


class Orphan:
    """A dead writer's journal, held locked while it is replayed."""

    def __init__(self, directory: Path, writer: str, lock_fd: int) -> None:
        self.directory, self.writer, self._lock_fd = directory, writer, lock_fd

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.writer}.*.seg"))

    def age_s(self) -> float:
        """Seconds since the dead writer last wrote to its journal."""
        paths = self.segments() or [self.directory / f"{self.writer}.lock"]
        return time.time() - max(path.stat().st_mtime for path in paths)

    def read(self) -> Replay:
        """What the dead writer left to send."""
        batches: dict[tuple[int, int], bytes] = {}
        meter = Meter()
        uniques: dict[tuple[str, int], tuple[int, set[bytes]]] = {}
        top = 0
        for path in self.segments():
            for kind, body in _entries(path.read_bytes()):
                if kind in (SNAPSHOT, SNAPSHOT_ALL):
                    meter, uniques = Meter(), {}
                    deltas, days = (body, []) if kind == SNAPSHOT else body
                    for key, values in deltas:
                        meter.merge(tuple(key), values)
                    _add_uniques(uniques, days)
                elif kind == DELTA:
                    meter.add(*body)
                elif kind == UNIQUES:
                    _add_uniques(uniques, body)
                elif kind == TAKEN:
                    meter, uniques = Meter(), {}  # all so far is inside batch ``body``
                    top = max(top, int(body))
                elif kind == BATCH:
                    seq, shard, payload = body
                    batches[(seq, shard)] = payload
                    top = max(top, int(seq))
                elif kind == HIGH:
                    top = max(top, int(body))
        ordered = [(seq, shard, payload) for (seq, shard), payload in sorted(batches.items())]
        days = [(c, d, latest_s, b"".join(sorted(m))) for (c, d), (latest_s, m) in uniques.items()]
        return Replay(ordered, meter.take(), days, top)

    def replayed(self) -> None:
        """Everything reached Redis: kept ``KEEP_S`` more, like a live writer's acknowledged
        batches (a Redis restart may undo the replay: ``orphans(again=True)``), then it goes."""
        self._marker().write_bytes(b"")
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def replayed_ago(self) -> float | None:
        """Seconds since this journal was replayed, or None if it never was."""
        try:
            return time.time() - self._marker().stat().st_mtime
        except FileNotFoundError:
            return None

    def _marker(self) -> Path:
        return self.directory / f"{self.writer}.replayed"

    def release(self) -> None:
        """The journal goes."""
        for path in self.segments():
            path.unlink(missing_ok=True)
        self._marker().unlink(missing_ok=True)
        (self.directory / f"{self.writer}.lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def abandon(self) -> None:
        """Replay failed (Redis away): unlock, and try again later."""
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def orphans(directory: Path, live: str, *, again: bool = False) -> Iterator[Orphan]:
    """Journals of writers that are gone (their lock can be taken), oldest first.

    A journal replayed already is skipped, and deleted once ``KEEP_S`` has passed; with
    ``again`` (Redis restarted, and may have lost the replay) it is yielded once more: a replay
    is idempotent while Redis holds the batch marks, and restores what Redis lost otherwise.
    Callers ask only while Redis answers, its run id checked: a restart is never missed.
    """
    if not directory.is_dir():
        return
    for lock in sorted(directory.glob("*.lock"), key=_mtime):
        writer = lock.name[: -len(".lock")]
        if writer == live:
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The file may have been replaced meanwhile (a clean close unlinked it and its
            # writer, alive, made a new one): only a lock on the current file counts.
            stale = os.fstat(fd).st_ino != lock.stat().st_ino
        except (BlockingIOError, FileNotFoundError):
            stale = True  # its writer is alive, or another adopter released it just now
        if stale:
            os.close(fd)
            continue
        orphan = Orphan(directory, writer, fd)
        if time.time() - os.fstat(fd).st_mtime > MAX_AGE_S and not orphan.segments():
            orphan.release()
            continue
        replayed_ago = orphan.replayed_ago()
        if replayed_ago is not None and not again:
            if replayed_ago > KEEP_S:
                orphan.release()
            else:
                orphan.abandon()
            continue
        yield orphan


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # released by another adopter meanwhile
        return 0.0


def _add_uniques(
    uniques: dict[tuple[str, int], tuple[int, set[bytes]]], days: list[list[Any]]
) -> None:
    for consumer, day, latest_s, members in days:
        known = uniques.get((consumer, day))
        if known is None:
            known = uniques[consumer, day] = (latest_s, set())
        elif known[0] < latest_s:
            known = uniques[consumer, day] = (latest_s, known[1])
        known[1].update(members[i : i + 8] for i in range(0, len(members), 8))


def _delta_parts(texts: tuple[str, ...]) -> tuple[bytes, bytes, bytes]:
    """A DELTA entry but its numbers: (head up to the time, the names up to the status, the
    denial). The body is ``[time, consumer, key id, route, method, status, ttfb, in, out,
    denied]``: a 10-element array (0x9a), integers as int64, strings as msgpack packs them."""
    consumer, key_id, route, method, denied = texts
    names = b"".join([msgpack.packb(text) for text in (consumer, key_id, route, method)])
    tail = msgpack.packb(denied)
    length = 2 + _TIME.size + len(names) + 1 + _COUNTS.size + len(tail)
    return _HEAD.pack(length, DELTA) + b"\x9a" + _INT64, names + _INT64, tail


def _entries(data: bytes) -> Iterator[tuple[int, Any]]:
    """Entries of a segment; a torn last entry (a kill mid-write of a huge batch) ends it."""
    pos = 0
    while pos + _HEAD.size <= len(data):
        length, kind = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        if start + length > len(data):
            return
        yield kind, msgpack.unpackb(data[start : start + length], raw=False)
        pos = start + length
