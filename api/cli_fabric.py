"""The fabric verbs of `asr`: sites, their hosts, the hosts' VMs, and network mappings (which recovery
network a VM network lands in on failover).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from api.cli import _fail, main
from api.cli_output import (
    Column,
    _count,
    _emit_json,
    _seconds,
    _section,
    format_size,
    json_option,
    pick,
    print_fields,
    print_table,
)
from api.cli_service import _command, _OpGroup, _service
from datapath.private import write_new_private_file


@main.group(cls=_OpGroup)
def site():
    """Sites: the primary (Hyper-V) site and the recovery site hold the hosts."""


@_command(site, "add")
@click.argument("name")
@click.option("--description", default="", help="Free text shown with the site.")
@json_option
def site_add(name: str, description: str, as_json: bool):
    """Register a site called NAME."""
    result = _service().add_site(name, description)
    if as_json:
        return _emit_json(result)
    click.echo(f"site {result.get('name', name)} added (id {result.get('id')})")


SITE_COLUMNS: list[Column] = [("name", "name"), ("hosts", lambda s: _count(s.get("hosts"))),
                              ("description", "description"), ("id", "id")]


@_command(site, "list")
@json_option
def site_list(as_json: bool):
    """Every site."""
    sites = _service().list_sites()
    if as_json:
        return _emit_json(sites)
    print_table(sites, SITE_COLUMNS, empty="no sites: add one with `asr site add NAME`")


@_command(site, "show")
@click.argument("name")
@json_option
def site_show(name: str, as_json: bool):
    """A site and its hosts."""
    result = _service().show_site(name)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("id", "id"), ("description", "description"),
                          ("created", "created_at"), ("hosts", "hosts")])
    mappings = result.get("network_mappings") or []
    if mappings:
        _section("network mappings")
        print_table(mappings, NETWORK_COLUMNS, empty="(none)")


@main.group(cls=_OpGroup)
def host():
    """Hosts: the Hyper-V hosts of a site (each served by its own agent worker, queue host.NAME)."""


def key_file_option(command):
    return click.option(
        "--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="Write the registration key to this new file (mode 0600) instead of printing it; start the agent "
             "with `asr worker host NAME --key-file FILE`.")(command)


def check_new_key_file(path: Path | None) -> None:
    """Refuse a --key-file that exists or whose folder does not, before a key is issued (it is shown once)."""
    if path is None:
        return
    if path.exists() or path.is_symlink():
        _fail(f"{path} exists: a key file is never written over (choose a new file, or remove that one)")
    if not path.parent.is_dir():
        _fail(f"{path.parent} is not a folder: cannot write the key file {path}")


def save_key(path: Path | None, key: str | None, host_name: str) -> bool:
    """Write host `host_name`'s new key to `path`; True if written. If that fails the key is printed instead
    (it cannot be shown again)."""
    if path is None or key is None:
        return False
    try:
        write_new_private_file(path, key + "\n")
    except OSError as exc:
        click.echo(f"asr: cannot write the key file {path}: {exc.strerror or exc}; the key is printed instead",
                   err=True)
        return False
    click.echo(f"registration key of host {host_name} written to {path} (mode 0600); start its agent with "
               f"`asr worker host {host_name} --key-file {path}`", err=True)
    return True


@_command(host, "add")
@click.argument("name")
@click.argument("root")
@click.option("--site", "site_name", default=None, help="The site the host belongs to.")
@click.option("--cloud", default=None, help="The VMM cloud the host belongs to (instead of --site).")
@key_file_option
@json_option
def host_add(name: str, root: str, site_name: str | None, cloud: str | None, key_file: Path | None, as_json: bool):
    """Register host NAME whose VMs live under the directory ROOT; its registration key is printed once (or
    written to --key-file)."""
    if (site_name is None) == (cloud is None):
        raise click.UsageError("give exactly one of --site and --cloud")
    check_new_key_file(key_file)
    result = _service().add_host(name, root, site=site_name, cloud=cloud)
    key = result.get("registration_key")
    saved = save_key(key_file, key, result.get("name", name))
    if saved:
        result = {**result, "registration_key": None, "key_file": str(key_file)}
    if as_json:
        return _emit_json(result)
    click.echo(f"host {result.get('name', name)} registered in {site_name or cloud} "
               f"(queue {result.get('queue') or 'host.' + name}, id {result.get('id')})")
    if not saved:
        click.echo(f"registration key: {key}")
        click.echo("(shown this once: only its hash is kept; the host's agent presents it)")



HOST_COLUMNS: list[Column] = [("name", "name"), ("site", "site|cloud"), ("root", "root"),
                              ("vms", "vm_count"), ("last seen", "last_seen_at"), ("id", "id")]


@_command(host, "list")
@json_option
def host_list(as_json: bool):
    """Every host, with its site and root directory."""
    hosts = _service().list_hosts()
    if as_json:
        return _emit_json(hosts)
    print_table(hosts, HOST_COLUMNS, empty="no hosts: add one with `asr host add NAME ROOT --site SITE`")


@_command(host, "show")
@click.argument("name")
@json_option
def host_show(name: str, as_json: bool):
    """A host and its VMs."""
    result = _service().show_host(name)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("id", "id"), ("site", "site"), ("cloud", "cloud"), ("root", "root"),
                          ("queue", "queue"), ("registered", "registered_at"), ("last seen", "last_seen_at"),
                          ("VMs", "vms")])


@main.group(cls=_OpGroup)
def vm():
    """Virtual machines: registered as their host describes them."""


@_command(vm, "add")
@click.argument("host_name", metavar="HOST")
@click.argument("name")
@json_option
def vm_add(host_name: str, name: str, as_json: bool):
    """Register VM NAME of HOST (its disks and network adapters as the host describes them)."""
    result = _service().add_vm(host_name, name)
    if as_json:
        return _emit_json(result)
    disks = result.get("disks") or []
    click.echo(f"VM {result.get('name', name)} registered on {host_name}: {len(disks)} disk"
               f"{'s' if len(disks) != 1 else ''} (id {result.get('id')})")


def _vm_state(row: Mapping[str, Any]) -> Any:
    return pick(row, "protection_state", "protection.state", "state") or "not protected"


VM_COLUMNS: list[Column] = [("name", "name"), ("host", "host"), ("power", "power_state"),
                            ("protection", _vm_state), ("health", "health|protection.health"),
                            ("disks", lambda v: _count(v.get("disks"))), ("id", "id")]


@_command(vm, "list")
@json_option
def vm_list(as_json: bool):
    """Every registered VM and its protection state."""
    vms = _service().list_vms()
    if as_json:
        return _emit_json(vms)
    print_table(vms, VM_COLUMNS, empty="no VMs: register one with `asr vm add HOST NAME`")


def _recovery_copy(disk: Mapping[str, Any]) -> Any:
    if disk.get("recovery_path"):
        return disk["recovery_path"]
    return f"{disk['test_path']} (test)" if disk.get("test_path") else None


DISK_COLUMNS: list[Column] = [("disk", "name"), ("size", lambda d: format_size(d.get("size"))),
                              ("format", "format"), ("primary", "primary_path"), ("replica", "replica"),
                              ("at recovery host", _recovery_copy)]


def _active_job(row: Mapping[str, Any]) -> Any:
    job = row.get("active_job")
    if isinstance(job, Mapping):
        return f"{job.get('kind')} {job.get('state')} ({job.get('id')})"
    return job


# What `vm show` prints of its protection and its latest failover.
HEALTH_FIELDS: list[Column] = [
    ("state", "state"), ("health", "health"), ("errors", "errors"), ("RPO", lambda r: _seconds(r, "rpo_s")),
    ("RPO warning", lambda r: _seconds(r, "rpo_warning_s")), ("RPO critical", lambda r: _seconds(r, "rpo_critical_s")),
    ("last replicated", "last_replicated_at"), ("last point", "last_recovery_point_at"),
    ("recovery points", "recovery_points"), ("next delta", "next_delta_at"),
    ("next consistency check", "next_consistency_check_at"),
    ("resync reason", "resync_required_reason"), ("resync at", "resync_scheduled_for"),
    ("active job", _active_job),
]
FAILOVER_FIELDS: list[Column] = [
    ("kind", "kind"), ("status", "status"), ("point", "point_id|point_choice"), ("point time", "point_created_at"),
    ("point kind", "point_kind"), ("verified", "verified"), ("target host", "target_host"),
    ("target VM", "target_vm"), ("network", "network"),
    ("started", "started_at"), ("VM up", "vm_up_at"), ("ended", "ended_at"), ("RTO", lambda r: _seconds(r, "rto_s")),
    ("RPO", lambda r: _seconds(r, "rpo_s")), ("job", "job_id"), ("error", "error"),
]


@_command(vm, "show")
@click.argument("vm_name", metavar="VM")
@json_option
def vm_show(vm_name: str, as_json: bool):
    """A VM: its disks (where they are at the primary, the replica's name on the recovery storage, and the
    disk at the recovery host after a failover), adapters, protection and latest failover."""
    result = _service().show_vm(vm_name)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("id", "id"), ("host", "host"), ("power", "power_state"),
                          ("generation", "generation"), ("recovery storage", "recovery_storage")])
    _section("disks")
    print_table(result.get("disks") or [], DISK_COLUMNS, empty="(none)")
    adapters = result.get("adapters") or []
    if adapters:
        _section("network adapters")
        print_table(adapters, [("adapter", "name"), ("network", "vm_network"), ("public ip", "public_ip")],
                    empty="(none)")
    protection = result.get("protection")
    _section("protection")
    if protection:
        print_fields(protection, HEALTH_FIELDS)
    else:
        click.echo("not protected: asr protect VM --policy P --recovery-storage URL")
    failover = result.get("failover")
    if failover:
        _section("latest failover")
        print_fields(failover, FAILOVER_FIELDS)


@main.group(cls=_OpGroup)
def network():
    """Network mappings: which recovery network a VM network lands in on failover."""


@_command(network, "add")
@click.argument("source_network")
@click.argument("recovery_network")
@click.argument("recovery_subnet")
@click.option("--site", "site_name", default=None, help="The site whose VM network this maps.")
@click.option("--cloud", default=None, help="The VMM cloud whose VM network this maps (instead of --site).")
@json_option
def network_add(source_network: str, recovery_network: str, recovery_subnet: str, site_name: str | None,
                cloud: str | None, as_json: bool):
    """Map SOURCE_NETWORK to RECOVERY_NETWORK, whose addresses come from RECOVERY_SUBNET (CIDR)."""
    if (site_name is None) == (cloud is None):
        raise click.UsageError("give exactly one of --site and --cloud")
    result = _service().add_network_mapping(source_network, recovery_network, recovery_subnet,
                                            site=site_name, cloud=cloud)
    if as_json:
        return _emit_json(result)
    click.echo(f"network {source_network} ({site_name or cloud}) -> {recovery_network} {recovery_subnet}")


NETWORK_COLUMNS: list[Column] = [("source network", "source_network"), ("site", "site|cloud"),
                                 ("recovery network", "recovery_network"), ("subnet", "recovery_subnet"),
                                 ("id", "id")]


@_command(network, "list")
@json_option
def network_list(as_json: bool):
    """Every network mapping."""
    mappings = _service().list_network_mappings()
    if as_json:
        return _emit_json(mappings)
    print_table(mappings, NETWORK_COLUMNS,
                empty="no network mappings: add one with `asr network add SOURCE RECOVERY SUBNET --site S`")


@_command(network, "show")
@click.argument("source_network")
@json_option
def network_show(source_network: str, as_json: bool):
    """The mappings of the VM network SOURCE_NETWORK (one per site or cloud that has it)."""
    service = _service()
    mappings = [m for m in service.list_network_mappings() if m.get("source_network") == source_network]
    if not mappings:
        raise service.NotFound(f"no network mapping for VM network {source_network!r}")
    if as_json:
        return _emit_json(mappings)
    print_table(mappings, NETWORK_COLUMNS, empty="(none)")
