"""disable_protection: stop protecting a VM: its disks stop being tracked, its replicas, shipped logs and
recovery points are deleted, and the item ends `disabled` (protection can be enabled again). Refused while
any of its points is inside its retention lock (models/retention_lock.py): when requested, before a job
exists, and again by the job's first step.

Check retention lock (O) → Disable protection (O: `disabling_protection`) → Stop tracking disks (H: logs and
snapshot deleted) → Remove replica disks (R) → Finalize disabling protection (O: `disabled`).
"""
from __future__ import annotations

from models.db import database_now, session_scope
from models.protection import ALLOWED_TRANSITIONS, ProtectedItem, ReplicationState
from models.retention_lock import require_disable_allowed
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, RECOVERY_QUEUE, StepSpec
from workflows.items import (
    ItemRequest,
    item_job_params,
    item_locks,
    item_target,
    restart_on_item,
    start_on_item,
    view_of,
)
from workflows.jobkind import JobKind, declare
from workflows.outcomes import operation_succeeded, replication_failed
from workflows.stages import Stages

S = ReplicationState


def build(request: ItemRequest) -> Stages:
    params = request.params
    return [
        [StepSpec("Check retention lock", A.CHECK_RETENTION_LOCK, ORCHESTRATION_QUEUE, params)],
        [StepSpec("Disable protection", A.BEGIN_DISABLE, ORCHESTRATION_QUEUE, params)],
        [StepSpec("Stop tracking disks", A.STOP_TRACKING, request.queue, params)],
        [StepSpec("Remove replica disks", A.REMOVE_REPLICAS, RECOVERY_QUEUE, params)],
        [StepSpec("Finalize disabling protection", A.FINISH_DISABLE, ORCHESTRATION_QUEUE, params)],
    ]


def start(item_id: str) -> str:
    """Stop protecting the VM (RetentionLockError while one of its points is locked). Returns the job id."""
    with session_scope() as session:
        require_disable_allowed(session, session.get(ProtectedItem, item_id), database_now(session),
                                view_of(item_id).vm.name)
    return start_on_item(KIND, item_id, "disable protection of")


KIND = declare(JobKind(
    name="disable_protection",
    summary="Stop protecting a VM and delete its replicas and recovery points",
    actions=frozenset({A.CHECK_RETENTION_LOCK, A.BEGIN_DISABLE, A.STOP_TRACKING, A.REMOVE_REPLICAS,
                       A.FINISH_DISABLE}),
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart_on_item(start),
    recovery="resume",
    # Any state that may move to disabling_protection, and that state itself (a rerun after a failure).
    starts_from=(*(state for state, targets in ALLOWED_TRANSITIONS.items() if S.DISABLING_PROTECTION in targets),
                 S.DISABLING_PROTECTION),
    moves_to=frozenset({S.DISABLING_PROTECTION, S.DISABLED}),
    on_failed=(replication_failed,), on_succeeded=(operation_succeeded,),
))
