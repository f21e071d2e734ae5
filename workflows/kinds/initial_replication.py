"""initial_replication: the scheduled start of a VM's initial replication (enable_protection ended with the
item `initial_replication_pending`): Take VM snapshot … Finalize protection."""
from __future__ import annotations

from models.protection import ReplicationState
from workflows import actions as A
from workflows.items import (
    ItemRequest,
    item_job_params,
    item_locks,
    item_target,
    restart_on_item,
    start_on_item,
)
from workflows.jobkind import JobKind, declare
from workflows.outcomes import operation_succeeded, replication_failed
from workflows.stages import Stages, initial_replication

S = ReplicationState


def build(request: ItemRequest) -> Stages:
    return initial_replication(request, enter_state=S.INITIAL_REPLICATION.value)


def start(item_id: str) -> str:
    """Start a scheduled initial replication now. Returns the job id."""
    return start_on_item(KIND, item_id, "start the initial replication of")


KIND = declare(JobKind(
    name="initial_replication",
    summary="The scheduled initial replication of a protected VM",
    actions=frozenset({A.SNAPSHOT_VM, A.COPY_DISK, A.DELETE_SNAPSHOT, A.SHIP_LOGS, A.APPLY_LOGS,
                       A.ACKNOWLEDGE_LOGS, A.FINALIZE}),
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart_on_item(start),
    recovery="resume",
    starts_from=(S.INITIAL_REPLICATION_PENDING,),
    moves_to=frozenset({S.INITIAL_REPLICATION, S.PROTECTED, S.RESYNC_REQUIRED}),
    on_failed=(replication_failed,), on_succeeded=(operation_succeeded,),
))
