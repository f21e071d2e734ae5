"""What a job is made of, checked before anything is written: its stages of steps (`StepSpec`), each on a
queue the engine knows, with JSON params; its kind declared, and every step's action one its kind declared
(`validate_job`); its lock keys (`lock_keys`)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.db import validate_name
from workflows.engine.registry import HOST_QUEUE_PREFIX, ORCHESTRATION_QUEUE, RECOVERY_QUEUE, declared_kinds


@dataclass(frozen=True)
class StepSpec:
    name: str  # what the Jobs tab shows, e.g. "Copy disk disk0"
    action: str  # a registered action name
    queue: str  # "orchestration", "recovery" or "host.<hostname>"
    params: dict[str, Any] = field(default_factory=dict)  # ids, never data


def validate_queue(queue: object) -> str:
    if queue in (ORCHESTRATION_QUEUE, RECOVERY_QUEUE):
        return queue
    if isinstance(queue, str) and queue.startswith(HOST_QUEUE_PREFIX):
        validate_name(queue[len(HOST_QUEUE_PREFIX):], "host")
        return queue
    raise ValueError(f"queue {queue!r} is not 'orchestration', 'recovery' or 'host.<hostname>'")


def require_json_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict of ids and settings, not {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serializable: {exc}") from None
    return value


def _require_text(value: object, what: str, max_length: int) -> str:
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ValueError(f"{what} must be a non-empty string of at most {max_length} characters, not {value!r}")
    return value


def lock_keys_of(lock_key: object) -> list[str]:
    """`start_job`'s lock_key as the list of keys to take: none, one, or several (in order, each once:
    a plan naming an item twice still holds its one lock)."""
    if lock_key is None:
        return []
    if isinstance(lock_key, str):
        return [_require_text(lock_key, "lock key", 255)]
    if not isinstance(lock_key, Sequence):
        raise ValueError(f"lock_key must be a string, a sequence of strings or None, not {type(lock_key).__name__}")
    return list(dict.fromkeys(_require_text(key, "lock key", 255) for key in lock_key))


def validate_job(kind: object, stages: object, target: object, params: object) -> None:
    """Refuse, before anything is written, a job whose kind is not declared or whose steps use an action
    its kind did not declare, or whose parts are not what the database and the messages can carry."""
    _require_text(kind, "job kind", 64)
    allowed = declared_kinds.get(kind)
    if allowed is None:
        raise ValueError(f"no job kind {kind!r} is declared (see workflows/kinds/)")
    if target is not None:
        _require_text(target, "job target", 255)
    require_json_object(params, "job params")
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError(f"a {kind} job needs at least one stage of steps")
    for stage_no, stage in enumerate(stages):
        if not isinstance(stage, (list, tuple)) or not stage:
            raise ValueError(f"stage {stage_no} of the {kind} job has no steps")
        for index, spec in enumerate(stage):
            where = f"stage {stage_no} step {index}"
            if not isinstance(spec, StepSpec):
                raise ValueError(f"{where} is a {type(spec).__name__}, not a StepSpec")
            where = f"{where} ({spec.name!r})"
            _require_text(spec.name, f"the name of {where}", 255)
            if spec.action not in allowed:
                raise ValueError(f"{where}: action {spec.action!r} is not one the {kind} job kind declares")
            try:
                validate_queue(spec.queue)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            require_json_object(spec.params, f"the params of {where}")
