"""Replication policies: how often changes are copied, how long recovery points are kept, when initial
replication starts, when automatic resynchronization may run (outside office hours, as the reference
does, so a resync's read load does not hit users), the RPO that turns health Warning or Critical, and how
often the end-to-end consistency check compares every replica with its source (outside office hours by
default: it reads every disk whole)."""
from collections.abc import Iterable
from datetime import UTC, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, select

from datapath.errors import NonRecoverableError
from models.db import UtcDateTime, as_utc, clock_now, new_id, validate_name

__all__ = [
    "ReplicationPolicy", "create_policy", "update_policy", "POLICY_SETTINGS",
    "COPY_FREQUENCIES_S", "MAX_RETENTION_H", "MAX_APP_CONSISTENT_H",
    "MAX_INITIAL_REPLICATION_DELAY", "WEEKDAY_NAMES", "RPO_WARNING_FACTOR", "RPO_CRITICAL_FACTOR",
    "MAX_RPO_THRESHOLD_S", "MAX_RETENTION_LOCK_H", "RetentionLockError",
]

COPY_FREQUENCIES_S = (30, 300, 900)
DEFAULT_COPY_FREQUENCY_S = 300
MAX_RETENTION_H = 24
DEFAULT_RETENTION_H = 2
MAX_APP_CONSISTENT_H = 12
DEFAULT_APP_CONSISTENT_H = 1
MAX_INITIAL_REPLICATION_DELAY = timedelta(hours=24)
DEFAULT_OFFICE_HOURS = (time(8, 0), time(18, 0))
WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DEFAULT_OFFICE_DAYS = (0, 1, 2, 3, 4)
# A cycle's point ages by one copy frequency before the next cycle starts, plus the cycle itself: twice the
# frequency means a cycle was missed or is slow, four times that replication has stopped.
RPO_WARNING_FACTOR = 2
RPO_CRITICAL_FACTOR = 4
MAX_RPO_THRESHOLD_S = 7 * 24 * 3600
DEFAULT_CONSISTENCY_CHECK_H = 24
# The reference product recommends a test failover every six months: an alert says when one is overdue.
DEFAULT_DRILL_REMINDER_DAYS = 180
MAX_DRILL_REMINDER_DAYS = 3660
MAX_CONSISTENCY_CHECK_H = 24 * 7
# Immutable retention: a year at most, as backup products offer against ransomware.
MAX_RETENTION_LOCK_H = 24 * 365


class RetentionLockError(NonRecoverableError):
    """Refused by a retention lock: lowering or turning off a policy's lock, or deleting (or disabling the
    protection that holds) recovery points still inside theirs. A conflict with the state of things, not bad
    input: nobody, admin included, can do it until the lock ends."""


class ReplicationPolicy(SQLModel, table=True):
    __tablename__ = "replication_policy"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    name: str = Field(unique=True, max_length=64)
    copy_frequency_s: int = Field(default=DEFAULT_COPY_FREQUENCY_S)
    recovery_point_retention_h: int = Field(default=DEFAULT_RETENTION_H)
    app_consistent_frequency_h: int = Field(default=DEFAULT_APP_CONSISTENT_H)
    """Hours between app-consistent snapshots; 0 turns them off."""
    initial_replication_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    """When initial replication starts; None: at once."""
    office_hours_start: time = Field(default=DEFAULT_OFFICE_HOURS[0], sa_type=sa.Time)
    office_hours_end: time = Field(default=DEFAULT_OFFICE_HOURS[1], sa_type=sa.Time)
    office_days: list[int] = Field(default_factory=lambda: list(DEFAULT_OFFICE_DAYS), sa_type=sa.JSON)
    """Weekdays (0 = Monday) with office hours."""
    office_timezone: str = Field(default="UTC", max_length=64)
    """The IANA zone office hours are in: the protected site's local time."""
    rpo_warning_s: int | None = Field(default=None)
    """The RPO (seconds) from which a replicating item is Warning; None: RPO_WARNING_FACTOR × copy frequency."""
    rpo_critical_s: int | None = Field(default=None)
    """The RPO (seconds) from which it is Critical; None: RPO_CRITICAL_FACTOR × copy frequency."""
    consistency_check_interval_h: int = Field(default=DEFAULT_CONSISTENCY_CHECK_H)
    """Hours between end-to-end consistency checks of each protected VM; 0 turns them off."""
    consistency_check_off_hours: bool = Field(default=True)
    """Scheduled consistency checks wait for the end of office hours (they read every disk whole)."""
    drill_reminder_days: int = Field(default=DEFAULT_DRILL_REMINDER_DAYS)
    """Days without a passed drill after which a protected VM's drill is overdue (an alert); 0 turns it off."""
    retention_lock_h: int = Field(default=0)
    """Immutable retention: each recovery point made under the policy cannot be deleted (by pruning, a delete
    request or disabling protection, whoever asks) until this many hours after it was made; 0 turns it off.
    It can be raised, never lowered or turned off while on (`update_policy`)."""
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)

    def rpo_thresholds_s(self) -> tuple[int, int]:
        """(warning, critical): the RPO in seconds from which a replicating item is Warning, Critical."""
        warning, critical = self.rpo_warning_s, self.rpo_critical_s
        return (RPO_WARNING_FACTOR * self.copy_frequency_s if warning is None else warning,
                RPO_CRITICAL_FACTOR * self.copy_frequency_s if critical is None else critical)

    def in_office_hours(self, when: datetime) -> bool:
        """Whether `when` (UTC if naive) falls in office hours, when automatic resync must not run."""
        local = as_utc(when).astimezone(_zone(self.office_timezone))
        return local.weekday() in self.office_days and self.office_hours_start <= local.time() < self.office_hours_end

    def next_resync_slot(self, after: datetime) -> datetime:
        """The first moment at or after `after` (aware UTC) outside office hours."""
        after = as_utc(after)
        if not self.in_office_hours(after):
            return after
        zone = _zone(self.office_timezone)
        local = after.astimezone(zone)
        # Office hours lie within one day (start < end), so their end that day is the first free moment.
        return datetime.combine(local.date(), self.office_hours_end, tzinfo=zone).astimezone(UTC)


