"""The worker's side of a broker outage: a consumer bootstep telling the engine which running steps were
cut off from the broker, and when they are connected again.

Celery restarts its consumer's bootsteps when the broker connection drops (`stop` while the consumer
still runs) and starts them again once it has reconnected (`start`). The steps this node runs keep
running through the outage (worker.py does not cancel them) and keep their database heartbeats; what the
mark changes is how the engine counts a run that vanishes during the outage (workflows/engine/outages.py).
"""
from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.bootsteps import RUN
from celery.worker import state as worker_state

from workflows.engine.outages import record_broker_back, record_broker_lost


def _running_task_ids() -> list[str]:
    # The main process tracks every request its pool is running: their ids are the steps' celery_task_id.
    return [request.id for request in tuple(worker_state.active_requests)]


class BrokerOutageMarks(bootsteps.StartStopStep):
    """Marks this node's running steps when its broker connection drops; clears the marks on reconnect."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.marked: list[str] = []

    def start(self, parent: Any) -> None:
        # Connected (again): the tasks marked at the loss and still running came through the outage.
        if self.marked:
            still_running = set(_running_task_ids())
            record_broker_back([task_id for task_id in self.marked if task_id in still_running])
            self.marked = []

    def stop(self, parent: Any) -> None:
        # `stop` also runs at a warm shutdown, when the consumer's blueprint is closing (not RUN): only a
        # restart of a running consumer is a lost connection.
        if parent.blueprint.state != RUN:
            return
        self.marked = _running_task_ids()
        record_broker_lost(self.marked)
