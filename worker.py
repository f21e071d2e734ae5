"""The Celery application every Site Recovery Engine process shares.

Configured for redelivery rather than loss: a task is acknowledged only after it finishes, a worker that
dies puts its task back on the queue, and the Redis visibility timeout is longer than any task, so a
long disk copy is not handed to a second worker while the first is still copying. Tasks are therefore
written to be idempotent (see tasks/). Every setting comes from `workflows.settings` (ASR_*).

The broker and result backend are `rediss://` with the deployment's CA and client certificate
(`tls_conf`, workflows/transport.py); a plain `redis://` URL is refused unless ASR_INSECURE_TRANSPORT=1.

Configured, too, to outlive the broker: a worker whose Redis goes away keeps running its tasks, reconnects
for as long as it takes, and goes on serving (docs/operations.md, "Broker outages").
"""
from __future__ import annotations

from urllib.parse import urlparse

import redis
from celery import Celery
from celery.worker import control as worker_control
from kombu.transport import redis as kombu_redis

from workflows import settings, transport


class _ClosedChannelSafeRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, able to reach Redis again after the connection that opened it was torn down.

    When the broker connection drops, Celery first `collect()`s the connection, which detaches its
    transport (`transport.client = None`) even when closing the channel failed half-way, and then closes
    it again. That second close hands the unacknowledged messages back (`restore_unacked`) through a new
    connection pool whose parameters kombu reads from `transport.client`: AttributeError "'NoneType' object
    has no attribute 'hostname'", which Celery does not expect, and the worker shuts down ("Unrecoverable
    error"). The same happens when a task that ran through the outage acknowledges its message on the old
    channel. Keeping the connection's parameters from when the channel was opened lets both reach Redis
    (or fail with a Redis connection error, which kombu and Celery handle)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._opened_with = self.connection.client

    def _connparams(self, asynchronous=False):
        if self.connection.client is None:
            self.connection.client = self._opened_with
            try:
                return super()._connparams(asynchronous=asynchronous)
            finally:
                self.connection.client = None
        return super()._connparams(asynchronous=asynchronous)

    def open_watch_connection(self, timeout: float):
        """A connection of its own to this channel's Redis, as this channel connects (TLS, broker user), that
        waits at most `timeout` s for an answer: what the broker watchdog pings (tasks/broker_watchdog.py).
        Outside every pool: nothing reconnects it behind the watchdog's back."""
        params = {**self._connparams(), "socket_timeout": timeout, "socket_connect_timeout": timeout}
        connection = redis.ConnectionPool(**params).make_connection()
        connection.connect()
        return connection


class _DeliveredQueueChannel(_ClosedChannelSafeRedisChannel):
    """Stamps on every message taken off a queue the queue it came from, as its delivery_info (anonymous
    exchange, routing key: the queue), which Celery hands the task (`request.delivery_info`).

    kombu passes on the delivery_info the sender wrote into the message, and anyone who may push to a queue
    writes what they like there (a host's broker user may push to every queue, sites/brokeracl.py): a
    worker then could not tell an orchestration step's id pushed onto a host's queue from one that came on
    the orchestration queue. The claim compares the two (tasks/steps.py). Messages handed back (a refusal,
    a visibility timeout) go back, by the same fields, to the queue they were taken from."""

    def basic_consume(self, queue, *args, **kwargs):
        consumed = super().basic_consume(queue, *args, **kwargs)
        if queue not in self._fanout_queues:  # broadcasts (remote control) come from no queue
            deliver = self.connection._callbacks[queue]

            def stamp_queue(raw_message):
                properties = raw_message.get("properties")
                if isinstance(properties, dict):
                    sent = properties.get("delivery_info")
                    properties["delivery_info"] = {**(sent if isinstance(sent, dict) else {}),
                                                   "exchange": "", "routing_key": queue}
                return deliver(raw_message)

            self.connection._callbacks[queue] = stamp_queue
        return consumed


class ClosedChannelSafeRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with `_ClosedChannelSafeRedisChannel` and `_DeliveredQueueChannel`."""

    Channel = _DeliveredQueueChannel


def _broker_transport(url: str) -> str | None:
    # Only for Redis URLs (rediss:// too, same transport): another broker keeps kombu's own transport.
    return f"{__name__}:ClosedChannelSafeRedisTransport" if urlparse(url).scheme in {"redis", "rediss"} else None

def tls_conf(broker_url: str, backend_url: str) -> dict:
    """Celery's TLS settings for these URLs (workflows/transport.py): the server verified against
    ASR_TLS_CA_FILE, our client certificate presented; nothing for a plain URL (which the settings refuse
    unless ASR_INSECURE_TRANSPORT allows it)."""
    return {
        "broker_use_ssl": transport.redis_ssl_options() if transport.is_tls_url(broker_url) else None,
        "redis_backend_use_ssl": transport.redis_ssl_options() if transport.is_tls_url(backend_url) else None,
    }


# The questions a worker answers on the broadcast channel (ASR_WORKER_REMOTE_CONTROL=inspect): what Flower's
# worker pages ask (flower.inspector), all read-only. Every command is gone: whoever reaches Redis could
# otherwise make the orchestration worker consume a host's queue (add_consumer) and run its disk steps, or
# stop any worker (shutdown), since Celery's remote control has no authentication. `conf` is left out too:
# it answers with the worker's configuration.
READ_ONLY_INSPECT = frozenset({
    "ping", "stats", "active_queues", "registered", "dump_tasks", "scheduled", "dump_schedule", "active",
    "dump_active", "reserved", "dump_reserved", "revoked", "dump_revoked", "query_task", "clock",
})


def _answer_only_read_only_inspect() -> None:
    """Drop every remote control command but READ_ONLY_INSPECT from Celery's registry of them (the one the
    worker's mailbox dispatches from): an unknown command is answered with an error and does nothing."""
    for name in list(worker_control.Panel.data):
        if name not in READ_ONLY_INSPECT:
            del worker_control.Panel.data[name]
            worker_control.Panel.meta.pop(name, None)


_answer_only_read_only_inspect()


def _broker_transport_options() -> dict:
    """kombu's Redis options: the visibility timeout, and for a host's agent (ASR_HOST_NAME) its own keys of
    unacknowledged messages, so that its broker user needs no access to other hosts' messages in flight
    (sites/brokeracl.py). A host's messages are only ever consumed by its agent, so only it has any to
    keep there and to hand back after a visibility timeout; the shared `unacked` hash keeps everyone else's."""
    from sites.brokeracl import host_unacked_keys

    options: dict = {"visibility_timeout": settings.visibility_timeout_s()}
    host_name = settings.host_agent_name()
    if host_name is not None:
        try:
            options.update(host_unacked_keys(host_name))
        except ValueError:
            pass  # not a host's name: the worker refuses every host step anyway (tasks/host_identity.py)
    return options


app = Celery("site_recovery_engine", broker=settings.broker_url(), backend=settings.result_backend_url(),
             include=["tasks"])
app.conf.update(tls_conf(settings.broker_url(), settings.result_backend_url()))
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Longer than the longest task: a redelivery while a copy is still running would copy twice.
    broker_transport_options=_broker_transport_options(),
    result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s()},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_send_sent_event=True,
    worker_send_task_events=True,
    # A worker survives its broker: it keeps trying to (re)connect, at start and after a loss, forever
    # (max_retries None; Celery's default gives up after 100 tries and the worker exits), since nothing
    # but Redis coming back helps and an exited worker needs someone to start it again.
    broker_connection_retry=True,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    broker_transport=_broker_transport(settings.broker_url()),
    # Running tasks keep running when the broker connection drops: their state, claims and heartbeats are
    # in the database, not on the broker, and a copy cancelled by every Redis restart would start over
    # (and count as its worker's death). A message Redis hands out again meanwhile cannot start a second
    # run: the claim takes a running step only once its heartbeat is stale.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # Off unless ASR_WORKER_REMOTE_CONTROL=inspect, and then only READ_ONLY_INSPECT is answered. Events (task
    # and worker heartbeats) are a separate channel and stay on: Flower's tasks, workers and metrics.
    worker_enable_remote_control=settings.worker_remote_control() != "off",
)


# Marks the steps a worker runs when its broker connection drops, so that a run the outage ends counts as an
# interruption and not as a death of the step (tasks/broker.py). By name: tasks/ imports this module.
app.steps["consumer"].add("tasks.broker:BrokerOutageMarks")
# Pings the broker from the worker's loop, which otherwise may watch no broker socket at all (remote control
# off and every process busy) and miss a lost connection for good (tasks/broker_watchdog.py says why).
app.steps["consumer"].add("tasks.broker_watchdog:BrokerWatchdog")


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
