"""Real guests: a VM's QEMU guest definition, and what a failover's boot check found.

- virtual_machine.guest: how the VM boots (sites/host/guestdef.py) with its boot files' SHA-256; NULL for the
  synthetic VMs every earlier VM is.
- failover.booted, heartbeat_s, boot_check, boot_detail: the recovery VM's boot check; NULL for the
  failovers of synthetic VMs (before this revision, every failover).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("virtual_machine") as batch:
        batch.add_column(sa.Column("guest", sa.JSON(), nullable=True))
    with op.batch_alter_table("failover") as batch:
        batch.add_column(sa.Column("booted", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("heartbeat_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("boot_check", sa.String(16), nullable=True))
        batch.add_column(sa.Column("boot_detail", sa.String(2048), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("failover") as batch:
        for column in ("boot_detail", "boot_check", "heartbeat_s", "booted"):
            batch.drop_column(column)
    with op.batch_alter_table("virtual_machine") as batch:
        batch.drop_column("guest")
