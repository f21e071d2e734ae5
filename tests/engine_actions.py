"""Actions and job hooks the engine tests run in real worker processes.

Workers import this module through ASR_ACTION_MODULES=tests.engine_actions; the test process imports
it too (as `engine_actions`), so the test job kinds it declares (all named `test.*`) can be started.
Each action leaves a trace in files named by its params, the only channel from a worker back to the
test: one line per event, written with a single append so a killed process never leaves half a record
behind.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from datapath.errors import DiskFormatError, NonRecoverableError, StorageUnavailableError
from models.jobs import Job
from workflows import actions
from workflows.engine import AwaitingOperator, StepCancelled, StepContext, action
from workflows.jobkind import JobKind, declare

HOOKED_KIND = "test.hooked"
TEST_ACTIONS = frozenset(actions.declare(name) for name in (
    "test.record", "test.flaky", "test.broken_chain", "test.count", "test.kill_own_worker", "test.until_cancelled",
    "test.manual", "test.only_in_this_process", "test.until_file",
))


def append_line(path: str, record: dict[str, Any] | str) -> None:
    line = record if isinstance(record, str) else json.dumps(record)
    with open(path, "a") as log:
        log.write(line + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records an action appended to `path` (none if it never wrote)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@action("test.record")
def record(ctx: StepContext, *, log: str, label: str, seconds: float = 0.0, ticks: int = 10) -> dict:
    """Work for `seconds`, reporting progress `ticks` times, then log when it ran, where and as what."""
    started = time.time()
    for tick in range(1, ticks + 1):
        time.sleep(seconds / ticks)
        ctx.progress(tick, ticks)
    append_line(log, {
        "label": label, "step": ctx.step_id, "attempt": ctx.attempt, "pid": os.getpid(),
        "started": started, "ended": time.time(),
    })
    return {"label": label}


@action("test.flaky")
def flaky(ctx: StepContext, *, log: str, failing_attempts: int) -> dict:
    """Fail recoverably in every call of the first `failing_attempts` attempts, then succeed."""
    append_line(log, {"attempt": ctx.attempt, "at": time.time()})
    if ctx.attempt <= failing_attempts:
        raise StorageUnavailableError(f"recovery storage unreachable (attempt {ctx.attempt})")
    return {"attempt": ctx.attempt}


@action("test.broken_chain")
def broken_chain(ctx: StepContext, *, log: str, disk: str) -> None:
    """A failure no retry can fix."""
    append_line(log, {"attempt": ctx.attempt, "at": time.time()})
    raise DiskFormatError(f"{disk}: broken VHD chain: parent disk not found")


@action("test.count")
def count(ctx: StepContext, *, output: str, runs: str, total: int, seconds_per_item: float) -> dict:
    """Append the numbers 0..total-1 to `output`, one line each, resuming where a killed run stopped.

    `output` is its own checkpoint: the complete lines are the items done (a torn last line, which a
    single small append cannot produce, would be cut off and redone)."""
    done = _resume_point(Path(output))
    append_line(runs, {"pid": os.getpid(), "resumed_at": done, "attempt": ctx.attempt, "at": time.time()})
    for item in range(done, total):
        time.sleep(seconds_per_item)
        append_line(output, str(item))
        ctx.progress(item + 1, total)
    return {"items": total}


def _resume_point(output: Path) -> int:
    if not output.exists():
        return 0
    content = output.read_text()
    complete = content[: content.rfind("\n") + 1]
    if len(complete) != len(content):
        with open(output, "r+") as torn:
            torn.truncate(len(complete))
    items = complete.splitlines()
    if items != [str(number) for number in range(len(items))]:
        raise NonRecoverableError(f"{output}: checkpoint is not the sequence 0..{len(items) - 1}")
    return len(items)


@action("test.kill_own_worker")
def kill_own_worker(ctx: StepContext, *, log: str) -> None:
    """A poison message: takes its worker process down every time it runs."""
    append_line(log, {"attempt": ctx.attempt, "pid": os.getpid(), "at": time.time()})
    os.kill(os.getpid(), signal.SIGKILL)


@action("test.until_cancelled")
def until_cancelled(ctx: StepContext, *, log: str, seconds: float) -> dict:
    """Report progress every 50 ms for up to `seconds`; log whether it stopped because it was cancelled."""
    append_line(log, {"event": "started", "pid": os.getpid(), "at": time.time()})
    ticks = int(seconds / 0.05)
    try:
        for tick in range(1, ticks + 1):
            time.sleep(0.05)
            ctx.progress(tick, ticks)
    except StepCancelled:
        append_line(log, {"event": "stopped", "at": time.time()})
        raise
    append_line(log, {"event": "finished", "at": time.time()})
    return {"ticks": ticks}


@action("test.until_file")
def until_file(ctx: StepContext, *, log: str, gate: str, timeout: float = 60.0) -> dict:
    """Log that it started, then wait (at most `timeout` s) until the file `gate` exists: the test chooses the
    moment the step ends."""
    append_line(log, {"event": "started", "pid": os.getpid(), "at": time.time()})
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise NonRecoverableError(f"{gate} did not appear within {timeout:g} s")
        time.sleep(0.01)
    append_line(log, {"event": "finished", "at": time.time()})
    return {"gate": gate}


@action("test.manual")
def manual(ctx: StepContext, *, log: str, instructions: str) -> None:
    """A manual step: log that it ran, then hand over to an operator with `instructions`."""
    append_line(log, {"step": ctx.step_id, "attempt": ctx.attempt, "pid": os.getpid(), "at": time.time()})
    raise AwaitingOperator(instructions)


def _log_outcome(job: Job, _session: Any) -> None:
    append_line(job.params["hook_log"], {
        "job": job.id, "state": job.state.value, "error": job.error, "at": time.time(),
    })


def _test_kind(name: str, hooks: tuple = ()) -> JobKind:
    # The engine tests build their stages by hand and call start_job: the kind only declares the name, the
    # actions and the hooks.
    return declare(JobKind(name=name, summary="engine test jobs", actions=TEST_ACTIONS, build=lambda stages: stages,
                           locks=lambda _: [], target=lambda _: None, params=lambda _: {},
                           on_succeeded=hooks, on_failed=hooks, on_cancelled=hooks))


_test_kind(HOOKED_KIND, (_log_outcome,))
for _name in ("enable_protection", "delta_replication", "resynchronize", "failover", "recovery_plan_failover"):
    _test_kind(f"test.{_name}")
