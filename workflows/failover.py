"""Failover, failback and reverse replication of a protected VM, as jobs on the durable job engine.

The steps are the actions in `tasks/failover.py`. Every job holds the item's lock, so no delta cycle
runs while a VM fails over or back. Queues: the primary host's agent (`host.<primary>`) for everything on
the VM's own disks, the recovery host's agent (`host.<recovery>`) for the VM created at the recovery site,
the orchestration queue for state changes. Disk data crosses between the sites only through the recovery
storage.

Jobs (one stage per line; steps of a stage run in parallel):
- test_failover (drill): [Ship/Apply/Acknowledge logs when the point is "latest"] Begin test failover,
  Choose recovery point, Create recovery VM, Restore disk x N, Start recovery VM, Finish test failover.
  The item keeps replicating; the test VM lives in an isolated test network until test_failover_cleanup.
- planned_failover: Begin failover, Shut down VM, Ship/Apply/Acknowledge logs, Choose recovery point,
  Create recovery VM, Restore disk x N, Start recovery VM, Finish failover. Nothing is lost.
- unplanned_failover: the same without touching the primary (it is unreachable).
- cancel_failover: Delete recovery VM, [Start VM on the primary], Finish: the primary replicates again.
- commit_failover: the recovery VM is the VM from now on.
- failback (minimize downtime): Begin failback, Prepare VM on the primary, Prepare staging disk x N,
  Send differences x N (recovery host), Download differences x N (primary), Failback ready. The recovery VM
  keeps running; complete_failback then shuts it down and copies the last changes:
  failback_completion: Begin, Shut down recovery VM, Send final changes, Apply final changes x N, Swap in
  disks, Finish failback. With full download one job does all of it, whole disks, no checksums.
- cancel_failback: Discard staging disks, Start recovery VM: the primary's disks were never touched.
- commit_failback, reverse_replication (resynchronize the replica from the primary: only what differs).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from sqlmodel import Session, select

from datapath.errors import NonRecoverableError
from models.db import session_scope
from models.fabric import Host, NetworkMapping, host_queue, vm_adapters
from models.failover import FailoverKind, FailoverRecord, FailoverStatus, active_test_failover, latest_failover
from models.jobs import ACTIVE_JOB_STATES, Job
from models.protection import (
    InvalidStateError,
    ProtectedItem,
    RecoveryPoint,
    RecoveryPointKind,
    ReplicationState,
    mark_critical,
    mark_warning,
    recovery_points,
)
from workflows import engine
from workflows import protection as protection_workflows
from workflows.engine import ORCHESTRATION_QUEUE, StepSpec, job_hook
from workflows.protection import ItemView, load_item

__all__ = [
    "PointChoice", "FailbackMode", "start_test_failover", "start_test_failover_cleanup",
    "start_planned_failover", "start_unplanned_failover", "cancel_failover", "commit_failover",
    "start_failback", "complete_failback", "cancel_failback", "commit_failback", "start_reverse_replication",
    "failover_stages", "failback_stages", "resolve_point", "recovery_network_for", "failover_report",
    "start_verify",
]

ACTIONS_MODULE = "tasks.failover"
S = ReplicationState

# Action names (registered by tasks/failover.py).
BEGIN_FAILOVER = "failover.begin"
SHUT_DOWN_PRIMARY = "failover.shut_down_primary"
CHOOSE_POINT = "failover.choose_point"
CREATE_RECOVERY_VM = "failover.create_recovery_vm"
RESTORE_DISK = "failover.restore_disk"
START_RECOVERY_VM = "failover.start_recovery_vm"
FINISH_FAILOVER = "failover.finish"
DELETE_RECOVERY_VM = "failover.delete_recovery_vm"
RESUME_PRIMARY = "failover.resume_primary"
FINISH_CANCEL = "failover.finish_cancel"
FINISH_CLEANUP = "failover.finish_cleanup"
COMMIT = "failover.commit"
BEGIN_FAILBACK = "failback.begin"
PREPARE_PRIMARY_VM = "failback.prepare_primary_vm"
PREPARE_STAGING = "failback.prepare_staging"
SEND_DIFFERENCES = "failback.send_differences"
DOWNLOAD_DIFFERENCES = "failback.download_differences"
FAILBACK_READY = "failback.ready"
SHUT_DOWN_RECOVERY_VM = "failback.shut_down_recovery_vm"
SEND_FINAL_CHANGES = "failback.send_final_changes"
APPLY_FINAL_CHANGES = "failback.apply_final_changes"
SWAP_DISKS = "failback.swap_disks"
FINISH_FAILBACK = "failback.finish"
DISCARD_STAGING = "failback.discard_staging"
RESTART_RECOVERY_VM = "failback.restart_recovery_vm"
FINISH_FAILBACK_CANCEL = "failback.finish_cancel"
COMMIT_FAILBACK = "failback.commit"
BEGIN_REVERSE = "failback.begin_reverse_replication"
VERIFY_POINT = "points.verify"

TEST_FAILOVER = "test_failover"
TEST_FAILOVER_CLEANUP = "test_failover_cleanup"
PLANNED_FAILOVER = "planned_failover"
UNPLANNED_FAILOVER = "unplanned_failover"
CANCEL_FAILOVER = "cancel_failover"
COMMIT_FAILOVER = "commit_failover"
FAILBACK = "failback"
FAILBACK_COMPLETION = "failback_completion"
CANCEL_FAILBACK = "cancel_failback"
COMMIT_FAILBACK_JOB = "commit_failback"
REVERSE_REPLICATION = "reverse_replication"
VERIFY_RECOVERY_POINT = "verify_recovery_point"
FAILOVER_JOB_KINDS = (TEST_FAILOVER, TEST_FAILOVER_CLEANUP, PLANNED_FAILOVER, UNPLANNED_FAILOVER,
                      CANCEL_FAILOVER, COMMIT_FAILOVER, FAILBACK, FAILBACK_COMPLETION, CANCEL_FAILBACK,
                      COMMIT_FAILBACK_JOB, REVERSE_REPLICATION)

DEFAULT_TEST_NETWORK = "asr-test-isolated"
# How long cancel_failback waits for a cancelled failback job to let go of the item.
CANCEL_WAIT_S = 60.0


class PointChoice:
    LATEST_PROCESSED = "latest_processed"
    """The latest point the recovery site has (nothing is processed first)."""
    LATEST_APP_CONSISTENT = "latest_app_consistent"
    LATEST = "latest"
    """Ship and apply the pending logs first, then their point (the primary must be reachable)."""
    NAMED = (LATEST_PROCESSED, LATEST_APP_CONSISTENT, LATEST)


class FailbackMode:
    MINIMIZE_DOWNTIME = "minimize_downtime"
    FULL_DOWNLOAD = "full_download"
    ALL = (MINIMIZE_DOWNTIME, FULL_DOWNLOAD)


# ---- reading -----------------------------------------------------------------------------------------
def _view(item_id: str) -> ItemView:
    with session_scope() as session:
        return load_item(session, item_id)


def _host_named(session: Session, name: str, what: str) -> Host:
    host = session.exec(select(Host).where(Host.name == name)).first()
    if host is None:
        raise NonRecoverableError(f"{what}: no host {name!r} is registered")
    return host


def _recovery_host(session: Session, view: ItemView, name: str | None) -> Host:
    if name is not None:
        host = _host_named(session, name, f"failover of VM {view.vm.name!r}")
    elif view.item.recovery_host_id is not None:
        host = session.get(Host, view.item.recovery_host_id)
    else:
        raise NonRecoverableError(
            f"failover of VM {view.vm.name!r}: no recovery host; name one, or set one when enabling protection"
        )
    if host.id == view.host.id:
        raise NonRecoverableError(f"failover of VM {view.vm.name!r}: {host.name!r} is the VM's own host")
    return host


def recovery_network_for(session: Session, host: Host, vm_network: str) -> NetworkMapping | None:
    """The network mapping of the host's site or VMM cloud for one of its VM networks."""
    scope = NetworkMapping.site_id == host.site_id if host.site_id else NetworkMapping.cloud_id == host.cloud_id
    return session.exec(select(NetworkMapping).where(scope, NetworkMapping.source_network == vm_network)).first()


