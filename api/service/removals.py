"""Removing what an operator registered: a VM, a host, a site, a network mapping, a replication policy, a
recovery plan. Each is refused (Conflict naming what depends on it and the way forward, nothing changed) while
something depends on it: a VM while it is protected or named by a plan, a host while it has VMs or is the
recovery host of a protected VM, a site while it has hosts, a network mapping while a protected VM's failover
needs it, a policy while a VM's protection refers to it, a plan while it runs.

`confirm`, when given (the REST API always gives it, the CLI asks at the terminal instead), must be the name of
what is removed: ServiceError (400) otherwise, as disabling protection does. Removing only forgets the
registration: nothing is deleted on a host (a VM's folder and disks stay; `asr vm add` registers it again)."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlmodel import select

from models.db import session_scope
from models.fabric import Host, NetworkMapping, Site, VirtualDisk, VirtualMachine, VmNetworkAdapter, vm_disks
from models.failover import FailoverRecord
from models.plans import delete_plan, get_plan
from models.policy import ReplicationPolicy
from models.protection import ProtectedItem, RecoveryPoint, ReplicationState
from models.replicas import ReplicaRecord
from sites.host import Host as HostDriver

from .dependents import describe_job, item_job, plan_job, plans_naming, recovery_items
from .dependents import listed as _names
from .errors import Conflict, ServiceError, _operation
from .lookups import _host, _item_of, _mapping_in_scope, _name, _one_scope, _policy, _site, _vm

_DISABLED = ReplicationState.DISABLED


def _confirmed(confirm: str | None, name: str, what: str, consequence: str) -> None:
    if confirm is not None and confirm != name:
        got = f" (got {confirm[:80]!r})" if confirm else ""
        raise ServiceError(f"removing {what} {name!r} {consequence}: confirm by sending confirm={name}{got}")


@_operation
def remove_vm(vm: str, confirm: str | None = None) -> dict[str, Any]:
    """Forget a VM that is not protected (its disabled protection's history goes with it). Its folder and disks
    stay on its host, untouched; `asr vm add HOST NAME` registers it again."""
    with session_scope() as session:
        row = _vm(session, vm)
        host = session.get(Host, row.host_id)
        _confirmed(confirm, row.name, "VM", "forgets its registration (its disks stay on the host)")
        item = _item_of(session, row)
        if item is not None and item.replication_state != _DISABLED:
            raise Conflict(f"VM {row.name!r} on {host.name!r} is protected ({item.replication_state}): disable its "
                           f"protection first (`asr unprotect {host.name}/{row.name}`)")
        if item is not None:
            job = item_job(session, item.id)
            if job is not None:
                raise Conflict(f"VM {row.name!r} on {host.name!r} is busy with {describe_job(job)}: wait for it "
                               f"to end")
        plans = plans_naming(session, row.id)
        if plans:
            raise Conflict(f"VM {row.name!r} on {host.name!r} is in recovery plan(s) {_names(plans)}: take it out "
                           f"(`asr plan update PLAN --file ...`) or remove the plan first")
        folder = HostDriver(host.root, host.name).vms_dir / row.name
        kept = [str(folder / disk.file_name) for disk in vm_disks(session, row)]
        answer = {"id": row.id, "name": row.name, "host": host.name, "removed": True, "folder": str(folder),
                  "disks_kept": kept}
        if item is not None:
            for table in (ReplicaRecord, RecoveryPoint, FailoverRecord):
                session.exec(sa.delete(table).where(table.item_id == item.id))
            session.exec(sa.delete(ProtectedItem).where(ProtectedItem.id == item.id))
        for table in (VirtualDisk, VmNetworkAdapter):
            session.exec(sa.delete(table).where(table.vm_id == row.id))
        session.delete(row)
        return answer


@_operation
def remove_host(name: str, confirm: str | None = None) -> dict[str, Any]:
    """Forget a host without registered VMs that is no protected VM's recovery host. Nothing on the host is
    touched; its agent, if running, should be stopped (its key no longer admits it)."""
    with session_scope() as session:
        row = _host(session, name)
        _confirmed(confirm, row.name, "host", "forgets it and its registration key")
        vms = sorted(session.exec(select(VirtualMachine.name).where(VirtualMachine.host_id == row.id)).all())
        if vms:
            raise Conflict(f"host {row.name!r} has {len(vms)} registered VM(s): {_names(vms)}; remove them first "
                           f"(`asr vm remove {row.name}/VM`)")
        recovering = recovery_items(session, row)
        protected = [vm for vm, item in recovering if item.replication_state != _DISABLED]
        if protected:
            raise Conflict(f"host {row.name!r} is the recovery host of protected VM(s) {_names(protected)}: "
                           f"disable their protection first")
        # A disabled protection only remembers which host its failovers would have used: forget it too.
        for _vm_name, item in recovering:
            item.recovery_host_id = None
            session.add(item)
        session.flush()
        site = session.get(Site, row.site_id) if row.site_id else None
        answer = {"id": row.id, "name": row.name, "site": site.name if site else None, "root": row.root,
                  "removed": True}
        session.delete(row)
        return answer


@_operation
def remove_site(name: str, confirm: str | None = None) -> dict[str, Any]:
    """Forget a site without hosts, and its network mappings with it."""
    with session_scope() as session:
        row = _site(session, name)
        _confirmed(confirm, row.name, "site", "forgets it and its network mappings")
        hosts = sorted(session.exec(select(Host.name).where(Host.site_id == row.id)).all())
        if hosts:
            raise Conflict(f"site {row.name!r} has {len(hosts)} host(s): {_names(hosts)}; remove them first "
                           f"(`asr host remove HOST`)")
        mappings = session.exec(select(NetworkMapping).where(NetworkMapping.site_id == row.id)
                                .order_by(NetworkMapping.source_network)).all()
        answer = {"id": row.id, "name": row.name, "removed": True,
                  "network_mappings_removed": [mapping.source_network for mapping in mappings]}
        for mapping in mappings:
            session.delete(mapping)
        session.flush()
        session.delete(row)
        return answer


@_operation
def remove_network_mapping(source_network: str, *, site: str | None = None, cloud: str | None = None,
                           confirm: str | None = None) -> dict[str, Any]:
    """Forget the mapping of a VM network of a site (or cloud), unless a protected VM of that site has an adapter
    on it (its failover would have no recovery network)."""
    _name(source_network, "source network")
    _one_scope(source_network, site, cloud)
    with session_scope() as session:
        mapping, scope, hosts_in_scope = _mapping_in_scope(session, source_network, site, cloud)
        _confirmed(confirm, source_network, "the mapping of network", f"of {scope!r} forgets where it fails over to")
        users = session.exec(select(VirtualMachine.name, Host.name)
                             .join(Host, Host.id == VirtualMachine.host_id)
                             .join(ProtectedItem, ProtectedItem.vm_id == VirtualMachine.id)
                             .join(VmNetworkAdapter, VmNetworkAdapter.vm_id == VirtualMachine.id)
                             .where(hosts_in_scope, VmNetworkAdapter.vm_network == source_network,
                                    ProtectedItem.replication_state != _DISABLED)).all()
        if users:
            names = sorted({f"{host_name}/{vm_name}" for vm_name, host_name in users})
            raise Conflict(f"network {source_network!r} of {scope!r} is used by protected VM(s) {_names(names)}: "
                           f"their failovers put their adapters in {mapping.recovery_network!r}; disable their "
                           f"protection first")
        answer = {"id": mapping.id, "source_network": source_network, "site": site, "cloud": cloud,
                  "recovery_network": mapping.recovery_network, "recovery_subnet": mapping.recovery_subnet,
                  "removed": True}
        session.delete(mapping)
        return answer


@_operation
def remove_policy(name: str, confirm: str | None = None) -> dict[str, Any]:
    """Forget a replication policy no VM's protection refers to."""
    with session_scope() as session:
        row = _policy(session, name)
        _confirmed(confirm, row.name, "replication policy", "forgets its settings")
        users = session.exec(select(VirtualMachine.name, Host.name, ProtectedItem.replication_state)
                             .join(ProtectedItem, ProtectedItem.vm_id == VirtualMachine.id)
                             .join(Host, Host.id == VirtualMachine.host_id)
                             .where(ProtectedItem.policy_id == row.id)).all()
        protected = sorted(f"{host}/{vm}" for vm, host, state in users if state != _DISABLED)
        if protected:
            raise Conflict(f"replication policy {row.name!r} is in use by protected VM(s) {_names(protected)}: "
                           f"disable their protection first")
        disabled = sorted(f"{host}/{vm}" for vm, host, state in users if state == _DISABLED)
        if disabled:
            raise Conflict(f"replication policy {row.name!r} is still named by the disabled protection of VM(s) "
                           f"{_names(disabled)}: remove those VMs (`asr vm remove VM`) or protect them again with "
                           f"another policy first")
        answer = {"id": row.id, "name": row.name, "removed": True}
        session.exec(sa.delete(ReplicationPolicy).where(ReplicationPolicy.id == row.id))
        return answer


@_operation
def remove_plan(name: str, confirm: str | None = None) -> dict[str, Any]:
    """Forget a recovery plan that is not running (its past jobs stay in the job history). Its VMs and their
    protection are untouched."""
    with session_scope() as session:
        plan = get_plan(session, _name(name, "recovery plan"))
        _confirmed(confirm, plan.name, "recovery plan", "forgets its groups and actions")
        job = plan_job(session, plan.id)
        if job is not None:
            raise Conflict(f"recovery plan {plan.name!r} is running: {describe_job(job)}; wait for it to end or "
                           f"cancel it (`asr jobs cancel {job.id}`) first")
        answer = {"id": plan.id, "name": plan.name, "removed": True}
        delete_plan(session, plan.id)
        return answer
