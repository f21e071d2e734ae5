"""The consistency check's actions (workflows/kinds/consistency_check.py): compare each disk's snapshot with
its replica at the same generation and repair what drifted (datapath.consistency), then report on the item.

Thin: the comparison and the repair are datapath.consistency's; these load the item, check the replica's
state against the database, record what changed, and say what was found.
"""
from __future__ import annotations

from typing import Any

from sqlmodel import select

from datapath.consistency import check_replica
from models.jobs import JobStep, StepState
from models.protection import mark_healthy, mark_warning
from models.replicas import ReplicaRecord
from tasks.replica_records import checked_state, record_values
from tasks.replication import _load, _storage, _tracker, item_action, replica_of
from workflows import actions as A
from workflows import clock
from workflows.engine import StepContext
from workflows.items import load_item

DRIFT_CODE = "consistency_drift"
SHOWN_CHUNKS = 20


@item_action(A.CHECK_DISK)
def check_disk(ctx: StepContext, *, item_id: str, disk_id: str) -> dict[str, Any]:
    """Checksum the disk's snapshot and its replica (brought to the snapshot's generation by the steps
    before), report the chunks that differ, and send only those again."""
    view = _load(ctx, item_id)
    disk = view.disk(disk_id)
    with _storage(view) as storage, _tracker(view, disk.name) as tracker:
        replica = replica_of(view, storage, disk.name)
        # The snapshot this job took (create_snapshot returns it): its content is every write up to the
        # generation before its own.
        generation = tracker.create_snapshot() - 1
        with ctx.session() as session:
            record = session.exec(select(ReplicaRecord).where(
                ReplicaRecord.item_id == item_id, ReplicaRecord.disk_uuid == disk.disk_uuid)).first()
            done_before = record.last_check if record is not None else None
        if done_before is not None and done_before.get("generation") == generation:
            return {"disk": disk.name, **done_before}  # this step ran and recorded before a crash
        state = checked_state(ctx, item_id, disk, replica)
        source = tracker.snapshot_view()
        try:
            report = check_replica(source, replica, state, generation=generation, on_progress=ctx.progress)
        finally:
            source.close()
    result = report.as_result()
    record_values(ctx, item_id, disk, replica.name, applied_generation=state.applied_generation,
                  version=report.version, manifest_root=report.manifest_root or None, checked=True,
                  last_check=result)
    return {"disk": disk.name, **result}


def _describe_drift(result: dict[str, Any]) -> str:
    chunks = result["drifted_chunks"]
    shown = ", ".join(map(str, chunks[:SHOWN_CHUNKS])) + (f" and {len(chunks) - SHOWN_CHUNKS} more"
                                                           if len(chunks) > SHOWN_CHUNKS else "")
    damaged = (f"; the replica storage did not hold its own recorded content in chunks "
               f"{', '.join(map(str, result['damaged_chunks'][:SHOWN_CHUNKS]))}" if result["damaged_chunks"] else "")
    size = f"{result['chunk_size'] // 1024} KiB each"
    return (f"disk {result['disk']} differed from its source at generation {result['generation']} in chunks "
            f"{shown} ({len(chunks)} of {result['chunks_compared']}, {size}){damaged}; "
            f"only those were resynchronized ({result['bytes_sent']} bytes sent)")


@item_action(A.FINISH_CHECK)
def finish_check(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """Drift found turns the item Warning with what differed where (the repair is done, but something
    wrote past replication or corrupted the replica, and an administrator should know); a check that finds
    none clears that warning. The next scheduled check is due one policy interval from now."""
    with ctx.session() as session:
        steps = session.exec(select(JobStep).where(
            JobStep.job_id == ctx.job_id, JobStep.action == A.CHECK_DISK,
            JobStep.state == StepState.succeeded)).all()
        results = sorted((step.result for step in steps if step.result), key=lambda result: result["disk"])
        view = load_item(session, item_id)
        item = view.item
        drifted = [result for result in results if result["drifted_chunks"]]
        if drifted:
            mark_warning(session, item, DRIFT_CODE,
                         "consistency check found drift: " + "; ".join(map(_describe_drift, drifted)))
        else:
            mark_healthy(session, item, DRIFT_CODE)
        interval = view.policy.consistency_check_interval_h
        item.next_consistency_check_at = clock.after(interval * 3600) if interval > 0 else None
        session.add(item)
    return {"disks": len(results), "drifted_disks": [result["disk"] for result in drifted],
            "drifted_chunks": sum(len(result["drifted_chunks"]) for result in results),
            "bytes_sent": sum(result["bytes_sent"] for result in results)}
