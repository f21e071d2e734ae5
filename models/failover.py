"""Failovers and failbacks of protected items: what each one did, from which recovery point, and what it
produced.

One row per operation (a drill, a planned or unplanned failover, a failback). It is the operator's record
and the drill report: the point used, the checksum-manifest roots the point promised and the ones the new
VM's disks hold, how long it took (RTO) and how much data it gave up (RPO).
"""
import enum
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, select

from models.db import UtcDateTime, clock_now, new_id, string_enum

__all__ = ["FailoverKind", "FailoverStatus", "FailoverRecord", "active_test_failover", "latest_failover",
           "failover_records", "last_successful_drill"]


class FailoverKind(enum.StrEnum):
    TEST = "test"
    PLANNED = "planned"
    UNPLANNED = "unplanned"
    FAILBACK = "failback"


class FailoverStatus(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    """The VM is up (at the recovery site, or on the primary for a failback); not committed yet."""
    COMMITTED = "committed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    CLEANED_UP = "cleaned_up"
    """A drill whose test VM was deleted."""


class FailoverRecord(SQLModel, table=True):
    __tablename__ = "failover"
    __table_args__ = (sa.Index("ix_failover_item_started", "item_id", "started_at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    item_id: str = Field(foreign_key="protected_item.id", max_length=36, ondelete="CASCADE")
    kind: FailoverKind = Field(sa_type=string_enum(FailoverKind))
    status: FailoverStatus = Field(default=FailoverStatus.IN_PROGRESS, sa_type=string_enum(FailoverStatus))
    job_id: str | None = Field(default=None, max_length=36)
    point_choice: str = Field(default="", max_length=64)
    """What the operator asked for: latest_processed, latest_app_consistent, latest, or a point id."""
    point_id: str | None = Field(default=None, max_length=36)
    point_created_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    point_kind: str | None = Field(default=None, max_length=32)
    versions: dict[str, int] = Field(default_factory=dict, sa_type=sa.JSON)
    """{disk_uuid: replica version restored}."""
    expected_roots: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    """{disk name: manifest root the point recorded}."""
    produced_roots: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    """{disk name: manifest root of the disk the operation wrote}."""
    verified: bool | None = Field(default=None)
    """Every produced root equals the expected one (None until the disks are written)."""
    target_host: str | None = Field(default=None, max_length=64)
    """Where the VM comes up: the recovery host (failover), or the primary or alternate host (failback)."""
    target_vm: str | None = Field(default=None, max_length=64)
    network: str | None = Field(default=None, max_length=64)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    """Per-operation facts: bytes moved, NIC placement, public addresses, failback mode, downtime..."""
    started_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)
    vm_up_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    rto_s: float | None = Field(default=None)
    """From the request to the VM running: for a QEMU guest, to its heartbeat on the console."""
    booted: bool | None = Field(default=None)
    """A QEMU guest: whether it reached its heartbeat; None for a synthetic VM (nothing boots)."""
    heartbeat_s: float | None = Field(default=None)
    """Seconds from the QEMU process's start to the guest's heartbeat."""
    boot_check: str | None = Field(default=None, max_length=16)
    """The guest's own application check: "passed", "failed", or "none" when its definition has none."""
    boot_detail: str | None = Field(default=None, max_length=2048)
    """The console line the check's verdict came from, or why the boot failed."""
    rpo_s: float | None = Field(default=None)
    """Data window lost: from the point's time to the moment the failover started."""


def active_test_failover(session: Session, item_id: str) -> FailoverRecord | None:
    """The item's drill whose test VM may still exist (not cleaned up)."""
    return session.exec(select(FailoverRecord).where(
        FailoverRecord.item_id == item_id, FailoverRecord.kind == FailoverKind.TEST,
        FailoverRecord.status != FailoverStatus.CLEANED_UP,
    ).order_by(FailoverRecord.started_at.desc())).first()


def latest_failover(session: Session, item_id: str, kinds: tuple[FailoverKind, ...]) -> FailoverRecord | None:
    return session.exec(select(FailoverRecord).where(
        FailoverRecord.item_id == item_id, FailoverRecord.kind.in_(kinds),
    ).order_by(FailoverRecord.started_at.desc(), FailoverRecord.id)).first()


def failover_records(session: Session, item_id: str, limit: int = 50) -> list[FailoverRecord]:
    """The item's drills, failovers and failbacks, newest first (at most `limit`)."""
    return list(session.exec(select(FailoverRecord).where(FailoverRecord.item_id == item_id)
                             .order_by(FailoverRecord.started_at.desc(), FailoverRecord.id).limit(limit)).all())


def last_successful_drill(session: Session, item_id: str) -> FailoverRecord | None:
    """The item's latest drill that passed, as the metrics count them (workflows.metrics.drill_passed): ended,
    its test VM up (vm_up_at, kept through cleanup) from disks matching the point's manifest roots."""
    return session.exec(select(FailoverRecord).where(
        FailoverRecord.item_id == item_id, FailoverRecord.kind == FailoverKind.TEST,
        FailoverRecord.status != FailoverStatus.IN_PROGRESS, FailoverRecord.verified.is_(True),
        FailoverRecord.vm_up_at.is_not(None),
    ).order_by(FailoverRecord.vm_up_at.desc(), FailoverRecord.id)).first()
