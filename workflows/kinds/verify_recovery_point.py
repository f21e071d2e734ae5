"""verify_recovery_point: check the replica against a recovery point (the latest by default) without
touching the source: each disk's content at that point is read back from the recovery storage and its
manifest root compared with the one the point recorded. A mismatch fails the job, naming the disk and
chunk, and marks the item Warning.

Verify disk ×disks (R)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.db import session_scope
from models.protection import ProtectedItem
from workflows import actions as A
from workflows.engine import RECOVERY_QUEUE, StepSpec
from workflows.failover_request import PointChoice, resolve_point
from workflows.items import ItemRequest, item_job_params, item_locks, item_target, start_for_item, view_of
from workflows.jobkind import JobKind, declare
from workflows.outcomes import operation_succeeded, verification_failed
from workflows.stages import Stages


@dataclass(frozen=True)
class VerifyRequest(ItemRequest):
    point_id: str = ""


def build(request: VerifyRequest) -> Stages:
    params = {**request.params, "point_id": request.point_id}
    return [[StepSpec(f"Verify disk {disk.name} against recovery point", A.VERIFY_POINT, RECOVERY_QUEUE,
                      {**params, "disk_id": disk.id}) for disk in request.disks]]


def start(item_id: str, point: str | None = None) -> str:
    """Verify the replica against `point` (an id or a choice; the latest processed by default)."""
    view = view_of(item_id)
    with session_scope() as session:
        chosen = resolve_point(session, session.get(ProtectedItem, item_id), point or PointChoice.LATEST_PROCESSED)
    return start_for_item(KIND, VerifyRequest(**vars(ItemRequest.of(view, point_id=chosen.id)), point_id=chosen.id))


def restart(params: Mapping[str, Any]) -> str:
    return start(params["item_id"], params.get("point_id"))


KIND: JobKind[VerifyRequest] = declare(JobKind(
    name="verify_recovery_point",
    summary="Verify a recovery point from the recovery storage alone, disk by disk",
    actions=frozenset({A.VERIFY_POINT}),
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart,
    on_failed=(verification_failed,), on_succeeded=(operation_succeeded,),
))
