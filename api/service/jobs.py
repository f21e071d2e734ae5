"""Jobs: listing them, a job's live view and its snapshots as it runs, and what an operator does to one
(cancel, retry now, resume after a manual step, restart a failed or cancelled one)."""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import redis
import sqlalchemy as sa
from sqlmodel import select

from models.db import session_scope
from models.jobs import ACTIVE_JOB_STATES, FINISHED_JOB_STATES, Job, JobState, JobStep, StepState
from models.plans import get_plan
from workflows import engine, jobkind
from workflows.progress import job_progress, percent_of

from .errors import Conflict, Invalid, _operation
from .lookups import _int_option, _item_of, _name, _vm
from .presenters import _job_ref, _job_summary

MAX_JOB_LIMIT = 1000
MAX_WATCH_S = 7 * 24 * 3600
"""The longest a watch of a job's events may be asked to last (a week: longer than any job's steps run)."""


def _check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not job_id or len(job_id) > 36 or "/" in job_id or "\\" in job_id:
        raise Invalid(f"a job id is the text a job was started with, got {job_id!r}")
    return job_id


@_operation
def list_jobs(*, state: str | None = None, kind: str | None = None, vm: str | None = None,
              plan: str | None = None, limit: int = 50) -> list[dict]:
    """Jobs, newest first: state, kind, the VM and the recovery plan (its runs) filter them; at most `limit`
    (1-1000)."""
    limit = _int_option("limit", limit)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_JOB_LIMIT:
        raise Invalid(f"limit must be a whole number from 1 to {MAX_JOB_LIMIT}, got {limit!r}")
    if state is not None and state not in {s.value for s in JobState}:
        raise Invalid(f"job state must be one of {', '.join(s.value for s in JobState)}, got {state!r}")
    if kind is not None and (not isinstance(kind, str) or len(kind) > 64):
        raise Invalid(f"job kind must be a job kind such as 'enable_protection', got {kind!r}")
    with session_scope() as session:
        query = select(Job)
        if state is not None:
            query = query.where(Job.state == JobState(state))
        if kind is not None:
            query = query.where(Job.kind == kind)
        if vm is not None:
            row = _vm(session, vm)
            item = _item_of(session, row)
            if item is None:
                return []
            query = query.where(Job.target == item.id)
        if plan is not None:
            query = query.where(Job.target == get_plan(session, _name(plan, "recovery plan")).id)
        jobs = session.exec(query.order_by(Job.created_at.desc(), Job.id).limit(limit)).all()
        counts: dict[str, dict[str, int]] = {}
        if jobs:
            for job_id, step_state, count in session.exec(
                    select(JobStep.job_id, JobStep.state, sa.func.count())
                    .where(JobStep.job_id.in_([job.id for job in jobs]))
                    .group_by(JobStep.job_id, JobStep.state)).all():
                counts.setdefault(job_id, {})[StepState(step_state).value] = count
        return [_job_summary(job, counts.get(job.id, {})) for job in jobs]


def _live_progress(job_id: str) -> dict[str, dict[str, Any]]:
    try:
        return job_progress(job_id)
    except (redis.RedisError, OSError, ValueError):
        # Redis holds the live view only; the database has each step's progress as of its last heartbeat.
        return {}


def _job_view(job_id: str) -> dict[str, Any]:
    job = engine.get_job(_check_job_id(job_id))
    live = _live_progress(job_id)
    steps = []
    done_total = [0, 0]
    for step in job["steps"]:
        step = {key: value for key, value in step.items() if key != "lease"}
        record = live.get(step["id"])
        done, total = step["progress_done"], step["progress_total"]
        if record is not None and (record.get("total", 0), record.get("done", 0)) >= (total, done):
            done, total = record["done"], record["total"]
        finished = step["state"] in (StepState.succeeded.value, StepState.skipped.value)
        percent = 100.0 if finished else (percent_of(done, total) if total else 0.0)
        step["progress"] = {"done": done, "total": total, "percent": percent,
                            "updated": record.get("updated") if record else None}
        steps.append(step)
        done_total[0] += percent
        done_total[1] += 100
    job["steps"] = steps
    job["vm"] = job["params"].get("vm")
    job["plan"] = job["params"].get("plan")
    job["percent"] = round(done_total[0] / done_total[1] * 100, 1) if done_total[1] else 0.0
    job["finished"] = job["state"] in {state.value for state in FINISHED_JOB_STATES}
    job["next_attempt_at"] = min((s["next_attempt_at"] for s in steps if s["state"] == StepState.waiting_retry.value
                                  and s["next_attempt_at"]), default=None)
    job["waiting_for"] = [{"step": s["name"], "instructions": s["instructions"]}
                          for s in steps if s["state"] == StepState.waiting_action.value]
    return job


