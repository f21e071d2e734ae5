"""The verbs of `asr` that change or remove what was registered, added to the groups of the other modules:
`host rekey`, `host|site|vm|network|policy set`, `plan update` (each refused while something depends on what
it changes), and `vm|host|site|network|policy|plan remove` (each
asks first unless --yes, and is refused while something depends on the thing); and `asr replicate VM`, a delta
cycle now."""
from __future__ import annotations

import copy
from pathlib import Path

import click

from api.cli import main
from api.cli_fabric import check_new_key_file, host, key_file_option, network, save_key, site, vm
from api.cli_output import _emit_json, json_option, print_fields
from api.cli_plans import _load_plan_file, plan
from api.cli_policies import POLICY_FIELDS, policy, policy_add, policy_settings
from api.cli_progress import _job_command
from api.cli_service import _command, _service

yes_option = click.option("--yes", is_flag=True, help="Do not ask first.")


def _ask(yes: bool, question: str) -> None:
    """Unless --yes: ask at the terminal; no (or no answer) exits 1 with nothing done, as `asr unprotect`."""
    if not yes:
        click.confirm(question, abort=True)


# ---- hosts -------------------------------------------------------------------------------------------------
@_command(host, "rekey")
@click.argument("name")
@key_file_option
@json_option
def host_rekey(name: str, key_file: Path | None, as_json: bool):
    """Issue a new registration key for host NAME (printed once, or written to --key-file: only its hash is
    kept). The old key stops admitting the host's agent: restart the agent with the new one. For a lost key."""
    check_new_key_file(key_file)
    result = _service().rekey_host(name)
    key = result.get("registration_key")
    saved = save_key(key_file, key, result.get("name", name))
    if saved:
        result = {**result, "registration_key": None, "key_file": str(key_file)}
    if as_json:
        return _emit_json(result)
    if not saved:
        click.echo(f"new registration key of host {result.get('name', name)}: {key}")
    click.echo("(shown this once: only its hash is kept; the old key no longer admits an agent: start the "
               f"host's agent with the new one, `asr worker host {result.get('name', name)} --key-file FILE`, "
               f"and stop any agent still running with the old one)")


@_command(host, "set")
@click.argument("name")
@click.option("--root", default=None, help="A new absolute path of the host's VM tree. Every VM registered on the "
              "host must be there already (a tree that moved); refused while the host has protected VMs or is a "
              "protected VM's recovery host.")
@click.option("--site", "site_name", default=None, help="Move the host to this site (refused while it has "
              "protected VMs: their failovers use the network mappings of its site).")
@click.option("--cloud", default=None, help="Move the host to this VMM cloud (instead of --site).")
@json_option
def host_set(name: str, root: str | None, site_name: str | None, cloud: str | None, as_json: bool):
    """Change host NAME's root, site or cloud, checked as `asr host add` checks them (its name, its identity,
    stays)."""
    if root is None and site_name is None and cloud is None:
        raise click.UsageError("nothing to change: give --root, --site or --cloud (asr host set --help)")
    if site_name is not None and cloud is not None:
        raise click.UsageError("give --site or --cloud, not both")
    result = _service().update_host(name, root=root, site=site_name, cloud=cloud)
    if as_json:
        return _emit_json(result)
    click.echo(f"host {result.get('name', name)} changed")
    print_fields(result, [("site", "site"), ("cloud", "cloud"), ("root", "root")])


@_command(host, "remove")
@click.argument("name")
@yes_option
@json_option
def host_remove(name: str, yes: bool, as_json: bool):
    """Forget host NAME: refused while it has registered VMs or is a protected VM's recovery host. Nothing on the
    host is touched (stop its agent)."""
    _ask(yes, f"Remove host {name}? Its registration and key are forgotten")
    result = _service().remove_host(name)
    if as_json:
        return _emit_json(result)
    click.echo(f"host {result.get('name', name)} removed (its folder {result.get('root')} is untouched; stop its "
               f"agent if it runs)")


