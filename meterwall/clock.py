"""Time as an injectable dependency: retention, epochs and windows are tested without sleeping."""

import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time in integer nanoseconds since the Unix epoch (UTC)."""

    def now_ns(self) -> int: ...


class SystemClock:
    """The real clock."""

    __slots__ = ()

    def now_ns(self) -> int:
        return time.time_ns()


class FixedClock:
    """A clock that moves only when told to; for tests and reproducible demos."""

    __slots__ = ("_now",)

    def __init__(self, now_ns: int) -> None:
        self._now = now_ns

    def now_ns(self) -> int:
        return self._now

    def set(self, now_ns: int) -> None:
        self._now = now_ns

    def advance(self, seconds: float) -> None:
        self._now += int(seconds * 1_000_000_000)


SYSTEM_CLOCK = SystemClock()
