"""Recovery plans: groups of VMs failed over (and back) in order, with scripts and manual actions between."""
from __future__ import annotations

from typing import Any

from sqlmodel import select

from models.db import session_scope
from models.fabric import VirtualMachine
from models.plans import PlanOperation, RecoveryPlan, get_plan
from models.plans import create_plan as _create_plan
from models.plans import list_plans as _list_plans
from models.protection import ProtectedItem
from sites.planscripts import ScriptRegistryError, load_registry
from workflows import settings
from workflows.kinds.recovery_plan import PLAN_OPTIONS, load_plan, start_plan

from .errors import Conflict, Invalid, _operation
from .failover import POINT_CHOICES, _failback_mode
from .lookups import _check_host, _name
from .presenters import _job_ref, _plan_dict


@_operation
def create_plan(name: str, groups: list[dict], description: str = "") -> dict:
    """A recovery plan: groups in failover order, each {"name", "vms": [VM name, "host/name" or id],
    "before": [action], "after": [action]}; an action is {"kind": "script", "name", "script": a registered
    script's name, "args": {argument: value}, "timeout_s"} or {"kind": "manual", "name", "instructions"}.
    Every problem is reported at once."""
    _name(name, "recovery plan")
    with session_scope() as session:
        existing = session.exec(select(RecoveryPlan).where(RecoveryPlan.name == name)).first()
        if existing is not None:
            raise Conflict(f"a recovery plan named {name!r} already exists (id {existing.id})")
        return _plan_dict(session, _create_plan(session, name, groups, description))


@_operation
def plan_scripts() -> list[dict]:
    """The scripts plans may run, as registered here (ASR_PLAN_SCRIPTS_DIR): name, description, the most
    seconds a plan may give it, and its arguments with the pattern each value must match."""
    try:
        registry = load_registry(settings.plan_scripts_dir())
    except ScriptRegistryError as exc:
        raise Invalid(str(exc)) from None
    return [script.describe() for _, script in sorted(registry.items())]


@_operation
def list_plans() -> list[dict]:
    with session_scope() as session:
        return [_plan_dict(session, plan) for plan in _list_plans(session)]


@_operation
def show_plan(name: str) -> dict:
    with session_scope() as session:
        return _plan_dict(session, get_plan(session, name))


def _plan_operation(operation: Any) -> PlanOperation:
    aliases = {"test": "test_failover", "planned": "planned_failover", "unplanned": "unplanned_failover"}
    normalized = operation.replace("-", "_") if isinstance(operation, str) else operation
    normalized = aliases.get(normalized, normalized)
    try:
        return PlanOperation(normalized)
    except ValueError:
        raise Invalid(f"a plan's operation is one of {', '.join(PlanOperation)}, got {operation!r}") from None


def _plan_request(name: str, operation: str, options: dict[str, Any]) -> tuple[PlanOperation, dict[str, Any]]:
    """The operation and options of a plan run, checked."""
    op = _plan_operation(operation)
    unknown = sorted(set(options) - set(PLAN_OPTIONS))
    if unknown:
        raise Invalid(f"unknown plan option(s) {', '.join(unknown)} (options: {', '.join(PLAN_OPTIONS)})")
    options = {key: value for key, value in options.items() if value is not None}
    if "mode" in options:
        options["mode"] = _failback_mode(options["mode"])
    if "create_vm" in options and not isinstance(options["create_vm"], bool):
        raise Invalid(f"create_vm is true or false, got {options['create_vm']!r}")
    if "point" in options and (not isinstance(options["point"], str) or options["point"] not in POINT_CHOICES):
        raise Invalid(f"a plan's point is one of {', '.join(POINT_CHOICES)} (each VM has its own point ids)")
    if "recovery_host" in options:
        options["recovery_host"] = _check_host(options["recovery_host"], "recovery host")
    if "test_network" in options:
        _name(options["test_network"], "test network")
    return op, options


@_operation
def run_plan(name: str, operation: str, **options: Any) -> dict:
    """Run the plan for test_failover, planned_failover, unplanned_failover or failback. Options: point,
    recovery_host, test_network (failovers); mode, create_vm (failback). Every VM is checked first: nothing
    starts unless all can."""
    op, options = _plan_request(name, operation, options)
    with session_scope() as session:
        plan_name = get_plan(session, _name(name, "recovery plan")).name
    job_id = start_plan(plan_name, op.value, **options)
    return _job_ref(job_id, f"plan_{op.value}", None, plan=plan_name)


@_operation
def validate_plan(name: str, operation: str, **options: Any) -> dict:
    """A dry run of `run_plan`: every check a run makes (the plan, each VM's state, point, recovery host and
    network mappings), nothing started. Answers {plan, operation, groups: [{name, vms, before, after}]} when
    the run could start now; otherwise the error the run would give."""
    op, options = _plan_request(name, operation, options)
    request = load_plan(_name(name, "recovery plan"), op.value, **options)
    with session_scope() as session:
        names = {item.id: vm for item, vm in session.exec(
            select(ProtectedItem, VirtualMachine.name).join(VirtualMachine, VirtualMachine.id == ProtectedItem.vm_id)
            .where(ProtectedItem.id.in_(request.item_ids))).all()}
    return {"plan": request.plan, "operation": op.value, "groups": [
        {"name": group.name, "vms": [names.get(vm.item_id, vm.item_id) for vm in group.vms],
         "before": [action.get("name") for action in group.before],
         "after": [action.get("name") for action in group.after]} for group in request.groups]}
