"""Real Redis and Celery processes for tests of the job engine.

A private `redis-server` on a free port with its data in a temporary directory (never the machine's
shared Redis on 6379), real `celery -A worker worker` and `celery -A worker beat` subprocesses with the
environment a test gives them, and bounded waits everywhere: every stop ends with SIGKILL to the
process group when the polite signal was not enough in time.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import redis

from services import LOCALHOST, REPO_ROOT, ServiceStartError, _log_tail, free_port, port_answers

T = TypeVar("T")

ACTION_MODULES = "tests.engine_actions"


def wait_until(predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll until `predicate()` is truthy and return it; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _reap(process: subprocess.Popen[bytes], grace: float) -> None:
    """Give the process `grace` s to exit, then SIGKILL its whole process group (which also takes any
    child left behind) and wait for it."""
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is gone already
    process.wait(timeout=10)


def _ask_to_stop(process: subprocess.Popen[bytes]) -> None:
    # The main process only: a Celery worker shuts its own pool down (warm shutdown).
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)


class RedisServer:
    """redis-server on 127.0.0.1 and a free port; `restart()` keeps the port and the data directory."""

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        self.workdir = Path(workdir)
        self.appendonly = appendonly
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOCALHOST, port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def start(self, timeout: float = 10.0) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise ServiceStartError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            executable, "--bind", LOCALHOST, "--port", str(self.port), "--dir", str(self.workdir),
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
        ]
        if self.appendonly:
            # fsync on every write: a test that kills Redis must find every acknowledged message again.
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise ServiceStartError(
                    f"redis-server exited with status {self._process.returncode} before listening on "
                    f"port {self.port}: {_log_tail(self._log_path)}"
                )
            if port_answers(self.port):
                try:
                    if self.client().ping():
                        return self
                except redis.RedisError:
                    pass  # still loading its data
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceStartError(
                    f"redis-server did not answer on port {self.port} within {timeout:g} s: "
                    f"{_log_tail(self._log_path)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None:
            _ask_to_stop(process)
            _reap(process, timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything beyond what it already wrote."""
        process, self._process = self._process, None
        if process is not None:
            _reap(process, 0)


class CeleryProcess:
    """One `celery -A worker ...` subprocess in a session of its own, logging to a file."""

    def __init__(
        self, name: str, args: list[str], env: Mapping[str, str], workdir: Path, *, ready_pattern: str
    ) -> None:
        self.name = name
        self.ready_pattern = ready_pattern  # a line of its log that says it is ready
        self.workdir = Path(workdir)
        self.log_path = self.workdir / f"{name}.log"
        command = [sys.executable, "-m", "celery", "-A", "worker", *args]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the process logs that it is ready; kill it and raise if it does not in time."""
        deadline = time.monotonic() + timeout
        while not re.search(self.ready_pattern, self.log(), re.MULTILINE):
            if self.process.poll() is not None:
                raise ServiceStartError(
                    f"{self.name} exited with status {self.process.returncode}: {_log_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServiceStartError(f"{self.name} was not ready within {timeout:g} s: {_log_tail(self.log_path)}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL to the whole process group: the main process and every pool child vanish at once."""
        _reap(self.process, 0)


def stop_all(processes: list[CeleryProcess], timeout: float = 10.0) -> None:
    """Warm shutdown of all of them side by side; whatever has not exited after `timeout` s is killed."""
    for celery_process in processes:
        _ask_to_stop(celery_process.process)
    deadline = time.monotonic() + timeout
    for celery_process in processes:
        _reap(celery_process.process, max(0.0, deadline - time.monotonic()))


def celery_env(*, broker_url: str, database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a worker or beat process: the test's own Redis and database, the test
    actions, and engine settings given as ASR_* keyword arguments (e.g. ASR_HEARTBEAT_S="1")."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith("ASR_") and key != "PYTHONPATH"
    }
    env.update(
        ASR_BROKER_URL=broker_url,
        ASR_DATABASE_URL=database_url,
        ASR_ACTION_MODULES=ACTION_MODULES,
        PYTHONPATH=str(REPO_ROOT),
        PYTHONUNBUFFERED="1",
    )
    env.update(settings)
    return env


def start_worker(
    name: str, queues: list[str], env: Mapping[str, str], workdir: Path, *, concurrency: int = 1,
    wait: bool = True, timeout: float = 30.0,
) -> CeleryProcess:
    """A prefork worker node `<name>@<host>` consuming `queues` (pool children run the tasks, so a
    task can die without its node); ready to take tasks when this returns, unless `wait` is false
    (then call `wait_ready`: several workers start faster side by side)."""
    args = [
        "worker", "-n", f"{name}@%h", "-Q", ",".join(queues), "--pool", "prefork", "-c", str(concurrency),
        "-l", "INFO", "--without-mingle", "--without-gossip",
    ]
    process = CeleryProcess(f"worker-{name}", args, env, workdir, ready_pattern=rf" {re.escape(name)}@\S+ ready\.$")
    if wait:
        process.wait_ready(timeout)
    return process


def start_beat(env: Mapping[str, str], workdir: Path, *, wait: bool = True, timeout: float = 30.0) -> CeleryProcess:
    """celery beat sending the reconciler every ASR_RECONCILE_S seconds."""
    schedule = Path(workdir) / "beat-schedule"
    process = CeleryProcess("beat", ["beat", "-l", "INFO", "-s", str(schedule)], env, workdir,
                            ready_pattern="beat: Starting")
    if wait:
        process.wait_ready(timeout)
    return process


def point_app_at(broker_url: str) -> None:
    """Make this process's Celery app (worker.app) send to `broker_url` and keep results there.

    worker.py reads ASR_BROKER_URL when first imported, possibly by an earlier test module; the app's
    connection pools and result backend are cached, so they are dropped to take the new URL."""
    from worker import app

    app.conf.update(broker_url=broker_url, result_backend=broker_url)
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    app._backend_cache = None
    app._local = threading.local()


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
                    except socket.timeout:
                        pass

    def _on_event(self, event: dict) -> None:
        self.events.append(event)
        if self._found(event):
            self._receiver.should_stop = True
