"""Changing what an operator registered: a host's registration key, root, site or cloud; a site's description;
a VM's networks and guest definition; a network mapping's recovery network and subnet; a replication policy's
settings; a recovery plan's groups. Each change is validated as the thing's creation is (the same checks, the
same messages), is refused (Conflict naming what depends on it and the way forward) while something depends on
what it changes, and a refused change changes nothing. Names are identities: nothing is renamed."""
from __future__ import annotations

from typing import Any

from sqlmodel import select

from datapath.errors import NonRecoverableError
from models.db import session_scope
from models.fabric import (
    Host,
    Site,
    VirtualMachine,
    VmNetworkAdapter,
    change_network_mapping,
    import_vm_manifest,
    move_host,
)
from models.fabric import rekey_host as _rekey_host
from models.plans import get_plan
from models.plans import update_plan as _update_plan
from models.policy import update_policy as _update_policy
from models.protection import ProtectedItem
from models.protection import ReplicationState as S
from sites.host import STATE_OFF
from sites.host import Host as HostDriver
from workflows.failover_request import recovery_network_for

from .dependents import describe_job, item_job, listed, plan_job, protected_on, recovery_items
from .errors import Conflict, Invalid, _operation
from .fabric import show_vm
from .lookups import _cloud, _host, _host_root, _item_of, _mapping_in_scope, _name, _one_scope, _policy, _site, _vm
from .policies import _policy_options
from .presenters import _host_dict, _mapping_dict, _plan_dict, _policy_dict, _site_dict

APPLIES_FROM = "the next cycle of each VM the policy protects (a delta cycle already scheduled keeps its time)"
AWAY = frozenset({S.FAILING_OVER, S.FAILED_OVER, S.FAILOVER_COMMITTED, S.FAILING_BACK, S.FAILBACK_READY})
"""The states in which a VM runs at the recovery site (or is on its way there or back), its adapters in the
recovery networks its site's mappings named when it failed over."""
FAILOVER_JOBS = frozenset({"planned_failover", "unplanned_failover", "plan_planned_failover",
                           "plan_unplanned_failover"})
MAX_CHANGES = 16


@_operation
def rekey_host(name: str) -> dict[str, Any]:
    """A new registration key for the host: in the answer this once (only its hash is kept). The old key no
    longer admits an agent; an agent already running goes on until it is restarted, with the new key."""
    with session_scope() as session:
        row = _host(session, name)
        key = _rekey_host(session, row)
        return {**_host_dict(session, row), "registration_key": key}


@_operation
def update_site(name: str, *, description: str | None = None) -> dict[str, Any]:
    """Change a site's description (text of at most 1024 characters, as when it was added)."""
    if description is None:
        raise Invalid(f"nothing to change for site {name!r}: give a description")
    if not isinstance(description, str) or len(description) > 1024:
        raise Invalid("a site's description is text of at most 1024 characters")
    with session_scope() as session:
        row = _site(session, name)
        row.description = description
        session.add(row)
        session.flush()
        return _site_dict(session, row, detail=True)


@_operation
def update_host(name: str, *, root: str | None = None, site: str | None = None,
                cloud: str | None = None) -> dict[str, Any]:
    """Give a host another root (the tree its VMs live in, checked as when it was registered), or put it in
    another site or VMM cloud. A new root is refused while the host has protected VMs or is a protected VM's
    recovery host (their replicas, trackers and recovery VMs are under the old one), and unless every VM
    registered on the host is at the new root with its id (a tree that moved). Another site or cloud is refused
    while the host has protected VMs: their failovers use the network mappings of the host's site or cloud."""
    if root is None and site is None and cloud is None:
        raise Invalid(f"nothing to change for host {name!r}: give a root, a site or a cloud")
    if site is not None and cloud is not None:
        raise Invalid(f"host {name!r} must belong to exactly one site or one VMM cloud: give site or cloud")
    if root is not None:
        _host_root(name, root)
    with session_scope() as session:
        row = _host(session, name)
        site_row = _site(session, site) if site is not None else None
        cloud_row = _cloud(session, cloud) if cloud is not None else None
        moves = (site_row is not None and row.site_id != site_row.id) or (
            cloud_row is not None and row.cloud_id != cloud_row.id)
        protected = protected_on(session, row)
        if moves and protected:
            where = "its site" if row.site_id else "its VMM cloud"
            raise Conflict(f"host {row.name!r} has protected VM(s) {listed(protected)}: their failovers use the "
                           f"network mappings of {where}; disable their protection first")
        if root is not None and root != row.root:
            _check_new_root(session, row, root, protected)
        move_host(session, row, root=root, site=site_row, cloud=cloud_row)
        return _host_dict(session, row, detail=True)