def create_policy(
    session: Session,
    name: str,
    *,
    copy_frequency_s: int = DEFAULT_COPY_FREQUENCY_S,
    recovery_point_retention_h: int = DEFAULT_RETENTION_H,
    app_consistent_frequency_h: int = DEFAULT_APP_CONSISTENT_H,
    initial_replication_at: datetime | None = None,
    office_hours: tuple[time, time] = DEFAULT_OFFICE_HOURS,
    office_days: Iterable[int | str] = DEFAULT_OFFICE_DAYS,
    office_timezone: str = "UTC",
    rpo_warning_s: int | None = None,
    rpo_critical_s: int | None = None,
    consistency_check_interval_h: int = DEFAULT_CONSISTENCY_CHECK_H,
    consistency_check_off_hours: bool = True,
    drill_reminder_days: int = DEFAULT_DRILL_REMINDER_DAYS,
    retention_lock_h: int = 0,
) -> ReplicationPolicy:
    """A new replication policy, validated (ValueError naming the policy and the setting; nothing written).

    `initial_replication_at`: None to start at once, or a moment at most 24 h ahead.
    `office_days`: weekday numbers (0 = Monday) or names ("mon" or "monday" .. "sun" or "sunday").
    `rpo_warning_s`, `rpo_critical_s`: RPO thresholds in seconds, None for 2× and 4× the copy frequency;
    the copy frequency < warning < critical.
    `consistency_check_interval_h`: hours between scheduled consistency checks (0: none), run only outside
    office hours unless `consistency_check_off_hours` is False.
    `drill_reminder_days`: days without a passed drill after which an alert says one is overdue (0: never).
    `retention_lock_h`: hours each recovery point stays undeletable after it is made (0: off; at most a year);
    once on, it can only be raised."""
    validate_name(name, "replication policy")
    where = f"replication policy {name!r}"
    columns = _checked_columns(
        where, copy_frequency_s=copy_frequency_s, recovery_point_retention_h=recovery_point_retention_h,
        app_consistent_frequency_h=app_consistent_frequency_h, office_hours=office_hours, office_days=office_days,
        office_timezone=office_timezone, rpo_warning_s=rpo_warning_s, rpo_critical_s=rpo_critical_s,
        consistency_check_interval_h=consistency_check_interval_h,
        consistency_check_off_hours=consistency_check_off_hours, drill_reminder_days=drill_reminder_days,
        retention_lock_h=retention_lock_h)
    start_at = _check_initial_replication(where, initial_replication_at)
    if session.exec(select(ReplicationPolicy).where(ReplicationPolicy.name == name)).first() is not None:
        raise ValueError(f"{where} already exists")
    policy = ReplicationPolicy(name=name, initial_replication_at=start_at, **columns)
    session.add(policy)
    session.flush()
    return policy


POLICY_SETTINGS = ("copy_frequency_s", "recovery_point_retention_h", "app_consistent_frequency_h",
                   "initial_replication_at", "office_hours", "office_days", "office_timezone", "rpo_warning_s",
                   "rpo_critical_s", "consistency_check_interval_h", "consistency_check_off_hours",
                   "drill_reminder_days", "retention_lock_h")
"""The settings `create_policy` takes and `update_policy` changes."""


