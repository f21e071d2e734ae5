"""The operations an operator performs, as plain functions: the one layer the REST API and the `asr` CLI share.

Every function opens its own database session, validates its input before anything is written, calls the
models and workflows, and returns JSON-ready dicts and lists (ISO 8601 datetimes, enum values as strings).
Whatever goes wrong is raised as a `ServiceError` whose message is the text to show the user and whose
`status` is the HTTP status the REST layer answers with; domain exceptions are mapped to them in one place
(`_translate`). Functions that start a job return at once with `{"job_id", "kind", "vm"}`: the job runs on
the workers and is followed with `show_job` or `job_events`.

A `vm` argument is a VM's name (when only one host has a VM of that name), "host/name", or the VM's id.
"""
from __future__ import annotations

import enum
import functools
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from pathlib import Path
from typing import Any, TypeVar

import redis
import sqlalchemy as sa
from sqlmodel import Session, select

from datapath.errors import DiskNotFoundError, NonRecoverableError, PathOutsideRootError, RecoverableError
from datapath.replication import ReplicaDisk
from models import apikeys
from models.db import database_url, init_db, session_scope, validate_name
from models.fabric import (
    AmbiguousVmError,
    Host,
    NetworkMapping,
    Site,
    VirtualMachine,
    VmmCloud,
    VmmServer,
    VmNotFoundError,
    create_cloud,
    create_site,
    create_vmm_server,
    get_vm,
    import_vm_manifest,
    register_host,
    vm_adapters,
    vm_disks,
)
from models.fabric import (
    add_network_mapping as _add_network_mapping,
)
from models.failover import FailoverKind, FailoverRecord, FailoverStatus, active_test_failover, latest_failover
from models.jobs import ACTIVE_JOB_STATES, FINISHED_JOB_STATES, Job, JobState, JobStep, StepState
from models.plans import PlanError, PlanNotFoundError, PlanOperation, RecoveryPlan, get_plan
from models.plans import create_plan as _create_plan
from models.plans import list_plans as _list_plans
from models.policy import WEEKDAY_NAMES, ReplicationPolicy, create_policy
from models.protection import InvalidStateError, ProtectedItem, RecoveryPoint, ReplicationState
from models.protection import recovery_points as _recovery_points
from sites.host import DISK_SUFFIX, VmExistsError
from sites.host import Host as HostDriver
from workflows import engine
from workflows import failover as failover_workflows
from workflows import plans as plan_workflows
from workflows import protection as protection_workflows
from workflows.progress import job_progress, percent_of

__all__ = [
    "ServiceError", "NotFound", "Conflict", "Invalid", "Unavailable",
    "add_site", "list_sites", "show_site", "add_vmm_cloud",
    "add_host", "list_hosts", "show_host",
    "add_vm", "list_vms", "show_vm",
    "add_network_mapping", "list_network_mappings",
    "add_policy", "list_policies", "show_policy",
    "protect", "disable_protection", "resync",
    "test_failover", "test_failover_cleanup", "planned_failover", "unplanned_failover",
    "complete_failover", "commit_failover", "cancel_failover", "failback", "reverse_replication",
    "create_plan", "list_plans", "show_plan", "run_plan", "resume_job",
    "recovery_points", "verify", "health",
    "list_jobs", "show_job", "cancel_job", "retry_job", "restart_job", "job_events", "job_snapshot",
    "create_api_key", "list_api_keys", "revoke_api_key", "hash_api_key",
    "POLICY_OPTIONS", "PLAN_OPTIONS", "FAILBACK_MODES", "POINT_CHOICES", "MAX_JOB_LIMIT",
]

_F = TypeVar("_F", bound=Callable[..., Any])

POLICY_OPTIONS = ("copy_frequency_s", "recovery_point_retention_h", "app_consistent_frequency_h",
                  "initial_replication_at", "office_hours", "office_days", "office_timezone")
PLAN_OPTIONS = ("point", "recovery_host", "test_network", "mode", "create_vm")
FAILBACK_MODES = failover_workflows.FailbackMode.ALL
POINT_CHOICES = failover_workflows.PointChoice.NAMED
MAX_JOB_LIMIT = 1000
# Where the recovery VM's disks are while the VM runs at the recovery site (and until failback commits).
_RECOVERY_VM_STATES = (ReplicationState.FAILED_OVER, ReplicationState.FAILOVER_COMMITTED,
                       ReplicationState.FAILING_BACK, ReplicationState.FAILBACK_READY)


# ---- errors ---------------------------------------------------------------------------------------------
class ServiceError(Exception):
    """A request the service refuses; the message is the user-facing text, `status` the HTTP status."""

    status = 400

    @property
    def message(self) -> str:
        return str(self)


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    """The request is valid but the state of things does not allow it now (busy, wrong state, exists)."""

    status = 409


class Invalid(ServiceError):
    """Bad input: a malformed name, a value out of range, an unknown option."""

    status = 422


class Unavailable(ServiceError):
    """A passing condition (storage or broker unreachable): try again later."""

    status = 503


def _translate(exc: BaseException) -> ServiceError | None:
    """The ServiceError for a domain exception, or None for a bug (left to surface as a 500)."""
    if isinstance(exc, ServiceError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, (VmNotFoundError, PlanNotFoundError, engine.JobNotFoundError, DiskNotFoundError,
                        apikeys.ApiKeyNotFoundError)):
        return NotFound(message)
    if isinstance(exc, (AmbiguousVmError, PlanError, PathOutsideRootError)):
        return Invalid(message)
    if isinstance(exc, (engine.ItemBusyError, InvalidStateError, engine.JobStateError, VmExistsError)):
        return Conflict(message)
    if isinstance(exc, sa.exc.IntegrityError):
        # A concurrent request created the same thing between our check and our insert.
        return Conflict("it was created or changed by another request meanwhile: look again and retry")
    if isinstance(exc, NonRecoverableError):
        # The rest of the domain's refusals say why a request cannot run now (no recovery point yet, no
        # network mapping, no recovery host): the request is well formed, the state of things is not.
        return Conflict(message)
    if isinstance(exc, (RecoverableError, redis.RedisError)):
        return Unavailable(message)
    if isinstance(exc, ValueError):
        return Invalid(message)
    return None


_ready_lock = threading.Lock()
_ready_urls: set[str] = set()


def _ensure_database() -> None:
    """Create missing tables once per database and process (a fresh deployment's first request works)."""
    url = database_url()
    if url in _ready_urls:
        return
    with _ready_lock:
        if url not in _ready_urls:
            init_db()
            _ready_urls.add(url)


