"""A whole deployment of the engine's services on this machine: `Deployment`.

The demo, the tests and the benchmarks start the same parts: a private redis-server, a database (a SQLite
file in the work folder, or a URL), optionally Azurite, Celery workers by name (name: queues and
concurrency), beat and optionally Flower (the process helpers of sites/localservices.py). This process's
database and Celery app are pointed at them (its environment and `point_app_at`) until `close()`, which
stops everything the deployment started and restores this process's settings; so does a failed `start()`.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlsplit, urlunsplit

from datapath.private import make_private_directories, write_new_private_file
from sites.brokeracl import BrokerUser, engine_user, host_agent_user, new_password
from sites.localservices import (
    ApiProcess,
    AzuriteProcess,
    CeleryProcess,
    FlowerProcess,
    RedisServer,
    celery_env,
    point_app_at,
    start_api,
    start_beat,
    start_flower,
    start_worker,
    stop_all,
)
from sites.pki import DeploymentCertificates, create_deployment_certificates

AZURE_CONNECTION_ENV = "ASR_AZURE_CONNECTION_STRING"
"""The variable holding the Azurite connection string in every worker (and this process)."""
STORAGE_KEK_FILE_ENV = "ASR_STORAGE_KEK_FILE"
"""The variable naming the key-encryption key file of the recovery storage, in every process."""


class Deployment:
    """Redis, a database, optionally Azurite, workers, beat and optionally Flower, with this process pointed
    at them; a context manager (or `start()` and `close()`).

    `settings` (ASR_* variables) reach the workers and this process, `worker_settings` the workers only;
    this process's own ASR_* variables never reach the workers (`celery_env`). `azurite`: True starts one
    (stopped on close), an AzuriteProcess already running is used as it is; either way its connection
    string is the setting ASR_AZURE_CONNECTION_STRING. `flower`: (user, password) starts Flower with basic
    authentication. `api`: True starts `asr api` (the REST API and the web console). Worker, beat, Flower and
    API logs go to `logs` (default: `workdir`); `say` hears of every
    service started. The recovery storage is encrypted under a key-encryption key file made in `workdir`
    (ASR_STORAGE_KEK_FILE) unless `settings` name one.

    `tls`: True makes the deployment's CA and certificates in `workdir`/tls (as `asr certs create`; kept
    there for a later deployment in the same folder), or given certificates are used: Redis then speaks TLS
    only with client certificates, Azurite (started here) HTTPS, Flower HTTPS, and every process gets the
    ASR_TLS_* settings. False is a plain-text deployment, chosen explicitly: its processes and this one get
    ASR_INSECURE_TRANSPORT=1 (each logs a warning once).

    `broker_acl`: Redis admits only its ACL users (sites/brokeracl.py): every process connects as the
    engine's user (`broker_url`) except the hosts' agents, each as its own host's (`host_broker_url`), which
    reaches only its own queue; the `default` user is the operator's (`redis.client()`), with a password.
    Each user's password is in a private file under `workdir`/broker-users."""

    def __init__(
        self, workdir: Path, *, workers: Mapping[str, tuple[Sequence[str], int]] | None = None, beat: bool = True,
        flower: tuple[str, str] | None = None, database_url: str | None = None, appendonly: bool = True,
        azurite: AzuriteProcess | bool = False, settings: Mapping[str, str] | None = None,
        worker_settings: Mapping[str, str] | None = None, logs: Path | None = None, ready_timeout: float = 30.0,
        say: Callable[[str], None] | None = None, tls: bool | DeploymentCertificates = False, api: bool = False,
        broker_acl: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.logs = Path(logs) if logs is not None else self.workdir
        self.database_url = database_url or f"sqlite:///{self.workdir / 'asr.db'}"
        self.settings = dict(settings or {})
        self.certificates: DeploymentCertificates | None = (
            tls if isinstance(tls, DeploymentCertificates) else _certificates(self.workdir / "tls") if tls else None
        )
        if self.certificates is not None:
            self.settings.update(self.certificates.settings())
        else:
            self.settings.setdefault("ASR_INSECURE_TRANSPORT", "1")
        self.worker_settings = dict(worker_settings or {})
        self.ready_timeout = ready_timeout
        self._worker_specs = {name: (list(queues), concurrency) for name, (queues, concurrency)
                              in (workers or {}).items()}
        self._beat = beat
        self._flower_login = flower
        self._api = api
        self._say = say or (lambda _text: None)
        self.redis = RedisServer(self.workdir / "redis", appendonly=appendonly, tls=self.certificates,
                                 acl=broker_acl)
        self.broker_acl = broker_acl
        self.broker_url = self.redis.url
        """The broker URL of every process but the hosts' agents: with `broker_acl`, the engine's user's."""
        self._host_broker_urls: dict[str, str] = {}
        self._own_azurite = azurite is True
        self.azurite: AzuriteProcess | None = (
            AzuriteProcess(self.workdir / "azurite", tls=self.certificates) if azurite is True else (azurite or None)
        )
        self.env: dict[str, str] = {}
        """The environment of the workers, beat and Flower (and of any other process of this deployment)."""
        self.worker_env: dict[str, dict[str, str]] = {}
        """Variables of one worker by name, beside `env`: a host agent's name and key (ASR_HOST_NAME,
        ASR_HOST_KEY), which only that worker may hold."""
        self.processes: list[CeleryProcess] = []
        self.workers: dict[str, CeleryProcess] = {}
        """Every running process by name: the workers', "beat", "flower"."""
        self.flower: FlowerProcess | None = None
        self.api: ApiProcess | None = None
        self._saved_env: dict[str, str | None] = {}
        self._previous_broker: str | None = None
        self._started = False
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self, *, processes: bool = True) -> Deployment:
        """Start Redis (and Azurite), point this process here, create the tables; then, unless `processes`
        is false (call `start_processes` later), the workers, beat and Flower side by side."""
        if self._started:
            raise RuntimeError("this deployment was started already")
        self._started = True
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if self.broker_acl:
                self.broker_url = self._broker_user(engine_user())
            self.redis.start()
            self._say(f"  redis-server on {self.redis.url} (pid {self.redis.pid})")
            if self.azurite is not None:
                if self._own_azurite:
                    self.azurite.start()
                    self._say(f"  Azurite on {self.azurite.blob_endpoint}")
                self.settings.setdefault(AZURE_CONNECTION_ENV, self.azurite.connection_string())
            self._give_a_storage_kek()
            self.env = celery_env(broker_url=self.broker_url, database_url=self.database_url,
                                  **{**self.settings, **self.worker_settings})
            self._point_this_process_here()
            from models.db import init_db

            init_db()  # before the workers, so they do not race each other to create the tables
            if processes:
                self.start_processes()
        except BaseException:
            self.close()
            raise
        return self

    def start_processes(self) -> None:
        """The configured workers, beat and Flower, all started before any is waited for (they start side
        by side); each one tracked as soon as it exists, so `close()` stops it even if a later one fails."""
        starting = [self.add_worker(name, queues, concurrency=concurrency, wait=False,
                                    env={**self.env, **self.worker_env[name]} if name in self.worker_env else None)
                    for name, (queues, concurrency) in self._worker_specs.items()]
        if self._beat:
            starting.append(self.start_beat(wait=False))
        if self._flower_login is not None:
            user, password = self._flower_login
            self._name_free("flower")
            self.flower = self._track("flower", start_flower(self.env, self.logs, user=user, password=password,
                                                             wait=False))
        if self._api:
            self._name_free("api")
            self.api = self._track("api", start_api(self.env, self.logs, wait=False))
        for process in starting:
            process.wait_ready(self.ready_timeout)
            self._say(f"  {process.name} ready (pid {process.process.pid})")
        if self.flower is not None:
            self.flower.wait_ready(self.ready_timeout)
            self._say(f"  Flower: {self.flower.url}  (user {self._flower_login[0]}, password "
                      f"{self._flower_login[1]})")
        if self.api is not None:
            self.api.wait_ready(self.ready_timeout)
            self._say(f"  API: {self.api.url}/api/v1  console: {self.api.url}/console/")

    def close(self, *, hard: bool = False) -> None:
        """Stop the workers, beat and Flower, Redis and the Azurite it started (each bounded); restore this
        process's settings. Once; a later call does nothing. `hard`: the processes are killed at once, not
        shut down warm (for a throwaway deployment, e.g. a test's: a warm shutdown costs each Celery process
        about 0.6 s of CPU and the deployment 2-3 s, which nobody waits for there)."""
        if self._closed:
            return
        self._closed = True
        try:
            stop_all(self.processes, hard=hard)
            self.processes = []
            self.workers = {}
            self.redis.stop()
            if self._own_azurite and self.azurite is not None:
                self.azurite.stop()
        finally:
            from models.db import dispose_engines

            dispose_engines()
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if self._previous_broker is not None:
                point_app_at(self._previous_broker)

    def __enter__(self) -> Deployment:
        return self if self._started else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _give_a_storage_kek(self) -> None:
        """Unless the settings name a key-encryption key (or turn encryption off), the deployment's recovery
        storage is encrypted under a new one, `storage.kek` in the work folder (mode 0600)."""
        given = {**self.settings, **self.worker_settings}
        if any(name in given for name in (STORAGE_KEK_FILE_ENV, "ASR_STORAGE_KEK", "ASR_STORAGE_ENCRYPTION")):
            return
        from sites.storage.keys import write_kek_file

        path = self.workdir / "storage.kek"
        if not path.exists():
            write_kek_file(path)
        self.settings[STORAGE_KEK_FILE_ENV] = str(path)

    def _point_this_process_here(self) -> None:
        from models.db import dispose_engines

        # The Celery app is configured when worker.py is first imported: after the settings below when it
        # has not been yet, so that it never reads (and refuses, as plain text) the default broker URL.
        worker = sys.modules.get("worker")
        self._previous_broker = worker.app.conf.broker_url if worker is not None else None
        for key, value in {**self.settings, "ASR_BROKER_URL": self.broker_url,
                           "ASR_DATABASE_URL": self.database_url}.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        dispose_engines()
        point_app_at(self.broker_url)

    # ---- broker users ---------------------------------------------------------------------------------
    def _broker_user(self, user: BrokerUser) -> str:
        """Create `user` on this deployment's Redis with a new password, kept in the private file
        `broker_password_file(USER)` (0600, in a 0700 folder); returns the URL connecting as it."""
        password_file = self.broker_password_file(user.name)
        make_private_directories(password_file.parent)
        password = new_password()
        write_new_private_file(password_file, password + "\n", overwrite=True)
        return self.redis.add_user(user, password)

    def broker_password_file(self, user_name: str) -> Path:
        """Where the password of the broker's ACL user `user_name` is kept."""
        return self.workdir / "broker-users" / f"{user_name}.password"

    def host_broker_url(self, host_name: str) -> str:
        """The broker URL of host `host_name`'s agent: with `broker_acl`, as the host's own ACL user (made
        on first use: sites/brokeracl.py), which reaches only the host's queue; else the deployment's."""
        if not self.broker_acl:
            return self.broker_url
        if host_name not in self._host_broker_urls:
            self._host_broker_urls[host_name] = self._broker_user(host_agent_user(host_name))
        return self._host_broker_urls[host_name]

    def _host_agent_broker_env(self, host_name: str) -> dict[str, str]:
        """The broker settings of host `host_name`'s agent with `broker_acl`: its user's URL without the
        password, and the password's file (ASR_BROKER_PASSWORD_FILE), as a deployment hands it over."""
        url = urlsplit(self.host_broker_url(host_name))
        user_only = url._replace(netloc=f"{quote(url.username or '', safe='')}@{url.hostname}:{url.port}")
        return {"ASR_BROKER_URL": urlunsplit(user_only),
                "ASR_BROKER_PASSWORD_FILE": str(self.broker_password_file(host_agent_user(host_name).name))}

    # ---- processes ------------------------------------------------------------------------------------
    def add_worker(self, name: str, queues: Sequence[str], *, concurrency: int = 1,
                   env: Mapping[str, str] | None = None, wait: bool = True) -> CeleryProcess:
        """One more worker node `<name>@<host>` on `queues` (with `env` instead of the deployment's). A worker
        started as a host's agent (ASR_HOST_NAME in `env`) connects to the broker as that host
        (`host_broker_url`)."""
        self._name_free(name)
        env = dict(env or self.env)
        if self.broker_acl and env.get("ASR_HOST_NAME"):
            # The result backend and progress settings too, where they name the broker's Redis.
            agent = self._host_agent_broker_env(env["ASR_HOST_NAME"])
            for setting in ("ASR_RESULT_BACKEND", "ASR_REDIS_URL"):
                if env.get(setting) == self.broker_url:
                    env[setting] = agent["ASR_BROKER_URL"]
            env.update(agent)
        return self._track(name, start_worker(name, list(queues), env, self.logs,
                                              concurrency=concurrency, wait=wait, timeout=self.ready_timeout))

    def start_beat(self, *, wait: bool = True) -> CeleryProcess:
        """Beat: the reconciler every ASR_RECONCILE_S and the replication scheduler every ASR_TICK_S."""
        self._name_free("beat")
        return self._track("beat", start_beat(self.env, self.logs, wait=wait, timeout=self.ready_timeout))

    def stop_process(self, name: str, *, kill: bool = False) -> None:
        """Stop one of the processes by its name (a worker's, "beat", "flower"); SIGKILL when `kill`."""
        process = self.workers.pop(name)
        self.processes.remove(process)
        if kill:
            process.kill()
        else:
            stop_all([process])

    def _name_free(self, name: str) -> None:
        if name in self.workers:
            raise ValueError(f"a process named {name!r} is already running in this deployment")

    def _track(self, name: str, process: CeleryProcess) -> CeleryProcess:
        self.workers[name] = process
        self.processes.append(process)
        return process

    def log_tails(self, chars: int) -> str:
        """The last `chars` characters of every process's log, each under a line naming it."""
        return "\n".join(f"--- tail of {name} ({process.log_path}) ---\n{process.log()[-chars:]}"
                         for name, process in self.workers.items())


def _certificates(folder: Path) -> DeploymentCertificates:
    """The deployment's certificates in `folder`: those made there before, else new ones."""
    existing = DeploymentCertificates(folder)
    if all(path.is_file() for path in existing.files()):
        return existing
    return create_deployment_certificates(folder, deployment=folder.parent.name or "deployment")
