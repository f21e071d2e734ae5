"""The resync preview's action (workflows/kinds/resync_preview.py): what a resync of one disk would send,
found by reading the disk only (datapath/resync_preview.py), on the host that holds it. Nothing is sent and
nothing is recorded: the result is the step's.
"""
from __future__ import annotations

from typing import Any

from datapath.points import manifest_if_root
from datapath.resync_preview import LiveDiskView, preview_resync
from tasks.replica_records import recorded_replica
from tasks.replication import _load, _storage, _tracker, item_action, replica_of
from workflows import actions as A
from workflows.engine import StepContext


@item_action(A.PREVIEW_RESYNC)
def preview_resync_of_disk(ctx: StepContext, *, item_id: str, disk_id: str) -> dict[str, Any]:
    """Checksum the disk as it is now (read through its tracker: no snapshot, so a preview that dies leaves
    nothing behind) and compare it with the manifest of the replica's last recorded version."""
    view = _load(ctx, item_id)
    disk = view.disk(disk_id)
    recorded = recorded_replica(ctx, item_id, disk)
    if recorded is None:
        return {"disk": disk.name, "available": False,
                "reason": "the initial copy is not done: a resync is not possible yet, the copy sends everything"}
    with _storage(view) as storage, _tracker(view, disk.name) as tracker:
        manifest = manifest_if_root(replica_of(view, storage, disk.name), recorded.version, recorded.manifest_root)
        if manifest is None:
            return {"disk": disk.name, "available": False, "version": recorded.version,
                    "reason": f"no manifest of version {recorded.version} with the root the database recorded is "
                              f"in the recovery storage: a resync compares the disk with the whole replica"}
        preview = preview_resync(LiveDiskView(tracker), manifest, on_progress=ctx.progress)
    return {"disk": disk.name, "available": True, "version": recorded.version,
            "chunks_compared": preview.chunks_compared, "chunks_differing": preview.chunks_differing,
            "bytes_differing": preview.bytes_differing, "chunk_size": preview.chunk_size,
            "seconds": preview.seconds}
