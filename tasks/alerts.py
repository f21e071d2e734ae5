"""Alerts' Celery side: the beat task that delivers them (workflows/webhook.py), and the heartbeat of host
agents that `host_silent` alerts watch (workflows/alerts.py raises and resolves alerts in the tick), which
verifies the agent's key each time: an agent whose key no longer verifies stops consuming its host's queue.

Delivery is its own beat task, not part of the tick: a webhook that answers slowly delays only alerts, never
the start of a delta cycle.
"""
from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from celery.signals import worker_ready
from sqlmodel import select

from models.db import clock_now, session_scope
from models.fabric import Host, verify_host_key
from tasks.host_identity import host_identity, stop_consuming_host_queue
from worker import app
from workflows import scheduler, settings, webhook

logger = logging.getLogger(__name__)


@app.task(name=scheduler.DELIVER_ALERTS_TASK)
def deliver_alerts() -> dict[str, int]:
    """Send the alerts whose next delivery attempt is due."""
    return webhook.deliver_due_alerts()


def stamp_host_seen(name: str, key: str | None) -> bool:
    """Stamp host NAME's last_seen_at if `key` is its registration key (a worker without it cannot keep a
    host looking alive). True if stamped."""
    with session_scope() as session:
        host = session.exec(select(Host).where(Host.name == name)).first()
        if host is None or key is None or not verify_host_key(host, key):
            return False
        session.exec(sa.update(Host).where(Host.id == host.id).values(last_seen_at=clock_now()))
    return True


def _stamp(consumer: Any, name: str, key: str | None) -> None:
    try:
        stamped = stamp_host_seen(name, key)
    except Exception:  # noqa: BLE001 - a database blip skips one heartbeat; the next one tries again
        logger.exception("host %s's heartbeat not recorded", name)
        return
    if not stamped:
        # The key no longer verifies (`asr host rekey`, the host removed): this process is no longer the
        # host's agent, and takes none of its steps until it is restarted with the valid key.
        stop_consuming_host_queue(consumer, name, f"this worker does not hold the registration key of host {name!r}")


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    # On the consumer's own timer, in the worker's main loop, never in a thread: the prefork main process
    # forks a new pool child whenever one dies, and a child forked while a thread of the parent held a lock
    # (the engines' lock, a connection pool's mutex) would wait on it forever. A host agent whose loop stops
    # (or hangs) stops stamping, and the tick raises host_silent.
    name, key = host_identity()
    if name is None or sender is None:
        return
    sender.timer.call_repeatedly(settings.host_heartbeat_s(), _stamp, (sender, name, key))
