"""Numbers read from the environment, with one rule and one kind of error for every setting."""
from __future__ import annotations

import os


def env_number(name: str, default: float, *, minimum: float | None = None) -> float:
    """The number in environment variable `name`, or `default` when it is unset.

    Without `minimum` the value must be above zero; with it, at least `minimum`. A bad value is a
    ValueError naming the variable, raised at start-up rather than mid-job."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if minimum is None and value <= 0:
        raise ValueError(f"{name}={raw!r} must be a positive number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum:g}")
    return value
