"""Jobs: creating them with their steps and locks, launching their stages, ending them, reading them.

A job is stages of steps (`StepSpec`), recorded with its locks in one transaction by `start_job` and sent
to the workers through the dispatcher (`workflows/engine/dispatch.py`). `launch` sends the remaining
stages from the first one not complete; `cancel`, `resume` and `retry_now` are the operator's verbs.
A job that ends settles once no step of it runs: its locks are released and its hooks become due.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlmodel import Session, select

from models.db import new_id, session_scope
from models.jobs import (
    ACTIVE_JOB_STATES,
    DONE_STEP_STATES,
    Job,
    JobLock,
    JobState,
    JobStep,
    StepState,
)
from workflows import clock
from workflows.engine.dispatch import DispatchError, StepMessage, dispatcher
from workflows.engine.errors import ItemBusyError, JobNotFoundError, JobStateError, class_name
from workflows.engine.registry import (
    registered_hooks,
)
from workflows.engine.specs import StepSpec, lock_keys_of, validate_job
from workflows.engine.statements import (
    job_after_step_succeeded_statement,
    settle_statement,
    update_rows,
)

logger = logging.getLogger(__name__)


# ---- building jobs ----------------------------------------------------------------------------------
def start_job(
    kind: str,
    *,
    lock_key: str | Sequence[str] | None,
    stages: Sequence[Sequence[StepSpec]],
    target: str | None = None,
    params: dict[str, Any] | None = None,
) -> str:
    """Create a job of `stages` holding `lock_key` (one key, several keys, or none), and launch it.
    Returns the job id.

    Every key is taken in the transaction that creates the job, or none is: while another job holds any
    of them, ItemBusyError names the first busy key (in the order given) and its holder, and nothing is
    created. The job lets go of all of them when it settles."""
    params = {} if params is None else params
    keys = lock_keys_of(lock_key)
    validate_job(kind, stages, target, params)
    # Two tries: a conflict whose holder has just let go is worth one more attempt.
    for _ in range(2):
        try:
            job_id, stamp, routes = _create_job(kind, keys, stages, target, params)
            break
        except sa.exc.IntegrityError:
            if not keys:
                raise
            busy = _first_busy_lock(keys)
            if busy is not None:
                key, holder = busy
                # One key is the item the job is about: the target names it best.
                if len(keys) == 1:
                    what = target or key
                else:
                    what = f"{target}: {key}" if target else key
                raise ItemBusyError(
                    f"{what} is busy with job {holder.id} ({holder.kind}, {holder.state.value})"
                ) from None
    else:
        what = target or ", ".join(keys)
        raise ItemBusyError(f"{what} is busy: its locks changed hands twice while starting {kind}")
    try:
        _send_stage(_messages(routes[0]), stamp)
    except DispatchError as exc:
        # The job is recorded; the reconciler launches it once the broker is back.
        logger.warning("job %s (%s) created but not launched yet: %s", job_id, kind, exc)
    return job_id


class StepRoute(NamedTuple):
    """Where a step's message goes."""

    id: str
    queue: str
    action: str


def _create_job(
    kind: str, lock_keys: list[str], stages: Sequence[Sequence[StepSpec]], target: str | None,
    params: dict[str, Any],
) -> tuple[str, datetime, list[list[StepRoute]]]:
    """Record the job, its locks and its steps, the first stage's steps already queued (as `launch`
    would mark them, in the same transaction). Returns the job id, the queued_at stamp of the first
    stage, and every stage's steps to send. IntegrityError, with nothing written, if a key is taken."""
    stamp = clock.now()
    routes = [[StepRoute(new_id(), spec.queue, spec.action) for spec in stage] for stage in stages]
    with session_scope() as session:
        job = Job(kind=kind, target=target, lock_key=lock_keys[0] if len(lock_keys) == 1 else None,
                  lock_keys=list(lock_keys), params=dict(params))
        session.add(job)
        session.flush()
        if lock_keys:
            session.connection().execute(sa.insert(JobLock.__table__), [
                {"lock_key": key, "job_id": job.id, "acquired_at": stamp} for key in lock_keys
            ])
        # One statement for all steps: building an ORM object per step costs more than inserting it.
        session.connection().execute(sa.insert(JobStep.__table__), [
            {"id": routes[stage_no][index].id, "job_id": job.id, "stage": stage_no, "index": index,
             "name": spec.name, "action": spec.action, "queue": spec.queue, "params": dict(spec.params),
             "state": StepState.queued if stage_no == 0 else StepState.pending,
             "queued_at": stamp if stage_no == 0 else None}
            for stage_no, stage in enumerate(stages) for index, spec in enumerate(stage)
        ])
        return job.id, stamp, routes


