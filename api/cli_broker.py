"""`asr broker-acl host NAME | engine | file`: the Redis ACL user of a host's agent, or of the engine's
processes, as an `ACL SETUSER` line for the operator's own Redis 7, or a whole ACL file of a deployment's
users (sites/brokeracl.py; docs/operations.md, "Broker isolation").

The password is read from --password-file when that file exists, else made and written there (0600): the
process that connects as the user reads it from the same file into its broker URL. Redis is given only the
password's SHA-256. Nothing here connects to Redis or the database.
"""
from __future__ import annotations

from pathlib import Path

import click

from api.cli import _fail, _Group, main

_PASSWORD_FILE = click.option(
    "--password-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The user's password: read if the file exists, else a new one is written there (mode 0600, its "
         "folders made 0700).")
_DB = click.option("--db", type=click.IntRange(0, 15), default=0, show_default=True,
                   help="The Redis database of ASR_BROKER_URL (it names the pub/sub channels).")


@main.group("broker-acl", cls=_Group)
def broker_acl():
    """Redis ACL users: each host's agent confined to its own queue, the engine's processes with no
    administration command (docs/operations.md, "Broker isolation")."""


def _password(path: Path) -> str:
    from datapath.private import make_private_directories, write_new_private_file
    from sites.brokeracl import new_password

    try:
        if path.exists():
            password = path.read_text().strip()
            if not password or any(c.isspace() for c in password):
                _fail(f"{path} does not hold a password (one line, no spaces)")
            return password
        password = new_password()
        make_private_directories(path.parent)  # 0700 where created here
        write_new_private_file(path, password + "\n")
    except OSError as exc:
        _fail(f"cannot use the password file {path}: {exc.strerror or exc}")
    click.echo(f"new password written to {path} (mode 0600)", err=True)
    return password


def _emit(user, password_file: Path) -> None:
    click.echo(f"{user.name} ({user.role}): run the line above in redis-cli as an administrator, then connect "
               f"as redis[s]://{user.name}:PASSWORD@HOST:PORT/DB with the password in {password_file}", err=True)


@broker_acl.command("host")
@click.argument("name")
@_PASSWORD_FILE
@_DB
@click.option("--acl-file-line", is_flag=True, help="Print the user's line for a Redis ACL file instead.")
def broker_acl_host(name: str, password_file: Path, db: int, acl_file_line: bool):
    """The ACL user `asr-host-NAME` of host NAME's agent: consumes only the queue host.NAME, keeps its own
    unacknowledged messages, and only pushes the next steps to the other queues."""
    from sites.brokeracl import host_agent_user

    try:
        user = host_agent_user(name, db=db)
    except ValueError as exc:
        _fail(str(exc))
    password = _password(password_file)
    click.echo(user.acl_file_line(password) if acl_file_line else user.setuser_command(password))
    if not acl_file_line:
        _emit(user, password_file)


@broker_acl.command("engine")
@_PASSWORD_FILE
@click.option("--acl-file-line", is_flag=True, help="Print the user's line for a Redis ACL file instead.")
def broker_acl_engine(password_file: Path, acl_file_line: bool):
    """The ACL user `asr-engine` of the orchestration and recovery workers, beat, the API and Flower: every
    key and channel, no administration command."""
    from sites.brokeracl import engine_user

    user = engine_user()
    password = _password(password_file)
    click.echo(user.acl_file_line(password) if acl_file_line else user.setuser_command(password))
    if not acl_file_line:
        _emit(user, password_file)


def host_password_files(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, Path]:
    """`--host NAME=FILE` options as {NAME: FILE}, each host once."""
    hosts: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r}: NAME=FILE (a host's name and its password file)")
        if name in hosts:
            raise click.BadParameter(f"host {name!r} given twice")
        hosts[name] = Path(path)
    return hosts


@broker_acl.command("file")
@click.argument("acl_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--engine-password-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The engine's user's password: read if the file exists, else a new one is written there.")
@click.option("--host", "hosts", multiple=True, metavar="NAME=FILE", callback=host_password_files,
              help="A host's agent and its user's password file (read, or written when new); repeat per host.")
@_DB
def broker_acl_file(acl_file: Path, engine_password_file: Path, hosts: dict[str, Path], db: int):
    """Write ACL_FILE, the Redis ACL file of a deployment (redis-server --aclfile ACL_FILE): the `default`
    user off, the engine's user and each host agent's user. It holds the passwords' SHA-256 only; each
    password stays in its own file, for the one process that connects with it (ASR_BROKER_PASSWORD_FILE).
    Run again with the same files to add a host: the passwords already made are kept."""
    import os

    from datapath.durable import replace_file
    from sites.brokeracl import engine_user, host_agent_user

    try:
        users = [(engine_user(), engine_password_file),
                 *((host_agent_user(name, db=db), path) for name, path in sorted(hosts.items()))]
    except ValueError as exc:
        _fail(str(exc))
    # Without `default off`, a client that sends no credentials would act as Redis's all-powerful default user.
    lines = ["user default off", *(user.acl_file_line(_password(path)) for user, path in users)]
    try:
        replace_file(acl_file, ("\n".join(lines) + "\n").encode())
        # Readable by the redis-server's own user: it holds no password (the SHA-256 of long random ones).
        os.chmod(acl_file, 0o644)
    except OSError as exc:
        _fail(f"cannot write the ACL file {acl_file}: {exc.strerror or exc}")
    click.echo(f"{acl_file}: the users {', '.join(user.name for user, _path in users)}; `default` off")
