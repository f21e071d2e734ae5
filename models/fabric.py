"""The fabric: where protected VMs live, in both shapes of the reference architecture.

A Hyper-V *site* groups standalone hosts; a *VMM server* manages *clouds* that group hosts. Every host
belongs to exactly one site or one cloud. Hosts run VMs; a VM has virtual disks and network adapters;
*network mappings* say which recovery-site network a VM network fails over to, per site or cloud.

Registration functions validate everything before they add anything to the session, so bad input
raises a clear ValueError and writes nothing. They flush but never commit: the caller's
`session_scope` does.
"""
import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, select

from datapath.disk import FORMATS
from datapath.errors import NonRecoverableError
from models.db import UtcDateTime, clock_now, new_id, validate_name
from sites.host import STATE_OFF, VM_GENERATIONS, VmNotFoundError, VmSpecError
from sites.host import STATES as VM_POWER_STATES
from sites.host.guestdef import GuestDefinition

__all__ = [
    "Site", "VmmServer", "VmmCloud", "Host", "VirtualMachine", "VirtualDisk", "VmNetworkAdapter",
    "NetworkMapping", "VmNotFoundError", "AmbiguousVmError",
    "create_site", "create_vmm_server", "create_cloud", "register_host", "rekey_host", "move_host",
    "verify_host_key", "host_queue",
    "add_vm", "import_vm_manifest", "get_vm", "vm_disks", "vm_adapters", "add_network_mapping",
    "change_network_mapping",
]

# scrypt at 16 MiB and ~60 ms per check: a stolen database does not yield keys cheaply, and an agent
# authenticating now and then does not notice.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _SCRYPT_BYTES = 2**14, 8, 1, 32
_SALT_BYTES = 16
_Row = TypeVar("_Row", bound=SQLModel)
_KEY_BYTES = 32


class AmbiguousVmError(NonRecoverableError):
    """A VM name was given without its host and more than one host has a VM of that name."""


# ---- tables ------------------------------------------------------------------------------------
class Site(SQLModel, table=True):
    """A Hyper-V site: standalone hosts grouped for protection (no VMM)."""

    __tablename__ = "site"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    name: str = Field(unique=True, max_length=64)
    description: str = Field(default="", max_length=1024)
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)


class VmmServer(SQLModel, table=True):
    """A System Center VMM server: it manages clouds of hosts."""

    __tablename__ = "vmm_server"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    name: str = Field(unique=True, max_length=64)
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)