def _placement(session: Session, view: ItemView, test_network: str | None) -> list[dict[str, Any]]:
    """Where each NIC of the VM lands: the mapped recovery network, or the isolated test network."""
    placement = []
    missing = []
    for adapter in vm_adapters(session, view.vm):
        mapping = recovery_network_for(session, view.host, adapter.vm_network)
        if test_network is not None:
            placement.append({"adapter": adapter.name, "network": test_network, "subnet": None,
                              "source_network": adapter.vm_network})
        elif mapping is None:
            missing.append(adapter.vm_network)
        else:
            placement.append({"adapter": adapter.name, "network": mapping.recovery_network,
                              "subnet": mapping.recovery_subnet, "source_network": adapter.vm_network})
    if missing:
        raise NonRecoverableError(
            f"failover of VM {view.vm.name!r}: no network mapping for its network(s) {', '.join(sorted(set(missing)))} "
            f"on host {view.host.name!r}'s site or cloud; add one first"
        )
    return placement


def resolve_point(session: Session, item: ProtectedItem, choice: str) -> RecoveryPoint:
    """The recovery point `choice` names: latest_processed / latest (the latest point), latest_app_consistent,
    or a point id of this item. NonRecoverableError when there is none (e.g. pruned past retention)."""
    points = recovery_points(session, item)
    usable = [point for point in points if point.versions]
    if choice in (PointChoice.LATEST_PROCESSED, PointChoice.LATEST):
        if not usable:
            raise NonRecoverableError(f"protected item {item.id} has no recovery point to fail over to")
        return usable[-1]
    if choice == PointChoice.LATEST_APP_CONSISTENT:
        consistent = [point for point in usable if point.kind is RecoveryPointKind.APP_CONSISTENT]
        if not consistent:
            raise NonRecoverableError(f"protected item {item.id} has no app-consistent recovery point")
        return consistent[-1]
    point = session.get(RecoveryPoint, choice)
    if point is None or point.item_id != item.id:
        raise NonRecoverableError(
            f"recovery point {choice} of protected item {item.id} does not exist (pruned past the retention "
            f"window, or of another VM); see its points for the ones available"
        )
    if not point.versions:
        raise NonRecoverableError(f"recovery point {choice} predates versioned replicas and cannot be restored")
    return point


