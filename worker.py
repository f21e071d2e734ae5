"""The Celery application every Site Recovery Engine process shares.

Configured for redelivery rather than loss: a task is acknowledged only after it finishes, a worker that
dies puts its task back on the queue, and the Redis visibility timeout is longer than any task, so a
long disk copy is not handed to a second worker while the first is still copying. Tasks are therefore
written to be idempotent (see tasks/). Every setting comes from `workflows.settings` (ASR_*).
"""
from __future__ import annotations

from celery import Celery

from workflows import settings

app = Celery("site_recovery_engine", broker=settings.broker_url(), backend=settings.result_backend_url(),
             include=["tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Longer than the longest task: a redelivery while a copy is still running would copy twice.
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s()},
    result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s()},
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


@app.on_after_configure.connect
def _add_beat_schedule(sender, **_):
    # `celery -A worker beat` sends the reconciler and the replication scheduler's tick. A pass that has
    # waited a whole period is dropped (expires): the next one is already on its way. Imported when the app
    # is configured rather than with this module, so that a process that only sends messages loads no kinds.
    from workflows.engine import ORCHESTRATION_QUEUE, RECONCILE_TASK
    from workflows.scheduler import beat_schedule

    interval = settings.reconcile_interval_s()
    sender.conf.beat_schedule = {
        "reconcile-jobs": {"task": RECONCILE_TASK, "schedule": interval,
                           "options": {"queue": ORCHESTRATION_QUEUE, "expires": interval, "ignore_result": True}},
        **beat_schedule(),
    }
