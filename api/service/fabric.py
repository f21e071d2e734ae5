"""The fabric: sites, VMM clouds, hosts, the VMs on them, and the network mappings failovers use."""
from __future__ import annotations

from sqlmodel import Session, select

from models.db import session_scope
from models.fabric import (
    Host,
    NetworkMapping,
    Site,
    VirtualMachine,
    VmmCloud,
    VmmServer,
    create_cloud,
    create_site,
    create_vmm_server,
    import_vm_manifest,
    register_host,
    vm_disks,
)
from models.fabric import (
    add_network_mapping as _add_network_mapping,
)
from models.protection import ProtectedItem
from sites.host import Host as HostDriver
from workflows.items import item_status
from workflows.reports import failover_report

from .errors import Conflict, Invalid, _operation
from .lookups import _cloud, _host, _host_root, _name, _site, _vm
from .presenters import _host_dict, _iso, _mapping_dict, _power_state, _site_dict, _vm_dict


# ---- sites, clouds, hosts ----------------------------------------------------------------------------------
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


@_operation
def add_host(name: str, root: str, *, site: str | None = None, cloud: str | None = None) -> dict:
    """Register a host in one site or one VMM cloud. The answer holds its agent's registration key, shown this
    once (only its hash is kept)."""
    _name(name, "host")
    if (site is None) == (cloud is None):
        raise Invalid(f"host {name!r} must belong to exactly one site or one VMM cloud: give site or cloud")
    _host_root(name, root)
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


def _vm_rows(session: Session) -> list[tuple[VirtualMachine, Host, ProtectedItem | None]]:
    query = (select(VirtualMachine, Host, ProtectedItem)
             .join(Host, Host.id == VirtualMachine.host_id)
             .join(ProtectedItem, ProtectedItem.vm_id == VirtualMachine.id, isouter=True)
             .order_by(Host.name, VirtualMachine.name))
    return list(session.exec(query).all())


@_operation
def list_vms() -> list[dict]:
    with session_scope() as session:
        return [{
            "id": vm.id, "name": vm.name, "host": host_name, "power_state": _power_state(host, vm),
            "disks": len(vm_disks(session, vm)),
            "protection_state": str(item.replication_state) if item else None,
            "health": str(item.health) if item else None,
        } for vm, host, item in _vm_rows(session) for host_name in [host.name]]


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
        plain["protection"] = item_status(item_id)
    if failover_id is not None:
        plain["failover"] = failover_report(failover_id)
    return plain


# ---- network mappings --------------------------------------------------------------------------------------
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