def _check_choice(view: ItemView, choice: str) -> None:
    with session_scope() as session:
        if choice != PointChoice.LATEST:
            resolve_point(session, session.get(ProtectedItem, view.item.id), choice)


def _require_state(view: ItemView, allowed: tuple[ReplicationState, ...], doing: str) -> None:
    if view.item.replication_state not in allowed:
        raise InvalidStateError(
            f"cannot {doing} VM {view.vm.name!r} (protected item {view.item.id}): it is "
            f"{view.item.replication_state}, not {' or '.join(allowed)}"
        )


# ---- stage builders (also used by recovery plans) ------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """A VM's stages for one operation, with what its job needs to know."""

    item_id: str
    vm: str
    stages: list[list[StepSpec]]
    params: dict[str, Any]


def _prefix(name: str, vm: str | None) -> str:
    return name if vm is None else f"{vm}: {name}"


def failover_stages(
    item_id: str, kind: str, *, point: str = PointChoice.LATEST_PROCESSED, recovery_host: str | None = None,
    test_network: str | None = None, public_ips: dict[str, str] | None = None, label_vm: bool = False,
) -> Prepared:
    """Check the request (state, point, host, network mappings) and build the VM's failover stages.
    Raises before anything is created when the request cannot run."""
    if kind not in (FailoverKind.TEST, FailoverKind.PLANNED, FailoverKind.UNPLANNED):
        raise ValueError(f"failover kind must be test, planned or unplanned, got {kind!r}")
    view = _view(item_id)
    allowed = {
        FailoverKind.TEST: (S.PROTECTED, S.RESYNC_REQUIRED, S.RESYNCHRONIZING, S.FAILED_OVER),
        FailoverKind.PLANNED: (S.PROTECTED,),
        FailoverKind.UNPLANNED: (S.PROTECTED, S.RESYNC_REQUIRED, S.RESYNCHRONIZING, S.FAILED_OVER),
    }[FailoverKind(kind)]
    _require_state(view, allowed, f"run a {kind} failover of")
    if kind == FailoverKind.PLANNED:
        point = PointChoice.LATEST  # the last changes are shipped after the shutdown: nothing is lost
    elif kind == FailoverKind.UNPLANNED and point == PointChoice.LATEST:
        raise ValueError("an unplanned failover cannot process pending logs: the primary is unreachable; "
                         "choose latest_processed, latest_app_consistent or a point id")
    elif kind == FailoverKind.TEST and point == PointChoice.LATEST and view.item.replication_state is not S.PROTECTED:
        raise ValueError(f"VM {view.vm.name!r} is {view.item.replication_state}: pending logs cannot be processed; "
                         f"choose latest_processed or a point id")
    _check_choice(view, point)
    with session_scope() as session:
        if kind == FailoverKind.TEST:
            drill = active_test_failover(session, item_id)
            if drill is not None:
                raise InvalidStateError(
                    f"VM {view.vm.name!r} has a test failover ({drill.id}, {drill.status}) whose test VM "
                    f"{drill.target_vm!r} still exists: clean it up first"
                )
        target = _recovery_host(session, view, recovery_host)
        placement = _placement(session, view, (test_network or DEFAULT_TEST_NETWORK)
                               if kind == FailoverKind.TEST else None)
        previous = latest_failover(session, item_id, (FailoverKind.PLANNED, FailoverKind.UNPLANNED))
    for adapter, address in (public_ips or {}).items():
        if adapter not in {entry["adapter"] for entry in placement}:
            raise ValueError(f"VM {view.vm.name!r} has no network adapter {adapter!r} to give address {address}")
    target_vm = f"{view.vm.name}-test" if kind == FailoverKind.TEST else view.vm.name
    failover_id = str(uuid.uuid4())
    params = {"item_id": item_id, "failover_id": failover_id}
    label = view.vm.name if label_vm else None
    recovery_queue = host_queue(target.name)
    stages: list[list[StepSpec]] = [[StepSpec(
        _prefix("Begin test failover" if kind == FailoverKind.TEST else "Begin failover", label), BEGIN_FAILOVER,
        ORCHESTRATION_QUEUE,
        {**params, "kind": str(kind), "point": point, "target_host": target.name, "target_vm": target_vm,
         "placement": placement, "public_ips": dict(public_ips or {}), "requested_at": time.time(),
         # Failing over again from failed_over replaces the VM the previous failover created.
         "replaces": previous.id if (previous is not None and view.item.replication_state is S.FAILED_OVER
                                     and kind != FailoverKind.TEST) else None},
    )]]
    if kind == FailoverKind.PLANNED:
        stages.append([StepSpec(_prefix("Shut down VM", label), SHUT_DOWN_PRIMARY, view.queue, params)])
    if point == PointChoice.LATEST:
        stages += [[StepSpec(_prefix(step.name, label), step.action, step.queue, step.params) for step in stage]
                   for stage in protection_workflows._merge_stages(view)]
    stages += [
        [StepSpec(_prefix("Choose recovery point", label), CHOOSE_POINT, ORCHESTRATION_QUEUE, params)],
        [StepSpec(_prefix("Create recovery VM", label), CREATE_RECOVERY_VM, recovery_queue, params)],
        [StepSpec(_prefix(f"Restore disk {disk.name}", label), RESTORE_DISK, recovery_queue,
                  {**params, "disk_id": disk.id}) for disk in view.disks],
        [StepSpec(_prefix("Start recovery VM", label), START_RECOVERY_VM, recovery_queue, params)],
        [StepSpec(_prefix("Finish test failover" if kind == FailoverKind.TEST else "Finish failover", label),
                  FINISH_FAILOVER, ORCHESTRATION_QUEUE, params)],
    ]
    return Prepared(item_id, view.vm.name, stages, {"failover_id": failover_id, "recovery_host": target.name,
                                                       "point": point})


