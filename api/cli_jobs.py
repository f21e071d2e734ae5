"""The job verbs of `asr`: every operation runs as a durable job of steps; list, show, watch (follow to
its end), cancel, retry and restart jobs.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from api.cli import main
from api.cli_output import (
    NOTHING,
    Column,
    _emit_json,
    _seconds_between,
    _section,
    format_duration,
    json_option,
    print_fields,
    print_table,
)
from api.cli_progress import _steps, _wait_for, acted_on, progress_amount, progress_of, started, wait_options
from api.cli_service import _command, _OpGroup, _service


@main.group(cls=_OpGroup)
def jobs():
    """Jobs: every operation as a durable job of steps; list, show, follow, cancel, retry, restart."""


def _job_progress(job: Mapping[str, Any]) -> str:
    if job.get("steps_total") is not None:
        return f"{job.get('steps_done', 0)}/{job['steps_total']}"
    steps = _steps(job)
    done = sum(1 for step in steps if step.get("state") in ("succeeded", "skipped"))
    return f"{done}/{len(steps)}" if steps else NOTHING


JOB_COLUMNS: list[Column] = [("id", "id"), ("kind", "kind"), ("vm", "vm|plan|target"), ("state", "state"),
                             ("steps", _job_progress), ("created", "created_at"), ("ended", "ended_at"),
                             ("error", "error")]


@_command(jobs, "list")
@click.option("--state", default=None, help="Only jobs in this state (queued, running, waiting_retry, "
                                            "waiting_action, succeeded, failed, cancelled).")
@click.option("--kind", default=None, help="Only jobs of this kind (enable_protection, test_failover, ...).")
@click.option("--vm", "vm_name", default=None, help="Only jobs of this VM.")
@click.option("--plan", "plan_name", default=None, help="Only the runs of this recovery plan.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="At most this many.")
@json_option
def jobs_list(state: str | None, kind: str | None, vm_name: str | None, plan_name: str | None, limit: int,
              as_json: bool):
    """Jobs, newest first."""
    result = _service().list_jobs(state=state, kind=kind, vm=vm_name, plan=plan_name, limit=limit)
    if as_json:
        return _emit_json(result)
    print_table(result, JOB_COLUMNS, empty="no jobs")


def _step_progress(step: Mapping[str, Any]) -> str:
    done, total = progress_of(step)
    if total <= 0:
        return NOTHING
    amount = progress_amount(done, total)
    return f"{100 * min(done, total) // total}% {amount}"


STEP_COLUMNS: list[Column] = [
    ("#", lambda s: f"{s.get('stage')}.{s.get('index')}"), ("step", "name"), ("state", "state"),
    ("tries", "attempts"), ("progress", _step_progress), ("queue", "queue"),
    ("took", lambda s: format_duration(_seconds_between(s.get("started_at"), s.get("ended_at")))
     if s.get("ended_at") else None),
    ("next attempt", "next_attempt_at"), ("error", "error"),
]


@_command(jobs, "show")
@click.argument("job_id")
@json_option
def jobs_show(job_id: str, as_json: bool):
    """A job: its state, error, and every step with its state, attempts, progress and next attempt."""
    job = _service().show_job(job_id)
    if as_json:
        return _emit_json(job)
    print_fields(job, [("job", "id"), ("kind", "kind"), ("vm", "vm"), ("plan", "plan"), ("target", "target"),
                       ("state", "state"), ("progress", lambda j: f"{j['percent']:g}%" if "percent" in j else None),
                       ("created", "created_at"), ("started", "started_at"), ("ended", "ended_at"),
                       ("next attempt", "next_attempt_at"), ("error", "error")])
    _section("steps")
    steps = _steps(job)
    print_table(steps, STEP_COLUMNS, empty="(none)")
    for step in steps:
        if step.get("state") == "waiting_action":
            click.echo(f"\nwaiting for an operator at {step.get('name')}: {step.get('instructions')}\n"
                       f"when done: asr plan resume {job.get('id', job_id)} --note '...'")


@_command(jobs, "watch")
@click.argument("job_id")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Stop watching after this long (exit 3; the job goes on).")
@click.option("--json", "as_json", is_flag=True, help="Print each snapshot of the job as a line of JSON.")
def jobs_watch(job_id: str, timeout: float | None, as_json: bool):
    """Follow a job to its end: a progress bar per running step; exit 0 if it succeeded, 1 if it failed
    or was cancelled."""
    _wait_for(job_id, as_json=as_json, timeout=timeout, lines=True)


def _job_action(name: str, service_name: str, done: str, doc: str) -> None:
    def command(job_id: str, as_json: bool, wait: bool, timeout: float | None):
        result = getattr(_service(), service_name)(job_id)
        new_id = result.get("job_id") if isinstance(result, Mapping) else None
        if new_id and (new_id != job_id or result.get("recovery")):  # a restart: the job to follow
            return started(result, as_json=as_json, wait=wait or timeout is not None, timeout=timeout)
        acted_on(job_id, result, done, as_json=as_json, wait=wait, timeout=timeout)

    command.__doc__ = doc  # before the decorators: click reads the help from it
    command.__name__ = f"jobs_{name}"
    _command(jobs, name)(click.argument("job_id")(json_option(wait_options(command))))


_job_action("cancel", "cancel_job", "cancelled",
            "Cancel a job: steps not started never start, running ones stop at their next heartbeat.")
_job_action("retry", "retry_job", "retried: its steps waiting for a retry run now",
            "Run the job's steps that wait for a retry now instead of at their next attempt time.")
_job_action("restart", "restart_job", "restarted",
            "The way out of a failed or cancelled job, as its kind declares: resume the same job from the step "
            "where it stopped (protection, resync, reverse replication, disable: a copy resumes from its "
            "checkpoint), or start its operation again as a new job with the same parameters.")
