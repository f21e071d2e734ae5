"""Recovery plans: which VMs fail over together, in which order, and what runs around each group.

A plan lists up to 100 VMs in up to 20 ordered groups. Groups fail over one after another, the VMs of a
group in parallel. Each group may have actions before and after it: a script registered on the
orchestration workers, by name with values for its declared arguments (sites/planscripts.py; a plan never
carries a command line), or a manual action that pauses the job until an operator resumes it. The same plan serves test,
planned and unplanned failover and failback; `validate_plan` checks, just before a run, that the fabric
allows that operation for every VM of the plan.

Checks collect every problem before raising, so an operator fixes a plan in one round, and nothing is
written when any is found. Functions flush but never commit: the caller's `session_scope` does.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, select

from datapath.errors import NonRecoverableError
from models.db import UtcDateTime, clock_now, new_id, validate_name
from models.fabric import (
    AmbiguousVmError,
    Host,
    NetworkMapping,
    Site,
    VirtualMachine,
    VmmCloud,
    VmNetworkAdapter,
    VmNotFoundError,
    get_vm,
)
from models.protection import ProtectedItem
from sites.planscripts import RegisteredScript, ScriptRegistryError, check_arguments, load_registry
from workflows import settings

__all__ = [
    "RecoveryPlan", "PlanError", "PlanNotFoundError", "PlanOperation", "ACTION_KINDS", "ALLOWED_STATES",
    "MAX_PLAN_VMS", "MAX_PLAN_GROUPS", "LEGACY_COMMAND",
    "create_plan", "check_stored_scripts", "get_plan", "list_plans", "update_plan", "delete_plan", "validate_plan",
    "plan_items",
]

MAX_PLAN_VMS = 100
MAX_PLAN_GROUPS = 20
MAX_DESCRIPTION_CHARS = 1024
MAX_INSTRUCTIONS_CHARS = 4096
ACTION_KINDS = ("script", "manual")

_GROUP_KEYS = frozenset({"name", "vms", "before", "after"})
_ACTION_KEYS = {"script": frozenset({"kind", "name", "script", "args", "timeout_s"}),
                "manual": frozenset({"kind", "name", "instructions"})}


class PlanOperation(enum.StrEnum):
    TEST_FAILOVER = "test_failover"
    PLANNED_FAILOVER = "planned_failover"
    UNPLANNED_FAILOVER = "unplanned_failover"
    FAILBACK = "failback"

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")


# Replication states (their string values) from which each operation may start. Plain strings, not
# ReplicationState members, so the table stands whatever states the state machine has at import time.
ALLOWED_STATES: dict[PlanOperation, tuple[str, ...]] = {
    PlanOperation.TEST_FAILOVER: ("protected",),
    PlanOperation.PLANNED_FAILOVER: ("protected",),
    # The replica is behind or broken, but failover uses recovery points already taken.
    PlanOperation.UNPLANNED_FAILOVER: ("protected", "resync_required", "resynchronizing"),
    PlanOperation.FAILBACK: ("failover_committed",),
}


class PlanError(NonRecoverableError):
    """A recovery plan that cannot be created or cannot run; `problems` holds every problem found."""

    def __init__(self, subject: str, problems: Sequence[str]):
        self.subject = subject
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(f"{subject}: {count} problem{'s' if count != 1 else ''}: {'; '.join(self.problems)}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The message is derived: rebuild from the parts (workers pass exceptions between processes).
        return (type(self), (self.subject, self.problems))


class PlanNotFoundError(NonRecoverableError):
    """No recovery plan has the id or name given."""


# ---- table ---------------------------------------------------------------------------------------
class RecoveryPlan(SQLModel, table=True):
    __tablename__ = "recovery_plan"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    name: str = Field(unique=True, max_length=64)
    description: str = Field(default="", max_length=MAX_DESCRIPTION_CHARS)
    groups: list[dict[str, Any]] = Field(default_factory=list, sa_type=sa.JSON)
    """[{"name", "vms": [VM id, ...], "before": [action, ...], "after": [action, ...]}], in failover
    order. An action is {"kind": "script", "name", "script": registered name, "args": {name: value},
    "timeout_s"} or {"kind": "manual", "name", "instructions"}. Plans stored before scripts were registered
    may hold {"kind": "script", "command": [argv]}: such a plan is refused when it is run."""
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)
    updated_at: datetime = Field(
        default_factory=clock_now, sa_type=UtcDateTime, sa_column_kwargs={"onupdate": clock_now}
    )


# ---- creating, finding, deleting -------------------------------------------------------------------
def create_plan(session: Session, name: str, groups: list[dict], description: str = "") -> RecoveryPlan:
    """A new recovery plan. VMs are given by id, by name when only one host has a VM of that name, or as
    "host/vm"; the plan stores their ids. PlanError listing every problem otherwise, nothing written."""
    problems: list[str] = []
    try:
        validate_name(name, "recovery plan")
    except ValueError as exc:
        problems.append(str(exc))
    else:
        existing = session.exec(select(RecoveryPlan).where(RecoveryPlan.name == name)).first()
        if existing is not None:
            problems.append(f"a recovery plan named {name!r} already exists (id {existing.id})")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        problems.append(f"description must be text of at most {MAX_DESCRIPTION_CHARS} characters")
    scripts = _registry(problems) if _has_scripts(groups) else {}
    normalized = _check_groups(session, groups, problems, scripts)
    if problems:
        raise PlanError(f"recovery plan {name!r} cannot be created", problems)
    plan = RecoveryPlan(name=name, description=description, groups=normalized)
    session.add(plan)
    session.flush()
    return plan


def get_plan(session: Session, id_or_name: str) -> RecoveryPlan:
    """The plan with this id, or else this name; PlanNotFoundError naming it when there is none."""
    plan = session.get(RecoveryPlan, id_or_name) if isinstance(id_or_name, str) else None
    if plan is None and isinstance(id_or_name, str):
        plan = session.exec(select(RecoveryPlan).where(RecoveryPlan.name == id_or_name)).first()
    if plan is None:
        raise PlanNotFoundError(f"recovery plan {id_or_name!r} not found")
    return plan


def list_plans(session: Session) -> list[RecoveryPlan]:
    """Every plan, by name."""
    return list(session.exec(select(RecoveryPlan).order_by(RecoveryPlan.name)))


def update_plan(session: Session, id_or_name: str, groups: list[dict],
                description: str | None = None) -> RecoveryPlan:
    """Replace the plan's groups (and its description, unless None), checked exactly as `create_plan` checks a
    new plan's: PlanError listing every problem, nothing changed. Whether a run of the plan is going on is the
    caller's to check (the job engine's lock)."""
    plan = get_plan(session, id_or_name)
    problems: list[str] = []
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS):
        problems.append(f"description must be text of at most {MAX_DESCRIPTION_CHARS} characters")
    scripts = _registry(problems) if _has_scripts(groups) else {}
    normalized = _check_groups(session, groups, problems, scripts)
    if problems:
        raise PlanError(f"recovery plan {plan.name!r} cannot be updated", problems)
    plan.groups = normalized
    if description is not None:
        plan.description = description
    session.add(plan)
    session.flush()
    return plan


def delete_plan(session: Session, id_or_name: str) -> RecoveryPlan:
    """Delete the plan and return it; PlanNotFoundError when there is none. The VMs and their
    protection are untouched."""
    plan = get_plan(session, id_or_name)
    session.delete(plan)
    session.flush()
    return plan


# ---- structure -------------------------------------------------------------------------------------
def _has_scripts(groups: Any) -> bool:
    return isinstance(groups, list) and any(
        isinstance(action, dict) and action.get("kind") == "script"
        for group in groups if isinstance(group, dict)
        for side in ("before", "after") if isinstance(group.get(side), list) for action in group[side]
    )


def _registry(problems: list[str]) -> dict[str, RegisteredScript]:
    """The scripts registered here (ASR_PLAN_SCRIPTS_DIR); a problem when there are none or they cannot be
    read."""
    folder = settings.plan_scripts_dir()
    if folder is None:
        problems.append("no plan scripts are registered here (ASR_PLAN_SCRIPTS_DIR is not set): a plan's script "
                        "action names a script an administrator registered on the orchestration workers")
        return {}
    try:
        return load_registry(folder)
    except ScriptRegistryError as exc:
        problems.append(f"the registered plan scripts cannot be read: {exc}")
        return {}


def _check_groups(session: Session, groups: Any, problems: list[str],
                  scripts: dict[str, RegisteredScript]) -> list[dict[str, Any]]:
    """The groups as stored (VM ids, defaults filled in); appends what is wrong to `problems`."""
    if not isinstance(groups, list):
        problems.append(f"groups must be a list of groups, got {type(groups).__name__}")
        return []
    if not groups:
        problems.append("a plan needs at least one group")
    elif len(groups) > MAX_PLAN_GROUPS:
        problems.append(f"a plan has at most {MAX_PLAN_GROUPS} groups, got {len(groups)}")
    normalized: list[dict[str, Any]] = []
    group_names: list[str] = []
    for position, group in enumerate(groups, start=1):
        where = f"group {position}"
        if not isinstance(group, dict):
            problems.append(f"{where} must be an object, got {group!r}")
            continue
        group_name = group.get("name")
        try:
            validate_name(group_name, "group")
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
        else:
            where = f"group {group_name!r}"
            group_names.append(group_name)
        unknown = sorted(map(str, group.keys() - _GROUP_KEYS))
        if unknown:
            problems.append(
                f"{where}: unknown keys {', '.join(unknown)} (a group has {', '.join(sorted(_GROUP_KEYS))})"
            )
        vms = group.get("vms")
        if not isinstance(vms, list) or not vms:
            problems.append(f"{where} needs a non-empty list of VMs, got {vms!r}")
            vms = []
        refs = []
        for ref in vms:
            if isinstance(ref, str) and ref:
                refs.append(ref)
            else:
                problems.append(f"{where}: a VM is given by its id or name, got {ref!r}")
        actions = {
            side: _check_actions(f"{where}, {side}", group.get(side, []), problems, scripts)
            for side in ("before", "after")
        }
        action_names = [a["name"] for side in ("before", "after") for a in actions[side]]
        for duplicate in _duplicates(action_names):
            problems.append(f"{where}: action name {duplicate!r} is used twice")
        normalized.append({"name": group_name, "vms": refs, "before": actions["before"], "after": actions["after"],
                           "_where": where})
    for duplicate in _duplicates(group_names):
        problems.append(f"group name {duplicate!r} is used twice")

    # At least one VM follows from at least one group of at least one VM each, both checked above.
    total = sum(len(group["vms"]) for group in normalized)
    if total > MAX_PLAN_VMS:
        problems.append(f"a plan has at most {MAX_PLAN_VMS} VMs, got {total}")
    else:
        _resolve_vms(session, normalized, problems)
    for group in normalized:
        del group["_where"]
    return normalized


def _check_actions(where: str, actions: Any, problems: list[str],
                   scripts: dict[str, RegisteredScript]) -> list[dict[str, Any]]:
    if not isinstance(actions, list):
        problems.append(f"{where}: actions must be a list, got {actions!r}")
        return []
    checked = []
    for position, action in enumerate(actions, start=1):
        if not isinstance(action, dict):
            problems.append(f"{where} action {position} must be an object, got {action!r}")
            continue
        name = action.get("name")
        try:
            validate_name(name, "action")
        except ValueError as exc:
            problems.append(f"{where} action {position}: {exc}")
            name = None
        label = f"{where} action {name!r}" if name is not None else f"{where} action {position}"
        kind = action.get("kind")
        if kind not in ACTION_KINDS:
            problems.append(f"{label}: kind must be one of {', '.join(ACTION_KINDS)}, got {kind!r}")
            continue
        unknown = sorted(map(str, action.keys() - _ACTION_KEYS[kind]))
        if kind == "script" and "command" in action:
            problems.append(f"{label}: {LEGACY_COMMAND}")
            unknown.remove("command")
        if unknown:
            problems.append(
                f"{label}: unknown keys {', '.join(unknown)} (a {kind} action has "
                f"{', '.join(sorted(_ACTION_KEYS[kind]))})"
            )
        if kind == "script":
            entry = _check_script(label, action, problems, scripts)
        else:
            entry = _check_manual(label, action, problems)
        if name is not None:
            checked.append({"kind": kind, "name": name, **entry})
    return checked


LEGACY_COMMAND = (
    "a command line (command) is not accepted: a script action names a script an administrator registered on "
    "the orchestration workers, {\"script\": NAME, \"args\": {ARGUMENT: VALUE}} (`asr plan scripts` lists them)"
)


def _check_script(label: str, action: dict, problems: list[str],
                  scripts: dict[str, RegisteredScript]) -> dict[str, Any]:
    name = action.get("script")
    script = scripts.get(name) if isinstance(name, str) else None
    if script is None:
        if "command" in action:
            pass  # said already (LEGACY_COMMAND)
        elif name is None:
            problems.append(f"{label}: a script action needs \"script\": the name of a registered script")
        elif scripts:
            problems.append(f"{label}: script {name!r} is not registered (registered: {', '.join(sorted(scripts))})")
        else:
            problems.append(f"{label}: script {name!r} is not registered")
        return {"script": name, "args": action.get("args"), "timeout_s": action.get("timeout_s")}
    args = action.get("args")
    problems.extend(check_arguments(script, args, label))
    timeout_s = action.get("timeout_s", script.timeout_s)
    if (
        not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not math.isfinite(timeout_s)
        or not 1 <= timeout_s <= script.timeout_s
    ):
        problems.append(f"{label}: timeout_s must be 1 to {script.timeout_s:g} seconds (script {name!r}'s "
                        f"limit), got {timeout_s!r}")
    return {"script": name, "args": dict(args) if isinstance(args, dict) else {}, "timeout_s": timeout_s}


def check_stored_scripts(plan: RecoveryPlan) -> list[str]:
    """What keeps the script actions of a stored plan from running now: an action stored as a command line
    (before scripts were registered), a script no longer registered, arguments it no longer accepts."""
    actions = [(group["name"], side, action) for group in plan.groups for side in ("before", "after")
               for action in group.get(side, []) if action.get("kind") == "script"]
    if not actions:
        return []
    problems: list[str] = []
    if any("command" in action for _, _, action in actions):
        for group, side, action in actions:
            if "command" in action:
                problems.append(f"group {group!r}, {side} action {action.get('name')!r} was stored as a command "
                                f"line and will not run: {LEGACY_COMMAND}; create the plan again")
    scripts = _registry(problems)
    if not scripts:
        return problems
    for group, side, action in actions:
        if "command" in action:
            continue
        label = f"group {group!r}, {side} action {action.get('name')!r}"
        script = scripts.get(action.get("script"))
        if script is None:
            problems.append(f"{label}: script {action.get('script')!r} is no longer registered")
            continue
        problems.extend(check_arguments(script, action.get("args"), label))
        if not action.get("timeout_s", 0) <= script.timeout_s:
            problems.append(f"{label}: timeout_s {action.get('timeout_s')!r} is above script "
                            f"{script.name!r}'s limit of {script.timeout_s:g} s")
    return problems


def _check_manual(label: str, action: dict, problems: list[str]) -> dict[str, Any]:
    instructions = action.get("instructions")
    if not isinstance(instructions, str) or not instructions.strip() or len(instructions) > MAX_INSTRUCTIONS_CHARS:
        problems.append(
            f"{label}: instructions must be non-empty text of at most {MAX_INSTRUCTIONS_CHARS} characters, "
            f"got {instructions!r}"
        )
    return {"instructions": instructions}


def _resolve_vms(session: Session, groups: list[dict[str, Any]], problems: list[str]) -> None:
    """Replace each group's VM references by VM ids; every VM may appear once in the whole plan."""
    refs = {ref for group in groups for ref in group["vms"]}
    by_id = {vm.id: vm for vm in session.exec(select(VirtualMachine).where(VirtualMachine.id.in_(refs)))}
    seen: dict[str, str] = {}
    for group in groups:
        ids = []
        for ref in group["vms"]:
            vm = by_id.get(ref)
            if vm is None:
                host_name, _, vm_name = ref.rpartition("/")
                try:
                    vm = get_vm(session, vm_name, host_name or None)
                except (VmNotFoundError, AmbiguousVmError) as exc:
                    problems.append(f"{group['_where']}: {exc}")
                    continue
            if vm.id in seen:
                label = f"VM {vm.name!r} on host {session.get(Host, vm.host_id).name!r}"
                where = seen[vm.id] if seen[vm.id] == group["_where"] else f"{seen[vm.id]} and {group['_where']}"
                problems.append(f"{label} is listed twice (in {where}): a VM fails over once")
                continue
            seen[vm.id] = group["_where"]
            ids.append(vm.id)
        group["vms"] = ids


