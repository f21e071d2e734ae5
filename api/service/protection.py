"""Protection of a VM: enable, disable, resynchronize, check its replicas against its disks; its recovery
points, their verification and deletion, and the replication health of every protected VM."""
from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import select

from models.db import session_scope
from models.fabric import Host, VirtualMachine
from models.failover import last_successful_drill
from models.protection import ProtectedItem, ReplicationState, item_lock_key
from models.protection import recovery_points as _recovery_points
from workflows.items import item_status
from workflows.kinds import consistency_check as check_kind
from workflows.kinds import delete_recovery_points as delete_points_kind
from workflows.kinds import delta_replication as delta_kind
from workflows.kinds import disable_protection as disable_kind
from workflows.kinds import enable_protection as enable_kind
from workflows.kinds import resync_preview, resynchronize, verify_recovery_point

from .dependents import lock_holder
from .errors import Conflict, Invalid, ServiceError, _operation
from .failover import _check_point
from .lookups import _host, _item_of, _policy, _protected, _vm
from .presenters import _iso, _job_ref


# ---- protection --------------------------------------------------------------------------------------------
def _check_storage(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise Invalid(f"recovery storage must be 'file:///absolute/dir' or 'azure:<container>', got {url!r}")
    if url.startswith("file://") and ".." in Path(url[len("file://"):]).parts:
        raise Invalid(f"recovery storage {url!r}: the directory cannot contain '..'")
    return url


@_operation
def protect(vm: str, *, policy: str, recovery_storage: str, storage_options: dict | None = None,
            recovery_host: str | None = None) -> dict:
    """Enable protection of the VM with the policy, replicating to `recovery_storage`; `recovery_host` is where
    its failovers create the VM unless a failover names another."""
    _check_storage(recovery_storage)
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise Invalid(f"storage options must be an object, got {storage_options!r}")
    with session_scope() as session:
        row = _vm(session, vm)
        policy_row = _policy(session, policy)
        if recovery_host is not None:
            target = _host(session, recovery_host, "recovery host")
            if target.id == row.host_id:
                raise Invalid(f"the recovery host {recovery_host!r} is VM {row.name!r}'s own host")
        item = _item_of(session, row)
        if item is not None and item.replication_state not in (ReplicationState.DISABLED,
                                                               ReplicationState.ENABLING_PROTECTION):
            raise Conflict(f"VM {row.name!r} is already protected (state {item.replication_state})")
        vm_id, vm_name, policy_id = row.id, row.name, policy_row.id
    job_id = enable_kind.start(
        vm_id, policy_id, recovery_storage=recovery_storage, storage_options=dict(storage_options or {}),
        recovery_host=recovery_host)
    return _job_ref(job_id, enable_kind.KIND.name, vm_name)


@_operation
def disable_protection(vm: str, confirm: str | None = None) -> dict:
    """Stop protecting the VM: replicas, shipped logs and recovery points are deleted.

    `confirm`, when given (the REST API always gives it), must be the VM's name: a 400 otherwise. Refused (409,
    naming when the lock ends) while any of its recovery points is inside its retention lock, whoever asks."""
    item_id, name = _protected(vm)
    if confirm is not None and confirm != name:
        raise ServiceError(
            f"disabling protection deletes every replica, shipped log and recovery point of VM {name!r}: confirm by "
            f"sending {{\"confirm\": \"{name}\"}}" + (f" (got {confirm[:80]!r})" if confirm else ""))
    return _job_ref(disable_kind.start(item_id), disable_kind.KIND.name, name)


@_operation
def resync(vm: str) -> dict:
    """Resynchronize the VM's replicas now, sending only the blocks that differ."""
    item_id, name = _protected(vm)
    return _job_ref(resynchronize.start(item_id, manual=True), resynchronize.KIND.name, name)


@_operation
def preview_resync(vm: str) -> dict:
    """What a resync would send, without sending: each disk read live on its host and compared with its
    replica's last recorded version (a job; each step's result has chunks_differing and bytes_differing)."""
    item_id, name = _protected(vm)
    return _job_ref(resync_preview.start(item_id), resync_preview.KIND.name, name)


@_operation
def replicate(vm: str) -> dict:
    """Start a delta replication cycle of the VM now, as beat's scheduler does when the copy frequency has
    passed: ship, apply and acknowledge its logs (a new recovery point), update its health. Refused while a
    cycle (or any other job) runs on it, or when it is not protected."""
    item_id, name = _protected(vm)
    with session_scope() as session:
        holder = lock_holder(session, item_lock_key(item_id))
        if holder is not None and holder.kind == delta_kind.KIND.name:
            raise Conflict(f"a delta replication cycle of VM {name!r} is already running: job {holder.id} "
                           f"({holder.state.value}); follow it with `asr jobs watch {holder.id}`")
    return _job_ref(delta_kind.start(item_id), delta_kind.KIND.name, name)


@_operation
def consistency_check(vm: str) -> dict:
    """Compare every disk of the VM with its replica at the same generation, checksummed from both sides'
    bytes; drifted chunks are reported (the VM turns Warning with them) and only those are sent again."""
    item_id, name = _protected(vm)
    return _job_ref(check_kind.start(item_id), check_kind.KIND.name, name)


# ---- recovery points, verification, health -----------------------------------------------------------------
@_operation
def recovery_points(vm: str) -> list[dict]:
    """The VM's recovery points, oldest first."""
    item_id, _name_of_vm = _protected(vm)
    with session_scope() as session:
        item = session.get(ProtectedItem, item_id)
        return [{"id": point.id, "created_at": _iso(point.created_at), "kind": str(point.kind),
                 "locked_until": _iso(point.locked_until),
                 "versions": dict(point.versions), "manifest_roots": dict(point.manifest_roots),
                 "generations": dict(point.generations)}
                for point in _recovery_points(session, item)]


def _moment(name: str, value: Any) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise Invalid(f"{name}: {value!r} is not an ISO 8601 time such as '2030-01-01T02:00:00+00:00'") from None
    if not isinstance(value, datetime):
        raise Invalid(f"{name} must be an ISO 8601 time, got {value!r}")
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00, past the last UTC moment datetime holds
        raise Invalid(f"{name}: {value.isoformat()} is out of range") from None


@_operation
def delete_recovery_points(vm: str, *, before: datetime | str, confirm: str | None = None) -> dict:
    """Delete the VM's recovery points made before `before` (an ISO time, UTC when it has no zone), never its
    latest, and the replica versions only they needed (a job). All or none: refused (409, naming when the lock
    ends, no job created) when any of them is inside its retention lock, whoever asks.

    `confirm`, when given (the REST API always gives it), must be the VM's name: a 400 otherwise."""
    moment = _moment("before", before)
    item_id, name = _protected(vm)
    if confirm is not None and confirm != name:
        raise ServiceError(
            f"deleting recovery points of VM {name!r} cannot be undone: confirm by sending {{\"confirm\": "
            f"\"{name}\"}}" + (f" (got {confirm[:80]!r})" if confirm else ""))
    return _job_ref(delete_points_kind.start(item_id, moment), delete_points_kind.KIND.name, name)


@_operation
def verify(vm: str, *, point: str | None = None) -> dict:
    """Check the replica against a recovery point (the latest by default), reading it back from the recovery
    storage: the job fails naming the disk and chunk when one differs."""
    item_id, name = _protected(vm)
    if point is not None:
        point = _check_point(item_id, point)
    return _job_ref(verify_recovery_point.start(item_id, point), verify_recovery_point.KIND.name, name)


@_operation
def health() -> list[dict]:
    """One entry per protected VM (protection not disabled): state, health and its errors, RPO (now minus the
    latest point's time, on the database's clock) with the warning and critical thresholds it is held to,
    when replication last succeeded, the latest point, the job running on it, and its latest drill that passed
    (`last_passed_drill`: {id, vm_up_at, rto_s, status}, or None)."""
    with session_scope() as session:
        ids = session.exec(select(ProtectedItem.id).join(VirtualMachine, VirtualMachine.id == ProtectedItem.vm_id)
                           .join(Host, Host.id == VirtualMachine.host_id)
                           .where(ProtectedItem.replication_state != ReplicationState.DISABLED)
                           .order_by(Host.name, VirtualMachine.name)).all()
    report = []
    for item_id in ids:
        status = item_status(item_id)
        with session_scope() as session:
            drill = last_successful_drill(session, item_id)
            last_drill = None if drill is None else {"id": drill.id, "vm_up_at": _iso(drill.vm_up_at),
                                                     "rto_s": drill.rto_s, "status": str(drill.status)}
        report.append({"vm": status["vm"], "host": status["host"], "item_id": item_id, "state": status["state"],
                       "health": status["health"], "errors": status["errors"], "rpo_s": status["rpo_s"],
                       "rpo_warning_s": status["rpo_warning_s"], "rpo_critical_s": status["rpo_critical_s"],
                       "last_replicated_at": status["last_replicated_at"],
                       "last_recovery_point_at": status["last_recovery_point_at"],
                       "recovery_points": status["recovery_points"], "unsent_ratio": status["unsent_ratio"],
                       "active_job": status["active_job"], "last_passed_drill": last_drill})
    return report
