"""The journal: a killed worker loses no count; its journal stays small and is adopted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import resource
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import redis.asyncio as aioredis

from meterwall import Meterwall, Settings
from meterwall import journal as journal_module
from meterwall.embedded import EmbeddedRedis
from meterwall.journal import DELTA, FileJournal, orphans
from meterwall.usage import UsageReader
from tests.helpers import serve, stop
from tests.test_flusher import ok_app
from tests.test_middleware import _discard, body_receive, http_scope

ACME = [(b"host", b"api.test"), (b"x-consumer", b"acme")]  # a request of consumer acme


def on_server(settings: Settings, server: EmbeddedRedis, **more: Any) -> Settings:
    """Counts only, by consumer header, flushed when asked, on a Redis of the test's own."""
    return settings.replace(redis_url=server.url, records="off", consumer_header="X-Consumer",
                            flush_interval=60, **more)  # fmt: skip


async def acme_requests(app: Meterwall, count: int) -> None:
    for _ in range(count):
        await app(http_scope(headers=ACME), body_receive(), _discard)


def killed(app: Meterwall) -> None:
    """What a SIGKILL leaves of a worker: its flusher stops where it is, its journal stays."""
    assert app.flusher._task is not None
    app.flusher._task.cancel()
    app.flusher.journal.forget_after_fork()


async def requests_of(consumer: str, port: int, settings: Settings) -> int:
    """The consumer's requests this month, read from the Redis on ``port``."""
    async with aioredis.Redis(port=port) as direct:
        month = datetime.now(UTC).strftime("%Y-%m")
        rows = await UsageReader(direct, settings.keyspace()).totals(consumer, month, [])
    return sum(r["requests"] for r in rows)


def _files(directory: Path, pattern: str) -> list[Path]:
    return list(directory.rglob(pattern))


ROW = (1_800_000_000, "acme", "", "/x", "GET", 200, 1_000_000, 10, 20, "")
ROW_BYTES = msgpack.packb(list(ROW))  # about what one request adds to a journal


def test_a_journal_holds_exactly_what_is_not_in_a_batch(tmp_path: Path) -> None:
    journal = FileJournal(tmp_path, "w1", rotate_s=0)
    for _ in range(3):
        journal.delta(ROW)
    journal.packed("w1", 1, {0: b"batch-1"}, took_deltas=True)  # the 3 deltas are inside it
    journal.applied("w1", 0, 1)
    journal.delta(ROW)
    journal.packed("w1", 2, {3: b"records-only"}, took_deltas=False)  # deltas stay outside
    journal.delta((*ROW[:3], "/y", *ROW[4:]))
    assert [o.writer for o in orphans(tmp_path, "someone-else")] == []  # w1 is alive
    journal.close(clean=False)  # a crash, as far as the files can tell
    [orphan] = list(orphans(tmp_path, "someone-else"))
    batches, deltas, _, top = orphan.read()
    assert batches == [(1, 0, b"batch-1"), (2, 3, b"records-only")]
    assert top == 2
    assert sorted((key[3], values[0]) for key, values in deltas.items()) == [("/x", 1), ("/y", 1)]
    orphan.release()
    assert list(tmp_path.iterdir()) == []


def test_compaction_keeps_only_what_is_needed_and_a_torn_tail_is_ignored(tmp_path: Path) -> None:
    from meterwall.metering import Meter

    journal = FileJournal(tmp_path, "w2", rotate_s=0)
    meter = Meter()
    for _ in range(100):
        meter.add(*ROW)
        journal.delta(ROW)
    journal.packed("w2", 7, {1: b"unacknowledged"}, took_deltas=False)
    journal.compact(meter.peek())  # a new segment: a snapshot of 100 deltas and the batch
    assert len(list(tmp_path.glob("w2.*.seg"))) == 1
    assert (tmp_path / "w2.00000002.seg").stat().st_size < 200
    journal.delta(ROW)
    journal.close(clean=False)
    with (tmp_path / "w2.00000002.seg").open("ab") as segment:
        segment.write(b"\x00\x00\x10\x00D\x93")  # a kill in the middle of a write
    [orphan] = list(orphans(tmp_path, "live"))
    batches, deltas, _, _ = orphan.read()
    assert batches == [(7, 1, b"unacknowledged")]
    assert [values[0] for values in deltas.values()] == [101]
    orphan.abandon()


