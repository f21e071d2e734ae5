"""Running one step: claim it, run its action with a heartbeat, record the outcome.

`execute_step` (behind every step task) claims the step with one conditional UPDATE, keeps a heartbeat
while the action runs, and records what happened: succeeded (the job goes on), waiting_retry
(recoverable: the reconciler runs it again on the long schedule), waiting_action (a manual action: the
job waits, holding its locks, until `resume`), or failed (the job fails and its hooks run).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
import sqlalchemy as sa
from sqlmodel import Session

from datapath.errors import NonRecoverableError
from models.db import get_engine, new_id, session_scope
from models.jobs import ACTIVE_JOB_STATES, DONE_STEP_STATES, FINISHED_JOB_STATES, Job, JobStep, StepState
from workflows import clock
from workflows.engine.errors import (
    AwaitingOperator,
    PoisonStepError,
    StepCancelled,
    class_name,
    error_text,
    poison_reason,
)
from workflows.engine.jobs import (
    NextStage,
    advance,
    dispatch_hooks,
    fail_job,
    finish_if_complete,
    queue_next_stage,
    send_next_stage,
    settle,
)
from workflows.engine.registry import STEP_TASK_PREFIX, ActionFn, EventEmitter, registered_actions
from workflows.engine.specs import require_json_object
from workflows.engine.statements import (
    claim_statement,
    heartbeat_statement,
    job_started_statement,
    refresh_job_state,
    step_succeeded_statement,
    update_rows,
)
from workflows.progress import PublishBackoff, percent_of, publish_progress
from workflows.retry import in_call_retrying, is_recoverable, next_attempt_delay
from workflows.settings import EngineSettings

logger = logging.getLogger(__name__)

# Live progress goes to Redis (and as a task event) at most this often, and always when a step finishes.
PROGRESS_PUBLISH_INTERVAL_S = 0.5


# ---- running one step -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepOutcome:
    advance: bool  # the step is done: the canvas may go on to what follows it
    state: StepState | None  # the step's state as this run left it (None: the step does not exist)
    own: bool = True
    """Whether `state` is this message's doing: its run recorded it, or the step's last run was this very
    message's (a redelivery after that run recorded and died). False for a message that did not run the
    step (a duplicate, one whose step another run owns or that is over): the state is someone else's."""
    step_name: str | None = None
    error: str | None = None  # why the step failed or waits for a retry
    next_attempt_at: datetime | None = None  # when the engine runs a step waiting for a retry again
    refused: str | None = None  # why this process may not run the step (its queue check): nothing changed
    misdelivered: bool = False
    """The refusal is because the message came on another queue than the step's: it has no consumer here
    (the step's own message is on the step's queue, or the reconciler sends it again)."""


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
        # Live progress is a convenience: Redis being away must not fail the step it describes, nor slow it
        # down with a try (and a warning) at every report: both back off while it is away.
        try:
            publish_progress(self.job_id, self.step_id, name=self.step_name, done=done, total=total,
                             updated=clock.now())
        except redis.RedisError as exc:
            logger.warning("progress of step %s not published to Redis: %s", self.step_id, exc)
        if not _event_backoff.ready():
            return
        try:
            # Not "name": Flower takes an event's name field as the task's name.
            self._emit_event(job_id=self.job_id, step=self.step_id, step_name=self.step_name, done=done,
                             total=total, percent=percent_of(done, total))
        except Exception as exc:  # noqa: BLE001 - a lost progress event must never fail the step
            wait = _event_backoff.failed()
            logger.warning("task-progress event of step %s not sent (next try in %.0f s): %s", self.step_id,
                           wait, exc)
        else:
            _event_backoff.succeeded()


