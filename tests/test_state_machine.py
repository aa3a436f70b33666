"""A hypothesis state machine over enqueue, flush, lost replies, lost requests and worker crashes
against real Redis: whatever the order, Redis ends up with exactly the requests that were made."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from meterwall import Meterwall, Settings
from tests.faults import FaultProxy, Faults
from tests.test_flusher import ok_app, requests_in_redis
from tests.test_middleware import _discard, body_receive, http_scope


class Ledger(RuleBasedStateMachine):
    """The model is a number: the requests made. Redis must agree once everything is flushed."""

    base: Settings  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.made = 0
        self.crashes = 0

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    @initialize()
    def start(self) -> None:
        port = int(self.base.redis_url.rsplit(":", 1)[1].split("/")[0])
        self.faults = Faults()
        self.proxy = self.run(FaultProxy(port, self.faults).__aenter__())
        self.settings = self.base.replace(
            redis_url=f"redis://127.0.0.1:{self.proxy.port}/0", records="off", redis_timeout=0.2,
            flush_interval=60,  # the rules flush; the background task only waits (so a crash
            # never cuts a command in half: a killed process's sockets just close)
            key_prefix=f"{self.base.key_prefix}m{id(self) % 10_000}",
        )  # fmt: skip
        self.worker = Meterwall(ok_app, settings=self.settings)

    @rule(n=st.integers(min_value=1, max_value=5))
    def enqueue(self, n: int) -> None:
        for _ in range(n):
            self.run(self.worker(http_scope(), body_receive(), _discard))
        self.made += n

    @rule()
    def flush(self) -> None:
        self.worker.flusher._retry_at = 0.0  # no back-off wait in a test step
        self.run(self.worker.flusher.flush_once())

    @rule(lose=st.sampled_from(["drop_reply", "drop_request"]))
    def flush_with_a_fault(self, lose: str) -> None:
        """A timeout: after the script ran (reply lost) or before it could (request lost)."""
        setattr(self.faults, lose, 1.0)
        try:
            self.flush()
        finally:
            setattr(self.faults, lose, 0.0)

    @rule()
    def crash_and_replay(self) -> None:
        """The worker is killed (its journal stays behind) and another one starts."""
        dead = self.worker.flusher
        if dead._task is not None:  # killed wherever it was, even inside a flush
            dead._task.cancel()
            self.run(asyncio.gather(dead._task, return_exceptions=True))
            dead._task = None
        dead.journal.close(clean=False)
        if dead._redis is not None:  # the kernel would close its sockets
            self.run(dead._redis.aclose())
            dead._redis = None
        self.crashes += 1
        self.worker = Meterwall(ok_app, settings=self.settings)

        async def restart() -> None:
            self.worker.flusher.start()  # the restarted worker looks for journals at once

        self.run(restart())
        self.flush()

    @invariant()
    def never_more_than_made(self) -> None:
        async def counted() -> int:
            async with aioredis.Redis.from_url(self.base.redis_url) as direct:
                return await requests_in_redis(direct, self.settings)

        assert self.run(counted()) <= self.made  # a retry never counts twice

    def teardown(self) -> None:
        async def finish() -> int:
            assert await self.worker.aclose(timeout=10)
            async with aioredis.Redis.from_url(self.base.redis_url) as direct:
                return await requests_in_redis(direct, self.settings)

        try:
            assert self.run(finish()) == self.made  # and nothing is ever lost
        finally:
            self.run(self.proxy.__aexit__(None, None, None))
            self.loop.close()


@pytest.mark.slow
# A connection cut by the fault proxy in the middle of a reply is sometimes collected later
# without having been closed; the kernel closes it anyway. Collected here, so that the
# warning does not land on whichever test runs next.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_any_order_of_flushes_faults_and_crashes_keeps_counts_exact(settings: Settings) -> None:
    Ledger.base = settings
    machine = Ledger.TestCase
    machine.settings = settings_for_machine()
    try:
        machine().runTest()
    finally:
        gc.collect()


def settings_for_machine() -> Any:
    return hypothesis_settings(max_examples=8, stateful_step_count=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