def test_a_delta_is_written_as_the_msgpack_row_any_reader_decodes(tmp_path: Path) -> None:
    rows = [
        ROW,
        (0, "", "", "<unmatched>", "OTHER", 499, -1, 0, 0, ""),
        (2**40, "é" * 128, "k_1", "/t/{tenant}/items/{item_id:int}", "POST", 429, 10**12,
         2**62, 1, "rate-limited"),
        (1, "acme", "", "/x", "GET", "200", 1, 1, 1, ""),  # not an integer: the general path
        (1, "acme", "", "/x", "GET", 200, 1, 2**63, 1, ""),  # beyond int64: the general path
    ]  # fmt: skip
    journal = FileJournal(tmp_path, "w4", rotate_s=0)
    for row in rows:
        journal.delta(row)
    journal.close(clean=False)
    data = (tmp_path / "w4.00000001.seg").read_bytes()
    entries, pos = [], 0
    while pos < len(data):  # the entry head and body, as every version's reader parses them
        length, kind = journal_module._HEAD.unpack_from(data, pos)
        pos += journal_module._HEAD.size
        entries.append((kind, msgpack.unpackb(data[pos : pos + length], raw=False)))
        pos += length
    assert entries == [(DELTA, list(row)) for row in rows]


def test_compaction_leaves_acknowledged_batches_in_their_segment(tmp_path: Path) -> None:
    journal = FileJournal(tmp_path, "w5", rotate_s=0)
    journal.delta(ROW)
    journal.packed("w5", 1, {0: b"acknowledged"}, took_deltas=True)
    journal.applied("w5", 0, 1)
    journal.packed("w5", 2, {0: b"in flight"}, took_deltas=False)
    journal.delta(ROW)
    journal.compact({})  # segment 2: the snapshot and the batch in flight, nothing more
    assert sorted(p.name for p in tmp_path.glob("w5.*.seg")) == [
        "w5.00000001.seg", "w5.00000002.seg"  # 1 stays: it holds the acknowledged batch
    ]  # fmt: skip
    assert b"acknowledged" not in (tmp_path / "w5.00000002.seg").read_bytes()
    held = [payload for payload, _, _ in journal._batches.values()]
    assert held == [b"", b"in flight"]  # an acknowledged batch is not kept in memory...
    assert journal.recent() == [(1, 0, b"acknowledged")]  # ...but read back from its segment
    journal.delta(ROW)
    journal.close(clean=False)
    [orphan] = list(orphans(tmp_path, "live"))
    batches, deltas, _, top = orphan.read()
    assert batches == [(1, 0, b"acknowledged"), (2, 0, b"in flight")]
    assert top == 2
    assert [values[0] for values in deltas.values()] == [1]  # the snapshot supersedes segment 1
    orphan.abandon()


def test_a_segment_goes_once_its_acknowledged_batches_leave_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = FileJournal(tmp_path, "w6", rotate_s=0)
    journal.packed("w6", 1, {0: b"acknowledged"}, took_deltas=True)
    journal.applied("w6", 0, 1)
    journal.compact({})
    assert len(list(tmp_path.glob("w6.*.seg"))) == 2
    monkeypatch.setattr(journal_module, "KEEP_S", 0.0)  # the acknowledgement is now too old
    journal.compact({})
    assert [p.name for p in tmp_path.glob("w6.*.seg")] == ["w6.00000003.seg"]
    assert journal.recent() == []
    journal.close(clean=True)