# ---- sites -------------------------------------------------------------------------------------------------
@_command(site, "set")
@click.argument("name")
@click.option("--description", required=True, help="The site's new description.")
@json_option
def site_set(name: str, description: str, as_json: bool):
    """Change site NAME's description."""
    result = _service().update_site(name, description=description)
    if as_json:
        return _emit_json(result)
    click.echo(f"site {result.get('name', name)}: description {result.get('description')!r}")


@_command(site, "remove")
@click.argument("name")
@yes_option
@json_option
def site_remove(name: str, yes: bool, as_json: bool):
    """Forget site NAME and its network mappings: refused while it has hosts."""
    _ask(yes, f"Remove site {name} and its network mappings?")
    result = _service().remove_site(name)
    if as_json:
        return _emit_json(result)
    mappings = result.get("network_mappings_removed") or []
    click.echo(f"site {result.get('name', name)} removed"
               + (f", with the mappings of network(s) {', '.join(mappings)}" if mappings else ""))


# ---- VMs and network mappings ------------------------------------------------------------------------------
@_command(vm, "remove")
@click.argument("vm_name", metavar="VM")
@yes_option
@json_option
def vm_remove(vm_name: str, yes: bool, as_json: bool):
    """Forget VM, which must not be protected (`asr unprotect` first) nor in a recovery plan. Its disks are NOT
    deleted: its folder stays on its host, and `asr vm add HOST NAME` registers it again."""
    _ask(yes, f"Remove VM {vm_name}? Its registration is forgotten; its disks stay on its host")
    result = _service().remove_vm(vm_name)
    if as_json:
        return _emit_json(result)
    name, host_name = result.get("name", vm_name), result.get("host")
    click.echo(f"VM {name} removed from {host_name}. Its disks were not deleted: they stay in "
               f"{result.get('folder')} ({', '.join(result.get('disks_kept') or []) or 'no disks'}); "
               f"`asr vm add {host_name} {name}` registers it again")


def _assignment(text: str) -> tuple[str, str]:
    adapter, sep, network_name = text.partition("=")
    if not sep or not adapter or not network_name:
        raise click.BadParameter(f"{text!r}: use ADAPTER=NETWORK (nic0=backend)", param_hint="--network")
    return adapter, network_name


@_command(vm, "set")
@click.argument("vm_name", metavar="VM")
@click.option("--network", "networks", multiple=True, metavar="ADAPTER=NETWORK",
              help="Connect the adapter to another VM network (nic0=backend); repeat for more adapters. A protected "
                   "VM's new network must be mapped in its host's site or cloud (`asr network add`).")
@click.option("--memory", "memory_mb", type=int, default=None, help="A QEMU guest's memory (MiB).")
@click.option("--boot-timeout", "boot_timeout_s", type=float, default=None,
              help="Seconds a guest's boot may take to reach the heartbeat.")
@click.option("--heartbeat", default=None, help="Regex: the guest is up once a line of its console matches it.")
@click.option("--check-pass", default=None, help="Regex on the console: the guest's own check passed.")
@click.option("--check-fail", default=None, help="Regex on the console: the guest's own check failed.")
@click.option("--no-check", is_flag=True,
              help="Remove the guest's own check (both patterns): a boot check then ends at the heartbeat.")
@click.option("--cmdline", default=None, help="A direct-kernel guest's kernel command line.")
@click.option("--guest-agent/--no-guest-agent", default=None,
              help="Whether the guest answers the QEMU guest agent (freeze/thaw for app-consistent points).")
