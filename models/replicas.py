"""What the recovery side holds, per protected disk, as the steps that changed it recorded it.

The recovery side keeps a state object beside each replica (`<disk>.vhd.state.json`), but that object is
only a file on a storage account: anything with write access can change it, and a wrong one made
replication ship nothing, apply nothing and acknowledge (delete) the host's logs while health stayed
Healthy. So the database is the source of truth: every step that ships, applies, copies, resynchronizes
or repairs records here what it did, the next step compares the recovery side's state with this record
(`datapath.statecheck`) and refuses one that disagrees, and the host deletes a log only when this record
says it was applied.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, select

from models.db import UtcDateTime, clock_now, new_id

__all__ = ["ReplicaRecord", "replica_record", "replica_records"]


class ReplicaRecord(SQLModel, table=True):
    __tablename__ = "replica_record"
    __table_args__ = (sa.UniqueConstraint("item_id", "disk_uuid"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    item_id: str = Field(foreign_key="protected_item.id", index=True, max_length=36, ondelete="CASCADE")
    disk_uuid: str = Field(max_length=36)
    replica_name: str = Field(max_length=1024)
    """The replica disk's object name on the recovery storage (`<host>/<vm>/<disk>.vhd`)."""
    initial_copy_done: bool = Field(default=False)
    shipped_generation: int = Field(default=0)
    """The highest log generation the Ship step uploaded."""
    applied_generation: int = Field(default=0)
    """Every write up to the end of this generation is in the replica (the Apply, Copy, Resynchronize
    steps say so)."""
    version: int = Field(default=0)
    """The replica's content version (datapath.points): one per applied log, resync or repair."""
    manifest_root: str | None = Field(default=None, max_length=64)
    copy_started_generation: int = Field(default=0, sa_column_kwargs={"server_default": sa.text("0")})
    """The snapshot the initial copy in progress copies (its first generation after the snapshot)."""
    copy_checkpoint: int = Field(default=0, sa_type=sa.BigInteger, sa_column_kwargs={"server_default": sa.text("0")})
    """The offset below which that copy is durable, as the Copy disk step recorded it: a resumed copy trusts
    the recovery side's checkpoint only up to this one."""
    resync_reason: str | None = Field(default=None, max_length=2048)
    """Why the disk needs resynchronization (its recovery-side state was refused); None when it does not."""
    last_checked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    """When a consistency check last compared this replica with its source."""
    last_check: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    """That check's report (datapath.consistency.ConsistencyReport.as_result): generation, drifted chunks."""
    updated_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)


def replica_record(session: Session, item_id: str, disk_uuid: str, replica_name: str) -> ReplicaRecord:
    """The disk's record, created (nothing recorded yet) when it has none."""
    record = session.exec(select(ReplicaRecord).where(
        ReplicaRecord.item_id == item_id, ReplicaRecord.disk_uuid == disk_uuid)).first()
    if record is None:
        record = ReplicaRecord(item_id=item_id, disk_uuid=disk_uuid, replica_name=replica_name)
        session.add(record)
        session.flush()
    return record


def replica_records(session: Session, item_id: str) -> list[ReplicaRecord]:
    """The records of every disk of the item."""
    return list(session.exec(select(ReplicaRecord).where(ReplicaRecord.item_id == item_id)
                             .order_by(ReplicaRecord.replica_name)))
