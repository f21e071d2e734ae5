"""The durable job engine: jobs of steps in stages, launched as Celery canvases, driven by the database.

The database is the source of truth; Redis carries messages and live progress only. Every state change
is one conditional UPDATE, so duplicate messages, redeliveries and concurrent reconcilers are harmless:
whoever wins the UPDATE owns the step, everyone else stands back.

- `start_job` writes the job, its steps (the first stage's marked queued, as `launch` would) and its
  lock in one transaction, then sends the job's canvas.
- `launch` sends `chain(stage_k, stage_k+1, ...)` from the first stage not yet complete: a one-step stage
  is one `run_step` message, a larger one a group (a group followed by a task is a chord).
- `execute_step` (behind the `run_step` task) claims the step, keeps a heartbeat while the action runs,
  and records the outcome: succeeded (the chain goes on), waiting_retry (recoverable: the reconciler
  runs it again on the long schedule), waiting_action (a manual action: the job waits, holding its
  locks, until `resume`), or failed (the job fails and its hooks run).
- `reconcile` (run by beat) re-drives whatever a lost message, a dead worker or a broken chord left behind.

A step is `queued` once a message for it was sent to the broker; steps of later stages stay `pending`
until the chain reaches them, which is what lets the reconciler tell a lost continuation from a slow one.
Steps already done are left out of a relaunched canvas: the canvas only ever holds work still to do.
"""
from __future__ import annotations

import enum
import functools
import importlib
import json
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any, NamedTuple

import kombu.exceptions
import redis
import sqlalchemy as sa
from celery import chain, group
from celery.canvas import Signature
from sqlmodel import Session, select

from datapath.errors import NonRecoverableError
from models.db import get_engine, new_id, session_scope, validate_name
from models.jobs import (
    ACTIVE_JOB_STATES,
    DONE_STEP_STATES,
    FINISHED_JOB_STATES,
    Job,
    JobLock,
    JobState,
    JobStep,
    StepState,
)
from worker import app
from workflows import clock
from workflows.progress import percent_of, publish_progress
from workflows.retry import in_call_retrying, is_recoverable, next_attempt_delay
from workflows.settings import env_number

__all__ = [
    "StepSpec", "StepContext", "StepOutcome", "EngineSettings",
    "ItemBusyError", "JobNotFoundError", "JobStateError", "PoisonStepError", "StepCancelled", "AwaitingOperator",
    "action", "job_hook", "import_action_modules",
    "start_job", "launch", "retry_now", "resume", "cancel", "reconcile", "get_job",
    "execute_step", "run_job_hooks", "forget_result_waiters",
]

logger = logging.getLogger(__name__)

RUN_STEP_TASK = "asr.engine.run_step"
"""The generic step task (any action); jobs send each step as the task named after its action."""
STEP_TASK_PREFIX = "asr."
RECONCILE_TASK = "asr.engine.reconcile"
RUN_JOB_HOOKS_TASK = "asr.engine.run_job_hooks"
ORCHESTRATION_QUEUE = "orchestration"
RECOVERY_QUEUE = "recovery"
HOST_QUEUE_PREFIX = "host."
ACTION_MODULES_ENV = "ASR_ACTION_MODULES"
# Live progress goes to Redis (and as a task event) at most this often, and always when a step finishes.
PROGRESS_PUBLISH_INTERVAL_S = 0.5

ActionFn = Callable[..., dict[str, Any] | None]
HookFn = Callable[[Job, Session], None]
EventEmitter = Callable[..., Any]

_actions: dict[str, ActionFn] = {}
_action_listeners: list[Callable[[str], None]] = []
_job_hooks: dict[tuple[str, JobState], list[HookFn]] = defaultdict(list)


# ---- errors ---------------------------------------------------------------------------------------
class ItemBusyError(NonRecoverableError):
    """Another job holds the lock this job needs (one workflow at a time per protected item)."""


class JobNotFoundError(NonRecoverableError):
    """No job has this id."""


class JobStateError(NonRecoverableError):
    """The job is not in a state that allows the operation."""


class PoisonStepError(NonRecoverableError):
    """A step's worker died too many times while running it: the step itself is the likely cause."""


class StepCancelled(Exception):
    """Raised inside a running action once its run lost the lease: the job was cancelled or failed, or
    the step was handed to another worker. The action must stop; nothing it does now is recorded."""


class AwaitingOperator(Exception):
    """Raised by an action that is a manual step: `raise AwaitingOperator("Switch DNS to the recovery
    site, then resume")`. Not an error: the step waits (waiting_action, its instructions recorded) and
    the job with it, keeping its locks, until `resume` marks the step done or `cancel` ends the job.
    The action is not run again: resuming is what completes it."""

    def __init__(self, instructions: str) -> None:
        if not isinstance(instructions, str) or not instructions.strip():
            raise ValueError(f"a manual action must say what the operator is to do, not {instructions!r}")
        super().__init__(instructions)
        self.instructions = instructions


# ---- settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    heartbeat_s: float  # how often a running step proves it is alive
    stale_after_s: float  # a heartbeat older than this means the worker vanished
    max_step_deaths: int  # a step whose worker died this many times fails as a poison message
    queued_stall_s: float  # a message queued this long without a claim is presumed lost

    @classmethod
    def from_env(cls) -> EngineSettings:
        heartbeat_s = env_number("ASR_HEARTBEAT_S", 10.0, minimum=0.05)
        return cls(
            heartbeat_s=heartbeat_s,
            stale_after_s=env_number("ASR_STALE_AFTER_S", 3 * heartbeat_s, minimum=heartbeat_s),
            max_step_deaths=int(env_number("ASR_MAX_STEP_DEATHS", 3, minimum=1)),
            queued_stall_s=env_number("ASR_QUEUED_STALL_S", 600.0, minimum=1.0),
        )


