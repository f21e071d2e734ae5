"""The failover and failback actions: the steps of the jobs workflows/failover.py builds.

Thin like every action: load the item and its failover record, call the host driver (sites.host) or the
data path (datapath.points, datapath.failback), record what happened on the record. Every action can run
again after a crash: VMs are found or created, disks restored again from their point, staged changes
applied again (applying a log twice gives the same disk), swaps checked by manifest root.
"""
from __future__ import annotations

import json
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from datapath.disk import open_disk
from datapath.errors import NonRecoverableError
from datapath.failback import (
    apply_difference_log,
    failback_object,
    prepare_staging,
    write_difference_log,
)
from datapath.manifest import Manifest, compute_manifest
from datapath.points import restore_point, verify_point
from datapath.replog import apply_log
from models.db import as_utc
from models.fabric import Host, VirtualDisk, VirtualMachine, vm_adapters, vm_disks
from models.failover import FailoverKind, FailoverRecord, FailoverStatus
from models.jobs import JobStep, StepState
from models.protection import ProtectedItem, RecoveryPoint, ReplicationState, mark_healthy, transition
from sites.host import Host as HostDriver
from sites.host import VmNotFoundError as HostVmNotFoundError
from tasks.replication import _load, _storage, item_action, move_item, replica_of
from workflows import clock, failover
from workflows.engine import StepContext
from workflows.failover import resolve_point

S = ReplicationState


# ---- helpers -------------------------------------------------------------------------------------------
def _record(session: Session, failover_id: str) -> FailoverRecord:
    record = session.get(FailoverRecord, failover_id)
    if record is None:
        raise NonRecoverableError(f"no failover record {failover_id} (its Begin step did not run?)")
    return record


def _read_record(ctx: StepContext, failover_id: str) -> FailoverRecord:
    with ctx.session() as session:
        return _record(session, failover_id)


def _host_driver(session: Session, name: str) -> HostDriver:
    host = session.exec(select(Host).where(Host.name == name)).first()
    if host is None:
        raise NonRecoverableError(f"no host {name!r} is registered")
    return HostDriver(host.root, host.name)


def _driver_named(ctx: StepContext, name: str) -> HostDriver:
    with ctx.session() as session:
        return _host_driver(session, name)


def _update_details(ctx: StepContext, failover_id: str, **details: Any) -> FailoverRecord:
    with ctx.session() as session:
        record = _record(session, failover_id)
        record.details = {**record.details, **details}
        session.add(record)
        return record


def _results_of(ctx: StepContext, action: str, failover_id: str) -> list[dict[str, Any]]:
    """The results of the steps of `action` for this failover, in any job of it: parallel steps report
    through their own step rows (one writer each) rather than all updating the record."""
    with ctx.session() as session:
        jobs = {ctx.job_id, _record(session, failover_id).job_id} - {None}
        steps = session.exec(select(JobStep).where(
            JobStep.action == action, JobStep.state == StepState.succeeded, JobStep.job_id.in_(jobs),
        ).order_by(JobStep.ended_at)).all()
        return [step.result for step in steps if step.params.get("failover_id") == failover_id and step.result]


def _vm_or_none(driver: HostDriver, name: str):
    try:
        return driver.get_vm(name)
    except HostVmNotFoundError:
        return None


