"""Failover and failback requests: what a job of those kinds is asked, loaded and checked against the database.

Loading is the only part of a failover or failback job kind that reads the database; it refuses a request
that cannot run (state, point, recovery host, network mappings) before anything is created, and it
fixes what must not change on a restart of the builder (the record id, the request time). The stages
are then built from the request alone (`workflows/stages.py`). Disk data crosses between the sites only
through the recovery storage.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, select

from datapath.errors import NonRecoverableError
from models.db import session_scope
from models.fabric import Host, NetworkMapping, vm_adapters
from models.failover import FailoverKind, FailoverRecord, FailoverStatus, active_test_failover, latest_failover
from models.protection import (
    InvalidStateError,
    ProtectedItem,
    RecoveryPoint,
    RecoveryPointKind,
    ReplicationState,
    recovery_points,
)
from workflows.items import DiskRef, ItemView, require_state, view_of

S = ReplicationState
DEFAULT_TEST_NETWORK = "asr-test-isolated"


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


FAILOVER_STARTS_FROM = {
    FailoverKind.TEST: (S.PROTECTED, S.RESYNC_REQUIRED, S.RESYNCHRONIZING, S.FAILED_OVER),
    FailoverKind.PLANNED: (S.PROTECTED,),
    FailoverKind.UNPLANNED: (S.PROTECTED, S.RESYNC_REQUIRED, S.RESYNCHRONIZING, S.FAILED_OVER),
}


@dataclass(frozen=True)
class VmRequest:
    """What every failover or failback job of one VM knows: its item, VM, host queue and disks, the failover
    record its steps write (`failover_id`), and, inside a recovery plan, the VM's name to label steps."""

    item_id: str
    vm: str
    queue: str
    disks: tuple[DiskRef, ...]
    failover_id: str
    label: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    """Further job params kept on the job record (the mode, the point, the recovery host)."""

    @property
    def params(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "failover_id": self.failover_id}

    @classmethod
    def of(cls, view: ItemView, failover_id: str, *, label: str | None = None, **record: Any) -> VmRequest:
        return cls(view.item.id, view.vm.name, view.queue, tuple(DiskRef(d.id, d.name) for d in view.disks),
                   failover_id, label, record)


@dataclass(frozen=True)
class FailoverRequest(VmRequest):
    kind: str = FailoverKind.TEST
    point: str = PointChoice.LATEST_PROCESSED
    target_host: str = ""
    target_vm: str = ""
    placement: tuple[dict[str, Any], ...] = ()
    public_ips: tuple[tuple[str, str], ...] = ()
    requested_at: float = 0.0
    replaces: str | None = None
    """The record of the failover whose recovery VM this one replaces (failing over again from failed_over, or
    a drill run again after it failed)."""


@dataclass(frozen=True)
class FailbackRequest(VmRequest):
    mode: str = FailbackMode.MINIMIZE_DOWNTIME
    create_vm: bool = False
    primary_host: str = ""
    recovery_host: str = ""
    recovery_vm: str = ""
    requested_at: float = 0.0
    complete: bool = False
    """Also shut the recovery VM down, send the final changes and swap (a plan fails back in one job)."""


@dataclass(frozen=True)
class RecordRequest(VmRequest):
    """An operation on an earlier failover or failback: its record's hosts."""

    record_kind: str = ""
    target_host: str = ""
    recovery_host: str = ""


# ---- checks -------------------------------------------------------------------------------------------
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
            f"failover of VM {view.vm.name!r}: no network mapping for its network(s) "
            f"{', '.join(sorted(set(missing)))} on host {view.host.name!r}'s site or cloud; add one first"
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