def _duplicates(values: Iterable[Any]) -> list[Any]:
    seen, repeated = set(), []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    return repeated


# ---- before a run ------------------------------------------------------------------------------------
def validate_plan(session: Session, plan: RecoveryPlan, operation: PlanOperation | str) -> None:
    """PlanError listing every VM the fabric does not let `operation` take now: a VM gone or listed twice,
    not protected, in a replication state the operation cannot start from (`ALLOWED_STATES`), or with a
    network adapter whose VM network has no mapping in the VM's host's site or cloud."""
    try:
        operation = PlanOperation(operation)
    except ValueError:
        raise PlanError(
            f"recovery plan {plan.name!r} cannot run {operation!r}",
            [f"unknown operation {operation!r}: one of {', '.join(PlanOperation)}"],
        ) from None
    problems: list[str] = check_stored_scripts(plan)
    vm_ids = [vm_id for group in plan.groups for vm_id in group["vms"]]
    rows = session.exec(
        select(VirtualMachine, Host).join(Host, Host.id == VirtualMachine.host_id)
        .where(VirtualMachine.id.in_(vm_ids))
    ).all()
    vms = {vm.id: (vm, host) for vm, host in rows}
    items = {item.vm_id: item for item in session.exec(select(ProtectedItem).where(ProtectedItem.vm_id.in_(vm_ids)))}
    adapters: dict[str, list[VmNetworkAdapter]] = {}
    for adapter in session.exec(
        select(VmNetworkAdapter).where(VmNetworkAdapter.vm_id.in_(vm_ids)).order_by(VmNetworkAdapter.name)
    ):
        adapters.setdefault(adapter.vm_id, []).append(adapter)
    networks = {adapter.vm_network for found in adapters.values() for adapter in found}
    mapped = {
        (mapping.site_id or mapping.cloud_id, mapping.source_network)
        for mapping in session.exec(select(NetworkMapping).where(NetworkMapping.source_network.in_(networks)))
    }
    allowed = ALLOWED_STATES[operation]
    listed: set[str] = set()
    for group in plan.groups:
        for vm_id in group["vms"]:
            if vm_id not in vms:
                problems.append(f"group {group['name']!r}: VM id {vm_id} no longer exists")
                continue
            vm, host = vms[vm_id]
            label = f"VM {vm.name!r} on host {host.name!r}"
            if vm_id in listed:
                problems.append(f"{label} is listed twice")
                continue
            listed.add(vm_id)
            item = items.get(vm_id)
            if item is None:
                problems.append(f"{label} is not protected")
            elif str(item.replication_state) not in allowed:
                problems.append(
                    f"{label} is {item.replication_state}; {operation.label} needs "
                    f"{' or '.join(allowed)}"
                )
            scope_id = host.site_id or host.cloud_id
            # A failback returns the VM to its own networks: only failovers need them mapped.
            for adapter in adapters.get(vm_id, []) if operation is not PlanOperation.FAILBACK else []:
                if (scope_id, adapter.vm_network) not in mapped:
                    problems.append(
                        f"{label}, network adapter {adapter.name!r}: VM network {adapter.vm_network!r} has no "
                        f"network mapping in {_scope_name(session, host)}"
                    )
    if problems:
        raise PlanError(f"recovery plan {plan.name!r} cannot run {operation.label}", problems)


