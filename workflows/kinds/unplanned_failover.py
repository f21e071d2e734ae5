"""unplanned_failover: the primary is unreachable: bring the VM up at the recovery site from a point it
already has. The stages of planned_failover without touching the primary (no shutdown, no logs)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.failover import FailoverKind
from models.protection import ReplicationState
from workflows.failover_request import FAILOVER_STARTS_FROM, FailoverRequest, PointChoice, load_failover, record_of
from workflows.items import item_locks, item_target, start_for_item
from workflows.jobkind import JobKind, declare
from workflows.kinds.params import vm_job_params
from workflows.kinds.test_failover import FAILOVER_ACTIONS
from workflows.outcomes import failover_ended, operation_succeeded
from workflows.stages import failover

S = ReplicationState


def start(item_id: str, *, point: str = PointChoice.LATEST_PROCESSED, recovery_host: str | None = None,
          public_ips: dict[str, str] | None = None) -> str:
    """Fail the VM over to a point the recovery site has. Returns the job id."""
    return start_for_item(KIND, load_failover(item_id, FailoverKind.UNPLANNED, point=point,
                                              recovery_host=recovery_host, public_ips=public_ips))


def restart(params: Mapping[str, Any]) -> str:
    record = record_of(params)
    return start(params["item_id"], point=params.get("point", PointChoice.LATEST_PROCESSED),
                 recovery_host=params.get("recovery_host"),
                 public_ips=(record.details.get("public_ips") if record is not None else None) or None)


KIND: JobKind[FailoverRequest] = declare(JobKind(
    name="unplanned_failover",
    summary="Fail a VM over from a recovery point when its primary is unreachable",
    actions=FAILOVER_ACTIONS,
    build=failover, locks=item_locks, target=item_target, params=vm_job_params, restart=restart,
    starts_from=FAILOVER_STARTS_FROM[FailoverKind.UNPLANNED],
    moves_to=frozenset({S.FAILING_OVER, S.FAILED_OVER, S.PROTECTED, S.RESYNC_REQUIRED}),
    on_failed=(failover_ended,), on_succeeded=(operation_succeeded,), on_cancelled=(failover_ended,),
))
