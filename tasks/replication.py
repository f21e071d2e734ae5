"""The replication actions: the steps of the protection job kinds (workflows/kinds/).

Each is thin: it loads the protected item by id, opens the host's trackers (on the host's agent worker)
or the recovery storage, calls one resumable step of `datapath.replication`, reports progress through
`ctx.progress`, and records what the orchestration needs. Every action can run again after a crash and
find its work done or resume it.

Also the beat task `asr.replication.tick`, which runs the replication scheduler.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import select

from datapath.copy import DEFAULT_FLUSH_INTERVAL, CopyResult
from datapath.disk import FORMATS, open_disk
from datapath.errors import (
    DiskNotFoundError,
    LogCorruptError,
    LogOutOfSequenceError,
    NonRecoverableError,
    ResyncRequiredError,
)
from datapath.points import PointMismatchError, prune_versions
from datapath.replication import ReplicaDisk, apply_shipped_logs, initial_copy, ship_pending_logs
from datapath.resynchronize import resynchronize
from datapath.tracker import RESYNC_THRESHOLD, ReplicationTracker
from models.db import as_utc, database_now, session_scope
from models.jobs import JobStep
from models.protection import (
    ProtectedItem,
    RecoveryPoint,
    RecoveryPointKind,
    ReplicationState,
    mark_healthy,
    mark_warning,
    prune_recovery_points,
    record_recovery_point,
    require_resync,
    transition,
)
from sites.host import Host as HostDriver
from sites.host import QuiesceError
from sites.storage.base import RecoveryStorage
from sites.storage.throttled import UploadLimit
from tasks.boot_files import upload_boot_files
from tasks.recovery_storage import host_upload_limit, open_recovery_storage
from tasks.replica_records import (
    RESYNC_REQUIRED_CODE,
    checked_state,
    delete_records,
    record_copy_checkpoint,
    record_shipped,
    record_state,
    record_values,
    recorded_applied_generation,
    recorded_copy,
    recorded_shipped_generation,
    require_disk_resync,
    require_resync_of,
    restore_recorded_state,
)
from worker import app
from workflows import actions as A
from workflows import alerts, clock, rpo, scheduler
from workflows.engine import StepContext, action
from workflows.items import ItemView, load_item
from workflows.retry import is_recoverable

MIB = 1024 * 1024
MAX_OS_DISK_BYTES = 2 * 1024**4
MAX_DATA_DISK_BYTES = 4 * 1024**4
APP_CONSISTENCY_CODE = "app_consistency_failed"


# ---- opening things ------------------------------------------------------------------------------
@contextmanager
def _storage(view: ItemView) -> Iterator[RecoveryStorage]:
    storage = open_recovery_storage(view.item.recovery_storage, view.item.storage_options, host_upload_limit(view))
    try:
        yield storage
    finally:
        storage.close()


def replica_of(view: ItemView, storage: RecoveryStorage, disk_name: str) -> ReplicaDisk:
    """The disk's replica, in the folder fixed when protection was enabled (a VM failed back to an
    alternate host keeps it)."""
    host, vm = (view.item.replica_folder or f"{view.host.name}/{view.vm.name}").split("/", 1)
    return ReplicaDisk(storage, ReplicaDisk.name_for(host, vm, disk_name))


def _driver(view: ItemView) -> HostDriver:
    return HostDriver(view.host.root, view.host.name)


@contextmanager
def _tracker(view: ItemView, disk_name: str) -> Iterator[ReplicationTracker]:
    tracker = _driver(view).tracker(view.vm.name, disk_name)
    try:
        yield tracker
    finally:
        tracker.close()


def _load(ctx: StepContext, item_id: str) -> ItemView:
    with ctx.session() as session:
        return load_item(session, item_id)


# ---- enable protection -----------------------------------------------------------------------------
RETRYING_CODE = "replication_retrying"


def item_action(name: str):
    """Register an action on one protected item. A recoverable failure leaves the item Warning while its
    step waits on the retry schedule, so health shows replication falling behind; the next successful
    health update clears it (a non-recoverable one is the failure hook's: Critical)."""

    def register(fn):
        @functools.wraps(fn)
        def run(ctx: StepContext, *, item_id: str, **params: Any):
            try:
                return fn(ctx, item_id=item_id, **params)
            except Exception as exc:
                if is_recoverable(exc):
                    with ctx.session() as session:
                        item = load_item(session, item_id).item
                        mark_warning(session, item, RETRYING_CODE,
                                     f"{ctx.step_name} failed and will be retried: {exc}")
                raise

        return action(name)(run)

    return register


@item_action(A.PREREQUISITES)
def prerequisites(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """The VM and each of its disks are on the host as registered, in a format and size that can be
    replicated, and the recovery storage is reachable with credentials it accepts."""
    view = _load(ctx, item_id)
    on_host = _driver(view).get_vm(view.vm.name)
    where = f"VM {view.vm.name!r} on host {view.host.name!r}"
    host_disks = {disk.id: disk for disk in on_host.disks}
    # The VM's first disk (in its manifest) is the OS disk, which Azure caps lower.
    os_disk = on_host.disks[0].id if on_host.disks else None
    for disk in view.disks:
        found = host_disks.get(disk.disk_uuid)
        if found is None:
            raise DiskNotFoundError(f"{where} has no disk {disk.name!r} ({disk.disk_uuid}) any more")
        with open_disk(found.path) as image:
            size = image.size
        if found.format not in FORMATS:
            raise NonRecoverableError(f"{where}, disk {disk.name!r}: format {found.format!r} is not raw or VHD")
        if size != disk.size or size % MIB:
            raise NonRecoverableError(
                f"{where}, disk {disk.name!r}: {size} bytes on the host, {disk.size} registered; replicas "
                f"need a whole number of MiB"
            )
        limit, kind = (MAX_OS_DISK_BYTES, "OS") if disk.disk_uuid == os_disk else (MAX_DATA_DISK_BYTES, "data")
        if size > limit:
            raise NonRecoverableError(f"{where}, {kind} disk {disk.name!r}: {size} bytes exceeds {limit}")
    with _storage(view) as storage:
        # A request, so refused credentials show here (StorageAuthError: not retried).
        storage.list_objects(f"{view.host.name}/{view.vm.name}/")
    return {"disks": len(view.disks)}


@item_action(A.CREATE_RELATIONSHIP)
def create_relationship(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """Track every disk's writes from now on, and create its replica on the recovery storage."""
    view = _load(ctx, item_id)
    driver = _driver(view)
    newly_tracked = driver.enable_tracking(view.vm.name)
    with _storage(view) as storage:
        for disk in view.disks:
            storage.create_disk(replica_of(view, storage, disk.name).name, disk.size)
        boot_files = upload_boot_files(view, driver, storage)
    return {"newly_tracked": [disk.name for disk in newly_tracked], "boot_files": boot_files}


@item_action(A.START_REPLICATION)
def start_replication(ctx: StepContext, *, item_id: str, scheduled_at: str | None) -> dict[str, Any]:
    """Initial replication starts now, or is left to the scheduler at the policy's time."""
    with ctx.session() as session:
        item = session.get(ProtectedItem, item_id)
        if scheduled_at is None:
            transition(item, ReplicationState.INITIAL_REPLICATION)
        else:
            transition(item, ReplicationState.INITIAL_REPLICATION_PENDING)
            item.initial_replication_at = datetime.fromisoformat(scheduled_at)
        session.add(item)
        return {"state": str(item.replication_state), "scheduled_at": scheduled_at}


# ---- snapshot and copy ---------------------------------------------------------------------------------
@item_action(A.SNAPSHOT_VM)
def snapshot_vm(ctx: StepContext, *, item_id: str, enter_state: str | None) -> dict[str, Any]:
    """Snapshot every disk of the VM together (each later copy or resync reads its disk's snapshot).

    The snapshot of an initial replication or a resync is the source of a full copy: a tracker's
    resync requirement ends with it, in the same update (writes after it are logged and shipped as
    usual). A consistency check's snapshot is compared, not copied, and clears nothing."""
    if enter_state is not None:
        _enter_state(ctx, item_id, ReplicationState(enter_state))
    view = _load(ctx, item_id)
    copy_source = view.item.replication_state in (ReplicationState.INITIAL_REPLICATION,
                                                  ReplicationState.RESYNCHRONIZING)
    generations = {}
    for disk in view.disks:
        with _tracker(view, disk.name) as tracker:
            generations[disk.name] = tracker.create_snapshot(clears_resync=copy_source)
    return {"first_generations": generations}


def _enter_state(ctx: StepContext, item_id: str, state: ReplicationState) -> None:
    with ctx.session() as session:
        view = load_item(session, item_id)
        item = view.item
        if state is ReplicationState.RESYNCHRONIZING and item.replication_state is ReplicationState.PROTECTED:
            require_resync(session, item, "manual resynchronization requested", view.policy)
        transition(item, state)
        session.add(item)


@item_action(A.COPY_DISK)
def copy_disk(ctx: StepContext, *, item_id: str, disk_id: str) -> dict[str, Any]:
    """Copy the disk's snapshot to its replica, resuming from the replica's checkpoint."""
    view = _load(ctx, item_id)
    disk = view.disk(disk_id)
    with _storage(view) as storage, _tracker(view, disk.name) as tracker:
        replica = replica_of(view, storage, disk.name)
        before = replica.load_state()
        recorded = recorded_copy(ctx, item_id, disk, replica.name)
        # Where this run started: the checkpoint an earlier run (crashed, poisoned, redelivered) left, as far
        # as the database recorded it too (initial_copy trusts the state's no further).
        resumed_from = 0
        if before is not None and not before.initial_copy_done:
            resumed_from = before.copy_checkpoint if recorded is None else min(
                before.copy_checkpoint, recorded[1] if recorded[0] == before.copy_started_generation else 0)
        copied: list[CopyResult] = []
        state = initial_copy(
            tracker, replica, flush_interval=checkpoint_interval(host_upload_limit(view)),
            on_progress=ctx.progress, recorded=recorded, on_copied=copied.append,
            on_checkpoint=lambda generation, offset: record_copy_checkpoint(ctx, item_id, disk, replica.name,
                                                                            generation, offset))
    record_state(ctx, item_id, disk, replica.name, state, resynchronized=True)
    ctx.progress(state.size, state.size)
    # bytes_written: what this run sent (zero chunks are not; a resumed run sends only the rest).
    return {"bytes": state.size, "applied_generation": state.applied_generation, "resumed_from": resumed_from,
            "bytes_written": sum(result.bytes_written for result in copied)}


def checkpoint_interval(upload_limit: UploadLimit | None) -> int:
    """Bytes a copy sends between checkpoints: 64 MiB, or on a host whose uplink is limited what it sends in
    about 5 s (whole MiB), so a copy cut short on a slow link resumes having lost seconds, not minutes."""
    if upload_limit is None:
        return DEFAULT_FLUSH_INTERVAL
    return max(MIB, min(DEFAULT_FLUSH_INTERVAL, upload_limit.bytes_per_s * 5 // MIB * MIB))


@item_action(A.DELETE_SNAPSHOT)
def delete_snapshot(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    view = _load(ctx, item_id)
    for disk in view.disks:
        with _tracker(view, disk.name) as tracker:
            tracker.delete_snapshot()
    return {"disks": len(view.disks)}


@item_action(A.RESYNC_DISK)
def resync_disk(ctx: StepContext, *, item_id: str, disk_id: str) -> dict[str, Any]:
    """Send the replica only the blocks of the disk's snapshot that differ from it."""
    view = _load(ctx, item_id)
    disk = view.disk(disk_id)
    with _storage(view) as storage, _tracker(view, disk.name) as tracker:
        replica = replica_of(view, storage, disk.name)
        restored = restore_recorded_state(ctx, item_id, disk, replica, disk_id=tracker.disk_id.hex(),
                                          size=tracker.disk_size)
        recorded = recorded_applied_generation(ctx, item_id, disk)
        # A recovery side found not as recorded is not trusted for its manifests either: read it whole.
        report = resynchronize(tracker, replica, on_progress=ctx.progress,
                               recorded_generation=-1 if recorded is None else recorded, read_replica=restored)
    # From what the resync did, not from the recovery side's state: this is what makes them agree again.
    record_values(ctx, item_id, disk, replica.name, applied_generation=report.first_generation - 1,
                  version=report.version, manifest_root=report.manifest_root, resynchronized=True)
    return {
        "bytes_sent": report.bytes_sent, "bytes_zeroed": report.bytes_zeroed, "blocks_sent": report.blocks_sent,
        "chunks_compared": report.chunks_compared, "chunks_sent": report.chunks_sent,
        "first_generation": report.first_generation, "state_restored_from_database": restored,
        # The replica's side from its stored manifest (only differing chunks read), or read whole and why.
        "replica_read_whole": report.replica_read_whole, "why_read_whole": report.why_read_whole,
    }


# ---- merging logs ------------------------------------------------------------------------------------
@item_action(A.SHIP_LOGS)
def ship_logs(ctx: StepContext, *, item_id: str, seal: bool = True) -> dict[str, Any]:
    """Seal every disk's log (also a disk without writes: all disks advance together into one recovery
    point), then upload every sealed log not yet shipped. All seals come before any upload, so the disks'
    logs end as close together in time as the trackers allow. When the policy's app-consistent frequency
    is due, the seals happen with the VM quiesced (its pre/post commands, its writes paused), so the
    point is app-consistent; a quiesce that fails leaves a crash-consistent point and a warning.

    The point's time is the database's clock just before the seals (`sealed_at`), never this host's: every
    write made before it is in the point, so the RPO measured from it is never under-stated, and a host
    clock that is off changes nothing. `seal=False` ships only the logs sealed already: the consistency
    check brings the replica to the generation its snapshot sealed, and no further."""
    view = _load(ctx, item_id)
    disks: dict[str, dict[str, Any]] = {}
    with ctx.session() as session:
        sealed_at = database_now(session)
    app_consistent = seal and _app_consistent_due(view, sealed_at)
    quiesce_error = None
    with ExitStack() as stack:
        storage = stack.enter_context(_storage(view))
        replicas = {disk.name: replica_of(view, storage, disk.name) for disk in view.disks}
        # Before anything is sealed or sent: a recovery side whose state disagrees with the database would
        # have logs skipped, or applied onto the wrong bytes.
        applied = {disk.name: checked_state(ctx, item_id, disk, replicas[disk.name]).applied_generation
                   for disk in view.disks}
        shipped_before = {disk.name: recorded_shipped_generation(ctx, item_id, disk) for disk in view.disks}
        trackers = {disk.name: stack.enter_context(_tracker(view, disk.name)) for disk in view.disks}
        # A tracker whose logs may lack writes its disk has (its service stopped uncleanly): shipping them
        # would make a recovery point that is not the disk. Nothing is shipped; the item needs a resync.
        for disk in view.disks:
            why = trackers[disk.name].resync_required()
            if why is not None:
                raise ResyncRequiredError(require_disk_resync(ctx, item_id, disk, why))
        # Measured before sealing: what piled up since the last cycle.
        unsent = {name: tracker.unsent_bytes() for name, tracker in trackers.items()}
        if not seal:
            sealed = {name: None for name in trackers}
        elif app_consistent:
            try:
                with _driver(view).quiesce(view.vm.name):
                    sealed = {name: tracker.seal().generation for name, tracker in trackers.items()}
            except QuiesceError as exc:
                app_consistent, quiesce_error = False, str(exc)
                sealed = {name: tracker.seal().generation for name, tracker in trackers.items()}
        else:
            sealed = {name: tracker.seal().generation for name, tracker in trackers.items()}
        for done, disk in enumerate(view.disks):
            shipped = ship_pending_logs(trackers[disk.name], replicas[disk.name],
                                        applied_generation=applied[disk.name],
                                        shipped_generation=shipped_before[disk.name])
            record_shipped(ctx, item_id, disk, shipped)
            tracker = trackers[disk.name]
            # Bytes sent to the recovery storage (the metrics' bytes replicated): the logs uploaded now.
            shipped_bytes = sum(log.size for log in tracker.pending_logs() if log.generation in shipped)
            disks[disk.disk_uuid] = {"name": disk.name, "unsent_ratio": unsent[disk.name] / tracker.disk_size,
                                     "unsent_bytes": unsent[disk.name], "sealed": sealed[disk.name],
                                     "shipped": shipped, "shipped_bytes": shipped_bytes}
            ctx.progress(done + 1, len(view.disks))
    if quiesce_error is not None:
        with ctx.session() as session:
            mark_warning(session, load_item(session, item_id).item, APP_CONSISTENCY_CODE,
                         f"app-consistent point not taken, crash-consistent instead: {quiesce_error}")
    return {"disks": disks, "app_consistent": app_consistent, "quiesce_error": quiesce_error,
            "sealed_at": sealed_at.isoformat()}


def _app_consistent_due(view: ItemView, now: datetime) -> bool:
    if view.policy.app_consistent_frequency_h <= 0:
        return False
    due = view.item.next_app_consistent_at
    return due is None or due <= now


@item_action(A.APPLY_LOGS)
def apply_logs(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """Apply the shipped logs to every replica, then record the recovery point they make (its replica
    versions and manifest roots per disk, app-consistent when the ship step quiesced the VM) and drop the
    points, and the replica versions only they needed, past the policy's retention. A corrupt or
    out-of-sequence log marks the item resync_required (Warning, with the reason) and fails the job."""
    view = _load(ctx, item_id)
    generations: dict[str, int] = {}
    versions: dict[str, int] = {}
    roots: dict[str, str] = {}
    applied: dict[str, list[int]] = {}
    with _storage(view) as storage:
        replicas = {disk.disk_uuid: replica_of(view, storage, disk.name) for disk in view.disks}
        for done, disk in enumerate(view.disks):
            replica = replicas[disk.disk_uuid]
            checked_state(ctx, item_id, disk, replica)
            try:
                report = apply_shipped_logs(replica, disk_name=f"{view.vm.name}/{disk.name}",
                                            up_to=recorded_shipped_generation(ctx, item_id, disk))
            except (LogCorruptError, LogOutOfSequenceError, PointMismatchError) as broken:
                require_resync_of(ctx, item_id, f"disk {disk.name}: {broken}")
                raise
            record_values(ctx, item_id, disk, replica.name, applied_generation=report.applied_generation,
                          version=report.version, manifest_root=report.manifest_root)
            applied[disk.name] = report.applied
            generations[disk.disk_uuid] = report.applied_generation
            versions[disk.disk_uuid] = report.version
            roots[disk.disk_uuid] = report.manifest_root
            ctx.progress(done + 1, len(view.disks))
        shipped = _ship_step(ctx.job_id).result or {}
        app_consistent = bool(shipped.get("app_consistent"))
        kind = RecoveryPointKind.APP_CONSISTENT if app_consistent else RecoveryPointKind.CRASH_CONSISTENT
        with ctx.session() as session:
            now = database_now(session)
            # A Ship logs step of an engine before honest RPO has no sealed_at: now is later than its seal,
            # so only that one point looks a cycle younger than it is.
            sealed_at = datetime.fromisoformat(shipped["sealed_at"]) if shipped.get("sealed_at") else now
            item = session.get(ProtectedItem, item_id)
            known = session.exec(select(RecoveryPoint.versions).where(RecoveryPoint.item_id == item_id)).all()
            if versions not in known:  # a rerun after a crash records nothing twice
                record_recovery_point(session, item, generations, sealed_at, kind=kind, manifest_roots=roots,
                                      versions=versions)
                item.last_replicated_at = now
                if app_consistent:
                    item.next_app_consistent_at = now + timedelta(
                        seconds=clock.scaled(view.policy.app_consistent_frequency_h * 3600))
                session.add(item)
            pruned = prune_recovery_points(session, item, now)
            kept = session.exec(select(RecoveryPoint.versions).where(RecoveryPoint.item_id == item_id)).all()
        pruned_versions = {}
        for disk_uuid, replica in replicas.items():
            oldest = min((point.get(disk_uuid, versions[disk_uuid]) for point in kept), default=versions[disk_uuid])
            pruned_versions[disk_uuid] = prune_versions(replica, oldest)
    return {"applied": applied, "generations": generations, "versions": versions, "point_at": sealed_at.isoformat(),
            "kind": str(kind), "pruned": len(pruned), "pruned_versions": pruned_versions}


def _ship_step(job_id: str) -> JobStep:
    with session_scope() as session:
        step = session.exec(select(JobStep).where(
            JobStep.job_id == job_id, JobStep.action == A.SHIP_LOGS)).first()
    if step is None or step.started_at is None:
        raise NonRecoverableError(f"job {job_id} has no Ship logs step that ran: nothing to base the point on")
    return step


@item_action(A.ACKNOWLEDGE_LOGS)
def acknowledge_logs(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """Delete on the host the logs the database records as applied to the replica, and only those: the
    recovery side's own state is not trusted to say so (a wrong one would have the host delete writes
    the replica never received)."""
    view = _load(ctx, item_id)
    acknowledged = {}
    for disk in view.disks:
        generation = recorded_applied_generation(ctx, item_id, disk)
        if generation is None:
            acknowledged[disk.name] = 0
            continue
        with _tracker(view, disk.name) as tracker:
            tracker.acknowledge(generation)
        acknowledged[disk.name] = generation
    return {"acknowledged": acknowledged}


# ---- health and the end of a job -------------------------------------------------------------------------
def _unsent_by_disk(job_id: str) -> dict[str, float]:
    result = _ship_step(job_id).result or {}
    return {entry["name"]: entry["unsent_ratio"] for entry in result.get("disks", {}).values()}


# A delta cycle leaves at least 1/MIN_IDLE_FRACTION of the copy frequency between its end and the next.
MIN_IDLE_FRACTION = 4


def _next_delta_due(item: ProtectedItem, copy_frequency_s: float, now: datetime, *, finishing: bool) -> datetime:
    """When the item's next delta cycle is due: one copy frequency after the recovery point this cycle cut,
    not after the cycle ended, so RPO peaks at the frequency plus one cycle, not two. A cycle that outlasts
    the frequency still leaves the VM a quarter of it idle (its host and the workers serve other VMs, and a
    VM that cannot keep up shows it in its RPO health). After the initial replication, one frequency from now."""
    frequency = timedelta(seconds=clock.scaled(copy_frequency_s))
    if finishing or item.last_recovery_point_at is None:
        return now + frequency
    return max(as_utc(item.last_recovery_point_at) + frequency, now + frequency / MIN_IDLE_FRACTION)


def _record_replication_health(ctx: StepContext, item_id: str, *, finishing: bool) -> dict[str, Any]:
    unsent = _unsent_by_disk(ctx.job_id)
    with ctx.session() as session:
        now = database_now(session)
        view = load_item(session, item_id)
        item = view.item
        if finishing:
            transition(item, ReplicationState.PROTECTED)
            item.initial_replication_at = None
            mark_healthy(session, item)
        mark_healthy(session, item, RETRYING_CODE)
        item.unsent_ratio = max(unsent.values(), default=0.0)
        item.next_delta_at = _next_delta_due(item, view.policy.copy_frequency_s, now, finishing=finishing)
        over = {name: ratio for name, ratio in unsent.items() if ratio >= RESYNC_THRESHOLD}
        if over and item.replication_state is ReplicationState.PROTECTED:
            reason = "; ".join(
                f"disk {name}: unsent logs reached {ratio:.0%} of the disk (threshold {RESYNC_THRESHOLD:.0%})"
                for name, ratio in sorted(over.items())
            )
            require_resync(session, item, reason, view.policy, now)
            mark_warning(session, item, RESYNC_REQUIRED_CODE, f"resynchronization required: {reason}")
        rpo.apply_rpo_health(session, item, view.policy, now)
        session.add(item)
        return {"state": str(item.replication_state), "health": str(item.health),
                "rpo_s": rpo.rpo_s(item.last_recovery_point_at, now), "unsent_ratio": item.unsent_ratio}


@item_action(A.UPDATE_HEALTH)
def update_health(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """RPO health from the latest point (workflows.rpo); unsent logs at 50% of a disk require a resync."""
    return _record_replication_health(ctx, item_id, finishing=False)


@item_action(A.FINALIZE)
def finalize(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """The item is protected and Healthy; the scheduler runs its next delta cycle after the copy frequency."""
    return _record_replication_health(ctx, item_id, finishing=True)


# ---- disabling protection ---------------------------------------------------------------------------------
def move_item(ctx: StepContext, item_id: str, state: ReplicationState, **fields: Any) -> dict[str, Any]:
    """Move the item to `state` (along the allowed transitions) and set `fields` on it, in one transaction."""
    with ctx.session() as session:
        item = session.get(ProtectedItem, item_id)
        transition(item, state)
        for name, value in fields.items():
            setattr(item, name, value)
        session.add(item)
    return {"state": str(state)}


@item_action(A.BEGIN_DISABLE)
def begin_disable(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    return move_item(ctx, item_id, ReplicationState.DISABLING_PROTECTION)


@item_action(A.STOP_TRACKING)
def stop_tracking(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """Stop tracking every disk of the VM: its logs and any snapshot are deleted on the host."""
    view = _load(ctx, item_id)
    driver = _driver(view)
    stopped = []
    for disk in view.disks:
        if driver.is_tracked(view.vm.name, disk.name):
            driver.tracker(view.vm.name, disk.name).disable()  # disable() also closes it
            stopped.append(disk.name)
    return {"stopped": stopped}


@item_action(A.REMOVE_REPLICAS)
def remove_replicas(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    """Delete the VM's replica disks, their state and shipped logs, and its recovery points."""
    view = _load(ctx, item_id)
    with _storage(view) as storage:
        folder = view.item.replica_folder or f"{view.host.name}/{view.vm.name}"
        removed = storage.list_objects(f"{folder}/")
        for disk in view.disks:
            storage.delete_disk(replica_of(view, storage, disk.name).name)
        for name in storage.list_objects(f"{folder}/"):
            storage.delete_object(name)
    with ctx.session() as session:
        for point in session.exec(select(RecoveryPoint).where(RecoveryPoint.item_id == item_id)).all():
            session.delete(point)
        delete_records(session, item_id)
    return {"removed": removed}


@item_action(A.FINISH_DISABLE)
def finish_disable(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    with ctx.session() as session:
        item = session.get(ProtectedItem, item_id)
        transition(item, ReplicationState.DISABLED)
        item.last_recovery_point_at = item.last_replicated_at = item.next_delta_at = None
        item.unsent_ratio = 0.0
        mark_healthy(session, item)
        return {"state": str(item.replication_state)}


# ---- the scheduler's beat task -------------------------------------------------------------------------
@app.task(name=scheduler.TICK_TASK)
def tick() -> dict[str, int]:
    """Start the delta cycles, scheduled initial replications and automatic resyncs that are due; turn
    items whose RPO crossed a threshold Warning or Critical (and back), whether or not a cycle runs; raise
    and resolve alerts by what holds then."""
    return {**scheduler.run_scheduler(), **rpo.check_rpo(), **alerts.raise_and_resolve_alerts()}
