"""failback_completion: the second half of a minimize-downtime failback.

Begin failback completion (O) → Shut down recovery VM (D) → Send final changes (D: the tracker's logs since
the snapshot, the disk's final root) → Apply final changes ×disks (P: staging checked against that root) →
Swap in disks and start VM (P) → Finish failback (O: `failed_back`)."""
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
from workflows.stages import Stages, failback_completion

S = ReplicationState


def build(request: RecordRequest) -> Stages:
    return [[StepSpec("Begin failback completion", A.BEGIN_FAILBACK, ORCHESTRATION_QUEUE,
                      {**request.params, "completing": True})]] + failback_completion(
        request, host_queue(request.target_host), host_queue(request.recovery_host), shut_down=True)


def start(item_id: str) -> str:
    """Shut the recovery VM down, copy its last changes, swap, start. Returns the job id."""
    return start_for_item(KIND, load_record_operation(item_id, KIND.starts_from, "complete the failback of",
                                                      current_failback))


KIND: JobKind[RecordRequest] = declare(JobKind(
    name="failback_completion",
    summary="Complete a minimize-downtime failback: final changes, swap, start on the primary",
    actions=frozenset({A.BEGIN_FAILBACK, A.SHUT_DOWN_RECOVERY_VM, A.SEND_FINAL_CHANGES, A.APPLY_FINAL_CHANGES,
                       A.SWAP_DISKS, A.FINISH_FAILBACK}),
    build=build, locks=item_locks, target=item_target, params=vm_job_params, restart=restart_on_item(start),
    starts_from=(S.FAILBACK_READY,), moves_to=frozenset({S.FAILING_BACK, S.FAILED_BACK, S.FAILBACK_READY}),
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