# ---- registries -------------------------------------------------------------------------------------
def action(name: str) -> Callable[[ActionFn], ActionFn]:
    """Register `fn(ctx, **params) -> dict | None` as the action `name` steps refer to.

    Actions must be idempotent: a rerun after a crash finds its work done, or resumes from a checkpoint."""

    def register(fn: ActionFn) -> ActionFn:
        existing = _actions.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(
                f"action {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        _actions[name] = fn
        if existing is None:
            for listener in _action_listeners:
                listener(name)
        return fn

    return register


def step_task_name(action_name: str) -> str:
    """The Celery task a step of `action_name` runs as: what Flower and the worker logs show, e.g.
    `asr.replication.copy_disk`."""
    return f"{STEP_TASK_PREFIX}{action_name}"


def is_step_task(task_name: str) -> bool:
    return task_name == RUN_STEP_TASK or (task_name.startswith(STEP_TASK_PREFIX) and task_name[len(STEP_TASK_PREFIX):]
                                          in _actions)


def on_action_registered(listener: Callable[[str], None]) -> None:
    """Call `listener(name)` for every action registered so far and every one registered later (the
    worker registers a Celery task per action this way)."""
    _action_listeners.append(listener)
    for name in list(_actions):
        listener(name)


def job_hook(kind: str, outcome: str) -> Callable[[HookFn], HookFn]:
    """Register `fn(job, session)` to run when a job of `kind` ends `outcome` ("succeeded", "failed" or
    "cancelled").

    Hooks run on an orchestration worker once no step of the job is running any more, in one
    transaction with the record that they ran; a hook that raises is retried by the reconciler, so
    hooks must be idempotent."""
    state = JobState(outcome)
    if state not in FINISHED_JOB_STATES:
        raise ValueError(f"job hooks run when a job ends: {outcome!r} is not succeeded, failed or cancelled")

    def register(fn: HookFn) -> HookFn:
        if fn not in _job_hooks[(kind, state)]:
            _job_hooks[(kind, state)].append(fn)
        return fn

    return register


def import_action_modules() -> list[str]:
    """Import the modules named in `ASR_ACTION_MODULES` (comma-separated), which register actions and hooks."""
    names = [name.strip() for name in os.environ.get(ACTION_MODULES_ENV, "").split(",") if name.strip()]
    for name in names:
        importlib.import_module(name)
    return names


# ---- building jobs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSpec:
    name: str  # what the Jobs tab shows, e.g. "Copy disk disk0"
    action: str  # a registered action name
    queue: str  # "orchestration", "recovery" or "host.<hostname>"
    params: dict[str, Any] = field(default_factory=dict)  # ids, never data


def validate_queue(queue: object) -> str:
    if queue in (ORCHESTRATION_QUEUE, RECOVERY_QUEUE):
        return queue
    if isinstance(queue, str) and queue.startswith(HOST_QUEUE_PREFIX):
        validate_name(queue[len(HOST_QUEUE_PREFIX):], "host")
        return queue
    raise ValueError(f"queue {queue!r} is not 'orchestration', 'recovery' or 'host.<hostname>'")


def _require_json_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict of ids and settings, not {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serializable: {exc}") from None
    return value


def _require_text(value: object, what: str, max_length: int) -> str:
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ValueError(f"{what} must be a non-empty string of at most {max_length} characters, not {value!r}")
    return value


def _lock_keys(lock_key: object) -> list[str]:
    """`start_job`'s lock_key as the list of keys to take: none, one, or several (in order, each once:
    a plan naming an item twice still holds its one lock)."""
    if lock_key is None:
        return []
    if isinstance(lock_key, str):
        return [_require_text(lock_key, "lock key", 255)]
    if not isinstance(lock_key, Sequence):
        raise ValueError(f"lock_key must be a string, a sequence of strings or None, not {type(lock_key).__name__}")
    return list(dict.fromkeys(_require_text(key, "lock key", 255) for key in lock_key))


def _validate_job(kind: object, stages: object, target: object, params: object) -> None:
    _require_text(kind, "job kind", 64)
    if target is not None:
        _require_text(target, "job target", 255)
    _require_json_object(params, "job params")
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError(f"a {kind} job needs at least one stage of steps")
    for stage_no, stage in enumerate(stages):
        if not isinstance(stage, (list, tuple)) or not stage:
            raise ValueError(f"stage {stage_no} of the {kind} job has no steps")
        for index, spec in enumerate(stage):
            where = f"stage {stage_no} step {index}"
            if not isinstance(spec, StepSpec):
                raise ValueError(f"{where} is a {type(spec).__name__}, not a StepSpec")
            where = f"{where} ({spec.name!r})"
            _require_text(spec.name, f"the name of {where}", 255)
            if spec.action not in _actions:
                raise ValueError(f"{where}: no action is registered as {spec.action!r}")
            try:
                validate_queue(spec.queue)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            _require_json_object(spec.params, f"the params of {where}")


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
    keys = _lock_keys(lock_key)
    _validate_job(kind, stages, target, params)
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
        _send_canvas(routes, stamp)
    except (kombu.exceptions.OperationalError, redis.RedisError, OSError) as exc:
        # The job is recorded; the reconciler launches it once the broker is back.
        logger.warning("job %s (%s) created but not launched yet: %s", job_id, kind, exc)
    return job_id


class _StepRoute(NamedTuple):
    """Where a step's message goes."""

    id: str
    queue: str
    action: str


def _create_job(
    kind: str, lock_keys: list[str], stages: Sequence[Sequence[StepSpec]], target: str | None,
    params: dict[str, Any],
) -> tuple[str, datetime, list[list[_StepRoute]]]:
    """Record the job, its locks and its steps, the first stage's steps already queued (as `launch`
    would mark them, in the same transaction). Returns the job id, the queued_at stamp of the first
    stage, and every stage's steps to send. IntegrityError, with nothing written, if a key is taken."""
    stamp = clock.now()
    routes = [[_StepRoute(new_id(), spec.queue, spec.action) for spec in stage] for stage in stages]
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
def _update(model: type) -> sa.Update:
    # Conditional updates decide by rowcount; there are no loaded objects to keep in sync.
    return sa.update(model).execution_options(synchronize_session=False)


def _steps_of(session: Session, job_id: str) -> list[JobStep]:
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


def _due(step: JobStep, now: datetime) -> bool:
    return step.state == StepState.waiting_retry and step.next_attempt_at is not None and step.next_attempt_at <= now


def _launchable(step: JobStep, now: datetime) -> bool:
    return step.state in (StepState.pending, StepState.queued) or _due(step, now)


def _run_step_signature(step: JobStep | _StepRoute) -> Signature:
    # The database holds every step's outcome: no result is stored for anyone to wait on (a chord
    # still counts its members, which does not depend on stored results).
    return app.signature(step_task_name(step.action), args=(step.id,), immutable=True, queue=step.queue,
                         ignore_result=True)


def _stage_signature(steps: Sequence[JobStep | _StepRoute]) -> Signature:
    signatures = [_run_step_signature(step) for step in steps]
    return signatures[0] if len(signatures) == 1 else group(signatures)


STAGE_BARRIER_TASK = "asr.engine.stage_barrier"


def _chain_links(stages: Sequence[Sequence[JobStep | _StepRoute]]) -> list[Signature]:
    """The stages as chain links, with a no-op barrier task between two parallel stages: Celery turns a
    group followed by a group into a chord whose body it may deliver once per header member (celery
    issues 8180, 8662), and every copy would carry the rest of the chain along."""
    links: list[Signature] = []
    for number, stage in enumerate(stages):
        if number and len(stage) > 1 and len(stages[number - 1]) > 1:
            links.append(app.signature(STAGE_BARRIER_TASK, immutable=True, queue=ORCHESTRATION_QUEUE,
                                       ignore_result=True))
        links.append(_stage_signature(stage))
    return links


def launch(job_id: str) -> list[str]:
    """Send the job's remaining stages as one canvas. Returns the ids of the steps of its first stage
    that were sent (empty when there is nothing to send: finished, running, waiting for a retry or for
    an operator)."""
    now = clock.now()
    with session_scope() as session:
        if _existing_job(session, job_id).state not in ACTIVE_JOB_STATES:
            return []
        stages = _open_stages(_steps_of(session, job_id))
        # Running steps belong to their runner; retries not due yet are the reconciler's to send later;
        # a step waiting for an operator is never sent again (`resume` completes it).
        candidates = [step.id for step in stages[0] if _launchable(step, now)] if stages else []
        if not candidates:
            return []
        # Marked before sending, so no worker can claim a step before it is marked; only steps still
        # launchable are marked and sent (a duplicate message may have claimed one meanwhile).
        stamp = clock.now()
        session.exec(_update(JobStep).where(
            JobStep.id.in_(candidates),
            sa.or_(
                JobStep.state.in_((StepState.pending, StepState.queued)),
                sa.and_(JobStep.state == StepState.waiting_retry, JobStep.next_attempt_at <= now),
            ),
        ).values(state=StepState.queued, queued_at=stamp))
        first = list(session.exec(select(JobStep).where(
            JobStep.id.in_(candidates), JobStep.state == StepState.queued, JobStep.queued_at == stamp,
        ).order_by(JobStep.index)).all())
    if not first:
        return []
    _send_canvas([first, *stages[1:]], stamp)
    return [step.id for step in first]


def _send_canvas(stages: Sequence[Sequence[JobStep | _StepRoute]], stamp: datetime) -> None:
    """Send `chain(stage, ...)`: the first stage's steps were marked queued at `stamp`."""
    try:
        chain(*_chain_links(stages)).apply_async()
    except BaseException:
        # Nothing was sent: pending again, which the reconciler relaunches as a lost continuation.
        with session_scope() as session:
            session.exec(_update(JobStep).where(
                JobStep.id.in_([step.id for step in stages[0]]), JobStep.state == StepState.queued,
                JobStep.queued_at == stamp,
            ).values(state=StepState.pending))
        raise
    forget_result_waiters()


def forget_result_waiters() -> None:
    """Drop the result waiters Celery holds in this process.

    A process that freezes a group (one sending a canvas with a parallel stage, or a worker continuing
    into one) keeps a waiter and a Redis subscription per member until the member's result arrives.
    run_step stores no result, so none ever does, and both would pile up with every parallel stage.
    Nothing in the engine waits on a Celery result (the database is the record), so all of them go.
    Result backends that do not push results (pending_results absent) keep none."""
    backend = app.backend
    pending = getattr(backend, "_pending_results", None)
    if pending is None:
        return
    for by_task in pending:  # held strongly, and weakly
        for waiters in list(by_task.values()):
            for waiter in list(waiters.values()):
                backend.remove_pending_result(waiter)


def retry_now(job_id: str) -> list[str]:
    """Run the job's steps waiting for a retry now instead of at their scheduled time."""
    now = clock.now()
    with session_scope() as session:
        job = _existing_job(session, job_id)
        if job.state not in ACTIVE_JOB_STATES:
            raise JobStateError(f"job {job_id} ({job.kind}) has {job.state.value}: there is nothing to retry")
        retried = session.exec(_update(JobStep).where(
            JobStep.job_id == job_id, JobStep.state == StepState.waiting_retry,
        ).values(next_attempt_at=now)).rowcount
        if not retried:
            raise JobStateError(f"job {job_id} ({job.kind}) has no step waiting for a retry")
    return launch(job_id)


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
        job = _existing_job(session, job_id)
        if job.state not in ACTIVE_JOB_STATES:
            raise JobStateError(
                f"job {job_id} ({job.kind}) has {job.state.value}: it has no step waiting for an operator"
            )
        job_active = sa.exists().where(Job.id == job_id, Job.state.in_(ACTIVE_JOB_STATES))
        connection = session.connection()
        resumed = list(connection.execute(_update(JobStep).where(
            JobStep.job_id == job_id, JobStep.state == StepState.waiting_action, job_active,
        ).values(
            state=StepState.succeeded, ended_at=now,
            result={"resumed": True, "note": note, "resumed_at": now.isoformat()},
        ).returning(JobStep.id)).scalars().all())
        if not resumed:
            raise JobStateError(f"job {job_id} ({job.kind}) has no step waiting for an operator")
        settled = _finish_if_complete(connection, job_id, now)
    logger.info("job %s (%s) resumed by an operator (steps %s)%s", job_id, job.kind, ", ".join(resumed),
                f": {note}" if note else "")
    if settled:
        _dispatch_hooks(job_id)
        return resumed
    try:
        launch(job_id)
    except (kombu.exceptions.OperationalError, redis.RedisError, OSError) as exc:
        # The resume is recorded; the reconciler launches the next stage once the broker is back.
        logger.warning("job %s resumed but its next steps not launched yet: %s", job_id, exc)
    return resumed


def _existing_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id}")
    return job


# ---- running one step -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepOutcome:
    advance: bool  # the step is done: the canvas may go on to what follows it
    state: StepState | None  # the step's state as this run left it (None: the step does not exist)


class StepContext:
    """What an action gets besides its params: who it is, progress reporting, the database, the clock."""

    def __init__(
        self, *, job_id: str, step_id: str, step_name: str, attempt: int, emit_event: EventEmitter
    ) -> None:
        self.job_id = job_id
        self.step_id = step_id
        self.step_name = step_name
        self.attempt = attempt
        self.clock = clock
        self._emit_event = emit_event
        self._revoked = threading.Event()
        self._progress_lock = threading.Lock()
        self._done = 0
        self._total = 0
        self._published_at = float("-inf")

    def session(self) -> AbstractContextManager[Session]:
        return session_scope()

    def progress(self, done: int, total: int) -> None:
        """Report progress; raises StepCancelled once this run lost its lease (cancel, takeover)."""
        if self._revoked.is_set():
            raise StepCancelled(f"step {self.step_name!r} of job {self.job_id} was cancelled or taken over")
        if not (isinstance(done, int) and isinstance(total, int) and 0 <= done and 0 <= total):
            raise ValueError(f"progress of step {self.step_name!r} must be counts >= 0, got {done!r}/{total!r}")
        with self._progress_lock:
            self._done, self._total = done, total
        moment = time.monotonic()
        if done < total and moment - self._published_at < PROGRESS_PUBLISH_INTERVAL_S:
            return
        self._published_at = moment
        self._publish(done, total)

    def progress_snapshot(self) -> tuple[int, int]:
        with self._progress_lock:
            return self._done, self._total

    def revoke(self) -> None:
        self._revoked.set()

    def _publish(self, done: int, total: int) -> None:
        # Live progress is a convenience: Redis being away must not fail the step it describes.
        try:
            publish_progress(self.job_id, self.step_id, name=self.step_name, done=done, total=total,
                             updated=clock.now())
        except redis.RedisError as exc:
            logger.warning("progress of step %s not published to Redis: %s", self.step_id, exc)
        try:
            # Not "name": Flower takes an event's name field as the task's name.
            self._emit_event(job_id=self.job_id, step=self.step_id, step_name=self.step_name, done=done,
                             total=total, percent=percent_of(done, total))
        except Exception as exc:  # noqa: BLE001 - a lost progress event must never fail the step
            logger.warning("task-progress event of step %s not sent: %s", self.step_id, exc)


class _Heartbeats:
    """Stamps heartbeat_at (and the latest progress) of every step this process runs, from one thread
    started with the process's first step: starting and stopping a thread per step would cost more than
    a short step itself. A step's context is revoked as soon as the step is no longer its run's, or when
    the run could not prove itself alive for as long as the reconciler waits before taking it over."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._watched: dict[str, _Beat] = {}  # by lease
        self._thread: threading.Thread | None = None
        # When the thread wakes next: a step due later needs no wake-up call. Idle, it still wakes every
        # heartbeat interval, so a step watched meanwhile (due one interval after) needs none either.
        self._wake_at = float("inf")
        self._idle_interval_s = float("inf")

    def watch(self, step_id: str, lease: str, context: StepContext, settings: EngineSettings) -> _Beat:
        beat = _Beat(step_id, lease, context, settings, due=time.monotonic() + settings.heartbeat_s)
        with self._changed:
            self._watched[lease] = beat
            self._idle_interval_s = settings.heartbeat_s
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="step-heartbeats", daemon=True)
                self._thread.start()
            elif beat.due < self._wake_at:
                self._changed.notify()
        return beat

    def unwatch(self, beat: _Beat) -> None:
        """No heartbeat of this run starts once this returns; one being written meanwhile is harmless:
        it is conditional on the lease, which the run's outcome clears."""
        with self._changed:
            self._watched.pop(beat.lease, None)
            beat.stopped = True

    def _run(self) -> None:
        while True:
            with self._changed:
                moment = time.monotonic()
                due = [beat for beat in self._watched.values() if beat.due <= moment]
                if not due:
                    self._wake_at = min((beat.due for beat in self._watched.values()),
                                        default=moment + self._idle_interval_s)
                    self._changed.wait(self._wake_at - moment)
                    continue
            for beat in due:
                try:
                    held = beat.write()
                except Exception:  # noqa: BLE001 - the thread beats for every step: it must outlive one's bug
                    logger.exception("heartbeat of step %s failed", beat.step_id)
                    held = True
                if not held:
                    with self._changed:
                        self._watched.pop(beat.lease, None)


class _Beat:
    """One running step's heartbeat."""

    def __init__(self, step_id: str, lease: str, context: StepContext, settings: EngineSettings,
                 *, due: float) -> None:
        self.step_id = step_id
        self.lease = lease
        self.due = due
        self.stopped = False
        self._context = context
        self._settings = settings
        self._last_beat = time.monotonic()

    def write(self) -> bool:
        """Stamp the heartbeat; False (and the context revoked) once the run lost the step, or could not
        prove itself alive for as long as the reconciler waits."""
        self.due = time.monotonic() + self._settings.heartbeat_s
        done, total = self._context.progress_snapshot()
        try:
            with get_engine().begin() as connection:
                held = connection.execute(_heartbeat_statement(), {
                    "beat_step_id": self.step_id, "beat_lease": self.lease, "beat_now": clock.now(),
                    "beat_done": done, "beat_total": total,
                }).rowcount
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("heartbeat of step %s not recorded: %s", self.step_id, exc)
            if time.monotonic() - self._last_beat >= self._settings.stale_after_s and not self.stopped:
                self._context.revoke()
                return False
            return True
        if not held:
            if not self.stopped:
                self._context.revoke()
            return False
        self._last_beat = time.monotonic()
        return True


_heartbeats = _Heartbeats()


def _forget_inherited_heartbeats() -> None:
    # A forked worker child has none of its parent's threads: it starts its own with its first step.
    global _heartbeats
    _heartbeats = _Heartbeats()


os.register_at_fork(after_in_child=_forget_inherited_heartbeats)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _poison_reason(deaths: int) -> str:
    return f"worker died {deaths} times while running this step (poison message?)"


# Built once with bind parameters: building a statement with its subqueries costs more than SQLite takes to
# run it. They run on a Connection: an ORM Session adds as much again, for objects nobody needs here.
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
def _claim_statement() -> sa.Update:
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
        # SET sees the row as it was: a step still marked running died under its last runner.
        deaths=step.deaths + sa.case((step.state == StepState.running, 1), else_=0),
        started_at=now, heartbeat_at=now, ended_at=None, worker=_param("claim_worker", step.worker),
        celery_task_id=task_id,
    ).returning(step.id, step.job_id, step.name, step.action, step.params, step.attempts, step.deaths)