def _operation(fn: _F) -> _F:
    """Run one service operation: tables ready, domain errors turned into ServiceErrors."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            _ensure_database()
            return fn(*args, **kwargs)
        except Exception as exc:
            mapped = _translate(exc)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc

    return run  # type: ignore[return-value]


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


def _name(value: Any, kind: str) -> str:
    """A name as every table takes it, and never anything a path could be built from ('..', '/', '\\')."""
    if isinstance(value, str) and (".." in value or "/" in value or "\\" in value):
        raise Invalid(f"invalid {kind} name {value!r}: names cannot contain '/', '\\' or '..'")
    try:
        return validate_name(value, kind)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _optional_name(value: Any, kind: str) -> str | None:
    return None if value is None else _name(value, kind)


def _job_ref(job_id: str, kind: str, vm: str | None, **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "kind": kind, "vm": vm, **extra}


# ---- lookups -----------------------------------------------------------------------------------------------
def _site(session: Session, name: str) -> Site:
    site = session.exec(select(Site).where(Site.name == _name(name, "site"))).first()
    if site is None:
        raise NotFound(f"site {name!r} not found")
    return site


def _cloud(session: Session, ref: str) -> VmmCloud:
    """A VMM cloud by "server/cloud", or by its name alone when only one server has a cloud of that name."""
    if not isinstance(ref, str):
        raise Invalid(f"a VMM cloud is named 'server/cloud' or 'cloud', got {ref!r}")
    server_name, _, cloud_name = ref.rpartition("/")
    query = select(VmmCloud, VmmServer.name).join(VmmServer, VmmServer.id == VmmCloud.vmm_server_id)
    query = query.where(VmmCloud.name == _name(cloud_name, "VMM cloud"))
    if server_name:
        query = query.where(VmmServer.name == _name(server_name, "VMM server"))
    found = session.exec(query).all()
    if not found:
        raise NotFound(f"VMM cloud {ref!r} not found")
    if len(found) > 1:
        servers = ", ".join(sorted(server for _cloud_row, server in found))
        raise Invalid(f"VMM cloud name {cloud_name!r} exists on servers {servers}: name it 'server/cloud'")
    return found[0][0]


def _host(session: Session, name: str, what: str = "host") -> Host:
    host = session.exec(select(Host).where(Host.name == _name(name, "host"))).first()
    if host is None:
        raise NotFound(f"{what} {name!r} not found: no host of that name is registered")
    return host


def _policy(session: Session, ref: str) -> ReplicationPolicy:
    if not isinstance(ref, str) or not ref:
        raise Invalid(f"a replication policy is given by its name or id, got {ref!r}")
    policy = session.get(ReplicationPolicy, ref)
    if policy is None:
        policy = session.exec(select(ReplicationPolicy).where(
            ReplicationPolicy.name == _name(ref, "replication policy"))).first()
    if policy is None:
        raise NotFound(f"replication policy {ref!r} not found")
    return policy


def _vm(session: Session, ref: str) -> VirtualMachine:
    """A VM by id, "host/name", or a name only one host has."""
    if not isinstance(ref, str) or not ref:
        raise Invalid(f"a VM is given by its name, 'host/name' or id, got {ref!r}")
    vm = session.get(VirtualMachine, ref)
    if vm is not None:
        return vm
    if ref.count("/") > 1:
        raise Invalid(f"invalid VM reference {ref!r}: use a VM name, 'host/name' or the VM's id")
    host_name, _, vm_name = ref.rpartition("/")
    vm_name = _name(vm_name, "VM")
    if host_name:
        _host(session, host_name)
        return get_vm(session, vm_name, host_name)
    return get_vm(session, vm_name)


def _item_of(session: Session, vm: VirtualMachine) -> ProtectedItem | None:
    return session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == vm.id)).first()


def _protected(vm_ref: str) -> tuple[str, str]:
    """(item id, VM name) of a protected VM; Conflict when the VM is not protected."""
    with session_scope() as session:
        vm = _vm(session, vm_ref)
        item = _item_of(session, vm)
        if item is None:
            raise Conflict(f"VM {vm.name!r} is not protected: enable protection first")
        return item.id, vm.name


# ---- sites, clouds, hosts ----------------------------------------------------------------------------------
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


@_operation
def add_site(name: str, description: str = "") -> dict:
    """Register a Hyper-V site (a group of standalone hosts)."""
    _name(name, "site")
    if not isinstance(description, str) or len(description) > 1024:
        raise Invalid("a site's description is text of at most 1024 characters")
    with session_scope() as session:
        if session.exec(select(Site).where(Site.name == name)).first() is not None:
            raise Conflict(f"site {name!r} already exists")
        return _site_dict(session, create_site(session, name, description))


@_operation
def list_sites() -> list[dict]:
    with session_scope() as session:
        return [_site_dict(session, site) for site in session.exec(select(Site).order_by(Site.name))]


@_operation
def show_site(name: str) -> dict:
    with session_scope() as session:
        return _site_dict(session, _site(session, name), detail=True)


@_operation
def add_vmm_cloud(server: str, name: str) -> dict:
    """Register a VMM cloud (the VMM server too, when it is new); hosts then join it with `cloud="server/name"`."""
    _name(server, "VMM server")
    _name(name, "VMM cloud")
    with session_scope() as session:
        row = session.exec(select(VmmServer).where(VmmServer.name == server)).first()
        if row is None:
            row = create_vmm_server(session, server)
        elif session.exec(select(VmmCloud).where(VmmCloud.vmm_server_id == row.id, VmmCloud.name == name)).first():
            raise Conflict(f"VMM server {server!r} already has a cloud {name!r}")
        cloud = create_cloud(session, row, name)
        return {"id": cloud.id, "name": cloud.name, "server": server, "created_at": _iso(cloud.created_at)}


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


@_operation
def add_host(name: str, root: str, *, site: str | None = None, cloud: str | None = None) -> dict:
    """Register a host in one site or one VMM cloud. The answer holds its agent's registration key, shown this
    once (only its hash is kept)."""
    _name(name, "host")
    if (site is None) == (cloud is None):
        raise Invalid(f"host {name!r} must belong to exactly one site or one VMM cloud: give site or cloud")
    if not isinstance(root, str) or not root.startswith("/") or "\x00" in root or ".." in Path(root).parts:
        raise Invalid(f"root of host {name!r} must be an absolute path without '..', got {root!r}")
    with session_scope() as session:
        site_row = _site(session, site) if site is not None else None
        cloud_row = _cloud(session, cloud) if cloud is not None else None
        existing = session.exec(select(Host).where(Host.name == name)).first()
        if existing is not None:
            raise Conflict(f"host {name!r} is already registered (id {existing.id})")
        host, key = register_host(session, name, root, site=site_row, cloud=cloud_row)
        return {**_host_dict(session, host), "registration_key": key}


@_operation
def list_hosts() -> list[dict]:
    with session_scope() as session:
        return [_host_dict(session, host) for host in session.exec(select(Host).order_by(Host.name))]


@_operation
def show_host(name: str) -> dict:
    with session_scope() as session:
        return _host_dict(session, _host(session, name), detail=True)


# ---- VMs ---------------------------------------------------------------------------------------------------
@_operation
def add_vm(host: str, name: str) -> dict:
    """Register the VM as the host's own manifest describes it (its disks, their ids, sizes and formats, its
    network adapters). Registering it again brings the record up to date with the host."""
    _name(name, "VM")
    with session_scope() as session:
        host_row = _host(session, host)
        root, host_name = host_row.root, host_row.name
    manifest = HostDriver(root, host_name).get_vm(name).to_manifest()
    with session_scope() as session:
        vm_id = import_vm_manifest(session, _host(session, host_name), manifest).id
    return show_vm(vm_id)


def _vm_rows(session: Session) -> list[tuple[VirtualMachine, str, ProtectedItem | None]]:
    query = (select(VirtualMachine, Host.name, ProtectedItem)
             .join(Host, Host.id == VirtualMachine.host_id)
             .join(ProtectedItem, ProtectedItem.vm_id == VirtualMachine.id, isouter=True)
             .order_by(Host.name, VirtualMachine.name))
    return list(session.exec(query).all())


@_operation
def list_vms() -> list[dict]:
    with session_scope() as session:
        return [{
            "id": vm.id, "name": vm.name, "host": host_name, "power_state": vm.state,
            "disks": len(vm_disks(session, vm)),
            "protection_state": str(item.replication_state) if item else None,
            "health": str(item.health) if item else None,
        } for vm, host_name, item in _vm_rows(session)]


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


def _vm_dict(session: Session, vm: VirtualMachine, *, detail: bool = False) -> dict[str, Any]:
    host = session.get(Host, vm.host_id)
    item = _item_of(session, vm)
    plain: dict[str, Any] = {
        "id": vm.id, "name": vm.name, "host": host.name, "vm_uuid": vm.vm_uuid, "generation": vm.generation,
        "power_state": vm.state, "created_at": _iso(vm.created_at),
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
    disks = []
    for disk in vm_disks(session, vm):
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
        })
    plain["disks"] = disks
    plain["adapters"] = [{"name": a.name, "vm_network": a.vm_network, "public_ip": a.public_ip}
                         for a in vm_adapters(session, vm)]
    plain["recovery_storage"] = item.recovery_storage if item is not None else None
    plain["protection"] = None
    plain["failover"] = None
    if item is not None:
        last = session.exec(select(FailoverRecord).where(FailoverRecord.item_id == item.id)
                            .order_by(FailoverRecord.started_at.desc(), FailoverRecord.id)).first()
        plain["failover_id"] = last.id if last is not None else None
        plain["item_id"] = item.id
    return plain


@_operation
def show_vm(vm: str) -> dict:
    """The VM with its disks: where each lives on the primary, its replica's object name on the recovery
    storage (and path, for a local directory), and its path on the recovery host while failed over; its
    protection status and latest failover report."""
    with session_scope() as session:
        plain = _vm_dict(session, _vm(session, vm), detail=True)
    item_id = plain.pop("item_id", None)
    failover_id = plain.pop("failover_id", None)
    if item_id is not None:
        plain["protection"] = protection_workflows.item_status(item_id)
    if failover_id is not None:
        plain["failover"] = failover_workflows.failover_report(failover_id)
    return plain


# ---- network mappings --------------------------------------------------------------------------------------
def _mapping_dict(session: Session, mapping: NetworkMapping) -> dict[str, Any]:
    site = session.get(Site, mapping.site_id) if mapping.site_id else None
    cloud = session.get(VmmCloud, mapping.cloud_id) if mapping.cloud_id else None
    server = session.get(VmmServer, cloud.vmm_server_id) if cloud is not None else None
    return {"id": mapping.id, "site": site.name if site else None,
            "cloud": f"{server.name}/{cloud.name}" if cloud else None,
            "source_network": mapping.source_network, "recovery_network": mapping.recovery_network,
            "recovery_subnet": mapping.recovery_subnet, "created_at": _iso(mapping.created_at)}


@_operation
def add_network_mapping(source_network: str, recovery_network: str, recovery_subnet: str, *,
                        site: str | None = None, cloud: str | None = None) -> dict:
    """Map a VM network of a site (or cloud) to a recovery network and subnet (CIDR)."""
    _name(source_network, "source network")
    _name(recovery_network, "recovery network")
    if (site is None) == (cloud is None):
        raise Invalid(f"the mapping of network {source_network!r} must belong to exactly one site or one VMM "
                      f"cloud: give site or cloud")
    with session_scope() as session:
        site_row = _site(session, site) if site is not None else None
        cloud_row = _cloud(session, cloud) if cloud is not None else None
        scope = (NetworkMapping.site_id == site_row.id) if site_row else (NetworkMapping.cloud_id == cloud_row.id)
        existing = session.exec(select(NetworkMapping).where(
            scope, NetworkMapping.source_network == source_network)).first()
        if existing is not None:
            raise Conflict(f"network {source_network!r} of {site or cloud!r} is already mapped to "
                           f"{existing.recovery_network!r} ({existing.recovery_subnet})")
        mapping = _add_network_mapping(session, source_network, recovery_network, recovery_subnet,
                                       site=site_row, cloud=cloud_row)
        return _mapping_dict(session, mapping)


@_operation
def list_network_mappings() -> list[dict]:
    with session_scope() as session:
        rows = session.exec(select(NetworkMapping).order_by(NetworkMapping.source_network)).all()
        return [_mapping_dict(session, mapping) for mapping in rows]


# ---- policies ----------------------------------------------------------------------------------------------
def _policy_dict(session: Session, policy: ReplicationPolicy, *, detail: bool = False) -> dict[str, Any]:
    plain = {
        "id": policy.id, "name": policy.name, "copy_frequency_s": policy.copy_frequency_s,
        "recovery_point_retention_h": policy.recovery_point_retention_h,
        "app_consistent_frequency_h": policy.app_consistent_frequency_h,
        "initial_replication_at": _iso(policy.initial_replication_at),
        "office_hours": [policy.office_hours_start.strftime("%H:%M"), policy.office_hours_end.strftime("%H:%M")],
        "office_days": [WEEKDAY_NAMES[day] for day in policy.office_days],
        "office_timezone": policy.office_timezone, "created_at": _iso(policy.created_at),
    }
    if detail:
        rows = session.exec(select(VirtualMachine.name, Host.name)
                            .join(ProtectedItem, ProtectedItem.vm_id == VirtualMachine.id)
                            .join(Host, Host.id == VirtualMachine.host_id)
                            .where(ProtectedItem.policy_id == policy.id)).all()
        plain["protected_vms"] = sorted(f"{host}/{vm}" for vm, host in rows)
    return plain


def _int_option(name: str, value: Any) -> Any:
    # The CLI and query strings hand numbers over as text.
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _time_of_day(name: str, value: Any) -> time_of_day:
    if isinstance(value, time_of_day):
        return value
    try:
        return time_of_day.fromisoformat(value)
    except (TypeError, ValueError):
        raise Invalid(f"{name}: {value!r} is not a time of day such as '08:00'") from None


def _policy_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(POLICY_OPTIONS))
    if unknown:
        raise Invalid(f"replication policy {name!r}: unknown option(s) {', '.join(unknown)} "
                      f"(options: {', '.join(POLICY_OPTIONS)})")
    settings = {key: value for key, value in options.items() if value is not None}
    for key in ("copy_frequency_s", "recovery_point_retention_h", "app_consistent_frequency_h"):
        if key in settings:
            settings[key] = _int_option(key, settings[key])
    start = settings.get("initial_replication_at")
    if isinstance(start, str):
        try:
            parsed = datetime.fromisoformat(start)
        except ValueError:
            raise Invalid(f"replication policy {name!r}: initial_replication_at {start!r} is not an ISO 8601 "
                          f"time such as '2030-01-01T02:00:00+00:00'") from None
        settings["initial_replication_at"] = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    hours = settings.get("office_hours")
    if hours is not None:
        if isinstance(hours, str):
            hours = hours.split("-")
        if not isinstance(hours, (list, tuple)) or len(hours) != 2:
            raise Invalid(f"replication policy {name!r}: office_hours is a start and an end such as "
                          f"'08:00-18:00', got {options['office_hours']!r}")
        settings["office_hours"] = tuple(_time_of_day("office_hours", part) for part in hours)
    days = settings.get("office_days")
    if isinstance(days, str):
        settings["office_days"] = [_int_option("office_days", day.strip()) for day in days.split(",") if day.strip()]
    return settings


@_operation
def add_policy(name: str, **options: Any) -> dict:
    """Create a replication policy. Options: copy_frequency_s (30, 300 or 900), recovery_point_retention_h
    (0-24), app_consistent_frequency_h (0-12, at most the retention), initial_replication_at (ISO time, at most
    24 h ahead), office_hours ("08:00-18:00" or [start, end]), office_days (names or 0 = Monday, list or
    "mon,tue"), office_timezone (IANA name)."""
    _name(name, "replication policy")
    settings = _policy_options(name, options)
    with session_scope() as session:
        if session.exec(select(ReplicationPolicy).where(ReplicationPolicy.name == name)).first() is not None:
            raise Conflict(f"replication policy {name!r} already exists")
        return _policy_dict(session, create_policy(session, name, **settings))


@_operation
def list_policies() -> list[dict]:
    with session_scope() as session:
        return [_policy_dict(session, policy)
                for policy in session.exec(select(ReplicationPolicy).order_by(ReplicationPolicy.name))]


@_operation
def show_policy(name: str) -> dict:
    with session_scope() as session:
        return _policy_dict(session, _policy(session, name), detail=True)


# ---- protection --------------------------------------------------------------------------------------------
def _check_storage(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise Invalid(f"recovery storage must be 'file:///absolute/dir' or 'azure:<container>', got {url!r}")
    if url.startswith("file://") and ".." in Path(url[len("file://"):]).parts:
        raise Invalid(f"recovery storage {url!r}: the directory cannot contain '..'")
    return url


@_operation
def protect(vm: str, *, policy: str, recovery_storage: str, storage_options: dict | None = None,
            recovery_host: str | None = None) -> dict:
    """Enable protection of the VM with the policy, replicating to `recovery_storage`; `recovery_host` is where
    its failovers create the VM unless a failover names another."""
    _check_storage(recovery_storage)
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise Invalid(f"storage options must be an object, got {storage_options!r}")
    with session_scope() as session:
        row = _vm(session, vm)
        policy_row = _policy(session, policy)
        if recovery_host is not None:
            target = _host(session, recovery_host, "recovery host")
            if target.id == row.host_id:
                raise Invalid(f"the recovery host {recovery_host!r} is VM {row.name!r}'s own host")
        item = _item_of(session, row)
        if item is not None and item.replication_state not in (ReplicationState.DISABLED,
                                                               ReplicationState.ENABLING_PROTECTION):
            raise Conflict(f"VM {row.name!r} is already protected (state {item.replication_state})")
        vm_id, vm_name, policy_id = row.id, row.name, policy_row.id
    job_id = protection_workflows.enable_protection(
        vm_id, policy_id, recovery_storage=recovery_storage, storage_options=dict(storage_options or {}),
        recovery_host=recovery_host)
    return _job_ref(job_id, protection_workflows.ENABLE_PROTECTION, vm_name)


@_operation
def disable_protection(vm: str) -> dict:
    """Stop protecting the VM: replicas, shipped logs and recovery points are deleted."""
    item_id, name = _protected(vm)
    return _job_ref(protection_workflows.disable_protection(item_id), protection_workflows.DISABLE_PROTECTION, name)


@_operation
def resync(vm: str) -> dict:
    """Resynchronize the VM's replicas now, sending only the blocks that differ."""
    item_id, name = _protected(vm)
    return _job_ref(protection_workflows.start_resync(item_id, manual=True), protection_workflows.RESYNCHRONIZE, name)


