"""reverse_replication: protect a failed-back VM again: its disks are resynchronized against the replica
(only differing blocks are sent), then delta replication resumes.

Begin reverse replication (O) → the resynchronization stages (`workflows.stages.resynchronization`)."""
from __future__ import annotations

from models.protection import ReplicationState
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, StepSpec
from workflows.items import (
    ItemRequest,
    item_job_params,
    item_locks,
    item_target,
    restart_on_item,
    start_on_item,
)
from workflows.jobkind import JobKind, declare
from workflows.kinds.resynchronize import KIND as RESYNCHRONIZE
from workflows.outcomes import operation_succeeded, replication_failed
from workflows.stages import Stages, resynchronization

S = ReplicationState


def build(request: ItemRequest) -> Stages:
    return [[StepSpec("Begin reverse replication", A.BEGIN_REVERSE, ORCHESTRATION_QUEUE, request.params)],
            *resynchronization(request)]


def start(item_id: str) -> str:
    """Start reverse replication. Returns the job id."""
    return start_on_item(KIND, item_id, "reverse-replicate")


KIND: JobKind[ItemRequest] = declare(JobKind(
    name="reverse_replication",
    summary="Protect a failed-back VM again, resynchronizing only what differs from its replica",
    actions=RESYNCHRONIZE.actions | {A.BEGIN_REVERSE},
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart_on_item(start),
    recovery="resume",
    starts_from=(S.FAILBACK_COMMITTED,),
    moves_to=frozenset({S.RESYNCHRONIZING, S.PROTECTED, S.RESYNC_REQUIRED}),
    on_failed=(replication_failed,), on_succeeded=(operation_succeeded,),
))