@functools.cache
def _job_started_statement() -> sa.Update:
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
def _heartbeat_statement() -> sa.Update:
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
def _step_succeeded_statement() -> sa.Update:
    step = _STEP.c
    return sa.update(_STEP).where(_owned_by_run()).values(
        state=StepState.succeeded, result=_param("succeeded_result", step.result),
        ended_at=_param("succeeded_now", step.ended_at), lease=None, error=None, error_class=None,
        progress_done=_param("succeeded_done", step.progress_done),
        progress_total=_param("succeeded_total", step.progress_total),
    )


@functools.cache
def _job_after_step_succeeded_statement() -> sa.Update:
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
def _job_state_refresh_statement() -> sa.Update:
    """`_refreshed_job_state` of an active job, written only when it changes the state."""
    job = _JOB.c
    return sa.update(_JOB).where(
        job.id == _param("refresh_job_id", job.id), _one_of(job.state, ACTIVE_JOB_STATES),
        job.state != _refreshed_job_state(),
    ).values(state=_refreshed_job_state())


@functools.cache
def _settle_statement() -> sa.Update:
    job = _JOB.c
    return sa.update(_JOB).where(
        job.id == _param("settle_job_id", job.id), _one_of(job.state, FINISHED_JOB_STATES), job.settled_at.is_(None),
        ~_step_has(StepState.running),
    ).values(settled_at=_param("settle_now", job.settled_at), hook_pending=True)


