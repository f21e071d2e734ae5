"""Initial copy checkpoints in the database: replica_record.copy_started_generation and copy_checkpoint.

A copy interrupted and run again resumed from the checkpoint in the replica's state on the recovery storage
alone: a state edited there to a later checkpoint left the replica's bytes below it uncopied (whatever the
storage held), and the manifest computed from them made that content the recorded root. The Copy disk step
now records each checkpoint it saves here too, and a resumed copy trusts the stored checkpoint only up to
this one (docs/architecture.md, "The database is the source of truth").

Rows existing before this revision get 0 and 0: a copy in progress then starts again from the beginning of
its snapshot once (nothing is lost, only time). Downgrading drops the columns.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("replica_record") as batch:
        batch.add_column(sa.Column("copy_started_generation", sa.Integer(), nullable=False,
                                   server_default=sa.text("0")))
        batch.add_column(sa.Column("copy_checkpoint", sa.BigInteger(), nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("replica_record") as batch:
        batch.drop_column("copy_checkpoint")
        batch.drop_column("copy_started_generation")
