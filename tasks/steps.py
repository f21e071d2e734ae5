"""The engine's Celery tasks: thin wrappers around workflows.engine, which owns every decision.

Importing this module (the worker does at start, through `tasks`) also imports the modules named in
`ASR_ACTION_MODULES`, so the actions and job hooks they register exist in every worker process.
"""
from __future__ import annotations

import logging
import socket
from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.signals import task_postrun, task_unknown

from worker import app
from workflows import engine
from workflows.canvas import forget_result_waiters

engine.import_action_modules()
logger = logging.getLogger(__name__)


def _run_step(self: Task, step_id: str) -> dict[str, Any]:
    """Run one job step. The engine records the outcome and sends the next stage itself; Ignore marks a
    message whose step another run owns (a retry, another worker, the reconciler), or that must wait."""

    def emit_progress_event(**fields: Any) -> None:
        # Flower shows custom events; no retries, so a broker hiccup costs one update, not a stall.
        self.send_event("task-progress", retry=False, **fields)

    outcome = engine.execute_step(
        step_id, task_id=self.request.id, worker=self.request.hostname, emit_event=emit_progress_event,
    )
    if not outcome.advance:
        raise Ignore()
    return {"step_id": step_id, "state": outcome.state.value}


run_step = app.task(bind=True, name=engine.RUN_STEP_TASK)(_run_step)


def _register_step_task(action_name: str) -> None:
    # One Celery task per action, all running the same engine code: Flower and the worker logs then name
    # what a step does (asr.replication.copy_disk), not just that it is a step.
    name = engine.step_task_name(action_name)
    if name not in app.tasks:
        app.task(bind=True, name=name)(_run_step)


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