def _start(kind: str, prepared: Prepared, **params: Any) -> str:
    protection_workflows._require_actions()
    _require_actions()
    view = _view(prepared.item_id)
    return protection_workflows._start_item_job(kind, view, prepared.stages, **prepared.params, **params)


def _require_actions() -> None:
    import importlib

    importlib.import_module(ACTIONS_MODULE)


# ---- failover ----------------------------------------------------------------------------------------------
def start_test_failover(item_id: str, *, point: str = PointChoice.LATEST_PROCESSED,
                        recovery_host: str | None = None, test_network: str | None = None) -> str:
    """A drill: the VM comes up at the recovery site in an isolated network from the chosen point while the
    item keeps replicating. Returns the job id; the report is on the item's latest test failover record."""
    return _start(TEST_FAILOVER, failover_stages(item_id, FailoverKind.TEST, point=point,
                                                 recovery_host=recovery_host, test_network=test_network))


def start_test_failover_cleanup(item_id: str) -> str:
    """Delete the drill's test VM."""
    view = _view(item_id)
    with session_scope() as session:
        drill = active_test_failover(session, item_id)
    if drill is None:
        raise InvalidStateError(f"VM {view.vm.name!r} has no test failover to clean up")
    params = {"item_id": item_id, "failover_id": drill.id}
    stages = [
        [StepSpec("Delete test VM", DELETE_RECOVERY_VM, host_queue(drill.target_host), params)],
        [StepSpec("Finish test failover cleanup", FINISH_CLEANUP, ORCHESTRATION_QUEUE, params)],
    ]
    return _start(TEST_FAILOVER_CLEANUP, Prepared(item_id, view.vm.name, stages, {"failover_id": drill.id}))


