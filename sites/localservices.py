"""Local service processes the tests, the benchmarks and the demo start and stop themselves (a whole
deployment of them: sites/deployment.py).

Azurite, a private `redis-server`, `celery -A worker worker|beat|flower`: each a child process bound to
127.0.0.1 on a free port (never the machine's shared Redis on 6379), in a session of its own so one
signal reaches it and everything it spawned, logging to a file in its work directory. Every start waits
(bounded) until the service answers; every stop ends with SIGKILL to the process group when the polite
signal was not enough in time, then reaps it. Given a deployment's certificates (sites/pki.py), Redis
speaks TLS only with client certificates, Azurite serves HTTPS, and so does Flower when its environment
names a server certificate.
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
from types import TracebackType
from typing import TypeVar
from urllib.parse import quote

import redis

from datapath.private import write_new_private_file
from sites.brokeracl import BrokerUser, new_password, password_hash
from sites.pki import DeploymentCertificates

REPO_ROOT = Path(__file__).resolve().parents[1]
AZURITE_BLOB = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"

# The Azurite development account; its key is published in Azurite's documentation.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

LOCALHOST = "127.0.0.1"

T = TypeVar("T")


class ServiceStartError(RuntimeError):
    """A service could not be started; the message says what to do."""


class WaitTimeout(AssertionError):
    """`wait_until` ran out of time. An AssertionError, so a test that waits fails as an assertion."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def port_answers(port: int, host: str = LOCALHOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_tail(log_path: Path, limit: int = 2000) -> str:
    try:
        return log_path.read_text(errors="replace")[-limit:].strip() or "(no output)"
    except OSError:
        return "(no log)"


def wait_until(predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll until `predicate()` is truthy and return it; WaitTimeout naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _wait_started(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], *, what: str, timeout: float, log_path: Path,
    give_up: Callable[[], None], interval: float = 0.05,
) -> None:
    """The one start-and-wait loop of every service: return once `ready()`; ServiceStartError with the
    tail of its log when the process exits first, or (after `give_up()` ended it) when `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise ServiceStartError(
                f"{what} exited with status {process.returncode} before it was ready: {_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            give_up()
            raise ServiceStartError(f"{what} was not ready within {timeout:g} s: {_log_tail(log_path)}")
        time.sleep(interval)


def _spawn(command: list[str], log_path: Path, *, cwd: Path | None = None,
           env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # A session of its own, so a stop can end the process and anything it spawned together.
        return subprocess.Popen(
            command, cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )


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


# ---- Azurite ------------------------------------------------------------------------------------------
class AzuriteProcess:
    """Azurite's blob service from the project-local install, on 127.0.0.1 and a free port."""

    def __init__(self, workdir: Path, *, executable: Path = AZURITE_BLOB, debug_log: Path | None = None,
                 tls: DeploymentCertificates | None = None, host: str = LOCALHOST, netns: str | None = None):
        """`debug_log`: where Azurite writes its debug log, which records every request's headers (slow;
        for tests that check what went over the wire). `tls`: serve HTTPS with that deployment's server
        certificate (clients verify it with its CA). `host` and `netns`: listen on that address inside that
        network namespace (`ip netns exec`), as a storage account on another machine would."""
        self.host = host
        self.netns = netns
        self.workdir = Path(workdir)
        self.executable = Path(executable)
        self.debug_log = debug_log
        self.tls = tls
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "azurite.log"

    @property
    def blob_endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("Azurite is not started")
        return f"{self.scheme}://{self.host}:{self.port}/{AZURITE_ACCOUNT}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def connection_string(self, account_key: str = AZURITE_ACCOUNT_KEY) -> str:
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={AZURITE_ACCOUNT};AccountKey={account_key};"
            f"BlobEndpoint={self.blob_endpoint};"
        )

    def start(self, timeout: float = 30.0) -> AzuriteProcess:
        if not os.access(self.executable, os.X_OK):
            raise ServiceStartError(
                f"Azurite is not installed at {self.executable}: run `make install` or `make test` (they install "
                f"Azurite into .tools with npm)"
            )
        data_dir = self.workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        command = [
            *(["ip", "netns", "exec", self.netns] if self.netns else []),
            str(self.executable), "--blobHost", self.host, "--blobPort", str(self.port),
            "--location", str(data_dir), "--silent", "--disableTelemetry", "--skipApiVersionCheck",
            "--loose",
        ]
        if self.debug_log is not None:
            command += ["--debug", str(self.debug_log)]
        if self.tls is not None:
            command += ["--cert", str(self.tls.server_cert_file), "--key", str(self.tls.server_key_file)]
        self._process = _spawn(command, self._log_path)
        port, host = self.port, self.host
        _wait_started(self._process, lambda: port_answers(port, host), what=f"Azurite (port {port})", timeout=timeout,
                      log_path=self._log_path, give_up=self.stop, interval=0.1)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)  # the group: node and anything it spawned
        _reap(process, timeout)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> AzuriteProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# ---- Redis --------------------------------------------------------------------------------------------
