"""The failback actions: the steps of the failback job kinds and reverse replication (workflows/kinds/).

Failback goes through the recovery storage as logs of the differing chunks (datapath.failback) into a
staging copy beside the primary disk, checked against the recovery VM's final manifest root, then swapped
in by rename. Every action can run again after a crash: staged changes are applied again (applying a log
twice gives the same disk), swaps are checked by manifest root.

What the two sides tell each other about a disk (the staging copy's root, the difference log's disk id and
snapshot generation, the final logs' generations and the recovery disk's final root) is taken from the
database, as the step that computed it recorded it (its step result, or the failback record's details),
never from the recovery storage: whoever can write there must not be able to choose what is written onto
the primary disk. The copies the storage also holds (`sync.json`, `final.json`, `staging.manifest`) are
checked against the database and refused when they disagree.
"""
from __future__ import annotations

import json
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import select

from datapath.disk import open_disk
from datapath.errors import NonRecoverableError
from datapath.failback import (
    apply_difference_log,
    failback_object,
    prepare_staging,
    write_difference_log,
)
from datapath.logapply import apply_log
from datapath.manifest import Manifest, compute_manifest
from datapath.replication import ReplicaState
from models.db import as_utc
from models.fabric import Host, VirtualDisk, VirtualMachine, vm_adapters
from models.failover import FailoverKind, FailoverRecord, FailoverStatus, latest_failover
from models.protection import ProtectedItem, ReplicationState, transition
from sites.host import Host as HostDriver
from sites.storage.base import ObjectNotFoundError
from tasks.failover_records import (
    create_vm_like,
    driver_named,
    end_operation,
    failover_record,
    host_driver,
    read_record,
    results_of,
    update_details,
    vm_or_none,
)
from tasks.replica_records import record_generations_restarted, recorded_replica, rekey_records
from tasks.replication import _load, _storage, item_action, move_item, replica_of
from workflows import actions as A
from workflows import clock
from workflows.engine import StepContext
from workflows.failover_request import FailbackMode

S = ReplicationState


# ---- failback ----------------------------------------------------------------------------------------------
def _failback_context(ctx: StepContext, item_id: str, failover_id: str):
    view = _load(ctx, item_id)
    record = read_record(ctx, failover_id)
    return view, record


def _objects(record: FailoverRecord, view, disk_name: str, what: str) -> str:
    return failback_object(record.target_host, view.vm.name, disk_name, what)


@item_action(A.BEGIN_FAILBACK)
def begin_failback(ctx: StepContext, *, item_id: str, failover_id: str, completing: bool = False,
                   mode: str | None = None, create_vm: bool = False, target_host: str | None = None,
                   recovery_host: str | None = None, recovery_vm: str | None = None,
                   requested_at: float | None = None) -> dict[str, Any]:
    with ctx.session() as session:
        item = session.get(ProtectedItem, item_id)
        record = session.get(FailoverRecord, failover_id)
        if record is None:
            failed_over = latest_failover(session, item_id, (FailoverKind.PLANNED, FailoverKind.UNPLANNED))
            record = FailoverRecord(
                id=failover_id, item_id=item_id, kind=FailoverKind.FAILBACK, job_id=ctx.job_id,
                target_host=target_host, target_vm=session.get(VirtualMachine, item.vm_id).name,
                started_at=datetime.fromtimestamp(requested_at, UTC),
                details={"mode": mode, "create_vm": create_vm, "recovery_host": recovery_host,
                         "recovery_vm": recovery_vm, "recovery_vm_id": failed_over.details.get("vm_id"),
                         "failover_id": failed_over.id, "previous_state": str(item.replication_state)},
            )
            session.add(record)
        elif completing and item.replication_state is S.FAILBACK_READY:
            record.details = {**record.details, "previous_state": str(S.FAILBACK_READY),
                              "completion_started_at": clock.now().isoformat()}
            session.add(record)
        transition(item, S.FAILING_BACK)
        session.add(item)
    return {"failover_id": failover_id}


