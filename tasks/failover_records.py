"""What the failover and failback actions share: their record, the host drivers they act on, the results
of their parallel steps."""
from __future__ import annotations

import shutil
from typing import Any

from sqlmodel import Session, select

from datapath.errors import NonRecoverableError
from models.fabric import Host
from models.failover import FailoverRecord, FailoverStatus
from models.jobs import JobStep, StepState
from models.protection import ProtectedItem, ReplicationState, transition
from sites.host import Host as HostDriver
from sites.host import VirtualMachine as HostVirtualMachine
from sites.host import VmNotFoundError as HostVmNotFoundError
from sites.host.guests import BootReport
from tasks.boot_files import fetch_boot_files, guest_of
from tasks.replication import _storage
from workflows import clock
from workflows.engine import StepContext
from workflows.items import ItemView


def failover_record(session: Session, failover_id: str) -> FailoverRecord:
    record = session.get(FailoverRecord, failover_id)
    if record is None:
        raise NonRecoverableError(f"no failover record {failover_id} (its Begin step did not run?)")
    return record


def read_record(ctx: StepContext, failover_id: str) -> FailoverRecord:
    with ctx.session() as session:
        return failover_record(session, failover_id)


def host_driver(session: Session, name: str) -> HostDriver:
    host = session.exec(select(Host).where(Host.name == name)).first()
    if host is None:
        raise NonRecoverableError(f"no host {name!r} is registered")
    return HostDriver(host.root, host.name)


def driver_named(ctx: StepContext, name: str) -> HostDriver:
    with ctx.session() as session:
        return host_driver(session, name)


def update_details(ctx: StepContext, failover_id: str, **details: Any) -> FailoverRecord:
    with ctx.session() as session:
        record = failover_record(session, failover_id)
        record.details = {**record.details, **details}
        session.add(record)
        return record


def results_of(ctx: StepContext, action: str, failover_id: str) -> list[dict[str, Any]]:
    """The results of the steps of `action` for this failover, in any job of it: parallel steps report
    through their own step rows (one writer each) rather than all updating the record."""
    with ctx.session() as session:
        jobs = {ctx.job_id, failover_record(session, failover_id).job_id} - {None}
        steps = session.exec(select(JobStep).where(
            JobStep.action == action, JobStep.state == StepState.succeeded, JobStep.job_id.in_(jobs),
        ).order_by(JobStep.ended_at)).all()
        return [step.result for step in steps if step.params.get("failover_id") == failover_id and step.result]


def vm_or_none(driver: HostDriver, name: str):
    try:
        return driver.get_vm(name)
    except HostVmNotFoundError:
        return None


def end_operation(ctx: StepContext, item_id: str, failover_id: str, status: FailoverStatus, state: ReplicationState,
         **item_fields: Any) -> dict[str, Any]:
    """The operation's record ends with `status` and the item moves to `state`, in one transaction."""
    with ctx.session() as session:
        record = failover_record(session, failover_id)
        item = session.get(ProtectedItem, item_id)
        record.status = status
        record.ended_at = clock.now()
        transition(item, state)
        for name, value in item_fields.items():
            setattr(item, name, value)
        session.add(record)
        session.add(item)
    return {"state": str(state), "failover": str(status)}


def create_vm_like(view: ItemView, driver: HostDriver, name: str, disks: list[tuple[str, int, str]], *,
                   networks: list[str]) -> HostVirtualMachine:
    """Create, on `driver`'s host, a VM like the item's: same generation and, for a QEMU guest, its definition
    and boot files, fetched from the recovery storage and checked against the hashes registered."""
    guest = guest_of(view)
    if guest is None:
        return driver.create_vm(name, disks, networks=networks, generation=view.vm.generation)
    with _storage(view) as storage:
        folder, files = fetch_boot_files(view, storage, driver)
    try:
        return driver.create_vm(name, disks, networks=networks, generation=view.vm.generation, guest=guest,
                                boot_files=files)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def update_boot_check(ctx: StepContext, failover_id: str, report: BootReport) -> None:
    with ctx.session() as session:
        record = failover_record(session, failover_id)
        record.booted, record.boot_check, record.boot_detail = report.booted, report.check, report.detail[:2048]
        record.heartbeat_s = report.heartbeat_s
        record.details = {**record.details, "heartbeat_at": report.heartbeat_at}
        session.add(record)