# ---- failover -----------------------------------------------------------------------------------------------
@item_action(failover.BEGIN_FAILOVER)
def begin_failover(ctx: StepContext, *, item_id: str, failover_id: str, kind: str, point: str, target_host: str,
                   target_vm: str, placement: list, public_ips: dict, requested_at: float,
                   replaces: str | None) -> dict[str, Any]:
    """Record the failover (the drill report starts here); a real failover moves the item to failing_over."""
    with ctx.session() as session:
        item = session.get(ProtectedItem, item_id)
        record = session.get(FailoverRecord, failover_id)
        if record is None:
            record = FailoverRecord(
                id=failover_id, item_id=item_id, kind=FailoverKind(kind), job_id=ctx.job_id, point_choice=point,
                target_host=target_host, target_vm=target_vm, network=", ".join(p["network"] for p in placement),
                started_at=datetime.fromtimestamp(requested_at, UTC),
                details={"placement": placement, "public_ips": public_ips, "replaces": replaces,
                         "previous_state": str(item.replication_state)},
            )
            session.add(record)
        if kind != FailoverKind.TEST:
            transition(item, S.FAILING_OVER)
            session.add(item)
        return {"failover_id": failover_id, "state": str(item.replication_state)}


@item_action(failover.SHUT_DOWN_PRIMARY)
def shut_down_primary(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The guest stops writing; what it wrote last is in the logs the next steps ship."""
    view = _load(ctx, item_id)
    outcome = HostDriver(view.host.root, view.host.name).shut_down(view.vm.name)
    return {"workload": outcome.name}


@item_action(failover.CHOOSE_POINT)
def choose_point(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Fix the recovery point the failover restores, what each disk's manifest root must be, and the RPO."""
    with ctx.session() as session:
        record = _record(session, failover_id)
        item = session.get(ProtectedItem, item_id)
        if record.point_id is None:
            point = resolve_point(session, item, record.point_choice)
            disks = {disk.disk_uuid: disk.name for disk in vm_disks(session, session.get(VirtualMachine, item.vm_id))}
            missing = [name for uuid_, name in disks.items() if uuid_ not in point.versions]
            if missing:
                raise NonRecoverableError(f"recovery point {point.id} has no version of disk(s) {', '.join(missing)}")
            record.point_id = point.id
            record.point_created_at = point.created_at
            record.point_kind = str(point.kind)
            record.versions = {uuid_: point.versions[uuid_] for uuid_ in disks}
            record.expected_roots = {disks[uuid_]: point.manifest_roots.get(uuid_) for uuid_ in disks}
            record.rpo_s = max(0.0, (as_utc(record.started_at) - as_utc(point.created_at)).total_seconds())
            session.add(record)
        return {"point_id": record.point_id, "point_at": as_utc(record.point_created_at).isoformat(),
                "kind": record.point_kind, "rpo_s": record.rpo_s}


@item_action(failover.CREATE_RECOVERY_VM)
def create_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Create the VM at the recovery site, off, with empty fixed-VHD disks and its NICs placed in the
    recovery (or test) network. A VM of the same name there is only replaced when this failover (a rerun)
    or the failover it replaces created it."""
    view = _load(ctx, item_id)
    record = _read_record(ctx, failover_id)
    driver = _driver_named(ctx, record.target_host)
    ours = {record.details.get("vm_id")}
    replaces = record.details.get("replaces")
    if replaces:
        with ctx.session() as session:
            previous = session.get(FailoverRecord, replaces)
            if previous is not None:
                ours.add(previous.details.get("vm_id"))
    existing = _vm_or_none(driver, record.target_vm)
    if existing is not None:
        if existing.id not in ours - {None}:
            raise NonRecoverableError(
                f"host {driver.name!r} already has a VM {record.target_vm!r} that this failover did not create; "
                f"remove or rename it, or fail over to another recovery host"
            )
        _delete_vm(driver, existing.name)
    placement = record.details["placement"]
    vm = driver.create_vm(record.target_vm, [(disk.name, disk.size, "vhd") for disk in view.disks],
                          networks=[entry["network"] for entry in placement], generation=view.vm.generation)
    for adapter, entry in zip(vm.network_adapters, placement):
        driver.connect_adapter(vm.name, adapter.name, entry["network"], subnet=entry.get("subnet"))
    _update_details(ctx, failover_id, vm_id=vm.id, adapters={a.name: p["adapter"] for a, p in
                                                              zip(vm.network_adapters, placement)})
    return {"vm": vm.name, "host": driver.name, "vm_id": vm.id}


def _delete_vm(driver: HostDriver, name: str) -> None:
    if _vm_or_none(driver, name) is None:
        return
    driver.shut_down(name)
    vm = driver.get_vm(name)
    for disk in vm.disks:
        if driver.is_tracked(name, disk.name):
            driver.tracker(name, disk.name).disable()
    driver.delete_vm(name)


@item_action(failover.RESTORE_DISK)
def restore_disk(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    """Write the disk's content at the chosen point into the recovery VM's disk, and check its root."""
    view = _load(ctx, item_id)
    disk = view.disk(disk_id)
    record = _read_record(ctx, failover_id)
    driver = _driver_named(ctx, record.target_host)
    target_disk = driver.get_vm(record.target_vm).disk(disk.name)
    version = record.versions[disk.disk_uuid]
    with _storage(view) as storage, open_disk(target_disk.path, writable=True) as target:
        result = restore_point(replica_of(view, storage, disk.name), version, target, on_progress=ctx.progress)
    return {"disk": disk.name, "version": version, "bytes": result.bytes_copied, "root": result.manifest_root}


@item_action(failover.START_RECOVERY_VM)
def start_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Check every restored disk against the point's manifest root, then start the VM. A real failover's
    disks are tracked from now on, so what the VM writes can be sent back at failback."""
    produced = {result["disk"]: result["root"] for result in _results_of(ctx, failover.RESTORE_DISK, failover_id)}
    with ctx.session() as session:
        record = _record(session, failover_id)
        record.produced_roots = produced
        session.add(record)
    wrong = {name: (root, produced.get(name)) for name, root in record.expected_roots.items()
             if root is None or produced.get(name) != root}
    if wrong:
        raise NonRecoverableError(
            f"the recovery VM's disks do not match recovery point {record.point_id}: "
            + "; ".join(f"disk {name}: expected root {want}, restored {got}" for name, (want, got) in wrong.items())
        )
    driver = _driver_named(ctx, record.target_host)
    adapters = record.details.get("adapters", {})
    by_source = {source: ours for ours, source in adapters.items()}
    for source_adapter, address in record.details.get("public_ips", {}).items():
        driver.assign_public_ip(record.target_vm, by_source.get(source_adapter, source_adapter), address)
    if record.kind is not FailoverKind.TEST:
        driver.enable_tracking(record.target_vm)
    driver.start_vm(record.target_vm)
    return {"vm": record.target_vm, "host": driver.name, "verified": True}


@item_action(failover.FINISH_FAILOVER)
def finish_failover(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    now = clock.now()
    with ctx.session() as session:
        record = _record(session, failover_id)
        item = session.get(ProtectedItem, item_id)
        record.verified = all(record.produced_roots.get(name) == root for name, root in record.expected_roots.items())
        if record.status is FailoverStatus.IN_PROGRESS:
            record.status = FailoverStatus.SUCCEEDED
            record.vm_up_at = now
            record.rto_s = max(0.0, (now - as_utc(record.started_at)).total_seconds())
        if record.kind is not FailoverKind.TEST:
            transition(item, S.FAILED_OVER)
            replaced = record.details.get("replaces")
            previous = session.get(FailoverRecord, replaced) if replaced else None
            if previous is not None and previous.status is FailoverStatus.SUCCEEDED:
                previous.status = FailoverStatus.CANCELLED
                session.add(previous)
        session.add(record)
        session.add(item)
        return {"rto_s": record.rto_s, "rpo_s": record.rpo_s, "verified": record.verified,
                "point_id": record.point_id, "roots": record.produced_roots}


@item_action(failover.DELETE_RECOVERY_VM)
def delete_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Delete the VM a failover (or drill) created at the recovery site; nothing to do when it is gone."""
    record = _read_record(ctx, failover_id)
    if record.kind is FailoverKind.FAILBACK:
        host, name = record.details["recovery_host"], record.details["recovery_vm"]
    else:
        host, name = record.target_host, record.target_vm
    driver = _driver_named(ctx, host)
    existing = _vm_or_none(driver, name)
    expected = record.details.get("recovery_vm_id") or record.details.get("vm_id")
    if existing is not None and expected is not None and existing.id != expected:
        raise NonRecoverableError(f"VM {name!r} on host {host!r} is not the one the failover created; left alone")
    _delete_vm(driver, name)
    return {"deleted": existing is not None, "vm": name, "host": host}


@item_action(failover.FINISH_CLEANUP)
def finish_cleanup(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    with ctx.session() as session:
        record = _record(session, failover_id)
        record.status = FailoverStatus.CLEANED_UP
        record.ended_at = record.ended_at or clock.now()
        session.add(record)
    return {"failover_id": failover_id}


@item_action(failover.RESUME_PRIMARY)
def resume_primary(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    view = _load(ctx, item_id)
    HostDriver(view.host.root, view.host.name).start_vm(view.vm.name)
    return {"vm": view.vm.name}


def _end(ctx: StepContext, item_id: str, failover_id: str, status: FailoverStatus, state: ReplicationState,
         **item_fields: Any) -> dict[str, Any]:
    """The operation's record ends with `status` and the item moves to `state`, in one transaction."""
    with ctx.session() as session:
        record = _record(session, failover_id)
        item = session.get(ProtectedItem, item_id)
        record.status = status
        record.ended_at = clock.now()
        transition(item, state)
        for name, value in item_fields.items():
            setattr(item, name, value)
        session.add(record)
        session.add(item)
    return {"state": str(state), "failover": str(status)}


@item_action(failover.FINISH_CANCEL)
def finish_cancel(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The primary is the VM again; delta replication resumes at once."""
    return _end(ctx, item_id, failover_id, FailoverStatus.CANCELLED, S.PROTECTED, next_delta_at=clock.now())


@item_action(failover.COMMIT)
def commit(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The recovery VM is the VM; the primary is not replicated any more."""
    result = _end(ctx, item_id, failover_id, FailoverStatus.COMMITTED, S.FAILOVER_COMMITTED, next_delta_at=None)
    with ctx.session() as session:
        mark_healthy(session, session.get(ProtectedItem, item_id))
    return result


# ---- failback ----------------------------------------------------------------------------------------------
def _failback_context(ctx: StepContext, item_id: str, failover_id: str):
    view = _load(ctx, item_id)
    record = _read_record(ctx, failover_id)
    return view, record


def _objects(record: FailoverRecord, view, disk_name: str, what: str) -> str:
    return failback_object(record.target_host, view.vm.name, disk_name, what)


@item_action(failover.BEGIN_FAILBACK)
def begin_failback(ctx: StepContext, *, item_id: str, failover_id: str, completing: bool = False,
                   mode: str | None = None, create_vm: bool = False, target_host: str | None = None,
                   recovery_host: str | None = None, recovery_vm: str | None = None,
                   requested_at: float | None = None) -> dict[str, Any]:
    with ctx.session() as session:
        item = session.get(ProtectedItem, item_id)
        record = session.get(FailoverRecord, failover_id)
        if record is None:
            failed_over = failover.latest_failover(session, item_id, (FailoverKind.PLANNED, FailoverKind.UNPLANNED))
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


@item_action(failover.PREPARE_PRIMARY_VM)
def prepare_primary_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The VM on the primary (or alternate) host, off: created like the protected VM when it does not exist
    there and the request allows it; its disks must match the protected VM's."""
    view, record = _failback_context(ctx, item_id, failover_id)
    with ctx.session() as session:
        driver = _host_driver(session, record.target_host)
        adapters = [adapter.vm_network for adapter in vm_adapters(session, view.vm)]
    vm = _vm_or_none(driver, view.vm.name)
    created = False
    if vm is None:
        if not record.details.get("create_vm"):
            raise NonRecoverableError(
                f"VM {view.vm.name!r} does not exist on host {driver.name!r}: fail back with create_vm (to create "
                f"it there) or to another host"
            )
        vm = driver.create_vm(view.vm.name, [(disk.name, disk.size, disk.format) for disk in view.disks],
                              networks=adapters or ("default",), generation=view.vm.generation)
        created = True
    on_host = {disk.name: disk for disk in vm.disks}
    for disk in view.disks:
        found = on_host.get(disk.name)
        if found is None or found.size != disk.size:
            raise NonRecoverableError(
                f"VM {view.vm.name!r} on host {driver.name!r}: disk {disk.name!r} is missing or not {disk.size} bytes"
            )
    driver.shut_down(vm.name)
    _update_details(ctx, failover_id, primary_vm_id=vm.id,
                    vm_created=created or bool(_read_record(ctx, failover_id).details.get("vm_created")))
    return {"vm": vm.name, "host": driver.name, "created": created}


@item_action(failover.PREPARE_STAGING)
def prepare_staging_disk(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    """A staging copy beside the primary disk receives everything; the disk itself is not touched until the
    swap. Minimize downtime starts from a copy of the disk and publishes its checksums."""
    view, record = _failback_context(ctx, item_id, failover_id)
    disk = view.disk(disk_id)
    driver = _driver_named(ctx, record.target_host)
    on_host = driver.get_vm(view.vm.name).disk(disk.name)
    minimize = record.details["mode"] == failover.FailbackMode.MINIMIZE_DOWNTIME
    copy_from = on_host.path if minimize and not record.details.get("vm_created") else None
    manifest = prepare_staging(driver.staging_path(view.vm.name, disk.name), on_host.size, on_host.format,
                               copy_from=copy_from, on_progress=lambda done: ctx.progress(done, on_host.size))
    if minimize:
        with _storage(view) as storage:
            storage.put_object(_objects(record, view, disk.name, "staging.manifest"), manifest.to_bytes())
    return {"disk": disk.name, "copied_from_primary": copy_from is not None, "root": manifest.root_hex}


@item_action(failover.SEND_DIFFERENCES)
def send_differences(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    """On the recovery host: snapshot the recovery VM's disk, and upload as a log the chunks that differ
    from the primary's staging copy (every chunk with data, for a full download). Writes after the
    snapshot are in the disk's tracker logs from the snapshot's generation on: the final changes."""
    view, record = _failback_context(ctx, item_id, failover_id)
    disk = view.disk(disk_id)
    driver = _driver_named(ctx, record.details["recovery_host"])
    recovery_vm = record.details["recovery_vm"]
    minimize = record.details["mode"] == failover.FailbackMode.MINIMIZE_DOWNTIME
    with _storage(view) as storage, tempfile.TemporaryDirectory() as scratch:
        against = None
        if minimize:
            against = Manifest.from_bytes(storage.read_object(_objects(record, view, disk.name, "staging.manifest")))
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
            "bytes": stats.bytes_in_log, "snapshot_generation": generation}


@item_action(failover.DOWNLOAD_DIFFERENCES)
def download_differences(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    view, record = _failback_context(ctx, item_id, failover_id)
    disk = view.disk(disk_id)
    driver = _driver_named(ctx, record.target_host)
    staging = driver.staging_path(view.vm.name, disk.name)
    with _storage(view) as storage, tempfile.TemporaryFile() as spool:
        sync = json.loads(storage.read_object(_objects(record, view, disk.name, "sync.json")))
        storage.get_object(_objects(record, view, disk.name, "sync.hrl"), spool)
        spool.seek(0)
        with open_disk(staging, writable=True) as target:
            applied = apply_difference_log(spool, target, disk_id=bytes.fromhex(sync["disk_id"]))
    ctx.progress(1, 1)
    return {"disk": disk.name, "bytes": applied.data_bytes, "records": applied.records}


@item_action(failover.FAILBACK_READY)
def failback_ready(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    return move_item(ctx, item_id, S.FAILBACK_READY)


@item_action(failover.SHUT_DOWN_RECOVERY_VM)
def shut_down_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    record = _read_record(ctx, failover_id)
    driver = _driver_named(ctx, record.details["recovery_host"])
    outcome = driver.shut_down(record.details["recovery_vm"])
    if "downtime_from" not in record.details:
        _update_details(ctx, failover_id, downtime_from=clock.now().isoformat())
    return {"workload": outcome.name}


@item_action(failover.SEND_FINAL_CHANGES)
def send_final_changes(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """With the recovery VM off: seal each disk's log and upload the logs written since the snapshot the
    differences were taken at, with the disk's final manifest root for the primary to check against."""
    view, record = _failback_context(ctx, item_id, failover_id)
    driver = _driver_named(ctx, record.details["recovery_host"])
    recovery_vm = record.details["recovery_vm"]
    sent: dict[str, list[int]] = {}
    with _storage(view) as storage:
        for done, disk in enumerate(view.disks):
            sync = json.loads(storage.read_object(_objects(record, view, disk.name, "sync.json")))
            tracker = driver.tracker(recovery_vm, disk.name)
            try:
                tracker.seal()
                logs = [log for log in tracker.pending_logs() if log.generation >= sync["snapshot_generation"]]
                for log in logs:
                    with open(log.path, "rb") as data:
                        storage.put_object(_objects(record, view, disk.name, f"{log.generation:08d}.hrl"), data)
            finally:
                tracker.close()
            with open_disk(driver.get_vm(recovery_vm).disk(disk.name).path) as image:
                root = compute_manifest(image).root_hex
            sent[disk.name] = [log.generation for log in logs]
            storage.put_object(_objects(record, view, disk.name, "final.json"), json.dumps(
                {"generations": sent[disk.name], "root": root, "disk_id": sync["disk_id"]}).encode())
            ctx.progress(done + 1, len(view.disks))
    return {"logs": sent}


@item_action(failover.APPLY_FINAL_CHANGES)
def apply_final_changes(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    """Apply the final logs to the staging disk, in order, and check it now equals the recovery VM's disk."""
    view, record = _failback_context(ctx, item_id, failover_id)
    disk = view.disk(disk_id)
    driver = _driver_named(ctx, record.target_host)
    staging = driver.staging_path(view.vm.name, disk.name)
    with _storage(view) as storage:
        final = json.loads(storage.read_object(_objects(record, view, disk.name, "final.json")))
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
            f"recovery VM's {final['root']}; the primary disk was not touched"
        )
    return {"disk": disk.name, "logs": final["generations"], "root": root}


@item_action(failover.SWAP_DISKS)
def swap_disks(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Swap every staged disk in (a rename each), track the disks afresh, start the VM. A rerun finds the
    disks already swapped by their manifest root."""
    view, record = _failback_context(ctx, item_id, failover_id)
    expected = {result["disk"]: result["root"]
                for result in _results_of(ctx, failover.APPLY_FINAL_CHANGES, failover_id)}
    downloaded = {result["disk"]: result["bytes"]
                  for result in _results_of(ctx, failover.DOWNLOAD_DIFFERENCES, failover_id)}
    with ctx.session() as session:
        record = _record(session, failover_id)
        record.expected_roots = expected
        if downloaded:
            record.details = {**record.details, "downloaded": downloaded}
        session.add(record)
    driver = _driver_named(ctx, record.target_host)
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
    adopted = _adopt_replicas(view, vm)
    driver.start_vm(vm.name)
    with ctx.session() as session:
        record = _record(session, failover_id)
        record.details = {**record.details, "replicas_adopted": adopted}
        record.produced_roots = produced
        record.verified = True
        record.vm_up_at = clock.now()
        session.add(record)
    return {"vm": vm.name, "host": driver.name, "roots": produced}


def _adopt_replicas(view, vm) -> list[str]:
    """The swapped-in disks are tracked afresh (their generations restart at 1), and a VM created anew on
    its host (failback with create_vm) has new disk ids. The replicas are still this item's (their folder is
    pinned to it): they follow the disks, marked as starting a new generation sequence, so reverse
    replication resynchronizes them (only what differs) instead of copying everything again."""
    adopted = []
    with _storage(view) as storage:
        for disk in vm.disks:
            replica = replica_of(view, storage, disk.name)
            state = replica.load_state()
            if state is None:
                continue
            disk_id = uuid.UUID(disk.id).hex
            if state.disk_id != disk_id:
                adopted.append(disk.name)
            state.disk_id = disk_id
            state.applied_generation = state.copy_started_generation = 0
            replica.save_state(state)
    return adopted


@item_action(failover.FINISH_FAILBACK)
def finish_failback(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The VM runs on the primary. Moved to an alternate host, its registration follows it there."""
    now = clock.now()
    with ctx.session() as session:
        record = _record(session, failover_id)
        item = session.get(ProtectedItem, item_id)
        vm = session.get(VirtualMachine, item.vm_id)
        target = session.exec(select(Host).where(Host.name == record.target_host)).first()
        on_host = HostDriver(target.root, target.name).get_vm(vm.name)
        if vm.host_id != target.id or vm.vm_uuid != on_host.id:
            vm.host_id, vm.vm_uuid = target.id, on_host.id
            ids = {disk.name: disk.id for disk in on_host.disks}
            for disk in session.exec(select(VirtualDisk).where(VirtualDisk.vm_id == vm.id)).all():
                disk.disk_uuid = ids[disk.name]
                session.add(disk)
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


@item_action(failover.DISCARD_STAGING)
def discard_staging(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    view, record = _failback_context(ctx, item_id, failover_id)
    driver = _driver_named(ctx, record.target_host)
    if _vm_or_none(driver, view.vm.name) is None:
        return {"discarded": []}
    for disk in view.disks:
        driver.discard_staging(view.vm.name, disk.name)
    return {"discarded": [disk.name for disk in view.disks]}


@item_action(failover.RESTART_RECOVERY_VM)
def restart_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    record = _read_record(ctx, failover_id)
    driver = _driver_named(ctx, record.details["recovery_host"])
    driver.start_vm(record.details["recovery_vm"])
    return {"vm": record.details["recovery_vm"]}


@item_action(failover.FINISH_FAILBACK_CANCEL)
def finish_failback_cancel(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    return _end(ctx, item_id, failover_id, FailoverStatus.CANCELLED, S.FAILOVER_COMMITTED)


@item_action(failover.COMMIT_FAILBACK)
def commit_failback(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    return _end(ctx, item_id, failover_id, FailoverStatus.COMMITTED, S.FAILBACK_COMMITTED)


@item_action(failover.BEGIN_REVERSE)
def begin_reverse_replication(ctx: StepContext, *, item_id: str) -> dict[str, Any]:
    return move_item(ctx, item_id, S.RESYNCHRONIZING, resync_required_reason="reverse replication after failback")


# ---- checking a point ----------------------------------------------------------------------------------------
@item_action(failover.VERIFY_POINT)
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
        check = verify_point(replica_of(view, storage, disk.name), version, expected, on_progress=ctx.progress)
    if not check.ok:
        raise NonRecoverableError(
            f"VM {view.vm.name!r}, disk {disk.name}: the replica at recovery point {point_id} (version {version}) "
            f"has manifest root {check.actual_root}, the point recorded {expected}; first differing chunk "
            f"{check.first_bad_chunk}"
        )
    return {"disk": disk.name, "version": version, "root": check.actual_root, "ok": True,
            "seconds": round(check.seconds, 3)}
