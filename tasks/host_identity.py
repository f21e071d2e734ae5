"""Which host's agent this worker process is, proven with the host's registration key: a step on a host's
queue runs only in a worker that proved it is that host.

The launcher (`asr worker host NAME`) checks the key before it starts the worker, but anything that reaches
Redis can start a plain `celery worker -Q host.NAME` and take that host's disk steps. So the worker checks
too: at start, where a worker that consumes a registered host's queue, or says it is a host's agent, without
that host's valid key exits before it takes a message; at every heartbeat of the host's presence
(tasks/alerts.py), where an agent whose key no longer verifies (`asr host rekey`) stops consuming its queue;
and at every host step, in the claim: it was started as host NAME (ASR_HOST_NAME) with NAME's key, verified
against the database's hash (again at most every VERIFY_EVERY_S).

The key reaches the worker as the launcher hands it on: a pipe (ASR_HOST_KEY_FD), a file
(ASR_HOST_KEY_FILE), or the environment (ASR_HOST_KEY, removed from this process's environment at start so
the VMs' processes do not inherit it).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery.signals import worker_init
from sqlmodel import select

from models.db import session_scope
from models.fabric import Host, host_queue, verify_host_key

HOST_NAME_ENV = "ASR_HOST_NAME"
HOST_KEY_ENV = "ASR_HOST_KEY"
HOST_KEY_FD_ENV = "ASR_HOST_KEY_FD"
HOST_KEY_FILE_ENV = "ASR_HOST_KEY_FILE"
HOST_QUEUE_PREFIX = "host."
UNPROVEN_EXIT_CODE = os.EX_CONFIG  # 78: the process was started wrong; restarting it as it was does not help

logger = logging.getLogger(__name__)
_identity: dict[str, str | None] = {"name": None, "key": None}
_verified: dict[str, str] = {}  # host name -> the stored key hash this process's key last verified against
_lock = threading.Lock()


def read_host_key(environ: Any = None) -> str | None:
    """The key handed to this process (pipe, file or variable), the variable and the pipe consumed."""
    environ = os.environ if environ is None else environ
    fd = environ.pop(HOST_KEY_FD_ENV, None)
    if fd:
        with os.fdopen(int(fd), "r") as pipe:
            return pipe.read().strip() or None
    path = environ.get(HOST_KEY_FILE_ENV)
    if path:
        return Path(path).read_text().strip() or None
    return environ.pop(HOST_KEY_ENV, None) or None


@worker_init.connect
def _take_identity(sender: Any = None, **_: Any) -> None:
    # In the worker's main process, before its pool forks and before it connects to the broker: the children
    # inherit what is read here, and an unproven worker exits before it could take a message.
    _identity["name"] = os.environ.get(HOST_NAME_ENV) or None
    try:
        _identity["key"] = read_host_key()
    except (OSError, ValueError) as exc:
        logger.error("the host key handed to this worker cannot be read: %s", exc)
    if sender is None:
        return
    consumed = sorted(sender.app.amqp.queues.consume_from)
    try:
        refusal = unproven_worker(consumed)
    except sa.exc.SQLAlchemyError as exc:
        # The database is away: nothing can be verified now, and an outage must not keep the agent down.
        # Its claims and heartbeats verify the key once the database is back.
        logger.warning("the host identity of this worker could not be verified at start: %s", exc)
        return
    if refusal is not None:
        logger.critical("this worker does not start: %s", refusal)
        print(f"error: this worker does not start: {refusal}", file=sys.stderr, flush=True)
        raise SystemExit(UNPROVEN_EXIT_CODE)


def unproven_worker(queues: list[str]) -> str | None:
    """Why a worker consuming `queues` may not start, or None: a worker started as a host's agent
    (ASR_HOST_NAME) needs that host registered and its valid key, and each registered host's queue among
    `queues` needs the worker to be that host's agent."""
    name = _identity["name"]
    if name is not None:
        with session_scope() as session:
            host = session.exec(select(Host).where(Host.name == name)).first()
            if host is None:
                return (f"this worker was started as the agent of host {name!r} ({HOST_NAME_ENV}): "
                        f"no such host is registered")
            if (refusal := _unproven(host)) is not None:
                return refusal
    for queue in queues:
        if (refusal := unproven_host_queue(queue)) is not None:
            return refusal
    return None


def stop_consuming_host_queue(consumer: Any, name: str, reason: str) -> None:
    """Stop the worker's consumer (Celery's, in the worker's main loop) taking messages off host `name`'s
    queue, for `reason`, loudly: an agent that can no longer prove it is the host must take none of its
    steps (a message it has already taken is refused at its claim, which verifies against the stored key
    hash). It stays stopped until restarted."""
    queue = host_queue(name)
    consuming = queue in {consumed.name for consumed in consumer.task_consumer.queues}
    logger.critical("%s: %s queue %s; restart it with the host's valid key (`asr worker host %s`)", reason,
                    "this worker stops consuming" if consuming else "this worker does not consume", queue, name)
    if consuming:
        consumer.cancel_task_queue(queue)


def host_identity() -> tuple[str | None, str | None]:
    """(host name, key) this worker was started with; (None, None) for a worker that is no host's agent."""
    return _identity["name"], _identity["key"]


def unproven_host_queue(queue: str) -> str | None:
    """Why this process may not run a step sent on `queue`, or None: a registered host's queue needs a
    worker started as that host with its valid key. Other queues (orchestration, recovery) are anyone's,
    and answered without a read. The engine asks inside the step's claim (execute_step's `may_run`)."""
    if not queue.startswith(HOST_QUEUE_PREFIX):
        return None
    with session_scope() as session:
        host = session.exec(select(Host).where(Host.queue == queue)).first()
        return None if host is None else _unproven(host)


def _unproven(host: Host) -> str | None:
    """Why this process is not host `host`'s proven agent, or None: started as that host, with its key. A scrypt
    per step would cost more than a short step, so the key is verified once per stored key hash: `asr host
    rekey` stores a new one (a new salt), and the very next claim verifies again, and refuses."""
    name, key = _identity["name"], _identity["key"]
    if name != host.name:
        return (f"this worker was not started as the agent of host {host.name!r} "
                f"({HOST_NAME_ENV}={name!r}); start it with `asr worker host {host.name}` and the host's key")
    with _lock:
        fresh = _verified.get(host.name) == host.key_hash
    if fresh:
        return None
    if key is None or not verify_host_key(host, key):
        with _lock:
            _verified.pop(host.name, None)
        return f"this worker does not hold the registration key of host {host.name!r}"
    with _lock:
        _verified[host.name] = host.key_hash
    return None