class VmmCloud(SQLModel, table=True):
    """A VMM cloud: a group of hosts of one VMM server."""

    __tablename__ = "vmm_cloud"
    __table_args__ = (sa.UniqueConstraint("vmm_server_id", "name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    vmm_server_id: str = Field(foreign_key="vmm_server.id", index=True, max_length=36)
    name: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)


class Host(SQLModel, table=True):
    """A Hyper-V host. Its agent serves the queue `host.<name>` and authenticates with the registration
    key, of which only a salted scrypt hash is kept."""

    __tablename__ = "host"
    __table_args__ = (
        sa.CheckConstraint(
            "(site_id IS NULL) <> (cloud_id IS NULL)", name="host_in_exactly_one_site_or_cloud"
        ),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    name: str = Field(unique=True, max_length=64)
    site_id: str | None = Field(default=None, foreign_key="site.id", index=True, max_length=36)
    cloud_id: str | None = Field(default=None, foreign_key="vmm_cloud.id", index=True, max_length=36)
    root: str = Field(max_length=4096)
    queue: str = Field(max_length=80)
    key_hash: str = Field(max_length=256)
    registered_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)
    last_seen_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class VirtualMachine(SQLModel, table=True):
    __tablename__ = "virtual_machine"
    __table_args__ = (sa.UniqueConstraint("host_id", "name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    host_id: str = Field(foreign_key="host.id", index=True, max_length=36)
    name: str = Field(max_length=64)
    vm_uuid: str = Field(index=True, max_length=36)
    """The VM's own id from the host's vm.json."""
    generation: int = Field(default=1)
    state: str = Field(default=STATE_OFF, max_length=16)
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)
    guest: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    """How the VM boots as a QEMU guest (sites/host/guestdef.py), with its boot files' SHA-256 as registered;
    None for a synthetic VM. A recovery VM boots only files matching these hashes."""


class VirtualDisk(SQLModel, table=True):
    __tablename__ = "virtual_disk"
    __table_args__ = (sa.UniqueConstraint("vm_id", "name"), sa.UniqueConstraint("vm_id", "disk_uuid"))

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    vm_id: str = Field(foreign_key="virtual_machine.id", index=True, max_length=36, ondelete="CASCADE")
    name: str = Field(max_length=64)
    file_name: str = Field(max_length=64)
    size: int = Field(sa_type=sa.BigInteger)
    """Virtual (guest-visible) size in bytes."""
    format: str = Field(max_length=8)
    disk_uuid: str = Field(max_length=36)
    """The disk's identity for replication, whatever its name or file."""
    position: int = Field(default=0)
    """Its place among the VM's disks as the host's manifest lists them (0 first): a QEMU guest's first drive is
    its /dev/vda, so a recovery VM gets its disks in this order. Rows older than revision 0006 hold 0 (name order)."""


class VmNetworkAdapter(SQLModel, table=True):
    __tablename__ = "vm_network_adapter"
    __table_args__ = (sa.UniqueConstraint("vm_id", "name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    vm_id: str = Field(foreign_key="virtual_machine.id", index=True, max_length=36, ondelete="CASCADE")
    name: str = Field(max_length=64)
    vm_network: str = Field(max_length=64)
    public_ip: str | None = Field(default=None, max_length=45)


class NetworkMapping(SQLModel, table=True):
    """Where a VM network (or VMM VM network) of one site or cloud lands at the recovery site."""

    __tablename__ = "network_mapping"

    # NULLs are distinct in unique constraints, so each scope gets its own partial unique index.
    __table_args__ = (
        sa.CheckConstraint(
            "(site_id IS NULL) <> (cloud_id IS NULL)", name="mapping_in_exactly_one_site_or_cloud"
        ),
        sa.Index(
            "ux_network_mapping_site_source", "site_id", "source_network", unique=True,
            sqlite_where=sa.text("site_id IS NOT NULL"), postgresql_where=sa.text("site_id IS NOT NULL"),
        ),
        sa.Index(
            "ux_network_mapping_cloud_source", "cloud_id", "source_network", unique=True,
            sqlite_where=sa.text("cloud_id IS NOT NULL"), postgresql_where=sa.text("cloud_id IS NOT NULL"),
        ),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    site_id: str | None = Field(default=None, foreign_key="site.id", max_length=36)
    cloud_id: str | None = Field(default=None, foreign_key="vmm_cloud.id", max_length=36)
    source_network: str = Field(max_length=64)
    recovery_network: str = Field(max_length=64)
    recovery_subnet: str = Field(max_length=49)
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)


# ---- sites, VMM servers, clouds -----------------------------------------------------------------
def create_site(session: Session, name: str, description: str = "") -> Site:
    validate_name(name, "site")
    if session.exec(select(Site).where(Site.name == name)).first() is not None:
        raise ValueError(f"site {name!r} already exists")
    return _added(session, Site(name=name, description=description))


def create_vmm_server(session: Session, name: str) -> VmmServer:
    validate_name(name, "VMM server")
    if session.exec(select(VmmServer).where(VmmServer.name == name)).first() is not None:
        raise ValueError(f"VMM server {name!r} already exists")
    return _added(session, VmmServer(name=name))


def create_cloud(session: Session, server: VmmServer, name: str) -> VmmCloud:
    validate_name(name, "VMM cloud")
    _require_persisted(server, "VMM server")
    existing = select(VmmCloud).where(VmmCloud.vmm_server_id == server.id, VmmCloud.name == name)
    if session.exec(existing).first() is not None:
        raise ValueError(f"VMM server {server.name!r} already has a cloud {name!r}")
    return _added(session, VmmCloud(vmm_server_id=server.id, name=name))


# ---- hosts ---------------------------------------------------------------------------------------
def host_queue(host_name: str) -> str:
    """The Celery queue of a host's agent: everything that touches the host's disks runs there."""
    return f"host.{host_name}"


def register_host(
    session: Session, name: str, root: str, *, site: Site | None = None, cloud: VmmCloud | None = None
) -> tuple[Host, str]:
    """Register a host in exactly one site or cloud. Returns the host and its registration key, which
    is shown this once: only its hash is stored."""
    validate_name(name, "host")
    _validate_host_root(name, root)
    _require_one_scope(f"host {name!r}", site, cloud)
    existing = session.exec(select(Host).where(Host.name == name)).first()
    if existing is not None:
        raise ValueError(f"host {name!r} is already registered (id {existing.id})")
    key = _new_key()
    host = Host(
        name=name, root=root, queue=host_queue(name), key_hash=_hash_key(key),
        site_id=site.id if site is not None else None, cloud_id=cloud.id if cloud is not None else None,
    )
    return _added(session, host), key


def rekey_host(session: Session, host: Host) -> str:
    """Give the host a new registration key and return it (shown this once: only its hash is stored). The old
    key no longer admits an agent; an agent already running stops consuming its queue at its next heartbeat
    (tasks/alerts.py) and must be restarted with the new key."""
    _require_persisted(host, "host")
    key = _new_key()
    host.key_hash = _hash_key(key)
    session.add(host)
    session.flush()
    return key


def move_host(session: Session, host: Host, *, root: str | None = None, site: Site | None = None,
              cloud: VmmCloud | None = None) -> Host:
    """Give the host another root, or put it in another site or cloud (both None: it stays where it is),
    checked as `register_host` checks them. What depends on the old ones is the caller's to refuse."""
    _require_persisted(host, "host")
    if root is not None:
        _validate_host_root(host.name, root)
    if site is not None or cloud is not None:
        _require_one_scope(f"host {host.name!r}", site, cloud)
        host.site_id, host.cloud_id = (site.id, None) if site is not None else (None, cloud.id)
    if root is not None:
        host.root = root
    return _added(session, host)


def _new_key() -> str:
    return secrets.token_urlsafe(_KEY_BYTES)


def verify_host_key(host: Host, key: str) -> bool:
    """Whether `key` is the host's registration key (compared in constant time)."""
    if not isinstance(key, str) or not key:
        return False
    try:
        scheme, n, r, p, salt, expected = host.key_hash.split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        expected_bytes = base64.b64decode(expected, validate=True)
        actual = hashlib.scrypt(
            key.encode(), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r), p=int(p),
            dklen=len(expected_bytes),
        )
    except ValueError:
        raise ValueError(f"stored key hash of host {host.name!r} is malformed: issue a new key with "
                         f"`asr host rekey {host.name}`") from None
    return hmac.compare_digest(actual, expected_bytes)


def _hash_key(key: str) -> str:
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=_SCRYPT_BYTES)
    encoded = (base64.b64encode(salt).decode(), base64.b64encode(digest).decode())
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${encoded[0]}${encoded[1]}"


def _validate_host_root(host_name: str, root: object) -> None:
    # The root is a path on the host (maybe another machine): it can be checked for shape, not existence.
    if not isinstance(root, str) or not PurePosixPath(root).is_absolute() or "\x00" in root or len(root) > 4096:
        raise ValueError(f"root of host {host_name!r} must be an absolute path, got {root!r}")


# ---- virtual machines ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _DiskSpec:
    disk_uuid: str
    name: str
    file_name: str
    size: int
    format: str


@dataclass(frozen=True)
class _AdapterSpec:
    name: str
    vm_network: str


@dataclass(frozen=True)
class _VmSpec:
    name: str
    vm_uuid: str
    generation: int
    state: str
    disks: tuple[_DiskSpec, ...]
    adapters: tuple[_AdapterSpec, ...]
    guest: dict[str, Any] | None = None


def add_vm(
    session: Session, host: Host, name: str, disks: list[dict], adapters: list[dict], *,
    vm_uuid: str | None = None, generation: int = 1, state: str = STATE_OFF,
) -> VirtualMachine:
    """Add a VM to a registered host. `disks`: [{"id" (optional UUID), "name", "file", "size",
    "format"}]; `adapters`: [{"name", "vm_network" (or "network")}]."""
    spec = _parse_vm_spec(host, name, vm_uuid or str(uuid.uuid4()), generation, state, disks, adapters)
    _require_persisted(host, "host")
    if _find_vm(session, host, name) is not None:
        raise ValueError(f"VM {name!r} already exists on host {host.name!r}")
    return _create_vm(session, host, spec)


def import_vm_manifest(session: Session, host: Host, vm_json: dict) -> VirtualMachine:
    """Create or bring up to date the VM a host's vm.json describes: {"name", "id", "generation",
    "state", "disks": [{"id", "name", "file", "size", "format"}], "network_adapters" (or "adapters" or
    "networks"): [{"name", "vm_network" (or "network")}]}. Importing the same manifest twice changes
    nothing; disks are matched by id, adapters by name, and those gone from the manifest are removed."""
    if not isinstance(vm_json, dict):
        raise ValueError(f"VM manifest from host {host.name!r} must be a JSON object, got {type(vm_json).__name__}")
    name = vm_json.get("name")
    where = f"VM manifest {name!r} from host {host.name!r}"
    if "id" not in vm_json or "disks" not in vm_json:
        raise ValueError(f"{where} lacks 'id' or 'disks'")
    # A disk's id is its identity across imports: one made up here would differ each time.
    if isinstance(vm_json["disks"], list) and any(isinstance(d, dict) and not d.get("id") for d in vm_json["disks"]):
        raise ValueError(f"{where}: every disk needs its 'id'")
    adapters_key = next((k for k in ("network_adapters", "adapters", "networks") if k in vm_json), None)
    spec = _parse_vm_spec(
        host, name, vm_json["id"], vm_json.get("generation", 1), vm_json.get("state", STATE_OFF),
        vm_json["disks"], vm_json[adapters_key] if adapters_key else [],
    )
    if vm_json.get("guest") is not None:
        try:
            guest = GuestDefinition.from_manifest(vm_json["guest"], where)
            guest.check_boot_disk([disk.name for disk in spec.disks], where)
        except VmSpecError as exc:
            raise ValueError(str(exc)) from None
        spec = dataclasses.replace(spec, guest=guest.to_manifest())
    _require_persisted(host, "host")
    vm = _find_vm(session, host, spec.name)
    if vm is None:
        return _create_vm(session, host, spec)
    if vm.vm_uuid != spec.vm_uuid:
        raise ValueError(
            f"{where} has id {spec.vm_uuid}, but VM {spec.name!r} on that host is registered with id "
            f"{vm.vm_uuid}: remove the old VM first"
        )
    _sync_vm(session, vm, spec)
    return vm


def get_vm(session: Session, name: str, host: Host | str | None = None) -> VirtualMachine:
    """The VM named `name` (on `host`, a Host or host name, when given). VmNotFoundError naming the VM
    when there is none; AmbiguousVmError when no host was given and several hosts have one."""
    query = select(VirtualMachine, Host.name).join(Host, Host.id == VirtualMachine.host_id)
    query = query.where(VirtualMachine.name == name)
    if host is not None:
        host_name = host if isinstance(host, str) else host.name
        query = query.where(Host.name == host_name)
    found = session.exec(query).all()
    if not found:
        where = f" on host {host_name!r}" if host is not None else ""
        raise VmNotFoundError(f"VM {name!r} not found{where}")
    if len(found) > 1:
        hosts = ", ".join(sorted(owner for _vm, owner in found))
        raise AmbiguousVmError(f"VM name {name!r} exists on hosts {hosts}: name the host")
    return found[0][0]


def vm_disks(session: Session, vm: VirtualMachine) -> list[VirtualDisk]:
    """The VM's disks in the order of its manifest (the first is the guest's first drive)."""
    return list(session.exec(select(VirtualDisk).where(VirtualDisk.vm_id == vm.id)
                             .order_by(VirtualDisk.position, VirtualDisk.name)))


def vm_adapters(session: Session, vm: VirtualMachine) -> list[VmNetworkAdapter]:
    query = select(VmNetworkAdapter).where(VmNetworkAdapter.vm_id == vm.id).order_by(VmNetworkAdapter.name)
    return list(session.exec(query))


def _find_vm(session: Session, host: Host, name: str) -> VirtualMachine | None:
    query = select(VirtualMachine).where(VirtualMachine.host_id == host.id, VirtualMachine.name == name)
    return session.exec(query).first()


def _parse_vm_spec(
    host: Host, name: Any, vm_uuid: Any, generation: Any, state: Any, disks: Any, adapters: Any
) -> _VmSpec:
    validate_name(name, "VM")
    where = f"VM {name!r} on host {host.name!r}"
    if generation not in VM_GENERATIONS or isinstance(generation, bool):
        raise ValueError(f"{where}: generation must be one of {VM_GENERATIONS}, got {generation!r}")
    if state not in VM_POWER_STATES:
        raise ValueError(f"{where}: state must be one of {VM_POWER_STATES}, got {state!r}")
    if not isinstance(disks, list) or not disks:
        raise ValueError(f"{where}: needs a non-empty list of disks")
    if not isinstance(adapters, list):
        raise ValueError(f"{where}: network adapters must be a list")
    disk_specs = tuple(_parse_disk(where, entry) for entry in disks)
    adapter_specs = tuple(_parse_adapter(where, entry) for entry in adapters)
    for label, values in (
        ("disk names", [d.name for d in disk_specs]),
        ("disk files", [d.file_name for d in disk_specs]),
        ("disk ids", [d.disk_uuid for d in disk_specs]),
        ("adapter names", [a.name for a in adapter_specs]),
    ):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"{where}: duplicate {label}: {', '.join(duplicates)}")
    return _VmSpec(name, _canonical_uuid(where, "id", vm_uuid), generation, state, disk_specs, adapter_specs)


def _parse_disk(where: str, entry: Any) -> _DiskSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: each disk must be an object, got {entry!r}")
    name = validate_name(entry.get("name"), f"disk (of {where})")
    where = f"{where}, disk {name!r}"
    file_name = validate_name(entry.get("file"), f"disk file (of {where})")
    size, disk_format = entry.get("size"), entry.get("format")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"{where}: size must be a positive number of bytes, got {size!r}")
    if disk_format not in FORMATS:
        raise ValueError(f"{where}: format must be one of {FORMATS}, got {disk_format!r}")
    disk_uuid = _canonical_uuid(where, "id", entry["id"]) if entry.get("id") is not None else str(uuid.uuid4())
    return _DiskSpec(disk_uuid, name, file_name, size, disk_format)