# Task events go through the broker: while it is away, a progress event is tried only now and then.
_event_backoff = PublishBackoff()


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
                held = connection.execute(heartbeat_statement(), {
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


@dataclass(frozen=True)
class _ClaimedStep:
    """A step as its claim left it."""

    id: str
    job_id: str
    stage: int
    name: str
    action: str
    params: dict[str, Any]
    attempts: int
    deaths: int
    queue: str


QueueCheck = Callable[[str], "str | None"]
"""Why this process may not run a step sent on the queue (the host identity check of a host's queue), or None."""


class _Refused(Exception):
    """The claim's queue check refused the step: its transaction rolls back, the step stays as it was."""

    def __init__(self, reason: str, *, misdelivered: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.misdelivered = misdelivered


def _claim(step_id: str, *, task_id: str, worker: str, lease: str, stale_after_s: float,
           delivered_on: str | None = None, may_run: QueueCheck | None = None) -> _ClaimedStep | _Refused | None:
    """Make this run the step's owner with ONE conditional UPDATE (pending, queued, a retry now due, or
    running under this very Celery task with a stale heartbeat: a redelivery after its runner died), or
    return None if it may not run now. Inside the claim's transaction (no read of its own: the queue comes
    back with the claim), the step's queue must be `delivered_on`, the queue its message came on, when
    given (whoever may push to a queue can push any step's id there: a host's agent would otherwise run
    an orchestration step pushed on its own queue), and `may_run` must accept it; a refusal rolls the
    claim back and is returned."""
    now = clock.now()
    try:
        with get_engine().begin() as connection:
            # all(): SQLite applies an UPDATE … RETURNING row by row as its rows are read.
            rows = connection.execute(claim_statement(), {
                "claim_step_id": step_id, "claim_task_id": task_id, "claim_now": now, "claim_lease": lease,
                "claim_worker": worker, "claim_stale_before": now - timedelta(seconds=stale_after_s),
            }).all()
            if not rows:
                return None
            step = _ClaimedStep(*rows[0])
            if delivered_on is not None and delivered_on != step.queue:
                raise _Refused(f"step {step.id} ({step.name}) belongs to queue {step.queue!r}, not to "
                               f"{delivered_on!r}, the queue its message came on", misdelivered=True)
            if may_run is not None and (refusal := may_run(step.queue)) is not None:
                raise _Refused(refusal)
            connection.execute(job_started_statement(), {"started_job_id": step.job_id, "started_now": now})
            return step
    except _Refused as refused:
        return refused


def _owned(step_id: str, lease: str) -> sa.ColumnElement[bool]:
    return sa.and_(JobStep.id == step_id, JobStep.lease == lease, JobStep.state == StepState.running)


def execute_step(step_id: str, *, task_id: str, worker: str, emit_event: EventEmitter,
                 delivered_on: str | None = None, may_run: QueueCheck | None = None) -> StepOutcome:
    """Claim the step (unless it is not a step of `delivered_on`, the queue its message came on, or
    `may_run` refuses its queue to this process), run its action with a heartbeat, record the outcome."""
    settings = EngineSettings.from_env()
    lease = new_id()
    step = _claim(step_id, task_id=task_id, worker=worker, lease=lease, stale_after_s=settings.stale_after_s,
                  delivered_on=delivered_on, may_run=may_run)
    if isinstance(step, _Refused):
        return StepOutcome(advance=False, state=None, own=False, refused=step.reason,
                           misdelivered=step.misdelivered)
    if step is None:
        return _unclaimed(step_id, task_id)
    if step.deaths >= settings.max_step_deaths:
        return _fail_step(step, lease, poison_reason(step.deaths), class_name(PoisonStepError))
    fn = registered_actions.get(step.action)
    if fn is None:
        return _fail_step(step, lease, f"no action is registered as {step.action!r} on worker {worker}",
                          class_name(NonRecoverableError))
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
        return _fail_step(step, lease, error_text(exc), class_name(type(exc)))
    return _succeed_step(step, lease, result, context.progress_snapshot())


def _call_action(fn: ActionFn, context: StepContext, params: dict[str, Any]) -> dict[str, Any] | None:
    result = fn(context, **params)
    if result is not None:
        require_json_object(result, f"the result of action {fn.__module__}.{fn.__qualname__}")
    return result


def refuse_unknown_step_task(step_id: str, task_name: str, worker: str) -> bool:
    """A worker received a step's message for a task it does not have (its action's module is not loaded
    there): the step fails non-recoverably, naming both, instead of the message being lost silently.
    Returns whether the step was failed now."""
    error = (f"worker {worker} has no task {task_name!r}: the module registering action "
             f"{task_name[len(STEP_TASK_PREFIX):]!r} is not loaded there (ASR_ACTION_MODULES)")
    error_class = class_name(NonRecoverableError)
    with session_scope() as session:
        step = session.get(JobStep, step_id)
        if step is None:
            return False
        failed = session.exec(update_rows(JobStep).where(
            JobStep.id == step_id, JobStep.state.in_((StepState.pending, StepState.queued)),
        ).values(state=StepState.failed, ended_at=clock.now(), error=error, error_class=error_class)).rowcount
        settled = bool(failed) and fail_job(session, step.job_id, f"{step.name} failed: {error}", error_class)
    if settled:
        dispatch_hooks(step.job_id)
    return bool(failed)


def _unclaimed(step_id: str, task_id: str) -> StepOutcome:
    with session_scope() as session:
        step = session.get(JobStep, step_id)
    if step is None:
        logger.warning("run_step for unknown step %s ignored", step_id)
        return StepOutcome(advance=False, state=None, own=False)
    done = step.state in DONE_STEP_STATES
    if done:
        # A redelivery after a crash just after the commit: the job must still go on.
        _advance(step.job_id, step.stage)
    # A step whose last run was this message's and is not running any more (the run recorded its outcome
    # and died before the message was acknowledged, or the reconciler failed it as a poison message):
    # its outcome is this message's.
    own = step.celery_task_id == task_id and step.state != StepState.running
    return StepOutcome(advance=done, state=step.state, own=own, step_name=step.name, error=step.error,
                       next_attempt_at=step.next_attempt_at)


def _succeed_step(
    step: _ClaimedStep, lease: str, result: dict[str, Any] | None, progress: tuple[int, int]
) -> StepOutcome:
    now = clock.now()
    next_stage = None
    with get_engine().begin() as connection:
        recorded = connection.execute(step_succeeded_statement(), {
            "owned_step_id": step.id, "owned_lease": lease, "succeeded_result": result, "succeeded_now": now,
            "succeeded_done": progress[0], "succeeded_total": progress[1],
        }).rowcount
        settled = bool(recorded) and finish_if_complete(connection, step.job_id, now)
        if recorded and not settled:
            # The stage's last open step queues the next stage in its own success transaction: one transaction
            # less per step (the engine's overhead over a bare chain, docs/benchmarks.md). A stage with steps
            # still open (seen open here, perhaps finishing beside this one) is advanced after the commit.
            next_stage = queue_next_stage(connection, step.job_id, step.stage)
    if not recorded:
        return _stand_down(step)
    if settled:
        dispatch_hooks(step.job_id)
    else:
        _advance(step.job_id, step.stage, next_stage)
    return StepOutcome(advance=True, state=StepState.succeeded, step_name=step.name)


def _advance(job_id: str, stage: int, queued: NextStage | None = None) -> None:
    """Send the stage `queued` already (in the success transaction), or advance past `stage`."""
    # The step is recorded: a failure to send the next stage now is the reconciler's to make good.
    try:
        if queued is not None:
            send_next_stage(job_id, queued)
        else:
            advance(job_id, stage)
    except sa.exc.SQLAlchemyError as exc:
        logger.warning("job %s not advanced past stage %d (the reconciler will): %s", job_id, stage, exc)


def _wait_for_retry(step: _ClaimedStep, lease: str, exc: BaseException) -> StepOutcome:
    now = clock.now()
    next_attempt_at = now + timedelta(seconds=clock.scaled(next_attempt_delay(step.attempts)))
    with session_scope() as session:
        recorded = session.exec(update_rows(JobStep).where(_owned(step.id, lease)).values(
            state=StepState.waiting_retry, next_attempt_at=next_attempt_at, ended_at=now, lease=None,
            broker_lost_at=None, error=error_text(exc), error_class=class_name(type(exc)),
        )).rowcount
        if recorded:
            session.exec(update_rows(Job).where(Job.id == step.job_id, Job.state.in_(ACTIVE_JOB_STATES)).values(
                error=f"{step.name}: {error_text(exc)}", error_class=class_name(type(exc)),
            ))
            refresh_job_state(session.connection(), step.job_id)
    if not recorded:
        return _stand_down(step)
    return StepOutcome(advance=False, state=StepState.waiting_retry, step_name=step.name, error=error_text(exc),
                       next_attempt_at=next_attempt_at)


def _await_operator(step: _ClaimedStep, lease: str, instructions: str) -> StepOutcome:
    """A manual action: the step waits for `resume` with its instructions; the canvas stops here (resume
    launches what follows)."""
    now = clock.now()
    with session_scope() as session:
        recorded = session.exec(update_rows(JobStep).where(_owned(step.id, lease)).values(
            state=StepState.waiting_action, instructions=instructions, ended_at=now, lease=None, broker_lost_at=None,
            next_attempt_at=None, error=None, error_class=None,
        )).rowcount
        if recorded:
            refresh_job_state(session.connection(), step.job_id)
    if not recorded:
        return _stand_down(step)
    logger.info("step %s (%s) of job %s waits for an operator: %s", step.id, step.name, step.job_id, instructions)
    return StepOutcome(advance=False, state=StepState.waiting_action, step_name=step.name)


def _fail_step(step: _ClaimedStep, lease: str, error: str, error_class: str) -> StepOutcome:
    now = clock.now()
    with session_scope() as session:
        recorded = session.exec(update_rows(JobStep).where(_owned(step.id, lease)).values(
            state=StepState.failed, ended_at=now, lease=None, error=error, error_class=error_class, broker_lost_at=None,
        )).rowcount
        settled = recorded and fail_job(session, step.job_id, f"{step.name} failed: {error}", error_class)
    if not recorded:
        return _stand_down(step)
    if settled:
        dispatch_hooks(step.job_id)
    return StepOutcome(advance=False, state=StepState.failed, step_name=step.name, error=error)


def _stand_down(step: _ClaimedStep) -> StepOutcome:
    """This run lost its lease. If the job was cancelled or failed meanwhile, the step ends cancelled
    here; if another run took the step over, that run records it."""
    with session_scope() as session:
        job_finished = sa.exists().where(Job.id == JobStep.job_id, Job.state.in_(FINISHED_JOB_STATES))
        stopped = session.exec(update_rows(JobStep).where(
            JobStep.id == step.id, JobStep.state == StepState.running, JobStep.lease.is_(None), job_finished,
        ).values(state=StepState.cancelled, ended_at=clock.now())).rowcount
        settled = bool(stopped) and settle(session.connection(), step.job_id)
        state = session.get(JobStep, step.id).state
    if settled:
        dispatch_hooks(step.job_id)
    return StepOutcome(advance=False, state=state, own=False, step_name=step.name)