def _first_busy_lock(lock_keys: list[str]) -> tuple[str, Job] | None:
    """The first of `lock_keys` another job holds, and that job; None if all are free now."""
    with session_scope() as session:
        holders = dict(session.exec(select(JobLock.lock_key, JobLock.job_id).where(
            JobLock.lock_key.in_(lock_keys),
        )).all())
        for key in lock_keys:
            job = session.get(Job, holders[key]) if key in holders else None
            if job is not None:
                return key, job
    return None


# ---- launching --------------------------------------------------------------------------------------
def steps_of(session: Session, job_id: str) -> list[JobStep]:
    return list(session.exec(
        select(JobStep).where(JobStep.job_id == job_id).order_by(JobStep.stage, JobStep.index)
    ).all())


def _open_stages(steps: Sequence[JobStep]) -> list[list[JobStep]]:
    """The stages from the first one not complete, each with its steps not done yet."""
    stages = [list(stage) for _, stage in groupby(steps, key=lambda step: step.stage)]
    for stage_no, stage in enumerate(stages):
        if any(step.state not in DONE_STEP_STATES for step in stage):
            return [[step for step in later if step.state not in DONE_STEP_STATES] for later in stages[stage_no:]]
    return []


def retry_due(step: JobStep, now: datetime) -> bool:
    return step.state == StepState.waiting_retry and step.next_attempt_at is not None and step.next_attempt_at <= now


def _launchable(step: JobStep, now: datetime, resend_queued_before: datetime | None) -> bool:
    return (step.state == StepState.pending or retry_due(step, now)
            or (resend_queued_before is not None and step.state == StepState.queued
                and step.queued_at is not None and step.queued_at < resend_queued_before))


def launch(job_id: str, *, resend_queued_before: datetime | None = None) -> list[str]:
    """Send the steps of the job's first stage not complete that may run now: pending ones and retries due,
    and, with `resend_queued_before`, those queued before then (their message stalled: the reconciler's).
    Returns their ids (empty when there is nothing to send: finished, running, queued, waiting for a retry
    or for an operator). The stages after it follow as each completes (`advance`).

    A step queued since is not sent again: of two launches that both read a retry as due (two reconcilers
    side by side), the second finds it queued and sends nothing."""
    now = clock.now()
    with session_scope() as session:
        if existing_job(session, job_id).state not in ACTIVE_JOB_STATES:
            return []
        stages = _open_stages(steps_of(session, job_id))
        # Running steps belong to their runner; retries not due yet are the reconciler's to send later;
        # a step waiting for an operator is never sent again (`resume` completes it).
        candidates = [step.id for step in stages[0] if _launchable(step, now, resend_queued_before)] \
            if stages else []
        if not candidates:
            return []
        # Marked before sending, so no worker can claim a step before it is marked; only steps still
        # launchable are marked and sent (another launch or a duplicate message may have taken one meanwhile:
        # the condition is read again on the row as it is when this update writes it).
        stamp = clock.now()
        still_launchable = [
            JobStep.state == StepState.pending,
            sa.and_(JobStep.state == StepState.waiting_retry, JobStep.next_attempt_at <= now),
        ]
        if resend_queued_before is not None:
            still_launchable.append(sa.and_(JobStep.state == StepState.queued,
                                            JobStep.queued_at < resend_queued_before))
        session.exec(update_rows(JobStep).where(
            JobStep.id.in_(candidates), sa.or_(*still_launchable),
        ).values(state=StepState.queued, queued_at=stamp))
        first = list(session.exec(select(JobStep).where(
            JobStep.id.in_(candidates), JobStep.state == StepState.queued, JobStep.queued_at == stamp,
        ).order_by(JobStep.index)).all())
    if not first:
        return []
    _send_stage(_messages(first), stamp)
    return [step.id for step in first]


