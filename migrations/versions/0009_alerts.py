"""Alerts: the `alert` table (each notification raised or resolved, and its delivery to the operators'
webhook) and replication_policy.drill_reminder_days (after how many days without a passed drill an alert says
one is overdue; 180, as the reference product recommends a drill every six months).

Existing policies get 180. Downgrading drops the table and the column (alerts not yet delivered are lost).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("event", sa.String(length=8), nullable=False),
        sa.Column("open_key", sa.String(length=255), nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.Column("gave_up", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.String(length=1024), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("open_key", name="uq_alert_open_key"),
    )
    op.create_index("ix_alert_key_created", "alert", ["key", "created_at"])
    op.create_index("ix_alert_undelivered", "alert", ["delivered_at", "gave_up", "next_attempt_at"])
    with op.batch_alter_table("replication_policy") as batch:
        batch.add_column(sa.Column("drill_reminder_days", sa.Integer(), nullable=False, server_default=sa.text("180")))


def downgrade() -> None:
    with op.batch_alter_table("replication_policy") as batch:
        batch.drop_column("drill_reminder_days")
    op.drop_index("ix_alert_undelivered", table_name="alert")
    op.drop_index("ix_alert_key_created", table_name="alert")
    op.drop_table("alert")
