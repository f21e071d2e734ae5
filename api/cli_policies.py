"""The replication policy verbs of `asr`: copy frequency, recovery point retention and its lock, app-consistent
snapshots, when initial replication starts, the office hours automatic resync keeps out of, the RPO
thresholds of health, and how often consistency checks run.
"""
from __future__ import annotations

from collections.abc import Mapping
from datetime import time as time_of_day
from typing import Any

import click

from api.cli import main
from api.cli_output import Column, _emit_json, json_option, print_fields, print_table
from api.cli_parsing import _moment
from api.cli_service import _command, _OpGroup, _service


@main.group(cls=_OpGroup)
def policy():
    """Replication policies: copy frequency, retention and its lock, app-consistent snapshots, office hours, RPO
    thresholds, consistency checks."""


def _office_hours(value: str | None) -> tuple[time_of_day, time_of_day] | None:
    if value is None:
        return None
    start, sep, end = value.partition("-")
    try:
        if not sep:
            raise ValueError
        return time_of_day.fromisoformat(start.strip()), time_of_day.fromisoformat(end.strip())
    except ValueError:
        raise click.BadParameter(f"expected START-END such as 08:00-18:00, got {value!r}",
                                 param_hint="--office-hours") from None


def _office_days(value: str | None) -> list[int | str] | None:
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return []
    return [int(day) if day.strip().isdigit() else day.strip() for day in value.split(",")]


@_command(policy, "add")
@click.argument("name")
@click.option("--copy-frequency", type=click.Choice(["30", "300", "900"]), default=None,
              help="Seconds between delta replication cycles (default 300).")
@click.option("--retention-hours", type=click.IntRange(0, 24), default=None,
              help="How long recovery points are kept (default 2).")
@click.option("--app-consistent-hours", type=click.IntRange(0, 12), default=None,
              help="Hours between app-consistent points, 0 for none (default 1; at most the retention).")
@click.option("--initial-replication-at", default=None, metavar="TIME",
              help="Start initial replication later: an ISO time or +30m, +2h (at most 24 h ahead).")
@click.option("--office-hours", default=None, metavar="HH:MM-HH:MM",
              help="When automatic resync must not run (default 08:00-18:00).")
@click.option("--office-days", default=None, metavar="DAYS",
              help="Weekdays with office hours: mon,tue,... or 0-6 numbers, 'none' for none (default mon-fri).")
@click.option("--timezone", "office_timezone", default=None, help="IANA zone of the office hours (default UTC).")
@click.option("--rpo-warning", type=click.IntRange(1), default=None, metavar="SECONDS",
              help="RPO from which a protected VM is Warning (default 2x the copy frequency).")
@click.option("--rpo-critical", type=click.IntRange(1), default=None, metavar="SECONDS",
              help="RPO from which a protected VM is Critical (default 4x the copy frequency).")
@click.option("--consistency-check-hours", type=click.IntRange(0, 168), default=None,
              help="Hours between consistency checks of each VM, 0 for none (default 24).")
@click.option("--consistency-check-anytime", is_flag=True, default=False,
              help="Run scheduled consistency checks in office hours too (default: only outside them).")
@click.option("--drill-reminder-days", type=click.IntRange(0, 3660), default=None, metavar="DAYS",
              help="Days without a passed drill before an alert says one is overdue, 0 for never (default 180).")
@click.option("--retention-lock-hours", type=click.IntRange(0, 8760), default=None, metavar="HOURS",
              help="Immutable retention: hours each recovery point cannot be deleted after it is made, by anyone "
                   "(0 for off, the default). Once on it can only be raised.")
@json_option
def policy_add(name: str, copy_frequency: str | None, retention_hours: int | None,
               app_consistent_hours: int | None, initial_replication_at: str | None, office_hours: str | None,
               office_days: str | None, office_timezone: str | None, rpo_warning: int | None,
               rpo_critical: int | None, consistency_check_hours: int | None, consistency_check_anytime: bool,
               drill_reminder_days: int | None, retention_lock_hours: int | None, as_json: bool):
    """Create replication policy NAME; options left out take their defaults."""
    options = policy_settings(copy_frequency, retention_hours, app_consistent_hours, initial_replication_at,
                              office_hours, office_days, office_timezone, rpo_warning, rpo_critical,
                              consistency_check_hours, False if consistency_check_anytime else None,
                              drill_reminder_days, retention_lock_hours)
    result = _service().add_policy(name, **options)
    if as_json:
        return _emit_json(result)
    click.echo(f"policy {result.get('name', name)} created (id {result.get('id')})")
    print_fields(result, POLICY_FIELDS[2:])


