"""Following a job to its end, for `asr jobs watch` and for every verb's `--wait`/`--timeout`: progress
bars redrawn on a terminal, progress lines in a log or a pipe, then a summary of the job.

A command that starts a job prints its id; with `--wait` it follows the job like `asr jobs watch`. Exit
statuses of a followed job: 0 it succeeded, 1 it failed or was cancelled, 3 `--timeout` ran out while it
is still going, 130 interrupted (the job goes on in both cases).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

import click

from api.cli_output import (
    _emit_json,
    _seconds_between,
    format_duration,
    format_size,
    format_time,
    json_option,
    pick,
)
from api.cli_service import _command, _service

EXIT_JOB_FAILED = 1
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130
FINISHED_STATES = ("succeeded", "failed", "cancelled")
STEP_DONE_STATES = ("succeeded", "failed", "skipped", "cancelled")
WATCH_INTERVAL_S = 0.5
# A step's progress counts bytes when it copies disk data and small counts (logs, disks) otherwise; a
# total this large can only be bytes, so it is shown as a size.
BYTES_THRESHOLD = 1 << 20
BAR_WIDTH = 24


def wait_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
                      help="Follow the job at most this long (implies --wait; then exit 3, the job goes on).")(fn)
    return click.option("--wait", is_flag=True,
                        help="Follow the job to its end (progress bars); exit 1 unless it succeeded.")(fn)


def progress_of(step: Mapping[str, Any]) -> tuple[int, int]:
    """(done, total) of a step: its live progress when the snapshot carries it, else the last recorded."""
    live = step.get("progress")
    if isinstance(live, Mapping) and live.get("total") is not None:
        return int(live.get("done") or 0), int(live.get("total") or 0)
    return int(step.get("progress_done") or 0), int(step.get("progress_total") or 0)


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    fraction = min(1.0, done / total) if total > 0 else 0.0
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {100 * fraction:5.1f}%"


def progress_amount(done: int, total: int) -> str:
    if total <= 0:
        return ""
    if total >= BYTES_THRESHOLD:
        return f"{format_size(done)} / {format_size(total)}"
    return f"{done}/{total}"


def _steps(snapshot: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(snapshot.get("steps") or [])


def _job_id(snapshot: Mapping[str, Any]) -> str:
    return str(pick(snapshot, "id", "job_id") or "?")


def step_line(step: Mapping[str, Any], job_id: str, instructions: str | None = None) -> str:
    """One line for a step whose state is worth a line of its own: started, finished, or waiting."""
    name = step.get("name", "?")
    state = step.get("state")
    if state == "succeeded":
        took = _seconds_between(step.get("started_at"), step.get("ended_at"))
        return f"  done     {name}" + (f" ({format_duration(took)})" if took is not None else "")
    if state == "failed":
        return f"  FAILED   {name}: {step.get('error') or 'failed'}"
    if state == "skipped":
        return f"  skipped  {name}"
    if state == "cancelled":
        return f"  cancelled {name}"
    if state == "waiting_retry":
        return (f"  retry    {name}: attempt {step.get('attempts', '?')} failed: {step.get('error') or '?'}; "
                f"next attempt {format_time(step.get('next_attempt_at'))} (now: asr jobs retry {job_id})")
    if state == "waiting_action":
        return (f"  ACTION   {name}: {instructions or step.get('instructions') or 'an operator must act'} "
                f"(then: asr plan resume {job_id})")
    if state == "running":
        return f"  started  {name}"
    return f"  {state}  {name}"


def active_step_line(step: Mapping[str, Any]) -> str:
    done, total = progress_of(step)
    amount = progress_amount(done, total)
    return f"  {progress_bar(done, total)}  {step.get('name', '?')}" + (f"  {amount}" if amount else "")


class ProgressView:
    """Draws a job's snapshots as they come.

    On a terminal: finished and waiting steps are printed once, as lines that stay, and below them a live
    area is redrawn in place: the job's overall bar and one bar per running step. Elsewhere (a log file,
    a pipe) nothing is redrawn: a line per step event and per quarter of a running step's progress, so a
    log reads top to bottom."""

    def __init__(self, out: IO[str], *, tty: bool, width: int = 100) -> None:
        self.out = out
        self.tty = tty
        self.width = max(40, width)
        self._live_lines = 0
        self._reported: dict[str, tuple[Any, ...]] = {}  # step id -> what was last printed about it
        self._started = time.monotonic()

    def _fit(self, line: str) -> str:
        # On a terminal a wrapped line would break the cursor arithmetic of the live area; a log keeps all.
        return line if not self.tty or len(line) <= self.width else line[:self.width - 3] + "..."

    def _clear_live(self) -> None:
        if self.tty and self._live_lines:
            self.out.write(f"\x1b[{self._live_lines}F\x1b[J")
            self._live_lines = 0

    def update(self, snapshot: Mapping[str, Any]) -> None:
        job_id = _job_id(snapshot)
        # A snapshot names what manual steps ask at the job's level; a full job record has it on the step.
        asks = {w.get("step"): w.get("instructions") for w in snapshot.get("waiting_for") or []}
        events = []
        for step in _steps(snapshot):
            key = str(step.get("id") or f"{step.get('stage')}.{step.get('index')}")
            state = step.get("state")
            done, total = progress_of(step)
            if state in STEP_DONE_STATES or state in ("waiting_retry", "waiting_action"):
                mark: tuple[Any, ...] = (state, step.get("attempts"))
            elif state == "running" and not self.tty:
                quarter = int(4 * done / total) if total > 0 else 0
                mark = (state, min(quarter, 3))
            else:
                mark = (state,)
            if self._reported.get(key) == mark:
                continue
            previous = self._reported.get(key)
            self._reported[key] = mark
            if state in STEP_DONE_STATES or state in ("waiting_retry", "waiting_action"):
                events.append(step_line(step, job_id, asks.get(step.get("name"))))
            elif state == "running" and not self.tty:
                if previous is None or previous[0] != "running":
                    events.append(step_line(step, job_id))
                else:
                    events.append(f"  {done * 100 // total if total else 0:3d}%     {step.get('name', '?')}"
                                  + (f"  {progress_amount(done, total)}" if total else ""))
        self._clear_live()
        for line in events:
            self.out.write(self._fit(line) + "\n")
        if self.tty:
            live = self.live_lines(snapshot)
            for line in live:
                self.out.write(self._fit(line) + "\n")
            self._live_lines = len(live)
        self.out.flush()

    def live_lines(self, snapshot: Mapping[str, Any]) -> list[str]:
        """The redrawn area: the job's bar (steps done of all) and a bar per running step."""
        steps = _steps(snapshot)
        if snapshot.get("state") in FINISHED_STATES:
            return []
        done = sum(1 for step in steps if step.get("state") in ("succeeded", "skipped"))
        elapsed = format_duration(time.monotonic() - self._started)
        lines = [f"{progress_bar(done, len(steps))}  {done}/{len(steps)} steps  "
                 f"{snapshot.get('state', '?')}  {elapsed}"]
        lines += [active_step_line(step) for step in steps if step.get("state") == "running"]
        return lines

    def finish(self, job: Mapping[str, Any]) -> None:
        self._clear_live()
        self.out.write(job_summary(job) + "\n")
        self.out.flush()


