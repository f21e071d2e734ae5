"""The ASR workflows of a protected VM, built as jobs on the durable job engine.

Each public function decides which steps a job has and starts it; the steps themselves are the actions
in `tasks/replication.py`. Every job of an item holds the item's lock (`item:<item_id>`), so one
workflow at a time runs per protected item; a second request gets ItemBusyError and creates nothing.

Jobs and their stages (steps of one stage run in parallel):
- enable_protection: Prerequisites check, Create replication relationship, Start replication, then (unless
  the policy schedules initial replication for later) Take VM snapshot, Copy disk <name> x disks, Delete
  VM snapshot, Ship logs, Apply logs, Acknowledge logs, Finalize protection.
- initial_replication (a scheduled start): Take VM snapshot ... Finalize protection.
- delta_replication: Ship logs, Apply logs, Acknowledge logs, Update replication health.
- resynchronize: Take VM snapshot, Resynchronize disk <name> x disks, Ship/Apply/Acknowledge logs,
  Resume replication.
- disable_protection: Disable protection, Stop tracking disks, Remove replica disks, Finalize disabling
  protection.

`run_scheduler` (beat task `asr.replication.tick`) starts what is due: delta cycles, scheduled initial
replications, and automatic resyncs outside the policy's office hours.
"""
from __future__ import annotations

import importlib
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from datapath.errors import LogCorruptError, LogOutOfSequenceError, NonRecoverableError
from models.db import as_utc, session_scope
from models.fabric import Host, VirtualDisk, VirtualMachine, VmNotFoundError, host_queue, vm_disks
from models.jobs import Job, JobLock
from models.policy import ReplicationPolicy
from models.protection import (
    ALLOWED_TRANSITIONS,
    InvalidStateError,
    ProtectedItem,
    RecoveryPoint,
    ReplicationState,
    item_lock_key,
    mark_critical,
    protect_vm,
)
from workflows import clock
from workflows.engine import (
    ORCHESTRATION_QUEUE,
    RECOVERY_QUEUE,
    ItemBusyError,
    StepSpec,
    job_hook,
    start_job,
)
from workflows.settings import env_number

__all__ = [
    "BEAT_SCHEDULE", "TICK_TASK", "ACTIONS_MODULE", "ItemView", "load_item",
    "enable_protection", "start_initial_replication", "start_delta_replication", "start_resync",
    "disable_protection", "run_scheduler", "item_status",
]

logger = logging.getLogger(__name__)

TICK_TASK = "asr.replication.tick"
ACTIONS_MODULE = "tasks.replication"

# Action names (registered by tasks/replication.py).
PREREQUISITES = "replication.prerequisites"
CREATE_RELATIONSHIP = "replication.create_relationship"
START_REPLICATION = "replication.start_replication"
SNAPSHOT_VM = "replication.snapshot_vm"
COPY_DISK = "replication.copy_disk"
DELETE_SNAPSHOT = "replication.delete_snapshot"
SHIP_LOGS = "replication.ship_logs"
APPLY_LOGS = "replication.apply_logs"
ACKNOWLEDGE_LOGS = "replication.acknowledge_logs"
FINALIZE = "replication.finalize"
UPDATE_HEALTH = "replication.update_health"
RESYNC_DISK = "replication.resync_disk"
BEGIN_DISABLE = "replication.begin_disable"
STOP_TRACKING = "replication.stop_tracking"
REMOVE_REPLICAS = "replication.remove_replicas"
FINISH_DISABLE = "replication.finish_disable"

ENABLE_PROTECTION = "enable_protection"
INITIAL_REPLICATION = "initial_replication"
DELTA_REPLICATION = "delta_replication"
RESYNCHRONIZE = "resynchronize"
DISABLE_PROTECTION = "disable_protection"
ITEM_JOB_KINDS = (ENABLE_PROTECTION, INITIAL_REPLICATION, DELTA_REPLICATION, RESYNCHRONIZE, DISABLE_PROTECTION)

# A job failing with one of these has already marked its item resync_required (Warning, with the
# reason): the item is not Critical, a resync heals it.
RESYNC_ERROR_CLASSES = frozenset(
    f"{cls.__module__}.{cls.__qualname__}" for cls in (LogCorruptError, LogOutOfSequenceError)
)