def advance(job_id: str, finished_stage: int) -> list[str]:
    """Send the next stage once `finished_stage` of the job is complete, whatever order its steps finished in
    and however often they were re-driven: called by every step that succeeds, after its commit (unless its
    own transaction already queued the stage: `queue_next_stage`). Of two steps finishing together at least
    one sees the stage complete (each looks after its own commit), and the conditional pending -> queued
    update lets only one of them send. Returns the ids of the steps sent."""
    with session_scope() as session:
        next_stage = queue_next_stage(session.connection(), job_id, finished_stage)
    return send_next_stage(job_id, next_stage)


@dataclass(frozen=True)
class NextStage:
    """What `queue_next_stage` left to do once its transaction commits: send `messages` (marked queued at
    `stamp`), or, after the job's last stage, end the job if its every step is done."""

    messages: list[StepMessage]
    stamp: datetime
    last_stage: bool


def queue_next_stage(connection: sa.Connection, job_id: str, finished_stage: int) -> NextStage | None:
    """In the caller's transaction: if `finished_stage` has no open step, mark the next stage's pending steps
    queued (one conditional UPDATE: of two callers only one gets the rows) and describe their messages;
    None while a step of the stage is open. `send_next_stage` does the rest after the commit."""
    open_steps = connection.execute(select(sa.func.count()).select_from(JobStep).where(
        JobStep.job_id == job_id, JobStep.stage == finished_stage, JobStep.state.not_in(DONE_STEP_STATES),
    )).scalar_one()
    if open_steps:
        return None
    active = sa.exists().where(Job.id == job_id, Job.state.in_(ACTIVE_JOB_STATES))
    stamp = clock.now()
    # all(): SQLite applies an UPDATE … RETURNING row by row as its rows are read.
    rows = connection.execute(sa.update(JobStep).where(
        JobStep.job_id == job_id, JobStep.stage == finished_stage + 1, JobStep.state == StepState.pending, active,
    ).values(state=StepState.queued, queued_at=stamp).returning(
        JobStep.index, JobStep.id, JobStep.queue, JobStep.action, JobStep.name, JobStep.attempts,
    )).all()
    last_stage = not rows and not connection.execute(select(sa.func.count()).select_from(JobStep).where(
        JobStep.job_id == job_id, JobStep.stage > finished_stage,
    )).scalar_one()
    # The messages' descriptions in this transaction, not in one of their own (_messages): one session
    # less on every step's path (the engine's overhead over a bare chain, docs/benchmarks.md).
    job = connection.execute(select(Job.kind, Job.params).where(Job.id == job_id)).first() if rows else None
    messages = [_message(StepRoute(step_id, queue, action), (name, attempts, job_id, *job) if job else None)
                for _, step_id, queue, action, name, attempts in sorted(rows)]
    return NextStage(messages, stamp, last_stage)


def send_next_stage(job_id: str, next_stage: NextStage | None) -> list[str]:
    """After the commit of `queue_next_stage`'s transaction: send the stage it queued (or end the job after
    its last stage). Returns the ids of the steps sent."""
    if next_stage is None:
        return []
    if next_stage.last_stage:
        finish_when_every_step_is_done(job_id)
        return []
    if next_stage.messages:
        try:
            _send_stage(next_stage.messages, next_stage.stamp)
        except DispatchError as exc:
            # Recorded as pending again: the reconciler sends it once the broker is back.
            logger.warning("next stage of job %s not sent yet: %s", job_id, exc)
            return []
    return [step.id for step in next_stage.messages]


def finish_when_every_step_is_done(job_id: str) -> bool:
    """End the active job whose every step is done, if the steps that completed it did not; True if this
    call ended it (its hooks dispatched). Two steps succeeding at once each checked for the end in its own
    transaction, where the other was still running (PostgreSQL's READ COMMITTED; SQLite runs one writer at
    a time), so neither ended it: this is called after both committed (by `advance`, and by the reconciler)."""
    with session_scope() as session:
        settled = finish_if_complete(session.connection(), job_id, clock.now())
    if settled:
        dispatch_hooks(job_id)
    return settled