def start_planned_failover(item_id: str, *, recovery_host: str | None = None,
                           public_ips: dict[str, str] | None = None) -> str:
    """Shut the VM down, ship and apply its last changes, bring it up at the recovery site: no data loss."""
    return _start(PLANNED_FAILOVER, failover_stages(item_id, FailoverKind.PLANNED, recovery_host=recovery_host,
                                                    public_ips=public_ips))


def start_unplanned_failover(item_id: str, *, point: str = PointChoice.LATEST_PROCESSED,
                             recovery_host: str | None = None, public_ips: dict[str, str] | None = None) -> str:
    """The primary is unreachable: bring the VM up at the recovery site from a point it already has."""
    return _start(UNPLANNED_FAILOVER, failover_stages(item_id, FailoverKind.UNPLANNED, point=point,
                                                      recovery_host=recovery_host, public_ips=public_ips))


def _operation_on(item_id: str, allowed: tuple[ReplicationState, ...], doing: str, find_record) -> tuple[
        ItemView, FailoverRecord, dict[str, Any]]:
    """The item (checked to be in an `allowed` state), the failover record the operation acts on, and the
    params of its steps."""
    view = _view(item_id)
    _require_state(view, allowed, doing)
    with session_scope() as session:
        record = find_record(session, item_id)
    return view, record, {"item_id": item_id, "failover_id": record.id}


def _current_failover(session: Session, item_id: str) -> FailoverRecord:
    record = latest_failover(session, item_id, (FailoverKind.PLANNED, FailoverKind.UNPLANNED))
    if record is None or record.status is not FailoverStatus.SUCCEEDED:
        raise InvalidStateError(f"protected item {item_id} has no completed failover to act on")
    return record


def cancel_failover(item_id: str) -> str:
    """Before commit: delete the recovery VM and let the primary run and replicate again."""
    view, record, params = _operation_on(item_id, (S.FAILED_OVER,), "cancel the failover of", _current_failover)
    stages = [[StepSpec("Delete recovery VM", DELETE_RECOVERY_VM, host_queue(record.target_host), params)]]
    if record.kind is FailoverKind.PLANNED:
        stages.append([StepSpec("Start VM on the primary", RESUME_PRIMARY, view.queue, params)])
    stages.append([StepSpec("Finish cancelling failover", FINISH_CANCEL, ORCHESTRATION_QUEUE, params)])
    return _start(CANCEL_FAILOVER, Prepared(item_id, view.vm.name, stages, {"failover_id": record.id}))


def commit_failover(item_id: str) -> str:
    """The recovery site's VM is the VM from now on; failback is possible afterwards."""
    view, record, params = _operation_on(item_id, (S.FAILED_OVER,), "commit the failover of", _current_failover)
    stages = [[StepSpec("Commit failover", COMMIT, ORCHESTRATION_QUEUE, params)]]
    return _start(COMMIT_FAILOVER, Prepared(item_id, view.vm.name, stages, {"failover_id": record.id}))