async def test_a_killed_worker_loses_no_count(redis, settings: Settings, tmp_path: Path) -> None:
    own = settings.replace(counter_flush_interval=300, consumer_header="X-Consumer")
    assert own.pseudonym_secret is not None
    env = {"MW_REDIS_URL": own.redis_url, "MW_KEY_PREFIX": own.key_prefix,
           "MW_RECORD_PUBLIC_KEY": own.record_public_key or "",
           "MW_PSEUDONYM_SECRET": base64.b64encode(own.pseudonym_secret.reveal()).decode(),
           "MW_CONSUMER_HEADER": "X-Consumer", "MW_COUNTER_FLUSH_INTERVAL": "300",
           "MW_JOURNAL_DIR": own.journal_dir}  # fmt: skip
    servers, [port] = await serve(env, 1)
    consumers = [f"c{n:03d}" for n in range(40)]
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for n in range(200):
                url = f"http://127.0.0.1:{port}/echo/{n}"
                reply = await client.post(url, content=b"x" * n,
                                          headers={"X-Consumer": consumers[n % 40]})  # fmt: skip
                assert reply.status_code == 200
            # A worker journals a request just after writing its answer: the client may read
            # the last answer before that. Once a later request was answered, it was journaled
            # (one loop, nothing awaited in between); the probe itself is not counted below.
            probe = await client.post(f"http://127.0.0.1:{port}/echo/0",
                                      headers={"X-Consumer": "probe"})  # fmt: skip
            assert probe.status_code == 200
    finally:
        await stop(servers, signal.SIGKILL)  # no shutdown, no final flush
    month = datetime.now(UTC).strftime("%Y-%m")
    reader = UsageReader(redis, own.keyspace())
    before = [await reader.totals(c, month, ["route"]) for c in consumers]
    assert sum(r["requests"] for rows in before for r in rows) < 200  # the kill lost some...
    started = time.monotonic()
    survivor = Meterwall(ok_app, settings=own)  # e.g. the restarted worker
    survivor.flusher.start()  # as at lifespan start-up
    assert await survivor.flusher.flush_once() is True  # its first flush adopts the journal
    assert survivor.flusher.journals_adopted == 1
    assert time.monotonic() - started < 5
    for index, consumer in enumerate(consumers):
        [row] = await reader.totals(consumer, month, ["route"])
        assert (row["route"], row["requests"]) == ("/echo/{n:int}", 5)  # ...the journal none
        assert row["bytes_in"] == sum(n for n in range(200) if n % 40 == index)
    await survivor.aclose()
    # everything reached Redis: the journal is marked replayed, and goes once a Redis restart
    # can no longer undo the replay (KEEP_S), at the next adoption round
    [marker] = _files(Path(own.journal_dir), "*.replayed")
    assert segments(Path(own.journal_dir))
    os.utime(marker, (time.time() - 11, time.time() - 11))
    assert list(orphans(marker.parent, live="")) == []
    assert segments(Path(own.journal_dir)) == []


def segments(directory: Path) -> list[Path]:
    return list(directory.rglob("*.seg"))


