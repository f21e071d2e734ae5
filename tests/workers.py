"""Real Redis and Celery processes for tests of the job engine.

The process helpers live in the product (sites/localservices.py: the demo starts the same processes);
they are re-exported here so tests import them from one place. What stays here is test-only: the
engine tests' action module as every worker's default, and `EventCapture`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sites.localservices import (  # noqa: F401  (re-exported)
    CeleryProcess,
    FlowerProcess,
    RedisServer,
    WaitTimeout,
    _ask_to_stop,
    _reap,
    point_app_at,
    start_beat,
    start_flower,
    start_worker,
    stop_all,
    wait_until,
)
from sites.localservices import celery_env as _celery_env

__all__ = [
    "ACTION_MODULES", "CeleryProcess", "EventCapture", "FlowerProcess", "RedisServer", "WaitTimeout", "celery_env",
    "point_app_at", "start_beat", "start_flower", "start_worker", "stop_all", "wait_until",
]

ACTION_MODULES = "tests.engine_actions"


def celery_env(*, broker_url: str, database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a worker or beat process: the test's own Redis and database, the test
    actions, and engine settings given as ASR_* keyword arguments (e.g. ASR_HEARTBEAT_S="1")."""
    return _celery_env(broker_url=broker_url, database_url=database_url,
                       **{"ASR_ACTION_MODULES": ACTION_MODULES, **settings})


class EventCapture:
    """Celery events of one type, received on a thread of this process (the app's broker) until one
    matches `found` or `timeout` s pass. Listening when the constructor returns."""

    def __init__(self, event_type: str, found: Callable[[dict], bool], *, timeout: float) -> None:
        self.event_type = event_type
        self.events: list[dict] = []
        self._found = found
        self._timeout = timeout
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._listen, name=f"capture-{event_type}", daemon=True)
        self._thread.start()
        if not self._listening.wait(timeout=10):
            raise AssertionError(f"the {event_type} event receiver did not start within 10 s")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _listen(self) -> None:
        from worker import app

        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={self.event_type: self._on_event})
            self._receiver = receiver
            with receiver.consumer_context(wakeup=False) as (consuming, _channel, _consumers):
                self._listening.set()
                deadline = time.monotonic() + self._timeout
                while not receiver.should_stop and time.monotonic() < deadline:
                    try:
                        consuming.drain_events(timeout=0.2)
                    except TimeoutError:
                        pass

    def _on_event(self, event: dict) -> None:
        self.events.append(event)
        if self._found(event):
            self._receiver.should_stop = True
