"""The reconciler (run by beat): re-drives what lost messages and dead workers left behind.

Its decisions are pure functions of the rows it reads (`relaunch_reason`, `stale_step_outcome`), so they
are unit-tested without workers; acting on them goes through the same conditional updates as everything
else, so two reconcilers at once are harmless.
"""
from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta
from itertools import groupby

import sqlalchemy as sa
from sqlmodel import select

from models.db import session_scope
from models.jobs import ACTIVE_JOB_STATES, DONE_STEP_STATES, FINISHED_JOB_STATES, Job, JobStep, StepState
from workflows import clock
from workflows.engine.dispatch import dispatcher
from workflows.engine.errors import PoisonStepError, class_name, poison_reason
from workflows.engine.jobs import (
    dispatch_hooks,
    fail_job,
    finish_when_every_step_is_done,
    launch,
    retry_due,
    run_job_hooks,
    settle,
)
from workflows.engine.statements import update_rows
from workflows.settings import EngineSettings

logger = logging.getLogger(__name__)


def reconcile() -> dict[str, int]:
    """Re-drive what lost messages and dead workers left behind. Returns what it did."""
    settings = EngineSettings.from_env()
    now = clock.now()
    stale_before = now - timedelta(seconds=settings.stale_after_s)
    report: Counter[str] = Counter()
    with session_scope() as session:
        stale = session.exec(select(JobStep.id).where(
            JobStep.state == StepState.running, JobStep.heartbeat_at < stale_before,
        )).all()
    for step_id in stale:
        report[_recover_stale_step(step_id, stale_before, settings)] += 1
    with session_scope() as session:
        jobs = session.exec(select(Job).where(Job.state.in_(ACTIVE_JOB_STATES))).all()
        steps = session.exec(select(JobStep).where(JobStep.job_id.in_([job.id for job in jobs])).order_by(
            JobStep.job_id, JobStep.stage, JobStep.index,
        )).all() if jobs else []
    steps_by_job = {job_id: list(job_steps) for job_id, job_steps in groupby(steps, key=lambda s: s.job_id)}
    stalled_before = now - timedelta(seconds=settings.queued_stall_s)
    for job in jobs:
        job_steps = steps_by_job.get(job.id, [])
        reason = relaunch_reason(job, job_steps, now, settings)
        if reason and launch(job.id, resend_queued_before=stalled_before):
            report[reason] += 1
        elif job_steps and all(step.state in DONE_STEP_STATES for step in job_steps) \
                and finish_when_every_step_is_done(job.id):
            # Every step done, the job still active: the steps' own ends missed it (see the function).
            report["finished"] += 1
    with session_scope() as session:
        unhooked = session.exec(select(Job.id).where(
            Job.hook_pending.is_(True), Job.settled_at < stale_before,
        )).all()
    for job_id in unhooked:
        report["hooks_run" if run_job_hooks(job_id) else "hooks_failed"] += 1
    return dict(report)


def relaunch_reason(job: Job, steps: list[JobStep], now: datetime, settings: EngineSettings) -> str | None:
    """Why the active `job` (its steps in stage order) must be launched again now, or None: a retry is due,
    a queued message stalled past the stall limit, or a stage's messages were never sent (a lost
    continuation)."""
    stages = [list(stage) for _, stage in groupby(steps, key=lambda step: step.stage)]
    stalled_before = now - timedelta(seconds=settings.queued_stall_s)
    # Only the first stage not complete is looked at: a stage whose step waits for an operator (or a
    # retry not due yet) holds the later ones back, and their pending steps are not a lost continuation.
    for stage_no, stage in enumerate(stages):
        if all(step.state in DONE_STEP_STATES for step in stage):
            continue
        if any(retry_due(step, now) for step in stage):
            return "retry_due"
        if any(step.state == StepState.queued and step.queued_at < stalled_before for step in stage):
            return "queued_stalled"
        if any(step.state == StepState.pending for step in stage):
            # No message was ever sent for it: the step that completed the stage before it died before
            # sending it, or the broker refused it. Give the engine a moment to send it before concluding
            # that.
            ended = [step.ended_at for step in stages[stage_no - 1]] if stage_no else []
            since = max(ended) if ended else job.created_at
            if since < now - timedelta(seconds=settings.stale_after_s):
                return "continuation_lost"
        return None
    return None


