"""Recovery plans: many VMs failed over (or back) together, group by group, as one job.

A plan's job holds the lock of every protected item in it (and of the plan), so nothing else runs on those
VMs meanwhile. Its stages: for each group in order, the group's "before" actions one after another, then
every VM of the group side by side (stage k of the group runs stage k of each VM's own failover, as one
Celery group), then the group's "after" actions. A script action runs on an orchestration worker and
fails the job when it exits non-zero; a manual action pauses the job until `resume_plan` is called.

The per-VM stages are exactly those of the single-VM workflows (workflows/failover.py), so a VM in a plan
is checked, restored and verified the same way.
"""
from __future__ import annotations

import importlib
from typing import Any

from sqlmodel import Session

from models.db import session_scope
from models.failover import FailoverRecord
from models.jobs import Job
from models.plans import PlanOperation, get_plan, plan_items, validate_plan
from models.protection import ProtectedItem, item_lock_key
from workflows import engine, failover
from workflows.engine import ORCHESTRATION_QUEUE, StepSpec, job_hook

__all__ = ["start_plan", "resume_plan", "plan_lock_key", "PLAN_JOB_KINDS"]

RUN_SCRIPT = "plan.script"
MANUAL_ACTION = "plan.manual"
PLAN_JOB_KINDS = tuple(f"plan_{operation}" for operation in PlanOperation)


def plan_lock_key(plan_id: str) -> str:
    return f"plan:{plan_id}"


def _action_stage(group: dict[str, Any], when: str, action: dict[str, Any], plan_id: str) -> list[StepSpec]:
    label = f"Group {group['name']}: {when} action {action['name']}"
    if action["kind"] == "script":
        return [StepSpec(label, RUN_SCRIPT, ORCHESTRATION_QUEUE,
                         {"plan_id": plan_id, "command": list(action["command"]),
                          "timeout_s": float(action.get("timeout_s", 300))})]
    return [StepSpec(label, MANUAL_ACTION, ORCHESTRATION_QUEUE,
                     {"plan_id": plan_id, "instructions": action["instructions"]})]


def _vm_stages(item_id: str, operation: PlanOperation, options: dict[str, Any]) -> failover.Prepared:
    if operation is PlanOperation.FAILBACK:
        return failover.failback_stages(item_id, mode=options.get("mode", failover.FailbackMode.MINIMIZE_DOWNTIME),
                                        create_vm=bool(options.get("create_vm", False)), complete=True,
                                        label_vm=True)
    kind = {PlanOperation.TEST_FAILOVER: "test", PlanOperation.PLANNED_FAILOVER: "planned",
            PlanOperation.UNPLANNED_FAILOVER: "unplanned"}[operation]
    return failover.failover_stages(item_id, kind, point=options.get("point", failover.PointChoice.LATEST_PROCESSED),
                                    recovery_host=options.get("recovery_host"),
                                    test_network=options.get("test_network"), label_vm=True)


def start_plan(plan: str, operation: str, **options: Any) -> str:
    """Run the plan (by id or name) for `operation` (test_failover, planned_failover, unplanned_failover,
    failback). The plan is validated first, and every VM's own request too: nothing starts unless all can.
    Options: point, recovery_host, test_network (failovers); mode, create_vm (failback). Returns the job id."""
    operation = PlanOperation(operation)
    importlib.import_module("tasks.plans")
    with session_scope() as session:
        row = get_plan(session, plan)
        validate_plan(session, row, operation)
        groups = [dict(group) for group in row.groups]
        items_by_group = plan_items(session, row)
        plan_id, plan_name = row.id, row.name
    stages: list[list[StepSpec]] = []
    failover_ids: dict[str, str] = {}
    for group, item_ids in zip(groups, items_by_group):
        for action in group.get("before", []):
            stages.append(_action_stage(group, "before", action, plan_id))
        prepared = [_vm_stages(item_id, operation, options) for item_id in item_ids]
        failover_ids.update({p.item_id: p.params["failover_id"] for p in prepared})
        stages += failover.merge_vm_stages(prepared)
        for action in group.get("after", []):
            stages.append(_action_stage(group, "after", action, plan_id))
    item_ids = [item_id for group in items_by_group for item_id in group]
    failover._require_actions()
    return engine.start_job(
        f"plan_{operation}", lock_key=[plan_lock_key(plan_id), *(item_lock_key(i) for i in item_ids)],
        stages=stages, target=plan_id,
        params={"plan_id": plan_id, "plan": plan_name, "operation": str(operation), "item_ids": item_ids,
                "failover_ids": failover_ids, **{k: v for k, v in options.items() if v is not None}},
    )


def resume_plan(job_id: str, note: str = "") -> list[str]:
    """Resume a plan job waiting on a manual action."""
    return engine.resume(job_id, note=note)


def _on_end(job: Job, session: Session) -> None:
    """A plan job that failed or was cancelled: every VM it had started moving goes back to where it was
    (the same as its own failover job would)."""
    for item_id in job.params.get("item_ids", []):
        item = session.get(ProtectedItem, item_id)
        if item is None:
            continue
        record_id = job.params.get("failover_ids", {}).get(item_id)
        record = session.get(FailoverRecord, record_id) if record_id else None
        failover.revert_item(session, item, record, job.state.value,
                             f"recovery plan {job.params.get('plan')}: {job.error or job.state.value}")


for _kind in PLAN_JOB_KINDS:
    job_hook(_kind, "failed")(_on_end)
    job_hook(_kind, "cancelled")(_on_end)

