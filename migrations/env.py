"""Alembic's entry point: run the revisions on the connection `models.schema` hands over.

Only online runs on a given connection: every caller (`asr db upgrade`, `init_db`, the tests) already holds
an engine and the schema lock, so the migration runs inside that lock and that transaction.
"""
from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import models  # noqa: F401  (registers every table: autogenerate compares the revisions with them)

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `asr db upgrade` (models.schema), which passes the connection")

context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    # SQLite cannot ALTER most things: batch mode copies the table, which is what render_as_batch writes.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
