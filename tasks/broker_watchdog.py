"""The worker's watch on its broker connection: a consumer bootstep that keeps a connection of its own to
Redis, whose socket the worker's event loop watches (Redis closing it is seen at once) and on which it pings
every WATCH_EVERY_S (a broker that stops answering), and hands any failure to Celery as a lost connection.

Why it exists: Celery notices that the broker went away only when a socket its event loop reads fails. A
worker whose processes are all busy reads no queue (kombu sends no BRPOP while the prefetch limit is
reached), and without remote control (ASR_WORKER_REMOTE_CONTROL=off) it has no broadcast subscription either:
its loop then watches no broker socket at all and misses a Redis restart. Worse, a task that ends while Redis
is down cannot be acknowledged, kombu keeps counting its message as unacknowledged, and with a prefetch of one
the channel never asks Redis for another message: the worker waited so forever (tests/test_broker_outage.py).

The watch connection is opened when the consumer (re)connects and never reconnects by itself, so a ping on it
fails once the connection was lost, even if Redis is back by then. The failure is raised in the event loop as
the transport's connection error, which Celery handles as it would a failed read: "Connection to broker
lost", the consumer's bootsteps stopped (tasks/broker.py marks the running steps), a reconnect for as long as
it takes (worker.py), and a new channel that consumes again. Running tasks keep running throughout.
"""
from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

logger = logging.getLogger(__name__)

# A ping every 2 s costs Redis nothing, and bounds how long a lost connection goes unnoticed.
WATCH_EVERY_S = 2.0
# How long a ping may wait for its answer (a broker that stopped answering without closing the connection),
# blocking the worker's loop meanwhile, before the connection counts as lost.
PING_TIMEOUT_S = 5.0


class BrokerWatchdog(bootsteps.StartStopStep):
    """Pings the broker on a connection of its own from the consumer's event loop; a failure restarts the
    consumer through Celery's handling of a lost connection."""

    requires = ("celery.worker.consumer.tasks:Tasks",)  # the task consumer's channel knows the broker

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.connection: Any = None
        self.timer_entry: Any = None
        self.hub: Any = None
        self.fd: int | None = None

    def start(self, parent: Any) -> None:
        channel = parent.task_consumer.channel
        open_watch_connection = getattr(channel, "open_watch_connection", None)
        if parent.hub is None or open_watch_connection is None:
            # Without an event loop the consumer itself reads the broker all the time; another transport than
            # worker.py's Redis one has its own ways (heartbeats).
            return
        # Raises the transport's connection error if the broker is already gone again: Celery reconnects.
        self.connection = open_watch_connection(PING_TIMEOUT_S)
        self.timer_entry = parent.timer.call_repeatedly(WATCH_EVERY_S, self._ping, (self.connection,))
        # The socket is watched by the loop too: a broker that stops closes it, and the loop sees the end of the
        # stream at once, as it saw the broadcast subscription's. Waiting for the next ping could lose the race
        # to Celery's own event heartbeat, whose send retries until the broker is back and holds the loop
        # meanwhile: a step's worker lost during the outage would then not have marked its step.
        self.fd = self.connection._sock.fileno()
        self.hub = parent.hub
        self.hub.add_reader(self.fd, self._on_readable, self.connection)

    @staticmethod
    def _ping(connection: Any) -> None:
        # No health check and no retry: either this very connection answers, or the error propagates out of
        # the event loop (Celery makes the hub re-raise the transport's connection errors from a timer).
        connection.send_command("PING", check_health=False)
        connection.read_response()

    @staticmethod
    def _on_readable(connection: Any) -> None:
        # Readable between pings (a ping reads its answer before the loop polls again): the broker closed the
        # connection, and reading raises the transport's connection error, out of the loop as a lost connection.
        connection.read_response()

    def stop(self, parent: Any) -> None:
        if self.hub is not None and self.fd is not None:
            self.hub.remove(self.fd)
        self.hub = self.fd = None
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.disconnect()
            except Exception:  # noqa: BLE001 - a connection already broken needs no closing
                logger.debug("closing the broker watch connection failed", exc_info=True)

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
