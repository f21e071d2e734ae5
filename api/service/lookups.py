"""Finding what a request names (sites, VMM clouds, hosts, policies, VMs, protected items) by name or id, and
the checks of the names and numbers requests give: NotFound or Invalid with the text to show the user."""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from sqlmodel import Session, select

from models.db import session_scope, validate_name
from models.fabric import Host, NetworkMapping, Site, VirtualMachine, VmmCloud, VmmServer, get_vm
from models.policy import ReplicationPolicy
from models.protection import ProtectedItem

from .errors import Conflict, Invalid, NotFound


# ---- names and numbers -------------------------------------------------------------------------------------
def _name(value: Any, kind: str) -> str:
    """A name as every table takes it, and never anything a path could be built from ('..', '/', '\\')."""
    if isinstance(value, str) and (".." in value or "/" in value or "\\" in value):
        raise Invalid(f"invalid {kind} name {value!r}: names cannot contain '/', '\\' or '..'")
    try:
        return validate_name(value, kind)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _host_root(host: str, root: Any) -> str:
    """A host's root as registering it takes it: an absolute path, without '..' (its VMs' paths are built on it)."""
    if not isinstance(root, str) or not root.startswith("/") or "\x00" in root or ".." in PurePosixPath(root).parts:
        raise Invalid(f"root of host {host!r} must be an absolute path without '..', got {root!r}")
    return root


def _optional_name(value: Any, kind: str) -> str | None:
    return None if value is None else _name(value, kind)


def _int_option(name: str, value: Any) -> Any:
    # The CLI and query strings hand numbers over as text.
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


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


def _check_host(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    with session_scope() as session:
        return _host(session, name, what).name


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


def _one_scope(source_network: str, site: str | None, cloud: str | None) -> None:
    """A network mapping is named by its source network and the one site or VMM cloud it belongs to."""
    if (site is None) == (cloud is None):
        raise Invalid(f"the mapping of network {source_network!r} belongs to one site or one VMM cloud: give site "
                      f"or cloud")


def _mapping_in_scope(session: Session, source_network: str, site: str | None, cloud: str | None
                      ) -> tuple[NetworkMapping, str, Any]:
    """The mapping of `source_network` in the site or cloud (one of them given: `_one_scope`), the scope's name,
    and the clause selecting the hosts of that scope (whose VMs fail over by the mapping)."""
    site_row = _site(session, site) if site is not None else None
    cloud_row = _cloud(session, cloud) if cloud is not None else None
    scope = site or cloud
    in_scope = (NetworkMapping.site_id == site_row.id) if site_row else (NetworkMapping.cloud_id == cloud_row.id)
    mapping = session.exec(select(NetworkMapping).where(
        in_scope, NetworkMapping.source_network == source_network)).first()
    if mapping is None:
        raise NotFound(f"network {source_network!r} of {scope!r} is not mapped")
    hosts_in_scope = (Host.site_id == site_row.id) if site_row else (Host.cloud_id == cloud_row.id)
    return mapping, scope, hosts_in_scope
