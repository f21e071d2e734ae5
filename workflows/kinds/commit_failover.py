"""commit_failover: the recovery site's VM is the VM from now on; failback is possible afterwards.

Commit failover (O: `failover_committed`)."""
from __future__ import annotations

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
    return [[StepSpec("Commit failover", A.COMMIT, ORCHESTRATION_QUEUE, request.params)]]


def start(item_id: str) -> str:
    """Commit the failover. Returns the job id."""
    return start_for_item(KIND, load_record_operation(item_id, KIND.starts_from, "commit the failover of",
                                                      current_failover))


KIND: JobKind[RecordRequest] = declare(JobKind(
    name="commit_failover",
    summary="Commit a failover: the recovery VM is the VM from now on",
    actions=frozenset({A.COMMIT}),
    build=build, locks=item_locks, target=item_target, params=vm_job_params, restart=restart_on_item(start),
    starts_from=(S.FAILED_OVER,), moves_to=frozenset({S.FAILOVER_COMMITTED}),
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