def update_policy(session: Session, policy: ReplicationPolicy, **changes: object) -> ReplicationPolicy:
    """Change some settings of a policy (the names of `create_policy`'s arguments). The policy as it would be
    is validated exactly as `create_policy` validates a new one (ValueError, nothing changed): the settings
    left out keep their values, RPO thresholds never set keep following the copy frequency, and an initial
    replication time is checked only when it is changed (a time set earlier may have passed). A retention lock
    that is on can be raised but not lowered or turned off (RetentionLockError, nothing changed): it would
    otherwise be one request away from undoing itself. Protected VMs read their policy at each step: the new
    values apply from their next cycle."""
    _require_saved(policy)
    unknown = sorted(set(changes) - set(POLICY_SETTINGS))
    if unknown:
        raise ValueError(f"replication policy {policy.name!r}: unknown setting(s) {', '.join(unknown)} "
                         f"(settings: {', '.join(POLICY_SETTINGS)})")
    where = f"replication policy {policy.name!r}"
    current: dict[str, object] = {
        "copy_frequency_s": policy.copy_frequency_s, "recovery_point_retention_h": policy.recovery_point_retention_h,
        "app_consistent_frequency_h": policy.app_consistent_frequency_h,
        "office_hours": (policy.office_hours_start, policy.office_hours_end), "office_days": policy.office_days,
        "office_timezone": policy.office_timezone, "rpo_warning_s": policy.rpo_warning_s,
        "rpo_critical_s": policy.rpo_critical_s, "consistency_check_interval_h": policy.consistency_check_interval_h,
        "consistency_check_off_hours": policy.consistency_check_off_hours,
        "drill_reminder_days": policy.drill_reminder_days, "retention_lock_h": policy.retention_lock_h,
    }
    start_changed = "initial_replication_at" in changes
    start_at = changes.pop("initial_replication_at", None)
    columns = _checked_columns(where, **{**current, **changes})
    _check_lock_not_lowered(where, policy.retention_lock_h, columns["retention_lock_h"])
    if start_changed:
        columns["initial_replication_at"] = _check_initial_replication(where, start_at)
    for column, value in columns.items():
        setattr(policy, column, value)
    session.add(policy)
    session.flush()
    return policy


def _require_saved(policy: ReplicationPolicy) -> None:
    if not sa.inspect(policy).has_identity:
        raise ValueError(f"replication policy {policy.name!r} is not saved in the database")


def _checked_columns(where: str, *, copy_frequency_s: object, recovery_point_retention_h: object,
                     app_consistent_frequency_h: object, office_hours: object, office_days: object,
                     office_timezone: object, rpo_warning_s: object, rpo_critical_s: object,
                     consistency_check_interval_h: object, consistency_check_off_hours: object,
                     drill_reminder_days: object, retention_lock_h: object) -> dict[str, object]:
    """The policy's columns (all but its name and initial replication time) from its settings, each checked:
    ValueError naming the policy (`where`) and the setting."""
    _check_choice(where, "copy frequency (seconds)", copy_frequency_s, COPY_FREQUENCIES_S)
    _check_range(where, "recovery point retention (hours)", recovery_point_retention_h, 0, MAX_RETENTION_H)
    _check_range(
        where, "app-consistent snapshot frequency (hours)", app_consistent_frequency_h, 0, MAX_APP_CONSISTENT_H
    )
    if app_consistent_frequency_h > recovery_point_retention_h:
        raise ValueError(
            f"{where}: app-consistent snapshots every {app_consistent_frequency_h} h would not survive a "
            f"{recovery_point_retention_h} h retention window: choose at most the retention, or 0 (off)"
        )
    start, end = _check_office_hours(where, office_hours)
    days = _check_office_days(where, office_days)
    _zone_or_error(where, office_timezone)
    _check_rpo_thresholds(where, copy_frequency_s, rpo_warning_s, rpo_critical_s)
    _check_range(where, "consistency check interval (hours)", consistency_check_interval_h, 0,
                 MAX_CONSISTENCY_CHECK_H)
    if not isinstance(consistency_check_off_hours, bool):
        raise ValueError(f"{where}: consistency_check_off_hours must be true or false, got "
                         f"{consistency_check_off_hours!r}")
    _check_range(where, "drill reminder (days)", drill_reminder_days, 0, MAX_DRILL_REMINDER_DAYS)
    _check_range(where, "retention lock (hours)", retention_lock_h, 0, MAX_RETENTION_LOCK_H)
    return {"copy_frequency_s": copy_frequency_s, "recovery_point_retention_h": recovery_point_retention_h,
            "app_consistent_frequency_h": app_consistent_frequency_h, "office_hours_start": start,
            "office_hours_end": end, "office_days": days, "office_timezone": office_timezone,
            "rpo_warning_s": rpo_warning_s, "rpo_critical_s": rpo_critical_s,
            "consistency_check_interval_h": consistency_check_interval_h,
            "consistency_check_off_hours": consistency_check_off_hours, "drill_reminder_days": drill_reminder_days,
            "retention_lock_h": retention_lock_h}


