"""The engine's Celery tasks: thin wrappers around workflows.engine, which owns every decision.

Importing this module (the worker does at start, through `tasks`) also imports the modules named in
`ASR_ACTION_MODULES`, so the actions and job hooks they register exist in every worker process.
"""
from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.signals import task_postrun

from worker import app
from workflows import engine

engine.import_action_modules()


@app.task(bind=True, name=engine.RUN_STEP_TASK)
def run_step(self: Task, step_id: str) -> dict[str, Any]:
    """Run one job step. Returning lets the canvas go on; Ignore stops it here, because whoever owns the
    step now (a retry, another worker, the reconciler) owns what follows."""

    def emit_progress_event(**fields: Any) -> None:
        # Flower shows custom events; no retries, so a broker hiccup costs one update, not a stall.
        self.send_event("task-progress", retry=False, **fields)

    outcome = engine.execute_step(
        step_id, task_id=self.request.id, worker=self.request.hostname, emit_event=emit_progress_event,
    )
    if not outcome.advance:
        raise Ignore()
    return {"step_id": step_id, "state": outcome.state.value}


@task_postrun.connect(sender=run_step)
def _forget_result_waiters(**_: Any) -> None:
    # Celery sends the rest of the canvas after run_step returns, freezing the next parallel stage
    # here; postrun comes after that.
    engine.forget_result_waiters()


@app.task(name=engine.RECONCILE_TASK)
def reconcile() -> dict[str, int]:
    """Re-drive due retries, steps of vanished workers, lost messages and lost continuations."""
    return engine.reconcile()


@app.task(name=engine.RUN_JOB_HOOKS_TASK)
def run_job_hooks(job_id: str) -> bool:
    """Run the hooks of a job that has just settled."""
    return engine.run_job_hooks(job_id)


@app.task(name=engine.STAGE_BARRIER_TASK)
def stage_barrier() -> None:
    """A link between two parallel stages of a job's chain (see engine._chain_links); does nothing."""
