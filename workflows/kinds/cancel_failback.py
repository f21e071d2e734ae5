"""cancel_failback: stop a failback before its swap: the running failback job is cancelled, then the
staging disks are discarded and the recovery VM runs on. The primary's disks are exactly as they were.

Discard staging disks (P) → Start recovery VM (D) → Finish cancelling failback (O: `failover_committed`)."""
from __future__ import annotations

import time

from models.fabric import host_queue
from models.failover import FailoverStatus
from models.protection import InvalidStateError, ReplicationState
from workflows import actions as A
from workflows import engine
from workflows.engine import ORCHESTRATION_QUEUE, StepSpec
from workflows.failover_request import RecordRequest, current_failback, load_record_operation, record_of
from workflows.items import item_locks, item_target, lock_holder, restart_on_item, start_for_item
from workflows.jobkind import JobKind, declare
from workflows.kinds.params import vm_job_params
from workflows.outcomes import failover_ended, operation_succeeded
from workflows.stages import Stages

S = ReplicationState
# How long a cancel waits for the cancelled failback job to let go of the item.
CANCEL_WAIT_S = 60.0


def build(request: RecordRequest) -> Stages:
    params = request.params
    return [
        [StepSpec("Discard staging disks", A.DISCARD_STAGING, host_queue(request.target_host), params)],
        [StepSpec("Start recovery VM", A.RESTART_RECOVERY_VM, host_queue(request.recovery_host), params)],
        [StepSpec("Finish cancelling failback", A.FINISH_FAILBACK_CANCEL, ORCHESTRATION_QUEUE, params)],
    ]


def start(item_id: str, *, wait_s: float = CANCEL_WAIT_S) -> str:
    """Cancel the failback (and the failback job still running). Returns the job id."""
    request = load_record_operation(item_id, KIND.starts_from, "cancel the failback of", current_failback)
    holder = lock_holder(item_id)
    if holder is not None:
        if holder.kind not in ("failback", "failback_completion"):
            raise engine.ItemBusyError(f"VM {request.vm!r} is busy with job {holder.id} ({holder.kind})")
        engine.cancel(holder.id)
        deadline = time.monotonic() + wait_s
        while lock_holder(item_id) is not None:
            if time.monotonic() > deadline:
                raise engine.ItemBusyError(
                    f"failback job {holder.id} of VM {request.vm!r} is cancelled but a step of it is still "
                    f"running; call cancel again once it stops"
                )
            time.sleep(0.1)
    record = record_of({"failover_id": request.failover_id})
    if record.status is FailoverStatus.SUCCEEDED:
        raise InvalidStateError(f"the failback of VM {request.vm!r} has swapped the disks already: commit it")
    return start_for_item(KIND, request)


KIND: JobKind[RecordRequest] = declare(JobKind(
    name="cancel_failback",
    summary="Cancel a failback before its swap: the recovery VM stays the VM",
    actions=frozenset({A.DISCARD_STAGING, A.RESTART_RECOVERY_VM, A.FINISH_FAILBACK_CANCEL}),
    build=build, locks=item_locks, target=item_target, params=vm_job_params, restart=restart_on_item(start),
    starts_from=(S.FAILING_BACK, S.FAILBACK_READY, S.FAILOVER_COMMITTED),
    moves_to=frozenset({S.FAILOVER_COMMITTED}),
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
