"""Test-only parts of the engine tests' deployments: the engine tests' action module (their workers'
ASR_ACTION_MODULES), `register_hosts` and `EventCapture`, Celery events received in this process.

The deployment itself is the product's (sites/deployment.py: the demo starts the same processes).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ACTION_MODULES = "tests.engine_actions"
"""What the engine tests' workers import for their actions (`tests/engine_actions.py`)."""


def register_hosts(roots: Path, names: Iterable[str]) -> dict[str, str]:
    """Hosts `names` of a site "primary", each with a root folder under `roots`: {name: registration key}."""
    from models.db import session_scope
    from models.fabric import create_site, register_host

    keys = {}
    with session_scope() as session:
        primary = create_site(session, "primary")
        for name in names:
            (roots / name).mkdir()
            keys[name] = register_host(session, name, str(roots / name), site=primary)[1]
    return keys


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
