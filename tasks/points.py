"""The recovery point actions: verifying a point from the recovery storage alone."""
from __future__ import annotations

from typing import Any

from datapath.errors import NonRecoverableError
from datapath.points import verify_point
from models.protection import RecoveryPoint
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