TICK_INTERVAL_S = env_number("ASR_TICK_S", 5.0)
# For worker.py: `app.conf.beat_schedule.update(BEAT_SCHEDULE)`. A tick that waited a whole period is
# dropped: the next one is already on its way.
BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "replication-tick": {
        "task": TICK_TASK,
        "schedule": TICK_INTERVAL_S,
        "options": {"queue": ORCHESTRATION_QUEUE, "expires": TICK_INTERVAL_S, "ignore_result": True},
    },
}


# ---- reading an item --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemView:
    """A protected item with what its steps need: its VM, host, disks (by name) and policy."""

    item: ProtectedItem
    vm: VirtualMachine
    host: Host
    disks: list[VirtualDisk]
    policy: ReplicationPolicy

    @property
    def queue(self) -> str:
        return host_queue(self.host.name)

    def disk(self, disk_id: str) -> VirtualDisk:
        for disk in self.disks:
            if disk.id == disk_id:
                return disk
        raise NonRecoverableError(f"VM {self.vm.name!r} has no disk {disk_id} (its disks changed?)")


def load_item(session: Session, item_id: str) -> ItemView:
    """The item and its VM, host, disks and policy; NonRecoverableError naming what is missing."""
    item = session.get(ProtectedItem, item_id)
    if item is None:
        raise NonRecoverableError(f"no protected item {item_id}")
    vm = session.get(VirtualMachine, item.vm_id)
    if vm is None:
        raise VmNotFoundError(f"protected item {item_id}: its VM {item.vm_id} is not registered any more")
    host = session.get(Host, vm.host_id)
    policy = session.get(ReplicationPolicy, item.policy_id)
    return ItemView(item, vm, host, vm_disks(session, vm), policy)


def _load_or_raise(item_id: str) -> ItemView:
    with session_scope() as session:
        return load_item(session, item_id)


# ---- building jobs ----------------------------------------------------------------------------------
def _require_actions() -> None:
    # start_job checks that every step's action is registered in this process; the actions register
    # themselves when their module is imported (and that module imports this one, hence not at the top).
    importlib.import_module(ACTIONS_MODULE)


def _merge_stages(view: ItemView) -> list[list[StepSpec]]:
    params = {"item_id": view.item.id}
    return [
        [StepSpec("Ship logs", SHIP_LOGS, view.queue, params)],
        [StepSpec("Apply logs", APPLY_LOGS, RECOVERY_QUEUE, params)],
        [StepSpec("Acknowledge logs", ACKNOWLEDGE_LOGS, view.queue, params)],
    ]


def _initial_replication_stages(view: ItemView, enter_state: str | None) -> list[list[StepSpec]]:
    params = {"item_id": view.item.id}
    return [
        [StepSpec("Take VM snapshot", SNAPSHOT_VM, view.queue, {**params, "enter_state": enter_state})],
        [StepSpec(f"Copy disk {disk.name}", COPY_DISK, view.queue, {**params, "disk_id": disk.id})
         for disk in view.disks],
        [StepSpec("Delete VM snapshot", DELETE_SNAPSHOT, view.queue, params)],
        *_merge_stages(view),
        [StepSpec("Finalize protection", FINALIZE, ORCHESTRATION_QUEUE, params)],
    ]


def _start_item_job(kind: str, view: ItemView, stages: list[list[StepSpec]], **params: Any) -> str:
    _require_actions()
    try:
        return start_job(kind, lock_key=item_lock_key(view.item.id), stages=stages, target=view.item.id,
                         params={"item_id": view.item.id, "vm": view.vm.name, **params})
    except ItemBusyError as busy:
        raise _busy_error(view.item.id, view.vm.name, kind) from busy


def _busy_error(item_id: str, vm_name: str, kind: str) -> ItemBusyError:
    holder = _lock_holder(item_id)
    if holder is None:
        return ItemBusyError(f"VM {vm_name!r} (protected item {item_id}) is busy: another {kind} request "
                             f"is starting on it")
    return ItemBusyError(f"VM {vm_name!r} (protected item {item_id}) is busy with job {holder.id} "
                         f"({holder.kind}, {holder.state.value}): one workflow at a time per VM")