def _parse_adapter(where: str, entry: Any) -> _AdapterSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: each network adapter must be an object, got {entry!r}")
    name = validate_name(entry.get("name"), f"network adapter (of {where})")
    network = entry.get("vm_network", entry.get("network"))
    return _AdapterSpec(name, validate_name(network, f"VM network (of {where}, adapter {name!r})"))


def _canonical_uuid(where: str, field: str, value: Any) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"{where}: {field} must be a UUID, got {value!r}") from None


def _create_vm(session: Session, host: Host, spec: _VmSpec) -> VirtualMachine:
    vm = _added(session, VirtualMachine(
        host_id=host.id, name=spec.name, vm_uuid=spec.vm_uuid, generation=spec.generation, state=spec.state,
        guest=spec.guest,
    ))
    for position, disk in enumerate(spec.disks):
        session.add(_new_disk(vm, disk, position))
    for adapter in spec.adapters:
        session.add(VmNetworkAdapter(vm_id=vm.id, name=adapter.name, vm_network=adapter.vm_network))
    session.flush()
    return vm


def _new_disk(vm: VirtualMachine, disk: _DiskSpec, position: int) -> VirtualDisk:
    return VirtualDisk(
        vm_id=vm.id, name=disk.name, file_name=disk.file_name, size=disk.size, format=disk.format,
        disk_uuid=disk.disk_uuid, position=position,
    )


