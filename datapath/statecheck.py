"""Whether a replica's recovery-side state agrees with what the database recorded of it.

The state object beside a replica (`<disk>.vhd.state.json`) is what the data path reads to know which
generation the replica holds; the database's record (models.replicas) is what the steps that changed the
replica wrote after doing so. Every step that trusts the state compares the two first (`check_state`):

- equal: go on;
- missing or unreadable while the record says the replica exists: refused;
- behind the record (an older state put back, a restored backup): refused: logs the record counts as
  applied would be missing from the replica, and applying the next ones would build on the wrong bytes;
- ahead of the record: refused, except for the trace of a step that completed on the recovery side and
  crashed before recording it. That trace is whole versions: each version after the recorded one has its
  manifest stored, the state's root is the stored root of its version, and no more generations than
  versions were added (a log is one version and one generation; a resync one version and any number of
  generations; a repair one version and none). A state whose generation moved without a version, as in
  the measured failure (applied_generation bumped by one), is refused.

A refusal is `ReplicaStateMismatchError` (non-recoverable: no retry makes the two agree), naming both
values; the workflow marks the disk for resynchronization, which rebuilds the replica from the source.

Celery-free: the record is passed in as plain values (`RecordedState`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from datapath.errors import NonRecoverableError
from datapath.points import load_manifest
from datapath.replication import ReplicaDisk, ReplicaState
from sites.storage.base import ObjectNotFoundError


class ReplicaStateMismatchError(NonRecoverableError):
    """The recovery side's state of a replica disagrees with the database's record of it."""


@dataclass(frozen=True)
class RecordedState:
    """What the database recorded of one replica (models.replicas.ReplicaRecord, as values)."""

    initial_copy_done: bool
    applied_generation: int
    version: int
    manifest_root: str | None
    shipped_generation: int | None = None
    """The highest generation recorded as shipped, when known: no apply can have gone past it."""


@dataclass(frozen=True)
class Agreement:
    state: ReplicaState
    """The recovery side's state, checked."""
    adopted: bool
    """The state was ahead by the trace of a completed step that did not record it: the caller records it."""


def read_state(replica: ReplicaDisk) -> ReplicaState | None:
    """The replica's state; None when there is none; ReplicaStateMismatchError when it cannot be read as
    a state (not JSON, fields missing or of the wrong type)."""
    try:
        raw = replica.storage.read_object(replica.state_name)
    except ObjectNotFoundError:
        return None
    try:
        state = ReplicaState(**json.loads(raw))
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ReplicaStateMismatchError(
            f"replica {replica.name}: its recovery-side state {replica.state_name} is unreadable ({exc}); "
            f"the disk needs resynchronization"
        ) from None
    fields = ("applied_generation", "version", "copy_started_generation", "copy_checkpoint", "size")
    if not all(isinstance(getattr(state, name), int) and not isinstance(getattr(state, name), bool)
               for name in fields) or not isinstance(state.initial_copy_done, bool):
        raise ReplicaStateMismatchError(
            f"replica {replica.name}: its recovery-side state {replica.state_name} is unreadable (a field "
            f"is not of its type: {json.loads(raw)!r}); the disk needs resynchronization"
        )
    return state


def _describe(generation: int, version: int) -> str:
    return f"generation {generation} applied (version {version})"


def check_state(replica: ReplicaDisk, recorded: RecordedState) -> Agreement:
    """The replica's state if it agrees with `recorded` (see the module docstring);
    ReplicaStateMismatchError naming both otherwise."""
    state = read_state(replica)
    where = f"replica {replica.name}: the recovery side's state ({replica.state_name})"
    recorded_text = _describe(recorded.applied_generation, recorded.version)
    database = f"the database records {recorded_text}"
    resync = "the disk needs resynchronization"
    if state is None:
        if not recorded.initial_copy_done:
            raise ReplicaStateMismatchError(f"replica {replica.name} has no completed initial copy")
        raise ReplicaStateMismatchError(f"{where} is missing, but {database}; {resync}")
    if not recorded.initial_copy_done:
        if state.initial_copy_done:
            raise ReplicaStateMismatchError(
                f"{where} says its initial copy is done, but the database records none; {resync}")
        raise ReplicaStateMismatchError(f"replica {replica.name} has no completed initial copy")
    says = f"says {_describe(state.applied_generation, state.version)}"
    if not state.initial_copy_done:
        raise ReplicaStateMismatchError(
            f"{where} says a copy is in progress (no completed copy), but {database}; {resync}")
    generations = state.applied_generation - recorded.applied_generation
    versions = state.version - recorded.version
    if generations == 0 and versions == 0:
        if recorded.manifest_root is not None and state.manifest_root != recorded.manifest_root:
            raise ReplicaStateMismatchError(
                f"{where} {says} with manifest root {state.manifest_root}, but {database} with root "
                f"{recorded.manifest_root}; {resync}")
        return Agreement(state, adopted=False)
    if generations < 0 or versions < 0:
        raise ReplicaStateMismatchError(f"{where} {says}: behind the database, which records {recorded_text}; {resync}")
    shipped = recorded.shipped_generation
    if shipped is not None and state.applied_generation > max(shipped, recorded.applied_generation):
        raise ReplicaStateMismatchError(
            f"{where} {says}: ahead of the database, which records {recorded_text} and generation "
            f"{max(shipped, recorded.applied_generation)} as the last one shipped: no apply can have reached "
            f"generation {state.applied_generation}; {resync}")
    if generations <= versions and completed_ahead(replica, state, recorded):
        return Agreement(state, adopted=True)
    raise ReplicaStateMismatchError(
        f"{where} {says}: ahead of the database, which records {recorded_text}, and no step recorded the "
        f"difference; {resync}")


def completed_ahead(replica: ReplicaDisk, state: ReplicaState, recorded: RecordedState) -> bool:
    """Whether `state` is ahead of `recorded` by whole completed versions: each version after the
    recorded one up to the state's has its manifest stored, the last with the state's root (what a step
    leaves once its change is complete), and the generation did not go back."""
    if state.version <= recorded.version or state.applied_generation < recorded.applied_generation:
        return False
    if not state.initial_copy_done:
        return False
    for version in range(recorded.version + 1, state.version + 1):
        manifest = load_manifest(replica, version)
        if manifest is None:
            return False
    return manifest.root_hex == state.manifest_root