def _check_new_root(session, row: Host, root: str, protected: list[str]) -> None:
    if protected:
        raise Conflict(f"host {row.name!r} has protected VM(s) {listed(protected)}: their replication tracks "
                       f"their disks under {row.root}; disable their protection first")
    recovering = [vm for vm, item in recovery_items(session, row) if item.replication_state != S.DISABLED]
    if recovering:
        raise Conflict(f"host {row.name!r} is the recovery host of protected VM(s) {listed(recovering)}: their "
                       f"recovery VMs are made under {row.root}; disable their protection first")
    moved = HostDriver(root, row.name)
    missing = []
    for vm in session.exec(select(VirtualMachine).where(VirtualMachine.host_id == row.id)
                           .order_by(VirtualMachine.name)):
        try:
            found = moved.get_vm(vm.name).id == vm.vm_uuid
        except (NonRecoverableError, OSError):  # not there, unreadable, or a path out of the new root
            found = False
        if not found:
            missing.append(vm.name)
    if missing:
        raise Conflict(f"host {row.name!r} has VM(s) {listed(missing)} registered that are not under {root} (no "
                       f"vms/VM/vm.json there with their id): move them there first, or remove them "
                       f"(`asr vm remove {row.name}/VM`)")


@_operation
def update_vm(vm: str, *, networks: dict[str, str] | None = None,
              guest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Change a VM's definition on its host (its manifest, which `asr vm add` reads) and its registration with
    it: the VM network of some of its adapters (`networks`: adapter name -> network) and some fields of a QEMU
    guest's definition (`guest`: memory_mb, boot_timeout_s, heartbeat, check_pass, check_fail, cmdline,
    guest_agent), each checked as a new VM's. Refused while a job works on the VM, while it is failed over,
    when a protected VM's new network has no mapping in its host's site or cloud (its failover would have
    nowhere to put the adapter), and a guest's definition while the guest runs (it booted with the old one)."""
    for value, what in ((networks, "networks (adapter name -> network)"), (guest, "guest (field -> value)")):
        if value is not None and (not isinstance(value, dict) or len(value) > MAX_CHANGES):
            raise Invalid(f"{what} is an object of at most {MAX_CHANGES} entries, got {str(value)[:100]}")
    if not networks and not guest:
        raise Invalid(f"nothing to change for VM {vm!r}: give networks or guest settings")
    with session_scope() as session:
        row = _vm(session, vm)
        host = session.get(Host, row.host_id)
        label = f"{host.name}/{row.name}"
        driver = HostDriver(host.root, host.name)
        before = driver.get_vm(row.name)
        driver.redefined(before, networks=networks, guest=guest)  # bad input: refused before anything else
        item = _item_of(session, row)
        if item is not None:
            _check_vm_protection(session, item, host, label, networks or {})
        if guest:
            power = driver.power_state(row.name)
            if power != STATE_OFF:
                raise Conflict(f"VM {label} is {power}: its guest runs with the definition it booted with; stop "
                               f"it first (`asr vm stop {label}`)")
        after = driver.redefine_vm(row.name, networks=networks, guest=guest)
        try:
            import_vm_manifest(session, host, after.to_manifest())
            session.commit()
        except BaseException:
            # The registration refused it: the manifest goes back to what it said, so nothing changed.
            driver.redefine_vm(row.name, networks={a.name: a.vm_network for a in before.network_adapters},
                               guest={field: getattr(before.guest, field) for field in guest} if guest else None)
            raise
    return show_vm(row.id)


