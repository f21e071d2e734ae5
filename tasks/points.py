"""The recovery point actions: verifying a point from the recovery storage alone; deleting the points made
before a time (never a locked one) and the replica versions only they needed."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from datapath.errors import NonRecoverableError
from datapath.points import prune_versions, verify_point
from models.db import database_now
from models.protection import ProtectedItem, RecoveryPoint, recovery_points
from models.retention_lock import delete_points_before, require_disable_allowed
from tasks.replica_records import checked_state
from tasks.replication import _load, _storage, item_action, replica_of
from workflows import actions as A
from workflows.engine import StepContext


# ---- checking a point ----------------------------------------------------------------------------------------
@item_action(A.VERIFY_POINT)
def verify_point_of_disk(ctx: StepContext, *, item_id: str, point_id: str, disk_id: str) -> dict[str, Any]:
    """Read the disk's content at the point back from the recovery storage and compare its manifest root
    with the point's; a difference fails the step, naming the first differing chunk."""
    view = _load(ctx, item_id)
    disk = view.disk(disk_id)
    with ctx.session() as session:
        point = session.get(RecoveryPoint, point_id)
        if point is None:
            raise NonRecoverableError(f"recovery point {point_id} no longer exists (pruned past retention)")
        version, expected = point.versions.get(disk.disk_uuid), point.manifest_roots.get(disk.disk_uuid)
    if version is None:
        raise NonRecoverableError(f"recovery point {point_id} has no version of disk {disk.name}")
    with _storage(view) as storage:
        replica = replica_of(view, storage, disk.name)
        checked_state(ctx, item_id, disk, replica)  # a replica rolled back behind the database is refused
        check = verify_point(replica, version, expected, on_progress=ctx.progress)
    if not check.ok:
        raise NonRecoverableError(
            f"VM {view.vm.name!r}, disk {disk.name}: the replica at recovery point {point_id} (version {version}) "
            f"has manifest root {check.actual_root}, the point recorded {expected}; first differing chunk "
            f"{check.first_bad_chunk}"
        )
    return {"disk": disk.name, "version": version, "root": check.actual_root, "ok": True,
            "seconds": round(check.seconds, 3)}


# ---- deleting points -----------------------------------------------------------------------------------------
@item_action(A.DELETE_POINTS)
def delete_points(ctx: StepContext, *, item_id: str, before: str) -> dict[str, Any]:
    """Delete the item's recovery points made before `before` (never its latest), all or none. The retention
    lock is checked again here, on the database's clock, whatever was checked when the job was requested: a
    job may have been started some other way, or waited while a point became locked. A locked one refuses
    the whole request (RetentionLockError: the step fails, nothing is deleted). A rerun finds them gone."""
    view = _load(ctx, item_id)
    with ctx.session() as session:
        item = session.get(ProtectedItem, item_id)
        deleted = delete_points_before(session, item, datetime.fromisoformat(before), database_now(session),
                                       view.vm.name)
        kept = len(recovery_points(session, item))
        return {"deleted": len(deleted), "deleted_points": [point.id for point in deleted], "kept": kept}


@item_action(A.PRUNE_POINT_VERSIONS)
def prune_point_versions(ctx: StepContext, *, item_id: str, disk_id: str) -> dict[str, Any]:
    """Delete the disk's replica versions (undo logs, manifests) from before the oldest point still recorded,
    as retention pruning does: nothing a kept point needs, so never what a locked one needs."""
    view = _load(ctx, item_id)
    disk = view.disk(disk_id)
    with ctx.session() as session:
        points = recovery_points(session, session.get(ProtectedItem, item_id))
        kept = [point.versions[disk.disk_uuid] for point in points if disk.disk_uuid in point.versions]
    if not kept:
        return {"disk": disk.name, "keep_from": None, "pruned_versions": []}
    keep_from = min(kept)
    with _storage(view) as storage:
        replica = replica_of(view, storage, disk.name)
        checked_state(ctx, item_id, disk, replica)  # a replica rolled back behind the database is refused
        pruned = prune_versions(replica, keep_from)
    return {"disk": disk.name, "keep_from": keep_from, "pruned_versions": pruned}


@item_action(A.CHECK_RETENTION_LOCK)
def check_retention_lock(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """Before disabling protection deletes every point: none may be inside its retention lock now (checked when
    the job was requested too; again here, on the database's clock, for a job started another way)."""
    view = _load(ctx, item_id)
    with ctx.session() as session:
        item = session.get(ProtectedItem, item_id)
        require_disable_allowed(session, item, database_now(session), view.vm.name)
        return {"points": len(recovery_points(session, item))}
