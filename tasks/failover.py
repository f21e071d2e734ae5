"""The failover actions: the steps of the failover job kinds (test, planned and unplanned failover, their
cancel, commit and cleanup; workflows/kinds/).

Thin like every action: load the item and its failover record, call the host driver (sites.host) or the
data path (datapath.points), record what happened on the record. Every action can run again after a
crash: VMs are found or created, disks restored again from their point.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from datapath.disk import open_disk
from datapath.errors import NonRecoverableError
from datapath.points import restore_point
from models.db import as_utc
from models.fabric import VirtualMachine, vm_disks
from models.failover import FailoverKind, FailoverRecord, FailoverStatus
from models.protection import ProtectedItem, ReplicationState, mark_healthy, transition
from sites.host import Host as HostDriver
from sites.host.errors import GuestBootError
from tasks.failover_records import (
    create_vm_like,
    driver_named,
    end_operation,
    failover_record,
    read_record,
    results_of,
    update_boot_check,
    update_details,
    vm_or_none,
)
from tasks.replica_records import checked_state
from tasks.replication import _load, _storage, item_action, replica_of
from workflows import actions as A
from workflows import clock
from workflows.engine import StepContext
from workflows.failover_request import resolve_point

S = ReplicationState


# ---- failover -----------------------------------------------------------------------------------------------
@item_action(A.BEGIN_FAILOVER)
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


@item_action(A.SHUT_DOWN_PRIMARY)
def shut_down_primary(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The guest stops writing; what it wrote last is in the logs the next steps ship."""
    view = _load(ctx, item_id)
    outcome = HostDriver(view.host.root, view.host.name).shut_down(view.vm.name)
    return {"workload": outcome.name}