def _refresh_job_state(connection: sa.Connection, job_id: str) -> None:
    connection.execute(_job_state_refresh_statement(), {"refresh_job_id": job_id})


@dataclass(frozen=True)
class _ClaimedStep:
    """A step as its claim left it."""

    id: str
    job_id: str
    name: str
    action: str
    params: dict[str, Any]
    attempts: int
    deaths: int


def _claim(step_id: str, *, task_id: str, worker: str, lease: str, stale_after_s: float) -> _ClaimedStep | None:
    """Make this run the step's owner with ONE conditional UPDATE (pending, queued, a retry now due, or
    running under this very Celery task with a stale heartbeat: a redelivery after its runner died), or
    return None if it may not run now."""
    now = clock.now()
    with get_engine().begin() as connection:
        # all(): SQLite applies an UPDATE … RETURNING row by row as its rows are read.
        rows = connection.execute(_claim_statement(), {
            "claim_step_id": step_id, "claim_task_id": task_id, "claim_now": now, "claim_lease": lease,
            "claim_worker": worker, "claim_stale_before": now - timedelta(seconds=stale_after_s),
        }).all()
        if not rows:
            return None
        step = _ClaimedStep(*rows[0])
        connection.execute(_job_started_statement(), {"started_job_id": step.job_id, "started_now": now})
        return step