# ---- failback -------------------------------------------------------------------------------------------
def failback_stages(item_id: str, *, mode: str = FailbackMode.MINIMIZE_DOWNTIME, create_vm: bool = False,
                    host: str | None = None, complete: bool = False, label_vm: bool = False) -> Prepared:
    """Check the request and build the failback stages. `complete` also includes the completion (the
    recovery VM shut down, final changes, swap) after a minimize-downtime synchronization: plans use it."""
    if mode not in FailbackMode.ALL:
        raise ValueError(f"failback mode must be one of {', '.join(FailbackMode.ALL)}, got {mode!r}")
    view = _view(item_id)
    _require_state(view, (S.FAILOVER_COMMITTED,), "fail back")
    with session_scope() as session:
        failover = latest_failover(session, item_id, (FailoverKind.PLANNED, FailoverKind.UNPLANNED))
        if failover is None or failover.status is not FailoverStatus.COMMITTED:
            raise InvalidStateError(f"VM {view.vm.name!r} has no committed failover to fail back from")
        target = _host_named(session, host, f"failback of VM {view.vm.name!r}") if host else view.host
    failback_id = str(uuid.uuid4())
    params = {"item_id": item_id, "failover_id": failback_id}
    label = view.vm.name if label_vm else None
    primary, recovery = host_queue(target.name), host_queue(failover.target_host)
    stages = [
        [StepSpec(_prefix("Begin failback", label), BEGIN_FAILBACK, ORCHESTRATION_QUEUE,
                  {**params, "mode": mode, "create_vm": create_vm, "target_host": target.name,
                   "recovery_host": failover.target_host, "recovery_vm": failover.target_vm,
                   "requested_at": time.time()})],
        [StepSpec(_prefix("Prepare VM on the primary", label), PREPARE_PRIMARY_VM, primary, params)],
    ]
    if mode == FailbackMode.FULL_DOWNLOAD:
        stages.append([StepSpec(_prefix("Shut down recovery VM", label), SHUT_DOWN_RECOVERY_VM, recovery, params)])
    stages += [
        [StepSpec(_prefix(f"Prepare staging disk {disk.name}", label), PREPARE_STAGING, primary,
                  {**params, "disk_id": disk.id}) for disk in view.disks],
        [StepSpec(_prefix(f"Send differences of disk {disk.name}", label), SEND_DIFFERENCES, recovery,
                  {**params, "disk_id": disk.id}) for disk in view.disks],
        [StepSpec(_prefix(f"Download differences of disk {disk.name}", label), DOWNLOAD_DIFFERENCES, primary,
                  {**params, "disk_id": disk.id}) for disk in view.disks],
    ]
    if mode == FailbackMode.MINIMIZE_DOWNTIME and not complete:
        stages.append([StepSpec(_prefix("Failback ready to complete", label), FAILBACK_READY,
                                ORCHESTRATION_QUEUE, params)])
    else:
        stages += _completion_stages(view, params, primary, recovery, label,
                                     shut_down=mode == FailbackMode.MINIMIZE_DOWNTIME)
    return Prepared(item_id, view.vm.name, stages, {"failover_id": failback_id, "mode": mode, "host": target.name})


def _completion_stages(view: ItemView, params: dict[str, Any], primary: str, recovery: str, label: str | None,
                       *, shut_down: bool) -> list[list[StepSpec]]:
    stages = []
    if shut_down:
        stages.append([StepSpec(_prefix("Shut down recovery VM", label), SHUT_DOWN_RECOVERY_VM, recovery, params)])
    return stages + [
        [StepSpec(_prefix("Send final changes", label), SEND_FINAL_CHANGES, recovery, params)],
        [StepSpec(_prefix(f"Apply final changes to disk {disk.name}", label), APPLY_FINAL_CHANGES, primary,
                  {**params, "disk_id": disk.id}) for disk in view.disks],
        [StepSpec(_prefix("Swap in failed-back disks and start VM", label), SWAP_DISKS, primary, params)],
        [StepSpec(_prefix("Finish failback", label), FINISH_FAILBACK, ORCHESTRATION_QUEUE, params)],
    ]


def start_failback(item_id: str, *, mode: str = FailbackMode.MINIMIZE_DOWNTIME, create_vm: bool = False,
                   host: str | None = None) -> str:
    """Fail a committed failover back to the primary (or to `host`). Minimize downtime synchronizes while
    the recovery VM runs and stops at failback_ready (complete_failback finishes); full download copies
    whole disks with the recovery VM off. The primary's disks are only swapped when all is staged."""
    return _start(FAILBACK, failback_stages(item_id, mode=mode, create_vm=create_vm, host=host))


def _current_failback(session: Session, item_id: str) -> FailoverRecord:
    record = latest_failover(session, item_id, (FailoverKind.FAILBACK,))
    if record is None:
        raise InvalidStateError(f"protected item {item_id} has no failback")
    return record


