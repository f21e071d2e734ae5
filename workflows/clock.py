"""The engine's clock: every timestamp the engine stores and every delay it waits goes through here.

Timestamps are aware UTC datetimes, what `models.db.UtcDateTime` columns store and give back on every
database. RPO alone is measured by the database's clock (`models.db.database_now`), which no host's clock
can shift.

`ASR_TIME_SCALE` (default 1) divides every engine delay (the retry schedules, copy frequencies, and the
RPO thresholds that follow them), so a test can run the 1-2-4-8-10-30 minute back-off in seconds.
Thresholds configured directly in seconds (heartbeat, stale and stall limits) are not scaled: they are
already whatever the operator or test chose.
"""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from workflows.settings import time_scale


def now() -> datetime:
    """The current time, an aware UTC datetime."""
    return datetime.now(UTC)


def scaled(delay_s: float) -> float:
    """An engine delay in real seconds after `ASR_TIME_SCALE`."""
    return delay_s / time_scale()


def after(delay_s: float) -> datetime:
    """The moment an engine delay of `delay_s` (before scaling) from now ends."""
    return now() + timedelta(seconds=scaled(delay_s))


def sleep(delay_s: float) -> None:
    """Wait out an engine delay (scaled)."""
    time.sleep(scaled(delay_s))
