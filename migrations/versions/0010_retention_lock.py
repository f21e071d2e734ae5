"""Immutable retention: replication_policy.retention_lock_h (hours each recovery point made under the policy
cannot be deleted; 0 = off) and recovery_point.locked_until (that point's own lock end, fixed when it was
recorded).

Existing policies get 0 (no lock) and existing points no lock: nothing that could be deleted before the
upgrade becomes undeletable by it. Downgrading drops both columns, and with them every lock.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("replication_policy") as batch:
        batch.add_column(sa.Column("retention_lock_h", sa.Integer(), nullable=False, server_default=sa.text("0")))
    with op.batch_alter_table("recovery_point") as batch:
        batch.add_column(sa.Column("locked_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recovery_point") as batch:
        batch.drop_column("locked_until")
    with op.batch_alter_table("replication_policy") as batch:
        batch.drop_column("retention_lock_h")