class RedisServer:
    """redis-server on 127.0.0.1 and a free port; `start()` again after `stop()` or `kill()` keeps the port
    and the data directory. With `tls` (a deployment's certificates) it speaks TLS only (no plain port)
    and admits only clients presenting a certificate of the deployment's CA (mutual TLS)."""

    def __init__(self, workdir: Path, *, appendonly: bool = False, tls: DeploymentCertificates | None = None,
                 acl: bool = False) -> None:
        """`acl`: Redis 7 ACL users only (`add_user`), kept in the ACL file `users.acl` (0600) in `workdir`;
        the `default` user then needs a password, `admin_password` (which `client()` uses): it is the
        operator's, no process of the deployment's connects as it."""
        self.workdir = Path(workdir)
        self.appendonly = appendonly
        self.tls = tls
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "redis.log"
        self.acl = acl
        self.admin_password: str | None = new_password() if acl else None
        self._users: dict[str, str] = {}  # user name -> its ACL file line

    @property
    def acl_file(self) -> Path:
        return self.workdir / "users.acl"

    def add_user(self, user: BrokerUser, password: str) -> str:
        """Create or redefine the ACL user `user` with `password` (now, when running; kept in the ACL file
        for every later start); returns the URL that connects as it."""
        if not self.acl:
            raise RuntimeError("this redis-server has no ACL users (RedisServer(acl=True))")
        self._users[user.name] = user.acl_file_line(password)
        if self._process is not None:
            self._write_acl_file()
            self.client().execute_command("ACL", "LOAD")
        return self.user_url(user.name, password)

    def user_url(self, user: str, password: str) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{LOCALHOST}:{self.port}/0"

    def _write_acl_file(self) -> None:
        default = f"user default on #{password_hash(self.admin_password or '')} ~* &* +@all"
        write_new_private_file(self.acl_file, "\n".join([default, *self._users.values()]) + "\n", overwrite=True)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls is not None else 'redis'}://{LOCALHOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def client(self, username: str | None = None, password: str | None = None) -> redis.Redis:
        """A client of this server: as `username` with `password`, or as the operator (with ACL users, the
        `default` user and `admin_password`)."""
        if username is None and self.acl:
            username, password = "default", self.admin_password
        tls = {} if self.tls is None else {
            "ssl": True, "ssl_ca_certs": str(self.tls.ca_file), "ssl_certfile": str(self.tls.client_cert_file),
            "ssl_keyfile": str(self.tls.client_key_file),
        }
        return redis.Redis(host=LOCALHOST, port=self.port, socket_timeout=5, socket_connect_timeout=5,
                           username=username, password=password, **tls)

    def _answers(self) -> bool:
        if not port_answers(self.port):
            return False
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False  # still loading its data

    def start(self, timeout: float = 10.0) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise ServiceStartError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            executable, "--bind", LOCALHOST, "--dir", str(self.workdir),
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
        ]
        if self.tls is None:
            command += ["--port", str(self.port)]
        else:
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert_file),
                        "--tls-key-file", str(self.tls.server_key_file), "--tls-ca-cert-file", str(self.tls.ca_file),
                        "--tls-auth-clients", "yes"]
        if self.acl:
            self._write_acl_file()
            command += ["--aclfile", str(self.acl_file)]
        if self.appendonly:
            # fsync on every write: a test that kills Redis must find every acknowledged message again.
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        self._process = _spawn(command, self._log_path)
        _wait_started(self._process, self._answers, what=f"redis-server (port {self.port})", timeout=timeout,
                      log_path=self._log_path, give_up=self.stop)
        return self

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


