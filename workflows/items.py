"""A protected item as the workflows see it: loaded with its VM, host, disks and policy, checked, locked.

`load_item` reads; `ItemRequest` is the part of it a stage builder needs, as plain values, so that a job
kind's stages are built without the database. Every job of an item holds the item's lock
(`item:<item_id>`): one workflow at a time per VM, and a second request gets ItemBusyError naming the job
that holds it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from datapath.errors import NonRecoverableError
from models.db import database_now, session_scope
from models.fabric import Host, VirtualDisk, VirtualMachine, VmNotFoundError, host_queue, vm_disks
from models.jobs import ACTIVE_JOB_STATES, Job, JobLock
from models.policy import ReplicationPolicy
from models.protection import InvalidStateError, ProtectedItem, RecoveryPoint, ReplicationState, item_lock_key
from workflows.engine import ItemBusyError
from workflows.jobkind import JobKind, start
from workflows.rpo import rpo_status


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


def view_of(item_id: str) -> ItemView:
    """`load_item` in a session of its own."""
    with session_scope() as session:
        return load_item(session, item_id)


@dataclass(frozen=True)
class DiskRef:
    id: str
    name: str


@dataclass(frozen=True)
class ItemRequest:
    """What a stage builder knows of an item: ids and names, no rows."""

    item_id: str
    vm: str
    queue: str
    """The item's own host's agent queue, `host.<name>`."""
    disks: tuple[DiskRef, ...]
    extra: tuple[tuple[str, Any], ...] = ()
    """Further job params of the request (e.g. a resync's `manual`), kept on the job record."""

    @classmethod
    def of(cls, view: ItemView, **extra: Any) -> ItemRequest:
        return cls(view.item.id, view.vm.name, view.queue, tuple(DiskRef(d.id, d.name) for d in view.disks),
                   tuple(extra.items()))

    @property
    def params(self) -> dict[str, Any]:
        """The params every step of the item's jobs gets."""
        return {"item_id": self.item_id}


def item_locks(request: Any) -> list[str]:
    """The lock policy of a single item's jobs: the item's lock."""
    return [item_lock_key(request.item_id)]


def item_target(request: Any) -> str:
    return request.item_id


def item_job_params(request: ItemRequest) -> dict[str, Any]:
    return {"item_id": request.item_id, "vm": request.vm, **dict(request.extra)}


def require_state(view: ItemView, allowed: Iterable[ReplicationState], doing: str) -> None:
    allowed = tuple(allowed)
    if view.item.replication_state not in allowed:
        raise InvalidStateError(
            f"cannot {doing} VM {view.vm.name!r} (protected item {view.item.id}): it is "
            f"{view.item.replication_state}, not {' or '.join(sorted(allowed))}"
        )


def lock_holder(item_id: str) -> Job | None:
    """The job holding the item's lock now, if any."""
    with session_scope() as session:
        lock = session.get(JobLock, item_lock_key(item_id))
        return None if lock is None else session.get(Job, lock.job_id)


def busy_error(item_id: str, vm_name: str, kind: str) -> ItemBusyError:
    """The refusal of a `kind` request on a busy item, naming the job that held it when we looked (a job
    and its locks are written in one transaction: no holder means it let the item go since)."""
    holder = lock_holder(item_id)
    if holder is None:
        return ItemBusyError(f"VM {vm_name!r} (protected item {item_id}) was busy: the workflow holding it "
                             f"ended just now; send the {kind} request again")
    return ItemBusyError(f"VM {vm_name!r} (protected item {item_id}) is busy with job {holder.id} "
                         f"({holder.kind}, {holder.state.value}): one workflow at a time per VM")


def start_for_item(kind: JobKind[Any], request: Any) -> str:
    """Start a job of `kind` on one item; ItemBusyError naming the job that holds the item."""
    try:
        return start(kind, request)
    except ItemBusyError as busy:
        raise busy_error(request.item_id, request.vm, kind.name) from busy


def _iso(moment: Any) -> str | None:
    return None if moment is None else moment.isoformat()


def item_status(item_id: str) -> dict[str, Any]:
    """What the portal shows of a protected item: state, health and errors, RPO (computed now, with its
    thresholds and when replication last succeeded), unsent share, the latest recovery point, the active job."""
    with session_scope() as session:
        view = load_item(session, item_id)
        item = view.item
        points = session.exec(select(sa.func.count()).select_from(RecoveryPoint).where(
            RecoveryPoint.item_id == item_id)).one()
        rpo = rpo_status(item, view.policy, database_now(session))
    holder = lock_holder(item_id)
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
        **rpo,
        "unsent_ratio": item.unsent_ratio,
        "last_recovery_point_at": _iso(item.last_recovery_point_at),
        "recovery_points": points,
        "next_delta_at": _iso(item.next_delta_at),
        "next_consistency_check_at": _iso(item.next_consistency_check_at),
        "active_job": None if holder is None else {"id": holder.id, "kind": holder.kind,
                                                   "state": holder.state.value},
    }


def active_jobs(item_ids: list[str]) -> list[Job]:
    """The jobs still active on any of the items."""
    with session_scope() as session:
        return list(session.exec(select(Job).where(Job.target.in_(item_ids), Job.state.in_(ACTIVE_JOB_STATES))))


def start_on_item(kind: JobKind[Any], item_id: str, doing: str, **extra: Any) -> str:
    """Start a job of `kind` whose request is the item itself (and `extra` params), once the item is in one
    of the states the kind starts from (`doing` says what was refused)."""
    view = view_of(item_id)
    require_state(view, kind.starts_from, doing)
    return start_for_item(kind, ItemRequest.of(view, **extra))


def restart_on_item(start_job: Callable[[str], str]) -> Callable[[Mapping[str, Any]], str]:
    """The restart of a kind started from its item alone: start it again on the same item."""
    return lambda params: start_job(params["item_id"])
