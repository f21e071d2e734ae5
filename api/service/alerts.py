"""Alerts as operators read them: what was raised and resolved, and whether the webhook heard it."""
from __future__ import annotations

from typing import Any

from sqlmodel import select

from models.alerts import Alert
from models.db import session_scope

from .errors import Invalid, _operation
from .presenters import _iso

MAX_ALERTS = 1000


@_operation
def list_alerts(*, active: bool = False, limit: int = 100) -> list[dict[str, Any]]:
    """The newest alerts first (at most `limit`, 1-1000); `active`: only the raises of conditions that still
    hold (and every failed operation's)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_ALERTS:
        raise Invalid(f"limit must be 1 to {MAX_ALERTS}, got {limit!r}")
    with session_scope() as session:
        query = select(Alert).order_by(Alert.created_at.desc(), Alert.id).limit(limit)
        if active:
            query = query.where(Alert.open_key.is_not(None))
        return [_alert_dict(alert) for alert in session.exec(query)]


def _alert_dict(alert: Alert) -> dict[str, Any]:
    delivery = ("delivered" if alert.delivered_at else "given up" if alert.gave_up
                else "not sent" if alert.next_attempt_at is None else "pending")
    return {"id": alert.id, "kind": str(alert.kind), "event": str(alert.event), "severity": alert.severity,
            "subject": alert.subject, "message": alert.message, "created_at": _iso(alert.created_at),
            "active": alert.open_key is not None, "delivery": delivery, "attempts": alert.attempts,
            "delivered_at": _iso(alert.delivered_at), "next_attempt_at": _iso(alert.next_attempt_at),
            "last_error": alert.last_error}
