"""Which conditions an operator must hear about, raised when they start and resolved when they end.

The scheduler's tick runs `raise_and_resolve_alerts`: it reads what holds now from the database (never from
an event that could be missed: a tick that did not run is made up by the next) and compares it with the
conditions raised and not yet resolved. The conditions, as the reference product mails them:

- vm_critical: a protected VM's health is Critical (its reasons in the message);
- rpo_threshold: its RPO is past its policy's Warning or Critical threshold (a Warning that turns Critical
  resolves the one and raises the other);
- host_silent: a host agent that was seen has not stamped its heartbeat for ASR_ALERT_HOST_SILENT_S;
- operation_failed: a failover, failback or recovery plan job failed (once per job, never resolved);
- drill_overdue: a protected VM has had no passed drill for its policy's drill_reminder_days (counted from
  its protection when it never had one).

Each raise and each resolution is an `Alert` row that workflows/webhook.py delivers.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
import sqlalchemy.exc
from sqlmodel import Session, select

from models.alerts import Alert, AlertEvent, AlertKind
from models.db import session_scope
from models.fabric import Host, VirtualMachine
from models.failover import FailoverKind, FailoverRecord
from models.jobs import Job, JobState
from models.policy import ReplicationPolicy
from models.protection import Health, ProtectedItem, ReplicationState
from workflows import clock, settings
from workflows.metrics import drill_passed
from workflows.rpo import RPO_CODE

FAILOVER_JOB_KINDS = frozenset({"planned_failover", "unplanned_failover", "test_failover", "failback",
                                "failback_completion", "commit_failover", "commit_failback"})
"""Jobs whose failure an operator must hear about at once (besides every recovery plan's, `plan_*`)."""
FAILED_JOBS_LOOKBACK = timedelta(days=7)
"""How far back failed jobs are looked for: longer than any outage of the engine itself."""
ONE_SHOT = frozenset({AlertKind.OPERATION_FAILED})
_REPLICATING = (ReplicationState.PROTECTED, ReplicationState.RESYNC_REQUIRED, ReplicationState.RESYNCHRONIZING)


@dataclass(frozen=True)
class Condition:
    kind: AlertKind
    key: str
    severity: str
    subject: str
    message: str


def raise_and_resolve_alerts(now: datetime | None = None) -> dict[str, int]:
    """Raise the conditions that hold and were not raised; resolve those raised that no longer hold.
    Returns counts by kind ("alerts_raised", "alerts_resolved")."""
    now = now or clock.now()
    report: Counter[str] = Counter()
    deliverable = settings.alert_webhook_url() is not None
    with session_scope() as session:
        holding = {condition.key: condition for condition in current_conditions(session, now)}
        raised = {alert.open_key: alert for alert in session.exec(select(Alert).where(Alert.open_key.is_not(None)))}
    for key, condition in holding.items():
        if key not in raised and _raise(condition, now, deliverable):
            report["alerts_raised"] += 1
    for key, alert in raised.items():
        if key not in holding and alert.kind not in ONE_SHOT and _resolve(alert, now, deliverable):
            report["alerts_resolved"] += 1
    return dict(report)


def _raise(condition: Condition, now: datetime, deliverable: bool) -> bool:
    try:
        with session_scope() as session:
            session.add(Alert(kind=condition.kind, key=condition.key, open_key=condition.key,
                              event=AlertEvent.RAISED, severity=condition.severity, subject=condition.subject,
                              message=condition.message, created_at=now, **_delivery(now, deliverable)))
    except sqlalchemy.exc.IntegrityError:
        return False  # another evaluation raised it first
    return True


def _resolve(alert: Alert, now: datetime, deliverable: bool) -> bool:
    with session_scope() as session:
        closed = session.exec(sa.update(Alert).where(Alert.id == alert.id, Alert.open_key.is_not(None))
                              .values(open_key=None)).rowcount
        if closed:
            session.add(Alert(kind=alert.kind, key=alert.key, event=AlertEvent.RESOLVED, severity="Info",
                              subject=alert.subject, message=f"resolved: {alert.message}", created_at=now,
                              **_delivery(now, deliverable)))
    return bool(closed)


def _delivery(now: datetime, deliverable: bool) -> dict[str, object]:
    if deliverable:
        return {"next_attempt_at": now}
    return {"last_error": "no webhook is configured (ASR_ALERT_WEBHOOK_URL): not sent"}


def current_conditions(session: Session, now: datetime) -> list[Condition]:
    """Every condition that holds at `now`."""
    return [*_item_conditions(session, now), *_silent_hosts(session, now), *_failed_operations(session, now)]


def _item_conditions(session: Session, now: datetime) -> list[Condition]:
    rows = session.exec(select(ProtectedItem, VirtualMachine.name, Host.name, ReplicationPolicy)
                        .join(VirtualMachine, VirtualMachine.id == ProtectedItem.vm_id)
                        .join(Host, Host.id == VirtualMachine.host_id)
                        .join(ReplicationPolicy, ReplicationPolicy.id == ProtectedItem.policy_id)
                        .where(ProtectedItem.replication_state != ReplicationState.DISABLED)).all()
    drilled = _last_passed_drills(session)
    conditions = []
    for item, vm_name, host_name, policy in rows:
        subject = f"{host_name}/{vm_name}"
        if item.health == Health.CRITICAL:
            reasons = "; ".join(e["message"] for e in item.health_errors if e.get("severity") == Health.CRITICAL)
            conditions.append(Condition(AlertKind.VM_CRITICAL, f"vm_critical:{item.id}", str(Health.CRITICAL),
                                        subject, f"VM {subject} is Critical: {reasons or 'no reason recorded'}"))
        rpo = next((e for e in item.health_errors if e.get("code") == RPO_CODE), None)
        if rpo is not None:
            conditions.append(Condition(AlertKind.RPO_THRESHOLD, f"rpo_threshold:{item.id}:{rpo['severity']}",
                                        rpo["severity"], subject, f"VM {subject}: {rpo['message']}"))
        overdue = _drill_overdue(item, policy, drilled.get(item.id), now)
        if overdue is not None and item.replication_state in _REPLICATING:
            conditions.append(Condition(
                AlertKind.DRILL_OVERDUE, f"drill_overdue:{item.id}", str(Health.WARNING), subject,
                f"VM {subject}: {overdue}; run one with `asr failover test {subject}`"))
    return conditions


def _last_passed_drills(session: Session) -> dict[str, datetime]:
    last: dict[str, datetime] = {}
    rows = session.exec(select(FailoverRecord.item_id, FailoverRecord.status, FailoverRecord.vm_up_at,
                               FailoverRecord.verified).where(FailoverRecord.kind == FailoverKind.TEST)).all()
    for item_id, status, vm_up_at, verified in rows:
        if drill_passed(status, vm_up_at, verified) and (item_id not in last or vm_up_at > last[item_id]):
            last[item_id] = vm_up_at
    return last


def _drill_overdue(item: ProtectedItem, policy: ReplicationPolicy, last_passed: datetime | None,
                   now: datetime) -> str | None:
    if policy.drill_reminder_days <= 0:
        return None
    since = last_passed or item.created_at
    # Days scale with ASR_TIME_SCALE like every other engine delay, so a test can see a reminder come due.
    if now - since < timedelta(seconds=clock.scaled(policy.drill_reminder_days * 86400)):
        return None
    if last_passed is None:
        return f"no drill passed since its protection began ({since.isoformat(timespec='seconds')})"
    return f"its last passed drill was at {since.isoformat(timespec='seconds')}, over " \
           f"{policy.drill_reminder_days} days ago (policy {policy.name})"


def _silent_hosts(session: Session, now: datetime) -> list[Condition]:
    silent_after = timedelta(seconds=settings.alert_host_silent_s())
    hosts = session.exec(select(Host).where(Host.last_seen_at.is_not(None), Host.last_seen_at < now - silent_after))
    return [Condition(AlertKind.HOST_SILENT, f"host_silent:{host.id}", str(Health.CRITICAL), host.name,
                      f"the agent of host {host.name} has not been heard from since "
                      f"{host.last_seen_at.isoformat(timespec='seconds')}: its VMs do not replicate; start it "
                      f"(`asr worker host {host.name}`) or fail its VMs over")
            for host in hosts]


def _failed_operations(session: Session, now: datetime) -> list[Condition]:
    jobs = session.exec(select(Job).where(
        Job.state == JobState.failed, Job.ended_at >= now - FAILED_JOBS_LOOKBACK,
        sa.or_(Job.kind.in_(FAILOVER_JOB_KINDS), Job.kind.like("plan\\_%", escape="\\")),
    ).order_by(Job.ended_at)).all()
    return [Condition(AlertKind.OPERATION_FAILED, f"operation_failed:{job.id}", str(Health.CRITICAL),
                      f"{job.kind} {job.target or ''}".strip(),
                      f"job {job.id} ({job.kind}{', ' + job.target if job.target else ''}) failed: "
                      f"{(job.error or 'no error recorded')[:500]}; see `asr jobs show {job.id}`")
            for job in jobs]
