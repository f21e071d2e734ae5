"""What the replication steps record in the database about each replica, and the check they make first.

The database is the source of truth for what the recovery side holds (models.replicas): each step that
copies, resynchronizes, ships, applies or repairs records what it did as it finishes, and each step that
would act on the recovery side's state compares it with the record first (`checked_state`). A state that
disagrees is refused: the disk's record and the item say why, and the item needs a resync.
"""
from __future__ import annotations

from typing import Any

from sqlmodel import Session, select

from datapath.replication import ReplicaDisk, ReplicaState
from datapath.statecheck import (
    RecordedState,
    ReplicaStateMismatchError,
    check_state,
    completed_ahead,
    read_state,
)
from models.fabric import VirtualDisk
from models.protection import InvalidStateError, mark_warning, require_resync
from models.replicas import ReplicaRecord, replica_record
from workflows import clock
from workflows.engine import StepContext
from workflows.items import load_item

RESYNC_REQUIRED_CODE = "resync_required"


def _find(session: Session, item_id: str, disk_uuid: str) -> ReplicaRecord | None:
    return session.exec(select(ReplicaRecord).where(
        ReplicaRecord.item_id == item_id, ReplicaRecord.disk_uuid == disk_uuid)).first()


def require_resync_of(ctx: StepContext, item_id: str, reason: str) -> None:
    """The item needs a resync for `reason`: resync_required (scheduled outside office hours) and Warning.
    An item mid-failover cannot move there; the warning still says why."""
    with ctx.session() as session:
        view = load_item(session, item_id)
        try:
            require_resync(session, view.item, reason, view.policy)
        except InvalidStateError:
            pass
        mark_warning(session, view.item, RESYNC_REQUIRED_CODE, f"resynchronization required: {reason}")


def require_disk_resync(ctx: StepContext, item_id: str, disk: VirtualDisk, why: str) -> str:
    """The disk needs a resync: its record says why, and the item is marked (`require_resync_of`).
    Returns the reason as recorded."""
    reason = f"disk {disk.name}: {why}"
    with ctx.session() as session:
        record = _find(session, item_id, disk.disk_uuid)
        if record is not None:
            record.resync_reason = reason[:2048]
            session.add(record)
    require_resync_of(ctx, item_id, reason)
    return reason


def checked_state(ctx: StepContext, item_id: str, disk: VirtualDisk, replica: ReplicaDisk) -> ReplicaState:
    """The replica's recovery-side state once it agrees with the database's record
    (datapath.statecheck). A state that disagrees is refused: ReplicaStateMismatchError, after the disk's
    record and the item are marked for resynchronization with the reason."""
    with ctx.session() as session:
        record = _find(session, item_id, disk.disk_uuid)
        recorded = None if record is None else RecordedState(
            record.initial_copy_done, record.applied_generation, record.version, record.manifest_root,
            shipped_generation=record.shipped_generation)
    try:
        if recorded is None:
            # An item protected before the database recorded its replicas: its state is adopted, once.
            state = read_state(replica)
            if state is None or not state.initial_copy_done:
                raise ReplicaStateMismatchError(f"replica {replica.name} has no completed initial copy")
            record_state(ctx, item_id, disk, replica.name, state)
            return state
        agreement = check_state(replica, recorded)
    except ReplicaStateMismatchError as refused:
        require_disk_resync(ctx, item_id, disk, str(refused))
        raise
    if agreement.adopted:  # a completed step crashed before recording: its change is recorded now
        record_state(ctx, item_id, disk, replica.name, agreement.state)
    return agreement.state


def restore_recorded_state(ctx: StepContext, item_id: str, disk: VirtualDisk, replica: ReplicaDisk, *,
                           disk_id: str, size: int) -> bool:
    """Before a resync: a recovery-side state that disagrees with the record is replaced by the record, so
    the resync starts from the version the database (and its recovery points) know, and its new version
    follows that one. Returns whether the state was replaced. A state that agrees, or is the trace of a
    completed step (adopted and recorded), is left alone."""
    with ctx.session() as session:
        record = _find(session, item_id, disk.disk_uuid)
        if record is None or not record.initial_copy_done:
            return False
        recorded = RecordedState(True, record.applied_generation, record.version, record.manifest_root)
    try:
        state = read_state(replica)
        if state is not None and completed_ahead(replica, state, recorded):
            # A resync that completed and crashed before recording (it jumps many generations in one
            # version): this very step's work, recorded now rather than undone.
            record_state(ctx, item_id, disk, replica.name, state)
            return False
        agreement = check_state(replica, recorded)
    except ReplicaStateMismatchError:
        # copy_started_generation 0: no snapshot counts as copied, so the resync compares every chunk.
        replica.save_state(ReplicaState(
            disk_id=disk_id, size=size, applied_generation=recorded.applied_generation, initial_copy_done=True,
            copy_checkpoint=size, manifest_root=recorded.manifest_root, version=recorded.version))
        return True
    if agreement.adopted:
        record_state(ctx, item_id, disk, replica.name, agreement.state)
    return False