def _lock_holder(item_id: str) -> Job | None:
    with session_scope() as session:
        lock = session.get(JobLock, item_lock_key(item_id))
        return None if lock is None else session.get(Job, lock.job_id)


def _require_state(view: ItemView, allowed: tuple[ReplicationState, ...], doing: str) -> None:
    if view.item.replication_state not in allowed:
        raise InvalidStateError(
            f"cannot {doing} VM {view.vm.name!r} (protected item {view.item.id}): it is "
            f"{view.item.replication_state}, not {' or '.join(allowed)}"
        )


# ---- the workflows ------------------------------------------------------------------------------------
def enable_protection(
    vm_id: str, policy_id: str, *, recovery_storage: str, storage_options: dict | None = None,
    recovery_host: str | None = None,
) -> str:
    """Protect the VM: creates (or reuses, after a failed enable) its protected item and starts the
    enable_protection job. Returns the job id. ItemBusyError while another job holds the item.
    `recovery_host` (a registered host's name) is where failovers create the VM by default."""
    item_id = _protected_item_for(vm_id, policy_id, recovery_storage, storage_options or {}, recovery_host)
    view = _load_or_raise(item_id)
    scheduled_at = view.policy.initial_replication_at
    scheduled = scheduled_at is not None and scheduled_at > clock.now()
    params = {"item_id": item_id}
    stages = [
        [StepSpec("Prerequisites check", PREREQUISITES, view.queue, params)],
        [StepSpec("Create replication relationship", CREATE_RELATIONSHIP, view.queue, params)],
        [StepSpec("Start replication", START_REPLICATION, ORCHESTRATION_QUEUE,
                  {**params, "scheduled_at": scheduled_at.isoformat() if scheduled else None})],
    ]
    if not scheduled:
        stages += _initial_replication_stages(view, enter_state=None)
    return _start_item_job(ENABLE_PROTECTION, view, stages)


def _protected_item_for(
    vm_id: str, policy_id: str, recovery_storage: str, storage_options: dict, recovery_host: str | None = None,
) -> str:
    with session_scope() as session:
        if recovery_host is not None and session.exec(
                select(Host).where(Host.name == recovery_host)).first() is None:
            raise ValueError(f"protection of VM {vm_id}: no host {recovery_host!r} is registered to recover to")
        vm = session.get(VirtualMachine, vm_id)
        if vm is None:
            raise VmNotFoundError(f"no VM {vm_id} is registered")
        policy = session.get(ReplicationPolicy, policy_id)
        if policy is None:
            raise ValueError(f"protection of VM {vm.name!r}: no replication policy {policy_id}")
        vm_name = vm.name
        if not vm_disks(session, vm):
            raise ValueError(f"VM {vm_name!r} has no disks registered: there is nothing to protect")
        item = session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == vm_id)).first()
    if item is not None and _lock_holder(item.id) is not None:
        raise _busy_error(item.id, vm_name, ENABLE_PROTECTION)
    if item is not None and item.replication_state is ReplicationState.ENABLING_PROTECTION:
        # A previous enable failed before starting replication: its item is reused, with its settings.
        if (item.policy_id, item.recovery_storage, item.storage_options) != (
                policy_id, recovery_storage, storage_options):
            raise ValueError(
                f"protection of VM {vm_name!r} was started with policy {item.policy_id} and recovery storage "
                f"{item.recovery_storage} (options {item.storage_options}); retry it with the same settings"
            )
        return item.id
    seen = None if item is None else (item.id, item.replication_state)
    try:
        with session_scope() as session:
            vm = session.get(VirtualMachine, vm_id)
            policy = session.get(ReplicationPolicy, policy_id)
            target = None if recovery_host is None else session.exec(
                select(Host).where(Host.name == recovery_host)).first()
            return protect_vm(session, vm, policy, recovery_storage=recovery_storage,
                              storage_options=storage_options, recovery_host=target).id
    except (sa.exc.IntegrityError, ValueError):
        # Another request may have created or re-enabled the item since we looked: that one runs.
        if _item_state(vm_id) != seen:
            raise ItemBusyError(
                f"VM {vm_name!r} is busy: another request is enabling its protection right now"
            ) from None
        raise


