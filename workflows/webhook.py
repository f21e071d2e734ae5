"""Delivering alerts to the operators' webhook: signed, retried with back-off, each outcome recorded.

A receiver gets one POST per alert: the alert as JSON, and headers it can check before trusting it:
`X-ASR-Alert-Id` (the same on every retry of one alert: delivery is at least once, so a receiver drops
repeats by it), `X-ASR-Timestamp` (Unix seconds) and `X-ASR-Signature: sha256=HEX`, the HMAC-SHA256 with
the shared secret of `TIMESTAMP.BODY`: a forged or replayed alert (an old timestamp) can be refused.

A 2xx answer delivers it. Anything else (another status, a refused connection, a timeout) is retried on
`RETRY_DELAYS_S` (scaled by ASR_TIME_SCALE) until MAX_ATTEMPTS, then given up; the answer of each attempt
is recorded in `last_error`. Redirects are not followed: a webhook that moved is reconfigured, not guessed.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlmodel import select

from models.alerts import Alert
from models.db import session_scope
from workflows import clock, settings
from workflows.transport import client_ssl_context

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

# A receiver that is down for an hour hears about it within minutes of coming back; one that stays down a
# day has had 24 tries. Minutes, because an alert that arrives a day late has lost most of its use.
RETRY_DELAYS_S = (30, 60, 120, 300, 600, 1800, 3600)
MAX_ATTEMPTS = 24
TIMEOUT_S = 10.0
BATCH = 50
"""Alerts sent per delivery pass at most: a pass stays shorter than the tick that sends it."""
CLAIM_S = 4 * TIMEOUT_S
"""How long a pass holds an alert it is sending; another pass may retry it after that (at least once)."""


def retry_delay_s(attempts: int) -> float:
    """Seconds (before ASR_TIME_SCALE) to wait after the `attempts`-th failed delivery."""
    return RETRY_DELAYS_S[min(attempts, len(RETRY_DELAYS_S)) - 1]


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The X-ASR-Signature value of `body` sent at `timestamp` (what a receiver recomputes)."""
    return "sha256=" + hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def alert_body(alert: Alert) -> bytes:
    return json.dumps({
        "id": alert.id, "kind": str(alert.kind), "event": str(alert.event), "severity": alert.severity,
        "subject": alert.subject, "message": alert.message, "created_at": alert.created_at.isoformat(),
    }, sort_keys=True).encode()


def deliver_due_alerts(now: datetime | None = None) -> dict[str, int]:
    """Send the alerts whose next attempt is due; returns counts ("alerts_delivered", "alerts_retrying",
    "alerts_given_up"). Without a webhook it sends nothing (the alerts were recorded as not sent)."""
    url = settings.alert_webhook_url()
    if url is None:
        return {}
    secret = settings.alert_webhook_secret()
    report: Counter[str] = Counter()
    # Imported here: httpx imports its command-line tool (rich, pygments) with it, some 40 ms that every
    # worker start would pay for a webhook only beat's alert pass uses.
    import httpx

    with httpx.Client(verify=client_ssl_context(), timeout=TIMEOUT_S, follow_redirects=False) as client:
        for alert in _claim_due(now or clock.now()):
            report[_deliver(client, url, secret, alert)] += 1
    return dict(report)


def _claim_due(now: datetime) -> list[Alert]:
    claimed = []
    with session_scope() as session:
        due = session.exec(select(Alert).where(Alert.delivered_at.is_(None), Alert.gave_up.is_(False),
                                               Alert.next_attempt_at <= now)
                           .order_by(Alert.created_at).limit(BATCH)).all()
    for alert in due:
        with session_scope() as session:
            # Claimed by moving its next attempt on: a pass running at the same time skips it.
            taken = session.exec(sa.update(Alert).where(Alert.id == alert.id,
                                                        Alert.next_attempt_at == alert.next_attempt_at)
                                 .values(next_attempt_at=now + timedelta(seconds=CLAIM_S))).rowcount
        if taken:
            claimed.append(alert)
    return claimed


def _deliver(client: httpx.Client, url: str, secret: bytes, alert: Alert) -> str:
    import httpx  # loaded by deliver_due_alerts already

    body = alert_body(alert)
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "User-Agent": "site-recovery-engine",
               "X-ASR-Alert-Id": alert.id, "X-ASR-Timestamp": str(timestamp),
               "X-ASR-Signature": sign(secret, timestamp, body)}
    try:
        answer = client.post(url, content=body, headers=headers)
        error = None if 200 <= answer.status_code < 300 else f"HTTP {answer.status_code}: {answer.text[:200]}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    attempts = alert.attempts + 1
    values: dict[str, object] = {"attempts": attempts, "last_error": error}
    if error is None:
        outcome, values["delivered_at"], values["next_attempt_at"] = "alerts_delivered", clock.now(), None
    elif attempts >= MAX_ATTEMPTS:
        outcome, values["gave_up"], values["next_attempt_at"] = "alerts_given_up", True, None
        logger.error("alert %s (%s %s) not delivered after %d attempts, given up: %s",
                     alert.id, alert.kind, alert.subject, attempts, error)
    else:
        outcome, values["next_attempt_at"] = "alerts_retrying", clock.after(retry_delay_s(attempts))
        logger.warning("alert %s not delivered (attempt %d): %s", alert.id, attempts, error)
    with session_scope() as session:
        session.exec(sa.update(Alert).where(Alert.id == alert.id).values(**values))
    return outcome