# ---- failover ----------------------------------------------------------------------------------------------
def _check_point(item_id: str, point: Any) -> str:
    if not isinstance(point, str) or not point:
        raise Invalid(f"a recovery point is one of {', '.join(POINT_CHOICES)} or a point id, got {point!r}")
    if point in POINT_CHOICES:
        return point
    with session_scope() as session:
        row = session.get(RecoveryPoint, point)
        if row is None or row.item_id != item_id:
            raise NotFound(f"recovery point {point!r} not found for this VM (pruned past retention, or of "
                           f"another VM; see its recovery points); or use one of {', '.join(POINT_CHOICES)}")
    return point


def _check_host(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    with session_scope() as session:
        return _host(session, name, what).name


def _check_public_ips(public_ips: Any) -> dict[str, str] | None:
    if public_ips is None:
        return None
    if not isinstance(public_ips, Mapping):
        raise Invalid(f"public_ips maps network adapter names to IP addresses, got {public_ips!r}")
    checked = {}
    for adapter, address in public_ips.items():
        _name(adapter, "network adapter")
        try:
            checked[adapter] = str(ipaddress.ip_address(address))
        except (TypeError, ValueError):
            raise Invalid(f"public IP of adapter {adapter!r}: {address!r} is not an IP address") from None
    return checked


@_operation
def test_failover(vm: str, *, point: str = "latest_processed", recovery_host: str | None = None,
                  test_network: str | None = None) -> dict:
    """A drill: the VM comes up at the recovery site in an isolated network; replication goes on."""
    item_id, name = _protected(vm)
    point = _check_point(item_id, point)
    recovery_host = _check_host(recovery_host, "recovery host")
    _optional_name(test_network, "test network")
    job_id = failover_workflows.start_test_failover(item_id, point=point, recovery_host=recovery_host,
                                                    test_network=test_network)
    return _job_ref(job_id, failover_workflows.TEST_FAILOVER, name)


@_operation
def test_failover_cleanup(vm: str) -> dict:
    """Delete the drill's test VM."""
    item_id, name = _protected(vm)
    return _job_ref(failover_workflows.start_test_failover_cleanup(item_id),
                    failover_workflows.TEST_FAILOVER_CLEANUP, name)


@_operation
def planned_failover(vm: str, *, recovery_host: str | None = None,
                     public_ips: dict[str, str] | None = None) -> dict:
    """Shut the VM down, ship its last changes, bring it up at the recovery site: nothing is lost."""
    item_id, name = _protected(vm)
    recovery_host = _check_host(recovery_host, "recovery host")
    job_id = failover_workflows.start_planned_failover(item_id, recovery_host=recovery_host,
                                                       public_ips=_check_public_ips(public_ips))
    return _job_ref(job_id, failover_workflows.PLANNED_FAILOVER, name)


@_operation
def unplanned_failover(vm: str, *, point: str = "latest_processed", recovery_host: str | None = None,
                       public_ips: dict[str, str] | None = None) -> dict:
    """The primary is lost: bring the VM up at the recovery site from a point the recovery site has."""
    item_id, name = _protected(vm)
    point = _check_point(item_id, point)
    recovery_host = _check_host(recovery_host, "recovery host")
    job_id = failover_workflows.start_unplanned_failover(item_id, point=point, recovery_host=recovery_host,
                                                         public_ips=_check_public_ips(public_ips))
    return _job_ref(job_id, failover_workflows.UNPLANNED_FAILOVER, name)


def _state_of(item_id: str) -> ReplicationState:
    with session_scope() as session:
        return session.get(ProtectedItem, item_id).replication_state


@_operation
def complete_failover(vm: str) -> dict:
    """Complete a minimize-downtime failback waiting in failback_ready: the recovery VM shuts down, its last
    changes are copied, the primary's disks are swapped in and the VM starts there."""
    item_id, name = _protected(vm)
    return _job_ref(failover_workflows.complete_failback(item_id), failover_workflows.FAILBACK_COMPLETION, name)


@_operation
def commit_failover(vm: str) -> dict:
    """Commit what is pending: a failover (failed_over) or a failback (failed_back)."""
    item_id, name = _protected(vm)
    state = _state_of(item_id)
    if state is ReplicationState.FAILED_OVER:
        return _job_ref(failover_workflows.commit_failover(item_id), failover_workflows.COMMIT_FAILOVER, name)
    if state is ReplicationState.FAILED_BACK:
        return _job_ref(failover_workflows.commit_failback(item_id), failover_workflows.COMMIT_FAILBACK_JOB, name)
    raise Conflict(f"VM {name!r} is {state}: there is nothing to commit (a failover commits from failed_over, "
                   f"a failback from failed_back)")


@_operation
def cancel_failover(vm: str) -> dict:
    """Cancel what is pending: a failover not committed (failed_over), or a failback before its swap
    (failing_back, failback_ready)."""
    item_id, name = _protected(vm)
    state = _state_of(item_id)
    if state is ReplicationState.FAILED_OVER:
        return _job_ref(failover_workflows.cancel_failover(item_id), failover_workflows.CANCEL_FAILOVER, name)
    if state in (ReplicationState.FAILING_BACK, ReplicationState.FAILBACK_READY):
        return _job_ref(failover_workflows.cancel_failback(item_id), failover_workflows.CANCEL_FAILBACK, name)
    raise Conflict(f"VM {name!r} is {state}: there is nothing to cancel (a failover cancels from failed_over, a "
                   f"failback from failing_back or failback_ready)")


def _failback_mode(mode: Any) -> str:
    normalized = mode.replace("-", "_") if isinstance(mode, str) else mode
    if normalized not in FAILBACK_MODES:
        raise Invalid(f"failback mode must be one of {', '.join(FAILBACK_MODES)}, got {mode!r}")
    return normalized


@_operation
def failback(vm: str, *, mode: str = "minimize_downtime", create_vm: bool = False, host: str | None = None) -> dict:
    """Fail a committed failover back to the primary (or to `host`). minimize_downtime stops at
    failback_ready (then complete_failover); full_download does it all with the recovery VM off."""
    mode = _failback_mode(mode)
    if not isinstance(create_vm, bool):
        raise Invalid(f"create_vm is true or false, got {create_vm!r}")
    item_id, name = _protected(vm)
    host = _check_host(host, "failback host")
    job_id = failover_workflows.start_failback(item_id, mode=mode, create_vm=create_vm, host=host)
    return _job_ref(job_id, failover_workflows.FAILBACK, name)


@_operation
def reverse_replication(vm: str) -> dict:
    """Protect the failed-back VM again: its disks are resynchronized against the replica, then delta
    replication resumes."""
    item_id, name = _protected(vm)
    return _job_ref(failover_workflows.start_reverse_replication(item_id),
                    failover_workflows.REVERSE_REPLICATION, name)


# ---- recovery plans ----------------------------------------------------------------------------------------
def _plan_dict(session: Session, plan: RecoveryPlan) -> dict[str, Any]:
    ids = {vm_id for group in plan.groups for vm_id in group["vms"]}
    rows = session.exec(select(VirtualMachine, Host.name).join(Host, Host.id == VirtualMachine.host_id)
                        .where(VirtualMachine.id.in_(ids))).all()
    names = {vm.id: {"id": vm.id, "name": vm.name, "host": host} for vm, host in rows}
    groups = [{**group, "vms": [names.get(vm_id, {"id": vm_id, "name": None, "host": None})
                                for vm_id in group["vms"]]} for group in plan.groups]
    return {"id": plan.id, "name": plan.name, "description": plan.description, "groups": _plain(groups),
            "created_at": _iso(plan.created_at), "updated_at": _iso(plan.updated_at)}


@_operation
def create_plan(name: str, groups: list[dict], description: str = "") -> dict:
    """A recovery plan: groups in failover order, each {"name", "vms": [VM name, "host/name" or id],
    "before": [action], "after": [action]}; an action is {"kind": "script", "name", "command": [argv],
    "timeout_s"} or {"kind": "manual", "name", "instructions"}. Every problem is reported at once."""
    _name(name, "recovery plan")
    with session_scope() as session:
        existing = session.exec(select(RecoveryPlan).where(RecoveryPlan.name == name)).first()
        if existing is not None:
            raise Conflict(f"a recovery plan named {name!r} already exists (id {existing.id})")
        return _plan_dict(session, _create_plan(session, name, groups, description))


@_operation
def list_plans() -> list[dict]:
    with session_scope() as session:
        return [_plan_dict(session, plan) for plan in _list_plans(session)]


@_operation
def show_plan(name: str) -> dict:
    with session_scope() as session:
        return _plan_dict(session, get_plan(session, name))


def _plan_operation(operation: Any) -> PlanOperation:
    aliases = {"test": "test_failover", "planned": "planned_failover", "unplanned": "unplanned_failover"}
    normalized = operation.replace("-", "_") if isinstance(operation, str) else operation
    normalized = aliases.get(normalized, normalized)
    try:
        return PlanOperation(normalized)
    except ValueError:
        raise Invalid(f"a plan's operation is one of {', '.join(PlanOperation)}, got {operation!r}") from None


@_operation
def run_plan(name: str, operation: str, **options: Any) -> dict:
    """Run the plan for test_failover, planned_failover, unplanned_failover or failback. Options: point,
    recovery_host, test_network (failovers); mode, create_vm (failback). Every VM is checked first: nothing
    starts unless all can."""
    op = _plan_operation(operation)
    unknown = sorted(set(options) - set(PLAN_OPTIONS))
    if unknown:
        raise Invalid(f"unknown plan option(s) {', '.join(unknown)} (options: {', '.join(PLAN_OPTIONS)})")
    options = {key: value for key, value in options.items() if value is not None}
    if "mode" in options:
        options["mode"] = _failback_mode(options["mode"])
    if "create_vm" in options and not isinstance(options["create_vm"], bool):
        raise Invalid(f"create_vm is true or false, got {options['create_vm']!r}")
    if "point" in options and (not isinstance(options["point"], str) or options["point"] not in POINT_CHOICES):
        raise Invalid(f"a plan's point is one of {', '.join(POINT_CHOICES)} (each VM has its own point ids)")
    if "recovery_host" in options:
        options["recovery_host"] = _check_host(options["recovery_host"], "recovery host")
    if "test_network" in options:
        _name(options["test_network"], "test network")
    with session_scope() as session:
        plan_name = get_plan(session, _name(name, "recovery plan")).name
    job_id = plan_workflows.start_plan(plan_name, op.value, **options)
    return _job_ref(job_id, f"plan_{op.value}", None, plan=plan_name)


# ---- recovery points, verification, health -----------------------------------------------------------------
@_operation
def recovery_points(vm: str) -> list[dict]:
    """The VM's recovery points, oldest first."""
    item_id, _name_of_vm = _protected(vm)
    with session_scope() as session:
        item = session.get(ProtectedItem, item_id)
        return [{"id": point.id, "created_at": _iso(point.created_at), "kind": str(point.kind),
                 "versions": dict(point.versions), "manifest_roots": dict(point.manifest_roots),
                 "generations": dict(point.generations)}
                for point in _recovery_points(session, item)]


@_operation
def verify(vm: str, *, point: str | None = None) -> dict:
    """Check the replica against a recovery point (the latest by default), reading it back from the recovery
    storage: the job fails naming the disk and chunk when one differs."""
    item_id, name = _protected(vm)
    if point is not None:
        point = _check_point(item_id, point)
    return _job_ref(failover_workflows.start_verify(item_id, point), failover_workflows.VERIFY_RECOVERY_POINT, name)


@_operation
def health() -> list[dict]:
    """One entry per protected VM (protection not disabled): state, health and its errors, RPO, latest point,
    the job running on it."""
    with session_scope() as session:
        ids = session.exec(select(ProtectedItem.id).join(VirtualMachine, VirtualMachine.id == ProtectedItem.vm_id)
                           .join(Host, Host.id == VirtualMachine.host_id)
                           .where(ProtectedItem.replication_state != ReplicationState.DISABLED)
                           .order_by(Host.name, VirtualMachine.name)).all()
    report = []
    for item_id in ids:
        status = protection_workflows.item_status(item_id)
        report.append({"vm": status["vm"], "host": status["host"], "item_id": item_id, "state": status["state"],
                       "health": status["health"], "errors": status["errors"], "rpo_s": status["rpo_s"],
                       "last_recovery_point_at": status["last_recovery_point_at"],
                       "recovery_points": status["recovery_points"], "unsent_ratio": status["unsent_ratio"],
                       "active_job": status["active_job"]})
    return report


# ---- jobs --------------------------------------------------------------------------------------------------
def _check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not job_id or len(job_id) > 36 or "/" in job_id or "\\" in job_id:
        raise Invalid(f"a job id is the text a job was started with, got {job_id!r}")
    return job_id


@_operation
def list_jobs(*, state: str | None = None, kind: str | None = None, vm: str | None = None,
              limit: int = 50) -> list[dict]:
    """Jobs, newest first: state, kind and the VM filter them; at most `limit` (1-1000)."""
    limit = _int_option("limit", limit)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_JOB_LIMIT:
        raise Invalid(f"limit must be a whole number from 1 to {MAX_JOB_LIMIT}, got {limit!r}")
    if state is not None and state not in {s.value for s in JobState}:
        raise Invalid(f"job state must be one of {', '.join(s.value for s in JobState)}, got {state!r}")
    if kind is not None and (not isinstance(kind, str) or len(kind) > 64):
        raise Invalid(f"job kind must be a job kind such as 'enable_protection', got {kind!r}")
    with session_scope() as session:
        query = select(Job)
        if state is not None:
            query = query.where(Job.state == JobState(state))
        if kind is not None:
            query = query.where(Job.kind == kind)
        if vm is not None:
            row = _vm(session, vm)
            item = _item_of(session, row)
            if item is None:
                return []
            query = query.where(Job.target == item.id)
        jobs = session.exec(query.order_by(Job.created_at.desc(), Job.id).limit(limit)).all()
        counts: dict[str, dict[str, int]] = {}
        if jobs:
            for job_id, step_state, count in session.exec(
                    select(JobStep.job_id, JobStep.state, sa.func.count())
                    .where(JobStep.job_id.in_([job.id for job in jobs]))
                    .group_by(JobStep.job_id, JobStep.state)).all():
                counts.setdefault(job_id, {})[StepState(step_state).value] = count
        return [_job_summary(job, counts.get(job.id, {})) for job in jobs]


def _job_summary(job: Job, step_counts: Mapping[str, int]) -> dict[str, Any]:
    total = sum(step_counts.values())
    done = step_counts.get("succeeded", 0) + step_counts.get("skipped", 0)
    return {
        "id": job.id, "kind": job.kind, "state": job.state.value, "target": job.target,
        "vm": job.params.get("vm"), "plan": job.params.get("plan"),
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at), "ended_at": _iso(job.ended_at),
        "error": job.error, "steps_total": total, "steps_done": done,
    }


