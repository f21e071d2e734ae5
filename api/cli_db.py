"""`asr db`: the database schema's revision, and the upgrade step of a new release."""
from __future__ import annotations

import json
from pathlib import Path

import click

from api.cli import _fail, _Group, main
from api.cli_broker import host_password_files


@main.group(cls=_Group)
def db():
    """The database's schema: which revision it is at, and upgrading it to this release's.

    Upgrade a deployment by stopping every process of the old release, running `asr db upgrade` once
    with the new release (same ASR_DATABASE_URL as the processes), then starting the new processes.
    Processes refuse to start on an old schema and say so."""


def _engine():
    from models.db import get_engine

    return get_engine()


@db.command("current")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def db_current(as_json: bool):
    """The database's revision and the one this release needs (exit 1 when they differ)."""
    import sqlalchemy.exc

    from api.cli_processes import _redacted_database_url
    from models import schema

    try:
        revision = schema.current_revision(_engine())
    except sqlalchemy.exc.SQLAlchemyError as exc:
        _fail(f"cannot read the database {_redacted_database_url()}: {getattr(exc, 'orig', None) or exc}")
    head = schema.head_revision()
    if as_json:
        click.echo(json.dumps({"database": _redacted_database_url(), "revision": revision, "needed": head,
                               "up_to_date": revision == head}))
    else:
        shown = revision or "(empty database)"
        click.echo(f"database {_redacted_database_url()}: revision {shown}; this release needs {head}")
        if revision != head:
            click.echo("run `asr db upgrade` with every process of the old release stopped")
    if revision != head:
        raise SystemExit(1)


@db.command("upgrade")
@click.option("--to", "revision", default="head", show_default=True,
              help="The revision to upgrade to (default the newest, what this release needs).")
def db_upgrade(revision: str):
    """Upgrade the database's schema to this release's (a database made before migrations included).

    Safe to run again; stop every process of the old release first, since a revision may drop what they
    still write."""
    import sqlalchemy.exc

    from api.cli_processes import _redacted_database_url
    from models import schema

    try:
        done = schema.upgrade(_engine(), revision)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        _fail(f"cannot upgrade the database {_redacted_database_url()}: {getattr(exc, 'orig', None) or exc}")
    for added in done.adopted:
        click.echo(f"adopted a database from before migrations: added {added}")
    if done.from_revision == done.to_revision:
        click.echo(f"database {_redacted_database_url()} is at revision {done.to_revision}: nothing to do")
    else:
        click.echo(f"database {_redacted_database_url()} upgraded from {done.from_revision or '(empty)'} "
                   f"to revision {done.to_revision}")


_PASSWORD_FILE = click.option(
    "--password-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The role's password: read if the file exists, else a new one is written there (mode 0600).")
_PREFIX = click.option("--prefix", default="asr", show_default=True,
                       help="The roles' prefix: one per deployment sharing a PostgreSQL cluster.")


@db.group("roles", cls=_Group)
def db_roles():
    """PostgreSQL roles of least privilege: each host's agent and the API connect as their own role, the
    engine's processes as the schema's owner (docs/operations.md, "Least privilege on PostgreSQL").

    Run as the owner (ASR_DATABASE_URL as for `asr db upgrade`) with the right to create roles. SQLite has
    no roles: a SQLite database is one machine's development database."""


def _names(prefix: str):
    from models.dbroles import RoleNames

    try:
        return RoleNames(prefix=prefix)
    except ValueError as exc:
        _fail(str(exc))


def _run_as_owner(what: str, change):
    """`change(connection)` in one transaction on the owner's database; the failure in one line."""
    import sqlalchemy.exc

    from api.cli_processes import _redacted_database_url

    try:
        with _engine().begin() as connection:
            return change(connection)
    except ValueError as exc:
        _fail(str(exc))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        _fail(f"cannot {what} on {_redacted_database_url()}: {getattr(exc, 'orig', None) or exc}")


@db_roles.command("owner")
@_PASSWORD_FILE
def db_roles_owner(password_file: Path):
    """The schema owner's password, made once in --password-file (0600) and kept: for a new PostgreSQL
    server (the postgres image's POSTGRES_PASSWORD_FILE sets it when the server is first initialised) and the
    owner's processes (ASR_DATABASE_PASSWORD_FILE, with an ASR_DATABASE_URL naming the owner without a
    password). Nothing connects to the database; compose.yaml's db-owner service runs it before PostgreSQL."""
    from api.cli_broker import _password

    _password(password_file)
    click.echo(f"the owner's password is in {password_file}")


