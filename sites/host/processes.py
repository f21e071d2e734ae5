"""What the host's detached helper processes (synthetic workloads, QEMU guests, tracker services) share: who a
process is (its pid and start time, so a reused pid is never mistaken for it), waiting for one to exit, and
the tail of its log for error messages."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

LOG_TAIL_BYTES = 2000
POLL_S = 0.02


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when no live process has `pid`
    (zombies count as gone: they write nothing any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces and ')'
    state, start_ticks = fields[0], int(fields[19])
    return None if state in ("Z", "X") else start_ticks


def wait_for_exit(alive: Callable[[], bool], timeout: float, poll: float = POLL_S) -> bool:
    """Poll `alive()` until it is false; True if that happened within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def log_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The last `max_bytes` of a log, for an error message."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - max_bytes))
            return log.read().decode(errors="replace").strip() or "(no output)"
    except FileNotFoundError:
        return f"(no {Path(path).name})"
