"""How the engine hands work to workers, as an interface: the engine core decides, a dispatcher delivers.

The production dispatcher is `workflows.canvas.CeleryDispatcher` (Celery canvases on the Redis broker),
the only place that knows Celery; it is loaded on first use, so importing the engine imports no Celery,
and unit tests install their own with `use_dispatcher` to run the engine's decisions on SQLite alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class DispatchError(Exception):
    """The broker could not take the message now (it is down or unreachable). What the engine recorded
    stays; the reconciler sends it again later."""


@dataclass(frozen=True)
class StepMessage:
    """What a step's message carries: the step's id, its queue and its action; and, for the people who
    read Flower's task list and the worker logs, what it is about (`describe`)."""

    id: str
    queue: str
    action: str
    job_id: str | None = None
    job_kind: str | None = None
    vm: str | None = None  # the VM of a one-VM job
    plan: str | None = None  # the recovery plan of a plan's job (its steps' names name their VMs)
    step_name: str | None = None
    attempt: int | None = None  # the attempt the message is sent for (1 the first time)

    def describe(self) -> dict[str, Any]:
        """The message's subject as plain values, those known: job kind, VM or plan, step, attempt, job."""
        fields = {"job": self.job_kind, "vm": self.vm, "plan": self.plan, "step": self.step_name,
                  "attempt": self.attempt, "job_id": self.job_id}
        return {key: value for key, value in fields.items() if value is not None}


class Dispatcher(Protocol):
    def send_stage(self, steps: Sequence[StepMessage]) -> None:
        """Deliver the steps of one stage, to run in parallel (the engine sends the next stage itself once
        this one is complete). DispatchError when the broker refuses."""

    def dispatch_hooks(self, job_id: str) -> None:
        """Have an orchestration worker run the settled job's hooks. DispatchError when the broker refuses."""

    def report_lost_run(self, task_id: str, *, failed: bool, reason: str) -> None:
        """Tell the workers' monitor (Flower) how the message `task_id` ended when no worker could: its run
        died with its worker and the reconciler found it. `failed`: the step failed as a poison message;
        otherwise it runs again (a retry). Best effort: never raises."""


_current: Dispatcher | None = None


def use_dispatcher(new: Dispatcher | None) -> Dispatcher | None:
    """Make `new` this process's dispatcher (None: the Celery one again). Returns the previous one."""
    global _current
    previous, _current = _current, new
    return previous


def dispatcher() -> Dispatcher:
    global _current
    if _current is None:
        from workflows.canvas import CeleryDispatcher  # the production transport, loaded on first use

        _current = CeleryDispatcher()
    return _current
