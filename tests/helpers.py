"""Small helpers shared by test modules."""

from __future__ import annotations

import time


def this_hour() -> tuple[int, int]:
    """A counter read range covering the last hour (unix seconds)."""
    now = int(time.time())
    return now - 3600, now + 60