@json_option
def vm_set(vm_name: str, networks: tuple[str, ...], memory_mb: int | None, boot_timeout_s: float | None,
           heartbeat: str | None, check_pass: str | None, check_fail: str | None, no_check: bool, cmdline: str | None,
           guest_agent: bool | None, as_json: bool):
    """Change VM's definition, on its host (its vm.json) and in its registration: its adapters' networks, and a
    QEMU guest's memory, boot timeout, console patterns, command line and guest agent (the options of `asr vm
    create`, checked as there; those left out keep their values). Its name, disks and how it boots stay.
    Refused while a job works on it or it is failed over, and a guest's definition while the guest runs."""
    assignments = dict(_assignment(text) for text in networks)
    if len(assignments) != len(networks):
        raise click.BadParameter("an adapter is given twice", param_hint="--network")
    guest = {key: value for key, value in (
        ("memory_mb", memory_mb), ("boot_timeout_s", boot_timeout_s), ("heartbeat", heartbeat),
        ("check_pass", check_pass), ("check_fail", check_fail), ("cmdline", cmdline),
        ("guest_agent", guest_agent)) if value is not None}
    if no_check:
        if check_pass is not None or check_fail is not None:
            raise click.UsageError("--no-check removes the guest's check: give it without --check-pass/--check-fail")
        guest |= {"check_pass": None, "check_fail": None}
    if not assignments and not guest:
        raise click.UsageError("nothing to change: give --network or a guest option (asr vm set --help)")
    result = _service().update_vm(vm_name, networks=assignments or None, guest=guest or None)
    if as_json:
        return _emit_json(result)
    click.echo(f"VM {result.get('name', vm_name)} on {result.get('host')} changed")
    for adapter in result.get("adapters") or []:
        click.echo(f"  {adapter.get('name')}: network {adapter.get('vm_network')}")
    if guest:
        shown = result.get("guest") or {}
        click.echo("  guest: " + ", ".join(f"{key} {shown.get(key)!r}" for key in guest))


@_command(network, "set")
@click.argument("source_network")
@click.option("--site", "site_name", default=None, help="The site whose mapping this is.")
@click.option("--cloud", default=None, help="The VMM cloud whose mapping this is (instead of --site).")
@click.option("--recovery-network", default=None, help="The recovery network the VM network fails over to.")
@click.option("--subnet", "recovery_subnet", default=None, help="The recovery subnet (CIDR, e.g. 10.1.0.0/24).")
@json_option
def network_set(source_network: str, site_name: str | None, cloud: str | None, recovery_network: str | None,
                recovery_subnet: str | None, as_json: bool):
    """Point the mapping of VM network SOURCE_NETWORK of a site (or cloud) at another recovery network or
    subnet, checked as `asr network add` checks them. Failovers from then on use it; refused while a VM on that
    network is failed over (its recovery VM is in the network the mapping names now)."""
    if (site_name is None) == (cloud is None):
        raise click.UsageError("give exactly one of --site and --cloud")
    if recovery_network is None and recovery_subnet is None:
        raise click.UsageError("nothing to change: give --recovery-network or --subnet")
    result = _service().update_network_mapping(source_network, site=site_name, cloud=cloud,
                                               recovery_network=recovery_network, recovery_subnet=recovery_subnet)
    if as_json:
        return _emit_json(result)
    click.echo(f"network {source_network} ({site_name or cloud}) -> {result.get('recovery_network')} "
               f"{result.get('recovery_subnet')}")


@_command(network, "remove")
@click.argument("source_network")
@click.option("--site", "site_name", default=None, help="The site whose mapping this is.")
@click.option("--cloud", default=None, help="The VMM cloud whose mapping this is (instead of --site).")
@yes_option
@json_option
def network_remove(source_network: str, site_name: str | None, cloud: str | None, yes: bool, as_json: bool):
    """Forget the mapping of VM network SOURCE_NETWORK of a site (or cloud): refused while a protected VM there
    has an adapter on it (its failover needs it)."""
    if (site_name is None) == (cloud is None):
        raise click.UsageError("give exactly one of --site and --cloud")
    _ask(yes, f"Remove the mapping of network {source_network} of {site_name or cloud}?")
    result = _service().remove_network_mapping(source_network, site=site_name, cloud=cloud)
    if as_json:
        return _emit_json(result)
    click.echo(f"mapping of network {source_network} ({site_name or cloud}) -> {result.get('recovery_network')} "
               f"removed")


