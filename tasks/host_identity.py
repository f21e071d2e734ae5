"""Which host's agent this worker process is, proven with the host's registration key: a step on a host's
queue runs only in a worker that proved it is that host.

The launcher (`asr worker host NAME`) checks the key before it starts the worker, but anything that reaches
Redis can start a plain `celery worker -Q host.NAME` and take that host's disk steps. So the worker checks
too, at every host step: it was started as host NAME (ASR_HOST_NAME) with NAME's key, verified against the
database's hash (again at most every VERIFY_EVERY_S, so a re-registered host's old key stops working).

The key reaches the worker as the launcher hands it on: a pipe (ASR_HOST_KEY_FD), a file
(ASR_HOST_KEY_FILE), or the environment (ASR_HOST_KEY, removed from this process's environment at start so
the VMs' processes do not inherit it).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery.signals import worker_init
from sqlmodel import select

from models.db import session_scope
from models.fabric import Host, verify_host_key

HOST_NAME_ENV = "ASR_HOST_NAME"
HOST_KEY_ENV = "ASR_HOST_KEY"
HOST_KEY_FD_ENV = "ASR_HOST_KEY_FD"
HOST_KEY_FILE_ENV = "ASR_HOST_KEY_FILE"
HOST_QUEUE_PREFIX = "host."
VERIFY_EVERY_S = 60.0

logger = logging.getLogger(__name__)
_identity: dict[str, str | None] = {"name": None, "key": None}
_verified: dict[str, float] = {}  # host name -> when its key last verified (monotonic)
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
def _take_identity(**_: Any) -> None:
    # In the worker's main process, before its pool forks: the children inherit what is read here.
    _identity["name"] = os.environ.get(HOST_NAME_ENV) or None
    try:
        _identity["key"] = read_host_key()
    except (OSError, ValueError) as exc:
        logger.error("the host key handed to this worker cannot be read: %s", exc)


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
        if host is None:
            return None
        name, key = _identity["name"], _identity["key"]
        if name != host.name:
            return (f"this worker was not started as the agent of host {host.name!r} "
                    f"({HOST_NAME_ENV}={name!r}); start it with `asr worker host {host.name}` and the host's key")
        with _lock:
            fresh = time.monotonic() - _verified.get(host.name, float("-inf")) < VERIFY_EVERY_S
        if fresh:
            return None
        if key is None or not verify_host_key(host, key):
            with _lock:
                _verified.pop(host.name, None)
            return f"this worker does not hold the registration key of host {host.name!r}"
    with _lock:
        _verified[host.name] = time.monotonic()
    return None