def _sync_vm(session: Session, vm: VirtualMachine, spec: _VmSpec) -> None:
    vm.generation, vm.state, vm.guest = spec.generation, spec.state, spec.guest
    session.add(vm)
    current_disks = {d.disk_uuid: d for d in vm_disks(session, vm)}
    wanted_disks = {d.disk_uuid: d for d in spec.disks}
    current_adapters = {a.name: a for a in vm_adapters(session, vm)}
    wanted_adapters = {a.name: a for a in spec.adapters}
    # Deletions first and flushed: a renamed disk or a disk whose name moved to another id must not
    # collide with the row it replaces on the (vm, name) unique constraint.
    for disk_uuid in current_disks.keys() - wanted_disks.keys():
        session.delete(current_disks.pop(disk_uuid))
    for adapter_name in current_adapters.keys() - wanted_adapters.keys():
        session.delete(current_adapters.pop(adapter_name))
    for disk_uuid, disk in current_disks.items():
        if disk.name != wanted_disks[disk_uuid].name:
            disk.name = f"{disk_uuid}.renaming"  # frees the old name before any disk takes it
            session.add(disk)
    session.flush()
    for position, (disk_uuid, wanted) in enumerate(wanted_disks.items()):
        disk = current_disks.get(disk_uuid)
        if disk is None:
            session.add(_new_disk(vm, wanted, position))
        else:
            disk.name, disk.file_name = wanted.name, wanted.file_name
            disk.size, disk.format, disk.position = wanted.size, wanted.format, position
            session.add(disk)
    for adapter_name, wanted in wanted_adapters.items():
        adapter = current_adapters.get(adapter_name)
        if adapter is None:
            session.add(VmNetworkAdapter(vm_id=vm.id, name=wanted.name, vm_network=wanted.vm_network))
        else:
            adapter.vm_network = wanted.vm_network
            session.add(adapter)
    session.flush()


