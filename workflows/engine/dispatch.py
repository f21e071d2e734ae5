"""How the engine hands work to workers, as an interface: the engine core decides, a dispatcher delivers.

The production dispatcher is `workflows.canvas.CeleryDispatcher` (Celery canvases on the Redis broker),
the only place that knows Celery; it is loaded on first use, so importing the engine imports no Celery,
and unit tests install their own with `use_dispatcher` to run the engine's decisions on SQLite alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class DispatchError(Exception):
    """The broker could not take the message now (it is down or unreachable). What the engine recorded
    stays; the reconciler sends it again later."""


class StepMessage(Protocol):
    """What a step's message needs: the step's id, its queue and its action (a JobStep row has them)."""

    id: str
    queue: str
    action: str


class Dispatcher(Protocol):
    def send_stage(self, steps: Sequence[StepMessage]) -> None:
        """Deliver the steps of one stage, to run in parallel (the engine sends the next stage itself once
        this one is complete). DispatchError when the broker refuses."""

    def dispatch_hooks(self, job_id: str) -> None:
        """Have an orchestration worker run the settled job's hooks. DispatchError when the broker refuses."""


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
