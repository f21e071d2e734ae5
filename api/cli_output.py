"""What the operator's verbs print: values as table cells, aligned tables, `label  value` lines, and the
service's dicts as JSON with `--json`.

Every time the engine keeps is UTC and is shown as `YYYY-MM-DD HH:MM:SS`; a missing value is `-`.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import click

NOTHING = "-"
_ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?$")


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (for scripts).")(fn)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not _ISO_TIME.match(text):
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _seconds_between(start: Any, end: Any) -> float | None:
    a, b = _parse_time(start), _parse_time(end)
    return None if a is None or b is None else max(0.0, (b - a).total_seconds())


def format_time(value: Any) -> str:
    """An ISO timestamp as `YYYY-MM-DD HH:MM:SS` in UTC (every time the engine keeps is UTC)."""
    moment = _parse_time(value)
    if moment is None:
        return NOTHING if value in (None, "") else str(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_duration(seconds: Any) -> str:
    """12.3 s, 4m 05s, 2h 03m."""
    if seconds is None:
        return NOTHING
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_size(n: Any) -> str:
    from datapath.disk import format_size as size_text

    return NOTHING if n is None else size_text(int(n))


def _seconds(row: Mapping[str, Any], key: str) -> Any:
    """A number of seconds in `row` (an RPO, an RTO) as a duration; anything else as it is."""
    value = row.get(key)
    return format_duration(value) if isinstance(value, (int, float)) else value


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, (list, tuple, dict)) else value


def cell(value: Any) -> str:
    """One table cell: times shortened, lists joined, nothing as '-'."""
    if value is None or value == "" or value == [] or value == {}:
        return NOTHING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items())
    if isinstance(value, str) and _ISO_TIME.match(value):
        return format_time(value)
    return " ".join(str(value).split())  # a cell is one line whatever the value holds


Column = tuple[str, "str | Callable[[Mapping[str, Any]], Any]"]


def _value(row: Mapping[str, Any], getter: str | Callable[[Mapping[str, Any]], Any]) -> Any:
    if callable(getter):
        return getter(row)
    return pick(row, *getter.split("|"))


def pick(row: Mapping[str, Any] | None, *keys: str) -> Any:
    """The first of `keys` that `row` has a value for (dotted keys reach into nested dicts)."""
    if not row:
        return None
    for key in keys:
        value: Any = row
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value not in (None, ""):
            return value
    return None


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *,
                 max_width: int | None = None) -> list[str]:
    """Rows as lines of left-aligned columns under upper-case headers, two spaces apart. Lines are cut to
    `max_width` (when given: a terminal's width) so a long error does not wrap the table."""
    table = [[header.upper() for header, _ in columns]]
    table += [[cell(_value(row, getter)) for _, getter in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = []
    for line in table:
        text = "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip()
        if max_width and len(text) > max_width:
            text = text[:max_width - 3] + "..."
        lines.append(text)
    return lines


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, empty: str) -> None:
    if not rows:
        click.echo(empty)
        return
    width = shutil.get_terminal_size((200, 24)).columns if sys.stdout.isatty() else None
    for line in render_table(rows, columns, max_width=width):
        click.echo(line)


def print_fields(row: Mapping[str, Any], fields: Sequence[Column]) -> None:
    """`label  value` lines, labels aligned; fields without a value are left out."""
    shown = [(label, cell(_value(row, getter))) for label, getter in fields]
    shown = [(label, value) for label, value in shown if value != NOTHING]
    width = max((len(label) for label, _ in shown), default=0)
    for label, value in shown:
        click.echo(f"{label.ljust(width)}  {value}")


def _section(title: str) -> None:
    click.echo(f"\n{title}")
