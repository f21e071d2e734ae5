"""planned_failover: shut the VM down, ship and apply its last changes, bring it up at the recovery site:
no data loss.

Begin failover (O: `failing_over`) → Shut down VM (P) → Ship/Apply/Acknowledge logs → Choose recovery point
(the one just made) → Create recovery VM (D: NICs in the mapped recovery networks) → Restore disk ×disks
→ Start recovery VM (D: roots checked, public addresses assigned, disks tracked) → Finish failover (O:
`failed_over`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.failover import FailoverKind
from models.protection import ReplicationState
from workflows import actions as A
from workflows.failover_request import FAILOVER_STARTS_FROM, FailoverRequest, load_failover, record_of
from workflows.items import item_locks, item_target, start_for_item
from workflows.jobkind import JobKind, declare
from workflows.kinds.params import vm_job_params
from workflows.kinds.test_failover import FAILOVER_ACTIONS
from workflows.outcomes import failover_ended, operation_succeeded
from workflows.stages import failover

S = ReplicationState


def start(item_id: str, *, recovery_host: str | None = None, public_ips: dict[str, str] | None = None) -> str:
    """Fail the VM over without data loss. Returns the job id."""
    return start_for_item(KIND, load_failover(item_id, FailoverKind.PLANNED, recovery_host=recovery_host,
                                              public_ips=public_ips))


def restart(params: Mapping[str, Any]) -> str:
    record = record_of(params)
    return start(params["item_id"], recovery_host=params.get("recovery_host"),
                 public_ips=(record.details.get("public_ips") if record is not None else None) or None)


KIND: JobKind[FailoverRequest] = declare(JobKind(
    name="planned_failover",
    summary="Fail a VM over without data loss: shut it down, ship its last changes, boot it at the recovery site",
    actions=FAILOVER_ACTIONS | {A.SHUT_DOWN_PRIMARY},
    build=failover, locks=item_locks, target=item_target, params=vm_job_params, restart=restart,
    starts_from=FAILOVER_STARTS_FROM[FailoverKind.PLANNED],
    moves_to=frozenset({S.FAILING_OVER, S.FAILED_OVER, S.PROTECTED}),
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