def _check_vm_protection(session, item: ProtectedItem, host: Host, label: str, networks: dict[str, str]) -> None:
    job = item_job(session, item.id)
    if job is not None:
        raise Conflict(f"VM {label} is busy with {describe_job(job)}: wait for it to end")
    if item.replication_state in AWAY:
        raise Conflict(f"VM {label} is {item.replication_state}: it runs at the recovery site; its definition "
                       f"can change once it is back on its primary (failed back, or the failover cancelled)")
    if item.replication_state == S.DISABLED:
        return
    unmapped = sorted({network for network in networks.values()
                       if recovery_network_for(session, host, network) is None})
    if unmapped:
        if host.site_id:
            site_name = session.get(Site, host.site_id).name
            scope, option = f"site {site_name!r}", f"--site {site_name}"
        else:
            scope, option = "its host's VMM cloud", "--cloud CLOUD"
        raise Conflict(f"VM {label} is protected: its failover would find no network mapping for network(s) "
                       f"{', '.join(unmapped)} in {scope}; add one first (`asr network add {unmapped[0]} "
                       f"RECOVERY-NETWORK SUBNET {option}`)")


@_operation
def update_network_mapping(source_network: str, *, site: str | None = None, cloud: str | None = None,
                           recovery_network: str | None = None, recovery_subnet: str | None = None) -> dict[str, Any]:
    """Point the mapping of a VM network of a site (or cloud) at another recovery network or subnet, checked as
    a new mapping's. Failovers from then on use it (one already requested keeps the placement it was given);
    refused while a VM with an adapter on that network is failing over or failed over, its recovery VM in the
    network the mapping names now."""
    _name(source_network, "source network")
    _one_scope(source_network, site, cloud)
    if recovery_network is None and recovery_subnet is None:
        raise Invalid(f"nothing to change for the mapping of network {source_network!r}: give a recovery network "
                      f"or a recovery subnet")
    if recovery_network is not None:
        _name(recovery_network, "recovery network")
    with session_scope() as session:
        mapping, scope, hosts_in_scope = _mapping_in_scope(session, source_network, site, cloud)
        users = session.exec(select(VirtualMachine.name, Host.name, ProtectedItem)
                             .join(Host, Host.id == VirtualMachine.host_id)
                             .join(ProtectedItem, ProtectedItem.vm_id == VirtualMachine.id)
                             .join(VmNetworkAdapter, VmNetworkAdapter.vm_id == VirtualMachine.id)
                             .where(hosts_in_scope, VmNetworkAdapter.vm_network == source_network)).all()
        away = set()
        for vm_name, host_name, item in users:
            job = item_job(session, item.id)
            if item.replication_state in AWAY or (job is not None and job.kind in FAILOVER_JOBS):
                away.add(f"{host_name}/{vm_name}")
        if away:
            raise Conflict(f"network {source_network!r} of {scope!r} is in use: VM(s) {listed(sorted(away))} "
                           f"failed over (or are failing over) into {mapping.recovery_network!r} "
                           f"({mapping.recovery_subnet}) by this mapping; change it once they are failed back")
        change_network_mapping(session, mapping, recovery_network=recovery_network, recovery_subnet=recovery_subnet)
        return _mapping_dict(session, mapping)


@_operation
def update_policy(name: str, **options: Any) -> dict[str, Any]:
    """Change some settings of a replication policy (the options of `add_policy`; those left out keep their
    values). The policy as it would be is validated as a new one is; the new values apply from the next cycle
    of each VM it protects (`applies_from` in the answer)."""
    with session_scope() as session:
        row = _policy(session, name)
        settings = _policy_options(row.name, options)
        if not settings:
            raise Invalid(f"nothing to change for replication policy {row.name!r}: give at least one setting")
        _update_policy(session, row, **settings)
        return {**_policy_dict(session, row, detail=True), "applies_from": APPLIES_FROM}


@_operation
def update_plan(name: str, groups: list[dict], description: str | None = None) -> dict[str, Any]:
    """Replace a recovery plan's groups (and its description, unless None), validated as a new plan's are
    (every problem at once); refused while the plan runs."""
    with session_scope() as session:
        plan = get_plan(session, _name(name, "recovery plan"))
        job = plan_job(session, plan.id)
        if job is not None:
            raise Conflict(f"recovery plan {plan.name!r} is running: {describe_job(job)}; it can be changed once "
                           f"the run ends (or is cancelled: `asr jobs cancel {job.id}`)")
        return _plan_dict(session, _update_plan(session, plan.id, groups, description))