def _live_progress(job_id: str) -> dict[str, dict[str, Any]]:
    try:
        return job_progress(job_id)
    except (redis.RedisError, OSError, ValueError):
        # Redis holds the live view only; the database has each step's progress as of its last heartbeat.
        return {}


def _job_view(job_id: str) -> dict[str, Any]:
    job = engine.get_job(_check_job_id(job_id))
    live = _live_progress(job_id)
    steps = []
    done_total = [0, 0]
    for step in job["steps"]:
        step = {key: value for key, value in step.items() if key != "lease"}
        record = live.get(step["id"])
        done, total = step["progress_done"], step["progress_total"]
        if record is not None and (record.get("total", 0), record.get("done", 0)) >= (total, done):
            done, total = record["done"], record["total"]
        finished = step["state"] in (StepState.succeeded.value, StepState.skipped.value)
        percent = 100.0 if finished else (percent_of(done, total) if total else 0.0)
        step["progress"] = {"done": done, "total": total, "percent": percent,
                            "updated": record.get("updated") if record else None}
        steps.append(step)
        done_total[0] += percent
        done_total[1] += 100
    job["steps"] = steps
    job["vm"] = job["params"].get("vm")
    job["plan"] = job["params"].get("plan")
    job["percent"] = round(done_total[0] / done_total[1] * 100, 1) if done_total[1] else 0.0
    job["finished"] = job["state"] in {state.value for state in FINISHED_JOB_STATES}
    job["next_attempt_at"] = min((s["next_attempt_at"] for s in steps if s["state"] == StepState.waiting_retry.value
                                  and s["next_attempt_at"]), default=None)
    job["waiting_for"] = [{"step": s["name"], "instructions": s["instructions"]}
                          for s in steps if s["state"] == StepState.waiting_action.value]
    return job