def stale_step_outcome(job_finished: bool, deaths: int, settings: EngineSettings, *, broker_lost: bool = False) -> str:
    """What becomes of a running step whose worker vanished: it just stops when its job is over; it runs
    again, counted as interrupted, when the worker had lost its broker connection (`broker_lost`: the
    outage ended the run, not the step); otherwise, counting this as its `deaths`-th death, it fails as a
    poison message after too many deaths, or runs again."""
    if job_finished:
        return "stopped"
    if broker_lost:
        return "relaunched_interrupted"
    if deaths >= settings.max_step_deaths:
        return "poisoned"
    return "relaunched_stale"


def _recover_stale_step(step_id: str, stale_before: datetime, settings: EngineSettings) -> str:
    """A running step whose heartbeat stopped: its worker vanished. Run it again elsewhere, or fail it
    as a poison message after too many deaths, or (job already over) just record that it stopped."""
    now = clock.now()
    with session_scope() as session:
        step = session.get(JobStep, step_id)
        if step is None or step.state != StepState.running:
            return "raced"
        job = session.get(Job, step.job_id)
        still_stale = sa.and_(
            JobStep.id == step_id, JobStep.state == StepState.running, JobStep.heartbeat_at < stale_before,
            JobStep.lease.is_(None) if step.lease is None else JobStep.lease == step.lease,
        )
        broker_lost = step.broker_lost_at is not None
        deaths = step.deaths + (0 if broker_lost else 1)
        outcome = stale_step_outcome(job.state in FINISHED_JOB_STATES, deaths, settings, broker_lost=broker_lost)
        if outcome == "stopped":
            changed = session.exec(update_rows(JobStep).where(still_stale).values(
                state=StepState.cancelled, ended_at=now, lease=None,
            )).rowcount
            settled = bool(changed) and settle(session.connection(), job.id)
        elif outcome == "poisoned":
            reason = poison_reason(deaths)
            error_class = class_name(PoisonStepError)
            changed = session.exec(update_rows(JobStep).where(still_stale).values(
                state=StepState.failed, deaths=deaths, ended_at=now, lease=None, error=reason,
                error_class=error_class,
            )).rowcount
            settled = bool(changed) and fail_job(session, job.id, f"{step.name} failed: {reason}", error_class)
        elif outcome == "relaunched_interrupted":
            # broker_lost_at stays: it says why the step runs again, until its next claim clears it.
            # Pending, for `launch` below to queue and send (it sends no step that is queued already).
            changed = session.exec(update_rows(JobStep).where(still_stale).values(
                state=StepState.pending, interruptions=JobStep.interruptions + 1, lease=None, queued_at=None,
            )).rowcount
            settled = False
        else:
            changed = session.exec(update_rows(JobStep).where(still_stale).values(
                state=StepState.pending, deaths=deaths, lease=None, queued_at=None,
            )).rowcount
            settled = False
    if not changed:
        return "raced"
    if settled:
        dispatch_hooks(job.id)
    if step.celery_task_id is not None and outcome != "stopped":
        # No worker reports how the dead run's task ended: the reconciler does.
        dispatcher().report_lost_run(step.celery_task_id, failed=outcome == "poisoned",
                                     reason=poison_reason(deaths) if outcome == "poisoned" else
                                     f"{step.name}: its worker died while running it; the engine runs it again")
    if outcome == "relaunched_stale":
        logger.warning("step %s (%s) of job %s lost its worker (death %d); relaunching", step_id, step.name,
                       job.id, deaths)
        launch(job.id)
    elif outcome == "relaunched_interrupted":
        logger.warning("step %s (%s) of job %s lost its worker during a broker outage (since %s, interruption "
                       "%d); relaunching", step_id, step.name, job.id, step.broker_lost_at, step.interruptions + 1)
        launch(job.id)
    return outcome

