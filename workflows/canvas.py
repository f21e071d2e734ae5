"""The engine's jobs as Celery canvases: the one module of the engine that knows Celery.

A job's remaining stages go out as `chain(stage_k, stage_k+1, ...)`: a one-step stage is one message, a
larger one a group (a group followed by a task is a chord). Each step is sent as the Celery task named
after its action (`asr.replication.copy_disk`), which Flower and the worker logs then show; every such
task runs the same engine code (`tasks/steps.py`). The database, not Celery, records every outcome, so
no result is stored and nothing waits on one.
"""
from __future__ import annotations

from collections.abc import Sequence

import kombu.exceptions
import redis
from celery import chain, group
from celery.canvas import Signature

from worker import app
from workflows.engine.dispatch import DispatchError, StepMessage
from workflows.engine.registry import ORCHESTRATION_QUEUE, RUN_JOB_HOOKS_TASK, STAGE_BARRIER_TASK, step_task_name

# What a broker that is down or unreachable raises when a message is sent.
_BROKER_ERRORS = (kombu.exceptions.OperationalError, redis.RedisError, OSError)

class CeleryDispatcher:
    """Sends stages as a Celery chain and hooks as a task on the orchestration queue."""

    def send_stages(self, stages: Sequence[Sequence[StepMessage]]) -> None:
        try:
            chain(*_chain_links(stages)).apply_async()
        except _BROKER_ERRORS as exc:
            raise DispatchError(str(exc) or type(exc).__name__) from exc
        forget_result_waiters()

    def dispatch_hooks(self, job_id: str) -> None:
        try:
            app.signature(RUN_JOB_HOOKS_TASK, args=(job_id,), immutable=True, queue=ORCHESTRATION_QUEUE,
                          ignore_result=True).apply_async()
        except _BROKER_ERRORS as exc:
            raise DispatchError(str(exc) or type(exc).__name__) from exc

def _run_step_signature(step: StepMessage) -> Signature:
    # The database holds every step's outcome: no result is stored for anyone to wait on (a chord
    # still counts its members, which does not depend on stored results).
    return app.signature(step_task_name(step.action), args=(step.id,), immutable=True, queue=step.queue,
                         ignore_result=True)

def _stage_signature(steps: Sequence[StepMessage]) -> Signature:
    signatures = [_run_step_signature(step) for step in steps]
    return signatures[0] if len(signatures) == 1 else group(signatures)

def _chain_links(stages: Sequence[Sequence[StepMessage]]) -> list[Signature]:
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

