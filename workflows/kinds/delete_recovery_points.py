"""delete_recovery_points: delete a protected VM's recovery points made before a time (an administrator's
request; never the latest point), and the replica versions only they needed. All or none: when any of them is
inside its retention lock the request is refused, naming when the lock ends, with nothing deleted: checked
when the job is requested (no job is created) and again by its first step.

Delete recovery points (O: the rows, after the lock check) → Prune replica versions ×disks (R: the undo logs
and manifests of versions before the oldest point kept)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from models.db import as_utc, database_now, session_scope
from models.protection import ProtectedItem, ReplicationState
from models.retention_lock import deletable_points_before
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, RECOVERY_QUEUE, StepSpec
from workflows.items import (
    ItemRequest,
    ItemView,
    item_job_params,
    item_locks,
    item_target,
    require_state,
    start_for_item,
    view_of,
)
from workflows.jobkind import JobKind, declare
from workflows.outcomes import operation_succeeded
from workflows.stages import Stages

S = ReplicationState


@dataclass(frozen=True)
class DeletePointsRequest(ItemRequest):
    before: str = ""
    """An ISO 8601 UTC time: the points made before it are deleted."""


def build(request: DeletePointsRequest) -> Stages:
    params = request.params
    return [
        [StepSpec("Delete recovery points", A.DELETE_POINTS, ORCHESTRATION_QUEUE,
                  {**params, "before": request.before})],
        [StepSpec(f"Prune replica versions of disk {disk.name}", A.PRUNE_POINT_VERSIONS, RECOVERY_QUEUE,
                  {**params, "disk_id": disk.id}) for disk in request.disks],
    ]


def check(item_id: str, before: datetime) -> int:
    """RetentionLockError (before any job exists) when a point the request would delete is locked now;
    otherwise how many points it would delete."""
    return _checked(view_of(item_id), before)


def _checked(view: ItemView, before: datetime) -> int:
    require_state(view, KIND.starts_from, "delete recovery points of")
    with session_scope() as session:
        item = session.get(ProtectedItem, view.item.id)
        return len(deletable_points_before(session, item, before, database_now(session), view.vm.name))


def start(item_id: str, before: datetime) -> str:
    """Delete the item's points made before `before` (checked against their retention locks first). Returns
    the job id."""
    view = view_of(item_id)
    _checked(view, before)
    moment = as_utc(before).isoformat()
    return start_for_item(KIND, DeletePointsRequest(**vars(ItemRequest.of(view, before=moment)), before=moment))


def restart(params: Mapping[str, Any]) -> str:
    return start(params["item_id"], datetime.fromisoformat(params["before"]))


KIND: JobKind[DeletePointsRequest] = declare(JobKind(
    name="delete_recovery_points",
    summary="Delete a VM's recovery points made before a time (never a locked one, never the latest)",
    actions=frozenset({A.DELETE_POINTS, A.PRUNE_POINT_VERSIONS}),
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart,
    # Replicating: a failover in progress or pending may be using the points.
    starts_from=(S.PROTECTED, S.RESYNC_REQUIRED),
    on_succeeded=(operation_succeeded,),
))
