"""What the workflow benchmarks run in real workers: a no-op engine action and a no-op plain Celery task.

Workers load this module through ASR_ACTION_MODULES=benchmarks.workflow_actions, and the benchmark
process imports it too, so `start_job` finds the action registered. Both do nothing on purpose: the
difference between a job of no-op steps and a bare chain of no-op tasks is what the engine costs.
"""
from __future__ import annotations

from worker import app
from workflows.engine import StepContext, action

NOOP_ACTION = "bench.noop"
NOOP_TASK = "bench.noop_task"


@action(NOOP_ACTION)
def noop(ctx: StepContext) -> None:
    """An engine step with nothing to do."""


@app.task(name=NOOP_TASK)
def noop_task() -> None:
    """A plain Celery task with nothing to do: the peer of one engine step."""
