"""cancel_failover: before commit, delete the recovery VM and let the primary run and replicate again.

Delete recovery VM (D) → [Start VM on the primary (P), after a planned failover] → Finish cancelling
failover (O: `protected`)."""
from __future__ import annotations

from models.fabric import host_queue
from models.failover import FailoverKind
from models.protection import ReplicationState
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, StepSpec
from workflows.failover_request import RecordRequest, current_failover, load_record_operation
from workflows.items import item_locks, item_target, restart_on_item, start_for_item
from workflows.jobkind import JobKind, declare
from workflows.kinds.params import vm_job_params
from workflows.outcomes import failover_ended, operation_succeeded
from workflows.stages import Stages

S = ReplicationState


def build(request: RecordRequest) -> Stages:
    params = request.params
    stages = [[StepSpec("Delete recovery VM", A.DELETE_RECOVERY_VM, host_queue(request.target_host), params)]]
    if request.record_kind == FailoverKind.PLANNED:
        stages.append([StepSpec("Start VM on the primary", A.RESUME_PRIMARY, request.queue, params)])
    return stages + [[StepSpec("Finish cancelling failover", A.FINISH_CANCEL, ORCHESTRATION_QUEUE, params)]]


def start(item_id: str) -> str:
    """Cancel the failover. Returns the job id."""
    return start_for_item(KIND, load_record_operation(item_id, KIND.starts_from, "cancel the failover of",
                                                      current_failover))


KIND: JobKind[RecordRequest] = declare(JobKind(
    name="cancel_failover",
    summary="Cancel an uncommitted failover: delete the recovery VM, the primary replicates again",
    actions=frozenset({A.DELETE_RECOVERY_VM, A.RESUME_PRIMARY, A.FINISH_CANCEL}),
    build=build, locks=item_locks, target=item_target, params=vm_job_params, restart=restart_on_item(start),
    starts_from=(S.FAILED_OVER,), moves_to=frozenset({S.PROTECTED}),
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
