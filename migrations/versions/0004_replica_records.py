"""Replica records and consistency checks: the database is the source of truth for what the recovery side
holds, and replicas are compared with their sources on a policy schedule.

- replica_record: one row per protected disk, written by the steps that copy, resynchronize, ship, apply
  and repair (models/replicas.py); the recovery side's state.json is checked against it. Existing items
  get their rows when their next Ship step adopts their current state.json (tasks/replica_records.py):
  before this revision the state.json was the only record there was.
- replication_policy.consistency_check_interval_h (hours between checks, 0 off; existing policies get the
  default 24) and consistency_check_off_hours (scheduled checks wait for the end of office hours; true).
- protected_item.next_consistency_check_at: when the scheduler starts the next check; NULL until the
  scheduler first sees the item protected, which then schedules it one interval ahead.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replica_record",
        sa.Column("id", sa.String(36), primary_key=True, nullable=False),
        sa.Column("item_id", sa.String(36), sa.ForeignKey("protected_item.id", ondelete="CASCADE"), nullable=False),
        sa.Column("disk_uuid", sa.String(36), nullable=False),
        sa.Column("replica_name", sa.String(1024), nullable=False),
        sa.Column("initial_copy_done", sa.Boolean(), nullable=False),
        sa.Column("shipped_generation", sa.Integer(), nullable=False),
        sa.Column("applied_generation", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("manifest_root", sa.String(64), nullable=True),
        sa.Column("resync_reason", sa.String(2048), nullable=True),
        sa.Column("last_checked_at", sa.DateTime(), nullable=True),
        sa.Column("last_check", sa.JSON(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("item_id", "disk_uuid"),
    )
    op.create_index("ix_replica_record_item_id", "replica_record", ["item_id"])
    with op.batch_alter_table("replication_policy") as batch:
        batch.add_column(sa.Column("consistency_check_interval_h", sa.Integer(), nullable=False,
                                   server_default=sa.text("24")))
        batch.add_column(sa.Column("consistency_check_off_hours", sa.Boolean(), nullable=False,
                                   server_default=sa.true()))
    with op.batch_alter_table("protected_item") as batch:
        batch.add_column(sa.Column("next_consistency_check_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("protected_item") as batch:
        batch.drop_column("next_consistency_check_at")
    with op.batch_alter_table("replication_policy") as batch:
        batch.drop_column("consistency_check_off_hours")
        batch.drop_column("consistency_check_interval_h")
    op.drop_index("ix_replica_record_item_id", table_name="replica_record")
    op.drop_table("replica_record")
