"""Alerts: what the engine told, or is telling, the operators' webhook.

One row per notification. A condition that holds (a VM Critical, its RPO past a threshold, a host agent
silent, a drill overdue) is *raised* once when it starts and *resolved* once when it ends: the rows of one
condition share its `key`, and the condition is active while its latest row is a raise. A failed failover
or failback is raised once and never resolved (it is an event, not a state).

Each row is delivered on its own, retried with back-off until a 2xx answer or the last attempt; what the
receiver answered is kept (`last_error`), so "did anyone hear about it" has an answer in the database.
"""
from __future__ import annotations

import enum
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.db import UtcDateTime, clock_now, new_id, string_enum

__all__ = ["Alert", "AlertEvent", "AlertKind"]


class AlertKind(enum.StrEnum):
    VM_CRITICAL = "vm_critical"
    RPO_THRESHOLD = "rpo_threshold"
    HOST_SILENT = "host_silent"
    OPERATION_FAILED = "operation_failed"
    DRILL_OVERDUE = "drill_overdue"


class AlertEvent(enum.StrEnum):
    RAISED = "raised"
    RESOLVED = "resolved"


class Alert(SQLModel, table=True):
    __tablename__ = "alert"
    __table_args__ = (sa.UniqueConstraint("open_key", name="uq_alert_open_key"),
                      sa.Index("ix_alert_key_created", "key", "created_at"),
                      sa.Index("ix_alert_undelivered", "delivered_at", "gave_up", "next_attempt_at"))

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    kind: AlertKind = Field(sa_type=string_enum(AlertKind))
    key: str = Field(max_length=255)
    """The condition: kind and subject (e.g. "vm_critical:ITEM_ID"); one per job for a failed operation."""
    event: AlertEvent = Field(sa_type=string_enum(AlertEvent))
    open_key: str | None = Field(default=None, max_length=255)
    """`key` on the raise of a condition while it holds (and forever for a failed operation), else None: unique,
    so two evaluations running at once cannot raise one condition twice."""
    severity: str = Field(max_length=16)
    """Critical, Warning, or Info (a resolution)."""
    subject: str = Field(max_length=255)
    """What it is about, as an operator names it: host/VM, a host's name, or a job's kind and id."""
    message: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    gave_up: bool = Field(default=False)
    last_error: str | None = Field(default=None, max_length=1024)
