"""`asr db`: the database schema's revision, and the upgrade step of a new release."""
from __future__ import annotations

import json

import click

from api.cli import _fail, _Group, main


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