@item_action(A.PREPARE_PRIMARY_VM)
def prepare_primary_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The VM on the primary (or alternate) host, off: created like the protected VM when it does not exist
    there and the request allows it; its disks must match the protected VM's."""
    view, record = _failback_context(ctx, item_id, failover_id)
    with ctx.session() as session:
        driver = host_driver(session, record.target_host)
        adapters = [adapter.vm_network for adapter in vm_adapters(session, view.vm)]
    vm = vm_or_none(driver, view.vm.name)
    created = False
    if vm is None:
        if not record.details.get("create_vm"):
            raise NonRecoverableError(
                f"VM {view.vm.name!r} does not exist on host {driver.name!r}: fail back with create_vm (to create "
                f"it there) or to another host"
            )
        vm = create_vm_like(view, driver, view.vm.name, [(disk.name, disk.size, disk.format) for disk in view.disks],
                            networks=adapters or ["default"])
        created = True
    on_host = {disk.name: disk for disk in vm.disks}
    for disk in view.disks:
        found = on_host.get(disk.name)
        if found is None or found.size != disk.size:
            raise NonRecoverableError(
                f"VM {view.vm.name!r} on host {driver.name!r}: disk {disk.name!r} is missing or not {disk.size} bytes"
            )
    driver.shut_down(vm.name)
    update_details(ctx, failover_id, primary_vm_id=vm.id,
                    vm_created=created or bool(read_record(ctx, failover_id).details.get("vm_created")))
    return {"vm": vm.name, "host": driver.name, "created": created}


