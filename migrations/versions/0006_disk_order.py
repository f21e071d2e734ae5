"""Disk order: virtual_disk.position, a disk's place among its VM's disks as the host's manifest lists them.

A QEMU guest's first drive is its /dev/vda; a recovery VM (failover, failback with create_vm) is created with
its disks in this order, no longer in name order. Existing rows get 0, so their VMs keep name order until
their manifest is registered again (`asr vm add`), which sets the positions.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("virtual_disk") as batch:
        batch.add_column(sa.Column("position", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("virtual_disk") as batch:
        batch.drop_column("position")
