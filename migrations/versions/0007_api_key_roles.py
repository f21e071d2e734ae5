"""API key roles: api_key.role, one of reader, operator or admin (models/apikeys.py).

Every key that exists before this revision becomes `admin`: before roles, any key could do everything
(register hosts, fail over, disable protection), so admin is the only role that changes nothing for the
deployments and scripts using them. Narrow them afterwards: revoke a key and create one with a smaller role.
Keys created from now on get the role they are created with (`asr apikey create NAME --role ...`).

Downgrading drops the column: every key can again do everything.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_key") as batch:
        batch.add_column(sa.Column("role", sa.String(16), nullable=True))
    op.execute(sa.text("UPDATE api_key SET role = 'admin'"))
    with op.batch_alter_table("api_key") as batch:
        batch.alter_column("role", existing_type=sa.String(16), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("api_key") as batch:
        batch.drop_column("role")
