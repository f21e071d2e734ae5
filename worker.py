"""The Celery application every Site Recovery Engine process shares.

Configured for redelivery rather than loss: a task is acknowledged only after it finishes, a worker that
dies puts its task back on the queue, and the Redis visibility timeout is longer than any task, so a
long disk copy is not handed to a second worker while the first is still copying. Tasks are therefore
written to be idempotent (see tasks/).
"""
from __future__ import annotations

import os

from celery import Celery

from workflows.settings import env_number

BROKER_URL = os.environ.get("ASR_BROKER_URL", "redis://127.0.0.1:6379/0")
RESULT_BACKEND = os.environ.get("ASR_RESULT_BACKEND", BROKER_URL)

# Longer than the longest task: a redelivery while a copy is still running would copy twice.
VISIBILITY_TIMEOUT_S = int(os.environ.get("ASR_VISIBILITY_TIMEOUT", str(6 * 3600)))

app = Celery("site_recovery_engine", broker=BROKER_URL, backend=RESULT_BACKEND, include=["tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_send_sent_event=True,
    worker_send_task_events=True,
    broker_connection_retry_on_startup=True,
    # When the broker connection drops, kombu may hand the in-flight message back to the queue while this
    # worker still runs it; cancelling the task then keeps two runners from overlapping for a heartbeat.
    worker_cancel_long_running_tasks_on_connection_loss=True,
)

# `celery -A worker beat` sends the reconciler on this period. A pass that has waited a whole period is
# dropped (expires): the next one is already on its way, and a backlog of passes helps nobody.
RECONCILE_INTERVAL_S = env_number("ASR_RECONCILE_S", 15.0)
app.conf.beat_schedule = {
    "reconcile-jobs": {
        "task": "asr.engine.reconcile",
        "schedule": RECONCILE_INTERVAL_S,
        "options": {"queue": "orchestration", "expires": RECONCILE_INTERVAL_S, "ignore_result": True},
    },
}


@app.on_after_configure.connect
def _add_replication_schedule(sender, **_):
    # Imported late: workflows import this module for `app`, so a top-level import would be circular.
    from workflows.protection import BEAT_SCHEDULE

    sender.conf.beat_schedule.update(BEAT_SCHEDULE)