def policy_settings(copy_frequency: str | None, retention_hours: int | None, app_consistent_hours: int | None,
                    initial_replication_at: str | None, office_hours: str | None, office_days: str | None,
                    office_timezone: str | None, rpo_warning: int | None, rpo_critical: int | None,
                    consistency_check_hours: int | None, consistency_check_off_hours: bool | None,
                    drill_reminder_days: int | None = None,
                    retention_lock_hours: int | None = None) -> dict[str, Any]:
    """The service's policy settings from the options of `policy add` (and `policy set`): those given only."""
    options: dict[str, Any] = {
        "copy_frequency_s": int(copy_frequency) if copy_frequency else None,
        "recovery_point_retention_h": retention_hours,
        "app_consistent_frequency_h": app_consistent_hours,
        "initial_replication_at": _moment(initial_replication_at, "--initial-replication-at"),
        "office_hours": _office_hours(office_hours),
        "office_days": _office_days(office_days),
        "office_timezone": office_timezone,
        "rpo_warning_s": rpo_warning,
        "rpo_critical_s": rpo_critical,
        "consistency_check_interval_h": consistency_check_hours,
        "consistency_check_off_hours": consistency_check_off_hours,
        "drill_reminder_days": drill_reminder_days,
        "retention_lock_h": retention_lock_hours,
    }
    return {key: value for key, value in options.items() if value is not None}


def _hours(row: Mapping[str, Any]) -> Any:
    hours = row.get("office_hours")
    if isinstance(hours, (list, tuple)) and len(hours) == 2:
        return f"{hours[0]}-{hours[1]}"
    return hours


def _days(row: Mapping[str, Any]) -> Any:
    days = row.get("office_days")
    names = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    if isinstance(days, list):
        return ",".join(names[d] if isinstance(d, int) and 0 <= d <= 6 else str(d)[:3] for d in days) or "none"
    return days


POLICY_FIELDS: list[Column] = [
    ("name", "name"), ("id", "id"), ("copy frequency (s)", "copy_frequency_s"),
    ("retention (h)", "recovery_point_retention_h"), ("app-consistent (h)", "app_consistent_frequency_h"),
    ("initial replication", "initial_replication_at"), ("office hours", _hours), ("office days", _days),
    ("timezone", "office_timezone"), ("RPO warning (s)", "rpo_warning_s"), ("RPO critical (s)", "rpo_critical_s"),
    ("consistency check (h)", "consistency_check_interval_h"),
    ("check off-hours only", "consistency_check_off_hours"), ("drill reminder (days)", "drill_reminder_days"),
    ("retention lock (h)", "retention_lock_h"), ("protected VMs", "protected_vms"),
]
POLICY_COLUMNS: list[Column] = [("name", "name"), ("copy s", "copy_frequency_s"),
                                ("retention h", "recovery_point_retention_h"),
                                ("app-consistent h", "app_consistent_frequency_h"),
                                ("lock h", "retention_lock_h"), ("office hours", _hours),
                                ("days", _days), ("tz", "office_timezone")]


@_command(policy, "list")
@json_option
def policy_list(as_json: bool):
    """Every replication policy."""
    policies = _service().list_policies()
    if as_json:
        return _emit_json(policies)
    print_table(policies, POLICY_COLUMNS, empty="no policies: add one with `asr policy add NAME`")


@_command(policy, "show")
@click.argument("name")
@json_option
def policy_show(name: str, as_json: bool):
    """A replication policy's settings."""
    result = _service().show_policy(name)
    if as_json:
        return _emit_json(result)
    print_fields(result, POLICY_FIELDS)