def _scope_name(session: Session, host: Host) -> str:
    if host.site_id is not None:
        return f"site {session.get(Site, host.site_id).name!r}"
    return f"VMM cloud {session.get(VmmCloud, host.cloud_id).name!r}"


def plan_items(session: Session, plan: RecoveryPlan) -> list[list[str]]:
    """The protected item ids of each group, in failover order; PlanError naming every VM of the plan that
    has none (validate_plan first to learn every other problem too)."""
    vm_ids = [vm_id for group in plan.groups for vm_id in group["vms"]]
    items = {
        item.vm_id: item.id for item in session.exec(select(ProtectedItem).where(ProtectedItem.vm_id.in_(vm_ids)))
    }
    missing = [vm_id for vm_id in vm_ids if vm_id not in items]
    if missing:
        names = {
            vm.id: f"VM {vm.name!r} on host {host_name!r}"
            for vm, host_name in session.exec(
                select(VirtualMachine, Host.name).join(Host, Host.id == VirtualMachine.host_id)
                .where(VirtualMachine.id.in_(missing))
            )
        }
        raise PlanError(
            f"recovery plan {plan.name!r} has VMs without protection",
            [f"{names.get(vm_id, f'VM id {vm_id} (no longer exists)')} is not protected" for vm_id in missing],
        )
    return [[items[vm_id] for vm_id in group["vms"]] for group in plan.groups]
