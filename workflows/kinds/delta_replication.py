"""delta_replication: one copy-frequency cycle of a protected VM, started by the scheduler.

Ship logs (H: seal every disk, also one without writes, then upload) → Apply logs (R: apply, record the
recovery point, prune past retention) → Acknowledge logs (H) → Update replication health (O: RPO, unsent
share, next delta due).
"""
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
from workflows.outcomes import operation_succeeded, replication_failed
from workflows.stages import Stages, merge_logs

S = ReplicationState


def build(request: ItemRequest) -> Stages:
    return merge_logs(request) + [
        [StepSpec("Update replication health", A.UPDATE_HEALTH, ORCHESTRATION_QUEUE, request.params)],
    ]


def start(item_id: str) -> str:
    """One delta replication cycle of a protected item. Returns the job id."""
    return start_on_item(KIND, item_id, "replicate the changes of")


KIND = declare(JobKind(
    name="delta_replication",
    summary="One delta replication cycle: ship, apply and acknowledge the sealed logs, update health",
    actions=frozenset({A.SHIP_LOGS, A.APPLY_LOGS, A.ACKNOWLEDGE_LOGS, A.UPDATE_HEALTH}),
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart_on_item(start),
    starts_from=(S.PROTECTED,),
    moves_to=frozenset({S.RESYNC_REQUIRED}),
    on_failed=(replication_failed,), on_succeeded=(operation_succeeded,),
))
