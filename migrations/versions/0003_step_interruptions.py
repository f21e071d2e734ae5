"""Job steps count broker-outage interruptions apart from deaths.

`job_step.interruptions` counts the runs a broker outage ended (their worker vanished while its broker
connection was down); `job_step.broker_lost_at` is when the worker running the step lost its broker
connection, cleared when it reconnects or the step is claimed again. Existing steps have had no
interruptions counted: 0 and NULL.

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite alters a table by copying it (it has no DROP COLUMN before 3.35, which downgrade
    # needs); on PostgreSQL the same code runs as plain ALTER TABLE. The server default fills existing rows.
    with op.batch_alter_table("job_step") as batch:
        batch.add_column(sa.Column("interruptions", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("broker_lost_at", sa.DateTime(timezone=False), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_step") as batch:
        batch.drop_column("broker_lost_at")
        batch.drop_column("interruptions")
