"""The conditional statements the engine decides by, built once with bind parameters.

Every state change of a step or a job is one conditional UPDATE whose row count says who won: building a
statement with its subqueries costs more than SQLite takes to run it, so they are built once
(`functools.cache`) and run on a Connection (an ORM Session adds as much again, for objects nobody needs).
"""
from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from models.jobs import ACTIVE_JOB_STATES, DONE_STEP_STATES, FINISHED_JOB_STATES, Job, JobState, JobStep, StepState


def update_rows(model: type) -> sa.Update:
    # Conditional updates decide by rowcount; there are no loaded objects to keep in sync.
    return sa.update(model).execution_options(synchronize_session=False)


_STEP = JobStep.__table__
_JOB = Job.__table__


def _param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    # Names differ from column names: SQLAlchemy keeps those for the SET clause's own parameters.
    return sa.bindparam(name, type_=column.type)


def _one_of(column: sa.Column[Any], states: Sequence[enum.Enum]) -> sa.ColumnElement[bool]:
    # Equalities rather than IN: an IN list is rendered into the SQL again at every execution.
    return sa.or_(*(column == state for state in states))


def _step_has(state: StepState) -> sa.Exists:
    return sa.exists().where(_STEP.c.job_id == _JOB.c.id, _STEP.c.state == state)


def _job_state_value(state: JobState) -> sa.ColumnElement[Any]:
    return sa.literal(state, type_=_JOB.c.state.type)


# An active job is running while any step runs; else waiting_action while any step waits for an operator,
# ahead of waiting_retry, because a retry comes due by itself and an operator's action does not: the job
# list must show the job someone has to act on. A job whose operator wait is over is running again
# (its next steps are queued); otherwise the state stays as it is (queued, or between stages).
def _refreshed_job_state() -> sa.ColumnElement[Any]:
    return sa.case(
        (_step_has(StepState.running), _job_state_value(JobState.running)),
        (_step_has(StepState.waiting_action), _job_state_value(JobState.waiting_action)),
        (_step_has(StepState.waiting_retry), _job_state_value(JobState.waiting_retry)),
        (_JOB.c.state == JobState.waiting_action, _job_state_value(JobState.running)),
        else_=_JOB.c.state,
    )


@functools.cache
def claim_statement() -> sa.Update:
    """The claim (see `_claim`): the step's row as claimed, or no row."""
    step = _STEP.c
    now, task_id = _param("claim_now", step.started_at), _param("claim_task_id", step.celery_task_id)
    predecessor = _STEP.alias("predecessor")
    unfinished_predecessor = sa.exists().where(
        predecessor.c.job_id == step.job_id, predecessor.c.stage < step.stage,
        ~_one_of(predecessor.c.state, DONE_STEP_STATES),
    )
    job_active = sa.exists().where(_JOB.c.id == step.job_id, _one_of(_JOB.c.state, ACTIVE_JOB_STATES))
    claimable = sa.and_(
        sa.or_(
            _one_of(step.state, (StepState.pending, StepState.queued)),
            sa.and_(step.state == StepState.waiting_retry, step.next_attempt_at <= now),
            # The broker redelivered the very message whose run died (acks late, reject on worker lost).
            # Only once its heartbeat is stale: Celery may also deliver a copy of a message whose run is
            # alive, and two runs of one step must never overlap.
            sa.and_(step.state == StepState.running, step.celery_task_id == task_id,
                    step.heartbeat_at < _param("claim_stale_before", step.heartbeat_at)),
        ),
        job_active,
        ~unfinished_predecessor,
    )
    return sa.update(_STEP).where(step.id == _param("claim_step_id", step.id), claimable).values(
        state=StepState.running, lease=_param("claim_lease", step.lease), attempts=step.attempts + 1,
        # SET sees the row as it was: a step still marked running died under its last runner; a death
        # while that runner's worker had lost its broker connection is an outage's doing, not the step's.
        deaths=step.deaths + sa.case((sa.and_(step.state == StepState.running, step.broker_lost_at.is_(None)), 1),
                                     else_=0),
        interruptions=step.interruptions + sa.case(
            (sa.and_(step.state == StepState.running, step.broker_lost_at.is_not(None)), 1), else_=0),
        broker_lost_at=None,
        started_at=now, heartbeat_at=now, ended_at=None, worker=_param("claim_worker", step.worker),
        celery_task_id=task_id,
    ).returning(step.id, step.job_id, step.stage, step.name, step.action, step.params, step.attempts, step.deaths,
                step.queue)