@_operation
def show_job(job_id: str) -> dict:
    """The job with its steps (state, attempts, errors, next attempt time, manual instructions) and each step's
    live progress; `percent` is the job's, `finished` whether it has ended."""
    return _job_view(job_id)


@_operation
def cancel_job(job_id: str) -> dict:
    """Cancel the job: steps not started never start, running ones stop at their next heartbeat."""
    engine.cancel(_check_job_id(job_id))
    job = engine.get_job(job_id)
    return {"job_id": job_id, "kind": job["kind"], "state": job["state"], "vm": job["params"].get("vm")}


@_operation
def retry_job(job_id: str) -> dict:
    """Run the job's steps waiting for a retry now rather than at their scheduled time."""
    launched = engine.retry_now(_check_job_id(job_id))
    job = engine.get_job(job_id)
    return {"job_id": job_id, "kind": job["kind"], "state": job["state"], "vm": job["params"].get("vm"),
            "launched_steps": list(launched)}


@_operation
def resume_job(job_id: str, note: str = "") -> dict:
    """An operator did what the job's manual step asked: the job goes on."""
    if not isinstance(note, str) or len(note) > 4096:
        raise Invalid("a resume note is text of at most 4096 characters")
    resumed = engine.resume(_check_job_id(job_id), note=note)
    job = engine.get_job(job_id)
    return {"job_id": job_id, "kind": job["kind"], "state": job["state"], "vm": job["params"].get("vm"),
            "resumed_steps": list(resumed)}


@_operation
def restart_job(job_id: str) -> dict:
    """The way out of a failed or cancelled job, as its kind declares (`workflows.jobkind.recover`): resume
    the same job from the step where it stopped (the replication kinds: a poisoned copy resumes from its
    checkpoint), or start its operation again as a new job with the same request (failovers, plans,
    cycles). The answer says which (`recovery`)."""
    job = engine.get_job(_check_job_id(job_id))
    if job["state"] not in (JobState.failed.value, JobState.cancelled.value):
        raise Conflict(f"job {job_id} ({job['kind']}) is {job['state']}: only a failed or cancelled job can be "
                       f"restarted" + (" (cancel it first)" if job["state"] in
                                       {state.value for state in ACTIVE_JOB_STATES} else ""))
    recovery = jobkind.recover(job)
    return _job_ref(recovery.job_id, job["kind"], job["params"].get("vm"), restarted_from=job_id,
                    plan=job["params"].get("plan"), recovery=recovery.how)


def _snapshot(job: Mapping[str, Any]) -> dict[str, Any]:
    """What a watcher sees of a job: its state and each step's state and progress."""
    return {
        "job_id": job["id"], "kind": job["kind"], "vm": job["vm"], "state": job["state"],
        "finished": job["finished"], "percent": job["percent"], "error": job["error"],
        "next_attempt_at": job["next_attempt_at"], "waiting_for": job["waiting_for"],
        "steps": [{"id": s["id"], "name": s["name"], "stage": s["stage"], "state": s["state"],
                   "attempts": s["attempts"], "error": s["error"], "next_attempt_at": s["next_attempt_at"],
                   "progress": {k: s["progress"][k] for k in ("done", "total", "percent")}}
                  for s in job["steps"]],
    }


@_operation
def job_snapshot(job_id: str) -> dict:
    """What a watcher sees of the job now: {job_id, kind, vm, state, finished, percent, error, next_attempt_at,
    waiting_for, steps: [{id, name, stage, state, attempts, error, next_attempt_at, progress}]}."""
    return _snapshot(_job_view(job_id))


def check_watch(interval: Any, timeout: Any) -> None:
    """Invalid unless `interval` and `timeout` are what job_events takes."""
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.05 <= interval <= 60:
        raise Invalid(f"interval must be 0.05 to 60 seconds, got {interval!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= MAX_WATCH_S):
        raise Invalid(f"timeout must be a positive number of seconds, at most {MAX_WATCH_S}, got {timeout!r}")


def job_events(job_id: str, *, interval: float = 0.5, timeout: float | None = None,
               repeat_after: float = 15.0) -> Iterator[dict]:
    """Snapshots of the job ({job_id, kind, vm, state, finished, percent, error, steps: [{name, state,
    progress}]}) as it changes, polled every `interval` s, until it has finished (that snapshot is the last)
    or `timeout` s have passed. An unchanged snapshot is repeated after `repeat_after` s, so a stream of them
    stays alive through proxies. NotFound at once for an unknown job."""
    check_watch(interval, timeout)
    first = job_snapshot(job_id)  # raises NotFound before the caller starts streaming

    def follow() -> Iterator[dict]:
        deadline = None if timeout is None else time.monotonic() + timeout
        current = first
        yield current
        last_sent = time.monotonic()
        while not current["finished"]:
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(interval)
            latest = job_snapshot(job_id)
            if latest != current or time.monotonic() - last_sent >= repeat_after:
                current = latest
                last_sent = time.monotonic()
                yield current

    return follow()

