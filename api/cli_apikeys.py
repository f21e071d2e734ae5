"""The REST API key verbs of `asr`: create (the key is shown once), list, revoke."""
from __future__ import annotations

import click

from api.cli import main
from api.cli_output import _emit_json, json_option, print_table
from api.cli_service import _command, _OpGroup, _service


@main.group(cls=_OpGroup)
def apikey():
    """Keys of the REST API: created here, shown once, kept only as salted hashes."""


@_command(apikey, "create")
@click.argument("name")
@json_option
def apikey_create(name: str, as_json: bool):
    """Create a key called NAME and print it (this is the only time it is shown)."""
    result = _service().create_api_key(name)
    if as_json:
        return _emit_json(result)
    click.echo(f"API key {name}: {result['key']}")
    click.echo("store it now: only its hash is kept")


@_command(apikey, "list")
@json_option
def apikey_list(as_json: bool):
    """Every key: name, prefix, when created, last used, revoked (never the key)."""
    keys = _service().list_api_keys()
    if as_json:
        return _emit_json(keys)
    print_table(keys, [("name", "name"), ("prefix", "prefix"), ("created", "created_at"),
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
