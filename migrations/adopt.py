"""Bring a database made before migrations existed up to revision 0001, so the later revisions can run.

Releases before 0.1.0-with-migrations created tables with `create_all`, which adds missing tables but
never columns: such a database has no `alembic_version` and lacks whatever was added since it was made.
Adoption adds exactly that (tables, columns, indexes, wider text columns), compared against the frozen
baseline, then stamps 0001. It only adds: nothing an earlier release wrote is dropped or rewritten, except
the fill of new NOT NULL columns below.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

# New NOT NULL columns need a value for the rows already there: what those rows mean in today's terms.
_FILL = {
    # A job of an earlier release held at most one lock, in `lock_key`; `lock_keys` lists them all.
    ("job", "lock_keys"): "'[]'",
    # A recovery point of an earlier release names no replica versions (its data is the replica itself).
    ("recovery_point", "versions"): "'{}'",
}


def baseline_metadata() -> sa.MetaData:
    # versions/ is not an importable package name (its files start with digits): load 0001 by path.
    path = Path(__file__).parent / "versions" / "0001_baseline.py"
    spec = importlib.util.spec_from_file_location("asr_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.baseline_metadata()


def is_pre_migration(connection: sa.Connection) -> bool:
    """Tables of ours exist, but no `alembic_version`: a database an earlier release made."""
    names = set(sa.inspect(connection).get_table_names())
    return "alembic_version" not in names and bool(names & set(baseline_metadata().tables))


def adopt(connection: sa.Connection) -> list[str]:
    """Add what the baseline has and the database lacks; returns what was added, one line each."""
    metadata = baseline_metadata()
    inspector = sa.inspect(connection)
    existing = set(inspector.get_table_names())
    operations = Operations(MigrationContext.configure(connection))
    added: list[str] = []
    for table in metadata.sorted_tables:
        if table.name not in existing:
            table.create(connection)
            added.append(f"table {table.name}")
            continue
        columns = {column["name"]: column["type"] for column in inspector.get_columns(table.name)}
        missing = [column for column in table.columns if column.name not in columns]
        narrow = [column for column in table.columns
                  if column.name in columns and _narrower(columns[column.name], column.type)]
        if missing or narrow:
            # SQLite: copy the table with the new definition (ALTER there cannot add a foreign key or change
            # a type); PostgreSQL: plain ALTERs.
            recreate = "always" if connection.dialect.name == "sqlite" else "auto"
            with operations.batch_alter_table(table.name, recreate=recreate) as batch:
                for column in missing:
                    batch.add_column(_new_column(table, column))
                    added.append(f"column {table.name}.{column.name}")
                for column in narrow:
                    batch.alter_column(column.name, type_=column.type, existing_type=columns[column.name],
                                       existing_nullable=column.nullable)
                    added.append(f"column {table.name}.{column.name} widened to {column.type.length}")
        if any(column.name == "lock_keys" for column in missing) and table.name == "job":
            _fill_lock_keys(connection)
        indexes = {index["name"] for index in sa.inspect(connection).get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(connection)
                added.append(f"index {index.name}")
    return added


def _new_column(table: sa.Table, column: sa.Column) -> sa.Column:
    """A copy of the baseline's column (that one belongs to its table) whose server default fills the rows
    already there."""
    fill = _FILL.get((table.name, column.name))
    if not column.nullable and fill is None:
        raise RuntimeError(f"adoption cannot add NOT NULL column {table.name}.{column.name}: give it a fill value")
    # Named: a batch copy of a SQLite table refuses an unnamed constraint.
    foreign_keys = [sa.ForeignKey(key.target_fullname, ondelete=key.ondelete, name=f"fk_{table.name}_{column.name}")
                    for key in column.foreign_keys]
    return sa.Column(column.name, column.type, *foreign_keys, nullable=column.nullable,
                     server_default=sa.text(fill) if fill else None)


def _fill_lock_keys(connection: sa.Connection) -> None:
    update = sa.text("UPDATE job SET lock_keys = :keys WHERE id = :id").bindparams(sa.bindparam("keys", type_=sa.JSON))
    for job_id, lock_key in connection.execute(sa.text("SELECT id, lock_key FROM job WHERE lock_key IS NOT NULL")):
        connection.execute(update, {"keys": [lock_key], "id": job_id})


def _narrower(current: sa.types.TypeEngine, wanted: sa.types.TypeEngine) -> bool:
    have, need = getattr(current, "length", None), getattr(wanted, "length", None)
    return isinstance(wanted, sa.String) and have is not None and need is not None and have < need
