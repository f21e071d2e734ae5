"""Replication policies: how often VMs replicate, how long recovery points are kept (and how long they are
locked against deletion), office hours, RPO thresholds."""
from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from datetime import time as time_of_day
from typing import Any

from sqlmodel import select

from models.db import session_scope
from models.policy import ReplicationPolicy, create_policy

from .errors import Conflict, Invalid, _operation
from .lookups import _int_option, _name, _policy
from .presenters import _policy_dict

POLICY_OPTIONS = ("copy_frequency_s", "recovery_point_retention_h", "app_consistent_frequency_h",
                  "initial_replication_at", "office_hours", "office_days", "office_timezone", "rpo_warning_s",
                  "rpo_critical_s", "consistency_check_interval_h", "consistency_check_off_hours",
                  "drill_reminder_days", "retention_lock_h")


def _time_of_day(name: str, value: Any) -> time_of_day:
    if isinstance(value, time_of_day):
        return value
    try:
        return time_of_day.fromisoformat(value)
    except (TypeError, ValueError):
        raise Invalid(f"{name}: {value!r} is not a time of day such as '08:00'") from None


def _policy_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(POLICY_OPTIONS))
    if unknown:
        raise Invalid(f"replication policy {name!r}: unknown option(s) {', '.join(unknown)} "
                      f"(options: {', '.join(POLICY_OPTIONS)})")
    settings = {key: value for key, value in options.items() if value is not None}
    for key in ("copy_frequency_s", "recovery_point_retention_h", "app_consistent_frequency_h", "rpo_warning_s",
                "rpo_critical_s", "consistency_check_interval_h", "drill_reminder_days", "retention_lock_h"):
        if key in settings:
            settings[key] = _int_option(key, settings[key])
    start = settings.get("initial_replication_at")
    if isinstance(start, str):
        try:
            parsed = datetime.fromisoformat(start)
        except ValueError:
            raise Invalid(f"replication policy {name!r}: initial_replication_at {start!r} is not an ISO 8601 "
                          f"time such as '2030-01-01T02:00:00+00:00'") from None
        settings["initial_replication_at"] = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    hours = settings.get("office_hours")
    if hours is not None:
        if isinstance(hours, str):
            hours = hours.split("-")
        if not isinstance(hours, (list, tuple)) or len(hours) != 2:
            raise Invalid(f"replication policy {name!r}: office_hours is a start and an end such as "
                          f"'08:00-18:00', got {options['office_hours']!r}")
        settings["office_hours"] = tuple(_time_of_day("office_hours", part) for part in hours)
    days = settings.get("office_days")
    if isinstance(days, str):
        settings["office_days"] = [_int_option("office_days", day.strip()) for day in days.split(",") if day.strip()]
    return settings


@_operation
def add_policy(name: str, **options: Any) -> dict:
    """Create a replication policy. Options: copy_frequency_s (30, 300 or 900), recovery_point_retention_h
    (0-24), app_consistent_frequency_h (0-12, at most the retention), initial_replication_at (ISO time, at most
    24 h ahead), office_hours ("08:00-18:00" or [start, end]), office_days (names or 0 = Monday, list or
    "mon,tue"), office_timezone (IANA name), rpo_warning_s and rpo_critical_s (seconds of RPO from which a VM is
    Warning, Critical; default 2x and 4x the copy frequency), consistency_check_interval_h (0-168, 0 for none;
    default 24), consistency_check_off_hours (scheduled checks wait for the end of office hours; default true),
    drill_reminder_days (days without a passed drill before an alert says one is overdue; 0 for never; default
    180), retention_lock_h (hours each recovery point cannot be deleted after it is made, by anyone; 0 for off,
    the default; at most 8760; once on it can only be raised: lowering it is refused with 409)."""
    _name(name, "replication policy")
    settings = _policy_options(name, options)
    with session_scope() as session:
        if session.exec(select(ReplicationPolicy).where(ReplicationPolicy.name == name)).first() is not None:
            raise Conflict(f"replication policy {name!r} already exists")
        return _policy_dict(session, create_policy(session, name, **settings))


@_operation
def list_policies() -> list[dict]:
    with session_scope() as session:
        return [_policy_dict(session, policy)
                for policy in session.exec(select(ReplicationPolicy).order_by(ReplicationPolicy.name))]


@_operation
def show_policy(name: str) -> dict:
    with session_scope() as session:
        return _policy_dict(session, _policy(session, name), detail=True)