@_operation
def show_job(job_id: str) -> dict:
    """The job with its steps (state, attempts, errors, next attempt time, manual instructions) and each step's
    live progress; `percent` is the job's, `finished` whether it has ended."""
    return _job_view(job_id)


@_operation
def cancel_job(job_id: str) -> dict:
    """Cancel the job: steps not started never start, running ones stop at their next heartbeat."""
    engine.cancel(_check_job_id(job_id))
    job = engine.get_job(job_id)
    return {"job_id": job_id, "kind": job["kind"], "state": job["state"], "vm": job["params"].get("vm")}


@_operation
def retry_job(job_id: str) -> dict:
    """Run the job's steps waiting for a retry now rather than at their scheduled time."""
    launched = engine.retry_now(_check_job_id(job_id))
    job = engine.get_job(job_id)
    return {"job_id": job_id, "kind": job["kind"], "state": job["state"], "vm": job["params"].get("vm"),
            "launched_steps": list(launched)}


@_operation
def resume_job(job_id: str, note: str = "") -> dict:
    """An operator did what the job's manual step asked: the job goes on."""
    if not isinstance(note, str) or len(note) > 4096:
        raise Invalid("a resume note is text of at most 4096 characters")
    resumed = engine.resume(_check_job_id(job_id), note=note)
    job = engine.get_job(job_id)
    return {"job_id": job_id, "kind": job["kind"], "state": job["state"], "vm": job["params"].get("vm"),
            "resumed_steps": list(resumed)}


