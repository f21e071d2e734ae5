"""What the workflow benchmarks run in real workers: a no-op engine action and a no-op plain Celery task.

Workers load this module through ASR_ACTION_MODULES=benchmarks.workflow_actions, and the benchmark
process imports it too, so the benchmark job kinds it declares can be started. Both do nothing on purpose: the
difference between a job of no-op steps and a bare chain of no-op tasks is what the engine costs.
"""
from __future__ import annotations

from worker import app
from workflows import actions
from workflows.engine import StepContext, action
from workflows.jobkind import JobKind, declare

NOOP_ACTION = actions.declare("bench.noop")
NOOP_TASK = "bench.noop_task"

# The benchmarks build their stages by hand and call start_job: their kinds only declare names and actions.
for _name in ("bench.step_overhead", "bench.plan_shape"):
    declare(JobKind(name=_name, summary="engine benchmark jobs", actions=frozenset({NOOP_ACTION}),
                    build=lambda stages: stages, locks=lambda _: [], target=lambda _: None, params=lambda _: {}))


@action(NOOP_ACTION)
def noop(ctx: StepContext) -> None:
    """An engine step with nothing to do."""


@app.task(name=NOOP_TASK)
def noop_task() -> None:
    """A plain Celery task with nothing to do: the peer of one engine step."""