def complete_failback(item_id: str) -> str:
    """Minimize downtime, second half: shut the recovery VM down, copy its last changes, swap, start."""
    view, record, params = _operation_on(item_id, (S.FAILBACK_READY,), "complete the failback of", _current_failback)
    stages = [[StepSpec("Begin failback completion", BEGIN_FAILBACK, ORCHESTRATION_QUEUE,
                        {**params, "completing": True})]]
    stages += _completion_stages(view, params, host_queue(record.target_host),
                                 host_queue(record.details["recovery_host"]), None, shut_down=True)
    return _start(FAILBACK_COMPLETION, Prepared(item_id, view.vm.name, stages, {"failover_id": record.id}))


def cancel_failback(item_id: str, *, wait_s: float = CANCEL_WAIT_S) -> str:
    """Stop a failback before its swap: the running failback job is cancelled, then the staging disks are
    discarded and the recovery VM runs on. The primary's disks are exactly as they were."""
    view = _view(item_id)
    _require_state(view, (S.FAILING_BACK, S.FAILBACK_READY, S.FAILOVER_COMMITTED), "cancel the failback of")
    with session_scope() as session:
        record = _current_failback(session, item_id)
        holder = protection_workflows._lock_holder(item_id)
    if holder is not None:
        if holder.kind not in (FAILBACK, FAILBACK_COMPLETION):
            raise engine.ItemBusyError(f"VM {view.vm.name!r} is busy with job {holder.id} ({holder.kind})")
        engine.cancel(holder.id)
        deadline = time.monotonic() + wait_s
        while protection_workflows._lock_holder(item_id) is not None:
            if time.monotonic() > deadline:
                raise engine.ItemBusyError(
                    f"failback job {holder.id} of VM {view.vm.name!r} is cancelled but a step of it is still "
                    f"running; call cancel again once it stops"
                )
            time.sleep(0.1)
    if record.status is FailoverStatus.SUCCEEDED:
        raise InvalidStateError(f"the failback of VM {view.vm.name!r} has swapped the disks already: commit it")
    params = {"item_id": item_id, "failover_id": record.id}
    stages = [
        [StepSpec("Discard staging disks", DISCARD_STAGING, host_queue(record.target_host), params)],
        [StepSpec("Start recovery VM", RESTART_RECOVERY_VM, host_queue(record.details["recovery_host"]), params)],
        [StepSpec("Finish cancelling failback", FINISH_FAILBACK_CANCEL, ORCHESTRATION_QUEUE, params)],
    ]
    return _start(CANCEL_FAILBACK, Prepared(item_id, view.vm.name, stages, {"failover_id": record.id}))


def commit_failback(item_id: str) -> str:
    """The VM runs on the primary for good: the recovery VM is deleted; reverse replication comes next."""
    view, record, params = _operation_on(item_id, (S.FAILED_BACK,), "commit the failback of", _current_failback)
    stages = [
        [StepSpec("Delete recovery VM", DELETE_RECOVERY_VM, host_queue(record.details["recovery_host"]), params)],
        [StepSpec("Commit failback", COMMIT_FAILBACK, ORCHESTRATION_QUEUE, params)],
    ]
    return _start(COMMIT_FAILBACK_JOB, Prepared(item_id, view.vm.name, stages, {"failover_id": record.id}))


def start_reverse_replication(item_id: str) -> str:
    """Protect the failed-back VM again: its disks are resynchronized against the replica (only differing
    blocks are sent), then delta replication resumes."""
    view = _view(item_id)
    _require_state(view, (S.FAILBACK_COMMITTED,), "reverse-replicate")
    params = {"item_id": item_id}
    stages = [[StepSpec("Begin reverse replication", BEGIN_REVERSE, ORCHESTRATION_QUEUE, params)]]
    stages += protection_workflows._resync_stages(view)
    return _start(REVERSE_REPLICATION, Prepared(item_id, view.vm.name, stages, {}))