@db_roles.command("apply")
@_PREFIX
@click.option("--host", "hosts", multiple=True, metavar="NAME=FILE", callback=host_password_files,
              help="Also (re)set host NAME's login role, its password in FILE (read, or written when new); "
                   "repeat per host. As `asr db roles host`.")
@click.option("--api-password-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also (re)set the API's login role, its password in this file. As `asr db roles api`.")
def db_roles_apply(prefix: str, hosts: dict[str, Path], api_password_file: Path | None):
    """Create the group roles PREFIX_host and PREFIX_api if missing and (re)set their grants and the
    row-level security of the schema. Run again after every `asr db upgrade` (a new table has no grant).
    With --host and --api-password-file, the login roles too, in the same transaction (a deployment's whole
    set of roles in one command: compose.yaml's db-roles service)."""
    from api.cli_broker import _password
    from models.dbroles import apply_roles, set_api_role, set_host_role

    names = _names(prefix)
    try:
        for name in hosts:
            names.host(name)
    except ValueError as exc:
        _fail(str(exc))
    passwords = {name: _password(path) for name, path in hosts.items()}
    api_password = _password(api_password_file) if api_password_file is not None else None

    def apply_all(connection) -> list[str]:
        done = list(apply_roles(connection, names))
        for name, password in sorted(passwords.items()):
            done.append(f"{set_host_role(connection, name, password, names)}: host {name}'s agent, its password in "
                        f"{hosts[name]}")
        if api_password is not None:
            done.append(f"{set_api_role(connection, api_password, names)}: the API, its password in "
                        f"{api_password_file}")
        return done

    for line in _run_as_owner("apply the roles", apply_all):
        click.echo(line)


@db_roles.command("host")
@click.argument("name")
@_PASSWORD_FILE
@_PREFIX
def db_roles_host(name: str, password_file: Path, prefix: str):
    """The login role PREFIX_host_NAME of host NAME's agent (created, or given the password), a member of
    PREFIX_host. Prints the database URL the agent uses, PASSWORD standing for the file's content. The
    server is sent the password's SCRAM verifier, never the password."""
    from api.cli_broker import _password
    from models.dbroles import set_host_role

    names = _names(prefix)
    try:
        names.host(name)
    except ValueError as exc:
        _fail(str(exc))
    password = _password(password_file)
    role = _run_as_owner(f"set the role of host {name}",
                         lambda connection: set_host_role(connection, name, password, names))
    click.echo(_url_as(role))
    click.echo(f"{role}: host {name}'s agent connects with the URL above as ASR_DATABASE_URL, PASSWORD replaced by "
               f"the password in {password_file}", err=True)


@db_roles.command("api")
@_PASSWORD_FILE
@_PREFIX
def db_roles_api(password_file: Path, prefix: str):
    """The login role PREFIX_api_login of the API's processes (created, or given the password), a member of
    PREFIX_api: every table's rows, no schema change. Prints the database URL `asr api` uses, PASSWORD
    standing for the file's content. The server is sent the password's SCRAM verifier, never the password."""
    from api.cli_broker import _password
    from models.dbroles import set_api_role

    names = _names(prefix)
    password = _password(password_file)
    role = _run_as_owner("set the API's role", lambda connection: set_api_role(connection, password, names))
    click.echo(_url_as(role))
    click.echo(f"{role}: the API (`asr api`) connects with the URL above as ASR_DATABASE_URL, PASSWORD replaced by "
               f"the password in {password_file}", err=True)


def _url_as(role: str) -> str:
    """The owner's database URL (ASR_DATABASE_URL) with `role` and a placeholder for its password."""
    from sqlalchemy.engine import make_url

    from models.db import database_url

    return make_url(database_url()).set(username=role, password="PASSWORD").render_as_string(hide_password=False)


@db_roles.command("drop-host")
@click.argument("name")
@_PREFIX
def db_roles_drop_host(name: str, prefix: str):
    """Drop host NAME's login role (a host taken out of service, or whose password leaked). Sessions it has
    open go on until they end: terminate them with pg_terminate_backend to cut it off at once."""
    from models.dbroles import drop_host_role

    names = _names(prefix)
    dropped = _run_as_owner(f"drop the role of host {name}",
                            lambda connection: drop_host_role(connection, name, names))
    click.echo(f"{names.host(name)} dropped" if dropped else f"there is no role {names.host(name)}")