def _item_state(vm_id: str) -> tuple[str, ReplicationState] | None:
    with session_scope() as session:
        item = session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == vm_id)).first()
        return None if item is None else (item.id, item.replication_state)


def start_initial_replication(item_id: str) -> str:
    """Start a scheduled initial replication now (job initial_replication). Returns the job id."""
    view = _load_or_raise(item_id)
    _require_state(view, (ReplicationState.INITIAL_REPLICATION_PENDING,), "start the initial replication of")
    stages = _initial_replication_stages(view, enter_state=ReplicationState.INITIAL_REPLICATION.value)
    return _start_item_job(INITIAL_REPLICATION, view, stages)


def start_delta_replication(item_id: str) -> str:
    """One delta replication cycle of a protected item (job delta_replication). Returns the job id."""
    view = _load_or_raise(item_id)
    _require_state(view, (ReplicationState.PROTECTED,), "replicate the changes of")
    stages = _merge_stages(view) + [
        [StepSpec("Update replication health", UPDATE_HEALTH, ORCHESTRATION_QUEUE, {"item_id": item_id})],
    ]
    return _start_item_job(DELTA_REPLICATION, view, stages)


def start_resync(item_id: str, *, manual: bool = True) -> str:
    """Resynchronize the item's disks, sending only blocks that differ (job resynchronize). A manual
    resync runs at once; an automatic one refuses to start inside the policy's office hours."""
    view = _load_or_raise(item_id)
    _require_state(view, (ReplicationState.RESYNC_REQUIRED, ReplicationState.RESYNCHRONIZING,
                          ReplicationState.PROTECTED), "resynchronize")
    if not manual and view.policy.in_office_hours(clock.now()):
        raise InvalidStateError(
            f"automatic resync of VM {view.vm.name!r} waits for the end of the office hours of policy "
            f"{view.policy.name!r}; start a manual resync to run it now"
        )
    return _start_item_job(RESYNCHRONIZE, view, _resync_stages(view), manual=manual)


def _resync_stages(view: ItemView) -> list[list[StepSpec]]:
    params = {"item_id": view.item.id}
    return [
        [StepSpec("Take VM snapshot", SNAPSHOT_VM, view.queue,
                  {**params, "enter_state": ReplicationState.RESYNCHRONIZING.value})],
        [StepSpec(f"Resynchronize disk {disk.name}", RESYNC_DISK, view.queue, {**params, "disk_id": disk.id})
         for disk in view.disks],
        *_merge_stages(view),
        [StepSpec("Resume replication", FINALIZE, ORCHESTRATION_QUEUE, params)],
    ]


def disable_protection(item_id: str) -> str:
    """Stop protecting the VM (job disable_protection): its disks stop being tracked, its replicas, shipped
    logs and recovery points are deleted, and the item ends disabled (protection can be enabled again)."""
    view = _load_or_raise(item_id)
    allowed = tuple(state for state, targets in ALLOWED_TRANSITIONS.items()
                    if ReplicationState.DISABLING_PROTECTION in targets)
    _require_state(view, (*allowed, ReplicationState.DISABLING_PROTECTION), "disable protection of")
    params = {"item_id": item_id}
    stages = [
        [StepSpec("Disable protection", BEGIN_DISABLE, ORCHESTRATION_QUEUE, params)],
        [StepSpec("Stop tracking disks", STOP_TRACKING, view.queue, params)],
        [StepSpec("Remove replica disks", REMOVE_REPLICAS, RECOVERY_QUEUE, params)],
        [StepSpec("Finalize disabling protection", FINISH_DISABLE, ORCHESTRATION_QUEUE, params)],
    ]
    return _start_item_job(DISABLE_PROTECTION, view, stages)


