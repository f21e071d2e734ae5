"""test_failover_cleanup: delete a drill's test VM and close its record.

Delete test VM (D) → Finish test failover cleanup (O)."""
from __future__ import annotations

from models.fabric import host_queue
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, StepSpec
from workflows.failover_request import RecordRequest, current_drill, load_record_operation
from workflows.items import item_locks, item_target, restart_on_item, start_for_item
from workflows.jobkind import JobKind, declare
from workflows.kinds.params import vm_job_params
from workflows.outcomes import failover_ended, operation_succeeded
from workflows.stages import Stages


def build(request: RecordRequest) -> Stages:
    return [
        [StepSpec("Delete test VM", A.DELETE_RECOVERY_VM, host_queue(request.target_host), request.params)],
        [StepSpec("Finish test failover cleanup", A.FINISH_CLEANUP, ORCHESTRATION_QUEUE, request.params)],
    ]


def start(item_id: str) -> str:
    """Delete the drill's test VM. Returns the job id."""
    return start_for_item(KIND, load_record_operation(item_id, (), "clean up the test failover of", current_drill))


KIND: JobKind[RecordRequest] = declare(JobKind(
    name="test_failover_cleanup",
    summary="Delete a drill's test VM",
    actions=frozenset({A.DELETE_RECOVERY_VM, A.FINISH_CLEANUP}),
    build=build, locks=item_locks, target=item_target, params=vm_job_params, restart=restart_on_item(start),
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