def _owned(step_id: str, lease: str) -> sa.ColumnElement[bool]:
    return sa.and_(JobStep.id == step_id, JobStep.lease == lease, JobStep.state == StepState.running)


def execute_step(step_id: str, *, task_id: str, worker: str, emit_event: EventEmitter) -> StepOutcome:
    """Claim the step, run its action with a heartbeat, record the outcome."""
    settings = EngineSettings.from_env()
    lease = new_id()
    step = _claim(step_id, task_id=task_id, worker=worker, lease=lease, stale_after_s=settings.stale_after_s)
    if step is None:
        return _unclaimed(step_id)
    if step.deaths >= settings.max_step_deaths:
        return _fail_step(step, lease, _poison_reason(step.deaths), _class_name(PoisonStepError))
    fn = _actions.get(step.action)
    if fn is None:
        return _fail_step(step, lease, f"no action is registered as {step.action!r} on worker {worker}",
                          _class_name(NonRecoverableError))
    context = StepContext(job_id=step.job_id, step_id=step.id, step_name=step.name, attempt=step.attempts,
                          emit_event=emit_event)
    beat = _heartbeats.watch(step.id, lease, context, settings)
    try:
        try:
            result = in_call_retrying()(_call_action, fn, context, step.params)
        finally:
            _heartbeats.unwatch(beat)
    except StepCancelled:
        return _stand_down(step)
    except AwaitingOperator as request:
        return _await_operator(step, lease, request.instructions)
    except Exception as exc:  # noqa: BLE001 - classified below: recoverable, or a failure to look at
        if is_recoverable(exc):
            logger.warning("step %s (%s) failed, will retry: %s", step.id, step.name, exc)
            return _wait_for_retry(step, lease, exc)
        if isinstance(exc, NonRecoverableError):
            logger.warning("step %s (%s) failed: %s", step.id, step.name, exc)
        else:
            logger.exception("step %s (%s) failed with an unexpected error", step.id, step.name)
        return _fail_step(step, lease, _error_text(exc), _class_name(type(exc)))
    return _succeed_step(step, lease, result, context.progress_snapshot())