def job_summary(job: Mapping[str, Any]) -> str:
    state = job.get("state", "?")
    took = _seconds_between(job.get("started_at") or job.get("created_at"), job.get("ended_at"))
    text = f"job {_job_id(job)} ({job.get('kind', '?')}) {state}"
    if took is not None:
        text += f" in {format_duration(took)}"
    if state != "succeeded" and job.get("error"):
        text += f": {job['error']}"
    return text


def follow_job(job_id: str, *, as_json: bool, timeout: float | None, lines: bool = False) -> int:
    """Follow the job until it ends (or `timeout` runs out); returns the exit status. Without --json:
    progress bars (a terminal) or progress lines, then a summary. With --json: `lines` prints each
    snapshot as one line of JSON as it comes (for `jobs watch`), otherwise only the final job."""
    service = _service()
    tty = sys.stdout.isatty() and not as_json
    view = ProgressView(sys.stdout, tty=tty, width=shutil.get_terminal_size((100, 24)).columns)
    try:
        for snapshot in service.job_events(job_id, interval=WATCH_INTERVAL_S, timeout=timeout):
            if as_json:
                if lines:
                    click.echo(json.dumps(snapshot, default=str))
            else:
                view.update(snapshot)
    except KeyboardInterrupt:
        view._clear_live()
        click.echo(f"asr: stopped following job {job_id}; it goes on (asr jobs watch {job_id})", err=True)
        return EXIT_INTERRUPTED
    job = service.show_job(job_id)  # the record of the end, with the error, whatever the stream carried
    if job.get("state") not in FINISHED_STATES:
        view._clear_live()
        if as_json and not lines:
            _emit_json(job)
        click.echo(f"asr: job {job_id} is still {job.get('state')} after {format_duration(timeout)}; "
                   f"it goes on (asr jobs watch {job_id})", err=True)
        return EXIT_TIMEOUT
    if as_json:
        if not lines:  # (with `lines` the stream's last snapshot, printed already, is the finished job)
            _emit_json(job)
    else:
        view.update(job)
        view.finish(job)
    return 0 if job.get("state") == "succeeded" else EXIT_JOB_FAILED


