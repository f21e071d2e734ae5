"""The database schema's revision: create, check and upgrade it with the Alembic revisions in `migrations/`.

Every process checks the schema when it starts (`init_db`): an empty database is created at the newest
revision; a database at an older revision (or made by a release before migrations) is refused with the
upgrade step to run, because an old schema breaks the new code in ways found only later (a missing
column fails the first query that names it). Upgrading is a deliberate step, `asr db upgrade`, run with
every process of the old release stopped: a migration may drop what old processes still write.
"""
from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Engine

import migrations
from datapath.private import create_private_file

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic (with Mako and Pygments) is imported only where a schema is created, upgraded or refused: every
# process checks the schema at start, and a database at migrations.HEAD needs one query, not ~0.2 s of imports.

# Any fixed number, the same in every process: the PostgreSQL advisory lock held while changing the schema.
_SCHEMA_LOCK_KEY = 0x41535230_53434845
PRE_MIGRATION = "pre-migration"
"""The revision shown for a database an earlier release made (tables, no `alembic_version`)."""


class SchemaOutOfDateError(RuntimeError):
    """The database's schema is not the one this release needs: the message says what to run."""


@dataclass(frozen=True)
class Upgrade:
    from_revision: str | None
    """None: the database was empty; PRE_MIGRATION: made by a release before migrations."""
    to_revision: str
    adopted: tuple[str, ...] = ()
    """What adoption added to a pre-migration database before the revisions ran."""


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration for the revisions in `migrations/`, running on `connection` (env.py)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision: the schema this release's code needs."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "migrations/versions holds no revision"
    return head


def revision_of(connection: sa.Connection) -> str | None:
    """The database's revision; PRE_MIGRATION for an earlier release's database, None for an empty one."""
    from alembic.migration import MigrationContext

    from migrations import adopt

    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is None and adopt.is_pre_migration(connection):
        return PRE_MIGRATION
    return revision


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return revision_of(connection)


def upgrade(engine: Engine, revision: str = "head") -> Upgrade:
    """Upgrade the database to `revision` (default the newest), adopting a pre-migration database first.
    Safe to run twice and from several processes at once (they take turns on the schema lock)."""
    from alembic import command
    from alembic.migration import MigrationContext

    from migrations import adopt

    with _schema_lock(engine) as connection:
        before = revision_of(connection)
        adopted: tuple[str, ...] = ()
        if before == PRE_MIGRATION:
            adopted = tuple(adopt.adopt(connection))
            command.stamp(alembic_config(connection), "0001")
        command.upgrade(alembic_config(connection), revision)
        after = MigrationContext.configure(connection).get_current_revision()
    assert after is not None
    return Upgrade(before, after, adopted)


def prepare(engine: Engine) -> None:
    """What every process does at start: create an empty database's schema; accept one at the newest
    revision; refuse any other with the step that fixes it."""
    if _stamped_revision(engine) == migrations.HEAD:
        return
    from alembic import command
    from alembic.script import ScriptDirectory

    head = head_revision()
    with engine.connect() as connection:
        revision = revision_of(connection)
    if revision == head:
        return
    if revision is None:
        with _schema_lock(engine) as connection:  # two processes starting together: one creates, one waits
            if revision_of(connection) is None:
                command.upgrade(alembic_config(connection), "head")
                return
            revision = revision_of(connection)
        if revision == head:
            return
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if revision != PRE_MIGRATION and revision not in known:
        raise SchemaOutOfDateError(
            f"the database's schema is at revision {revision}, which this release does not know: it was "
            f"upgraded by a newer release; run that release (this one needs revision {head})")
    raise SchemaOutOfDateError(
        f"the database's schema is at revision {revision}; this release needs {head}. Stop every process of "
        f"the old release, then run `asr db upgrade` (docs/operations.md, Upgrades)")


def _stamped_revision(engine: Engine) -> str | None:
    """The revision in the database's `alembic_version` table, read without Alembic; None without one."""
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.DBAPIError:  # no such table: an empty database, or one an earlier release made
        return None


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[sa.Connection]:
    """A connection in a transaction, held by one process at a time: schema changes check, then change,
    so processes starting together would otherwise both try to create the same table."""
    database = engine.url.database
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:  # DDL is transactional there: the change appears at commit
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            yield connection
    elif engine.dialect.name == "sqlite" and database not in (None, "", ":memory:"):
        # A lock file beside the database, not the database itself: opening and closing the database file
        # would drop the POSIX locks SQLite holds on it in this process.
        create_private_file(f"{database}.schema-lock")  # 0600 like the database beside it
        with open(f"{database}.schema-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with engine.connect() as connection:
                # Off while the schema changes (SQLite ignores the pragma inside a transaction, so before
                # it): copying a table to change it drops the original, and with foreign keys on, dropping a
                # table deletes or refuses the rows that refer to it.
                connection.exec_driver_sql("PRAGMA foreign_keys = OFF")
                connection.commit()  # end the autobegun transaction the pragma opened
                try:
                    with connection.begin():
                        yield connection
                        problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if problems:
                            raise RuntimeError(f"the schema change left rows that break foreign keys: {problems}")
                finally:
                    connection.exec_driver_sql("PRAGMA foreign_keys = ON")
                    connection.commit()
    else:
        with engine.begin() as connection:
            yield connection