def _record_of(params: Mapping[str, Any]) -> FailoverRecord | None:
    failover_id = params.get("failover_id")
    if not failover_id:
        return None
    with session_scope() as session:
        return session.get(FailoverRecord, failover_id)


def _restart(kind: str, params: Mapping[str, Any]) -> str:
    """Start job `kind` again with what its first run was asked (kept in its params and failover record)."""
    fw, pw = failover_workflows, protection_workflows
    item_id = params.get("item_id")
    if kind.startswith("plan_"):
        options = {key: params[key] for key in PLAN_OPTIONS if params.get(key) is not None}
        return plan_workflows.start_plan(params["plan_id"], params["operation"], **options)
    if item_id is None:
        raise Invalid(f"jobs of kind {kind!r} cannot be restarted from here")
    record = _record_of(params)
    details = record.details if record is not None else {}
    if kind == pw.ENABLE_PROTECTION:
        with session_scope() as session:
            item = session.get(ProtectedItem, item_id)
            if item is None:
                raise NotFound(f"the protected item {item_id} of this job is gone")
            if item.replication_state not in (ReplicationState.ENABLING_PROTECTION, ReplicationState.DISABLED):
                # Replication started before the job failed: a resync completes it, not a second enable.
                raise Conflict(f"the VM of this job is {item.replication_state} already: resynchronize it instead")
            host = session.get(Host, item.recovery_host_id) if item.recovery_host_id else None
            request = (item.vm_id, item.policy_id, item.recovery_storage, dict(item.storage_options),
                       host.name if host else None)
        return pw.enable_protection(request[0], request[1], recovery_storage=request[2], storage_options=request[3],
                                    recovery_host=request[4])
    simple: dict[str, Callable[[str], str]] = {
        pw.INITIAL_REPLICATION: pw.start_initial_replication, pw.DELTA_REPLICATION: pw.start_delta_replication,
        pw.DISABLE_PROTECTION: pw.disable_protection, fw.TEST_FAILOVER_CLEANUP: fw.start_test_failover_cleanup,
        fw.CANCEL_FAILOVER: fw.cancel_failover, fw.COMMIT_FAILOVER: fw.commit_failover,
        fw.FAILBACK_COMPLETION: fw.complete_failback, fw.CANCEL_FAILBACK: fw.cancel_failback,
        fw.COMMIT_FAILBACK_JOB: fw.commit_failback, fw.REVERSE_REPLICATION: fw.start_reverse_replication,
    }
    if kind in simple:
        return simple[kind](item_id)
    if kind == pw.RESYNCHRONIZE:
        return pw.start_resync(item_id, manual=bool(params.get("manual", True)))
    if kind == fw.TEST_FAILOVER:
        network = (record.network or "").split(", ")[0] if record is not None else None
        return fw.start_test_failover(item_id, point=params.get("point", fw.PointChoice.LATEST_PROCESSED),
                                      recovery_host=params.get("recovery_host"), test_network=network or None)
    if kind == fw.PLANNED_FAILOVER:
        return fw.start_planned_failover(item_id, recovery_host=params.get("recovery_host"),
                                         public_ips=details.get("public_ips") or None)
    if kind == fw.UNPLANNED_FAILOVER:
        return fw.start_unplanned_failover(item_id, point=params.get("point", fw.PointChoice.LATEST_PROCESSED),
                                           recovery_host=params.get("recovery_host"),
                                           public_ips=details.get("public_ips") or None)
    if kind == fw.FAILBACK:
        return fw.start_failback(item_id, mode=params.get("mode", fw.FailbackMode.MINIMIZE_DOWNTIME),
                                 create_vm=bool(details.get("create_vm", False)), host=params.get("host"))
    if kind == fw.VERIFY_RECOVERY_POINT:
        return fw.start_verify(item_id, params.get("point_id"))
    raise Invalid(f"jobs of kind {kind!r} cannot be restarted from here")