@item_action(A.CHOOSE_POINT)
def choose_point(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Fix the recovery point the failover restores, what each disk's manifest root must be, and the RPO."""
    with ctx.session() as session:
        record = failover_record(session, failover_id)
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


@item_action(A.CREATE_RECOVERY_VM)
def create_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Create the VM at the recovery site, off, with empty fixed-VHD disks and its NICs placed in the
    recovery (or test) network. A VM of the same name there is only replaced when this failover (a rerun)
    or the failover it replaces created it."""
    view = _load(ctx, item_id)
    record = read_record(ctx, failover_id)
    driver = driver_named(ctx, record.target_host)
    ours = {record.details.get("vm_id")}
    replaces = record.details.get("replaces")
    if replaces:
        with ctx.session() as session:
            previous = session.get(FailoverRecord, replaces)
            if previous is not None:
                ours.add(previous.details.get("vm_id"))
    existing = vm_or_none(driver, record.target_vm)
    if existing is not None:
        if existing.id not in ours - {None}:
            raise NonRecoverableError(
                f"host {driver.name!r} already has a VM {record.target_vm!r} that this failover did not create; "
                f"remove or rename it, or fail over to another recovery host"
            )
        _delete_vm(driver, existing.name)
    placement = record.details["placement"]
    vm = create_vm_like(view, driver, record.target_vm, [(disk.name, disk.size, "vhd") for disk in view.disks],
                        networks=[entry["network"] for entry in placement])
    for adapter, entry in zip(vm.network_adapters, placement, strict=True):
        driver.connect_adapter(vm.name, adapter.name, entry["network"], subnet=entry.get("subnet"))
    update_details(ctx, failover_id, vm_id=vm.id, adapters={a.name: p["adapter"] for a, p in
                                                              zip(vm.network_adapters, placement, strict=True)})
    return {"vm": vm.name, "host": driver.name, "vm_id": vm.id}


def _delete_vm(driver: HostDriver, name: str) -> None:
    if vm_or_none(driver, name) is None:
        return
    driver.shut_down(name)
    vm = driver.get_vm(name)
    for disk in vm.disks:
        if driver.is_tracked(name, disk.name):
            driver.tracker(name, disk.name).disable()
    driver.delete_vm(name)


@item_action(A.RESTORE_DISK)
def restore_disk(ctx: StepContext, *, item_id: str, failover_id: str, disk_id: str) -> dict[str, Any]:
    """Write the disk's content at the chosen point into the recovery VM's disk, and check its root."""
    view = _load(ctx, item_id)
    disk = view.disk(disk_id)
    record = read_record(ctx, failover_id)
    driver = driver_named(ctx, record.target_host)
    target_disk = driver.get_vm(record.target_vm).disk(disk.name)
    version = record.versions[disk.disk_uuid]
    with _storage(view) as storage:
        replica = replica_of(view, storage, disk.name)
        # The versions and undo logs read below are the recovery side's: a replica put back to an older copy
        # of itself (state, manifests and all) is refused here, against the database, before anything is
        # written (and the item needs a resync).
        checked_state(ctx, item_id, disk, replica)
        with open_disk(target_disk.path, writable=True) as target:
            result = restore_point(replica, version, target, on_progress=ctx.progress)
    return {"disk": disk.name, "version": version, "bytes": result.bytes_copied, "root": result.manifest_root}


@item_action(A.START_RECOVERY_VM)
def start_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Check every restored disk against the point's manifest root, then start the VM. A real failover's
    disks are tracked from now on, so what the VM writes can be sent back at failback."""
    produced = {result["disk"]: result["root"] for result in results_of(ctx, A.RESTORE_DISK, failover_id)}
    with ctx.session() as session:
        record = failover_record(session, failover_id)
        record.produced_roots = produced
        session.add(record)
    wrong = {name: (root, produced.get(name)) for name, root in record.expected_roots.items()
             if root is None or produced.get(name) != root}
    if wrong:
        raise NonRecoverableError(
            f"the recovery VM's disks do not match recovery point {record.point_id}: "
            + "; ".join(f"disk {name}: expected root {want}, restored {got}" for name, (want, got) in wrong.items())
        )
    driver = driver_named(ctx, record.target_host)
    adapters = record.details.get("adapters", {})
    by_source = {source: ours for ours, source in adapters.items()}
    for source_adapter, address in record.details.get("public_ips", {}).items():
        driver.assign_public_ip(record.target_vm, by_source.get(source_adapter, source_adapter), address)
    if record.kind is not FailoverKind.TEST:
        driver.enable_tracking(record.target_vm)
    # A drill's guest gets a NIC with no route out (its test network is isolated); a failover's has none
    # until recovery-site networking is real (docs/runtime.md).
    driver.start_vm(record.target_vm, network="isolated" if record.kind is FailoverKind.TEST else "none")
    return {"vm": record.target_vm, "host": driver.name, "verified": True}


@item_action(A.CHECK_RECOVERY_BOOT)
def check_recovery_boot(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """A QEMU guest must reach its heartbeat, then pass its own application check (the VM's definition names
    both console lines). A guest that does not come up is powered off and the step fails recoverably: its
    retry boots it again. A synthetic VM has nothing to boot."""
    record = read_record(ctx, failover_id)
    driver = driver_named(ctx, record.target_host)
    vm = driver.get_vm(record.target_vm)
    if vm.guest is None:
        return {"booted": None}
    driver.start_vm(vm.name, network="isolated" if record.kind is FailoverKind.TEST else "none")
    report = driver.check_boot(vm)
    update_boot_check(ctx, failover_id, report)
    if not report.booted:
        driver.shut_down(vm.name)
        raise GuestBootError(f"recovery VM {vm.name!r} on host {driver.name!r} did not reach its heartbeat within "
                             f"{vm.guest.boot_timeout_s:g} s: {report.detail}")
    if report.check == "failed":
        raise NonRecoverableError(f"recovery VM {vm.name!r} booted, but its application check failed: "
                                  f"{report.detail}")
    return {"booted": True, "heartbeat_s": round(report.heartbeat_s, 2), "check": report.check,
            "detail": report.detail}


@item_action(A.FINISH_FAILOVER)
def finish_failover(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    now = clock.now()
    with ctx.session() as session:
        record = failover_record(session, failover_id)
        item = session.get(ProtectedItem, item_id)
        record.verified = all(record.produced_roots.get(name) == root for name, root in record.expected_roots.items())
        if record.status is FailoverStatus.IN_PROGRESS:
            record.status = FailoverStatus.SUCCEEDED
            # A guest is up at its heartbeat; a synthetic VM when the engine says so.
            heartbeat_at = record.details.get("heartbeat_at")
            record.vm_up_at = datetime.fromtimestamp(heartbeat_at, UTC) if heartbeat_at else now
            record.rto_s = max(0.0, (as_utc(record.vm_up_at) - as_utc(record.started_at)).total_seconds())
        replaced = record.details.get("replaces")
        previous = session.get(FailoverRecord, replaced) if replaced else None
        if record.kind is not FailoverKind.TEST:
            transition(item, S.FAILED_OVER)
            if previous is not None and previous.status is FailoverStatus.SUCCEEDED:
                previous.status = FailoverStatus.CANCELLED
                session.add(previous)
        elif previous is not None and previous.status in (FailoverStatus.FAILED, FailoverStatus.CANCELLED):
            previous.status = FailoverStatus.CLEANED_UP  # the failed drill's test VM was replaced by this one's
            session.add(previous)
        session.add(record)
        session.add(item)
        return {"rto_s": record.rto_s, "rpo_s": record.rpo_s, "verified": record.verified, "booted": record.booted,
                "heartbeat_s": record.heartbeat_s, "boot_check": record.boot_check,
                "point_id": record.point_id, "roots": record.produced_roots}


@item_action(A.DELETE_RECOVERY_VM)
def delete_recovery_vm(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """Delete the VM a failover (or drill) created at the recovery site; nothing to do when it is gone."""
    record = read_record(ctx, failover_id)
    if record.kind is FailoverKind.FAILBACK:
        host, name = record.details["recovery_host"], record.details["recovery_vm"]
    else:
        host, name = record.target_host, record.target_vm
    driver = driver_named(ctx, host)
    existing = vm_or_none(driver, name)
    expected = record.details.get("recovery_vm_id") or record.details.get("vm_id")
    if existing is not None and expected is not None and existing.id != expected:
        raise NonRecoverableError(f"VM {name!r} on host {host!r} is not the one the failover created; left alone")
    _delete_vm(driver, name)
    return {"deleted": existing is not None, "vm": name, "host": host}


@item_action(A.FINISH_CLEANUP)
def finish_cleanup(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    with ctx.session() as session:
        record = failover_record(session, failover_id)
        record.status = FailoverStatus.CLEANED_UP
        record.ended_at = record.ended_at or clock.now()
        session.add(record)
    return {"failover_id": failover_id}


@item_action(A.RESUME_PRIMARY)
def resume_primary(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    view = _load(ctx, item_id)
    HostDriver(view.host.root, view.host.name).start_vm(view.vm.name)
    return {"vm": view.vm.name}


@item_action(A.FINISH_CANCEL)
def finish_cancel(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The primary is the VM again; delta replication resumes at once."""
    return end_operation(ctx, item_id, failover_id, FailoverStatus.CANCELLED, S.PROTECTED, next_delta_at=clock.now())


@item_action(A.COMMIT)
def commit(ctx: StepContext, *, item_id: str, failover_id: str) -> dict[str, Any]:
    """The recovery VM is the VM; the primary is not replicated any more."""
    result = end_operation(ctx, item_id, failover_id, FailoverStatus.COMMITTED, S.FAILOVER_COMMITTED,
                           next_delta_at=None)
    with ctx.session() as session:
        mark_healthy(session, session.get(ProtectedItem, item_id))
    return result