def _send_stage(steps: list[StepMessage], stamp: datetime) -> None:
    """Send one stage's steps' messages, the steps marked queued at `stamp`."""
    try:
        dispatcher().send_stage(steps)
    except BaseException:
        # Nothing was sent: pending again, which the reconciler relaunches as a lost continuation.
        with session_scope() as session:
            session.exec(update_rows(JobStep).where(
                JobStep.id.in_([step.id for step in steps]), JobStep.state == StepState.queued,
                JobStep.queued_at == stamp,
            ).values(state=StepState.pending))
        raise


def _messages(steps: Sequence[JobStep | StepRoute]) -> list[StepMessage]:
    """The steps' messages, each described from its row and its job's (one read for the stage): what the
    worker logs and Flower show of a task besides its name."""
    try:
        with session_scope() as session:
            rows = session.exec(select(JobStep.id, JobStep.name, JobStep.attempts, Job.id, Job.kind, Job.params)
                                .join(Job, Job.id == JobStep.job_id)
                                .where(JobStep.id.in_([step.id for step in steps]))).all()
    except sa.exc.SQLAlchemyError as exc:
        # The description is for people: a step is sent all the same, unnamed.
        logger.warning("steps sent without their description (it could not be read): %s", exc)
        rows = []
    described = {step_id: (name, attempts, job_id, kind, params)
                 for step_id, name, attempts, job_id, kind, params in rows}
    return [_message(step, described.get(step.id)) for step in steps]


def _message(step: JobStep | StepRoute, description: tuple[str, int, str, str, Any] | None) -> StepMessage:
    """A step's message; `description` (its name, attempts so far, job id, job kind and params) names what it
    is about, or None: sent unnamed."""
    if description is None:
        return StepMessage(step.id, step.queue, step.action)
    name, attempts, job_id, kind, params = description
    params = params or {}
    return StepMessage(
        step.id, step.queue, step.action, job_id=job_id, job_kind=kind, vm=_text_or_none(params.get("vm")),
        plan=_text_or_none(params.get("plan")), step_name=name, attempt=attempts + 1,
    )


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def retry_now(job_id: str) -> list[str]:
    """Run the job's steps waiting for a retry now instead of at their scheduled time. Returns their ids:
    once they are due, a reconciler's tick may send them before this call's own launch does (which then
    finds them queued and sends nothing), and they are retried now all the same."""
    now = clock.now()
    with session_scope() as session:
        job = existing_job(session, job_id)
        if job.state not in ACTIVE_JOB_STATES:
            raise JobStateError(f"job {job_id} ({job.kind}) has {job.state.value}: there is nothing to retry")
        # all(): SQLite applies an UPDATE … RETURNING row by row as its rows are read.
        retried = session.connection().execute(sa.update(JobStep).where(
            JobStep.job_id == job_id, JobStep.state == StepState.waiting_retry,
        ).values(next_attempt_at=now).returning(JobStep.index, JobStep.id)).all()
        if not retried:
            raise JobStateError(f"job {job_id} ({job.kind}) has no step waiting for a retry")
    launch(job_id)
    return [step_id for _, step_id in sorted(retried)]


def reopen(job_id: str) -> list[str]:
    """Resume a failed or cancelled job from the step where it stopped, as the same job: it takes its locks
    again, the steps that failed or were cancelled become pending again (a poisoned step's deaths are
    forgotten: an operator decided to try again), and its first stage not complete is sent. Steps that
    succeeded are not run again, and a step resumes from its own checkpoints (a copy from the last chunk it
    recorded). Returns the ids of the steps sent.

    JobStateError unless the job failed or was cancelled and has settled (no step of it runs any more);
    ItemBusyError, changing nothing, while another job holds one of its locks. Hooks of its end not run yet
    are dropped (the job goes on instead); hooks running meanwhile roll back (`run_job_hooks` commits only
    while they are still due)."""
    now = clock.now()
    with session_scope() as session:
        job = existing_job(session, job_id)
        if job.state not in (JobState.failed, JobState.cancelled):
            raise JobStateError(f"job {job_id} ({job.kind}) is {job.state.value}: only a failed or cancelled job "
                                f"can be resumed")
        if job.settled_at is None:
            raise JobStateError(f"job {job_id} ({job.kind}) is still settling (a step of it is stopping): try "
                                f"again in a moment")
        keys = list(job.lock_keys)
        try:
            with session.begin_nested():
                if keys:
                    session.connection().execute(sa.insert(JobLock.__table__), [
                        {"lock_key": key, "job_id": job_id, "acquired_at": now} for key in keys])
        except sa.exc.IntegrityError:
            busy = _first_busy_lock(keys)
            holder = f"job {busy[1].id} ({busy[1].kind})" if busy else "another job"
            raise ItemBusyError(f"job {job_id} ({job.kind}) cannot resume: {busy[0] if busy else 'its lock'} "
                                f"is held by {holder}") from None
        reopened = session.exec(update_rows(Job).where(
            Job.id == job_id, Job.state.in_((JobState.failed, JobState.cancelled)),
        ).values(state=JobState.queued, ended_at=None, settled_at=None, error=None, error_class=None,
                 hook_pending=False, hook_error=None)).rowcount
        if not reopened:
            raise JobStateError(f"job {job_id} ({job.kind}) changed while resuming it: look again")
        session.exec(update_rows(JobStep).where(
            JobStep.job_id == job_id, JobStep.state.in_((StepState.failed, StepState.cancelled)),
        ).values(state=StepState.pending, deaths=0, lease=None, queued_at=None, next_attempt_at=None,
                 ended_at=None, error=None, error_class=None))
    logger.info("job %s (%s) resumed from where it stopped", job_id, job.kind)
    try:
        return launch(job_id)
    except DispatchError as exc:
        logger.warning("job %s resumed but not launched yet (the reconciler will): %s", job_id, exc)
        return []


