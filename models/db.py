"""The database: engines, sessions, and the column types every table shares.

The database is the source of truth for sites, hosts, protected items and jobs. Several worker
processes write to it at once, so SQLite runs in WAL mode (readers never block the writer) with a busy
timeout (a writer waits for the lock instead of failing at once); PostgreSQL is used by URL.
"""
from __future__ import annotations

import enum
import os
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from datapath.private import create_private_file, make_private_directories
from workflows import clock, settings, transport

# Names of sites, hosts, VMs, disks, networks and policies become path segments and object names (see
# sites.host and sites.storage.base): the same rule everywhere, so whatever is registered can be protected.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def new_id() -> str:
    """A new primary key: a random UUID as text, the same on every database."""
    return str(uuid.uuid4())


def validate_name(name: object, kind: str) -> str:
    """`name` if it is 1 to 64 letters, digits, '.', '_' or '-' not starting with '.', '_' or '-';
    ValueError naming the `kind` of thing otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # fullmatch: "$" would let "name\n" through
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit"
        )
    return name


def clock_now() -> datetime:
    """Now, from the engine clock; looked up at each call, so whatever clock a test sets is used."""
    return clock.now()


def database_now(session: Session | sa.Connection) -> datetime:
    """Now on the database's clock, an aware UTC datetime: the one clock RPO is measured by, so hosts and
    orchestration processes whose clocks disagree still agree on a point's age.

    PostgreSQL asks the server (`clock_timestamp()`: the moment of the query, not the transaction's start).
    SQLite has no server: its 'now' is the calling process's clock, which every process sharing the file
    shares with it (they are on one machine)."""
    connection = session.connection() if isinstance(session, Session) else session
    dialect = connection.dialect.name
    if dialect == "postgresql":
        query = sa.text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")
    elif dialect == "sqlite":
        query = sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")
    else:
        query = sa.select(sa.func.current_timestamp())
    value = connection.execute(query).scalar_one()
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return as_utc(value)


def as_utc(when: datetime) -> datetime:
    """`when` as an aware UTC datetime; a naive datetime is taken to be UTC already (the convention of
    every timestamp in this project)."""
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


class UtcDateTime(sa.types.TypeDecorator):
    """A UTC instant, stored without a zone and read back as an aware UTC datetime on every database.

    SQLite has no zone-aware type and PostgreSQL's would convert by the session's zone; storing naive UTC
    and re-attaching UTC on read gives the same values, comparable with each other, everywhere."""

    impl = sa.DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {value!r}")
        return as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def string_enum(enum_class: type[enum.Enum]) -> sa.Enum:
    """A column type storing the enum's values as plain text (no database enum type to migrate)."""
    return sa.Enum(
        enum_class,
        native_enum=False,
        length=max(len(member.value) for member in enum_class),
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


def database_url() -> str:
    """`ASR_DATABASE_URL`, or a SQLite file `asr.db` in `ASR_HOME` (default ~/.asr)."""
    url = settings.database_url_setting()
    if url:
        return url
    home = settings.asr_home()
    make_private_directories(home)  # 0700 when created here: the database, beat's schedule
    return f"sqlite:///{home / 'asr.db'}"


def _with_driver(url: str) -> str:
    """Plain `postgresql://` URLs would pick psycopg2, which is not installed: use psycopg (3)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _create_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        # Over a network only with TLS (sslmode=verify-full), unless ASR_INSECURE_TRANSPORT allows plain text.
        transport.check_database_url("ASR_DATABASE_URL", url)
        # pre_ping: a pooled connection the server closed (restart, idle timeout) is replaced, not used.
        return sa.create_engine(url, pool_pre_ping=True, connect_args=transport.database_connect_args(url))
    busy_timeout_s = settings.sqlite_busy_timeout_s()
    engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_s})
    database = sa.engine.make_url(url).database

    @sa.event.listens_for(engine, "do_connect")
    def _private_file(*_args: Any) -> None:
        # Created 0600 just before SQLite opens it (its -wal and -shm files take the database file's mode):
        # the database holds API key hashes and what every replica holds. SQLite then opens it as usual.
        if database and database != ":memory:" and not database.startswith("file:"):
            create_private_file(database)

    @sa.event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if url not in ("sqlite://", "sqlite:///:memory:"):
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    return engine


def get_engine(url: str | None = None) -> Engine:
    """The engine for `url` (default: `database_url()`), one per URL and process."""
    url = _with_driver(url or database_url())
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create_engine(url)
        return engine


def dispose_engines() -> None:
    """Close every engine's pooled connections and forget the engines."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.dispose()


def _forget_inherited_connections() -> None:
    # A forked worker child must not use the parent's pooled connections (the two would interleave on
    # one socket or SQLite handle); close=False leaves them open for the parent that owns them.
    for engine in list(_engines.values()):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def init_db(engine: Engine | None = None) -> Engine:
    """Make sure the database has the schema this release needs: an empty one is created at the newest
    revision; an older one raises models.schema.SchemaOutOfDateError naming the upgrade step."""
    from models import schema  # imports the migrations, which import every model

    engine = engine or get_engine()
    schema.prepare(engine)
    return engine


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits when the block ends normally and rolls back when it raises.

    Objects stay readable after the block (no expiry on commit), so a function can return what it
    created; reload them in a new scope before changing them again."""
    session = Session(engine or get_engine(), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
