"""The engine's Celery tasks: thin wrappers around workflows.engine, which owns every decision.

Importing this module (the worker does at start, through `tasks`) also imports the modules named in
`ASR_ACTION_MODULES`, so the actions and job hooks they register exist in every worker process.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import task_postrun, task_unknown

from models.jobs import StepState
from tasks.host_identity import unproven_host_queue
from worker import app
from workflows import engine
from workflows.canvas import forget_result_waiters

engine.import_action_modules()
logger = logging.getLogger(__name__)
# How long a worker that may not run a host's step waits before handing its message back to the queue: the
# host's own agent takes it meanwhile, and a lone impostor does not spin on it.
UNPROVEN_PAUSE_S = 2.0


class StepFailed(Exception):
    """The step failed for good (non-recoverably, as a poison message, or with no code for its action):
    the engine has recorded it and failed the job. Raised only so that the Celery task ends FAILURE."""


class StepRetryScheduled(Exception):
    """The step failed recoverably: the engine has recorded it and runs it again at its next attempt, as a
    new message. Carried by the Retry that ends the Celery task RETRY (no message is sent by Celery)."""


def delivered_queue(delivery_info: dict[str, Any] | None) -> str | None:
    """The queue a step's message came on, as the worker's broker transport stamps it on every message it
    takes off a queue (worker.py, `_DeliveredQueueChannel`): the routing key the sender put in the message
    is only the sender's word. None for a task not taken off a queue (called in-process)."""
    return (delivery_info or {}).get("routing_key") or None


def _run_step(self: Task, step_id: str) -> dict[str, Any]:
    """Run one job step. The engine records the outcome and sends the next stage (or schedules the retry)
    itself; the task's own end state only reports that outcome to Flower and the worker logs: SUCCESS
    (the step succeeded, or waits for an operator), RETRY (it waits for the engine's retry), FAILURE (it
    failed, the job with it). Ignore marks a message that did not run its step (a duplicate, one whose step
    another run owns, or whose job is over): it has no outcome of its own."""

    def emit_progress_event(**fields: Any) -> None:
        # Flower shows custom events; no retries, so a broker hiccup costs one update, not a stall.
        self.send_event("task-progress", retry=False, **fields)

    outcome = engine.execute_step(
        step_id, task_id=self.request.id, worker=self.request.hostname, emit_event=emit_progress_event,
        delivered_on=delivered_queue(self.request.delivery_info), may_run=unproven_host_queue,
    )
    if outcome.misdelivered:
        # A step of another queue: pushed here by whoever may write to this queue (a host's broker user may
        # push to every queue). Dropped, not handed back: no consumer of this queue may ever run it.
        logger.error("step %s refused on %s: %s", step_id, self.request.hostname, outcome.refused)
        raise Reject(outcome.refused, requeue=False)
    if outcome.refused is not None:
        # Not claimed, not failed: the step stays queued for its host's agent (an impostor must not be able
        # to fail a host's steps either).
        logger.error("step %s refused on %s: %s", step_id, self.request.hostname, outcome.refused)
        time.sleep(UNPROVEN_PAUSE_S)
        raise Reject(outcome.refused, requeue=True)
    if outcome.own and outcome.state is StepState.failed:
        raise StepFailed(f"{outcome.step_name} failed: {outcome.error}")
    if outcome.own and outcome.state is StepState.waiting_retry:
        reason = StepRetryScheduled(f"{outcome.step_name}: {outcome.error}")
        # Raised, not self.retry(): the engine sends the next attempt, Celery must send none.
        when = outcome.next_attempt_at.isoformat(timespec="seconds") if outcome.next_attempt_at else "its next attempt"
        raise Retry(f"the engine runs it again at {when}", reason)
    if not (outcome.advance or (outcome.own and outcome.state is StepState.waiting_action)):
        raise Ignore()
    return {"step_id": step_id, "state": outcome.state.value}


def _step_task(name: str) -> Task:
    # StepFailed is expected: the engine has logged the failure, the worker logs the task's end in one line.
    return app.task(bind=True, name=name, throws=(StepFailed,))(_run_step)


run_step = _step_task(engine.RUN_STEP_TASK)


def _register_step_task(action_name: str) -> None:
    # One Celery task per action, all running the same engine code: Flower and the worker logs then name
    # what a step does (asr.replication.copy_disk), not just that it is a step.
    name = engine.step_task_name(action_name)
    if name not in app.tasks:
        _step_task(name)


engine.on_action_registered(_register_step_task)


@task_postrun.connect
def _forget_result_waiters(sender: Task | None = None, **_: Any) -> None:
    # A step that completes its stage sends the next one, a group when it has several steps.
    if sender is not None and engine.is_step_task(sender.name):
        forget_result_waiters()


@task_unknown.connect
def _refuse_unknown_step(name: str | None = None, message: Any = None, **_: Any) -> None:
    """A step message for an action this worker does not have: fail the step, naming both, rather than
    leave it queued until the reconciler's stall limit (Celery itself only logs and drops it)."""
    if not name or not name.startswith(engine.STEP_TASK_PREFIX):
        return
    try:
        args = message.payload[0] if isinstance(message.payload, (list, tuple)) else message.payload.get("args")
        engine.refuse_unknown_step_task(str(args[0]), name, socket.gethostname())
    except Exception:  # noqa: BLE001 - a signal handler must not break the consumer; the reconciler remains
        logger.exception("could not fail the step of unknown task %s", name)


@app.task(name=engine.RECONCILE_TASK)
def reconcile() -> dict[str, int]:
    """Re-drive due retries, steps of vanished workers, lost messages and lost continuations."""
    return engine.reconcile()


@app.task(name=engine.RUN_JOB_HOOKS_TASK)
def run_job_hooks(job_id: str) -> bool:
    """Run the hooks of a job that has just settled."""
    return engine.run_job_hooks(job_id)
