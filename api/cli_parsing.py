"""Option values of the operator's verbs read from their text: `KEY=VALUE` pairs (storage options, public
addresses) and moments (an ISO time or a delay from now). A value that does not read is click's usage
error naming the option, exit status 2.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import click

_RELATIVE = re.compile(r"^([+-])(\d+(?:\.\d+)?)([mh])$")


def _key_values(option: str, pairs: Iterable[str], *, typed: bool) -> dict[str, Any]:
    """`k=v` pairs as a dict. With `typed`, a value that reads as a JSON number, boolean or null is that
    (storage options such as max_in_flight=8 are numbers); anything else stays text."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        if key in result:
            raise click.BadParameter(f"{key!r} is given twice", param_hint=option)
        if typed:
            try:
                decoded = json.loads(value)
            except ValueError:
                decoded = value
            value = decoded if isinstance(decoded, (int, float, bool)) or decoded is None else value
        result[key] = value
    return result


def _moment(value: str | None, option: str) -> datetime | None:
    """An ISO time (UTC unless it says otherwise) or a delay from now: +30m, +2h (or back from now: -30m, -2h)."""
    if value is None:
        return None
    relative = _RELATIVE.match(value.strip())
    if relative:
        sign, amount, unit = relative.group(1), float(relative.group(2)), relative.group(3)
        delay = timedelta(minutes=amount) if unit == "m" else timedelta(hours=amount)
        return datetime.now(UTC) + (delay if sign == "+" else -delay)
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"expected an ISO time (2030-01-01T22:00) or a delay (+30m, +2h), got {value!r}",
                                 param_hint=option) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