def _check_lock_not_lowered(where: str, current_h: int, new_h: object) -> None:
    if current_h > 0 and isinstance(new_h, int) and new_h < current_h:
        what = "turned off" if new_h == 0 else f"lowered to {new_h} h"
        raise RetentionLockError(
            f"{where}: its retention lock of {current_h} h cannot be {what}: a lock that is on can only be "
            f"raised (immutable retention; the points made under it stay locked for their own hours either way)")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(where: str, setting: str, value: object, choices: tuple[int, ...]) -> None:
    if not _is_int(value) or value not in choices:
        raise ValueError(f"{where}: {setting} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_range(where: str, setting: str, value: object, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{where}: {setting} must be a whole number from {low} to {high}, got {value!r}")


def _check_rpo_thresholds(where: str, copy_frequency_s: int, warning_s: object, critical_s: object) -> None:
    for setting, value in (("RPO warning threshold (seconds)", warning_s),
                           ("RPO critical threshold (seconds)", critical_s)):
        if value is not None:
            _check_range(where, setting, value, 1, MAX_RPO_THRESHOLD_S)
    # Compared as they will apply, defaults filled in: an RPO under one copy frequency is every cycle's.
    warning = warning_s if warning_s is not None else RPO_WARNING_FACTOR * copy_frequency_s
    critical = critical_s if critical_s is not None else RPO_CRITICAL_FACTOR * copy_frequency_s
    if not copy_frequency_s < warning < critical:
        raise ValueError(
            f"{where}: RPO thresholds must satisfy copy frequency < warning < critical, got {copy_frequency_s} s < "
            f"{warning} s < {critical} s (a threshold left out is {RPO_WARNING_FACTOR}x or {RPO_CRITICAL_FACTOR}x "
            f"the copy frequency)"
        )


def _check_initial_replication(where: str, start_at: datetime | None) -> datetime | None:
    if start_at is None:
        return None
    if not isinstance(start_at, datetime):
        raise ValueError(f"{where}: initial replication time must be a datetime or None (now), got {start_at!r}")
    start_at, now = as_utc(start_at), clock_now()
    if start_at < now:
        raise ValueError(
            f"{where}: initial replication time {start_at.isoformat()} is in the past: use None to start now"
        )
    if start_at - now > MAX_INITIAL_REPLICATION_DELAY:
        raise ValueError(
            f"{where}: initial replication can be scheduled at most 24 hours ahead, got {start_at.isoformat()} "
            f"({(start_at - now) / timedelta(hours=1):.1f} h from now)"
        )
    return start_at


def _check_office_hours(where: str, office_hours: tuple[time, time]) -> tuple[time, time]:
    try:
        start, end = office_hours
    except (TypeError, ValueError):
        raise ValueError(f"{where}: office hours must be a (start, end) pair of times, got {office_hours!r}") from None
    if not isinstance(start, time) or not isinstance(end, time) or start.tzinfo or end.tzinfo:
        raise ValueError(f"{where}: office hours must be local times without a zone, got {office_hours!r}")
    if not start < end:
        raise ValueError(
            f"{where}: office hours must start before they end within a day, got {start.isoformat()}-{end.isoformat()}"
        )
    return start, end


def _check_office_days(where: str, office_days: Iterable[int | str]) -> list[int]:
    if isinstance(office_days, str):
        raise ValueError(f"{where}: office days must be a list of weekdays, got the string {office_days!r}")
    days = []
    for day in office_days:
        if _is_int(day) and 0 <= day <= 6:
            days.append(day)
        elif isinstance(day, str) and _weekday_number(day) is not None:
            days.append(_weekday_number(day))
        else:
            raise ValueError(
                f"{where}: office day {day!r} is not a weekday (0 = Monday .. 6 = Sunday, or a name such as "
                f"'mon' or 'monday')"
            )
    if len(set(days)) != len(days):
        raise ValueError(f"{where}: office days repeat a weekday: {list(office_days)!r}")
    return sorted(days)


def _weekday_number(name: str) -> int | None:
    """0 for "mon" or "Monday", ... 6 for "sun" or "Sunday"; None for anything else."""
    lowered = name.lower()
    for number, full in enumerate(WEEKDAY_NAMES):
        if lowered in (full, full[:3]):
            return number
    return None


def _zone(name: str) -> tzinfo:
    return UTC if name == "UTC" else ZoneInfo(name)


def _zone_or_error(where: str, name: object) -> None:
    if not isinstance(name, str):
        raise ValueError(f"{where}: office time zone must be an IANA name such as 'Europe/Berlin', got {name!r}")
    try:
        _zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{where}: unknown office time zone {name!r} (use an IANA name such as 'Europe/Berlin')"
        ) from None
