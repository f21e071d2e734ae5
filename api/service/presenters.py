"""Rows as the service answers them: JSON-ready dicts (ISO 8601 datetimes, enum values as strings)."""
from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import date, datetime
from datetime import time as time_of_day
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from datapath.errors import NonRecoverableError
from datapath.replication import ReplicaDisk
from models.fabric import Host, NetworkMapping, Site, VirtualMachine, VmmCloud, VmmServer, vm_adapters, vm_disks
from models.failover import FailoverKind, FailoverRecord, FailoverStatus, active_test_failover, latest_failover
from models.jobs import Job
from models.plans import RecoveryPlan
from models.policy import WEEKDAY_NAMES, ReplicationPolicy
from models.protection import ProtectedItem, ReplicationState
from models.replicas import replica_records
from sites.host import DISK_SUFFIX
from sites.host import Host as HostDriver

from .lookups import _item_of

# Where the recovery VM's disks are while the VM runs at the recovery site (and until failback commits).
_RECOVERY_VM_STATES = (ReplicationState.FAILED_OVER, ReplicationState.FAILOVER_COMMITTED,
                       ReplicationState.FAILING_BACK, ReplicationState.FAILBACK_READY)


# ---- plain values ------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """`value` with datetimes as ISO text and enums as their values, recursively (JSON-ready)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (datetime, date, time_of_day)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _job_ref(job_id: str, kind: str, vm: str | None, **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "kind": kind, "vm": vm, **extra}


# ---- sites, hosts, network mappings ------------------------------------------------------------------------
def _site_dict(session: Session, site: Site, *, detail: bool = False) -> dict[str, Any]:
    hosts = sorted(session.exec(select(Host.name).where(Host.site_id == site.id)).all())
    plain = {"id": site.id, "name": site.name, "description": site.description, "created_at": _iso(site.created_at),
             "hosts": hosts}
    if detail:
        plain["network_mappings"] = [
            _mapping_dict(session, mapping)
            for mapping in session.exec(select(NetworkMapping).where(NetworkMapping.site_id == site.id)
                                        .order_by(NetworkMapping.source_network))
        ]
    return plain


def _host_dict(session: Session, host: Host, *, detail: bool = False) -> dict[str, Any]:
    site = session.get(Site, host.site_id) if host.site_id else None
    cloud = session.get(VmmCloud, host.cloud_id) if host.cloud_id else None
    server = session.get(VmmServer, cloud.vmm_server_id) if cloud is not None else None
    vms = sorted(session.exec(select(VirtualMachine.name).where(VirtualMachine.host_id == host.id)).all())
    plain = {
        "id": host.id, "name": host.name, "site": site.name if site else None,
        "cloud": f"{server.name}/{cloud.name}" if cloud else None, "root": host.root, "queue": host.queue,
        "registered_at": _iso(host.registered_at), "last_seen_at": _iso(host.last_seen_at), "vm_count": len(vms),
    }
    if detail:
        plain["vms"] = vms
    return plain


def _mapping_dict(session: Session, mapping: NetworkMapping) -> dict[str, Any]:
    site = session.get(Site, mapping.site_id) if mapping.site_id else None
    cloud = session.get(VmmCloud, mapping.cloud_id) if mapping.cloud_id else None
    server = session.get(VmmServer, cloud.vmm_server_id) if cloud is not None else None
    return {"id": mapping.id, "site": site.name if site else None,
            "cloud": f"{server.name}/{cloud.name}" if cloud else None,
            "source_network": mapping.source_network, "recovery_network": mapping.recovery_network,
            "recovery_subnet": mapping.recovery_subnet, "created_at": _iso(mapping.created_at)}


# ---- VMs ---------------------------------------------------------------------------------------------------
def _recovery_location(session: Session, item: ProtectedItem | None) -> tuple[Host | None, str | None]:
    """(recovery host, recovery VM name) while the VM runs at the recovery site."""
    if item is None or item.replication_state not in _RECOVERY_VM_STATES:
        return None, None
    record = latest_failover(session, item.id, (FailoverKind.PLANNED, FailoverKind.UNPLANNED))
    if record is None or record.status not in (FailoverStatus.SUCCEEDED, FailoverStatus.COMMITTED):
        return None, None
    host = session.exec(select(Host).where(Host.name == record.target_host)).first()
    return host, record.target_vm


def _drill_location(session: Session, item: ProtectedItem | None) -> tuple[Host | None, str | None]:
    if item is None:
        return None, None
    drill = active_test_failover(session, item.id)
    if drill is None or drill.status is not FailoverStatus.SUCCEEDED:
        return None, None
    return session.exec(select(Host).where(Host.name == drill.target_host)).first(), drill.target_vm


def _power_state(host: Host, vm: VirtualMachine) -> str:
    """The host's word on the VM's power (QEMU's for a guest), or the registered state when the host cannot
    say (the VM gone from it, its manifest unreadable)."""
    try:
        return HostDriver(host.root, host.name).power_state(vm.name)
    except (NonRecoverableError, OSError):
        return vm.state