# ---- Celery ---------------------------------------------------------------------------------------------
class CeleryProcess:
    """One `celery -A worker ...` subprocess in a session of its own, logging to a file."""

    def __init__(
        self, name: str, args: list[str], env: Mapping[str, str], workdir: Path, *, ready_pattern: str,
        command: list[str] | None = None,
    ) -> None:
        """`args` follow `celery -A worker`; or `command` is the whole command line (a launcher that
        execs Celery in its own place, so the process started is the Celery process)."""
        self.name = name
        self.ready_pattern = ready_pattern  # a line of its log that says it is ready
        self.workdir = Path(workdir)
        self.log_path = self.workdir / f"{name}.log"
        command = command or [sys.executable, "-m", "celery", "-A", "worker", *args]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = _spawn(command, self.log_path, cwd=self.workdir, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def is_ready(self) -> bool:
        return re.search(self.ready_pattern, self.log(), re.MULTILINE) is not None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the process logs that it is ready; kill it and raise if it does not in time."""
        _wait_started(self.process, self.is_ready, what=self.name, timeout=timeout, log_path=self.log_path,
                      give_up=self.kill)

    def kill(self) -> None:
        """SIGKILL to the whole process group: the main process and every pool child vanish at once."""
        _reap(self.process, 0)


class ServerProcess(CeleryProcess):
    """A server of the project's on 127.0.0.1:`port`, started by its `asr` launcher (through this interpreter:
    the same installation as the caller); HTTPS when its environment names a server certificate."""

    def __init__(self, name: str, launcher_args: list[str], env: Mapping[str, str], workdir: Path, *, port: int,
                 ready_pattern: str) -> None:
        self.port = port
        self.env = dict(env)
        launcher = [sys.executable, "-c", "import sys; from api.cli import main; sys.exit(main())", *launcher_args]
        super().__init__(name, [], env, workdir, ready_pattern=ready_pattern, command=launcher)

    @property
    def url(self) -> str:
        scheme = "https" if self.env.get("ASR_TLS_CERT_FILE") else "http"
        return f"{scheme}://{LOCALHOST}:{self.port}"

    def is_ready(self) -> bool:
        # A server logs its banner just before it binds; ready is when the port answers.
        return super().is_ready() and port_answers(self.port)


class FlowerProcess(ServerProcess):
    """Flower, started by `asr flower`: basic authentication always on (its HTTP API is open only then), task
    events from every worker."""

    def __init__(self, env: Mapping[str, str], workdir: Path, *, port: int, user: str, password: str) -> None:
        self.user = user
        self.password = password
        # The credentials go through the environment, not the command line, which every local user can
        # read in the process list.
        super().__init__("flower", ["flower", f"--address={LOCALHOST}", f"--port={port}"],
                         {**env, "ASR_FLOWER_USER": user, "ASR_FLOWER_PASSWORD": password}, workdir, port=port,
                         ready_pattern=r"Visit me at ")


class ApiProcess(ServerProcess):
    """The REST API and the web console, started by `asr api`."""

    def __init__(self, env: Mapping[str, str], workdir: Path, *, port: int) -> None:
        super().__init__("api", ["api", f"--host={LOCALHOST}", f"--port={port}"], env, workdir, port=port,
                         ready_pattern=r"Application startup complete")


def start_api(env: Mapping[str, str], workdir: Path, *, port: int | None = None, wait: bool = True,
              timeout: float = 30.0) -> ApiProcess:
    """`asr api` (the REST API and the console) on a free port (or `port`)."""
    process = ApiProcess(env, workdir, port=port or free_port())
    if wait:
        process.wait_ready(timeout)
    return process


def stop_all(processes: list[CeleryProcess], timeout: float = 10.0, *, hard: bool = False) -> None:
    """Warm shutdown of all of them side by side; whatever has not exited after `timeout` s is killed.
    `hard`: no warm shutdown, every process group SIGKILLed at once (as a power cut would end them)."""
    if hard:
        timeout = 0.0
    else:
        for celery_process in processes:
            _ask_to_stop(celery_process.process)
    deadline = time.monotonic() + timeout
    for celery_process in processes:
        _reap(celery_process.process, max(0.0, deadline - time.monotonic()))


def celery_env(*, broker_url: str, database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a worker, beat or Flower process: its own Redis and database, and engine settings
    given as ASR_* keyword arguments (e.g. ASR_HEARTBEAT_S="1"). This process's own ASR_* settings are
    left out, so nothing but what is given here reaches the workers."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith("ASR_") and key != "PYTHONPATH"
    }
    env.update(
        ASR_BROKER_URL=broker_url,
        ASR_DATABASE_URL=database_url,
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


def start_flower(env: Mapping[str, str], workdir: Path, *, user: str, password: str, port: int | None = None,
                 wait: bool = True, timeout: float = 30.0) -> FlowerProcess:
    """Flower on a free port (or `port`) with basic authentication `user`:`password`."""
    process = FlowerProcess(env, workdir, port=port or free_port(), user=user, password=password)
    if wait:
        process.wait_ready(timeout)
    return process


def point_app_at(broker_url: str) -> None:
    """Make this process's Celery app (worker.app) send to `broker_url` and keep results there.

    worker.py reads ASR_BROKER_URL when first imported, possibly earlier in this process; the app's
    connection pools and result backend are cached, so they are dropped to take the new URL. The pools live
    in kombu's process-wide registry, keyed by the URL: they are closed and removed from it, or an app
    pointed back at an equal URL later (a new Redis on a reused port) would get the closed pool back."""
    from kombu import pools

    from worker import app, tls_conf

    if app._pool is not None:
        app._pool.force_close_all()
        for group in (pools.producers, pools.connections):
            for key, pool in list(group.items()):
                if pool is app._pool or getattr(pool, "connections", None) is app._pool:
                    pool.force_close_all()
                    dict.__delitem__(group, key)
    app.conf.update(broker_url=broker_url, result_backend=broker_url, **tls_conf(broker_url, broker_url))
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    app._backend_cache = None
    app._local = threading.local()
