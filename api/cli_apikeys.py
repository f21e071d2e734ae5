"""The REST API key verbs of `asr`: create (the key is shown once, with its role), list, revoke, and a key for
ASR_API_KEY_HASHES (`create-env`)."""
from __future__ import annotations

import click

from api.cli import main
from api.cli_output import _emit_json, json_option, print_table
from api.cli_service import _command, _OpGroup, _service


@main.group(cls=_OpGroup)
def apikey():
    """Keys of the REST API: created here, shown once, kept only as salted hashes."""


_ROLE = click.option(
    "--role", type=click.Choice(["reader", "operator", "admin"]), default="reader", show_default=True,
    help="reader: lists, shows, events; operator: also protect, replicate, drills, failovers, plan runs, jobs; "
         "admin: also sites, hosts, VMs, policies, plan definitions, disabling protection.")


@_command(apikey, "create")
@click.argument("name")
@_ROLE
@json_option
def apikey_create(name: str, role: str, as_json: bool):
    """Create a key called NAME with a role and print it (this is the only time it is shown)."""
    result = _service().create_api_key(name, role)
    if as_json:
        return _emit_json(result)
    click.echo(f"API key {name} ({role}): {result['key']}")
    click.echo("store it now: only its hash is kept")


@_command(apikey, "create-env")
@_ROLE
@json_option
def apikey_create_env(role: str, as_json: bool):
    """Make a key for a deployment that keeps keys out of the database: prints the key and the entry to add to
    ASR_API_KEY_HASHES (comma-separated). Nothing is stored."""
    result = _service().create_env_api_key(role)
    if as_json:
        return _emit_json(result)
    click.echo(f"API key ({role}): {result['key']}")
    click.echo(f"ASR_API_KEY_HASHES entry: {result['entry']}")


@_command(apikey, "list")
@json_option
def apikey_list(as_json: bool):
    """Every key: name, role, prefix, when created, last used, revoked (never the key)."""
    keys = _service().list_api_keys()
    if as_json:
        return _emit_json(keys)
    print_table(keys, [("name", "name"), ("role", "role"), ("prefix", "prefix"), ("created", "created_at"),
                       ("last used", "last_used_at"), ("revoked", "revoked_at")],
                empty="no API keys: create one with `asr apikey create NAME`")


@_command(apikey, "revoke")
@click.argument("name")
@json_option
def apikey_revoke(name: str, as_json: bool):
    """Revoke the key called NAME: requests carrying it get 401."""
    result = _service().revoke_api_key(name)
    if as_json:
        return _emit_json(result)
    click.echo(f"API key {name} revoked")