@_operation
def restart_job(job_id: str) -> dict:
    """Start the operation of a failed or cancelled job again, as a new job with the same request."""
    job = engine.get_job(_check_job_id(job_id))
    if job["state"] not in (JobState.failed.value, JobState.cancelled.value):
        raise Conflict(f"job {job_id} ({job['kind']}) is {job['state']}: only a failed or cancelled job can be "
                       f"restarted" + (" (cancel it first)" if job["state"] in
                                       {state.value for state in ACTIVE_JOB_STATES} else ""))
    new_id = _restart(job["kind"], job["params"])
    return _job_ref(new_id, job["kind"], job["params"].get("vm"), restarted_from=job_id,
                    plan=job["params"].get("plan"))


def _snapshot(job: Mapping[str, Any]) -> dict[str, Any]:
    """What a watcher sees of a job: its state and each step's state and progress."""
    return {
        "job_id": job["id"], "kind": job["kind"], "vm": job["vm"], "state": job["state"],
        "finished": job["finished"], "percent": job["percent"], "error": job["error"],
        "next_attempt_at": job["next_attempt_at"], "waiting_for": job["waiting_for"],
        "steps": [{"id": s["id"], "name": s["name"], "stage": s["stage"], "state": s["state"],
                   "attempts": s["attempts"], "error": s["error"], "next_attempt_at": s["next_attempt_at"],
                   "progress": {k: s["progress"][k] for k in ("done", "total", "percent")}}
                  for s in job["steps"]],
    }