# ---- the scheduler ---------------------------------------------------------------------------------------
def run_scheduler(now: datetime | None = None) -> dict[str, int]:
    """Start what is due at `now` (default: the clock): delta cycles of protected items, scheduled
    initial replications, automatic resyncs outside office hours. Busy items are skipped silently.
    Returns counts of what it did."""
    now = as_utc(now) if now is not None else clock.now()
    report: Counter[str] = Counter()
    with session_scope() as session:
        due = session.exec(select(ProtectedItem.id, ProtectedItem.replication_state).where(sa.or_(
            sa.and_(ProtectedItem.replication_state == ReplicationState.PROTECTED,
                    ProtectedItem.next_delta_at <= now),
            sa.and_(ProtectedItem.replication_state == ReplicationState.INITIAL_REPLICATION_PENDING,
                    ProtectedItem.initial_replication_at <= now),
            sa.and_(ProtectedItem.replication_state == ReplicationState.RESYNC_REQUIRED,
                    ProtectedItem.resync_scheduled_for <= now),
        ))).all()
        locked = set(session.exec(select(JobLock.lock_key)).all())
    for item_id, state in due:
        if item_lock_key(item_id) in locked:
            report["busy"] += 1
            continue
        report[_start_due(item_id, ReplicationState(state), now)] += 1
    return dict(report)


def _start_due(item_id: str, state: ReplicationState, now: datetime) -> str:
    try:
        if state is ReplicationState.PROTECTED:
            start_delta_replication(item_id)
            return "delta_started"
        if state is ReplicationState.INITIAL_REPLICATION_PENDING:
            start_initial_replication(item_id)
            return "initial_replication_started"
        with session_scope() as session:
            policy = load_item(session, item_id).policy
        if policy.in_office_hours(now):
            return "resync_waiting_for_office_hours_to_end"
        start_resync(item_id, manual=False)
        return "resync_started"
    except ItemBusyError:
        return "busy"
    except InvalidStateError:
        return "state_changed"  # another process moved the item meanwhile


# ---- status --------------------------------------------------------------------------------------------
def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def item_status(item_id: str) -> dict[str, Any]:
    """What the portal shows of a protected item: state, health and errors, RPO, unsent share, the
    latest recovery point, the active job."""
    with session_scope() as session:
        view = load_item(session, item_id)
        item = view.item
        points = session.exec(select(sa.func.count()).select_from(RecoveryPoint).where(
            RecoveryPoint.item_id == item_id)).one()
    holder = _lock_holder(item_id)
    return {
        "item_id": item.id,
        "vm": view.vm.name,
        "host": view.host.name,
        "state": str(item.replication_state),
        "health": str(item.health),
        "errors": list(item.health_errors),
        "resync_required_reason": item.resync_required_reason,
        "resync_scheduled_for": _iso(item.resync_scheduled_for),
        "initial_replication_at": _iso(item.initial_replication_at),
        "rpo_s": item.current_rpo_s,
        "unsent_ratio": item.unsent_ratio,
        "last_recovery_point_at": _iso(item.last_recovery_point_at),
        "recovery_points": points,
        "next_delta_at": _iso(item.next_delta_at),
        "active_job": None if holder is None else {"id": holder.id, "kind": holder.kind,
                                                   "state": holder.state.value},
    }


# ---- job hooks -------------------------------------------------------------------------------------------
def _on_failure(job: Job, session: Session) -> None:
    """A job of the item failed without a retry left: an administrator must look (Critical), unless the
    failure already marked the item resync_required (a broken log chain: a resync heals it)."""
    item_id = job.params.get("item_id")
    item = session.get(ProtectedItem, item_id) if item_id else None
    if item is None:  # not a job of a protected item (or the item is gone): nothing to mark
        return
    if job.kind == DELTA_REPLICATION:
        # The scheduler would otherwise start the next cycle at once, and again, every tick.
        policy = session.get(ReplicationPolicy, item.policy_id)
        item.next_delta_at = clock.after(policy.copy_frequency_s)
        session.add(item)
    if job.error_class in RESYNC_ERROR_CLASSES and item.replication_state is ReplicationState.RESYNC_REQUIRED:
        session.flush()
        return
    mark_critical(session, item, f"{job.kind}_failed", job.error or f"job {job.id} failed")


for _kind in ITEM_JOB_KINDS:
    job_hook(_kind, "failed")(_on_failure)