# ---- network mappings ------------------------------------------------------------------------------
def add_network_mapping(
    session: Session, source_network: str, recovery_network: str, recovery_subnet: str, *,
    site: Site | None = None, cloud: VmmCloud | None = None,
) -> NetworkMapping:
    """Map a VM network of a site (or a VMM VM network of a cloud) to a recovery network and subnet
    (CIDR, e.g. "10.1.0.0/24"). One mapping per source network and site or cloud."""
    validate_name(source_network, "source network")
    validate_name(recovery_network, "recovery network")
    scope = _require_one_scope(f"mapping of network {source_network!r}", site, cloud)
    subnet = _recovery_subnet(source_network, recovery_subnet)
    query = select(NetworkMapping).where(NetworkMapping.source_network == source_network)
    if site is not None:
        query = query.where(NetworkMapping.site_id == site.id)
    else:
        query = query.where(NetworkMapping.cloud_id == cloud.id)
    existing = session.exec(query).first()
    if existing is not None:
        raise ValueError(
            f"network {source_network!r} of {scope} is already mapped to {existing.recovery_network!r} "
            f"({existing.recovery_subnet})"
        )
    return _added(session, NetworkMapping(
        site_id=site.id if site is not None else None, cloud_id=cloud.id if cloud is not None else None,
        source_network=source_network, recovery_network=recovery_network, recovery_subnet=subnet,
    ))


