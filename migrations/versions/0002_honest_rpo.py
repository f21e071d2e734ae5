"""Honest RPO: the RPO is computed when read, policies carry RPO thresholds, items say when replication
last succeeded.

- protected_item.current_rpo_s is dropped: a stored RPO was refreshed only by a successful cycle, so a VM whose
  replication had stopped kept showing the RPO of its last cycle (workflows/rpo.py computes it when read).
- protected_item.last_replicated_at: when the latest point was applied at the recovery site. Filled from the
  latest point's time, the best this database knows of it.
- replication_policy.rpo_warning_s, rpo_critical_s: the RPO (seconds) from which an item is Warning,
  Critical; NULL means 2x and 4x the copy frequency, which is what every existing policy gets.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("protected_item") as batch:
        batch.add_column(sa.Column("last_replicated_at", sa.DateTime(), nullable=True))
        batch.drop_column("current_rpo_s")
    op.execute("UPDATE protected_item SET last_replicated_at = last_recovery_point_at")
    with op.batch_alter_table("replication_policy") as batch:
        batch.add_column(sa.Column("rpo_warning_s", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("rpo_critical_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replication_policy") as batch:
        batch.drop_column("rpo_critical_s")
        batch.drop_column("rpo_warning_s")
    with op.batch_alter_table("protected_item") as batch:
        batch.add_column(sa.Column("current_rpo_s", sa.Integer(), nullable=True))
        batch.drop_column("last_replicated_at")