def resume(job_id: str, *, note: str = "") -> list[str]:
    """An operator did what the job's manual steps asked: every step of the job waiting for an operator
    succeeds, its result {"resumed": True, "note": note, "resumed_at": <ISO time>}. If that was the job's
    last work it succeeds (and its hooks run); otherwise its next stages are launched. Returns the ids of
    the steps resumed.

    JobStateError when no step of the job waits for an operator; of two concurrent resumes one gets it
    (the steps change in one conditional UPDATE, which only one of them can make)."""
    if not isinstance(note, str):
        raise ValueError(f"the note of a resume must be text, not {type(note).__name__}")
    now = clock.now()
    with session_scope() as session:
        job = existing_job(session, job_id)
        if job.state not in ACTIVE_JOB_STATES:
            raise JobStateError(
                f"job {job_id} ({job.kind}) has {job.state.value}: it has no step waiting for an operator"
            )
        job_active = sa.exists().where(Job.id == job_id, Job.state.in_(ACTIVE_JOB_STATES))
        connection = session.connection()
        resumed = list(connection.execute(update_rows(JobStep).where(
            JobStep.job_id == job_id, JobStep.state == StepState.waiting_action, job_active,
        ).values(
            state=StepState.succeeded, ended_at=now,
            result={"resumed": True, "note": note, "resumed_at": now.isoformat()},
        ).returning(JobStep.id)).scalars().all())
        if not resumed:
            raise JobStateError(f"job {job_id} ({job.kind}) has no step waiting for an operator")
        settled = finish_if_complete(connection, job_id, now)
    logger.info("job %s (%s) resumed by an operator (steps %s)%s", job_id, job.kind, ", ".join(resumed),
                f": {note}" if note else "")
    if settled:
        dispatch_hooks(job_id)
        return resumed
    try:
        launch(job_id)
    except DispatchError as exc:
        # The resume is recorded; the reconciler launches the next stage once the broker is back.
        logger.warning("job %s resumed but its next steps not launched yet: %s", job_id, exc)
    return resumed


def existing_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id}")
    return job

# ---- ending jobs ------------------------------------------------------------------------------------
def stop_remaining_steps(session: Session, job_id: str, now: datetime) -> None:
    """A job that ended early: steps not started will not start; running ones lose their lease and stop
    at their next heartbeat or progress report."""
    session.exec(update_rows(JobStep).where(
        JobStep.job_id == job_id,
        JobStep.state.in_((StepState.pending, StepState.queued, StepState.waiting_retry, StepState.waiting_action)),
    ).values(state=StepState.cancelled, ended_at=now))
    session.exec(update_rows(JobStep).where(
        JobStep.job_id == job_id, JobStep.state == StepState.running,
    ).values(lease=None))


