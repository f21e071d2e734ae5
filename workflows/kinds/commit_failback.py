"""commit_failback: the VM runs on the primary for good: the recovery VM is deleted; reverse replication
comes next.

Delete recovery VM (D) → Commit failback (O: `failback_committed`)."""
from __future__ import annotations

from models.fabric import host_queue
from models.protection import ReplicationState
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, StepSpec
from workflows.failover_request import RecordRequest, current_failback, load_record_operation
from workflows.items import item_locks, item_target, restart_on_item, start_for_item
from workflows.jobkind import JobKind, declare
from workflows.kinds.params import vm_job_params
from workflows.outcomes import failover_ended, operation_succeeded
from workflows.stages import Stages

S = ReplicationState


def build(request: RecordRequest) -> Stages:
    return [
        [StepSpec("Delete recovery VM", A.DELETE_RECOVERY_VM, host_queue(request.recovery_host), request.params)],
        [StepSpec("Commit failback", A.COMMIT_FAILBACK, ORCHESTRATION_QUEUE, request.params)],
    ]


def start(item_id: str) -> str:
    """Commit the failback. Returns the job id."""
    return start_for_item(KIND, load_record_operation(item_id, KIND.starts_from, "commit the failback of",
                                                      current_failback))


KIND: JobKind[RecordRequest] = declare(JobKind(
    name="commit_failback",
    summary="Commit a failback: the recovery VM is deleted",
    actions=frozenset({A.DELETE_RECOVERY_VM, A.COMMIT_FAILBACK}),
    build=build, locks=item_locks, target=item_target, params=vm_job_params, restart=restart_on_item(start),
    starts_from=(S.FAILED_BACK,), moves_to=frozenset({S.FAILBACK_COMMITTED}),
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
