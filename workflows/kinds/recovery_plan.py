"""Recovery plans: many VMs failed over (or back) together, group by group, as one job: the kinds
`plan_test_failover`, `plan_planned_failover`, `plan_unplanned_failover` and `plan_failback`.

A plan's job holds the lock of the plan and of every protected item in it, so nothing else runs on those
VMs meanwhile. Its stages: for each group in order, the group's "before" actions one after another, then
every VM of the group side by side (stage k of the group runs stage k of each VM's own failover or
failback, as one Celery group), then the group's "after" actions. A script action runs a script
registered on the orchestration workers (tasks/plans.py) and fails the job when it exits non-zero; a
manual action pauses the job until it is resumed. The per-VM requests and stages are exactly those of
the one-VM kinds, so a VM in a plan is checked, restored and verified the same way.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session

from models.db import session_scope
from models.failover import FailoverKind, FailoverRecord
from models.jobs import Job
from models.plans import PlanOperation, get_plan, plan_items, validate_plan
from models.protection import ProtectedItem, item_lock_key, mark_healthy
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, StepSpec
from workflows.failover_request import FailbackMode, PointChoice, VmRequest, load_failback, load_failover
from workflows.jobkind import JobKind, declare, start
from workflows.kinds.failback import FAILBACK_ACTIONS
from workflows.kinds.planned_failover import KIND as PLANNED_FAILOVER
from workflows.outcomes import failure_code, revert_item
from workflows.stages import Stages, failback, failover, side_by_side

PLAN_OPTIONS = ("point", "recovery_host", "test_network", "mode", "create_vm")
_FAILOVER_KINDS = {PlanOperation.TEST_FAILOVER: FailoverKind.TEST, PlanOperation.PLANNED_FAILOVER: FailoverKind.PLANNED,
                   PlanOperation.UNPLANNED_FAILOVER: FailoverKind.UNPLANNED}


def plan_lock_key(plan_id: str) -> str:
    return f"plan:{plan_id}"


@dataclass(frozen=True)
class PlanGroup:
    name: str
    before: tuple[dict[str, Any], ...]
    vms: tuple[VmRequest, ...]
    after: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class PlanRequest:
    plan_id: str
    plan: str
    operation: str
    groups: tuple[PlanGroup, ...]
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def item_ids(self) -> list[str]:
        return [vm.item_id for group in self.groups for vm in group.vms]


def _action_stage(group: PlanGroup, when: str, action: dict[str, Any], plan_id: str) -> list[StepSpec]:
    label = f"Group {group.name}: {when} action {action['name']}"
    if action["kind"] == "script":
        # A plan stored with a command line never gets here: validate_plan refuses it (models.plans).
        return [StepSpec(label, A.RUN_SCRIPT, ORCHESTRATION_QUEUE,
                         {"plan_id": plan_id, "script": action["script"], "args": dict(action.get("args") or {}),
                          "timeout_s": float(action["timeout_s"])})]
    return [StepSpec(label, A.MANUAL_ACTION, ORCHESTRATION_QUEUE,
                     {"plan_id": plan_id, "instructions": action["instructions"]})]


def build(request: PlanRequest) -> Stages:
    vm_stages = failback if request.operation == PlanOperation.FAILBACK else failover
    stages: Stages = []
    for group in request.groups:
        stages += [_action_stage(group, "before", action, request.plan_id) for action in group.before]
        stages += side_by_side([vm_stages(vm) for vm in group.vms])
        stages += [_action_stage(group, "after", action, request.plan_id) for action in group.after]
    return stages


def _load_vm(item_id: str, operation: PlanOperation, options: Mapping[str, Any]) -> VmRequest:
    if operation is PlanOperation.FAILBACK:
        return load_failback(item_id, mode=options.get("mode", FailbackMode.MINIMIZE_DOWNTIME),
                             create_vm=bool(options.get("create_vm", False)), complete=True, label_vm=True)
    return load_failover(item_id, _FAILOVER_KINDS[operation],
                         point=options.get("point", PointChoice.LATEST_PROCESSED),
                         recovery_host=options.get("recovery_host"), test_network=options.get("test_network"),
                         label_vm=True)


def load_plan(plan: str, operation: str, **options: Any) -> PlanRequest:
    """Validate the plan (by id or name) for `operation`, and every VM's own request too: nothing starts
    unless all can."""
    operation = PlanOperation(operation)
    with session_scope() as session:
        row = get_plan(session, plan)
        validate_plan(session, row, operation)
        groups = [dict(group) for group in row.groups]
        items_by_group = plan_items(session, row)
        plan_id, plan_name = row.id, row.name
    return PlanRequest(plan_id, plan_name, str(operation), tuple(
        PlanGroup(group["name"], tuple(group.get("before", [])),
                  tuple(_load_vm(item_id, operation, options) for item_id in item_ids), tuple(group.get("after", [])))
        for group, item_ids in zip(groups, items_by_group, strict=True)
    ), tuple((key, value) for key, value in options.items() if value is not None))


def start_plan(plan: str, operation: str, **options: Any) -> str:
    """Run the plan (by id or name) for `operation` (test_failover, planned_failover, unplanned_failover,
    failback). Options: point, recovery_host, test_network (failovers); mode, create_vm (failback). Returns
    the job id."""
    return start(KINDS[PlanOperation(operation)], load_plan(plan, operation, **options))


def restart(params: Mapping[str, Any]) -> str:
    options = {key: params[key] for key in PLAN_OPTIONS if params.get(key) is not None}
    return start_plan(params["plan_id"], params["operation"], **options)


def _locks(request: PlanRequest) -> list[str]:
    return [plan_lock_key(request.plan_id), *(item_lock_key(item_id) for item_id in request.item_ids)]


def _params(request: PlanRequest) -> dict[str, Any]:
    return {"plan_id": request.plan_id, "plan": request.plan, "operation": request.operation,
            "item_ids": request.item_ids,
            "failover_ids": {vm.item_id: vm.failover_id for group in request.groups for vm in group.vms},
            **dict(request.options)}


def _plan_ended(job: Job, session: Session) -> None:
    """A plan job that failed or was cancelled: every VM it had started moving goes back to where it was
    (the same as its own failover job would)."""
    for item_id in job.params.get("item_ids", []):
        item = session.get(ProtectedItem, item_id)
        if item is None:
            continue
        record_id = job.params.get("failover_ids", {}).get(item_id)
        record = session.get(FailoverRecord, record_id) if record_id else None
        revert_item(session, item, record, job.state.value,
                    f"recovery plan {job.params.get('plan')}: {job.error or job.state.value}", failure_code(job.kind))


def _plan_succeeded(job: Job, session: Session) -> None:
    """The plan ran to its end: the error an earlier failed run of it left on its VMs is cleared (running it
    again is the way out of that failure)."""
    for item_id in job.params.get("item_ids", []):
        item = session.get(ProtectedItem, item_id)
        if item is not None:
            mark_healthy(session, item, failure_code(job.kind))


def _plan_kind(operation: PlanOperation, vm_actions: frozenset[str]) -> JobKind[PlanRequest]:
    return declare(JobKind(
        name=f"plan_{operation}",
        summary=f"Run a recovery plan's {operation.replace('_', ' ')}, group by group",
        actions=vm_actions | {A.RUN_SCRIPT, A.MANUAL_ACTION},
        build=build, locks=_locks, target=lambda request: request.plan_id, params=_params, restart=restart,
        on_failed=(_plan_ended,), on_cancelled=(_plan_ended,), on_succeeded=(_plan_succeeded,),
    ))


KINDS: dict[PlanOperation, JobKind[PlanRequest]] = {
    operation: _plan_kind(operation, FAILBACK_ACTIONS if operation is PlanOperation.FAILBACK
                          else PLANNED_FAILOVER.actions)
    for operation in PlanOperation
}
