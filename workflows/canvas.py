"""The engine's stages as Celery messages: the one module of the engine that knows Celery.

A stage goes out as one message per step (a group when it has several). The engine sends the next stage
itself when the last step of a stage succeeds (`engine.jobs.advance`), rather than chaining stages in a
Celery canvas: a chord whose member was re-driven, retried or delivered twice never fires its body, which
left jobs waiting for the reconciler (about 40 s in a chaos run), and a group chained after a group is
delivered once per member of the first (celery issues 8180, 8662). Each step is sent as the Celery task
named after its action (`asr.replication.copy_disk`), which Flower and the worker logs then show; every
such task runs the same engine code (`tasks/steps.py`). The database, not Celery, records every outcome, so
no result is stored and nothing waits on one.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import kombu.exceptions
import redis
from celery import current_task, group
from celery.canvas import Signature

from worker import app
from workflows.engine.dispatch import DispatchError, StepMessage
from workflows.engine.registry import ORCHESTRATION_QUEUE, RUN_JOB_HOOKS_TASK, step_task_name

logger = logging.getLogger(__name__)

# What a broker that is down or unreachable raises when a message is sent.
_BROKER_ERRORS = (kombu.exceptions.OperationalError, redis.RedisError, OSError)

class CeleryDispatcher:
    """Sends a stage as one message per step (a group when the stage has several), hooks as a task on the
    orchestration queue, and the end of a run that died with its worker as that task's event."""

    def send_stage(self, steps: Sequence[StepMessage]) -> None:
        try:
            _stage_signature(steps).apply_async()
        except _BROKER_ERRORS as exc:
            raise DispatchError(str(exc) or type(exc).__name__) from exc
        forget_result_waiters()

    def dispatch_hooks(self, job_id: str) -> None:
        try:
            app.signature(RUN_JOB_HOOKS_TASK, args=(job_id,), immutable=True, queue=ORCHESTRATION_QUEUE,
                          ignore_result=True).apply_async()
        except _BROKER_ERRORS as exc:
            raise DispatchError(str(exc) or type(exc).__name__) from exc

    def report_lost_run(self, task_id: str, *, failed: bool, reason: str) -> None:
        # The task events its worker would have sent had it not died with the run: Flower then counts the
        # run as failed or retried instead of showing it started forever.
        # Sent as the worker reporting it (the reconciler's), not as the dead run's: an event from a node
        # counts as a sign of its life.
        reporter = getattr(current_task, "request", None)
        try:
            with app.events.default_dispatcher(hostname=getattr(reporter, "hostname", None)) as events:
                events.send("task-failed" if failed else "task-retried", uuid=task_id, exception=reason,
                            traceback="", retry=False)
        except Exception as exc:  # noqa: BLE001 - a lost event must not stop the reconciler
            logger.warning("the end of task %s not reported to the monitor: %s", task_id, exc)


def _run_step_signature(step: StepMessage) -> Signature:
    # The database holds every step's outcome: no result is stored for anyone to wait on. The task's only
    # argument is the step id; its kwargsrepr (what Flower's task list shows as kwargs, and what its search
    # matches, `kwargs:vm=web01`) says what the step is: job kind, VM or plan, step name, attempt, job id.
    return app.signature(step_task_name(step.action), args=(step.id,), immutable=True, queue=step.queue,
                         ignore_result=True, argsrepr=repr((step.id,)), kwargsrepr=repr(step.describe()))


def _stage_signature(steps: Sequence[StepMessage]) -> Signature:
    signatures = [_run_step_signature(step) for step in steps]
    return signatures[0] if len(signatures) == 1 else group(signatures)


def forget_result_waiters() -> None:
    """Drop the result waiters Celery holds in this process.

    A process that sends a group keeps a waiter and a Redis subscription per member until the member's
    result arrives. A step task stores no result, so none ever does, and both would pile up with every
    parallel stage. Nothing in the engine waits on a Celery result (the database is the record), so all of
    them go. Result backends that do not push results (pending_results absent) keep none."""
    backend = app.backend
    pending = getattr(backend, "_pending_results", None)
    if pending is None:
        return
    for by_task in pending:  # held strongly, and weakly
        for waiters in list(by_task.values()):
            for waiter in list(waiters.values()):
                backend.remove_pending_result(waiter)
