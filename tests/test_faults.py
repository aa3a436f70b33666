"""Faults: counts stay exact through dropped requests and replies, Redis crashes (AOF everysec,
SIGKILL) and worker kills, with single-worker uvicorn processes and the journal.

The sizes come from environment variables, so that the long runs of docs/reliability.md are these
very tests: ``MW_FAULT_REQUESTS`` (requests of the exactness test, 50,000 by default) and
``MW_WORKER_KILLS`` (worker kills, 6 by default).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from meterwall import Meterwall, Settings
from meterwall import journal as journal_module
from meterwall.embedded import EmbeddedRedis
from meterwall.journal import APPLIED, BATCH, _entries, orphans
from meterwall.usage import UsageReader
from tests.faults import FaultProxy, Faults
from tests.helpers import HttpConnection, serve, stop
from tests.test_flusher import ok_app
from tests.test_middleware import _discard, body_receive, http_scope

REQUESTS = int(os.environ.get("MW_FAULT_REQUESTS", "50000"))
KILLS = int(os.environ.get("MW_WORKER_KILLS", "6"))
AOF = ["--appendonly", "yes", "--appendfsync", "everysec"]
ROUTES = ["/a", "/b", "/c", "/d"]
CONSUMERS = [f"c{n:03d}" for n in range(250)]  # x 4 routes: 1,000 counter fields
PER_WORKER = 4  # keep-alive connections to each worker (enough to keep two workers busy)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The MW_* variables of a served worker with ``settings`` (counts only, no records)."""
    assert settings.pseudonym_secret is not None
    return {"MW_REDIS_URL": settings.redis_url, "MW_KEY_PREFIX": settings.key_prefix,
            "MW_RECORDS": "off", "MW_CONSUMER_HEADER": "X-Consumer",
            "MW_PSEUDONYM_SECRET": base64.b64encode(settings.pseudonym_secret.reveal()).decode(),
            "MW_JOURNAL_DIR": settings.journal_dir, **extra}  # fmt: skip


