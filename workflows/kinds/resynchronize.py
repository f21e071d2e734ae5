"""resynchronize: send only the blocks of a VM's disks that differ from its replica, then resume replication.

Take VM snapshot (H; the item becomes `resynchronizing`) → Resynchronize disk ×disks (H) → Ship/Apply/
Acknowledge logs → Resume replication (O: `protected`, Healthy). Earlier recovery points are kept. A
manual resync runs at once; an automatic one refuses to start inside the policy's office hours.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.protection import InvalidStateError, ReplicationState
from workflows import actions as A
from workflows import clock
from workflows.items import (
    ItemRequest,
    item_job_params,
    item_locks,
    item_target,
    require_state,
    start_for_item,
    view_of,
)
from workflows.jobkind import JobKind, declare
from workflows.outcomes import operation_succeeded, replication_failed
from workflows.stages import Stages, resynchronization

S = ReplicationState


def build(request: ItemRequest) -> Stages:
    return resynchronization(request)


def start(item_id: str, *, manual: bool = True) -> str:
    """Resynchronize the item's disks. Returns the job id."""
    view = view_of(item_id)
    require_state(view, KIND.starts_from, "resynchronize")
    if not manual and view.policy.in_office_hours(clock.now()):
        raise InvalidStateError(
            f"automatic resync of VM {view.vm.name!r} waits for the end of the office hours of policy "
            f"{view.policy.name!r}; start a manual resync to run it now"
        )
    return start_for_item(KIND, ItemRequest.of(view, manual=manual))


def restart(params: Mapping[str, Any]) -> str:
    return start(params["item_id"], manual=bool(params.get("manual", True)))


KIND = declare(JobKind(
    name="resynchronize",
    summary="Resynchronize a VM's replica, sending only differing blocks, then resume replication",
    actions=frozenset({A.SNAPSHOT_VM, A.RESYNC_DISK, A.SHIP_LOGS, A.APPLY_LOGS, A.ACKNOWLEDGE_LOGS, A.FINALIZE}),
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart,
    recovery="resume",
    starts_from=(S.RESYNC_REQUIRED, S.RESYNCHRONIZING, S.PROTECTED),
    moves_to=frozenset({S.RESYNC_REQUIRED, S.RESYNCHRONIZING, S.PROTECTED}),
    on_failed=(replication_failed,), on_succeeded=(operation_succeeded,),
))