@functools.cache
def job_started_statement() -> sa.Update:
    """After a claim: the job is running (if still active) and has started. A job already running and
    started is not written at all, which spares most claims a row write."""
    job = _JOB.c
    active = _one_of(job.state, ACTIVE_JOB_STATES)
    return sa.update(_JOB).where(
        job.id == _param("started_job_id", job.id),
        sa.or_(sa.and_(active, job.state != JobState.running), job.started_at.is_(None)),
    ).values(
        state=sa.case((active, _job_state_value(JobState.running)), else_=job.state),
        started_at=sa.func.coalesce(job.started_at, _param("started_now", job.started_at)),
    )


@functools.cache
def heartbeat_statement() -> sa.Update:
    step = _STEP.c
    return sa.update(_STEP).where(
        step.id == _param("beat_step_id", step.id), step.lease == _param("beat_lease", step.lease),
        step.state == StepState.running,
    ).values(heartbeat_at=_param("beat_now", step.heartbeat_at), progress_done=_param("beat_done", step.progress_done),
             progress_total=_param("beat_total", step.progress_total))


def _owned_by_run() -> sa.ColumnElement[bool]:
    step = _STEP.c
    return sa.and_(step.id == _param("owned_step_id", step.id), step.lease == _param("owned_lease", step.lease),
                   step.state == StepState.running)


@functools.cache
def step_succeeded_statement() -> sa.Update:
    step = _STEP.c
    return sa.update(_STEP).where(_owned_by_run()).values(
        state=StepState.succeeded, result=_param("succeeded_result", step.result),
        ended_at=_param("succeeded_now", step.ended_at), lease=None, error=None, error_class=None, broker_lost_at=None,
        progress_done=_param("succeeded_done", step.progress_done),
        progress_total=_param("succeeded_total", step.progress_total),
    )


@functools.cache
def job_after_step_succeeded_statement() -> sa.Update:
    """After a step succeeded, an active job succeeds if that was its last step, else its state is
    refreshed (`_refreshed_job_state`); the row is written only when that changes it. Returns the job's
    new state."""
    job = _JOB.c
    complete = ~sa.exists().where(_STEP.c.job_id == job.id, ~_one_of(_STEP.c.state, DONE_STEP_STATES))
    new_state = sa.case((complete, _job_state_value(JobState.succeeded)), else_=_refreshed_job_state())
    return sa.update(_JOB).where(
        job.id == _param("finished_job_id", job.id), _one_of(job.state, ACTIVE_JOB_STATES), job.state != new_state,
    ).values(
        state=new_state,
        ended_at=sa.case((complete, _param("finished_now", job.ended_at)), else_=job.ended_at),
        error=sa.case((complete, sa.null()), else_=job.error),
        error_class=sa.case((complete, sa.null()), else_=job.error_class),
    ).returning(job.state)


@functools.cache
def job_state_refresh_statement() -> sa.Update:
    """`_refreshed_job_state` of an active job, written only when it changes the state."""
    job = _JOB.c
    return sa.update(_JOB).where(
        job.id == _param("refresh_job_id", job.id), _one_of(job.state, ACTIVE_JOB_STATES),
        job.state != _refreshed_job_state(),
    ).values(state=_refreshed_job_state())


@functools.cache
def settle_statement() -> sa.Update:
    job = _JOB.c
    return sa.update(_JOB).where(
        job.id == _param("settle_job_id", job.id), _one_of(job.state, FINISHED_JOB_STATES), job.settled_at.is_(None),
        ~_step_has(StepState.running),
    ).values(settled_at=_param("settle_now", job.settled_at), hook_pending=True)


def refresh_job_state(connection: sa.Connection, job_id: str) -> None:
    connection.execute(job_state_refresh_statement(), {"refresh_job_id": job_id})