# ---- policies ----------------------------------------------------------------------------------------------
def policy_set(name: str, copy_frequency: str | None, retention_hours: int | None, app_consistent_hours: int | None,
               initial_replication_at: str | None, office_hours: str | None, office_days: str | None,
               office_timezone: str | None, rpo_warning: int | None, rpo_critical: int | None,
               consistency_check_hours: int | None, consistency_check_anytime: bool | None,
               drill_reminder_days: int | None, retention_lock_hours: int | None, as_json: bool):
    """Change replication policy NAME: the options of `asr policy add`, those left out keep their values (their
    defaults there do not apply here). Validated as a new policy is; the VMs it protects use the new values from
    their next cycle. A retention lock that is on can only be raised (lowering it is refused)."""
    options = policy_settings(copy_frequency, retention_hours, app_consistent_hours, initial_replication_at,
                              office_hours, office_days, office_timezone, rpo_warning, rpo_critical,
                              consistency_check_hours,
                              None if consistency_check_anytime is None else not consistency_check_anytime,
                              drill_reminder_days, retention_lock_hours)
    if not options:
        raise click.UsageError("nothing to change: give at least one option (asr policy set --help)")
    result = _service().update_policy(name, **options)
    if as_json:
        return _emit_json(result)
    click.echo(f"policy {result.get('name', name)} changed; the VMs it protects use it from their next cycle")
    print_fields(result, POLICY_FIELDS[2:])


def _policy_set_command() -> click.Command:
    # The options of `policy add` (the same names, types and ranges), the NAME argument first; its one-way
    # --consistency-check-anytime flag becomes a pair, so a change can go either way.
    shared = [copy.copy(param) for param in policy_add.params
              if param.name not in ("name", "consistency_check_anytime", "as_json")]
    command = _command(policy, "set")(json_option(click.option(
        "--consistency-check-anytime/--consistency-check-off-hours", "consistency_check_anytime", default=None,
        help="Scheduled consistency checks also in office hours, or only outside them.")(
        click.argument("name")(policy_set))))
    by_name = {param.name: param for param in command.params}
    command.params = [by_name["name"], *shared, by_name["consistency_check_anytime"], by_name["as_json"]]
    return command


policy_set_command = _policy_set_command()


@_command(policy, "remove")
@click.argument("name")
@yes_option
@json_option
def policy_remove(name: str, yes: bool, as_json: bool):
    """Forget replication policy NAME: refused while a VM's protection refers to it."""
    _ask(yes, f"Remove replication policy {name}?")
    result = _service().remove_policy(name)
    if as_json:
        return _emit_json(result)
    click.echo(f"policy {result.get('name', name)} removed")


# ---- plans -------------------------------------------------------------------------------------------------
@_command(plan, "update")
@click.argument("name")
@click.option("--file", "plan_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The plan's new groups, as `asr plan create` takes them.")
@click.option("--description", default=None, help="A new description (overrides the file's; default: kept).")
@json_option
def plan_update(name: str, plan_file: Path, description: str | None, as_json: bool):
    """Replace recovery plan NAME's groups with those of a file, checked as `asr plan create` checks them (every
    problem at once); refused while the plan runs."""
    groups, file_description = _load_plan_file(plan_file)
    result = _service().update_plan(name, groups, description if description is not None else file_description)
    if as_json:
        return _emit_json(result)
    click.echo(f"recovery plan {result.get('name', name)} updated: {len(result.get('groups') or groups)} groups")


@_command(plan, "remove")
@click.argument("name")
@yes_option
@json_option
def plan_remove(name: str, yes: bool, as_json: bool):
    """Forget recovery plan NAME (its VMs and their protection are untouched): refused while it runs."""
    _ask(yes, f"Remove recovery plan {name}?")
    result = _service().remove_plan(name)
    if as_json:
        return _emit_json(result)
    click.echo(f"recovery plan {result.get('name', name)} removed")


# ---- a delta cycle now -------------------------------------------------------------------------------------
@_job_command(main, "replicate")
@click.argument("vm_name", metavar="VM")
def replicate(vm_name: str):
    """Start a delta replication cycle of VM now (as the scheduler does every copy frequency): ship, apply and
    acknowledge its logs, a new recovery point. Refused while one runs or when VM is not protected."""
    return _service().replicate(vm_name)
