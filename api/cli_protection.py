"""The protection verbs of `asr`: protect a VM (replicate its disks under a policy), unprotect, resync,
its recovery points (and deleting the old ones), verify a replica against a point, and the replication health
of every protected VM.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from api.cli import main
from api.cli_output import _count, _emit_json, _seconds, format_duration, json_option, print_table
from api.cli_parsing import _key_values, _moment
from api.cli_progress import _job_command
from api.cli_service import _OpCommand, _service


@_job_command(main, "protect")
@click.argument("vm_name", metavar="VM")
@click.option("--policy", "policy_name", required=True, help="The replication policy.")
@click.option("--recovery-storage", required=True, metavar="URL",
              help="Where the replicas go: file:///DIR or azure:CONTAINER.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="A storage setting, repeatable, e.g. connection_string_env=ASR_AZURE_CONNECTION_STRING "
                   "(the NAME of the workers' variable holding the secret, never the secret; "
                   "ASR_AZURE_*_CONNECTION_STRING or ASR_STORAGE_*_CONNECTION_STRING).")
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
    unless --yes). Refused while any of its points is inside its retention lock."""
    if not yes:
        click.confirm(f"Disable protection of {vm_name}? Its replicas, shipped logs and recovery points are "
                      f"deleted", abort=True)
    return _service().disable_protection(vm_name)


def _previewed(job_id: str) -> None:
    from datapath.disk import format_size

    job = _service().show_job(job_id)
    if job["kind"] != "resync_preview":
        return
    for step in job["steps"]:
        result = step.get("result") or {}
        if not result.get("available"):
            click.echo(f"  {result.get('disk')}: no estimate: {result.get('reason')}")
            continue
        click.echo(f"  {result['disk']}: {result['chunks_differing']} of {result['chunks_compared']} chunks of "
                   f"{format_size(result['chunk_size'])} differ from replica version {result['version']}: at most "
                   f"{format_size(result['bytes_differing'])} to send")


@_job_command(main, "resync", summary=_previewed)
@click.argument("vm_name", metavar="VM")
@click.option("--preview", is_flag=True, help="Only say what would be sent (chunks and bytes per disk, compared "
                                              "with the replica's last recorded version); send nothing. Use with "
                                              "--wait to read the figures.")
def resync(vm_name: str, preview: bool):
    """Resynchronize VM now: compare the disks with their replicas and send only what differs."""
    return _service().preview_resync(vm_name) if preview else _service().resync(vm_name)


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
    """VM's recovery points, oldest first: the ids --point takes, and until when each is retention-locked."""
    result = _service().recovery_points(vm_name)
    if as_json:
        return _emit_json(result)
    print_table(result, [("id", "id"), ("created", "created_at"), ("kind", "kind"),
                         ("locked until", "locked_until"), ("disks", lambda p: _count(p.get("versions")))],
                empty=f"VM {vm_name} has no recovery points yet")


def _deleted(job_id: str) -> None:
    job = _service().show_job(job_id)
    for step in job["steps"]:
        result = step.get("result") or {}
        if "deleted" in result:
            click.echo(f"  {result['deleted']} recovery point(s) deleted, {result.get('kept')} kept")
        elif result.get("disk"):
            click.echo(f"  {result['disk']}: {len(result.get('pruned_versions') or [])} replica version(s) "
                       f"pruned, versions from {result.get('keep_from')} kept")


@_job_command(main, "delete-points", summary=_deleted)
@click.argument("vm_name", metavar="VM")
@click.option("--before", required=True, metavar="TIME",
              help="Delete the points made before TIME: an ISO time (UTC unless it says otherwise) or a time back "
                   "from now (-2h, -30m). The latest point is always kept.")
@click.option("--yes", is_flag=True, help="Do not ask: deleted points cannot be restored.")
def delete_points(vm_name: str, before: str, yes: bool):
    """Delete VM's recovery points made before TIME, and the replica versions only they needed (asks first,
    unless --yes). All or none: refused, nothing deleted, when any of them is inside its retention lock."""
    moment = _moment(before, "--before")
    if not yes:
        click.confirm(f"Delete the recovery points of {vm_name} made before {moment.isoformat(timespec='seconds')}? "
                      f"They cannot be restored", abort=True)
    return _service().delete_recovery_points(vm_name, before=moment)


def _verified(job_id: str) -> None:
    # What was checked, so that the operator can hold it against the point's record (`asr points VM`).
    job = _service().show_job(job_id)
    points = {step["params"].get("point_id") for step in job["steps"]}
    click.echo(f"recovery point {', '.join(sorted(filter(None, points))) or '?'}: every disk matches the manifest "
               f"root the point recorded")
    for step in job["steps"]:
        result = step.get("result") or {}
        click.echo(f"  {result.get('disk')}: replica version {result.get('version')}, manifest root "
                   f"{result.get('root')}")


@_job_command(main, "verify", summary=_verified)
@click.argument("vm_name", metavar="VM")
@click.option("--point", default=None, help="A recovery point id (default: the latest).")
def verify(vm_name: str, point: str | None):
    """Check VM's replica at a recovery point against the checksums the point recorded (a job); with --wait,
    the point and each disk's version and manifest root it checked."""
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