@_operation
def job_snapshot(job_id: str) -> dict:
    """What a watcher sees of the job now: {job_id, kind, vm, state, finished, percent, error, next_attempt_at,
    waiting_for, steps: [{id, name, stage, state, attempts, error, next_attempt_at, progress}]}."""
    return _snapshot(_job_view(job_id))


def check_watch(interval: Any, timeout: Any) -> None:
    """Invalid unless `interval` and `timeout` are what job_events takes."""
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.05 <= interval <= 60:
        raise Invalid(f"interval must be 0.05 to 60 seconds, got {interval!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise Invalid(f"timeout must be a positive number of seconds, got {timeout!r}")


def job_events(job_id: str, *, interval: float = 0.5, timeout: float | None = None,
               repeat_after: float = 15.0) -> Iterator[dict]:
    """Snapshots of the job ({job_id, kind, vm, state, finished, percent, error, steps: [{name, state,
    progress}]}) as it changes, polled every `interval` s, until it has finished (that snapshot is the last)
    or `timeout` s have passed. An unchanged snapshot is repeated after `repeat_after` s, so a stream of them
    stays alive through proxies. NotFound at once for an unknown job."""
    check_watch(interval, timeout)
    first = job_snapshot(job_id)  # raises NotFound before the caller starts streaming

    def follow() -> Iterator[dict]:
        deadline = None if timeout is None else time.monotonic() + timeout
        current = first
        yield current
        last_sent = time.monotonic()
        while not current["finished"]:
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(interval)
            latest = job_snapshot(job_id)
            if latest != current or time.monotonic() - last_sent >= repeat_after:
                current = latest
                last_sent = time.monotonic()
                yield current

    return follow()


# ---- API keys ----------------------------------------------------------------------------------------------
@_operation
def create_api_key(name: str) -> dict:
    """A new API key for the REST API; the key is in the answer this once (only its hash is kept)."""
    _name(name, "API key")
    with session_scope() as session:
        if session.exec(select(apikeys.ApiKey).where(apikeys.ApiKey.name == name)).first() is not None:
            raise Conflict(f"an API key named {name!r} already exists")
        row, key = apikeys.create_api_key(session, name)
        return {**apikeys.describe(row), "key": key}


@_operation
def list_api_keys() -> list[dict]:
    with session_scope() as session:
        return [apikeys.describe(row) for row in apikeys.list_api_keys(session)]


@_operation
def revoke_api_key(name: str) -> dict:
    with session_scope() as session:
        return apikeys.describe(apikeys.revoke_api_key(session, _name(name, "API key")))


@_operation
def hash_api_key(key: str) -> str:
    """The salted hash of `key`, for the ASR_API_KEY_HASHES setting of a deployment that keeps keys out of the
    database."""
    return apikeys.hash_key(key)