# ---- checking a point ------------------------------------------------------------------------------------
def start_verify(item_id: str, point: str | None = None) -> str:
    """Check the replica against a recovery point (the latest by default) without touching the source: each
    disk's content at that point is read back from the recovery storage and its manifest root compared
    with the one the point recorded. The job fails, naming the disk and chunk, when one differs."""
    view = _view(item_id)
    with session_scope() as session:
        chosen = resolve_point(session, session.get(ProtectedItem, item_id), point or PointChoice.LATEST_PROCESSED)
    params = {"item_id": item_id, "point_id": chosen.id}
    stages = [[StepSpec(f"Verify disk {disk.name} against recovery point", VERIFY_POINT,
                        engine.RECOVERY_QUEUE, {**params, "disk_id": disk.id}) for disk in view.disks]]
    return _start(VERIFY_RECOVERY_POINT, Prepared(item_id, view.vm.name, stages, {"point_id": chosen.id}))


# ---- reports -----------------------------------------------------------------------------------------------
def failover_report(record_id: str) -> dict[str, Any]:
    """A failover's record as plain JSON: the drill report (point, roots and their check, RTO, RPO)."""
    with session_scope() as session:
        record = session.get(FailoverRecord, record_id)
        if record is None:
            raise NonRecoverableError(f"no failover record {record_id}")
        plain = record.model_dump()
    return {key: (value.isoformat() if hasattr(value, "isoformat") else
                  str(value) if isinstance(value, (FailoverKind, FailoverStatus)) else value)
            for key, value in plain.items()}


# ---- job hooks -----------------------------------------------------------------------------------------------
def _record(session: Session, job: Job) -> FailoverRecord | None:
    failover_id = job.params.get("failover_id")
    return session.get(FailoverRecord, failover_id) if failover_id else None


def revert_item(session: Session, item: ProtectedItem, record: FailoverRecord | None, outcome: str,
                error: str | None) -> None:
    """A failover or failback job ended without success: the item goes back to where it was, the record
    says how it ended. Shared with recovery plans."""
    if record is not None and record.status is FailoverStatus.IN_PROGRESS:
        record.status = FailoverStatus.CANCELLED if outcome == "cancelled" else FailoverStatus.FAILED
        record.details = {**record.details, "error": error}
        session.add(record)
    if item.replication_state is S.FAILING_OVER:
        previous = (record.details.get("previous_state") if record is not None else None) or S.PROTECTED
        item.replication_state = S(previous) if S(previous) in (S.PROTECTED, S.RESYNC_REQUIRED, S.FAILED_OVER,
                                                                S.RESYNCHRONIZING) else S.PROTECTED
        if item.replication_state is S.RESYNCHRONIZING:
            item.replication_state = S.RESYNC_REQUIRED
    elif item.replication_state is S.FAILING_BACK:
        previous = (record.details.get("previous_state") if record is not None else None)
        item.replication_state = S.FAILBACK_READY if previous == S.FAILBACK_READY and outcome == "failed" \
            else S.FAILOVER_COMMITTED
    session.add(item)
    if outcome == "failed":
        mark_critical(session, item, "failover_failed", error or "a failover job failed")
    session.flush()


def _on_end(job: Job, session: Session) -> None:
    item = session.get(ProtectedItem, job.params.get("item_id"))
    if item is None:
        return
    revert_item(session, item, _record(session, job), job.state.value, job.error)


for _kind in FAILOVER_JOB_KINDS:
    if _kind != REVERSE_REPLICATION:
        job_hook(_kind, "failed")(_on_end)
        job_hook(_kind, "cancelled")(_on_end)
job_hook(REVERSE_REPLICATION, "failed")(protection_workflows._on_failure)


@job_hook(VERIFY_RECOVERY_POINT, "failed")
def _on_verify_failed(job: Job, session: Session) -> None:
    """A replica that does not hold what its point recorded is not to be trusted for failover: Warning."""
    item = session.get(ProtectedItem, job.params.get("item_id"))
    if item is not None:
        mark_warning(session, item, "recovery_point_verification_failed", job.error or "verification failed")


def active_jobs(item_ids: list[str]) -> list[Job]:
    with session_scope() as session:
        return list(session.exec(select(Job).where(Job.target.in_(item_ids), Job.state.in_(ACTIVE_JOB_STATES))))


def merge_vm_stages(prepared: list[Prepared]) -> list[list[StepSpec]]:
    """The stages of several VMs run side by side: stage k of the result holds every VM's stage k (a Celery
    group), so the VMs of a recovery plan group move together."""
    return [[step for stage in stages if stage for step in stage]
            for stages in zip_longest(*(p.stages for p in prepared), fillvalue=[])]

