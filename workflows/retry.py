"""The retry policy, expressed in tenacity: what is worth retrying, and when.

Two levels. Inside one run of a step, `in_call_retrying()` absorbs short blips (a dropped connection, a
busy storage account) with three tries seconds apart. When those are spent, the step waits in the
database for the long schedule (1, 2, 4, 8, 10 minutes, then every 30 minutes, as Azure Site Recovery
does) and the reconciler runs it again: a broker countdown would outlive Redis's visibility timeout.
"""
from __future__ import annotations

import errno

import redis.exceptions
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_chain,
    wait_exponential,
    wait_fixed,
)

from datapath.errors import NonRecoverableError, RecoverableError
from workflows import clock

# Out of space or memory passes once something else finishes or is cleaned up.
RECOVERABLE_ERRNOS = frozenset({errno.ENOSPC, errno.ENOMEM})

RECOVERABLE_TYPES: tuple[type[BaseException], ...] = (
    RecoverableError,
    ConnectionError,
    TimeoutError,
    MemoryError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)

IN_CALL_ATTEMPTS = 3

LONG_SCHEDULE = wait_chain(
    wait_fixed(60), wait_fixed(120), wait_fixed(240), wait_fixed(480), wait_fixed(600), wait_fixed(1800)
)


def is_recoverable(exc: BaseException) -> bool:
    """True when retrying may succeed; anything unclassified is a bug an administrator must see."""
    if isinstance(exc, NonRecoverableError):
        return False
    if isinstance(exc, RECOVERABLE_TYPES):
        return True
    return isinstance(exc, OSError) and exc.errno in RECOVERABLE_ERRNOS


def in_call_retrying() -> Retrying:
    """The short retry around one run of an action; sleeps through the engine clock (scaled)."""
    return Retrying(
        retry=retry_if_exception(is_recoverable),
        stop=stop_after_attempt(IN_CALL_ATTEMPTS),
        wait=wait_exponential(multiplier=0.5, max=4),
        sleep=clock.sleep,
        reraise=True,
    )


def next_attempt_delay(attempt: int) -> float:
    """Seconds (before `ASR_TIME_SCALE`) to wait after the `attempt`-th run of a step failed recoverably."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, not {attempt}")
    retry_state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    retry_state.attempt_number = attempt
    return LONG_SCHEDULE(retry_state)
