"""test_failover (a drill): the VM comes up at the recovery site, in an isolated test network, from the
chosen point while the item keeps replicating.

[Ship/Apply/Acknowledge logs when the point is `latest`] → Begin test failover (O: the record) → Choose
recovery point (O) → Create recovery VM (D: `<vm>-test`, off, NICs in the test network) → Restore disk
×disks (D) → Start recovery VM (D: roots checked against the point's; a QEMU guest boots in an isolated network) →
Check recovery VM boot (D: heartbeat and application check on its console) → Finish test failover (O: RTO to
the heartbeat).
`test_failover_cleanup` deletes the test VM.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.failover import FailoverKind
from workflows import actions as A
from workflows.failover_request import FAILOVER_STARTS_FROM, FailoverRequest, PointChoice, load_failover, record_of
from workflows.items import item_locks, item_target, start_for_item
from workflows.jobkind import JobKind, declare
from workflows.kinds.params import vm_job_params
from workflows.outcomes import failover_ended, operation_succeeded
from workflows.stages import failover

FAILOVER_ACTIONS = frozenset({A.SHIP_LOGS, A.APPLY_LOGS, A.ACKNOWLEDGE_LOGS, A.BEGIN_FAILOVER, A.CHOOSE_POINT,
                              A.CREATE_RECOVERY_VM, A.RESTORE_DISK, A.START_RECOVERY_VM, A.CHECK_RECOVERY_BOOT,
                              A.FINISH_FAILOVER})


def start(item_id: str, *, point: str = PointChoice.LATEST_PROCESSED, recovery_host: str | None = None,
          test_network: str | None = None) -> str:
    """Run a drill. Returns the job id; the report is on the item's latest test failover record."""
    return start_for_item(KIND, load_failover(item_id, FailoverKind.TEST, point=point, recovery_host=recovery_host,
                                              test_network=test_network))


def restart(params: Mapping[str, Any]) -> str:
    record = record_of(params)
    network = (record.network or "").split(", ")[0] if record is not None else None
    return start(params["item_id"], point=params.get("point", PointChoice.LATEST_PROCESSED),
                 recovery_host=params.get("recovery_host"), test_network=network or None)


KIND: JobKind[FailoverRequest] = declare(JobKind(
    name="test_failover",
    summary="A drill: boot the VM at the recovery site from a point, in an isolated network",
    actions=FAILOVER_ACTIONS,
    build=failover, locks=item_locks, target=item_target, params=vm_job_params, restart=restart,
    starts_from=FAILOVER_STARTS_FROM[FailoverKind.TEST],
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
