"""The failover verbs of `asr` for one VM: drills (test, cleanup), planned and unplanned failover, commit,
cancel and complete; failback to the primary site; reverse replication.
"""
from __future__ import annotations

import click

from api.cli import main
from api.cli_parsing import _key_values
from api.cli_progress import _job_command
from api.cli_service import _OpGroup, _service


@main.group(cls=_OpGroup)
def failover():
    """Failover of a protected VM: drills (test, cleanup), planned and unplanned failover, then commit,
    cancel, or complete (a minimize-downtime failback)."""


POINT_HELP = "Recovery point: latest_processed, latest_app_consistent, latest, or a point id."


def _public_ips(pairs: tuple[str, ...]) -> dict[str, str] | None:
    return _key_values("--public-ip", pairs, typed=False) or None


@_job_command(failover, "test")
@click.argument("vm_name", metavar="VM")
@click.option("--point", default="latest_processed", show_default=True, help=POINT_HELP)
@click.option("--recovery-host", default=None, help="The recovery-site host to start the test VM on.")
@click.option("--test-network", default=None, help="An isolated network for the test VM (default: its own).")
def failover_test(vm_name: str, point: str, recovery_host: str | None, test_network: str | None):
    """A drill: start a test copy of VM at the recovery site from a recovery point; replication goes on."""
    return _service().test_failover(vm_name, point=point, recovery_host=recovery_host, test_network=test_network)


@_job_command(failover, "cleanup")
@click.argument("vm_name", metavar="VM")
def failover_cleanup(vm_name: str):
    """End VM's drill: delete its test VM."""
    return _service().test_failover_cleanup(vm_name)


@_job_command(failover, "planned")
@click.argument("vm_name", metavar="VM")
@click.option("--recovery-host", default=None, help="The recovery-site host to start the VM on.")
@click.option("--public-ip", "public_ips", multiple=True, metavar="NIC=ADDRESS",
              help="A public address for an adapter at the recovery site, repeatable: nic0=203.0.113.5.")
def failover_planned(vm_name: str, recovery_host: str | None, public_ips: tuple[str, ...]):
    """Shut VM down, replicate its last changes, start it at the recovery site: no data loss."""
    return _service().planned_failover(vm_name, recovery_host=recovery_host, public_ips=_public_ips(public_ips))


@_job_command(failover, "unplanned")
@click.argument("vm_name", metavar="VM")
@click.option("--point", default="latest_processed", show_default=True, help=POINT_HELP)
@click.option("--recovery-host", default=None, help="The recovery-site host to start the VM on.")
@click.option("--public-ip", "public_ips", multiple=True, metavar="NIC=ADDRESS",
              help="A public address for an adapter at the recovery site, repeatable: nic0=203.0.113.5.")
def failover_unplanned(vm_name: str, point: str, recovery_host: str | None, public_ips: tuple[str, ...]):
    """The primary is lost: start VM at the recovery site from a recovery point it already has."""
    return _service().unplanned_failover(vm_name, point=point, recovery_host=recovery_host,
                                         public_ips=_public_ips(public_ips))


@_job_command(failover, "complete")
@click.argument("vm_name", metavar="VM")
def failover_complete(vm_name: str):
    """Finish a minimize-downtime failback of VM: stop it at the recovery site, send the rest, start it home."""
    return _service().complete_failover(vm_name)


@_job_command(failover, "commit")
@click.argument("vm_name", metavar="VM")
def failover_commit(vm_name: str):
    """Make VM's failover (or failback) final: its recovery points are no longer needed to go back."""
    return _service().commit_failover(vm_name)


@_job_command(failover, "cancel")
@click.argument("vm_name", metavar="VM")
def failover_cancel(vm_name: str):
    """Undo VM's failover (or failback) that is not committed: it runs where it ran before."""
    return _service().cancel_failover(vm_name)


FAILBACK_MODES = {"minimize-downtime": "minimize_downtime", "full-download": "full_download"}


@_job_command(main, "failback")
@click.argument("vm_name", metavar="VM")
@click.option("--mode", type=click.Choice(sorted(FAILBACK_MODES)), default="minimize-downtime", show_default=True,
              help="minimize-downtime: synchronize while the VM runs at the recovery site, then "
                   "`asr failover complete VM`; full-download: copy whole disks with it off.")
@click.option("--create-vm", is_flag=True, help="Create the VM on the primary host if it is gone.")
@click.option("--host", "host_name", default=None, help="Fail back to this host instead of the original one.")
def failback(vm_name: str, mode: str, create_vm: bool, host_name: str | None):
    """Bring a failed-over VM (committed) back to the primary site."""
    return _service().failback(vm_name, mode=FAILBACK_MODES[mode], create_vm=create_vm, host=host_name)


@_job_command(main, "reverse")
@click.argument("vm_name", metavar="VM")
def reverse(vm_name: str):
    """Reverse replication: protect VM again from where it runs now."""
    return _service().reverse_replication(vm_name)