def _wait_for(job_id: str, *, as_json: bool, timeout: float | None, lines: bool = False) -> None:
    """Follow the job (`follow_job`) and exit with its status unless it succeeded."""
    status = follow_job(job_id, as_json=as_json, timeout=timeout, lines=lines)
    if status:
        sys.exit(status)


def started(result: Mapping[str, Any], *, as_json: bool, wait: bool = False, timeout: float | None = None,
            summary: Callable[[str], None] | None = None) -> None:
    """What every command that starts a job prints: its id (or the dict); with --wait, the job followed, and
    then `summary(job_id)` if the command has one and the job succeeded."""
    job_id = str(result.get("job_id"))
    if not as_json:
        what = result.get("kind") or "job"
        target = result.get("vm") or result.get("plan")
        # A restart may resume the very job it was asked about, from the step where it stopped.
        how = "resumed from the step where it stopped" if result.get("recovery") == "resumed" else "started"
        click.echo(f"job {job_id} {how}: {what}" + (f" of {target}" if target else ""))
    if not wait:
        if as_json:
            _emit_json(dict(result))
        else:
            click.echo(f"follow it with: asr jobs watch {job_id}")
        return
    _wait_for(job_id, as_json=as_json, timeout=timeout)
    if summary is not None and not as_json:
        summary(job_id)


def acted_on(job_id: str, result: Any, done: str, *, as_json: bool, wait: bool, timeout: float | None) -> None:
    """What a command that acts on a job already there prints (resume, cancel, retry): with --wait (or
    --timeout), the job followed; with --json, the service's answer; else `job JOB_ID <done>`."""
    if wait or timeout is not None:
        _wait_for(job_id, as_json=as_json, timeout=timeout)
    elif as_json:
        _emit_json(result)
    else:
        click.echo(f"job {job_id} {done}")


def _job_command(group: click.Group, name: str, *, summary: Callable[[str], None] | None = None,
                 **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """A command that starts a job: --json, --wait and --timeout, and its result printed by `started`
    (`summary(job_id)` after a job waited for succeeded)."""
    def decorate(fn: Callable[..., Mapping[str, Any]]) -> click.Command:
        def run(as_json: bool, wait: bool, timeout: float | None, **params: Any) -> None:
            started(fn(**params), as_json=as_json, wait=wait or timeout is not None, timeout=timeout,
                    summary=summary)

        run.__name__ = fn.__name__
        run.__doc__ = fn.__doc__
        run.__click_params__ = list(getattr(fn, "__click_params__", []))  # the arguments and options of fn
        return _command(group, name, **kwargs)(json_option(wait_options(run)))

    return decorate