def fail_job(session: Session, job_id: str, error: str, error_class: str) -> bool:
    """Fail the job (if still active). Returns whether it settled now (its hooks are due)."""
    now = clock.now()
    failed = session.exec(update_rows(Job).where(Job.id == job_id, Job.state.in_(ACTIVE_JOB_STATES)).values(
        state=JobState.failed, ended_at=now, error=error, error_class=error_class,
    )).rowcount
    if failed:
        stop_remaining_steps(session, job_id, now)
    return settle(session.connection(), job_id)


def finish_if_complete(connection: sa.Connection, job_id: str, now: datetime) -> bool:
    """The job succeeds when its last step does. Returns whether it settled now (hooks due)."""
    states = connection.execute(job_after_step_succeeded_statement(),
                                {"finished_job_id": job_id, "finished_now": now}).scalars().all()
    return states == [JobState.succeeded] and settle(connection, job_id)


def settle(connection: sa.Connection, job_id: str) -> bool:
    """Once a finished job has no step running: release its lock and make its hooks due. True if this
    call did it (the caller dispatches the hooks after committing)."""
    settled = connection.execute(settle_statement(), {"settle_job_id": job_id, "settle_now": clock.now()}).rowcount
    if settled:
        connection.execute(sa.delete(JobLock).where(JobLock.job_id == job_id))
    return bool(settled)


def dispatch_hooks(job_id: str) -> None:
    try:
        dispatcher().dispatch_hooks(job_id)
    except DispatchError as exc:
        logger.warning("hooks of job %s not dispatched (the reconciler will run them): %s", job_id, exc)


class _HooksAlreadyRan(Exception):
    """Another run of the same hooks committed first: this run's changes are rolled back."""


def run_job_hooks(job_id: str) -> bool:
    """Run the hooks of a settled job whose hooks are due, together with the record that they ran.
    Returns True if they ran and committed."""
    try:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None or not job.hook_pending:
                return False
            for hook in registered_hooks.get((job.kind, job.state), ()):
                hook(job, session)
            done = session.exec(update_rows(Job).where(Job.id == job_id, Job.hook_pending.is_(True)).values(
                hook_pending=False, hook_error=None,
            )).rowcount
            if not done:
                raise _HooksAlreadyRan()
    except _HooksAlreadyRan:
        return False
    except Exception as exc:  # noqa: BLE001 - recorded on the job; the reconciler runs the hooks again
        logger.exception("hooks of job %s failed", job_id)
        with session_scope() as session:
            session.exec(update_rows(Job).where(Job.id == job_id).values(hook_error=f"{class_name(type(exc))}: {exc}"))
        return False
    return True


def cancel(job_id: str) -> None:
    """Cancel the job: steps not started never start, running steps stop at their next heartbeat or
    progress report, and the job's cancel hooks run once nothing of it is running."""
    now = clock.now()
    with session_scope() as session:
        job = existing_job(session, job_id)
        if job.state == JobState.cancelled:
            return
        cancelled = session.exec(update_rows(Job).where(Job.id == job_id, Job.state.in_(ACTIVE_JOB_STATES)).values(
            state=JobState.cancelled, ended_at=now,
        )).rowcount
        if not cancelled:
            raise JobStateError(f"job {job_id} ({job.kind}) has already ended: {job.state.value}")
        stop_remaining_steps(session, job_id, now)
        settled = settle(session.connection(), job_id)
    if settled:
        dispatch_hooks(job_id)

# ---- reading ----------------------------------------------------------------------------------------
def _plain(row: Job | JobStep) -> dict[str, Any]:
    plain: dict[str, Any] = {}
    for name, value in row.model_dump().items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, (JobState, StepState)):
            value = value.value
        plain[name] = value
    return plain


def get_job(job_id: str) -> dict[str, Any]:
    """The job and its steps (in order) as plain JSON-ready dicts, as of one moment."""
    for _ in range(_CONSISTENT_READ_TRIES):
        with session_scope() as session:
            # SQLite runs each SELECT on its own (no read transaction), so a step can be read after a
            # commit the job row was read before: read the job again and start over if it moved.
            job = _plain(existing_job(session, job_id))
            steps = [_plain(step) for step in steps_of(session, job_id)]
            again = session.exec(select(Job.state, Job.error).where(Job.id == job_id)).one()
            if (again[0].value, again[1]) == (job["state"], job["error"]):
                break
    return {**job, "steps": steps}


_CONSISTENT_READ_TRIES = 5

