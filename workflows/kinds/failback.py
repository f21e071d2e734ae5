"""failback: bring a committed failover's VM back to the primary (or to another host).

Begin failback (O: `failing_back`) → Prepare VM on the primary (P: created if asked; shut down) → [full
download: Shut down recovery VM (D)] → Prepare staging disk ×disks (P) → Send differences ×disks (D) →
Download differences ×disks (P) → minimize downtime: Failback ready (O: `failback_ready`, the recovery VM
still running, `failback_completion` finishes); full download: the completion at once. The primary's
disks are only swapped when all is staged, so a cancel never touches them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.protection import ReplicationState
from workflows import actions as A
from workflows.failover_request import FailbackMode, FailbackRequest, load_failback, record_of
from workflows.items import item_locks, item_target, start_for_item
from workflows.jobkind import JobKind, declare
from workflows.kinds.params import vm_job_params
from workflows.outcomes import failover_ended, operation_succeeded
from workflows.stages import failback

S = ReplicationState

FAILBACK_ACTIONS = frozenset({A.BEGIN_FAILBACK, A.PREPARE_PRIMARY_VM, A.PREPARE_STAGING, A.SEND_DIFFERENCES,
                              A.DOWNLOAD_DIFFERENCES, A.FAILBACK_READY, A.SHUT_DOWN_RECOVERY_VM,
                              A.SEND_FINAL_CHANGES, A.APPLY_FINAL_CHANGES, A.SWAP_DISKS, A.FINISH_FAILBACK})


def start(item_id: str, *, mode: str = FailbackMode.MINIMIZE_DOWNTIME, create_vm: bool = False,
          host: str | None = None) -> str:
    """Fail back. Minimize downtime synchronizes while the recovery VM runs and stops at failback_ready;
    full download copies whole disks with the recovery VM off. Returns the job id."""
    return start_for_item(KIND, load_failback(item_id, mode=mode, create_vm=create_vm, host=host))


def restart(params: Mapping[str, Any]) -> str:
    record = record_of(params)
    return start(params["item_id"], mode=params.get("mode", FailbackMode.MINIMIZE_DOWNTIME),
                 create_vm=bool(record.details.get("create_vm", False)) if record is not None else False,
                 host=params.get("host"))


KIND: JobKind[FailbackRequest] = declare(JobKind(
    name="failback",
    summary="Fail a VM back to its primary site, staging its disks before the swap",
    actions=FAILBACK_ACTIONS,
    build=failback, locks=item_locks, target=item_target, params=vm_job_params, restart=restart,
    starts_from=(S.FAILOVER_COMMITTED,),
    moves_to=frozenset({S.FAILING_BACK, S.FAILBACK_READY, S.FAILED_BACK, S.FAILOVER_COMMITTED}),
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