def change_network_mapping(session: Session, mapping: NetworkMapping, *, recovery_network: str | None = None,
                           recovery_subnet: str | None = None) -> NetworkMapping:
    """Point a mapping at another recovery network or subnet (None: unchanged), checked as a new one's."""
    _require_persisted(mapping, "network mapping")
    if recovery_network is not None:
        mapping.recovery_network = validate_name(recovery_network, "recovery network")
    if recovery_subnet is not None:
        mapping.recovery_subnet = _recovery_subnet(mapping.source_network, recovery_subnet)
    return _added(session, mapping)


def _recovery_subnet(source_network: str, recovery_subnet: Any) -> str:
    try:
        return str(ipaddress.ip_network(recovery_subnet, strict=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"mapping of network {source_network!r}: recovery subnet {recovery_subnet!r} is not a network "
            f"in CIDR form ({exc})"
        ) from None


# ---- helpers ------------------------------------------------------------------------------------------
def _require_one_scope(what: str, site: Site | None, cloud: VmmCloud | None) -> str:
    """Exactly one of site/cloud, already saved; returns how to name it in messages."""
    if (site is None) == (cloud is None):
        given = "both" if site is not None else "neither"
        raise ValueError(f"{what} must belong to exactly one site or one VMM cloud (got {given})")
    if site is not None:
        _require_persisted(site, "site")
        return f"site {site.name!r}"
    _require_persisted(cloud, "VMM cloud")
    return f"cloud {cloud.name!r}"


def _require_persisted(row: SQLModel, kind: str) -> None:
    if not sa.inspect(row).has_identity:
        raise ValueError(f"{kind} {getattr(row, 'name', row)!r} is not saved in the database")


def _added(session: Session, row: _Row) -> _Row:
    session.add(row)
    session.flush()
    return row