@pytest.mark.slow
async def test_counts_stay_exact_through_proxy_faults_and_redis_crashes(
    settings: Settings, tmp_path: Path
) -> None:
    """``REQUESTS`` requests over 1,000 counter fields to two single-worker uvicorn processes
    whose Redis is behind a proxy that drops 5 % of the flushes before Redis and the reply of 5 %
    after it; Redis is SIGKILLed and restarted (AOF everysec) twice while the traffic goes on.
    Every field equals what the clients were answered.

    A SIGKILL of Redis loses no write Redis made to its AOF (the OS holds it; only a machine crash
    loses what ``everysec`` has not synced yet), so this test does not show the re-sending of
    acknowledged batches after a restart; it shows retries of batches whose fate was unknown
    (dropped, swallowed, or cut off by the crash) and, at the end, the adoption of the journals
    that the graceful shutdowns left."""
    data = tmp_path / "redis"
    data.mkdir()
    server = EmbeddedRedis(data_dir=str(data), extra_args=AOF).start()
    port = server.port
    assert port is not None
    faults = Faults(drop_request=0.05, drop_reply=0.05, seed=7)
    try:
        async with FaultProxy(port, faults) as proxy:
            own = settings.replace(redis_url=f"redis://127.0.0.1:{proxy.port}/0", records="off",
                                   consumer_header="X-Consumer", redis_timeout=0.5)  # fmt: skip
            env = worker_env(own, MW_REDIS_TIMEOUT="500ms", MW_COUNTER_FLUSH_INTERVAL="200ms")
            servers, ports = await serve(env, 2)
            traffic = Traffic(ports, REQUESTS)

            async def crash_redis_twice() -> None:
                """A crash a third and two thirds of the way, with flushes in flight."""
                nonlocal server
                for third in (1, 2):
                    await traffic.reach(REQUESTS * third // 3)
                    await asyncio.to_thread(server.kill)
                    server = EmbeddedRedis(port=port, data_dir=str(data), extra_args=AOF)
                    await asyncio.to_thread(server.start)

            try:
                async with asyncio.timeout(60 + REQUESTS / 250), asyncio.TaskGroup() as group:
                    group.create_task(traffic.run(PER_WORKER))
                    group.create_task(crash_redis_twice())
            finally:
                await stop(servers)  # graceful: each flushes, or leaves its journal
            faults.drop_request = faults.drop_reply = 0.0  # the network heals
            left = len(locks(Path(own.journal_dir)))
            survivor = Meterwall(ok_app, settings=own)  # a restarted worker adopts what is left
            survivor.flusher.start()
            assert await survivor.flusher.flush_once()
            assert survivor.flusher.journals_adopted == left
            await survivor.aclose()
    finally:
        async with aioredis.Redis(port=port) as direct:
            counted = await ledger(direct, settings)
        server.stop()
    assert traffic.refused == Counter()
    assert traffic.count == REQUESTS  # every request was answered 200...
    assert len(traffic.answered) == min(REQUESTS, 1000)  # ...over 250 consumers x 4 routes
    assert faults.counts.get("drop_request", 0) > 0
    assert faults.counts.get("drop_reply", 0) > 0
    assert counted == traffic.answered


@pytest.mark.slow
async def test_killed_workers_lose_no_count_and_count_none_twice(
    settings: Settings, tmp_path: Path
) -> None:
    """``KILLS`` SIGKILLs, each of a random one of two single-worker uvicorn processes sharing a
    journal directory, after a random stretch of traffic. Each is restarted at once, and its
    journal must be replayed (by the restart or the survivor) within 5 s of the kill. The counts
    must equal what the clients were answered.

    A kill lands between requests to its victim, never during one: the victim's connections are
    paused and their requests answered, then a probe request that announces a body
    (``Expect: 100-continue``) is started, and the victim is killed once it asks for the body.
    A worker journals a request right after writing its answer, with no await in between, so an
    answer the client has read may not be journaled yet when the worker dies; once the worker's
    loop has taken up the probe, it is. The probe itself never finishes, so neither the worker nor
    the client counts it. Killing during a request would make the count of that request unknowable
    (its answer can reach the client, or not, either side of the journal write), and the test
    could then only bound the counts instead of checking them.

    The flusher runs on its own, so the moment of a kill within a flush is what the test aims at:
    one kill in three lands at a random moment of traffic; one waits until the victim's journal
    holds a batch sent but not acknowledged while the proxy holds every command for 0.5 s (Redis
    has not run it yet: it may run it after the kill, before or after the replay); one while the
    proxy swallows every reply (Redis ran the batch, the worker never learnt it). The dead
    worker's own journal tells afterwards whether a batch was in flight at the kill.
    """
    rng = random.Random(2026)
    faults = Faults(delay_s=0.5, seed=2026)
    journals = Path(settings.journal_dir)
    between = inspected = 0  # kills with a batch in flight; kills whose journal was read
    replays: list[float] = []  # seconds from a kill to the replay of the dead worker's journal
    async with EmbeddedRedis() as server:
        assert server.port is not None
        async with FaultProxy(server.port, faults) as proxy:
            own = settings.replace(redis_url=f"redis://127.0.0.1:{proxy.port}/0", records="off",
                                   consumer_header="X-Consumer")  # fmt: skip
            env = worker_env(own, MW_COUNTER_FLUSH_INTERVAL="250ms")
            workers, ports = await serve(env, 2)
            traffic = Traffic(ports, total=None)
            running = asyncio.create_task(traffic.run(PER_WORKER))
            try:
                async with asyncio.timeout(30 + 15 * KILLS):
                    writers = [await traffic.writer(worker) for worker in range(len(workers))]
                    directory = journal_of(journals, writers[0])  # the deployment's
                    for kill in range(KILLS):
                        await traffic.reach(traffic.count + rng.randint(300, 1500))
                        victim, aim = rng.randrange(len(workers)), kill % 3
                        if aim:
                            faults.delay, faults.drop_reply = (1.0, 0.0) if aim == 1 else (0.0, 1.0)
                            batch_sent = partial(in_flight, directory, writers[victim])
                            await until(batch_sent, time.monotonic() + 10, "a batch in flight")
                        await traffic.pause(victim)
                        probe = await HttpConnection.open(traffic.ports[victim])
                        await probe.hold("/echo/1", {"X-Consumer": CONSUMERS[0]})
                        workers[victim].kill()
                        await workers[victim].wait()
                        killed = time.monotonic()
                        await probe.close()
                        faults.delay = faults.drop_reply = 0.0
                        unacknowledged = dead_in_flight(directory, writers[victim])
                        inspected += unacknowledged is not None
                        between += bool(unacknowledged)
                        [workers[victim]], [port] = await serve(env, 1)
                        traffic.resume(victim, port)
                        replayed = partial(was_replayed, directory, writers[victim])
                        await until(replayed, killed + 30, "the replay of a journal")
                        replays.append(time.monotonic() - killed)
                        writers[victim] = await traffic.writer(victim)
                traffic.stop()
                await running
            finally:
                running.cancel()  # when something failed: the traffic must not outlive the test
                await asyncio.gather(running, return_exceptions=True)
                await stop(workers)  # graceful: each flushes and deletes its journal
            async with aioredis.Redis(port=server.port) as direct:
                counted = await ledger(direct, own)
    aimed = sum(1 for kill in range(KILLS) if kill % 3)
    print(
        f"\n{KILLS} kills ({aimed} aimed at a flush), {between} with a batch in flight"
        f" ({inspected} dead journals read); {traffic.count} requests; journals replayed"
        f" {min(replays, default=0):.2f} to {max(replays, default=0):.2f} s after a kill"
    )
    assert traffic.refused == Counter()
    assert len(replays) == KILLS
    assert max(replays, default=0) <= 5.0, replays
    # every journal reached Redis: none is left to adopt (a replayed one stays marked for a
    # few seconds, in case Redis restarts and loses the replay)
    assert [lock for lock in locks(journals)
            if not was_replayed(lock.parent, lock.name.removesuffix(".lock"))] == []  # fmt: skip
    assert between >= min(aimed, 1)  # the test did kill between a flush and its reply
    assert counted == traffic.answered


class Traffic:
    """Closed-loop keep-alive traffic to single-worker servers, counting what was answered.

    Request n is ``GET`` of route ``(n // 250) % 4`` for consumer ``n % 250``, so every 1,000
    requests touch each of the 1,000 counter fields once. A request counts (in ``answered``, by
    field) only once its answer, a 200, is read; any other status goes to ``refused``. The
    connections to a worker can be paused (no request of theirs is in flight once ``pause``
    returns) and resumed on a new port, where a restarted worker listens.
    """

    def __init__(self, ports: Sequence[int], total: int | None) -> None:
        self.ports = list(ports)
        self.total = total  # requests to send; None: until ``stop``
        self.started = 0
        self.count = 0  # requests answered 200
        self.answered: Counter[tuple[str, str]] = Counter()
        self.refused: Counter[int] = Counter()
        self._open = [_is_set(asyncio.Event()) for _ in self.ports]
        self._idle = [_is_set(asyncio.Event()) for _ in self.ports]
        self._busy = [0] * len(self.ports)
        self._generation = [0] * len(self.ports)
        self._milestones: list[tuple[int, asyncio.Future[None]]] = []
        self._ended = False

    async def run(self, per_worker: int) -> None:
        """Send until ``total`` requests went out (or ``stop``); raises what a connection hit."""
        try:
            async with asyncio.TaskGroup() as group:
                for worker in range(len(self.ports)):
                    for _ in range(per_worker):
                        group.create_task(self._connection(worker))
        finally:
            self._ended = True
            for _, future in self._milestones:  # whoever waits would wait forever
                if not future.done():
                    future.set_exception(RuntimeError("the traffic ended first"))

    def stop(self) -> None:
        self.total = self.started

    async def reach(self, count: int) -> None:
        """Return once ``count`` requests have been answered 200."""
        if self.count >= count:
            return
        if self._ended:
            raise RuntimeError("the traffic ended first")
        future = asyncio.get_running_loop().create_future()
        self._milestones.append((count, future))
        await future

    async def pause(self, worker: int) -> None:
        """No new request goes to ``worker``; return when none of its requests is in flight."""
        self._open[worker].clear()
        await self._idle[worker].wait()

    def resume(self, worker: int, port: int) -> None:
        """Requests go to ``worker`` again, on new connections to ``port``."""
        self.ports[worker] = port
        self._generation[worker] += 1
        self._open[worker].set()

    async def writer(self, worker: int) -> str:
        """The journal writer id of ``worker``'s process (one more request, counted as such)."""
        connection = await HttpConnection.open(self.ports[worker])
        try:
            status, body = await connection.get("/writer", {"X-Consumer": CONSUMERS[0]})
        finally:
            await connection.close()
        assert status == 200
        self.answered[(CONSUMERS[0], "/writer")] += 1
        writer: str = orjson.loads(body)["writer"]
        return writer

    async def _connection(self, worker: int) -> None:
        connection: HttpConnection | None = None
        generation = -1
        try:
            while self.total is None or self.started < self.total:
                if not self._open[worker].is_set():
                    await self._open[worker].wait()
                    continue
                n = self.started
                self.started += 1
                consumer = CONSUMERS[n % len(CONSUMERS)]
                route = ROUTES[n // len(CONSUMERS) % len(ROUTES)]
                self._busy[worker] += 1  # from here on, ``pause`` waits for this request
                self._idle[worker].clear()
                try:
                    if generation != self._generation[worker]:  # the worker was restarted
                        if connection is not None:
                            await connection.close()
                        connection = await HttpConnection.open(self.ports[worker])
                        generation = self._generation[worker]
                    assert connection is not None
                    status, _ = await connection.get(route, {"X-Consumer": consumer})
                finally:
                    self._busy[worker] -= 1
                    if not self._busy[worker]:
                        self._idle[worker].set()
                if status != 200:
                    self.refused[status] += 1
                    continue
                self.answered[(consumer, route)] += 1
                self.count += 1
                if self._milestones and self._milestones[0][0] <= self.count:
                    self._wake()
        finally:
            if connection is not None:
                await connection.close()

    def _wake(self) -> None:
        waiting = []
        for count, future in self._milestones:
            if count > self.count:
                waiting.append((count, future))
            elif not future.done():
                future.set_result(None)
        self._milestones = sorted(waiting, key=lambda item: item[0])


def _is_set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


def in_flight(directory: Path, writer: str) -> int:
    """Batches in ``writer``'s newest journal segment that Redis has not acknowledged (to the
    writer's knowledge). A new segment starts with a copy of every batch not acknowledged yet,
    and a batch's acknowledgement is written after it, so the newest segment is enough."""
    segments = sorted(directory.glob(f"{writer}.*.seg"))
    if not segments:
        return 0
    try:
        data = segments[-1].read_bytes()
    except FileNotFoundError:  # rotated or replayed meanwhile
        return 0
    packed, applied = set(), set()
    for kind, body in _entries(data):  # a torn last entry (a write in progress) ends it
        if kind == BATCH:
            packed.add((body[0], body[1]))
        elif kind == APPLIED:
            applied.add((body[0], body[1]))
    return len(packed - applied)


def dead_in_flight(directory: Path, writer: str) -> int | None:
    """``in_flight`` for a dead writer, read under its journal's lock before anyone replays it;
    None if another worker is replaying it already."""
    found = None
    for orphan in orphans(directory, live=""):
        try:
            if orphan.writer == writer:
                found = in_flight(directory, writer)
        finally:
            orphan.abandon()  # unlocked: the workers adopt it
    return found


async def until(done: Callable[[], object], deadline: float, what: str) -> None:
    """Poll ``done`` (a look at another process's files: nothing to await) until ``deadline``."""
    while not done():
        assert time.monotonic() < deadline, f"waited in vain for {what}"
        await asyncio.sleep(0.01)


def gone(path: Path) -> bool:
    """True once a replayed journal's lock file (say) has been deleted."""
    return not path.exists()


def was_replayed(directory: Path, writer: str) -> bool:
    """A replayed journal is marked, and deleted a few seconds later (a Redis restart in
    between has it replayed again)."""
    return (directory / f"{writer}.replayed").exists() or gone(directory / f"{writer}.lock")


def journal_of(journals: Path, writer: str) -> Path:
    """The directory of the deployment whose journals include ``writer``'s."""
    [lock] = journals.rglob(f"{writer}.lock")
    return lock.parent


async def ledger(redis: aioredis.Redis, settings: Settings) -> Counter[tuple[str, str]]:
    """This month's request counts in Redis, by (consumer, route)."""
    month = datetime.now(UTC).strftime("%Y-%m")
    reader = UsageReader(redis, settings.keyspace())
    counted: Counter[tuple[str, str]] = Counter()
    for consumer in CONSUMERS:
        for row in await reader.totals(consumer, month, ["route"]):
            counted[(consumer, row["route"])] += row["requests"]
    return counted


def locks(directory: Path) -> list[Path]:
    """The journals of writers that did not finish cleanly (each holds a lock file)."""
    return list(directory.rglob("*.lock"))


class _JournalClock:
    """The journal's view of time, pushed forward by the test (its window is 10 s of it)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    def time(self) -> float:
        return time.time()


async def test_batches_a_restarted_redis_lost_are_all_sent_again_over_a_lossy_link(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis comes back without the batches it had acknowledged, and the link keeps failing for
    longer than the journal's window: each lost batch is still sent again until it lands.

    (The re-send used to start over after each failure, from the batches still in the window,
    and so, on a link that failed often enough, never got to the end: counts were lost.) A
    restart with an empty data set stands for a crash that lost acknowledged writes."""
    clock = _JournalClock()
    monkeypatch.setattr(journal_module, "time", clock)
    server = EmbeddedRedis().start()
    port = server.port
    assert port is not None
    faults = Faults(seed=11)
    sent: Counter[str] = Counter()
    try:
        async with FaultProxy(port, faults) as proxy:
            own = settings.replace(redis_url=f"redis://127.0.0.1:{proxy.port}/0", records="off",
                                   consumer_header="X-Consumer", redis_timeout=0.5)  # fmt: skip
            own = own.replace(counter_flush_interval=0)  # every flush sends the counts
            mw = Meterwall(ok_app, settings=own)

            async def requests() -> None:
                for consumer in ("acme", "globex", "initech"):
                    headers = [(b"host", b"api.test"), (b"x-consumer", consumer.encode())]
                    await mw(http_scope(headers=headers), body_receive(), _discard)
                    sent[consumer] += 1

            for _ in range(10):  # ten batches, each acknowledged
                await requests()
                assert await mw.flusher.flush()
            await asyncio.to_thread(server.kill)
            server = await asyncio.to_thread(EmbeddedRedis(port=port).start)  # empty
            faults.drop_reply = 0.3
            await requests()  # a new batch: it must not land before the lost ones
            attempts = 0
            while not await mw.flusher.flush_once():
                attempts += 1
                assert attempts < 100, mw.flusher.last_error
                clock.ahead += 2.0  # each try is a back-off later: the window runs out
                mw.flusher._retry_at = 0.0
            assert clock.ahead > 10.0  # the link failed for longer than the window
            faults.drop_reply = 0.0
            assert await mw.aclose()
    finally:
        async with aioredis.Redis(port=port) as direct:
            month = datetime.now(UTC).strftime("%Y-%m")
            reader = UsageReader(direct, settings.keyspace())
            counted = Counter({c: sum(r["requests"] for r in await reader.totals(c, month, []))
                               for c in sent})  # fmt: skip
        server.stop()
    assert faults.counts.get("drop_reply", 0) > 0
    assert counted == sent


async def test_a_restart_found_by_a_shrugged_off_read_still_resends_the_lost_batches(
    settings,
) -> None:
    """With records on, the first command after a restart is often the restriction-list read,
    whose failure is shrugged off (the last list stays in force). It must still count as lost
    contact: else the next command reconnects silently, a newer batch lands first, and the
    batches the restart lost come back "duplicate" when the periodic run-id check resends them."""
    server = EmbeddedRedis().start()
    port, sent = server.port, 0
    try:
        own = settings.replace(redis_url=server.url, consumer_header="X-Consumer",
                               counter_flush_interval=0, flush_interval=60)  # fmt: skip
        mw = Meterwall(ok_app, settings=own)

        async def request() -> None:
            nonlocal sent
            headers = [(b"host", b"api.test"), (b"x-consumer", b"acme")]
            await mw(http_scope(headers=headers), body_receive(), _discard)
            sent += 1

        for _ in range(3):
            await request()
            assert await mw.flusher.flush_once()
        # Redis crashes and comes back without those acknowledged writes (AOF everysec's loss)
        await asyncio.to_thread(server.kill)
        server = await asyncio.to_thread(EmbeddedRedis(port=port).start)
        mw.flusher._next_restrictions_read = 0.0  # the list is due (it is read once a second)
        await request()
        assert await mw.flusher.flush_once()
        mw.flusher._next_server_check = 0.0  # the periodic run-id check comes round
        await request()
        assert await mw.flusher.flush_once()
        assert await mw.aclose()
        async with aioredis.Redis(port=port) as direct:
            month = datetime.now(UTC).strftime("%Y-%m")
            rows = await UsageReader(direct, own.keyspace()).totals("acme", month, [])
    finally:
        server.stop()
    assert sum(r["requests"] for r in rows) == sent == 5


async def test_batches_owed_to_a_restarted_redis_survive_a_kill_while_they_are_resent(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis comes back without three acknowledged batches; every script call is then lost on
    the way while the journal's window moves on and compactions run; the worker is killed. The
    owed batches must still be in its journal for the adopter to send."""
    clock = _JournalClock()
    monkeypatch.setattr(journal_module, "time", clock)
    server = EmbeddedRedis().start()
    port = server.port
    assert port is not None
    faults = Faults(seed=3, only=b"EVAL")
    try:
        async with FaultProxy(port, faults) as proxy:
            own = settings.replace(redis_url=f"redis://127.0.0.1:{proxy.port}/0", records="off",
                                   consumer_header="X-Consumer", counter_flush_interval=0,
                                   flush_interval=60, redis_timeout=0.5)  # fmt: skip
            headers = [(b"host", b"api.test"), (b"x-consumer", b"acme")]
            mw = Meterwall(ok_app, settings=own)
            for _ in range(3):  # three acknowledged batches
                await mw(http_scope(headers=headers), body_receive(), _discard)
                assert await mw.flusher.flush_once()
            await asyncio.to_thread(server.kill)
            server = await asyncio.to_thread(EmbeddedRedis(port=port).start)  # empty
            await mw(http_scope(headers=headers), body_receive(), _discard)
            faults.drop_request = 1.0  # the run id is read; no script call gets through
            for _ in range(4):
                mw.flusher._retry_at = 0.0
                assert not await mw.flusher.flush_once()
                clock.ahead += 6.0  # past the journal's window; compactions run
            assert len(mw.flusher._resend) == 3  # owed, and their acknowledgement is stale
            assert mw.flusher._task is not None
            mw.flusher._task.cancel()
            mw.flusher.journal.forget_after_fork()  # the worker is killed
            if mw.flusher._redis is not None:  # (its connections close with it)
                await mw.flusher._redis.aclose()
            faults.drop_request = 0.0
            survivor = Meterwall(ok_app, settings=own)
            assert await survivor.flusher.flush_once()
            assert survivor.flusher.journals_adopted == 1
            assert await survivor.aclose()
    finally:
        async with aioredis.Redis(port=port) as direct:
            month = datetime.now(UTC).strftime("%Y-%m")
            rows = await UsageReader(direct, settings.keyspace()).totals("acme", month, [])
        server.stop()
    assert sum(r["requests"] for r in rows) == 4
    assert faults.counts.get("drop_request", 0) >= 3
