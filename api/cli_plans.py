"""The recovery plan verbs of `asr`: a plan is VMs in ordered groups, with scripts and manual actions
around each group; it is created from a file, run as one job (failover, failback), and resumed when a
manual action is done.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from api.cli import main
from api.cli_failover import FAILBACK_MODES, POINT_HELP
from api.cli_output import NOTHING, _count, _emit_json, _section, json_option, print_fields, print_table
from api.cli_progress import _job_command, acted_on, wait_options
from api.cli_service import _command, _OpGroup, _service


@main.group(cls=_OpGroup)
def plan():
    """Recovery plans: VMs in ordered groups, with scripts and manual actions around each group."""


def _load_plan_file(path: Path) -> tuple[list[dict], str | None]:
    """The groups (and description) in a plan file: JSON, or YAML when PyYAML is installed. The file holds
    either the list of groups or {"groups": [...], "description": "..."}."""
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise click.UsageError(f"{path} is YAML, but PyYAML is not installed: pip install pyyaml, "
                                   f"or give the plan as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{path} is not valid YAML: {exc}", param_hint="--file") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"{path} is not valid JSON: {exc}", param_hint="--file") from None
    if isinstance(data, Mapping):
        if "groups" not in data:
            raise click.BadParameter(f"{path} has no \"groups\"", param_hint="--file")
        return data["groups"], data.get("description")
    return data, None


@_command(plan, "create")
@click.argument("name")
@click.option("--file", "plan_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='The groups, as JSON (or YAML): [{"name", "vms": [...], "before": [...], "after": [...]}].')
@click.option("--description", default=None, help="Free text (overrides the file's).")
@json_option
def plan_create(name: str, plan_file: Path, description: str | None, as_json: bool):
    """Create recovery plan NAME from a file of groups; every problem in it is reported at once."""
    groups, file_description = _load_plan_file(plan_file)
    result = _service().create_plan(name, groups, description if description is not None else file_description or "")
    if as_json:
        return _emit_json(result)
    click.echo(f"recovery plan {result.get('name', name)} created: {len(result.get('groups') or groups)} groups "
               f"(id {result.get('id')})")


def _plan_vms(row: Mapping[str, Any]) -> int:
    return sum(len(group.get("vms") or []) for group in row.get("groups") or [] if isinstance(group, Mapping))


@_command(plan, "list")
@json_option
def plan_list(as_json: bool):
    """Every recovery plan."""
    plans = _service().list_plans()
    if as_json:
        return _emit_json(plans)
    print_table(plans, [("name", "name"), ("groups", lambda p: _count(p.get("groups"))), ("vms", _plan_vms),
                        ("description", "description"), ("id", "id")],
                empty="no recovery plans: create one with `asr plan create NAME --file plan.json`")


def _action_text(action: Mapping[str, Any]) -> str:
    if action.get("kind") == "script":
        if "command" in action:  # stored before scripts were registered: it will not run
            return f"script {action.get('name')}: a command line, refused when run (create the plan again)"
        args = " ".join(f"{key}={value}" for key, value in (action.get("args") or {}).items())
        return (f"script {action.get('name')}: {action.get('script')} {args}".rstrip()
                + f" (timeout {action.get('timeout_s')} s)")
    return f"manual {action.get('name')}: {action.get('instructions')}"


@_command(plan, "scripts")
@json_option
def plan_scripts(as_json: bool):
    """The scripts a plan's script action may name: registered by an administrator in ASR_PLAN_SCRIPTS_DIR."""
    scripts = _service().plan_scripts()
    if as_json:
        return _emit_json(scripts)
    print_table(scripts, [("name", "name"), ("timeout_s", "timeout_s"),
                          ("args", lambda s: ", ".join(f"{k}={v}" for k, v in (s.get("args") or {}).items())),
                          ("description", "description")],
                empty="no plan scripts are registered (ASR_PLAN_SCRIPTS_DIR)")


