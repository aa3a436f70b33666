"""The worker-local journal (DESIGN decision 3): a killed worker loses no count.

Every request's counter delta is appended on the request path (one ``write`` to the OS, no
fsync: it survives a process kill, not a machine crash). When the flusher packs a batch it writes,
in one ``write``, a marker that the deltas so far are inside that batch, and the batch itself
(counters and sealed records). Redis's acknowledgements are appended too.

A journal lives in ``MW_JOURNAL_DIR/<deployment>/`` as segment files of one writer, locked by a
``.lock`` file the writer holds (``flock``) for its lifetime. Every few seconds the writer starts a
new segment with a snapshot of what is still needed (the deltas not yet packed, the batches not yet
acknowledged or acknowledged within the durability window) and deletes the old ones, so a journal
stays small and young. Any other worker of the deployment that can take a dead writer's lock adopts
its journal: it re-sends its batches (the writer's high-water marks turn what Redis already has into
no-ops) and packs its remaining deltas as one more batch of that writer. Raw records not yet sealed
when a worker is killed are lost: at most one flush interval. Batches Redis acknowledged in the last
``KEEP_S`` seconds are sent again when Redis's run id changes (a Redis killed with
``appendfsync everysec`` can lose its last second).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgpack

from .metering import Deltas, Meter

log = logging.getLogger("meterwall")

KEEP_S = 10.0  # acknowledged batches are kept this long (a Redis restart may undo them)
ROTATE_S = 2.0  # a new segment at most this often
MAX_AGE_S = 24 * 3600  # an abandoned journal older than the retention ceiling is dropped
_HEAD = struct.Struct(">IB")  # length of the body, kind
DELTA, SNAPSHOT, TAKEN, BATCH, APPLIED = b"D"[0], b"S"[0], b"M"[0], b"P"[0], b"A"[0]


class Journal(Protocol):
    def delta(self, row: Sequence[Any]) -> None:
        """One request's counter delta (``Meter.add``'s arguments), on the request path."""

    def packed(self, writer: str, seq: int, batches: dict[int, bytes], took_deltas: bool) -> None:
        """Batches packed for sending; ``took_deltas``: they hold every delta so far."""

    def applied(self, writer: str, shard: int, seq: int) -> None:
        """Redis answered applied (or duplicate, which means an earlier attempt landed)."""

    def recent(self) -> list[tuple[int, bytes]]:
        """(shard, batch) acknowledged within ``KEEP_S``: to send again after a Redis restart."""

    def compact(self, pending_deltas: Deltas) -> None:
        """Maybe start a new segment holding only what is still needed."""

    def close(self, *, clean: bool) -> None:
        """Stop writing; ``clean``: everything reached Redis, delete the journal."""


class NullJournal:
    """Keeps nothing: a process kill loses what was not flushed yet (``MW_JOURNAL_DIR=off``)."""

    __slots__ = ()

    def delta(self, row: Sequence[Any]) -> None:
        return None

    def packed(self, writer: str, seq: int, batches: dict[int, bytes], took_deltas: bool) -> None:
        return None

    def applied(self, writer: str, shard: int, seq: int) -> None:
        return None

    def recent(self) -> list[tuple[int, bytes]]:
        return []

    def compact(self, pending_deltas: Deltas) -> None:
        return None

    def close(self, *, clean: bool) -> None:
        return None


def deployment_dir(base: str, redis_url: str, key_prefix: str) -> Path:
    """Journals of one deployment only: another prefix or Redis never adopts them."""
    tag = hashlib.sha256(f"{redis_url}|{key_prefix}".encode()).hexdigest()[:16]
    return Path(base) / tag


class FileJournal:
    """The journal of one writer (one process), in ``directory``."""

    def __init__(self, directory: Path, writer: str, *, rotate_s: float = ROTATE_S) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.writer = writer
        self._rotate_s = rotate_s
        self._lock_fd = os.open(directory / f"{writer}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._segment = 0
        self._fd = -1
        self._opened_at = 0.0
        # What a new segment must carry over: batches by (seq, shard) -> (payload, acked at).
        self._batches: dict[tuple[int, int], tuple[bytes, float]] = {}
        self._open_segment()

    def _open_segment(self) -> None:
        self._segment += 1
        path = self.directory / f"{self.writer}.{self._segment:08d}.seg"
        self._fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        self._opened_at = time.monotonic()

    def _write(self, *entries: tuple[int, Any]) -> None:
        buffer = bytearray()
        for kind, body in entries:
            packed = msgpack.packb(body, use_bin_type=True)
            buffer += _HEAD.pack(len(packed), kind) + packed
        os.write(self._fd, buffer)

    def delta(self, row: Sequence[Any]) -> None:
        self._write((DELTA, list(row)))

    def packed(self, writer: str, seq: int, batches: dict[int, bytes], took_deltas: bool) -> None:
        entries: list[tuple[int, Any]] = [(TAKEN, seq)] if took_deltas else []
        for shard, payload in batches.items():
            entries.append((BATCH, [seq, shard, payload]))
            self._batches[(seq, shard)] = (payload, 0.0)
        self._write(*entries)  # one write: the marker never lands without its batches

    def applied(self, writer: str, shard: int, seq: int) -> None:
        known = self._batches.get((seq, shard))
        if known is not None:
            self._batches[(seq, shard)] = (known[0], time.monotonic())
        self._write((APPLIED, [seq, shard]))

    def recent(self) -> list[tuple[int, bytes]]:
        now = time.monotonic()
        return [(shard, payload) for (_, shard), (payload, at) in sorted(self._batches.items())
                if at and now - at < KEEP_S]  # fmt: skip

    def compact(self, pending_deltas: Deltas) -> None:
        """A new segment with the unpacked deltas and the batches still needed; old ones go."""
        now = time.monotonic()
        if now - self._opened_at < self._rotate_s:
            return
        self._batches = {k: v for k, v in self._batches.items() if not v[1] or now - v[1] < KEEP_S}
        old = self._segment
        old_fd = self._fd
        self._open_segment()
        snapshot = [[list(key), values] for key, values in pending_deltas.items()]
        entries: list[tuple[int, Any]] = [(SNAPSHOT, snapshot)]
        for (seq, shard), (payload, acked) in sorted(self._batches.items()):
            entries.append((BATCH, [seq, shard, payload]))
            if acked:
                entries.append((APPLIED, [seq, shard]))
        self._write(*entries)
        os.close(old_fd)
        for path in self.directory.glob(f"{self.writer}.*.seg"):
            if int(path.name.split(".")[1]) <= old:
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


class Orphan:
    """A dead writer's journal, held locked while it is replayed."""

    def __init__(self, directory: Path, writer: str, lock_fd: int) -> None:
        self.directory, self.writer, self._lock_fd = directory, writer, lock_fd

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.writer}.*.seg"))

    def read(self) -> tuple[list[tuple[int, int, bytes]], Deltas, int]:
        """(batches as (seq, shard, payload), the deltas in no batch, the highest seq)."""
        batches: dict[tuple[int, int], bytes] = {}
        meter = Meter()
        top = 0
        for path in self.segments():
            for kind, body in _entries(path.read_bytes()):
                if kind == SNAPSHOT:
                    meter = Meter()
                    for key, values in body:
                        meter.merge(tuple(key), values)
                elif kind == DELTA:
                    meter.add(*body)
                elif kind == TAKEN:
                    meter = Meter()  # every delta so far is inside batch ``body``
                    top = max(top, int(body))
                elif kind == BATCH:
                    seq, shard, payload = body
                    batches[(seq, shard)] = payload
                    top = max(top, int(seq))
        ordered = [(seq, shard, payload) for (seq, shard), payload in sorted(batches.items())]
        return ordered, meter.take(), top

    def release(self) -> None:
        """Everything reached Redis: the journal goes."""
        for path in self.segments():
            path.unlink(missing_ok=True)
        (self.directory / f"{self.writer}.lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def abandon(self) -> None:
        """Replay failed (Redis away): unlock, and try again later."""
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def orphans(directory: Path, live: str) -> Iterator[Orphan]:
    """Journals of writers that are gone (their lock can be taken), oldest first."""
    if not directory.is_dir():
        return
    for lock in sorted(directory.glob("*.lock"), key=lambda p: p.stat().st_mtime):
        writer = lock.name[: -len(".lock")]
        if writer == live:
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # its writer is alive
            continue
        orphan = Orphan(directory, writer, fd)
        if time.time() - lock.stat().st_mtime > MAX_AGE_S and not orphan.segments():
            orphan.release()
            continue
        yield orphan


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