def _vm_dict(session: Session, vm: VirtualMachine, *, detail: bool = False) -> dict[str, Any]:
    host = session.get(Host, vm.host_id)
    item = _item_of(session, vm)
    plain: dict[str, Any] = {
        "id": vm.id, "name": vm.name, "host": host.name, "vm_uuid": vm.vm_uuid, "generation": vm.generation,
        "power_state": _power_state(host, vm), "runtime": "qemu" if vm.guest else "synthetic",
        "created_at": _iso(vm.created_at),
        "state": str(item.replication_state) if item else None,
    }
    if not detail:
        return plain
    folder = item.replica_folder if item is not None and item.replica_folder else f"{host.name}/{vm.name}"
    replica_host, replica_vm = folder.split("/", 1)
    local_root = None
    if item is not None and item.recovery_storage.startswith("file://"):
        local_root = Path(item.recovery_storage[len("file://"):])
    recovery_host, recovery_vm = _recovery_location(session, item)
    drill_host, drill_vm = _drill_location(session, item)
    # What the database records the recovery side holds of each disk (models/replicas.py).
    records = {record.disk_uuid: record for record in replica_records(session, item.id)} if item else {}
    disks = []
    for disk in vm_disks(session, vm):
        record = records.get(disk.disk_uuid)
        replica = ReplicaDisk.name_for(replica_host, replica_vm, disk.name) if item is not None else None
        vhd = disk.name + DISK_SUFFIX["vhd"]  # a recovery VM's disks are fixed VHDs, as replicas are
        disks.append({
            "name": disk.name, "id": disk.id, "uuid": disk.disk_uuid, "size": disk.size, "format": disk.format,
            "file": disk.file_name,
            "primary_path": str(HostDriver(host.root, host.name).vms_dir / vm.name / disk.file_name),
            "replica": replica,
            "replica_path": str(local_root / replica) if replica and local_root is not None else None,
            "recovery_host": recovery_host.name if recovery_host is not None else None,
            "recovery_path": (str(HostDriver(recovery_host.root, recovery_host.name).vms_dir / recovery_vm / vhd)
                              if recovery_host is not None else None),
            "test_path": (str(HostDriver(drill_host.root, drill_host.name).vms_dir / drill_vm / vhd)
                          if drill_host is not None else None),
            "replica_record": None if record is None else {
                "applied_generation": record.applied_generation, "shipped_generation": record.shipped_generation,
                "version": record.version, "resync_reason": record.resync_reason,
                "last_checked_at": _iso(record.last_checked_at),
                "last_check_drifted_chunks": (record.last_check or {}).get("drifted_chunks")},
        })
    plain["disks"] = disks
    plain["adapters"] = [{"name": a.name, "vm_network": a.vm_network, "public_ip": a.public_ip}
                         for a in vm_adapters(session, vm)]
    plain["guest"] = vm.guest  # how a QEMU guest boots, as registered (None: a synthetic VM)
    plain["recovery_storage"] = item.recovery_storage if item is not None else None
    plain["protection"] = None
    plain["failover"] = None
    if item is not None:
        last = session.exec(select(FailoverRecord).where(FailoverRecord.item_id == item.id)
                            .order_by(FailoverRecord.started_at.desc(), FailoverRecord.id)).first()
        plain["failover_id"] = last.id if last is not None else None
        plain["item_id"] = item.id
    return plain


# ---- policies, plans, jobs ---------------------------------------------------------------------------------
def _policy_dict(session: Session, policy: ReplicationPolicy, *, detail: bool = False) -> dict[str, Any]:
    plain = {
        "id": policy.id, "name": policy.name, "copy_frequency_s": policy.copy_frequency_s,
        "recovery_point_retention_h": policy.recovery_point_retention_h,
        "app_consistent_frequency_h": policy.app_consistent_frequency_h,
        "initial_replication_at": _iso(policy.initial_replication_at),
        "office_hours": [policy.office_hours_start.strftime("%H:%M"), policy.office_hours_end.strftime("%H:%M")],
        "office_days": [WEEKDAY_NAMES[day] for day in policy.office_days],
        "office_timezone": policy.office_timezone, "created_at": _iso(policy.created_at),
        # As they apply (a threshold the policy leaves out is derived from the copy frequency), and as set.
        "rpo_warning_s": policy.rpo_thresholds_s()[0], "rpo_critical_s": policy.rpo_thresholds_s()[1],
        "rpo_thresholds_set": policy.rpo_warning_s is not None or policy.rpo_critical_s is not None,
        "consistency_check_interval_h": policy.consistency_check_interval_h,
        "consistency_check_off_hours": policy.consistency_check_off_hours,
        "drill_reminder_days": policy.drill_reminder_days, "retention_lock_h": policy.retention_lock_h,
    }
    if detail:
        rows = session.exec(select(VirtualMachine.name, Host.name)
                            .join(ProtectedItem, ProtectedItem.vm_id == VirtualMachine.id)
                            .join(Host, Host.id == VirtualMachine.host_id)
                            .where(ProtectedItem.policy_id == policy.id)).all()
        plain["protected_vms"] = sorted(f"{host}/{vm}" for vm, host in rows)
    return plain


def _plan_dict(session: Session, plan: RecoveryPlan) -> dict[str, Any]:
    ids = {vm_id for group in plan.groups for vm_id in group["vms"]}
    rows = session.exec(select(VirtualMachine, Host.name).join(Host, Host.id == VirtualMachine.host_id)
                        .where(VirtualMachine.id.in_(ids))).all()
    names = {vm.id: {"id": vm.id, "name": vm.name, "host": host} for vm, host in rows}
    groups = [{**group, "vms": [names.get(vm_id, {"id": vm_id, "name": None, "host": None})
                                for vm_id in group["vms"]]} for group in plan.groups]
    return {"id": plan.id, "name": plan.name, "description": plan.description, "groups": _plain(groups),
            "created_at": _iso(plan.created_at), "updated_at": _iso(plan.updated_at)}


def _job_summary(job: Job, step_counts: Mapping[str, int]) -> dict[str, Any]:
    total = sum(step_counts.values())
    done = step_counts.get("succeeded", 0) + step_counts.get("skipped", 0)
    return {
        "id": job.id, "kind": job.kind, "state": job.state.value, "target": job.target,
        "vm": job.params.get("vm"), "plan": job.params.get("plan"),
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at), "ended_at": _iso(job.ended_at),
        "error": job.error, "steps_total": total, "steps_done": done,
    }