def record_state(ctx: StepContext, item_id: str, disk: VirtualDisk, replica_name: str, state: ReplicaState,
                 *, resynchronized: bool = False) -> None:
    """Record that the replica holds `state` (a completed copy, resync, apply or repair). A copy or
    resync starts the log chain afresh, and clears the disk's resync reason."""
    record_values(ctx, item_id, disk, replica_name, applied_generation=state.applied_generation,
                  version=state.version, manifest_root=state.manifest_root,
                  initial_copy_done=state.initial_copy_done, resynchronized=resynchronized)


def record_values(ctx: StepContext, item_id: str, disk: VirtualDisk, replica_name: str, *,
                  applied_generation: int, version: int, manifest_root: str | None,
                  initial_copy_done: bool = True, resynchronized: bool = False,
                  checked: bool = False, last_check: dict[str, Any] | None = None) -> None:
    """Record what the replica holds after a step changed it (or checked it: `checked`, with its report)."""
    with ctx.session() as session:
        record = replica_record(session, item_id, disk.disk_uuid, replica_name)
        record.replica_name = replica_name
        record.initial_copy_done = initial_copy_done
        record.applied_generation = applied_generation
        record.version = version
        record.manifest_root = manifest_root
        if resynchronized:
            record.shipped_generation = applied_generation
            record.resync_reason = None
        if checked:
            record.last_checked_at = clock.now()
            record.last_check = last_check
        record.updated_at = clock.now()
        session.add(record)


def record_shipped(ctx: StepContext, item_id: str, disk: VirtualDisk, generations: list[int]) -> None:
    if not generations:
        return
    with ctx.session() as session:
        record = _find(session, item_id, disk.disk_uuid)
        if record is not None:
            record.shipped_generation = max(record.shipped_generation, *generations)
            record.updated_at = clock.now()
            session.add(record)


def recorded_copy(ctx: StepContext, item_id: str, disk: VirtualDisk, replica_name: str) -> tuple[int, int] | None:
    """(copy_started_generation, copy_checkpoint) of the initial copy in progress as the database recorded
    them; None when the database records the copy as done (the state is then checked against the record by
    the steps after it)."""
    with ctx.session() as session:
        record = replica_record(session, item_id, disk.disk_uuid, replica_name)
        if record.initial_copy_done:
            return None
        return record.copy_started_generation, record.copy_checkpoint


def record_copy_checkpoint(ctx: StepContext, item_id: str, disk: VirtualDisk, replica_name: str, generation: int,
                           offset: int) -> None:
    """The initial copy of `generation`'s snapshot is durable below `offset` (initial_copy's on_checkpoint)."""
    with ctx.session() as session:
        record = replica_record(session, item_id, disk.disk_uuid, replica_name)
        record.copy_started_generation, record.copy_checkpoint = generation, offset
        record.updated_at = clock.now()
        session.add(record)


def recorded_shipped_generation(ctx: StepContext, item_id: str, disk: VirtualDisk) -> int | None:
    """The highest generation the database records as shipped for the disk (never below the applied one);
    None when it has no record (an item protected before records existed)."""
    with ctx.session() as session:
        record = _find(session, item_id, disk.disk_uuid)
        return None if record is None else max(record.shipped_generation, record.applied_generation)


def recorded_applied_generation(ctx: StepContext, item_id: str, disk: VirtualDisk) -> int | None:
    """The generation the database records as applied to the disk's replica; None before its initial copy."""
    with ctx.session() as session:
        record = _find(session, item_id, disk.disk_uuid)
        return record.applied_generation if record is not None and record.initial_copy_done else None


def recorded_replica(ctx: StepContext, item_id: str, disk: VirtualDisk) -> RecordedState | None:
    """What the database records of the disk's replica once its initial copy is done; None otherwise."""
    with ctx.session() as session:
        record = _find(session, item_id, disk.disk_uuid)
        if record is None or not record.initial_copy_done:
            return None
        return RecordedState(True, record.applied_generation, record.version, record.manifest_root)


def record_generations_restarted(ctx: StepContext, item_id: str, disk: VirtualDisk) -> None:
    """The disk was swapped in by a failback and is tracked afresh: its log generations restart at 1, so the
    replica counts none applied or shipped (its content, version and root are unchanged)."""
    with ctx.session() as session:
        record = _find(session, item_id, disk.disk_uuid)
        if record is not None:
            record.applied_generation = record.shipped_generation = 0
            record.updated_at = clock.now()
            session.add(record)


def rekey_records(session: Session, item_id: str, renamed: dict[str, str]) -> None:
    """The item's disks got new ids ({old uuid: new uuid}, a failback that created the VM anew): their
    replicas' records follow them."""
    for record in session.exec(select(ReplicaRecord).where(ReplicaRecord.item_id == item_id)).all():
        if record.disk_uuid in renamed and renamed[record.disk_uuid] != record.disk_uuid:
            record.disk_uuid = renamed[record.disk_uuid]
            session.add(record)


def delete_records(session: Session, item_id: str) -> None:
    """The item's replicas are gone (protection disabled)."""
    for record in session.exec(select(ReplicaRecord).where(ReplicaRecord.item_id == item_id)).all():
        session.delete(record)
