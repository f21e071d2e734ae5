"""A job kind: everything about one type of job, declared in one object in one file of `workflows/kinds/`.

A kind says what its jobs are called, which locks they hold, how their stages are built from an
already-loaded request (a pure function: no database, no clock, so it is unit-tested as a graph), which
actions of the catalog (`workflows/actions.py`) those stages may use, which item states its jobs start
from and move the item to, what runs when a job ends (its hooks), and how a failed or cancelled job is
started again. Each kind file also holds the kind's `start(...)`: it loads and checks the request (the
only part that reads the database), then hands the kind and the request to `start`, below.

Adding a job kind is one new file in `workflows/kinds/` (listed in `workflows/kinds/__init__.py`) plus
its actions in `tasks/`: the engine, the API and the CLI's restart need no change.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlmodel import select

from models.db import as_utc, session_scope
from models.jobs import Job
from models.protection import ALLOWED_TRANSITIONS, ReplicationState
from workflows import actions
from workflows.engine import StepSpec, job_hook, reopen, start_job
from workflows.engine.registry import HookFn, declare_kind

Request = TypeVar("Request")

KINDS: dict[str, JobKind[Any]] = {}


class NotRestartableError(ValueError):
    """Jobs of this kind cannot be started again from their record."""


@dataclass(frozen=True)
class JobKind(Generic[Request]):
    name: str
    summary: str
    """One line: what a job of this kind does (docs, --help, the console)."""
    actions: frozenset[str]
    """The catalog's action names its stages may use; the engine refuses any other."""
    build: Callable[[Request], list[list[StepSpec]]]
    """The stages of a job for an already-loaded request. Pure: no database, no clock, no ids made here."""
    locks: Callable[[Request], list[str]]
    """The lock keys its jobs hold (one workflow at a time per protected item, or per plan and its items)."""
    target: Callable[[Request], str | None]
    """What the job is about (a protected item id, a plan id): the Jobs tab's filter."""
    params: Callable[[Request], dict[str, Any]]
    """What the job record keeps of its request: enough for its hooks and its restart (ids, never data)."""
    restart: Callable[[Mapping[str, Any]], str] | None = None
    """Start the job again from a failed or cancelled job's params; None: it cannot be restarted."""
    recovery: str = "restart"
    """The way out of a failed or cancelled job of this kind (`recover`): "resume" the same job from the step
    where it stopped (its steps resume from their checkpoints: the replication kinds, whose failures leave
    the item where they stopped), or "restart" it as a new job with the same request (the kinds whose
    failure rolls the item back, or that are cheap to run again)."""
    starts_from: tuple[ReplicationState, ...] = ()
    """The item states a job of this kind may start in (empty: it does not look at an item's state)."""
    moves_to: frozenset[ReplicationState] = frozenset()
    """The item states its steps and hooks may move the item to (each along ALLOWED_TRANSITIONS)."""
    on_failed: tuple[HookFn, ...] = ()
    on_cancelled: tuple[HookFn, ...] = ()
    on_succeeded: tuple[HookFn, ...] = ()

    def __post_init__(self) -> None:
        if self.recovery not in ("resume", "restart"):
            raise ValueError(f"job kind {self.name!r}: recovery must be 'resume' or 'restart', not {self.recovery!r}")
        unknown = self.actions - actions.CATALOG
        if unknown:
            raise ValueError(f"job kind {self.name!r} uses actions not in the catalog: {', '.join(sorted(unknown))}")
        unreachable = {state for state in self.moves_to
                       if not any(state in ALLOWED_TRANSITIONS[source] for source in ReplicationState)}
        if unreachable:
            raise ValueError(f"job kind {self.name!r} moves items to states no transition reaches: {unreachable}")


def declare(kind: JobKind[Any]) -> JobKind[Any]:
    """Make `kind` startable: the engine learns its name and actions, its hooks are registered."""
    existing = KINDS.get(kind.name)
    if existing is not None and existing is not kind:
        raise ValueError(f"job kind {kind.name!r} is declared twice")
    declare_kind(kind.name, kind.actions)
    for outcome, hooks in (("failed", kind.on_failed), ("cancelled", kind.on_cancelled),
                           ("succeeded", kind.on_succeeded)):
        for hook in hooks:
            job_hook(kind.name, outcome)(hook)
    KINDS[kind.name] = kind
    return kind


def start(kind: JobKind[Request], request: Request) -> str:
    """Start a job of `kind` for `request`; returns the job id. The engine checks the stages against the
    kind's actions before writing anything; ItemBusyError while another job holds one of its locks."""
    return start_job(kind.name, lock_key=kind.locks(request), stages=kind.build(request),
                     target=kind.target(request), params=kind.params(request))


def kind_named(name: str) -> JobKind[Any]:
    # Importing the kinds package declares every product kind.
    import workflows.kinds  # noqa: F401

    kind = KINDS.get(name)
    if kind is None:
        raise NotRestartableError(f"no job kind {name!r} is declared")
    return kind


def restart(name: str, params: Mapping[str, Any]) -> str:
    """Start the operation of a failed or cancelled job of kind `name` again, as a new job with the same
    request (what its params kept). Returns the new job id."""
    kind = kind_named(name)
    if kind.restart is None:
        raise NotRestartableError(f"jobs of kind {name!r} cannot be restarted from here")
    return kind.restart(params)


@dataclass(frozen=True)
class Recovery:
    job_id: str
    """The job that now carries the operation: the same job when resumed, a new one when restarted."""
    how: str
    """"resumed" or "restarted"."""


def recover(job: Mapping[str, Any]) -> Recovery:
    """The way out of a failed or cancelled job (a `get_job` dict), as its kind declares: resume it from the
    step where it stopped while it is still the latest job on what it is about, else start it again as a
    new job with the same request."""
    kind = kind_named(job["kind"])
    if kind.recovery == "resume" and _is_latest_on_target(job):
        reopen(job["id"])
        return Recovery(job["id"], "resumed")
    return Recovery(restart(kind.name, job["params"]), "restarted")


def _is_latest_on_target(job: Mapping[str, Any]) -> bool:
    # A newer job on the same item (a disable, a resync) changed what the stopped job would resume into.
    if job.get("target") is None:
        return True
    with session_scope() as session:
        newer = session.exec(select(Job.id).where(Job.target == job["target"], Job.id != job["id"],
                                                  Job.created_at > as_utc(datetime.fromisoformat(
                                                      job["created_at"])))).first()
    return newer is None


def stage_actions(stages: Sequence[Sequence[StepSpec]]) -> set[str]:
    """The action names a list of stages uses."""
    return {step.action for stage in stages for step in stage}