def test_a_compacted_journal_remembers_the_highest_batch_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leftover deltas are sent as the next batch: a forgotten number would make Redis drop it."""
    monkeypatch.setattr("meterwall.journal.KEEP_S", 0.0)  # acknowledged batches go at once
    journal = FileJournal(tmp_path, "w3", rotate_s=0)
    journal.delta(ROW)
    journal.packed("w3", 5, {0: b"five"}, took_deltas=True)
    journal.applied("w3", 0, 5)
    journal.compact({})  # batch 5 is acknowledged and old: no segment holds it any more
    journal.delta(ROW)
    journal.close(clean=False)
    [orphan] = list(orphans(tmp_path, "live"))
    batches, deltas, _, top = orphan.read()
    assert (batches, top) == ([], 5)
    assert [values[0] for values in deltas.values()] == [1]
    orphan.abandon()


async def test_the_journal_stays_small_while_redis_is_away(settings: Settings) -> None:
    """Every request appends its delta to the journal; while Redis is away the flusher still
    rewrites the journal to a snapshot of the merged deltas, so an outage does not grow it by a
    row per request (two hours at 1,000 requests/s would be about 400 MB)."""
    with EmbeddedRedis() as server:
        port = server.port
    assert port is not None  # stopped: nothing listens there any more
    own = settings.replace(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout=0.2,
                           records="off", consumer_header="X-Consumer")  # fmt: skip
    mw = Meterwall(ok_app, settings=own)
    mw.flusher.start()
    assert isinstance(mw.flusher.journal, FileJournal)
    mw.flusher.journal._rotate_s = 0  # as if the rotation interval had passed at every flush
    for _ in range(10):
        for _ in range(300):
            headers = [(b"host", b"api.test"), (b"x-consumer", b"acme")]
            await mw(http_scope(headers=headers), body_receive(), _discard)
        mw.flusher._retry_at = 0.0  # a back-off later
        assert await mw.flusher.flush_once() is False  # Redis is away
    size = sum(p.stat().st_size for p in segments(Path(own.journal_dir)))
    assert size < 3000 * len(ROW_BYTES) // 10  # not a row per request
    with EmbeddedRedis(port=port):  # Redis is back: nothing was lost
        assert await mw.aclose()
        async with aioredis.Redis(port=port) as direct:
            month = datetime.now(UTC).strftime("%Y-%m")
            rows = await UsageReader(direct, own.keyspace()).totals("acme", month, [])
    assert sum(r["requests"] for r in rows) == 3000


def test_a_compaction_after_a_long_outage_writes_every_batch_still_in_flight(
    tmp_path: Path,
) -> None:
    """More entries than one ``writev`` takes (thousands of unsent batches): all of them land."""
    journal = FileJournal(tmp_path, "w7", rotate_s=0)
    for seq in range(1, 3001):
        journal.packed("w7", seq, {seq % 16: b"batch %d" % seq}, took_deltas=False)
    journal.compact({})
    journal.close(clean=False)
    [orphan] = list(orphans(tmp_path, "live"))
    batches, _, _, top = orphan.read()
    assert [(seq, payload) for seq, _, payload in batches] == [
        (seq, b"batch %d" % seq) for seq in range(1, 3001)
    ]
    assert top == 3000
    orphan.abandon()


def test_unique_clients_are_journaled_until_a_batch_takes_them(tmp_path: Path) -> None:
    """A sealing pass journals the members it saw first; a TAKEN marker (the counters' batch)
    covers them; a compaction's snapshot carries those still pending, and only those."""
    journal = FileJournal(tmp_path, "w8", rotate_s=0)
    journal.uniques([["acme", 20000, 1_728_000_100, b"AAAAAAAA"]])
    journal.packed("w8", 1, {0: b"counters"}, took_deltas=True)  # AAAAAAAA is inside it
    journal.uniques([["acme", 20000, 1_728_000_200, b"BBBBBBBBCCCCCCCC"]])
    journal.uniques([["acme", 20000, 1_728_000_150, b"DDDDDDDD"], ["hooli", 20000, 7, b"EEEEEEEE"]])
    journal.compact({}, lambda: [["acme", 20000, 1_728_000_300, b"BBBBBBBBCCCCCCCCDDDDDDDD"]])
    journal.uniques([["acme", 20001, 1_728_086_500, b"FFFFFFFF"]])
    journal.close(clean=False)
    [orphan] = list(orphans(tmp_path, "live"))
    replay = orphan.read()
    assert sorted(replay.uniques) == [
        ("acme", 20000, 1_728_000_300, b"BBBBBBBBCCCCCCCCDDDDDDDD"),  # hooli went with compaction
        ("acme", 20001, 1_728_086_500, b"FFFFFFFF"),
    ]
    orphan.abandon()


async def test_a_killed_workers_unique_clients_are_counted_by_its_adopter(
    redis, settings: Settings
) -> None:
    """Unique clients travel with the counters (every 5 s by default): a worker killed before
    that loses none of the clients whose records it had sealed."""
    own = settings.replace(consumer_header="X-Consumer", counter_flush_interval=300)
    dead = Meterwall(ok_app, settings=own)
    dead.flusher.start()
    headers = [(b"x-consumer", b"acme")]
    await dead(http_scope(headers=headers, client=("192.0.2.99", 1000)), body_receive(), _discard)
    assert await dead.flusher.flush_once() is True  # the first flush sends the counters too
    for n in range(12):
        scope = http_scope(headers=headers, client=(f"192.0.2.{n % 3}", 1000))
        await dead(scope, body_receive(), _discard)
    assert await dead.flusher.flush_once() is True  # records sent; counters and uniques not
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    reader = UsageReader(redis, own.keyspace())
    assert await reader.unique_clients("acme", day) == 1
    dead.flusher._task.cancel()  # killed: no shutdown, no last flush
    dead.flusher.journal.close(clean=False)
    survivor = Meterwall(ok_app, settings=own)
    survivor.flusher.start()
    assert await survivor.flusher.flush_once() is True  # adopts the dead worker's journal
    assert survivor.flusher.journals_adopted == 1
    assert await reader.unique_clients("acme", day) == 4
    rows = await reader.totals("acme", day[:7], [])
    assert sum(r["requests"] for r in rows) == 13
    await survivor.aclose()
    await dead.flusher._redis.aclose()


def test_a_compaction_cut_short_by_a_kill_loses_no_unique_client(tmp_path: Path) -> None:
    """The snapshot of the deltas and the unique clients is one entry: torn, it is ignored,
    and the old segment (a kill before its deletion) still holds both."""
    journal = FileJournal(tmp_path, "w9", rotate_s=0)
    journal.delta(ROW)
    journal.uniques([["acme", 20000, 100, b"AAAAAAAABBBBBBBB"]])
    old = (tmp_path / "w9.00000001.seg").read_bytes()
    journal.compact({}, lambda: [["acme", 20000, 100, b"AAAAAAAABBBBBBBB"]])
    journal.close(clean=False)
    new = tmp_path / "w9.00000002.seg"
    new.write_bytes(new.read_bytes()[:-5])  # the kill came in the middle of the snapshot...
    (tmp_path / "w9.00000001.seg").write_bytes(old)  # ...before the old segment went
    [orphan] = list(orphans(tmp_path, "live"))
    replay = orphan.read()
    assert replay.uniques == [("acme", 20000, 100, b"AAAAAAAABBBBBBBB")]
    assert [values[0] for values in replay.deltas.values()] == [1]
    orphan.abandon()


async def test_a_journal_that_cannot_be_written_degrades_health_and_requests_go_on(
    redis, settings: Settings, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    own = settings.replace(journal_dir=str(blocker / "journal"))
    mw = Meterwall(ok_app, settings=own)
    await mw(http_scope(), body_receive(), _discard)  # starts the flusher, which opens it
    health = mw.health()
    assert health["state"] == "degraded"
    assert "Not a directory" in health["journal_error"]
    assert await mw.aclose()  # the request's count still reached Redis
    month = datetime.now(UTC).strftime("%Y-%m")
    rows = await UsageReader(redis, own.keyspace()).totals("", month, [])
    assert sum(r["requests"] for r in rows) == 1


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A disk that fills up, for real: the kernel writes up to ``limit`` bytes of a file and
    answers a short write, then EFBIG (SIGXFSZ ignored meanwhile, else it ends the process)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("entry", ["delta", "applied", "uniques"])
def test_a_short_write_raises(tmp_path: Path, entry: str) -> None:
    journal = FileJournal(tmp_path, "w10", rotate_s=0)
    journal.delta(ROW)
    journal.packed("w10", 1, {0: b"batch"}, took_deltas=True)
    size = (tmp_path / "w10.00000001.seg").stat().st_size
    write = {"delta": lambda: journal.delta(ROW), "applied": lambda: journal.applied("w10", 0, 1),
             "uniques": lambda: journal.uniques([["acme", 1, 2, b"AAAAAAAA"]])}[entry]  # fmt: skip
    with file_size_limit(size + 3), pytest.raises(OSError, match="short write"):
        write()  # 3 bytes of it landed
    assert (tmp_path / "w10.00000001.seg").stat().st_size == size + 3
    journal.close(clean=False)


async def test_a_full_disk_when_a_batch_is_acknowledged_turns_the_journal_off(
    redis, settings: Settings
) -> None:
    """Not taken for Redis being away: the batch landed, the flusher goes on without a journal
    (reported by health) and nothing more is appended after the torn entry."""
    own = settings.replace(records="off", consumer_header="X-Consumer")
    mw = Meterwall(ok_app, settings=own)
    fl = mw.flusher
    await mw(http_scope(headers=[(b"x-consumer", b"acme")]), body_receive(), _discard)
    assert isinstance(fl.journal, FileJournal)
    await fl._pack(counters_due=True)
    [segment] = segments(Path(own.journal_dir))
    with file_size_limit(segment.stat().st_size + 2):
        await fl._send(fl._client())  # Redis applies the batch; its APPLIED entry is torn
    assert fl._pending == {}
    health = mw.health()
    assert "short write" in (health["journal_error"] or "")
    assert health["last_error"] is None  # Redis answered
    size = segment.stat().st_size
    await mw(http_scope(headers=[(b"x-consumer", b"acme")]), body_receive(), _discard)
    assert segment.stat().st_size == size
    assert await mw.aclose()
    month = datetime.now(UTC).strftime("%Y-%m")
    rows = await UsageReader(redis, own.keyspace()).totals("acme", month, [])
    assert sum(r["requests"] for r in rows) == 2


async def test_an_adopted_journal_is_billed_in_the_consumers_zone(redis, settings) -> None:
    """A restarted worker adopts on its first flush, before it read the consumer registry for
    its own counters: the dead writer's requests must still land in the consumer's local month."""
    from meterwall import FixedClock
    from meterwall.consumers import ConsumerRegistry
    from tests.test_usage import send_at

    own = settings.replace(records="off", consumer_header="X-Consumer", flush_interval=60)
    await ConsumerRegistry(redis, own.keyspace()).set("acme", tz="America/New_York")
    clock = FixedClock(0)
    dead = Meterwall(ok_app, settings=own, clock=clock)
    # 2026-11-01T02:00Z is October 31st, 22:00 in New York: October on acme's invoice
    await send_at(dead, clock, "2026-11-01T02:00:00", "acme")
    killed(dead)  # killed before its flush

    restarted = Meterwall(ok_app, settings=own)
    assert await restarted.flusher.flush_once()
    assert restarted.flusher.journals_adopted == 1
    assert await restarted.aclose()
    reader = UsageReader(redis, own.keyspace())
    october = sum(r["requests"] for r in await reader.totals("acme", "2026-10"))
    november = sum(r["requests"] for r in await reader.totals("acme", "2026-11"))
    assert (october, november) == (1, 0)


async def test_a_flusher_started_again_after_aclose_and_killed_loses_no_count(
    redis, settings
) -> None:
    """An app without lifespan calls meterwall.aclose() and goes on serving: the flusher starts
    again with the same writer and batch numbers, so its new journal must know the highest one
    used, or the adopter replays the leftovers as a batch Redis takes for a duplicate."""
    own = settings.replace(records="off", consumer_header="X-Consumer", flush_interval=60)
    headers = [(b"host", b"api.test"), (b"x-consumer", b"acme")]
    mw = Meterwall(ok_app, settings=own)
    for _ in range(3):
        await mw(http_scope(headers=headers), body_receive(), _discard)
        assert await mw.flusher.flush()  # batches 1 to 3 of this writer
    assert await mw.aclose()
    for _ in range(4):
        await mw(http_scope(headers=headers), body_receive(), _discard)
    killed(mw)  # then the worker is killed

    survivor = Meterwall(ok_app, settings=own)
    assert await survivor.flusher.flush_once()
    assert survivor.flusher.journals_adopted == 1
    assert await survivor.aclose()
    month = datetime.now(UTC).strftime("%Y-%m")
    rows = await UsageReader(redis, own.keyspace()).totals("acme", month, [])
    assert sum(r["requests"] for r in rows) == 7


async def test_a_journal_older_than_its_batch_marks_is_left_for_an_operator(
    redis, settings
) -> None:
    """A replay is exact only while Redis holds the dead writer's high-water marks (30 days):
    an older journal would count its acknowledged batches twice, so it is not replayed."""
    import os

    from meterwall.journal import MARK_LIFETIME_S

    own = settings.replace(records="off", consumer_header="X-Consumer", counter_flush_interval=0,
                           flush_interval=60)  # fmt: skip
    headers = [(b"host", b"api.test"), (b"x-consumer", b"acme")]
    dead = Meterwall(ok_app, settings=own)
    for _ in range(5):
        await dead(http_scope(headers=headers), body_receive(), _discard)
    assert await dead.flusher.flush_once()  # applied and acknowledged
    [mark] = await redis.keys(f"{settings.key_prefix}:*:hwm:{dead.flusher.writer}")
    assert MARK_LIFETIME_S - 60 < await redis.ttl(mark) <= MARK_LIFETIME_S
    killed(dead)  # killed: its connection closes with it
    assert dead.flusher._redis is not None
    await dead.flusher._redis.aclose()
    journal_dir = Path(own.journal_dir)
    old = time.time() - MARK_LIFETIME_S + 3600  # its host was off for 30 days less an hour
    for path in _files(journal_dir, f"{dead.flusher.writer}.*"):
        os.utime(path, (old, old))
    await redis.delete(mark)  # (expired)

    survivor = Meterwall(ok_app, settings=own)
    await survivor(http_scope(headers=headers), body_receive(), _discard)
    assert await survivor.flusher.flush_once()
    assert survivor.flusher.journals_adopted == 0
    assert survivor.health()["stale_journals"] == [dead.flusher.writer]
    assert survivor.health()["state"] == "degraded"
    assert await survivor.aclose()
    month = datetime.now(UTC).strftime("%Y-%m")
    rows = await UsageReader(redis, own.keyspace()).totals("acme", month, [])
    assert sum(r["requests"] for r in rows) == 6
    assert _files(journal_dir, f"{dead.flusher.writer}.*.seg")  # left in place


# (changing a directory's owner needs root, which the suite has on its usual machines)
@pytest.mark.parametrize("taken", ["mode", "owner"] if os.getuid() == 0 else ["mode"])
async def test_a_journal_directory_others_can_write_to_turns_the_journal_off(
    settings, tmp_path: Path, taken: str
) -> None:
    """The default lies in the shared temporary directory: another user could create it first
    and plant journals that the next adoption replays into the ledger."""
    base = tmp_path / "shared"
    base.mkdir()
    if taken == "mode":
        base.chmod(0o777)
    else:
        os.chown(base, 65534, 65534)  # the tests run as root: another user's directory
    mw = Meterwall(ok_app, settings=settings.replace(journal_dir=str(base), records="off"))
    await mw(http_scope(), body_receive(), _discard)
    health = mw.health()
    assert "writable by nobody else" in (health["journal_error"] or "")
    assert health["state"] == "degraded"
    assert await mw.aclose()  # the counts still land
    assert not _files(base, "*.seg")


async def test_a_replayed_journal_is_replayed_again_when_redis_loses_the_replay(
    settings,
) -> None:
    """Redis may lose its last second (AOF everysec) right after a replay: the replayed journal
    is kept for that window, like a live writer's acknowledged batches, and replayed again."""
    server = EmbeddedRedis().start()
    port = server.port
    try:
        own = on_server(settings, server, counter_flush_interval=0)
        dead = Meterwall(ok_app, settings=own)
        await acme_requests(dead, 5)  # journaled, never flushed
        killed(dead)

        survivor = Meterwall(ok_app, settings=own)
        await survivor(http_scope(headers=ACME), body_receive(), _discard)
        assert await survivor.flusher.flush_once()
        assert survivor.flusher.journals_adopted == 1
        await asyncio.to_thread(server.kill)  # loses the replay and the survivor's batch
        server = await asyncio.to_thread(EmbeddedRedis(port=port).start)
        await survivor(http_scope(headers=ACME), body_receive(), _discard)
        for _ in range(5):
            survivor.flusher._retry_at = 0.0
            if await survivor.flusher.flush_once():
                break
        assert survivor.flusher.journals_adopted == 1  # counted once, replayed twice
        assert await survivor.aclose()
        counted = await requests_of("acme", port, own)
    finally:
        server.stop()
    assert counted == 7


def test_a_journal_lock_is_taken_before_it_has_its_name(tmp_path: Path) -> None:
    """An adopter takes any *.lock it can lock for a dead writer's: a live writer's must be
    locked from the moment it can be found."""
    import fcntl

    journal = FileJournal(tmp_path / "journal", "w1")
    assert sorted(p.name for p in (tmp_path / "journal").iterdir()) == [
        "w1.00000001.seg", "w1.lock",
    ]  # fmt: skip
    other = os.open(tmp_path / "journal" / "w1.lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
    assert list(orphans(tmp_path / "journal", live="")) == []
    journal.close(clean=True)


async def test_a_worker_serving_on_after_a_shutdown_left_its_journal_is_a_new_writer(
    settings,
) -> None:
    """meterwall.aclose() could not reach Redis, so its journal is left for adoption; the app
    goes on serving. Another worker replays that journal; this one must forget what it holds
    and journal as a new writer (the same name would get the old journal's replay marker, and
    its leftovers the number of the adopter's last batch)."""
    server = EmbeddedRedis().start()
    port = server.port
    try:
        own = on_server(settings, server, redis_timeout=0.2)
        mw = Meterwall(ok_app, settings=own)
        await acme_requests(mw, 2)
        first_writer = mw.flusher.writer
        server.stop()
        assert not await mw.aclose(timeout=0.5)  # left for another worker
        assert mw.flusher.writer != first_writer  # from now on, a new writer
        assert await mw.aclose(timeout=0.5)  # a second shutdown hook: nothing of its own left
        server = EmbeddedRedis(port=port).start()
        survivor = Meterwall(ok_app, settings=own)
        assert await survivor.flusher.flush_once()
        assert survivor.flusher.journals_adopted == 1
        await acme_requests(mw, 3)  # the app goes on serving
        assert mw.flusher.writer != first_writer
        killed(mw)  # then it is killed
        for marker in _files(Path(own.journal_dir), "*.replayed"):  # the window has passed
            os.utime(marker, (time.time() - 20, time.time() - 20))
        survivor.flusher._next_adoption = 0.0
        assert await survivor.flusher.flush_once()
        assert survivor.flusher.journals_adopted == 2
        assert await survivor.aclose()
        counted = await requests_of("acme", port, own)
    finally:
        server.stop()
    assert counted == 5


async def test_a_request_during_a_shutdown_that_leaves_its_journal_is_journaled_again(
    settings,
) -> None:
    """A late request restarts the flusher while aclose() is still trying to reach Redis: once
    aclose() hands its journal over, the worker serving on must journal as the new writer (it
    ran with no journal, unreported, and a kill then lost counts)."""
    server = EmbeddedRedis().start()
    port = server.port
    try:
        own = on_server(settings, server, redis_timeout=0.2)
        mw = Meterwall(ok_app, settings=own)
        await acme_requests(mw, 1)
        server.stop()
        closing = asyncio.create_task(mw.aclose(timeout=0.5))
        await asyncio.sleep(0)  # aclose() is under way
        await mw(http_scope(headers=ACME), body_receive(), _discard)  # a late request
        assert not await closing
        await acme_requests(mw, 3)
        assert isinstance(mw.flusher.journal, FileJournal)
        assert mw.flusher.journal.writer == mw.flusher.writer
        server = EmbeddedRedis(port=port).start()
        killed(mw)
        survivor = Meterwall(ok_app, settings=own)
        assert await survivor.flusher.flush_once()
        assert await survivor.aclose()
        counted = await requests_of("acme", port, own)
    finally:
        server.stop()
    assert counted == 5
