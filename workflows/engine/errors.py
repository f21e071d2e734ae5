"""The engine's errors, and how it names an error in a job record."""
from __future__ import annotations

from datapath.errors import NonRecoverableError


class ItemBusyError(NonRecoverableError):
    """Another job holds the lock this job needs (one workflow at a time per protected item)."""


class JobNotFoundError(NonRecoverableError):
    """No job has this id."""


class JobStateError(NonRecoverableError):
    """The job is not in a state that allows the operation."""


class PoisonStepError(NonRecoverableError):
    """A step's worker died too many times while running it: the step itself is the likely cause."""


class StepCancelled(Exception):
    """Raised inside a running action once its run lost the lease: the job was cancelled or failed, or
    the step was handed to another worker. The action must stop; nothing it does now is recorded."""


class AwaitingOperator(Exception):
    """Raised by an action that is a manual step: `raise AwaitingOperator("Switch DNS to the recovery
    site, then resume")`. Not an error: the step waits (waiting_action, its instructions recorded) and
    the job with it, keeping its locks, until `resume` marks the step done or `cancel` ends the job.
    The action is not run again: resuming is what completes it."""

    def __init__(self, instructions: str) -> None:
        if not isinstance(instructions, str) or not instructions.strip():
            raise ValueError(f"a manual action must say what the operator is to do, not {instructions!r}")
        super().__init__(instructions)
        self.instructions = instructions


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def poison_reason(deaths: int) -> str:
    return f"worker died {deaths} times while running this step (poison message?)"