def _call_action(fn: ActionFn, context: StepContext, params: dict[str, Any]) -> dict[str, Any] | None:
    result = fn(context, **params)
    if result is not None:
        _require_json_object(result, f"the result of action {fn.__module__}.{fn.__qualname__}")
    return result


def refuse_unknown_step_task(step_id: str, task_name: str, worker: str) -> bool:
    """A worker received a step's message for a task it does not have (its action's module is not loaded
    there): the step fails non-recoverably, naming both, instead of the message being lost silently.
    Returns whether the step was failed now."""
    error = (f"worker {worker} has no task {task_name!r}: the module registering action "
             f"{task_name[len(STEP_TASK_PREFIX):]!r} is not loaded there (ASR_ACTION_MODULES)")
    error_class = _class_name(NonRecoverableError)
    with session_scope() as session:
        step = session.get(JobStep, step_id)
        if step is None:
            return False
        failed = session.exec(_update(JobStep).where(
            JobStep.id == step_id, JobStep.state.in_((StepState.pending, StepState.queued)),
        ).values(state=StepState.failed, ended_at=clock.now(), error=error, error_class=error_class)).rowcount
        settled = bool(failed) and _fail_job(session, step.job_id, f"{step.name} failed: {error}", error_class)
    if settled:
        _dispatch_hooks(step.job_id)
    return bool(failed)


def _unclaimed(step_id: str) -> StepOutcome:
    with session_scope() as session:
        step = session.get(JobStep, step_id)
    if step is None:
        logger.warning("run_step for unknown step %s ignored", step_id)
        return StepOutcome(advance=False, state=None)
    # Done already (a redelivery after a crash just after the commit): the canvas must still go on.
    return StepOutcome(advance=step.state in DONE_STEP_STATES, state=step.state)


def _succeed_step(
    step: _ClaimedStep, lease: str, result: dict[str, Any] | None, progress: tuple[int, int]
) -> StepOutcome:
    now = clock.now()
    with get_engine().begin() as connection:
        recorded = connection.execute(_step_succeeded_statement(), {
            "owned_step_id": step.id, "owned_lease": lease, "succeeded_result": result, "succeeded_now": now,
            "succeeded_done": progress[0], "succeeded_total": progress[1],
        }).rowcount
        settled = bool(recorded) and _finish_if_complete(connection, step.job_id, now)
    if not recorded:
        return _stand_down(step)
    if settled:
        _dispatch_hooks(step.job_id)
    return StepOutcome(advance=True, state=StepState.succeeded)


