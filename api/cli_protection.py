"""The protection verbs of `asr`: protect a VM (replicate its disks under a policy), unprotect, resync,
its recovery points, verify a replica against a point, and the replication health of every protected VM.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from api.cli import main
from api.cli_output import _count, _emit_json, _seconds, format_duration, json_option, print_table
from api.cli_parsing import _key_values
from api.cli_progress import _job_command
from api.cli_service import _OpCommand, _service


@_job_command(main, "protect")
@click.argument("vm_name", metavar="VM")
@click.option("--policy", "policy_name", required=True, help="The replication policy.")
@click.option("--recovery-storage", required=True, metavar="URL",
              help="Where the replicas go: file:///DIR or azure:CONTAINER.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="A storage setting, repeatable, e.g. connection_string_env=AZ_CONN (the NAME of the "
                   "workers' variable holding the secret, never the secret).")
@click.option("--recovery-host", default=None, help="The recovery-site host failovers use by default.")
def protect(vm_name: str, policy_name: str, recovery_storage: str, storage_options: tuple[str, ...],
            recovery_host: str | None):
    """Enable protection of VM: replicate its disks to the recovery storage under POLICY."""
    options = _key_values("--storage-option", storage_options, typed=True)
    return _service().protect(vm_name, policy=policy_name, recovery_storage=recovery_storage,
                              storage_options=options or None, recovery_host=recovery_host)


@_job_command(main, "unprotect")
@click.argument("vm_name", metavar="VM")
@click.option("--yes", is_flag=True, help="Do not ask: the replicas and recovery points are deleted.")
def unprotect(vm_name: str, yes: bool):
    """Disable protection of VM: stop tracking, delete its replicas, logs and recovery points (asks first,
    unless --yes)."""
    if not yes:
        click.confirm(f"Disable protection of {vm_name}? Its replicas, shipped logs and recovery points are "
                      f"deleted", abort=True)
    return _service().disable_protection(vm_name)


@_job_command(main, "resync")
@click.argument("vm_name", metavar="VM")
def resync(vm_name: str):
    """Resynchronize VM now: compare the disks with their replicas and send only what differs."""
    return _service().resync(vm_name)


@_job_command(main, "check")
@click.argument("vm_name", metavar="VM")
def check(vm_name: str):
    """Check VM's replicas against its disks at the same generation, byte for byte through checksums;
    report drifted chunks (VM turns Warning) and resynchronize only those (a job)."""
    return _service().consistency_check(vm_name)


@main.command("points", cls=_OpCommand)
@click.argument("vm_name", metavar="VM")
@json_option
def points(vm_name: str, as_json: bool):
    """VM's recovery points, oldest first: the ids --point takes."""
    result = _service().recovery_points(vm_name)
    if as_json:
        return _emit_json(result)
    print_table(result, [("id", "id"), ("created", "created_at"), ("kind", "kind"),
                         ("disks", lambda p: _count(p.get("versions")))],
                empty=f"VM {vm_name} has no recovery points yet")


@_job_command(main, "verify")
@click.argument("vm_name", metavar="VM")
@click.option("--point", default=None, help="A recovery point id (default: the latest).")
def verify(vm_name: str, point: str | None):
    """Check VM's replica at a recovery point against the checksums the point recorded (a job)."""
    return _service().verify(vm_name, point=point)


def _rpo_thresholds(row: Mapping[str, Any]) -> str:
    return f"{format_duration(row.get('rpo_warning_s'))} / {format_duration(row.get('rpo_critical_s'))}"


@main.command("health", cls=_OpCommand)
@json_option
def health(as_json: bool):
    """Replication health of every protected VM: state, health and errors, RPO (now minus the latest recovery
    point's time) and the warning/critical thresholds it is held to, when replication last succeeded."""
    result = _service().health()
    if as_json:
        return _emit_json(result)
    print_table(result, [("vm", "vm"), ("host", "host"), ("state", "state"), ("health", "health"),
                         ("rpo", lambda r: _seconds(r, "rpo_s")), ("rpo warn/crit", _rpo_thresholds),
                         ("last replicated", "last_replicated_at"), ("errors", "errors")],
                empty="no protected VMs")
