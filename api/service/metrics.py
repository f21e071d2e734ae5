"""The Prometheus metrics of the whole deployment, read from the database at each call (workflows/metrics.py)."""
from __future__ import annotations

from workflows.metrics import exposition

from .errors import _operation


@_operation
def metrics() -> tuple[bytes, str]:
    """Every metric of docs/operations.md ("Metrics") in the Prometheus text format, and its content type."""
    return exposition()
