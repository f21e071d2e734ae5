"""consistency_check: compare every disk of a protected VM with its replica, byte for byte through their
checksums, at the same generation, and resynchronize only the chunks that drifted.

Delete leftover VM snapshot (H) → Take VM snapshot (H; the snapshot's content is every write up to the
generation its seal ended) → Ship logs (H; only the logs sealed already, so the replica stops at that
generation) → Apply logs (R) →
Acknowledge logs (H) → Check disk ×disks (H: both sides checksummed, drifted chunks reported and
repaired) → Delete VM snapshot (H) → Finish consistency check (O: drift turns the item Warning with the
chunks and the reason; none clears it). Started from the CLI (`asr check`), the API, or by the scheduler
every `consistency_check_interval_h` of the item's policy, outside office hours by default.
"""
from __future__ import annotations

from models.protection import ReplicationState
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, RECOVERY_QUEUE, StepSpec
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
from workflows.stages import Stages

S = ReplicationState


def build(request: ItemRequest) -> Stages:
    params = request.params
    return [
        # A check that failed after its snapshot left it behind (nothing else does: the other kinds that
        # snapshot leave the item out of `protected` when they fail); comparing against it would fail.
        [StepSpec("Delete leftover VM snapshot", A.DELETE_SNAPSHOT, request.queue, params)],
        [StepSpec("Take VM snapshot", A.SNAPSHOT_VM, request.queue, {**params, "enter_state": None})],
        [StepSpec("Ship logs", A.SHIP_LOGS, request.queue, {**params, "seal": False})],
        [StepSpec("Apply logs", A.APPLY_LOGS, RECOVERY_QUEUE, params)],
        [StepSpec("Acknowledge logs", A.ACKNOWLEDGE_LOGS, request.queue, params)],
        [StepSpec(f"Check disk {disk.name}", A.CHECK_DISK, request.queue, {**params, "disk_id": disk.id})
         for disk in request.disks],
        [StepSpec("Delete VM snapshot", A.DELETE_SNAPSHOT, request.queue, params)],
        [StepSpec("Finish consistency check", A.FINISH_CHECK, ORCHESTRATION_QUEUE, params)],
    ]


def start(item_id: str) -> str:
    """Check the item's replicas against their sources now. Returns the job id."""
    return start_on_item(KIND, item_id, "check the consistency of")


KIND = declare(JobKind(
    name="consistency_check",
    summary="Compare every disk with its replica at the same generation; resynchronize only drifted chunks",
    actions=frozenset({A.SNAPSHOT_VM, A.SHIP_LOGS, A.APPLY_LOGS, A.ACKNOWLEDGE_LOGS, A.CHECK_DISK,
                       A.DELETE_SNAPSHOT, A.FINISH_CHECK}),
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart_on_item(start),
    starts_from=(S.PROTECTED,),
    moves_to=frozenset({S.RESYNC_REQUIRED}),
    on_failed=(replication_failed,), on_succeeded=(operation_succeeded,),
))