@_command(plan, "show")
@click.argument("name")
@json_option
def plan_show(name: str, as_json: bool):
    """A recovery plan: its groups in failover order, their VMs and actions."""
    result = _service().show_plan(name)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("id", "id"), ("description", "description"),
                          ("created", "created_at"), ("updated", "updated_at")])
    for number, group in enumerate(result.get("groups") or [], 1):
        _section(f"group {number}: {group.get('name', '')}".rstrip(": "))
        for action in group.get("before") or []:
            click.echo(f"  before  {_action_text(action)}")
        vms = [(f"{v.get('host')}/{v.get('name')}" if v.get("name") else f"{v.get('id')} (gone)")
               if isinstance(v, Mapping) else str(v) for v in group.get("vms") or []]
        click.echo(f"  VMs     {', '.join(vms) or NOTHING}")
        for action in group.get("after") or []:
            click.echo(f"  after   {_action_text(action)}")


PLAN_KINDS = {"test": "test_failover", "planned": "planned_failover", "unplanned": "unplanned_failover",
              "failback": "failback"}


def _run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options of a plan's run, shared by `plan failover` and its dry run `plan validate`."""
    for option in reversed([
        click.option("--point", default=None, help=POINT_HELP + " Default latest_processed (test, unplanned)."),
        click.option("--recovery-host", default=None, help="The recovery-site host for every VM (failovers)."),
        click.option("--test-network", default=None, help="The isolated network of a test failover."),
        click.option("--mode", type=click.Choice(sorted(FAILBACK_MODES)), default=None,
                     help="Failback mode (default minimize-downtime)."),
        click.option("--create-vm", is_flag=True, help="Failback: create VMs gone from the primary."),
    ]):
        command = option(command)
    return command


def _run_settings(point: str | None, recovery_host: str | None, test_network: str | None, mode: str | None,
                  create_vm: bool) -> dict[str, Any]:
    """The service's keyword arguments for the options given (those not given are left to its defaults)."""
    settings = {"point": point, "recovery_host": recovery_host, "test_network": test_network,
                "mode": FAILBACK_MODES[mode] if mode else None, "create_vm": create_vm or None}
    return {key: value for key, value in settings.items() if value is not None}


@_job_command(plan, "failover")
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice(list(PLAN_KINDS)), help="Which operation to run.")
@_run_options
def plan_failover(name: str, kind: str, point: str | None, recovery_host: str | None, test_network: str | None,
                  mode: str | None, create_vm: bool):
    """Run recovery plan NAME: group after group, the VMs of a group in parallel, actions around them."""
    result = _service().run_plan(name, PLAN_KINDS[kind], **_run_settings(point, recovery_host, test_network, mode,
                                                                         create_vm))
    return {"plan": name, **result}


@_command(plan, "validate")
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice(list(PLAN_KINDS)), help="Which operation to check.")
@_run_options
@json_option
def plan_validate(name: str, kind: str, point: str | None, recovery_host: str | None, test_network: str | None,
                  mode: str | None, create_vm: bool, as_json: bool):
    """Dry run of `plan failover`: every check the run makes, nothing started. Exits 0 with the groups the
    run would take when it could start now, otherwise with the run's refusal."""
    result = _service().validate_plan(name, PLAN_KINDS[kind], **_run_settings(point, recovery_host, test_network,
                                                                               mode, create_vm))
    if as_json:
        return _emit_json(result)
    click.echo(f"plan {result['plan']} could run {result['operation']} now:")
    for group in result["groups"]:
        click.echo(f"  {group['name']}: {', '.join(group['vms'])}")


@_command(plan, "resume")
@click.argument("job_id")
@click.option("--note", default="", help="What was done (kept with the step's result).")
@json_option
@wait_options
def plan_resume(job_id: str, note: str, as_json: bool, wait: bool, timeout: float | None):
    """Resume plan job JOB_ID waiting on a manual action: the operator did what it asked."""
    result = _service().resume_job(job_id, note)
    acted_on(job_id, result, f"resumed; follow it with: asr jobs watch {job_id}", as_json=as_json, wait=wait,
             timeout=timeout)