# ---- loading requests ---------------------------------------------------------------------------------
def load_failover(item_id: str, kind: str, *, point: str = PointChoice.LATEST_PROCESSED,
                  recovery_host: str | None = None, test_network: str | None = None,
                  public_ips: dict[str, str] | None = None, label_vm: bool = False) -> FailoverRequest:
    """Check a failover request (state, point, host, network mappings) and load what its stages need.
    Raises before anything is created when the request cannot run."""
    if kind not in FAILOVER_STARTS_FROM:
        raise ValueError(f"failover kind must be test, planned or unplanned, got {kind!r}")
    kind = FailoverKind(kind)
    view = view_of(item_id)
    require_state(view, FAILOVER_STARTS_FROM[kind], f"run a {kind} failover of")
    if kind == FailoverKind.PLANNED:
        point = PointChoice.LATEST  # the last changes are shipped after the shutdown: nothing is lost
    elif kind == FailoverKind.UNPLANNED and point == PointChoice.LATEST:
        raise ValueError("an unplanned failover cannot process pending logs: the primary is unreachable; "
                         "choose latest_processed, latest_app_consistent or a point id")
    elif kind == FailoverKind.TEST and point == PointChoice.LATEST and view.item.replication_state is not S.PROTECTED:
        raise ValueError(f"VM {view.vm.name!r} is {view.item.replication_state}: pending logs cannot be processed; "
                         f"choose latest_processed or a point id")
    with session_scope() as session:
        if point != PointChoice.LATEST:
            resolve_point(session, session.get(ProtectedItem, item_id), point)
        replaced_drill = None
        if kind == FailoverKind.TEST:
            drill = active_test_failover(session, item_id)
            if drill is not None and drill.status in (FailoverStatus.FAILED, FailoverStatus.CANCELLED):
                # The way out of a failed drill is running it again: the new one replaces its test VM.
                replaced_drill = drill.id
            elif drill is not None:
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
    # A failover replaces the recovery VM of the one before it when that one is still failed over, or when it
    # failed or was cancelled (running it again is the way out; a VM it left behind is its own to replace).
    replaces = previous.id if (previous is not None and kind != FailoverKind.TEST and (
        view.item.replication_state is S.FAILED_OVER
        or previous.status in (FailoverStatus.FAILED, FailoverStatus.CANCELLED))) else replaced_drill
    base = VmRequest.of(view, str(uuid.uuid4()), label=view.vm.name if label_vm else None,
                        recovery_host=target.name, point=point)
    return FailoverRequest(
        **vars(base), kind=str(kind), point=point, target_host=target.name,
        target_vm=f"{view.vm.name}-test" if kind == FailoverKind.TEST else view.vm.name,
        placement=tuple(placement), public_ips=tuple((public_ips or {}).items()), requested_at=time.time(),
        replaces=replaces,
    )


def load_failback(item_id: str, *, mode: str = FailbackMode.MINIMIZE_DOWNTIME, create_vm: bool = False,
                  host: str | None = None, complete: bool = False, label_vm: bool = False) -> FailbackRequest:
    """Check a failback request (state, the committed failover it undoes, the host) and load what its
    stages need."""
    if mode not in FailbackMode.ALL:
        raise ValueError(f"failback mode must be one of {', '.join(FailbackMode.ALL)}, got {mode!r}")
    view = view_of(item_id)
    require_state(view, (S.FAILOVER_COMMITTED,), "fail back")
    with session_scope() as session:
        failover = latest_failover(session, item_id, (FailoverKind.PLANNED, FailoverKind.UNPLANNED))
        if failover is None or failover.status is not FailoverStatus.COMMITTED:
            raise InvalidStateError(f"VM {view.vm.name!r} has no committed failover to fail back from")
        target = _host_named(session, host, f"failback of VM {view.vm.name!r}") if host else view.host
    base = VmRequest.of(view, str(uuid.uuid4()), label=view.vm.name if label_vm else None,
                        mode=mode, host=target.name)
    return FailbackRequest(
        **vars(base), mode=mode, create_vm=create_vm, primary_host=target.name,
        recovery_host=failover.target_host, recovery_vm=failover.target_vm, requested_at=time.time(),
        complete=complete,
    )


def current_failover(session: Session, view: ItemView) -> FailoverRecord:
    item_id = view.item.id
    record = latest_failover(session, item_id, (FailoverKind.PLANNED, FailoverKind.UNPLANNED))
    if record is None or record.status is not FailoverStatus.SUCCEEDED:
        raise InvalidStateError(f"protected item {item_id} has no completed failover to act on")
    return record


def current_failback(session: Session, view: ItemView) -> FailoverRecord:
    record = latest_failover(session, view.item.id, (FailoverKind.FAILBACK,))
    if record is None:
        raise InvalidStateError(f"protected item {view.item.id} has no failback")
    return record


def current_drill(session: Session, view: ItemView) -> FailoverRecord:
    drill = active_test_failover(session, view.item.id)
    if drill is None:
        raise InvalidStateError(f"VM {view.vm.name!r} has no test failover to clean up")
    return drill


def load_record_operation(item_id: str, allowed: tuple[ReplicationState, ...], doing: str,
                          find_record: Callable[[Session, ItemView], FailoverRecord]) -> RecordRequest:
    """An operation on the item's current failover, failback or drill (`find_record`), the item checked to
    be in an `allowed` state (none: any)."""
    view = view_of(item_id)
    if allowed:
        require_state(view, allowed, doing)
    with session_scope() as session:
        record = find_record(session, view)
        details = dict(record.details)
    base = VmRequest.of(view, record.id)
    return RecordRequest(**vars(base), record_kind=str(record.kind), target_host=record.target_host,
                         recovery_host=details.get("recovery_host", ""))


def record_of(params: Mapping[str, Any]) -> FailoverRecord | None:
    """The failover record a job's params name (restarts read what the first run was asked from it)."""
    failover_id = params.get("failover_id")
    if not failover_id:
        return None
    with session_scope() as session:
        return session.get(FailoverRecord, failover_id)
