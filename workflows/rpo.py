"""Honest RPO: how many seconds of a protected VM's writes a failover now would lose, and the health it makes.

The RPO is now minus the latest recovery point's time, computed whenever it is read, never stored: a VM
whose replication stopped has an RPO that keeps growing though no cycle runs. Both times are on the
database's clock (`models.db.database_now`): a point's time is taken from it just before the host seals
the point's logs, so a host whose clock is off by minutes changes nothing.

Each policy has a warning and a critical threshold (default 2× and 4× its copy frequency; scaled by
ASR_TIME_SCALE like the copy frequency they follow). While an item replicates (protected, resync required,
resynchronizing), an RPO past a threshold makes it Warning or Critical with the reason as the health error
`rpo_exceeded`; the next recovery point clears it. `check_rpo` (the scheduler's tick) applies this to every
item even when no cycle runs; the end of each cycle applies it at once.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from models.db import as_utc, database_now, session_scope
from models.policy import RPO_CRITICAL_FACTOR, RPO_WARNING_FACTOR, ReplicationPolicy
from models.protection import Health, ProtectedItem, ReplicationState, mark_critical, mark_healthy, mark_warning
from workflows import clock

RPO_CODE = "rpo_exceeded"
MEASURED_STATES = frozenset({
    ReplicationState.PROTECTED, ReplicationState.RESYNC_REQUIRED, ReplicationState.RESYNCHRONIZING,
})
"""The states in which the primary is meant to be replicating, so a growing RPO is data at risk. Before the
first point (initial replication) there is no RPO; after a failover the recovery VM is the VM."""


@dataclass(frozen=True)
class RpoThresholds:
    """The RPO in seconds from which an item is Warning, Critical (after ASR_TIME_SCALE)."""

    warning_s: float
    critical_s: float
    warning_derived: bool
    """Whether the warning threshold is the default derived from the copy frequency (the policy sets none)."""
    critical_derived: bool


@dataclass(frozen=True)
class RpoHealth:
    """What an item's RPO says of its health: Healthy (message None) or Warning/Critical with the reason."""

    severity: Health
    message: str | None


def thresholds(policy: ReplicationPolicy) -> RpoThresholds:
    warning, critical = policy.rpo_thresholds_s()
    return RpoThresholds(clock.scaled(warning), clock.scaled(critical), warning_derived=policy.rpo_warning_s is None,
                         critical_derived=policy.rpo_critical_s is None)


def rpo_s(latest_point_at: datetime | None, now: datetime) -> float | None:
    """Seconds from the latest recovery point to `now` (both on the database's clock); None without a point."""
    if latest_point_at is None:
        return None
    return round((as_utc(now) - as_utc(latest_point_at)).total_seconds(), 1)


def assess(item: ProtectedItem, policy: ReplicationPolicy, now: datetime) -> RpoHealth:
    """The health the item's RPO at `now` calls for."""
    rpo = rpo_s(item.last_recovery_point_at, now)
    if ReplicationState(item.replication_state) not in MEASURED_STATES or rpo is None:
        return RpoHealth(Health.HEALTHY, None)
    limits = thresholds(policy)
    if rpo >= limits.critical_s:
        severity, level, limit = Health.CRITICAL, "critical", limits.critical_s
        origin = f" ({RPO_CRITICAL_FACTOR}x the copy frequency)" if limits.critical_derived else ""
    elif rpo >= limits.warning_s:
        severity, level, limit = Health.WARNING, "warning", limits.warning_s
        origin = f" ({RPO_WARNING_FACTOR}x the copy frequency)" if limits.warning_derived else ""
    else:
        return RpoHealth(Health.HEALTHY, None)
    # No live number in the message: it stays the same while the RPO grows, so the entry is written once per
    # crossing, not at every tick (the RPO itself is shown beside it).
    replicated = item.last_replicated_at.isoformat() if item.last_replicated_at is not None else "never"
    return RpoHealth(severity, (
        f"RPO passed the {level} threshold of {duration(limit)}{origin}: no recovery point since "
        f"{as_utc(item.last_recovery_point_at).isoformat()}; replication last succeeded at {replicated}"
    ))


def apply_rpo_health(session: Session, item: ProtectedItem, policy: ReplicationPolicy,
                     now: datetime) -> RpoHealth | None:
    """Record what `assess` says as the item's `rpo_exceeded` error, or clear it; returns what it recorded,
    or None when the item already said so."""
    wanted = assess(item, policy, now)
    if _recorded(item) == _entry(wanted):
        return None
    if wanted.message is None:
        mark_healthy(session, item, RPO_CODE)
    elif wanted.severity is Health.CRITICAL:
        mark_critical(session, item, RPO_CODE, wanted.message)
    else:
        mark_warning(session, item, RPO_CODE, wanted.message)
    return wanted


def check_rpo() -> dict[str, int]:
    """Bring every protected item's RPO health up to date (the scheduler's tick runs it). Returns how many
    items it changed, by the health their RPO now gives them ("rpo_warning", "rpo_critical", "rpo_healthy")."""
    report: Counter[str] = Counter()
    with session_scope() as session:
        now = database_now(session)
        rows = session.exec(select(ProtectedItem, ReplicationPolicy)
                            .join(ReplicationPolicy, ReplicationPolicy.id == ProtectedItem.policy_id)
                            .where(ProtectedItem.replication_state != ReplicationState.DISABLED)).all()
        changing = [item.id for item, policy in rows if _recorded(item) != _entry(assess(item, policy, now))]
    for item_id in changing:
        # One short transaction per item, its row locked (PostgreSQL): a cycle's own health update may run at
        # the same moment, and neither may lose the other's errors.
        with session_scope() as session:
            item = session.get(ProtectedItem, item_id, with_for_update=True)
            if item is None:
                continue
            policy = session.get(ReplicationPolicy, item.policy_id)
            recorded = apply_rpo_health(session, item, policy, database_now(session))
            if recorded is not None:
                report[f"rpo_{str(recorded.severity).lower()}"] += 1
    return dict(report)


def _recorded(item: ProtectedItem) -> tuple[str, str] | None:
    error = next((error for error in item.health_errors if error["code"] == RPO_CODE), None)
    return None if error is None else (error["severity"], error["message"])


def _entry(health: RpoHealth) -> tuple[str, str] | None:
    return None if health.message is None else (str(health.severity), health.message)


def rpo_status(item: ProtectedItem, policy: ReplicationPolicy, now: datetime) -> dict[str, Any]:
    """What the portal shows of an item's RPO at `now` (database clock): the RPO, the thresholds it is held
    to, and when replication last succeeded."""
    limits = thresholds(policy)
    return {
        "rpo_s": rpo_s(item.last_recovery_point_at, now),
        "rpo_warning_s": _whole(limits.warning_s),
        "rpo_critical_s": _whole(limits.critical_s),
        "last_replicated_at": None if item.last_replicated_at is None else item.last_replicated_at.isoformat(),
    }


def _whole(seconds: float) -> float | int:
    return int(seconds) if float(seconds).is_integer() else seconds


def duration(seconds: float) -> str:
    """`seconds` for people: "45 s", "10 min", "1 h 30 min"."""
    whole = round(seconds)
    if whole < 120:
        return f"{seconds:g} s" if whole < 10 else f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 120:
        return f"{minutes} min" + (f" {secs} s" if secs else "")
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h" + (f" {minutes} min" if minutes else "")
