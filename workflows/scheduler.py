"""The replication scheduler: beat's tick starts what is due.

`run_scheduler` (the beat task `asr.replication.tick`, every ASR_TICK_S) starts delta cycles of protected
items whose copy frequency has passed, scheduled initial replications that are due, automatic resyncs
whose slot has come, only outside the policy's office hours, and consistency checks every policy
`consistency_check_interval_h` (outside office hours unless the policy says otherwise). A check due
goes before a delta cycle due: it ships and applies the logs too. Busy items are skipped: they are due
again at the next tick. The same tick then runs `workflows.rpo.check_rpo`, which turns items whose RPO
passed a threshold Warning or Critical whether or not a cycle runs.
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import select

from models.db import as_utc, session_scope
from models.jobs import JobLock
from models.policy import ReplicationPolicy
from models.protection import InvalidStateError, ProtectedItem, ReplicationState, item_lock_key
from workflows import clock, settings
from workflows.engine import ORCHESTRATION_QUEUE, ItemBusyError
from workflows.items import ItemView, view_of
from workflows.kinds import consistency_check, delta_replication, initial_replication, resynchronize

TICK_TASK = "asr.replication.tick"
DELIVER_ALERTS_TASK = "asr.alerts.deliver"


def beat_schedule() -> dict[str, dict[str, Any]]:
    """Beat's entries for the tick and, with a webhook, the delivery of alerts (worker.py adds them). A tick
    that waited a whole period is dropped: the next one is already on its way."""
    interval = settings.tick_interval_s()
    options = {"queue": ORCHESTRATION_QUEUE, "expires": interval, "ignore_result": True}
    schedule = {"replication-tick": {"task": TICK_TASK, "schedule": interval, "options": options}}
    # Alerts are sent only where a webhook is configured (beat reads the deployment's settings too): without
    # one, no task a tick for nothing.
    if settings.alert_webhook_url() is not None:
        schedule["alerts-delivery"] = {"task": DELIVER_ALERTS_TASK, "schedule": interval, "options": options}
    return schedule


def run_scheduler(now: datetime | None = None) -> dict[str, int]:
    """Start what is due at `now` (default: the clock). Returns counts of what it did."""
    now = as_utc(now) if now is not None else clock.now()
    report: Counter[str] = Counter()
    report["consistency_check_scheduled"] += _schedule_consistency_checks(now)
    with session_scope() as session:
        due = session.exec(select(ProtectedItem.id, ProtectedItem.replication_state).where(sa.or_(
            sa.and_(ProtectedItem.replication_state == ReplicationState.PROTECTED,
                    sa.or_(ProtectedItem.next_delta_at <= now, ProtectedItem.next_consistency_check_at <= now)),
            sa.and_(ProtectedItem.replication_state == ReplicationState.INITIAL_REPLICATION_PENDING,
                    ProtectedItem.initial_replication_at <= now),
            sa.and_(ProtectedItem.replication_state == ReplicationState.RESYNC_REQUIRED,
                    ProtectedItem.resync_scheduled_for <= now),
        ))).all()
        locked = set(session.exec(select(JobLock.lock_key)).all())
    for item_id, state in due:
        if item_lock_key(item_id) in locked:
            report["busy"] += 1
            continue
        report[_start_due(item_id, ReplicationState(state), now)] += 1
    return {name: count for name, count in report.items() if count}


def _schedule_consistency_checks(now: datetime) -> int:
    """Give every protected item without a scheduled check one, a policy interval from now (an item just
    protected, or one whose policy turned checks on). Returns how many."""
    with session_scope() as session:
        rows = session.exec(select(ProtectedItem, ReplicationPolicy).join(
            ReplicationPolicy, ReplicationPolicy.id == ProtectedItem.policy_id).where(
            ProtectedItem.replication_state == ReplicationState.PROTECTED,
            ProtectedItem.next_consistency_check_at.is_(None),
            ReplicationPolicy.consistency_check_interval_h > 0)).all()
        for item, policy in rows:
            item.next_consistency_check_at = now + timedelta(
                seconds=clock.scaled(policy.consistency_check_interval_h * 3600))
            session.add(item)
    return len(rows)


def _consistency_check_due(view: ItemView, now: datetime) -> bool:
    due = view.item.next_consistency_check_at
    policy = view.policy
    return (due is not None and due <= now and policy.consistency_check_interval_h > 0
            and not (policy.consistency_check_off_hours and policy.in_office_hours(now)))


def _start_due(item_id: str, state: ReplicationState, now: datetime) -> str:
    try:
        if state is ReplicationState.PROTECTED:
            view = view_of(item_id)
            if _consistency_check_due(view, now):
                consistency_check.start(item_id)
                return "consistency_check_started"
            if view.item.next_delta_at is None or view.item.next_delta_at > now:
                return "consistency_check_waiting_for_office_hours_to_end"
            delta_replication.start(item_id)
            return "delta_started"
        if state is ReplicationState.INITIAL_REPLICATION_PENDING:
            initial_replication.start(item_id)
            return "initial_replication_started"
        if view_of(item_id).policy.in_office_hours(now):
            return "resync_waiting_for_office_hours_to_end"
        resynchronize.start(item_id, manual=False)
        return "resync_started"
    except ItemBusyError:
        return "busy"
    except InvalidStateError:
        return "state_changed"  # another process moved the item meanwhile