def _finish_if_complete(connection: sa.Connection, job_id: str, now: datetime) -> bool:
    """The job succeeds when its last step does. Returns whether it settled now (hooks due)."""
    states = connection.execute(_job_after_step_succeeded_statement(),
                                {"finished_job_id": job_id, "finished_now": now}).scalars().all()
    return states == [JobState.succeeded] and _settle(connection, job_id)


def _wait_for_retry(step: _ClaimedStep, lease: str, exc: BaseException) -> StepOutcome:
    now = clock.now()
    next_attempt_at = now + timedelta(seconds=clock.scaled(next_attempt_delay(step.attempts)))
    with session_scope() as session:
        recorded = session.exec(_update(JobStep).where(_owned(step.id, lease)).values(
            state=StepState.waiting_retry, next_attempt_at=next_attempt_at, ended_at=now, lease=None,
            error=_error_text(exc), error_class=_class_name(type(exc)),
        )).rowcount
        if recorded:
            session.exec(_update(Job).where(Job.id == step.job_id, Job.state.in_(ACTIVE_JOB_STATES)).values(
                error=f"{step.name}: {_error_text(exc)}", error_class=_class_name(type(exc)),
            ))
            _refresh_job_state(session.connection(), step.job_id)
    if not recorded:
        return _stand_down(step)
    return StepOutcome(advance=False, state=StepState.waiting_retry)


def _await_operator(step: _ClaimedStep, lease: str, instructions: str) -> StepOutcome:
    """A manual action: the step waits for `resume` with its instructions; the canvas stops here (resume
    launches what follows)."""
    now = clock.now()
    with session_scope() as session:
        recorded = session.exec(_update(JobStep).where(_owned(step.id, lease)).values(
            state=StepState.waiting_action, instructions=instructions, ended_at=now, lease=None,
            next_attempt_at=None, error=None, error_class=None,
        )).rowcount
        if recorded:
            _refresh_job_state(session.connection(), step.job_id)
    if not recorded:
        return _stand_down(step)
    logger.info("step %s (%s) of job %s waits for an operator: %s", step.id, step.name, step.job_id, instructions)
    return StepOutcome(advance=False, state=StepState.waiting_action)


def _fail_step(step: _ClaimedStep, lease: str, error: str, error_class: str) -> StepOutcome:
    now = clock.now()
    with session_scope() as session:
        recorded = session.exec(_update(JobStep).where(_owned(step.id, lease)).values(
            state=StepState.failed, ended_at=now, lease=None, error=error, error_class=error_class,
        )).rowcount
        settled = recorded and _fail_job(session, step.job_id, f"{step.name} failed: {error}", error_class)
    if not recorded:
        return _stand_down(step)
    if settled:
        _dispatch_hooks(step.job_id)
    return StepOutcome(advance=False, state=StepState.failed)


def _stand_down(step: _ClaimedStep) -> StepOutcome:
    """This run lost its lease. If the job was cancelled or failed meanwhile, the step ends cancelled
    here; if another run took the step over, that run records it."""
    with session_scope() as session:
        job_finished = sa.exists().where(Job.id == JobStep.job_id, Job.state.in_(FINISHED_JOB_STATES))
        stopped = session.exec(_update(JobStep).where(
            JobStep.id == step.id, JobStep.state == StepState.running, JobStep.lease.is_(None), job_finished,
        ).values(state=StepState.cancelled, ended_at=clock.now())).rowcount
        settled = bool(stopped) and _settle(session.connection(), step.job_id)
        state = session.get(JobStep, step.id).state
    if settled:
        _dispatch_hooks(step.job_id)
    return StepOutcome(advance=False, state=state)


# ---- ending jobs ------------------------------------------------------------------------------------
def _stop_remaining_steps(session: Session, job_id: str, now: datetime) -> None:
    """A job that ended early: steps not started will not start; running ones lose their lease and stop
    at their next heartbeat or progress report."""
    session.exec(_update(JobStep).where(
        JobStep.job_id == job_id,
        JobStep.state.in_((StepState.pending, StepState.queued, StepState.waiting_retry, StepState.waiting_action)),
    ).values(state=StepState.cancelled, ended_at=now))
    session.exec(_update(JobStep).where(
        JobStep.job_id == job_id, JobStep.state == StepState.running,
    ).values(lease=None))


def _fail_job(session: Session, job_id: str, error: str, error_class: str) -> bool:
    """Fail the job (if still active). Returns whether it settled now (its hooks are due)."""
    now = clock.now()
    failed = session.exec(_update(Job).where(Job.id == job_id, Job.state.in_(ACTIVE_JOB_STATES)).values(
        state=JobState.failed, ended_at=now, error=error, error_class=error_class,
    )).rowcount
    if failed:
        _stop_remaining_steps(session, job_id, now)
    return _settle(session.connection(), job_id)


def _settle(connection: sa.Connection, job_id: str) -> bool:
    """Once a finished job has no step running: release its lock and make its hooks due. True if this
    call did it (the caller dispatches the hooks after committing)."""
    settled = connection.execute(_settle_statement(), {"settle_job_id": job_id, "settle_now": clock.now()}).rowcount
    if settled:
        connection.execute(sa.delete(JobLock).where(JobLock.job_id == job_id))
    return bool(settled)