@item_action(A.PREPARE_STAGING)
def prepare_staging_disk(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    """A staging copy beside the primary disk receives everything; the disk itself is not touched until the
    swap. Minimize downtime starts from a copy of the disk and publishes its checksums."""
    view, record = _failback_context(ctx, item_id, failover_id)
    disk = view.disk(disk_id)
    driver = driver_named(ctx, record.target_host)
    on_host = driver.get_vm(view.vm.name).disk(disk.name)
    minimize = record.details["mode"] == FailbackMode.MINIMIZE_DOWNTIME
    copy_from = on_host.path if minimize and not record.details.get("vm_created") else None
    manifest = prepare_staging(driver.staging_path(view.vm.name, disk.name), on_host.size, on_host.format,
                               copy_from=copy_from, on_progress=lambda done: ctx.progress(done, on_host.size))
    if minimize:
        with _storage(view) as storage:
            storage.put_object(_objects(record, view, disk.name, "staging.manifest"), manifest.to_bytes())
    return {"disk": disk.name, "copied_from_primary": copy_from is not None, "root": manifest.root_hex}


@item_action(A.SEND_DIFFERENCES)
def send_differences(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    """On the recovery host: snapshot the recovery VM's disk, and upload as a log the chunks that differ
    from the primary's staging copy (every chunk with data, for a full download). Writes after the
    snapshot are in the disk's tracker logs from the snapshot's generation on: the final changes."""
    view, record = _failback_context(ctx, item_id, failover_id)
    disk = view.disk(disk_id)
    driver = driver_named(ctx, record.details["recovery_host"])
    recovery_vm = record.details["recovery_vm"]
    minimize = record.details["mode"] == FailbackMode.MINIMIZE_DOWNTIME
    with _storage(view) as storage, tempfile.TemporaryDirectory() as scratch:
        against = None
        if minimize:
            name = _objects(record, view, disk.name, "staging.manifest")
            against = Manifest.from_bytes(storage.read_object(name), name=name)
            staged = _recorded_by_disk(ctx, A.PREPARE_STAGING, failover_id, disk.name)
            if against.root_hex != staged["root"]:
                raise _storage_disagrees(view, disk.name, name, f"manifest root {against.root_hex}",
                                         f"the staging copy's root {staged['root']}")
        tracker = driver.tracker(recovery_vm, disk.name)
        try:
            generation = tracker.create_snapshot()
            source = tracker.snapshot_view()
            try:
                log = Path(scratch) / "differences.hrl"
                stats = write_difference_log(source, log, disk_id=tracker.disk_id, against=against,
                                             on_progress=lambda done: ctx.progress(done, disk.size))
            finally:
                source.close()
            with open(log, "rb") as data:
                storage.put_object(_objects(record, view, disk.name, "sync.hrl"), data)
            storage.put_object(_objects(record, view, disk.name, "sync.json"), json.dumps(
                {"snapshot_generation": generation, "disk_id": tracker.disk_id.hex(), "root": stats.source_root},
            ).encode())
            tracker.delete_snapshot()
        finally:
            tracker.close()
    return {"disk": disk.name, "chunks_compared": stats.chunks_compared, "chunks_sent": stats.chunks_sent,
            "bytes": stats.bytes_in_log, "snapshot_generation": generation, "disk_id": tracker.disk_id.hex(),
            "root": stats.source_root}


@item_action(A.DOWNLOAD_DIFFERENCES)
def download_differences(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    view, record = _failback_context(ctx, item_id, failover_id)
    disk = view.disk(disk_id)
    driver = driver_named(ctx, record.target_host)
    staging = driver.staging_path(view.vm.name, disk.name)
    sent = _recorded_by_disk(ctx, A.SEND_DIFFERENCES, failover_id, disk.name)
    with _storage(view) as storage, tempfile.TemporaryFile() as spool:
        name = _objects(record, view, disk.name, "sync.json")
        _check_stored_copy(storage, view, disk.name, name, {key: sent.get(key) for key in SYNC_FIELDS})
        storage.get_object(_objects(record, view, disk.name, "sync.hrl"), spool)
        spool.seek(0)
        with open_disk(staging, writable=True) as target:
            applied = apply_difference_log(spool, target, disk_id=bytes.fromhex(sent["disk_id"]))
    ctx.progress(1, 1)
    return {"disk": disk.name, "bytes": applied.data_bytes, "records": applied.records}


@item_action(A.FAILBACK_READY)
def failback_ready(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    return move_item(ctx, item_id, S.FAILBACK_READY)


@item_action(A.SHUT_DOWN_RECOVERY_VM)
def shut_down_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    record = read_record(ctx, failover_id)
    driver = driver_named(ctx, record.details["recovery_host"])
    outcome = driver.shut_down(record.details["recovery_vm"])
    if "downtime_from" not in record.details:
        update_details(ctx, failover_id, downtime_from=clock.now().isoformat())
    return {"workload": outcome.name}


@item_action(A.SEND_FINAL_CHANGES)
def send_final_changes(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """With the recovery VM off: seal each disk's log and upload the logs written since the snapshot the
    differences were taken at. What the primary checks against (the generations, the tracker's disk id, the
    disk's final manifest root) is recorded in the failback record (`details["final"]`); `final.json` in
    the storage is a copy the primary refuses when it disagrees."""
    view, record = _failback_context(ctx, item_id, failover_id)
    driver = driver_named(ctx, record.details["recovery_host"])
    recovery_vm = record.details["recovery_vm"]
    sent: dict[str, list[int]] = {}
    final: dict[str, dict[str, Any]] = {}
    with _storage(view) as storage:
        for done, disk in enumerate(view.disks):
            snapshot_generation = _recorded_by_disk(ctx, A.SEND_DIFFERENCES, failover_id,
                                                    disk.name)["snapshot_generation"]
            tracker = driver.tracker(recovery_vm, disk.name)
            try:
                tracker.seal()
                logs = [log for log in tracker.pending_logs() if log.generation >= snapshot_generation]
                for log in logs:
                    with open(log.path, "rb") as data:
                        storage.put_object(_objects(record, view, disk.name, f"{log.generation:08d}.hrl"), data)
                disk_id = tracker.disk_id.hex()
            finally:
                tracker.close()
            with open_disk(driver.get_vm(recovery_vm).disk(disk.name).path) as image:
                root = compute_manifest(image).root_hex
            sent[disk.name] = [log.generation for log in logs]
            final[disk.name] = {"generations": sent[disk.name], "root": root, "disk_id": disk_id}
            storage.put_object(_objects(record, view, disk.name, "final.json"), json.dumps(final[disk.name]).encode())
            ctx.progress(done + 1, len(view.disks))
    update_details(ctx, failover_id, final=final)
    return {"logs": sent}


@item_action(A.APPLY_FINAL_CHANGES)
def apply_final_changes(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    """Apply the final logs to the staging disk, in order, and check it now equals the recovery VM's disk:
    the generations, disk id and root are the database's (recorded by Send final changes); a `final.json`
    in the storage that says otherwise fails the step before anything is applied."""
    view, record = _failback_context(ctx, item_id, failover_id)
    disk = view.disk(disk_id)
    final = record.details.get("final", {}).get(disk.name)
    if final is None:
        raise NonRecoverableError(
            f"failback of VM {view.vm.name!r}, disk {disk.name}: the database has no final changes recorded for "
            f"it (Send final changes did not complete); the primary disk was not touched"
        )
    driver = driver_named(ctx, record.target_host)
    staging = driver.staging_path(view.vm.name, disk.name)
    with _storage(view) as storage:
        _check_stored_copy(storage, view, disk.name, _objects(record, view, disk.name, "final.json"), final)
        with open_disk(staging, writable=True) as target:
            for generation in final["generations"]:
                with tempfile.TemporaryFile() as spool:
                    storage.get_object(_objects(record, view, disk.name, f"{generation:08d}.hrl"), spool)
                    spool.seek(0)
                    apply_log(spool, target, expected_generation=generation,
                              disk_id=bytes.fromhex(final["disk_id"]), disk_name=f"{view.vm.name}/{disk.name}")
        with open_disk(staging) as image:
            root = compute_manifest(image).root_hex
    if root != final["root"]:
        raise NonRecoverableError(
            f"failback of VM {view.vm.name!r}, disk {disk.name}: the staged disk's manifest root {root} is not the "
            f"recovery VM's {final['root']} (as the database recorded it); the primary disk was not touched"
        )
    return {"disk": disk.name, "logs": final["generations"], "root": root}


SYNC_FIELDS = ("snapshot_generation", "disk_id", "root")
"""What `sync.json` holds: the Send differences step's result for the disk has the same values."""


def _recorded_by_disk(ctx: StepContext, action: str, failover_id: str, disk_name: str) -> dict[str, Any]:
    """The result the step of `action` for this disk recorded in the database (the latest, if it ran more
    than once); NonRecoverableError when it has none."""
    results = {result["disk"]: result for result in results_of(ctx, action, failover_id) if "disk" in result}
    if disk_name not in results:
        raise NonRecoverableError(
            f"failback {failover_id}, disk {disk_name}: the database has no result of step {action!r} for it; "
            f"run the failback again"
        )
    return results[disk_name]


def _storage_disagrees(view, disk_name: str, name: str, stored: str, recorded: str) -> NonRecoverableError:
    return NonRecoverableError(
        f"failback of VM {view.vm.name!r}, disk {disk_name}: {name} in the recovery storage says {stored}, but "
        f"the database records {recorded}; the storage was changed, nothing of it is used and the primary "
        f"disk was not touched"
    )


def _check_stored_copy(storage, view, disk_name: str, name: str, recorded: dict[str, Any]) -> None:
    """The JSON object `name` in the storage must hold exactly `recorded` (the database's values)."""
    try:
        stored = json.loads(storage.read_object(name))
    except ObjectNotFoundError:
        raise _storage_disagrees(view, disk_name, name, "nothing (it is missing)", json.dumps(recorded)) from None
    except ValueError as exc:
        raise _storage_disagrees(view, disk_name, name, f"something unreadable ({exc})",
                                 json.dumps(recorded)) from None
    if stored != recorded:
        raise _storage_disagrees(view, disk_name, name, json.dumps(stored, sort_keys=True),
                                 json.dumps(recorded, sort_keys=True))


@item_action(A.SWAP_DISKS)
def swap_disks(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Swap every staged disk in (a rename each), track the disks afresh, start the VM. A rerun finds the
    disks already swapped by their manifest root."""
    view, record = _failback_context(ctx, item_id, failover_id)
    # The roots Send final changes recorded: what every staged disk was checked against.
    expected = {name: final["root"] for name, final in record.details.get("final", {}).items()}
    downloaded = {result["disk"]: result["bytes"]
                  for result in results_of(ctx, A.DOWNLOAD_DIFFERENCES, failover_id)}
    with ctx.session() as session:
        record = failover_record(session, failover_id)
        record.expected_roots = expected
        if downloaded:
            record.details = {**record.details, "downloaded": downloaded}
        session.add(record)
    driver = driver_named(ctx, record.target_host)
    vm = driver.get_vm(view.vm.name)
    produced = {}
    for disk in view.disks:
        on_host = vm.disk(disk.name)
        staging = driver.staging_path(vm.name, disk.name)
        if staging.exists():
            if driver.is_tracked(vm.name, disk.name):
                driver.tracker(vm.name, disk.name).disable()
            driver.replace_disk(vm.name, disk.name, staging)
        with open_disk(on_host.path) as image:
            produced[disk.name] = compute_manifest(image).root_hex
    wrong = {name: root for name, root in produced.items() if record.expected_roots.get(name) != root}
    if wrong:
        raise NonRecoverableError(
            f"failback of VM {view.vm.name!r}: disk(s) {', '.join(wrong)} on host {driver.name!r} do not hold the "
            f"recovery VM's content and no staged copy is left; run the failback again"
        )
    driver.enable_tracking(vm.name)
    adopted = _adopt_replicas(ctx, item_id, view, vm)
    driver.start_vm(vm.name)
    with ctx.session() as session:
        record = failover_record(session, failover_id)
        record.details = {**record.details, "replicas_adopted": adopted}
        record.produced_roots = produced
        record.verified = True
        record.vm_up_at = clock.now()
        session.add(record)
    return {"vm": vm.name, "host": driver.name, "roots": produced}


def _adopt_replicas(ctx: StepContext, item_id: str, view, vm) -> list[str]:
    """The swapped-in disks are tracked afresh (their generations restart at 1), and a VM created anew on
    its host (failback with create_vm) has new disk ids. The replicas are still this item's (their folder is
    pinned to it): they follow the disks, marked as starting a new generation sequence, so reverse
    replication resynchronizes them (only what differs) instead of copying everything again.

    The state written comes from the database's record of the replica (its version and root), not from the
    state the storage holds, and the record says the generations restarted (`record_generations_restarted`):
    the two agree afterwards. A replica without a record (protected before records existed) keeps its
    stored version and root; one without any state is left alone."""
    adopted = []
    with _storage(view) as storage:
        for registered in view.disks:
            disk = vm.disk(registered.name)
            replica = replica_of(view, storage, disk.name)
            disk_id = uuid.UUID(disk.id).hex
            recorded = recorded_replica(ctx, item_id, registered)
            if recorded is not None:
                state = ReplicaState(disk_id=disk_id, size=registered.size, initial_copy_done=True,
                                     copy_checkpoint=registered.size, version=recorded.version,
                                     manifest_root=recorded.manifest_root)
            else:
                state = replica.load_state()
                if state is None:
                    continue
            if uuid.UUID(registered.disk_uuid).hex != disk_id:
                adopted.append(disk.name)
            state.disk_id = disk_id
            state.applied_generation = state.copy_started_generation = 0
            replica.save_state(state)
            record_generations_restarted(ctx, item_id, registered)
    return adopted


@item_action(A.FINISH_FAILBACK)
def finish_failback(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The VM runs on the primary. Moved to an alternate host, its registration follows it there."""
    now = clock.now()
    with ctx.session() as session:
        record = failover_record(session, failover_id)
        item = session.get(ProtectedItem, item_id)
        vm = session.get(VirtualMachine, item.vm_id)
        target = session.exec(select(Host).where(Host.name == record.target_host)).first()
        on_host = HostDriver(target.root, target.name).get_vm(vm.name)
        if vm.host_id != target.id or vm.vm_uuid != on_host.id:
            vm.host_id, vm.vm_uuid = target.id, on_host.id
            ids = {disk.name: disk.id for disk in on_host.disks}
            renamed = {}
            for disk in session.exec(select(VirtualDisk).where(VirtualDisk.vm_id == vm.id)).all():
                renamed[disk.disk_uuid] = ids[disk.name]
                disk.disk_uuid = ids[disk.name]
                session.add(disk)
            # The replicas' records follow their disks, in the same transaction.
            rekey_records(session, item_id, renamed)
            session.add(vm)
        vm.state = "running"
        record.status = FailoverStatus.SUCCEEDED
        up_at = as_utc(record.vm_up_at) if record.vm_up_at else now
        record.rto_s = max(0.0, (up_at - as_utc(record.started_at)).total_seconds())
        downtime_from = record.details.get("downtime_from")
        if downtime_from:
            # From the recovery VM's shutdown to the primary's start: what the users of the VM noticed.
            downtime = (up_at - datetime.fromisoformat(downtime_from)).total_seconds()
            record.details = {**record.details, "downtime_s": max(0.0, downtime)}
        transition(item, S.FAILED_BACK)
        session.add(record)
        session.add(item)
        return {"rto_s": record.rto_s, "downtime_s": record.details.get("downtime_s"), "roots": record.produced_roots}


@item_action(A.DISCARD_STAGING)
def discard_staging(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    view, record = _failback_context(ctx, item_id, failover_id)
    driver = driver_named(ctx, record.target_host)
    if vm_or_none(driver, view.vm.name) is None:
        return {"discarded": []}
    for disk in view.disks:
        driver.discard_staging(view.vm.name, disk.name)
    return {"discarded": [disk.name for disk in view.disks]}


@item_action(A.RESTART_RECOVERY_VM)
def restart_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    record = read_record(ctx, failover_id)
    driver = driver_named(ctx, record.details["recovery_host"])
    driver.start_vm(record.details["recovery_vm"])
    return {"vm": record.details["recovery_vm"]}


@item_action(A.FINISH_FAILBACK_CANCEL)
def finish_failback_cancel(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    return end_operation(ctx, item_id, failover_id, FailoverStatus.CANCELLED, S.FAILOVER_COMMITTED)


@item_action(A.COMMIT_FAILBACK)
def commit_failback(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    return end_operation(ctx, item_id, failover_id, FailoverStatus.COMMITTED, S.FAILBACK_COMMITTED)


@item_action(A.BEGIN_REVERSE)
def begin_reverse_replication(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    return move_item(ctx, item_id, S.RESYNCHRONIZING, resync_required_reason="reverse replication after failback")


