"""What the engine knows by name: its queues and task names, the actions steps run, and the job hooks.

Actions (the code a step runs) are registered by the modules that implement them (`tasks/`), in the
processes that run steps; which action names a job may use is declared by its job kind
(`workflows/kinds/`), so a process that only starts jobs needs no action code.
"""
from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlmodel import Session

from models.jobs import FINISHED_JOB_STATES, Job, JobState
from workflows import settings

RUN_STEP_TASK = "asr.engine.run_step"
"""The generic step task (any action); jobs send each step as the task named after its action."""
STEP_TASK_PREFIX = "asr."
RECONCILE_TASK = "asr.engine.reconcile"
RUN_JOB_HOOKS_TASK = "asr.engine.run_job_hooks"
ORCHESTRATION_QUEUE = "orchestration"
RECOVERY_QUEUE = "recovery"
HOST_QUEUE_PREFIX = "host."

ActionFn = Callable[..., dict[str, Any] | None]
HookFn = Callable[[Job, Session], None]
EventEmitter = Callable[..., Any]

registered_actions: dict[str, ActionFn] = {}
_action_listeners: list[Callable[[str], None]] = []
registered_hooks: dict[tuple[str, JobState], list[HookFn]] = defaultdict(list)
declared_kinds: dict[str, frozenset[str]] = {}
"""Each job kind's name and the action names its steps may use (declared by `workflows.jobkind.JobKind`)."""


# ---- registries -------------------------------------------------------------------------------------
def action(name: str) -> Callable[[ActionFn], ActionFn]:
    """Register `fn(ctx, **params) -> dict | None` as the action `name` steps refer to.

    Actions must be idempotent: a rerun after a crash finds its work done, or resumes from a checkpoint."""

    def register(fn: ActionFn) -> ActionFn:
        existing = registered_actions.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(
                f"action {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        registered_actions[name] = fn
        if existing is None:
            for listener in _action_listeners:
                listener(name)
        return fn

    return register


def declare_kind(name: str, actions: frozenset[str]) -> None:
    """Let jobs of kind `name` be started, their steps using only `actions`. Declaring a name twice with
    other actions is a bug (two kinds of one name)."""
    existing = declared_kinds.get(name)
    if existing is not None and existing != actions:
        raise ValueError(f"job kind {name!r} is already declared with other actions")
    declared_kinds[name] = actions


def step_task_name(action_name: str) -> str:
    """The Celery task a step of `action_name` runs as: what Flower and the worker logs show, e.g.
    `asr.replication.copy_disk`."""
    return f"{STEP_TASK_PREFIX}{action_name}"


def is_step_task(task_name: str) -> bool:
    return task_name == RUN_STEP_TASK or (task_name.startswith(STEP_TASK_PREFIX) and task_name[len(STEP_TASK_PREFIX):]
                                          in registered_actions)


def on_action_registered(listener: Callable[[str], None]) -> None:
    """Call `listener(name)` for every action registered so far and every one registered later (the
    worker registers a Celery task per action this way)."""
    _action_listeners.append(listener)
    for name in list(registered_actions):
        listener(name)


def job_hook(kind: str, outcome: str) -> Callable[[HookFn], HookFn]:
    """Register `fn(job, session)` to run when a job of `kind` ends `outcome` ("succeeded", "failed" or
    "cancelled").

    Hooks run on an orchestration worker once no step of the job is running any more, in one
    transaction with the record that they ran; a hook that raises is retried by the reconciler, so
    hooks must be idempotent."""
    state = JobState(outcome)
    if state not in FINISHED_JOB_STATES:
        raise ValueError(f"job hooks run when a job ends: {outcome!r} is not succeeded, failed or cancelled")

    def register(fn: HookFn) -> HookFn:
        if fn not in registered_hooks[(kind, state)]:
            registered_hooks[(kind, state)].append(fn)
        return fn

    return register


def import_action_modules() -> list[str]:
    """Import the extra modules named in `ASR_ACTION_MODULES` (comma-separated), which register actions, hooks
    and job kinds of their own (tests and extensions do; the product's own are imported by `tasks`)."""
    names = settings.action_modules()
    for name in names:
        importlib.import_module(name)
    return names