def _dispatch_hooks(job_id: str) -> None:
    try:
        app.signature(
            RUN_JOB_HOOKS_TASK, args=(job_id,), immutable=True, queue=ORCHESTRATION_QUEUE, ignore_result=True,
        ).apply_async()
    except (kombu.exceptions.OperationalError, redis.RedisError, OSError) as exc:
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
            for hook in _job_hooks.get((job.kind, job.state), ()):
                hook(job, session)
            done = session.exec(_update(Job).where(Job.id == job_id, Job.hook_pending.is_(True)).values(
                hook_pending=False, hook_error=None,
            )).rowcount
            if not done:
                raise _HooksAlreadyRan()
    except _HooksAlreadyRan:
        return False
    except Exception as exc:  # noqa: BLE001 - recorded on the job; the reconciler runs the hooks again
        logger.exception("hooks of job %s failed", job_id)
        with session_scope() as session:
            session.exec(_update(Job).where(Job.id == job_id).values(hook_error=f"{_class_name(type(exc))}: {exc}"))
        return False
    return True


def cancel(job_id: str) -> None:
    """Cancel the job: steps not started never start, running steps stop at their next heartbeat or
    progress report, and the job's cancel hooks run once nothing of it is running."""
    now = clock.now()
    with session_scope() as session:
        job = _existing_job(session, job_id)
        if job.state == JobState.cancelled:
            return
        cancelled = session.exec(_update(Job).where(Job.id == job_id, Job.state.in_(ACTIVE_JOB_STATES)).values(
            state=JobState.cancelled, ended_at=now,
        )).rowcount
        if not cancelled:
            raise JobStateError(f"job {job_id} ({job.kind}) has already ended: {job.state.value}")
        _stop_remaining_steps(session, job_id, now)
        settled = _settle(session.connection(), job_id)
    if settled:
        _dispatch_hooks(job_id)


# ---- reconciling ------------------------------------------------------------------------------------
def reconcile() -> dict[str, int]:
    """Re-drive what lost messages, dead workers and broken chords left behind. Returns what it did."""
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
    for job in jobs:
        reason = _relaunch_reason(job, steps_by_job.get(job.id, []), now, settings)
        if reason and launch(job.id):
            report[reason] += 1
    with session_scope() as session:
        unhooked = session.exec(select(Job.id).where(
            Job.hook_pending.is_(True), Job.settled_at < stale_before,
        )).all()
    for job_id in unhooked:
        report["hooks_run" if run_job_hooks(job_id) else "hooks_failed"] += 1
    return dict(report)


def _relaunch_reason(job: Job, steps: list[JobStep], now: datetime, settings: EngineSettings) -> str | None:
    stages = [list(stage) for _, stage in groupby(steps, key=lambda step: step.stage)]
    stalled_before = now - timedelta(seconds=settings.queued_stall_s)
    # Only the first stage not complete is looked at: a stage whose step waits for an operator (or a
    # retry not due yet) holds the later ones back, and their pending steps are not a lost continuation.
    for stage_no, stage in enumerate(stages):
        if all(step.state in DONE_STEP_STATES for step in stage):
            continue
        if any(_due(step, now) for step in stage):
            return "retry_due"
        if any(step.state == StepState.queued and step.queued_at < stalled_before for step in stage):
            return "queued_stalled"
        if any(step.state == StepState.pending for step in stage):
            # No message was ever sent for it: the chain that should have carried it was cut (a chord
            # whose other member waited for a retry, a launch the broker refused). Give the chain a
            # moment to deliver before concluding that.
            ended = [step.ended_at for step in stages[stage_no - 1]] if stage_no else []
            since = max(ended) if ended else job.created_at
            if since < now - timedelta(seconds=settings.stale_after_s):
                return "continuation_lost"
        return None
    return None


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
        deaths = step.deaths + 1
        if job.state in FINISHED_JOB_STATES:
            outcome = "stopped"
            changed = session.exec(_update(JobStep).where(still_stale).values(
                state=StepState.cancelled, ended_at=now, lease=None,
            )).rowcount
            settled = bool(changed) and _settle(session.connection(), job.id)
        elif deaths >= settings.max_step_deaths:
            outcome = "poisoned"
            reason = _poison_reason(deaths)
            error_class = _class_name(PoisonStepError)
            changed = session.exec(_update(JobStep).where(still_stale).values(
                state=StepState.failed, deaths=deaths, ended_at=now, lease=None, error=reason,
                error_class=error_class,
            )).rowcount
            settled = bool(changed) and _fail_job(session, job.id, f"{step.name} failed: {reason}", error_class)
        else:
            outcome = "relaunched_stale"
            changed = session.exec(_update(JobStep).where(still_stale).values(
                state=StepState.queued, deaths=deaths, lease=None, queued_at=now,
            )).rowcount
            settled = False
    if not changed:
        return "raced"
    if settled:
        _dispatch_hooks(job.id)
    if outcome == "relaunched_stale":
        logger.warning("step %s (%s) of job %s lost its worker (death %d); relaunching", step_id, step.name,
                       job.id, deaths)
        launch(job.id)
    return outcome


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
            job = _plain(_existing_job(session, job_id))
            steps = [_plain(step) for step in _steps_of(session, job_id)]
            again = session.exec(select(Job.state, Job.error).where(Job.id == job_id)).one()
            if (again[0].value, again[1]) == (job["state"], job["error"]):
                break
    return {**job, "steps": steps}


_CONSISTENT_READ_TRIES = 5

